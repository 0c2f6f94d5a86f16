"""What operators rely on: the `/-/` endpoints, request ids, access log formats, `check`."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from proxy.config import Secret
from proxy.errors import ERROR_HEADER
from proxy.logs import JsonFormatter, TextFormatter
from tests.conftest import Running, StartProxy
from tests.fakes import REFRESH_TOKEN, FakeCluster
from tests.helpers import closed_port, until
from tests.test_cli import ProxyProcess, spawn

CLIENT_TOKEN = "client-token-for-ops-tests-0123"


async def fetch(client: aiohttp.ClientSession, url: URL, **kw: object
                ) -> tuple[int, dict[str, str], bytes]:
    async with client.get(url, **kw) as resp:  # type: ignore[arg-type]
        return resp.status, dict(resp.headers), await resp.read()


@contextlib.asynccontextmanager
async def cli_process(*args: str, env: dict[str, str], cwd: Path
                      ) -> AsyncIterator[ProxyProcess]:
    """`python -m proxy ARGS` running for the block; killed afterwards if still alive."""
    proc = await spawn(*args, env=env, cwd=cwd)
    try:
        yield proc
    finally:
        await proc.stop()


# --- liveness and readiness ----------------------------------------------------------------------


async def test_healthy_answers_200_without_asking_the_cluster(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """GET and HEAD /-/healthy answer 200 from the proxy itself."""
    status, headers, body = await fetch(client, proxy.url / "-/healthy")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    assert headers["Cache-Control"] == "no-store"
    async with client.head(proxy.url / "-/healthy") as resp:
        assert resp.status == 200
    assert cluster.api_requests() == []


async def test_healthy_answers_while_the_cluster_is_down(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    """Liveness does not depend on the cluster: a restart would not help."""
    proxy = await start_proxy(cluster=URL(f"http://127.0.0.1:{closed_port()}"),
                              wait_token=False)
    status, _, _ = await fetch(client, proxy.url / "-/healthy")
    assert status == 200


async def test_ready_is_200_with_a_valid_token(
    proxy: Running, client: aiohttp.ClientSession
) -> None:
    """Readiness: a valid access token is held."""
    status, _, body = await fetch(client, proxy.url / "-/ready")
    assert status == 200 and json.loads(body) == {"status": "ready"}


async def test_ready_is_503_before_the_first_token_then_200(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """A sidecar is not ready before its first token, and becomes ready once it has one."""
    cluster.token_down = True
    proxy = await start_proxy(wait_token=False)
    await until(lambda: cluster.token_calls >= 1)
    status, headers, body = await fetch(client, proxy.url / "-/ready")
    assert status == 503 and headers[ERROR_HEADER] == "not_ready"
    assert json.loads(body)["detail"].startswith("no access token yet")
    cluster.token_down = False
    await proxy.tokens.wait_first()
    status, _, _ = await fetch(client, proxy.url / "-/ready")
    assert status == 200


async def test_ready_is_503_after_the_refresh_token_was_revoked(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """Once the cluster refuses the refresh token (404), the proxy is no longer ready."""
    cluster.refresh_token = "someone-else-entirely-0000"  # revoked: the next exchange gets 404
    cluster.revoke_access_tokens()
    status, _, _ = await fetch(client, proxy.url / "api/x")
    assert status == 503
    status, _, body = await fetch(client, proxy.url / "-/ready")
    assert status == 503
    assert json.loads(body)["detail"] == "the cluster refused the refresh token"


async def test_ready_is_503_once_the_token_expired_and_refresh_fails(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """An expired access token with a failing refresh makes the proxy not ready."""
    cluster.lifetime = 0.5
    proxy = await start_proxy()
    cluster.token_down = True
    await until(lambda: not proxy.tokens.current.valid(time.monotonic()))
    status, _, body = await fetch(client, proxy.url / "-/ready")
    assert status == 503
    assert json.loads(body)["detail"] == "the access token expired and refreshing it is failing"


async def test_probe_answers_reveal_nothing_about_the_cluster(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    """A failing readiness probe names no host, port or failure detail (any Host may ask)."""
    port = closed_port()
    proxy = await start_proxy(cluster=URL(f"http://127.0.0.1:{port}"), wait_token=False)
    await until(lambda: proxy.tokens.failure is not None)
    assert str(port) in proxy.tokens.failure.reason  # the detail exists ...
    for path in ("-/ready", "-/healthy"):
        _, _, body = await fetch(client, proxy.url / path)
        assert str(port) not in body.decode() and "connect" not in body.decode()  # ... not here


@pytest.mark.parametrize("path", ["/-/healthy", "/-/ready"])
@pytest.mark.parametrize("host", ["10.1.2.3:8080", "squirro-proxy:8080", "pod.internal"])
async def test_probes_answer_any_host_without_the_client_token(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession,
    path: str, host: str,
) -> None:
    """kubelet and Docker probe with the pod's address as Host and no token: still 200."""
    proxy = await start_proxy(client_token=Secret(CLIENT_TOKEN))
    status, _, _ = await fetch(client, proxy.url.with_path(path), headers={"Host": host})
    assert status == 200


@pytest.mark.parametrize("path", ["/-/metrics", "/-/status"])
async def test_metrics_and_status_follow_the_client_token_rule(
    start_proxy: StartProxy, client: aiohttp.ClientSession, path: str
) -> None:
    """With a client token set, /-/metrics and /-/status need it, like the API."""
    proxy = await start_proxy(client_token=Secret(CLIENT_TOKEN))
    status, _, _ = await fetch(client, proxy.url.with_path(path))
    assert status == 401
    status, _, _ = await fetch(client, proxy.url.with_path(path),
                               headers={"Authorization": f"Bearer {CLIENT_TOKEN}"})
    assert status == 200


@pytest.mark.parametrize("path", ["/-/metrics", "/-/status"])
async def test_metrics_and_status_refuse_foreign_hosts(
    proxy: Running, client: aiohttp.ClientSession, path: str
) -> None:
    """/-/metrics and /-/status follow the Host allowlist (DNS rebinding), unlike probes."""
    status, _, _ = await fetch(client, proxy.url.with_path(path),
                               headers={"Host": "attacker.example:8080"})
    assert status == 403


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/-/", 404),
        ("GET", "/-/nope", 404),
        ("GET", "/-/healthy/extra", 404),
        ("GET", "/-/api/topic/v0/t/projects", 404),
        ("POST", "/-/healthy", 405),
        ("DELETE", "/-/ready", 405),
        ("PUT", "/-/metrics", 405),
        ("POST", "/-/status", 405),
    ],
)
async def test_reserved_prefix_is_never_forwarded(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession,
    method: str, path: str, status: int,
) -> None:
    """Anything under /-/ is answered by the proxy (404/405 JSON) and never reaches the cluster."""
    async with client.request(method, proxy.url.with_path(path)) as resp:
        assert resp.status == status
        assert ERROR_HEADER in resp.headers
        body = await resp.json()
    assert body["status"] == status
    assert cluster.api_requests() == []


# --- status --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "query", "is_json"),
    [
        ({"Accept": "application/json"}, {}, True),
        ({"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}, {}, False),
        ({"Accept": "text/html;q=0.5, application/json"}, {}, True),
        ({"Accept": "application/json;q=0.1, text/html"}, {}, False),
        ({}, {}, False),
        ({"Accept": "text/html"}, {"format": "json"}, True),
    ],
)
async def test_status_negotiates_html_or_json(
    proxy: Running, client: aiohttp.ClientSession, headers: dict[str, str],
    query: dict[str, str], is_json: bool,
) -> None:
    """/-/status is a page for a browser and JSON for `Accept: application/json`."""
    async with client.get(proxy.url / "-/status", headers=headers, params=query) as resp:
        assert resp.status == 200
        assert resp.content_type == ("application/json" if is_json else "text/html")


async def test_status_json_carries_what_the_page_shows(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """Cluster, identity, token age and time left, refreshes, counts, latency, errors."""
    for path in ("api/a", "api/b", "status/404", "status/502"):
        await fetch(client, proxy.url / path)
    _, _, body = await fetch(client, proxy.url / "-/status",
                             headers={"Accept": "application/json"})
    data = json.loads(body)
    assert data["ready"] is True and data["not_ready_reason"] is None
    assert data["cluster"] == str(proxy.settings.cluster)
    assert data["identity"] == {"tenant": "squirro_test", "user_id": "user-1234",
                                "role": "admin"}
    token = data["access_token"]
    assert token["lifetime_seconds"] == 600
    assert 590 < token["expires_in_seconds"] <= 600 and 0 <= token["age_seconds"] < 10
    assert 0 < token["refresh_in_seconds"] < token["expires_in_seconds"]
    assert data["refreshes"]["ok"] == 1
    assert data["refreshes"]["recent"][0]["trigger"] == "startup"
    assert data["requests"]["total"] == 4
    assert data["requests"]["by_status_class"] == {"2xx": 2, "4xx": 1, "5xx": 1}
    latency = data["upstream_latency_ms"]
    assert latency["samples"] == 4 and 0 < latency["p50"] <= latency["p90"] <= latency["p99"]
    [error] = data["recent_errors"]
    assert (error["status"], error["path"], error["error"]) == (502, "/status/502", "cluster")


async def test_status_lists_proxy_made_upstream_errors(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """A 502 the proxy made (the cluster dropped the connection) shows with its code and
    detail, and secret-looking query values masked."""

    async def hang_up(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.abort()
        return web.Response()

    cluster.hooks["echo"] = hang_up
    status, _, _ = await fetch(client, proxy.url / "api/x", params={"token": "s3cr3t-value"})
    assert status == 502
    _, _, body = await fetch(client, proxy.url / "-/status", params={"format": "json"})
    [error] = json.loads(body)["recent_errors"]
    assert error["status"] == 502 and error["error"] == "cluster_connection_failed"
    assert error["path"] == "/api/x?token=********"
    assert "connection to the cluster failed" in error["detail"]


async def test_no_token_in_metrics_or_status(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """Neither the refresh token nor any access token appears in /-/metrics or /-/status."""
    cluster.revoke_access_tokens()
    await fetch(client, proxy.url / "api/x")  # a 401, a refresh and a retry
    secrets = [REFRESH_TOKEN, *cluster.tokens]
    assert len(secrets) >= 2
    for path, accept in (("-/metrics", "*/*"), ("-/status", "text/html"),
                         ("-/status", "application/json")):
        _, _, body = await fetch(client, proxy.url / path, headers={"Accept": accept})
        text = body.decode()
        assert not [s for s in secrets if s in text], path


# --- request ids ---------------------------------------------------------------------------------


async def test_incoming_request_id_is_kept_forwarded_and_returned(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """A well-formed X-Request-ID reaches the cluster and comes back unchanged."""
    rid = "trace-4bf92f3577b34da6a3ce929d0e0e4736"
    async with client.get(proxy.url / "api/x", headers={"X-Request-ID": rid}) as resp:
        assert resp.headers["X-Request-ID"] == rid
    [seen] = cluster.api_requests()
    assert [v for k, v in seen.headers if k.lower() == "x-request-id"] == [rid]


async def test_request_id_is_generated_when_missing(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """Without X-Request-ID one is made, forwarded and returned; each request gets its own."""
    ids = []
    for _ in range(2):
        async with client.get(proxy.url / "api/x") as resp:
            ids.append(resp.headers["X-Request-ID"])
    forwarded = [v for r in cluster.api_requests() for k, v in r.headers
                 if k.lower() == "x-request-id"]
    assert forwarded == ids and ids[0] != ids[1] and re.fullmatch(r"[0-9a-f]{24}", ids[0])


@pytest.mark.parametrize(
    "bad",
    [
        "has spaces in it",
        "x" * 129,
        "semi;colon",
        "quote\"d",
        "<script>",
    ],
)
async def test_malformed_request_id_is_replaced(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession, bad: str
) -> None:
    """An X-Request-ID that could break log lines or headers is replaced by a fresh one."""
    async with client.get(proxy.url / "api/x", headers={"X-Request-ID": bad}) as resp:
        returned = resp.headers["X-Request-ID"]
    assert returned != bad and re.fullmatch(r"[0-9a-f]{24}", returned)
    [seen] = cluster.api_requests()
    assert [v for k, v in seen.headers if k.lower() == "x-request-id"] == [returned]


# --- access log ----------------------------------------------------------------------------------


ACCESS_FIELDS = {"method", "path", "status", "bytes", "duration_ms", "upstream_ms", "retried",
                 "request_id"}


async def access_records(caplog: pytest.LogCaptureFixture, count: int) -> list[logging.LogRecord]:
    await until(lambda: len([r for r in caplog.records if r.name == "squirro_proxy.access"])
                >= count)
    return [r for r in caplog.records if r.name == "squirro_proxy.access"]


async def test_access_record_fields_in_json_and_text(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Both formats carry time, level, event, method, path, status, bytes, duration, upstream
    latency, retried and request id for the same request."""
    caplog.set_level(logging.INFO, logger="squirro_proxy.access")
    proxy = await start_proxy()
    cluster.revoke_access_tokens()  # this request is retried after a 401
    async with client.get(URL(f"{proxy.url}/api/x?apikey=hunter2&page=2"),
                          headers={"X-Request-ID": "req-42"}) as resp:
        size = len(await resp.read())
    [record] = await access_records(caplog, 1)

    data = json.loads(JsonFormatter().format(record))
    assert {"time", "level", "event"} | ACCESS_FIELDS <= set(data)
    assert data["level"] == "info" and re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+Z", data["time"])
    assert (data["method"], data["status"], data["bytes"]) == ("GET", 200, size)
    assert data["path"] == "/api/x?apikey=********&page=2"
    assert data["retried"] is True and data["request_id"] == "req-42"
    assert data["upstream_ms"] > 0 and data["duration_ms"] >= data["upstream_ms"]

    line = TextFormatter().format(record)
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d INFO    GET /api/x\?apikey=\*{8}&page=2 200 "
        rf"{size}B [\d.]+ms upstream=[\d.]+ms retried-after-401 id=req-42", line,
    ), line
    assert "hunter2" not in line + json.dumps(data)


async def test_access_record_for_a_proxy_error(
    start_proxy: StartProxy, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture,
) -> None:
    """A request the proxy answered itself is logged with no upstream latency."""
    caplog.set_level(logging.INFO, logger="squirro_proxy.access")
    proxy = await start_proxy(cluster=URL(f"http://127.0.0.1:{closed_port()}"),
                              wait_token=False)
    await fetch(client, proxy.url / "api/x")
    [record] = await access_records(caplog, 1)
    data = json.loads(JsonFormatter().format(record))
    assert data["status"] == 503 and data["upstream_ms"] is None and data["retried"] is False


async def test_access_record_for_a_client_that_left(
    start_proxy: StartProxy, cluster: FakeCluster, caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that leaves mid-stream still gets its access line: 499, as nginx logs it, with
    the bytes it was sent and the request id the cluster saw."""
    caplog.set_level(logging.INFO, logger="squirro_proxy.access")
    proxy = await start_proxy()
    async with aiohttp.ClientSession() as client:
        resp = await client.get(proxy.url / "sse-live")
        cluster.sse_queue.put_nowait("first")
        assert await resp.content.readline() == b"data: first\n"
        returned = resp.headers["X-Request-ID"]
        resp.close()  # the client leaves; the stream has not ended
    [record] = await access_records(caplog, 1)
    data = json.loads(JsonFormatter().format(record))
    assert data["status"] == 499 and data["request_id"] == returned
    assert data["bytes"] == len(b"data: first\n\n") and data["upstream_ms"] > 0
    assert "client-went-away" in TextFormatter().format(record)
    cluster.sse_queue.put_nowait(None)


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_cli_log_format(
    cluster_url: URL, tmp_path: Path, client: aiohttp.ClientSession, fmt: str
) -> None:
    """--log-format json writes one JSON object per line; text writes lines for people."""
    async with cli_process("--log-format", fmt, env={
            "SQUIRRO_CLUSTER": str(cluster_url), "SQUIRRO_TOKEN": REFRESH_TOKEN,
            "SQUIRRO_PROXY_PORT": "0"}, cwd=tmp_path) as proc:
        match = await proc.wait_line(r"listening on (http://127\.0\.0\.1:\d+)")
        url = URL(match.group(1))
        async with client.get(url / "api/x", headers={"X-Request-ID": "cli-1"}) as resp:
            assert resp.status == 200
        await proc.wait_line("cli-1")
        proc.proc.terminate()
        code, output = await proc.finish()
    assert code == 0
    lines = [line for line in output.splitlines() if line.strip()]
    if fmt == "json":
        records = [json.loads(line) for line in lines]
        [access] = [r for r in records if r.get("event_type") == "access"]
        assert set(access) >= ACCESS_FIELDS and access["request_id"] == "cli-1"
    else:
        assert not any(line.startswith("{") for line in lines)
        assert any(re.search(r"INFO +GET /api/x 200 .* id=cli-1$", line) for line in lines)
    assert REFRESH_TOKEN not in output


def test_json_output_keeps_the_redaction() -> None:
    """A registered secret in a message is masked in the JSON output `configure` sets up."""
    from proxy.logs import configure
    from proxy.redact import REDACTOR

    REDACTOR.add("a-secret-that-slipped-in")
    root, ours = logging.getLogger(), logging.getLogger("squirro_proxy")
    saved = (list(root.handlers), root.level, ours.level)  # pytest's capture handlers among them
    stream = io.StringIO()
    configure("info", "json", stream)
    try:
        logging.getLogger("squirro_proxy.test").warning("oops: %s", "a-secret-that-slipped-in")
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        ours.setLevel(saved[2])
    record = json.loads(stream.getvalue())
    assert record["event"] == "oops: ********" and record["level"] == "warning"


# --- check ---------------------------------------------------------------------------------------


async def run_check(env: dict[str, str], cwd: Path, *args: str) -> tuple[int, str, str]:
    """`squirro-proxy check ARGS`: exit code, stdout, stderr."""
    proc = await spawn("check", *args, env=env, cwd=cwd)
    assert proc.proc.stdout is not None
    out = (await proc.proc.stdout.read()).decode()
    code, err = await proc.finish()
    return code, out, err


async def test_check_prints_cluster_tenant_user_and_role(
    cluster_url: URL, tmp_path: Path
) -> None:
    """`check` exchanges once and prints who the proxy acts as, never a token; exit 0."""
    code, out, err = await run_check({"SQUIRRO_CLUSTER": str(cluster_url),
                                      "SQUIRRO_TOKEN": REFRESH_TOKEN}, tmp_path)
    assert code == 0, err
    assert out.startswith("squirro-proxy check: OK\n")
    rows = dict(re.findall(r"^  ([\w ]+):\s+(.*)$", out, re.MULTILINE))
    assert rows["cluster"] == str(cluster_url)
    assert (rows["tenant"], rows["user"], rows["role"]) == ("squirro_test", "user-1234", "admin")
    assert rows["access token"] == "valid for 600 s"
    assert rows["TLS"] == "none (plain http)" and rows["token from"] == "SQUIRRO_TOKEN"
    assert REFRESH_TOKEN not in out + err


@pytest.mark.parametrize(
    ("env", "code", "reason"),
    [
        ({"SQUIRRO_TOKEN": "not-the-right-token-000"}, 1, "rejected as invalid (404)"),
        ({"SQUIRRO_CLUSTER": "DEAD"}, 3, "cannot connect to 127.0.0.1"),
        ({"SQUIRRO_PROXY_PORT": "99999"}, 2, "SQUIRRO_PROXY_PORT"),
        ({"SQUIRRO_CLUSTER": ""}, 2, "SQUIRRO_CLUSTER"),
    ],
)
async def test_check_failures_exit_non_zero_with_the_reason(
    cluster_url: URL, tmp_path: Path, env: dict[str, str], code: int, reason: str
) -> None:
    """Refused token: 1; bad configuration: 2; cluster unreachable: 3; each with the reason."""
    full = {"SQUIRRO_CLUSTER": str(cluster_url), "SQUIRRO_TOKEN": REFRESH_TOKEN, **env}
    if full["SQUIRRO_CLUSTER"] == "DEAD":
        full["SQUIRRO_CLUSTER"] = f"http://127.0.0.1:{closed_port()}"
    got, out, err = await run_check(full, tmp_path)
    assert got == code, err
    assert reason in err
    assert "Traceback" not in err and REFRESH_TOKEN not in out + err


async def test_check_with_a_token_file(
    cluster_url: URL, tmp_path: Path
) -> None:
    """`check` names the token file it read (the path, not its content)."""
    path = tmp_path / "token"
    path.write_text(REFRESH_TOKEN + "\n")
    code, out, err = await run_check({"SQUIRRO_CLUSTER": str(cluster_url),
                                      "SQUIRRO_TOKEN_FILE": str(path)}, tmp_path)
    assert code == 0, err
    assert f"token from:   {path}" in out and REFRESH_TOKEN not in out + err

