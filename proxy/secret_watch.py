"""Re-read the refresh token file when it changes (or on SIGHUP), so a rotated secret takes effect
without a restart.

Polling the file's identity (device, inode, size, mtime) every second is enough and works
everywhere: Kubernetes updates a mounted Secret by swapping a symlink (a new inode), editors and
`mv` replace the file (a new inode), and `>` rewrites it in place (a new size or mtime). Events
such as inotify would miss some of these and are not portable.

The new token is exchanged before the old one is dropped (`TokenManager.replace_refresh_token`):
a bad new token leaves the proxy serving with what still works, and says so in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from .config import Secret
from .tasks import cancel_and_wait
from .tokens import TokenError, TokenManager, TokenRejected, backoff_delay

log = logging.getLogger("squirro_proxy.token_file")

POLL_INTERVAL = 1.0

Stamp = tuple[int, int, int, int]


def _stamp(path: Path) -> Stamp | None:
    try:
        st = path.stat()  # follows symlinks: a swapped Kubernetes ..data link shows here
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class TokenFileWatcher:
    """Watches one token file and hands a changed token to the token manager."""

    def __init__(self, path: Path, tokens: TokenManager, loaded: Secret,
                 interval: float | None = None) -> None:
        self.path = path
        self._tokens = tokens
        self._interval = POLL_INTERVAL if interval is None else interval
        # What the file held when last read; compared with the file, not with the manager's
        # token, which the cluster may have rotated since.
        self._last_text = loaded.reveal()
        self._stamp = _stamp(path)
        self._poke = asyncio.Event()
        self._retry_at: float | None = None
        self._attempt = 0
        self._problem: str | None = None
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0  # new tokens adopted, for tests and the status page

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="token-file-watch")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    def reload_now(self) -> None:
        """Re-read the file at once, changed or not (SIGHUP)."""
        log.info("SIGHUP: re-reading the token file %s", self.path)
        self._poke.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._poke.wait(), self._interval)
            forced = self._poke.is_set()
            self._poke.clear()
            try:
                await self.check(force=forced)
            except Exception:  # a bug here must not stop the watching
                log.exception("checking the token file %s failed", self.path)

    async def check(self, force: bool = False) -> None:
        """Adopt the file's token if it changed (or if `force`)."""
        stamp = _stamp(self.path)
        due_retry = self._retry_at is not None and time.monotonic() >= self._retry_at
        if stamp == self._stamp and not force and not due_retry:
            return
        self._stamp = stamp
        text = self._read()
        if text is None:
            return
        if text == self._last_text and not due_retry:
            if force:
                log.info("the token file %s holds the token already in use", self.path)
            return
        log.info("the token file %s changed: exchanging the new refresh token", self.path)
        try:
            await self._tokens.replace_refresh_token(Secret(text))
        except TokenRejected as exc:
            self._last_text, self._retry_at, self._attempt = text, None, 0
            log.error("the new refresh token in %s was refused: %s; %s", self.path, exc.reason,
                      "still serving with the previous one" if self._still_valid()
                      else "no valid access token: requests get 503 until the file is fixed")
            return
        except TokenError as exc:
            # Passing trouble (cluster down): try the same token again later.
            self._attempt += 1
            delay = backoff_delay(self._attempt)
            self._retry_at = time.monotonic() + delay
            log.warning("could not exchange the new refresh token from %s yet: %s; trying again "
                        "in %.1f s", self.path, exc.reason, delay)
            return
        self._last_text, self._retry_at, self._attempt = text, None, 0
        self.reloads += 1
        log.info("the new refresh token from %s is in use", self.path)

    def _still_valid(self) -> bool:
        current = self._tokens.current
        return current is not None and current.valid(time.monotonic())

    def _read(self) -> str | None:
        try:
            text = self.path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            # During a replace the file may be briefly missing: note once, look again later.
            self._trouble(f"cannot read it ({exc.strerror or exc.__class__.__name__})")
            return None
        if not text:
            self._trouble("it is empty")
            return None
        if any(c.isspace() or c == "\0" for c in text):
            self._trouble("it holds more than the token (spaces or several lines)")
            return None
        self._problem = None
        return text

    def _trouble(self, problem: str) -> None:
        self._stamp = None  # look again at the next poll, whatever the stamp says then
        if problem != self._problem:
            self._problem = problem
            log.warning("the token file %s changed but %s; still using the previous token",
                        self.path, problem)


def reload_token_file(watcher: TokenFileWatcher | None) -> None:
    """SIGHUP: re-read the token file now, or say why there is nothing to re-read."""
    if watcher is None:
        log.info("SIGHUP: nothing to re-read: the refresh token did not come from a file "
                 "(set SQUIRRO_TOKEN_FILE to rotate it without a restart)")
        return
    watcher.reload_now()
