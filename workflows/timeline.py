"""The timeline: one record per step a procedure ran, queryable while it runs.

Times come from `workflow.now()` (deterministic). The Web UI shows the same progress
through `workflow.set_current_details`, which `Timeline` keeps current.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal, TypeVar

from temporalio import workflow

from workflows.saga import reason

T = TypeVar("T")


# How a step ended (running: not yet).
StepResult = Literal["running", "ok", "failed", "skipped", "compensated"]


@dataclass(frozen=True)
class StepRecord:
    name: str
    seed_step: str | None
    node: str | None
    started: datetime
    ended: datetime | None = None
    result: StepResult = "running"
    detail: str | None = None
    # Attempts beyond the first of the step's activities (transient errors, a lost worker)
    # and re-runs an operator chose at a failure gate.
    retries: int = 0

    @property
    def duration_s(self) -> float | None:
        return (self.ended - self.started).total_seconds() if self.ended else None


@dataclass(frozen=True)
class Progress:
    procedure: str
    phase: str
    node: str | None
    nodes_done: tuple[str, ...]
    nodes_total: int
    steps: tuple[StepRecord, ...]


# The step the running coroutine belongs to (each asyncio task has its own context, so
# steps of nodes upgraded side by side count their retries apart).
_CURRENT_STEP: contextvars.ContextVar[int | None] = contextvars.ContextVar("zerodown_step", default=None)


class Timeline:
    def __init__(self, procedure: str) -> None:
        self.procedure = procedure
        self.phase = "starting"
        self.node: str | None = None
        self.nodes_done: list[str] = []
        self.nodes_total = 0
        self.steps: list[StepRecord] = []

    def set_phase(self, phase: str, node: str | None = None) -> None:
        self.phase = phase
        self.node = node
        self._publish()

    def node_done(self, node: str) -> None:
        self.nodes_done.append(node)
        self._publish()

    def record(
        self,
        name: str,
        result: StepResult,
        node: str | None = None,
        seed_step: str | None = None,
        detail: str | None = None,
    ) -> None:
        """A step that took no time of its own (e.g. 'not applicable', a decision)."""
        now = workflow.now()
        self.steps.append(
            StepRecord(
                name=name,
                seed_step=seed_step,
                node=node,
                started=now,
                ended=now,
                result=result,
                detail=detail,
            )
        )

    def record_span(
        self,
        name: str,
        started: datetime,
        ended: datetime,
        result: StepResult,
        node: str | None = None,
        seed_step: str | None = None,
        detail: str | None = None,
        retries: int = 0,
    ) -> None:
        """A step that ran inside an activity with others (its times measured there)."""
        self.steps.append(
            StepRecord(
                name=name,
                seed_step=seed_step,
                node=node,
                started=started,
                ended=ended,
                result=result,
                detail=detail,
                retries=retries,
            )
        )

    async def step(
        self,
        name: str,
        call: Awaitable[T],
        node: str | None = None,
        seed_step: str | None = None,
        retries: int = 0,
    ) -> T:
        """Run one step, recording its start, end, outcome and retries."""
        index = len(self.steps)
        self.steps.append(
            StepRecord(name=name, seed_step=seed_step, node=node, started=workflow.now(), retries=retries)
        )
        self._publish(current=f"{name}" + (f" on {node}" if node else ""))
        token = _CURRENT_STEP.set(index)
        try:
            value = await call
        except BaseException as e:
            self.steps[index] = replace(
                self.steps[index], ended=workflow.now(), result="failed", detail=reason(e)
            )
            raise
        finally:
            _CURRENT_STEP.reset(token)
        self.steps[index] = replace(self.steps[index], ended=workflow.now(), result="ok")
        return value

    def retrying(self, why: str) -> None:
        """The current step retries one of its activities: counted, and the reason shown."""
        index = _CURRENT_STEP.get()
        if index is None or index >= len(self.steps):
            return
        record = self.steps[index]
        self.steps[index] = replace(record, retries=record.retries + 1, detail=f"retrying: {why}")

    def snapshot(self) -> Progress:
        return Progress(
            procedure=self.procedure,
            phase=self.phase,
            node=self.node,
            nodes_done=tuple(self.nodes_done),
            nodes_total=self.nodes_total,
            steps=tuple(self.steps),
        )

    def _publish(self, current: str | None = None) -> None:
        # Markdown shown by the Temporal Web UI on the workflow's page.
        lines = [f"**{self.procedure}**: {self.phase}" + (f" ({self.node})" if self.node else "")]
        if self.nodes_total:
            lines.append(
                f"nodes done: {len(self.nodes_done)}/{self.nodes_total}"
                + (f" ({', '.join(self.nodes_done)})" if self.nodes_done else "")
            )
        if current:
            lines.append(f"current step: {current}")
        workflow.set_current_details("\n\n".join(lines))
