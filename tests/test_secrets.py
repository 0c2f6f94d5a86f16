"""No token, of any kind, in anything the proxy prints or answers.

The proxy runs as the real CLI (a subprocess, debug logging) against the fake cluster with a
one-second access-token lifetime and refresh-token rotation, so it refreshes several times. It is
driven through allowed, refused, malformed and retried requests, the ops endpoints and a token
endpoint outage; then everything it printed and every answer it gave is scanned for every refresh
token, access token, client token and client secret that existed during the run.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from proxy.config import ConfigError, load
from tests.fakes import REFRESH_TOKEN, FakeCluster

CLIENT_TOKEN = "client-token-Zq8xWv3KpL0mN7rT"
CLIENT_SECRET = "client-secret-Hj4kL9pQ2wE6rT8y"
PROJECTS = "/api/topic/v0/squirro_test/projects"


async def _quiet_echo(request: web.Request) -> web.Response:
    # The fake's default echo repeats the request headers, bearer included: that would be the
    # cluster printing a token, not the proxy. Answer without them.
    return web.json_response({"method": request.method})


async def _raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def _secrets(cluster: FakeCluster) -> set[str]:
    found = {REFRESH_TOKEN, CLIENT_TOKEN, CLIENT_SECRET, cluster.refresh_token}
    found |= {form["refresh_token"] for form in cluster.token_forms if "refresh_token" in form}
    found |= set(cluster.tokens)
    # The encoded forms a careless log line would show.
    found |= {base64.b64encode(f"me:{CLIENT_TOKEN}".encode()).decode()}
    return found


@pytest.mark.parametrize(("log_format", "workers"), [("text", 1), ("json", 1), ("text", 2)])
async def test_nothing_printed_or_answered_holds_a_token(
    cluster: FakeCluster, cluster_url: URL, tmp_path: Path, log_format: str, workers: int
) -> None:
    """A debug-logged run with several refreshes prints and answers no token of any kind (also
    with worker processes, to which the supervisor hands every token)."""
    cluster.lifetime = 1  # refresh about every 0.8 s
    cluster.rotate = True
    cluster.hooks["echo"] = _quiet_echo
    env = {
        "PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path),
        "SQUIRRO_CLUSTER": str(cluster_url),
        "SQUIRRO_PROXY_CLIENT_TOKEN": CLIENT_TOKEN,
        "SQUIRRO_PROXY_CLIENT_SECRET": CLIENT_SECRET,
    }
    argv = ["--port", "0", "--log-level", "debug", "--log-format", log_format,
            "--workers", str(workers)]
    if log_format == "text":
        argv += ["--token", REFRESH_TOKEN]  # the ps warning must not repeat it either
    else:
        env["SQUIRRO_TOKEN"] = REFRESH_TOKEN
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *argv, env=env, cwd=str(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    printed: list[bytes] = []
    answered: list[str] = []

    async def collect(stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            printed.append(line)

    readers = [asyncio.ensure_future(collect(s)) for s in (process.stdout, process.stderr)]
    try:
        port = await _listening_port(printed)
        base = URL(f"http://127.0.0.1:{port}")
        good = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client:

            async def call(method: str, url: URL, **kwargs: Any) -> int:
                async with client.request(method, url, **kwargs) as resp:
                    answered.append(repr(list(resp.headers.items())))
                    answered.append((await resp.read()).decode("utf-8", "replace"))
                    return resp.status

            assert await call("GET", base / PROJECTS[1:], headers=good) == 200
            basic = "Basic " + base64.b64encode(f"me:{CLIENT_TOKEN}".encode()).decode()
            assert await call("POST", base / "api/x", headers={"Authorization": basic},
                              data=b"{}") == 200
            assert await call("GET", base / "api/x") == 401
            assert await call("GET", base / "api/x",
                              headers={"Authorization": f"Bearer {REFRESH_TOKEN}"}) == 401
            assert await call("GET", base / "api/x", headers={**good, "Host": "evil"}) == 403
            assert await call("GET", (base / "api/x").with_query(
                {"token": CLIENT_TOKEN, "api_key": REFRESH_TOKEN}), headers=good) == 200
            # A 401 from the cluster: refresh and retry once.
            cluster.revoke_access_tokens()
            assert await call("GET", base / "api/retried", headers=good) == 200
            for path in ("-/status", "-/metrics", "-/ready", "-/healthy"):
                assert await call("GET", base / path, headers=good) == 200
            assert await call("GET", (base / "-/status").with_query({"format": "json"}),
                              headers=good) == 200
            # Malformed requests carrying credentials: the parser's complaint quotes the bytes.
            for bad in (f"Authorization: Bearer {CLIENT_TOKEN}\x00", f"X-A: {REFRESH_TOKEN}\r"):
                raw = await _raw(port, f"GET /x HTTP/1.1\r\nHost: localhost\r\n{bad}\r\n\r\n"
                                 .encode())
                answered.append(raw.decode("latin-1"))
            # A token endpoint outage: failures are logged with their reasons.
            cluster.token_statuses = [503, 503]
            await _until(lambda: not cluster.token_statuses)
            await _until(lambda: cluster.token_calls >= 6)  # several refreshes, rotated
            while await call("GET", base / "-/ready") != 200:  # until the outage is over
                await asyncio.sleep(0.05)
            assert await call("GET", base / "api/late", headers=good) == 200
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 30)
        await asyncio.gather(*readers)

    assert process.returncode == 0
    output = b"".join(printed).decode("utf-8", "replace")
    assert "access token refreshed" in output
    assert "refused GET /api/x: client_token_required (401)" in output
    if log_format == "json":
        for line in output.splitlines():
            json.loads(line)  # every line is a JSON record
    secrets = _secrets(cluster)
    assert len(secrets) >= 10  # rotated refresh tokens and several access tokens
    for secret in secrets:
        assert secret not in output, f"a token is in the proxy's output: {secret[:8]}..."
        for answer in answered:
            assert secret not in answer, f"a token is in an answer: {secret[:8]}..."


async def _listening_port(printed: list[bytes]) -> int:
    pattern = re.compile(rb"listening on http://127\.0\.0\.1:(\d+)")

    def port() -> int | None:
        for line in printed:
            found = pattern.search(line)
            if found:
                return int(found.group(1))
        return None

    await _until(lambda: port() is not None)
    result = port()
    assert result is not None
    return result


async def _until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait for a condition the proxy or the fake cluster brings about."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "the condition never came true"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(("argv", "secret"), [
    (["--token", "has spaces in it-0123456789"], "has spaces in it-0123456789"),
    (["--client-token", "tiny"], "tiny-not-echoed"),
    (["--client-token", "with space 0123456789abcdef"], "with space 0123456789abcdef"),
    (["--client-token", "x" * 20, "--client-token-file", "/nonexistent"], "x" * 20),
])
def test_config_errors_never_echo_secrets(argv: list[str], secret: str, tmp_path: Path) -> None:
    """Refusing a bad token setting says what is wrong without repeating the value."""
    env = {"SQUIRRO_CLUSTER": "https://squirro.example.com", "SQUIRRO_TOKEN": REFRESH_TOKEN}
    with pytest.raises(ConfigError) as caught:
        load(argv, env, cwd=tmp_path)
    message = str(caught.value)
    assert secret not in message
    assert REFRESH_TOKEN not in message


def test_settings_repr_hides_every_secret(tmp_path: Path) -> None:
    """repr() and str() of the settings show no refresh token, client token or client secret."""
    token_file = tmp_path / "client-token"
    token_file.write_text(CLIENT_TOKEN + "\n")
    settings = load(
        ["--client-token-file", str(token_file), "--client-secret", CLIENT_SECRET],
        {"SQUIRRO_CLUSTER": "https://squirro.example.com", "SQUIRRO_TOKEN": REFRESH_TOKEN},
        cwd=tmp_path,
    )
    assert settings.client_token is not None and settings.client_token.reveal() == CLIENT_TOKEN
    shown = repr(settings) + str(settings) + repr(settings.client_token) + str(settings.token)
    for secret in (REFRESH_TOKEN, CLIENT_TOKEN, CLIENT_SECRET):
        assert secret not in shown
