"""The token as a worker process sees it: a mirror of the supervisor's TokenManager.

With `--workers` above 1, one TokenManager in the supervisor exchanges the refresh token for all
workers, so the cluster sees one token call per refresh however many processes serve. The
supervisor pushes its state to every worker whenever it changes (a new token, a failure); a
worker answers from that copy and asks the supervisor only when its copy cannot serve: the token
expired, or the cluster answered 401. The supervisor's single flight then covers every worker.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .link import LinkClosed, RemoteFailure
from .redact import REDACTOR
from .tokens import (
    AccessToken,
    Identity,
    RefreshEvent,
    TokenError,
    TokenManager,
    TokenRejected,
    TokenUnavailable,
)

# How long a worker waits for the supervisor to answer (it waits for an exchange at most).
ASK_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class FailureState:
    final: bool
    reason: str
    status: int | None
    retry_after: float | None

    @classmethod
    def of(cls, exc: TokenError) -> FailureState:
        return cls(exc.final, exc.reason, exc.status, exc.retry_after)

    def error(self) -> TokenError:
        kind = TokenRejected if self.final else TokenUnavailable
        return kind(self.reason, self.status, self.retry_after)


@dataclass(frozen=True, slots=True)
class TokenState:
    """Everything a worker reads about the token, as the supervisor holds it now."""

    current: AccessToken | None = field(repr=False)
    failure: FailureState | None
    identity: Identity
    history: tuple[RefreshEvent, ...]
    refreshes_ok: int
    refreshes_failed: dict[str, int]
    # Refresh tokens (rotated ones too) for the worker's log redactor.
    lasting_secrets: tuple[str, ...] = field(repr=False)
    # Increases with every state the supervisor sends: a reply computed before a push may be
    # read after it, and must not take the worker back to the older state.
    seq: int = 0


_SEQ = itertools.count(1)


def state_of(tokens: TokenManager) -> TokenState:
    failure = tokens.failure
    return TokenState(
        tokens.current, None if failure is None else FailureState.of(failure), tokens.identity,
        tuple(tokens.history), tokens.refreshes_ok, dict(tokens.refreshes_failed),
        REDACTOR.lasting_secrets(), next(_SEQ),
    )


# What a worker asks: ("token", None) or ("refresh", stale access token); what it gets back:
# the state after the answer, and the failure if there is no token to be had.
Reply = tuple[TokenState, FailureState | None]
Ask = Callable[[str, Any], Awaitable[Reply]]


class TokenMirror:
    """A TokenSource for a worker process, kept up to date by the supervisor."""

    def __init__(self, ask: Ask, clock: Callable[[], float] = time.monotonic) -> None:
        # CLOCK_MONOTONIC is one clock for the whole machine, so the supervisor's deadlines
        # hold in the worker as they are.
        self._ask = ask
        self._clock = clock
        self._current: AccessToken | None = None
        self._seq = 0
        self._asking: dict[tuple[str, str | None], asyncio.Task[AccessToken]] = {}
        self.identity = Identity()
        self.failure: TokenError | None = None
        self.history: deque[RefreshEvent] = deque(maxlen=20)
        self.refreshes_ok = 0
        self.refreshes_failed: dict[str, int] = {}

    @property
    def current(self) -> AccessToken | None:
        return self._current

    def apply(self, state: TokenState) -> None:
        """Adopt the supervisor's state (pushed, or with the answer to a question)."""
        if state.seq < self._seq:
            return
        self._seq = state.seq
        for secret in state.lasting_secrets:
            REDACTOR.add(secret, lasting=True)
        if state.current is not None:
            REDACTOR.add(state.current.value)
        self._current = state.current
        self.failure = None if state.failure is None else state.failure.error()
        self.identity = state.identity
        self.history = deque(state.history, maxlen=20)
        self.refreshes_ok = state.refreshes_ok
        self.refreshes_failed = dict(state.refreshes_failed)

    async def token(self) -> AccessToken:
        current = self._current
        if current is not None and self._clock() < current.expires_at:
            return current
        return await self._shared("token", None)

    async def refresh_after_401(self, stale: AccessToken) -> AccessToken:
        current = self._current
        if current is not None and current.value != stale.value and current.valid(self._clock()):
            return current  # the supervisor already pushed a newer one
        return await self._shared("refresh", stale.value)

    def _shared(self, op: str, stale: str | None) -> Awaitable[AccessToken]:
        """One question to the supervisor however many requests of this worker need it.
        Shielded, like the TokenManager's flight: a client going away cancels only its wait."""
        key = (op, stale)
        task = self._asking.get(key)
        if task is None or task.done():
            task = asyncio.create_task(self._ask_supervisor(op, stale))
            self._asking[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        return asyncio.shield(task)

    def _forget(self, key: tuple[str, str | None], task: asyncio.Task[AccessToken]) -> None:
        if self._asking.get(key) is task:
            del self._asking[key]
        if not task.cancelled():
            task.exception()  # retrieved, even if every waiter went away

    async def _ask_supervisor(self, op: str, stale: str | None) -> AccessToken:
        try:
            state, failure = await asyncio.wait_for(self._ask(op, stale), ASK_TIMEOUT)
        except (LinkClosed, RemoteFailure, TimeoutError):
            raise TokenUnavailable("the supervisor process holding the token did not answer",
                                   None, 1.0) from None
        self.apply(state)
        if failure is not None:
            raise failure.error()
        # A newer state may have come first; the answer's token was valid when it was sent.
        newer = self._current if self._seq > state.seq else None
        current = newer or state.current
        if current is None:  # cannot happen: no failure means a token
            raise TokenUnavailable("no access token yet", None, 1.0)
        return current


async def answer(tokens: TokenManager, op: str, stale: str | None) -> Reply:
    """The supervisor's side of a worker's question."""
    try:
        if op == "refresh":
            assert stale is not None
            # Only the value matters to refresh_after_401: it compares tokens by value.
            await tokens.refresh_after_401(AccessToken(stale, 0.0, 0.0, 0.0, 0.0))
        else:
            await tokens.token()
    except TokenError as exc:
        return state_of(tokens), FailureState.of(exc)
    return state_of(tokens), None
