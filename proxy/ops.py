"""The endpoints the proxy answers itself under the reserved prefix `/-/`; never forwarded.

- `/-/healthy`: liveness. 200 while the process serves.
- `/-/ready`: readiness. 200 with a valid access token, else 503 and a short reason.
- `/-/metrics`: Prometheus text format.
- `/-/status`: a page for a person (HTML), or the same data as JSON.

Probes (kubelet, Docker's HEALTHCHECK) send neither a loopback Host nor a client token, so
`healthy` and `ready` reveal nothing (no cluster name, no failure detail) and change nothing.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
import time
from importlib.resources import files
from string import Template
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import __version__
from .errors import proxy_error
from .forward import UPSTREAM
from .metrics import METRICS, STATS_VIEW, RequestStats
from .paths import HEALTHY, OPS_PREFIX, READY, STATUS
from .paths import METRICS as METRICS_PATH
from .tokens import TokenSource

ENDPOINTS = (HEALTHY, READY, METRICS_PATH, STATUS)

_NO_STORE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}

_PAGE = Template(files("proxy").joinpath("status.html").read_text(encoding="utf-8"))


def _csp_hash(tag: str) -> str:
    match = re.search(rf"<{tag}>(.*?)</{tag}>", _PAGE.template, re.DOTALL)
    assert match is not None, f"status.html has a <{tag}> block"
    digest = hashlib.sha256(match.group(1).encode()).digest()
    return "'sha256-" + base64.b64encode(digest).decode() + "'"


# The page's one style and one script are allowed by their hashes; nothing else may run or load.
_PAGE_CSP = (
    f"default-src 'none'; style-src {_csp_hash('style')}; script-src {_csp_hash('script')}; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


# --- readiness ---------------------------------------------------------------------------------


def not_ready_reason(tokens: TokenSource, now: float | None = None) -> str | None:
    """None when ready; else why not, in words that reveal nothing about the cluster."""
    now = time.monotonic() if now is None else now
    failure = tokens.failure
    if failure is not None and failure.final:
        return "the cluster refused the refresh token"
    current = tokens.current
    if current is not None and current.valid(now):
        return None
    if current is None:
        if failure is not None:
            return "no access token yet: the token exchange is failing"
        return "no access token yet"
    return "the access token expired and refreshing it is failing"


async def healthy(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"}, headers=_NO_STORE)


async def ready(request: web.Request) -> web.Response:
    """Readiness: a valid access token is held and the refresh token was not refused."""
    reason = not_ready_reason(request.app[UPSTREAM].tokens)
    if reason is None:
        return web.json_response({"status": "ready"}, headers=_NO_STORE)
    return proxy_error(503, "not_ready", reason, headers={"Retry-After": "5"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of the application's own registry."""
    metrics = request.app[METRICS]
    with metrics.collector.showing(await request.app[STATS_VIEW]()):
        body = generate_latest(metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST, **_NO_STORE})


async def status(request: web.Request) -> web.Response:
    """The status page, or its data as JSON (Accept: application/json or ?format=json)."""
    data = status_data(request.app, await request.app[STATS_VIEW]())
    if _wants_json(request):
        return web.json_response(data, headers=_NO_STORE)
    return web.Response(
        text=render_page(data), content_type="text/html", charset="utf-8",
        headers={**_NO_STORE, "Content-Security-Policy": _PAGE_CSP,
                 "Referrer-Policy": "no-referrer"},
    )


async def unknown(request: web.Request) -> web.Response:
    """Anything else under `/-/`: the prefix is the proxy's own and never reaches the cluster."""
    if request.path in ENDPOINTS:
        return proxy_error(405, "method_not_allowed",
                           f"{request.path} answers GET and HEAD only",
                           headers={"Allow": "GET, HEAD"})
    return proxy_error(
        404, "unknown_endpoint",
        f"{request.path} is not an endpoint of the proxy: under {OPS_PREFIX} it answers "
        + ", ".join(ENDPOINTS) + " itself and forwards nothing",
    )


def add_routes(app: web.Application) -> None:
    """Register the `/-/` endpoints; call before the catch-all forwarding route."""
    app.router.add_get(HEALTHY, healthy)
    app.router.add_get(READY, ready)
    app.router.add_get(METRICS_PATH, metrics)
    app.router.add_get(STATUS, status)
    app.router.add_route("*", OPS_PREFIX + "{tail:.*}", unknown)


def _wants_json(request: web.Request) -> bool:
    fmt = request.query.get("format")
    if fmt is not None:
        return fmt.lower() == "json"
    best = {"json": -1.0, "html": -1.0}
    for part in request.headers.get("Accept", "").split(","):
        kind, _, params = part.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        kind = kind.strip().lower()
        if kind == "application/json":
            best["json"] = max(best["json"], q)
        elif kind in ("text/html", "application/xhtml+xml"):
            best["html"] = max(best["html"], q)
    return best["json"] > 0 and best["json"] > best["html"]


# --- the data -----------------------------------------------------------------------------------


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def status_data(app: web.Application, stats: RequestStats) -> dict[str, Any]:
    """Everything the status page shows, as plain JSON-able data. Never a token."""
    up = app[UPSTREAM]
    tokens = up.tokens
    now_mono, now = time.monotonic(), time.time()

    current = tokens.current
    access: dict[str, Any] | None = None
    if current is not None:
        access = {
            "obtained_at": _iso(current.obtained_wall),
            "age_seconds": round(now_mono - current.obtained_at, 1),
            "lifetime_seconds": current.lifetime,
            "expires_in_seconds": round(max(0.0, current.expires_at - now_mono), 1),
            "refresh_in_seconds": round(max(0.0, current.refresh_at - now_mono), 1),
        }
    failure = tokens.failure
    by_class: dict[str, int] = {}
    by_method: dict[str, int] = {}
    for (method, cls), count in stats.requests.items():
        by_class[cls] = by_class.get(cls, 0) + count
        by_method[method] = by_method.get(method, 0) + count
    latency = stats.percentiles(50, 90, 99)
    reason = not_ready_reason(tokens, now_mono)
    return {
        "version": __version__,
        "now": _iso(now),
        "uptime_seconds": round(now - stats.started, 1),
        "workers": stats.processes,
        "ready": reason is None,
        "not_ready_reason": reason,
        "cluster": str(up.settings.cluster),
        "identity": {
            "tenant": tokens.identity.tenant,
            "user_id": tokens.identity.user_id,
            "role": tokens.identity.role,
        },
        "access_token": access,
        "token_failure": None if failure is None else {
            "reason": failure.reason, "final": failure.final,
        },
        "refreshes": {
            "ok": tokens.refreshes_ok,
            "failed": dict(tokens.refreshes_failed),
            "recent": [
                {
                    "at": _iso(e.at), "trigger": e.trigger, "ok": e.ok, "reason": e.reason,
                    "duration_ms": round(e.duration * 1000, 1), "lifetime_seconds": e.lifetime,
                }
                for e in reversed(tokens.history)
            ],
        },
        "requests": {
            "total": sum(by_class.values()),
            "in_flight": stats.in_flight,
            "by_status_class": dict(sorted(by_class.items())),
            "by_method": dict(sorted(by_method.items())),
            "retried_after_401": stats.retried,
            "received_bytes": stats.bytes_in,
            "sent_bytes": stats.bytes_out,
        },
        "upstream_latency_ms": {
            "samples": len(stats.recent_latencies),
            **{k: None if v is None else round(v * 1000, 1) for k, v in latency.items()},
        },
        "recent_errors": [
            {"at": _iso(e.at), "method": e.method, "path": e.path, "status": e.status,
             "error": e.error, "detail": e.detail}
            for e in reversed(stats.recent_errors)
        ],
    }


# --- the page -----------------------------------------------------------------------------------


def human_duration(seconds: float) -> str:
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min" + (f" {s % 60} s" if s % 60 else "")
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


# An HTML entity, already safe: shown where a value is not known yet.
NONE_YET = "&ndash;"


def _or_dash(value: str | None) -> str:
    return html.escape(value) if value else NONE_YET


def _ms(value: float | None) -> str:
    if value is None:
        return NONE_YET
    if value >= 1000:
        return f"{value / 1000:.1f} s"
    return f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


def _pill(text: str, kind: str) -> str:
    return f'<span class="pill {kind}">{html.escape(text)}</span>'


def _class_kind(cls: str) -> str:
    return {"2xx": "ok", "3xx": "ok", "4xx": "warn", "5xx": "bad"}.get(cls, "muted")


def _clock(iso: str) -> str:
    return iso[11:19] + " UTC"


def _table(headers: tuple[str, ...], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f'<p class="empty">{html.escape(empty)}</p>'
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(cells) + "</tr>" for cells in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_page(data: dict[str, Any]) -> str:
    """The status page for a person: state first, in colour; every value HTML-escaped."""
    e = html.escape
    ident = data["identity"]
    access = data["access_token"]
    failure = data["token_failure"]
    requests = data["requests"]
    latency = data["upstream_latency_ms"]

    refresh_rows = [
        [f"<td>{e(_clock(r['at']))}</td>",
         f"<td>{_pill('ok', 'ok') if r['ok'] else _pill('failed', 'bad')}</td>",
         f"<td>{e(r['trigger'])}</td>",
         f"<td>{e(r['reason']) if not r['ok'] else 'valid for ' + e(human_duration(r['lifetime_seconds'] or 0))}</td>",  # noqa: E501
         f"<td>{r['duration_ms']:.0f} ms</td>"]
        for r in data["refreshes"]["recent"][:8]
    ]
    error_rows = [
        [f"<td>{e(_clock(r['at']))}</td>",
         f"<td>{_pill(str(r['status']), 'bad')}</td>",
         f"<td>{e(r['method'])}</td>",
         f'<td class="path">{e(r["path"])}</td>',
         f"<td>{e(r['error'])}: {e(r['detail'])}</td>"]
        for r in data["recent_errors"][:10]
    ]
    classes = " ".join(
        _pill(f"{cls} {count}", _class_kind(cls))
        for cls, count in requests["by_status_class"].items()
    ) or '<span class="empty">no requests yet</span>'

    who = ", ".join(x for x in (
        f"user {ident['user_id']}" if ident["user_id"] else "",
        f"tenant {ident['tenant']}" if ident["tenant"] else "",
        f"role {ident['role']}" if ident["role"] else "",
    ) if x) or "identity not known yet"

    values = {
        "title": ("Ready" if data["ready"] else "NOT READY") + " · squirro-proxy",
        "state_class": "ok" if data["ready"] else "bad",
        "state_text": "Ready" if data["ready"] else "Not ready",
        "state_reason": e(data["not_ready_reason"] or "holding a valid access token"),
        "cluster": e(data["cluster"]),
        "who": e(who),
        "tenant": _or_dash(ident["tenant"]),
        "user": _or_dash(ident["user_id"]),
        "role": _or_dash(ident["role"]),
        "expires_in": "" if access is None else str(access["expires_in_seconds"]),
        "expires_in_text": "none" if access is None else
        (human_duration(access["expires_in_seconds"]) if access["expires_in_seconds"] > 0
         else "expired"),
        "token_class": "bad-text" if access is None or access["expires_in_seconds"] <= 0
        else ("warn-text" if access["expires_in_seconds"] < 60 else "ok-text"),
        "lifetime_text": "no access token held" if access is None else
        "time left of " + human_duration(access["lifetime_seconds"]),
        "age": "" if access is None else str(access["age_seconds"]),
        "age_text": NONE_YET if access is None else human_duration(access["age_seconds"]),
        "refresh_in": "" if access is None else str(access["refresh_in_seconds"]),
        "refresh_in_text": NONE_YET if access is None else
        human_duration(access["refresh_in_seconds"]),
        "obtained_text": NONE_YET if access is None else e(_clock(access["obtained_at"])),
        "failure_banner": "" if failure is None else
        f'<section class="alert"><h2>Token refresh failing</h2>{e(failure["reason"])}</section>',
        "total": str(requests["total"]),
        "in_flight": str(requests["in_flight"]),
        "retried": str(requests["retried_after_401"]),
        "status_classes": classes,
        "bytes_text": e(f"{human_bytes(requests['received_bytes'])} received, "
                        f"{human_bytes(requests['sent_bytes'])} sent"),
        "p50": _ms(latency["p50"]),
        "p90": _ms(latency["p90"]),
        "p99": _ms(latency["p99"]),
        "latency_samples": str(latency["samples"]),
        "refresh_table": _table(("Time", "Outcome", "Trigger", "Detail", "Took"),
                                refresh_rows, "no refresh yet"),
        "error_table": _table(("Time", "Status", "Method", "Path", "Error"), error_rows,
                              "none: every request reached the cluster and got an answer"),
        "version": e(data["version"]),
        "uptime": human_duration(data["uptime_seconds"]),
        "now": e(_clock(data["now"])),
    }
    return _PAGE.substitute(values)
