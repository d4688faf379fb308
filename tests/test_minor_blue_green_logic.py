"""minor-blue-green's logic (seed 003) under Temporal's time-skipping test server, with the
same-name stand-in activities of tests/blue_green_fake_site.py (a site in memory).

Covered: the happy path in the runbook's order (snapshot, additive migration, clone and
test the new servers, attach them, drain and detach the old ones, test the site, gate
`terminate`, terminate); the gates' fail-safe defaults when nobody decides within the hour
(`drain-deadline` -> rollback, `restore-snapshot` -> keep, `terminate` -> keep), the
drain gate's wait / force, rollback at `terminate` with the snapshot restored; the failure
gate `failure:7@<new server>` (retry after the fix, rollback, timeout, abort); retried
transient errors counted per step; the compensations' order after a late failure.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from errors import DATABASE_ERROR, HEALTH_CHECK_FAILED, LOGIN_FAILED, SSH_UNREACHABLE
from inventory.model import Inventory, SecretRef
from tests.blue_green_fake_site import NEW, BlueGreenSite, Call, blue_green_site
from tests.gate_support import choose, pending
from tests.temporal_env import running_worker
from workflows.minor_blue_green import MinorBlueGreenInput, MinorBlueGreenResult, MinorBlueGreenWorkflow
from workflows.timeline import StepRecord

N1, N2 = "n1-v2-0-0", "n2-v2-0-0"
SETTINGS = {"web.config": {"feature.x": "on"}}
COMMAND = "apt-get install -y libfoo"
ALL_GATES = ("terminate", "drain-deadline", "restore-snapshot")


def minor_input(inv: Inventory, **changes: Any) -> MinorBlueGreenInput:
    fields: dict[str, Any] = {
        "settings": SETTINGS,
        "system_commands": (COMMAND,),
        "started_by": "starter",
        **changes,
    }
    return MinorBlueGreenInput(inventory=inv, package_path="/p.zip", **fields)


async def start(client: Client, task_queue: str, inp: MinorBlueGreenInput) -> WorkflowHandle[Any, Any]:
    return await client.start_workflow(
        MinorBlueGreenWorkflow.run, inp, id=f"wf-{task_queue}", task_queue=task_queue
    )


async def run(
    env: WorkflowEnvironment, task_queue: str, fake: BlueGreenSite, inp: MinorBlueGreenInput
) -> MinorBlueGreenResult:
    """The whole run, nobody deciding: every gate times out at once (time skipping)."""
    async with running_worker(env.client, task_queue, [MinorBlueGreenWorkflow], fake.activities()):
        result: MinorBlueGreenResult = await env.client.execute_workflow(
            MinorBlueGreenWorkflow.run, inp, id=f"wf-{task_queue}", task_queue=task_queue
        )
    return result


async def failed(handle: WorkflowHandle[Any, Any]) -> ApplicationError:
    with pytest.raises(WorkflowFailureError) as info:
        await handle.result()
    cause = info.value.cause
    assert isinstance(cause, ApplicationError)
    return cause


async def steps_of(handle: WorkflowHandle[Any, Any]) -> tuple[StepRecord, ...]:
    progress = await handle.query(MinorBlueGreenWorkflow.progress)
    return progress.steps


def seed_order(steps: tuple[StepRecord, ...]) -> list[str]:
    """The seed steps of the steps that ran, in order, repeats folded."""
    order: list[str] = []
    for s in steps:
        if s.seed_step and s.result == "ok" and s.seed_step not in order[-1:]:
            order.append(s.seed_step)
    return order


def names(steps: tuple[StepRecord, ...]) -> list[str]:
    return [s.name for s in steps]


def main_pool(fake: BlueGreenSite) -> dict[str, str]:
    return dict(fake.lbs["main"].members)


def assert_old_site_intact(fake: BlueGreenSite) -> None:
    """After a rollback: the old servers serve as before, every new server is gone."""
    assert main_pool(fake) == {"n1": "ready", "n2": "ready"} and fake.serving("main") == ["n1", "n2"]
    assert all(fake.servers[n].health_file and fake.servers[n].files == "1.0.0" for n in ("n1", "n2"))
    assert sorted(fake.servers) == ["n1", "n2"] and fake.array_enabled
    assert fake.problems == []


# ------------------------------------------------------------------ 1 the happy path
async def test_happy_path_replaces_the_old_servers_in_the_runbooks_order(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    client = time_skipping_env.client
    fake = BlueGreenSite(blue_green_site())
    async with running_worker(client, task_queue, [MinorBlueGreenWorkflow], fake.activities()):
        handle = await start(client, task_queue, minor_input(fake.inv))
        gate = await pending(handle, "terminate")
        # At the gate: the new servers serve alone, the old ones are detached but still there.
        assert fake.serving("main") == [N1, N2] and {"n1", "n2"} <= set(fake.servers)
        assert gate.choices == ("terminate", "keep", "rollback") and gate.on_timeout == "keep"
        await choose(handle, gate, "terminate")
        result: MinorBlueGreenResult = await handle.result()

    assert fake.mutations() == [
        ("db_backup", None),
        ("db_apply_migration", "2"),  # 1, 2
        ("provision_create", N1),
        ("run_node_command", N1),
        ("save_settings_copy", "n1"),  # 3, 4, 5
        ("deploy_package", N1),
        ("set_config_values", N1),  # 6
        ("provision_start", N1),
        ("start_service", N1),  # 7
        ("provision_create", N2),
        ("run_node_command", N2),
        ("set_config_values", N2),  # 8 (4, 6)
        ("provision_start", N2),
        ("start_service", N2),  # 9
        ("provision_array_disable", "web-array"),  # 10
        ("lb_add_server", f"main/{N1}"),
        ("lb_add_server", f"main/{N2}"),  # 11
        ("set_health_file", "n1"),
        ("set_health_file", "n2"),  # 12
        ("lb_del_server", "main/n1"),
        ("lb_del_server", "main/n2"),  # 14
        ("provision_array_enable", "web-array"),  # 16
        ("provision_destroy", "n1"),
        ("provision_destroy", "n2"),  # 18
    ]
    # The site ends upgraded: only the new servers, on the new code and settings, serve.
    assert sorted(fake.servers) == [N1, N2] and fake.destroyed == ["n1", "n2"]
    assert main_pool(fake) == {N1: "ready", N2: "ready"}
    for n in (N1, N2):
        s = fake.servers[n]
        assert (s.version, s.settings["web.config"], s.commands) == (NEW, {"feature.x": "on"}, [COMMAND])
    assert fake.schema == 2 and fake.restored == [] and fake.array_enabled and fake.problems == []
    # The result and the timeline.
    assert result.old_servers == ("n1", "n2") and result.terminated == ("n1", "n2")
    assert [n.name for n in result.new_servers] == [N1, N2] and result.version == NEW
    assert result.db_snapshot in fake.snapshots and fake.snapshots[result.db_snapshot] == 1
    assert len(result.settings_copy) == 1 and result.settings_copy[0].startswith("/backups/")
    assert not result.forced_detach and not result.dry_run
    assert seed_order(result.steps) == [
        "P1",
        "P2",
        "P4",
        "1",
        "2",
        "3",
        "4",
        "5",
        "6",
        "7",
        "8",
        "4",
        "6",
        "9",
        "10",
        "11",
        "12",
        "13",
        "14",
        "16",
        "17",
        "18",
    ]
    assert all(s.result in ("ok", "skipped") and s.retries == 0 for s in result.steps)


async def test_secret_settings_travel_as_references_and_a_secret_key_given_as_a_value_is_refused(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """Issue 17.5: a key the inventory marks secret is set only from a reference; given as a
    value it is refused in preflight (the value not repeated), before anything changes."""
    client = time_skipping_env.client
    site = blue_green_site()
    inv = dataclasses.replace(
        site, application=dataclasses.replace(site.application, secret_keys=("web.config:smtp.password",))
    )
    fake = BlueGreenSite(inv)
    plain = {"web.config": {"feature.x": "on", "smtp.password": "hunter2-in-the-clear"}}
    async with running_worker(client, task_queue, [MinorBlueGreenWorkflow], fake.activities()):
        handle = await start(client, task_queue, minor_input(inv, settings=plain))
        cause = await failed(handle)
    assert cause.type == "PreflightFailed" and "web.config:smtp.password is a secret" in cause.message
    assert "hunter2" not in cause.message and fake.mutations() == []

    fake = BlueGreenSite(inv)
    secret = {"web.config": {"smtp.password": SecretRef(env="SMTP_PASSWORD")}}
    result = await run(time_skipping_env, f"{task_queue}-2", fake, minor_input(inv, secret_settings=secret))
    for n in (N1, N2):
        assert fake.servers[n].settings["web.config"] == {
            "feature.x": "on",
            "smtp.password": "<secret SMTP_PASSWORD>",
        }
    assert "6 set web.config: feature.x, smtp.password" in names(result.steps)


# ------------------------------------------------------------------ 2 gates nobody decides
async def test_drain_deadline_nobody_decides_rolls_back_and_keeps_the_snapshot(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    client = time_skipping_env.client
    fake = BlueGreenSite(blue_green_site(gates=ALL_GATES))
    fake.servers["n2"].sessions = 2  # a session on n2 that never ends
    async with running_worker(client, task_queue, [MinorBlueGreenWorkflow], fake.activities()):
        handle = await start(client, task_queue, minor_input(fake.inv, gate_timeout_s=3600.0))
        cause = await failed(handle)  # nobody decides: the hours pass at once
        steps = await steps_of(handle)
    assert cause.type == "ProcedureFailed" and "rollback chosen at gate drain-deadline" in str(cause)
    # The fail-safe defaults: drain-deadline -> rollback, then restore-snapshot -> keep.
    timed_out = {s.name: s for s in steps if "timed out" in s.name}
    assert list(timed_out) == [
        "gate drain-deadline: timed out, rollback",
        "gate restore-snapshot: timed out, keep",
    ]
    drain_failed = next(s for s in steps if s.seed_step == "13" and s.result == "failed")
    assert drain_failed.node == "n2" and drain_failed.ended is not None
    waited = timed_out["gate drain-deadline: timed out, rollback"].started - drain_failed.ended
    assert waited.total_seconds() >= 3600  # an hour on the workflow clock, skipped
    assert_old_site_intact(fake)
    assert fake.servers["n2"].sessions == 2  # never cut
    assert fake.destroyed == [N2, N1] and fake.schema == 2 and fake.restored == []


async def test_terminate_nobody_decides_keeps_the_old_servers(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = BlueGreenSite(blue_green_site())
    result = await run(time_skipping_env, task_queue, fake, minor_input(fake.inv, gate_timeout_s=3600.0))
    assert result.terminated == () and fake.destroyed == []
    # Kept: detached, still running; the new servers serve.
    assert main_pool(fake) == {N1: "ready", N2: "ready"}
    assert all(fake.servers[n].running for n in ("n1", "n2"))
    assert "provision_destroy" not in [c for c, _ in fake.calls]
    assert "gate terminate: timed out, keep" in names(result.steps)
    kept = next(s for s in result.steps if s.seed_step == "18")
    assert kept.result == "skipped" and "kept at the gate terminate" in (kept.detail or "")
    assert fake.problems == []


@pytest.mark.parametrize("choice", ["wait", "force"])
async def test_drain_deadline_wait_or_force(
    time_skipping_env: WorkflowEnvironment, task_queue: str, choice: str
) -> None:
    client = time_skipping_env.client
    fake = BlueGreenSite(blue_green_site(gates=ALL_GATES))
    fake.servers["n2"].sessions = 1
    async with running_worker(client, task_queue, [MinorBlueGreenWorkflow], fake.activities()):
        handle = await start(client, task_queue, minor_input(fake.inv))
        gate = await pending(handle, "drain-deadline")
        assert gate.choices == ("wait", "force", "rollback") and "1 session(s) still open" in gate.guards
        if choice == "wait":
            fake.servers["n2"].sessions = 0  # the user logged off meanwhile
        await choose(handle, gate, choice)
        gate = await pending(handle, "terminate")
        await choose(handle, gate, "terminate")
        result: MinorBlueGreenResult = await handle.result()
    assert result.forced_detach is (choice == "force") and result.terminated == ("n1", "n2")
    drains = [s.result for s in result.steps if s.seed_step == "13" and s.node == "n2"]
    assert drains == (["failed", "ok"] if choice == "wait" else ["failed"])
    assert fake.servers.get("n2") is None and main_pool(fake) == {N1: "ready", N2: "ready"}
    assert fake.problems == []


async def test_rollback_at_terminate_reattaches_the_old_servers_and_restores_the_snapshot(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    client = time_skipping_env.client
    fake = BlueGreenSite(blue_green_site(gates=ALL_GATES))
    async with running_worker(client, task_queue, [MinorBlueGreenWorkflow], fake.activities()):
        handle = await start(client, task_queue, minor_input(fake.inv))
        await choose(handle, await pending(handle, "terminate"), "rollback")
        gate = await pending(handle, "restore-snapshot")
        assert gate.choices == ("keep", "restore") and gate.on_timeout == "keep"
        # The gate says what a restore would undo (issue 17.7).
        assert "a restore undoes every write since the snapshot to: items, schema_version" in gate.guards
        await choose(handle, gate, "restore")
        cause = await failed(handle)
    assert cause.type == "ProcedureFailed" and "rollback chosen at gate terminate by ops1" in str(cause)
    assert_old_site_intact(fake)
    assert ("lb_add_server", "main/n1") in fake.calls and ("lb_add_server", "main/n2") in fake.calls
    [snapshot] = fake.snapshots
    assert fake.restored == [snapshot] and fake.schema == 1


# ------------------------------------------------------------------ 3 failure gates
FAILURE_GATE = f"failure:7@{N1}"


def failing_test_of_n1() -> BlueGreenSite:
    fake = BlueGreenSite(blue_green_site())
    fake.fail("wait_healthy", N1, HEALTH_CHECK_FAILED, "/health answered 500")
    return fake


async def test_failure_gate_retry_after_the_fix_completes(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    client = time_skipping_env.client
    fake = failing_test_of_n1()
    async with running_worker(client, task_queue, [MinorBlueGreenWorkflow], fake.activities()):
        handle = await start(client, task_queue, minor_input(fake.inv, on_failure="ask"))
        gate = await pending(handle, FAILURE_GATE)
        assert gate.choices == ("retry", "rollback", "abort") and "/health answered 500" in gate.guards
        fake.fix("wait_healthy", N1)
        await choose(handle, gate, "retry")
        result: MinorBlueGreenResult = await handle.result()  # terminate: nobody, keep
    tests = [(s.result, s.retries) for s in result.steps if s.seed_step == "7" and s.name.startswith("test")]
    assert tests == [("failed", 0), ("ok", 1)]
    assert f"gate {FAILURE_GATE}: retry chosen by ops1" in names(result.steps)
    assert fake.serving("main") == [N1, N2] and fake.servers[N1].version == NEW and fake.problems == []


@pytest.mark.parametrize("how", ["rollback", "timeout"])
async def test_failure_gate_rollback_or_nobody_in_time_undoes_the_new_server(
    time_skipping_env: WorkflowEnvironment, task_queue: str, how: str
) -> None:
    client = time_skipping_env.client
    fake = failing_test_of_n1()
    inp = minor_input(fake.inv, on_failure="ask", failure_gate_timeout_s=3600.0)
    async with running_worker(client, task_queue, [MinorBlueGreenWorkflow], fake.activities()):
        handle = await start(client, task_queue, inp)
        if how == "rollback":
            await choose(handle, await pending(handle, FAILURE_GATE), "rollback")
        cause = await failed(handle)  # "timeout": the hour passes at once
        steps = await steps_of(handle)
    assert cause.type == "ProcedureFailed" and "Rolled back: new server n1-v2-0-0" in str(cause)
    expected = {
        "rollback": f"gate {FAILURE_GATE}: rollback chosen by ops1",
        "timeout": f"gate {FAILURE_GATE}: timed out, rollback",
    }[how]
    assert expected in names(steps)
    assert_old_site_intact(fake)
    assert fake.destroyed == [N1] and ("provision_create", N2) not in fake.calls
    # The old servers were never touched; the additive migration stays (nobody may restore).
    assert not [
        c
        for c in fake.mutations()
        if c[1] in ("n1", "n2", "main/n1", "main/n2") and c[0] != "save_settings_copy"
    ]
    assert fake.schema == 2 and "keep the database as migrated" in names(steps)


async def test_failure_gate_abort_leaves_everything_in_place(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    client = time_skipping_env.client
    fake = failing_test_of_n1()
    async with running_worker(client, task_queue, [MinorBlueGreenWorkflow], fake.activities()):
        handle = await start(client, task_queue, minor_input(fake.inv, on_failure="ask"))
        await choose(handle, await pending(handle, FAILURE_GATE), "abort")
        cause = await failed(handle)
    text = str(cause)
    assert cause.type == "ProcedureAborted"
    assert f"aborted by ops1 at 'test: healthy, version {NEW}, log-on on {N1}'" in text
    assert (
        "changes not undone (newest first): new server n1-v2-0-0, database snapshot (restored only if "
        "chosen)" in text
    )
    assert "kept: database snapshot: /backups/" in text
    assert "kept: settings copy web.config: /backups/" in text
    # Nothing undone: the new server stays, the old ones serve, the schema stays migrated.
    assert N1 in fake.servers and fake.destroyed == [] and fake.schema == 2
    assert main_pool(fake) == {"n1": "ready", "n2": "ready"} and fake.problems == []


# ------------------------------------------------------------------ 4 retries
async def test_transient_errors_are_retried_and_counted_per_step(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = BlueGreenSite(blue_green_site())
    fake.fail("db_backup", None, DATABASE_ERROR, "deadlock found", retryable=True, times=1)
    fake.fail("run_node_command", N2, SSH_UNREACHABLE, "connection reset", retryable=True, times=1)
    result = await run(time_skipping_env, task_queue, fake, minor_input(fake.inv))
    retried = {(s.seed_step, s.node): s for s in result.steps if s.retries}
    assert set(retried) == {("1", None), ("4", N2)}
    assert all(s.result == "ok" and s.retries == 1 for s in retried.values())
    assert "deadlock found" in (retried[("1", None)].detail or "")
    assert [c for c in fake.calls if c[0] in ("db_backup", "run_node_command")] == [
        ("db_backup", None),
        ("db_backup", None),
        ("run_node_command", N1),
        ("run_node_command", N2),
        ("run_node_command", N2),
    ]
    assert fake.serving("main") == [N1, N2] and fake.problems == []


# ------------------------------------------------------------------ 5 compensation order
async def test_a_late_failure_runs_the_compensations_newest_first(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = BlueGreenSite(blue_green_site())
    fake.fail("check_login", "main", LOGIN_FAILED, "log-on refused")  # step 17, through the balancer
    with pytest.raises(WorkflowFailureError) as info:
        await run(time_skipping_env, task_queue, fake, minor_input(fake.inv))
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "ProcedureFailed"
    assert "failed at '17 test the site through the load balancer'" in str(cause)
    assert (
        "Rolled back: old server n2 back in main, old server n1 back in main, server array web-array "
        "enabled again, new server n2-v2-0-0, new server n1-v2-0-0, database snapshot (restored only "
        "if chosen)."
    ) in str(cause)
    mutations = fake.mutations()
    last_change = mutations.index(("provision_array_enable", "web-array")) + 1
    expected: list[Call] = [
        ("lb_add_server", "main/n2"),
        ("set_health_file", "n2"),
        ("lb_set_state", "main/n2"),
        ("lb_add_server", "main/n1"),
        ("set_health_file", "n1"),
        ("lb_set_state", "main/n1"),
        ("provision_array_enable", "web-array"),
        ("lb_set_state", f"main/{N2}"),
        ("lb_del_server", f"main/{N2}"),
        ("provision_destroy", N2),
        ("lb_set_state", f"main/{N1}"),
        ("lb_del_server", f"main/{N1}"),
        ("provision_destroy", N1),
    ]
    assert mutations[last_change:] == expected
    assert_old_site_intact(fake)
    assert fake.schema == 2 and fake.restored == []
