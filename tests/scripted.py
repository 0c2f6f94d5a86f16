"""A cluster on a bare socket whose answers are scripted as bytes (broken ones included), for
the forwarding client's and the express lane's tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from yarl import URL

TOKEN_PATH = "/api/user/oauth2/token"


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    connection: int  # which connection of the cluster's it came on, counted from 1
    nth: int  # its place on that connection, counted from 1


Answer = Callable[[Request, asyncio.StreamWriter], Awaitable[bool]]  # True: keep the connection


def ok(body: bytes = b"ok") -> Answer:
    async def answer(_: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        return True
    return answer


def raw(data: bytes, keep: bool = False) -> Answer:
    async def answer(_: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(data)
        return keep
    return answer


@dataclass
class ScriptedCluster:
    """A cluster on a bare socket: the token endpoint answers as Squirro's does; every other path
    gets the bytes its script writes, so an answer can be anything, broken ones included."""

    scripts: dict[str, Answer] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    access_token: str = "scripted-access-token"
    token_delay: float = 0.0
    on_token: Callable[[], None] | None = None  # called as an exchange arrives
    connections: int = 0
    answer_before_body: set[str] = field(default_factory=set)  # paths answered unread
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def api(self, path: str | None = None) -> list[Request]:
        return [r for r in self.requests if r.path != TOKEN_PATH and path in (None, r.path)]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.connections += 1
        number, nth = self.connections, 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                nth += 1
                line, *fields = head.decode("latin-1").split("\r\n")[:-2]
                method, target, _ = line.split(" ")
                headers = {k.lower(): v.strip() for k, v in (f.split(":", 1) for f in fields)}
                body = b"" if target in self.answer_before_body else \
                    await _read_body(reader, headers)
                request = Request(method, target, headers, body, number, nth)
                self.requests.append(request)
                if target == TOKEN_PATH:
                    if self.on_token is not None:
                        self.on_token()
                    await asyncio.sleep(self.token_delay)
                    token = json.dumps({"access_token": self.access_token,
                                        "refresh_token": "refresh", "expires_in": 600}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%b" % (len(token), token))
                    keep = True
                else:
                    keep = await self.scripts.get(target, ok())(request, writer)
                await writer.drain()
                if not keep:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the proxy hung up, or the test is over
        finally:
            writer.close()
            self.tasks.discard(task)


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding") != "chunked":
        return b""
    body = b""
    while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
        body += await reader.readexactly(size)
        await reader.readexactly(2)
    await reader.readexactly(2)
    return body


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedCluster, URL]]:
    cluster = ScriptedCluster()
    server = await asyncio.start_server(cluster.handle, "127.0.0.1", 0)
    yield cluster, URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    server.close()
    for task in list(cluster.tasks):
        task.cancel()
    await asyncio.gather(*cluster.tasks, return_exceptions=True)
    await server.wait_closed()
