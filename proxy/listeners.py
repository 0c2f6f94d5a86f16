"""The listening sockets: bound before anything serves, by the single process and the
supervisor of worker processes alike.

Binding them up front gives one clear error for a busy port, and lets the supervisor hand the
same sockets to every worker (connections that arrive meanwhile wait in the backlog).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Sequence
from pathlib import Path

from .config import Settings

BACKLOG = 1024


def bind(settings: Settings) -> tuple[list[socket.socket], list[str]]:
    """The TCP sockets (every address of --host) and the Unix socket, listening, and the URLs
    to announce; OSError (a busy port, a foreign address) with nothing left open."""
    listeners: list[socket.socket] = []
    urls: list[str] = []
    try:
        if settings.listen_tcp:
            port = settings.port
            infos = socket.getaddrinfo(settings.host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                listeners.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if port == 0 and len(listeners) > 1:  # port 0: the same free port everywhere
                    address = (address[0], listeners[0].getsockname()[1], *address[2:])
                sock.bind(address)
                sock.listen(BACKLOG)
                host, bound = sock.getsockname()[:2]
                urls.append(f"http://{f'[{host}]' if ':' in host else host}:{bound}")
        if settings.unix_socket is not None:
            listeners.append(_bind_unix(settings.unix_socket))
            urls.append(f"unix:{settings.unix_socket}")
    except OSError:
        close(listeners, settings)
        raise
    return listeners, urls


def _bind_unix(path: Path) -> socket.socket:
    if path.is_socket():
        path.unlink()  # left over from a previous run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Created with mode 0600 from the start: chmod afterwards leaves a window.
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    sock.listen(BACKLOG)
    return sock


def close(listeners: Sequence[socket.socket], settings: Settings) -> None:
    """Close the sockets; remove the Unix socket's file only if it is ours (bound here)."""
    ours = any(sock.family == socket.AF_UNIX for sock in listeners)
    for sock in listeners:
        sock.close()
    if ours and settings.unix_socket is not None:
        with contextlib.suppress(OSError):
            settings.unix_socket.unlink()
