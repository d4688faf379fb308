"""`Procedure.all_of` (steps side by side) and `change(..., local=True)` (a local activity),
on the real dev server with small stand-in activities."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from functools import partial

import pytest
from temporalio import activity, workflow
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ActivityError, ApplicationError

from tests.temporal_env import running_worker
from workflows.procedure import Procedure

# What the stand-in activities did, in the test process (the worker runs in it).
DONE: dict[str, float] = {}


@dataclass(frozen=True)
class Work:
    name: str
    seconds: float = 0.0
    fail: bool = False


@activity.defn
async def do_work(w: Work) -> str:
    await asyncio.sleep(w.seconds)
    if w.fail:
        raise ApplicationError(f"{w.name} failed", non_retryable=True)
    DONE[w.name] = time.monotonic()
    return w.name


@dataclass(frozen=True)
class SideBySideInput:
    works: tuple[Work, ...]
    local: bool = False


@workflow.defn(name="test-side-by-side")
class SideBySideWorkflow(Procedure):
    @workflow.run
    async def run(self, inp: SideBySideInput) -> list[str]:
        results = await self.all_of(
            *(
                self.step(f"work {w.name}", partial(self.change, do_work, w, local=inp.local))
                for w in inp.works
            )
        )
        return [str(r) for r in results]


async def _run(client: Client, inp: SideBySideInput) -> tuple[list[str], list[str]]:
    task_queue = f"sbs-{uuid.uuid4().hex[:8]}"
    async with running_worker(client, task_queue, [SideBySideWorkflow], [do_work]):
        handle = await client.start_workflow(
            SideBySideWorkflow.run,
            inp,
            id=task_queue,
            task_queue=task_queue,
            execution_timeout=timedelta(seconds=60),
        )
        try:
            result: list[str] = await handle.result()
        finally:
            history = await handle.fetch_history()
    kinds: list[str] = [str(e.WhichOneof("attributes") or "") for e in history.events]
    return result, kinds


async def test_all_of_returns_every_result_in_order(client: Client) -> None:
    result, kinds = await _run(client, SideBySideInput((Work("a", 0.3), Work("b", 0.0), Work("c", 0.1))))
    assert result == ["a", "b", "c"]
    assert kinds.count("activity_task_scheduled_event_attributes") == 3


async def test_all_of_raises_the_first_failure_only_once_every_sibling_finished(client: Client) -> None:
    DONE.pop("slow", None)
    t0 = time.monotonic()
    with pytest.raises(WorkflowFailureError) as e:
        await _run(client, SideBySideInput((Work("quick", 0.0, fail=True), Work("slow", 1.0))))
    # The failure came at once, but the run ended only after the slow sibling had finished.
    cause = e.value.cause
    assert isinstance(cause, ActivityError) and "quick failed" in str(cause.cause)
    assert "slow" in DONE and DONE["slow"] - t0 >= 1.0


async def test_a_local_change_runs_without_an_activity_task(client: Client) -> None:
    result, kinds = await _run(client, SideBySideInput((Work("x"), Work("y")), local=True))
    assert result == ["x", "y"]
    # Recorded as markers in the workflow's own task, not as activity tasks on the queue.
    assert "activity_task_scheduled_event_attributes" not in kinds
    assert kinds.count("marker_recorded_event_attributes") == 2
