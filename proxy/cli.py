"""The command line: argv -> Settings -> serve (or check, or demo). `main` returns the exit code;
only `run`, the console script's entry, exits."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
import sys
import urllib.request
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from yarl import URL

from . import demo, eventloop, listeners, supervisor
from .app import TOKEN_FILE_WATCHER, TOKENS, make_app
from .config import ConfigError, Secret, Settings, load
from .connection import ProxyAppRunner
from .logs import configure
from .secret_watch import reload_token_file
from .startup import (
    EXIT_OK,
    EXIT_TOKEN_REJECTED,
    cannot_listen,
    describe,
    serve_until_stopped,
)
from .tokens import TokenError, TokenManager
from .upstream import make_session

log = logging.getLogger("squirro_proxy")

EXIT_CONFIG = 2
EXIT_CLUSTER_UNAVAILABLE = 3


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    try:
        settings = load(argv, environ)
    except ConfigError as exc:
        print("squirro-proxy: cannot start, the configuration has problems:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        print("Run `squirro-proxy --help` for every setting.", file=sys.stderr)
        return EXIT_CONFIG
    configure(settings.log_level, settings.log_format)
    for notice in settings.notices:
        log.warning(notice)
    if settings.command == "run" and settings.workers > 1:
        # Before any event loop exists: the supervisor forks the workers first.
        return supervisor.serve(settings)
    job = check(settings) if settings.command == "check" else serve(settings)
    try:
        return eventloop.run(job)
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130


async def check(settings: Settings) -> int:
    """Validate the settings and exchange the token once; print who the proxy would act as.

    Exit 0 when the cluster accepted the token, 1 when it refused it, 3 when it could not be
    asked (unreachable, 5xx, TLS): what CI and a support ticket need to tell apart.
    """
    settings, demo_runner = await _with_demo(settings)
    session = make_session(settings)
    try:
        tokens = TokenManager.for_settings(session, settings)
        try:
            token = await tokens.exchange_once()
        except TokenError as exc:
            print(f"squirro-proxy check: FAILED: {exc.reason}", file=sys.stderr)
            _print_rows(_setting_rows(settings), file=sys.stderr)
            return EXIT_TOKEN_REJECTED if exc.final else EXIT_CLUSTER_UNAVAILABLE
        print("squirro-proxy check: OK")
        _print_rows([
            ("acting as", describe(tokens.identity)),
            ("tenant", tokens.identity.tenant or "?"),
            ("user", tokens.identity.user_id or "?"),
            ("role", tokens.identity.role or "?"),
            ("access token", f"valid for {token.lifetime:.0f} s"),
            *_setting_rows(settings),
        ])
        return EXIT_OK
    finally:
        await session.close()
        if demo_runner is not None:
            await demo_runner.cleanup()


def _print_rows(rows: Sequence[tuple[str, str]], file: Any = None) -> None:
    for name, value in rows:
        print(f"  {name + ':':<14}{value}", file=file)


def _setting_rows(settings: Settings) -> list[tuple[str, str]]:
    """What `check` reports about the settings; never a token."""
    cluster = settings.cluster
    if cluster.scheme != "https":
        tls = "none (plain http)"
    elif settings.insecure:
        tls = "certificate NOT verified (--insecure)"
    elif settings.ca_bundle is not None:
        tls = f"verified with the CA bundle {settings.ca_bundle}"
    else:
        tls = "verified with the system's CA certificates"
    if settings.is_loopback_bind:
        access = "loopback only"
    elif settings.client_token is not None:
        access = "beyond loopback, clients must send the client token"
    else:
        access = "beyond loopback WITHOUT a client token (--insecure-public-bind)"
    return [
        ("cluster", str(cluster)),
        ("TLS", tls),
        ("via proxy", _env_proxy(cluster)),
        ("token from", str(settings.token_file) if settings.token_file
         else "the demo cluster" if settings.demo else "SQUIRRO_TOKEN"),
        ("listen", f"{settings.host}:{settings.port} ({access})"),
    ]


def _env_proxy(cluster: URL) -> str:
    """The HTTP(S)_PROXY the upstream session will use for the cluster, without credentials."""
    proxies = urllib.request.getproxies()
    proxy = proxies.get(cluster.scheme)
    if not proxy or (cluster.host and urllib.request.proxy_bypass(cluster.host)):
        return "none (direct connection)"
    try:
        url = URL(proxy)
    except ValueError:
        return f"{cluster.scheme.upper()}_PROXY (unparsable)"
    return f"{url.host}:{url.port} ({cluster.scheme.upper()}_PROXY)"


async def _with_demo(settings: Settings) -> tuple[Settings, web.AppRunner | None]:
    """In demo mode, start the simulated cluster and point the settings at it."""
    if not settings.demo:
        return settings, None
    runner, url = await demo.start_demo_cluster()
    log.info("demo mode: a simulated Squirro cluster listens on %s", url)
    settings = dataclasses.replace(settings, cluster=URL(url),
                                   token=Secret(demo.DEMO_REFRESH_TOKEN))
    return settings, runner


async def serve(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT (exit 0) or until the cluster refuses the token at start-up."""
    settings, demo_runner = await _with_demo(settings)
    app = make_app(settings)
    runner = ProxyAppRunner(app, header_timeout=settings.header_timeout, handle_signals=False,
                            shutdown_timeout=settings.shutdown_grace)
    await runner.setup()
    sockets: list[socket.socket] = []
    try:
        try:
            sockets, urls = listeners.bind(settings)
        except OSError as bind_error:
            log.error("%s", cannot_listen(settings, bind_error))
            return EXIT_CONFIG
        for sock in sockets:
            await web.SockSite(runner, sock).start()
        tokens = app[TOKENS]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # SIGHUP re-reads the token file (a rotated secret) instead of ending the process.
        loop.add_signal_handler(signal.SIGHUP, reload_token_file, app.get(TOKEN_FILE_WATCHER))

        return await serve_until_stopped(settings, tokens, urls, stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_signal_handler(sig)
        await runner.cleanup()
        if demo_runner is not None:
            await demo_runner.cleanup()
        listeners.close(sockets, settings)


