"""Connection-level defences aiohttp lacks: a deadline for request headers, and clear answers
for requests its HTTP parser refuses.

aiohttp bounds the size of a request head but not the time it takes to arrive: a client that
sends its headers a byte at a time (slowloris) holds a connection for as long as it likes. Here
every request head, counted from its first byte (or from the moment the connection opened), must
be complete within `--header-timeout` seconds; otherwise the client gets a 408 and the connection
is closed. Bodies are not under this deadline (uploads may be slow), nor is an idle keep-alive
connection between requests (aiohttp's keep-alive timeout closes those).

One blind spot remains, by construction: the start of a pipelined request that arrives in the
same packet as the end of the previous request's body is not seen as a new head, because the
C parser does not say where a message ended inside a chunk. Such a connection is still closed by
the keep-alive timeout once the previous response is done.

The parser's refusals become JSON errors like the proxy's own, with the status that says what to
change (414 request line too long, 431 header too large or too many, 400 otherwise), logged as one
line without a traceback and without the offending bytes, which may hold a credential.

aiohttp builds its `RequestHandler` inside `Server.__call__`; `ProxyAppRunner` is an `AppRunner`
whose server builds `ProxyRequestHandler` instead. The CLI serves with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidURLError,
    LineTooLong,
)
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse
from aiohttp.web_server import Server

from .errors import ERROR_HEADER, proxy_error
from .express import Express, ExpressLane, Verdict
from .forward import Handover

log = logging.getLogger("squirro_proxy.connection")

_TIMEOUT_BODY = json.dumps({
    "error": "header_timeout",
    "detail": "the request headers did not arrive in time (--header-timeout)",
    "status": 408,
}).encode()
TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"Content-Type: application/json\r\n"
    + ERROR_HEADER.encode() + b": header_timeout\r\n"
    b"Connection: close\r\n"
    b"Content-Length: " + str(len(_TIMEOUT_BODY)).encode() + b"\r\n\r\n" + _TIMEOUT_BODY
)
TOO_MANY_HEADERS = "Too many headers received"
# Turns of the loop bytes may wait for aiohttp to come round between two requests (two are
# enough: its request task ends, then its loop waits for the next).
_MAX_DEFERRALS = 3


class ProxyRequestHandler(RequestHandler):
    """aiohttp's HTTP/1.1 protocol plus a request-head deadline and JSON parse errors."""

    __slots__ = (
        "_body", "_closing", "_deferrals", "_deferred", "_head_timer", "_header_timeout", "_lane",
        "_line_length", "_line_seen", "_line_whole", "_refused", "handover",
    )

    def __init__(self, manager: Server, *, header_timeout: float, express: Express | None,
                 **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        # Plain GETs go past aiohttp's web layer while this is set (express.py); an exchange
        # the lane began and aiohttp's path is to finish waits in `handover`.
        self._lane = ExpressLane(express, self) if express is not None else None
        self.handover: Handover | None = None
        # Bytes held for one turn of the loop while aiohttp moves between two requests.
        self._deferred: list[bytes] | None = None
        self._deferrals = 0
        # A stop began while the lane was answering: aiohttp's close() waits for the lane.
        self._closing = False
        self._head_timer: asyncio.TimerHandle | None = None
        # The body of the last request whose head arrived; a new head starts once it has ended.
        self._body: StreamReader | None = None
        # Bytes of the current head before its first line break: tells a too-long request line
        # from a too-long header when the parser refuses one.
        self._line_length = 0
        self._line_seen = False
        self._line_whole = True  # the last completed (or refused) head had a request line
        self._refused = False  # the parser refused a head: the connection is done for

    # -- the head deadline -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # A connection that never sends a complete head is held to the same deadline.
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        if self._lane is not None:
            self._lane.client_gone()
        if self.handover is not None:
            self.handover.discard()
            self.handover = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        lane = self._lane
        if lane is not None and lane.busy:
            if not self._closing:  # after a stop began, new requests are dropped, as aiohttp's
                lane.hold(data)
            return
        if self._deferred is not None:
            self._deferred.append(data)  # behind bytes already waiting: order is all
            return
        if (
            self._upgraded or self._payload_parser is not None or self._force_close
            or self._close or self._refused
        ):
            self._lane = None
            super().data_received(data)
            return
        if lane is not None:
            if self._messages or self._request_in_progress:
                # aiohttp is at a request: where these bytes end, only its parser knows.
                self._lane = None
            elif self._waiter is not None or self._request_count == 0:
                # aiohttp waits for the next request (or has yet to see the first).
                self._deferrals = 0
                verdict = lane.offer(data)
                if verdict is Verdict.TAKEN:
                    if self._head_timer is not None:
                        self._disarm()  # a whole head: no deadline to watch
                    self._body = None
                    return
                if verdict is Verdict.BROKEN:
                    self._lane = None
            elif self._deferrals < _MAX_DEFERRALS:
                # Between two of aiohttp's requests: it has answered one and is about to wait
                # for the next, or has taken the next off its queue and not yet begun it. Ask
                # again once its loop has moved on.
                self._deferrals += 1
                self._deferred = [data]
                self._loop.call_soon(self._offer_deferred)
                return
            else:
                self._lane = None
        self._deferrals = 0
        self._feed_aiohttp(data)

    def _offer_deferred(self) -> None:
        data = b"".join(self._deferred or ())
        self._deferred = None
        if self.transport is not None and data:
            self.data_received(data)

    def _feed_aiohttp(self, data: bytes) -> None:
        timer = self._head_timer
        body = self._body
        new_head = timer is None and bool(data) and (body is None or body.is_eof())
        if new_head:
            self._line_length, self._line_seen = 0, False
        if (new_head or timer is not None) and not self._line_seen:
            end = data.find(b"\n")
            if end < 0:
                self._line_length += len(data)
            else:
                self._line_length += end
                self._line_seen = True
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:
            # A head is complete (or refused): what follows is its body, not under the deadline.
            self._disarm()
            self._line_whole = self._line_seen and self._line_length <= self.max_line_size
            previous = body
            message, self._body = self._messages[-1] if self._messages else (None, None)
            if isinstance(message, _ErrInfo) and previous is not None and not previous.is_eof():
                # The body under way broke (bad chunk framing, say). aiohttp queues the error as
                # a request of its own and leaves that body waiting for bytes that never come:
                # tell the handler reading it, which answers 400 and never completes it upstream.
                reason = (message.message or "").split("\n", 1)[0].strip().rstrip(":")
                if self._request_in_progress:
                    previous.set_exception(
                        RequestPayloadError(f"malformed ({reason or 'framing'})"))
                    # Nothing more can be read from this connection: no lingering over the rest
                    # of that body (which would raise the same error again) before it is closed.
                    self._lingering_time = 0.0
                else:
                    # Answered already, and aiohttp lingers over the rest of the body, whose
                    # reader would take the error for a crash: just close the connection.
                    self.force_close()
            # After a refusal the parser only repeats its error: stop reading heads.
            self._refused = isinstance(message, _ErrInfo)
        elif new_head and self.transport is not None:
            self._arm()

    # -- the express lane ------------------------------------------------------------------

    def express_done(self, backlog: bytes) -> None:
        """The lane answered a request: the connection is idle from now, as after aiohttp's."""
        if self.transport is None:
            return
        if self._closing:
            super().close()  # the stop that began while the lane answered
            return
        close_time = self._loop.time() + self._keepalive_timeout
        self._next_keepalive_close_time = close_time
        if self._keepalive_handle is None and self._keepalive_timeout > 0:
            self._keepalive_handle = self._loop.call_at(close_time, self._process_keepalive)
        if backlog:
            self.data_received(backlog)

    def hand_over(self, handover: Handover, request: bytes, backlog: bytes) -> None:
        """The lane leaves its request to aiohttp's path, whose `forward` takes up `handover`."""
        if self.handover is not None:
            self.handover.discard()  # never taken up (aiohttp refused that request)
        self.handover = handover
        count = self._request_count
        self._feed_aiohttp(request)
        if self._request_count == count + 1 and self._messages and \
                not isinstance(self._messages[-1][0], _ErrInfo):
            handover.message = self._messages[-1][0]
        else:
            self.handover = None
            handover.discard()
        if self._closing:
            super().close()  # aiohttp answers the request handed over, then closes
        elif backlog:
            self._lane = None  # pipelined bytes: only aiohttp's parser knows where they end
            self._feed_aiohttp(backlog)

    def close(self) -> None:
        """aiohttp's first step of a stop (pre_shutdown): no new requests on this connection.
        While the lane answers one, the close waits for it (aiohttp's own loop, which the close
        ends, may yet have to answer it after a handover)."""
        self._closing = True
        if self._lane is not None and self._lane.busy:
            return
        super().close()

    def _process_keepalive(self) -> None:
        if self._lane is not None and self._lane.busy:
            # Idle to aiohttp, but the lane is answering: look again a keep-alive later.
            self._keepalive_handle = self._loop.call_later(
                self._keepalive_timeout, self._process_keepalive)
            return
        super()._process_keepalive()

    async def shutdown(self, timeout: float | None = 15.0) -> None:  # noqa: ASYNC109 aiohttp's
        lane = self._lane
        if lane is not None and lane.busy:
            # No new request from here on. aiohttp gives a handler up to two periods (it waits,
            # then cancels the request and waits again): so does the lane. aiohttp's shutdown,
            # after which a handover would be ignored, begins once the lane is done, with what
            # is left of the time.
            self._closing = True
            end = None if timeout is None else self._loop.time() + 2 * timeout
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(end):
                    await lane.idle()
            if end is not None:
                timeout = max(end - self._loop.time(), 0.001)  # ceil_timeout(0): no limit
        await super().shutdown(timeout)

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self._loop.call_later(self._header_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None or self._force_close:
            return
        if self._request_in_progress or self._messages:
            # A response is under way; judge the next head once it is done.
            self._arm()
            return
        peer = transport.get_extra_info("peername")
        log.info("closed a connection from %s: its request headers were not complete within "
                 "%g s (--header-timeout)", peer[0] if isinstance(peer, tuple) else "a client",
                 self._header_timeout)
        transport.write(TIMEOUT_RESPONSE)
        self.force_close()

    # -- parser refusals -------------------------------------------------------------------

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> StreamResponse:
        if status != 400 or not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        status, code, detail = self._classify(exc)
        log.info("refused a malformed request from %s: %s (%s)", request.remote, detail, status)
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already under way")
        response = proxy_error(status, code, detail)
        response.force_close()
        return response

    def _classify(self, exc: HttpProcessingError) -> tuple[int, str, str]:
        if isinstance(exc, LineTooLong):
            if not self._line_whole:
                return (414, "request_line_too_long",
                        f"the request line is longer than {self.max_line_size} bytes "
                        "(--max-line-size)")
            return (431, "header_too_large",
                    f"a request header is longer than {self.max_field_size} bytes "
                    "(--max-field-size)")
        if exc.message == TOO_MANY_HEADERS:
            return (431, "too_many_headers",
                    f"the request has more than {self.max_headers} headers (--max-headers)")
        if isinstance(exc, InvalidURLError):
            return 400, "bad_request_target", "the request target is not a valid path"
        if isinstance(exc, BadHttpMethod):
            return 400, "bad_request", "the request method is unknown or malformed"
        if isinstance(exc, BadStatusLine):
            return 400, "bad_request", "the request line is malformed"
        # The parser's first line describes the fault; the lines after it quote the bytes.
        reason = (exc.message or "").split("\n", 1)[0].strip().rstrip(":") or "malformed"
        return 400, "bad_request", f"the request is malformed: {reason}"


class ProxyServer(Server):
    """A `Server` whose connections are `ProxyRequestHandler`s."""

    def __init__(self, base: Server, header_timeout: float, express: Express | None) -> None:
        # Adopt the state aiohttp built for the application (its handler, request factory and
        # handler arguments) rather than rebuilding it by hand.
        self.__dict__.update(vars(base))
        self.header_timeout = header_timeout
        self.express = express

    def __call__(self) -> RequestHandler:
        return ProxyRequestHandler(
            self, loop=self._loop, header_timeout=self.header_timeout, express=self.express,
            **self._kwargs,
        )


class ProxyAppRunner(web.AppRunner):
    """An `AppRunner` whose connections enforce the request-head deadline."""

    __slots__ = ("_header_timeout",)

    def __init__(self, app: web.Application, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout = header_timeout

    async def _make_server(self) -> Server:
        server = await super()._make_server()  # the application has started: its parts exist
        return ProxyServer(server, self._header_timeout, Express.for_app(self._app))
