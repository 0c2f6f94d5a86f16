"""The aiohttp sessions to the cluster: the token exchange, WebSocket handshakes, and forwarded
requests when a corporate proxy stands in between (otherwise http1.py forwards them).

No cookie jar, no decompression, no automatic headers, idle timeouts only (streams may last for
hours), TLS verified against the system store or `--ca-bundle`, and a corporate proxy taken from
HTTPS_PROXY / HTTP_PROXY / NO_PROXY once at start-up.
"""

from __future__ import annotations

import ssl
import urllib.request

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from .config import Settings

# What aiohttp's client would add on its own; the cluster gets the client's headers and ours.
_NO_AUTO_HEADERS: CIMultiDict[None] = CIMultiDict(
    (name, None) for name in ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
)


class ProxyRequest(aiohttp.ClientRequest):
    """A client request that adds no default headers.

    The same effect as the session's `skip_auto_headers`, which aiohttp sorts and copies on every
    request (3.5% of the proxy's instructions per request, measured with callgrind).
    """

    def update_auto_headers(self, skip_auto_headers: object) -> None:
        self._skip_auto_headers = _NO_AUTO_HEADERS


def upstream_ssl(settings: Settings) -> ssl.SSLContext | bool:
    if settings.insecure:
        return False
    if settings.ca_bundle is not None:
        return ssl.create_default_context(cafile=str(settings.ca_bundle))
    return True


def corporate_proxy(settings: Settings) -> URL | None:
    """The proxy between this machine and the cluster (HTTPS_PROXY / HTTP_PROXY, unless NO_PROXY
    names the cluster), read once: aiohttp's trust_env reads the environment
    and ~/.netrc in a worker thread on every request, which cost three quarters of the proxy's
    time per request."""
    if urllib.request.proxy_bypass(settings.cluster.host or ""):
        return None
    raw = urllib.request.getproxies().get(settings.cluster.scheme or "")
    if not raw:
        return None
    return URL(raw if "://" in raw else f"http://{raw}")


class RedirectRefused(aiohttp.ClientError):
    """The cluster answered a WebSocket handshake with a redirect, which is never followed."""

    def __init__(self, status: int, location: str | None) -> None:
        super().__init__(f"the cluster redirected the handshake ({status})")
        self.status = status
        self.location = location


async def refuse_redirects(
    request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
) -> aiohttp.ClientResponse:
    """Client middleware for WebSocket handshakes: aiohttp's ws_connect always follows
    redirects, possibly to another host and with the client's headers; stop at the first."""
    response = await handler(request)
    if response.status in (301, 302, 303, 307, 308):
        location = response.headers.get("Location")
        response.close()
        raise RedirectRefused(response.status, location)
    return response


def make_session(
    settings: Settings,
    *,
    pool_size: int | None = None,
    middlewares: tuple[aiohttp.ClientMiddlewareType, ...] = (),
) -> aiohttp.ClientSession:
    """An upstream session. The app keeps three, each with its own pool, so that long streams
    and WebSockets can never take every connection the token exchange needs."""
    connector = aiohttp.TCPConnector(
        limit=pool_size or settings.pool_size, ssl=upstream_ssl(settings),
        enable_cleanup_closed=False,
    )
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        # No total timeout: downloads and event streams may last for hours.
        # `connect` bounds the wait for a pool slot plus the connection itself, so a full pool
        # answers 504 in time instead of queueing a request for ever.
        timeout=aiohttp.ClientTimeout(
            total=None, connect=settings.connect_timeout, sock_connect=settings.connect_timeout,
            sock_read=settings.read_timeout,
        ),
        request_class=ProxyRequest,
        trust_env=False,
        # Credentials in the proxy URL (http://user:password@host) become Proxy-Authorization.
        proxy=corporate_proxy(settings),
        max_line_size=65536,
        max_field_size=65536,
        middlewares=middlewares,
    )
