"""Forwarded requests' HTTP/1.1 client: a pool of keep-alive connections to the cluster.

Why not aiohttp's client, which forwarded every request before: per small request it spent about
half of the proxy's CPU (py-spy, 2026-11-29: `ClientSession._request` and its callees 41%, its
response handler 8%) on cookies, redirects, tracing, default headers, URL joining and a read
timer rescheduled on every packet, none of which forwarding needs. This client writes the head
that headers.py built, parses the answer with httptools (llhttp, the parser uvicorn uses),
streams the body back with backpressure and keeps connections alive.

aiohttp's session still serves what this one leaves out: WebSocket handshakes, the token exchange,
and clusters reached through a corporate proxy (HTTPS_PROXY / HTTP_PROXY).

Failures are raised as aiohttp's exceptions (or subclasses of them), so that forward.py answers
both clients' failures the same way.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import socket
import ssl
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, Protocol, cast

import aiohappyeyeballs
import aiohttp
import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .tasks import cancel_and_wait

log = logging.getLogger("squirro_proxy.http1")

# Limits on the cluster's answer head, as the aiohttp session had them (max_field_size): a
# broken or hostile cluster cannot make the proxy buffer without end.
MAX_FIELD = 65536
MAX_HEAD = 256 * 1024
MAX_HEADERS = 256
# Body bytes buffered while the client is slower than the cluster; above HIGH the proxy stops
# reading from the cluster until the client has taken them.
HIGH_WATER = 256 * 1024
# Bytes a reason phrase may not hold (RFC 9112: HTAB, SP, VCHAR, obs-text only).
_CONTROL = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")
# Bytes of an answer's body buffered before a listener (express.py) is told of them.
LISTENER_FLUSH = 64 * 1024
# A connection idle in the pool longer than this is closed rather than reused: the cluster's
# server may be closing it at the same moment (nginx's default keep-alive is 75 s).
IDLE_REUSE = 15.0
# Seconds before the next address of the cluster's name is tried while one is still connecting.
HAPPY_EYEBALLS_DELAY = 0.25
# Seconds without spare connections (see ClusterPool.take_idle) after one failed to connect.
SPARE_BACKOFF = 1.0
# Header fields whose values the proxy reads (lower case bytes).
NOTED = frozenset((b"content-length", b"transfer-encoding", b"connection", b"content-type",
                   b"date", b"server"))
# Methods whose requests may be sent again on a fresh connection when a pooled one turns out to
# have been closed by the cluster before it read anything (RFC 9110 section 9.2.2).
IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"))
# Methods whose body-less requests carry no Content-Length (aiohttp's client sends
# `Content-Length: 0` for the others).
_NO_BODY_METHODS = frozenset(("GET", "HEAD", "OPTIONS", "TRACE"))


AddrInfo = tuple[int, int, int, str, tuple[Any, ...]]  # one entry of getaddrinfo's answer


def _encoded(text: str) -> bytes:
    """As the client's bytes were before aiohttp decoded them (what is no UTF-8 survives)."""
    return text.encode("utf-8", "surrogateescape")


class CannotConnect(aiohttp.ClientConnectionError):
    """No connection to the cluster (refused, unreachable, name not found)."""

    def __init__(self, host: str, port: int, os_error: OSError) -> None:
        super().__init__(f"cannot connect to {host}:{port}: {os_error}")
        self.host, self.port, self.os_error = host, port, os_error


class CertificateUntrusted(aiohttp.ClientConnectionError):
    """The cluster's TLS certificate failed verification."""

    def __init__(self, host: str, port: int, error: ssl.SSLCertVerificationError) -> None:
        super().__init__(f"the TLS certificate of {host}:{port} is not trusted")
        self.host, self.port, self.certificate_error = host, port, error


class InvalidAnswer(aiohttp.ClientError):
    """The cluster's answer was not HTTP/1.1 the proxy can relay."""


class RequestBodyBroken(aiohttp.ClientPayloadError):
    """The client's request body could not be read to its end (malformed, or cut off)."""


class _HeadOnly(Exception):
    """Raised from the parser's callback to stop at the end of the head of an answer to HEAD,
    whose length headers describe a body that is never sent (llhttp cannot be told)."""


class _Overrun(Exception):
    """Raised from the parser's callback when a second answer begins after the final one: bytes
    nobody asked for, which must not be taken as part of anything."""


class ClusterAnswer(Protocol):
    """What forward.py and splice.py read of an answer: this module's Answer, or aiohttp's
    ClientResponse where the aiohttp session forwards (through a corporate proxy)."""

    @property
    def status(self) -> int: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def content_length(self) -> int | None: ...
    @property
    def content(self) -> BodyReader: ...
    @property
    def connection(self) -> Any: ...  # `transport`, and `protocol.pause_reading()`
    def release(self) -> Any: ...
    def close(self) -> None: ...


class BodyReader(Protocol):
    async def readany(self) -> bytes: ...
    def read_nowait(self, n: int = -1) -> bytes: ...


class AnswerListener(Protocol):
    """Told about an exchange started with `_Connection.start` (express.py), instead of a
    coroutine waiting for it. Called from inside the parser's callbacks: keep them short."""

    def answered(self, answer: Answer) -> None: ...  # the head is in (never an interim one)
    def failed(self, exc: BaseException) -> None: ...  # no head will come
    def readable(self) -> None: ...  # body bytes, the end, or a failure: `read_nowait` tells


class _Stale(aiohttp.ServerDisconnectedError):
    """A pooled connection was closed before the cluster sent a byte: safe to send again."""


class Answer:
    """The cluster's answer, read as forward.py reads aiohttp's ClientResponse.

    `raw_fields` are its header fields as they came, in bytes, and `raw_reason` its reason
    phrase; `noted` the values of the few the proxy looks at (lower-case names: see NOTED),
    repeats joined with a comma. `reason` and `headers` decode them, on demand: the express
    lane relays the bytes, and decoding cost it 4% of its CPU.
    """

    __slots__ = ("_conn", "_exchange", "_headers", "content_length", "noted", "raw_fields",
                 "raw_reason", "status")

    def __init__(self, conn: _Connection, status: int, raw_reason: bytes,
                 raw_fields: list[tuple[bytes, bytes]], noted: dict[bytes, bytes],
                 content_length: int | None) -> None:
        self._conn = conn
        self._exchange = conn.exchanges  # a late release must not end a later exchange
        self.status = status
        self.raw_reason = raw_reason
        self.raw_fields = raw_fields
        self.noted = noted
        self.content_length = content_length
        self._headers: CIMultiDictProxy[str] | None = None

    @property
    def reason(self) -> str:
        return self.raw_reason.decode("utf-8", "surrogateescape")

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        if self._headers is None:
            # As aiohttp decodes them: bytes that are no UTF-8 survive the way back unchanged.
            self._headers = CIMultiDictProxy(CIMultiDict(
                (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
                for name, value in self.raw_fields))
        return self._headers

    @property
    def content(self) -> _Connection:
        return self._conn

    @property
    def connection(self) -> _Connection:
        """Has `transport` and `protocol.pause_reading()`, as splice.py needs."""
        return self._conn

    def release(self) -> None:
        """Done with the answer: its connection goes back to the pool if the body was read to
        the end, and is closed otherwise."""
        if self._conn.exchanges == self._exchange:
            self._conn.finish(reuse=True)

    def close(self) -> None:
        if self._conn.exchanges == self._exchange:
            self._conn.finish(reuse=False)


class _Connection(asyncio.Protocol):
    """One connection to the cluster: writes a request, parses its answer, hands out the body."""

    def __init__(self, pool: ClusterPool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.protocol = self  # splice.py pauses reading through `connection.protocol`
        self.closed = False  # set as soon as the proxy drops it, before connection_lost
        # It has waited in the pool: the cluster may have closed it meanwhile (see _Stale).
        self.pooled = False
        self.exchanges = 0
        self.idle_since = 0.0
        self._in_use = False
        self._parser: httptools.HttpResponseParser | None = None
        self._spare_parser: httptools.HttpResponseParser | None = None
        self._feeding = False  # inside the parser: see data_received
        self._release_after_feed: bool | None = None
        self._method = ""
        self._answer: asyncio.Future[Answer] | None = None
        self._status_line = b""
        self._fields: list[tuple[bytes, bytes]] = []
        self._noted: dict[bytes, bytes] = {}
        self._head_size = 0
        self._trailer_size = 0
        self._maybe_trailer = False
        self._head_done = False
        self._interim = False
        self._until_eof = False
        self._got_bytes = False
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._complete = False
        self._keep_alive = False
        self._exc: BaseException | None = None
        self._reader: asyncio.Future[None] | None = None
        self._listener: AnswerListener | None = None
        self._paused_for_buffer = False
        self._paused_for_good = False
        self._write_paused = False
        self._drainer: asyncio.Future[None] | None = None
        self._body_task: asyncio.Task[None] | None = None
        self._body_sent = True
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        # Whether the cluster's silence counts: not while it waits for the client's upload.
        self._cluster_owes = False

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports are no asyncio subclasses.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self._complete:
            # Bytes nobody asked for (after an answer, or on an idle connection): whatever
            # follows on this connection cannot be trusted to start a new answer.
            self._drop()
            return
        self._got_bytes = True
        self._last_read = self._loop.time()
        if not self._head_done:
            self._head_size += len(data)
        elif self._maybe_trailer:
            self._trailer_size += len(data)
        self._feeding = True
        try:
            self._feed(parser, data)
        finally:
            self._feeding = False
            if self._release_after_feed is not None:
                # finish() came from inside the parser (a listener's end of the answer): only
                # now, with the rest of the read parsed (and any bytes nobody asked for found),
                # may the connection serve another request.
                reusable, self._release_after_feed = self._release_after_feed, None
                self._pool.release(self, reusable and not self.closed)

    def _feed(self, parser: httptools.HttpResponseParser, data: bytes) -> None:
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(InvalidAnswer("it switched protocols without being asked to"))
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _HeadOnly):
                return
            if isinstance(cause, _Overrun):
                self._drop()
                return
            reason = str(cause if isinstance(cause, InvalidAnswer) else exc) or "unparsable"
            if self._head_done:
                # Mid-body, as when the cluster breaks off: forward.py drops the client.
                self._fail(aiohttp.ClientPayloadError(
                    f"the cluster's body was not valid HTTP/1.1: {reason}"))
            else:
                self._fail(InvalidAnswer(reason))
            return
        # httptools gathers a header field (or a trailer) whole before handing it over, so the
        # bound is checked between reads: memory stays within the limit plus one read.
        if not self._head_done and self._head_size > MAX_HEAD:
            self._fail(InvalidAnswer(f"its head is larger than {MAX_HEAD // 1024} KiB"))
        elif self._maybe_trailer and self._trailer_size > MAX_HEAD:
            self._fail(aiohttp.ClientPayloadError(
                f"the cluster's trailer was larger than {MAX_HEAD // 1024} KiB"))

    def eof_received(self) -> bool:
        self.closed = True
        if self.transport is not None and self.transport.get_write_buffer_size():
            # Request bytes still unsent would hold the connection open (and connection_lost
            # back) until the cluster reads them, which it may never do.
            self.transport.abort()
        return False  # close the transport: a half-closed cluster connection is no use

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        self._stop_timer()
        if self._parser is not None and not self._complete and self._exc is None:
            error: aiohttp.ClientError | None = None
            if self._head_done and self._until_eof and exc is None:
                self._complete = True  # the body of unknown length ends with the connection
            elif self._head_done:
                error = aiohttp.ClientPayloadError(
                    "the cluster closed the connection before the end of the body")
            elif self.pooled and not self._got_bytes:
                error = _Stale("the cluster closed a pooled connection")
            else:
                error = aiohttp.ServerDisconnectedError(
                    "the cluster closed the connection before it answered")
            self._exc = error
            if error is not None:
                self._tell_no_head(error)
        self._wake_reader()
        drainer = self._drainer
        if drainer is not None and not drainer.done():
            drainer.set_exception(ConnectionResetError("the cluster closed the connection"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drainer = self._drainer
        if drainer is not None and not drainer.done():
            drainer.set_result(None)

    # --- httptools callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            raise _Overrun
        self._status_line = b""
        self._fields = []
        self._noted = {}

    def on_status(self, status: bytes) -> None:
        self._status_line += status  # llhttp may hand it over in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_done:
            return  # a trailer field: not relayed (aiohttp's server cannot send trailers)
        fields = self._fields
        # Both limits as llhttp hands the fields over (each once the next begins), so that a
        # hostile head costs no more than them. (The size only once the head has grown that
        # large: a length or two saved. A field that never ends meets MAX_HEAD, between reads.)
        if len(fields) >= MAX_HEADERS:
            raise InvalidAnswer(f"it has more than {MAX_HEADERS} header fields")
        if self._head_size > MAX_FIELD and len(name) + len(value) > MAX_FIELD:
            raise InvalidAnswer(f"a header field is larger than {MAX_FIELD // 1024} KiB")
        fields.append((name, value))
        lname = name.lower()
        if lname in NOTED:
            noted = self._noted
            noted[lname] = noted[lname] + b"," + value if lname in noted else value

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if status == 101:  # the proxy forwards upgrades on the WebSocket path only
            raise InvalidAnswer("it switched protocols without being asked to")
        if 100 <= status < 200:
            self._interim = True  # 100 Continue, 103 Early Hints: the answer is still to come
            return
        noted = self._noted
        length = noted.get(b"content-length")
        coding = noted.get(b"transfer-encoding")
        chunked = coding is not None
        if coding is not None and [c.strip().lower() for c in coding.split(b",")] != [b"chunked"]:
            # Another transfer coding (gzip, identity, ...) would reach the client undone
            # and unlabelled (Transfer-Encoding is hop-by-hop), as aiohttp's client refused it.
            named = coding.decode("utf-8", "surrogateescape").replace(",", ", ")
            raise InvalidAnswer(f"it uses the transfer coding {named!r}; "
                                "only chunked can be relayed")
        # llhttp has checked the value is digits, and refused it next to Transfer-Encoding.
        content_length = int(length) if length is not None and not chunked else None
        reason = self._status_line
        if reason != b"OK" and _CONTROL.search(reason):
            # llhttp lets them through; relayed, they would end the client's status line.
            raise InvalidAnswer("its status line holds control characters")
        no_body = self._method == "HEAD" or status in (204, 304)
        self._until_eof = not no_body and content_length is None and not chunked
        self._head_done = True
        answer = Answer(self, status, reason, self._fields, noted, content_length)
        if self._answer is not None and not self._answer.done():
            self._answer.set_result(answer)
        elif self._listener is not None:
            self._listener.answered(answer)
        # Also when the cluster answers before it has read the whole body.
        self._cluster_owes = True
        if self._timer is None:  # (usually armed already, and a call saved)
            self._start_timer()
        if self._method == "HEAD":
            self._complete = True
            self._keep_alive = False  # where the head ended in this read is unknown: close
            self._parser = None
            raise _HeadOnly

    def on_chunk_header(self) -> None:
        # Until body bytes follow, this may be the last chunk, and what follows its trailer.
        self._maybe_trailer = True
        self._trailer_size = 0

    def on_body(self, body: bytes) -> None:
        self._maybe_trailer = False
        self._chunks.append(body)
        # Counted with what a piece costs beyond its bytes: a cluster sending one-byte chunks
        # cannot make the buffer forty times its nominal size.
        self._buffered += len(body) + 64
        if self._listener is None or self._buffered >= LISTENER_FLUSH:
            # A listener relays small answers whole, in one write, at the end.
            self._wake_reader()
        if self._buffered > HIGH_WATER and not self._paused_for_buffer:
            self._paused_for_buffer = True
            self._stop_timer()  # the cluster is not idle: the client is slow
            if self.transport is not None and not self._paused_for_good:
                self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        assert self._parser is not None
        self._complete = True
        self._keep_alive = self._parser.should_keep_alive()
        # The read timer is left to find the answer complete when it fires: cancelling it
        # here and arming a new one for the next request cost 2% of the CPU per request.
        self._wake_reader()

    # --- the body, for forward.py and splice.py ---------------------------------------------------

    async def readany(self) -> bytes:
        """The body bytes buffered so far, waiting for some if none are; b"" at the end."""
        while not self._chunks:
            if self._complete:
                return b""
            if self._exc is not None:
                raise self._exc
            self._reader = self._loop.create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        return self.read_nowait()

    def read_nowait(self, n: int = -1) -> bytes:
        """What is buffered, without waiting (`n` is ignored: all of it)."""
        chunks = self._chunks
        if not chunks:
            if self._exc is not None and not self._complete:
                raise self._exc
            return b""
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._paused_for_buffer:
            self._paused_for_buffer = False
            if not self._paused_for_good and self.transport is not None and not self.closed:
                self._last_read = self._loop.time()
                self.transport.resume_reading()
                self._start_timer()
        return data

    def pause_reading(self) -> None:
        """Stop reading for good (splice.py takes the socket over) and stop the read timer."""
        self._paused_for_good = True
        self._stop_timer()
        if self.transport is not None and not self._paused_for_buffer:
            self.transport.pause_reading()

    @property
    def complete(self) -> bool:
        """The whole answer has arrived (what is buffered is all there is)."""
        return self._complete

    @property
    def error(self) -> BaseException | None:
        """Why the answer cannot arrive whole, once that is known."""
        return self._exc

    # --- one exchange ---------------------------------------------------------------------------

    async def exchange(self, method: str, head: bytes,
                       body: AsyncIterator[bytes] | None, chunked: bool) -> Answer:
        answer: asyncio.Future[Answer] = self._loop.create_future()
        self._answer = answer
        self._begin(method, head)
        if body is None:
            self._body_sent = self._cluster_owes = True
            self._start_timer()
        else:
            self._body_sent = self._cluster_owes = False
            self._body_task = self._loop.create_task(self._send_body(body, chunked))
        return await answer

    def start(self, method: str, head: bytes, listener: AnswerListener) -> None:
        """A body-less exchange whose outcome goes to `listener` rather than to a waiting
        coroutine (express.py). `listener` may hand the exchange over to a coroutine at any
        point: `stop_listening`, then read the answer as `exchange` returns it."""
        self._answer = None
        self._listener = listener
        self._begin(method, head)
        self._body_sent = self._cluster_owes = True
        self._start_timer()

    def stop_listening(self) -> None:
        """From here on the answer is read by a coroutine (readany), as after `exchange`."""
        self._listener = None

    def _begin(self, method: str, head: bytes) -> None:
        assert self.transport is not None and self._parser is None
        self._method = method
        self.exchanges += 1
        self._parser = self._spare_parser or httptools.HttpResponseParser(self)
        self._spare_parser = None
        self._head_size = self._trailer_size = 0
        self._head_done = self._interim = self._until_eof = self._got_bytes = False
        self._maybe_trailer = False
        self._complete = self._keep_alive = False
        self._exc = None
        self._chunks.clear()
        self._buffered = 0
        self._last_read = self._loop.time()
        self.transport.write(head)

    async def _send_body(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        transport = self.transport
        assert transport is not None
        try:
            async for chunk in body:
                if self.closed:
                    return
                if chunked:
                    transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                else:
                    transport.write(chunk)
                if self._write_paused:
                    self._drainer = self._loop.create_future()
                    try:
                        await self._drainer
                    finally:
                        self._drainer = None
            if chunked and not self.closed:
                transport.write(b"0\r\n\r\n")
        except ConnectionError as exc:
            if self.closed or transport.is_closing():
                return  # the cluster went away: connection_lost tells the answer
            # The client's connection broke: the cluster must not take what it got as complete.
            self._fail(RequestBodyBroken(f"the client's connection broke ({exc})"))
            return
        except Exception as exc:
            # Malformed or cut off (aiohttp's RequestPayloadError), or anything else: the
            # cluster must not take what it got as a complete body.
            self._fail(RequestBodyBroken(str(exc) or exc.__class__.__name__))
            return
        self._body_sent = True
        if not self._complete and not self.closed:
            # Only now is the cluster's silence the cluster's: until here it waited for us.
            self._last_read = self._loop.time()
            self._cluster_owes = True
            self._start_timer()

    def finish(self, *, reuse: bool) -> None:
        """Done with the current exchange: back into the pool, or closed."""
        if not self._in_use:
            return
        self._in_use = False
        task, self._body_task = self._body_task, None
        if task is not None and not task.done():
            task.cancel()
            reuse = False
        reusable = (reuse and self._complete and self._keep_alive and self._body_sent
                    and not self.closed and not self._paused_for_good and not self._chunks)
        # The parser of a complete answer is ready for the next: llhttp resets itself.
        self._spare_parser = self._parser if reusable else None
        self._parser = None
        self._answer = None
        self._listener = None
        if reusable:
            self.pooled = True
            self.idle_since = self._loop.time()
        else:
            self._drop()
        if self._feeding:
            self._release_after_feed = reusable
        else:
            self._pool.release(self, reusable)

    # --- helpers --------------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        """The exchange cannot go on: tell whoever waits, and drop the connection."""
        if self._complete:
            # Trouble after the end of the answer (bytes nobody asked for) spoils only the
            # connection, not the answer already read.
            self._drop()
            return
        if self._exc is None:
            self._exc = exc
        self._wake_reader()  # a body under way: its reader gets the error
        self._drop()
        self._tell_no_head(exc)  # dropped first: a listener may hand the request over

    def _tell_no_head(self, exc: BaseException) -> None:
        """Whoever waits for the answer's head learns that none will come (no-op once it came)."""
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(exc)
        listener = self._listener
        if listener is not None and not self._head_done:
            self._listener = None
            listener.failed(exc)

    def _drop(self) -> None:
        self._stop_timer()
        if self.transport is not None:  # also after eof_received: abort may come twice
            self.transport.abort()
        self.closed = True

    def _wake_reader(self) -> None:
        reader = self._reader
        if reader is not None and not reader.done():
            reader.set_result(None)
        elif self._listener is not None and self._head_done:
            self._listener.readable()

    def _start_timer(self) -> None:
        if self._timer is None and not self._complete:
            self._timer = self._loop.call_at(self._last_read + self._pool.read_timeout,
                                             self._check_idle)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check_idle(self) -> None:
        # Re-armed lazily, from the last read, rather than rescheduled on every packet (or for
        # every request on a kept-alive connection).
        self._timer = None
        if self._complete or not self._in_use or not self._cluster_owes or \
                self._paused_for_buffer or self._paused_for_good or self.closed:
            return
        deadline = self._last_read + self._pool.read_timeout
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._check_idle)
            return
        self._fail(aiohttp.SocketTimeoutError(
            f"the cluster sent nothing for {self._pool.read_timeout:g} s"))


class ClusterPool:
    """At most `limit` connections to the cluster in use at once; idle ones kept for reuse.

    A request that finds every connection busy waits for one, within `connect_timeout` (which
    also bounds the connection itself), then fails with aiohttp's ConnectionTimeoutError.
    """

    def __init__(self, cluster: URL, *, limit: int, connect_timeout: float,
                 read_timeout: float, ssl_context: ssl.SSLContext | None) -> None:
        self.loop = asyncio.get_running_loop()
        assert cluster.host is not None
        self.host = cluster.host
        self.port = cluster.port or (443 if cluster.scheme == "https" else 80)
        self.limit = limit
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._ssl = ssl_context
        host = cluster.raw_host or self.host
        if ":" in host:
            host = f"[{host}]"
        if cluster.explicit_port is not None and not cluster.is_default_port():
            host += f":{cluster.port}"
        self._host_line = f"Host: {host}\r\n".encode("utf-8", "surrogateescape")
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._busy = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        # The connection take_idle() is opening, and whether a request waits for it.
        self._spare: asyncio.Task[_Connection | None] | None = None
        self._spare_claimed = False
        self._no_spare_until = 0.0
        self._closed = False

    async def request(self, method: str, target: str, headers: CIMultiDict[str],
                      body: AsyncIterator[bytes] | None, *, fresh: bool = False) -> Answer:
        """Send one request (`target` is the raw path and query) and wait for the answer's head.

        `fresh`: on a new connection, and not sent again if that fails (a stale pooled
        connection was met already, by the express lane)."""
        chunked = body is not None and "Content-Length" not in headers
        # aiohttp sends `Content-Length: 0` for a body-less request of most methods; so do we.
        zero = body is None and method not in _NO_BODY_METHODS and "Content-Length" not in headers
        head = self.request_head(
            method, _encoded(target),
            [(_encoded(name), _encoded(value)) for name, value in headers.items()],
            chunked=chunked, zero_length=zero)
        deadline = self.loop.time() + self.connect_timeout
        retry = body is None and method in IDEMPOTENT and not fresh
        while True:
            conn = await self._acquire(deadline, fresh)
            try:
                return await conn.exchange(method, head, body, chunked)
            except _Stale:
                conn.finish(reuse=False)
                if not retry:
                    raise aiohttp.ServerDisconnectedError(
                        "the cluster closed the connection before it answered") from None
                # Once, on a new connection: the other pooled ones may be as stale (a cluster
                # restart closes them all), and a second failure is no coincidence.
                retry, fresh = False, True
                deadline = self.loop.time() + self.connect_timeout
            except BaseException:
                conn.finish(reuse=False)
                raise

    def request_head(self, method: str, target: bytes, fields: Iterable[tuple[bytes, bytes]],
                     *, chunked: bool = False, zero_length: bool = False) -> bytes:
        """A request's head, from bytes: the express lane's as they came from the client, the
        full path's as aiohttp decoded them, encoded back."""
        lines = [method.encode(), b" ", target, b" HTTP/1.1\r\n", self._host_line]
        for name, value in fields:
            lines += (name, b": ", value, b"\r\n")
        if chunked:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        elif zero_length:
            lines.append(b"Content-Length: 0\r\n")
        lines.append(b"\r\n")
        # Header values came through a request parser (llhttp, or aiohttp's) or are the proxy's
        # own, checked where they come from, so none can hold a line break.
        return b"".join(lines)

    async def _acquire(self, deadline: float, fresh: bool = False) -> _Connection:
        if self._busy >= self.limit or self._waiters:
            await self._wait_for_slot(deadline)
        else:
            self._busy += 1
        try:
            conn = None if fresh else self._pop_idle()
            if conn is None and self._spare is not None and not self._spare_claimed:
                # take_idle() is opening one: the first request to find none idle waits for
                # it rather than open another, which could take the pool past its limit (by
                # one). The others connect at once, each within its slot. (A spare is new,
                # so a `fresh` request may have it too.)
                conn = await self._claim_spare(self._spare, deadline)
            if conn is None:
                conn = await self._connect(deadline)
        except BaseException:
            self._pass_slot()
            raise
        conn._in_use = True  # it holds the slot now: its finish() gives it back
        return conn

    async def _claim_spare(self, spare: asyncio.Task[_Connection | None],
                           deadline: float) -> _Connection | None:
        """The spare under way, for this request alone; None if it failed or came too late
        (it then joins the idle ones)."""
        self._spare_claimed = True
        try:
            await asyncio.wait((spare,), timeout=max(deadline - self.loop.time(), 0.0))
        except BaseException:
            # Cancelled: a spare that came for this request goes to the pool instead.
            self._spare_claimed = False
            if spare.done() and not spare.cancelled() and (landed := spare.result()):
                self._idle.insert(0, landed)
            raise
        self._spare_claimed = False
        return spare.result() if spare.done() and not spare.cancelled() else None

    def take_idle(self) -> _Connection | None:
        """An idle connection and its slot, at once, or None (none idle, or no slot free).

        When none is idle but a slot is free, one more connection is opened in the background.
        Why: the caller (the express lane) cannot wait, and leaves the request to `request`,
        which under steady load usually finds a connection freed in between and opens none;
        so the pool stayed smaller than the load, and a sixth of the requests missed the lane
        (2026-11-29: 21 connections for 32 clients, 25% fewer requests/s). The spare joins
        the idle connections, or goes to the first request that finds none idle meanwhile."""
        if self._busy >= self.limit or self._waiters:
            return None
        conn = self._pop_idle()
        if conn is not None:
            self._busy += 1
            conn._in_use = True
        elif self._spare is None and not self._closed and len(self._open) < self.limit and \
                self.loop.time() >= self._no_spare_until:
            self._spare = self.loop.create_task(self._open_spare())
        return conn

    async def _open_spare(self) -> _Connection | None:
        try:
            conn = await self._connect(self.loop.time() + self.connect_timeout)
        except Exception as exc:  # requests find out, and say what failed, on their own path
            log.debug("a spare connection to the cluster failed: %s", exc)
            self._no_spare_until = self.loop.time() + SPARE_BACKOFF
            return None
        finally:
            self._spare = None
        conn.pooled = True
        conn.idle_since = self.loop.time()
        if not self._spare_claimed:
            # At the bottom: the connections used last go first, and a spare only when the
            # load needs it (otherwise it ages out, see IDLE_REUSE).
            self._idle.insert(0, conn)
        return conn

    def _pop_idle(self) -> _Connection | None:
        now = self.loop.time()
        while self._idle:
            candidate = self._idle.pop()
            if not candidate.closed and now - candidate.idle_since < IDLE_REUSE and \
                    candidate.transport is not None and not candidate.transport.is_closing():
                return candidate
            candidate._drop()
        return None

    async def _wait_for_slot(self, deadline: float) -> None:
        waiter = self.loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                self._pass_slot()  # handed over just as the time ran out
            raise aiohttp.ConnectionTimeoutError(
                f"all {self.limit} connections to the cluster stayed busy") from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._pass_slot()
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            with contextlib.suppress(ValueError):  # not there if it was handed a slot
                self._waiters.remove(waiter)  # a full pool must not collect dead waiters

    def _pass_slot(self) -> None:
        """A slot is free: to the first request still waiting, otherwise back to the count."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._busy -= 1

    async def _resolve(self) -> Sequence[AddrInfo]:
        return await self.loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)

    async def _connect(self, deadline: float) -> _Connection:
        try:
            async with asyncio.timeout_at(deadline):
                # Happy eyeballs (RFC 8305), as aiohttp's connector does: when the name has
                # several addresses and the first does not answer (an IPv6 route that drops
                # packets, say), the next is tried after 250 ms instead of after the first
                # has timed out. uvloop's create_connection has no such option.
                sock = await aiohappyeyeballs.start_connection(
                    await self._resolve(), happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY,
                    interleave=1, loop=self.loop)
                try:
                    _, conn = await self.loop.create_connection(
                        lambda: _Connection(self), sock=sock, ssl=self._ssl,
                        server_hostname=self.host if self._ssl is not None else None,
                    )
                except BaseException:
                    sock.close()
                    raise
        except TimeoutError:
            raise aiohttp.ConnectionTimeoutError(
                f"no connection to {self.host}:{self.port} in time") from None
        except ssl.SSLCertVerificationError as exc:
            raise CertificateUntrusted(self.host, self.port, exc) from None
        except OSError as exc:
            raise CannotConnect(self.host, self.port, exc) from None
        if self._closed:  # the pool closed meanwhile: nobody would close this one
            conn._drop()
            raise aiohttp.ClientConnectionError("the proxy is stopping")
        self._open.add(conn)
        return conn

    def release(self, conn: _Connection, reusable: bool) -> None:
        if reusable:
            self._idle.append(conn)
        if self._waiters:
            self._pass_slot()
        else:
            self._busy -= 1  # (what _pass_slot does then, without a call per request)

    def forget(self, conn: _Connection) -> None:
        self._open.discard(conn)

    async def close(self) -> None:
        """Close every connection (at shutdown, after the requests have drained)."""
        self._closed = True
        await cancel_and_wait(self._spare)
        self._spare = None  # (cancelled before its first step, it never cleared itself)
        for conn in list(self._open):
            conn._drop()
        self._idle.clear()


def pool_ssl(scheme: str, policy: ssl.SSLContext | bool) -> ssl.SSLContext | None:
    """The TLS context for an https:// cluster (None for http://), from the policy the aiohttp
    sessions take (upstream.upstream_ssl): a context, True for the system store, False for no
    verification (`--insecure`)."""
    if scheme != "https":
        return None
    if isinstance(policy, ssl.SSLContext):
        return policy
    context = ssl.create_default_context()
    if not policy:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
