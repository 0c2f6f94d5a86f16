"""/-/metrics: Prometheus text from a registry of the proxy's own, scraped by a real client."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from proxy.errors import ERROR_HEADER
from proxy.metrics import METRICS, REFRESH_FAILURE_REASONS, RequestStats
from tests.conftest import Running, StartProxy
from tests.fakes import FakeCluster, pattern
from tests.helpers import closed_port, until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(client: aiohttp.ClientSession, proxy: Running) -> Samples:
    """Every sample of /-/metrics, parsed by prometheus-client's own parser."""
    async with client.get(proxy.url / "-/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def requests_by(samples: Samples) -> dict[tuple[str, str], float]:
    return {
        (dict(labels)["method"], dict(labels)["status_class"]): value
        for (name, labels), value in samples.items() if name == "squirro_proxy_requests_total"
    }


async def test_every_family_the_issue_names_is_exported(
    proxy: Running, client: aiohttp.ClientSession
) -> None:
    """Requests, latency histogram, bytes, retries, refreshes, token expiry, in-flight."""
    async with client.get(proxy.url / "api/x") as resp:
        await resp.read()
    names = {name for name, _ in await scrape(client, proxy)}
    assert {
        "squirro_proxy_requests_total",
        "squirro_proxy_in_flight_requests",
        "squirro_proxy_upstream_latency_seconds_bucket",
        "squirro_proxy_upstream_latency_seconds_sum",
        "squirro_proxy_upstream_latency_seconds_count",
        "squirro_proxy_received_bytes_total",
        "squirro_proxy_sent_bytes_total",
        "squirro_proxy_retries_after_401_total",
        "squirro_proxy_token_refreshes_total",
        "squirro_proxy_access_token_expires_in_seconds",
        "squirro_proxy_ready",
        "squirro_proxy_info",
        "process_resident_memory_bytes",
    } <= names


async def test_requests_counted_by_method_and_status_class(
    proxy: Running, client: aiohttp.ClientSession
) -> None:
    """Each answered request lands in its (method, status class) counter; /-/ is not counted."""
    for method, path in [("GET", "api/a"), ("GET", "api/b"), ("POST", "api/c"),
                         ("GET", "status/404"), ("DELETE", "status/503"), ("GET", "status/302"),
                         ("GET", "-/healthy"), ("GET", "-/ready")]:
        async with client.request(method, proxy.url / path, allow_redirects=False) as resp:
            await resp.read()
    assert requests_by(await scrape(client, proxy)) == {
        ("GET", "2xx"): 2, ("POST", "2xx"): 1, ("GET", "4xx"): 1, ("DELETE", "5xx"): 1,
        ("GET", "3xx"): 1,
    }


@pytest.mark.parametrize("method", ["PURGE", "PROPFIND", "MKCOL", "REPORT"])
async def test_invented_methods_share_one_label(
    proxy: Running, client: aiohttp.ClientSession, method: str
) -> None:
    """A client cannot grow the metrics with made-up methods: they count as OTHER."""
    async with client.request(method, proxy.url / "api/x") as resp:
        await resp.read()
    counts = requests_by(await scrape(client, proxy))
    assert [m for m, _ in counts] == ["OTHER"]


async def test_refused_requests_are_counted(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """Requests the guard refuses (foreign Host: 403) show as 4xx without reaching the cluster."""
    async with client.get(proxy.url / "api/x", headers={"Host": "evil.example"}) as resp:
        assert resp.status == 403
    assert requests_by(await scrape(client, proxy)) == {("GET", "4xx"): 1}
    assert cluster.api_requests() == []


async def test_bytes_in_and_out(
    proxy: Running, client: aiohttp.ClientSession
) -> None:
    """Request body bytes received and response body bytes sent, exactly."""
    sent = 0
    async with client.post(proxy.url / "api/upload", data=pattern(10_000)) as resp:
        sent += len(await resp.read())
    async with client.get(proxy.url / "download", params={"size": "50000"}) as resp:
        sent += len(await resp.read())
    samples = await scrape(client, proxy)
    assert samples[("squirro_proxy_received_bytes_total", ())] == 10_000
    assert samples[("squirro_proxy_sent_bytes_total", ())] == sent


async def test_upstream_latency_histogram(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """Upstream latency lands in the right bucket; sum and count agree with what happened."""

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)
        return web.Response(text="late")

    async with client.get(proxy.url / "api/fast") as resp:
        await resp.read()
    cluster.hooks["echo"] = slow
    async with client.get(proxy.url / "api/slow") as resp:
        await resp.read()
    samples = await scrape(client, proxy)

    def bucket(le: float | str) -> float:
        return samples[("squirro_proxy_upstream_latency_seconds_bucket", (("le", str(le)),))]

    assert samples[("squirro_proxy_upstream_latency_seconds_count", ())] == 2
    assert bucket("+Inf") == 2 and bucket(0.25) == 1 and bucket(0.5) == 2
    assert 0.3 <= samples[("squirro_proxy_upstream_latency_seconds_sum", ())] < 0.6


async def test_retries_after_401_counted(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """A request sent again with a new token after a 401 counts once."""
    cluster.revoke_access_tokens()
    async with client.get(proxy.url / "api/x") as resp:
        assert resp.status == 200
    samples = await scrape(client, proxy)
    assert samples[("squirro_proxy_retries_after_401_total", ())] == 1


async def test_token_refreshes_by_outcome_and_reason(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """ok and failed refreshes, failures by reason (here: 503 from the endpoint, then 404)."""

    def refreshes(samples: Samples) -> dict[tuple[str, str], float]:
        return {(dict(k)["outcome"], dict(k)["reason"]): v for (n, k), v in samples.items()
                if n == "squirro_proxy_token_refreshes_total"}

    before = refreshes(await scrape(client, proxy))
    assert before[("ok", "ok")] == 1
    assert {r for (o, r) in before if o == "failed"} == set(REFRESH_FAILURE_REASONS)
    assert not any(v for (o, _), v in before.items() if o == "failed")

    cluster.token_statuses = [503]
    cluster.revoke_access_tokens()
    async with client.get(proxy.url / "api/x") as resp:
        assert resp.status == 503  # the refresh after the 401 failed
    cluster.refresh_token = "revoked-by-the-admin-0000"
    # Within the backoff a 401 gets 503 at once; the first 401 after it exchanges and meets 404.
    code = ""
    for _ in range(100):
        async with client.get(proxy.url / "api/x") as resp:
            assert resp.status == 503
            code = resp.headers[ERROR_HEADER]
        if code == "token_rejected":
            break
        await asyncio.sleep(0.05)
    assert code == "token_rejected"
    after = refreshes(await scrape(client, proxy))
    assert after[("failed", "http_error")] == 1 and after[("failed", "404")] == 1
    assert after[("ok", "ok")] == 1


async def test_seconds_until_the_access_token_expires(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """The gauge counts down from the token's lifetime; 0 and not ready when none is held."""
    proxy = await start_proxy()
    samples = await scrape(client, proxy)
    assert 590 < samples[("squirro_proxy_access_token_expires_in_seconds", ())] <= 600
    assert samples[("squirro_proxy_ready", ())] == 1

    cluster.token_down = True
    down = await start_proxy(wait_token=False)
    await until(lambda: down.tokens.failure is not None)
    samples = await scrape(client, down)
    assert samples[("squirro_proxy_access_token_expires_in_seconds", ())] == 0
    assert samples[("squirro_proxy_ready", ())] == 0


async def test_in_flight_requests(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """Requests waiting on the cluster show as in flight, and stop showing once answered."""
    arrived, release = cluster.hold_answers()

    async def one() -> int:
        async with client.get(proxy.url / "api/held") as resp:
            await resp.read()
            return resp.status

    tasks = [asyncio.create_task(one()) for _ in range(3)]
    await until(lambda: len(arrived) == 3)
    assert (await scrape(client, proxy))[("squirro_proxy_in_flight_requests", ())] == 3
    release.set()
    assert await asyncio.gather(*tasks) == [200, 200, 200]
    assert (await scrape(client, proxy))[("squirro_proxy_in_flight_requests", ())] == 0


async def test_client_that_goes_away_is_counted_as_client_closed(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """A client that hangs up before the answer leaves no in-flight count behind."""
    arrived = asyncio.Event()

    async def never(request: web.Request) -> web.Response:
        arrived.set()
        await asyncio.Event().wait()
        return web.Response()

    cluster.hooks["echo"] = never
    _, writer = await asyncio.open_connection(proxy.url.host, proxy.url.port)
    writer.write(b"GET /api/abandoned HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await writer.drain()
    await arrived.wait()
    writer.close()  # the client hangs up while the cluster still works on it
    await writer.wait_closed()
    stats = proxy.app[METRICS].stats
    await until(lambda: stats.in_flight == 0)
    assert requests_by(await scrape(client, proxy)) == {("GET", "client_closed"): 1}


async def test_two_proxies_in_one_process_keep_their_own_numbers(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    """Each app has its own registry: traffic on one does not show on the other."""
    busy, idle = await start_proxy(), await start_proxy()
    for _ in range(3):
        async with client.get(busy.url / "api/x") as resp:
            await resp.read()
    assert requests_by(await scrape(client, busy)) == {("GET", "2xx"): 3}
    assert requests_by(await scrape(client, idle)) == {}


async def test_answers_the_proxy_made_count_too(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    """A 503 the proxy answered itself (no token: cluster unreachable) counts as 5xx."""
    port = closed_port()
    proxy = await start_proxy(cluster=URL(f"http://127.0.0.1:{port}"), wait_token=False)
    async with client.get(proxy.url / "api/x") as resp:
        assert resp.status == 503
    assert requests_by(await scrape(client, proxy)) == {("GET", "5xx"): 1}


@pytest.mark.parametrize(
    ("latencies", "expected"),
    [
        ([], {"p50": None, "p90": None, "p99": None}),
        ([0.5], {"p50": 0.5, "p90": 0.5, "p99": 0.5}),
        ([i / 100 for i in range(100, 0, -1)], {"p50": 0.5, "p90": 0.9, "p99": 0.99}),
        ([0.1, 0.2, 0.3, 10.0], {"p50": 0.2, "p90": 10.0, "p99": 10.0}),
    ],
)
def test_status_percentiles_are_nearest_rank(
    latencies: list[float], expected: dict[str, float | None]
) -> None:
    """The status page's percentiles: nearest rank over the recent upstream latencies."""
    stats = RequestStats()
    stats.recent_latencies.extend(latencies)
    assert stats.percentiles(50, 90, 99) == expected
