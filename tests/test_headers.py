"""Header rules as tables: hop-by-hop stripping, bearer injection, Location rewriting."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.headers import (
    client_response_headers,
    client_response_pairs,
    connection_named,
    rewrite_location,
    upstream_request_headers,
    upstream_request_pairs,
)


def _h(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


REQUEST_TABLE = [
    ([("Accept", "application/json")], [("Accept", "application/json")]),
    ([("Connection", "keep-alive, X-Secret"), ("X-Secret", "1"), ("X-Keep", "2")],
     [("X-Keep", "2")]),
    ([("Keep-Alive", "timeout=5"), ("TE", "trailers"), ("Trailer", "X"),
      ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"), ("Proxy-Authorization", "x"),
      ("Proxy-Connection", "keep-alive")], []),
    ([("Host", "localhost:8080"), ("Expect", "100-continue")], []),
    ([("Authorization", "Basic dXNlcjpwYXNz"), ("Authorization", "Bearer client")], []),
    ([("X-Multi", "a"), ("x-multi", "b"), ("X-Multi", "c")],
     [("X-Multi", "a"), ("X-Multi", "b"), ("X-Multi", "c")]),
    ([("Cookie", "other_app=secret")], []),
]


@pytest.mark.parametrize(("incoming", "expected"), REQUEST_TABLE)
def test_request_headers_table(
    incoming: list[tuple[str, str]], expected: list[tuple[str, str]]
) -> None:
    """Request headers lose hop-by-hop, Host, Expect, cookies and Authorization; gain one bearer."""
    out = upstream_request_headers(_h(*incoming), "TOKEN")
    assert list(out.items()) == [*expected, ("Authorization", "Bearer TOKEN")]


def test_request_cookies_forwarded_when_asked() -> None:
    """--forward-cookies passes the Cookie header through."""
    out = upstream_request_headers(_h(("Cookie", "a=1")), "T", forward_cookies=True)
    assert out.getall("Cookie") == ["a=1"]


RESPONSE_TABLE = [
    ([("Content-Type", "application/json"), ("Content-Length", "12")],
     [("Content-Type", "application/json"), ("Content-Length", "12")]),
    ([("Connection", "close, X-Hop"), ("X-Hop", "1"), ("Keep-Alive", "t=1"),
      ("Proxy-Authenticate", "Basic"), ("Transfer-Encoding", "chunked"), ("Link", "a")],
     [("Link", "a")]),
    ([("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X", "y")], [("X", "y")]),
    ([("Access-Control-Allow-Origin", "*"), ("Vary", "Origin")], [("Vary", "Origin")]),
    ([("Link", "<a>"), ("Link", "<b>"), ("WWW-Authenticate", "Bearer")],
     [("Link", "<a>"), ("Link", "<b>"), ("WWW-Authenticate", "Bearer")]),
    ([("Location", "https://sq.example.com/api/next?x=1")],
     [("Location", "http://127.0.0.1:8080/api/next?x=1")]),
]


@pytest.mark.parametrize(("incoming", "expected"), RESPONSE_TABLE)
def test_response_headers_table(
    incoming: list[tuple[str, str]], expected: list[tuple[str, str]]
) -> None:
    """Response headers lose hop-by-hop, cookies and the cluster's CORS; repeats stay in order."""
    out = client_response_headers(
        _h(*incoming), cluster=URL("https://sq.example.com"), proxy_base="http://127.0.0.1:8080"
    )
    assert list(out.items()) == expected


def _raw(pairs: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in pairs]


@pytest.mark.parametrize(("incoming", "expected"), REQUEST_TABLE)
def test_request_rules_judge_bytes_as_they_judge_str(
    incoming: list[tuple[str, str]], expected: list[tuple[str, str]]
) -> None:
    """The express lane's pairs (bytes, as they came) meet the rules aiohttp's (str) meet."""
    named = connection_named(_h(*incoming))
    out = upstream_request_pairs(_raw(incoming), frozenset(n.encode() for n in named),
                                 forward_cookies=False)
    assert out == _raw(expected)


@pytest.mark.parametrize(("incoming", "expected"), RESPONSE_TABLE)
def test_response_rules_judge_bytes_as_they_judge_str(
    incoming: list[tuple[str, str]], expected: list[tuple[str, str]]
) -> None:
    named = connection_named(_h(*incoming))
    out = client_response_pairs(
        _raw(incoming), frozenset(n.encode() for n in named),
        cluster=URL("https://sq.example.com"), proxy_base="http://127.0.0.1:8080",
        forward_cookies=False,
    )
    assert out == _raw(expected)


@pytest.mark.parametrize(
    ("cluster", "location", "expected"),
    [
        ("https://sq.example.com", "https://sq.example.com/api/x?a=1",
         "http://127.0.0.1:8080/api/x?a=1"),
        ("https://sq.example.com", "https://SQ.example.com:443/a#f", "http://127.0.0.1:8080/a#f"),
        ("https://sq.example.com", "/api/x", "/api/x"),
        ("https://sq.example.com", "https://other.example.com/x", "https://other.example.com/x"),
        ("https://sq.example.com", "http://sq.example.com/x", "http://sq.example.com/x"),
        ("https://sq.example.com/squirro", "https://sq.example.com/squirro/api/x",
         "http://127.0.0.1:8080/api/x"),
        ("https://sq.example.com/squirro", "https://sq.example.com/elsewhere",
         "https://sq.example.com/elsewhere"),
        ("https://sq.example.com/squirro", "/squirro/api/y", "/api/y"),
        ("https://sq.example.com/squirro", "/squirrel", "/squirrel"),
        ("https://sq.example.com", "//evil.example/x", "//evil.example/x"),
        ("https://sq.example.com", "relative/path", "relative/path"),
    ],
)
def test_location_rewrite_table(cluster: str, location: str, expected: str) -> None:
    """A Location at the cluster points back at the proxy; any other stays as it came."""
    assert rewrite_location(location, URL(cluster), "http://127.0.0.1:8080") == expected
