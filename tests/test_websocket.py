"""WebSockets through the proxy: the bearer on the handshake, messages and closes both ways."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os

import aiohttp
import pytest
from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.test_utils import TestServer
from yarl import URL

from proxy.app import TOKENS, make_app
from tests.conftest import Running, StartProxy, proxy_settings
from tests.devtools import EVIL, DevTools, open_page
from tests.fakes import FakeCluster
from tests.helpers import until

ERROR_HEADER = "X-Squirro-Proxy-Error"


def handshake_headers() -> dict[str, str]:
    """A valid WebSocket handshake, for plain HTTP clients that want to see a refusal."""
    return {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode()}


def ws_url(proxy: Running, path: str = "ws") -> URL:
    return proxy.url.with_scheme("ws") / path


async def test_handshake_carries_bearer_instead_of_client_auth(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """The cluster sees the handshake with exactly one Authorization: the proxy's bearer."""
    async with client.ws_connect(ws_url(proxy), headers={"Authorization": "Basic dTpw"}) as ws:
        await ws.send_str("hello")
        assert (await ws.receive()).data == "hello"
    seen = [r for r in cluster.api_requests() if r.raw_path == "/ws"]
    assert len(seen) == 1
    auth = [v for k, v in seen[0].headers if k.lower() == "authorization"]
    assert auth == [f"Bearer {cluster.last_token}"]
    names = [k.lower() for k, _ in seen[0].headers]
    assert names.count("sec-websocket-key") == 1  # one handshake, made by the proxy


async def test_text_and_binary_pass_both_ways(
    proxy: Running, client: aiohttp.ClientSession
) -> None:
    """Text (non-ASCII too), binary (any bytes, up to MiBs) and empty messages arrive as sent."""
    big = os.urandom(3 * 1024 * 1024)
    async with client.ws_connect(ws_url(proxy)) as ws:
        for text in ("hello", "grüße ✓ 日本", "", "x" * 100_000):
            await ws.send_str(text)
            msg = await ws.receive()
            assert (msg.type, msg.data) == (WSMsgType.TEXT, text)
        for data in (b"\x00\xff\xfe binary", b"", big):
            await ws.send_bytes(data)
            msg = await ws.receive()
            assert (msg.type, msg.data) == (WSMsgType.BINARY, data)


async def test_many_messages_keep_their_order(
    proxy: Running, client: aiohttp.ClientSession
) -> None:
    """Messages sent back to back arrive in order, none lost or merged."""
    async with client.ws_connect(ws_url(proxy)) as ws:
        for n in range(500):
            await ws.send_str(f"m{n}")
        received = [(await ws.receive()).data for _ in range(500)]
    assert received == [f"m{n}" for n in range(500)]


async def test_client_ping_reaches_cluster_and_pong_comes_back(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """A ping from the client reaches the cluster with its payload; the cluster's pong returns."""
    async with client.ws_connect(ws_url(proxy), autoping=False) as ws:
        await ws.ping(b"client-ping")
        msg = await ws.receive()
        assert (msg.type, msg.data) == (WSMsgType.PONG, b"client-ping")
    assert ("ping", b"client-ping") in cluster.ws_events


async def test_cluster_ping_reaches_client_and_pong_goes_back(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """A ping from the cluster reaches the client; the client's pong reaches the cluster."""
    async with client.ws_connect(ws_url(proxy), autoping=False) as ws:
        await ws.send_str("ping:cluster-ping")
        msg = await ws.receive()
        assert (msg.type, msg.data) == (WSMsgType.PING, b"cluster-ping")
        await ws.pong(msg.data)
        await until(lambda: ("pong", b"cluster-ping") in cluster.ws_events)


async def test_client_close_code_reaches_cluster(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """The client's close code reaches the cluster, and the cluster's closing answer returns."""
    ws = await client.ws_connect(ws_url(proxy))
    await ws.send_str("before close")
    assert (await ws.receive()).data == "before close"
    await ws.close(code=4000, message=b"done here")
    assert ("closed", 4000) in cluster.ws_events  # recorded before the cluster answered
    assert ws.close_code == WSCloseCode.OK  # aiohttp's server answers any close with 1000


@pytest.mark.parametrize("code", [1000, 1001, 1011, 4001])
async def test_cluster_close_code_and_reason_reach_client(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession, code: int
) -> None:
    """The cluster's close code and reason reach the client as sent."""
    async with client.ws_connect(ws_url(proxy)) as ws:
        await ws.send_str(f"close:{code}:cluster says bye")
        msg = await ws.receive()
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, code, "cluster says bye")


async def test_cluster_dropping_the_socket_closes_client_with_1011(
    proxy: Running, client: aiohttp.ClientSession
) -> None:
    """A cluster connection that breaks closes the client's socket with 1011, not silently."""
    async with client.ws_connect(ws_url(proxy)) as ws:
        await ws.send_str("drop")
        msg = await ws.receive()
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, WSCloseCode.INTERNAL_ERROR)
        assert "cluster" in msg.extra


async def test_client_vanishing_closes_the_cluster_socket(
    proxy: Running, cluster: FakeCluster
) -> None:
    """A client that drops its TCP connection makes the proxy close the cluster's socket."""
    reader, writer = await asyncio.open_connection(proxy.url.host, proxy.url.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /ws HTTP/1.1\r\nHost: {proxy.url.host}:{proxy.url.port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        .encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    await until(lambda: ("open", None) in cluster.ws_events)
    writer.transport.abort()
    await until(lambda: any(kind == "closed" for kind, _ in cluster.ws_events))
    assert ("closed", WSCloseCode.GOING_AWAY) in cluster.ws_events


@pytest.mark.parametrize(
    ("offered", "accepted", "chosen"),
    [
        (("squirro.v2", "squirro.v1"), ("squirro.v1", "squirro.v2"), "squirro.v2"),
        (("squirro.v1",), ("squirro.v1",), "squirro.v1"),
        (("graphql-ws",), ("squirro.v1",), None),
        ((), ("squirro.v1",), None),
    ],
)
async def test_subprotocol_is_the_one_the_cluster_chose(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession,
    offered: tuple[str, ...], accepted: tuple[str, ...], chosen: str | None,
) -> None:
    """The client's offered subprotocols reach the cluster; the client gets the cluster's pick."""
    cluster.ws_protocols = accepted
    async with client.ws_connect(ws_url(proxy), protocols=offered) as ws:
        assert ws.protocol == chosen
        await ws.send_str("x")
        assert (await ws.receive()).data == "x"
    assert ("open", chosen) in cluster.ws_events


async def test_token_expiring_during_the_socket_does_not_cut_it(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """A socket opened with a token keeps working after that token expired and was replaced."""
    cluster.lifetime = 1.0  # the proxy refreshes after about 0.8 s
    proxy = await start_proxy()
    first = proxy.tokens.current.value
    async with client.ws_connect(ws_url(proxy)) as ws:
        await ws.send_str("early")
        assert (await ws.receive()).data == "early"
        await until(lambda: proxy.tokens.current.value != first)
        cluster.revoke_access_tokens()  # the token the socket was opened with is now refused
        await ws.send_str("late")
        msg = await ws.receive()
        assert (msg.type, msg.data) == (WSMsgType.TEXT, "late")
    assert ws.close_code == WSCloseCode.OK


async def test_401_on_handshake_refreshes_and_retries_once(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """A handshake refused with 401 is retried once with a fresh token and the socket opens."""
    cluster.revoke_access_tokens()
    async with client.ws_connect(ws_url(proxy)) as ws:
        await ws.send_str("after refresh")
        assert (await ws.receive()).data == "after refresh"
    assert cluster.token_calls == 2
    assert len([r for r in cluster.api_requests() if r.raw_path == "/ws"]) == 2


async def test_handshake_refused_twice_gives_client_the_401(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """When the fresh token is refused too, the client gets 401 and only one retry happened."""
    cluster.reject_all = True
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await client.ws_connect(ws_url(proxy))
    assert caught.value.status == 401
    assert len([r for r in cluster.api_requests() if r.raw_path == "/ws"]) == 2


@pytest.mark.parametrize(("path", "status"), [("status/403", 403), ("status/404", 404),
                                              ("status/503", 503), ("api/x", 502)])
async def test_handshake_refused_by_cluster_keeps_its_status(
    proxy: Running, client: aiohttp.ClientSession, path: str, status: int
) -> None:
    """A cluster that will not upgrade gives the client its status (2xx: 502) with the proxy's
    JSON account."""
    async with client.get(proxy.url / path, headers=handshake_headers()) as resp:
        assert resp.status == status
        assert resp.headers[ERROR_HEADER] in ("websocket_refused", "bad_websocket_upgrade")
        assert str(status if status != 502 else 200) in (await resp.json())["detail"]


@pytest.mark.parametrize(
    "headers",
    [
        {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"},
        {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
         "Sec-WebSocket-Key": "too-short"},
        {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "99",
         "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="},
        {"Upgrade": "websocket", "Connection": "keep-alive", "Sec-WebSocket-Version": "13",
         "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="},
    ],
    ids=["no-key", "bad-key", "bad-version", "no-connection-upgrade"],
)
async def test_malformed_handshake_refused_before_cluster(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession,
    headers: dict[str, str],
) -> None:
    """A broken WebSocket handshake gets a 400 from the proxy and never reaches the cluster."""
    async with client.get(proxy.url / "ws", headers=headers) as resp:
        assert resp.status == 400
        assert resp.headers[ERROR_HEADER] == "bad_websocket_handshake"
    assert cluster.api_requests() == []


async def test_cluster_unreachable_at_handshake_gives_502(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    """A handshake to a cluster that went away gives the proxy's 502 JSON error."""
    doomed = TestServer(FakeCluster().app(), host="127.0.0.1")
    await doomed.start_server()
    proxy = await start_proxy(cluster=URL(f"http://127.0.0.1:{doomed.port}"))
    await doomed.close()
    async with client.get(proxy.url / "ws", headers=handshake_headers()) as resp:
        assert resp.status == 502
        assert resp.headers[ERROR_HEADER] == "cluster_unreachable"


async def test_oversized_message_closes_with_1009(
    proxy: Running, client: aiohttp.ClientSession
) -> None:
    """A message above the relay limit closes the socket with 1009 instead of filling memory."""
    from proxy.websocket import MAX_MESSAGE_SIZE

    async with client.ws_connect(ws_url(proxy), max_msg_size=0) as ws:
        with contextlib.suppress(ConnectionError):  # the proxy stops reading: it may reset
            await ws.send_bytes(b"\0" * (MAX_MESSAGE_SIZE + 1))
        msg = await ws.receive()
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, WSCloseCode.MESSAGE_TOO_BIG)


async def test_plain_get_with_other_upgrade_is_forwarded_as_http(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """An Upgrade other than websocket is dropped (hop-by-hop) and the request forwarded."""
    async with client.get(proxy.url / "api/x", headers={"Upgrade": "h2c",
                                                         "Connection": "Upgrade"}) as resp:
        assert resp.status == 200
        names = [k.lower() for k, _ in (await resp.json())["headers"]]
    assert "upgrade" not in names


@pytest.mark.parametrize("origin", ["https://evil.example", "http://localhost:3000", "null",
                                    "http://127.0.0.1.evil.example"])
async def test_handshake_from_foreign_page_refused_before_cluster(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession, origin: str
) -> None:
    """The Origin rules apply to the handshake: a foreign page gets 403, the cluster nothing."""
    async with client.get(proxy.url / "ws", headers={**handshake_headers(),
                                                     "Origin": origin}) as resp:
        assert resp.status == 403
        assert resp.headers[ERROR_HEADER] == "cross_origin_refused"
    assert cluster.api_requests() == []


@pytest.mark.parametrize("cors_origin", [None, "http://localhost:3000"], ids=["own", "cors"])
async def test_handshake_from_allowed_page_opens(
    start_proxy: StartProxy, client: aiohttp.ClientSession, cors_origin: str | None
) -> None:
    """Pages at the proxy's own origin, or at a --cors-origin, may open sockets."""
    proxy = await start_proxy(cors_origins=(cors_origin,) if cors_origin else ())
    origin = cors_origin or f"http://{proxy.url.host}:{proxy.url.port}"
    async with client.ws_connect(ws_url(proxy), origin=origin) as ws:
        await ws.send_str("allowed")
        assert (await ws.receive()).data == "allowed"


async def test_shutdown_closes_open_sockets_with_1001_at_once(
    cluster_url: URL, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """A proxy shutting down tells both ends of an open socket that it goes away (1001, with a
    reason) when the shutdown starts, not when the grace period runs out."""
    server = TestServer(make_app(proxy_settings(cluster_url)), host="127.0.0.1")
    await server.start_server(shutdown_timeout=2)  # the grace period
    await server.app[TOKENS].wait_first()
    ws = await client.ws_connect(URL(f"ws://127.0.0.1:{server.port}/ws"))
    await ws.send_str("open")
    assert (await ws.receive()).data == "open"
    closing = asyncio.ensure_future(server.close())
    try:
        msg = await ws.receive()
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, WSCloseCode.GOING_AWAY)
        assert msg.extra == "the proxy is shutting down"  # not the cancelled handler's close
        await until(lambda: ("closed", WSCloseCode.GOING_AWAY) in cluster.ws_events)
    finally:
        await closing


# --- in a real browser ------------------------------------------------------------------------

BROWSER_PAGE = """<!doctype html><html><head><title>ws</title></head><body><script>
// What the socket did, as a promise the test awaits through DevTools (no timers).
window.outcome = new Promise((resolve) => {
  const ws = new WebSocket(%r);
  let echoed = null;
  ws.onopen = () => ws.send("from the browser");
  ws.onmessage = (e) => { echoed = "echo: " + e.data; ws.close(4000, "bye"); };
  ws.onclose = (e) => resolve(echoed || "closed " + e.code);
});
</script></body></html>"""


@pytest.mark.browser
async def test_browser_page_on_the_proxy_talks_over_a_socket(
    proxy: Running, cluster: FakeCluster, browser: DevTools
) -> None:
    """Chromium, on a page the proxy serves, opens a socket through it: its message comes back
    and its close code reaches the cluster."""
    # The browser resolves only localhost (and the attacker's name): see tests/devtools.py.
    page = BROWSER_PAGE % str(ws_url(proxy).with_host("localhost"))

    async def serve_page(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    cluster.hooks["echo"] = serve_page
    async with open_page(browser) as tab:
        await tab.goto(str((proxy.url / "app").with_host("localhost")))
        assert await tab.run("window.outcome") == "echo: from the browser"
    await until(lambda: ("closed", 4000) in cluster.ws_events)


@pytest.mark.browser
async def test_browser_page_from_another_site_cannot_open_a_socket(
    proxy: Running, cluster: FakeCluster, browser: DevTools
) -> None:
    """Chromium, on a page from another origin, cannot open a socket through the proxy: the
    handshake is refused and never reaches the cluster."""
    page = BROWSER_PAGE % str(ws_url(proxy).with_host("localhost"))

    async def serve_page(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    site = web.Application()
    site.router.add_get("/", serve_page)
    other = TestServer(site, host="127.0.0.1")
    await other.start_server()
    try:
        async with open_page(browser) as tab:
            await tab.goto(f"http://{EVIL}:{other.port}/")
            # What a page sees of a refused handshake.
            assert await tab.run("window.outcome") == "closed 1006"
    finally:
        await other.close()
    assert [r for r in cluster.api_requests() if r.raw_path == "/ws"] == []


async def test_handshake_redirect_is_not_followed(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession,
) -> None:
    """A redirect answering the handshake goes back to the client; no socket to another host."""
    seen: list[str] = []

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(text="not the cluster")

    other_app = web.Application()
    other_app.router.add_get("/elsewhere", elsewhere)
    other = TestServer(other_app, host="127.0.0.1")
    await other.start_server()

    async def redirect(request: web.Request) -> web.Response:
        location = f"http://127.0.0.1:{other.port}/elsewhere"
        return web.Response(status=302, headers={"Location": location})

    cluster.hooks["echo"] = redirect
    proxy = await start_proxy()
    try:
        async with client.get(proxy.url / "service/genai/ws", headers=handshake_headers(),
                              allow_redirects=False) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == f"http://127.0.0.1:{other.port}/elsewhere"
        assert seen == []
    finally:
        await other.close()
