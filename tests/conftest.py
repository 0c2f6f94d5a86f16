"""Fixtures: a fake cluster on loopback and the proxy in front of it, both real servers."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from proxy.app import TOKENS, make_app
from proxy.config import Secret, Settings
from proxy.connection import ProxyAppRunner
from proxy.tokens import TokenManager
from tests.devtools import browser, devtools_url  # noqa: F401 (fixtures for browser tests)
from tests.fakes import REFRESH_TOKEN, FakeCluster
from tests.processes import ProxyProcess
from tests.scripted import scripted  # noqa: F401 (fixture: a cluster of scripted bytes)


@dataclasses.dataclass
class Running:
    """A started proxy: its URL, its app (for the token manager) and its settings."""

    url: URL
    app: web.Application
    settings: Settings

    @property
    def tokens(self) -> TokenManager:
        return self.app[TOKENS]


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """SQUIRRO_PROXY_TEST_LOOP=uvloop runs the in-process tests on uvloop, whose transports
    differ from asyncio's in ways the proxy's own client and splicing notice."""
    if os.environ.get("SQUIRRO_PROXY_TEST_LOOP") == "uvloop":
        import uvloop

        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture
def cluster() -> FakeCluster:
    return FakeCluster()


@pytest.fixture
async def cluster_url(cluster: FakeCluster) -> AsyncIterator[URL]:
    server = TestServer(cluster.app(), host="127.0.0.1")
    await server.start_server()
    yield URL(f"http://127.0.0.1:{server.port}")
    await server.close()


def proxy_settings(cluster_url: URL | str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "cluster": URL(str(cluster_url)),
        "token": Secret(REFRESH_TOKEN),
        "port": 0,
    }
    values.update(overrides)
    return Settings(**values)


StartProxy = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_proxy(cluster_url: URL) -> AsyncIterator[StartProxy]:
    """Start a proxy in front of the fake cluster, served as the CLI serves it (same runner,
    same connection handling); keyword arguments override Settings."""
    runners: list[web.AppRunner] = []

    async def start(wait_token: bool = True, **overrides: Any) -> Running:
        settings = proxy_settings(overrides.pop("cluster", cluster_url), **overrides)
        app = make_app(settings)
        runner = ProxyAppRunner(app, header_timeout=settings.header_timeout,
                                handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        running = Running(URL(f"http://127.0.0.1:{runner.addresses[0][1]}"), app, settings)
        if wait_token:
            await running.tokens.wait_first()
        return running

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
async def proxy(start_proxy: StartProxy) -> Running:
    """The proxy with default settings, its first token already in."""
    return await start_proxy()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain HTTP client with no cookie jar and no decompression (sees bytes as sent)."""
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False
    ) as session:
        yield session


@pytest.fixture
async def procs() -> AsyncIterator[list[ProxyProcess]]:
    """Proxy processes a test spawned; killed afterwards with their workers, if still running."""
    started: list[ProxyProcess] = []
    yield started
    for p in started:
        await p.stop()
