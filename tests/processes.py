"""The proxy as a user runs it: `python -m proxy` in a subprocess, its stderr read line by line."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from pathlib import Path

import psutil
from yarl import URL

from tests.fakes import REFRESH_TOKEN

LISTEN = re.compile(r"listening on (http://[\d.:\[\]]+)")


class ProxyProcess:
    """`python -m proxy` in a subprocess, with its stderr collected line by line as it comes
    (read all along: a full pipe would block the proxy's logging, and with it the proxy)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._more = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        try:
            while raw := await self.proc.stderr.readline():
                self.lines.append(raw.decode("utf-8", "replace"))
                self._more.set()
        finally:
            self._more.set()

    async def wait_line(self, pattern: re.Pattern[str] | str, timeout: float = 15) -> re.Match[str]:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        checked = 0
        async with asyncio.timeout(timeout):
            while True:
                for line in self.lines[checked:]:
                    if m := regex.search(line):
                        return m
                checked = len(self.lines)
                if self._reader.done():
                    raise AssertionError(f"exited before {regex.pattern!r}: {self.lines}")
                self._more.clear()
                await self._more.wait()

    def children(self) -> list[psutil.Process]:
        """The worker processes (with --workers above 1)."""
        try:
            return psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []

    async def stop(self) -> None:
        """Kill it and its workers if still running, then read both pipes to their end, which
        closes them (uvloop reports pipes still open when the test's loop closes)."""
        if self.proc.returncode is None:
            for child in self.children():
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            self.proc.kill()
            await self.proc.wait()
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(5):
                if self.proc.stdout is not None:
                    await self.proc.stdout.read()
                await asyncio.shield(self._reader)

    async def finish(self, timeout: float = 15) -> tuple[int, str]:
        async with asyncio.timeout(timeout):
            await asyncio.shield(self._reader)
            code = await self.proc.wait()
        return code, "".join(self.lines)


async def spawn(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
                own_group: bool = False) -> ProxyProcess:
    """`own_group`: in a process group of its own, which a test may signal as a terminal's
    Ctrl-C would (without reaching the test runner)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SQUIRRO")}
    full_env.update(env or {})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, env=full_env, cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=own_group,
    )
    return ProxyProcess(proc)


def proxy_env(cluster_url: URL, **extra: str) -> dict[str, str]:
    return {"SQUIRRO_CLUSTER": str(cluster_url), "SQUIRRO_TOKEN": REFRESH_TOKEN,
            "SQUIRRO_PROXY_PORT": "0", **extra}
