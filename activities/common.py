"""Shared plumbing for the activity modules: typed errors and heartbeating.

The helpers work both inside a Temporal activity and in plain async code (tests, the CLI's
preflight), so the real logic of every adapter can be exercised without a worker:
`heartbeat()` is a no-op outside an activity context.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

from temporalio import activity
from temporalio.exceptions import ApplicationError

from errors import INVALID_REQUEST

T = TypeVar("T")

# Ids the workflows hand to activities (backup ids, release ids): they become file names
# on nodes and on the worker, so only a safe alphabet and no path separators.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,120}")


def fail(
    error_type: str, message: str, *, retryable: bool = False, cause: BaseException | None = None
) -> NoReturn:
    """Raise an ApplicationError of `error_type` (a name from `errors`), non-retryable unless
    `retryable`: the flag, not the type, decides whether the workflow tries again."""
    err = ApplicationError(message, type=error_type, non_retryable=not retryable)
    if cause is not None:
        raise err from cause
    raise err


def check_id(kind: str, value: str) -> None:
    """InvalidRequest unless `value` is a safe id (letters, digits, '.', '_', '-'; <= 121)."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        fail(
            INVALID_REQUEST,
            f"{kind} {value!r}: use letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit, at most 121 characters)",
        )


def sha256_file(path: str) -> str:
    """Hex sha256 of a local file, read in 1 MiB chunks; OSError when it cannot be read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def heartbeat(*details: Any) -> None:
    """Heartbeat when running inside an activity; do nothing elsewhere."""
    if activity.in_activity():
        activity.heartbeat(*details)


def previous_heartbeat() -> Any:
    """The first detail of the last heartbeat of a previous attempt, or None.

    Waiting activities store their progress there so that a retry on another worker keeps
    the original deadline instead of starting a fresh one.
    """
    if not activity.in_activity():
        return None
    details = activity.info().heartbeat_details
    return details[0] if details else None


async def with_heartbeat(
    aw: Awaitable[T], details: Callable[[], Any] | None = None, every_s: float = 1.0
) -> T:
    """Await `aw`, heartbeating every `every_s` seconds meanwhile.

    Cancellation of the caller (activity cancel) cancels `aw` as well, so a remote
    command's channel is closed instead of being left running.
    """
    task = asyncio.ensure_future(aw)
    started = time.monotonic()
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=every_s)
            if task in done:
                return task.result()
            heartbeat(details() if details else {"waited_s": round(time.monotonic() - started, 1)})
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def tail(text: str, limit: int = 1500) -> str:
    """The end of a (stderr) text, where the error usually is."""
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]
