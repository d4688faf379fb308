"""The saga: a stack of compensations, run in reverse when a procedure must be undone.

A procedure registers a compensation *before* (or right as) it makes a change it may need
to undo, always after the backup that the compensation relies on has been taken. On
failure or cancellation, `compensate()` runs them newest first. Each compensation is
workflow code (usually one or a few retried activities); a compensation that still fails
after its retries is recorded and the others still run, so one stuck node does not leave
the rest half-done. Deterministic: only workflow APIs inside.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ApplicationError

Compensation = Callable[[], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class CompensationRecord:
    name: str
    ok: bool
    error: str | None = None


class Saga:
    def __init__(self) -> None:
        self._stack: list[tuple[str, Compensation]] = []
        self.records: list[CompensationRecord] = []

    def register(self, name: str, compensation: Compensation) -> None:
        self._stack.append((name, compensation))

    def pending(self) -> list[str]:
        """What would be undone, newest first (what an abort leaves in place)."""
        return [name for name, _ in reversed(self._stack)]

    def point_of_no_return(self) -> list[str]:
        """Forget every compensation registered so far (newest first, returned): past this
        point undoing them would lose what users did since (writes to a database that is
        now serving), so a later failure leaves them as they are."""
        kept = self.pending()
        self._stack.clear()
        return kept

    async def compensate(self) -> list[CompensationRecord]:
        """Run every registered compensation, newest first; returns what happened.

        A rollback is never abandoned half-way: a cancellation that arrives meanwhile (an
        operator pressing cancel while watching it) is noted and the compensations go on."""
        while self._stack:
            name, compensation = self._stack.pop()
            task = asyncio.ensure_future(compensation())
            while not task.done():
                try:
                    await asyncio.shield(task)
                except asyncio.CancelledError:
                    if not task.done():
                        workflow.logger.warning("cancel requested during rollback: %s goes on", name)
                except Exception:
                    pass  # read from the task below
            error = task.exception() if not task.cancelled() else asyncio.CancelledError()
            if error is not None:  # recorded, and the remaining compensations still run
                workflow.logger.error("compensation %s failed: %s", name, error)
                self.records.append(CompensationRecord(name=name, ok=False, error=_reason(error)))
            else:
                self.records.append(CompensationRecord(name=name, ok=True))
        return list(self.records)


def _reason(e: BaseException) -> str:
    """The most telling message of a Temporal error chain: the first ApplicationError's
    (the activity's own words, e.g. "database main (u@h:3306/db): connect: ..."), not the
    generic ActivityError wrapper nor the low-level Python exception beneath it."""
    cause: BaseException | None = e
    while cause is not None:
        if isinstance(cause, ApplicationError):
            return str(cause)
        cause = cause.__cause__
    return str(e)


reason = _reason
