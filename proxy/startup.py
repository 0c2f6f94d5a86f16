"""From listening to serving: wait for the first access token, say where the proxy listens and
whom it acts as, and give up (exit 1) if the cluster refuses the refresh token at start-up.

Shared by the single-process server (cli.py) and the supervisor of worker processes.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from . import demo
from .config import Settings
from .tokens import Identity, TokenManager, TokenRejected

log = logging.getLogger("squirro_proxy")

EXIT_OK = 0
EXIT_TOKEN_REJECTED = 1
# How long start-up waits for the first token before it says where it listens anyway.
FIRST_TOKEN_WAIT = 3.0


def cannot_listen(settings: Settings, error: OSError) -> str:
    """The start-up error for a port that is taken (or an address that is not ours)."""
    where = (f"{settings.host}:{settings.port}" if settings.listen_tcp
             else str(settings.unix_socket))
    return (f"cannot listen on {where}: {error.strerror or error.__class__.__name__}: choose "
            "another --port (or --host, --unix-socket), or stop what is using it")


def describe(identity: Identity) -> str:
    parts = [f"user {identity.user_id or '?'}"]
    if identity.role:
        parts.append(f"role {identity.role}")
    parts.append(f"tenant {identity.tenant or '?'}")
    return ", ".join(parts)


async def serve_until_stopped(settings: Settings, tokens: TokenManager, urls: Sequence[str],
                              stop: asyncio.Event, how: str = "") -> int:
    """Announce the proxy, then wait for `stop` (exit 0) or a refusal of the token (exit 1)."""
    first = asyncio.ensure_future(tokens.wait_first())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({first, stopper}, timeout=FIRST_TOKEN_WAIT,
                           return_when=asyncio.FIRST_COMPLETED)
        where = f"listening on {', '.join(urls)}{how}, forwarding to {settings.cluster}"
        if not first.done():
            reason = tokens.failure.reason if tokens.failure else "still exchanging"
            log.info("squirro-proxy %s; waiting for the first access token (%s)", where, reason)
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
    # aiohttp waits the grace period, then cancels what is left and waits as long again.
    log.info("shutting down: finishing in-flight requests (up to %g s, and as long again for "
             "a request still under way)", settings.shutdown_grace)
    return EXIT_OK
