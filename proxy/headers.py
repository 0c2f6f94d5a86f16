"""Header rules for both directions: pure functions, tested as tables.

RFC 9110 section 7.6.1: hop-by-hop headers describe one connection and must not be forwarded,
nor may any header the `Connection` header names.

Each direction has a core over (name, value) pairs, and a wrapper in the multidicts aiohttp
takes and gives. The cores take str pairs (from those multidicts) or bytes pairs (the express
lane's, straight from the parser, which it serializes without decoding): one set of rules, its
names spelled both ways, the spelling picked from the pairs themselves (a wrong pick would let
Authorization and Cookie through).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import AnyStr

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
REQUEST_ID = "X-Request-ID"
# Request headers the proxy sets itself (or answers itself, like Expect: aiohttp has already
# told the client to continue).
REQUEST_OWN = frozenset(h.lower() for h in (hdrs.HOST, hdrs.AUTHORIZATION, hdrs.EXPECT))
REQUEST_DROPPED = HOP_BY_HOP | REQUEST_OWN | {REQUEST_ID.lower()}
RESPONSE_DROPPED = HOP_BY_HOP | {REQUEST_ID.lower()}
COOKIE_REQUEST = "cookie"
COOKIE_RESPONSE = frozenset(("set-cookie", "set-cookie2"))
# CORS is decided by the proxy (guard.py), never by the cluster's own answer.
CORS_PREFIX = "access-control-"


@dataclass(frozen=True, slots=True)
class _Names:
    """The names the rules look for, spelled as the pairs they judge (lower case). Kept apart:
    in one set, "x" and b"x" hash alike, and every lookup would compare the two (which
    `python -b` warns of)."""

    request_dropped: frozenset[str] | frozenset[bytes]
    response_dropped: frozenset[str] | frozenset[bytes]
    cookie_request: str | bytes
    cookie_response: frozenset[str] | frozenset[bytes]
    cors_prefix: str | bytes
    location: str | bytes


def _names_for(pairs: list[tuple[AnyStr, AnyStr]]) -> _Names:
    return _RAW if pairs and isinstance(pairs[0][0], bytes) else _TEXT


def _encoded(names: frozenset[str]) -> frozenset[bytes]:
    return frozenset(name.encode() for name in names)


_TEXT = _Names(REQUEST_DROPPED, RESPONSE_DROPPED, COOKIE_REQUEST, COOKIE_RESPONSE, CORS_PREFIX,
               "location")
_RAW = _Names(_encoded(REQUEST_DROPPED), _encoded(RESPONSE_DROPPED), COOKIE_REQUEST.encode(),
              _encoded(COOKIE_RESPONSE), CORS_PREFIX.encode(), b"location")
_CORS_LENGTH = len(CORS_PREFIX)


Pairs = list[tuple[AnyStr, AnyStr]]


def connection_named(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    """Header names listed in Connection (lower case), which are hop-by-hop too."""
    return named_in(headers.getall(hdrs.CONNECTION, ()))


def named_in(connection_values: Iterable[str]) -> frozenset[str]:
    """The names the values of Connection headers list, lower case."""
    return frozenset(
        token.strip().lower() for value in connection_values for token in value.split(",")
        if token.strip()
    )


def upstream_request_pairs(
    incoming: Iterable[tuple[AnyStr, AnyStr]],
    named: frozenset[str] | frozenset[bytes],
    *,
    forward_cookies: bool,
) -> Pairs[AnyStr]:
    """The client's headers the cluster gets: minus hop-by-hop (and those `named` by Connection,
    spelled as the pairs are) and the ones the proxy sets itself (Host, Authorization,
    X-Request-ID)."""
    pairs = incoming if isinstance(incoming, list) else list(incoming)
    names = _names_for(pairs)
    dropped, cookie = names.request_dropped, names.cookie_request
    out: Pairs[AnyStr] = []
    spelling: dict[AnyStr, AnyStr] = {}
    for name, value in pairs:
        lname = name.lower()
        if lname in dropped or lname in named:
            continue
        if not forward_cookies and lname == cookie:
            continue
        # Repeats keep the first spelling of the name: aiohttp's client merges headers by exact
        # spelling and would let a later "x-multi" replace earlier "X-Multi" values.
        out.append((spelling.setdefault(lname, name), value))
    return out


def upstream_request_headers(
    incoming: CIMultiDictProxy[str],
    bearer: str,
    *,
    forward_cookies: bool = False,
    request_id: str | None = None,
) -> CIMultiDict[str]:
    """Headers for the cluster: the client's, minus hop-by-hop and our own, plus the request id
    and the bearer."""
    out = CIMultiDict(upstream_request_pairs(
        incoming.items(), connection_named(incoming), forward_cookies=forward_cookies))
    if request_id is not None:
        out[REQUEST_ID] = request_id
    out[hdrs.AUTHORIZATION] = "Bearer " + bearer
    return out


def client_response_pairs(
    upstream: Iterable[tuple[AnyStr, AnyStr]],
    named: frozenset[str] | frozenset[bytes],
    *,
    cluster: URL,
    proxy_base: str,
    forward_cookies: bool,
) -> Pairs[AnyStr]:
    """The cluster's headers the client gets: minus hop-by-hop (and those `named` by
    Connection, spelled as the pairs are), cookies, CORS and the request id (the proxy sets its
    own); Location pointed back at the proxy."""
    pairs = upstream if isinstance(upstream, list) else list(upstream)
    names = _names_for(pairs)
    dropped, cors, cookies, location = (
        names.response_dropped, names.cors_prefix, names.cookie_response, names.location)
    out: Pairs[AnyStr] = []
    for name, value in pairs:
        lname = name.lower()
        if lname in dropped or lname in named or lname[:_CORS_LENGTH] == cors:
            continue
        if not forward_cookies and lname in cookies:
            continue
        if lname == location:
            value = _rewrite_either(value, cluster, proxy_base)
        out.append((name, value))
    return out


def _rewrite_either(value: AnyStr, cluster: URL, proxy_base: str) -> AnyStr:
    if isinstance(value, str):
        return rewrite_location(value, cluster, proxy_base)
    # Bytes as aiohttp would have decoded them: what is no UTF-8 survives the way back.
    text = value.decode("utf-8", "surrogateescape")
    return rewrite_location(text, cluster, proxy_base).encode("utf-8", "surrogateescape")


def client_response_headers(
    upstream: CIMultiDictProxy[str],
    *,
    cluster: URL,
    proxy_base: str,
    forward_cookies: bool = False,
) -> CIMultiDict[str]:
    """Headers for the client: the cluster's, minus hop-by-hop, cookies and CORS; Location fixed."""
    return CIMultiDict(client_response_pairs(
        upstream.items(), connection_named(upstream), cluster=cluster, proxy_base=proxy_base,
        forward_cookies=forward_cookies,
    ))


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
