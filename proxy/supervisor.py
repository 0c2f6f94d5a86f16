"""`--workers N` above 1: a supervisor process and N workers sharing the listening sockets.

One Python process saturates one core; the kernel spreads connections over the processes that
accept on the same socket. The refresh token must still be exchanged once per refresh, however
many processes serve, so the supervisor:

- binds the listening sockets before any worker exists (a busy port is reported once, and
  connections that arrive while workers start wait in the backlog instead of being refused);
- forks the workers before it starts an event loop of its own, so each starts a clean loop;
- holds the one TokenManager (and the token-file watcher), pushes each new token to every worker
  and answers their questions (token expired, 401), so its single flight covers all of them;
- merges every worker's figures for `/-/metrics` and `/-/status`, whichever worker is asked;
- replaces a worker that dies (by exec: see worker.py), and on SIGTERM/SIGINT lets every worker
  drain before it stops the token's life cycle.

A worker whose supervisor disappears (SIGKILL) sees its channel close and stops too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from yarl import URL

from . import __version__, demo, eventloop, worker
from .app import TOKEN_POOL_SIZE
from .config import Secret, Settings
from .link import Link, LinkClosed, RemoteFailure, encode
from .listeners import bind, close
from .metrics import RequestStats
from .secret_watch import TokenFileWatcher, reload_token_file
from .startup import cannot_listen, serve_until_stopped
from .token_mirror import answer, state_of
from .tokens import TokenManager
from .upstream import make_session

log = logging.getLogger("squirro_proxy.supervisor")

EXIT_CONFIG = 2
STOP_SIGNALS = worker.STOP_SIGNALS
# A worker asked for its figures answers within this, or the scrape goes on without them.
SNAPSHOT_TIMEOUT = 2.0
# A worker that dies is replaced after a pause that doubles while replacements keep dying young.
RESTART_DELAY = 0.5
RESTART_DELAY_MAX = 30.0
STABLE_AFTER = 10.0  # seconds a worker must live for the pause to start from the beginning again
# After their own stop's bound (two grace periods), workers still running get this long before
# SIGKILL.
KILL_MARGIN = 5.0


@dataclasses.dataclass
class WorkerProcess:
    index: int
    pid: int
    started: float  # monotonic
    channel: socket.socket  # the supervisor's end
    proc: subprocess.Popen[bytes] | None = None  # set when started by exec
    link: Link | None = None
    reaped: bool = False  # its pid may belong to another process by now
    last_stats: RequestStats | None = None  # its figures at the last scrape
    retired: bool = False  # its figures are in the supervisor's `retired` totals

    def signal(self, sig: int) -> None:
        if self.reaped:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    async def reap(self) -> tuple[int, float]:
        """Wait for the process to end; its exit code (negative: the signal that ended it) and
        the CPU seconds it used."""
        _, status, usage = await asyncio.get_running_loop().run_in_executor(
            None, os.wait4, self.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        self.reaped = True
        if self.proc is not None:
            self.proc.returncode = code  # reaped here, not by Popen
        return code, usage.ru_utime + usage.ru_stime


def serve(settings: Settings) -> int:
    """Bind, fork the workers, then supervise them; the exit code. Call with no event loop."""
    try:
        listeners, urls = bind(settings)
    except OSError as error:
        log.error("%s", cannot_listen(settings, error))
        return EXIT_CONFIG
    demo_sock: socket.socket | None = None
    if settings.demo:
        # The workers must know the demo cluster's URL before it serves: bind it now.
        demo_sock = socket.create_server(("127.0.0.1", 0))
        host, port = demo_sock.getsockname()[:2]
        settings = dataclasses.replace(settings, cluster=URL(f"http://{host}:{port}"),
                                       token=Secret(demo.DEMO_REFRESH_TOKEN))
    # Signals wait (blocked, not lost) until each process's event loop has its handlers: a
    # Ctrl-C during start-up then stops everything in order instead of killing half of it.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    workers: list[WorkerProcess] = []
    for index in range(settings.workers):
        inherited = [w.channel for w in workers] + ([demo_sock] if demo_sock else [])
        workers.append(_fork(settings, listeners, index, inherited))
    supervisor = Supervisor(settings, listeners, urls, workers, demo_sock)
    try:
        code = eventloop.run(supervisor.run())
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130
    finally:
        close(listeners, settings)
    # Cut short by a second signal: the exit code a shell shows for a process it killed.
    return 128 + supervisor.forced_by if supervisor.forced_by is not None else code


def _fork(settings: Settings, listeners: Sequence[socket.socket], index: int,
          inherited: Sequence[socket.socket]) -> WorkerProcess:
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the worker: never return into the supervisor's code
        code = 1
        try:
            ours.close()
            for sock in inherited:
                sock.close()
            code = worker.run(settings, listeners, theirs, index)
        except BaseException:
            log.exception("worker %d failed", index)
        finally:
            logging.shutdown()
            os._exit(code)
    theirs.close()
    return WorkerProcess(index, pid, time.monotonic(), ours)


class Supervisor:
    def __init__(self, settings: Settings, listeners: Sequence[socket.socket], urls: list[str],
                 workers: list[WorkerProcess], demo_sock: socket.socket | None) -> None:
        self.settings = settings
        self.listeners = listeners
        self.urls = urls
        self.workers: dict[int, WorkerProcess] = {w.index: w for w in workers}
        self.demo_sock = demo_sock
        self.stopping = False
        self._stopping = asyncio.Event()
        self.forced_by: int | None = None  # the second stop signal, which ends the drain
        self.tokens: TokenManager | None = None
        self._watchers: set[asyncio.Task[None]] = set()
        self._restart_delay = RESTART_DELAY / 2  # doubled at the first death
        # The figures of workers that have ended: counters must not go down when one is replaced.
        self._retired = RequestStats.merged([])

    async def run(self) -> int:
        settings = self.settings
        demo_runner: web.AppRunner | None = None
        if self.demo_sock is not None:
            demo_runner, url = await demo.start_demo_cluster(sock=self.demo_sock)
            log.info("demo mode: a simulated Squirro cluster listens on %s", url)
        session = make_session(settings, pool_size=TOKEN_POOL_SIZE)
        tokens = self.tokens = TokenManager.for_settings(session, settings)
        tokens.on_change.append(self._push_state)
        tokens.start()
        watcher: TokenFileWatcher | None = None
        if settings.token_file is not None and settings.token is not None:
            watcher = TokenFileWatcher(settings.token_file, tokens, settings.token)
            watcher.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_stop_signal(sig: int) -> None:
            if stop.is_set() and self.forced_by is None:
                # A second Ctrl-C: stop at once, as a single process does, without the drain.
                log.warning("second stop signal: ending the worker processes without waiting")
                self.forced_by = sig
                for process in self.workers.values():
                    process.signal(signal.SIGKILL)
            # At once, not when `stop` is seen: the workers got the same Ctrl-C, and the first
            # to finish must not be mistaken for one that died.
            self.stopping = True
            stop.set()

        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, on_stop_signal, sig)
            loop.add_signal_handler(signal.SIGHUP, reload_token_file, watcher)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            for process in self.workers.values():
                await self._attach(process)
            how = f" with {len(self.workers)} worker processes"
            return await serve_until_stopped(settings, tokens, self.urls, stop, how)
        finally:
            await self._stop_workers()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)
            if watcher is not None:
                await watcher.stop()
            await tokens.stop()
            await session.close()
            if demo_runner is not None:
                await demo_runner.cleanup()

    # --- the workers ---------------------------------------------------------------------------

    async def _attach(self, process: WorkerProcess, replacement: bool = False) -> None:
        def on_note(op: str, payload: Any) -> None:
            if op == "serving":
                log.log(logging.INFO if replacement else logging.DEBUG,
                        "worker %d (pid %d) serving", process.index, process.pid)

        link = Link(process.channel, self._on_call, on_note)
        await link.start()
        process.link = link
        assert self.tokens is not None
        link.note("state", state_of(self.tokens))
        task = asyncio.create_task(self._watch(process), name=f"worker-{process.index}")
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _watch(self, process: WorkerProcess) -> None:
        assert process.link is not None
        await process.link.closed
        code, cpu_seconds = await process.reap()
        left = (process.last_stats or RequestStats.merged([])).retired(cpu_seconds)
        self._retired = RequestStats.merged([self._retired, left])
        process.retired = True
        await process.link.close()
        if code == 0 and not self.stopping:
            # A clean exit: a stop signal sent to the whole process group reaches the workers
            # too, and one may finish before the supervisor acted on its own copy.
            await self._sleep_unless_stopping(0.2)
        lived = time.monotonic() - process.started
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        while not self.stopping:
            self._restart_delay = (RESTART_DELAY if lived > STABLE_AFTER
                                   else min(RESTART_DELAY_MAX, self._restart_delay * 2))
            log.error("worker %d (pid %d) %s; starting a new one in %.1f s", process.index,
                      process.pid, how, self._restart_delay)
            await self._sleep_unless_stopping(self._restart_delay)
            if self.stopping:
                return
            try:
                replacement = self._exec(process.index)
            except OSError as exc:  # no processes or file descriptors left, for one
                how, lived = f"could not be started again ({exc})", 0.0
                continue
            self.workers[process.index] = replacement
            await self._attach(replacement, replacement=True)
            if self.stopping:  # stopping began while it started: it must drain too
                replacement.signal(signal.SIGTERM)
            return

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def _exec(self, index: int) -> WorkerProcess:
        ours, theirs = socket.socketpair()
        fds = [sock.fileno() for sock in self.listeners]
        try:
            # -P: nothing from the current directory may shadow the package that is then
            # handed the secrets.
            proc = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
                [sys.executable, "-P", "-m", "proxy.worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(), *fds), stdin=subprocess.DEVNULL,
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        process = WorkerProcess(index, proc.pid, time.monotonic(), ours, proc)
        # Its first message: what a forked worker would have inherited. If it died at once,
        # its channel reads as closed and _watch deals with it.
        with contextlib.suppress(OSError):
            ours.sendall(encode((__version__, self.settings, index, fds)))
        return process

    async def _stop_workers(self) -> None:
        self.stopping = True
        self._stopping.set()
        # New connections are refused from now on, as a single process would refuse them,
        # instead of waiting in a backlog nobody accepts from any more.
        close(self.listeners, self.settings)
        for process in self.workers.values():
            process.signal(signal.SIGTERM)
        # A worker's own stop takes up to two grace periods (aiohttp waits one, cancels what is
        # left and waits another), as a single process's does.
        deadline = time.monotonic() + 2 * self.settings.shutdown_grace + KILL_MARGIN
        killed = False
        while self._watchers:
            left = deadline - time.monotonic()
            if left <= 0:
                if killed:
                    log.error("worker processes did not end after SIGKILL; leaving them")
                    return
                for process in self.workers.values():
                    process.signal(signal.SIGKILL)
                killed, deadline = True, time.monotonic() + KILL_MARGIN
                continue
            await asyncio.wait(set(self._watchers), timeout=left)

    # --- what the workers ask -------------------------------------------------------------------

    async def _on_call(self, op: str, payload: Any) -> Any:
        assert self.tokens is not None
        if op in ("token", "refresh"):
            return await answer(self.tokens, op, payload)
        if op == "stats":
            return await self._all_stats()
        raise ValueError(f"unknown call {op!r}")

    async def _all_stats(self) -> RequestStats:
        live = [p for p in self.workers.values() if not p.retired]
        parts = await asyncio.gather(*(self._snapshot(p) for p in live))
        merged = RequestStats.merged([*(p for p in parts if p is not None), self._retired])
        merged.pids.append(os.getpid())  # the supervisor's memory and CPU count too
        return merged

    @staticmethod
    async def _snapshot(process: WorkerProcess) -> RequestStats | None:
        if process.link is not None:
            try:
                async with asyncio.timeout(SNAPSHOT_TIMEOUT):
                    stats: RequestStats = await process.link.call("snapshot")
                process.last_stats = stats
                return stats
            except (LinkClosed, RemoteFailure, TimeoutError):
                pass
        # Dying or stuck: what it had at the last scrape, so the totals do not dip.
        last = process.last_stats
        return last.retired(0.0) if last is not None else None

    def _push_state(self) -> None:
        assert self.tokens is not None
        state = state_of(self.tokens)
        for process in self.workers.values():
            if process.link is not None:
                with contextlib.suppress(LinkClosed, RuntimeError):
                    process.link.note("state", state)


