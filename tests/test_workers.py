"""`--workers 2`: worker processes behind one port, one token for all, held by the supervisor.

The proxy runs as the real CLI; the fake cluster counts token calls and records, for each
request, the proxy's end of the connection, which tells the worker processes apart.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import stat
import time
from pathlib import Path

import aiohttp
import psutil
import pytest
from yarl import URL

from proxy.supervisor import KILL_MARGIN
from tests.fakes import FakeCluster
from tests.helpers import until
from tests.processes import LISTEN, ProxyProcess, proxy_env, spawn

PROJECTS = "api/topic/v0/squirro_test/projects"


async def _start(procs: list[ProxyProcess], cluster_url: URL, tmp_path: Path, *args: str,
                 workers: int = 2) -> tuple[ProxyProcess, URL]:
    p = await spawn("--workers", str(workers), *args, env=proxy_env(cluster_url), cwd=tmp_path)
    procs.append(p)
    base = URL((await p.wait_line(LISTEN)).group(1))
    await until(lambda: len(p.children()) == workers)
    return p, base


async def _get_many(base: URL, count: int, path: str = PROJECTS) -> list[int]:
    """`count` GETs, each on a connection of its own, so the kernel spreads them over workers."""
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True, limit=50)
    ) as client:

        async def one() -> int:
            async with client.get(base / path) as resp:
                await resp.read()
                return resp.status

        return list(await asyncio.gather(*(one() for _ in range(count))))


def _worker_of_port(p: ProxyProcess, cluster_port: int) -> dict[int, int]:
    """The proxy-side port of each connection to the cluster -> the worker pid holding it."""
    owners = {}
    for child in p.children():
        for conn in child.net_connections("tcp"):
            if conn.raddr and conn.raddr.port == cluster_port:
                owners[conn.laddr.port] = child.pid
    return owners


async def _until_every_worker_forwards(p: ProxyProcess, cluster: FakeCluster,
                                       cluster_url: URL, base: URL) -> None:
    """Batches of requests until each worker has forwarded some: the kernel spreads
    connections over the workers, though not in any fixed share."""
    workers = {c.pid for c in p.children()}
    served: set[int | None] = set()
    for _ in range(20):
        before = len(cluster.requests)
        assert await _get_many(base, 100) == [200] * 100
        owners = _worker_of_port(p, cluster_url.port or 0)
        served |= {owners.get(s.peer_port) for s in cluster.requests[before:]}
        if workers <= served:
            return
    raise AssertionError(f"workers {workers} did not all forward requests: {served}")


async def test_workers_share_the_port_and_one_token(
    procs: list[ProxyProcess], cluster: FakeCluster, cluster_url: URL, tmp_path: Path
) -> None:
    """Two workers both forward requests, and the cluster sees one token exchange for both."""
    p, base = await _start(procs, cluster_url, tmp_path)
    assert "with 2 worker processes" in "".join(p.lines)
    await _until_every_worker_forwards(p, cluster, cluster_url, base)
    assert cluster.token_calls == 1


async def test_401_refreshes_once_across_workers(
    procs: list[ProxyProcess], cluster: FakeCluster, cluster_url: URL, tmp_path: Path
) -> None:
    """A revoked token: 401s in every worker lead to one exchange, and every request succeeds."""
    _, base = await _start(procs, cluster_url, tmp_path)
    assert await _get_many(base, 50) == [200] * 50
    cluster.revoke_access_tokens()
    assert await _get_many(base, 200) == [200] * 200
    assert cluster.token_calls == 2


async def test_workers_get_each_new_token_from_the_supervisor(
    procs: list[ProxyProcess], cluster: FakeCluster, cluster_url: URL, tmp_path: Path
) -> None:
    """A refresh ahead of expiry reaches every worker at once: right after the supervisor's
    second exchange, both workers send the new token, though the old one is still valid."""
    cluster.lifetime = 3  # refreshed after 2.25-2.55 s, valid for 3 s
    p, base = await _start(procs, cluster_url, tmp_path)
    first = cluster.last_token
    await until(lambda: cluster.token_calls == 2)
    second = cluster.last_token
    assert second != first and cluster.tokens[first] > time.monotonic() + 0.2
    before = len(cluster.requests)
    await _until_every_worker_forwards(p, cluster, cluster_url, base)
    used = {dict(s.headers)["Authorization"] for s in cluster.requests[before:]}
    assert used == {f"Bearer {second}"}
    assert cluster.token_calls == 2


async def test_token_rotating_every_2_s_fails_no_request(
    procs: list[ProxyProcess], cluster: FakeCluster, cluster_url: URL, tmp_path: Path
) -> None:
    """Requests through both workers for 5 s of 2 s tokens: all answered, one exchange per
    refresh."""
    cluster.lifetime = 2
    _, base = await _start(procs, cluster_url, tmp_path)
    started = time.monotonic()
    while time.monotonic() - started < 5:
        assert await _get_many(base, 20) == [200] * 20
    elapsed = time.monotonic() - started
    # One exchange at start-up, then one per 80% (±5%) of the 2 s lifetime.
    assert 3 <= cluster.token_calls <= 2 + elapsed / 1.5


async def test_metrics_and_status_count_every_worker(
    procs: list[ProxyProcess], cluster_url: URL, tmp_path: Path
) -> None:
    """Whichever worker answers the scrape, it shows every worker's requests."""
    _, base = await _start(procs, cluster_url, tmp_path)
    assert await _get_many(base, 120) == [200] * 120
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True)
    ) as client:
        for _ in range(6):  # a new connection each time: either worker may answer
            async with client.get(base / "-/metrics") as resp:
                text = await resp.text()
            total = sum(float(m.group(1)) for m in re.finditer(
                r'^squirro_proxy_requests_total\{[^}]*\} (\S+)$', text, re.MULTILINE))
            assert total == 120
            assert re.search(r"^squirro_proxy_workers 2\.0$", text, re.MULTILINE)
            assert re.search(r"^squirro_proxy_token_refreshes_total\{outcome=\"ok\",reason=\"ok\"\}"
                             r" 1\.0$", text, re.MULTILINE)
            async with client.get(base / "-/status", params={"format": "json"}) as resp:
                data = json.loads(await resp.text())
            assert data["requests"]["total"] == 120
            assert data["workers"] == 2
            assert data["ready"] is True


def _sample(text: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found is not None, f"{name} is missing"
    return float(found.group(1))


async def test_process_metrics_sum_the_supervisor_and_workers(
    procs: list[ProxyProcess], cluster_url: URL, tmp_path: Path
) -> None:
    """process_* describe the whole proxy, whichever worker answers: memory and open files
    summed over the supervisor and both workers."""
    p, base = await _start(procs, cluster_url, tmp_path)
    tree = [psutil.Process(p.proc.pid), *p.children()]
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True)
    ) as client:
        for _ in range(4):
            async with client.get(base / "-/metrics") as resp:
                text = await resp.text()
            rss = _sample(text, "process_resident_memory_bytes")
            fds = _sample(text, "process_open_fds")
            expected_rss = sum(proc.memory_info().rss for proc in tree)
            assert 0.8 * expected_rss < rss < 1.2 * expected_rss
            assert fds >= sum(proc.num_fds() for proc in tree) - 10
            assert rss > 2 * max(proc.memory_info().rss for proc in tree)


async def test_sigterm_lets_every_worker_finish_its_requests(
    procs: list[ProxyProcess], cluster: FakeCluster, cluster_url: URL, tmp_path: Path
) -> None:
    """SIGTERM: requests in flight in the workers finish, then everything exits 0."""
    p, base = await _start(procs, cluster_url, tmp_path)
    children = p.children()
    arrived, release = cluster.hold_answers()
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True)
    ) as client:

        async def held() -> tuple[int, str]:
            async with client.get(base / "api/held") as resp:
                return resp.status, await resp.text()

        calls = [asyncio.ensure_future(held()) for _ in range(8)]
        await until(lambda: len(arrived) == 8)
        p.proc.send_signal(signal.SIGTERM)
        await p.wait_line("shutting down")
        await asyncio.sleep(0.3)
        release.set()
        assert await asyncio.gather(*calls) == [(200, "done")] * 8
    code, _ = await p.finish()
    assert code == 0
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)


async def test_workers_get_both_periods_of_their_own_stop(
    procs: list[ProxyProcess], cluster: FakeCluster, cluster_url: URL, tmp_path: Path
) -> None:
    """A worker's stop, like a single process's, gives a request up to two grace periods
    (aiohttp waits one, cancels, waits another): the supervisor does not kill it before, so an
    answer that comes after grace + KILL_MARGIN still reaches the client. (About 12 s.)"""
    p, base = await _start(procs, cluster_url, tmp_path, "--shutdown-grace", "6")
    arrived, release = cluster.hold_answers()
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True)
    ) as client:
        call = asyncio.ensure_future(client.get(base / "api/held"))
        await until(lambda: len(arrived) == 1)
        p.proc.send_signal(signal.SIGTERM)
        await p.wait_line("shutting down")
        await asyncio.sleep(6 + KILL_MARGIN + 0.5)  # past where the supervisor killed before
        release.set()
        resp = await asyncio.wait_for(call, 10)
        assert resp.status == 200 and await resp.text() == "done"
    code, _ = await p.finish()
    assert code == 0


async def test_ctrl_c_to_the_process_group_drains_every_worker(
    procs: list[ProxyProcess], cluster: FakeCluster, cluster_url: URL, tmp_path: Path
) -> None:
    """Ctrl-C in a terminal signals every process: workers drain (the supervisor's SIGTERM on
    top does not kill them), nothing is restarted, exit 0."""
    p = await spawn("--workers", "2", env=proxy_env(cluster_url), cwd=tmp_path, own_group=True)
    procs.append(p)
    base = URL((await p.wait_line(LISTEN)).group(1))
    await until(lambda: len(p.children()) == 2)
    await _until_every_worker_forwards(p, cluster, cluster_url, base)
    arrived, release = cluster.hold_answers()
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True)
    ) as client:

        async def held() -> int:
            async with client.get(base / "api/held") as resp:
                await resp.read()
                return resp.status

        calls = [asyncio.ensure_future(held()) for _ in range(16)]
        await until(lambda: len(arrived) == 16)
        os.killpg(p.proc.pid, signal.SIGINT)
        await p.wait_line("shutting down")
        await asyncio.sleep(0.5)
        release.set()
        assert await asyncio.gather(*calls) == [200] * 16
    code, out = await p.finish()
    assert code == 0
    assert "starting a new one" not in out
    assert "Traceback" not in out


async def test_second_ctrl_c_ends_the_drain_at_once(
    procs: list[ProxyProcess], cluster: FakeCluster, cluster_url: URL, tmp_path: Path
) -> None:
    """A second Ctrl-C while workers drain stops everything at once (exit 130), as it does for
    one process, instead of waiting out --shutdown-grace."""
    p = await spawn("--workers", "2", "--shutdown-grace", "30", env=proxy_env(cluster_url),
                    cwd=tmp_path, own_group=True)
    procs.append(p)
    base = URL((await p.wait_line(LISTEN)).group(1))
    await until(lambda: len(p.children()) == 2)
    children = p.children()
    arrived, _ = cluster.hold_answers()
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True)
    ) as client:
        call = asyncio.ensure_future(client.get(base / "api/held"))
        await until(lambda: len(arrived) == 1)
        os.killpg(p.proc.pid, signal.SIGINT)
        await p.wait_line("shutting down")
        started = asyncio.get_running_loop().time()
        os.killpg(p.proc.pid, signal.SIGINT)
        code, out = await p.finish()
        assert asyncio.get_running_loop().time() - started < 5
        with pytest.raises(aiohttp.ClientConnectionError):
            await call
    assert code == 130
    assert "second stop signal" in out and "Traceback" not in out
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)


async def test_a_dead_worker_is_replaced(
    procs: list[ProxyProcess], cluster: FakeCluster, cluster_url: URL, tmp_path: Path
) -> None:
    """A worker killed by a signal is started again; it gets the token without an exchange."""
    p, base = await _start(procs, cluster_url, tmp_path)
    victim = p.children()[0]
    victim.kill()
    await p.wait_line(rf"worker \d \(pid {victim.pid}\) was killed by signal 9; starting a new")
    await p.wait_line(rf"worker \d \(pid (?!{victim.pid}\))\d+\) serving")
    await until(lambda: len(p.children()) == 2 and victim.pid not in
                {c.pid for c in p.children()})
    await _until_every_worker_forwards(p, cluster, cluster_url, base)
    assert cluster.token_calls == 1


async def test_counters_do_not_go_down_when_a_worker_is_replaced(
    procs: list[ProxyProcess], cluster: FakeCluster, cluster_url: URL, tmp_path: Path
) -> None:
    """A killed worker's requests and CPU time stay in the totals after it is replaced, so
    Prometheus never sees a counter reset."""
    p, base = await _start(procs, cluster_url, tmp_path)
    await _until_every_worker_forwards(p, cluster, cluster_url, base)
    for _ in range(3):
        assert await _get_many(base, 200) == [200] * 200
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True)
    ) as client:

        async def scrape() -> tuple[float, float]:
            async with client.get(base / "-/metrics") as resp:
                text = await resp.text()
            requests = sum(float(m.group(1)) for m in re.finditer(
                r'^squirro_proxy_requests_total\{[^}]*\} (\S+)$', text, re.MULTILINE))
            return requests, _sample(text, "process_cpu_seconds_total")

        before_requests, _ = await scrape()
        victim = p.children()[0]
        victim_cpu = sum(victim.cpu_times()[:2])
        assert victim_cpu > 0.05
        victim.kill()
        await p.wait_line(rf"worker \d \(pid (?!{victim.pid}\))\d+\) serving")
        for _ in range(4):  # either worker may answer, the new one included
            live = [psutil.Process(p.proc.pid), *p.children()]
            live_cpu = sum(sum(proc.cpu_times()[:2]) for proc in live)
            requests, cpu = await scrape()
            assert requests == before_requests  # /-/ pages are not counted: nothing was lost
            # The living processes' time, and the killed worker's on top.
            assert cpu >= live_cpu + 0.9 * victim_cpu


async def test_workers_stop_when_the_supervisor_is_killed(
    procs: list[ProxyProcess], cluster_url: URL, tmp_path: Path
) -> None:
    """SIGKILL to the supervisor leaves no orphan workers: they see their channel close."""
    p, _ = await _start(procs, cluster_url, tmp_path)
    children = p.children()
    p.proc.kill()
    await p.proc.wait()
    _, alive = await asyncio.to_thread(psutil.wait_procs, children, 15)
    assert not alive


async def test_refused_token_at_start_up_exits_1_with_workers(
    procs: list[ProxyProcess], cluster: FakeCluster, cluster_url: URL, tmp_path: Path
) -> None:
    """The cluster refuses the token at start-up: exit 1 with the reason, workers stopped too."""
    cluster.token_statuses = [404]
    cluster.token_delay = 1.0  # time to see the workers before the refusal ends them
    p = await spawn("--workers", "2", env=proxy_env(cluster_url), cwd=tmp_path)
    procs.append(p)
    await until(lambda: len(p.children()) == 2)
    children = p.children()
    code, out = await p.finish()
    assert code == 1
    assert "cannot start: the token was rejected as invalid (404)" in out
    assert "Traceback" not in out
    _, alive = await asyncio.to_thread(psutil.wait_procs, children, 15)
    assert not alive


async def test_busy_port_is_one_clear_error(tmp_path: Path, cluster_url: URL) -> None:
    """A port in use: exit 2 with one message, before any worker starts."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        p = await spawn("--workers", "2", "--port", str(port),
                        env={**proxy_env(cluster_url), "SQUIRRO_PROXY_PORT": str(port)},
                        cwd=tmp_path)
        code, out = await p.finish()
    assert code == 2
    assert out.count("cannot listen on 127.0.0.1:") == 1
    assert "Address already in use" in out
    assert "Traceback" not in out


async def test_unix_socket_with_workers(
    procs: list[ProxyProcess], cluster_url: URL, tmp_path: Path
) -> None:
    """Workers serve the Unix socket too; it is created with mode 0600 and removed at exit."""
    path = tmp_path / "proxy.sock"
    env = proxy_env(cluster_url)
    del env["SQUIRRO_PROXY_PORT"]  # the Unix socket alone
    p = await spawn("--workers", "2", "--unix-socket", str(path), env=env, cwd=tmp_path)
    procs.append(p)
    await p.wait_line(r"listening on unix:")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(path))) as client:
        for _ in range(20):
            async with client.get("http://localhost/" + PROJECTS) as resp:
                assert resp.status == 200
    p.proc.send_signal(signal.SIGTERM)
    code, _ = await p.finish()
    assert code == 0
    assert not path.exists()


@pytest.mark.parametrize(("value", "problem"), [
    ("0", "--workers: '0' is not valid: expected a whole number from 1 to 64, or auto"),
    ("many", "--workers: 'many' is not valid"),
    ("65", "--workers: '65' is not valid"),
])
async def test_bad_workers_value_exits_2(
    tmp_path: Path, cluster_url: URL, value: str, problem: str
) -> None:
    """A bad --workers is a configuration error that says what is accepted."""
    p = await spawn("--workers", value, env=proxy_env(cluster_url), cwd=tmp_path)
    code, out = await p.finish()
    assert code == 2
    assert problem in out
    assert "Traceback" not in out


async def test_rotated_token_file_reaches_every_worker(
    procs: list[ProxyProcess], cluster: FakeCluster, cluster_url: URL, tmp_path: Path
) -> None:
    """SIGHUP after the token file changed: the supervisor exchanges the new refresh token
    once, and both workers go on with the access token it brought."""
    token_file = tmp_path / "token"
    token_file.write_text(cluster.refresh_token)
    env = proxy_env(cluster_url)
    del env["SQUIRRO_TOKEN"]
    p = await spawn("--workers", "2", env={**env, "SQUIRRO_TOKEN_FILE": str(token_file)},
                    cwd=tmp_path)
    procs.append(p)
    base = URL((await p.wait_line(LISTEN)).group(1))
    await until(lambda: len(p.children()) == 2)
    await _until_every_worker_forwards(p, cluster, cluster_url, base)
    new_refresh = "refresh-token-rotated-by-the-admin-0123"
    cluster.refresh_token = new_refresh  # the old one is refused from now on
    token_file.write_text(new_refresh)
    p.proc.send_signal(signal.SIGHUP)
    await until(lambda: cluster.token_calls == 2)
    assert cluster.token_forms[-1]["refresh_token"] == new_refresh
    before = len(cluster.requests)
    await _until_every_worker_forwards(p, cluster, cluster_url, base)
    used = {dict(s.headers)["Authorization"] for s in cluster.requests[before:]}
    assert used == {f"Bearer {cluster.last_token}"}
    assert cluster.token_calls == 2
    for child in p.children():  # workers ignore SIGHUP (the supervisor re-reads the file)
        assert child.is_running()


async def test_websocket_through_a_worker(
    procs: list[ProxyProcess], cluster: FakeCluster, cluster_url: URL, tmp_path: Path
) -> None:
    """A WebSocket handshake in a worker carries the supervisor's token; messages pass."""
    _, base = await _start(procs, cluster_url, tmp_path)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True)
    ) as client:
        for _ in range(4):  # new connections: whichever worker accepts
            async with client.ws_connect(base.with_scheme("ws") / "ws") as ws:
                await ws.send_str("hello")
                assert (await ws.receive(timeout=5)).data == "hello"
                await ws.send_bytes(b"\x00\x01")
                assert (await ws.receive(timeout=5)).data == b"\x00\x01"
    assert cluster.token_calls == 1
    assert sum(1 for event in cluster.ws_events if event[0] == "open") == 4
