"""Owned background tasks: cancelled on shutdown and awaited, never fire-and-forget."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None, *ignore: type[BaseException]) -> None:
    """Cancel `task` (if still running) and wait until it has really ended.

    Its cancellation is swallowed, and so are the exception types in `ignore`: a task being
    stopped may fail on its way out, and the caller no longer wants its result.
    """
    if task is None:
        return
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, *ignore):
        await task
