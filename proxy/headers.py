"""Header rules for both directions: pure functions, tested as tables.

RFC 9110 section 7.6.1: hop-by-hop headers describe one connection and must not be forwarded,
nor may any header the `Connection` header names.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        hdrs.CONNECTION, hdrs.KEEP_ALIVE, hdrs.PROXY_AUTHORIZATION, hdrs.PROXY_AUTHENTICATE,
        hdrs.TE, hdrs.TRAILER, hdrs.TRANSFER_ENCODING, hdrs.UPGRADE,
        "Proxy-Connection",  # non-standard, still sent by some old clients
    )
)
# Request headers the proxy sets itself (or answers itself, like Expect: aiohttp has already
# told the client to continue).
REQUEST_OWN = frozenset(h.lower() for h in (hdrs.HOST, hdrs.AUTHORIZATION, hdrs.EXPECT))
COOKIE_REQUEST = "cookie"
COOKIE_RESPONSE = frozenset(("set-cookie", "set-cookie2"))
# CORS is decided by the proxy (guard.py), never by the cluster's own answer.
CORS_PREFIX = "access-control-"


def connection_named(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    """Header names listed in Connection (lower case), which are hop-by-hop too."""
    values = headers.getall(hdrs.CONNECTION, ())
    if not values:
        return frozenset()
    return frozenset(
        token.strip().lower() for value in values for token in value.split(",") if token.strip()
    )


def upstream_request_headers(
    incoming: CIMultiDictProxy[str],
    bearer: str,
    *,
    forward_cookies: bool = False,
    extra: Iterable[tuple[str, str]] = (),
) -> CIMultiDict[str]:
    """Headers for the cluster: the client's, minus hop-by-hop and our own, plus the bearer."""
    named = connection_named(incoming)
    out: CIMultiDict[str] = CIMultiDict()
    spelling: dict[str, str] = {}
    for name, value in incoming.items():
        lname = name.lower()
        if lname in HOP_BY_HOP or lname in REQUEST_OWN or lname in named:
            continue
        if not forward_cookies and lname == COOKIE_REQUEST:
            continue
        # Repeats keep the first spelling of the name: aiohttp's client merges headers by exact
        # spelling and would let a later "x-multi" replace earlier "X-Multi" values.
        out.add(spelling.setdefault(lname, name), value)
    for name, value in extra:
        out[name] = value
    out[hdrs.AUTHORIZATION] = "Bearer " + bearer
    return out


def client_response_headers(
    upstream: CIMultiDictProxy[str],
    *,
    cluster: URL,
    proxy_base: str,
    forward_cookies: bool = False,
) -> CIMultiDict[str]:
    """Headers for the client: the cluster's, minus hop-by-hop, cookies and CORS; Location fixed."""
    named = connection_named(upstream)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lname = name.lower()
        if lname in HOP_BY_HOP or lname in named or lname.startswith(CORS_PREFIX):
            continue
        if not forward_cookies and lname in COOKIE_RESPONSE:
            continue
        if lname == "location":
            value = rewrite_location(value, cluster, proxy_base)
        out.add(name, value)
    return out


def rewrite_location(value: str, cluster: URL, proxy_base: str) -> str:
    """Point a Location at the cluster back at the proxy, so a client following it stays here.

    `proxy_base` is the proxy's own origin as the client reached it (`http://127.0.0.1:8080`).
    Locations elsewhere (another host, a different path prefix) are left alone.
    """
    prefix = cluster.raw_path.rstrip("/")
    if value.startswith("/") and not value.startswith("//"):
        # Relative to the cluster's origin: strip the cluster's path prefix.
        if prefix and (value == prefix or value.startswith(prefix + "/")):
            return value[len(prefix):] or "/"
        return value
    try:
        target = URL(value, encoded=True)
    except ValueError:
        return value
    if not target.is_absolute():
        return value
    if (target.scheme, (target.host or "").lower(), target.port) != (
        cluster.scheme, (cluster.host or "").lower(), cluster.port
    ):
        return value
    path = target.raw_path
    if prefix:
        if path != prefix and not path.startswith(prefix + "/"):
            return value
        path = path[len(prefix):] or "/"
    rest = path
    if target.raw_query_string:
        rest += "?" + target.raw_query_string
    if target.raw_fragment:
        rest += "#" + target.raw_fragment
    return proxy_base + rest
