"""WebSockets: the handshake carries the bearer token to the cluster, then messages flow both ways.

The proxy ends the WebSocket on each side (aiohttp's server towards the client, aiohttp's client
towards the cluster) and relays messages between the two: text, binary, ping, pong and close,
with their payloads, close codes and reasons as they came. The access token is only checked on
the handshake, so a socket outlives the token it was opened with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, hdrs, web
from yarl import URL

from .errors import proxy_error
from .forward import (
    BYTES_IN,
    BYTES_OUT,
    RETRIED,
    UPSTREAM_LATENCY,
    Upstream,
    token_error,
    upstream_failure,
)
from .headers import REQUEST_ID, rewrite_location, upstream_request_headers
from .tokens import TokenError
from .upstream import RedirectRefused

log = logging.getLogger("squirro_proxy.websocket")

# aiohttp reassembles fragmented messages, so a message is held whole while it is relayed; this
# bounds the memory one socket can take. Larger messages close the socket with 1009.
MAX_MESSAGE_SIZE = 16 * 1024 * 1024
# How long each side gets to answer a close frame before its connection is dropped.
CLOSE_TIMEOUT = 10.0
# ... and when the relay was cancelled (client gone, shutdown grace over): no time to lose.
LAST_CLOSE_TIMEOUT = 1.0
# Handshake headers each side negotiates for itself (aiohttp writes them for the cluster hop).
_HANDSHAKE_OWN = frozenset(h.lower() for h in (
    hdrs.SEC_WEBSOCKET_KEY, hdrs.SEC_WEBSOCKET_VERSION, hdrs.SEC_WEBSOCKET_EXTENSIONS,
    hdrs.SEC_WEBSOCKET_PROTOCOL, hdrs.SEC_WEBSOCKET_ACCEPT,
))
# Messages relayed as frames of the same type; the payload is passed on untouched.
_DATA_TYPES = frozenset((WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.PING, WSMsgType.PONG))
# Close codes that describe a closing but may not be sent in a close frame (RFC 6455 7.4.1).
_NOT_SENDABLE = frozenset((0, 1005, 1006, 1015))

if TYPE_CHECKING:
    # Both sides are opened with decode_text=False: text payloads stay bytes, relayed as they came.
    ClusterSocket = aiohttp.ClientWebSocketResponse[Literal[False]]
    ClientSocket = web.WebSocketResponse[Literal[False]]
    Socket = ClientSocket | ClusterSocket


# Set when the application shuts down: every relay of that application then closes both its
# sockets with 1001 instead of holding the shutdown up until the grace period ends.
_SHUTDOWN: weakref.WeakKeyDictionary[web.Application, asyncio.Event] = (
    weakref.WeakKeyDictionary())


async def close_websockets(app: web.Application) -> None:
    """`on_shutdown` hook: close every open socket with 1001 (going away), on both sides."""
    event = _SHUTDOWN.get(app)
    if event is not None:
        event.set()


def _shutdown_event(app: web.Application) -> asyncio.Event:
    event = _SHUTDOWN.get(app)
    if event is None:
        event = _SHUTDOWN[app] = asyncio.Event()
    return event


def wants_websocket(request: web.Request) -> bool:
    """A GET asking to upgrade to WebSocket (other upgrades are forwarded as plain HTTP)."""
    return (request.method == hdrs.METH_GET
            and request.headers.get(hdrs.UPGRADE, "").strip().lower() == "websocket")


async def proxy_websocket(request: web.Request, up: Upstream, url: URL,
                          rid: str) -> web.StreamResponse:
    """Open the socket to the cluster, then to the client, and relay until either side closes."""
    offered = _offered_protocols(request)
    if not web.WebSocketResponse(protocols=offered).can_prepare(request).ok:
        # A malformed handshake is the client's mistake: refuse it before it costs a token.
        return proxy_error(400, "bad_websocket_handshake",
                           "the request asks for a WebSocket upgrade but its handshake is "
                           "incomplete (Connection: Upgrade, Sec-WebSocket-Key and "
                           "Sec-WebSocket-Version 13 are required)")
    started = time.monotonic()
    cluster_ws = await _connect(request, up, url, rid, offered)
    if isinstance(cluster_ws, web.Response):
        return cluster_ws
    request[UPSTREAM_LATENCY] = time.monotonic() - started

    client_ws: ClientSocket = web.WebSocketResponse(
        # The client gets the subprotocol the cluster chose, and no other.
        protocols=(cluster_ws.protocol,) if cluster_ws.protocol else (),
        autoclose=False, autoping=False, timeout=CLOSE_TIMEOUT, max_msg_size=MAX_MESSAGE_SIZE,
        decode_text=False,
        # Compression on the loopback hop costs CPU for nothing; the cluster hop has it instead
        # when the client asked for it.
        compress=False,
    )
    client_ws.headers[REQUEST_ID] = rid
    try:
        await client_ws.prepare(request)
        await _relay(request, client_ws, cluster_ws, _shutdown_event(request.app))
    finally:
        # Cancelled (client gone, grace period over) or failed: neither side is left open, and
        # neither gets long to answer the close.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(_going_away(client_ws, cluster_ws), LAST_CLOSE_TIMEOUT)
    return client_ws


async def _connect(request: web.Request, up: Upstream, url: URL, rid: str,
                   offered: tuple[str, ...]) -> ClusterSocket | web.Response:
    """The handshake with the cluster, retried once with a new token after a 401; a refused
    handshake gives the response for the client instead."""
    try:
        token = await up.tokens.token()
    except TokenError as exc:
        return token_error(exc)
    for attempt in (1, 2):
        try:
            return await _handshake(request, up, url, token.value, rid, offered)
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status != 401 or attempt == 2:
                return _handshake_refused(exc)
        except RedirectRefused as exc:
            # Handed to the client unfollowed, pointing back at the proxy when it names the
            # cluster, like any redirect the proxy relays.
            headers = {}
            if exc.location:
                headers["Location"] = rewrite_location(
                    exc.location, up.settings.cluster, f"{request.scheme}://{request.host}")
            return web.Response(status=exc.status, headers=headers)
        except (TimeoutError, aiohttp.ClientError) as exc:
            return upstream_failure(exc, url, up.settings)
        try:
            token = await up.tokens.refresh_after_401(token)
        except TokenError as exc:
            return token_error(exc)
        request[RETRIED] = True
    raise AssertionError("unreachable: the second attempt returns")


async def _handshake(request: web.Request, up: Upstream, url: URL, bearer: str, rid: str,
                     offered: tuple[str, ...]) -> ClusterSocket:
    headers = upstream_request_headers(
        request.headers, bearer, forward_cookies=up.settings.forward_cookies,
        request_id=rid,
    )
    for name in _HANDSHAKE_OWN.intersection(n.lower() for n in headers):
        del headers[name]
    wants_deflate = "permessage-deflate" in request.headers.get(
        hdrs.SEC_WEBSOCKET_EXTENSIONS, "").lower()
    return await up.ws_session.ws_connect(
        url, headers=headers, protocols=offered, autoclose=False, autoping=False,
        # No receive timeout: a quiet socket is not a dead one (--read-timeout is for HTTP).
        timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT),
        max_msg_size=MAX_MESSAGE_SIZE, decode_text=False, compress=15 if wants_deflate else 0,
    )


def _handshake_refused(exc: aiohttp.WSServerHandshakeError) -> web.Response:
    # aiohttp's client drops the body of a refused handshake, so the status is the cluster's but
    # the body can only be the proxy's account of it.
    if not 300 <= exc.status <= 599:
        return proxy_error(502, "bad_websocket_upgrade",
                           f"the cluster answered the WebSocket handshake with {exc.status} "
                           f"but did not open a socket ({exc.message})")
    return proxy_error(exc.status, "websocket_refused",
                       f"the cluster answered the WebSocket handshake with {exc.status} "
                       "instead of 101 Switching Protocols")


async def _going_away(client_ws: ClientSocket, cluster_ws: ClusterSocket) -> None:
    if not cluster_ws.closed:
        await cluster_ws.close(code=WSCloseCode.GOING_AWAY)
    if client_ws.prepared and not client_ws.closed:
        await client_ws.close(code=WSCloseCode.GOING_AWAY)


def _offered_protocols(request: web.Request) -> tuple[str, ...]:
    offered = request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, ())
    return tuple(p.strip() for value in offered for p in value.split(",") if p.strip())


@dataclass(frozen=True, slots=True)
class _End:
    """How a pump stopped."""

    code: int | None  # the close code its source sent; None: the source vanished without one
    reason: bytes = b""
    sink_broke: bool = False  # writing to the other side failed: that side vanished


async def _relay(request: web.Request, client_ws: ClientSocket,
                 cluster_ws: ClusterSocket, shutdown: asyncio.Event) -> None:
    """Pump messages both ways until one side ends, then close the other the same way."""
    upward = asyncio.ensure_future(_pump(client_ws, cluster_ws, request, BYTES_IN))
    downward = asyncio.ensure_future(_pump(cluster_ws, client_ws, request, BYTES_OUT))
    stopping = asyncio.ensure_future(shutdown.wait())
    try:
        await asyncio.wait((upward, downward, stopping), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        await _stop(upward)
        await _stop(downward)
        raise
    finally:
        stopping.cancel()
    if not (upward.done() or downward.done()):
        # The proxy shuts down: both sides are told so, the client waited for (briefly).
        await _stop(upward)
        await _stop(downward)
        await asyncio.gather(
            client_ws.close(code=WSCloseCode.GOING_AWAY, message=_SHUTTING_DOWN),
            cluster_ws.close(code=WSCloseCode.GOING_AWAY, message=_SHUTTING_DOWN),
        )
        return
    first, other = (upward, downward) if upward.done() else (downward, upward)
    end = first.result()
    ended_by_client = (first is upward) != end.sink_broke
    code = None if end.sink_broke else end.code
    if ended_by_client:
        # Hand the client's close code to the cluster, and the cluster's answer back.
        await cluster_ws.close(code=_sendable(code, WSCloseCode.GOING_AWAY), message=end.reason)
        await _stop(other)
        if code is not None:
            await client_ws.close(code=_sendable(cluster_ws.close_code, code),
                                  message=end.reason)
    else:
        # Stop reading the client first: close() then waits for its answer.
        await _stop(other)
        await client_ws.close(code=_sendable(code, WSCloseCode.INTERNAL_ERROR),
                              message=end.reason if code is not None else _CLUSTER_BROKE)
        if code is not None:
            await cluster_ws.close(code=_sendable(client_ws.close_code, code),
                                   message=end.reason)


_CLUSTER_BROKE = b"the connection to the cluster broke"
_SHUTTING_DOWN = b"the proxy is shutting down"


async def _pump(source: Socket, sink: Socket, request: web.Request,
                counter: web.RequestKey[int]) -> _End:
    """Relay messages from source to sink until the source closes or either side breaks."""
    size = 0
    try:
        while True:
            msg = await source.receive()
            if msg.type in _DATA_TYPES:
                size += len(msg.data)
                try:
                    await sink.send_frame(msg.data, msg.type)
                except ConnectionError:
                    return _End(None, sink_broke=True)
            elif msg.type == WSMsgType.CLOSE:
                return _End(msg.data, msg.extra.encode() if msg.extra else b"")
            else:  # CLOSING, CLOSED or ERROR: the connection broke or is being closed
                if msg.type == WSMsgType.ERROR:
                    log.debug("WebSocket error on %s: %s", request.path,
                              msg.data.__class__.__name__)
                return _End(None)
    finally:
        request[counter] = request.get(counter, 0) + size


async def _stop(task: asyncio.Future[_End]) -> None:
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


def _sendable(code: int | None, fallback: int) -> int:
    return fallback if code is None or code in _NOT_SENDABLE else code
