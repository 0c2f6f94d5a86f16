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

from .http1 import ClusterAnswer

# Below this, setting up a pipe and two descriptors costs more than the copies it saves.
SPLICE_MIN = 1024 * 1024
PIPE_SIZE = 1024 * 1024
YIELD_EVERY = 8 * 1024 * 1024
AVAILABLE = hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")
_FLAGS = (getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)) if AVAILABLE \
    else 0


def _plain_socket(transport: asyncio.BaseTransport | None) -> socket.socket | None:
    if transport is None or transport.is_closing() or \
            transport.get_extra_info("ssl_object") is not None:
        return None
    sock = transport.get_extra_info("socket")
    return sock if sock is not None and sock.type == socket.SOCK_STREAM else None


def can_splice(request: web.Request, resp: ClusterAnswer) -> bool:
    """Whether this response's body may bypass the process."""
    length = resp.content_length
    if not AVAILABLE or length is None or length < SPLICE_MIN or request.method == "HEAD" \
            or resp.status in (204, 304) or resp.connection is None:
        return False
    return _plain_socket(resp.connection.transport) is not None and \
        _plain_socket(request.transport) is not None


class Splicer:
    """Moves bytes from the cluster's socket to the client's; `moved` counts them.

    `run` raises TimeoutError when the cluster is idle for `idle_timeout`, ClientPayloadError
    when it closes or fails before the end, ConnectionResetError when the client goes away.
    """

    def __init__(self, source: socket.socket, client: asyncio.Transport,
                 idle_timeout: float) -> None:
        self._client = client
        self._idle_timeout = idle_timeout
        self.moved = 0
        # Our own copies of the two sockets, for splicing and for the event loop to watch:
        # the originals belong to their transports (which the loop will not let anyone else
        # watch), and a copy can never come to mean another connection once they close.
        # OSError (out of descriptors) here means: no splice, aiohttp relays instead.
        target = client.get_extra_info("socket")
        self._fds: list[int] = []
        try:
            self._source = self._dup(source.fileno())
            self._target = self._dup(target.fileno())
            self._pipe_out, self._pipe_in = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._fds += [self._pipe_out, self._pipe_in]
        except OSError:
            self.close()
            raise
        with contextlib.suppress(OSError):  # a smaller pipe still works, only slower
            fcntl.fcntl(self._pipe_in, fcntl.F_SETPIPE_SZ, PIPE_SIZE)

    def _dup(self, fd: int) -> int:
        copy = os.dup(fd)
        self._fds.append(copy)
        return copy

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    async def run(self, length: int) -> None:
        loop = asyncio.get_running_loop()
        # What aiohttp wrote before (headers, the part it had read) must be on the wire first.
        while self._client.get_write_buffer_size():
            await _ready(loop, self._target, True, None)
            await asyncio.sleep(0)  # the transport's own writer runs on the same readiness
        in_pipe, since_yield = 0, 0
        while self.moved < length:
            wanted = length - self.moved - in_pipe
            if wanted > 0 and in_pipe < PIPE_SIZE:
                try:
                    n = os.splice(self._source, self._pipe_in,
                                  min(wanted, PIPE_SIZE - in_pipe), flags=_FLAGS)
                except BlockingIOError:
                    if not in_pipe:
                        await _ready(loop, self._source, False, self._idle_timeout)
                        continue
                except OSError as exc:
                    raise aiohttp.ClientPayloadError(
                        f"the cluster's connection failed ({exc.__class__.__name__})") from exc
                else:
                    if n == 0:
                        raise aiohttp.ClientPayloadError(
                            "the cluster closed the connection before the body ended")
                    in_pipe += n
            if in_pipe:
                try:
                    n = os.splice(self._pipe_out, self._target, in_pipe, flags=_FLAGS)
                except BlockingIOError:
                    # The client reads slower: wait for it, which also stops reading the
                    # cluster (backpressure, with at most a pipe's worth in between).
                    await _ready(loop, self._target, True, None)
                    continue
                except OSError as exc:
                    raise ConnectionResetError("the client connection failed") from exc
                in_pipe -= n
                self.moved += n
                since_yield += n
                if since_yield >= YIELD_EVERY:
                    # A fast cluster and a fast client never make splice wait: let the other
                    # connections, probes and the token refresh run now and then.
                    since_yield = 0
                    await asyncio.sleep(0)


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
