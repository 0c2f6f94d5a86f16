"""The express lane: plain GET requests served without aiohttp's web layer.

Why: under load, aiohttp's server side (its parser, request objects, dispatch, middlewares and
response writer) took about 40% of the proxy's CPU per request (py-spy, 2026-11-29), and a proxy
that does nothing but parse, add the bearer header and copy the answer back (the benchmark's
`floor`) keeps pace with nginx on the same machine. The lane does that work for the requests most
clients send most of the time, with the proxy's own rules, and nothing else.

What takes the lane, decided from the bytes before anything is sent: one whole request in one
read, `GET`, HTTP/1.1, a path outside `/-/` that the guard's rules let through, a Host the proxy
answers to, no body, no Origin, Upgrade, Expect or cross-site Sec-Fetch-Site, no repeat of a
header aiohttp's parser refuses twice, within the head limits; with a valid access token at hand
and an idle pooled connection to the cluster; and only while aiohttp's own loop on the
connection waits for a request. Every other request goes to aiohttp, whole, as it came, and the
next may take the lane again. Bytes that are not exactly one request (half a head, pipelined
requests) go to aiohttp too, and the connection stays there: only aiohttp's parser knows where
its messages end then. Settings that need more of the full path (CORS origins, path rules, a
corporate proxy) keep the lane closed.

What the lane relays itself: an answer of known length up to HIGH_WATER (not 401, 204 or 304),
whole in one write once it is in (in 64 KiB writes when larger). Every other outcome is handed
over (`forward.Handover`): the request goes to aiohttp after all, and `forward` takes up the
exchange already under way, so a 401's refresh and retry, a failure's JSON error, a stream or a
spliced download, each have their one implementation in forward.py. The answer to the client
is the same either way, byte for byte (tests/test_express.py compares them): the same header
rules, request id, access line and metrics. One difference is deliberate: header bytes that are
no UTF-8 pass unchanged here, where aiohttp's writer drops them.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast
from urllib.parse import unquote

import httptools
from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.http_parser import SINGLETON_HEADERS
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .errors import ERROR_HEADER
from .forward import (
    BYTES_IN,
    BYTES_OUT,
    FORWARDED_ID,
    RETRIED,
    UPSTREAM,
    UPSTREAM_LATENCY,
    Handover,
    Upstream,
    request_id_of,
)
from .forward import log as forward_log
from .guard import GUARD, Guard, target_problem
from .headers import client_response_pairs, named_in, upstream_request_pairs
from .http1 import HIGH_WATER, Answer, ClusterPool, _Connection, _Stale
from .logs import ACCESS, access_line, log_client_gone
from .metrics import METRICS, RequestStats
from .paths import OPS_PREFIX
from .tokens import AccessToken

if TYPE_CHECKING:
    from .connection import ProxyRequestHandler

log = logging.getLogger("squirro_proxy.express")
_NOTHING: frozenset[bytes] = frozenset()

# Request headers that send a request to aiohttp (lower case): they ask for what only the full
# path does (a body, an upgrade, 100-continue, a CORS decision).
_NOT_EXPRESS = frozenset((
    b"content-length", b"transfer-encoding", b"upgrade", b"expect", b"origin", b"te",
    b"sec-websocket-key1",  # aiohttp's parser refuses this (a draft-76 WebSocket handshake)
    b"proxy-connection",  # llhttp reads it as Connection (so "close" would end the connection)
))
# Headers aiohttp's parser refuses to see twice (400): so does the lane, by leaving it to them.
_SINGLETONS = frozenset(name.encode() for name in SINGLETON_HEADERS)
_CROSS_SITE = frozenset((b"cross-site", b"same-site"))
_LOOKED_AT = _NOT_EXPRESS | _SINGLETONS | {b"x-request-id", b"connection", b"sec-fetch-site"}
# What the usual Connection values name, without parsing them (a header called "Close" is
# as hop-by-hop as any other named there).
_PLAIN_CONNECTION = {value: frozenset((value,)) for value in (b"keep-alive", b"close")}
# Response headers aiohttp adds when missing: an answer whose Connection names one of them
# (absurd, but possible) is left to forward.py, so that the lane need not know what it drops.
_DEFAULTED = frozenset((b"content-type", b"date", b"server"))
# A reason phrase with anything but printable ASCII is left to forward.py: aiohttp's writer
# refuses control characters, and decodes the rest (bytes that are no UTF-8 become "?").
_ODD_REASON = re.compile(b"[^\x20-\x7e]")
_SERVER = b"Server: " + SERVER_SOFTWARE.encode() + b"\r\n"
_REQUEST_ID = b"X-Request-ID"
_DATE: tuple[str, bytes] = ("", b"")
# Backlog (pipelined bytes) held while a request is under way before the client is paused.
_BACKLOG_PAUSE = 1024 * 1024


class Verdict(enum.Enum):
    TAKEN = "taken"  # the lane serves it
    WHOLE = "whole"  # one whole request the lane does not serve: aiohttp's, lane still open
    BROKEN = "broken"  # not one whole request: aiohttp's, and the lane is closed for good


@dataclass(frozen=True, slots=True)
class Express:
    """What every lane of an application shares, built once when the server starts."""

    upstream: Upstream
    pool: ClusterPool  # upstream.pool, which the lane needs: without one it stays closed
    guard: Guard
    stats: RequestStats
    head_limit: int  # bytes: a head this short is within every one of aiohttp's limits
    max_headers: int
    prefix: bytes  # the cluster's path prefix, which upstream.prefix holds as str

    @classmethod
    def for_app(cls, app: web.Application) -> Express | None:
        """None when some setting asks for what only the full path does."""
        up = app[UPSTREAM]
        guard = app[GUARD]
        settings = up.settings
        if up.pool is None or guard.cors_origins or not guard.allow.empty or \
                not guard.deny.empty:
            return None
        return cls(up, up.pool, guard, app[METRICS].stats,
                   min(settings.max_line_size, settings.max_field_size), settings.max_headers,
                   up.prefix.encode("utf-8", "surrogateescape"))


class Record(dict[object, object]):
    """What the access log and the status page read of a request (web.Request's keys and the
    two attributes they use), for a request that never became one. Made only when one of them
    asks (a dict per request cost 1.5% of the lane's CPU)."""

    __slots__ = ("raw_path",)
    raw_path: str
    method = "GET"  # the only one the lane takes


class ExpressLane:
    """One client connection's lane; `ProxyRequestHandler` offers it every read."""

    __slots__ = (
        "_answer",
        "_backlog",
        "_backlog_size",
        "_begins",
        "_chunk",
        "_conn",
        "_ends",
        "_fields",
        "_handler",
        "_head",
        "_host",
        "_idle_waiter",
        "_latency",
        "_parser",
        "_proxy_base",
        "_raw_path",
        "_request_id",
        "_rid",
        "_rid_text",
        "_sent",
        "_shape_ok",
        "_singletons",
        "_started",
        "_token",
        "_url",
        "busy",
        "express",
    )

    def __init__(self, express: Express, handler: ProxyRequestHandler) -> None:
        self.express = express
        self._handler = handler
        self._parser = httptools.HttpRequestParser(self)
        self.busy = False
        self._backlog: list[bytes] = []
        self._backlog_size = 0
        self._idle_waiter: asyncio.Future[None] | None = None
        self._begins = self._ends = 0
        # What the parser's callbacks gather of a request (on_message_begin resets them): the
        # bytes as they came, decoded only where the lane reads them.
        self._url = b""
        self._fields: list[tuple[bytes, bytes]] = []
        self._shape_ok = True
        self._host: bytes | None = None
        self._singletons: set[bytes] = set()
        self._request_id: bytes | None = None
        # The request under way (`offer` sets them; `_settle` clears what callbacks look at).
        self._chunk = b""
        self._conn: _Connection | None = None
        self._answer: Answer | None = None
        self._raw_path = ""
        self._rid_text = ""
        self._latency: float | None = None
        self._head: bytes | None = None
        self._rid = b""
        self._proxy_base = ""
        self._sent = 0
        self._started = 0.0
        self._token: AccessToken | None = None

    # --- the request's bytes ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._begins += 1
        self._url = b""
        self._fields = []
        self._shape_ok = True
        self._host = None
        self._singletons = set()
        self._request_id = None

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # As aiohttp's parser hands them over: trailing whitespace gone (llhttp keeps it). Not
        # decoded: sent on as they came, they are what aiohttp's decoding (with bytes that are
        # no UTF-8 surviving) and the client's encoding would give.
        value = value.rstrip(b" \t")
        self._fields.append((name, value))
        lname = name.lower()
        if lname not in _LOOKED_AT:
            return
        if lname in _NOT_EXPRESS:
            self._shape_ok = False
        elif lname in _SINGLETONS:
            seen = self._singletons
            if lname in seen:
                self._shape_ok = False
            seen.add(lname)
            if lname == b"host":
                self._host = value
        elif lname == b"x-request-id":
            if self._request_id is None:
                self._request_id = value
        elif (lname == b"connection" and value.lower() != b"keep-alive") or (
                lname == b"sec-fetch-site" and value in _CROSS_SITE):
            self._shape_ok = False  # closes after the answer; a cross-site page: the guard's

    def on_message_complete(self) -> None:
        self._ends += 1

    # --- taking a request ---------------------------------------------------------------------

    def offer(self, data: bytes) -> Verdict:
        """Serve `data` if it is one whole request the lane takes; otherwise say whose it is."""
        self._begins = self._ends = 0
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):  # aiohttp's to judge
            return Verdict.BROKEN
        if self._begins != 1 or self._ends != 1:
            return Verdict.BROKEN
        express = self.express
        # HTTP/1.1 with no Connection header but "keep-alive" (see on_header): the connection
        # stays open after the answer. (The parser's own should_keep_alive() is only right
        # before the request's end, and asking it from on_headers_complete cost 1.5% of the
        # lane's CPU.)
        if (
            not self._shape_ok or self._parser.get_method() != b"GET"
            or self._parser.get_http_version() != "1.1"
            or self._host is None or len(data) > express.head_limit
            or len(self._fields) > express.max_headers
            or forward_log.isEnabledFor(logging.DEBUG)  # --log-level debug: forward.py logs
        ):
            return Verdict.WHOLE
        raw = self._url.decode("utf-8", "surrogateescape")
        host = self._host.decode("utf-8", "surrogateescape")
        guard = express.guard
        if raw.startswith(OPS_PREFIX) or target_problem(raw) is not None or \
                not guard.host_allowed(host) or (
                    # aiohttp's router decodes the path: /%2D/metrics is the proxy's own too.
                    "%" in raw and unquote(raw.partition("?")[0]).startswith(OPS_PREFIX)):
            return Verdict.WHOLE
        if guard.wants_client_token and not guard.client_token_ok(CIMultiDictProxy(CIMultiDict(
                (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
                for name, value in self._fields))):
            return Verdict.WHOLE
        up = express.upstream
        token = up.tokens.current
        now = time.monotonic()
        if token is None or not token.valid(now):
            return Verdict.WHOLE  # aiohttp's path waits for it, or says why there is none
        conn = express.pool.take_idle()
        if conn is None:
            return Verdict.WHOLE  # aiohttp's path waits for a slot or connects
        incoming = self._request_id
        rid = request_id_of(None if incoming is None else incoming.decode("latin-1"))
        self._rid = rid_bytes = rid.encode()  # ASCII, as request_id_of makes sure
        # Connection can only say keep-alive here, which names no other header.
        fields = upstream_request_pairs(self._fields, _NOTHING,
                                        forward_cookies=up.settings.forward_cookies)
        fields += ((_REQUEST_ID, rid_bytes), (b"Authorization", token.authorization))
        self.busy = True
        self._chunk = data
        self._conn = conn
        self._raw_path = raw
        self._rid_text = rid
        self._latency = None
        self._token = token
        self._started = now
        self._sent = 0
        self._proxy_base = "http://" + host
        express.stats.in_flight += 1
        conn.start("GET", express.pool.request_head("GET", express.prefix + self._url, fields),
                   self)
        return Verdict.TAKEN

    def hold(self, data: bytes) -> None:
        """Bytes that came while a request is under way (pipelined): kept for after it."""
        self._backlog.append(data)
        self._backlog_size += len(data)
        transport = self._handler.transport
        if self._backlog_size > _BACKLOG_PAUSE and transport is not None:
            transport.pause_reading()

    # --- the answer (called from the cluster connection's parser) ------------------------------

    def answered(self, answer: Answer) -> None:
        # The work is inside the try, not in a helper: a call per request is 1% of the lane.
        try:
            self._latency = latency = time.monotonic() - self._started
            status = answer.status
            length = answer.content_length
            noted = answer.noted
            connection = noted.get(b"connection")
            named = _NOTHING if connection is None else \
                _PLAIN_CONNECTION.get(connection.lower()) or _connection_named(connection)
            if status in (401, 204, 304) or length is None or length > HIGH_WATER or \
                    not named.isdisjoint(_DEFAULTED) or (
                        answer.raw_reason != b"OK" and _ODD_REASON.search(answer.raw_reason)):
                self._hand_over(answer=answer, latency=latency)
                return
            settings = self.express.upstream.settings
            parts = [b"HTTP/1.1 %d %s\r\n" % (status, answer.raw_reason)]
            for name, value in client_response_pairs(
                answer.raw_fields, named, cluster=settings.cluster,
                proxy_base=self._proxy_base, forward_cookies=settings.forward_cookies,
            ):
                parts += (name, b": ", value, b"\r\n")
            parts += (_REQUEST_ID, b": ", self._rid, b"\r\n")
            # What aiohttp's StreamResponse adds when it prepares the same headers (the rules
            # drop none of these three).
            if length and b"content-type" not in noted:
                parts.append(b"Content-Type: application/octet-stream\r\n")
            if b"date" not in noted:
                parts.append(_date_line())
            if b"server" not in noted:
                parts.append(_SERVER)
            parts.append(b"\r\n")
            # Values came through llhttp or are the proxy's own: none holds a line break.
            self._head = b"".join(parts)
            self._answer = answer
        except Exception:
            # A bug must not leave the client waiting: forward.py answers as it would have.
            log.exception("express lane: the answer to GET %s is handed over",
                          self._path_for_log())
            if self._answer is None and self.busy:
                self._hand_over(answer=answer, latency=None)

    def failed(self, exc: BaseException) -> None:
        try:
            self._failed(exc)
        except Exception:
            log.exception("express lane: the failure of GET %s is left to the full path",
                          self._path_for_log())
            if self.busy:
                self._hand_over(error=exc)

    def _failed(self, exc: BaseException) -> None:
        conn = self._conn
        assert conn is not None
        conn.finish(reuse=False)
        # A stale pooled connection: aiohttp's path sends the request afresh, as the pool would.
        self._hand_over(error=None if isinstance(exc, _Stale) else exc)

    def readable(self) -> None:
        try:  # as in answered(): the work inside
            conn = self._conn
            assert conn is not None
            if self._answer is None:
                return  # handed over: forward.py reads the body
            try:
                data = conn.read_nowait()
            except Exception as exc:  # the cluster broke off, or went silent: see forward.py
                self._broke_off(exc)
                return
            transport = self._handler.transport
            if transport is None:
                return  # the client has gone: client_gone() ends the request
            head = self._head
            if head is not None:
                self._head = None
                transport.write(head + data)
            elif data:
                transport.write(data)
            self._sent += len(data)
            if conn.complete:
                self._answer.release()
                self._finish(self._answer)
            elif conn.error is not None:  # it broke off after the last of the bytes just sent
                self._broke_off(conn.error)
        except Exception:
            log.exception("express lane: relaying the answer to GET %s failed",
                          self._path_for_log())
            if self._answer is not None:
                self._broke_off(None)

    def _path_for_log(self) -> str:
        """The path as forward.py logs it (decoded, without the query, which may hold secrets)."""
        return URL(self._raw_path, encoded=True).path

    def _as_request(self) -> web.Request:
        """A Record stands in for the web.Request the access log and the metrics read: they use
        its `method`, `raw_path` and keys, and nothing else."""
        record = Record(((RETRIED, False), (BYTES_IN, 0), (BYTES_OUT, self._sent),
                         (FORWARDED_ID, self._rid_text)))
        if self._latency is not None:
            record[UPSTREAM_LATENCY] = self._latency
        record.raw_path = self._raw_path
        return cast(web.Request, record)

    def _broke_off(self, exc: BaseException | None) -> None:
        # As forward.py's _cluster_broke_off: a truncated body must not look complete.
        assert self._answer is not None
        if exc is not None:
            log.warning("the cluster broke off the response to GET %s (%s); closing the client "
                        "connection", self._path_for_log(), exc.__class__.__name__)
        self._answer.close()
        transport = self._handler.transport
        if transport is not None:
            transport.abort()
        self._finish(self._answer, client_dropped=True)

    # --- the end of a request -------------------------------------------------------------------

    def client_gone(self) -> None:
        """The client's connection closed while its request was under way."""
        if not self.busy:
            return
        if self._answer is not None:
            self._answer.close()
        elif self._conn is not None:
            self._conn.finish(reuse=False)
        request = self._as_request()
        stats = self.express.stats
        stats.in_flight -= 1
        stats.finish(request, 0, None)
        log_client_gone(request, time.monotonic() - self._started)
        self._settle()

    def _finish(self, answer: Answer, *, client_dropped: bool = False) -> None:
        status = answer.status
        stats = self.express.stats
        stats.in_flight -= 1
        stats.count("GET", status, 0, self._sent, False, self._latency)
        if status >= 500:
            stats.note_error(self._as_request(), status, _as_response(answer))
        if ACCESS.isEnabledFor(logging.INFO):
            access_line(self._as_request(), status, self._sent,
                        time.monotonic() - self._started, self._rid_text)
        self._settle()
        if client_dropped:
            self._take_backlog()  # nobody to answer: pipelined requests are not sent
        else:
            self._handler.express_done(self._take_backlog() if self._backlog else b"")

    def _hand_over(self, *, answer: Answer | None = None, latency: float | None = None,
                   error: BaseException | None = None) -> None:
        conn = self._conn
        assert conn is not None and self._token is not None
        conn.stop_listening()  # from here on the answer is read as forward.py reads it
        handover = Handover(self._rid_text, self._token, self._started, answer, latency, error)
        self.express.stats.in_flight -= 1  # counted again by aiohttp's path
        chunk = self._chunk
        self._settle()
        self._handler.hand_over(handover, chunk, self._take_backlog())

    def _settle(self) -> None:
        self.busy = False
        # What the callbacks look at to tell an answer under way (the next offer sets the rest).
        self._answer = self._head = None
        self._chunk = b""
        waiter = self._idle_waiter
        if waiter is not None:
            self._idle_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _take_backlog(self) -> bytes:
        data = b"".join(self._backlog)
        if self._backlog_size > _BACKLOG_PAUSE and self._handler.transport is not None:
            self._handler.transport.resume_reading()
        self._backlog.clear()
        self._backlog_size = 0
        return data

    async def idle(self) -> None:
        """Until the request under way has ended (graceful shutdown waits for it)."""
        if self.busy:
            if self._idle_waiter is None:
                self._idle_waiter = asyncio.get_running_loop().create_future()
            await self._idle_waiter


def _connection_named(connection: bytes) -> frozenset[bytes]:
    """The header names a Connection value lists (lower case), as the answer's bytes spell them."""
    text = connection.decode("utf-8", "surrogateescape")
    return frozenset(name.encode("utf-8", "surrogateescape") for name in named_in((text,)))


def _date_line() -> bytes:
    """The Date header aiohttp would add, encoded once a second (aiohttp's own clock)."""
    global _DATE
    text = rfc822_formatted_time()  # the same str object until the second changes
    if text is not _DATE[0]:
        _DATE = (text, b"Date: " + text.encode() + b"\r\n")
    return _DATE[1]


def _as_response(answer: Answer) -> web.StreamResponse | None:
    """What the status page notes of a cluster's 5xx, as forward.py's answer would show."""
    if answer.status < 500:
        return None
    response = web.StreamResponse(status=answer.status, reason=answer.reason)
    code = answer.headers.get(ERROR_HEADER)
    if code is not None:  # a proxy in front of the cluster said what failed
        response.headers[ERROR_HEADER] = code
    return response

