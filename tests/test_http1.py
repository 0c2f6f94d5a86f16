"""The forwarding client (proxy/http1.py) against a cluster that speaks raw bytes: connection
reuse, stale pooled connections, answers without a body, interim answers, bodies of unknown
length, broken and hostile answers, request bodies and the pool slot of a client that leaves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator

import aiohttp
import httpx
import pytest
from multidict import CIMultiDict
from yarl import URL

from proxy.http1 import AddrInfo, ClusterPool
from tests.conftest import StartProxy
from tests.helpers import closed_port, raw_exchange, unanswered_port, until
from tests.scripted import Answer, Request, ScriptedCluster, ok, raw

ERROR_HEADER = "X-Squirro-Proxy-Error"


def pool_of(cluster: URL, *, limit: int) -> ClusterPool:
    return ClusterPool(cluster, limit=limit, connect_timeout=5, read_timeout=5, ssl_context=None)


async def get_ok(pool: ClusterPool) -> None:
    """GET /api/x through `pool`, its "ok" read, and the connection handed back."""
    answer = await pool.request("GET", "/api/x", CIMultiDict(), None)
    assert await answer.content.readany() == b"ok"
    answer.release()


# --- connections ---------------------------------------------------------------------------------


async def test_sequential_requests_share_one_connection(
    start_proxy: StartProxy, scripted: tuple[ScriptedCluster, URL], client: aiohttp.ClientSession,
) -> None:
    """Five requests one after the other reach the cluster on one kept-alive connection."""
    cluster, url = scripted
    proxy = await start_proxy(cluster=url)
    for _ in range(5):
        async with client.get(proxy.url / "api/x") as resp:
            assert resp.status == 200 and await resp.read() == b"ok"
    seen = cluster.api("/api/x")
    assert len(seen) == 5 and len({r.connection for r in seen}) == 1
    assert [r.nth for r in seen] == [1, 2, 3, 4, 5]
    assert seen[0].headers["authorization"] == "Bearer scripted-access-token"
    assert seen[0].headers["host"] == f"127.0.0.1:{url.port}"


def closes_on_second_request(then: Answer) -> Answer:
    """Answers the first request of a connection; closes at the second without a byte, as a
    server does whose keep-alive timeout ran out just as the request arrived."""
    async def answer(request: Request, writer: asyncio.StreamWriter) -> bool:
        if request.nth > 1:
            return False
        return await then(request, writer)
    return answer


async def test_stale_pooled_connection_is_retried_for_get(
    start_proxy: StartProxy, scripted: tuple[ScriptedCluster, URL], client: aiohttp.ClientSession,
) -> None:
    """A pooled connection the cluster closes without answering: a GET is sent once more, on a
    new connection, and the client never sees the failure."""
    cluster, url = scripted
    cluster.scripts["/api/flaky"] = closes_on_second_request(ok())
    proxy = await start_proxy(cluster=url)
    for _ in range(2):
        async with client.get(proxy.url / "api/flaky") as resp:
            assert resp.status == 200 and await resp.read() == b"ok"
    seen = cluster.api("/api/flaky")
    assert [(r.connection, r.nth) for r in seen] == [
        (seen[0].connection, 1), (seen[0].connection, 2), (seen[2].connection, 1)]
    assert seen[2].connection != seen[0].connection


async def test_stale_retry_takes_a_new_connection(
    start_proxy: StartProxy, scripted: tuple[ScriptedCluster, URL], client: aiohttp.ClientSession,
) -> None:
    """Two pooled connections, both closed by the cluster (as by a restart): the retry opens a
    new connection rather than trying the other stale one."""
    cluster, url = scripted
    both_in = asyncio.Event()
    answered = 0

    async def in_pairs(request: Request, writer: asyncio.StreamWriter) -> bool:
        nonlocal answered
        if request.nth > 1:
            return False
        answered += 1
        if answered == 2:
            both_in.set()
        await both_in.wait()  # two requests at once: two connections in the pool
        return await ok()(request, writer)

    cluster.scripts["/api/flaky"] = in_pairs
    proxy = await start_proxy(cluster=url)
    first = await asyncio.gather(*(client.get(proxy.url / "api/flaky") for _ in range(2)))
    assert [r.status for r in first] == [200, 200]
    for r in first:
        r.release()
    async with client.get(proxy.url / "api/flaky") as resp:
        assert resp.status == 200
    seen = cluster.api("/api/flaky")
    assert len({r.connection for r in seen}) == 3 and seen[-1].nth == 1


async def test_stale_pooled_connection_is_not_retried_for_post(
    start_proxy: StartProxy, scripted: tuple[ScriptedCluster, URL], client: aiohttp.ClientSession,
) -> None:
    """The same for a POST, which may have done its work: 502, and the cluster saw it once."""
    cluster, url = scripted
    cluster.scripts["/api/flaky"] = closes_on_second_request(ok())
    proxy = await start_proxy(cluster=url)
    async with client.post(proxy.url / "api/flaky") as resp:
        assert resp.status == 200
    async with client.post(proxy.url / "api/flaky") as resp:
        assert resp.status == 502
        assert resp.headers[ERROR_HEADER] == "cluster_connection_failed"
    assert len(cluster.api("/api/flaky")) == 2
    # A body-less POST carries Content-Length: 0, as aiohttp's client sent it.
    assert cluster.api("/api/flaky")[0].headers["content-length"] == "0"


async def test_client_leaving_frees_the_pool_slot(
    start_proxy: StartProxy, scripted: tuple[ScriptedCluster, URL], client: aiohttp.ClientSession,
) -> None:
    """--pool-size 1: a client that gives up on a silent cluster frees the one connection."""
    cluster, url = scripted
    hanging = asyncio.Event()

    async def never(_: Request, __: asyncio.StreamWriter) -> bool:
        hanging.set()
        await asyncio.Event().wait()
        return False

    cluster.scripts["/api/hang"] = never
    proxy = await start_proxy(cluster=url, pool_size=1, connect_timeout=2)
    with pytest.raises(TimeoutError):
        async with client.get(proxy.url / "api/hang", timeout=aiohttp.ClientTimeout(total=0.5)):
            pass
    assert hanging.is_set()
    for _ in range(3):
        async with client.get(proxy.url / "api/x") as resp:
            assert resp.status == 200


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokGARBAGE",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n"
    b"SMUGGLED",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Len",
], ids=["garbage", "second-answer", "second-answer-after-chunks", "half-a-second-answer"])
async def test_unasked_bytes_after_an_answer_spoil_only_the_connection(
    answer: bytes, start_proxy: StartProxy, scripted: tuple[ScriptedCluster, URL],
    client: aiohttp.ClientSession,
) -> None:
    """Bytes after the end of an answer, even a whole second answer: the answer is relayed
    exactly, and the connection is never used again (not even for a POST, which is never sent
    twice)."""
    cluster, url = scripted
    cluster.scripts["/api/extra"] = raw(answer, keep=True)
    proxy = await start_proxy(cluster=url)
    async with client.get(proxy.url / "api/extra") as resp:
        assert resp.status == 200 and await resp.read() == b"ok"
    async with client.post(proxy.url / "api/x") as resp:
        assert resp.status == 200 and await resp.read() == b"ok"
    assert cluster.api("/api/x")[0].connection != cluster.api("/api/extra")[0].connection


# --- answers without a body, interim answers, bodies of unknown length -------------------------


async def test_head_answer_keeps_its_length_and_sends_no_body(
    start_proxy: StartProxy, scripted: tuple[ScriptedCluster, URL],
) -> None:
    """HEAD: the cluster's Content-Length reaches the client, no body follows, and the next
    request on the same client connection is answered."""
    cluster, url = scripted
    cluster.scripts["/api/file"] = raw(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nContent-Type: text/plain\r\n\r\n", keep=True)
    proxy = await start_proxy(cluster=url)
    async with httpx.AsyncClient() as http:
        head = await http.head(str(proxy.url / "api/file"))
        after = await http.get(str(proxy.url / "api/x"))
    assert head.status_code == 200 and head.headers["content-length"] == "1000"
    assert head.content == b""
    assert after.status_code == 200 and after.content == b"ok"


@pytest.mark.parametrize("status", [204, 304])
async def test_answers_without_body_keep_the_connection(
    status: int, start_proxy: StartProxy, scripted: tuple[ScriptedCluster, URL],
    client: aiohttp.ClientSession,
) -> None:
    """204 and 304 end at their head; the connection serves the next request."""
    cluster, url = scripted
    cluster.scripts["/api/empty"] = raw(b"HTTP/1.1 %d Nothing\r\nETag: \"v1\"\r\n\r\n" % status,
                                        keep=True)
    proxy = await start_proxy(cluster=url)
    async with client.get(proxy.url / "api/empty") as resp:
        assert resp.status == status and resp.headers["ETag"] == '"v1"'
        assert await resp.read() == b""
    async with client.get(proxy.url / "api/x") as resp:
        assert await resp.read() == b"ok"
    assert cluster.api("/api/x")[0].connection == cluster.api("/api/empty")[0].connection


async def test_interim_answers_are_skipped(
    start_proxy: StartProxy, scripted: tuple[ScriptedCluster, URL], client: aiohttp.ClientSession,
) -> None:
    """100 Continue and 103 Early Hints before the answer: the client gets the final answer."""
    cluster, url = scripted
    cluster.scripts["/api/hints"] = raw(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\nX-Final: yes\r\n\r\ndone", keep=True)
    proxy = await start_proxy(cluster=url)
    async with client.get(proxy.url / "api/hints") as resp:
        assert resp.status == 201 and resp.headers["X-Final"] == "yes"
        assert "Link" not in resp.headers
        assert await resp.read() == b"done"


async def test_body_until_the_connection_closes(
    start_proxy: StartProxy, scripted: tuple[ScriptedCluster, URL], client: aiohttp.ClientSession,
) -> None:
    """An answer with neither Content-Length nor chunking ends when the cluster closes."""
    cluster, url = scripted
    body = b"x" * 300_000

    async def until_close(_: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        for start in range(0, len(body), 65536):
            writer.write(body[start:start + 65536])
            await writer.drain()
        return False

    cluster.scripts["/api/eof"] = until_close
    proxy = await start_proxy(cluster=url)
    async with client.get(proxy.url / "api/eof") as resp:
        assert resp.status == 200 and await resp.read() == body


async def test_chunked_answer_is_relayed(
    start_proxy: StartProxy, scripted: tuple[ScriptedCluster, URL], client: aiohttp.ClientSession,
) -> None:
    """A chunked answer arrives whole, and its connection is reused."""
    cluster, url = scripted
    cluster.scripts["/api/chunks"] = raw(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", keep=True)
    proxy = await start_proxy(cluster=url)
    async with client.get(proxy.url / "api/chunks") as resp:
        assert await resp.read() == b"hello world"
    async with client.get(proxy.url / "api/x") as resp:
        assert await resp.read() == b"ok"
    assert cluster.api("/api/x")[0].connection == cluster.api("/api/chunks")[0].connection


# --- broken and hostile answers ------------------------------------------------------------------


@pytest.mark.parametrize(("answer", "detail"), [
    (b"NOT HTTP AT ALL\r\n\r\n", ""),
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\nContent-Length: 0\r\n\r\n",
     "header field is larger than 64 KiB"),
    (b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(300)) + b"\r\n",
     "more than 256 header fields"),
    # Fields are counted as they come, not once the head is whole (which this one never is):
    # tens of thousands of them would cost a second of joining the values of one it reads.
    (b"HTTP/1.1 200 OK\r\n" + b"date:x\r\n" * 300, "more than 256 header fields"),
    # A large field is refused once the next begins, before the rest of the head (which never
    # comes).
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\nX-Next: 1\r\n",
     "header field is larger than"),
    (b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: %b\r\n" % (i, b"v" * 2000) for i in range(200)),
     "head is larger than 256 KiB"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nok", ""),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", ""),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
     "switched protocols"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\nzzz",
     "transfer coding 'gzip'"),
], ids=["garbage", "huge-field", "many-fields", "many-noted-fields", "huge-field-unfinished-head",
        "huge-head", "length-and-chunked",
        "two-lengths", "unasked-101", "gzip-transfer-coding"])
async def test_invalid_answer_gives_502(
    answer: bytes, detail: str, start_proxy: StartProxy, scripted: tuple[ScriptedCluster, URL],
    client: aiohttp.ClientSession,
) -> None:
    """An answer that is not HTTP/1.1 the proxy can relay: 502 cluster_invalid_response."""
    cluster, url = scripted
    cluster.scripts["/api/bad"] = raw(answer)
    proxy = await start_proxy(cluster=url)
    async with client.get(proxy.url / "api/bad") as resp:
        assert resp.status == 502
        assert resp.headers[ERROR_HEADER] == "cluster_invalid_response"
        error = await resp.json()
    assert detail in error["detail"] and "valid HTTP/1.1" in error["detail"]
    async with client.get(proxy.url / "api/x") as resp:  # the next request is not affected
        assert resp.status == 200


async def test_head_split_across_reads_before_a_large_body(
    start_proxy: StartProxy, scripted: tuple[ScriptedCluster, URL], client: aiohttp.ClientSession,
) -> None:
    """A head that arrives in two pieces, the second with a large part of the body: the head
    limit counts the head, not the body."""
    cluster, url = scripted
    body = b"z" * 1_000_000

    async def split(_: Request, writer: asyncio.StreamWriter) -> bool:
        # 180 KiB of head first (within the 256 KiB limit), then the rest with the body.
        writer.write(b"HTTP/1.1 200 OK\r\n" + b"".join(
            b"X-Pad-%d: %b\r\n" % (i, b"p" * 3072) for i in range(60)) + b"X-Last: 1")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        return True

    cluster.scripts["/api/split"] = split
    proxy = await start_proxy(cluster=url)
    async with client.get(proxy.url / "api/split") as resp:
        assert resp.status == 200 and await resp.read() == body


async def test_endless_trailer_drops_the_client(
    start_proxy: StartProxy, scripted: tuple[ScriptedCluster, URL], client: aiohttp.ClientSession,
) -> None:
    """A chunked answer whose trailer never ends: cut at the head limit (the client's connection
    is dropped at once), not buffered while the cluster keeps sending."""
    cluster, url = scripted

    async def endless(_: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n"
                     b"0\r\nX-Trailer: ")
        with contextlib.suppress(ConnectionError):
            for _ in range(64):  # 4 MiB, far beyond the 256 KiB limit
                writer.write(b"t" * 65536)
                await writer.drain()
            await asyncio.Event().wait()  # and the connection stays open
        return False

    cluster.scripts["/api/trailer"] = endless
    proxy = await start_proxy(cluster=url)
    async with client.get(proxy.url / "api/trailer") as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(resp.read(), 10)


async def test_broken_chunk_framing_mid_body_drops_the_client(
    start_proxy: StartProxy, scripted: tuple[ScriptedCluster, URL], client: aiohttp.ClientSession,
) -> None:
    """Bad chunk framing after the head: the client's connection is dropped, not ended cleanly
    with a body that looks complete."""
    cluster, url = scripted
    cluster.scripts["/api/badchunk"] = raw(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZZ\r\n")
    proxy = await start_proxy(cluster=url)
    async with client.get(proxy.url / "api/badchunk") as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_access_token_with_a_line_break_is_refused(
    start_proxy: StartProxy, scripted: tuple[ScriptedCluster, URL], client: aiohttp.ClientSession,
) -> None:
    """A token endpoint handing out a token with CR LF cannot add headers to requests: the
    token is refused (503) and nothing reaches the API."""
    cluster, url = scripted
    cluster.access_token = "abc\r\nX-Injected: yes"
    proxy = await start_proxy(cluster=url, wait_token=False)
    async with client.get(proxy.url / "api/x") as resp:
        assert resp.status == 503
        assert resp.headers[ERROR_HEADER] == "token_unavailable"
        assert "visible ASCII" in (await resp.json())["detail"]
    assert cluster.api() == []


# --- request bodies ------------------------------------------------------------------------------


async def test_request_bodies_reach_the_cluster_framed_as_sent(
    start_proxy: StartProxy, scripted: tuple[ScriptedCluster, URL],
) -> None:
    """A body with a length goes with that length; a chunked one is sent chunked; both whole."""
    cluster, url = scripted
    proxy = await start_proxy(cluster=url)
    sized = bytes(range(256)) * 4000

    async def pieces() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"piece-" * 1000

    async with httpx.AsyncClient() as http:
        first = await http.put(str(proxy.url / "api/sized"), content=sized)
        second = await http.post(str(proxy.url / "api/streamed"), content=pieces())
    assert first.status_code == second.status_code == 200
    got_sized, got_streamed = cluster.api("/api/sized")[0], cluster.api("/api/streamed")[0]
    assert got_sized.body == sized and got_sized.headers["content-length"] == str(len(sized))
    assert "transfer-encoding" not in got_sized.headers
    assert got_streamed.body == b"piece-" * 10_000
    assert got_streamed.headers["transfer-encoding"] == "chunked"


async def test_answer_before_the_upload_ends(
    start_proxy: StartProxy, scripted: tuple[ScriptedCluster, URL],
) -> None:
    """A cluster that refuses an upload at once (413), without reading it, is relayed while the
    client still sends; that connection is not reused."""
    cluster, url = scripted
    cluster.answer_before_body.add("/api/upload")
    cluster.scripts["/api/upload"] = raw(
        b"HTTP/1.1 413 Too Large\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbig")
    proxy = await start_proxy(cluster=url)
    body = b"y" * 200_000
    reply = await raw_exchange(proxy.url, (
        b"POST /api/upload HTTP/1.1\r\nHost: %b\r\nContent-Length: %d\r\nConnection: close\r\n"
        b"\r\n%b" % (f"127.0.0.1:{proxy.url.port}".encode(), len(body), body)))
    assert reply.startswith(b"HTTP/1.1 413") and reply.endswith(b"big")
    async with httpx.AsyncClient() as http:
        assert (await http.get(str(proxy.url / "api/x"))).status_code == 200
    assert cluster.api("/api/x")[0].connection != cluster.api("/api/upload")[0].connection


async def test_client_leaving_during_the_refresh_after_a_401_frees_the_connection(
    start_proxy: StartProxy, scripted: tuple[ScriptedCluster, URL], client: aiohttp.ClientSession,
) -> None:
    """--pool-size 1: an upload too large to replay gets a 401; the client leaves while the
    token is refreshed; the one connection is free again for the next request."""
    cluster, url = scripted
    refreshing = asyncio.Event()

    async def refuse(_: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
        return True

    cluster.scripts["/api/upload"] = refuse
    proxy = await start_proxy(cluster=url, pool_size=1, retry_body_limit=1000, connect_timeout=1)
    cluster.token_delay = 1.0
    cluster.on_token = refreshing.set
    upload = asyncio.ensure_future(client.post(proxy.url / "api/upload", data=b"b" * 5000))
    await asyncio.wait_for(refreshing.wait(), 5)
    upload.cancel()  # the client leaves during the refresh
    with contextlib.suppress(asyncio.CancelledError):
        await upload
    cluster.token_delay = 0.0
    async with client.get(proxy.url / "api/x") as resp:
        assert resp.status == 200


async def test_malformed_request_body_gets_400_and_no_complete_request(
    start_proxy: StartProxy, scripted: tuple[ScriptedCluster, URL],
) -> None:
    """A chunked upload whose framing breaks: 400 from the proxy, and the cluster never gets
    a request it could take as complete."""
    cluster, url = scripted
    proxy = await start_proxy(cluster=url, read_timeout=5)
    reader, writer = await asyncio.open_connection(proxy.url.host, proxy.url.port)
    writer.write(b"POST /api/x HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                 b"\r\n5\r\nhello\r\n")
    await writer.drain()
    await asyncio.sleep(0.2)  # the body is on its way to the cluster
    writer.write(b"ZZZ\r\n")  # not a chunk size
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    assert reply.startswith(b"HTTP/1.1 400")
    assert cluster.api() == []


async def test_requests_that_gave_up_waiting_leave_no_trace_in_the_pool(
    scripted: tuple[ScriptedCluster, URL],
) -> None:
    """A full pool: requests that time out waiting for a connection leave nothing behind."""
    cluster, url = scripted
    held = asyncio.Event()

    async def hold(_: Request, writer: asyncio.StreamWriter) -> bool:
        await held.wait()
        return await ok()(_, writer)

    cluster.scripts["/api/held"] = hold
    pool = ClusterPool(url, limit=1, connect_timeout=0.05, read_timeout=5, ssl_context=None)
    first = asyncio.ensure_future(pool.request("GET", "/api/held", CIMultiDict(), None))
    await asyncio.sleep(0.05)
    for _ in range(20):
        with pytest.raises(aiohttp.ConnectionTimeoutError):
            await pool.request("GET", "/api/x", CIMultiDict(), None)
    assert len(pool._waiters) == 0
    held.set()
    answer = await first
    assert await answer.content.readany() == b"ok"
    answer.release()
    await get_ok(pool)
    await pool.close()


async def test_no_idle_connection_readies_one_for_the_next_take(
    scripted: tuple[ScriptedCluster, URL],
) -> None:
    """take_idle() cannot wait: finding none idle, it opens one in the background, which the
    next request finds; a request sent on it is the connection's first."""
    cluster, url = scripted
    pool = pool_of(url, limit=4)
    try:
        assert pool.take_idle() is None
        assert pool.take_idle() is None  # one at a time: still the one under way
        await until(lambda: cluster.connections == 1 and pool._spare is None)
        await get_ok(pool)
        assert cluster.connections == 1
        assert [(r.connection, r.nth) for r in cluster.api()] == [(1, 1)]
    finally:
        await pool.close()


async def test_the_pool_grows_when_a_connection_freed_in_time_served_the_miss(
    scripted: tuple[ScriptedCluster, URL],
) -> None:
    """The express lane's miss, then the full path finding a connection freed in between (as
    under steady load): the spare still joins the pool, which so grows to what the load needs
    (without it, it stayed smaller than the load and kept the misses coming)."""
    cluster, url = scripted
    pool = pool_of(url, limit=4)
    try:
        first = await pool.request("GET", "/api/x", CIMultiDict(), None)
        assert pool.take_idle() is None  # the one connection is busy: a spare is opened
        assert await first.content.readany() == b"ok"
        first.release()
        await get_ok(pool)  # the freed one
        await until(lambda: pool._spare is None)
        assert cluster.connections == 2
        assert [(r.connection, r.nth) for r in cluster.api()] == [(1, 1), (1, 2)]
        taken = [pool.take_idle(), pool.take_idle()]
        assert None not in taken
        for conn in taken:
            assert conn is not None
            conn.finish(reuse=False)
    finally:
        await pool.close()


async def test_a_request_waits_for_the_spare_rather_than_open_another(
    scripted: tuple[ScriptedCluster, URL],
) -> None:
    """A spare under way when a request finds nothing idle: the request takes it, and the
    connections stay within the limit (one, here)."""
    cluster, url = scripted
    pool = pool_of(url, limit=1)
    try:
        assert pool.take_idle() is None  # the spare is on its way
        await get_ok(pool)
        assert cluster.connections == 1
    finally:
        await pool.close()


async def test_only_the_first_request_waits_for_the_spare(
    scripted: tuple[ScriptedCluster, URL],
) -> None:
    """Two requests find nothing idle while a spare is under way: one takes the spare, the
    other opens its own at once; neither connection is lost."""
    cluster, url = scripted
    pool = pool_of(url, limit=3)
    try:
        assert pool.take_idle() is None
        answers = await asyncio.gather(
            *(pool.request("GET", "/api/x", CIMultiDict(), None) for _ in range(2)))
        for answer in answers:
            assert await answer.content.readany() == b"ok"
            answer.release()
        assert cluster.connections == 2
        assert len(pool._idle) == 2
    finally:
        await pool.close()


async def test_a_spare_that_came_for_a_cancelled_request_joins_the_pool(
    scripted: tuple[ScriptedCluster, URL],
) -> None:
    """The request that waited for the spare is cancelled just as it lands: the connection
    is not lost, the next request takes it."""
    cluster, url = scripted
    pool = pool_of(url, limit=2)
    try:
        assert pool.take_idle() is None
        spare = pool._spare
        assert spare is not None
        waiting = asyncio.ensure_future(pool.request("GET", "/api/x", CIMultiDict(), None))
        await asyncio.sleep(0)  # it waits for the spare now
        assert pool._spare_claimed
        spare.add_done_callback(lambda _: waiting.cancel())  # after the wait's own callback
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert spare.result() is not None and len(pool._idle) == 1 and pool._busy == 0
        await get_ok(pool)
        assert cluster.connections == 1
    finally:
        await pool.close()


async def test_a_cluster_out_of_reach_is_not_tried_at_every_take() -> None:
    """A spare connection that fails to connect waits SPARE_BACKOFF before the next try."""
    pool = ClusterPool(URL(f"http://127.0.0.1:{closed_port()}"), limit=4,
                       connect_timeout=5, read_timeout=5, ssl_context=None)
    try:
        assert pool.take_idle() is None
        spare = pool._spare
        assert spare is not None
        await spare
        assert pool.take_idle() is None
        assert pool._spare is None  # not tried again so soon
    finally:
        await pool.close()


async def test_half_closed_cluster_with_upload_unsent_ends_the_answer(
    start_proxy: StartProxy, scripted: tuple[ScriptedCluster, URL],
) -> None:
    """A cluster that answers an upload early, half-closes and never reads the rest: the
    answer ends (it ran until the close) and the connection is freed, instead of waiting for
    the upload bytes to drain."""
    cluster, url = scripted
    cluster.answer_before_body.add("/api/up")

    async def refuse(_: Request, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.5)  # the upload fills the buffers first
        writer.write(b"HTTP/1.1 413 Too Large\r\nConnection: close\r\n\r\nbig")
        await writer.drain()
        writer.write_eof()  # FIN, but the socket stays open and is never read again
        await asyncio.Event().wait()
        return False

    cluster.scripts["/api/up"] = refuse
    proxy = await start_proxy(cluster=url, pool_size=1, read_timeout=30)
    reader, writer = await asyncio.open_connection(proxy.url.host, proxy.url.port)
    size = 64 * 1024 * 1024
    writer.write(b"POST /api/up HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n"
                 b"Connection: close\r\n\r\n" % size)

    async def pump() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(size // 65536):
                writer.write(b"u" * 65536)
                await writer.drain()

    uploading = asyncio.ensure_future(pump())
    reply = await asyncio.wait_for(reader.read(), 10)
    uploading.cancel()
    writer.close()
    # Relayed whole: chunked to the client, since the cluster's answer ran until the close.
    assert reply.startswith(b"HTTP/1.1 413") and reply.endswith(b"3\r\nbig\r\n0\r\n\r\n")
    async with httpx.AsyncClient() as http:  # the one pooled connection is free again
        assert (await http.get(str(proxy.url / "api/x"), timeout=5)).status_code == 200


@pytest.mark.parametrize("host", [b"127.0.0.1", b"evil.example"], ids=["cluster-413", "guard-403"])
async def test_body_breaking_after_the_answer_logs_no_error(
    host: bytes, start_proxy: StartProxy, scripted: tuple[ScriptedCluster, URL],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A chunked body whose framing breaks after the request was answered without it (the
    cluster's early 413, the guard's refusal): the connection closes, and no error or traceback
    is logged for the client's mistake."""
    cluster, url = scripted
    cluster.answer_before_body.add("/api/up")
    cluster.scripts["/api/up"] = raw(b"HTTP/1.1 413 Too Large\r\nContent-Length: 3\r\n\r\nbig")
    proxy = await start_proxy(cluster=url)
    reader, writer = await asyncio.open_connection(proxy.url.host, proxy.url.port)
    writer.write(b"POST /api/up HTTP/1.1\r\nHost: %b\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"5\r\nhello\r\n" % host)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith((b"HTTP/1.1 413", b"HTTP/1.1 403"))
    await asyncio.sleep(0.2)  # aiohttp now lingers over the rest of the body
    writer.write(b"ZZZ\r\n")  # not a chunk size
    await writer.drain()
    await asyncio.wait_for(reader.read(), 5)  # the connection ends
    writer.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_an_address_that_does_not_answer_is_passed_by(
    scripted: tuple[ScriptedCluster, URL],
) -> None:
    """A cluster name with two addresses, the first dropping connection attempts (as a broken
    IPv6 route does): the second is tried after 250 ms, not after the connect timeout."""
    _, url = scripted

    class TwoAddresses(ClusterPool):
        async def _resolve(self) -> list[AddrInfo]:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", hung)),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", url.port))]

    with unanswered_port() as hung:
        pool = TwoAddresses(url, limit=2, connect_timeout=5, read_timeout=5, ssl_context=None)
        loop = asyncio.get_running_loop()
        started = loop.time()
        answer = await pool.request("GET", "/api/x", CIMultiDict(), None)
        took = loop.time() - started
        assert await answer.content.readany() == b"ok"
        answer.release()
        await pool.close()
    assert took < 2.5
