"""Answers the proxy gives itself: JSON bodies with a header that tells them from the cluster's."""

from __future__ import annotations

import json

from aiohttp import web

# Present on every response the proxy made itself, never on one the cluster made.
ERROR_HEADER = "X-Squirro-Proxy-Error"


def proxy_error(
    status: int,
    error: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """A JSON error `{"error": ..., "detail": ...}`; `error` is a short stable code."""
    body = json.dumps({"error": error, "detail": detail, "status": status}).encode()
    all_headers = {ERROR_HEADER: error, "Cache-Control": "no-store"}
    if headers:
        all_headers.update(headers)
    return web.Response(
        status=status, body=body, content_type="application/json", headers=all_headers
    )
