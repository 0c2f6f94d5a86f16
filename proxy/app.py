"""make_app(settings): wires the proxy's parts together; tests and the CLI both call it.

Long-lived resources are owned by cleanup contexts, created on start and closed on stop in
reverse order: the upstream session, then the token manager and its refresh task.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from .config import Settings
from .forward import UPSTREAM, Upstream, ensure_request_id, forward, take_up_handover
from .guard import defer_expect
from .guard import install as install_guard
from .http1 import ClusterPool, pool_ssl
from .logs import AccessLogger
from .metrics import METRICS, STATS_VIEW, RequestStats, StatsView, make_metrics, stats_middleware
from .ops import add_routes as add_ops_routes
from .routing import CatchAll
from .secret_watch import TokenFileWatcher
from .tokens import TokenManager, TokenSource
from .upstream import corporate_proxy, make_session, refuse_redirects, upstream_ssl
from .websocket import close_websockets

SETTINGS = web.AppKey("settings", Settings)
SESSION = web.AppKey("session", aiohttp.ClientSession)
WS_SESSION = web.AppKey("ws_session", aiohttp.ClientSession)
TOKEN_SESSION = web.AppKey("token_session", aiohttp.ClientSession)
POOL = web.AppKey("pool", ClusterPool)
TOKEN_POOL_SIZE = 2
TOKENS = web.AppKey("tokens", TokenManager)
KEEPALIVE_TIMEOUT = 75.0
TOKEN_FILE_WATCHER = web.AppKey("token_file_watcher", TokenFileWatcher)
SHARED_TOKENS = web.AppKey("shared_tokens", TokenSource)


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    # Three pools: requests, WebSockets (hours-long, redirects refused) and the token exchange
    # (a couple of connections no stream can take; none in a worker, whose supervisor
    # exchanges the token).
    app[SESSION] = make_session(settings)
    app[WS_SESSION] = make_session(settings, middlewares=(refuse_redirects,))
    if SHARED_TOKENS not in app:
        app[TOKEN_SESSION] = make_session(settings, pool_size=TOKEN_POOL_SIZE)
    if corporate_proxy(settings) is None:
        # Forwarded requests take the lean client (http1.py); through a corporate proxy, the
        # aiohttp session, which speaks CONNECT.
        app[POOL] = ClusterPool(
            settings.cluster, limit=settings.pool_size, connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            ssl_context=pool_ssl(settings.cluster.scheme, upstream_ssl(settings)),
        )
    yield
    if POOL in app:
        await app[POOL].close()
    for key in (TOKEN_SESSION, WS_SESSION, SESSION):
        if key in app:
            await app[key].close()


async def _tokens_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    shared = app.get(SHARED_TOKENS)
    if shared is not None:  # a worker process: the supervisor owns the life cycle
        app[UPSTREAM] = Upstream(settings, app[SESSION], app[WS_SESSION], shared, app.get(POOL))
        yield
        return
    tokens = TokenManager.for_settings(app[TOKEN_SESSION], settings)
    app[TOKENS] = tokens
    app[UPSTREAM] = Upstream(settings, app[SESSION], app[WS_SESSION], tokens, app.get(POOL))
    tokens.start()
    yield
    await tokens.stop()


async def _metrics_ctx(app: web.Application) -> AsyncIterator[None]:
    """Let the collector read the token's state at scrape time."""
    collector = app[METRICS].collector
    collector.tokens = app[UPSTREAM].tokens
    yield
    collector.tokens = None


async def _token_file_ctx(app: web.Application) -> AsyncIterator[None]:
    """Watch the token file, if the token came from one, for a rotated secret."""
    settings = app[SETTINGS]
    if settings.token_file is None or settings.token is None or SHARED_TOKENS in app:
        yield
        return
    watcher = TokenFileWatcher(settings.token_file, app[TOKENS], settings.token)
    app[TOKEN_FILE_WATCHER] = watcher
    watcher.start()
    yield
    await watcher.stop()


async def _own_stats(app: web.Application) -> RequestStats:
    return app[METRICS].stats


def make_app(settings: Settings, *, shared_tokens: TokenSource | None = None,
             stats_view: StatsView | None = None) -> web.Application:
    """The proxy as an aiohttp application.

    A worker process (supervisor.py) passes the token it shares with the other workers and
    where the figures of all of them are to be had; on its own the application holds its token
    and counts for itself.
    """
    app = web.Application(handler_args={
        # Limits on what a client may send before it is refused (431/400), memory bounded.
        "max_line_size": settings.max_line_size,
        "max_field_size": settings.max_field_size,
        "max_headers": settings.max_headers,
        # Idle keep-alive connections close after nginx's default rather than aiohttp's hour,
        # so a local client cannot hoard connections (request heads: see connection.py).
        "keepalive_timeout": KEEPALIVE_TIMEOUT,
        # A client that goes away cancels its handler, which closes the upstream request.
        "handler_cancellation": True,
        # Request bodies are forwarded as bytes: a gzip-encoded upload must stay encoded.
        "auto_decompress": False,
        "access_log_class": AccessLogger,
    })
    app[SETTINGS] = settings
    if shared_tokens is not None:
        app[SHARED_TOKENS] = shared_tokens
    app[STATS_VIEW] = stats_view or functools.partial(_own_stats, app)
    app.cleanup_ctx.append(_upstream_ctx)
    app.cleanup_ctx.append(_tokens_ctx)
    app.cleanup_ctx.append(_metrics_ctx)
    app.cleanup_ctx.append(_token_file_ctx)
    metrics = make_metrics(str(settings.cluster))
    app[METRICS] = metrics
    # Outermost, so requests the guard refuses are counted too; before it, what tells when a
    # request the express lane began started.
    app.middlewares.insert(0, stats_middleware(metrics.stats))
    app.middlewares.insert(0, take_up_handover)
    # The /-/ endpoints before the catch-all: that prefix is never forwarded.
    add_ops_routes(app)
    # Host, Origin, client token and target checks run before any handler (and before any body
    # is read); `Expect: 100-continue` is answered only once they passed.
    install_guard(app, settings)
    app.router.register_resource(CatchAll(forward, expect_handler=defer_expect))
    # WebSockets would otherwise hold the graceful shutdown for its whole grace period.
    app.on_shutdown.append(close_websockets)
    app.on_response_prepare.append(ensure_request_id)
    return app
