"""The token life cycle against a fake token endpoint: refresh ahead of expiry, rotation,
final and passing failures, and never a stale token."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from proxy.tokens import TokenRejected, backoff_delay, lifetime_from
from tests.conftest import Running, StartProxy
from tests.fakes import FakeCluster
from tests.helpers import until

ERROR_HEADER = "X-Squirro-Proxy-Error"


async def test_refreshes_ahead_of_expiry(
    start_proxy: StartProxy, cluster: FakeCluster
) -> None:
    """With a 2 s lifetime, new tokens arrive before the old ones expire (about 80% in)."""
    cluster.lifetime = 2.0
    proxy = await start_proxy()
    first = proxy.tokens.current
    await until(lambda: cluster.token_calls >= 3)
    second_at = proxy.tokens.history[1].at
    elapsed = second_at - first.obtained_wall
    assert 1.4 <= elapsed < 2.0, elapsed  # refreshed before expiry (75-85% in), not too early


async def test_requests_never_see_expired_token_across_refreshes(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """Requests made over several short lifetimes all succeed without a single 401 retry."""
    cluster.lifetime = 0.5
    proxy = await start_proxy()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        async with client.get(proxy.url / "api/x") as resp:
            assert resp.status == 200
        await asyncio.sleep(0.02)
    assert cluster.token_calls >= 4
    assert len(cluster.api_requests()) == len({id(r) for r in cluster.api_requests()})
    assert all(r.raw_path == "/api/x" for r in cluster.api_requests())


async def test_default_lifetime_when_no_expires_in(
    start_proxy: StartProxy, cluster: FakeCluster
) -> None:
    """Without expires_in the configured --token-lifetime decides when to refresh."""
    cluster.lifetime = None
    proxy = await start_proxy(token_lifetime=0.5)
    assert proxy.tokens.current.lifetime == 0.5
    await until(lambda: cluster.token_calls >= 3)


async def test_expires_in_honoured(start_proxy: StartProxy, cluster: FakeCluster) -> None:
    """An expires_in in the answer overrides the configured lifetime."""
    cluster.lifetime = 1234
    proxy = await start_proxy(token_lifetime=600)
    assert proxy.tokens.current.lifetime == 1234


async def test_rotation_followed(start_proxy: StartProxy, cluster: FakeCluster) -> None:
    """A rotated refresh token is used from then on (the fake refuses the old one)."""
    cluster.rotate = True
    cluster.lifetime = 0.3
    await start_proxy()
    await until(lambda: cluster.token_calls >= 4)
    forms = cluster.token_forms
    assert all(f["grant_type"] == "refresh_token" for f in forms)
    # Each exchange sent the token the previous answer handed out, and all succeeded.
    assert len({f["refresh_token"] for f in forms}) == len(forms)
    assert cluster.tokens  # every exchange produced an access token


async def test_identity_known_after_first_exchange(proxy: Running) -> None:
    """The token answer's user, tenant and role are kept (for the start-up line and status)."""
    ident = proxy.tokens.identity
    assert (ident.user_id, ident.tenant, ident.role) == ("user-1234", "squirro_test", "admin")


@pytest.mark.parametrize(
    ("status", "phrase"),
    [
        (400, "malformed (400)"),
        (401, "refused (401 unauthorized)"),
        (403, "forbidden"),
        (404, "rejected as invalid (404): create a new one under 'API Access'"),
        (410, "expired or was revoked (410)"),
    ],
)
async def test_final_errors_at_start_up(
    start_proxy: StartProxy, cluster: FakeCluster, status: int, phrase: str
) -> None:
    """400/403/404/410 at start-up are final: one attempt, a reason that says what to do."""
    cluster.token_statuses = [status] * 5
    proxy = await start_proxy(wait_token=False)
    with pytest.raises(TokenRejected) as info:
        await proxy.tokens.wait_first()
    assert phrase in info.value.reason
    await asyncio.sleep(0.3)
    assert cluster.token_calls == 1  # never retried


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429])
async def test_passing_errors_at_start_up_are_retried(
    start_proxy: StartProxy, cluster: FakeCluster, status: int
) -> None:
    """5xx (and other unknown answers) at start-up are retried with backoff until one works."""
    cluster.token_statuses = [status, status]
    proxy = await start_proxy(wait_token=False)
    token = await asyncio.wait_for(proxy.tokens.wait_first(), 10)
    assert token.value == cluster.last_token
    assert cluster.token_calls == 3


async def test_failed_refresh_keeps_valid_token_then_503(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """While refreshes fail the current token is used until it expires; then 503, not stale."""
    cluster.lifetime = 1.0
    proxy = await start_proxy()
    cluster.token_down = True
    await until(lambda: cluster.token_calls >= 2)  # a refresh failed
    async with client.get(proxy.url / "api/x") as resp:
        assert resp.status == 200  # still within the old token's lifetime
    await until(lambda: not proxy.tokens.current.valid(time.monotonic()))
    seen_before = len(cluster.api_requests())
    async with client.get(proxy.url / "api/x") as resp:
        assert resp.status == 503
        assert resp.headers[ERROR_HEADER] == "token_unavailable"
        assert "Retry-After" in resp.headers
    assert len(cluster.api_requests()) == seen_before  # the stale token was never sent
    cluster.token_down = False
    await until(lambda: proxy.tokens.current.valid(time.monotonic()))
    async with client.get(proxy.url / "api/x") as resp:
        assert resp.status == 200


async def test_revoked_refresh_token_later_gives_503_token_rejected(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """A refresh token revoked after start-up: refreshing stops, requests get a clear 503."""
    cluster.lifetime = 0.5
    proxy = await start_proxy()
    cluster.refresh_token = "something-else-entirely"  # the proxy's token is now invalid
    await until(lambda: proxy.tokens.failure is not None and proxy.tokens.failure.final)
    await until(lambda: not proxy.tokens.current.valid(time.monotonic()))
    async with client.get(proxy.url / "api/x") as resp:
        assert resp.status == 503
        assert resp.headers[ERROR_HEADER] == "token_rejected"
        assert "API Access" in (await resp.json())["detail"]
    calls = cluster.token_calls
    await asyncio.sleep(0.6)
    assert cluster.token_calls == calls  # final: no hammering of the token endpoint


async def test_token_exchange_form(proxy: Running, cluster: FakeCluster) -> None:
    """The exchange posts grant_type=refresh_token and the refresh token, form-encoded."""
    assert cluster.token_forms[0] == {"grant_type": "refresh_token",
                                      "refresh_token": "refresh-token-abcdefghijklmnop"}


async def test_optional_exchange_fields_sent_when_set(
    start_proxy: StartProxy, cluster: FakeCluster
) -> None:
    """client_id, client_secret and tenant go along only when configured."""
    from proxy.config import Secret

    await start_proxy(client_id="cid", client_secret=Secret("csecret-123456"), tenant="acme")
    form = cluster.token_forms[0]
    assert (form["client_id"], form["client_secret"], form["tenant"]) == (
        "cid", "csecret-123456", "acme")


def test_backoff_grows_with_jitter_and_cap() -> None:
    """Backoff delays grow exponentially, are jittered, and stop at the cap."""
    first = [backoff_delay(1) for _ in range(50)]
    fifth = [backoff_delay(5) for _ in range(50)]
    late = [backoff_delay(30) for _ in range(50)]
    assert max(first) <= 0.5 < max(fifth)
    assert len(set(first)) > 1  # jittered
    assert max(late) <= 30.0


async def test_late_scheduled_refresh_does_not_fail_requests(
    start_proxy: StartProxy, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """A token that expired before its scheduled refresh ran (a stalled event loop) is renewed
    by the next request, which waits for it instead of getting a 503."""
    cluster.lifetime = 0.3
    proxy = await start_proxy()
    # Stall the background refresh: the token expires with no exchange under way.
    await proxy.tokens.stop()
    await until(lambda: not proxy.tokens.current.valid(time.monotonic()))
    calls = cluster.token_calls
    async with client.get(proxy.url / "api/x") as resp:
        assert resp.status == 200
    assert cluster.token_calls == calls + 1
    assert proxy.tokens.history[-1].trigger == "expired"


async def test_401_refreshes_respect_the_backoff(
    proxy: Running, cluster: FakeCluster, client: aiohttp.ClientSession
) -> None:
    """401s while the token endpoint fails do not each cost a token call: within the backoff
    they get 503 with Retry-After at once."""
    cluster.revoke_access_tokens()
    cluster.token_down = True
    before = cluster.token_calls
    for _ in range(20):
        async with client.get(proxy.url / "api/x") as resp:
            await resp.read()
    assert resp.status == 503
    assert resp.headers[ERROR_HEADER] == "token_unavailable"
    assert "Retry-After" in resp.headers
    assert cluster.token_calls - before <= 3


async def test_401_joining_a_scheduled_exchange_that_returns_the_same_token(
    proxy: Running, cluster: FakeCluster
) -> None:
    """A 401 that joins a scheduled exchange which hands the refused token back asks again,
    rather than retrying with the token the cluster just refused."""
    stale = proxy.tokens.current
    cluster.tokens.pop(stale.value)  # refused by the cluster...
    cluster.same_token_times = 1  # ...yet handed out once more (clock drift between nodes)
    cluster.token_delay = 0.2
    scheduled = asyncio.ensure_future(proxy.tokens._single_flight("scheduled"))
    await until(lambda: cluster.token_calls == 2)  # the scheduled exchange is under way
    new = await proxy.tokens.refresh_after_401(stale)
    assert new.value != stale.value
    assert (await scheduled).value == stale.value
    assert cluster.token_calls == 3


@pytest.mark.parametrize(
    ("expires_in", "lifetime"),
    [(1234, 1234.0), (90.5, 90.5), ("300", 300.0), ("soon", 600.0), (0, 600.0), (-5, 600.0),
     (True, 600.0), (None, 600.0), ("inf", 600.0), ("nan", 600.0)],
)
def test_expires_in_forms(expires_in: object, lifetime: float) -> None:
    """A positive expires_in (number or numeric string) sets the lifetime; anything else falls
    back to --token-lifetime."""
    assert lifetime_from(expires_in, 600.0) == lifetime
