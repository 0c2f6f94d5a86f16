"""A simulated Squirro cluster for `squirro-proxy --demo`: try the proxy with no cluster at hand.

It speaks the real token endpoint's status codes, hands out access tokens that expire quickly (so
refreshes show in the log), and serves a few realistic endpoints that demand a valid bearer token.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import time
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.typedefs import Handler

DEMO_REFRESH_TOKEN = "demo-user-token-0123456789"  # noqa: S105 (public demo value)
DEMO_TENANT = "squirro_demo"
DEMO_LIFETIME = 30  # seconds: short, so the proxy's refreshes show in its log

_PROJECTS = [
    {"id": "Lz6Qb7TdRz2sWQG9rUcR7A", "title": "Market Intelligence", "type": "Project",
     "created_at": "2026-03-02T09:14:11"},
    {"id": "7qWm0YH4S7mHk6kq0a9M2g", "title": "Customer Support Insights", "type": "Project",
     "created_at": "2026-05-19T15:40:02"},
    {"id": "vJ3o2n1tQ9KqF7bI0xH6Vw", "title": "Contracts Review", "type": "Project",
     "created_at": "2026-09-07T11:03:45"},
]


@dataclass
class DemoState:
    lifetime: int = DEMO_LIFETIME
    access_tokens: dict[str, float] = field(default_factory=dict)  # token -> expires (epoch)
    token_calls: int = 0


STATE = web.AppKey("demo_state", DemoState)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message, "msg": message, "code": status}, status=status)


async def token(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.token_calls += 1
    form = await request.post()
    if form.get("grant_type") != "refresh_token":
        return _error(400, "unsupported grant_type: use refresh_token")
    if not form.get("refresh_token"):
        return _error(400, "missing refresh_token")
    if form.get("refresh_token") != DEMO_REFRESH_TOKEN:
        return _error(404, "invalid refresh token")
    now = time.time()
    # Forget expired tokens so a long demo does not grow without bound.
    state.access_tokens = {t: exp for t, exp in state.access_tokens.items() if exp > now}
    access = secrets.token_hex(24)
    state.access_tokens[access] = now + state.lifetime
    return web.json_response({
        "access_token": access,
        "refresh_token": DEMO_REFRESH_TOKEN,
        "expires_in": state.lifetime,
        "user_id": "qjsRI0s0XVGli8qPPCjKzw",
        "session_id": secrets.token_urlsafe(16),
        "role": "admin",
        "tenant": DEMO_TENANT,
        "role_permissions": ["projects.read.*", "items.read.*"],
        "project_permissions": {},
    })


@web.middleware
async def require_bearer(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path == "/api/user/oauth2/token":
        return await handler(request)
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    expires = request.app[STATE].access_tokens.get(value) if scheme == "Bearer" else None
    if expires is None or expires < time.time():
        return _error(401, "access token missing, invalid or expired")
    return await handler(request)


async def projects(request: web.Request) -> web.Response:
    if request.match_info["tenant"] != DEMO_TENANT:
        return _error(403, "no access to this tenant")
    return web.json_response(_PROJECTS)


async def items(request: web.Request) -> web.Response:
    project = request.match_info["project"]
    if project not in {p["id"] for p in _PROJECTS}:
        return _error(404, "project not found")
    count = min(int(request.query.get("count", "10") or 10), 100)
    return web.json_response({
        "count": count,
        "items": [
            {"id": f"item{n:04d}", "title": f"Demo document {n}", "language": "en",
             "created_at": "2026-11-01T08:00:00"}
            for n in range(count)
        ],
    })


async def chat(request: web.Request) -> web.StreamResponse:
    """Server-sent events, one word at a time, like the GenAI chat stream."""
    question = request.query.get("query", "What is squirro-proxy?")
    answer = [
        "squirro-proxy", "keeps", "a", "fresh", "access", "token", "and", "forwards", "every",
        "request,", "so", "tools", "without", "OAuth", "support", "can", "use", "the",
        "Squirro", "API.",
    ]
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)
    try:
        await resp.write(f"event: question\ndata: {json.dumps(question)}\n\n".encode())
        for word in answer:
            await asyncio.sleep(0.05)
            await resp.write(f"data: {json.dumps({'token': word + ' '})}\n\n".encode())
        await resp.write(b"event: done\ndata: {}\n\n")
        await resp.write_eof()
    except ConnectionError:
        pass  # the reader stopped listening: nothing more to say
    return resp


async def whoami(request: web.Request) -> web.Response:
    return web.json_response({"id": "qjsRI0s0XVGli8qPPCjKzw", "email": "demo@example.com",
                              "tenant": DEMO_TENANT, "role": "admin"})


def make_demo_app(lifetime: int = DEMO_LIFETIME) -> web.Application:
    app = web.Application(middlewares=[require_bearer])
    app[STATE] = DemoState(lifetime=lifetime)
    app.router.add_post("/api/user/oauth2/token", token)
    app.router.add_get("/api/user/v0/{tenant}/users/me", whoami)
    app.router.add_get("/api/topic/v0/{tenant}/projects", projects)
    app.router.add_get("/api/topic/v0/{tenant}/projects/{project}/items", items)
    app.router.add_get("/service/genai/chat/stream", chat)
    return app


async def start_demo_cluster(
    lifetime: int = DEMO_LIFETIME, sock: socket.socket | None = None
) -> tuple[web.AppRunner, str]:
    """Start the demo cluster on a free loopback port (or on `sock`, bound already: worker
    processes must know the URL before it serves); returns its runner and base URL."""
    runner = web.AppRunner(make_demo_app(lifetime), access_log=None)
    await runner.setup()
    site: web.BaseSite = (web.TCPSite(runner, "127.0.0.1", 0) if sock is None
                          else web.SockSite(runner, sock))
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


def try_commands(proxy_url: str) -> list[str]:
    """curl commands for the demo; `proxy_url` is http://host:port or unix:/path/to.sock."""
    curl = "curl"
    if proxy_url.startswith("unix:"):
        curl = f"curl --unix-socket {proxy_url[5:]}"
        proxy_url = "http://localhost"
    return [
        f"{curl} -s {proxy_url}/api/topic/v0/{DEMO_TENANT}/projects",
        f"{curl} -s '{proxy_url}/api/topic/v0/{DEMO_TENANT}/projects/{_PROJECTS[0]['id']}"
        "/items?count=3'",
        f"{curl} -sN '{proxy_url}/service/genai/chat/stream?query=hello'",
    ]
