"""Large response bodies from a plain-HTTP cluster move socket to socket in the kernel (Linux).

Relaying a download through aiohttp copies every byte four times in user space (uvloop's read
buffer into a bytes object, the response parser's piece, the join of buffered pieces, the
send); that caps a 1 GiB download at one core's worth of memcpy. With `os.splice` the bytes go
from the cluster's socket into a pipe and from the pipe into the client's socket without ever
entering the process, as `sendfile` does for files.

Only where nothing has to look at the bytes: a body of known length (so its end is known
without parsing), a plain-HTTP cluster (TLS must be decrypted in user space) and a plain
client connection. Everything else, and every body under SPLICE_MIN, goes through aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket

import aiohttp
from aiohttp import web

# Below this, setting up a pipe and two descriptors costs more than the copies it saves.
SPLICE_MIN = 1024 * 1024
PIPE_SIZE = 1024 * 1024
AVAILABLE = hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")
_FLAGS = (getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)) if AVAILABLE \
    else 0


def _plain_socket(transport: asyncio.BaseTransport | None) -> socket.socket | None:
    if transport is None or transport.is_closing() or \
            transport.get_extra_info("ssl_object") is not None:
        return None
    sock = transport.get_extra_info("socket")
    return sock if sock is not None and sock.type == socket.SOCK_STREAM else None


def can_splice(request: web.Request, resp: aiohttp.ClientResponse) -> bool:
    """Whether this response's body may bypass the process."""
    length = resp.content_length
    if not AVAILABLE or length is None or length < SPLICE_MIN or request.method == "HEAD" \
            or resp.status in (204, 304) or resp.connection is None:
        return False
    return _plain_socket(resp.connection.transport) is not None and \
        _plain_socket(request.transport) is not None


class Splicer:
    """Moves `length` bytes from the cluster's socket to the client's; `moved` counts them.

    Raises TimeoutError when the cluster is idle for `idle_timeout`, ClientPayloadError when
    it closes before the end, ConnectionError when the client goes away.
    """

    def __init__(self, source: socket.socket, target: socket.socket, idle_timeout: float):
        self._source = source.fileno()
        self._target = target.fileno()
        self._idle_timeout = idle_timeout
        self.moved = 0

    async def run(self, length: int) -> None:
        loop = asyncio.get_running_loop()
        read_pipe, write_pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # The event loop watches copies of the two sockets: the originals belong to their
        # transports, which the loop will not let anyone else watch.
        source_watch, target_watch = os.dup(self._source), os.dup(self._target)
        try:
            with contextlib.suppress(OSError):  # a smaller pipe still works, only slower
                fcntl.fcntl(write_pipe, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            in_pipe = 0
            while self.moved < length:
                wanted = length - self.moved - in_pipe
                if wanted > 0 and in_pipe < PIPE_SIZE:
                    try:
                        n = os.splice(self._source, write_pipe, min(wanted, PIPE_SIZE - in_pipe),
                                      flags=_FLAGS)
                    except BlockingIOError:
                        if not in_pipe:
                            await _ready(loop, source_watch, False, self._idle_timeout)
                            continue
                    except ConnectionError as exc:
                        raise aiohttp.ClientPayloadError("the cluster broke the connection") \
                            from exc
                    else:
                        if n == 0:
                            raise aiohttp.ClientPayloadError(
                                "the cluster closed the connection before the body ended")
                        in_pipe += n
                if in_pipe:
                    try:
                        n = os.splice(read_pipe, self._target, in_pipe, flags=_FLAGS)
                    except BlockingIOError:
                        # The client reads slower: wait for it, which also stops reading the
                        # cluster (backpressure, with at most a pipe's worth in between).
                        await _ready(loop, target_watch, True, None)
                        continue
                    except OSError as exc:
                        raise ConnectionResetError("the client went away") from exc
                    in_pipe -= n
                    self.moved += n
        finally:
            for fd in (read_pipe, write_pipe, source_watch, target_watch):
                os.close(fd)


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, writable: bool,
                 within: float | None) -> None:
    """Wait until `fd` is readable (writable); TimeoutError after `within` seconds."""
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if writable:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        async with asyncio.timeout(within):
            await ready
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)
