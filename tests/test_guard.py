"""The guard's rules one by one: Host allowlist, Origin and Fetch Metadata, CORS, client token,
read-only mode, path rules, cookie policy, probes; plus the bind rules and the Unix socket."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import stat
import sys
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from yarl import URL

from proxy import cli
from proxy.config import ConfigError, Secret, load
from proxy.errors import ERROR_HEADER
from proxy.guard import (
    CODES,
    PROBE_PATHS,
    Guard,
    PathRules,
    split_host,
    target_problem,
    token_from_authorization,
)
from tests.conftest import Running, StartProxy
from tests.fakes import REFRESH_TOKEN, FakeCluster

CLIENT_TOKEN = "client-token-0123456789abcdef"
PROJECTS = "api/topic/v0/t/projects"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --- pure helpers --------------------------------------------------------------------------------


@pytest.mark.parametrize(("host", "expected"), [
    ("localhost", ("localhost", "")),
    ("LocalHost:8080", ("localhost", "8080")),
    ("127.0.0.1:1", ("127.0.0.1", "1")),
    ("[::1]:8080", ("[::1]", "8080")),
    ("[::1]", ("[::1]", "")),
    ("", None),
    ("localhost:", None),
    ("localhost:abc", None),
    ("localhost:80:80", None),
    ("[::1", None),
    ("[::1]x", None),
    ("user@localhost", None),
    ("local/host", None),
    ("localhost:٣", None),  # a non-ASCII digit is no port
])
def test_split_host(host: str, expected: tuple[str, str] | None) -> None:
    """Host values split into name and port; anything malformed is None."""
    assert split_host(host) == expected


@pytest.mark.parametrize(("raw", "refused"), [
    ("/api/topic/v0/t/projects?x=1&y=%2e%2e", False),  # the query is not a path
    ("/.well-known/x", False),
    ("/api/a..b/c", False),
    ("/api/%41BC", False),
    ("/", False),
    ("http://h/x", True),
    ("h:443", True),
    ("*", True),
    ("//h/x", True),
    ("/@h/x", True),
    ("/\\h", True),
    ("/a/../b", True),
    ("/a/..", True),
    ("/a/./b", True),
    ("/%2e%2e/b", True),
    ("/%2E./b", True),
    ("/%252e%252e/b", True),
    ("/%25252e%25252e/b", True),
    ("/a/..%2fb", True),
    ("/%2f%2fh/x", True),
    ("/%5ch", True),
    ("/x%00", True),
    ("/x%0a", True),
    ("/x#y", True),
])
def test_target_problem(raw: str, refused: bool) -> None:
    """Request targets that could pick the host or leave the prefix are refused; others pass."""
    assert (target_problem(raw) is not None) is refused


@pytest.mark.parametrize(("entries", "path", "matches"), [
    (["/api/topic/"], "/api/topic", True),
    (["/api/topic/"], "/api/topic/v0/t", True),
    (["/api/topic"], "/api/topicx", False),
    (["/api/topic/"], "/api/user", False),
    (["/"], "/anything", True),
    (["/api/topic/v0/*/projects"], "/api/topic/v0/t1/projects", True),
    (["/api/topic/v0/*/projects"], "/api/topic/v0/t1/projects/p1", True),
    (["/api/topic/v0/*/projects"], "/api/topic/v0/a/b/projects", False),
    (["/api/topic/v0/*/projects"], "/api/topic/v0/t1/projectsx", False),
    ([], "/api", False),
])
def test_path_rules(entries: list[str], path: str, matches: bool) -> None:
    """Prefixes match at segment boundaries; `*` stands for one segment."""
    assert PathRules(entries).match(path) is matches


@pytest.mark.parametrize(("values", "expected"), [
    (["Bearer abc"], b"abc"),
    (["bearer   abc  "], b"abc"),
    ([basic("anyone", "s3cret")], b"s3cret"),
    ([basic("", "pa:ss")], b"pa:ss"),
    ([], None),
    (["Bearer abc", "Bearer abc"], None),
    (["Bearer"], None),
    (["Basic !!!"], None),
    (["Basic " + base64.b64encode(b"no-colon").decode()], None),
    (["Digest abc"], None),
    (["abc"], None),
])
def test_token_from_authorization(values: list[str], expected: bytes | None) -> None:
    """The client token is read from Bearer or from the Basic password; the rest is None."""
    assert token_from_authorization(values) == expected


@pytest.mark.parametrize(("origin", "host", "same"), [
    ("http://localhost:8080", "localhost:8080", True),
    ("http://localhost:8080", "LOCALHOST:8080", True),
    ("https://proxy.internal", "proxy.internal", True),
    ("http://localhost", "localhost:80", True),
    ("http://localhost:3000", "localhost:8080", False),
    ("http://evil.example", "localhost:8080", False),
    ("null", "localhost:8080", False),
    ("ftp://localhost:8080", "localhost:8080", False),
])
def test_own_origin(origin: str, host: str, same: bool) -> None:
    """The proxy's own origin is http(s)://<the Host the request came with>."""
    assert Guard.own_origin(origin, host) is same


# --- Host allowlist ------------------------------------------------------------------------------


@pytest.mark.parametrize(("host", "status"), [
    ("localhost", 200),
    ("localhost:{port}", 200),
    ("LOCALHOST:{port}", 200),
    ("127.0.0.1:{port}", 200),
    ("127.0.0.2:{port}", 200),
    ("[::1]:{port}", 200),
    ("sidecar", 200),
    ("sidecar:{port}", 200),
    ("evil.example", 403),
    ("localhost.evil.example:{port}", 403),
    ("sidecar.evil.example", 403),
    ("192.168.1.10:{port}", 403),
    ("", 403),
])
async def test_host_allowlist(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession,
    host: str, status: int,
) -> None:
    """Only loopback names and --allow-host names are served; others get 403, never forwarded."""
    proxy = await start_proxy(allow_hosts=("sidecar",))
    async with client.get(proxy.url / PROJECTS,
                          headers={"Host": host.format(port=proxy.url.port)}) as resp:
        assert resp.status == status
        if status == 403:
            assert resp.headers[ERROR_HEADER] == "host_not_allowed"
    assert len(cluster.api_requests()) == (1 if status == 200 else 0)


async def test_specific_bind_address_is_an_allowed_host(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """Bound to a specific address, the proxy answers requests that name that address."""
    proxy = await start_proxy(host="10.1.2.3", client_token=Secret(CLIENT_TOKEN))
    headers = {"Host": "10.1.2.3:8080", "Authorization": f"Bearer {CLIENT_TOKEN}"}
    async with client.get(proxy.url / PROJECTS, headers=headers) as resp:
        assert resp.status == 200
    async with client.get(proxy.url / PROJECTS, headers={**headers, "Host": "10.1.2.4"}) as resp:
        assert resp.status == 403
    assert len(cluster.api_requests()) == 1


# --- Origin and Fetch Metadata -------------------------------------------------------------------


@pytest.mark.parametrize(("headers", "status"), [
    ({}, 200),  # curl, scripts: no browser headers at all
    ({"Origin": "http://{host}"}, 200),
    ({"Origin": "https://{host}"}, 200),
    ({"Origin": "http://localhost:3000"}, 200),  # allowed with --cors-origin
    ({"Sec-Fetch-Site": "same-origin"}, 200),
    ({"Sec-Fetch-Site": "none"}, 200),  # typed into the address bar
    ({"Origin": "http://localhost:3000", "Sec-Fetch-Site": "same-site"}, 200),
    ({"Origin": "http://localhost:3001"}, 403),
    ({"Origin": "https://evil.example"}, 403),
    ({"Origin": "null"}, 403),
    ({"Origin": "https://evil.example", "Sec-Fetch-Site": "same-origin"}, 403),
    ({"Sec-Fetch-Site": "cross-site"}, 403),
    ({"Sec-Fetch-Site": "same-site"}, 403),
])
async def test_origin_rules(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession,
    headers: dict[str, str], status: int,
) -> None:
    """Browser requests from the proxy's own or an allowed origin pass; other pages get 403."""
    proxy = await start_proxy(cors_origins=("http://localhost:3000",))
    host = f"127.0.0.1:{proxy.url.port}"
    sent = {k: v.format(host=host) for k, v in headers.items()}
    async with client.post(proxy.url / PROJECTS, headers=sent, data=b"x=1") as resp:
        assert resp.status == status
        if status == 403:
            assert resp.headers[ERROR_HEADER] == "cross_origin_refused"
    assert len(cluster.api_requests()) == (1 if status == 200 else 0)


async def test_cross_origin_websocket_handshake_refused(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """A WebSocket handshake from another site's page is refused before the cluster sees it."""
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await client.ws_connect(proxy.url / "ws", origin="https://evil.example")
    assert caught.value.status == 403
    assert cluster.api_requests() == []


async def test_same_origin_websocket_handshake_allowed(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """A WebSocket handshake from the proxy's own origin goes through."""
    origin = f"http://127.0.0.1:{proxy.url.port}"
    async with client.ws_connect(proxy.url / "ws", origin=origin) as ws:
        await ws.send_str("ping")
        assert (await ws.receive_str()) == "ping"
    assert [r.raw_path for r in cluster.api_requests()] == ["/ws"]


# --- CORS ----------------------------------------------------------------------------------------

APP_ORIGIN = "http://localhost:3000"


async def test_preflight_answered_by_the_proxy(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """A preflight from an allowed origin is answered by the proxy and never forwarded."""
    proxy = await start_proxy(cors_origins=(APP_ORIGIN,), client_token=Secret(CLIENT_TOKEN))
    async with client.options(proxy.url / PROJECTS, headers={
        "Origin": APP_ORIGIN,
        "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "authorization, content-type, x-custom",
    }) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
        assert resp.headers["Access-Control-Allow-Credentials"] == "true"
        assert "PUT" in resp.headers["Access-Control-Allow-Methods"]
        assert resp.headers["Access-Control-Allow-Headers"] == (
            "authorization, content-type, x-custom"
        )
        assert "Origin" in resp.headers["Vary"]
    assert cluster.api_requests() == []


async def test_preflight_from_unknown_origin_refused(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """A preflight from an origin not allowed gets 403 and no Access-Control header."""
    proxy = await start_proxy(cors_origins=(APP_ORIGIN,))
    async with client.options(proxy.url / PROJECTS, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
    }) as resp:
        assert resp.status == 403
        assert not [h for h in resp.headers if h.lower().startswith("access-control-")]
    assert cluster.api_requests() == []


async def test_read_only_preflight_offers_only_read_methods(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    """With --read-only, a preflight does not offer methods that would be refused."""
    proxy = await start_proxy(cors_origins=(APP_ORIGIN,), read_only=True)
    async with client.options(proxy.url / PROJECTS, headers={
        "Origin": APP_ORIGIN, "Access-Control-Request-Method": "DELETE",
    }) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Methods"] == "GET, HEAD, OPTIONS"


async def test_cors_response_headers_for_allowed_origin(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    """Responses to an allowed origin carry its ACAO (not the cluster's) and expose headers."""
    proxy = await start_proxy(cors_origins=(APP_ORIGIN,))
    url = (proxy.url / "status/200").with_query({
        "Access-Control-Allow-Origin": "*", "X-Squirro-Thing": "1",
    })
    async with client.get(url, headers={"Origin": APP_ORIGIN}) as resp:
        assert resp.status == 200
        assert resp.headers.getall("Access-Control-Allow-Origin") == [APP_ORIGIN]
        assert resp.headers["Access-Control-Allow-Credentials"] == "true"
        exposed = {h.strip().lower() for h in resp.headers["Access-Control-Expose-Headers"]
                   .split(",")}
        assert {"x-squirro-thing", "x-request-id"} <= exposed
        assert "Origin" in resp.headers["Vary"]


async def test_proxy_errors_readable_by_allowed_origin(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    """A 401 from the proxy carries CORS headers, so the page can tell the user why."""
    proxy = await start_proxy(cors_origins=(APP_ORIGIN,), client_token=Secret(CLIENT_TOKEN))
    async with client.get(proxy.url / PROJECTS, headers={"Origin": APP_ORIGIN}) as resp:
        assert resp.status == 401
        assert resp.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
        assert ERROR_HEADER.lower() in resp.headers["Access-Control-Expose-Headers"].lower()


@pytest.mark.parametrize("origin", [None, "same"])
async def test_no_cors_headers_without_cors_origins(
    proxy: Running, client: aiohttp.ClientSession, origin: str | None
) -> None:
    """Without --cors-origin no Access-Control header is sent, even the cluster's own."""
    url = (proxy.url / "status/200").with_query({
        "Access-Control-Allow-Origin": "*", "Access-Control-Allow-Credentials": "true",
    })
    headers = {} if origin is None else {"Origin": f"http://127.0.0.1:{proxy.url.port}"}
    async with client.get(url, headers=headers) as resp:
        assert resp.status == 200
        assert [h for h in resp.headers if h.lower().startswith("access-control-")] == []


# --- client token --------------------------------------------------------------------------------


@pytest.mark.parametrize(("authorization", "status"), [
    (f"Bearer {CLIENT_TOKEN}", 200),
    (f"bearer {CLIENT_TOKEN}", 200),
    (basic("me", CLIENT_TOKEN), 200),
    (basic("", CLIENT_TOKEN), 200),
    (None, 401),
    ("Bearer", 401),
    ("Bearer wrong-token-0123456789abcdef", 401),
    (f"Bearer {CLIENT_TOKEN}x", 401),
    (f"Bearer {CLIENT_TOKEN[:-1]}", 401),
    (basic(CLIENT_TOKEN, "wrong"), 401),
    ("Basic not-base64!", 401),
    (f"Token {CLIENT_TOKEN}", 401),
    (f"Bearer {REFRESH_TOKEN}", 401),  # the Squirro token is not the client token
])
async def test_client_token(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession,
    authorization: str | None, status: int,
) -> None:
    """Only the client token (Bearer or Basic password) passes; the rest get 401 + challenges."""
    proxy = await start_proxy(client_token=Secret(CLIENT_TOKEN))
    headers = {} if authorization is None else {"Authorization": authorization}
    async with client.get(proxy.url / PROJECTS, headers=headers) as resp:
        assert resp.status == status
        body = await resp.read()
        if status == 401:
            assert resp.headers[ERROR_HEADER] == "client_token_required"
            assert resp.headers.getall("WWW-Authenticate") == [
                'Bearer realm="squirro-proxy"', 'Basic realm="squirro-proxy", charset="UTF-8"',
            ]
            assert CLIENT_TOKEN.encode() not in body
    assert len(cluster.api_requests()) == (1 if status == 200 else 0)


@pytest.mark.parametrize("authorization", [f"Bearer {CLIENT_TOKEN}", basic("me", CLIENT_TOKEN)])
async def test_client_token_never_forwarded(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession,
    authorization: str,
) -> None:
    """The cluster sees one Authorization, the access token, and no trace of the client's."""
    proxy = await start_proxy(client_token=Secret(CLIENT_TOKEN))
    async with client.get(proxy.url / PROJECTS, headers={"Authorization": authorization}) as r:
        assert r.status == 200
    (seen,) = cluster.api_requests()
    assert [v for k, v in seen.headers if k.lower() == "authorization"] == [
        f"Bearer {cluster.last_token}"
    ]
    everything = repr(seen.headers)
    assert CLIENT_TOKEN not in everything
    assert authorization.split(" ", 1)[1] not in everything


# --- probes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(PROBE_PATHS))
async def test_probes_answer_any_host_without_token(
    start_proxy: StartProxy, client: aiohttp.ClientSession, path: str
) -> None:
    """Liveness and readiness answer probes that send neither a loopback Host nor a token."""
    proxy = await start_proxy(client_token=Secret(CLIENT_TOKEN))
    async with client.get(proxy.url.with_path(path), headers={"Host": "10.1.2.3:8080"}) as resp:
        assert resp.status == 200
        assert resp.headers.get(ERROR_HEADER) not in CODES


@pytest.mark.parametrize(("path", "headers", "status"), [
    ("/-/metrics", {"Host": "evil.example"}, 403),
    ("/-/status", {}, 401),
    ("/-/status", {"Origin": "https://evil.example"}, 403),
    ("/-/healthy", {"Origin": "https://evil.example", "Host": "evil.example"}, 200),
])
async def test_other_ops_endpoints_follow_the_rules(
    start_proxy: StartProxy, client: aiohttp.ClientSession,
    path: str, headers: dict[str, str], status: int,
) -> None:
    """Everything under /-/ but the probes needs the right Host, Origin and client token."""
    proxy = await start_proxy(client_token=Secret(CLIENT_TOKEN))
    async with client.get(proxy.url.with_path(path), headers=headers) as resp:
        assert resp.status == status


# --- read-only and path rules --------------------------------------------------------------------


@pytest.mark.parametrize(("method", "status"), [
    ("GET", 200), ("HEAD", 200), ("OPTIONS", 200),
    ("POST", 405), ("PUT", 405), ("PATCH", 405), ("DELETE", 405), ("PROPFIND", 405),
])
async def test_read_only(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession,
    method: str, status: int,
) -> None:
    """With --read-only only GET, HEAD and OPTIONS are forwarded; the rest get 405 with Allow."""
    proxy = await start_proxy(read_only=True)
    async with client.request(method, proxy.url / PROJECTS) as resp:
        assert resp.status == status
        if status == 405:
            assert resp.headers["Allow"] == "GET, HEAD, OPTIONS"
            assert resp.headers[ERROR_HEADER] == "read_only"
    assert len(cluster.api_requests()) == (1 if status == 200 else 0)


@pytest.mark.parametrize(("path", "status"), [
    ("/api/topic/v0/t/projects", 200),
    ("/api/topic", 200),
    ("/api//topic/v0/t/projects", 200),
    ("/api/%74opic/v0/t/projects", 200),
    ("/api/user/oauth2/token", 403),
    ("/api/topicx", 403),
    ("/api/%75ser/x", 403),
    ("/api/topic/v0/t/secret", 403),
    ("/api/topic/v0/t/secret/x", 403),
    ("/api/topic/v0/t/%73ecret", 403),
    ("/api/topic//v0/t/secret", 403),
    ("/api/topic/v0/other/secret", 403),
    ("/service/search/x", 403),
])
async def test_path_allow_and_deny_lists(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession,
    path: str, status: int,
) -> None:
    """Allow/deny lists judge the decoded, slash-folded path, so encodings cannot sneak past."""
    proxy = await start_proxy(allow_paths=("/api/topic/",),
                              deny_paths=("/api/topic/v0/t/secret", "/api/topic/v0/*/secret"))
    async with client.get(URL(str(proxy.url) + path, encoded=True)) as resp:
        assert resp.status == status
        if status == 403:
            assert resp.headers[ERROR_HEADER] == "path_not_allowed"
    assert len(cluster.api_requests()) == (1 if status == 200 else 0)


async def test_path_rules_leave_ops_endpoints_alone(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    """The proxy's own /-/ endpoints are not subject to the forwarding path rules."""
    proxy = await start_proxy(allow_paths=("/api/topic/",))
    async with client.get(proxy.url.with_path("/-/status"),
                          headers={"Accept": "application/json"}) as resp:
        assert resp.status == 200


# --- cookies -------------------------------------------------------------------------------------


@pytest.mark.parametrize("forward_cookies", [False, True])
async def test_cookie_policy(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession,
    forward_cookies: bool,
) -> None:
    """By default other local apps' cookies stay home and the cluster sets none in the browser."""
    proxy = await start_proxy(forward_cookies=forward_cookies)
    url = (proxy.url / "status/200").with_query({"Set-Cookie": "session=cluster"})
    async with client.get(url, headers={"Cookie": "other_app_session=secret"}) as resp:
        assert resp.status == 200
        assert ("Set-Cookie" in resp.headers) is forward_cookies
    (seen,) = cluster.api_requests()
    assert any(k.lower() == "cookie" for k, _ in seen.headers) is forward_cookies


# --- who may connect: bind rules and the Unix socket ---------------------------------------------

BASE_ENV = {"SQUIRRO_CLUSTER": "https://squirro.example.com", "SQUIRRO_TOKEN": REFRESH_TOKEN}


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10"])
def test_public_bind_refused_without_client_token(
    host: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A non-loopback --host without a client token stops start-up with advice, no traceback."""
    code = cli.main(["--host", host], environ={**BASE_ENV, "HOME": str(tmp_path)})
    err = capsys.readouterr().err
    assert code == cli.EXIT_CONFIG
    assert "--client-token" in err and "--insecure-public-bind" in err
    assert "Traceback" not in err


def test_public_bind_with_client_token_allowed(tmp_path: Path) -> None:
    """A client token makes a non-loopback bind acceptable, without a warning."""
    settings = load(["--host", "0.0.0.0"], {**BASE_ENV, "SQUIRRO_PROXY_CLIENT_TOKEN": CLIENT_TOKEN},
                    cwd=tmp_path)
    assert settings.host == "0.0.0.0"
    assert not [n for n in settings.notices if "insecure-public-bind" in n]


def test_public_bind_opt_out_warns_every_start(tmp_path: Path) -> None:
    """The loud opt-out lets a public bind start without a token, with a warning."""
    settings = load(["--host", "0.0.0.0", "--insecure-public-bind"], BASE_ENV, cwd=tmp_path)
    assert [n for n in settings.notices if "anyone who can reach this port" in n]


@pytest.mark.parametrize("flag", ["--token", "--client-token"])
def test_secret_on_command_line_warns(flag: str, tmp_path: Path) -> None:
    """A token given as a flag (visible in ps) draws a warning that names the safer ways."""
    env = {k: v for k, v in BASE_ENV.items() if flag != "--token" or k != "SQUIRRO_TOKEN"}
    settings = load([flag, CLIENT_TOKEN], env, cwd=tmp_path)
    (notice,) = [n for n in settings.notices if n.startswith(flag)]
    assert "ps" in notice
    assert CLIENT_TOKEN not in notice


@pytest.mark.parametrize("argv", [
    ["--allow-host", "proxy\r\nX-Injected: 1"],
    ["--cors-origin", "http://localhost:3000\r\nSet-Cookie: a=b"],
    ["--client-token", "0123456789abcdef\nX-Injected: 1"],
    ["--deny-path", "/api\r\n"],
    ["--cors-origin", "null"],
    ["--cors-origin", "http://localhost:3000/path"],
    ["--allow-path", "api/topic"],
    ["--client-token", "short"],
])
def test_unsafe_settings_refused(argv: list[str], tmp_path: Path) -> None:
    """Settings that could inject headers or that make no sense are refused at start-up."""
    with pytest.raises(ConfigError) as caught:
        load(argv, BASE_ENV, cwd=tmp_path)
    assert caught.value.problems
    assert "\r" not in str(caught.value)


@contextlib.asynccontextmanager
async def _cli_process(argv: list[str], cluster_url: URL, tmp_path: Path) -> Any:
    env = {
        "PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path),
        "SQUIRRO_CLUSTER": str(cluster_url), "SQUIRRO_TOKEN": REFRESH_TOKEN,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *argv, env=env, cwd=str(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        lines: list[str] = []
        while True:
            line = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
            assert line, "the proxy exited early:\n" + "".join(lines)
            lines.append(line)
            if "listening on" in line:
                break
        yield process, line
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 30)


@pytest.mark.parametrize("with_tcp", [False, True])
async def test_unix_socket_owner_only(
    cluster_url: URL, cluster: FakeCluster, tmp_path: Path, with_tcp: bool
) -> None:
    """--unix-socket listens with mode 0600, instead of TCP unless --port asks for both."""
    path = tmp_path / "proxy.sock"
    argv = ["--unix-socket", str(path)] + (["--port", "0"] if with_tcp else [])
    async with _cli_process(argv, cluster_url, tmp_path) as (process, line):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        listed = line.partition("listening on ")[2].partition(", forwarding")[0]
        assert ("http://127.0.0.1:" in listed) is with_tcp
        listening = [c for c in psutil.Process(process.pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        assert bool(listening) is with_tcp
        connector = aiohttp.UnixConnector(path=str(path))
        # Unix-socket clients may send any Host: no browser can reach the socket.
        async with aiohttp.ClientSession(connector=connector) as session, \
                session.get(f"http://any-name/{PROJECTS}") as resp:
            assert resp.status == 200
    assert process.returncode == 0
    assert [r.raw_path for r in cluster.api_requests()] == [f"/{PROJECTS}"]
    assert not path.exists()
