"""A real headless Chromium against the proxy: what a web page can and cannot do with it.

Chromium (Debian's `chromium`) is driven over the Chrome DevTools protocol. Its resolver maps the
attacker's name `evil.example` to 127.0.0.1 and every other name to nothing, so all traffic stays
on loopback and a DNS-rebinding attack can be played out for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
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
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.config import Secret
from tests.conftest import Running, StartProxy
from tests.fakes import FakeCluster

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
EVIL = "evil.example"
CLIENT_TOKEN = "client-token-for-the-web-app-0123"
PROJECTS = "/api/topic/v0/t/projects"


# --- Chromium and a minimal DevTools client --------------------------------------------------


@pytest.fixture(scope="module")
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


# --- pages to load -------------------------------------------------------------------------------


@pytest.fixture
async def site() -> AsyncIterator[int]:
    """A web server on 127.0.0.1 serving a blank page: reached as localhost (the developer's
    front-end) or as evil.example (the attacker's page); returns its port."""

    async def index(request: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><title>page</title><body>page</body>",
                            content_type="text/html")

    app = web.Application()
    app.router.add_get("/", index)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    assert server.port is not None
    yield server.port
    await server.close()


def refusals(caplog: pytest.LogCaptureFixture, code: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "squirro_proxy.guard" and code in r.getMessage()]


# --- the tests -----------------------------------------------------------------------------------


async def test_allowed_origin_page_calls_the_api(
    browser: DevTools, site: int, start_proxy: StartProxy, cluster: FakeCluster
) -> None:
    """A front-end at an allowed --cors-origin reads and writes through the proxy with its token."""
    app_origin = f"http://localhost:{site}"
    proxy = await start_proxy(cors_origins=(app_origin,), client_token=Secret(CLIENT_TOKEN))
    api = f"http://localhost:{proxy.url.port}"
    async with open_page(browser) as page:
        await page.goto(app_origin + "/")
        result = await page.run(f"""(async () => {{
            const auth = {{"Authorization": "Bearer {CLIENT_TOKEN}"}};
            const got = await fetch("{api}{PROJECTS}", {{headers: auth}});
            const posted = await fetch("{api}/api/topic/v0/t/items", {{
                method: "POST", body: JSON.stringify({{title: "x"}}),
                headers: {{...auth, "Content-Type": "application/json"}},
            }});
            const anonymous = await fetch("{api}{PROJECTS}");
            return {{
                get: got.status, getBody: (await got.json()).method,
                post: posted.status, requestId: posted.headers.get("X-Request-ID"),
                anonymous: anonymous.status,
                anonymousError: anonymous.headers.get("X-Squirro-Proxy-Error"),
            }};
        }})()""")
    assert result["get"] == 200 and result["getBody"] == "GET"
    assert result["post"] == 200 and result["requestId"]  # an exposed response header
    assert (result["anonymous"], result["anonymousError"]) == (401, "client_token_required")
    seen = [(r.method, r.raw_path) for r in cluster.api_requests()]
    # The preflights were answered by the proxy: no OPTIONS reached the cluster.
    assert seen == [("GET", PROJECTS), ("POST", "/api/topic/v0/t/items")]


async def test_other_origin_page_cannot_call_the_api(
    browser: DevTools, site: int, proxy: Running, cluster: FakeCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Another site's page gets nothing through: CORS fetch, no-cors POST and image all refused."""
    caplog.set_level(logging.INFO, logger="squirro_proxy.guard")
    api = f"http://localhost:{proxy.url.port}"
    async with open_page(browser) as page:
        await page.goto(f"http://{EVIL}:{site}/")
        result = await page.run(f"""(async () => {{
            let cors = "read";
            try {{ await fetch("{api}{PROJECTS}"); }} catch (e) {{ cors = "blocked"; }}
            const simple = await fetch("{api}/api/topic/v0/t/items", {{
                method: "POST", mode: "no-cors", body: "title=x",
                headers: {{"Content-Type": "application/x-www-form-urlencoded"}},
            }});
            const image = await new Promise(done => {{
                const img = new Image();
                img.onload = () => done("loaded");
                img.onerror = () => done("error");
                img.src = "{api}/api/topic/v0/t/image.png";
            }});
            return {{cors, simple: simple.type, image}};
        }})()""")
    assert result == {"cors": "blocked", "simple": "opaque", "image": "error"}
    assert cluster.api_requests() == []
    # The proxy itself saw and refused all three (the browser did not just hold them back).
    assert len(refusals(caplog, "cross_origin_refused")) == 3


async def test_cross_site_form_post_refused(
    browser: DevTools, site: int, proxy: Running, cluster: FakeCluster
) -> None:
    """A plain HTML form on another site posting to the proxy gets a 403 page, nothing forwarded."""
    api = f"http://localhost:{proxy.url.port}"
    async with open_page(browser) as page:
        await page.goto(f"http://{EVIL}:{site}/")
        await page.submit_and_wait(f"""(() => {{
            const form = document.createElement("form");
            form.method = "POST";
            form.action = "{api}/api/topic/v0/t/items";
            const field = document.createElement("input");
            field.name = "title"; field.value = "x";
            form.appendChild(field);
            document.body.appendChild(form);
            form.submit();
        }})()""")
        shown = await page.run("document.body.innerText")
    assert json.loads(shown)["error"] == "cross_origin_refused"
    # The refusal page now shown is on the proxy's origin, so the browser's own follow-up
    # request for its icon is same-origin and may pass; the form's POST never did.
    assert [r.raw_path for r in cluster.api_requests() if r.raw_path != "/favicon.ico"] == []


async def test_dns_rebinding_refused(
    browser: DevTools, proxy: Running, cluster: FakeCluster
) -> None:
    """After rebinding, the attacker's page reaches the proxy under its own name and gets 403."""
    rebound = f"http://{EVIL}:{proxy.url.port}"
    async with open_page(browser) as page:
        # The attacker's page, now "same-origin" with the proxy as far as the browser knows.
        await page.goto(rebound + "/")
        first = json.loads(await page.run("document.body.innerText"))
        result = await page.run(f"""(async () => {{
            const r = await fetch("{rebound}{PROJECTS}");
            return {{status: r.status, error: (await r.json()).error}};
        }})()""")
    assert first["error"] == "host_not_allowed"
    assert result == {"status": 403, "error": "host_not_allowed"}
    assert cluster.api_requests() == []


async def test_user_opening_the_proxy_url_is_served(
    browser: DevTools, proxy: Running, cluster: FakeCluster
) -> None:
    """A user who types the proxy's URL into the address bar gets the API's answer."""
    async with open_page(browser) as page:
        await page.goto(f"http://localhost:{proxy.url.port}{PROJECTS}")
        shown = json.loads(await page.run("document.body.innerText"))
    assert shown["method"] == "GET"
    # (The browser may also ask for /favicon.ico, which is forwarded like any path.)
    assert PROJECTS in [r.raw_path for r in cluster.api_requests()]
