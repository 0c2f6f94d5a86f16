"""The command line as a user runs it: a real process, its output and its exit code."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from tests.fakes import REFRESH_TOKEN, FakeCluster
from tests.processes import LISTEN, ProxyProcess, proxy_env, spawn


async def test_bad_configuration_exits_2_with_every_problem(tmp_path: Path) -> None:
    """A broken configuration: exit 2, each problem named, no traceback."""
    p = await spawn("--port", "abc", "--log-level", "loud", cwd=tmp_path)
    code, out = await p.finish()
    assert code == 2
    assert "--port: 'abc' is not valid" in out
    assert "--log-level: 'loud' is not valid" in out
    assert "SQUIRRO_CLUSTER / --cluster: missing" in out
    assert "SQUIRRO_TOKEN / --token: missing" in out
    assert "Traceback" not in out


async def test_unknown_flag_exits_2(tmp_path: Path) -> None:
    """An unknown flag is a usage error (argparse's exit 2), not a crash."""
    p = await spawn("--no-such-flag", cwd=tmp_path)
    code, out = await p.finish()
    assert code == 2 and "unrecognized arguments: --no-such-flag" in out
    assert "Traceback" not in out


async def test_help_lists_settings(tmp_path: Path) -> None:
    """--help explains settings with their variables and defaults."""
    p = await spawn("--help", cwd=tmp_path)
    assert p.proc.stdout is not None
    out = (await p.proc.stdout.read()).decode()
    assert await p.proc.wait() == 0
    flat = " ".join(out.split())
    for needle in ("--cluster URL", "SQUIRRO_CLUSTER", "--token-file", "SQUIRRO_PROXY_PORT",
                   "[default 8080]", "--demo"):
        assert needle in flat


async def test_start_up_line_serves_and_stops_on_sigterm(
    cluster: FakeCluster, cluster_url: URL, procs: list[ProxyProcess], tmp_path: Path
) -> None:
    """One start-up line names URL, cluster, user and tenant; SIGTERM exits 0; no token shown."""
    p = await spawn(env=proxy_env(cluster_url), cwd=tmp_path)
    procs.append(p)
    m = await p.wait_line(LISTEN)
    line = p.lines[-1]
    assert f"forwarding to {cluster_url}" in line
    assert "user user-1234" in line and "tenant squirro_test" in line
    async with aiohttp.ClientSession() as s, s.get(URL(m.group(1)) / "api/x") as resp:
        assert resp.status == 200
    p.proc.send_signal(signal.SIGTERM)
    code, out = await p.finish()
    assert code == 0
    assert REFRESH_TOKEN not in out and cluster.last_token not in out
    assert "GET /api/x 200" in out  # the access log line


async def test_graceful_shutdown_finishes_in_flight_requests(
    cluster: FakeCluster, cluster_url: URL, procs: list[ProxyProcess], tmp_path: Path
) -> None:
    """A request under way when SIGTERM arrives still completes; then the process exits 0."""
    arrived = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await asyncio.sleep(1.0)
        return web.Response(text="finished")

    cluster.hooks["echo"] = slow
    p = await spawn(env=proxy_env(cluster_url), cwd=tmp_path)
    procs.append(p)
    url = URL((await p.wait_line(LISTEN)).group(1))
    async with aiohttp.ClientSession() as s:
        pending = asyncio.ensure_future(s.get(url / "api/slow"))
        await arrived.wait()
        p.proc.send_signal(signal.SIGTERM)
        resp = await pending
        assert resp.status == 200 and await resp.text() == "finished"
        resp.release()
    code, _ = await p.finish()
    assert code == 0


async def test_rejected_token_at_start_up_exits_1(
    cluster: FakeCluster, cluster_url: URL, tmp_path: Path
) -> None:
    """An invalid refresh token: exit 1 with what happened and what to do, no traceback."""
    p = await spawn(env=proxy_env(cluster_url, SQUIRRO_TOKEN="not-the-right-token"), cwd=tmp_path)
    code, out = await p.finish()
    assert code == 1
    assert "rejected as invalid (404): create a new one under 'API Access'" in out
    assert "Traceback" not in out and "not-the-right-token" not in out


async def test_cluster_down_at_start_up_keeps_serving_503(
    procs: list[ProxyProcess], tmp_path: Path
) -> None:
    """With no cluster reachable the proxy keeps running, logs the failure and answers 503."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    p = await spawn(env=proxy_env(URL(f"http://127.0.0.1:{dead}")), cwd=tmp_path)
    procs.append(p)
    m = await p.wait_line(LISTEN)
    assert "waiting for the first access token" in p.lines[-1]
    async with aiohttp.ClientSession() as s, s.get(URL(m.group(1)) / "api/x") as resp:
        assert resp.status == 503
        body = await resp.json()
    assert body["error"] == "token_unavailable" and "cannot connect" in body["detail"]
    assert "Retry-After" in resp.headers
    p.proc.send_signal(signal.SIGINT)
    code, out = await p.finish()
    assert code == 0
    assert out.count("token refresh failed") >= 1 and "Traceback" not in out


async def test_token_flag_warns_about_ps(
    cluster_url: URL, procs: list[ProxyProcess], tmp_path: Path
) -> None:
    """--token on the command line works but warns that other users can see it."""
    env = proxy_env(cluster_url)
    del env["SQUIRRO_TOKEN"]
    p = await spawn("--token", REFRESH_TOKEN, env=env, cwd=tmp_path)
    procs.append(p)
    await p.wait_line(LISTEN)
    p.proc.send_signal(signal.SIGTERM)
    code, out = await p.finish()
    assert code == 0
    assert "other users of this machine can read it" in out
    assert REFRESH_TOKEN not in out


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_demo_mode_serves_projects(
    procs: list[ProxyProcess], tmp_path: Path, workers: str
) -> None:
    """--demo starts the simulated cluster, prints curl commands, and the projects list works
    (with worker processes too: the supervisor runs the demo cluster)."""
    p = await spawn("--demo", "--port", "0", "--workers", workers, cwd=tmp_path)
    procs.append(p)
    url = URL((await p.wait_line(LISTEN)).group(1))
    await p.wait_line("curl -s")
    async with aiohttp.ClientSession() as s:
        async with s.get(url / "api/topic/v0/squirro_demo/projects") as resp:
            assert resp.status == 200
            projects = await resp.json()
        async with s.get(url / "service/genai/chat/stream") as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            first = await resp.content.readline()
    assert {"id", "title"} <= set(projects[0])
    assert first.startswith(b"event: question")
    p.proc.send_signal(signal.SIGTERM)
    code, out = await p.finish()
    assert code == 0
    assert "Traceback" not in out


async def test_check_command_ok_and_failure(
    cluster: FakeCluster, cluster_url: URL, tmp_path: Path
) -> None:
    """`check` prints who the proxy acts as and exits 0, or the reason and exits 1."""
    p = await spawn("check", env=proxy_env(cluster_url), cwd=tmp_path)
    assert p.proc.stdout is not None
    out = (await p.proc.stdout.read()).decode()
    code, err = await p.finish()
    assert code == 0, err
    assert "OK" in out and "user user-1234" in out and "tenant squirro_test" in out
    assert REFRESH_TOKEN not in out + err

    bad = await spawn("check", env=proxy_env(cluster_url, SQUIRRO_TOKEN="wrong-token-123"),
                      cwd=tmp_path)
    code, err = await bad.finish()
    assert code == 1 and "FAILED" in err and "(404)" in err


async def test_port_in_use_is_a_clear_error(
    cluster_url: URL, tmp_path: Path
) -> None:
    """A busy port stops start-up with a message naming it and what to do: exit 2, no traceback."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = await spawn(env=proxy_env(cluster_url, SQUIRRO_PROXY_PORT=str(port)), cwd=tmp_path)
        code, out = await p.finish()
    assert code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in out and "choose another --port" in out
    assert "Traceback" not in out


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_unix_socket_path_taken_by_a_file_is_left_alone(
    cluster_url: URL, tmp_path: Path, workers: str
) -> None:
    """--unix-socket naming an ordinary file: exit 2 with the reason, and the file survives."""
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    env = proxy_env(cluster_url)
    del env["SQUIRRO_PROXY_PORT"]
    p = await spawn("--unix-socket", str(path), "--workers", workers, env=env, cwd=tmp_path)
    code, out = await p.finish()
    assert code == 2
    assert f"cannot listen on {path}" in out
    assert "Traceback" not in out
    assert path.read_text() == "keep me"


async def test_demo_on_a_unix_socket_suggests_working_commands(
    procs: list[ProxyProcess], tmp_path: Path
) -> None:
    """--demo with --unix-socket prints curl commands that use the socket."""
    sock = tmp_path / "p.sock"
    p = await spawn("--demo", "--unix-socket", str(sock), cwd=tmp_path)
    procs.append(p)
    await p.wait_line(f"curl --unix-socket {sock} -s http://localhost/api/topic/v0/")
    p.proc.send_signal(signal.SIGTERM)
    code, _ = await p.finish()
    assert code == 0
