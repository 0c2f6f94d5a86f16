"""Small tools the test modules share: waiting on a condition, raw sockets, ports, chromium."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from yarl import URL

CHROMIUM = Path("/usr/bin/chromium")


async def until(condition: Callable[[], object], timeout: float = 15.0) -> None:
    """Wait for a condition the proxy or the fake cluster reaches on its own (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def raw_exchange(url: URL, request: bytes) -> bytes:
    """Send bytes over a fresh socket and read until the server closes it."""
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(request)
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def chromium(tmp_path: Path, url: URL, *args: str) -> str:
    """Run headless chromium on `url`; returns its stdout (e.g. the DOM for --dump-dom).

    Fails (never skips) without Debian's chromium: .ci/run installs it."""
    assert CHROMIUM.exists(), "Debian's chromium is needed: apt-get install chromium"
    profile = tmp_path / "profile"
    proc = await asyncio.create_subprocess_exec(
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--no-first-run",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args, str(url),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 45)
    assert proc.returncode == 0, err.decode()[-2000:]
    return out.decode()


@contextlib.contextmanager
def unanswered_port() -> Iterator[int]:
    """A loopback port whose accept queue is full: connecting hangs, as to a dropped SYN."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        fillers = []
        try:
            for _ in range(3):
                filler = socket.socket()
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
                fillers.append(filler)
            yield port
        finally:
            for filler in fillers:
                filler.close()
