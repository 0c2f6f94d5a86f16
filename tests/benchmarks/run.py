"""Benchmark: squirro-proxy against nginx with a static bearer header and a naive aiohttp proxy.

All on loopback, all bounded in time. nginx plays the cluster (token endpoint, small JSON that
checks the bearer, a 1 GiB file, an upload sink that reads the whole body); the contenders are
nginx `proxy_pass` with a hard-coded Authorization header, the naive aiohttp proxy
(`naive_proxy.py`) and squirro-proxy, each Python one with and without uvloop. They are driven
in turn, round after round (the 32-connection load in 1 s slices, taken in turn), and the table
shows medians over the rounds; ratios are taken within each round (neighbours in time on a noisy
machine) and then their median.

    python -m tests.benchmarks.run                                  # 5 rounds of 10 s loads
    python -m tests.benchmarks.run --rounds 2 --duration 3 --skip-large    # a quick look
    python -m tests.benchmarks.run --only small --candidate try=/tmp/proxy_try
    python -m tests.benchmarks.run --markdown docs/benchmark.md --profile /tmp/prof

Needs nginx (Debian: nginx-light), wrk and curl: `apt-get install -y nginx-light wrk curl`, or
pass `--install` to have the script run that (as root).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from . import measure
from .servers import (
    ROOT,
    Server,
    check_uvloop_blocker,
    floor_server,
    free_port,
    large_file,
    naive_server,
    nginx_server,
    peer_conf,
    plain_peer_conf,
    squirro_server,
    stop_all,
    upstream_conf,
    which,
    write_uvloop_blocker,
)

PHASES = ("small", "latency", "large", "startup", "refresh")
# Not in the default run: for comparing versions of the proxy on a busy machine.
EXTRA_PHASES = ("paired", "instructions")
TOOLS = {"nginx": "nginx-light", "wrk": "wrk", "curl": "curl", "valgrind": "valgrind",
         "callgrind_control": "valgrind", "py-spy": "py-spy (pip)"}
APT_PACKAGES = ("nginx-light", "wrk", "curl")

Values = dict[tuple[str, str], list[float]]


# --- arguments and tools ----------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.run", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every test (default 5)")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds of each wrk load (default 10)")
    parser.add_argument("--latency-duration", type=float, default=None,
                        help="seconds of the one-connection load (default: half of --duration)")
    parser.add_argument("--only", default=",".join(PHASES),
                        help=f"comma-separated phases to run, of {', '.join(PHASES)}; or "
                             "`paired`: load every squirro-proxy candidate at the same time, "
                             "32 connections each, and compare each with the first; or "
                             "`instructions`: count instructions per request under valgrind "
                             "(deterministic, for A/B of small changes)")
    parser.add_argument("--skip-large", action="store_true",
                        help="leave out the 1 GiB download and upload")
    parser.add_argument("--candidate", action="append", default=[], metavar="NAME=DIR",
                        help="a squirro-proxy to measure: DIR holds the `proxy` package "
                             "(repeatable; default squirro=<repository>)")
    parser.add_argument("--candidate-args", action="append", default=[], metavar="NAME=ARGS",
                        help="extra flags for one candidate, e.g. \"v2=--log-level info\"")
    parser.add_argument("--proxy-args", default="", metavar="ARGS",
                        help="extra command-line flags for every squirro-proxy, e.g. "
                             "\"--log-level info\" (later flags win)")
    parser.add_argument("--loops", default="uvloop,asyncio",
                        help="event loops for the Python proxies (default uvloop,asyncio)")
    parser.add_argument("--no-naive", action="store_true", help="leave out the naive proxy")
    parser.add_argument("--plain-nginx", action="store_true",
                        help="also measure nginx-plain, an untuned proxy_pass (no upstream "
                        "keep-alive), in the small and latency phases")
    parser.add_argument("--floor", action="store_true",
                        help="also measure floor, the least work Python can do to proxy "
                        "(floor_proxy.py), in the small and latency phases")
    parser.add_argument("--naive-large", action="store_true",
                        help="also send 1 GiB through the naive proxy (it holds it in memory)")
    parser.add_argument("--refresh-duration", type=float, default=10.0,
                        help="seconds of the token-rotation load (default 10)")
    parser.add_argument("--rotate", type=float, default=2.0,
                        help="access-token lifetime in the rotation test (default 2 s)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="after the rounds, sample each squirro-proxy with py-spy under the "
                             "small load and write collapsed stacks and a summary to DIR")
    parser.add_argument("--markdown", type=Path, metavar="FILE",
                        help="also write the table as Markdown (for the README)")
    parser.add_argument("--install", action="store_true",
                        help="apt-get install the missing tools (needs root)")
    args = parser.parse_args(argv)
    args.phases = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(args.phases) - set(PHASES) - set(EXTRA_PHASES)
    if unknown:
        parser.error(f"--only: unknown phase(s) {', '.join(sorted(unknown))}; "
                     f"choose from {', '.join(PHASES)}")
    if args.skip_large and "large" in args.phases:
        args.phases.remove("large")
    args.loops = [loop.strip() for loop in args.loops.split(",") if loop.strip()]
    if not set(args.loops) <= {"uvloop", "asyncio"} or not args.loops:
        parser.error("--loops: uvloop, asyncio or both")
    candidates = []
    for spec in args.candidate or [f"squirro={ROOT}"]:
        name, sep, path = spec.partition("=")
        if not sep or not (Path(path) / "proxy" / "__main__.py").exists():
            parser.error(f"--candidate {spec!r}: expected NAME=DIR with DIR/proxy/__main__.py")
        candidates.append((name, Path(path).resolve()))
    args.candidates = candidates
    args.proxy_args = shlex.split(args.proxy_args)
    args.own_args = {}
    for spec in args.candidate_args:
        name, sep, extra = spec.partition("=")
        if not sep or name not in {n for n, _ in candidates}:
            parser.error(f"--candidate-args {spec!r}: expected NAME=ARGS for a --candidate NAME")
        args.own_args[name] = shlex.split(extra)
    if args.latency_duration is None:
        args.latency_duration = max(2.0, args.duration / 2)
    if args.rounds < 1 or args.duration < 1:
        parser.error("--rounds and --duration must be at least 1")
    return args


def check_tools(install: bool, need_py_spy: bool, need_valgrind: bool) -> list[str]:
    """The tools that are missing after an optional install; explains how to get them."""
    wanted = ["nginx", "wrk", "curl", *(["py-spy"] if need_py_spy else []),
              *(["valgrind", "callgrind_control"] if need_valgrind else [])]
    missing = [tool for tool in wanted if which(tool) is None]
    apt = sorted({TOOLS[t] for t in missing if t != "py-spy"})
    if apt and install:
        print(f"installing {' '.join(apt)} with apt-get", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=False, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", *apt], check=False, timeout=600)
        missing = [tool for tool in wanted if which(tool) is None]
    if missing:
        print("missing tools: " + ", ".join(missing), file=sys.stderr)
        if any(t != "py-spy" for t in missing):
            print(f"  Debian/Ubuntu: apt-get install -y {' '.join(APT_PACKAGES)}"
                  f"{' valgrind' if need_valgrind else ''}  "
                  "(or rerun with --install as root)", file=sys.stderr)
        if "py-spy" in missing:
            print("  py-spy: pip install py-spy", file=sys.stderr)
    return missing


# --- the run ----------------------------------------------------------------------------------


class Bench:
    """One run: the upstream, the contenders, and every figure measured, by (target, metric)."""

    def __init__(self, args: argparse.Namespace, tmp: Path, body_tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.body_tmp = body_tmp
        self.values: Values = defaultdict(list)
        self.blocker = write_uvloop_blocker(tmp)
        check_uvloop_blocker(self.blocker)
        self.workdir = tmp / "cwd"
        self.workdir.mkdir()
        self.large = large_file(tmp) if "large" in args.phases else None
        self.upstream = self._nginx("upstream", "upstream", lambda port: upstream_conf(
            port, tmp, body_tmp, tmp))
        self.upstream.needs_auth = True
        self.upstream.name = "direct"

    def _nginx(self, name: str, kind: str, conf: Callable[[int], str]) -> Server:
        port = free_port()
        return nginx_server(name, kind, conf(port), self.tmp, port)

    def contenders(self) -> list[Server]:
        """Fresh (not started) servers for every contender, in a fixed order."""
        up = self.upstream
        out = [self._nginx("nginx", "nginx", lambda port: peer_conf(
            port, up.port, self.tmp, self.body_tmp))]
        if self.args.plain_nginx:
            out.append(self._nginx("nginx-plain", "nginx-plain", lambda port: plain_peer_conf(
                port, up.port, self.tmp, self.body_tmp)))
        if self.args.floor:
            out.append(floor_server(up, self.blocker))
        for loop in self.args.loops:
            uvloop = loop == "uvloop"
            if not self.args.no_naive:
                out.append(naive_server(up, uvloop, self.blocker))
            for name, path in self.args.candidates:
                out.append(squirro_server(name, path, up.base, uvloop, self.blocker,
                                          self.workdir, self.flags(name)))
        return out

    def flags(self, candidate: str) -> list[str]:
        return [*self.args.proxy_args, *self.args.own_args.get(candidate, [])]

    def record(self, target: str, metric: str, value: float) -> None:
        self.values[(target, metric)].append(value)

    def run(self) -> None:
        phases = self.args.phases
        self.upstream.start(self.tmp)
        servers = self.contenders()
        for server in servers:
            server.start(self.tmp)
        everyone = [self.upstream, *servers]
        for rnd in range(self.args.rounds):
            # Rotate the order each round so no contender always follows the same neighbour.
            shift = rnd % len(everyone)
            order = everyone[shift:] + everyone[:shift]
            print(f"\nround {rnd + 1}/{self.args.rounds}", flush=True)
            if "small" in phases:
                self.small(order)
            if "latency" in phases:
                self.latency(order)
            if "large" in phases:
                self.transfers(order)
            if "startup" in phases:
                self.startup()
            if "instructions" in phases:
                self.instructions()
            if "refresh" in phases:
                self.refresh()
            if "paired" in phases:
                self.paired([s for s in order if s.kind in ("squirro", "naive")])
        if self.args.profile:
            self.profile([s for s in servers if s.kind == "squirro"])
        for server in servers:
            server.stop()

    def small(self, order: list[Server]) -> None:
        """Each contender's load in 1 s slices, taken in turn: on a shared machine the speed
        drifts over tens of seconds, and contenders loaded one after the other for the whole
        duration met different stretches of it (the same build's CPU per request swung by a
        third between rounds, 2026-11-29). In slices they share each stretch alike."""
        for server in order:
            measure.wrk(server, connections=32, duration=1)  # warm the pools up
        slices = max(1, round(self.args.duration))
        rps: dict[str, list[float]] = {server.name: [] for server in order}
        p99: dict[str, list[float]] = {server.name: [] for server in order}
        requests = dict.fromkeys(rps, 0)
        cpu = dict.fromkeys(rps, 0.0)
        for _ in range(slices):
            for server in order:
                before = server.cpu()
                result = measure.wrk(server, connections=32, duration=1)
                cpu[server.name] += server.cpu() - before
                self._check(server, result)
                rps[server.name].append(result.rps)
                p99[server.name].append(result.p99_ms)
                requests[server.name] += result.requests
        for server in order:
            name = server.name
            mean_rps = statistics.fmean(rps[name])
            slice_p99 = statistics.median(p99[name])  # per slice: wrk reports no histogram
            # CPU time per request swings less than requests/s when other work shares the
            # machine (though it still swings: see the `instructions` phase for A/B work).
            cpu_us = cpu[name] / requests[name] * 1e6
            self.record(name, "rps", mean_rps)
            self.record(name, "p99", slice_p99)
            self.record(name, "cpu_us", cpu_us)
            print(f"  small  {name:<18} {mean_rps:9.0f} req/s  p99 "
                  f"{slice_p99:6.2f} ms  {cpu_us:6.1f} CPU us/req", flush=True)

    def instructions(self) -> None:
        for server in self.contenders():
            if server.kind not in ("squirro", "naive", "floor"):
                continue
            out = self.tmp / f"callgrind-{server.name}.out"
            server.argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                           f"--callgrind-out-file={out}", *server.argv]
            try:
                server.start(self.tmp, ready_timeout=300)
                kinstr, requests = measure.instructions_per_request(
                    server, out, self.args.duration)
            finally:
                server.stop()
            self.record(server.name, "kinstr", kinstr)
            print(f"  instr  {server.name:<18} {kinstr:7.1f} k instructions/request "
                  f"({requests} requests under callgrind)", flush=True)

    def paired(self, servers: list[Server]) -> None:
        measure.wrk_together(servers, connections=32, duration=1)
        cpu = [s.cpu() for s in servers]
        results = measure.wrk_together(servers, connections=32, duration=self.args.duration)
        for server, before, result in zip(servers, cpu, results, strict=True):
            self._check(server, result)
            cpu_us = (server.cpu() - before) / result.requests * 1e6
            self.record(server.name, "pair_rps", result.rps)
            self.record(server.name, "pair_cpu_us", cpu_us)
            print(f"  paired {server.name:<18} {result.rps:9.0f} req/s  {cpu_us:6.1f} CPU us/req",
                  flush=True)

    def latency(self, order: list[Server]) -> None:
        for server in order:
            measure.wrk(server, connections=1, duration=1, threads=1)
            result = measure.wrk(server, connections=1, duration=self.args.latency_duration,
                                 threads=1)
            self._check(server, result)
            self.record(server.name, "p50_1c", result.p50_ms)
            print(f"  1 conn {server.name:<18} median {result.p50_ms * 1000:7.1f} us", flush=True)

    def transfers(self, order: list[Server]) -> None:
        assert self.large is not None
        timeout = 300.0
        for server in order:
            if (server.kind == "naive" and not self.args.naive_large) or \
                    server.kind in ("nginx-plain", "floor"):
                continue
            measured = None if server is self.upstream else server
            down = measure.download(server, measured, timeout)
            up = measure.upload(server, measured, self.large, timeout)
            self.record(server.name, "down", down.mib_s)
            self.record(server.name, "up", up.mib_s)
            if measured is not None:
                assert down.rss_growth is not None and up.rss_growth is not None
                self.record(server.name, "rss_large", max(down.rss_growth, up.rss_growth) / 2**20)
            print(f"  1 GiB  {server.name:<18} down {down.mib_s:7.0f} MiB/s  up "
                  f"{up.mib_s:7.0f} MiB/s" + (
                      f"  peak RSS +{down.rss_growth / 2**20:.0f}/+{up.rss_growth / 2**20:.0f} "
                      "MiB" if down.rss_growth is not None and up.rss_growth is not None else ""),
                  flush=True)

    def startup(self) -> None:
        for server in self.contenders():
            try:
                server.start(self.tmp)
                self.record(server.name, "startup", server.ready_after)
                self.record(server.name, "idle_rss", measure.idle_rss_mib(server))
            finally:
                server.stop()
            print(f"  start  {server.name:<18} {server.ready_after * 1000:6.0f} ms to the first "
                  f"answer, idle RSS {self.values[(server.name, 'idle_rss')][-1]:.1f} MiB",
                  flush=True)

    def refresh(self) -> None:
        """256 connections while the access token rotates every few seconds."""
        duration = self.args.refresh_duration
        for name, path in self.args.candidates:
            for loop in self.args.loops:
                summary_file = self.tmp / "rotating.json"
                port = free_port()
                # It accepts no request without the newest token: up means it answers 401.
                rotating = Server(
                    "rotating", "upstream", port,
                    [sys.executable, str(Path(__file__).with_name("rotating_upstream.py")),
                     "--port", str(port), "--lifetime", str(self.args.rotate),
                     "--summary", str(summary_file)],
                    ready_status=401,
                )
                proxy = squirro_server(name, path, rotating.base, loop == "uvloop",
                                       self.blocker, self.workdir, self.flags(name))
                try:
                    rotating.start(self.tmp)
                    proxy.start(self.tmp)
                    result = measure.wrk(proxy, connections=256, duration=duration,
                                         count_statuses=True)
                finally:
                    proxy.stop()
                    rotating.stop()
                summary = json.loads(summary_file.read_text())
                calls = summary["token_calls"]
                gaps = [b - a for a, b in itertools.pairwise(calls)]
                self.record(proxy.name, "rot_requests", result.requests)
                self.record(proxy.name, "rot_failed", result.failed)
                self.record(proxy.name, "rot_socket_errors", result.socket_errors)
                statuses = result.statuses or {}
                self.record(proxy.name, "rot_401", statuses.get(401, 0))
                self.record(proxy.name, "rot_503", statuses.get(503, 0))
                self.record(proxy.name, "rot_calls", len(calls))
                self.record(proxy.name, "rot_bursts", sum(1 for g in gaps if g < 0.5))
                self.record(proxy.name, "rot_gap", statistics.median(gaps) if gaps else 0.0)
                self.record(proxy.name, "rot_upstream_401", summary["refused"])
                print(f"  rotate {proxy.name:<18} {result.requests} requests, {result.failed} "
                      f"failed (statuses {statuses}, {result.socket_errors} socket errors), "
                      f"{len(calls)} token calls (median gap "
                      f"{statistics.median(gaps) if gaps else 0:.2f} s), "
                      f"{summary['refused']} upstream 401s", flush=True)

    def profile(self, servers: list[Server]) -> None:
        out_dir: Path = self.args.profile
        out_dir.mkdir(parents=True, exist_ok=True)
        for server in servers:
            assert server.proc is not None
            collapsed = out_dir / f"{server.name}.collapsed"
            spy = measure.py_spy(server.proc.pid, self.args.duration, collapsed)
            try:
                time.sleep(0.3)
                result = measure.wrk(server, connections=32, duration=self.args.duration)
                spy.wait(timeout=self.args.duration + 30)
            finally:
                if spy.poll() is None:
                    spy.kill()
                    spy.wait(5)
            summary = measure.summarise_profile(collapsed)
            (out_dir / f"{server.name}.txt").write_text(
                f"{server.name}: {result.rps:.0f} req/s under py-spy\n{summary}\n")
            print(f"\nprofile of {server.name} ({result.rps:.0f} req/s while sampled):\n"
                  + "\n".join(summary.splitlines()[:20]), flush=True)

    @staticmethod
    def _check(server: Server, result: measure.WrkResult) -> None:
        if result.failed:
            raise RuntimeError(f"{server.name}: {result.non_2xx} non-2xx answers and "
                               f"{result.socket_errors} socket errors under load")


# --- the table --------------------------------------------------------------------------------


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def per_round_ratio(values: Values, target: str, base: str, metric: str) -> float | None:
    mine, theirs = values.get((target, metric), []), values.get((base, metric), [])
    ratios = [a / b for a, b in zip(mine, theirs, strict=False) if b]
    return median(ratios)


def naive_for(target: str) -> str:
    return "naive-asyncio" if target.endswith("-asyncio") else "naive"


def table(values: Values, names: list[str]) -> tuple[list[str], list[list[str]]]:
    def cell(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    head = ["", "req/s (32 conn)", "x nginx", "x nginx-plain", "x naive", "p99 ms", "x nginx",
            "x nginx-plain", "CPU us/req",
            "k instr/req",
            "added ms (1 conn)", "1 GiB down MiB/s", "x nginx", "1 GiB up MiB/s", "x nginx",
            "peak RSS + MiB", "idle RSS MiB", "start-up s"]
    rows = []
    for name in names:
        added = [a - b for a, b in zip(values.get((name, "p50_1c"), []),
                                       values.get(("direct", "p50_1c"), []), strict=False)]
        is_proxy = name != "direct"
        rows.append([
            name,
            cell(median(values.get((name, "rps"), [])), ".0f"),
            cell(per_round_ratio(values, name, "nginx", "rps"), ".2f"),
            cell(per_round_ratio(values, name, "nginx-plain", "rps")
                 if name not in ("direct", "nginx-plain") else None, ".2f"),
            cell(per_round_ratio(values, name, naive_for(name), "rps")
                 if name not in ("direct", "nginx", "nginx-plain") and not name.startswith("naive")
                 else None,
                 ".2f"),
            cell(median(values.get((name, "p99"), [])), ".2f"),
            cell(per_round_ratio(values, name, "nginx", "p99"), ".2f"),
            cell(per_round_ratio(values, name, "nginx-plain", "p99")
                 if name not in ("direct", "nginx-plain") else None, ".2f"),
            cell(median(values.get((name, "cpu_us"), [])), ".0f"),
            cell(median(values.get((name, "kinstr"), [])), ".0f"),
            cell(median(added) if is_proxy and added else None, ".3f"),
            cell(median(values.get((name, "down"), [])), ".0f"),
            cell(per_round_ratio(values, name, "nginx", "down"), ".2f"),
            cell(median(values.get((name, "up"), [])), ".0f"),
            cell(per_round_ratio(values, name, "nginx", "up"), ".2f"),
            cell(median(values.get((name, "rss_large"), [])), ".0f"),
            cell(median(values.get((name, "idle_rss"), [])), ".1f"),
            cell(median(values.get((name, "startup"), [])), ".2f"),
        ])
    # Leave out columns no phase filled.
    keep = [0] + [i for i in range(1, len(head)) if any(r[i] != "-" for r in rows)]
    return [head[i] for i in keep], [[r[i] for i in keep] for r in rows]


def refresh_table(values: Values, names: list[str]) -> tuple[list[str], list[list[str]]]:
    """Counts summed over the rounds (a single failure matters), the gap as a median."""
    head = ["", "requests", "failed", "of which 401", "503", "socket errors", "token calls",
            "median s between calls", "calls < 0.5 s apart", "upstream 401s"]
    rows = []
    for name in names:
        if (name, "rot_calls") not in values:
            continue
        row = [name] + [format(sum(values[(name, key)]), ".0f") for key in (
            "rot_requests", "rot_failed", "rot_401", "rot_503", "rot_socket_errors", "rot_calls")]
        row += [format(median(values[(name, "rot_gap")]) or 0, ".2f"),
                format(sum(values[(name, "rot_bursts")]), ".0f"),
                format(sum(values[(name, "rot_upstream_401")]), ".0f")]
        rows.append(row)
    return head, rows


def paired_table(values: Values, names: list[str]) -> tuple[list[str], list[list[str]]]:
    candidates = [n for n in names if (n, "pair_rps") in values]
    if not candidates:
        return [], []
    first = candidates[0]
    head = ["", "req/s (together)", f"x {first}", "CPU us/req", f"x {first}"]
    rows = [[name,
             format(median(values[(name, "pair_rps")]) or 0, ".0f"),
             format(per_round_ratio(values, name, first, "pair_rps") or 0, ".3f"),
             format(median(values[(name, "pair_cpu_us")]) or 0, ".1f"),
             format(per_round_ratio(values, name, first, "pair_cpu_us") or 0, ".3f")]
            for name in candidates]
    return head, rows


def render_text(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                       enumerate(zip(row, widths, strict=True))) for row in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |",
             "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    nginx = subprocess.run([which("nginx") or "nginx", "-v"], capture_output=True, text=True,
                           check=False, timeout=10).stderr.strip().split("/")[-1]
    import aiohttp

    return (f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
            f"aiohttp {aiohttp.__version__}, nginx {nginx}")


def report(bench: Bench, argv: Sequence[str], started: float, load_before: tuple[float, ...]
           ) -> str:
    names = ["direct", "nginx", *(["nginx-plain"] if bench.args.plain_nginx else []),
             *(["floor"] if bench.args.floor else [])]
    for loop in bench.args.loops:
        suffix = "" if loop == "uvloop" else "-asyncio"
        if not bench.args.no_naive:
            names.append("naive" + suffix)
        names += [name + suffix for name, _ in bench.args.candidates]
    head, rows = table(bench.values, names)
    rhead, rrows = refresh_table(bench.values, names)
    phead, prows = paired_table(bench.values, names)
    load_after = os.getloadavg()
    command = "python -m tests.benchmarks.run " + shlex.join(argv)
    context = (
        f"{bench.args.rounds} rounds, {bench.args.duration:g} s per load; "
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(started))} UTC; {machine()}; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
    )
    legend = (
        "Medians over the rounds. Ratios are taken within each round, then their median; "
        "x naive compares with the naive proxy on the same event loop. `direct` is the upstream "
        "itself; added ms is the median one-connection latency minus direct's. CPU us/req is the "
        "CPU time the server (for nginx: its worker) spent per request under the 32-connection "
        "load; k instr/req counts user-space instructions per request under callgrind (phase "
        "`instructions`), the one figure no other work on the machine disturbs. "
        "Rows without a suffix use uvloop, `-asyncio` ones asyncio's own loop."
    )
    text = [render_text(head, rows)]
    md = [f"`{command}`", "", context, "", render_markdown(head, rows)]
    if rrows:
        rot = (f"Token rotation: 256 connections for {bench.args.refresh_duration:g} s a round, "
               f"the access token valid {bench.args.rotate:g} s and only the newest accepted; "
               "counts summed over the rounds.")
        text += ["", rot, render_text(rhead, rrows)]
        md += ["", rot, "", render_markdown(rhead, rrows)]
    if prows:
        pair = "Paired: every candidate loaded at the same time (32 connections each)."
        text += ["", pair, render_text(phead, prows)]
        md += ["", pair, "", render_markdown(phead, prows)]
    md += ["", legend]
    if bench.args.markdown:
        bench.args.markdown.write_text("\n".join(md) + "\n")
    return "\n".join([command, context, "", *text, "", legend])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if check_tools(args.install, need_py_spy=args.profile is not None,
                   need_valgrind="instructions" in args.phases):
        return 2
    if "uvloop" in args.loops and importlib.util.find_spec("uvloop") is None:
        print("uvloop is not installed (pip install uvloop): measuring asyncio only",
              file=sys.stderr)
        args.loops = ["asyncio"]

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    tmp = Path(tempfile.mkdtemp(prefix="squirro-bench-"))
    shm = Path("/dev/shm")  # noqa: S108 - a private mkdtemp inside it
    # The upload sink spools each body before answering: on tmpfs that costs memory, not disk.
    body_tmp = Path(tempfile.mkdtemp(prefix="squirro-bench-", dir=shm if shm.is_dir() else None))
    # nginx started by root runs its worker as nobody, which must reach the files in here.
    tmp.chmod(0o755)
    body_tmp.chmod(0o755)
    started, load_before = time.time(), os.getloadavg()
    try:
        bench = Bench(args, tmp, body_tmp)
        bench.run()
        print("\n" + report(bench, argv, started, load_before))
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process the benchmark started", file=sys.stderr)
        return 130
    except (RuntimeError, subprocess.SubprocessError) as exc:
        print(f"\nbenchmark failed: {exc}\n(logs in {tmp})", file=sys.stderr)
        tmp = Path()  # keep the logs
        return 1
    finally:
        stop_all()
        shutil.rmtree(body_tmp, ignore_errors=True)
        if tmp != Path():
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
