"""Load generators and meters: wrk, curl, an RSS sampler. Each load is bounded in time."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .servers import LARGE_PATH, LARGE_SIZE, SMALL_PATH, UPLOAD_PATH, Server, tree_rss

_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


@dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int
    statuses: dict[int, int] | None = None  # with the statuses.lua script only

    @property
    def failed(self) -> int:
        return self.non_2xx + self.socket_errors


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match.group(1)) * _UNIT[match.group(2)]


def parse_wrk(output: str) -> WrkResult:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE)
    if not (rps and total and p50 and p99):
        raise ValueError(f"cannot read wrk output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    statuses = re.search(r"^STATUSES (\{.*\})$", output, re.MULTILINE)
    return WrkResult(
        rps=float(rps.group(1)), p50_ms=_ms(p50.group(1)), p99_ms=_ms(p99.group(1)),
        requests=int(total.group(1)), non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
        statuses={int(k): v for k, v in json.loads(statuses.group(1)).items()}
        if statuses else None,
    )


STATUS_SCRIPT = Path(__file__).with_name("statuses.lua")


def wrk_argv(server: Server, *, connections: int, duration: float, threads: int = 2,
             path: str = SMALL_PATH, count_statuses: bool = False) -> list[str]:
    argv = ["wrk", f"-t{min(threads, connections)}", f"-c{connections}",
            f"-d{max(1, round(duration))}s", "--latency", "--timeout", "5s"]
    if count_statuses:
        argv += ["-s", str(STATUS_SCRIPT)]
    for name, value in server.headers.items():
        argv += ["-H", f"{name}: {value}"]
    return [*argv, server.base + path]


def wrk(server: Server, *, connections: int, duration: float, threads: int = 2,
        path: str = SMALL_PATH, count_statuses: bool = False) -> WrkResult:
    """Keep-alive load on one URL for `duration` seconds."""
    argv = wrk_argv(server, connections=connections, duration=duration, threads=threads,
                    path=path, count_statuses=count_statuses)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60,
                          check=True)
    return parse_wrk(done.stdout)


def wrk_together(servers: list[Server], *, connections: int, duration: float
                 ) -> list[WrkResult]:
    """Load several servers at the same time, one wrk each: they share the machine's
    contention equally, so their ratios stay meaningful on a busy machine."""
    procs = [subprocess.Popen(wrk_argv(s, connections=connections, duration=duration,
                                       threads=1),
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for s in servers]
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=duration + 60)
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    return [parse_wrk(out) for out in outputs]


class PeakRss:
    """Samples a process tree's RSS every few milliseconds in a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid = pid
        self.interval = interval
        self.before = tree_rss(pid)
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def growth(self) -> int:
        return self.peak - self.before


@dataclass(frozen=True)
class Transfer:
    mib_s: float
    seconds: float
    rss_growth: int | None  # bytes; None when not measured (the upstream itself)


def _curl(argv: list[str], timeout: float) -> tuple[int, int, float, str]:
    # The figures come on a last line of their own, after the answer's body (if any).
    fmt = "\n%{http_code} %{size_download} %{size_upload} %{time_total}"
    done = subprocess.run(["curl", "-sS", "--max-time", str(timeout), "-w", fmt, *argv],
                          capture_output=True, text=True, timeout=timeout + 30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"curl failed ({done.returncode}): {done.stderr.strip()}")
    body, _, figures = done.stdout.rpartition("\n")
    code, down, up, seconds = figures.split()
    size = int(float(up)) if float(up) else int(float(down))
    return int(code), size, float(seconds), body


def download(server: Server, measured: Server | None, timeout: float) -> Transfer:
    """GET the 1 GiB file to /dev/null; `measured` is the process whose RSS growth counts."""
    argv = ["-o", "/dev/null"]
    for name, value in server.headers.items():
        argv += ["-H", f"{name}: {value}"]
    meter = PeakRss(measured.proc.pid) if measured and measured.proc else None
    with meter if meter is not None else contextlib.nullcontext():
        code, size, seconds, _ = _curl([*argv, server.base + LARGE_PATH], timeout)
    if code != 200 or size != LARGE_SIZE:
        raise RuntimeError(f"{server.name}: download answered {code} with {size} bytes")
    return Transfer(LARGE_SIZE / 2**20 / seconds, seconds, meter.growth if meter else None)


def upload(server: Server, measured: Server | None, source: Path, timeout: float) -> Transfer:
    """POST the 1 GiB file; the sink reports how much it read, which must be all of it."""
    argv = ["-X", "POST", "-T", str(source), "-H", "Expect:",
            "-H", "Content-Type: application/octet-stream"]
    for name, value in server.headers.items():
        argv += ["-H", f"{name}: {value}"]
    meter = PeakRss(measured.proc.pid) if measured and measured.proc else None
    with meter if meter is not None else contextlib.nullcontext():
        code, size, seconds, body = _curl([*argv, server.base + UPLOAD_PATH], timeout)
    received = json.loads(body or "{}").get("request_length", 0) if code == 200 else 0
    if code != 200 or size != LARGE_SIZE or received < LARGE_SIZE:
        raise RuntimeError(f"{server.name}: upload answered {code}, sent {size} bytes, the sink "
                           f"read {received}")
    return Transfer(LARGE_SIZE / 2**20 / seconds, seconds, meter.growth if meter else None)


def py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """Start py-spy sampling `pid` into a collapsed-stack file; it stops after `seconds`."""
    return subprocess.Popen(
        # Blocking mode: pausing the process for each sample slows it down, but nonblocking
        # samples of a busy event loop come out as torn stacks.
        ["py-spy", "record", "--rate", "250", "--format", "raw",
         "--duration", str(max(1, round(seconds))), "--pid", str(pid), "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )


def summarise_profile(collapsed: Path, top: int = 25) -> str:
    """Self and inclusive shares of the busiest frames in a py-spy collapsed-stack file."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "(no samples)"
    lines = [f"{total} samples", "", "self %   frame"]
    lines += [f"{100 * n / total:6.1f}   {f}" for f, n in own.most_common(top)]
    lines += ["", "total %  frame"]
    lines += [f"{100 * n / total:6.1f}   {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines)


def _short(frame: str) -> str:
    # "handle (proxy/forward.py:123)" -> "handle (proxy/forward.py)": lines split the counts.
    frame = re.sub(r":\d+\)$", ")", frame)
    frame = re.sub(r"\(/.*?/(site-packages|lib/python3\.\d+)/", "(", frame)
    return re.sub(r"\(/.*?/(proxy|tests)/", r"(\1/", frame)


def instructions_per_request(server: Server, out: Path, duration: float) -> tuple[float, int]:
    """Thousands of user-space instructions per small request, counted by callgrind.

    The server must run under `valgrind --tool=callgrind --instr-atstart=no`. Unlike time, the
    count does not depend on what else the machine is doing: the figure for A/B comparisons of
    small changes. Kernel work (the socket calls) is not counted.
    """
    assert server.proc is not None
    pid = str(server.proc.pid)
    # One connection: with several, how many requests share a turn of the event loop depends
    # on timing, and so would the count.
    wrk(server, connections=1, duration=2, threads=1)  # imports, pools and caches warm
    subprocess.run(["callgrind_control", "--instr=on", pid], check=True, capture_output=True,
                   timeout=60)
    result = wrk(server, connections=1, duration=duration, threads=1)
    subprocess.run(["callgrind_control", "--instr=off", pid], check=True, capture_output=True,
                   timeout=60)
    server.stop()  # callgrind writes its counts at exit
    if result.failed:
        raise RuntimeError(f"{server.name}: {result.failed} failed requests under callgrind")
    totals = re.search(r"^totals:\s+(\d+)", out.read_text(errors="replace"), re.MULTILINE)
    if totals is None:
        raise RuntimeError(f"no totals in {out}")
    return int(totals.group(1)) / result.requests / 1e3, result.requests


def idle_rss_mib(server: Server, settle: float = 0.5) -> float:
    time.sleep(settle)
    return server.rss() / 2**20
