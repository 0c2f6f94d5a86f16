"""Forwarding fidelity: methods, raw paths, headers, bodies, redirects, errors, the 401 retry."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from collections.abc import AsyncIterator

import aiohttp
import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from tests.conftest import Running, StartProxy
from tests.fakes import FakeCluster
from tests.helpers import raw_exchange

ERROR_HEADER = "X-Squirro-Proxy-Error"


def _auth_headers(data: dict) -> list[str]:  # type: ignore[type-arg]
    return [v for k, v in data["headers"] if k.lower() == "authorization"]


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS",
                                    "PROPFIND"])
async def test_every_method_forwarded(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession, method: str
) -> None:
    """Any method reaches the cluster unchanged."""
    async with client.request(method, proxy.url / "api/x") as resp:
        assert resp.status == 200
        assert (await resp.json())["method"] == method


async def test_head_forwarded_without_body(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """HEAD reaches the cluster as HEAD and its answer has no body."""
    async with client.head(proxy.url / "api/x") as resp:
        assert resp.status == 200
        assert await resp.read() == b""
    assert cluster.api_requests()[-1].method == "HEAD"


@pytest.mark.parametrize(
    "raw",
    [
        "/api/topic/v0/t/projects",
        "/api/a%2Fb/c%20d/%7Euser",
        "/api/x?b=2&a=1&b=3",
        "/api/x?q=%26%3D%25&empty=&flag",
        "/api/x?q=caf%C3%A9+bar&q=%2B",
        "/api/%E2%9C%93/x;matrix=1",
        "/",
    ],
)
async def test_raw_path_and_query_byte_for_byte(
    proxy: Running, cluster: FakeCluster, raw: str
) -> None:
    """Percent-escapes, repeated keys and their order arrive exactly as sent."""
    request = f"GET {raw} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    answer = await raw_exchange(proxy.url, request)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert cluster.api_requests()[-1].raw_path == raw


@pytest.fixture
async def prefixed_cluster(cluster: FakeCluster) -> AsyncIterator[URL]:
    server = TestServer(cluster.app(prefix="/squirro"), host="127.0.0.1")
    await server.start_server()
    yield URL(f"http://127.0.0.1:{server.port}/squirro")
    await server.close()


async def test_cluster_path_prefix(
    start_proxy: StartProxy, prefixed_cluster: URL, cluster: FakeCluster,
    client: aiohttp.ClientSession,
) -> None:
    """With a cluster URL like https://host/squirro every path goes under the prefix."""
    proxy = await start_proxy(cluster=prefixed_cluster)
    assert cluster.token_calls == 1  # the token endpoint was found under the prefix
    async with client.get(proxy.url.with_path("/api/x%2Fy", encoded=True)) as resp:
        assert resp.status == 200
    assert cluster.api_requests()[-1].raw_path == "/squirro/api/x%2Fy"


async def test_authorization_replaced_by_one_bearer(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """The client's Authorization is dropped; exactly one Bearer with the access token goes up."""
    headers = [("Authorization", "Basic dXNlcjpwYXNz"), ("Authorization", "Bearer mine")]
    async with client.get(proxy.url / "api/x", headers=headers) as resp:
        data = await resp.json()
    assert _auth_headers(data) == [f"Bearer {cluster.last_token}"]


async def test_host_is_the_clusters(
    proxy: Running, cluster: FakeCluster, cluster_url: URL, client: aiohttp.ClientSession
) -> None:
    """The cluster sees its own host name in Host, never the proxy's."""
    async with client.get(proxy.url / "api/x") as resp:
        data = await resp.json()
    hosts = [v for k, v in data["headers"] if k.lower() == "host"]
    assert hosts == [f"{cluster_url.host}:{cluster_url.port}"]


async def test_repeated_request_headers_kept_in_order(
    proxy: Running, cluster: FakeCluster
) -> None:
    """Repeated headers arrive all, in the order sent; hop-by-hop ones never arrive."""
    request = (
        b"GET /api/x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Multi: a\r\nX-Other: o\r\n"
        b"X-Multi: b\r\nx-multi: c\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\n"
        b"Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic eDp5\r\n\r\n"
    )
    answer = await raw_exchange(proxy.url, request)
    assert answer.startswith(b"HTTP/1.1 200")
    seen = cluster.api_requests()[-1].headers
    assert [(k, v) for k, v in seen if k.lower() == "x-multi"] == [
        ("X-Multi", "a"), ("X-Multi", "b"), ("X-Multi", "c")]
    names = {k.lower() for k, _ in seen}
    assert not names & {"x-hop", "keep-alive", "te", "proxy-authorization"}


async def test_response_headers_repeated_and_hop_by_hop(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """The cluster's repeated headers reach the client in order; hop-by-hop ones do not."""

    async def answer(request: web.Request) -> web.Response:
        resp = web.Response(text="ok", reason="Fine Indeed")
        resp.headers.add("Link", "<a>; rel=1")
        resp.headers.add("Connection", "X-Hop")
        resp.headers.add("X-Hop", "secret")
        resp.headers.add("Link", "<b>; rel=2")
        resp.headers.add("Proxy-Authenticate", "Basic")
        return resp

    cluster.hooks["echo"] = answer
    async with client.get(proxy.url / "api/x") as resp:
        assert resp.status == 200
        assert resp.reason == "Fine Indeed"
        assert resp.headers.getall("Link") == ["<a>; rel=1", "<b>; rel=2"]
        assert "X-Hop" not in resp.headers and "Proxy-Authenticate" not in resp.headers


@pytest.mark.parametrize("size", [0, 1, 65_537, 3 * 1024 * 1024])
async def test_request_body_byte_exact_with_length(
    proxy: Running, client: aiohttp.ClientSession, size: int
) -> None:
    """A body with Content-Length arrives byte-exact, small or above the replay limit."""
    body = os.urandom(size)
    async with client.post(proxy.url / "api/upload", data=io.BytesIO(body)) as resp:
        data = await resp.json()
    assert data["body_size"] == size
    assert data["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_request_body_byte_exact_chunked(
    proxy: Running, client: aiohttp.ClientSession
) -> None:
    """A chunked body of unknown length streams through byte-exact."""
    parts = [os.urandom(100_000) for _ in range(30)]

    async def gen() -> AsyncIterator[bytes]:
        for p in parts:
            yield p

    async with client.post(proxy.url / "api/upload", data=gen()) as resp:
        data = await resp.json()
    assert data["body_size"] == sum(map(len, parts))
    assert data["body_sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()


async def test_response_body_bytes_untouched(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """A gzip-encoded answer reaches the client as the same bytes, still encoded."""
    import gzip

    payload = gzip.compress(b'{"hello": "world"}' * 100)

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=payload, headers={"Content-Encoding": "gzip",
                                                   "Content-Type": "application/json"})

    cluster.hooks["echo"] = answer
    async with client.get(proxy.url / "api/x", headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert resp.headers["Content-Length"] == str(len(payload))
        assert await resp.read() == payload


async def test_no_automatic_headers_added(
    proxy: Running, cluster: FakeCluster
) -> None:
    """The proxy adds no User-Agent, Accept or Accept-Encoding the client did not send."""
    request = b"GET /api/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    await raw_exchange(proxy.url, request)
    names = {k.lower() for k, _ in cluster.api_requests()[-1].headers}
    assert not names & {"user-agent", "accept-encoding", "accept", "cookie"}


async def test_redirect_not_followed_and_location_rewritten(
    proxy: Running, cluster: FakeCluster, cluster_url: URL, client: aiohttp.ClientSession
) -> None:
    """A redirect comes back to the client, pointing at the proxy instead of the cluster."""

    async def answer(request: web.Request) -> web.Response:
        raise web.HTTPFound(str(cluster_url / "api/elsewhere") + "?a=1")

    cluster.hooks["echo"] = answer
    async with client.get(proxy.url / "api/x", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == f"{proxy.url}/api/elsewhere?a=1"
    assert len(cluster.api_requests()) == 1


async def test_cookies_not_leaked_either_way(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """Browser cookies for localhost never reach the cluster; the cluster's Set-Cookie never
    reaches the browser (default policy)."""

    async def answer(request: web.Request) -> web.Response:
        resp = web.Response(text="ok")
        resp.set_cookie("cluster_session", "abc")
        return resp

    cluster.hooks["echo"] = answer
    async with client.get(proxy.url / "api/x", headers={"Cookie": "other_app=secret"}) as resp:
        assert "Set-Cookie" not in resp.headers
    assert not [k for k, _ in cluster.api_requests()[-1].headers if k.lower() == "cookie"]


async def test_works_with_httpx_and_keepalive(proxy: Running) -> None:
    """A second client library, several requests on one kept-alive connection."""
    async with httpx.AsyncClient(base_url=str(proxy.url)) as hx:
        for n in range(5):
            r = await hx.get(f"/api/x?n={n}")
            assert r.status_code == 200
            assert r.json()["raw_path"] == f"/api/x?n={n}"


# --- the 401 retry ------------------------------------------------------------------------


async def test_401_refreshes_and_retries_once(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """A refused access token is refreshed and the request sent again; the client sees 200."""
    cluster.revoke_access_tokens()
    async with client.get(proxy.url / "api/x") as resp:
        assert resp.status == 200
    assert cluster.token_calls == 2
    assert len(cluster.api_requests()) == 2


async def test_401_retry_replays_small_body(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """A body within the replay limit is sent again whole after the refresh."""
    cluster.revoke_access_tokens()
    body = os.urandom(200_000)
    async with client.put(proxy.url / "api/x", data=body) as resp:
        assert resp.status == 200
        data = await resp.json()
    assert data["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert cluster.token_calls == 2


async def test_401_large_body_not_replayed_but_token_refreshed(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """A body above the limit is not replayed: the client gets the 401, its next try works."""
    proxy = await start_proxy(retry_body_limit=1000)
    cluster.revoke_access_tokens()
    async with client.post(proxy.url / "api/x", data=os.urandom(5000)) as resp:
        assert resp.status == 401
        assert ERROR_HEADER not in resp.headers  # the cluster's own 401
    assert cluster.token_calls == 2
    async with client.post(proxy.url / "api/x", data=os.urandom(5000)) as resp:
        assert resp.status == 200


async def test_chunked_body_over_limit_not_replayed(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """A chunked body that outgrows the limit while streaming is not replayed."""
    proxy = await start_proxy(retry_body_limit=1000)
    cluster.revoke_access_tokens()

    async def gen() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"y" * 500

    async with client.post(proxy.url / "api/x", data=gen()) as resp:
        assert resp.status == 401
    assert len(cluster.api_requests()) == 1


async def test_second_401_goes_to_client(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """If the cluster refuses the fresh token too, its 401 reaches the client as it came."""
    cluster.reject_all = True
    async with client.get(proxy.url / "api/x") as resp:
        assert resp.status == 401
        assert ERROR_HEADER not in resp.headers
        assert (await resp.json()) == {"error": "unauthorized"}
    assert cluster.token_calls == 2
    assert len(cluster.api_requests()) == 2


async def test_single_flight_under_hundreds_of_401s(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """300 concurrent requests hitting a revoked token cause exactly one token call."""
    cluster.revoke_access_tokens()
    cluster.token_delay = 0.2  # keep the exchange open while the others arrive

    async def one(n: int) -> int:
        async with client.get(proxy.url / f"api/x?n={n}") as resp:
            await resp.read()
            return resp.status

    statuses = await asyncio.gather(*(one(n) for n in range(300)))
    assert statuses == [200] * 300
    assert cluster.token_calls == 2  # start-up + one refresh


async def test_same_token_again_asks_again(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """A refresh that returns the refused token again (clock drift) is repeated, up to 3 times."""
    stale = cluster.last_token
    cluster.same_token_times = 2
    cluster.tokens.pop(stale)  # the cluster refuses it, yet hands it out again twice
    async with client.get(proxy.url / "api/x") as resp:
        assert resp.status == 200
    assert cluster.token_calls == 4  # start-up + 3 attempts
    assert proxy.tokens.current.value != stale


# --- upstream failures ---------------------------------------------------------------------


async def test_cluster_down_after_start_gives_502(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """When the cluster stops answering on its port, requests get a 502 JSON error."""
    server = TestServer(cluster.app(), host="127.0.0.1")
    await server.start_server()
    proxy = await start_proxy(cluster=URL(f"http://127.0.0.1:{server.port}"))
    async with client.get(proxy.url / "api/x") as resp:
        assert resp.status == 200
    await server.close()  # the cluster goes away, its pooled connection with it
    async with client.get(proxy.url / "api/x") as resp:
        assert resp.status == 502
        assert resp.headers[ERROR_HEADER] == "cluster_unreachable"
        body = await resp.json()
    assert body["error"] == "cluster_unreachable" and "cannot connect" in body["detail"]


async def test_slow_cluster_gives_504(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """A cluster that does not answer within the read timeout gives a 504 JSON error."""
    proxy = await start_proxy(read_timeout=0.3)

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(text="late")

    cluster.hooks["echo"] = slow
    async with client.get(proxy.url / "api/x") as resp:
        assert resp.status == 504
        assert resp.headers[ERROR_HEADER] == "cluster_timeout"
        assert (await resp.json())["error"] == "cluster_timeout"


async def test_cluster_errors_pass_through_unmarked(
    proxy: Running, client: aiohttp.ClientSession
) -> None:
    """The cluster's own 5xx reaches the client as it came, without the proxy's marker."""
    async with client.get(proxy.url / "status/503") as resp:
        assert resp.status == 503
        assert ERROR_HEADER not in resp.headers
        assert await resp.read() == b"status body"


async def test_no_token_yet_gives_503_with_retry_after(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """While the token endpoint fails, requests get 503 with Retry-After, never reach the API."""
    cluster.token_down = True
    proxy = await start_proxy(wait_token=False)
    while cluster.token_calls == 0:
        await asyncio.sleep(0.01)
    async with client.get(proxy.url / "api/x") as resp:
        assert resp.status == 503
        assert resp.headers[ERROR_HEADER] == "token_unavailable"
        assert int(resp.headers["Retry-After"]) >= 1
        body = await resp.json()
    assert "503" in body["detail"]
    assert cluster.api_requests() == []
    cluster.token_down = False
    await proxy.tokens.wait_first()
    async with client.get(proxy.url / "api/x") as resp:
        assert resp.status == 200


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/api/x", {"Host": "evil.example"}, 403),  # refused by the guard
        ("/-/healthy", {}, 200),  # answered by the proxy itself
    ],
)
async def test_proxys_own_answers_carry_request_id(
    proxy: Running, client: aiohttp.ClientSession, path: str, headers: dict[str, str],
    status: int,
) -> None:
    """Refusals and the proxy's own pages carry X-Request-ID: a given one kept, else a new one."""
    async with client.get(proxy.url.with_path(path), headers=headers) as resp:
        assert resp.status == status
        assert len(resp.headers["X-Request-ID"]) == 24
    given = {**headers, "X-Request-ID": "support-ticket-42"}
    async with client.get(proxy.url.with_path(path), headers=given) as resp:
        assert resp.headers["X-Request-ID"] == "support-ticket-42"


async def test_token_error_carries_request_id(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """A 503 for want of a token carries the request's X-Request-ID."""
    cluster.token_down = True
    proxy = await start_proxy(wait_token=False)
    async with client.get(proxy.url / "api/x", headers={"X-Request-ID": "abc-123"}) as resp:
        assert resp.status == 503
        assert resp.headers["X-Request-ID"] == "abc-123"


async def test_debug_log_names_headers_but_no_values(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """--log-level debug shows the upstream exchange with header names, never their values."""
    import logging

    caplog.set_level(logging.DEBUG, logger="squirro_proxy")
    proxy = await start_proxy()
    headers = {"Cookie": "session=cookie-value-123", "Authorization": "Basic dXNlcjpwYXNz"}
    async with client.get((proxy.url / "api/x").with_query(token="abc"), headers=headers) as resp:
        assert resp.status == 200
    text = caplog.text
    assert "upstream GET 127.0.0.1/api/x?token=********" in text
    assert "Cookie" in text and "Authorization" in text
    for value in ("cookie-value-123", "dXNlcjpwYXNz", cluster.last_token, "token=abc"):
        assert value not in text
