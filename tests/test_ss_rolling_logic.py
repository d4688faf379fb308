"""ss-rolling's logic (Secret Server Manual Rolling Upgrade, seed 000 tasks one to eight) under
Temporal's time-skipping test server, with same-name stand-in activities (tests/ss_fake_site.py).

Two nodes: group A = n1, group B = n2 (B is upgraded first). Covered: the runbook's order of
changes and the site it leaves; the gates `staging-test` and `upgrade-successful` left
undecided for their hour (fail-safe reject: the rollback of what was done so far); the guided
failure gate `failure:7.7` of the production SQL script (retry, rollback, abort, timeout);
a transient error retried and counted; the compensations' order after a late failure; and
whether a failure after upgrade mode is off (8.1) keeps what users wrote since (the fake
site's `lost_writes`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from temporalio.client import WorkflowFailureError, WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from errors import ADMIN_UNAVAILABLE, DATABASE_ERROR, DEPLOY_VERIFICATION_FAILED
from tests.gate_support import choose
from tests.ss_fake_site import (
    APPROVER,
    FAILURE_APPROVER,
    NEW,
    OLD,
    PROD,
    SCRATCH,
    STAGING_DB,
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
from workflows.ss_rolling import SsRollingInput, SsRollingResult, SsRollingWorkflow
from workflows.timeline import Progress, StepRecord

Call = tuple[str, str]
SCRIPT_GATE = "failure:7.7"
SCRIPT_STEP = "7.7 run the SQL script on the production database (migration 3)"
# The runbook's changes, in its order (seed step numbers), on n1 (group A) and n2 (group B).
RUNBOOK: list[Call] = [
    ("backup_app_folder", "n1"),
    ("backup_app_folder", "n2"),  # 1.4
    ("db_backup", PROD),  # 1.5
    ("db_restore", SCRATCH),
    ("db_apply_migration", f"{SCRATCH} 2"),  # 2.2
    ("db_apply_migration", f"{SCRATCH} 3"),
    ("db_drop_database", SCRATCH),
    ("app_record_audit", "VERIFY DELTAS"),
    ("build_upgrade_zip", "n1"),
    ("app_record_audit", "GENERATE UPGRADE ZIP"),  # 3.2
    ("generate_sql_script", "from 1"),
    ("app_record_audit", "GENERATE DB SCRIPT"),  # 4.2
    ("app_set_settings", "site: maintenance on"),  # 5.1
    ("db_backup", PROD),  # 5.2
    ("app_set_settings", "site: maintenance off"),  # 5.3
    ("stop_service", "staging"),
    ("stage_app_backup", "staging"),
    ("start_service", "staging"),  # 5.4
    ("db_restore", STAGING_DB),  # 5.5
    ("stop_service", "staging"),
    ("deploy_package", "staging"),  # 5.7
    ("db_apply_migration", f"{STAGING_DB} 2"),
    ("db_apply_migration", f"{STAGING_DB} 3"),  # 5.8
    ("start_service", "staging"),  # 5.9
    ("stop_service", "staging"),
    ("clear_staging", "staging"),
    ("db_drop_database", STAGING_DB),  # 5.10
    ("app_record_audit", "STAGING TEST"),  # 5.11
    ("app_set_settings", "site: maintenance on"),
    ("app_set_settings", "site: ignore on"),  # 6.2, 6.4
    ("app_record_audit", "STARTED"),
    ("db_backup", PROD),  # 6.6
    ("lb_set_state", "n2 drain"),
    ("lb_set_state", "n2 maint"),  # 7.3
    ("stop_service", "n2"),
    ("deploy_package", "n2"),
    ("start_service", "n2"),  # 7.4
    ("lb_set_state", "n2 ready"),  # 7.5
    ("lb_set_state", "n1 drain"),
    ("lb_set_state", "n1 maint"),  # 7.6
    ("db_apply_migration", f"{PROD} 2"),
    ("db_apply_migration", f"{PROD} 3"),  # 7.7
    ("stop_service", "n1"),
    ("deploy_package", "n1"),
    ("start_service", "n1"),  # 7.9
    ("lb_set_state", "n1 ready"),  # 7.10
    ("app_set_settings", "site: maintenance off, ignore off"),  # 8.1
    ("app_record_audit", "COMPLETED"),
]
SEED_STEPS = [
    "P1",
    "P2",
    "P3",
    "P4",
    "1.4",
    "1.5",
    "2.2",
    "3.2",
    "4.2",
    "5.1",
    "5.2",
    "5.3",
    "5.4",
    "5.5",
    "5.6",
    "5.7",
    "5.8",
    "5.9",
    "5.10",
    "5.11",
    "6.2",
    "6.4",
    "6.3",
    "6.6",
    "7.1",
    "7.2",
    "7.3",
    "7.4",
    "7.5",
    "7.6",
    "7.7",
    "7.8",
    "7.9",
    "7.10",
    "7.11",
    "8.1",
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


# The compensations after staging: the staging copy, the settings, the audit CANCEL.
UNDO_STAGING: list[Call] = [
    ("stop_service", "staging"),
    ("clear_staging", "staging"),
    ("db_drop_database", STAGING_DB),
    ("app_set_settings", "site: maintenance off, ignore off"),
    ("app_record_audit", "CANCEL"),
]


def new_code_out(*nodes: str) -> list[Call]:
    """The rollback's first move once every node may run the new code: out of the pool."""
    return [c for n in nodes for c in (("lb_set_state", f"{n} drain"), ("lb_set_state", f"{n} maint"))]


# Everything undone from task seven on, once every node may run the new code (7.9 on): the
# database first (nothing else could serve), then group A, group B, staging.
UNDO_ALL: list[Call] = [
    ("db_restore_keeping", PROD),
    *restored_node("n1"),
    *restored_node("n2"),
    *UNDO_STAGING,
]
ROLLED_BACK_ALL = "Rolled back: database, node n1, node n2, staging copy, upgrade settings, audit CANCEL."


def inp(on_failure: OnFailure = "ask") -> SsRollingInput:
    return SsRollingInput(
        inventory=ss_site(2),
        package_path="/pkg/ss-2.0.0.zip",
        started_by=STARTER,
        gate_timeout_s=3600.0,
        failure_gate_timeout_s=3600.0,
        on_failure=on_failure,
    )


@asynccontextmanager
async def started(
    env: WorkflowEnvironment, task_queue: str, fake: SsFakeSite, on_failure: OnFailure = "ask"
) -> AsyncIterator[WorkflowHandle[Any, SsRollingResult]]:
    async with running_worker(env.client, task_queue, [SsRollingWorkflow], fake.activities()):
        yield await env.client.start_workflow(
            SsRollingWorkflow.run, inp(on_failure), id=f"wf-{task_queue}", task_queue=task_queue
        )


async def steps(handle: WorkflowHandle[Any, Any]) -> tuple[StepRecord, ...]:
    return (await handle.query("progress", result_type=Progress)).steps


def runbook_to(last: Call) -> list[Call]:
    """The runbook's changes up to and including `last` (its first occurrence)."""
    return RUNBOOK[: RUNBOOK.index(last) + 1]


def changes_after_8_1(fake: SsFakeSite) -> list[Call]:
    changes = fake.mutations()
    return changes[changes.index(("app_set_settings", "site: maintenance off, ignore off")) + 1 :]


def assert_rolled_back(fake: SsFakeSite) -> None:
    assert fake.all_on(OLD) and fake.databases[PROD].schema == 1
    assert fake.site_settings() == (False, False) and fake.override == {}
    assert fake.staging_files is None and set(fake.databases) == {PROD}
    assert fake.audit[-1] == "CANCEL" and fake.violations == [] and fake.lost_writes == []


# ---------------------------------------------------------------------- 1. the happy path
async def test_happy_path_follows_the_runbook_and_upgrades_every_node(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = SsFakeSite(ss_site(2))
    async with started(time_skipping_env, task_queue, fake) as handle:
        staging_test = await approve(handle, "staging-test")
        upgraded = await approve(handle, "upgrade-successful")
        result: SsRollingResult = await finish(handle)
    assert (staging_test.approved, staging_test.by, upgraded.approved) == (True, APPROVER, True)
    assert fake.mutations() == RUNBOOK
    assert fake.all_on(NEW) and fake.databases[PROD].schema == 3 and fake.site_settings() == (False, False)
    assert fake.staging_files is None and set(fake.databases) == {PROD}  # staging and scratch dropped
    assert fake.audit == [
        "VERIFY DELTAS",
        "GENERATE UPGRADE ZIP",
        "GENERATE DB SCRIPT",
        "STAGING TEST",
        "STARTED",
        "COMPLETED",
    ]
    assert fake.violations == []
    # Group B first; every upgraded node (and staging) logged on to on the new release.
    assert (result.group_a, result.group_b, result.previous_versions) == (
        ("n1",),
        ("n2",),
        {"n1": OLD, "n2": OLD},
    )
    assert result.merge_report == tuple(f"{n}: web.config: kept node.name" for n in ("staging", "n2", "n1"))
    assert len(result.db_backups) == 3 and set(result.app_backups) == {"n1", "n2"}
    assert result.upgrade_zip.endswith("-upgrade.zip") and result.sql_script.endswith("-upgrade.sql")
    assert not result.dry_run and all(s.result == "ok" and s.retries == 0 for s in result.steps)
    assert dedup([s.seed_step for s in result.steps if s.seed_step]) == SEED_STEPS


# ---------------------------------------------------------------------- 2. the approval gates' timeouts
async def test_staging_test_undecided_for_an_hour_rejects_and_touches_no_web_node(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = SsFakeSite(ss_site(2))
    async with started(time_skipping_env, task_queue, fake) as handle:
        error = await failed(handle)
    assert error.type == "ProcedureFailed"
    assert "gate staging-test timed out: no decision within 3600s: reject (fail-safe default)" in str(error)
    assert "Rolled back: staging copy, upgrade settings, audit CANCEL." in str(error)
    # Up to the gate the runbook ran as written; then only its compensations.
    changes = fake.mutations()
    assert changes == runbook_to(("db_drop_database", STAGING_DB)) + UNDO_STAGING
    assert not [c for c in changes if c[0] in ("lb_set_state", "stop_service") and c[1] != "staging"]
    assert_rolled_back(fake)
    assert "STARTED" not in fake.audit


async def test_upgrade_successful_undecided_for_an_hour_rolls_everything_back(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = SsFakeSite(ss_site(2))
    async with started(time_skipping_env, task_queue, fake) as handle:
        await approve(handle, "staging-test")
        error = await failed(handle)
        timeline = await steps(handle)
    assert "gate upgrade-successful timed out: no decision within 3600s: reject" in str(error)
    assert ROLLED_BACK_ALL in str(error)
    assert fake.mutations() == runbook_to(("lb_set_state", "n1 ready")) + UNDO_ALL
    assert_rolled_back(fake)
    assert "COMPLETED" not in fake.audit
    gate = [s for s in timeline if s.name == "gate upgrade-successful: timed out, rejected"]
    assert len(gate) == 1 and gate[0].result == "failed"


# ---------------------------------------------------------------------- 3. the failure gate
def failing_script() -> SsFakeSite:
    """A site where migration 3 of the production script (7.7) fails, non-retryable."""
    fake = SsFakeSite(ss_site(2))
    fake.fail_on("db_apply_migration", f"{PROD} 3", DATABASE_ERROR)
    return fake


async def test_script_failure_retry_after_the_fix_completes(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = failing_script()
    async with started(time_skipping_env, task_queue, fake) as handle:
        await approve(handle, "staging-test")
        gate = await pending(handle, SCRIPT_GATE)
        assert gate.choices == ("retry", "rollback", "abort") and gate.on_timeout == "rollback"
        assert gate.approvers == (FAILURE_APPROVER,) and "injected: db_apply_migration on ss 3" in gate.guards
        assert fake.databases[PROD].schema == 2  # half-applied, nothing undone while the gate waits
        fake.fix()
        record = await choose(handle, gate, "retry")
        await approve(handle, "upgrade-successful")
        result: SsRollingResult = await finish(handle)
    assert (record.choice, record.by) == ("retry", FAILURE_APPROVER)
    script = [(s.result, s.retries) for s in result.steps if s.name == SCRIPT_STEP]
    assert script == [("failed", 0), ("ok", 1)]
    assert fake.targets("db_apply_migration")[-2:] == [f"{PROD} 3", f"{PROD} 3"]
    assert fake.all_on(NEW) and fake.databases[PROD].schema == 3 and fake.audit[-1] == "COMPLETED"
    assert fake.targets("restore_app_folder") == fake.targets("db_restore_keeping") == []
    assert fake.violations == []


@pytest.mark.parametrize("how", ["rollback", "timeout"])
async def test_script_failure_rollback_by_choice_or_timeout_restores_everything(
    time_skipping_env: WorkflowEnvironment, task_queue: str, how: str
) -> None:
    fake = failing_script()
    async with started(time_skipping_env, task_queue, fake) as handle:
        await approve(handle, "staging-test")
        if how == "rollback":
            await choose(handle, await pending(handle, SCRIPT_GATE), "rollback")
        error = await failed(handle)  # timeout: the hour passes at once
        names = [s.name for s in await steps(handle)]
    assert error.type == "ProcedureFailed" and ROLLED_BACK_ALL in str(error)
    expected = {
        "rollback": f"gate {SCRIPT_GATE}: rollback chosen by {FAILURE_APPROVER}",
        "timeout": f"gate {SCRIPT_GATE}: timed out, rollback",
    }[how]
    assert expected in names
    # Group A (only taken out, still on the old code) back in the pool and group B (the new
    # code) out of it before the database is restored; then group B restored.
    undo = [
        ("lb_set_state", "n1 ready"),
        *new_code_out("n2"),
        ("db_restore_keeping", PROD),
        ("lb_set_state", "n1 ready"),
        *restored_node("n2"),
        *UNDO_STAGING,
    ]
    assert fake.mutations() == runbook_to(("db_apply_migration", f"{PROD} 3")) + undo
    assert_rolled_back(fake)
    # The report names the step that failed, however the gate ended.
    assert f"failed at '{SCRIPT_STEP}': DatabaseError: injected" in str(error)


async def test_script_failure_abort_leaves_the_site_as_it_is(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = failing_script()
    async with started(time_skipping_env, task_queue, fake) as handle:
        await approve(handle, "staging-test")
        await choose(handle, await pending(handle, SCRIPT_GATE), "abort")
        error = await failed(handle)
    text = str(error)
    assert error.type == "ProcedureAborted"
    assert f"aborted by {FAILURE_APPROVER} at '{SCRIPT_STEP}'" in text
    assert (
        "changes not undone (newest first): database, node n1, node n2, staging copy, upgrade settings, "
        "audit CANCEL"
    ) in text
    assert "kept: database backup (upgrade mode): /backups/" in text
    # Nothing undone: the script half-applied, B upgraded, A out of the pool, upgrade mode on.
    assert fake.mutations()[-1] == ("db_apply_migration", f"{PROD} 3")
    assert fake.databases[PROD].schema == 2 and fake.site_settings() == (True, True)
    assert (fake.version["n2"], fake.lb["n2"]) == (NEW, "ready")
    assert (fake.version["n1"], fake.lb["n1"]) == (OLD, "maint")
    assert "CANCEL" not in fake.audit and fake.violations == []


# ---------------------------------------------------------------------- 4. retries
async def test_a_transient_admin_error_is_retried_and_counted(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = SsFakeSite(ss_site(2))
    off = "site: maintenance off, ignore off"
    fake.fail_on("app_set_settings", off, ADMIN_UNAVAILABLE, retryable=True, times=1)
    async with started(time_skipping_env, task_queue, fake) as handle:
        await approve(handle, "staging-test")
        await approve(handle, "upgrade-successful")
        result: SsRollingResult = await finish(handle)
    assert fake.targets("app_set_settings").count(off) == 2  # the failed attempt, then the good one
    step = next(s for s in result.steps if s.seed_step == "8.1")
    assert (step.result, step.retries) == ("ok", 1)
    assert step.detail is not None and "injected: app_set_settings" in step.detail
    assert all(s.retries == 0 for s in result.steps if s is not step)
    assert fake.all_on(NEW) and fake.site_settings() == (False, False) and fake.audit[-1] == "COMPLETED"


# ---------------------------------------------------------------------- 5. compensation order
async def test_a_late_failure_undoes_the_changes_newest_first(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = SsFakeSite(ss_site(2))
    fake.fail_on("deploy_package", "n1", DEPLOY_VERIFICATION_FAILED)  # 7.9, group A
    async with started(time_skipping_env, task_queue, fake, on_failure="rollback") as handle:
        await approve(handle, "staging-test")
        error = await failed(handle)
        names = [s.name for s in await steps(handle)]
    assert error.type == "ProcedureFailed"
    assert "failed at '7.9 extract and copy the upgrade zip' on n1" in str(error)
    assert ROLLED_BACK_ALL in str(error)
    assert fake.mutations() == runbook_to(("deploy_package", "n1")) + UNDO_ALL
    assert not any(n.startswith("gate failure:") for n in names)  # on_failure=rollback: no gate
    assert_rolled_back(fake)


async def test_an_audit_failure_after_upgrade_mode_is_off_loses_no_write(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    # 8.1 ends upgrade mode: users change secrets again. If the audit COMPLETED that follows
    # fails (the admin interface down), the upgrade-mode backup (6.6) must not be restored
    # over what they wrote since.
    fake = SsFakeSite(ss_site(2))
    fake.fail_on("app_record_audit", "COMPLETED", ADMIN_UNAVAILABLE, retryable=True)
    async with started(time_skipping_env, task_queue, fake) as handle:
        await approve(handle, "staging-test")
        await approve(handle, "upgrade-successful")
        with contextlib.suppress(WorkflowFailureError):
            await finish(handle)
    assert fake.lost_writes == [], (
        f"production restored from {fake.lost_writes} after upgrade mode was off (8.1); the run's "
        f"changes after 8.1: {changes_after_8_1(fake)}"
    )


async def test_the_backup_a_rollback_restores_waits_until_every_node_refuses_changes(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """Issue 17.7: nodes cache their settings, so right after 6.2 they still take writes.
    The 6.6 backup - the one the rollback restores - comes only once each node confirmed
    maintenance mode (6.3): the rollback loses no write (the fake records any it would)."""
    fake = failing_script()
    fake.settings_cache = True
    async with started(time_skipping_env, task_queue, fake) as handle:
        await approve(handle, "staging-test")
        await choose(handle, await pending(handle, SCRIPT_GATE), "rollback")
        await failed(handle)
        records = await steps(handle)
    assert_rolled_back(fake)  # lost_writes == [] among the rest
    confirmed = [s.node for s in records if s.seed_step == "6.3"]
    backup = next(i for i, s in enumerate(records) if s.seed_step == "6.6")
    assert confirmed == ["n1", "n2"]
    assert all(i < backup for i, s in enumerate(records) if s.seed_step == "6.3")
