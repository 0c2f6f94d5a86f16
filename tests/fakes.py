"""A fake Squirro cluster that really listens on loopback, for the proxy to talk to in tests.

It counts every call, so tests can prove single flight, retries and that a refused request never
reached the cluster. Behaviour is steered by plain attributes a test sets before or during a run.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import itertools
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

SEEN = web.RequestKey("seen", "Seen")  # type: ignore[arg-type]
REFRESH_TOKEN = "refresh-token-abcdefghijklmnop"
TOKEN_PATH = "/api/user/oauth2/token"


def pattern(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes of any size (for byte-exact body checks)."""
    block = hashlib.sha256(f"block-{seed}".encode()).digest() * 2048  # 64 KiB
    reps, rest = divmod(size, len(block))
    return block * reps + block[:rest]


# Compressed bodies as a cluster would store and send them; the proxy must pass them untouched.
# (The br entry is opaque bytes: the proxy never decodes, so any payload labelled br will do.)
ENCODED_BODIES = {
    "gzip": gzip.compress(b"squirro " * 10_000, mtime=0),
    "br": b"\x1b\xff\x9f\x00" + hashlib.sha256(b"br").digest() * 64,
}


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body_size: int = 0
    body_sha256: str = ""
    peer_port: int = 0  # the proxy's end of the connection (tells worker processes apart)


@dataclass
class FakeCluster:
    """State and knobs of the fake cluster."""

    refresh_token: str = REFRESH_TOKEN
    lifetime: float | None = 600  # expires_in sent; None: omit it
    rotate: bool = False  # answer each exchange with a new refresh token
    same_token_times: int = 0  # hand back the previous access token this many times
    token_delay: float = 0.0
    # Statuses to answer the next exchanges with (popped first), e.g. [503, 503] or [404].
    token_statuses: list[int] = field(default_factory=list)
    token_down: bool = False  # answer every exchange with 503
    token_calls: int = 0
    token_forms: list[dict[str, str]] = field(default_factory=list)
    tokens: dict[str, float] = field(default_factory=dict)  # access token -> expiry (monotonic)
    last_token: str | None = None
    requests: list[Seen] = field(default_factory=list)
    reject_all: bool = False  # answer 401 to every API call whatever the token
    hooks: dict[str, Callable[..., Any]] = field(default_factory=dict)
    # Streaming (test_streaming.py): progress of the slow endpoints, and how each one ended.
    drain_before_401: bool = False  # read the whole body before refusing it (like a WSGI app)
    sent: int = 0  # bytes /download has handed to its socket so far
    received: int = 0  # bytes /slow-upload has read so far
    release_reader: asyncio.Event = field(default_factory=asyncio.Event)  # lets /slow-upload read
    endings: list[str] = field(default_factory=list)  # "<path> complete|cut" per stream handler
    sse_queue: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    sse_sent_at: list[float] = field(default_factory=list)  # time.perf_counter() per live event
    # WebSockets (test_websocket.py)
    ws_protocols: tuple[str, ...] = ()  # subprotocols the fake accepts
    ws_events: list[tuple[str, Any]] = field(default_factory=list)  # what the fake saw, in order
    _counter: itertools.count = field(default_factory=itertools.count)  # type: ignore[type-arg]

    # --- helpers for tests ----------------------------------------------------------------

    def revoke_access_tokens(self) -> None:
        """Make every access token issued so far invalid (the next API call gets 401)."""
        self.tokens.clear()

    def hold_answers(self) -> tuple[list[int], asyncio.Event]:
        """Make API calls wait until the returned event is set; the list grows by one per call
        that arrived (for tests of in-flight counts and pool limits)."""
        release = asyncio.Event()
        arrived: list[int] = []

        async def held(request: web.Request) -> web.Response:
            arrived.append(1)
            await release.wait()
            return web.Response(text="done")

        self.hooks["echo"] = held
        return arrived, release

    def api_requests(self) -> list[Seen]:
        return [r for r in self.requests if not r.raw_path.endswith(TOKEN_PATH)]

    # --- handlers ---------------------------------------------------------------------------

    async def token(self, request: web.Request) -> web.Response:
        self.token_calls += 1
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.token_forms.append(form)
        if self.token_delay:
            await asyncio.sleep(self.token_delay)
        if self.token_statuses:
            status = self.token_statuses.pop(0)
            if status != 200:
                return web.json_response({"error": "fake", "code": status}, status=status)
        if self.token_down:
            return web.json_response({"error": "down"}, status=503)
        if form.get("grant_type") != "refresh_token" or "refresh_token" not in form:
            return web.json_response({"error": "bad request"}, status=400)
        if form["refresh_token"] != self.refresh_token:
            return web.json_response({"error": "invalid refresh token"}, status=404)
        if self.same_token_times > 0 and self.last_token is not None:
            self.same_token_times -= 1
            access = self.last_token
        else:
            access = f"access-{next(self._counter)}-{secrets.token_hex(12)}"
        lifetime = self.lifetime if self.lifetime is not None else 600
        self.tokens[access] = time.monotonic() + lifetime
        self.last_token = access
        body: dict[str, Any] = {
            "access_token": access,
            "refresh_token": self.refresh_token,
            "user_id": "user-1234",
            "session_id": "session-1",
            "role": "admin",
            "tenant": "squirro_test",
        }
        if self.rotate:
            self.refresh_token = f"refresh-rotated-{secrets.token_hex(12)}"
            body["refresh_token"] = self.refresh_token
        if self.lifetime is not None:
            body["expires_in"] = self.lifetime
        return web.json_response(body)

    def authorized(self, request: web.Request) -> bool:
        if self.reject_all:
            return False
        values = request.headers.getall("Authorization", [])
        if len(values) != 1 or not values[0].startswith("Bearer "):
            return False
        expiry = self.tokens.get(values[0][7:])
        return expiry is not None and expiry > time.monotonic()

    @web.middleware
    async def record(self, request: web.Request, handler: Callable[..., Any]) -> Any:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        seen = Seen(request.method, request.raw_path, list(request.headers.items()),
                    peer_port=peer[1] if peer else 0)
        self.requests.append(seen)
        request[SEEN] = seen
        if not request.path.endswith(TOKEN_PATH) and not self.authorized(request):
            # Drain nothing by default: a real cluster answers 401 before reading a large body.
            if self.drain_before_401:
                while await request.content.readany():
                    pass
            return web.json_response({"error": "unauthorized"}, status=401)
        return await handler(request)

    async def echo(self, request: web.Request) -> web.Response:
        """Answer with what arrived: method, raw path, headers in order, body hash and size."""
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        seen = request[SEEN]
        seen.body_size, seen.body_sha256 = size, digest.hexdigest()
        hook = self.hooks.get("echo")
        if hook is not None:
            return await hook(request)  # type: ignore[no-any-return]
        return web.json_response({
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_size": size,
            "body_sha256": digest.hexdigest(),
        })

    async def download(self, request: web.Request) -> web.StreamResponse:
        """`size` deterministic bytes; chunked unless `length=1`."""
        size = int(request.query.get("size", "1024"))
        chunk = int(request.query.get("chunk", str(256 * 1024)))
        resp = web.StreamResponse()
        resp.content_type = "application/octet-stream"
        if request.query.get("length") == "1":
            resp.content_length = size
        await resp.prepare(request)
        if request.method == "HEAD":  # aiohttp would send a StreamResponse's body even so
            await resp.write_eof()
            return resp
        block = pattern(chunk)
        sent = 0
        try:
            while sent < size:
                piece = block[: min(chunk, size - sent)]
                await resp.write(piece)  # returns once the socket took it: backpressure
                sent += len(piece)
                self.sent = sent
            await resp.write_eof()
        except BaseException:
            self.endings.append("/download cut")
            raise
        self.endings.append("/download complete")
        return resp

    async def drop(self, request: web.Request) -> web.StreamResponse:
        """Promise a body (`promise` bytes with `length=1`), send `send` bytes of it, then
        break the connection, or with `stall` seconds, go silent that long first."""
        resp = web.StreamResponse()
        if request.query.get("length") == "1":
            resp.content_length = int(request.query.get("promise", "100000"))
        await resp.prepare(request)
        await resp.write(b"x" * int(request.query.get("send", "10000")))
        await asyncio.sleep(float(request.query.get("stall", "0.05")))
        assert request.transport is not None
        request.transport.abort()
        return resp

    async def sse(self, request: web.Request) -> web.StreamResponse:
        count = int(request.query.get("count", "5"))
        interval = float(request.query.get("interval", "0.1"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for n in range(count):
            await resp.write(f"id: {n}\ndata: {time.time():.6f}\n\n".encode())
            await asyncio.sleep(interval)
        await resp.write_eof()
        return resp

    async def status(self, request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        headers = dict(request.query)
        return web.Response(status=code, headers=headers,
                            body=None if code in (204, 304) else b"status body")

    async def slow_upload(self, request: web.Request) -> web.Response:
        """Read nothing until `release_reader` is set, then hash the body while receiving it."""
        await self.release_reader.wait()
        digest = hashlib.sha256()
        try:
            async for chunk in request.content.iter_any():
                digest.update(chunk)
                self.received += len(chunk)
        except BaseException:
            self.endings.append("/slow-upload cut")
            raise
        self.endings.append("/slow-upload complete")
        return web.json_response({"body_size": self.received, "body_sha256": digest.hexdigest()})

    async def sse_live(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events the test feeds through `sse_queue`, one write each; None ends."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        while (event := await self.sse_queue.get()) is not None:
            await resp.write(f"data: {event}\n\n".encode())
            self.sse_sent_at.append(time.perf_counter())
        await resp.write_eof()
        return resp

    async def informational(self, request: web.Request) -> web.Response:
        """1xx answers (103 Early Hints, an unasked 100 Continue) before the real one."""
        assert request.transport is not None
        request.transport.write(
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 100 Continue\r\n\r\n"
        )
        return web.Response(body=b"final answer", headers={"X-Final": "yes"})

    async def encoded(self, request: web.Request) -> web.Response:
        """A body stored compressed, sent as stored with its Content-Encoding."""
        encoding = request.match_info["encoding"]
        return web.Response(body=ENCODED_BODIES[encoding], headers={
            "Content-Encoding": encoding, "Content-Type": "text/plain", "Vary": "Accept-Encoding",
        })

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        """Echo text and binary; answer pings; obey `close:<code>:<reason>`, `ping:<payload>`
        and `drop`; record everything it saw in `ws_events`."""
        ws = web.WebSocketResponse(protocols=self.ws_protocols, autoping=False)
        await ws.prepare(request)
        self.ws_events.append(("open", ws.ws_protocol))
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                if msg.data.startswith("close:"):
                    _, code, reason = msg.data.split(":", 2)
                    await ws.close(code=int(code), message=reason.encode())
                elif msg.data.startswith("ping:"):
                    await ws.ping(msg.data[5:].encode())
                elif msg.data == "drop":
                    assert request.transport is not None
                    request.transport.abort()
                else:
                    await ws.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
            elif msg.type == WSMsgType.PING:
                self.ws_events.append(("ping", msg.data))
                await ws.pong(msg.data)
            elif msg.type == WSMsgType.PONG:
                self.ws_events.append(("pong", msg.data))
        self.ws_events.append(("closed", ws.close_code))
        return ws

    def app(self, prefix: str = "") -> web.Application:
        """The fake as an aiohttp app; `prefix` mounts it under a path (`/squirro`)."""
        # Bodies are hashed as they arrive on the wire: no decompression of gzip uploads.
        app = web.Application(middlewares=[self.record], client_max_size=1024**4,
                              handler_args={"auto_decompress": False})
        app.router.add_post(prefix + TOKEN_PATH, self.token)
        app.router.add_get(prefix + "/download", self.download)
        app.router.add_get(prefix + "/drop", self.drop)
        app.router.add_get(prefix + "/sse", self.sse)
        app.router.add_get(prefix + "/ws", self.websocket)
        app.router.add_route("*", prefix + "/slow-upload", self.slow_upload)
        app.router.add_get(prefix + "/sse-live", self.sse_live)
        app.router.add_get(prefix + "/informational", self.informational)
        app.router.add_get(prefix + "/encoded/{encoding}", self.encoded)
        app.router.add_route("*", prefix + "/status/{code}", self.status)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        return app
