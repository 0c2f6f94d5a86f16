"""The baseline: an aiohttp proxy as it would be written in an afternoon.

One ClientSession, bodies read whole, headers copied through a dict, the bearer header injected.
It knows no refresh: the token is fixed. Kept deliberately plain, it is what squirro-proxy has to
beat, so do not optimise it. Uses uvloop when importable, as such a script usually would.

    python tests/benchmarks/naive_proxy.py --upstream http://127.0.0.1:8081 --port 8082 \
        --token TOKEN
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
from aiohttp import web

SKIP = {"host", "content-length", "transfer-encoding", "connection", "authorization"}


def make_app(upstream: str, token: str) -> web.Application:
    async def on_startup(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession(auto_decompress=False)

    async def on_cleanup(app: web.Application) -> None:
        await app["session"].close()

    async def handle(request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in SKIP}
        headers["Authorization"] = f"Bearer {token}"
        body = await request.read()
        async with request.app["session"].request(
            request.method, upstream + request.path_qs, headers=headers, data=body,
            allow_redirects=False,
        ) as resp:
            data = await resp.read()
            out = {k: v for k, v in resp.headers.items() if k.lower() not in SKIP}
            return web.Response(status=resp.status, headers=out, body=data)

    # Large enough for the 1 GiB upload: the naive proxy holds it whole in memory.
    app = web.Application(client_max_size=2 * 1024**3)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", required=True)
    args = parser.parse_args()
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    web.run_app(make_app(args.upstream.rstrip("/"), args.token), host="127.0.0.1",
                port=args.port, loop=loop, access_log=None, print=None)


if __name__ == "__main__":
    main()
