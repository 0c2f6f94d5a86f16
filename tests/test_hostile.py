"""Hostile and broken requests over raw sockets: each gets a 4xx (or 505) from the proxy, nothing
reaches the cluster, and the proxy keeps serving.

The proxy runs the way the CLI runs it (`ProxyAppRunner` on a TCP site), so the connection-level
defences (request-head deadline, parser refusals as JSON) are the real ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from yarl import URL

from proxy.app import TOKENS, make_app
from proxy.config import Settings
from proxy.connection import ProxyAppRunner
from proxy.errors import ERROR_HEADER
from tests.conftest import proxy_settings
from tests.fakes import FakeCluster


@dataclasses.dataclass
class Served:
    """A proxy served by `ProxyAppRunner` on 127.0.0.1, as the CLI serves it."""

    url: URL
    port: int
    app: web.Application
    settings: Settings


ServeProxy = Callable[..., Awaitable[Served]]


@contextlib.asynccontextmanager
async def serve_proxy(cluster_url: URL, **overrides: Any) -> AsyncIterator[Served]:
    settings = proxy_settings(cluster_url, **overrides)
    app = make_app(settings)
    runner = ProxyAppRunner(app, header_timeout=settings.header_timeout, handle_signals=False,
                            shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        await app[TOKENS].wait_first()
        yield Served(URL(f"http://127.0.0.1:{port}"), port, app, settings)
    finally:
        await runner.cleanup()


@pytest.fixture
async def serve(cluster_url: URL) -> AsyncIterator[ServeProxy]:
    """Start proxies as the CLI does; keyword arguments override Settings."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(**overrides: Any) -> Served:
            return await stack.enter_async_context(serve_proxy(cluster_url, **overrides))

        yield start


@dataclasses.dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-cased names; enough for these checks
    body: bytes
    closed: bool  # the proxy closed the connection after this response


async def read_response(reader: asyncio.StreamReader) -> RawResponse:
    """One HTTP/1.x response (skipping interim 1xx answers), with a Content-Length body."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if status >= 200:
            break
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    closed = headers.get("connection", "").lower() == "close"
    return RawResponse(status, headers, body, closed)


async def exchange(port: int, data: bytes, timeout: float = 10.0) -> RawResponse:
    """Send raw bytes on a fresh connection and read one response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(read_response(reader), timeout)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def req(line: str, *headers: str, body: bytes = b"", host: str | None = "localhost") -> bytes:
    """A request in bytes: the line, a Host (unless None), the headers, the body."""
    lines = [line]
    if host is not None:
        lines.append(f"Host: {host}")
    lines.extend(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


GOOD = req("GET /api/topic/v0/t/projects HTTP/1.1")
# Each row: what is sent, the status the proxy must answer with.
HOSTILE = [
    # SSRF: the client must never choose the upstream host.
    pytest.param(req("GET http://other-host/x HTTP/1.1"), 400, id="absolute-form"),
    pytest.param(req("GET https://other-host:8443/x HTTP/1.1"), 400, id="absolute-form-https"),
    pytest.param(req("GET http://localhost/x HTTP/1.1"), 400, id="absolute-form-self"),
    pytest.param(req("CONNECT other-host:443 HTTP/1.1", host="other-host:443"), 405,
                 id="connect"),
    pytest.param(req("GET other-host:443 HTTP/1.1"), 400, id="authority-form"),
    pytest.param(req("OPTIONS * HTTP/1.1"), 400, id="asterisk-options"),
    pytest.param(req("GET * HTTP/1.1"), 400, id="asterisk-get"),
    pytest.param(req("GET //other-host/x HTTP/1.1"), 400, id="double-slash"),
    pytest.param(req("GET /@other-host/x HTTP/1.1"), 400, id="at-host"),
    pytest.param(req("GET /\\other-host/x HTTP/1.1"), 400, id="backslash"),
    pytest.param(req("GET /api\\..\\x HTTP/1.1"), 400, id="backslash-climb"),
    pytest.param(req("GET /%5cother-host/x HTTP/1.1"), 400, id="encoded-backslash"),
    pytest.param(req("GET /%2f%2fother-host/x HTTP/1.1"), 400, id="encoded-double-slash"),
    pytest.param(req("TRACE /x HTTP/1.1"), 405, id="trace"),
    # Climbing out of the cluster's path prefix.
    pytest.param(req("GET /../x HTTP/1.1"), 400, id="dotdot"),
    pytest.param(req("GET /api/../../x HTTP/1.1"), 400, id="dotdot-deep"),
    pytest.param(req("GET /api/.. HTTP/1.1"), 400, id="dotdot-end"),
    pytest.param(req("GET /%2e%2e/x HTTP/1.1"), 400, id="dotdot-encoded"),
    pytest.param(req("GET /%2E%2E/x HTTP/1.1"), 400, id="dotdot-encoded-upper"),
    pytest.param(req("GET /.%2e/x HTTP/1.1"), 400, id="dotdot-half-encoded"),
    pytest.param(req("GET /%252e%252e/x HTTP/1.1"), 400, id="dotdot-double-encoded"),
    pytest.param(req("GET /..%2fx HTTP/1.1"), 400, id="dotdot-encoded-slash"),
    pytest.param(req("GET /./x HTTP/1.1"), 400, id="dot"),
    pytest.param(req("GET /x#frag HTTP/1.1"), 400, id="fragment"),
    pytest.param(req("GET /x%00y HTTP/1.1"), 400, id="encoded-nul"),
    pytest.param(req("GET /x%0d%0aSet-Cookie:%20a=b HTTP/1.1"), 400, id="encoded-crlf"),
    # Request smuggling.
    pytest.param(req("POST /x HTTP/1.1", "Content-Length: 4", "Transfer-Encoding: chunked",
                     body=b"0\r\n\r\n"), 400, id="cl-and-te"),
    pytest.param(req("POST /x HTTP/1.1", "Transfer-Encoding: chunked", "Content-Length: 4",
                     body=b"0\r\n\r\n"), 400, id="te-and-cl"),
    pytest.param(req("POST /x HTTP/1.1", "Content-Length: 4", "Content-Length: 5",
                     body=b"abcde"), 400, id="duplicate-cl"),
    pytest.param(req("POST /x HTTP/1.1", "Content-Length: 4", "Content-Length: 4",
                     body=b"abcd"), 400, id="duplicate-cl-same"),
    pytest.param(req("POST /x HTTP/1.1", "Content-Length: 4, 4", body=b"abcd"), 400,
                 id="cl-list"),
    pytest.param(req("POST /x HTTP/1.1", "Content-Length: +4", body=b"abcd"), 400,
                 id="cl-plus"),
    pytest.param(req("POST /x HTTP/1.1", "Content-Length: -4", body=b"abcd"), 400,
                 id="cl-negative"),
    pytest.param(req("POST /x HTTP/1.1", "Content-Length: 0x4", body=b"abcd"), 400,
                 id="cl-hex"),
    pytest.param(req("POST /x HTTP/1.1", "Content-Length: 1 2", body=b"abcd"), 400,
                 id="cl-space"),
    pytest.param(req("POST /x HTTP/1.1", "Transfer-Encoding: xchunked", body=b"0\r\n\r\n"),
                 400, id="te-xchunked"),
    pytest.param(req("POST /x HTTP/1.1", "Transfer-Encoding : chunked", body=b"0\r\n\r\n"),
                 400, id="te-space-before-colon"),
    pytest.param(req("POST /x HTTP/1.1", "Transfer-Encoding: chunked, identity",
                     body=b"0\r\n\r\n"), 400, id="te-chunked-not-last"),
    pytest.param(req("POST /x HTTP/1.1", "Transfer-Encoding: chunked, chunked",
                     body=b"0\r\n\r\n"), 400, id="te-chunked-twice"),
    pytest.param(req("POST /x HTTP/1.1", "Transfer-Encoding: chunked", "Transfer-Encoding: x",
                     body=b"0\r\n\r\n"), 400, id="te-second-header"),
    pytest.param(req("POST /x HTTP/1.1", "Transfer-Encoding:\x0bchunked", body=b"0\r\n\r\n"),
                 400, id="te-vertical-tab"),
    pytest.param(req("POST /x HTTP/1.0", "Transfer-Encoding: chunked", body=b"0\r\n\r\n"),
                 400, id="te-in-http10"),
    pytest.param(req("POST /x HTTP/1.1", "Transfer-Encoding: chunked",
                     body=b"0x4\r\nabcd\r\n0\r\n\r\n"), 400, id="chunk-size-hex"),
    pytest.param(req("POST /x HTTP/1.1", "Transfer-Encoding: chunked",
                     body=b"4\nabcd\n0\n\n"), 400, id="chunk-bare-lf"),
    pytest.param(req("POST /x HTTP/1.1", "Transfer-Encoding: chunked",
                     body=b"4;a\x00\r\nabcd\r\n0\r\n\r\n"), 400, id="chunk-extension-nul"),
    pytest.param(b"GET /x HTTP/1.1\nHost: localhost\n\n", 400, id="bare-lf-line"),
    pytest.param(b"GET /x HTTP/1.1\r\nHost: localhost\nX-A: b\r\n\r\n", 400,
                 id="bare-lf-header"),
    pytest.param(b"GET /x HTTP/1.1\r\nHost: localhost\rX-A: b\r\n\r\n", 400, id="bare-cr"),
    pytest.param(req("GET /x HTTP/1.1", "X-A: a", " folded"), 400, id="obs-fold"),
    pytest.param(req("GET /x HTTP/1.1", "X-A: a\x00b"), 400, id="nul-in-value"),
    pytest.param(req("GET /x HTTP/1.1", "X-A: a\rb"), 400, id="cr-in-value"),
    pytest.param(req("GET /x HTTP/1.1", "X A: b"), 400, id="space-in-name"),
    pytest.param(req("GET /x HTTP/1.1", "Host: evil.example"), 400, id="second-host"),
    pytest.param(req("GET /x HTTP/1.1", "Host: localhost"), 400, id="second-host-same"),
    pytest.param(req("GET /x HTTP/1.1", host=None), 400, id="no-host"),
    pytest.param(req("get /x HTTP/1.1"), 400, id="lower-case-method"),
    pytest.param(req("G(T /x HTTP/1.1"), 400, id="bad-method"),
    pytest.param(req("GET /a\tb HTTP/1.1"), 400, id="tab-in-target"),
    pytest.param(req("GET /a b HTTP/1.1"), 400, id="space-in-target"),
    pytest.param("GET /ä HTTP/1.1\r\nHost: localhost\r\n\r\n".encode(), 400,
                 id="utf8-in-target"),
    pytest.param(b"GET /x HTTP/1.2\r\nHost: localhost\r\n\r\n", 400, id="http-1.2"),
    pytest.param(b"GET /x HTTP/2.0\r\nHost: localhost\r\n\r\n", 505, id="http-2-line"),
    pytest.param(b"GET /x\r\n\r\n", 505, id="http-0.9"),
    pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, id="h2-preface"),
    # Size limits: clear statuses, memory bounded by the parser's limits.
    pytest.param(req("GET /" + "a" * 9000 + " HTTP/1.1"), 414, id="request-line-too-long"),
    pytest.param(req("GET /x HTTP/1.1", "X-A: " + "a" * 9000), 431, id="header-too-long"),
    pytest.param(req("GET /x HTTP/1.1", "X-" + "a" * 9000 + ": b"), 431,
                 id="header-name-too-long"),
    pytest.param(req("GET /x HTTP/1.1", "X-A: " + "a" * (1024 * 1024)), 431,
                 id="header-one-mebibyte"),
    pytest.param(req("GET /x HTTP/1.1", *(f"X-{n}: a" for n in range(150))), 431,
                 id="too-many-headers"),
    # DNS rebinding: only the proxy's own names.
    pytest.param(req("GET /x HTTP/1.1", host="evil.example"), 403, id="foreign-host"),
    pytest.param(req("GET /x HTTP/1.1", host="localhost.evil.example"), 403,
                 id="localhost-prefixed-host"),
    pytest.param(req("GET /x HTTP/1.1", host="127.0.0.1.nip.io:8080"), 403,
                 id="loopback-looking-name"),
    pytest.param(req("GET /x HTTP/1.1", host=""), 403, id="empty-host"),
    pytest.param(req("GET /x HTTP/1.0", host=None), 403, id="http10-without-host"),
    pytest.param(req("GET /x HTTP/1.1", host="user@localhost"), 403, id="host-with-userinfo"),
    pytest.param(req("GET /x HTTP/1.1", host="localhost:abc"), 403, id="host-bad-port"),
    pytest.param(req("GET /x HTTP/1.1", host="0.0.0.0:8080"), 403, id="host-0.0.0.0"),
    pytest.param(req("GET /x HTTP/1.1", host="[::1"), 403, id="host-broken-ipv6"),
    # Browsers on other sites.
    pytest.param(req("GET /x HTTP/1.1", "Origin: https://evil.example"), 403,
                 id="cross-origin-get"),
    pytest.param(req("POST /x HTTP/1.1", "Origin: https://evil.example",
                     "Content-Type: application/x-www-form-urlencoded", "Content-Length: 3",
                     body=b"a=b"), 403, id="cross-origin-form-post"),
    pytest.param(req("POST /x HTTP/1.1", "Origin: null", "Content-Length: 3", body=b"a=b"),
                 403, id="null-origin"),
    pytest.param(req("GET /x HTTP/1.1", "Origin: http://localhost:3000"), 403,
                 id="other-local-port-origin"),
    pytest.param(req("GET /x HTTP/1.1", "Sec-Fetch-Site: cross-site"), 403,
                 id="fetch-metadata-cross-site"),
    pytest.param(req("GET /x HTTP/1.1", "Sec-Fetch-Site: same-site"), 403,
                 id="fetch-metadata-same-site"),
    pytest.param(req("GET /ws HTTP/1.1", "Upgrade: websocket", "Connection: Upgrade",
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13",
                     "Origin: https://evil.example"), 403, id="cross-origin-websocket"),
    pytest.param(req("POST /x HTTP/1.1", "Origin: https://evil.example",
                     "Expect: 100-continue", "Content-Length: 3"), 403,
                 id="cross-origin-expect-continue"),
]


@pytest.mark.parametrize(("data", "status"), HOSTILE)
async def test_hostile_request_is_refused_before_the_cluster(
    serve: ServeProxy, cluster: FakeCluster, data: bytes, status: int
) -> None:
    """A hostile request gets its 4xx from the proxy; the cluster sees nothing; serving goes on."""
    proxy = await serve()
    token_calls = cluster.token_calls
    response = await exchange(proxy.port, data)
    assert response.status == status, response.body
    assert ERROR_HEADER.lower() in response.headers  # the proxy's own answer, not the cluster's
    assert cluster.api_requests() == []
    assert cluster.token_calls == token_calls
    good = await exchange(proxy.port, GOOD)
    assert good.status == 200
    assert [r.raw_path for r in cluster.api_requests()] == ["/api/topic/v0/t/projects"]


async def test_keep_alive_connection_survives_a_refusal(
    serve: ServeProxy, cluster: FakeCluster
) -> None:
    """A refused body-less request leaves the connection usable for the next one."""
    proxy = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(req("GET /x HTTP/1.1", host="evil.example") + GOOD)
    first = await read_response(reader)
    second = await read_response(reader)
    writer.close()
    assert (first.status, second.status) == (403, 200)
    assert len(cluster.api_requests()) == 1


async def test_refused_request_with_body_closes_connection(
    serve: ServeProxy, cluster: FakeCluster
) -> None:
    """A refused request's unread body is never parsed as a request: the connection closes."""
    proxy = await serve()
    smuggled = GOOD
    data = req("POST /x HTTP/1.1", "Origin: https://evil.example",
               f"Content-Length: {len(smuggled)}", body=smuggled)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(data)
    first = await read_response(reader)
    rest = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert (first.status, first.closed, rest) == (403, True, b"")
    assert cluster.api_requests() == []


async def test_expect_continue_is_answered_after_the_guard(
    serve: ServeProxy, cluster: FakeCluster
) -> None:
    """An allowed Expect: 100-continue request gets 100, then its body reaches the cluster."""
    proxy = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(req("POST /upload HTTP/1.1", "Expect: 100-continue", "Content-Length: 5"))
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(b"hello")
    response = await asyncio.wait_for(read_response(reader), 10)
    writer.close()
    assert response.status == 200
    assert [(r.raw_path, r.body_size) for r in cluster.api_requests()] == [("/upload", 5)]


async def test_refused_expect_continue_gets_no_interim_answer(
    serve: ServeProxy, cluster: FakeCluster
) -> None:
    """A refused request with Expect: 100-continue gets its 403 first, never a 100 Continue."""
    proxy = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(req("PUT /x HTTP/1.1", "Expect: 100-continue", "Content-Length: 5",
                     host="evil.example"))
    first_line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert first_line.startswith(b"HTTP/1.1 403")
    assert cluster.api_requests() == []


async def test_unknown_expectation_gets_417(serve: ServeProxy, cluster: FakeCluster) -> None:
    """An Expect value other than 100-continue is refused with 417."""
    proxy = await serve()
    response = await exchange(proxy.port, req("POST /x HTTP/1.1", "Expect: magic",
                                              "Content-Length: 0"))
    assert response.status == 417
    assert cluster.api_requests() == []


# --- the request-head deadline ----------------------------------------------------------------


async def test_headers_sent_byte_by_byte_are_cut_off(
    serve: ServeProxy, cluster: FakeCluster
) -> None:
    """A client trickling its headers gets 408 and a closed connection after --header-timeout."""
    proxy = await serve(header_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    started = time.monotonic()
    payload = req("GET /x HTTP/1.1", *(f"X-Slow-{n}: {'a' * 20}" for n in range(50)))

    async def trickle() -> None:
        for byte in payload:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.02)  # the attack itself: one byte every 20 ms

    trickler = asyncio.ensure_future(trickle())
    try:
        # Meanwhile the proxy serves others.
        assert (await exchange(proxy.port, GOOD)).status == 200
        response = await asyncio.wait_for(read_response(reader), 10)
        assert response.status == 408
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        trickler.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await trickler
        writer.close()
    elapsed = time.monotonic() - started
    assert 0.4 < elapsed < 5
    assert [r.raw_path for r in cluster.api_requests()] == ["/api/topic/v0/t/projects"]


async def test_silent_connection_is_closed(serve: ServeProxy) -> None:
    """A connection that never sends a request is answered 408 and closed after --header-timeout."""
    proxy = await serve(header_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    response = await asyncio.wait_for(read_response(reader), 10)
    writer.close()
    assert (response.status, response.closed) == (408, True)


async def test_slow_body_is_not_under_the_header_deadline(
    serve: ServeProxy, cluster: FakeCluster
) -> None:
    """A request body may arrive slower than --header-timeout: only heads are timed."""
    proxy = await serve(header_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(req("POST /slow HTTP/1.1", "Content-Length: 8"))
    for piece in (b"ab", b"cd", b"ef", b"gh"):
        await asyncio.sleep(0.2)  # a slow uploader: 0.8 s in all, past the head deadline
        writer.write(piece)
    response = await asyncio.wait_for(read_response(reader), 10)
    writer.close()
    assert response.status == 200
    assert [(r.raw_path, r.body_size) for r in cluster.api_requests()] == [("/slow", 8)]


async def test_idle_keep_alive_connection_outlives_the_header_deadline(
    serve: ServeProxy, cluster: FakeCluster
) -> None:
    """Between two requests a keep-alive connection may idle longer than --header-timeout."""
    proxy = await serve(header_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(GOOD)
    assert (await asyncio.wait_for(read_response(reader), 10)).status == 200
    await asyncio.sleep(0.8)  # idle, not slow: no head has started
    writer.write(GOOD)
    assert (await asyncio.wait_for(read_response(reader), 10)).status == 200
    writer.close()
    assert len(cluster.api_requests()) == 2


async def test_head_split_over_packets_within_the_deadline_is_served(
    serve: ServeProxy, cluster: FakeCluster
) -> None:
    """A head that arrives in a few pieces, all within --header-timeout, is served normally."""
    proxy = await serve(header_timeout=2.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    for start in range(0, len(GOOD), 10):
        writer.write(GOOD[start:start + 10])
        await writer.drain()
        await asyncio.sleep(0.01)
    response = await asyncio.wait_for(read_response(reader), 10)
    writer.close()
    assert response.status == 200
    assert len(cluster.api_requests()) == 1
