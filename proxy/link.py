"""The channel between the supervisor and one worker process: calls with replies, and notes.

Each worker gets one end of a `socketpair` made by the supervisor, so only these two processes
can ever speak on it. Frames are a 4-byte length and a pickle: both ends are the same program,
and the channel carries access tokens, which is why it never leaves the two processes, and why
nothing here logs what a message holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import pickle
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("squirro_proxy.link")

_HEADER = struct.Struct("!I")
# Far above any message (a token state, a stats snapshot); a bigger frame means a broken peer.
MAX_FRAME = 16 * 1024 * 1024

CallHandler = Callable[[str, Any], Awaitable[Any]]
NoteHandler = Callable[[str, Any], None]


class LinkClosed(ConnectionError):
    """The other process went away (or the frame stream broke)."""


class RemoteFailure(Exception):
    """The other end raised while answering a call; only the exception's class name crosses."""


def encode(message: object) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def read_message_blocking(sock: socket.socket) -> Any:
    """One message, read before any event loop runs (a worker started by exec reads its
    settings this way)."""
    size = _HEADER.unpack(_recv_exactly(sock, _HEADER.size))[0]
    if size > MAX_FRAME:
        raise LinkClosed("frame too large")
    return pickle.loads(_recv_exactly(sock, size))  # noqa: S301 (our own process's message)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise LinkClosed("closed")
        data += chunk
    return bytes(data)


class Link:
    """One end of the socketpair, once the event loop runs."""

    def __init__(self, sock: socket.socket, on_call: CallHandler, on_note: NoteHandler) -> None:
        self._sock = sock
        self._on_call = on_call
        self._on_note = on_note
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def start(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(sock=self._sock)
        self._reader_task = asyncio.create_task(self._read(reader), name="link-reader")

    async def call(self, op: str, payload: Any = None) -> Any:
        """Ask the other end; its handler's return value, RemoteFailure, or LinkClosed (bound
        the wait with asyncio.timeout where the other end may hang)."""
        if self.closed.done():
            raise LinkClosed("closed")
        call_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        try:
            self._send(("call", call_id, op, payload))
            return await future
        finally:
            self._pending.pop(call_id, None)

    def note(self, op: str, payload: Any = None) -> None:
        """Tell the other end something; no answer. Dropped if the link is closed."""
        if not self.closed.done():
            self._send(("note", 0, op, payload))

    def _send(self, message: object) -> None:
        assert self._writer is not None, "Link.start() first"
        if self._writer.is_closing():
            raise LinkClosed("closed")
        # Small messages on a local socket: the kernel buffer takes them; no drain needed.
        self._writer.write(encode(message))

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        for task in list(self._tasks):
            task.cancel()
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        self._lost()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                size = _HEADER.unpack(await reader.readexactly(_HEADER.size))[0]
                if size > MAX_FRAME:
                    log.error("the channel to the other process is broken (frame too large)")
                    break
                kind, call_id, op, payload = pickle.loads(  # noqa: S301 (see the module doc)
                    await reader.readexactly(size))
                if kind == "call":
                    task = asyncio.create_task(self._answer(call_id, op, payload))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                elif kind == "note":
                    self._on_note(op, payload)
                else:
                    future = self._pending.get(call_id)
                    if future is not None and not future.done():
                        if kind == "reply":
                            future.set_result(payload)
                        else:
                            future.set_exception(RemoteFailure(payload))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the other process went away
        finally:
            self._lost()

    async def _answer(self, call_id: int, op: str, payload: Any) -> None:
        try:
            result = await self._on_call(op, payload)
        except Exception as exc:  # the caller learns the kind, the log has the rest
            log.exception("answering %r for the other process failed", op)
            reply: tuple[str, int, str, Any] = ("failure", call_id, op, exc.__class__.__name__)
        else:
            reply = ("reply", call_id, op, result)
        with contextlib.suppress(LinkClosed, RuntimeError):
            self._send(reply)

    def _lost(self) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(LinkClosed("the other process went away"))
