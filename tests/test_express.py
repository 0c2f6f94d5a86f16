"""The express lane (proxy/express.py): plain GETs served past aiohttp's web layer, answered as
the full path answers them, and every other outcome handed over to it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.web_server import Server
from yarl import URL

from proxy.app import POOL, make_app
from proxy.connection import ProxyAppRunner, ProxyRequestHandler, ProxyServer
from proxy.http1 import HIGH_WATER
from tests.conftest import proxy_settings
from tests.fakes import pattern
from tests.helpers import until
from tests.scripted import TOKEN_PATH, Request, ScriptedCluster, ok, raw

ERROR_HEADER = "X-Squirro-Proxy-Error"


@dataclass
class Served:
    url: URL
    runner: web.AppRunner

    @property
    def handled_by_aiohttp(self) -> int:
        """Requests aiohttp's web layer handled (the lane's never reach it)."""
        server = self.runner.server
        assert server is not None
        return server.requests_count


class FullPathRunner(ProxyAppRunner):
    """The CLI's runner with the lane closed: every request takes aiohttp's full path."""

    async def _make_server(self) -> Server:
        return ProxyServer(await web.AppRunner._make_server(self), self._header_timeout, None)


async def serve(cluster: URL, runner_class: type[ProxyAppRunner] = ProxyAppRunner, *,
                grace: float = 2.0, **overrides: Any) -> Served:
    """A proxy in front of `cluster`, served as the CLI serves it (lane included, unless the
    runner closes it); keyword arguments override Settings. The caller cleans up."""
    runner = runner_class(make_app(proxy_settings(cluster, **overrides)), header_timeout=5.0,
                          handle_signals=False, shutdown_timeout=grace)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return Served(URL(f"http://127.0.0.1:{runner.addresses[0][1]}"), runner)


@pytest.fixture
async def lane(scripted: tuple[ScriptedCluster, URL]) -> AsyncIterator[Served]:
    """A proxy with the express lane in front of the scripted cluster."""
    served = await serve(scripted[1])
    yield served
    await served.runner.cleanup()


@pytest.fixture
async def full(scripted: tuple[ScriptedCluster, URL]) -> AsyncIterator[URL]:
    """The same proxy without the lane, for comparisons."""
    served = await serve(scripted[1], FullPathRunner)
    yield served.url
    await served.runner.cleanup()


async def exchange(url: URL, request: bytes, answers: int = 1) -> bytes:
    """Send raw bytes on one connection and read `answers` whole answers (with a length)."""
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(request)
        out = b""
        for _ in range(answers):
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
            body = await reader.readexactly(int(length.group(1))) if length else b""
            out += head + body
        return out
    finally:
        writer.close()


def get(path: str, *extra: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "X-Request-ID: fixed-id", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def warm(url: URL) -> None:
    """One request through the full path: the token is in and a pooled connection idle."""
    async with aiohttp.ClientSession() as client:
        for _ in range(2):
            async with client.get(url / "api/warm") as resp:
                await resp.read()


def normalised(answer: bytes, proxy: URL) -> bytes:
    """Headers the two proxies cannot share: the Date aiohttp adds and the proxy's own port."""
    answer = re.sub(rb"\r\nDate: [^\r]*", b"\r\nDate: -", answer)
    return answer.replace(str(proxy).encode(), b"http://PROXY")


CLUSTER_HEAD = b"HTTP/1.1 200 OK\r\nDate: Sun, 29 Nov 2026 03:00:00 GMT\r\nServer: squirro\r\n"

ANSWERS = {
    "json": CLUSTER_HEAD + b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    "bare": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    "empty": CLUSTER_HEAD + b"Content-Length: 0\r\n\r\n",
    "hop-by-hop": CLUSTER_HEAD + b"Connection: keep-alive, X-Private\r\nKeep-Alive: timeout=5\r\n"
                  b"X-Private: secret\r\nX-Kept: yes\r\nContent-Length: 2\r\n\r\nok",
    "cookies-and-cors": CLUSTER_HEAD + b"Set-Cookie: session=abc\r\n"
                        b"Access-Control-Allow-Origin: *\r\nContent-Length: 2\r\n\r\nok",
    "redirect": b"HTTP/1.1 302 Found\r\nLocation: {cluster}/api/next?x=1\r\n"
                b"Content-Length: 0\r\n\r\n",
    "error": CLUSTER_HEAD.replace(b"200 OK", b"503 Service Unavailable")
             + b"Content-Type: text/plain\r\nContent-Length: 4\r\n\r\ndown",
    "odd-reason": b"HTTP/1.1 404 Nothing Here\r\nContent-Length: 0\r\n\r\n",
    "no-reason": b"HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n",
    "echoed-id": b"HTTP/1.1 200 OK\r\nx-request-id: cluster-made\r\nContent-Length: 2\r\n\r\nok",
    "close-names-a-header": CLUSTER_HEAD + b"Connection: close\r\nClose: x\r\nX-Kept: yes\r\n"
                            b"Content-Length: 2\r\n\r\nok",
    "latin-1": CLUSTER_HEAD + b"X-Name: caf\xe9\r\nX-Multi: 1\r\nx-multi: 2\r\n"
               b"Content-Length: 0\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(ANSWERS))
async def test_lane_answers_as_the_full_path(
    scripted: tuple[ScriptedCluster, URL], lane: Served, full: URL, name: str
) -> None:
    """Byte for byte, headers in order: the lane's answer and the full path's are the same
    (but for bytes that are no UTF-8, which only the lane keeps)."""
    cluster, url = scripted
    cluster.scripts["/api/x"] = raw(ANSWERS[name].replace(b"{cluster}", str(url).encode()),
                                    keep=True)
    await warm(lane.url)
    before = lane.handled_by_aiohttp
    via_lane = await exchange(lane.url, get("/api/x"))
    assert lane.handled_by_aiohttp == before, "the lane did not take the request"
    via_full = await exchange(full, get("/api/x"))
    if name == "latin-1":
        # aiohttp's header writer drops what is no UTF-8; the lane passes the bytes on.
        assert b"\r\nX-Name: caf\r\n" in via_full
        via_full = via_full.replace(b"\r\nX-Name: caf\r\n", b"\r\nX-Name: caf\xe9\r\n")
    assert normalised(via_lane, lane.url) == normalised(via_full, full)
    assert b"\r\nX-Request-ID: fixed-id\r\n" in via_lane
    assert via_lane.lower().count(b"\r\nx-request-id:") == 1


async def test_lane_sends_what_the_full_path_sends(
    scripted: tuple[ScriptedCluster, URL], lane: Served, full: URL
) -> None:
    """The cluster gets the same request either way: hop-by-hop, cookies and the client's own
    Authorization dropped, the bearer token and the request id added."""
    cluster, _ = scripted
    await warm(lane.url)
    extra = ("Connection: keep-alive", "Cookie: a=b", "Authorization: Basic Zm9vOmJhcg==",
             "Accept: application/json", "X-Multi: 1", "x-multi: 2")
    await exchange(lane.url, get("/api/seen?q=%C3%A9", *extra))
    await exchange(full, get("/api/seen?q=%C3%A9", *extra))
    via_lane, via_full = cluster.api("/api/seen?q=%C3%A9")
    assert via_lane.headers == via_full.headers
    assert via_lane.headers["authorization"] == "Bearer scripted-access-token"
    assert via_lane.headers["x-request-id"] == "fixed-id"
    assert "cookie" not in via_lane.headers and via_lane.method == "GET"


@pytest.mark.parametrize("request_bytes", [
    b"POST /api/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\nhi",
    b"GET /api/x HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n",
    b"GET /api/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    b"GET /api/x HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://127.0.0.1\r\n\r\n",
    b"GET /-/healthy HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"GET /api/x HTTP/1.1\r\nHost: evil.example\r\n\r\n",
    b"GET /api/../x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"GET /api/x HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: 127.0.0.1\r\n\r\n",
], ids=["post", "http-1.0", "close", "origin", "ops", "foreign-host", "dot-segments",
        "two-hosts"])
async def test_other_requests_take_the_full_path(lane: Served, request_bytes: bytes) -> None:
    """Requests the lane does not take reach aiohttp whole, and get its answer."""
    await warm(lane.url)
    before = lane.handled_by_aiohttp
    reader, writer = await asyncio.open_connection(lane.url.host, lane.url.port)
    writer.write(request_bytes)
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert lane.handled_by_aiohttp == before + 1
    assert head.startswith(b"HTTP/1.")


def seen_headers(requests: list[Request]) -> list[dict[str, str]]:
    """What the cluster saw, ids the proxy made up masked (they differ by construction)."""
    return [{k: "<made>" if k == "x-request-id" and re.fullmatch("[0-9a-f]{24}", v) else v
             for k, v in r.headers.items()} for r in requests]


# Requests that the parsers of aiohttp (the full path) and httptools (the lane) may read
# differently: the lane must take none that aiohttp refuses, and send what aiohttp's path sends.
ODD_REQUESTS = {
    "repeated-user-agent": b"User-Agent: a\r\nUser-Agent: b\r\n",
    "repeated-content-type": b"Content-Type: a\r\nContent-Type: b\r\n",
    "repeated-max-forwards": b"Max-Forwards: 1\r\nMax-Forwards: 2\r\n",
    "repeated-host": b"host: 127.0.0.1\r\n",
    "websocket-key1": b"Sec-WebSocket-Key1: x\r\n",
    "cross-site-tab": b"Sec-Fetch-Site: cross-site\t\r\n",
    "id-with-spaces": b"X-Request-ID: \t abc \r\n",
    "nul-in-value": b"X-A: a\x00b\r\n",
    "control-in-value": b"X-A: a\x01b\r\n",
    "del-in-value": b"X-A: a\x7fb\r\n",
    "obs-text-value": b"X-A: caf\xe9\r\n",
    "obs-fold": b"X-A: a\r\n b\r\n",
    "space-before-colon": b"X-A : b\r\n",
    "empty-name": b": v\r\n",
    "non-ascii-name": b"X-\xe9: a\r\n",
    "repeated-authorization": b"Authorization: a\r\nAuthorization: b\r\n",
    "connection-close-too": b"Connection: Keep-Alive\r\nConnection: close\r\n",
    "proxy-connection": b"Proxy-Connection: close\r\n",
    "te-trailers": b"TE: trailers\r\n",
}
ODD_LINES = {
    "utf8-path": b"GET /api/caf\xc3\xa9 HTTP/1.1",
    "latin1-path": b"GET /api/caf\xe9 HTTP/1.1",
    "control-in-path": b"GET /api/a\x01b HTTP/1.1",
    "tab-in-path": b"GET /api/a\tb HTTP/1.1",
    "double-space": b"GET  /api/x HTTP/1.1",
    "absolute-form": b"GET http://127.0.0.1/api/x HTTP/1.1",
    "lower-case-version": b"GET /api/x http/1.1",
    "http-1.2": b"GET /api/x HTTP/1.2",
    "bad-percent": b"GET /api/%zz HTTP/1.1",
    "empty-query": b"GET /api/x? HTTP/1.1",
}


@pytest.mark.parametrize("request_bytes", [
    *(b"GET /api/x HTTP/1.1\r\nHost: 127.0.0.1\r\n" + extra + b"\r\n"
      for extra in ODD_REQUESTS.values()),
    *(line + b"\r\nHost: 127.0.0.1\r\n\r\n" for line in ODD_LINES.values()),
    b"GET /api/x HTTP/1.1\nHost: 127.0.0.1\n\n",
    b"\r\nGET /api/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"GET /api/x HTTP/1.1\r\nHost:\r\n\r\n",
], ids=[*ODD_REQUESTS, *ODD_LINES, "bare-lf", "leading-crlf", "empty-host"])
async def test_odd_requests_get_what_the_full_path_gives(
    scripted: tuple[ScriptedCluster, URL], lane: Served, full: URL, request_bytes: bytes
) -> None:
    """The same status, and the cluster sees the same headers (or nothing) either way."""
    cluster, _ = scripted
    await warm(lane.url)
    await warm(full)
    answers, seen = [], []
    for url in (lane.url, full):
        before = len(cluster.api("/api/x"))
        answers.append((await exchange(url, request_bytes)).split(b"\r\n")[0])
        seen.append(seen_headers(cluster.api("/api/x")[before:]))
    assert answers[0] == answers[1]
    assert seen[0] == seen[1]


async def closes_after_answer(url: URL, request: bytes) -> bool:
    """Whether the proxy closes the connection once it has answered `request`."""
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
        await reader.readexactly(int(length.group(1)) if length else 0)
        try:
            return await asyncio.wait_for(reader.read(1), 0.5) == b""
        except TimeoutError:
            return False
    finally:
        writer.close()


@pytest.mark.parametrize("extra", [
    b"", b"Connection: keep-alive\r\n", b"Connection: close\r\n",
    b"Proxy-Connection: close\r\n", b"Proxy-Connection: keep-alive\r\n",
    b"Connection: keep-alive\r\nConnection: close\r\n",
], ids=["none", "keep-alive", "close", "proxy-close", "proxy-keep-alive", "both"])
async def test_the_connection_stays_open_as_the_full_path_leaves_it(
    scripted: tuple[ScriptedCluster, URL], lane: Served, full: URL, extra: bytes
) -> None:
    request = b"GET /api/x HTTP/1.1\r\nHost: 127.0.0.1\r\n" + extra + b"\r\n"
    await warm(lane.url)
    await warm(full)
    assert await closes_after_answer(lane.url, request) == \
        await closes_after_answer(full, request)


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GET /api/x HTTP/1.1\r\nHost: 127.0.0.1\r\nSec-Fetch-Site: cross-site \r\n\r\n", 403),
    (b"GET /api/x HTTP/1.1\r\nHost: evil.example  \r\n\r\n", 403),
    (b"GET /api/%2e%2e/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    (b"GET //evil.example/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    (b"GET /api/x HTTP/1.1\r\n\r\n", 400),
], ids=["cross-site-with-space", "foreign-host-with-space", "encoded-dots", "host-in-path",
        "no-host"])
async def test_what_the_guard_refuses_never_reaches_the_cluster(
    scripted: tuple[ScriptedCluster, URL], lane: Served, request_bytes: bytes, status: int
) -> None:
    """Header values are judged as aiohttp's parser hands them over (trailing spaces gone):
    the guard's refusal, and the cluster sees nothing."""
    cluster, _ = scripted
    await warm(lane.url)
    seen = len(cluster.api())
    answer = await exchange(lane.url, request_bytes)
    assert answer.split(b"\r\n")[0].split(b" ")[1] == b"%d" % status, answer[:200]
    assert len(cluster.api()) == seen


async def test_the_lane_opens_again_after_the_full_path(
    scripted: tuple[ScriptedCluster, URL], lane: Served
) -> None:
    """A request the lane leaves to aiohttp does not close it for the next on the connection."""
    await warm(lane.url)
    before = lane.handled_by_aiohttp
    reader, writer = await asyncio.open_connection(lane.url.host, lane.url.port)
    try:
        for request in (get("/api/x", "Origin: http://127.0.0.1"), get("/api/x"), get("/api/x")):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            await reader.readexactly(2)
    finally:
        writer.close()
    assert lane.handled_by_aiohttp == before + 1


async def test_a_request_left_to_aiohttp_takes_the_connection_readied_for_it(
    scripted: tuple[ScriptedCluster, URL], lane: Served
) -> None:
    """One GET more at once than there are idle connections: the lane leaves it to aiohttp,
    whose path takes the connection the miss opened (one connection more, not two); then as
    many GETs at once all take the lane."""
    cluster, _ = scripted
    pool = lane.runner.app[POOL]
    await warm(lane.url)
    await until(lambda: pool._spare is None)
    together = len(pool._idle) + 1
    waiting: list[asyncio.Event] = []

    async def held(request: Request, writer: asyncio.StreamWriter) -> bool:
        arrived = asyncio.Event()
        waiting.append(arrived)
        if len(waiting) == together:  # the last of a round to arrive lets the round go
            for event in waiting:
                event.set()
            waiting.clear()
        await arrived.wait()
        return await ok()(request, writer)

    async def round_of_gets() -> None:
        answers = await asyncio.wait_for(asyncio.gather(
            *(exchange(lane.url, get("/api/held")) for _ in range(together))), 10)
        assert all(a.startswith(b"HTTP/1.1 200") for a in answers)

    cluster.scripts["/api/held"] = held
    before, connections = lane.handled_by_aiohttp, cluster.connections
    await round_of_gets()
    assert lane.handled_by_aiohttp == before + 1
    await until(lambda: pool._spare is None)
    assert cluster.connections == connections + 1
    assert len({r.connection for r in cluster.api("/api/held")}) == together
    await round_of_gets()
    assert lane.handled_by_aiohttp == before + 1
    assert len({r.connection for r in cluster.api("/api/held")}) == together


async def test_pipelined_requests_are_answered_in_order(
    scripted: tuple[ScriptedCluster, URL], lane: Served
) -> None:
    """Two requests in one write, then one sent while the first is under way: three answers,
    in order, on one connection."""
    cluster, _ = scripted
    for n in (1, 2, 3):
        cluster.scripts[f"/api/{n}"] = ok(f"answer {n}".encode())
    await warm(lane.url)
    both = await exchange(lane.url, get("/api/1") + get("/api/2"), answers=2)
    assert both.index(b"answer 1") < both.index(b"answer 2")

    release = asyncio.Event()

    async def held(request: Request, writer: asyncio.StreamWriter) -> bool:
        await release.wait()
        return await ok(b"answer 1")(request, writer)

    cluster.scripts["/api/1"] = held
    answers = await second_while_first_held(lane.url, "/api/1", "/api/3", release)
    assert answers.index(b"answer 1") < answers.index(b"answer 3")


async def second_while_first_held(url: URL, first: str, second: str,
                                  release: asyncio.Event) -> bytes:
    """GET `first`, then `second` on the same connection while the cluster holds the first
    answer until `release`; both answers (8-byte bodies) as they arrived."""
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(get(first))
        await asyncio.sleep(0.1)
        writer.write(get(second))
        await asyncio.sleep(0.1)
        release.set()
        answers = b""
        for _ in range(2):
            answers += await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            answers += await reader.readexactly(8)
        return answers
    finally:
        writer.close()


# --- what the lane hands over ---------------------------------------------------------------------


async def test_a_401_is_refreshed_and_sent_once_more(
    scripted: tuple[ScriptedCluster, URL], lane: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """The lane hands the 401 over: one token refresh, one more send with the new token, the
    same request id throughout, and an access line saying so."""
    caplog.set_level(logging.INFO, logger="squirro_proxy.access")
    cluster, _ = scripted
    await warm(lane.url)
    tokens_before = len([r for r in cluster.requests if r.path == TOKEN_PATH])

    async def rotate(request: Request, writer: asyncio.StreamWriter) -> bool:
        if request.headers["authorization"] == "Bearer scripted-access-token":
            cluster.access_token = "second-token"
            writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
            return True
        return await ok(b"second")(request, writer)

    cluster.scripts["/api/rotating"] = rotate
    answer = await exchange(lane.url, get("/api/rotating"))
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"second")
    seen = cluster.api("/api/rotating")
    assert [r.headers["authorization"] for r in seen] == [
        "Bearer scripted-access-token", "Bearer second-token"]
    assert {r.headers["x-request-id"] for r in seen} == {"fixed-id"}
    assert len([r for r in cluster.requests if r.path == TOKEN_PATH]) == tokens_before + 1
    [line] = [r for r in caplog.records if "/api/rotating" in r.getMessage()]
    assert "retried-after-401" in line.getMessage() and "id=fixed-id" in line.getMessage()


@pytest.mark.parametrize("kind", ["large", "chunked", "until-close", "no-content"])
async def test_answers_the_lane_does_not_relay_arrive_whole(
    scripted: tuple[ScriptedCluster, URL], lane: Served, kind: str
) -> None:
    """Larger than the lane relays, chunked, delimited by the close, or 204: handed over to
    the full path, which streams them (the cluster saw one request)."""
    cluster, _ = scripted
    body = pattern(HIGH_WATER + 1000)
    scripts = {
        "large": raw(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body),
                     keep=True),
        "chunked": raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", keep=True),
        "until-close": raw(b"HTTP/1.1 200 OK\r\n\r\nto the end"),
        "no-content": raw(b"HTTP/1.1 204 No Content\r\n\r\n", keep=True),
    }
    expected = {"large": body, "chunked": b"hello world", "until-close": b"to the end",
                "no-content": b""}
    cluster.scripts["/api/big"] = scripts[kind]
    await warm(lane.url)
    async with aiohttp.ClientSession() as client, client.get(lane.url / "api/big") as resp:
        assert await resp.read() == expected[kind]
        assert resp.headers["X-Request-ID"]
    assert len(cluster.api("/api/big")) == 1


async def test_a_failure_before_the_answer_gets_the_full_paths_error(
    scripted: tuple[ScriptedCluster, URL], lane: Served
) -> None:
    """The cluster hangs up without a byte: as on the full path, the GET is sent once more on a
    new connection (the pooled one may have gone stale), then 502 with the JSON body and the id
    the cluster got."""
    cluster, _ = scripted
    cluster.scripts["/api/drop"] = raw(b"")
    await warm(lane.url)
    answer = await exchange(lane.url, get("/api/drop"))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502")
    assert json.loads(body)["error"] == "cluster_connection_failed"
    assert b"\r\nX-Request-ID: fixed-id" in head
    first, second = cluster.api("/api/drop")
    assert first.connection != second.connection and second.nth == 1


async def test_a_broken_off_body_is_not_passed_off_as_whole(
    scripted: tuple[ScriptedCluster, URL], lane: Served
) -> None:
    """The cluster closes after half its announced body: the client's connection is dropped,
    so it cannot take the half for the whole."""
    cluster, _ = scripted
    cluster.scripts["/api/half"] = raw(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
    await warm(lane.url)
    reader, writer = await asyncio.open_connection(lane.url.host, lane.url.port)
    writer.write(get("/api/half"))
    received = b""
    with contextlib.suppress(ConnectionResetError):  # an abort may come as a reset
        while chunk := await asyncio.wait_for(reader.read(65536), 5):
            received += chunk
    writer.close()
    assert len(received.partition(b"\r\n\r\n")[2]) < 10


async def test_a_client_leaving_is_logged_and_frees_the_connection(
    scripted: tuple[ScriptedCluster, URL], caplog: pytest.LogCaptureFixture
) -> None:
    """499 in the access log, counted as client_closed, and the pool slot back (pool of 1)."""
    caplog.set_level(logging.INFO, logger="squirro_proxy.access")
    cluster, url = scripted
    served = await serve(url, pool_size=1)
    proxy, runner = served.url, served.runner
    try:
        arrived = asyncio.Event()
        never = asyncio.Event()

        async def held(request: Request, writer: asyncio.StreamWriter) -> bool:
            arrived.set()
            await never.wait()
            return False

        cluster.scripts["/api/held"] = held
        await warm(proxy)
        _, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(get("/api/held"))
        await asyncio.wait_for(arrived.wait(), 5)
        writer.close()
        answer = await asyncio.wait_for(exchange(proxy, get("/api/after")), 5)
        assert answer.startswith(b"HTTP/1.1 200")
        lines = [r.getMessage() for r in caplog.records if r.name == "squirro_proxy.access"]
        assert any(" /api/held 499 " in m and "client-went-away" in m for m in lines), lines
        async with aiohttp.ClientSession() as client, \
                client.get(proxy / "-/metrics") as resp:
            text = await resp.text()
        assert re.search(r'squirro_proxy_requests_total\{method="GET",status_class='
                         r'"client_closed"\} 1\.0', text), text
    finally:
        await runner.cleanup()


async def test_lane_requests_are_counted_and_logged(
    scripted: tuple[ScriptedCluster, URL], lane: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """The metrics and the access log see the lane's requests as they see the full path's."""
    caplog.set_level(logging.INFO, logger="squirro_proxy.access")
    await warm(lane.url)
    before = lane.handled_by_aiohttp
    await exchange(lane.url, get("/api/x?token=hunter2"))
    assert lane.handled_by_aiohttp == before
    [line] = [r.getMessage() for r in caplog.records if "/api/x" in r.getMessage()]
    assert re.fullmatch(r"GET /api/x\?token=\*{8} 200 2B [\d.]+ms upstream=[\d.]+ms id=fixed-id",
                        line), line
    async with aiohttp.ClientSession() as client, client.get(lane.url / "-/metrics") as resp:
        text = await resp.text()
    # The two warm-up requests (the first takes the full path, to open a connection) and this.
    assert re.search(r'squirro_proxy_requests_total\{method="GET",status_class="2xx"\} 3\.0',
                     text), text


async def test_every_request_on_a_connection_counts_its_own_bytes(
    scripted: tuple[ScriptedCluster, URL], lane: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """Three answers on one kept-alive connection: each access line and the sent-bytes
    counter count each answer once."""
    caplog.set_level(logging.INFO, logger="squirro_proxy.access")
    cluster, _ = scripted
    cluster.scripts["/api/ten"] = ok(b"0123456789")
    await warm(lane.url)
    await exchange(lane.url, get("/api/ten"))
    reader, writer = await asyncio.open_connection(lane.url.host, lane.url.port)
    try:
        for _ in range(3):
            writer.write(get("/api/ten"))
            await reader.readuntil(b"\r\n\r\n")
            assert await reader.readexactly(10) == b"0123456789"
    finally:
        writer.close()
    lines = [r.getMessage() for r in caplog.records if "/api/ten" in r.getMessage()]
    assert len(lines) == 4 and all(" 200 10B " in line for line in lines), lines
    async with aiohttp.ClientSession() as client, client.get(lane.url / "-/metrics") as resp:
        text = await resp.text()
    # Two warm-up answers of 2 bytes, four of 10.
    assert re.search(r"^squirro_proxy_sent_bytes_total 44\.0$", text, re.MULTILINE), text


async def test_encoded_ops_paths_are_the_proxys_own(
    scripted: tuple[ScriptedCluster, URL], lane: Served
) -> None:
    """/%2D/metrics is /-/metrics to aiohttp's router: answered by the proxy, never
    forwarded (with the bearer token) to the cluster."""
    cluster, _ = scripted
    await warm(lane.url)
    seen = len(cluster.requests)
    head, _, body = (await exchange(lane.url, get("/%2D/metrics"))).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"squirro_proxy_requests_total" in body
    assert len(cluster.requests) == seen


@pytest.mark.parametrize(("grace", "delay"), [(2.0, 0.2), (1.0, 1.4)],
                         ids=["within-the-grace-period", "after-the-first-period"])
async def test_a_stop_lets_a_handed_over_answer_finish(
    scripted: tuple[ScriptedCluster, URL], grace: float, delay: float
) -> None:
    """A graceful stop while the lane waits for an answer it then hands over (chunked):
    aiohttp's path still relays it whole, also after the first grace period, as aiohttp gives
    a handler up to two."""
    cluster, url = scripted
    served = await serve(url, grace=grace)
    proxy, runner = served.url, served.runner
    arrived = asyncio.Event()

    async def late(request: Request, writer: asyncio.StreamWriter) -> bool:
        arrived.set()
        await asyncio.sleep(delay)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"4\r\nlate\r\n0\r\n\r\n")
        return True

    cluster.scripts["/api/late"] = late
    await warm(proxy)
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(get("/api/late"))
    await asyncio.wait_for(arrived.wait(), 5)
    stopping = asyncio.ensure_future(runner.cleanup())
    received = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(reader.read(65536), 5):
            received += chunk
    writer.close()
    await asyncio.wait_for(stopping, 5)
    assert received.startswith(b"HTTP/1.1 200") and received.endswith(b"4\r\nlate\r\n0\r\n\r\n")


async def test_shutdown_lets_a_lane_request_finish(
    scripted: tuple[ScriptedCluster, URL], lane: Served
) -> None:
    """A graceful stop waits for the answer under way in the lane, then closes."""
    cluster, _ = scripted
    arrived, release = asyncio.Event(), asyncio.Event()

    async def held(request: Request, writer: asyncio.StreamWriter) -> bool:
        arrived.set()
        await release.wait()
        return await ok(b"done")(request, writer)

    cluster.scripts["/api/held"] = held
    await warm(lane.url)
    call = asyncio.ensure_future(exchange(lane.url, get("/api/held")))
    await asyncio.wait_for(arrived.wait(), 5)
    stopping = asyncio.ensure_future(lane.runner.cleanup())
    await asyncio.sleep(0.2)
    assert not stopping.done()
    release.set()
    answer = await asyncio.wait_for(call, 5)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"done")
    await asyncio.wait_for(stopping, 5)


# --- the lane and aiohttp's loop on one connection --------------------------------------------


async def test_a_request_after_one_aiohttp_took_waits_its_turn(
    scripted: tuple[ScriptedCluster, URL], lane: Served
) -> None:
    """A GET arriving just after aiohttp took the one before it (its task not yet begun) is
    not taken by the lane: the answers keep the order of the requests."""
    cluster, _ = scripted

    async def slow(request: Request, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.3)
        return await ok(b"answer A")(request, writer)

    cluster.scripts["/api/slow"] = slow
    cluster.scripts["/api/fast"] = ok(b"answer B")
    await warm(lane.url)
    reader, writer = await asyncio.open_connection(lane.url.host, lane.url.port)
    try:
        port = writer.get_extra_info("sockname")[1]
        server = lane.runner.server
        assert isinstance(server, ProxyServer)

        def ours() -> list[ProxyRequestHandler]:
            return [h for h in server.connections if isinstance(h, ProxyRequestHandler)
                    and h.transport is not None
                    and h.transport.get_extra_info("peername")[1] == port]

        await until(lambda: bool(ours()))
        [handler] = ours()
        # What the loop does when A and B come in two reads on consecutive turns (Origin
        # sends A to aiohttp).
        handler.data_received(get("/api/slow", "Origin: http://127.0.0.1"))
        await asyncio.sleep(0)
        handler.data_received(get("/api/fast"))
        answers = b""
        for _ in range(2):
            answers += await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            answers += await reader.readexactly(8)
    finally:
        writer.close()
    assert answers.index(b"answer A") < answers.index(b"answer B")


async def test_bytes_after_an_answer_never_answer_the_next_request(
    scripted: tuple[ScriptedCluster, URL], lane: Served
) -> None:
    """The cluster sends a second, unasked answer after the first while the client's next
    request waits: that connection is dropped, and the next request gets its own answer."""
    cluster, _ = scripted
    release = asyncio.Event()

    async def held(request: Request, writer: asyncio.StreamWriter) -> bool:
        await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nanswer 1"
                     b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nforged!!")
        return True

    cluster.scripts["/api/1"] = held
    cluster.scripts["/api/2"] = ok(b"answer 2")
    await warm(lane.url)
    answers = await second_while_first_held(lane.url, "/api/1", "/api/2", release)
    assert b"forged" not in answers
    assert answers.index(b"answer 1") < answers.index(b"answer 2")


async def test_requests_behind_a_broken_off_answer_are_not_sent(
    scripted: tuple[ScriptedCluster, URL], lane: Served
) -> None:
    """Once the client's connection is dropped for a truncated answer, a request it had
    pipelined behind it is not sent to the cluster: nobody is left to answer."""
    cluster, _ = scripted
    release = asyncio.Event()

    async def half(request: Request, writer: asyncio.StreamWriter) -> bool:
        await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
        return False

    cluster.scripts["/api/half"] = half
    async with aiohttp.ClientSession() as client:  # several idle pooled connections
        for resp in await asyncio.gather(*(client.get(lane.url / "api/warm") for _ in range(4))):
            await resp.read()
            resp.release()
    reader, writer = await asyncio.open_connection(lane.url.host, lane.url.port)
    writer.write(get("/api/half"))
    await asyncio.sleep(0.1)
    writer.write(get("/api/2"))
    await asyncio.sleep(0.1)
    release.set()
    with contextlib.suppress(ConnectionError):
        while await asyncio.wait_for(reader.read(65536), 5):
            pass
    writer.close()
    assert cluster.api("/api/2") == []


async def test_a_status_line_with_control_characters_is_refused(
    scripted: tuple[ScriptedCluster, URL], lane: Served, full: URL
) -> None:
    """A reason phrase that would break the client's status line: 502 on either path."""
    cluster, _ = scripted
    cluster.scripts["/api/ctl"] = raw(b"HTTP/1.1 200 O\x01K\r\nContent-Length: 2\r\n\r\nok",
                                      keep=True)
    await warm(lane.url)
    for url in (lane.url, full):
        head, _, body = (await exchange(url, get("/api/ctl"))).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 502")
        assert json.loads(body)["error"] == "cluster_invalid_response"
