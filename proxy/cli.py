"""The command line: argv -> Settings -> serve (or check, or demo). `main` returns the exit code;
only `run`, the console script's entry, exits."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web
from yarl import URL

from . import demo
from .app import TOKENS, make_app, make_session
from .config import ConfigError, Secret, Settings, load
from .connection import ProxyAppRunner
from .logs import configure
from .tokens import Identity, TokenError, TokenManager, TokenRejected

log = logging.getLogger("squirro_proxy")

EXIT_OK = 0
EXIT_TOKEN_REJECTED = 1
EXIT_CONFIG = 2
# How long start-up waits for the first token before it says where it listens anyway.
FIRST_TOKEN_WAIT = 3.0


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
    job = check(settings) if settings.command == "check" else serve(settings)
    try:
        return _run(job)
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop  # optional: the `speed` extra
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def describe(identity: Identity) -> str:
    parts = [f"user {identity.user_id or '?'}"]
    if identity.role:
        parts.append(f"role {identity.role}")
    parts.append(f"tenant {identity.tenant or '?'}")
    return ", ".join(parts)


async def check(settings: Settings) -> int:
    """Validate the settings and exchange the token once; print who the proxy would act as."""
    settings, demo_runner = await _with_demo(settings)
    session = make_session(settings)
    try:
        assert settings.token is not None
        tokens = TokenManager(
            session, settings.cluster, settings.token,
            default_lifetime=settings.token_lifetime, client_id=settings.client_id,
            client_secret=settings.client_secret, tenant=settings.tenant,
        )
        try:
            token = await tokens._single_flight("check")
        except TokenError as exc:
            print(f"squirro-proxy check: FAILED: {exc.reason}", file=sys.stderr)
            return EXIT_TOKEN_REJECTED
        print(f"squirro-proxy check: OK: cluster {settings.cluster}, {describe(tokens.identity)}, "
              f"access token valid for {token.lifetime:.0f} s")
        return EXIT_OK
    finally:
        await session.close()
        if demo_runner is not None:
            await demo_runner.cleanup()


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
    try:
        urls = await _start_sites(runner, settings)
        tokens = app[TOKENS]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        first = asyncio.ensure_future(tokens.wait_first())
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({first, stopper}, timeout=FIRST_TOKEN_WAIT,
                               return_when=asyncio.FIRST_COMPLETED)
            where = f"listening on {', '.join(urls)}, forwarding to {settings.cluster}"
            if not first.done():
                reason = tokens.failure.reason if tokens.failure else "still exchanging"
                log.info("squirro-proxy %s; waiting for the first access token (%s)",
                         where, reason)
            elif first.exception() is None:
                log.info("squirro-proxy %s as %s", where, describe(tokens.identity))
                where = ""
            if settings.demo and not (first.done() and first.exception()):
                commands = "\n".join(f"  {c}" for c in demo.try_commands(urls[0]))
                print(f"\nTry it:\n{commands}\n", file=sys.stderr, flush=True)

            await asyncio.wait({first, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if first.done():
                exc = first.exception()
                if isinstance(exc, TokenRejected):
                    log.error("cannot start: %s", exc.reason)
                    return EXIT_TOKEN_REJECTED
                if where:  # the first token came late: say now whom the proxy acts as
                    log.info("squirro-proxy ready: acting as %s", describe(tokens.identity))
                await stopper
        finally:
            first.cancel()
            stopper.cancel()
        log.info("shutting down: finishing in-flight requests (up to %g s)",
                 settings.shutdown_grace)
        return EXIT_OK
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_signal_handler(sig)
        await runner.cleanup()
        if demo_runner is not None:
            await demo_runner.cleanup()
        if settings.unix_socket is not None:
            with contextlib.suppress(OSError):
                settings.unix_socket.unlink()


async def _start_sites(runner: web.AppRunner, settings: Settings) -> list[str]:
    site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
    await site.start()
    urls = []
    for address in runner.addresses:
        host, port = address[0], address[1]
        shown = f"[{host}]" if ":" in host else host
        urls.append(f"http://{shown}:{port}")
    if settings.unix_socket is not None:
        urls.append(f"unix:{await _start_unix_site(runner, settings.unix_socket)}")
    return urls


async def _start_unix_site(runner: web.AppRunner, path: Path) -> Path:
    # Start-up only, before anything is served: a blocking stat is harmless here.
    if path.is_socket():  # noqa: ASYNC240
        path.unlink()  # noqa: ASYNC240 (left over from a previous run)
    # Create the socket with mode 0600 from the start: chmod afterwards leaves a window.
    old = os.umask(0o177)
    try:
        await web.UnixSite(runner, str(path)).start()
    finally:
        os.umask(old)
    return path
