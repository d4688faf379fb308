"""ss-load-balanced's logic (Secret Server Load Balanced Configuration Upgrade, seed 000 steps
1-24) under Temporal's time-skipping test server, with same-name stand-in activities
(tests/ss_fake_site.py).

Three nodes: Target Web Server A = n1, the others n2 and n3. Covered: the runbook's order of
changes (A in and UP before the others leave: no gap) and the site it leaves; the gate
`swap` left undecided for its hour (fail-safe reject: the database, the others' maintenance
mode and A undone, the others never touched); the guided failure gate `failure:15` of the
production script (retry, rollback, abort, timeout); a transient SSH error retried and
counted; the compensations' order after a late failure; and whether a rollback after the
swap keeps what users wrote through A meanwhile.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from errors import DATABASE_ERROR, DEPLOY_VERIFICATION_FAILED, SSH_UNREACHABLE
from tests.gate_support import choose
from tests.ss_fake_site import (
    APPROVER,
    FAILURE_APPROVER,
    LB,
    NEW,
    OLD,
    PROD,
    SCRATCH,
    STARTER,
    SsFakeSite,
    approve,
    dedup,
    failed,
    finish,
    pending,
    ss_site,
)
from tests.temporal_env import running_worker
from workflows.procedure import OnFailure
from workflows.ss_load_balanced import SsLoadBalancedInput, SsLoadBalancedResult, SsLoadBalancedWorkflow
from workflows.timeline import Progress, StepRecord

Call = tuple[str, str]
SCRIPT_GATE = "failure:15"
SCRIPT_STEP = "15 run the upgrade script on production (migration 3)"
# The runbook's changes, in its order (seed step numbers).
RUNBOOK: list[Call] = [
    ("db_backup", PROD),  # 2
    ("db_restore", SCRATCH),  # 3
    ("db_apply_migration", f"{SCRATCH} 2"),
    ("db_apply_migration", f"{SCRATCH} 3"),  # 5
    ("db_drop_database", SCRATCH),  # 6
    ("lb_set_state", "n1 drain"),
    ("lb_set_state", "n1 maint"),  # 8, 9: A out first
    ("stop_service", "n1"),
    ("backup_app_folder", "n1"),
    ("deploy_package", "n1"),  # 10, 11
    ("app_set_settings", "n2: maintenance on, ignore on"),  # 13
    ("app_set_settings", "n3: maintenance on, ignore on"),
    ("start_service", "n1"),  # 14
    ("db_backup", PROD),
    ("db_apply_migration", f"{PROD} 2"),
    ("db_apply_migration", f"{PROD} 3"),  # 15
    ("lb_set_state", "n1 ready"),  # 17: A in first ...
    ("lb_set_state", "n2 drain"),
    ("lb_set_state", "n2 maint"),  # 16: ... then the others out
    ("lb_set_state", "n3 drain"),
    ("lb_set_state", "n3 maint"),
    ("stop_service", "n2"),
    ("backup_app_folder", "n2"),
    ("deploy_package", "n2"),  # 20, 21
    ("start_service", "n2"),  # 22
    ("stop_service", "n3"),
    ("backup_app_folder", "n3"),
    ("deploy_package", "n3"),
    ("start_service", "n3"),
    ("lb_set_state", "n2 ready"),
    ("lb_set_state", "n3 ready"),  # 23
    ("app_set_settings", "n2: cleared"),
    ("app_set_settings", "n3: cleared"),  # 24
]
SEED_STEPS = [
    "1",
    "P2",
    "P3",
    "P4",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "9",
    "10",
    "12",
    "13",
    "14",
    "15",
    "14",
    "16",
    "17",
    "16",
    "18",
    "19",
    "21",
    "22",
    "21",
    "22",
    "23",
    "24",
]


def restored_node(n: str) -> list[Call]:
    """What rolling back an upgraded node changes (drained first: it may be serving)."""
    return [
        ("lb_set_state", f"{n} drain"),
        ("stop_service", n),
        ("restore_app_folder", n),
        ("start_service", n),
        ("lb_set_state", f"{n} ready"),
    ]


# Before the swap: the database, the others' maintenance mode, then A.
UNDO_BEFORE_SWAP: list[Call] = [
    ("db_restore_keeping", PROD),
    ("app_set_settings", "n2: cleared"),
    ("app_set_settings", "n3: cleared"),
    *restored_node("n1"),
]


def runbook_to(last: Call) -> list[Call]:
    """The runbook's changes up to and including `last`."""
    return RUNBOOK[: RUNBOOK.index(last) + 1]


def inp(on_failure: OnFailure = "ask") -> SsLoadBalancedInput:
    return SsLoadBalancedInput(
        inventory=ss_site(3),
        package_path="/pkg/ss-2.0.0.zip",
        started_by=STARTER,
        gate_timeout_s=3600.0,
        failure_gate_timeout_s=3600.0,
        on_failure=on_failure,
    )


@asynccontextmanager
async def started(
    env: WorkflowEnvironment,
    task_queue: str,
    fake: SsFakeSite,
    on_failure: OnFailure = "ask",
) -> AsyncIterator[WorkflowHandle[Any, SsLoadBalancedResult]]:
    async with running_worker(env.client, task_queue, [SsLoadBalancedWorkflow], fake.activities()):
        yield await env.client.start_workflow(
            SsLoadBalancedWorkflow.run, inp(on_failure), id=f"wf-{task_queue}", task_queue=task_queue
        )


async def steps(handle: WorkflowHandle[Any, Any]) -> tuple[StepRecord, ...]:
    return (await handle.query("progress", result_type=Progress)).steps


def failing_script() -> SsFakeSite:
    """A site where migration 3 of the production script (15) fails, non-retryable."""
    fake = SsFakeSite(ss_site(3))
    fake.fail_on("db_apply_migration", f"{PROD} 3", DATABASE_ERROR)
    return fake


def assert_rolled_back(fake: SsFakeSite) -> None:
    assert fake.all_on(OLD) and fake.databases[PROD].schema == 1
    assert fake.override == {} and set(fake.databases) == {PROD} and fake.violations == []


# ---------------------------------------------------------------------- 1. the happy path
async def test_happy_path_follows_the_runbook_without_a_gap(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = SsFakeSite(ss_site(3))
    async with started(time_skipping_env, task_queue, fake) as handle:
        await pending(handle, "swap")
        # While the gate waits: A upgraded, still out of the pool, the script run; the others serve.
        assert (fake.lb["n1"], fake.version["n1"], fake.databases[PROD].schema) == ("maint", NEW, 3)
        assert [fake.lb[n] for n in ("n2", "n3")] == ["ready", "ready"]
        swap = await approve(handle, "swap")
        result: SsLoadBalancedResult = await finish(handle)
    assert (swap.approved, swap.by) == (True, APPROVER)
    assert fake.mutations() == RUNBOOK
    # 18: logged on through the load balancer once A served and before the others stopped.
    calls = fake.calls
    assert (
        calls.index(("lb_set_state", "n1 ready"))
        < calls.index(("check_login", LB))
        < calls.index(("stop_service", "n2"))
    )
    assert fake.all_on(NEW) and fake.databases[PROD].schema == 3
    assert fake.override == {} and set(fake.databases) == {PROD} and fake.violations == []
    assert (result.node_a, result.others, result.previous_versions) == (
        "n1",
        ("n2", "n3"),
        {"n1": OLD, "n2": OLD, "n3": OLD},
    )
    assert result.merge_report == tuple(f"{n}: web.config: kept node.name" for n in ("n1", "n2", "n3"))
    assert len(result.db_backups) == 2 and set(result.app_backups) == {"n1", "n2", "n3"}
    assert not result.dry_run and all(s.result == "ok" and s.retries == 0 for s in result.steps)
    assert dedup([s.seed_step for s in result.steps if s.seed_step]) == SEED_STEPS


# ---------------------------------------------------------------------- 2. the swap gate's timeout
async def test_swap_undecided_for_an_hour_rejects_and_undoes_a_alone(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = SsFakeSite(ss_site(3))
    async with started(time_skipping_env, task_queue, fake) as handle:
        error = await failed(handle)
        names = [s.name for s in await steps(handle)]
    assert error.type == "ProcedureFailed"
    assert "gate swap timed out: no decision within 3600s: reject (fail-safe default)" in str(error)
    assert "Rolled back: database, maintenance mode on the other nodes, node n1." in str(error)
    assert "gate swap: timed out, rejected" in names
    assert fake.mutations() == runbook_to(("db_apply_migration", f"{PROD} 3")) + UNDO_BEFORE_SWAP
    # The others kept serving throughout: never drained, stopped nor deployed to.
    assert not [c for c in fake.mutations() if c[1] in ("n2", "n3") or c[1].startswith(("n2 ", "n3 "))]
    assert_rolled_back(fake)
    assert fake.lost_writes == []


# ---------------------------------------------------------------------- 3. the failure gate
async def test_script_failure_retry_after_the_fix_completes(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = failing_script()
    async with started(time_skipping_env, task_queue, fake) as handle:
        gate = await pending(handle, SCRIPT_GATE)
        assert gate.choices == ("retry", "rollback", "abort") and gate.on_timeout == "rollback"
        assert gate.approvers == (FAILURE_APPROVER,) and "injected: db_apply_migration on ss 3" in gate.guards
        assert fake.databases[PROD].schema == 2  # half-applied, nothing undone while the gate waits
        fake.fix()
        record = await choose(handle, gate, "retry")
        await approve(handle, "swap")
        result: SsLoadBalancedResult = await finish(handle)
    assert (record.choice, record.by) == ("retry", FAILURE_APPROVER)
    script = [(s.result, s.retries) for s in result.steps if s.name == SCRIPT_STEP]
    assert script == [("failed", 0), ("ok", 1)]
    assert fake.targets("db_apply_migration").count(f"{PROD} 3") == 2
    assert fake.all_on(NEW) and fake.databases[PROD].schema == 3 and fake.override == {}
    assert fake.targets("restore_app_folder") == fake.targets("db_restore_keeping") == []


@pytest.mark.parametrize("how", ["rollback", "timeout"])
async def test_script_failure_rollback_by_choice_or_timeout_restores_everything(
    time_skipping_env: WorkflowEnvironment, task_queue: str, how: str
) -> None:
    fake = failing_script()
    async with started(time_skipping_env, task_queue, fake) as handle:
        if how == "rollback":
            await choose(handle, await pending(handle, SCRIPT_GATE), "rollback")
        error = await failed(handle)  # timeout: the hour passes at once
        names = [s.name for s in await steps(handle)]
    assert error.type == "ProcedureFailed"
    assert "Rolled back: database, maintenance mode on the other nodes, node n1." in str(error)
    expected = {
        "rollback": f"gate {SCRIPT_GATE}: rollback chosen by {FAILURE_APPROVER}",
        "timeout": f"gate {SCRIPT_GATE}: timed out, rollback",
    }[how]
    assert expected in names
    assert fake.mutations() == runbook_to(("db_apply_migration", f"{PROD} 3")) + UNDO_BEFORE_SWAP
    assert_rolled_back(fake)
    # The report names the step that failed, however the gate ended.
    assert f"failed at '{SCRIPT_STEP}': DatabaseError: injected" in str(error)


async def test_script_failure_abort_leaves_the_site_as_it_is(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = failing_script()
    async with started(time_skipping_env, task_queue, fake) as handle:
        await choose(handle, await pending(handle, SCRIPT_GATE), "abort")
        error = await failed(handle)
    text = str(error)
    assert error.type == "ProcedureAborted"
    assert f"aborted by {FAILURE_APPROVER} at '{SCRIPT_STEP}'" in text
    assert "changes not undone (newest first): database, maintenance mode on the other nodes, node n1" in text
    assert "kept: database backup (step 15): /backups/" in text
    # Nothing undone: the script half-applied, A upgraded out of the pool, the others in maintenance.
    assert fake.mutations()[-1] == ("db_apply_migration", f"{PROD} 3")
    assert fake.databases[PROD].schema == 2
    assert (fake.version["n1"], fake.lb["n1"]) == (NEW, "maint")
    assert fake.override == {
        "n2": {"maintenance": True, "ignore": True},
        "n3": {"maintenance": True, "ignore": True},
    }
    assert fake.version["n2"] == fake.version["n3"] == OLD and fake.violations == []


# ---------------------------------------------------------------------- 4. retries
async def test_a_lost_ssh_connection_is_retried_and_counted(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = SsFakeSite(ss_site(3))
    fake.fail_on("deploy_package", "n2", SSH_UNREACHABLE, retryable=True, times=1)
    async with started(time_skipping_env, task_queue, fake) as handle:
        await approve(handle, "swap")
        result: SsLoadBalancedResult = await finish(handle)
    assert fake.targets("deploy_package") == ["n1", "n2", "n2", "n3"]
    step = next(s for s in result.steps if s.node == "n2" and s.name.startswith("21 copy the package"))
    assert (step.result, step.retries) == ("ok", 1)
    assert step.detail is not None and "injected: deploy_package on n2" in step.detail
    assert all(s.retries == 0 for s in result.steps if s is not step)
    assert fake.all_on(NEW) and fake.violations == []


# ---------------------------------------------------------------------- 5. compensation order
async def late_failure(env: WorkflowEnvironment, task_queue: str) -> tuple[SsFakeSite, str, list[str]]:
    """The last node's copy (21 on n3) fails after the swap, on_failure=rollback: the fake site,
    the run's error and the timeline's step names."""
    fake = SsFakeSite(ss_site(3))
    fake.fail_on("deploy_package", "n3", DEPLOY_VERIFICATION_FAILED)
    async with started(env, task_queue, fake, on_failure="rollback") as handle:
        await approve(handle, "swap")
        error = await failed(handle)
        names = [s.name for s in await steps(handle)]
    assert error.type == "ProcedureFailed"
    return fake, str(error), names


async def test_a_late_failure_past_the_swap_leaves_the_site_serving_on_a(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    # Past step 17 (A serves alone on the upgraded database) nothing is undone: the failure
    # is reported where it happened, A goes on serving the new release, n3 stays out.
    fake, error, names = await late_failure(time_skipping_env, task_queue)
    assert "failed at '21 copy the package (protected files kept, customisations merged)' on n3" in error
    assert "Rolled back: nothing to undo." in error
    assert "17 point of no return: A serves the upgraded database" in names
    assert fake.mutations() == runbook_to(("deploy_package", "n3"))
    assert not any(n.startswith("gate failure:") for n in names)  # on_failure=rollback: no gate
    assert (fake.version["n1"], fake.lb["n1"], fake.databases[PROD].schema) == (NEW, "ready", 3)
    assert fake.lb["n3"] != "ready" and fake.violations == []


async def test_a_rollback_after_the_swap_keeps_what_users_wrote_through_a(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    # From step 17 node A serves alone, not in maintenance mode: users change secrets. A
    # failure while the others upgrade (20-23) must not restore the step-15 backup, taken
    # before: production is not restored at all.
    fake, _, _ = await late_failure(time_skipping_env, task_queue)
    assert fake.targets("db_restore_keeping") == []
    assert fake.lost_writes == [], (
        f"production restored from {fake.lost_writes} after node A had served writes since that backup"
    )
