"""First light: a request goes through with the bearer token."""

import aiohttp

from tests.conftest import Running
from tests.fakes import FakeCluster


async def test_get_reaches_cluster_with_bearer(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """A plain GET arrives at the cluster carrying the access token."""
    async with client.get(proxy.url / "api/topic/v0/t/projects") as resp:
        assert resp.status == 200
        data = await resp.json()
    auth = [v for k, v in data["headers"] if k.lower() == "authorization"]
    assert auth == [f"Bearer {cluster.last_token}"]
