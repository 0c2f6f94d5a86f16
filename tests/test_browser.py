"""A real headless Chromium against the proxy: what a web page can and cannot do with it.

Chromium (Debian's `chromium`) is driven over the Chrome DevTools protocol. Its resolver maps the
attacker's name `evil.example` to 127.0.0.1 and every other name to nothing, so all traffic stays
on loopback and a DNS-rebinding attack can be played out for real.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.config import Secret
from tests.conftest import Running, StartProxy
from tests.devtools import EVIL, DevTools, open_page
from tests.fakes import FakeCluster

pytestmark = pytest.mark.browser

CLIENT_TOKEN = "client-token-for-the-web-app-0123"
PROJECTS = "/api/topic/v0/t/projects"


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
