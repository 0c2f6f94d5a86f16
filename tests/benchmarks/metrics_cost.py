"""What the per-request metrics cost: the counting middleware timed in isolation, and a scrape.

    python -m tests.benchmarks.metrics_cost                 # 200 000 requests, best of 5
    python -m tests.benchmarks.metrics_cost --requests 50000 --repeat 3

The middleware runs on real `web.Request` objects (a forwarded request with the keys forward.py
leaves: upstream latency, bytes in and out) in front of a handler that returns a prepared
response at once, so the difference between calling the handler through the middleware and
calling it directly is the middleware's own cost. Prints nanoseconds per request and what share
of a request budget that is at a few rates. Bounded in time; no network.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from prometheus_client import generate_latest

from proxy.forward import BYTES_IN, BYTES_OUT, UPSTREAM_LATENCY
from proxy.metrics import make_metrics, stats_middleware


async def _measure(count: int, repeat: int) -> tuple[float, float, float]:
    metrics = make_metrics("https://squirro.example.com")
    middleware = stats_middleware(metrics.stats)
    response = web.Response(status=200)
    requests = []
    for i in range(256):
        request = make_mocked_request("GET" if i % 4 else "POST", f"/api/topic/v0/t/items/{i}")
        request[UPSTREAM_LATENCY] = 0.001 * (i % 50)
        request[BYTES_IN] = 100 * (i % 4 == 0)
        request[BYTES_OUT] = 4096
        requests.append(request)

    async def handler(request: web.Request) -> web.StreamResponse:
        return response

    async def direct() -> float:
        started = time.perf_counter()
        for i in range(count):
            await handler(requests[i & 255])
        return time.perf_counter() - started

    async def counted() -> float:
        started = time.perf_counter()
        for i in range(count):
            await middleware(requests[i & 255], handler)
        return time.perf_counter() - started

    best_direct = min([await direct() for _ in range(repeat)])
    best_counted = min([await counted() for _ in range(repeat)])
    started = time.perf_counter()
    scrapes = 20
    for _ in range(scrapes):
        generate_latest(metrics.registry)
    scrape = (time.perf_counter() - started) / scrapes
    return best_direct / count, best_counted / count, scrape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    direct, counted, scrape = asyncio.run(_measure(args.requests, args.repeat))
    overhead = counted - direct
    print(f"handler alone:           {direct * 1e9:8.0f} ns/request")
    print(f"through the middleware:  {counted * 1e9:8.0f} ns/request")
    print(f"metrics cost:            {overhead * 1e9:8.0f} ns/request")
    for rate in (1_000, 5_000, 10_000):
        print(f"  at {rate:>6} req/s: {overhead * rate * 100:5.2f} % of one core")
    print(f"one scrape of /-/metrics: {scrape * 1e3:7.2f} ms (built only when scraped)")


if __name__ == "__main__":
    main()
