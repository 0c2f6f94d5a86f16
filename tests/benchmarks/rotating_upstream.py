"""A cluster whose access token rotates fast: for the token-refresh-under-load benchmark.

Every call to the token endpoint issues a new access token valid for `--lifetime` seconds (sent
as `expires_in`) and retires the previous one at once: the JSON endpoint accepts only the newest
token, and only until it expires. On SIGTERM it writes what it saw (token calls and their
times, requests answered 200 and 401) as JSON to `--summary` and exits.

    python tests/benchmarks/rotating_upstream.py --port 8081 --lifetime 2 --summary out.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
import time
from pathlib import Path

from aiohttp import web

TOKEN_PATH = "/api/user/oauth2/token"
SMALL = {"projects": [{"id": "p1", "title": "Benchmark"}], "count": 1}


class Rotating:
    def __init__(self, lifetime: float) -> None:
        self.lifetime = lifetime
        self.current = ""
        self.expires_at = 0.0
        self.counter = itertools.count(1)
        self.started = time.monotonic()
        self.token_calls: list[float] = []  # seconds since start
        self.ok = 0
        self.refused = 0

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != "refresh_token" or not form.get("refresh_token"):
            return web.json_response({"error": "bad request"}, status=400)
        now = time.monotonic()
        self.token_calls.append(round(now - self.started, 3))
        self.current = f"rotating-access-{next(self.counter)}-abcdefghijkl"
        self.expires_at = now + self.lifetime
        return web.json_response({
            "access_token": self.current, "refresh_token": form["refresh_token"],
            "expires_in": self.lifetime, "user_id": "bench", "tenant": "bench", "role": "admin",
        })

    async def api(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        if not self.current or auth != "Bearer " + self.current or \
                time.monotonic() >= self.expires_at:
            self.refused += 1
            return web.json_response({"error": "unauthorized"}, status=401)
        self.ok += 1
        return web.json_response(SMALL)

    def summary(self) -> dict[str, object]:
        return {"token_calls": self.token_calls, "ok": self.ok, "refused": self.refused}


async def serve(port: int, lifetime: float, summary: Path) -> None:
    state = Rotating(lifetime)
    app = web.Application()
    app.router.add_post(TOKEN_PATH, state.token)
    app.router.add_route("*", "/{tail:.*}", state.api)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    summary.write_text(json.dumps(state.summary()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--lifetime", type=float, default=2.0)
    parser.add_argument("--summary", type=Path, required=True)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.port, args.lifetime, args.summary))
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.port, args.lifetime, args.summary))


if __name__ == "__main__":
    main()
