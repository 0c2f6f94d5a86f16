"""Streams through the proxy: 1 GiB down and up, sha256-checked, with the proxy's peak RSS growth
and the SSE first-event latency.

    python -m tests.benchmarks.streaming            # 1 GiB each way, proxy and nginx
    python -m tests.benchmarks.streaming --size 256MiB --no-nginx

The upstream is the tests' fake cluster (tests/fakes.py) in a process of its own: it makes the
download from a deterministic pattern and hashes each upload while receiving it, so every
transfer is checked byte for byte. In front of it run `python -m proxy` and, for comparison,
nginx's proxy_pass with streaming settings (the performance benchmark's `peer_conf`). The client
is this process, speaking plain HTTP/1.1 over http.client with 1 MiB reads and writes.

Targets (issue 4): byte-exact, peak RSS growth under 64 MiB, throughput at least 0.8 of nginx,
SSE events delivered within 50 ms of the cluster sending them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import http.client
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .measure import PeakRss
from .servers import (
    ACCESS_TOKEN,
    REFRESH_TOKEN,
    ROOT,
    Server,
    free_port,
    nginx_server,
    peer_conf,
    squirro_server,
    stop_all,
    which,
    write_uvloop_blocker,
)

MiB = 1024 * 1024
BLOCK = 64 * 1024  # tests.fakes.pattern repeats a 64 KiB block
IO_SIZE = MiB
RSS_TARGET = 64 * MiB
SSE_TARGET = 0.050


@dataclass(frozen=True)
class Transfer:
    what: str
    through: str
    size: int
    seconds: float
    rss_growth: int | None  # bytes above the RSS before the transfer; None: not measured
    ok: bool
    cpu: float = 0.0  # CPU seconds the server in the middle spent (the figure least disturbed
    # by other work on a shared machine)

    @property
    def mib_s(self) -> float:
        return self.size / MiB / self.seconds


def pattern_blocks(size: int, seed: int = 0) -> Iterator[bytes]:
    """tests.fakes.pattern(size, seed) as a stream of up to IO_SIZE pieces, without holding it."""
    from tests.fakes import pattern

    piece = pattern(IO_SIZE, seed)
    sent = 0
    while sent < size:
        part = piece[: min(IO_SIZE, size - sent)]
        sent += len(part)
        yield part


@functools.lru_cache(maxsize=8)
def pattern_sha256(size: int, seed: int = 0) -> str:
    digest = hashlib.sha256()
    for part in pattern_blocks(size, seed):
        digest.update(part)
    return digest.hexdigest()


# --- the upstream -------------------------------------------------------------------------------


def serve_upstream(port: int) -> None:
    """Run the fake cluster until SIGTERM, trusting the benchmark's fixed access token too."""
    from aiohttp import web

    from tests.fakes import FakeCluster

    cluster = FakeCluster(refresh_token=REFRESH_TOKEN, lifetime=3600)
    cluster.tokens[ACCESS_TOKEN] = float("inf")  # what nginx sends, having no refresh
    app = cluster.app()
    loop = None
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        pass
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, loop=loop)


def upstream_server() -> Server:
    port = free_port()
    server = Server("upstream", "upstream", port,
                    [sys.executable, "-m", "tests.benchmarks.streaming", "--serve-upstream",
                     str(port)],
                    env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
    server.needs_auth = True
    return server


class Stack:
    """The upstream, the proxy and (optionally) nginx, started and stopped together."""

    def __init__(self, tmp: Path, *, nginx: bool) -> None:
        self.tmp = tmp
        self.upstream = upstream_server()
        blocker = write_uvloop_blocker(tmp)
        workdir = tmp / "cwd"
        workdir.mkdir(exist_ok=True)
        self.proxy = squirro_server("squirro-proxy", ROOT, f"http://127.0.0.1:{self.upstream.port}",
                                    True, blocker, workdir)
        self.nginx: Server | None = None
        if nginx:
            port = free_port()
            self.nginx = nginx_server("nginx", "nginx", peer_conf(
                port, self.upstream.port, tmp, tmp), tmp, port)

    def __enter__(self) -> Stack:
        try:
            for server in self.servers:
                server.start(self.tmp)
        except BaseException:
            stop_all()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for server in reversed(self.servers):
            server.stop()

    @property
    def servers(self) -> list[Server]:
        return [s for s in (self.upstream, self.proxy, self.nginx) if s is not None]


# --- the client ---------------------------------------------------------------------------------


def _connection(server: Server) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.connect()
    return conn


def download(server: Server, size: int, measured: Server | None, *, length: bool = True
             ) -> Transfer:
    """GET `size` pattern bytes, hashing them as they arrive."""
    conn = _connection(server)
    query = f"/download?size={size}&chunk={IO_SIZE}&length={int(length)}"
    meter = PeakRss(measured.proc.pid) if measured and measured.proc else None
    started = time.perf_counter()
    with meter or contextlib.nullcontext():
        conn.request("GET", query, headers=server.headers)
        resp = conn.getresponse()
        digest, received = hashlib.sha256(), 0
        buffer = bytearray(IO_SIZE)
        view = memoryview(buffer)
        while n := resp.readinto(buffer):
            digest.update(view[:n])
            received += n
        seconds = time.perf_counter() - started
    conn.close()
    ok = resp.status == 200 and received == size and digest.hexdigest() == pattern_sha256(size)
    return Transfer("download" + ("" if length else " chunked"), server.name, size, seconds,
                    meter.growth if meter else None, ok)


def upload(server: Server, size: int, measured: Server | None, *, chunked: bool) -> Transfer:
    """POST `size` pattern bytes; the upstream's sha256 of what it received must match."""
    conn = _connection(server)
    conn.putrequest("POST", "/upload", skip_accept_encoding=True)
    for name, value in server.headers.items():
        conn.putheader(name, value)
    conn.putheader("Content-Type", "application/octet-stream")
    if chunked:
        conn.putheader("Transfer-Encoding", "chunked")
    else:
        conn.putheader("Content-Length", str(size))
    meter = PeakRss(measured.proc.pid) if measured and measured.proc else None
    started = time.perf_counter()
    with meter or contextlib.nullcontext():
        conn.endheaders()
        for part in pattern_blocks(size, seed=1):
            if chunked:
                conn.send(b"%x\r\n" % len(part))
                conn.send(part)
                conn.send(b"\r\n")
            else:
                conn.send(part)
        if chunked:
            conn.send(b"0\r\n\r\n")
        resp = conn.getresponse()
        answer = json.loads(resp.read() or b"{}")
        seconds = time.perf_counter() - started
    conn.close()
    ok = (resp.status == 200 and answer.get("body_size") == size
          and answer.get("body_sha256") == pattern_sha256(size, seed=1))
    return Transfer("upload " + ("chunked" if chunked else "with length"), server.name, size,
                    seconds, meter.growth if meter else None, ok)


def sse_latencies(server: Server, count: int = 20, interval: float = 0.05) -> list[float]:
    """Seconds from the cluster writing each event (its timestamp) to this client reading it."""
    conn = _connection(server)
    conn.request("GET", f"/sse?count={count}&interval={interval}", headers=server.headers)
    resp = conn.getresponse()
    latencies = []
    while line := resp.readline():
        if line.startswith(b"data: "):
            latencies.append(time.time() - float(line[6:]))
    conn.close()
    return latencies


# --- the run ------------------------------------------------------------------------------------


# Each way with either framing: (function, keyword arguments).
TRANSFERS: tuple[tuple[Callable[..., Transfer], dict[str, bool]], ...] = (
    (download, {"length": True}), (download, {"length": False}),
    (upload, {"chunked": True}), (upload, {"chunked": False}),
)


def parse_size(text: str) -> int:
    """`1GiB`, `256MiB` or plain bytes."""
    for suffix, factor in (("GiB", 1024 * MiB), ("MiB", MiB)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=1024 * MiB,
                        help="bytes each way (default 1GiB)")
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx comparison")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
        return 0
    nginx = not args.no_nginx and which("nginx") is not None
    with tempfile.TemporaryDirectory(prefix="squirro-stream-bench-") as tmp, \
            Stack(Path(tmp), nginx=nginx) as stack:
        proxy = stack.proxy
        assert proxy.proc is not None
        print(f"moving {args.size / MiB:.0f} MiB each way")
        results: list[Transfer] = []
        overall = PeakRss(proxy.proc.pid)
        for through in [s for s in (stack.nginx, stack.upstream) if s is not None] + [proxy]:
            measured = proxy if through is proxy else None
            with overall if through is proxy else contextlib.nullcontext():
                for transfer, options in TRANSFERS:
                    cpu = through.cpu()
                    result = transfer(through, args.size, measured, **options)
                    results.append(dataclasses.replace(result, cpu=through.cpu() - cpu))
        print(f"\n{'transfer':<20} {'through':<14} {'MiB/s':>8} {'s':>7} {'CPU s/GiB':>10} "
              f"{'RSS +MiB':>9}  sha256")
        for r in results:
            growth = f"{r.rss_growth / MiB:9.1f}" if r.rss_growth is not None else f"{'':>9}"
            print(f"{r.what:<20} {r.through:<14} {r.mib_s:8.0f} {r.seconds:7.2f} "
                  f"{r.cpu * 1024 * MiB / r.size:10.2f} {growth}  {'ok' if r.ok else 'MISMATCH'}")
        if stack.nginx is not None:
            print()
            for what in dict.fromkeys(r.what for r in results):
                ours = next(r for r in results if r.what == what and r.through == proxy.name)
                peer = next(r for r in results if r.what == what and r.through == "nginx")
                print(f"{what:<20} proxy/nginx throughput {ours.mib_s / peer.mib_s:5.2f} "
                      f"(target >= 0.8), CPU per byte {ours.cpu / max(peer.cpu, 1e-9):5.1f}x")
        print()
        for through in [s for s in (stack.nginx, proxy) if s is not None]:
            lat = sse_latencies(through)
            print(f"SSE via {through.name:<14} first event {lat[0] * 1000:6.1f} ms, median "
                  f"{statistics.median(lat) * 1000:6.1f} ms, max {max(lat) * 1000:6.1f} ms "
                  f"over {len(lat)} events (target < {SSE_TARGET * 1000:.0f} ms)")
        print(f"\nproxy RSS: idle {overall.before / MiB:.1f} MiB, peak growth above idle over "
              f"all its transfers {overall.growth / MiB:.1f} MiB (target < "
              f"{RSS_TARGET / MiB:.0f} MiB)")
        return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
