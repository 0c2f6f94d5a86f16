"""Headless Chromium driven over the Chrome DevTools protocol, for the browser tests.

Its resolver maps the attacker's name `evil.example` to 127.0.0.1 and every other name to
nothing, so all traffic stays on loopback and a DNS-rebinding attack can be played out for real.
Pages are driven by evaluating script that awaits a promise, so a test waits on what the page
did, never on a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

CHROMIUM = "/usr/bin/chromium"
EVIL = "evil.example"


# --- Chromium and a minimal DevTools client --------------------------------------------------


@pytest.fixture(scope="session")
def devtools_url() -> Iterator[str]:
    """A headless Chromium for this module; its browser-level DevTools websocket URL."""
    if not (os.access(CHROMIUM, os.X_OK) or shutil.which("chromium")):
        pytest.fail("chromium is not installed: .ci/run installs it (apt-get install chromium)")
    profile = Path(tempfile.mkdtemp(prefix="squirro-proxy-chromium-"))
    process = subprocess.Popen(
        [
            shutil.which("chromium") or CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--no-first-run",
            f"--user-data-dir={profile}", "--remote-debugging-port=0",
            # Loopback only: the attacker's name resolves to 127.0.0.1, nothing else resolves.
            f"--host-resolver-rules=MAP {EVIL} 127.0.0.1, MAP * ~NOTFOUND, EXCLUDE localhost",
            # Navigations stay on plain http, as a user's would on these ports.
            "--disable-features=HttpsUpgrades,HttpsFirstBalancedModeAutoEnable",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (active.is_file() and len(active.read_text().splitlines()) >= 2):
            assert process.poll() is None, "chromium exited during start-up"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.05)  # waiting on chromium writing the file, not on a guess
        port, path = active.read_text().splitlines()[:2]
        yield f"ws://127.0.0.1:{port}{path}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


class DevTools:
    """Commands and events over one browser-level DevTools websocket (flat sessions)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._waiters: list[tuple[str, str | None, asyncio.Future[dict[str, Any]]]] = []
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for message in self._ws:
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    if "error" in data:
                        future.set_exception(AssertionError(f"DevTools: {data['error']}"))
                    else:
                        future.set_result(data.get("result", {}))
                continue
            for waiter in list(self._waiters):
                method, session, future = waiter
                if data.get("method") == method and data.get("sessionId") == session:
                    self._waiters.remove(waiter)
                    if not future.done():
                        future.set_result(data.get("params", {}))

    async def send(self, method: str, params: dict[str, Any] | None = None,
                   session: str | None = None) -> dict[str, Any]:
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        await self._ws.send_json(message)
        return await asyncio.wait_for(future, 30)

    def expect(self, method: str, session: str | None) -> asyncio.Future[dict[str, Any]]:
        """A future for the next `method` event of `session`; register before causing it."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.append((method, session, future))
        return future

    async def close(self) -> None:
        await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


class Page:
    """One tab in its own browser context (no shared cookies or preflight cache)."""

    def __init__(self, devtools: DevTools, session: str) -> None:
        self.devtools = devtools
        self.session = session

    async def goto(self, url: str) -> None:
        loaded = self.devtools.expect("Page.loadEventFired", self.session)
        await self.devtools.send("Page.navigate", {"url": url}, self.session)
        await asyncio.wait_for(loaded, 30)

    async def run(self, expression: str) -> Any:
        """Evaluate JavaScript in the page (awaiting a promise) and return its JSON value."""
        result = await self.devtools.send("Runtime.evaluate", {
            "expression": expression, "awaitPromise": True, "returnByValue": True,
        }, self.session)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def submit_and_wait(self, expression: str) -> None:
        """Run script that navigates (a form post) and wait for the new page to load."""
        loaded = self.devtools.expect("Page.loadEventFired", self.session)
        await self.run(expression)
        await asyncio.wait_for(loaded, 30)


@pytest.fixture
async def browser(devtools_url: str) -> AsyncIterator[DevTools]:
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(devtools_url, max_msg_size=0)
        devtools = DevTools(ws)
        yield devtools
        await devtools.close()


@contextlib.asynccontextmanager
async def open_page(devtools: DevTools) -> AsyncIterator[Page]:
    context = (await devtools.send("Target.createBrowserContext"))["browserContextId"]
    try:
        target = await devtools.send("Target.createTarget",
                                     {"url": "about:blank", "browserContextId": context})
        attached = await devtools.send("Target.attachToTarget",
                                       {"targetId": target["targetId"], "flatten": True})
        page = Page(devtools, attached["sessionId"])
        await devtools.send("Page.enable", session=page.session)
        yield page
    finally:
        await devtools.send("Target.disposeBrowserContext", {"browserContextId": context})


