"""worker/heartbeat.py on a real dev server: an activity that never heartbeats itself outlives
a short heartbeat timeout, and the details an activity reported survive the interceptor's
beats for the next attempt to read."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest
from temporalio import activity, workflow
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import RetryPolicy
from temporalio.exceptions import TimeoutError, TimeoutType
from temporalio.worker import Worker

from worker.chaos import HOLD_ENV, HoldInterceptor, hold_from_env
from worker.main import RESUME_OPTIONS


@activity.defn
async def silent_for(seconds: float) -> str:
    await asyncio.sleep(seconds)  # no heartbeat of its own
    return "done"


@activity.defn
async def reports_then_fails() -> str:
    info = activity.info()
    if info.attempt == 1:
        activity.heartbeat({"copied": 7})
        await asyncio.sleep(1.3)  # the interceptor beats meanwhile, repeating {"copied": 7}
        raise RuntimeError("lost half-way")
    return f"resumed from {info.heartbeat_details[0]['copied']}"


@activity.defn
async def answer_now() -> str:
    return "answered"


@workflow.defn(name="heartbeat-probe")
class HeartbeatProbe:
    @workflow.run
    async def run(self, which: str) -> str:
        if which == "quick":
            return await workflow.execute_activity(
                answer_now,
                start_to_close_timeout=timedelta(seconds=30),
                heartbeat_timeout=timedelta(seconds=3),
            )
        if which == "silent":
            return await workflow.execute_activity(
                silent_for,
                3.2,  # well past the heartbeat timeout; the interceptor beats every 1 s
                start_to_close_timeout=timedelta(seconds=30),
                heartbeat_timeout=timedelta(seconds=2),
                retry_policy=RetryPolicy(maximum_attempts=1),
            )
        return await workflow.execute_activity(
            reports_then_fails,
            start_to_close_timeout=timedelta(seconds=30),
            heartbeat_timeout=timedelta(seconds=3),
            retry_policy=RetryPolicy(maximum_attempts=2, initial_interval=timedelta(milliseconds=100)),
        )


async def run_probe(client: Client, which: str, with_interceptor: bool) -> str:
    queue = f"hb-{uuid.uuid4().hex[:8]}"
    options = RESUME_OPTIONS if with_interceptor else {}
    async with Worker(
        client,
        task_queue=queue,
        workflows=[HeartbeatProbe],
        activities=[silent_for, reports_then_fails],
        **options,
    ):
        result: str = await client.execute_workflow(
            HeartbeatProbe.run, which, id=queue, task_queue=queue, execution_timeout=timedelta(seconds=60)
        )
    return result


async def test_an_activity_that_never_beats_outlives_a_short_heartbeat_timeout(client: Client) -> None:
    beaten, unbeaten = await asyncio.gather(
        run_probe(client, "silent", with_interceptor=True),
        run_probe(client, "silent", with_interceptor=False),
        return_exceptions=True,
    )
    assert beaten == "done"
    assert isinstance(unbeaten, WorkflowFailureError)  # without the interceptor it times out
    timeout = unbeaten.cause.__cause__ if unbeaten.cause else None
    assert isinstance(timeout, TimeoutError) and timeout.type == TimeoutType.HEARTBEAT


async def test_the_activitys_own_details_survive_the_beats(client: Client) -> None:
    assert await run_probe(client, "details", with_interceptor=True) == "resumed from 7"


def test_the_chaos_hold_is_only_there_when_the_bench_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(HOLD_ENV, raising=False)
    assert hold_from_env() == []
    monkeypatch.setenv(HOLD_ENV, "check_login,lb_wait_up:1.5")
    (hold,) = hold_from_env()
    assert isinstance(hold, HoldInterceptor)
    assert hold.names == {"check_login", "lb_wait_up"} and hold.seconds == 1.5


async def test_a_held_activity_runs_late_and_whole(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HOLD_ENV, "answer_now:1")
    queue = f"hb-{uuid.uuid4().hex[:8]}"
    started = asyncio.get_running_loop().time()
    async with Worker(
        client,
        task_queue=queue,
        workflows=[HeartbeatProbe],
        activities=[answer_now],
        **{**RESUME_OPTIONS, "interceptors": [*RESUME_OPTIONS["interceptors"], *hold_from_env()]},
    ):
        result = await client.execute_workflow(HeartbeatProbe.run, "quick", id=queue, task_queue=queue)
    assert result == "answered"  # the activity itself ran as without the hold
    assert asyncio.get_running_loop().time() - started > 1  # held 1 s at its start
