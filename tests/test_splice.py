"""Large bodies of known length from a plain-HTTP cluster bypass the process (splice.py).

The same promises as every other download: byte-exact, backpressure, a broken response when
the cluster breaks off or goes idle, the cluster's request ended when the client leaves. Each
test also checks, from the proxy's debug log, that the body really took the spliced path.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import aiohttp
import httpx
import pytest
from yarl import URL

from proxy.metrics import METRICS
from proxy.splice import SPLICE_MIN
from tests.conftest import Running, StartProxy
from tests.fakes import FakeCluster, pattern
from tests.helpers import until
from tests.processes import LISTEN, ProxyProcess, proxy_env, spawn
from tests.test_streaming import STALL_BOUND, run, until_stalled

MiB = 1024 * 1024
SPLICED = "past the process"


@pytest.fixture
def splice_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="squirro_proxy.forward")
    return caplog


def spliced(caplog: pytest.LogCaptureFixture) -> int:
    return sum(SPLICED in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("size", [SPLICE_MIN, 64 * MiB + 7])
async def test_spliced_download_byte_exact(
    proxy: Running, client: aiohttp.ClientSession, splice_log: pytest.LogCaptureFixture,
    size: int,
) -> None:
    """A body of known length arrives byte-exact with its Content-Length, spliced."""
    query = {"size": str(size), "length": "1"}
    digest, received = hashlib.sha256(), 0
    async with client.get((proxy.url / "download").with_query(query)) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(size)
        async for chunk in resp.content.iter_any():
            digest.update(chunk)
            received += len(chunk)
    assert received == size
    assert digest.hexdigest() == hashlib.sha256(pattern(size, seed=0)).hexdigest()
    assert spliced(splice_log) == 1
    assert proxy.app[METRICS].stats.bytes_out == size  # spliced bytes are counted too
    # The connection to the client stays usable (keep-alive) after a spliced body.
    async with client.get(proxy.url / "api/x") as resp:
        assert resp.status == 200


async def test_small_and_head_responses_are_not_spliced(
    proxy: Running, client: aiohttp.ClientSession, splice_log: pytest.LogCaptureFixture
) -> None:
    """Under SPLICE_MIN, or without a body (HEAD), aiohttp relays as before."""
    query = {"size": str(SPLICE_MIN - 1), "length": "1"}
    async with client.get((proxy.url / "download").with_query(query)) as resp:
        assert len(await resp.read()) == SPLICE_MIN - 1
    async with client.head((proxy.url / "download").with_query(size=str(8 * MiB), length="1")
                           ) as resp:
        assert resp.headers["Content-Length"] == str(8 * MiB)
        assert await resp.read() == b""
    assert spliced(splice_log) == 0


async def test_spliced_download_slow_client_slows_the_cluster(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession,
    splice_log: pytest.LogCaptureFixture,
) -> None:
    """Backpressure holds on the spliced path: a client that stops reading stops the cluster."""
    query = {"size": str(1024 * MiB), "length": "1"}
    async with client.get((proxy.url / "download").with_query(query)) as resp:
        await resp.content.readexactly(MiB)
        stalled_at = await until_stalled(lambda: cluster.sent)
        assert stalled_at < STALL_BOUND
        await resp.content.readexactly(STALL_BOUND)
        await until(lambda: cluster.sent > stalled_at)
    assert spliced(splice_log) == 1


async def test_client_leaving_mid_splice_ends_the_cluster_response(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession,
    splice_log: pytest.LogCaptureFixture,
) -> None:
    """A client gone mid-splice ends the cluster's response and frees the pool (size one)."""
    proxy = await start_proxy(pool_size=1)
    for attempt in range(1, 4):
        query = {"size": str(1024 * MiB), "length": "1"}
        resp = await client.get((proxy.url / "download").with_query(query))
        await resp.content.readexactly(MiB)
        resp.close()
        await until(lambda n=attempt: cluster.endings.count("/download cut") == n)
    async with client.get(proxy.url / "api/x") as resp:
        assert resp.status == 200
    assert spliced(splice_log) == 3


async def test_cluster_breaking_off_mid_splice_breaks_the_response(
    proxy: Running, splice_log: pytest.LogCaptureFixture
) -> None:
    """The cluster closing before the promised length: curl exits 18, aiohttp and httpx raise."""
    url = (proxy.url / "drop").with_query(length="1", promise=str(8 * MiB), send=str(3 * MiB))
    code, out, _ = await run("curl", "-sS", "-o", "/dev/null", "-w", "%{size_download}",
                             str(url))
    assert code == 18
    assert int(out) == 3 * MiB
    async with aiohttp.ClientSession() as client, client.get(url) as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(str(url))
    assert spliced(splice_log) == 3


async def test_idle_cluster_mid_splice_is_cut_after_the_read_timeout(
    start_proxy: StartProxy, client: aiohttp.ClientSession,
    splice_log: pytest.LogCaptureFixture,
) -> None:
    """A cluster silent for longer than --read-timeout mid-body: the client sees it broken."""
    proxy = await start_proxy(read_timeout=0.3)
    url = (proxy.url / "drop").with_query(length="1", promise=str(8 * MiB), send=str(2 * MiB),
                                          stall="5")
    async with client.get(url) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert spliced(splice_log) == 1
    assert any("broke off" in r.getMessage() and "TimeoutError" in r.getMessage()
               for r in splice_log.records)


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_spliced_downloads_through_the_cli(
    procs: list[ProxyProcess], cluster_url: URL, tmp_path: Path, workers: str
) -> None:
    """The real CLI (on uvloop when installed, as users run it): spliced bodies arrive whole,
    one after another on one keep-alive connection, with a small answer in between."""
    p = await spawn("--workers", workers, "--log-level", "debug", env=proxy_env(cluster_url),
                    cwd=tmp_path)
    procs.append(p)
    base = URL((await p.wait_line(LISTEN)).group(1))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as client:
        for extra in range(3):
            size = 8 * MiB + extra
            query = {"size": str(size), "length": "1"}
            async with client.get((base / "download").with_query(query)) as resp:
                assert await resp.read() == pattern(size, seed=0)
            async with client.get(base / "api/x") as resp:
                assert resp.status == 200
    await until(lambda: sum(SPLICED in line for line in p.lines) == 3)
    assert "Traceback" not in "".join(p.lines)
