"""The catch-all handler: send a request to the cluster with a bearer token, stream the answer back.

Bodies stream both ways and are never read whole. A request body small enough to replay is kept
while it is sent, so a 401 can be answered by refreshing the token and sending it once more.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import hdrs, web
from yarl import URL

from .config import Settings
from .errors import proxy_error
from .headers import REQUEST_ID, client_response_headers, upstream_request_headers
from .http1 import (
    CannotConnect,
    CertificateUntrusted,
    ClusterAnswer,
    ClusterPool,
    InvalidAnswer,
    RequestBodyBroken,
)
from .redact import mask_query
from .splice import Splicer, can_splice
from .tokens import AccessToken, TokenError, TokenSource, tls_untrusted_reason

log = logging.getLogger("squirro_proxy.forward")

_REQUEST_ID_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")
# Keys the handler leaves on the request for the access log and metrics.
RETRIED = web.RequestKey("retried", bool)
UPSTREAM_LATENCY = web.RequestKey("upstream_latency", float)
BYTES_IN = web.RequestKey("bytes_in", int)
BYTES_OUT = web.RequestKey("bytes_out", int)
FORWARDED_ID = web.RequestKey("forwarded_id", str)  # the X-Request-ID the cluster got


@dataclass(frozen=True, slots=True)
class Upstream:
    """What the handler needs, built once at start-up."""

    settings: Settings
    session: aiohttp.ClientSession  # forwards only through a corporate proxy (pool is None)
    ws_session: aiohttp.ClientSession  # WebSocket handshakes: own pool, redirects refused
    tokens: TokenSource
    pool: ClusterPool | None  # forwards every request when the cluster is reached directly
    # Worked out once from the cluster URL, without a trailing slash (yarl's parts are no plain
    # attributes): scheme://host[:port]/prefix, and the path put before every target.
    base: str = dataclasses.field(init=False)
    prefix: str = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        cluster = self.settings.cluster
        object.__setattr__(self, "base", str(cluster).rstrip("/"))
        object.__setattr__(self, "prefix", cluster.raw_path.rstrip("/"))

    def url(self, raw_target: str) -> URL:
        """The cluster's URL for a request target (already checked to be a path)."""
        return URL(self.base + raw_target, encoded=True)


UPSTREAM = web.AppKey("upstream", Upstream)


@dataclass(slots=True)
class Handover:
    """An exchange the express lane (express.py) began and leaves to `forward` to finish: the
    request goes through aiohttp as it came, and `forward` takes up the exchange under way
    instead of sending the request a second time.

    `answer` is the cluster's answer (a 401, or one the lane does not relay itself) and
    `latency` how long it took; `error` says why none came. Neither: the pooled connection was
    stale, and the request is sent afresh.
    """

    rid: str
    token: AccessToken
    started: float  # monotonic: when the lane took the request (the access log counts from it)
    answer: ClusterAnswer | None = None
    latency: float | None = None
    error: BaseException | None = None
    message: object = None  # aiohttp's parsed request it belongs to (identity is the key)

    def claim(self) -> tuple[ClusterAnswer | None, BaseException | None]:
        """The answer or the error, now the caller's to release or raise."""
        answer, error = self.answer, self.error
        self.answer = self.error = None
        return answer, error

    def discard(self) -> None:
        """Nobody took it up (the guard refused the request, or the client left first)."""
        if self.answer is not None:
            self.answer.close()
            self.answer = None


HANDOVER = web.RequestKey("handover", Handover)


@web.middleware
async def take_up_handover(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Outermost middleware: the exchange the express lane began for this very request, if it
    began one, goes on the request for `forward`, the metrics and the access log."""
    handover: Handover | None = getattr(request.protocol, "handover", None)
    if handover is None or handover.message is not request._message:
        return await handler(request)
    request.protocol.handover = None  # type: ignore[attr-defined]  # ProxyRequestHandler
    request[HANDOVER] = handover
    try:
        return await handler(request)
    finally:
        handover.discard()


class _HeadersWithBody(web.StreamResponse):
    """A StreamResponse whose headers wait for the first body write, as web.Response's do."""

    _send_headers_immediately = False


class BodyTee:
    """Streams a request body and keeps a copy while it stays within `limit` bytes.

    After a 401 the kept part is sent again, followed by whatever the client has not sent yet;
    once the body outgrows the limit the copy is dropped and the body can no longer be replayed.
    """

    __slots__ = ("_content", "_kept", "_kept_size", "_limit", "overflow", "size")

    def __init__(self, content: aiohttp.StreamReader, limit: int) -> None:
        self._content = content
        self._limit = limit
        self._kept: list[bytes] = []
        self._kept_size = 0
        self.overflow = False
        self.size = 0

    async def first(self) -> AsyncIterator[bytes]:
        while True:
            chunk = await self._content.readany()
            if not chunk:
                return
            self.size += len(chunk)
            if not self.overflow:
                self._kept_size += len(chunk)
                if self._kept_size > self._limit:
                    self.overflow = True
                    self._kept.clear()
                else:
                    self._kept.append(chunk)  # before yielding: a cancelled send keeps it
            yield chunk

    async def replay(self) -> AsyncIterator[bytes]:
        for chunk in self._kept:
            yield chunk
        while True:
            chunk = await self._content.readany()
            if not chunk:
                return
            self.size += len(chunk)
            yield chunk


async def _stream(content: aiohttp.StreamReader, request: web.Request) -> AsyncIterator[bytes]:
    """An unreplayable body: straight through, counting bytes."""
    size = 0
    while True:
        chunk = await content.readany()
        if not chunk:
            break
        size += len(chunk)
        yield chunk
    request[BYTES_IN] = size


# New ids: a random prefix per process and a counter, unique without a syscall per request.
# The counter starts at 2**48, so that hex() gives "0x1" and then the id's 12 last digits: a
# third of the cost of formatting them.
_ID_PREFIX = os.urandom(6).hex()
_ID_FIRST = 2**48 + 1
_ID_COUNTER = itertools.count(_ID_FIRST)


def _new_id_prefix() -> None:
    """A forked worker process must not hand out its siblings' ids."""
    global _ID_PREFIX, _ID_COUNTER
    _ID_PREFIX = os.urandom(6).hex()
    _ID_COUNTER = itertools.count(_ID_FIRST)


os.register_at_fork(after_in_child=_new_id_prefix)


def request_id(request: web.BaseRequest) -> str:
    """Keep a well-formed incoming X-Request-ID, otherwise make one (24 hex digits)."""
    return request_id_of(request.headers.get(REQUEST_ID))


def request_id_of(incoming: str | None) -> str:
    if incoming and len(incoming) <= 128 and _REQUEST_ID_OK.issuperset(incoming):
        return incoming
    return _ID_PREFIX + hex(next(_ID_COUNTER))[3:]


async def ensure_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare` hook: the proxy's own answers (refusals, 502/503/504, /-/ pages)
    carry an X-Request-ID too, so a user can quote it whatever answered."""
    if REQUEST_ID not in response.headers:
        # The id the cluster got, when the request got that far (a 502 after it was sent).
        response.headers[REQUEST_ID] = request.get(FORWARDED_ID) or request_id(request)


async def forward(request: web.Request) -> web.StreamResponse:
    """Proxy one request to the cluster."""
    up = request.app[UPSTREAM]
    raw = request.raw_path
    if not raw.startswith("/"):
        # Defence in depth (guard.py refuses these first): the target must never be able to
        # change the authority of the upstream URL.
        return proxy_error(400, "bad_request_target", "the request target must be a path")
    handover = request.get(HANDOVER)
    request[FORWARDED_ID] = rid = handover.rid if handover is not None else request_id(request)
    if hdrs.UPGRADE in request.headers:
        # Imported here because websocket.py builds on this module.
        from .websocket import proxy_websocket, wants_websocket

        if wants_websocket(request):
            return await proxy_websocket(request, up, up.url(raw), rid)

    tee: BodyTee | None = None
    body: AsyncIterator[bytes] | None
    if request.body_exists:
        length = request.content_length
        if length is None or length <= up.settings.retry_body_limit:
            tee = BodyTee(request.content, up.settings.retry_body_limit)
            body = tee.first()
        else:
            body = _stream(request.content, request)
    else:
        body = None

    resp, error = handover.claim() if handover is not None else (None, None)
    latency = handover.latency if resp is not None and handover is not None else None
    if handover is not None and (resp is not None or error is not None):
        token, started = handover.token, handover.started
    else:
        try:
            token = await up.tokens.token()
        except TokenError as exc:
            return token_error(exc)
        started = time.monotonic()
    try:
        if error is not None:
            raise error
        if resp is None:
            # After the lane met a stale connection: on a new one, as the pool would retry.
            resp = await _send(up, request, raw, token.value, body, rid,
                               fresh=handover is not None)
        if resp.status == 401:
            if body is None or (tee is not None and not tee.overflow):
                resp.release()
                resp = None
                try:
                    token = await up.tokens.refresh_after_401(token)
                except TokenError as exc:
                    return token_error(exc)
                request[RETRIED] = True
                body = tee.replay() if tee is not None else None
                started, latency = time.monotonic(), None
                resp = await _send(up, request, raw, token.value, body, rid)
            else:
                # The streamed body is gone and cannot be sent again: the client gets the 401,
                # but only after the refresh, so that its next attempt carries the new token.
                with contextlib.suppress(TokenError):
                    await up.tokens.refresh_after_401(token)
    except (TimeoutError, aiohttp.ClientError) as exc:
        return upstream_failure(exc, up.url(raw), up.settings)
    except BaseException:
        # Cancelled (the client left) while an answer was held, during the refresh after a
        # 401: its connection and pool slot must not stay taken.
        if resp is not None:
            resp.close()
        raise
    assert resp is not None
    if latency is None:
        latency = time.monotonic() - started
    request[UPSTREAM_LATENCY] = latency
    if tee is not None:
        request[BYTES_IN] = tee.size
    if log.isEnabledFor(logging.DEBUG):
        _debug_exchange(request, up.url(raw), resp, latency)

    try:
        out = await _relay(up, request, resp, rid)
    except BaseException:
        resp.close()  # unfinished: the connection cannot go back to the pool
        raise
    resp.release()
    return out


def _debug_exchange(
    request: web.Request, url: URL, resp: ClusterAnswer, latency: float
) -> None:
    """--log-level debug: what went up and came back. Header names only: values may hold
    credentials (Authorization, Cookie) and are never logged."""
    log.debug(
        "upstream %s %s%s -> %s %s in %.1f ms; request headers: %s; response headers: %s",
        request.method, url.host, mask_query(url.raw_path_qs), resp.status, resp.reason or "",
        latency * 1000, ", ".join(request.headers.keys()) or "-",
        ", ".join(resp.headers.keys()) or "-",
    )


def upstream_failure(
    exc: aiohttp.ClientError | asyncio.TimeoutError, url: URL, settings: Settings
) -> web.Response:
    """The proxy's answer when the cluster could not be reached or did not answer in time.

    Also used for the WebSocket handshake (websocket.py), which fails the same ways.
    """
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return proxy_error(
            504, "cluster_connect_timeout",
            f"no connection to the cluster at {url.host}:{url.port} within "
            f"{settings.connect_timeout:g} s (--connect-timeout): the cluster did not accept, "
            f"or all {settings.pool_size} connections (--pool-size) were busy",
        )
    if isinstance(exc, asyncio.TimeoutError):
        return proxy_error(
            504, "cluster_timeout",
            f"the cluster did not answer within {settings.read_timeout:g} s (--read-timeout)",
        )
    if isinstance(exc, (aiohttp.ClientConnectorCertificateError, CertificateUntrusted)):
        return proxy_error(502, "cluster_tls_untrusted", tls_untrusted_reason(exc))
    if isinstance(exc, (aiohttp.ClientConnectorError, CannotConnect)):
        return proxy_error(
            502, "cluster_unreachable",
            f"cannot connect to the cluster at {url.host}:{url.port}: "
            f"{exc.os_error.strerror or exc.os_error.__class__.__name__}",
        )
    if isinstance(exc, RequestBodyBroken):
        return proxy_error(400, "bad_request_body", f"the request body could not be read: {exc}")
    if isinstance(exc, InvalidAnswer):
        return proxy_error(
            502, "cluster_invalid_response",
            f"the cluster's answer was not valid HTTP/1.1: {exc}",
        )
    return proxy_error(
        502, "cluster_connection_failed",
        f"the connection to the cluster failed before it answered ({exc.__class__.__name__})",
    )


async def _send(
    up: Upstream, request: web.Request, raw: str, bearer: str,
    body: AsyncIterator[bytes] | None, rid: str, *, fresh: bool = False,
) -> ClusterAnswer:
    headers = upstream_request_headers(
        request.headers, bearer, forward_cookies=up.settings.forward_cookies,
        request_id=rid,
    )
    if up.pool is not None:
        return await up.pool.request(request.method, up.prefix + raw, headers, body, fresh=fresh)
    return await up.session.request(
        request.method, up.url(raw), headers=headers, data=body,
        allow_redirects=False,
    )


async def _relay(
    up: Upstream, request: web.Request, resp: ClusterAnswer, rid: str
) -> web.StreamResponse:
    headers = client_response_headers(
        resp.headers, cluster=up.settings.cluster, proxy_base=f"{request.scheme}://{request.host}",
        forward_cookies=up.settings.forward_cookies,
    )
    headers[REQUEST_ID] = rid
    spliced = can_splice(request, resp)
    # With a known length the body follows at once: its first piece carries the headers (one
    # send() instead of two). Streams of unknown length (event streams) get them at once, and
    # so do bodies spliced past the process (splice.py), which need an empty send buffer.
    response_class = (web.StreamResponse if resp.content_length is None or spliced
                      else _HeadersWithBody)
    out = response_class(status=resp.status, reason=resp.reason, headers=headers)
    await out.prepare(request)
    content = resp.content
    sent = 0
    finished = False
    splicer: Splicer | None = None
    try:
        if spliced:
            splicer, buffered = _start_splice(up, request, resp)
        if splicer is not None:
            log.debug("splicing %d bytes of the answer to %s %s past the process",
                      length_left(resp, len(buffered)), request.method, request.path)
            try:
                sent = len(buffered)
                await out.write(buffered)
                await splicer.run(length_left(resp, sent))
            except (TimeoutError, aiohttp.ClientPayloadError) as exc:
                return _cluster_broke_off(request, out, exc)
            except ConnectionError:
                # What was in the pipe is gone: the body cannot be completed, so the
                # connection must not look reusable.
                if request.transport is not None:
                    request.transport.abort()
                return _client_gone(request, resp, out)
            finally:
                splicer.close()
                resp.close()  # bypassed, the connection cannot go back to the pool
            finished = True
        while not finished:
            try:
                chunk = await content.readany()
            except (TimeoutError, aiohttp.ClientPayloadError,
                    aiohttp.ClientConnectionError) as exc:
                return _cluster_broke_off(request, out, exc)
            if not chunk:
                break
            sent += len(chunk)
            try:
                await out.write(chunk)
            except ConnectionError:
                return _client_gone(request, resp, out)
        try:
            await out.write_eof()
        except ConnectionError:
            return _client_gone(request, resp, out)
        return out
    finally:
        # Once, however the relay ended (a cancelled handler included): the access log and
        # the metrics read it.
        request[BYTES_OUT] = sent + (splicer.moved if splicer is not None else 0)


def length_left(resp: ClusterAnswer, sent: int) -> int:
    assert resp.content_length is not None
    return resp.content_length - sent


def _start_splice(
    up: Upstream, request: web.Request, resp: ClusterAnswer
) -> tuple[Splicer | None, bytes]:
    """Stop aiohttp reading the cluster and take what it already read; a Splicer for the rest
    of the body, or None (out of descriptors) to let aiohttp relay it after all."""
    assert resp.connection is not None and resp.connection.protocol is not None
    upstream, client = resp.connection.transport, request.transport
    # can_splice checked both (no isinstance: uvloop's transports are no asyncio subclasses)
    assert upstream is not None and client is not None
    try:
        splicer = Splicer(upstream.get_extra_info("socket"), client, up.settings.read_timeout)
    except OSError:
        return None, b""
    # Emptying the reader may resume reading from the cluster (aiohttp's flow control), so
    # take pieces until none is left, then pause, with no await in between: not a byte is
    # read that this misses.
    pieces = []
    while piece := resp.content.read_nowait():
        pieces.append(piece)
    resp.connection.protocol.pause_reading()  # also stops aiohttp's read timer
    return splicer, b"".join(pieces)


def _cluster_broke_off(request: web.Request, out: web.StreamResponse, exc: BaseException
                       ) -> web.StreamResponse:
    # The cluster broke off mid-body. Ending the response cleanly would hand the client a
    # truncated body that looks complete: drop the connection instead.
    if isinstance(exc, RequestBodyBroken):
        # The answer was under way when the client's own upload broke: not the cluster's doing.
        log.info("the request body of %s %s broke off (%s) while the answer was under way; "
                 "closing the client connection", request.method, request.path, exc)
    else:
        log.warning("the cluster broke off the response to %s %s (%s); closing the client "
                    "connection", request.method, request.path, exc.__class__.__name__)
    if request.transport is not None:
        request.transport.abort()
    return out


def _client_gone(
    request: web.Request, resp: ClusterAnswer, out: web.StreamResponse
) -> web.StreamResponse:
    log.debug("the client went away during %s %s", request.method, request.path)
    resp.close()
    return out


def token_error(exc: TokenError) -> web.Response:
    retry_after = str(max(1, round(exc.retry_after or 1)))
    if exc.final:
        return proxy_error(503, "token_rejected", exc.reason, headers={"Retry-After": "60"})
    return proxy_error(503, "token_unavailable", exc.reason, headers={"Retry-After": retry_after})
