"""Request and token figures for `/-/metrics` and `/-/status`, one registry per application.

Per-request figures are plain ints and floats that the request's own task updates: the event loop
is a single thread, so they need no lock, and a request costs a handful of dict and list
operations. They become Prometheus metric families only when someone scrapes, in a custom
collector on a registry of the application's own (never the process-wide default registry, so
several proxies in one process, as in the tests, keep their numbers apart).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from . import __version__
from .errors import ERROR_HEADER
from .forward import BYTES_IN, BYTES_OUT, HANDOVER, RETRIED, UPSTREAM_LATENCY
from .logs import log_client_gone
from .paths import OPS_PREFIX
from .redact import mask_query
from .tokens import TokenSource

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BUCKET_LABELS = (*(repr(b) for b in LATENCY_BUCKETS), "+Inf")
# Percentiles on the status page come from the most recent upstream latencies.
RECENT_LATENCIES = 2048
RECENT_ERRORS = 20
# Methods outside this set are counted as OTHER: a label per invented method would let any
# client grow the metrics without bound.
_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE")
)
# A request whose client went away before it was answered: status 0, which no answer has.
CLIENT_CLOSED = "client_closed"
# status // 100 -> label, precomputed so a request costs no string formatting.
_STATUS_CLASS = (CLIENT_CLOSED, "1xx", "2xx", "3xx", "4xx", "5xx", "other", "other", "other",
                 "other")
# Reasons TokenManager files failed refreshes under; always exported, at 0 until one happens, so
# alert rules on rate() work from the first scrape.
REFRESH_FAILURE_REASONS = (
    "400", "401", "403", "404", "410", "http_error", "timeout", "connect", "tls", "other",
)


@dataclass(frozen=True, slots=True)
class UpstreamError:
    """A request that failed on the way to or at the cluster, for the status page."""

    at: float  # epoch seconds
    method: str
    path: str  # secret-looking query values masked
    status: int
    error: str  # the proxy's error code, or "cluster" for an answer the cluster made
    detail: str


class RequestStats:
    """Counters the request middleware updates; read by the collector and the status page."""

    __slots__ = ("bytes_in", "bytes_out", "in_flight", "latency_buckets", "latency_sum",
                 "pids", "processes", "recent_errors", "recent_latencies", "requests",
                 "retired_cpu", "retried", "started")

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}  # (method, status class) -> count
        self.in_flight = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.retried = 0
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # not cumulative; last: +Inf
        self.latency_sum = 0.0
        self.recent_latencies: deque[float] = deque(maxlen=RECENT_LATENCIES)
        self.recent_errors: deque[UpstreamError] = deque(maxlen=RECENT_ERRORS)
        self.started = time.time()
        self.processes = 1  # worker processes whose figures these are
        # Whose memory, CPU and descriptors the process_* metrics sum: this process, or the
        # supervisor and every worker.
        self.pids = [os.getpid()]
        # CPU seconds of worker processes that have ended (their /proc entry went with them).
        self.retired_cpu = 0.0

    def retired(self, cpu_seconds: float) -> RequestStats:
        """What an ended worker leaves to the totals: its counts, no process, nothing in flight,
        and the CPU time it used (from wait4), so that no counter of a scrape goes down."""
        left = RequestStats.merged([self])
        left.processes, left.pids, left.in_flight = 0, [], 0
        left.retired_cpu += cpu_seconds
        return left

    def finish(self, request: web.Request, status: int,
               response: web.StreamResponse | None) -> None:
        """Account for one finished request (status 0: the client went away first)."""
        # RETRIED and BYTES_IN are always there (the middleware sets them); the other two are
        # missing only on answers the proxy made itself, the rare case `get` pays for.
        self.count(request.method, status, request[BYTES_IN], request.get(BYTES_OUT, 0),
                   request[RETRIED], request.get(UPSTREAM_LATENCY))
        if status >= 500:
            self.note_error(request, status, response)

    def count(self, method: str, status: int, bytes_in: int, bytes_out: int, retried: bool,
              latency: float | None) -> None:
        """The counters of `finish` (the express lane, which has no request object to hand,
        calls it directly, and `note_error` for a 5xx)."""
        if method not in _METHODS:
            method = "OTHER"
        key = (method, _STATUS_CLASS[status // 100 % 10])
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        self.bytes_in += bytes_in
        if retried:
            self.retried += 1
        self.bytes_out += bytes_out
        if latency is not None:
            self.latency_buckets[bisect_left(LATENCY_BUCKETS, latency)] += 1
            self.latency_sum += latency
            self.recent_latencies.append(latency)

    def note_error(self, request: web.Request, status: int,
                   response: web.StreamResponse | None) -> None:
        """A 5xx, for the status page."""
        # Rare path: the cost of looking into the body is fine here.
        code = response.headers.get(ERROR_HEADER) if response is not None else None
        detail = response.reason if response is not None else "internal error"
        if code is not None and isinstance(response, web.Response) and \
                isinstance(response.body, bytes):
            with contextlib.suppress(ValueError, AttributeError):
                detail = str(json.loads(response.body).get("detail", detail))
        self.recent_errors.append(UpstreamError(
            time.time(), request.method[:16], mask_query(request.raw_path)[:300], status,
            code or "cluster", detail[:300],
        ))

    @classmethod
    def merged(cls, parts: Iterable[RequestStats]) -> RequestStats:
        """The figures of several worker processes as one (what a scrape should see)."""
        total = cls()
        total.processes = 0
        total.pids = []
        latencies: list[float] = []
        errors: list[UpstreamError] = []
        for part in parts:
            total.processes += part.processes
            total.pids += part.pids
            total.retired_cpu += part.retired_cpu
            for key, count in part.requests.items():
                total.requests[key] = total.requests.get(key, 0) + count
            total.in_flight += part.in_flight
            total.bytes_in += part.bytes_in
            total.bytes_out += part.bytes_out
            total.retried += part.retried
            total.latency_buckets = [a + b for a, b in zip(
                total.latency_buckets, part.latency_buckets, strict=True)]
            total.latency_sum += part.latency_sum
            latencies.extend(part.recent_latencies)
            errors.extend(part.recent_errors)
            total.started = min(total.started, part.started)
        # The percentiles come from a sample either way; the errors keep their order in time.
        total.recent_latencies.extend(latencies[-RECENT_LATENCIES:])
        total.recent_errors.extend(sorted(errors, key=lambda e: e.at)[-RECENT_ERRORS:])
        return total

    def percentiles(self, *points: float) -> dict[str, float | None]:
        """Nearest-rank percentiles (seconds) of the recent upstream latencies."""
        ordered = sorted(self.recent_latencies)
        out: dict[str, float | None] = {}
        for p in points:
            if not ordered:
                out[f"p{p:g}"] = None
                continue
            rank = max(1, math.ceil(len(ordered) * p / 100))
            out[f"p{p:g}"] = ordered[rank - 1]
        return out


def stats_middleware(stats: RequestStats) -> Middleware:
    """The outermost middleware: counts every request outside `/-/`, refused ones included."""

    @web.middleware
    async def count_requests(
        request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        if request.raw_path.startswith(OPS_PREFIX):
            # Not counted, or every probe and scrape would drown the traffic an operator
            # wants to see.
            return await handler(request)
        stats.in_flight += 1
        # Defaults, so reading them afterwards never misses: a missing key costs a KeyError
        # raised and caught inside the mapping, the dearest step of the whole count.
        request[RETRIED] = False
        request[BYTES_IN] = 0
        status = 0
        response: web.StreamResponse | None = None
        handover = request.get(HANDOVER)
        started = handover.started if handover is not None else time.monotonic()
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except Exception:
            status = 500  # aiohttp answers an unhandled error with 500
            raise
        except asyncio.CancelledError:
            # The client went away: aiohttp writes no access line for a cancelled handler.
            log_client_gone(request, time.monotonic() - started)
            raise
        finally:
            stats.in_flight -= 1
            stats.finish(request, status, response)

    return count_requests


class ProxyCollector(Collector):
    """Turns the stats and the token manager's state into metric families at scrape time."""

    def __init__(self, stats: RequestStats, cluster: str) -> None:
        self._stats = stats
        self._shown: RequestStats | None = None
        self._cluster = cluster
        self.tokens: TokenSource | None = None  # set once the token source exists

    @contextlib.contextmanager
    def showing(self, stats: RequestStats) -> Iterator[None]:
        """Collect `stats` (every worker's, merged) instead of this process's own; the scrape
        that uses it is synchronous, so no other scrape can see them."""
        self._shown = stats
        try:
            yield
        finally:
            self._shown = None

    def collect(self) -> Iterator[Metric]:
        stats = self._shown or self._stats
        info = InfoMetricFamily("squirro_proxy", "The proxy's version and cluster.")
        info.add_metric([], {"version": __version__, "cluster": self._cluster})
        yield info

        requests = CounterMetricFamily(
            "squirro_proxy_requests", "Requests answered, by method and status class "
            "(client_closed: the client went away first). /-/ endpoints are not counted.",
            labels=["method", "status_class"],
        )
        for (method, cls), count in sorted(stats.requests.items()):
            requests.add_metric([method, cls], count)
        yield requests
        yield GaugeMetricFamily("squirro_proxy_workers",
                                "Processes serving requests whose figures this scrape shows.",
                                value=stats.processes)
        yield GaugeMetricFamily("squirro_proxy_in_flight_requests",
                                "Requests being handled right now.", value=stats.in_flight)
        yield CounterMetricFamily("squirro_proxy_received_bytes",
                                  "Request body bytes received from clients.",
                                  value=stats.bytes_in)
        yield CounterMetricFamily("squirro_proxy_sent_bytes",
                                  "Response body bytes relayed from the cluster to clients.",
                                  value=stats.bytes_out)
        yield CounterMetricFamily("squirro_proxy_retries_after_401",
                                  "Requests sent again with a new token after a 401.",
                                  value=stats.retried)
        cumulative, buckets = 0, []
        for label, count in zip(_BUCKET_LABELS, stats.latency_buckets, strict=True):
            cumulative += count
            buckets.append((label, float(cumulative)))
        yield HistogramMetricFamily(
            "squirro_proxy_upstream_latency_seconds",
            "Seconds from sending a request to the cluster to its response headers.",
            buckets=buckets, sum_value=stats.latency_sum,
        )
        yield from self._token_metrics()
        yield from process_metrics(stats.pids, stats.retired_cpu)

    def _token_metrics(self) -> Iterator[Metric]:
        tokens = self.tokens
        refreshes = CounterMetricFamily(
            "squirro_proxy_token_refreshes", "Access token exchanges, by outcome and, for "
            "failures, reason (HTTP status of the token endpoint, connect, timeout, ...).",
            labels=["outcome", "reason"],
        )
        failed = dict.fromkeys(REFRESH_FAILURE_REASONS, 0)
        ok = 0
        if tokens is not None:
            ok = tokens.refreshes_ok
            failed.update(tokens.refreshes_failed)
        refreshes.add_metric(["ok", "ok"], ok)
        for reason, count in sorted(failed.items()):
            refreshes.add_metric(["failed", reason], count)
        yield refreshes

        current = tokens.current if tokens is not None else None
        left = max(0.0, current.expires_at - time.monotonic()) if current is not None else 0.0
        yield GaugeMetricFamily(
            "squirro_proxy_access_token_expires_in_seconds",
            "Seconds until the current access token expires (0: none held).", value=left,
        )
        final = tokens is not None and tokens.failure is not None and tokens.failure.final
        yield GaugeMetricFamily(
            "squirro_proxy_ready", "1 when a valid access token is held and the refresh token "
            "was not refused (what /-/ready answers).", value=1.0 if left > 0 and not final
            else 0.0,
        )
        last_ok = max((e.at for e in tokens.history if e.ok), default=0.0) if tokens else 0.0
        yield GaugeMetricFamily(
            "squirro_proxy_last_token_refresh_timestamp_seconds",
            "When the access token was last exchanged successfully (Unix time; 0: never).",
            value=last_ok,
        )


# How the process_* figures of several processes combine into one.
_COMBINE: dict[str, Callable[[list[float]], float]] = {
    "process_start_time_seconds": min, "process_max_fds": max,
}


def _constant(pid: int) -> Callable[[], int]:
    return lambda: pid


def process_metrics(pids: list[int], retired_cpu: float = 0.0) -> Iterator[Metric]:
    """Memory, CPU and open files, read from /proc at scrape time; summed over `pids` (the
    supervisor and its workers), so the series stay those of one proxy whichever worker is
    scraped. `retired_cpu` adds the CPU time of workers that have ended."""
    values: dict[str, list[float]] = {}
    shapes: dict[str, Metric] = {}
    for pid in pids:
        for family in ProcessCollector(pid=_constant(pid), registry=None).collect():
            shapes.setdefault(family.name, family)
            for sample in family.samples:
                values.setdefault(family.name, []).append(sample.value)
    for name, family in shapes.items():
        combined = _COMBINE.get(name, sum)(values[name])
        if name == "process_cpu_seconds":
            combined += retired_cpu
        kind = CounterMetricFamily if family.type == "counter" else GaugeMetricFamily
        yield kind(name, family.documentation, value=combined)


@dataclass(frozen=True, slots=True)
class Metrics:
    """The application's registry, its collector and the request stats behind it."""

    registry: CollectorRegistry
    collector: ProxyCollector
    stats: RequestStats


def make_metrics(cluster: str) -> Metrics:
    registry = CollectorRegistry(auto_describe=False)
    stats = RequestStats()
    collector = ProxyCollector(stats, cluster)
    registry.register(collector)
    return Metrics(registry, collector, stats)


METRICS = web.AppKey("metrics", Metrics)
# Where the `/-/` endpoints get the request figures: this process's own, or, in a worker process,
# every worker's merged by the supervisor.
StatsView = Callable[[], Awaitable[RequestStats]]
STATS_VIEW: web.AppKey[StatsView] = web.AppKey("stats_view")
