"""Browser and host safety: who may use the credentials the proxy injects.

Every request the proxy serves acts with the user's full Squirro rights, so before anything is
forwarded (and before any body is read) one middleware checks, cheapest and most basic first:

1. the request target is a plain path that cannot choose the upstream host or climb out of the
   cluster's path prefix (absolute-form, authority-form, `*`, CONNECT, `//host`, `/@host`,
   backslashes, `..`/`%2e%2e` segments, encoded NUL/CR/LF: 400; CONNECT and TRACE: 405);
2. the `Host` is a loopback name or one allowed with `--allow-host` (DNS rebinding: 403);
3. a browser request comes from the proxy's own origin or an allowed `--cors-origin`
   (`Origin`, else `Sec-Fetch-Site: cross-site`/`same-site`: 403); allowed CORS preflights are
   answered here and never forwarded;
4. the client token, when one is configured (401 with `WWW-Authenticate`);
5. `--read-only` (405) and the path allow/deny lists (403).

Liveness and readiness probes (`PROBE_PATHS`) skip 2-5: kubelet and Docker send neither a
loopback Host nor a token. Everything the guard refuses carries the `X-Squirro-Proxy-Error`
header and a JSON body, and never reaches the cluster.

The policy is compiled once from the settings; the per-request path is a handful of string and
set operations (no regex unless path patterns are configured).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import unquote

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from multidict import CIMultiDictProxy

from .config import Settings
from .errors import proxy_error
from .paths import OPS_PREFIX, PROBE_PATHS
from .redact import REDACTOR, mask_query

log = logging.getLogger("squirro_proxy.guard")


LOOPBACK_NAMES = frozenset(("localhost", "127.0.0.1", "[::1]"))
READ_METHODS = frozenset((hdrs.METH_GET, hdrs.METH_HEAD, hdrs.METH_OPTIONS))
# TRACE would echo the request, bearer token included, back to the client.
NEVER_FORWARDED = frozenset((hdrs.METH_CONNECT, hdrs.METH_TRACE, "TRACK"))
REALM = 'realm="squirro-proxy"'
CHALLENGES = (f"Bearer {REALM}", f"Basic {REALM}, charset=\"UTF-8\"")
# Error codes the guard answers with (the X-Squirro-Proxy-Error header), for tests and docs.
CODES = frozenset((
    "bad_request_target", "method_not_allowed", "http_version_not_supported",
    "host_not_allowed", "cross_origin_refused", "client_token_required", "read_only",
    "path_not_allowed", "expectation_failed",
))
# A preflight may ask for these, and only these, request headers by name: RFC 9110 tokens.
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
                         "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
# Response headers a page may read without being told (CORS-safelisted); the rest are exposed
# by name. Set-Cookie is never exposed to scripts by browsers anyway.
_SAFELISTED_RESPONSE = frozenset((
    "cache-control", "content-language", "content-length", "content-type", "expires",
    "last-modified", "pragma", "set-cookie", "set-cookie2", "vary",
    "access-control-allow-origin", "access-control-allow-credentials",
    "access-control-expose-headers",
))
PREFLIGHT_MAX_AGE = "600"
# Hosts already judged, so the usual few cost one dict lookup; bounded against Host spraying.
_HOST_CACHE_SIZE = 256
# Percent-decoding rounds when judging a path: catches %252e%252e (decoded twice downstream).
_DECODE_ROUNDS = 3

# The CORS origin a request was allowed as (set by the middleware, read when the response is
# prepared); EXPECT_DEFERRED marks requests whose `Expect: 100-continue` waits for the guard.
CORS_ORIGIN = web.RequestKey("cors_origin", str)
EXPECT_DEFERRED = web.RequestKey("expect_deferred", bool)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --- pure helpers (tested as tables) ---------------------------------------------------------


def split_host(host: str) -> tuple[str, str] | None:
    """`Host` value -> (name lower-cased, port or ""); None when it is not a valid host[:port]."""
    host = host.strip().lower()
    if not host:
        return None
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return None
        name, rest = host[: end + 1], host[end + 1:]
    else:
        name, sep, port = host.partition(":")
        rest = sep + port
    if rest and (rest[0] != ":" or not rest[1:].isdigit() or not rest[1:].isascii()):
        return None
    if not name or "@" in name or "/" in name or "\\" in name:
        return None
    return name, rest[1:]


def is_loopback_literal(name: str) -> bool:
    """An IP literal in 127.0.0.0/8 or ::1 (a rebinding attack always uses a DNS name)."""
    try:
        return ipaddress.ip_address(name[1:-1] if name.startswith("[") else name).is_loopback
    except ValueError:
        return False


def decode_path(path: str) -> str:
    """The path as a server downstream might see it: percent-decoded until stable."""
    for _ in range(_DECODE_ROUNDS):
        if "%" not in path:
            break
        decoded = unquote(path, errors="replace")
        if decoded == path:
            break
        path = decoded
    return path


def target_problem(raw: str) -> str | None:
    """Why a request target is refused, or None when it is a plain path under the prefix."""
    if not raw.startswith("/"):
        return "the request target must be a path (the proxy is not a forward proxy)"
    if "#" in raw:
        return "a request target cannot carry a fragment"
    path = raw.partition("?")[0]
    if path.startswith("//") or path.startswith("/@"):
        return "the path must not name a host"
    if "\\" in path:
        return "the path must not contain backslashes"
    if "%" not in path and "/." not in path:
        return None  # the common case ends here
    decoded = decode_path(path)
    if any(c in decoded for c in "\0\r\n"):
        return "the path must not encode NUL, CR or LF"
    if "\\" in decoded or decoded.startswith("//"):
        return "the path must not encode backslashes or name a host"
    for segment in decoded.split("/"):
        if segment in (".", ".."):
            return "the path must not contain '.' or '..' segments"
    return None


def normalise_path(path: str) -> str:
    """A decoded path with repeated slashes folded, as allow/deny rules compare it."""
    decoded = decode_path(path)
    while "//" in decoded:
        decoded = decoded.replace("//", "/")
    return decoded


class PathRules:
    """Prefixes (`/api/topic/`, matched at segment boundaries) or `*` patterns (one segment)."""

    __slots__ = ("_pattern", "_prefixes", "empty")

    def __init__(self, entries: Iterable[str]) -> None:
        prefixes: list[str] = []
        patterns: list[str] = []
        for entry in entries:
            if "*" in entry:
                body = "[^/]*".join(re.escape(part) for part in entry.rstrip("/").split("*"))
                patterns.append(body)
            else:
                prefixes.append(entry.rstrip("/"))
        self._prefixes = tuple(prefixes)
        self._pattern = (
            re.compile("(?:" + "|".join(patterns) + ")(?:/|$)") if patterns else None
        )
        self.empty = not prefixes and not patterns

    def match(self, path: str) -> bool:
        for prefix in self._prefixes:
            if not prefix or path == prefix or path.startswith(prefix + "/"):
                return True
        return self._pattern is not None and self._pattern.match(path) is not None


def token_from_authorization(values: list[str]) -> bytes | None:
    """The credential a client sent: the Bearer token or the Basic password; None if malformed."""
    if len(values) != 1:
        return None
    scheme, _, credential = values[0].strip().partition(" ")
    scheme = scheme.lower()
    credential = credential.strip()
    if scheme == "bearer" and credential:
        return credential.encode("utf-8", "surrogateescape")
    if scheme == "basic" and credential:
        try:
            decoded = base64.b64decode(credential, validate=True)
        except (binascii.Error, ValueError):
            return None
        _, colon, password = decoded.partition(b":")
        return password if colon else None
    return None


# --- the policy --------------------------------------------------------------------------------


class Guard:
    """The compiled policy and the middleware that applies it."""

    def __init__(self, settings: Settings) -> None:
        self.allowed_hosts = frozenset(LOOPBACK_NAMES | set(settings.allow_hosts))
        bind = settings.host.lower()
        if bind not in ("0.0.0.0", "::", "[::]", ""):
            # Whoever reaches a specific address by that address is not rebinding.
            self.allowed_hosts |= {f"[{bind}]" if ":" in bind and "[" not in bind else bind}
        self.cors_origins = frozenset(settings.cors_origins)
        self.read_only = settings.read_only
        self.allow = PathRules(settings.allow_paths)
        self.deny = PathRules(settings.deny_paths)
        self._host_cache: dict[str, bool] = {}
        self._token_digest: bytes | None = None
        if settings.client_token is not None:
            secret = settings.client_token.reveal()
            REDACTOR.add(secret, lasting=True)
            self._token_digest = hashlib.sha256(secret.encode()).digest()
        self.preflight_methods = (
            "GET, HEAD, OPTIONS" if settings.read_only
            else "GET, HEAD, OPTIONS, POST, PUT, PATCH, DELETE"
        )

    # -- checks ----------------------------------------------------------------------------

    def host_allowed(self, host: str) -> bool:
        known = self._host_cache.get(host)
        if known is not None:
            return known
        parts = split_host(host)
        allowed = parts is not None and (
            parts[0] in self.allowed_hosts
            or f"{parts[0]}:{parts[1]}" in self.allowed_hosts
            or is_loopback_literal(parts[0])
        )
        if len(self._host_cache) < _HOST_CACHE_SIZE:
            self._host_cache[host] = allowed
        return allowed

    @property
    def wants_client_token(self) -> bool:
        return self._token_digest is not None

    def token_ok(self, request: web.BaseRequest) -> bool:
        return self.client_token_ok(request.headers)

    def client_token_ok(self, headers: CIMultiDictProxy[str]) -> bool:
        assert self._token_digest is not None
        sent = token_from_authorization(headers.getall(hdrs.AUTHORIZATION, []))
        # Hash first: compare_digest then compares equal lengths, so not even the length leaks.
        digest = hashlib.sha256(sent if sent is not None else b"\0").digest()
        return hmac.compare_digest(digest, self._token_digest) and sent is not None

    @staticmethod
    def own_origin(origin: str, host: str) -> bool:
        """Whether `Origin` is the proxy itself as the browser reached it (`http://<Host>`)."""
        scheme, sep, rest = origin.partition("://")
        if not sep or scheme not in ("http", "https"):
            return False
        host = host.lower()
        if rest == host:
            return True
        # Browsers leave the default port out of Origin even when the Host carries it.
        default = ":80" if scheme == "http" else ":443"
        return host.endswith(default) and rest == host[: -len(default)]

    # -- the middleware ----------------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        refusal = self.check(request)
        if refusal is not None:
            return refusal
        if EXPECT_DEFERRED in request:
            expect = request.headers.get(hdrs.EXPECT, "").lower()
            if request.version != HttpVersion11 or expect != "100-continue":
                return _refuse(request, 417, "expectation_failed",
                               "only 'Expect: 100-continue' is understood")
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        return await handler(request)

    def check(self, request: web.Request) -> web.StreamResponse | None:
        """The refusal for this request, or None to let it through."""
        method = request.method
        version = request.version
        if version.major != 1:
            return _refuse(request, 505, "http_version_not_supported",
                           "the proxy speaks HTTP/1.0 and HTTP/1.1")
        if method in NEVER_FORWARDED:
            return _refuse(request, 405, "method_not_allowed",
                           f"the proxy does not forward {method} requests")
        raw = request.raw_path
        problem = target_problem(raw)
        if problem is not None:
            return _refuse(request, 400, "bad_request_target", problem)
        headers = request.headers
        if version.minor == 0 and hdrs.TRANSFER_ENCODING in headers:
            # RFC 9112 6.1: HTTP/1.0 has no Transfer-Encoding; such a message is a smuggling try.
            return _refuse(request, 400, "bad_request_target",
                           "Transfer-Encoding is not allowed in an HTTP/1.0 request")

        path = raw.partition("?")[0]
        if path in PROBE_PATHS and method in (hdrs.METH_GET, hdrs.METH_HEAD):
            return None

        host = headers.get(hdrs.HOST, "")
        if not self.host_allowed(host) and not _over_unix_socket(request):
            return _refuse(
                request, 403, "host_not_allowed",
                f"the Host {host!r} is not one of this proxy's names: use localhost or "
                "127.0.0.1, or start the proxy with --allow-host NAME",
            )

        origin = headers.get(hdrs.ORIGIN)
        cors = False
        if origin is not None:
            if origin in self.cors_origins:
                cors = True
                request[CORS_ORIGIN] = origin
            elif not self.own_origin(origin, host):
                return _refuse(
                    request, 403, "cross_origin_refused",
                    f"requests from pages at {origin!r} are refused: start the proxy with "
                    "--cors-origin ORIGIN to let a page call the API",
                )
        elif headers.get("Sec-Fetch-Site") in ("cross-site", "same-site"):
            return _refuse(
                request, 403, "cross_origin_refused",
                "requests from other sites' pages (forms, images, links) are refused",
            )

        if (
            cors and origin is not None and method == hdrs.METH_OPTIONS
            and hdrs.ACCESS_CONTROL_REQUEST_METHOD in headers
        ):
            return self.preflight(request, origin)

        if self._token_digest is not None and not self.token_ok(request):
            return _refuse(
                request, 401, "client_token_required",
                "this proxy needs its client token: send 'Authorization: Bearer <client "
                "token>' or the token as the password of HTTP Basic authentication",
                challenges=True,
            )

        if self.read_only and method not in READ_METHODS:
            return _refuse(request, 405, "read_only",
                           f"the proxy runs with --read-only: {method} is not forwarded",
                           allow="GET, HEAD, OPTIONS")

        if (not self.allow.empty or not self.deny.empty) and not path.startswith(OPS_PREFIX):
            normal = normalise_path(path)
            if self.deny.match(normal) or (not self.allow.empty and not self.allow.match(normal)):
                return _refuse(request, 403, "path_not_allowed",
                               f"{request.path} is not forwarded by this proxy's path rules")
        return None

    def preflight(self, request: web.Request, origin: str) -> web.Response:
        """Answer a CORS preflight from an allowed origin; it never reaches the cluster."""
        asked = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, "")
        names = [n.strip() for n in asked.split(",") if n.strip()]
        headers = {
            hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: origin,
            hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS: "true",
            hdrs.ACCESS_CONTROL_ALLOW_METHODS: self.preflight_methods,
            hdrs.ACCESS_CONTROL_MAX_AGE: PREFLIGHT_MAX_AGE,
            hdrs.VARY: "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
            "Cache-Control": "no-store",
        }
        if names and all(_TOKEN_CHARS.issuperset(n) for n in names):
            headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = ", ".join(names)
        return web.Response(status=204, headers=headers)

    async def add_cors_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """on_response_prepare: CORS headers for allowed origins; `Vary: Origin` for all."""
        headers = response.headers
        vary = headers.get(hdrs.VARY)
        if vary is None:
            headers[hdrs.VARY] = "Origin"
        elif "origin" not in vary.lower():
            headers[hdrs.VARY] = vary + ", Origin"
        origin = request.get(CORS_ORIGIN)
        if origin is None or hdrs.ACCESS_CONTROL_ALLOW_ORIGIN in headers:
            return
        headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
        headers[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"
        exposed = sorted({
            name for name in headers if name.lower() not in _SAFELISTED_RESPONSE
        })
        if exposed:
            headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = ", ".join(exposed)


GUARD = web.AppKey("guard", Guard)


def _refuse(
    request: web.BaseRequest,
    status: int,
    code: str,
    detail: str,
    *,
    allow: str | None = None,
    challenges: bool = False,
) -> web.Response:
    log.info("refused %s %s: %s (%s)", request.method, mask_query(request.raw_path)[:200],
             code, status)
    extra = {"Allow": allow} if allow else None
    response = proxy_error(status, code, detail, headers=extra)
    if challenges:
        for challenge in CHALLENGES:
            response.headers.add(hdrs.WWW_AUTHENTICATE, challenge)
    if request.body_exists:
        # The body stays unread; closing the connection leaves no bytes to misparse as a request.
        response.force_close()
    return response


def _over_unix_socket(request: web.BaseRequest) -> bool:
    """Unix-socket clients send any Host they like, and no browser can reach the socket."""
    transport = request.transport
    return transport is not None and isinstance(transport.get_extra_info("sockname"), str)


async def defer_expect(request: web.Request) -> None:
    """Route expect handler: leave `Expect: 100-continue` for the guard to answer once it ran."""
    request[EXPECT_DEFERRED] = True


def install(app: web.Application, settings: Settings) -> Guard:
    """Add the guard's middleware (and, with CORS origins, its response hook) to `app`."""
    guard = Guard(settings)
    app[GUARD] = guard
    app.middlewares.append(guard.middleware)
    if guard.cors_origins:
        app.on_response_prepare.append(guard.add_cors_headers)
    return guard

