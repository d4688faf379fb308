"""Guided failure and per-step retries (workflows/procedure.py), on the real dev server.

rolling-deploy runs against the in-memory FakeSite stand-ins of test_rolling_deploy_logic;
a step that fails after its retries opens the gate `failure:<step>@<node>`, decided here
through the `choose` update exactly as `zerodown resolve` sends it.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import pytest
from temporalio import activity
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from tests.fake_site import FakeSite, site
from tests.gate_support import choose, pending
from tests.temporal_env import running_worker
from workflows.gates import Decision, GateRecord
from workflows.rolling_deploy import RollingDeployInput, RollingDeployWorkflow
from workflows.timeline import Progress

GATE = "failure:N7@n2"


def guided_input(timeout_s: float = 60.0, approvers: tuple[str, ...] = ("ops1",)) -> RollingDeployInput:
    inv = site()
    inv = dataclasses.replace(inv, approvers={"failure": approvers} if approvers else {})
    return RollingDeployInput(
        inventory=inv,
        package_path="/p.zip",
        on_failure="ask",
        failure_gate_timeout_s=timeout_s,
        started_by="starter",
    )


async def start(client: Client, task_queue: str, inp: RollingDeployInput) -> WorkflowHandle[Any, Any]:
    return await client.start_workflow(
        RollingDeployWorkflow.run,
        inp,
        id=f"wf-{task_queue}",
        task_queue=task_queue,
        execution_timeout=timedelta(seconds=90),
    )


async def test_retry_after_the_cause_is_fixed_completes_and_counts_the_rerun(
    client: Client, task_queue: str
) -> None:
    fake = FakeSite(["n1", "n2", "n3"], fail_health_on=("n2", "2.0.0"))
    async with running_worker(client, task_queue, [RollingDeployWorkflow], fake.activities()):
        handle = await start(client, task_queue, guided_input())
        gate = await pending(handle, GATE)
        assert gate.choices == ("retry", "rollback", "abort")  # N7 is not skippable
        assert "/health answered 500" in gate.guards and gate.approvers == ("ops1",)
        # Wrong calls are refused to the caller: skip not offered, approve on a choice gate,
        # the starter deciding, an unlisted person.
        for decision, update in [
            (Decision(gate=GATE, by="ops1", plan_hash=gate.plan_hash, choice="skip"), "choose"),
            (Decision(gate=GATE, by="ops1", plan_hash=gate.plan_hash), "approve"),
            (Decision(gate=GATE, by="starter", plan_hash=gate.plan_hash, choice="retry"), "choose"),
            (Decision(gate=GATE, by="mallory", plan_hash=gate.plan_hash, choice="retry"), "choose"),
        ]:
            with pytest.raises(WorkflowUpdateFailedError):
                await handle.execute_update(update, decision, result_type=GateRecord)
        fake.fail_health_on = None  # the operator fixed the node
        record = await choose(handle, gate, "retry")
        assert record.outcome == "chosen" and record.choice == "retry" and record.by == "ops1"
        result = await handle.result()
    assert fake.version == {"n1": "2.0.0", "n2": "2.0.0", "n3": "2.0.0"}
    n7 = [s for s in result.steps if s.seed_step == "N7" and s.node == "n2"]
    assert [(s.result, s.retries) for s in n7] == [("failed", 0), ("ok", 1)]
    assert any(s.name == f"gate {GATE}: retry chosen by ops1" for s in result.steps)


async def test_abort_leaves_everything_in_place_and_reports_the_state(
    client: Client, task_queue: str
) -> None:
    fake = FakeSite(["n1", "n2", "n3"], fail_health_on=("n2", "2.0.0"))
    async with running_worker(client, task_queue, [RollingDeployWorkflow], fake.activities()):
        handle = await start(client, task_queue, guided_input())
        await choose(handle, await pending(handle, GATE), "abort")
        with pytest.raises(WorkflowFailureError) as info:
            await handle.result()
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "ProcedureAborted"
    text = str(cause)
    assert "aborted by ops1 at 'N7 wait healthy, check version on n2'" in text
    assert "changes not undone (newest first): node n2, node n1, database migrations" in text
    # Nothing was undone: n1 stays upgraded, n2 holds the new files, the schema stays migrated.
    assert fake.version["n1"] == "2.0.0" and fake.files["n2"] == "2.0.0" and fake.schema == 2
    assert "restore_app_folder" not in [c for c, _ in fake.calls]


@pytest.mark.parametrize("how", ["rollback", "timeout", "nobody"])
async def test_rollback_by_choice_by_timeout_or_when_nobody_may_decide(
    time_skipping_env: WorkflowEnvironment, task_queue: str, how: str
) -> None:
    client = time_skipping_env.client  # the retries' backoff and the gate's timeout pass at once
    fake = FakeSite(["n1", "n2", "n3"], fail_health_on=("n2", "2.0.0"))
    inp = guided_input(
        timeout_s=1.0 if how == "timeout" else 60.0, approvers=() if how == "nobody" else ("ops1",)
    )
    async with running_worker(client, task_queue, [RollingDeployWorkflow], fake.activities()):
        handle = await start(client, task_queue, inp)
        if how == "rollback":
            await choose(handle, await pending(handle, GATE), "rollback")
        with pytest.raises(WorkflowFailureError) as info:
            await handle.result()
        progress = await handle.query("progress", result_type=Progress)
    assert isinstance(info.value.cause, ApplicationError) and info.value.cause.type == "ProcedureFailed"
    assert fake.version == {"n1": "1.0.0", "n2": "1.0.0", "n3": "1.0.0"} and fake.schema == 1
    names = [s.name for s in progress.steps]
    expected = {
        "rollback": f"gate {GATE}: rollback chosen by ops1",
        "timeout": f"gate {GATE}: timed out, rollback",
        "nobody": f"gate {GATE}: nobody may decide it",
    }[how]
    assert expected in names


async def test_transient_activity_failures_are_retried_and_counted(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    client = time_skipping_env.client  # the retries' backoff timers pass at once
    fake = FakeSite(["n1", "n2"])
    failures = {"left": 2}

    def name(a: Any) -> str:
        return str(getattr(a, "__temporal_activity_definition").name)

    acts = [a for a in fake.activities() if name(a) != "lb_set_state"]
    original = next(a for a in fake.activities() if name(a) == "lb_set_state")

    @activity.defn(name="lb_set_state")
    async def flaky_lb_set_state(arg: dict[str, Any]) -> Any:
        if arg["node"] == "n2" and arg["state"] == "drain" and failures["left"] > 0:
            failures["left"] -= 1
            raise ApplicationError("runtime API busy", type="LbRuntimeApiError")
        return await original(arg)

    inp = RollingDeployInput(inventory=site(2), package_path="/p.zip")
    async with running_worker(client, task_queue, [RollingDeployWorkflow], [*acts, flaky_lb_set_state]):
        result = await client.execute_workflow(
            RollingDeployWorkflow.run,
            inp,
            id=f"wf-{task_queue}",
            task_queue=task_queue,
            execution_timeout=timedelta(seconds=60),
        )
    drain = next(s for s in result.steps if s.seed_step == "N1" and s.node == "n2")
    assert drain.result == "ok" and drain.retries == 2
    assert drain.detail is not None and "runtime API busy" in drain.detail
    assert all(s.retries == 0 for s in result.steps if s is not drain)
