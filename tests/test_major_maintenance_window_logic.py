"""major-maintenance-window's logic (seed 004) under Temporal's time-skipping test server, with
the same-name stand-in activities of tests/blue_green_fake_site.py (a site in memory).

Covered: the happy path in the runbook's order (backup restore test, warm replica, new
servers tested on the test balancer, the window: page, old servers stopped, snapshot,
replication stopped, migration, swap, preview, gate `go-live`, page off, snapshot, gate
`terminate`, terminate); the gates' fail-safe defaults when nobody decides within the hour
(`go-live` -> revert by promoting the warm replica, `terminate` -> keep); the failure gate
`failure:12@<new server>` (retry after the fix, rollback, timeout, abort); retried
transient errors inside the window counted per step; the compensations' order after a
failure past the point of no return (the revert) and before it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from errors import (
    DATABASE_ERROR,
    DB_WRITES_CONTINUE,
    DEPLOY_VERIFICATION_FAILED,
    HEALTH_CHECK_FAILED,
    LB_RUNTIME_API_ERROR,
)
from tests.blue_green_fake_site import NEW, OLD, WARM, BlueGreenSite, Call, window_site
from tests.gate_support import choose, pending
from tests.temporal_env import running_worker
from workflows.major_maintenance_window import (
    MajorMaintenanceInput,
    MajorMaintenanceResult,
    MajorMaintenanceWindowWorkflow,
)
from workflows.timeline import StepRecord

N1, N2 = "n1-v2-0-0", "n2-v2-0-0"


def window_input(**changes: Any) -> MajorMaintenanceInput:
    return MajorMaintenanceInput(
        inventory=window_site(), package_path="/p.zip", started_by="starter", **changes
    )


def window_fake() -> BlueGreenSite:
    return BlueGreenSite(window_site(), destructive=True)


async def start(client: Client, task_queue: str, inp: MajorMaintenanceInput) -> WorkflowHandle[Any, Any]:
    return await client.start_workflow(
        MajorMaintenanceWindowWorkflow.run, inp, id=f"wf-{task_queue}", task_queue=task_queue
    )


async def failed(handle: WorkflowHandle[Any, Any]) -> ApplicationError:
    with pytest.raises(WorkflowFailureError) as info:
        await handle.result()
    cause = info.value.cause
    assert isinstance(cause, ApplicationError)
    return cause


async def steps_of(handle: WorkflowHandle[Any, Any]) -> tuple[StepRecord, ...]:
    progress = await handle.query(MajorMaintenanceWindowWorkflow.progress)
    return progress.steps


def names(steps: tuple[StepRecord, ...]) -> list[str]:
    return [s.name for s in steps]


def in_groups(calls: list[Call], groups: list[list[Call]]) -> None:
    """`calls` are `groups` one after the other; inside a group (steps run side by side) in
    any order."""
    i = 0
    for group in groups:
        got = calls[i : i + len(group)]
        assert sorted(got, key=str) == sorted(group, key=str), f"at {i}: {got} != {group}"
        i += len(group)
    assert calls[i:] == [], f"unexpected calls after the runbook: {calls[i:]}"


def seed_firsts(steps: tuple[StepRecord, ...]) -> list[str]:
    """Each seed step, at its first step that ran (records and gates included)."""
    order: list[str] = []
    for s in steps:
        if s.seed_step and s.result in ("ok", "skipped") and s.seed_step not in order:
            order.append(s.seed_step)
    return order


def assert_old_site_serves(fake: BlueGreenSite, database: str) -> None:
    """After a rollback: the old servers, on the old code, serve from `database` with the page
    off, every new server is gone."""
    assert fake.lbs["main"].members == {"n1": "ready", "n2": "ready"} and not fake.lbs["main"].page
    assert fake.serving("main") == ["n1", "n2"] and sorted(fake.servers) == ["n1", "n2"]
    assert all(fake.servers[n].version == OLD and fake.servers[n].database == database for n in ("n1", "n2"))
    assert fake.lbs["test"].members == {} and fake.problems == []


# ------------------------------------------------------------------ 1 the happy path
async def test_happy_path_swaps_the_servers_in_the_runbooks_order(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    client = time_skipping_env.client
    fake = window_fake()
    async with running_worker(client, task_queue, [MajorMaintenanceWindowWorkflow], fake.activities()):
        handle = await start(client, task_queue, window_input())
        gate = await pending(handle, "go-live")
        # Behind the page: the new servers serve on the migrated schema, the old ones are
        # stopped and detached, the warm replica stopped with the data as it was.
        assert fake.lbs["main"].page and fake.serving("main") == [N1, N2]
        assert not fake.servers["n1"].running and not fake.servers["n2"].running
        assert (fake.schema, fake.warm, fake.warm_schema) == (2, "stopped", 1)
        assert gate.choices == ("go-live", "revert") and gate.on_timeout == "revert"
        await choose(handle, gate, "go-live")
        await choose(handle, await pending(handle, "terminate"), "terminate")
        result: MajorMaintenanceResult = await handle.result()

    in_groups(
        fake.mutations(),
        [
            [("db_backup", None)],
            [("db_restore", "app_scratch")],
            [("db_drop_database", "app_scratch")],  # 1
            [("db_init_warm_replica", None)],  # 5-6
            [("provision_create", N1)],
            [("provision_start", N1)],
            [("start_service", N1)],  # 10, 11
            [("lb_add_server", f"test/{N1}")],  # 11
            [("stop_service", N1)],
            [("deploy_package", N1)],  # 12
            [("provision_create", N2)],  # 13
            [("lb_del_server", f"test/{N1}")],  # 16
            [("lb_set_maintenance", "main")],  # 18
            [("stop_service", "n1"), ("stop_service", "n2")],  # 19
            [("db_backup", None), ("db_stop_replication", None)],  # 20, 22
            [("db_apply_migration", "2")],  # 23
            [
                ("lb_del_server", "main/n1"),
                ("lb_del_server", "main/n2"),  # 24
                ("start_service", N1),
                ("provision_start", N2),
                ("start_service", N2),
            ],  # 26-29
            [("lb_add_server", f"main/{N1}"), ("lb_add_server", f"main/{N2}")],  # 25
            [("lb_set_maintenance", "main")],  # 31
            [("db_backup", None)],  # 32
            [("provision_destroy", "n1")],
            [("provision_destroy", "n2")],  # 37
            [("db_release_warm_replica", None)],  # 37
        ],
    )
    m = fake.mutations()
    assert m.index(("provision_start", N2)) < m.index(("start_service", N2))
    # The site ends upgraded: the new servers serve, page off, old servers and replica gone.
    assert fake.serving("main") == [N1, N2] and not fake.lbs["main"].page
    assert all(fake.servers[n].version == NEW for n in (N1, N2)) and sorted(fake.servers) == [N1, N2]
    assert fake.lbs["test"].members == {} and fake.schema == 2 and fake.warm == "released"
    assert fake.problems == []
    assert result.terminated == ("n1", "n2") and [n.name for n in result.new_servers] == [N1, N2]
    assert len(result.snapshots) == 2 and [fake.snapshots[p] for p in result.snapshots] == [1, 2]
    assert result.downtime_s >= result.migration_s >= 0.0
    assert seed_firsts(result.steps) == [
        "P1",
        "P2",
        "P4",
        "1",
        "5",
        "7",
        "10",
        "11",
        "12",
        "13",
        "16",
        "17",
        "18",
        "19",
        "20",
        "21",
        "22",
        "23",
        "24",
        "26",
        "27",
        "25",
        "30",
        "31",
        "32",
        "33",
        "34",
        "35",
        "36",
        "37",
        "38",
    ]
    assert all(s.result in ("ok", "skipped") and s.retries == 0 for s in result.steps)


# ------------------------------------------------------------------ 2 gates nobody decides
async def test_go_live_nobody_decides_reverts_by_promoting_the_warm_replica(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    client = time_skipping_env.client
    fake = window_fake()
    async with running_worker(client, task_queue, [MajorMaintenanceWindowWorkflow], fake.activities()):
        handle = await start(client, task_queue, window_input(gate_timeout_s=3600.0))
        cause = await failed(handle)  # the hour passes at once
        steps = await steps_of(handle)
    assert cause.type == "ProcedureFailed" and "revert chosen at gate go-live (timeout)" in str(cause)
    gate = next(s for s in steps if s.name == "gate go-live: timed out, revert")
    preview = next(s for s in steps if s.name.startswith("30 test through main"))
    assert preview.ended is not None and (gate.started - preview.ended).total_seconds() >= 3600
    # The old code on the data as it was at step 19: the promoted replica, the old servers
    # pointed at it; the migrated primary left as it is.
    assert fake.warm == "promoted" and fake.warm_schema == 1 and fake.schema == 2
    assert_old_site_serves(fake, database="warm")
    assert fake.servers["n1"].settings["database.config"] == {"host": WARM.host, "port": str(WARM.port)}
    assert fake.destroyed == [N2, N1]
    assert "rollback: keep the warm replica" in names(steps)
    assert "db_release_warm_replica" not in [c for c, _ in fake.calls]


async def test_terminate_nobody_decides_keeps_the_old_servers_and_the_replica(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    client = time_skipping_env.client
    fake = window_fake()
    async with running_worker(client, task_queue, [MajorMaintenanceWindowWorkflow], fake.activities()):
        handle = await start(client, task_queue, window_input(gate_timeout_s=3600.0))
        await choose(handle, await pending(handle, "go-live"), "go-live")
        result: MajorMaintenanceResult = await handle.result()  # terminate: the hour passes at once
    assert result.terminated == () and fake.destroyed == [] and fake.warm == "stopped"
    assert {"n1", "n2"} <= set(fake.servers) and fake.serving("main") == [N1, N2]
    assert "gate terminate: timed out, keep" in names(result.steps)
    kept = next(s for s in result.steps if s.seed_step == "37")
    assert (kept.name, kept.result, kept.detail) == ("37-38 terminate", "skipped", "kept at the gate")
    assert fake.problems == []


# ------------------------------------------------------------------ 3 failure gates
FAILURE_GATE = f"failure:12@{N1}"


def failing_deploy() -> BlueGreenSite:
    fake = window_fake()
    fake.fail("deploy_package", N1, DEPLOY_VERIFICATION_FAILED, "checksum of app.py differs")
    return fake


async def test_failure_gate_retry_after_the_fix_completes(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    client = time_skipping_env.client
    fake = failing_deploy()
    async with running_worker(client, task_queue, [MajorMaintenanceWindowWorkflow], fake.activities()):
        handle = await start(client, task_queue, window_input(on_failure="ask"))
        gate = await pending(handle, FAILURE_GATE)
        assert gate.choices == ("retry", "rollback", "abort") and "checksum of app.py differs" in gate.guards
        fake.fix("deploy_package", N1)
        await choose(handle, gate, "retry")
        await choose(handle, await pending(handle, "go-live"), "go-live")
        result: MajorMaintenanceResult = await handle.result()
    deploys = [(s.result, s.retries) for s in result.steps if s.seed_step == "12" and "deploy" in s.name]
    assert deploys == [("failed", 0), ("ok", 1)]
    assert f"gate {FAILURE_GATE}: retry chosen by ops1" in names(result.steps)
    assert fake.serving("main") == [N1, N2] and fake.servers[N2].version == NEW and fake.problems == []


@pytest.mark.parametrize("how", ["rollback", "timeout"])
async def test_failure_gate_rollback_or_nobody_in_time_undoes_the_preparation(
    time_skipping_env: WorkflowEnvironment, task_queue: str, how: str
) -> None:
    client = time_skipping_env.client
    fake = failing_deploy()
    inp = window_input(on_failure="ask", failure_gate_timeout_s=3600.0)
    async with running_worker(client, task_queue, [MajorMaintenanceWindowWorkflow], fake.activities()):
        handle = await start(client, task_queue, inp)
        if how == "rollback":
            await choose(handle, await pending(handle, FAILURE_GATE), "rollback")
        cause = await failed(handle)  # "timeout": the hour passes at once
        steps = await steps_of(handle)
    assert cause.type == "ProcedureFailed"
    assert "Rolled back: new server n1-v2-0-0, warm replica released." in str(cause)
    expected = {
        "rollback": f"gate {FAILURE_GATE}: rollback chosen by ops1",
        "timeout": f"gate {FAILURE_GATE}: timed out, rollback",
    }[how]
    assert expected in names(steps)
    # Before the window: no downtime happened, the old servers never stopped.
    assert "lb_set_maintenance" not in [c for c, _ in fake.calls]
    assert_old_site_serves(fake, database="primary")
    assert fake.destroyed == [N1] and fake.warm == "released" and fake.schema == 1
    assert fake.mutations()[-3:] == [
        ("lb_del_server", f"test/{N1}"),
        ("provision_destroy", N1),
        ("db_release_warm_replica", None),
    ]


async def test_failure_gate_abort_leaves_everything_in_place(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    client = time_skipping_env.client
    fake = failing_deploy()
    async with running_worker(client, task_queue, [MajorMaintenanceWindowWorkflow], fake.activities()):
        handle = await start(client, task_queue, window_input(on_failure="ask"))
        await choose(handle, await pending(handle, FAILURE_GATE), "abort")
        cause = await failed(handle)
    text = str(cause)
    assert cause.type == "ProcedureAborted" and f"at '12 deploy {NEW} on {N1}'" in text
    assert "changes not undone (newest first): new server n1-v2-0-0, warm replica released" in text
    assert "kept: database backup (step 1): /backups/" in text
    # Nothing undone: the new server stays on the test balancer, the replica replicates.
    assert fake.lbs["test"].members == {N1: "ready"} and fake.warm == "replicating"
    assert fake.destroyed == [] and fake.serving("main") == ["n1", "n2"] and fake.problems == []


# ------------------------------------------------------------------ 4 retries
async def go_live_with_faults(
    env: WorkflowEnvironment, task_queue: str, fake: BlueGreenSite, arm: Callable[[BlueGreenSite], None]
) -> MajorMaintenanceResult:
    """A run to the gate go-live, `arm` (faults for steps 31-32), go-live, then the rest under
    time skipping (terminate: nobody, keep). Faults armed only now: a backoff before the gate
    would wait in real time (time skips only while the result is awaited)."""
    async with running_worker(env.client, task_queue, [MajorMaintenanceWindowWorkflow], fake.activities()):
        handle = await start(env.client, task_queue, window_input())
        gate = await pending(handle, "go-live")
        arm(fake)
        await choose(handle, gate, "go-live")
        result: MajorMaintenanceResult = await handle.result()
    return result


async def test_a_transient_error_is_retried_and_counted_in_its_step(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = window_fake()
    result = await go_live_with_faults(
        time_skipping_env,
        task_queue,
        fake,
        lambda f: f.fail("db_backup", None, DATABASE_ERROR, "lost connection", retryable=True, times=1),
    )  # step 32
    retried = [s for s in result.steps if s.retries]
    assert [(s.seed_step, s.result, s.retries) for s in retried] == [("32", "ok", 1)]
    assert "lost connection" in (retried[0].detail or "")
    assert [c for c, _ in fake.calls].count("db_backup") == 4  # 1, 20, 32 twice
    assert len(result.snapshots) == 2 and fake.serving("main") == [N1, N2] and fake.problems == []


async def test_a_transient_error_of_a_local_activity_is_retried_too(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    # Step 31 (the page off) is a local activity: a retryable error there must be retried like
    # any other step's (Procedure.change, ACTION_RETRY), not turn the end of the window into a
    # revert. Fails while Procedure._attempts catches only ActivityError: a failed local
    # activity raises the ApplicationError itself (temporalio 1.35), so it is never retried.
    fake = window_fake()
    result = await go_live_with_faults(
        time_skipping_env,
        task_queue,
        fake,
        lambda f: f.fail(
            "lb_set_maintenance", "main", LB_RUNTIME_API_ERROR, "runtime API busy", retryable=True, times=1
        ),
    )
    retried = [s for s in result.steps if s.retries]
    assert [(s.seed_step, s.result, s.retries) for s in retried] == [("31", "ok", 1)]
    assert [c for c in fake.calls if c[0] == "lb_set_maintenance"] == [("lb_set_maintenance", "main")] * 3
    assert not fake.lbs["main"].page and fake.serving("main") == [N1, N2] and fake.problems == []


# ------------------------------------------------------------------ 5 compensation order
async def test_a_failure_past_the_point_of_no_return_reverts_newest_first(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    client = time_skipping_env.client
    fake = window_fake()
    fake.fail("check_serving", N2, HEALTH_CHECK_FAILED, "/health answered 500")  # step 30
    async with running_worker(client, task_queue, [MajorMaintenanceWindowWorkflow], fake.activities()):
        cause = await failed(await start(client, task_queue, window_input()))
    assert cause.type == "ProcedureFailed"
    assert f"failed at '30 test: healthy, version {NEW}' on {N2}" in str(cause)
    assert (
        "Rolled back: revert by promoting the warm replica, old servers started again, maintenance page "
        "lifted, new server n2-v2-0-0, new server n1-v2-0-0, warm replica released."
    ) in str(cause)
    m = fake.mutations()
    attached = max(m.index(("lb_add_server", f"main/{n}")) for n in (N1, N2)) + 1
    expected: list[Call] = [
        # the revert: the new servers out and stopped, the replica promoted, the old servers
        # pointed at it, started and attached again, the page lifted
        ("lb_del_server", f"main/{N1}"),
        ("lb_del_server", f"main/{N2}"),
        ("stop_service", N1),
        ("stop_service", N2),
        ("db_promote_warm_replica", None),
        ("set_config_values", "n1"),
        ("start_service", "n1"),
        ("lb_add_server", "main/n1"),
        ("set_config_values", "n2"),
        ("start_service", "n2"),
        ("lb_add_server", "main/n2"),
        ("lb_set_maintenance", "main"),
        # the older compensations: old servers started (again), page lifted (again), the new
        # servers destroyed newest first; the promoted replica is kept
        ("start_service", "n1"),
        ("start_service", "n2"),
        ("lb_set_maintenance", "main"),
        ("provision_destroy", N2),
        ("provision_destroy", N1),
    ]
    assert m[attached:] == expected
    assert fake.warm == "promoted" and fake.schema == 2
    assert_old_site_serves(fake, database="warm")


async def test_a_failure_in_the_window_before_the_migration_restarts_the_old_servers(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    client = time_skipping_env.client
    fake = window_fake()
    fake.fail("db_wait_writes_stopped", None, DB_WRITES_CONTINUE, "writes go on")  # step 19
    async with running_worker(client, task_queue, [MajorMaintenanceWindowWorkflow], fake.activities()):
        cause = await failed(await start(client, task_queue, window_input()))
    assert cause.type == "ProcedureFailed" and "writes go on" in str(cause)
    assert (
        "Rolled back: old servers started again, maintenance page lifted, new server n2-v2-0-0, "
        "new server n1-v2-0-0, warm replica released." in str(cause)
    )
    m = fake.mutations()
    stopped = max(m.index(("stop_service", n)) for n in ("n1", "n2")) + 1
    assert m[stopped:] == [
        ("start_service", "n1"),
        ("start_service", "n2"),
        ("lb_set_maintenance", "main"),
        ("provision_destroy", N2),
        ("provision_destroy", N1),
        ("db_release_warm_replica", None),
    ]
    assert fake.schema == 1 and fake.warm == "released" and "db_apply_migration" not in [c for c, _ in m]
    assert_old_site_serves(fake, database="primary")
