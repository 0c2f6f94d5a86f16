"""A worker process (`--workers` above 1): serves requests on the sockets the supervisor bound,
with the access token the supervisor holds for every worker.

Started by fork at start-up (no re-import: the first request is served within milliseconds), and
by exec, as `python -m proxy.worker FD`, when the supervisor replaces a worker that died: a
process whose event loop runs must not fork a copy of that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from . import __version__, eventloop
from .app import make_app
from .config import Settings
from .connection import ProxyAppRunner
from .link import Link, LinkClosed, RemoteFailure, read_message_blocking
from .logs import configure
from .metrics import METRICS, RequestStats
from .redact import REDACTOR
from .token_mirror import TokenMirror

log = logging.getLogger("squirro_proxy.worker")

STOP_SIGNALS = frozenset((signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
# A scrape waits this long for the supervisor to merge every worker's figures.
STATS_TIMEOUT = 5.0


def run(settings: Settings, listeners: Sequence[socket.socket], channel: socket.socket,
        index: int) -> int:
    """Serve until SIGTERM/SIGINT or until the supervisor goes away; the exit code."""
    try:
        return eventloop.run(_serve(settings, listeners, channel, index))
    except KeyboardInterrupt:
        return 130


async def _serve(settings: Settings, listeners: Sequence[socket.socket],
                 channel: socket.socket, index: int) -> int:
    stop = asyncio.Event()
    app: web.Application | None = None

    async def on_call(op: str, payload: Any) -> Any:
        if op == "snapshot" and app is not None:
            return app[METRICS].stats
        raise ValueError(f"unknown call {op!r}")

    def on_note(op: str, payload: Any) -> None:
        if op == "state":
            mirror.apply(payload)

    # Known to the log redactor from the start, before the supervisor's first state arrives.
    for secret in (settings.token, settings.client_secret, settings.client_token):
        if secret is not None:
            REDACTOR.add(secret.reveal(), lasting=True)
    link = Link(channel, on_call, on_note)
    await link.start()
    mirror = TokenMirror(link.call)

    async def all_workers_stats() -> RequestStats:
        assert app is not None
        try:
            async with asyncio.timeout(STATS_TIMEOUT):
                stats: RequestStats = await link.call("stats")
                return stats
        except (LinkClosed, RemoteFailure, TimeoutError):
            log.warning("the supervisor did not send every worker's figures; showing worker %d's",
                        index)
            return app[METRICS].stats

    app = make_app(settings, shared_tokens=mirror, stats_view=all_workers_stats)
    runner = ProxyAppRunner(app, header_timeout=settings.header_timeout, handle_signals=False,
                            shutdown_timeout=settings.shutdown_grace)
    await runner.setup()
    loop = asyncio.get_running_loop()
    try:
        for sock in listeners:
            await web.SockSite(runner, sock).start()
        link.note("serving")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # The supervisor re-reads the token file on SIGHUP; a worker has nothing to re-read.
        loop.add_signal_handler(signal.SIGHUP, lambda: None)
        # Blocked by the supervisor across the fork; any that came meanwhile arrive now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        stopper: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        await asyncio.wait({stopper, link.closed}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if link.closed.done() and not stop.is_set():
            log.error("worker %d: the supervisor went away; stopping", index)
        return 0
    finally:
        # In-flight requests finish first (they may still need the supervisor for a token).
        # The handlers stay until then: a second signal (Ctrl-C reaches every process of the
        # group, then the supervisor sends SIGTERM) must not kill a draining worker.
        await runner.cleanup()
        await link.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m proxy.worker FD`: a replacement worker; its settings come over the channel."""
    args = sys.argv[1:] if argv is None else argv
    channel = socket.socket(fileno=int(args[0]))
    version, settings, index, listener_fds = read_message_blocking(channel)
    configure(settings.log_level, settings.log_format)
    if version != __version__:
        # The package was upgraded under a running supervisor: restart the whole proxy.
        log.error("worker %d: this is squirro-proxy %s, the supervisor runs %s: restart the "
                  "proxy to use the new version", index, __version__, version)
        return 1
    listeners = [socket.socket(fileno=fd) for fd in listener_fds]
    return run(settings, listeners, channel, index)


if __name__ == "__main__":
    sys.exit(main())
