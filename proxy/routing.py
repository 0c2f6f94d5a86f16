"""The catch-all route: every path not served by the proxy itself goes to the forward handler.

aiohttp's `add_route("*", "/{tail:.*}")` matches a regular expression and builds a match dict
for every request; this resource matches by returning its route (2% of the instructions per
request, measured with callgrind). It sits under the router's "/" key, so the proxy's own `/-/`
resources, which are more specific, are still found first.
"""

from __future__ import annotations

from collections.abc import Iterator

from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp.web_urldispatcher import (
    AbstractResource,
    AbstractRoute,
    ResourceRoute,
    UrlMappingMatchInfo,
    _ExpectHandler,
    _InfoDict,
)
from yarl import URL


class CatchAll(AbstractResource):
    """Matches every path and method."""

    def __init__(self, handler: Handler, *, expect_handler: _ExpectHandler | None = None) -> None:
        super().__init__()
        self._route = ResourceRoute("*", handler, self, expect_handler=expect_handler)
        self._methods = {"*"}

    @property
    def canonical(self) -> str:
        return "/"

    def url_for(self, **kwargs: str) -> URL:
        return URL.build(path="/")

    async def resolve(
        self, request: web.Request
    ) -> tuple[UrlMappingMatchInfo | None, set[str]]:
        return UrlMappingMatchInfo({}, self._route), self._methods

    def add_prefix(self, prefix: str) -> None:
        raise NotImplementedError("the catch-all route is not for sub-applications")

    def get_info(self) -> _InfoDict:
        return {"path": "/*"}

    def raw_match(self, path: str) -> bool:
        return True

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[AbstractRoute]:
        return iter((self._route,))
