"""Streams: big bodies both ways, backpressure, SSE, timeouts, endings, fidelity, 401 replay."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import httpx
import pytest

from tests.conftest import Running, StartProxy
from tests.fakes import ENCODED_BODIES, FakeCluster, pattern
from tests.helpers import raw_exchange, until

MiB = 1024 * 1024
ERROR_HEADER = "X-Squirro-Proxy-Error"
# Socket buffers on both hops (loopback autotuning reaches a few MiB each) plus the proxy's own
# small buffers: anything under this means the stream stalled instead of piling up in memory.
STALL_BOUND = 48 * MiB


async def until_stalled(progress: Callable[[], int], quiet: float = 0.5,
                        timeout: float = 20.0) -> int:
    """Wait until a byte counter stops moving for `quiet` seconds; return where it stopped."""
    deadline = time.monotonic() + timeout
    last, last_change = progress(), time.monotonic()
    while time.monotonic() - last_change < quiet:
        if time.monotonic() > deadline:
            raise AssertionError(f"still moving after {timeout} s ({progress()} bytes)")
        await asyncio.sleep(0.02)
        if (now := progress()) != last:
            last, last_change = now, time.monotonic()
    return last


async def chunks(size: int, piece: int = 256 * 1024, seed: int = 0) -> AsyncIterator[bytes]:
    """`pattern(size, seed)` as an async stream, so aiohttp sends it chunked."""
    block = pattern(piece, seed)
    sent = 0
    while sent < size:
        part = block[: min(piece, size - sent)]
        sent += len(part)
        yield part


class CountedBody:
    """An upload that counts what the client has handed to its socket so far."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.produced = size, seed, 0

    async def stream(self) -> AsyncIterator[bytes]:
        async for part in chunks(self.size, seed=self.seed):
            self.produced += len(part)
            yield part


def pattern_sha256(size: int, seed: int = 0) -> str:
    return hashlib.sha256(pattern(size, seed)).hexdigest()


async def run(*argv: str) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out, err


# --- large bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_large_upload_byte_exact(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession, framing: str
) -> None:
    """A 64 MiB upload arrives byte-exact, with the client's framing (length or chunked)."""
    size = 64 * MiB + 123
    if framing == "content-length":
        body: object = io.BytesIO(pattern(size, seed=1))
    else:
        body = chunks(size, seed=1)
    async with client.post(proxy.url / "api/upload", data=body) as resp:
        assert resp.status == 200
        data = await resp.json()
    assert (data["body_size"], data["body_sha256"]) == (size, pattern_sha256(size, seed=1))
    names = {k.lower(): v for k, v in data["headers"]}
    if framing == "content-length":
        assert names["content-length"] == str(size) and "transfer-encoding" not in names
    else:
        assert names["transfer-encoding"] == "chunked" and "content-length" not in names


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "chunked"])
async def test_large_download_byte_exact(
    proxy: Running, client: aiohttp.ClientSession, length: bool
) -> None:
    """A 64 MiB download arrives byte-exact; Content-Length is kept when the cluster sent one."""
    size = 64 * MiB + 7
    query = {"size": str(size), "length": "1" if length else "0"}
    digest, received = hashlib.sha256(), 0
    async with client.get((proxy.url / "download").with_query(query)) as resp:
        assert resp.status == 200
        if length:
            assert resp.headers["Content-Length"] == str(size)
            assert "Transfer-Encoding" not in resp.headers
        else:
            assert resp.headers["Transfer-Encoding"] == "chunked"
            assert "Content-Length" not in resp.headers
        async for chunk in resp.content.iter_any():
            digest.update(chunk)
            received += len(chunk)
    assert received == size
    assert digest.hexdigest() == hashlib.sha256(pattern(size, seed=0)).hexdigest()


async def test_expect_100_continue_with_curl_does_not_stall(
    proxy: Running, cluster: FakeCluster, tmp_path: Path
) -> None:
    """curl's Expect: 100-continue upload (> 1 MiB) gets its 100 at once and arrives whole."""
    upload = tmp_path / "upload.bin"
    upload.write_bytes(pattern(5 * MiB, seed=2))
    # A long --expect100-timeout: had the proxy not answered 100, curl would wait 30 s and the
    # test would time out instead of passing by luck.
    code, out, err = await run(
        "curl", "-sS", "-v", "--expect100-timeout", "30", "-H", "Expect: 100-continue",
        "--data-binary", f"@{upload}", str(proxy.url / "api/upload"))
    assert code == 0, err
    assert b"< HTTP/1.1 100 Continue" in err
    data = json.loads(out)
    assert data["body_sha256"] == pattern_sha256(5 * MiB, seed=2)
    assert "expect" not in {k.lower() for k, _ in data["headers"]}


# --- backpressure ---------------------------------------------------------------------------


async def test_slow_client_slows_the_cluster(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """A client that stops reading stops the cluster's writes: nothing piles up in the proxy."""
    query = {"size": str(1024 * MiB)}
    async with client.get((proxy.url / "download").with_query(query)) as resp:
        assert resp.status == 200
        await resp.content.readexactly(MiB)  # the stream flows, then the client stops reading
        stalled_at = await until_stalled(lambda: cluster.sent)
        assert stalled_at < STALL_BOUND
        # Reading again lets the cluster go on.
        await resp.content.readexactly(STALL_BOUND)
        await until(lambda: cluster.sent > stalled_at)


async def test_slow_cluster_slows_the_client(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """A cluster that does not read stops the client's upload; once it reads, all arrives."""
    size = 256 * MiB
    body = CountedBody(size, seed=3)
    upload = asyncio.ensure_future(client.post(proxy.url / "slow-upload", data=body.stream()))
    try:
        stalled_at = await until_stalled(lambda: body.produced)
        assert 0 < stalled_at < STALL_BOUND
        cluster.release_reader.set()
        async with await upload as resp:
            assert resp.status == 200
            data = await resp.json()
    finally:
        upload.cancel()
    assert (data["body_size"], data["body_sha256"]) == (size, pattern_sha256(size, seed=3))


# --- server-sent events and timeouts --------------------------------------------------------


async def test_sse_events_delivered_one_by_one(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """Each event reaches the client before the cluster sends the next: no batching."""
    async with client.get(proxy.url / "sse-live") as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        buffered = b""
        for n in range(5):
            cluster.sse_queue.put_nowait(f"event {n}")
            while b"\n\n" not in buffered:
                buffered += await asyncio.wait_for(resp.content.readany(), timeout=5)
            event, _, buffered = buffered.partition(b"\n\n")
            assert event == f"data: event {n}".encode()
        cluster.sse_queue.put_nowait(None)
        assert await resp.content.read() == b""


async def test_sse_events_delivered_one_by_one_to_httpx(
    proxy: Running, cluster: FakeCluster
) -> None:
    """httpx's line iterator sees each event as it is sent (another client, same promise)."""
    async with httpx.AsyncClient() as http, http.stream("GET", str(proxy.url / "sse-live")) as resp:
        lines = resp.aiter_lines()
        for n in range(3):
            cluster.sse_queue.put_nowait(f"event {n}")
            assert await asyncio.wait_for(lines.__anext__(), timeout=5) == f"data: event {n}"
            assert await asyncio.wait_for(lines.__anext__(), timeout=5) == ""
        cluster.sse_queue.put_nowait(None)


async def test_stream_longer_than_read_timeout_is_not_cut(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    """A stream that lasts several read timeouts but is never idle that long passes whole."""
    proxy = await start_proxy(read_timeout=0.5)
    query = {"count": "16", "interval": "0.1"}  # about 1.6 s in all
    async with client.get((proxy.url / "sse").with_query(query)) as resp:
        body = await resp.read()
    assert body.count(b"\n\n") == 16


async def test_idle_stream_cut_after_read_timeout(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    """A stream idle for longer than the read timeout ends as a broken response, not a clean one."""
    proxy = await start_proxy(read_timeout=0.3)
    query = {"count": "2", "interval": "5"}
    async with client.get((proxy.url / "sse").with_query(query)) as resp:
        assert resp.status == 200
        first = await resp.content.readuntil(b"\n\n")
        assert first.startswith(b"id: 0\n")
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.content.read()


# --- endings --------------------------------------------------------------------------------


async def test_client_leaving_mid_download_cancels_upstream_and_frees_connection(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """A client that goes away mid-download ends the cluster's response and frees the pooled
    connection (with a pool of one, later requests still go through)."""
    proxy = await start_proxy(pool_size=1)
    for attempt in range(1, 4):
        resp = await client.get((proxy.url / "download").with_query(size=str(1024 * MiB)))
        await resp.content.readexactly(MiB)
        resp.close()  # drops the connection mid-body
        await until(lambda n=attempt: cluster.endings.count("/download cut") == n)
    async with client.get(proxy.url / "api/x") as resp:
        assert resp.status == 200
    assert "/download complete" not in cluster.endings


async def test_client_leaving_mid_upload_cancels_upstream_and_frees_connection(
    start_proxy: StartProxy, cluster: FakeCluster
) -> None:
    """A client that goes away mid-upload breaks the cluster's request off and frees the pooled
    connection."""
    proxy = await start_proxy(pool_size=1)
    cluster.release_reader.set()
    reader, writer = await asyncio.open_connection(proxy.url.host, proxy.url.port)
    writer.write(b"POST /slow-upload HTTP/1.1\r\nHost: localhost\r\n"
                 b"Content-Length: 100000000\r\n\r\n" + b"u" * 3 * MiB)
    await writer.drain()
    await until(lambda: cluster.received > 0)
    writer.transport.abort()
    await until(lambda: "/slow-upload cut" in cluster.endings)
    async with aiohttp.ClientSession() as client, client.get(proxy.url / "api/x") as resp:
        assert resp.status == 200
    del reader


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "chunked"])
async def test_cluster_dropping_mid_body_breaks_the_response(
    proxy: Running, client: aiohttp.ClientSession, length: bool
) -> None:
    """When the cluster breaks off mid-body the client sees a broken response (aiohttp)."""
    async with client.get((proxy.url / "drop").with_query(length="1" if length else "0")) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "chunked"])
async def test_cluster_dropping_mid_body_is_an_error_for_curl_and_httpx(
    proxy: Running, length: bool
) -> None:
    """curl (exit 18, partial file) and httpx (protocol error) see the broken response too."""
    url = str((proxy.url / "drop").with_query(length="1" if length else "0"))
    code, out, _ = await run("curl", "-sS", "-o", "/dev/null", "-w", "%{size_download}", url)
    assert code == 18
    assert int(out) == 10_000
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(url)


# --- fidelity -------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", sorted(ENCODED_BODIES))
async def test_encoded_download_untouched(
    proxy: Running, client: aiohttp.ClientSession, encoding: str
) -> None:
    """A gzip or br body reaches the client as the cluster sent it, with its length."""
    stored = ENCODED_BODIES[encoding]
    async with client.get(proxy.url / "encoded" / encoding,
                          headers={"Accept-Encoding": "gzip, br"}) as resp:
        assert resp.headers["Content-Encoding"] == encoding
        assert resp.headers["Content-Length"] == str(len(stored))
        assert await resp.read() == stored


async def test_encoded_upload_untouched(
    proxy: Running, client: aiohttp.ClientSession
) -> None:
    """A gzip request body reaches the cluster as sent, with its Content-Encoding and length."""
    body = gzip.compress(pattern(2 * MiB, seed=4), mtime=0)
    async with client.post(proxy.url / "api/upload", data=body,
                           headers={"Content-Encoding": "gzip"}) as resp:
        data = await resp.json()
    assert data["body_sha256"] == hashlib.sha256(body).hexdigest()
    headers = {k.lower(): v for k, v in data["headers"]}
    assert headers["content-encoding"] == "gzip"
    assert headers["content-length"] == str(len(body))


@pytest.mark.parametrize(
    ("request_line", "status", "length"),
    [
        ("HEAD /download?size=5000&length=1", 200, "5000"),
        ("HEAD /encoded/gzip", 200, str(len(ENCODED_BODIES["gzip"]))),
        ("GET /status/204", 204, None),
        ("GET /status/304?ETag=%22v1%22", 304, None),
        ("HEAD /status/304", 304, None),
    ],
)
async def test_bodiless_responses_have_no_body_on_the_wire(
    proxy: Running, request_line: str, status: int, length: str | None
) -> None:
    """HEAD, 204 and 304 answers carry no body bytes (not even a chunked terminator); HEAD keeps
    the Content-Length the cluster announced."""
    answer = await raw_exchange(
        proxy.url, f"{request_line} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        .encode())
    head, sep, body = answer.partition(b"\r\n\r\n")
    assert sep and body == b""
    lines = head.decode().split("\r\n")
    assert lines[0].startswith(f"HTTP/1.1 {status} ")
    fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert "transfer-encoding" not in fields
    assert fields.get("content-length") == length


async def test_informational_responses_not_passed_to_client(
    proxy: Running, client: aiohttp.ClientSession
) -> None:
    """1xx answers from the cluster (103, an unasked 100) do not reach or confuse the client."""
    answer = await raw_exchange(
        proxy.url, b"GET /informational HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.count(b"HTTP/1.1") == 1
    assert answer.endswith(b"\r\n\r\nfinal answer")
    async with client.get(proxy.url / "informational") as resp:
        assert (resp.status, await resp.read()) == (200, b"final answer")
        assert resp.headers["X-Final"] == "yes"


# --- the 401 retry with bodies --------------------------------------------------------------


@pytest.mark.parametrize(
    ("framing", "size", "expected", "sent_to_cluster"),
    [
        ("content-length", 512 * 1024, 200, 2),  # kept whole while sent: replayed
        ("chunked", 512 * 1024, 200, 2),
        ("content-length", 3 * MiB, 401, 1),  # above the limit: streamed, never kept
        ("chunked", 3 * MiB, 401, 1),  # outgrew the limit while the cluster read it all
    ],
)
async def test_401_replays_only_bodies_kept_whole(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession,
    framing: str, size: int, expected: int, sent_to_cluster: int,
) -> None:
    """After a 401 a body is sent again only if all of it was kept; otherwise the client gets
    the 401 (the default limit is 1 MiB)."""
    cluster.drain_before_401 = True
    cluster.revoke_access_tokens()
    body: object = (io.BytesIO(pattern(size, seed=5)) if framing == "content-length"
                    else chunks(size, seed=5))
    async with client.post(proxy.url / "api/upload", data=body) as resp:
        assert resp.status == expected
        data = await resp.json()
    assert len(cluster.api_requests()) == sent_to_cluster
    if expected == 200:
        assert (data["body_size"], data["body_sha256"]) == (size, pattern_sha256(size, seed=5))


async def test_401_before_the_body_was_read_never_sends_a_partial_body(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """A cluster refusing a chunked upload before reading it: whether the proxy replays or hands
    back the 401, whatever the cluster accepts is the whole body."""
    size = 3 * MiB
    for _ in range(5):
        cluster.revoke_access_tokens()
        async with client.post(proxy.url / "api/upload", data=chunks(size, 64 * 1024)) as resp:
            assert resp.status in (200, 401)
            data = await resp.json()
        if resp.status == 200:
            assert (data["body_size"], data["body_sha256"]) == (size, pattern_sha256(size))
    accepted = [r for r in cluster.api_requests() if r.body_sha256]
    assert all(r.body_sha256 == pattern_sha256(size) for r in accepted)


async def test_upload_stalled_longer_than_read_timeout_is_not_cut(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """The read timeout counts from the end of the request body: an upload the cluster holds up
    for longer than that still arrives whole."""
    proxy = await start_proxy(read_timeout=0.3)
    size = 128 * MiB
    body = CountedBody(size, seed=6)
    upload = asyncio.ensure_future(client.post(proxy.url / "slow-upload", data=body.stream()))
    try:
        await until_stalled(lambda: body.produced, quiet=1.0)  # over three read timeouts
        assert not upload.done()
        cluster.release_reader.set()
        async with await upload as resp:
            assert resp.status == 200
            data = await resp.json()
    finally:
        upload.cancel()
    assert data["body_sha256"] == pattern_sha256(size, seed=6)
