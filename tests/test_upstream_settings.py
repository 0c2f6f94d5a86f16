"""The upstream connection as operators configure it: private CAs, --insecure, corporate
proxies (HTTPS_PROXY / HTTP_PROXY / NO_PROXY), timeouts and the connection pool size."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from proxy.errors import ERROR_HEADER
from proxy.upstream import make_session
from tests.conftest import StartProxy, proxy_settings
from tests.fakes import REFRESH_TOKEN, FakeCluster
from tests.helpers import closed_port, unanswered_port, until
from tests.test_ops import run_check

LOOPBACK = frozenset(("127.0.0.1", "localhost"))


# --- a cluster behind a private CA ---------------------------------------------------------------


@dataclass(frozen=True)
class PrivateCA:
    ca_pem: Path
    server_context: ssl.SSLContext


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def private_ca(tmp_path_factory: pytest.TempPathFactory) -> PrivateCA:
    """A CA of our own and a certificate for 127.0.0.1 it signed (openssl, as admins do it)."""
    d = tmp_path_factory.mktemp("ca")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=squirro-proxy test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf",
             cwd=d)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(d / "server.pem", d / "server.key")
    return PrivateCA(d / "ca.pem", context)


@pytest.fixture
async def tls_cluster_url(cluster: FakeCluster, private_ca: PrivateCA) -> AsyncIterator[URL]:
    """The fake cluster over HTTPS with the private CA's certificate."""
    server = TestServer(cluster.app(), host="127.0.0.1")
    await server.start_server(ssl=private_ca.server_context)
    yield URL(f"https://127.0.0.1:{server.port}")
    await server.close()


async def test_ca_bundle_trusts_a_private_ca(
    start_proxy: StartProxy, tls_cluster_url: URL, private_ca: PrivateCA,
    client: aiohttp.ClientSession,
) -> None:
    """--ca-bundle: the proxy verifies the cluster against the given CA and forwards."""
    proxy = await start_proxy(cluster=tls_cluster_url, ca_bundle=private_ca.ca_pem)
    async with client.get(proxy.url / "api/x") as resp:
        assert resp.status == 200


async def test_private_ca_is_refused_without_the_bundle(
    start_proxy: StartProxy, tls_cluster_url: URL, client: aiohttp.ClientSession,
) -> None:
    """Without --ca-bundle an unknown CA is refused, and the reason says what to do."""
    proxy = await start_proxy(cluster=tls_cluster_url, wait_token=False)
    await until(lambda: proxy.tokens.failure is not None)
    reason = proxy.tokens.failure.reason
    assert "certificate" in reason and "--ca-bundle" in reason
    async with client.get(proxy.url / "api/x") as resp:
        assert resp.status == 503 and resp.headers[ERROR_HEADER] == "token_unavailable"


async def test_untrusted_certificate_on_forwarding_path_says_so(
    start_proxy: StartProxy, tls_cluster_url: URL, client: aiohttp.ClientSession,
) -> None:
    """A certificate refused while forwarding gives 502 cluster_tls_untrusted naming --ca-bundle."""
    from proxy.forward import UPSTREAM
    from proxy.http1 import ClusterPool, pool_ssl

    proxy = await start_proxy()  # token from the plain-http fake
    # The cluster now answers over TLS with a certificate of an unknown CA.
    up = proxy.app[UPSTREAM]
    object.__setattr__(up, "pool", ClusterPool(
        tls_cluster_url, limit=2, connect_timeout=5, read_timeout=5,
        ssl_context=pool_ssl("https", True)))
    async with client.get(proxy.url / "api/x") as resp:
        assert resp.status == 502
        assert resp.headers[ERROR_HEADER] == "cluster_tls_untrusted"
        assert "--ca-bundle" in (await resp.json())["detail"]


async def test_insecure_skips_verification(
    start_proxy: StartProxy, tls_cluster_url: URL, client: aiohttp.ClientSession,
) -> None:
    """--insecure: the certificate is not checked (for a lab cluster)."""
    proxy = await start_proxy(cluster=tls_cluster_url, insecure=True)
    async with client.get(proxy.url / "api/x") as resp:
        assert resp.status == 200


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        (["--insecure"], 0, "--insecure: the cluster's TLS certificate is NOT verified"),
        (["--ca-bundle", "CA"], 0, "verified with the CA bundle"),
        ([], 3, "--ca-bundle"),
    ],
)
async def test_check_reports_tls_verification(
    tls_cluster_url: URL, private_ca: PrivateCA, tmp_path: Path,
    args: list[str], code: int, expected: str,
) -> None:
    """`check` warns about --insecure (as every start does), names the CA bundle, and exits 3
    with a hint when the certificate is not trusted."""
    args = [str(private_ca.ca_pem) if a == "CA" else a for a in args]
    got, out, err = await run_check(
        {"SQUIRRO_CLUSTER": str(tls_cluster_url), "SQUIRRO_TOKEN": REFRESH_TOKEN}, tmp_path,
        *args,
    )
    assert got == code, err
    assert expected in out + err
    assert REFRESH_TOKEN not in out + err


# --- corporate proxies ---------------------------------------------------------------------------


@dataclass
class ForwardProxy:
    """A minimal HTTP forward proxy on loopback: CONNECT tunnels and absolute-form requests.

    It records the first request line of each connection and only ever connects to loopback.
    """

    seen: list[str] = field(default_factory=list)
    heads: list[bytes] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0].decode()
            self.seen.append(line)
            self.heads.append(head)
            method, target, _ = line.split(" ")
            if method == "CONNECT":
                host, port = target.rsplit(":", 1)
            else:
                url = URL(target)
                host, port = url.host or "", str(url.port)
            if host not in LOOPBACK:
                writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            if method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                up_writer.write(head)  # the cluster's server takes absolute-form targets too
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


@pytest.fixture
async def forward_proxy() -> AsyncIterator[tuple[ForwardProxy, str]]:
    fp = ForwardProxy()
    server = await asyncio.start_server(fp.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield fp, f"http://127.0.0.1:{port}"
    server.close()
    for task in list(fp.tasks):
        task.cancel()
    await asyncio.gather(*fp.tasks, return_exceptions=True)
    await server.wait_closed()


@pytest.fixture
def clean_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY",
                 "http_proxy", "https_proxy", "no_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


async def test_https_proxy_tunnels_to_the_cluster(
    start_proxy: StartProxy, tls_cluster_url: URL, private_ca: PrivateCA,
    forward_proxy: tuple[ForwardProxy, str], clean_proxy_env: pytest.MonkeyPatch,
    client: aiohttp.ClientSession,
) -> None:
    """HTTPS_PROXY: the token exchange and API calls go through the corporate proxy (CONNECT)."""
    fp, fp_url = forward_proxy
    clean_proxy_env.setenv("HTTPS_PROXY", fp_url)
    proxy = await start_proxy(cluster=tls_cluster_url, ca_bundle=private_ca.ca_pem)
    async with client.get(proxy.url / "api/x") as resp:
        assert resp.status == 200
    assert fp.seen and all(
        line == f"CONNECT 127.0.0.1:{tls_cluster_url.port} HTTP/1.1" for line in fp.seen
    )


async def test_http_proxy_carries_a_plain_http_cluster(
    start_proxy: StartProxy, cluster_url: URL, cluster: FakeCluster,
    forward_proxy: tuple[ForwardProxy, str], clean_proxy_env: pytest.MonkeyPatch,
    client: aiohttp.ClientSession,
) -> None:
    """HTTP_PROXY: an http:// cluster is reached through the proxy with absolute-form targets."""
    fp, fp_url = forward_proxy
    clean_proxy_env.setenv("HTTP_PROXY", fp_url)
    proxy = await start_proxy()
    async with client.get(proxy.url / "api/x") as resp:
        assert resp.status == 200
    assert any(line == f"POST {cluster_url}/api/user/oauth2/token HTTP/1.1" for line in fp.seen)
    assert len(cluster.api_requests()) == 1


@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "https_proxy"])
async def test_proxy_credentials_go_to_the_proxy_only(
    start_proxy: StartProxy, cluster: FakeCluster, tls_cluster_url: URL, private_ca: PrivateCA,
    forward_proxy: tuple[ForwardProxy, str], clean_proxy_env: pytest.MonkeyPatch,
    client: aiohttp.ClientSession, variable: str,
) -> None:
    """user:password in the proxy URL becomes Proxy-Authorization on CONNECT, never reaches the
    cluster."""
    fp, fp_url = forward_proxy
    clean_proxy_env.setenv(variable, fp_url.replace("http://", "http://corp%20user:s3cret@"))
    proxy = await start_proxy(cluster=tls_cluster_url, ca_bundle=private_ca.ca_pem)
    async with client.get(proxy.url / "api/x") as resp:
        assert resp.status == 200
    expected = b"Proxy-Authorization: Basic " + base64.b64encode(b"corp user:s3cret")
    assert fp.heads and all(expected in head for head in fp.heads)
    seen = cluster.api_requests()[-1].headers
    assert not [k for k, _ in seen if k.lower() == "proxy-authorization"]


async def test_no_proxy_bypasses_the_corporate_proxy(
    start_proxy: StartProxy, forward_proxy: tuple[ForwardProxy, str],
    clean_proxy_env: pytest.MonkeyPatch, client: aiohttp.ClientSession,
) -> None:
    """NO_PROXY naming the cluster's host: connections go direct."""
    fp, fp_url = forward_proxy
    clean_proxy_env.setenv("HTTP_PROXY", fp_url)
    clean_proxy_env.setenv("NO_PROXY", "127.0.0.1,localhost")
    proxy = await start_proxy()
    async with client.get(proxy.url / "api/x") as resp:
        assert resp.status == 200
    assert fp.seen == []


# --- timeouts and pool ---------------------------------------------------------------------------


async def test_connect_timeout_setting_bounds_the_connect() -> None:
    """--connect-timeout reaches the upstream session: a hanging connect gives up in time."""
    with unanswered_port() as port:
        settings = proxy_settings(f"http://127.0.0.1:{port}", connect_timeout=0.2)
        session = make_session(settings)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(aiohttp.ConnectionTimeoutError):
                await session.get(f"http://127.0.0.1:{port}/api/x")
            assert loop.time() - started < 5
        finally:
            await session.close()


async def test_read_timeout_answers_504(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """--read-timeout: a cluster silent for longer gets a 504 from the proxy naming the flag."""
    silence = asyncio.Event()

    async def silent(request: web.Request) -> web.Response:
        await silence.wait()
        return web.Response()

    cluster.hooks["echo"] = silent
    proxy = await start_proxy(read_timeout=0.2)
    try:
        async with client.get(proxy.url / "api/x") as resp:
            assert resp.status == 504
            body = await resp.json()
        assert body["error"] == "cluster_timeout" and "--read-timeout" in body["detail"]
    finally:
        silence.set()


async def test_pool_size_caps_connections_to_the_cluster(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """--pool-size 2: five concurrent requests reach the cluster two at a time, all succeed."""
    proxy = await start_proxy(pool_size=2)
    arrived, release = cluster.hold_answers()

    async def one() -> int:
        async with client.get(proxy.url / "api/x") as resp:
            await resp.read()
            return resp.status

    tasks = [asyncio.create_task(one()) for _ in range(5)]
    await until(lambda: len(arrived) == 2)
    with pytest.raises(AssertionError):  # a bounded look for a third that must not come
        await until(lambda: len(arrived) > 2, timeout=0.3)
    release.set()
    assert await asyncio.gather(*tasks) == [200] * 5
    assert len(arrived) == 5


async def test_closed_port_is_a_clear_token_failure(
    start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    """A cluster nobody listens for: 503 with 'cannot connect' and the address to check."""
    port = closed_port()
    proxy = await start_proxy(cluster=URL(f"http://127.0.0.1:{port}"), wait_token=False)
    async with client.get(proxy.url / "api/x") as resp:
        body = await resp.json()
    assert resp.status == 503 and f"cannot connect to 127.0.0.1:{port}" in body["detail"]


async def test_check_names_the_corporate_proxy_without_its_password(
    tls_cluster_url: URL, private_ca: PrivateCA, forward_proxy: tuple[ForwardProxy, str],
    tmp_path: Path,
) -> None:
    """`check` goes through HTTPS_PROXY and shows its address, never its credentials."""
    fp, fp_url = forward_proxy
    with_credentials = fp_url.replace("http://", "http://alice:pr0xy-pa55word@")
    code, out, err = await run_check(
        {"SQUIRRO_CLUSTER": str(tls_cluster_url), "SQUIRRO_TOKEN": REFRESH_TOKEN,
         "HTTPS_PROXY": with_credentials, "NO_PROXY": "", "no_proxy": ""},
        tmp_path, "--ca-bundle", str(private_ca.ca_pem),
    )
    assert code == 0, err
    port = URL(fp_url).port
    assert f"via proxy:    127.0.0.1:{port} (HTTPS_PROXY)" in out
    assert "pr0xy-pa55word" not in out + err and "alice" not in out + err
    assert fp.seen == [f"CONNECT 127.0.0.1:{tls_cluster_url.port} HTTP/1.1"]


async def test_open_streams_never_starve_the_token_exchange(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession,
) -> None:
    """Streams holding every pooled connection: the token exchange still gets through (its own
    pool), and a further request gets 504 within --connect-timeout instead of queueing."""
    proxy = await start_proxy(pool_size=2, connect_timeout=0.5)
    streams = [await client.get(proxy.url / "sse-live") for _ in range(2)]
    try:
        assert all(s.status == 200 for s in streams)
        stale = proxy.tokens.current
        new = await asyncio.wait_for(proxy.tokens.refresh_after_401(stale), 5)
        assert new.value != stale.value
        async with client.get(proxy.url / "api/x") as resp:
            assert resp.status == 504
            assert resp.headers[ERROR_HEADER] == "cluster_connect_timeout"
            assert "--pool-size" in (await resp.json())["detail"]
    finally:
        for _ in streams:
            cluster.sse_queue.put_nowait(None)
        for s in streams:
            s.close()
