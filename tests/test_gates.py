"""Approval gates (workflows/gates.py) through rolling-deploy's `continue` gate: the update
form with its validator, the signal form, the CLI, the real `temporal` binary, the
`pending_gates` query, every refusal, and the fail-safe default on timeout (time-skipping)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from inventory.model import Inventory
from tests.e2e_support import run_command, zerodown
from tests.fake_site import FakeSite, site
from tests.temporal_env import TEMPORAL_BIN, running_worker, temporal_address
from workflows.gates import Decision, PendingGate
from workflows.rolling_deploy import RollingDeployInput, RollingDeployResult, RollingDeployWorkflow

TEST_SERVER = Path(sys.executable).parent / "temporal-test-server"


def gated_site() -> Inventory:
    return dataclasses.replace(site(3), approvers={"continue": ("alice", "bob")})


def gated_input(**changes: Any) -> RollingDeployInput:
    return RollingDeployInput(
        inventory=gated_site(), package_path="/p.zip", continue_gate=True, started_by="alice", **changes
    )


async def plan_hash(client: Client, task_queue: str) -> str:
    res = await client.execute_workflow(
        RollingDeployWorkflow.run, gated_input(dry_run=True), id=f"plan-{task_queue}", task_queue=task_queue
    )
    return res.plan_hash


async def waiting_gates(handle: WorkflowHandle[Any, Any]) -> list[PendingGate]:
    for _ in range(200):
        gates = await handle.query(RollingDeployWorkflow.pending_gates)
        if gates:
            return gates
        await asyncio.sleep(0.05)
    raise AssertionError("no gate opened")


async def refusal(handle: WorkflowHandle[Any, Any], decision: Decision) -> str:
    with pytest.raises(WorkflowUpdateFailedError) as info:
        await handle.execute_update(RollingDeployWorkflow.approve, decision)
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "GateRefused"
    return str(cause.message)


async def start_gated(client: Client, task_queue: str) -> WorkflowHandle[Any, Any]:
    """A gated run, started by alice (so she may not approve it)."""
    return await client.start_workflow(
        RollingDeployWorkflow.run, gated_input(), id=f"wf-{task_queue}", task_queue=task_queue
    )


@pytest.fixture
async def gated(client: Client, task_queue: str) -> AsyncIterator[tuple[FakeSite, str]]:
    fake = FakeSite(["n1", "n2", "n3"])
    async with running_worker(client, task_queue, [RollingDeployWorkflow], fake.activities()):
        yield fake, await plan_hash(client, task_queue)


async def test_gate_waits_refuses_wrong_calls_and_proceeds_on_approval(
    client: Client, task_queue: str, gated: tuple[FakeSite, str]
) -> None:
    fake, reviewed = gated
    handle = await start_gated(client, task_queue)
    [gate] = await waiting_gates(handle)
    assert (gate.gate, gate.approvers, gate.on_timeout) == ("continue", ("alice", "bob"), "reject")
    assert gate.guards == "upgrade the remaining node(s): n2, n3" and gate.deadline is not None
    # The plan the operator reviewed with `zerodown plan` is the plan this run executes.
    assert gate.plan_hash == reviewed
    # The canary is done; nothing else was touched while waiting.
    assert fake.version == {"n1": "2.0.0", "n2": "1.0.0", "n3": "1.0.0"}

    ok = Decision(gate="continue", by="bob", plan_hash=reviewed, comment="canary looks fine")
    assert "no gate 'go-live' is waiting" in await refusal(handle, dataclasses.replace(ok, gate="go-live"))
    assert "'mallory' may not decide gate 'continue': the inventory lists alice, bob" in await refusal(
        handle, dataclasses.replace(ok, by="mallory")
    )
    assert "'alice' started this run and may not decide" in await refusal(
        handle, dataclasses.replace(ok, by="alice")
    )
    assert f"names plan {'0' * 12}, but this run executes plan {reviewed[:12]}" in await refusal(
        handle, dataclasses.replace(ok, plan_hash="0" * 64)
    )

    record = await handle.execute_update(RollingDeployWorkflow.approve, ok)
    assert (record.outcome, record.by, record.via) == ("approved", "bob", "update")
    assert record.plan_hash == reviewed
    result: RollingDeployResult = await handle.result()
    assert fake.version == {"n1": "2.0.0", "n2": "2.0.0", "n3": "2.0.0"}
    assert any(
        s.name == "gate continue: approved by bob" and s.detail == "via update: canary looks fine"
        for s in result.steps
    )
    assert [d.outcome for d in await handle.query(RollingDeployWorkflow.decisions)] == ["approved"]


async def test_rejection_rolls_the_canary_back(
    client: Client, task_queue: str, gated: tuple[FakeSite, str]
) -> None:
    fake, reviewed = gated
    handle = await start_gated(client, task_queue)
    await waiting_gates(handle)
    await handle.execute_update(
        RollingDeployWorkflow.reject,
        Decision(gate="continue", by="bob", plan_hash=reviewed, comment="error rate up on n1"),
    )
    with pytest.raises(WorkflowFailureError) as info:
        await handle.result()
    message = str(info.value.cause)
    assert "gate continue rejected by bob: error rate up on n1" in message
    assert "Rolled back: node n1" in message
    assert fake.version == {"n1": "1.0.0", "n2": "1.0.0", "n3": "1.0.0"} and fake.schema == 1


async def test_signal_and_update_forms_with_the_real_temporal_cli(
    client: Client, task_queue: str, gated: tuple[FakeSite, str], temporal_env: WorkflowEnvironment
) -> None:
    fake, reviewed = gated
    handle = await start_gated(client, task_queue)
    wf_id = handle.id
    await waiting_gates(handle)
    address = ["--address", temporal_address(temporal_env)]
    signal = [str(TEMPORAL_BIN), "workflow", "signal", "--workflow-id", wf_id, "--name", "decide"]
    # A signal cannot be refused to its sender: a wrong one is recorded and ignored.
    wrong = {"gate": "continue", "by": "mallory", "plan_hash": reviewed, "approve": True}
    code, out = await run_command(*signal, "--input", json.dumps(wrong), *address)
    assert code == 0, out
    for _ in range(100):
        progress = await handle.query(RollingDeployWorkflow.progress)
        if any("signal from mallory refused" in s.name for s in progress.steps):
            break
        await asyncio.sleep(0.05)
    assert [g.gate for g in await handle.query(RollingDeployWorkflow.pending_gates)] == ["continue"]
    # The update form, refused then accepted, through the plain `temporal` CLI.
    code, out = await run_command(
        str(TEMPORAL_BIN),
        "workflow",
        "update",
        "execute",
        "--workflow-id",
        wf_id,
        "--name",
        "approve",
        "--input",
        json.dumps({"gate": "continue", "by": "bob", "plan_hash": "stale"}),
        *address,
    )
    assert code != 0 and "names plan stale" in out, out
    right = {
        "gate": "continue",
        "by": "bob",
        "plan_hash": reviewed,
        "approve": True,
        "comment": "from the UI",
    }
    code, out = await run_command(*signal, "--input", json.dumps(right), *address)
    assert code == 0, out
    result: RollingDeployResult = await handle.result()
    assert any(
        s.name == "gate continue: approved by bob" and s.detail == "via signal: from the UI"
        for s in result.steps
    )
    assert fake.version["n3"] == "2.0.0"


async def test_zerodown_approve_and_reject_commands(
    client: Client, task_queue: str, gated: tuple[FakeSite, str], temporal_env: WorkflowEnvironment
) -> None:
    fake, reviewed = gated
    handle = await start_gated(client, task_queue)
    wf_id = handle.id
    await waiting_gates(handle)
    address = ["--address", temporal_address(temporal_env)]
    code, out = await zerodown("status", wf_id, *address)
    assert code == 0 and "waiting at gate continue" in out and reviewed in out, out
    code, out = await zerodown(
        "reject", wf_id, "--gate", "continue", "--by", "mallory", "--plan-hash", reviewed, *address
    )
    assert code == 2 and "refused: GateRefused: 'mallory' may not decide gate 'continue'" in out, out
    code, out = await zerodown(
        "approve",
        wf_id,
        "--gate",
        "continue",
        "--by",
        "bob",
        "--plan-hash",
        reviewed,
        "--comment",
        "checked the canary",
        *address,
    )
    assert code == 0 and "gate continue: approved by bob" in out, out
    await handle.result()
    assert fake.version["n2"] == "2.0.0"


async def test_no_decision_before_the_timeout_rejects_and_rolls_back(task_queue: str) -> None:
    # The time-skipping test server jumps over the hour the gate waits.
    env = await WorkflowEnvironment.start_time_skipping(test_server_existing_path=str(TEST_SERVER))
    try:
        fake = FakeSite(["n1", "n2", "n3"])
        async with running_worker(env.client, task_queue, [RollingDeployWorkflow], fake.activities()):
            with pytest.raises(WorkflowFailureError) as info:
                await env.client.execute_workflow(
                    RollingDeployWorkflow.run,
                    gated_input(gate_timeout_s=3600.0),
                    id=f"wf-{task_queue}",
                    task_queue=task_queue,
                )
    finally:
        await env.shutdown()
    assert "gate continue timed out: no decision within 3600s: reject (fail-safe default)" in str(
        info.value.cause
    )
    assert fake.version == {"n1": "1.0.0", "n2": "1.0.0", "n3": "1.0.0"} and fake.schema == 1


async def test_a_decision_after_the_timeout_is_refused(client: Client, task_queue: str) -> None:
    # The gate times out after 1 s; the rollback then waits in a drain we hold open, so the
    # run is still alive when bob's late approval arrives: it must be refused, not applied.
    fake = FakeSite(["n1", "n2", "n3"])
    async with running_worker(client, task_queue, [RollingDeployWorkflow], fake.activities()):
        plan = await plan_hash(client, task_queue)
        handle = await client.start_workflow(
            RollingDeployWorkflow.run,
            gated_input(gate_timeout_s=1.0),
            id=f"wf-{task_queue}",
            task_queue=task_queue,
        )
        await waiting_gates(handle)
        fake.hold_drain = asyncio.Event()
        for _ in range(200):
            progress = await handle.query(RollingDeployWorkflow.progress)
            if any(
                s.name.startswith("rollback: wait for zero sessions") and s.result == "running"
                for s in progress.steps
            ):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the rollback never started")
        message = await refusal(handle, Decision(gate="continue", by="bob", plan_hash=plan))
        assert "no gate 'continue' is waiting for a decision" in message
        fake.hold_drain.set()
        with pytest.raises(WorkflowFailureError):
            await handle.result()
    assert fake.version == {"n1": "1.0.0", "n2": "1.0.0", "n3": "1.0.0"}
