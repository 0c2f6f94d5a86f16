"""The access-token life cycle: exchange, refresh ahead of expiry, single flight, rotation.

Knows the Squirro token endpoint and nothing of the proxy's server side. One `TokenManager` owns
the refresh token, the current access token and the background task that renews it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
from yarl import URL

from .config import Secret, Settings
from .http1 import CertificateUntrusted
from .redact import REDACTOR
from .tasks import cancel_and_wait

log = logging.getLogger("squirro_proxy.tokens")

TOKEN_PATH = "/api/user/oauth2/token"  # noqa: S105 (a path, not a secret)
# What an access token may hold: visible ASCII (RFC 6750's b64token is a subset of it).
_HEADER_SAFE = frozenset(chr(code) for code in range(0x21, 0x7F))
# Refresh when this share of the lifetime has passed; the jitter keeps many proxies started
# together from refreshing in lockstep.
REFRESH_FRACTION = 0.8
REFRESH_JITTER = 0.05
# If a refresh forced by a 401 hands back the same access token (clock drift between cluster
# nodes), ask again: the SDK does the same, up to three times.
SAME_TOKEN_ATTEMPTS = 3
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0
EXCHANGE_TIMEOUT = 30.0

# What the token endpoint's final answers mean, and what the user should do about them.
FINAL_STATUSES = {
    400: "the token endpoint refused the request as malformed (400): check SQUIRRO_CLUSTER "
         "points at a Squirro cluster and the token was pasted whole",
    # Not in Squirro's documented list, but a credential refusal all the same: retrying it
    # would only hammer the token endpoint.
    401: "the token was refused (401 unauthorized): create a new one under 'API Access' in "
         "Squirro and set SQUIRRO_TOKEN",
    403: "the token was refused (403 forbidden): the user may be disabled or lack API access; "
         "ask your Squirro administrator",
    404: "the token was rejected as invalid (404): create a new one under 'API Access' in "
         "Squirro and set SQUIRRO_TOKEN",
    410: "the token has expired or was revoked (410): create a new one under 'API Access' in "
         "Squirro and set SQUIRRO_TOKEN",
}


class TokenError(Exception):
    """No access token can be had; `reason` is safe to show (it never holds a token)."""

    final = False

    def __init__(self, reason: str, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after = retry_after


class TokenRejected(TokenError):
    """The cluster refused the refresh token: trying again will not help."""

    final = True


class TokenUnavailable(TokenError):
    """A passing failure (cluster down, 5xx, timeout): the next attempt may succeed."""


@dataclass(frozen=True, slots=True)
class AccessToken:
    value: str = field(repr=False)
    obtained_at: float  # monotonic
    lifetime: float
    refresh_at: float  # monotonic
    obtained_wall: float  # epoch seconds, for people
    # Made once, for the many requests that check and send the token (express.py).
    expires_at: float = field(init=False)  # monotonic
    authorization: bytes = field(init=False, repr=False)  # the header's value, encoded

    def __post_init__(self) -> None:
        object.__setattr__(self, "expires_at", self.obtained_at + self.lifetime)
        object.__setattr__(self, "authorization", b"Bearer " + self.value.encode())

    def valid(self, now: float) -> bool:
        return now < self.expires_at


@dataclass(frozen=True, slots=True)
class Identity:
    """Who the proxy acts as, from the token response (nothing secret)."""

    user_id: str | None = None
    tenant: str | None = None
    role: str | None = None


@dataclass(frozen=True, slots=True)
class RefreshEvent:
    at: float  # epoch seconds
    trigger: str  # startup | scheduled | expired | 401 | token-file | check
    ok: bool
    reason: str  # "ok" or why it failed; never a token
    duration: float
    lifetime: float | None = None


class TokenSource(Protocol):
    """What the forwarding handler and the `/-/` endpoints read: the TokenManager itself, or,
    in a worker process, its mirror (token_mirror.py)."""

    identity: Identity
    failure: TokenError | None
    history: deque[RefreshEvent]
    refreshes_ok: int
    refreshes_failed: dict[str, int]

    @property
    def current(self) -> AccessToken | None: ...

    async def token(self) -> AccessToken: ...

    async def refresh_after_401(self, stale: AccessToken) -> AccessToken: ...


def backoff_delay(attempt: int, initial: float = BACKOFF_INITIAL,
                  maximum: float = BACKOFF_MAX) -> float:
    """Full-jitter exponential backoff: a random delay up to initial * 2**(attempt-1), capped."""
    ceiling = min(maximum, initial * (2 ** max(0, attempt - 1)))
    return random.uniform(ceiling / 2, ceiling)


class TokenManager:
    """Holds a valid access token, renewing it in the background before it expires."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        cluster: URL,
        refresh_token: Secret,
        *,
        default_lifetime: float = 600.0,
        client_id: str | None = None,
        client_secret: Secret | None = None,
        tenant: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._token_url = URL(str(cluster).rstrip("/") + TOKEN_PATH)
        self._refresh_token = refresh_token
        self._default_lifetime = default_lifetime
        self._client_id = client_id
        self._client_secret = client_secret
        self._tenant = tenant
        self._clock = clock
        REDACTOR.add(refresh_token.reveal(), lasting=True)

        self._current: AccessToken | None = None
        self._inflight: asyncio.Task[AccessToken] | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._retry_at = 0.0
        self._attempt = 0
        self._first = asyncio.get_running_loop().create_future()

        self.identity = Identity()
        self.failure: TokenError | None = None
        self.history: deque[RefreshEvent] = deque(maxlen=20)
        self.refreshes_ok = 0
        self.refreshes_failed: dict[str, int] = {}
        self.listeners: list[Callable[[RefreshEvent], None]] = []
        # Called once the state (token, failure, counts) settled after a change: the
        # supervisor pushes it to the worker processes.
        self.on_change: list[Callable[[], None]] = []

    @classmethod
    def for_settings(cls, session: aiohttp.ClientSession, settings: Settings) -> TokenManager:
        """The manager the settings describe: their cluster, refresh token and OAuth extras."""
        assert settings.token is not None, "config.load guarantees a token outside demo mode"
        return cls(
            session, settings.cluster, settings.token,
            default_lifetime=settings.token_lifetime, client_id=settings.client_id,
            client_secret=settings.client_secret, tenant=settings.tenant,
        )

    # --- what the proxy asks ---------------------------------------------------------------

    @property
    def current(self) -> AccessToken | None:
        return self._current

    @property
    def _exchanging(self) -> bool:
        return self._inflight is not None and not self._inflight.done()

    @property
    def _refused(self) -> bool:
        """The cluster finally refused the refresh token: only a new one helps."""
        return self.failure is not None and self.failure.final

    async def _settle(self) -> None:
        """Wait for the exchange under way, if any, whatever its outcome."""
        if self._inflight is not None and self._exchanging:
            with contextlib.suppress(TokenError):
                await asyncio.shield(self._inflight)

    async def token(self) -> AccessToken:
        """A valid access token, or TokenError saying why there is none."""
        current = self._current
        if current is not None and self._clock() < current.expires_at:
            return current
        if not self._exchanging and self._clock() >= self._retry_at and not self._refused:
            # Expired with nothing under way: the scheduled refresh is late (a saturated event
            # loop runs timers late). Start it now rather than fail the request; never inside a
            # backoff, never after a final refusal.
            self._start_exchange("expired")
        if self._exchanging:
            # An exchange is under way (start-up, or the scheduled one running late): its
            # answer is worth the short wait.
            await self._settle()
            current = self._current
            if current is not None and current.valid(self._clock()):
                return current
        raise self._unavailable()

    async def refresh_after_401(self, stale: AccessToken) -> AccessToken:
        """Replace an access token the cluster refused; one exchange however many callers."""
        current = self._current
        if current is not None and current.value != stale.value and current.valid(self._clock()):
            return current  # another request already replaced it
        if self.failure is not None and self.failure.final:
            raise self.failure
        if not self._exchanging and self._clock() < self._retry_at:
            # Inside a backoff after passing failures: every 401 would otherwise cost the token
            # endpoint a call. The client gets 503 with Retry-After instead.
            raise self._unavailable()
        new = await self._single_flight("401", stale)
        if new.value == stale.value:
            # Joined an exchange started without this stale token in mind (the scheduled one),
            # and it handed the refused token back: ask again, with the same-token rule.
            new = await self._single_flight("401", stale)
        return new

    async def wait_first(self) -> AccessToken:
        """Wait for the first access token; raises TokenRejected if the cluster refuses."""
        return await asyncio.shield(self._first)

    async def exchange_once(self) -> AccessToken:
        """One exchange outside the life cycle (the `check` command): no retry schedule, no
        background task, and the caller reports the outcome."""
        new = await self._exchange()
        self._current = new
        return new

    async def replace_refresh_token(self, new: Secret) -> None:
        """Adopt a new refresh token (rotated secret file): exchanged before the old is dropped."""
        if new == self._refresh_token:
            return
        REDACTOR.add(new.reveal(), lasting=True)
        await self._settle()
        old, self._refresh_token = self._refresh_token, new
        failure_before = self.failure
        try:
            await self._single_flight("token-file")
        except TokenError:
            # Only an accepted token replaces the old one: whatever the new one's failure, the
            # proxy goes on with the previous token and its previous state (readiness, schedule).
            self._refresh_token = old
            self.failure = failure_before
            self._wake.set()
            self._changed()
            raise

    # --- single flight -----------------------------------------------------------------------

    def _single_flight(self, trigger: str, stale: AccessToken | None = None) -> Awaitable[
            AccessToken]:
        """Join the exchange under way, or start one. Shielded: a caller that goes away (client
        disconnected) does not cancel the exchange the others are waiting for."""
        return asyncio.shield(self._start_exchange(trigger, stale))

    def _start_exchange(
        self, trigger: str, stale: AccessToken | None = None
    ) -> asyncio.Task[AccessToken]:
        """The exchange under way, or a new one."""
        inflight = self._inflight
        if inflight is None or inflight.done():
            inflight = asyncio.create_task(self._refresh_job(trigger, stale), name="token-exchange")
            # Mark the outcome retrieved even if every waiter went away.
            inflight.add_done_callback(_consume)
            self._inflight = inflight
        return inflight

    async def _refresh_job(self, trigger: str, stale: AccessToken | None) -> AccessToken:
        new = await self._exchange_logged(trigger)
        if stale is not None:
            for _ in range(SAME_TOKEN_ATTEMPTS - 1):
                if new.value != stale.value:
                    break
                log.info("the cluster returned the same access token again; asking once more")
                new = await self._exchange_logged(trigger)
        self._wake.set()  # let the background task reschedule from the new token
        return new

    # --- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="token-refresh")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await cancel_and_wait(self._inflight, TokenError)
        if not self._first.done():
            self._first.cancel()

    async def _run(self) -> None:
        while True:
            now = self._clock()
            current = self._current
            due = current.refresh_at if current is not None else now
            due = max(due, self._retry_at)
            if self._refused:
                due = float("inf")  # only a new refresh token (wake) helps now
            if due > now:
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    timeout = None if due == float("inf") else due - now
                    await asyncio.wait_for(self._wake.wait(), timeout)
                continue
            trigger = "startup" if current is None and self.refreshes_ok == 0 else "scheduled"
            try:
                await self._single_flight(trigger)
            except TokenRejected as exc:
                if not self._first.done():
                    self._first.set_exception(exc)
                    self._first.exception()  # retrieved: the CLI may not be waiting
            except TokenUnavailable:
                pass

    # --- the exchange ------------------------------------------------------------------------

    async def _exchange_logged(self, trigger: str) -> AccessToken:
        started = self._clock()
        try:
            new = await self._exchange()
        except TokenError as exc:
            duration = self._clock() - started
            self._record(RefreshEvent(time.time(), trigger, False, exc.reason, duration))
            self.failure = exc
            if exc.final:
                log.error("token refresh failed: %s", exc.reason)
            else:
                self._attempt += 1
                delay = backoff_delay(self._attempt)
                self._retry_at = self._clock() + delay
                exc.retry_after = delay
                still = self._current is not None and self._current.valid(self._clock())
                log.warning(
                    "token refresh failed: %s; retrying in %.1f s (%s)", exc.reason, delay,
                    "current access token still valid" if still else "answering 503 meanwhile",
                )
            self._changed()
            raise
        self._attempt = 0
        self._retry_at = 0.0
        self.failure = None
        self._current = new
        self._record(RefreshEvent(time.time(), trigger, True, "ok", self._clock() - started,
                                  new.lifetime))
        log.info("access token refreshed, valid for %.0f s", new.lifetime,
                 extra={"event_type": "token_refreshed", "trigger": trigger})
        if not self._first.done():
            self._first.set_result(new)
        self._changed()
        return new

    def _changed(self) -> None:
        for callback in self.on_change:
            callback()

    def _record(self, event: RefreshEvent) -> None:
        self.history.append(event)
        if event.ok:
            self.refreshes_ok += 1
        else:
            key = _reason_key(event.reason)
            self.refreshes_failed[key] = self.refreshes_failed.get(key, 0) + 1
        for listener in self.listeners:
            listener(event)

    async def _exchange(self) -> AccessToken:
        log.debug("exchanging the refresh token at %s", self._token_url)
        form = {"grant_type": "refresh_token", "refresh_token": self._refresh_token.reveal()}
        if self._client_id:
            form["client_id"] = self._client_id
        if self._client_secret is not None:
            form["client_secret"] = self._client_secret.reveal()
        if self._tenant:
            form["tenant"] = self._tenant
        timeout = aiohttp.ClientTimeout(total=EXCHANGE_TIMEOUT)
        try:
            async with self._session.post(
                self._token_url, data=form, timeout=timeout, allow_redirects=False,
                # Explicit: the shared session adds no Content-Type of its own.
                headers={"Accept": "application/json",
                         "Content-Type": "application/x-www-form-urlencoded"},
            ) as resp:
                if resp.status in FINAL_STATUSES:
                    raise TokenRejected(FINAL_STATUSES[resp.status], resp.status)
                if resp.status != 200:
                    raise TokenUnavailable(
                        f"the token endpoint answered {resp.status} {resp.reason or ''}".strip(),
                        resp.status,
                    )
                try:
                    body = await resp.json(content_type=None)
                except (ValueError, aiohttp.ClientPayloadError):
                    raise TokenUnavailable(
                        "the token endpoint answered 200 without a JSON body", 200
                    ) from None
        except TimeoutError:
            raise TokenUnavailable(
                f"the token endpoint did not answer within {EXCHANGE_TIMEOUT:.0f} s"
            ) from None
        except aiohttp.ClientConnectorCertificateError as exc:
            raise TokenUnavailable(tls_untrusted_reason(exc)) from None
        except aiohttp.ClientConnectorError as exc:
            raise TokenUnavailable(
                f"cannot connect to {self._token_url.host}:{self._token_url.port} "
                f"({exc.os_error.strerror or exc.os_error.__class__.__name__})"
            ) from None
        except aiohttp.ClientError as exc:
            raise TokenUnavailable(f"the token request failed ({exc.__class__.__name__})") \
                from None
        return self._adopt(body)

    def _adopt(self, body: object) -> AccessToken:
        if not isinstance(body, dict) or not isinstance(body.get("access_token"), str) \
                or not body["access_token"]:
            raise TokenUnavailable("the token endpoint's answer has no access_token", 200)
        value: str = body["access_token"]
        if not _HEADER_SAFE.issuperset(value):
            # It goes into a header line as it is (http1.py): a line break would let the token
            # endpoint add headers of its own to every request.
            raise TokenUnavailable(
                "the token endpoint's access_token has characters a header cannot carry "
                "(only visible ASCII can be sent)", 200)
        REDACTOR.add(value)
        rotated = body.get("refresh_token")
        if isinstance(rotated, str) and rotated and rotated != self._refresh_token.reveal():
            REDACTOR.add(rotated, lasting=True)
            self._refresh_token = Secret(rotated)
            log.info("the cluster rotated the refresh token; using the new one from now on")
        lifetime = lifetime_from(body.get("expires_in"), self._default_lifetime)
        self.identity = Identity(
            user_id=_str_or_none(body.get("user_id")),
            tenant=_str_or_none(body.get("tenant")),
            role=_str_or_none(body.get("role")),
        )
        now = self._clock()
        share = REFRESH_FRACTION + random.uniform(-REFRESH_JITTER, REFRESH_JITTER)
        return AccessToken(value, now, lifetime, now + lifetime * share, time.time())

    def _unavailable(self) -> TokenError:
        failure = self.failure
        if failure is not None and failure.final:
            return failure
        retry_after = max(1.0, self._retry_at - self._clock()) if self._retry_at else 1.0
        if failure is not None:
            return TokenUnavailable(f"no valid access token: {failure.reason}",
                                    failure.status, retry_after)
        return TokenUnavailable("no access token yet: the first exchange is still under way",
                                None, retry_after)


def _consume(task: asyncio.Task[AccessToken]) -> None:
    if not task.cancelled():
        task.exception()


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def tls_untrusted_reason(
    exc: aiohttp.ClientConnectorCertificateError | CertificateUntrusted,
) -> str:
    """Why the cluster's certificate was refused, and the setting that fixes a private CA."""
    error = exc.certificate_error
    why = getattr(error, "verify_message", None) or str(error)
    return (f"the TLS certificate of {exc.host}:{exc.port} is not trusted ({why}): if the "
            "cluster uses a private CA, point --ca-bundle (SQUIRRO_PROXY_CA_BUNDLE) at that "
            "CA's PEM file")


def lifetime_from(expires_in: object, default: float) -> float:
    """`expires_in` in seconds when it is a positive number (also as a string, as some OAuth
    servers send it); the configured default otherwise."""
    if isinstance(expires_in, bool):
        return default
    if isinstance(expires_in, str):
        try:
            expires_in = float(expires_in)
        except ValueError:
            return default
    # NaN fails both comparisons, so it falls through to the default too.
    if isinstance(expires_in, (int, float)) and 0 < expires_in < float("inf"):
        return float(expires_in)
    return default


def _reason_key(reason: str) -> str:
    """A short label for metrics: the status code when there is one, else the failure kind."""
    for status in FINAL_STATUSES:
        if f"({status}" in reason:
            return str(status)
    if "answered" in reason:
        return "http_error"
    if "within" in reason:
        return "timeout"
    if "TLS certificate" in reason:
        return "tls"
    if "connect" in reason:
        return "connect"
    return "other"
