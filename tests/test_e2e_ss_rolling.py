"""ss-rolling (Secret Server Manual Rolling Upgrade) end to end on the real 4-node lab and the
real Temporal dev server: probe traffic, gates decided through the CLI and the real
`temporal` binary, the audit trail, a failed production SQL script rolled back, Version
Guard, and a worker killed during task seven."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import zipfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowFailureError, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

import activities.app_admin as app_admin
from inventory.load import load_inventory
from inventory.model import Inventory
from lab import haproxy as lab_haproxy
from lab import mariadb as lab_mariadb
from lab.config import LabConfig
from tests.e2e_support import (
    app_manifests,
    assert_no_write_lost,
    assert_untouched,
    keep_history,
    kill_worker_during,
    probe,
    run_command,
    served_versions,
    snapshot,
    ssh_commands,
    start_worker_process,
    zerodown,
)
from tests.signing_support import fingerprint_of, key_args, signal_input, signature, signed
from tests.ss_support import TEMPORAL, checksums, enforce_version_match, wait_gate, wf_id
from tests.temporal_env import temporal_address
from workflows.gates import Decision, GateRecord
from workflows.registry import ALL_WORKFLOWS
from workflows.ss_rolling import SsRollingInput, SsRollingResult, SsRollingWorkflow
from workflows.timeline import Progress

APPROVERS = {"staging-test": ("alice", "bob"), "upgrade-successful": ("alice", "bob"), "failure": ("bob",)}


def ss_inventory(lab: LabConfig) -> Inventory:
    inv = load_inventory(lab.site_yaml)
    return dataclasses.replace(inv, approvers=APPROVERS)


async def audit_actions(inv: Inventory) -> list[str]:
    assert inv.application.admin is not None
    events = await app_admin.list_audit(inv.nodes[0].url, inv.application.admin)
    return [e.action for e in events if e.audit_type == "ManualUpgrade"]


@pytest.fixture
async def ss_lab(fresh_lab: LabConfig) -> Any:
    inv = ss_inventory(fresh_lab)
    await enforce_version_match(inv, True)
    yield fresh_lab
    await enforce_version_match(inv, False)


async def test_ss_rolling_on_four_nodes_with_zero_failed_requests(
    ss_lab: LabConfig, client: Client, lab_worker: str, tmp_path: Path, temporal_env: WorkflowEnvironment
) -> None:
    lab = ss_lab
    inv = ss_inventory(lab)
    address = temporal_address(temporal_env)
    protected = {i: (lab.node_dir(i) / "app" / "encryption.config").read_bytes() for i in lab.node_indexes}

    with probe(lab, tmp_path) as run:
        handle = await client.start_workflow(
            SsRollingWorkflow.run,
            SsRollingInput(inventory=inv, package_path=str(lab.package(2)), started_by="carol"),
            id=wf_id("happy"),
            task_queue=lab_worker,
            execution_timeout=timedelta(minutes=8),
        )
        gate = await wait_gate(handle, "staging-test")
        assert gate.approvers == ("alice", "bob")
        # Wrong calls are refused to the caller at once: unlisted, the starter, a stale plan,
        # a gate that is not waiting.
        for d in (
            Decision(gate="staging-test", by="mallory", plan_hash=gate.plan_hash),
            Decision(gate="staging-test", by="carol", plan_hash=gate.plan_hash),
            Decision(gate="staging-test", by="alice", plan_hash="0" * 64),
            Decision(gate="upgrade-successful", by="alice", plan_hash=gate.plan_hash),
        ):
            with pytest.raises(WorkflowUpdateFailedError):
                await handle.execute_update("approve", d, result_type=GateRecord)
        # The staging copy ran the new release on a restored database, in maintenance mode.
        progress = await handle.query("progress", result_type=Progress)
        done = {s.seed_step for s in progress.steps if s.result == "ok"}
        assert {"5.1", "5.2", "5.3", "5.4", "5.5", "5.6", "5.7", "5.8", "5.9", "5.10"} <= done
        # staging-test through the zerodown CLI ...
        code, out = await zerodown(
            "approve",
            handle.id,
            "--gate",
            "staging-test",
            "--by",
            "alice",
            "--plan-hash",
            gate.plan_hash,
            "--comment",
            "staging ok",
            *key_args("alice"),
            "--address",
            address,
        )
        assert code == 0 and "approved by alice" in out, out
        # ... upgrade-successful through the plain temporal CLI (the update form).
        gate = await wait_gate(handle, "upgrade-successful")
        assert await served_versions(lab) == {f"node{i}": "2.0.0" for i in lab.node_indexes}
        code, out = await run_command(
            TEMPORAL,
            "workflow",
            "update",
            "execute",
            "--address",
            address,
            "--workflow-id",
            handle.id,
            "--name",
            "approve",
            "--input",
            # Signed by hand, as README shows (ssh-keygen -Y sign over the decision message).
            json.dumps(
                {
                    "gate": "upgrade-successful",
                    "by": "bob",
                    "plan_hash": gate.plan_hash,
                    "signature": signature(handle.id, gate, "bob", "approve"),
                }
            ),
        )
        assert code == 0, out
        result: SsRollingResult = await handle.result()
        await keep_history(handle)  # signed decisions (update by the CLI and by hand) replay

    # Zero downtime: no failed request; changes refused in maintenance mode counted apart.
    assert run.summary["failed"] == 0, run.failures()[:5]
    assert_no_write_lost(lab, run)
    assert run.summary["refused"] > 0 and run.summary["total"] >= 500
    assert await served_versions(lab) == {f"node{i}": "2.0.0" for i in lab.node_indexes}
    assert lab_mariadb.schema_version(lab) == 2
    # Group B (second half) was upgraded first, then group A.
    assert result.group_a == ("node1", "node2") and result.group_b == ("node3", "node4")
    deploys = [s.node for s in result.steps if s.name.endswith("extract and copy the upgrade zip")]
    assert deploys == ["node3", "node4", "node1", "node2"]
    # The audit trail, in the seed's order.
    assert await audit_actions(inv) == [
        "VERIFY DELTAS",
        "GENERATE UPGRADE ZIP",
        "GENERATE DB SCRIPT",
        "STAGING TEST",
        "STARTED",
        "COMPLETED",
    ]
    # The upgrade zip held only the changed files (not the unchanged app code).
    with zipfile.ZipFile(result.upgrade_zip) as z, zipfile.ZipFile(lab.package(2)) as full:
        assert "release.json" in z.namelist() and len(z.namelist()) < len(full.namelist())
        assert "app.py" not in z.namelist()
    # encryption.config byte-identical everywhere, customisations kept.
    for i in lab.node_indexes:
        assert (lab.node_dir(i) / "app" / "encryption.config").read_bytes() == protected[i]
        web = (lab.node_dir(i) / "app" / "web.config").read_text()
        assert f"custom.banner = Welcome to node{i}" in web and f"http.port = {lab.app_port(i)}" in web
    # Upgrade mode is off again and every node back in the pool.
    state = await app_admin.get_state(inv.nodes[0].url, inv.application.admin)  # type: ignore[arg-type]
    assert not state.maintenance_mode and not state.ignore_version_mismatch and not state.mismatch
    states = lab_haproxy.server_states(lab)
    assert all(states[("app", f"node{i}")] == "UP" for i in lab.node_indexes)
    # Gate decisions recorded, the history replays.
    decided = [(s.name, s.detail) for s in result.steps if s.name.startswith("gate ")]
    alice, bob = fingerprint_of("alice"), fingerprint_of("bob")
    assert (
        "gate staging-test: approved by alice",
        f"via update, signed by key {alice}: staging ok",
    ) in decided
    assert ("gate upgrade-successful: approved by bob", f"via update, signed by key {bob}") in decided
    await Replayer(workflows=ALL_WORKFLOWS).replay_workflow(await handle.fetch_history())


async def test_failed_production_script_rolls_back_to_the_snapshot(
    ss_lab: LabConfig, client: Client, lab_worker: str, temporal_env: WorkflowEnvironment
) -> None:
    lab = ss_lab
    inv = ss_inventory(lab)
    lb_before = (await snapshot(lab)).servers
    db_before = await checksums(inv)
    folders_before = app_manifests(lab)
    handle = await client.start_workflow(
        SsRollingWorkflow.run,
        SsRollingInput(inventory=inv, package_path=str(lab.package(2)), started_by="carol"),
        id=wf_id("sqlfail"),
        task_queue=lab_worker,
        execution_timeout=timedelta(minutes=8),
    )
    try:
        gate = await wait_gate(handle, "staging-test")
        # The staging test passed on a copy; production's script will fail.
        lab_mariadb.inject_migration_failure(lab, "labapp", True)
        code, out = await zerodown(
            "approve",
            handle.id,
            "--gate",
            "staging-test",
            "--by",
            "bob",
            "--plan-hash",
            gate.plan_hash,
            *key_args("bob"),
            "--address",
            temporal_address(temporal_env),
        )
        assert code == 0, out
        failure = await wait_gate(handle, "failure:7.7")
        assert failure.choices == ("retry", "rollback", "abort") and failure.approvers == ("bob",)
        code, out = await zerodown(
            "resolve",
            handle.id,
            "--gate",
            "failure:7.7",
            "--choice",
            "rollback",
            "--by",
            "bob",
            "--plan-hash",
            failure.plan_hash,
            *key_args("bob"),
            "--address",
            temporal_address(temporal_env),
        )
        assert code == 0 and "rollback chosen by bob" in out, out
        with pytest.raises(WorkflowFailureError) as info:
            await handle.result()
    finally:
        lab_mariadb.inject_migration_failure(lab, "labapp", False)
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "ProcedureFailed"
    assert "7.7 run the SQL script on the production database" in str(cause)
    # Everything as before: LB states, every table, every file of every app folder.
    assert (await snapshot(lab)).servers == lb_before
    assert await checksums(inv) == db_before
    assert app_manifests(lab) == folders_before
    assert await served_versions(lab) == {f"node{i}": "1.0.0" for i in lab.node_indexes}
    actions = await audit_actions(inv)
    assert actions[-1] == "CANCEL" and "COMPLETED" not in actions and "STARTED" in actions


async def test_version_guard_refuses_before_any_change(
    ss_lab: LabConfig, client: Client, lab_worker: str
) -> None:
    lab = ss_lab
    inv = ss_inventory(lab)
    before = await snapshot(lab)
    with pytest.raises(WorkflowFailureError) as info:
        await client.execute_workflow(
            SsRollingWorkflow.run,
            SsRollingInput(inventory=inv, package_path=str(lab.package(3))),
            id=wf_id("guard"),
            task_queue=lab_worker,
            execution_timeout=timedelta(minutes=2),
        )
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "PreflightFailed"
    text = str(cause)
    assert "nothing was changed" in text and "install 2.0.0 first, then 3.0.0" in text
    assert all(f"node{i}: UpgradePathImpossible: node{i} runs 1.0.0" in text for i in lab.node_indexes), text
    assert "UpgradePathImpossible" in cause.details
    await assert_untouched(lab, before)
    assert await audit_actions(inv) == []


async def test_worker_killed_during_task_seven_completes_without_upgrading_a_node_twice(
    ss_lab: LabConfig, temporal_env: WorkflowEnvironment, task_queue: str, tmp_path: Path
) -> None:
    lab = ss_lab
    client = temporal_env.client
    inv = ss_inventory(lab)
    commands_before = {i: len(ssh_commands(lab, i)) for i in lab.node_indexes}
    worker_log = tmp_path / "worker.log"
    first = start_worker_process(temporal_address(temporal_env), task_queue, worker_log)
    second: subprocess.Popen[bytes] | None = None
    try:
        # Long-lived requests (6 s, one in ten) so group A's drain has to wait for them.
        with probe(lab, tmp_path, slow_every=10, slow_ms=6000) as run:
            handle = await client.start_workflow(
                SsRollingWorkflow.run,
                SsRollingInput(inventory=inv, package_path=str(lab.package(2)), started_by="carol"),
                id=wf_id("kill"),
                task_queue=task_queue,
                execution_timeout=timedelta(minutes=8),
            )
            gate = await wait_gate(handle, "staging-test")
            await handle.execute_update(
                "approve",
                signed(handle.id, gate, Decision(gate="staging-test", by="alice", plan_hash=gate.plan_hash)),
                result_type=GateRecord,
            )
            # Group A drains while group B (upgraded) serves: a heartbeating wait.
            await kill_worker_during(handle, first, "7.6 wait for zero sessions", timeout_s=180)
            second = start_worker_process(temporal_address(temporal_env), task_queue, worker_log)
            gate = await wait_gate(handle, "upgrade-successful")
            # The signal form (what the Web UI sends), through the real temporal binary.
            code, out = await run_command(
                TEMPORAL,
                "workflow",
                "signal",
                "--address",
                temporal_address(temporal_env),
                "--workflow-id",
                handle.id,
                "--name",
                "decide",
                "--input",
                json.dumps(
                    signal_input(
                        handle.id,
                        gate,
                        gate="upgrade-successful",
                        by="bob",
                        plan_hash=gate.plan_hash,
                        approve=True,
                    )
                ),
            )
            assert code == 0, out
            result: SsRollingResult = await handle.result()
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)

    assert await served_versions(lab) == {f"node{i}": "2.0.0" for i in lab.node_indexes}
    assert run.summary["failed"] == 0, run.failures()[:5]
    assert_no_write_lost(lab, run)
    # No node upgraded twice: each stopped and deployed exactly once.
    for i in lab.node_indexes:
        new = ssh_commands(lab, i)[commands_before[i] :]
        assert sum("ctl stop" in c for c in new) == 1, (i, new)
    history = await handle.fetch_history()
    scheduled = [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]
    assert scheduled.count("deploy_package") == lab.nodes + 1  # + staging
    assert (
        "gate upgrade-successful: approved by bob",
        f"via signal, signed by key {fingerprint_of('bob')}",
    ) in [(s.name, s.detail) for s in result.steps]
    await Replayer(workflows=ALL_WORKFLOWS).replay_workflow(history)


async def test_a_rollback_under_writes_keeps_every_acknowledged_write_and_fails_no_request(
    ss_lab: LabConfig, client: Client, lab_worker: str, tmp_path: Path
) -> None:
    """Issue 17.7: the production script fails at 7.7 and is rolled back while the probe
    writes. Every write the site answered 201 is still there after the restore (6.6 waited
    until every node enforced maintenance mode), and no request failed: the new code left the
    pool before the database went back, and the backup was swapped in (loaded into the
    scratch database, one RENAME TABLE), so no reader saw a table missing."""
    lab = ss_lab
    inv = ss_inventory(lab)
    assert inv.databases[0].scratch_database  # the restore goes through it
    with probe(lab, tmp_path) as run:
        handle = await client.start_workflow(
            SsRollingWorkflow.run,
            SsRollingInput(
                inventory=inv, package_path=str(lab.package(2)), started_by="carol", on_failure="rollback"
            ),
            id=wf_id("sqlfail-writes"),
            task_queue=lab_worker,
            execution_timeout=timedelta(minutes=8),
        )
        try:
            gate = await wait_gate(handle, "staging-test")
            lab_mariadb.inject_migration_failure(lab, "labapp", True)
            await handle.execute_update(
                "approve",
                signed(handle.id, gate, Decision(gate="staging-test", by="bob", plan_hash=gate.plan_hash)),
                result_type=GateRecord,
            )
            with pytest.raises(WorkflowFailureError):
                await handle.result()
        finally:
            lab_mariadb.inject_migration_failure(lab, "labapp", False)
    assert await served_versions(lab) == {f"node{i}": "1.0.0" for i in lab.node_indexes}
    assert run.summary["failed"] == 0, run.failures()[:5]
    assert_no_write_lost(lab, run)
    progress = await handle.query("progress", result_type=Progress)
    names = [s.name for s in progress.steps]
    restore = names.index("rollback: restore the database (audit trail kept)")
    out = [i for i, s in enumerate(progress.steps) if s.name.startswith("rollback: new code out of the pool")]
    assert out and max(out) < restore
