"""rolling-deploy end to end on the real lab (HAProxy, MariaDB, SSH nodes) and the real
Temporal dev server, with the traffic probe running as a separate client process."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import Client, WorkflowFailureError, WorkflowHistory
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from inventory.load import load_inventory
from lab import haproxy as lab_haproxy
from lab import mariadb as lab_mariadb
from lab.config import LabConfig
from lab.packages import package_files, zip_bytes
from tests.e2e_support import (
    app_manifests,
    assert_no_write_lost,
    keep_history,
    kill_worker_during,
    probe,
    served_versions,
    ssh_commands,
    start_worker_process,
    worker_processes,
    zerodown,
)
from tests.temporal_env import temporal_address
from workflows.registry import ALL_WORKFLOWS
from workflows.rolling_deploy import RollingDeployInput, RollingDeployResult, RollingDeployWorkflow
from workflows.timeline import Progress

PROTECTED = ("encryption.config", "database.config")


def wf_id(name: str) -> str:
    return f"e2e-{name}-{uuid.uuid4().hex[:8]}"


def protected_bytes(lab: LabConfig) -> dict[tuple[int, str], bytes]:
    return {(i, f): (lab.node_dir(i) / "app" / f).read_bytes() for i in lab.node_indexes for f in PROTECTED}


def _history_bytes(history: WorkflowHistory) -> bytes:
    """The serialized history: payloads (json/plain) are stored verbatim in it."""
    return b"".join(e.SerializeToString() for e in history.events)


async def test_rolling_deploy_v1_to_v2_with_zero_failed_requests(
    fresh_lab: LabConfig, client: Client, lab_worker: str, tmp_path: Path, temporal_env: WorkflowEnvironment
) -> None:
    lab = fresh_lab
    inv = load_inventory(lab.site_yaml)
    protected_before = protected_bytes(lab)

    with probe(lab, tmp_path) as run:
        handle = await client.start_workflow(
            RollingDeployWorkflow.run,
            RollingDeployInput(inventory=inv, package_path=str(lab.package(2))),
            id=wf_id("happy"),
            task_queue=lab_worker,
            execution_timeout=timedelta(minutes=5),
        )
        result: RollingDeployResult = await handle.result()

    # Zero downtime, measured: every request of the probe succeeded, over the whole run.
    assert run.summary["failed"] == 0, run.failures()[:5]
    assert_no_write_lost(lab, run)
    assert run.summary["total"] >= 300
    assert set(run.summary["by_node"]) == {lab.node_name(i) for i in lab.node_indexes}
    # Every node serves v2; the schema was migrated before the first node.
    assert await served_versions(lab) == {lab.node_name(i): "2.0.0" for i in lab.node_indexes}
    assert lab_mariadb.schema_version(lab) == 2
    assert result.previous_versions == {lab.node_name(i): "1.0.0" for i in lab.node_indexes}
    # Protected files are byte-identical; per-node customisations survived on top of the
    # new defaults (a new key, a changed default).
    assert protected_bytes(lab) == protected_before
    for i in lab.node_indexes:
        web = (lab.node_dir(i) / "app" / "web.config").read_text()
        assert f"http.port = {lab.app_port(i)}" in web
        assert f"node.name = node{i}" in web
        assert f"custom.banner = Welcome to node{i}" in web
        assert "feature.notes = on" in web and "greeting = Welcome to labapp 2" in web
    # Back in the pool, all of them.
    states = lab_haproxy.server_states(lab)
    assert [states[("app", f"node{i}")] for i in lab.node_indexes] == ["UP"] * lab.nodes
    # Every node went through the runbook in order, once.
    for node in (lab.node_name(i) for i in lab.node_indexes):
        assert [s.seed_step for s in result.steps if s.node == node] == [
            "N1",
            "N2",
            "N2",
            "N3",
            "N4",
            "N5",
            "N6",
            "N7",
            "N8",
            "N9",
        ]
    history = await handle.fetch_history()
    # No secret value anywhere in the history: inputs, activity arguments and results.
    payloads = _history_bytes(history)
    for secret in (lab.db_password_file, lab.admin_password_file, lab.client_key):
        value = secret.read_text().strip()
        assert value and value.encode() not in payloads, f"{secret.name} leaked into the history"
    assert str(lab.db_password_file).encode() in payloads  # the reference is there instead
    # The history replays on the current code (determinism), also through the CLI.
    await Replayer(workflows=ALL_WORKFLOWS).replay_workflow(history)
    code, out = await zerodown("replay", handle.id, "--address", temporal_address(temporal_env))
    assert code == 0 and "deterministic" in out, out
    # What the Web UI shows (current details) and `zerodown status` say the same thing.
    meta = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    assert "**rolling-deploy**: done" in meta.current_details
    names = ", ".join(lab.node_name(i) for i in lab.node_indexes)
    assert f"nodes done: {lab.nodes}/{lab.nodes} ({names})" in meta.current_details
    code, out = await zerodown("status", handle.id, "--address", temporal_address(temporal_env))
    assert code == 0 and "COMPLETED" in out and "N9 wait UP on main" in out, out


async def test_failed_health_check_on_node2_rolls_back_to_v1(
    fresh_lab: LabConfig, client: Client, lab_worker: str, tmp_path: Path
) -> None:
    lab = fresh_lab
    inv = load_inventory(lab.site_yaml)
    inv = dataclasses.replace(inv, rollout=dataclasses.replace(inv.rollout, health_timeout_s=6.0))
    folders_before = app_manifests(lab)
    node3_commands_before = len(ssh_commands(lab, 3))
    inject = lab.node_dir(2) / "inject" / "fail_health_version"
    inject.write_text("2.0.0\n")
    try:
        with probe(lab, tmp_path) as run:
            with pytest.raises(WorkflowFailureError) as info:
                await client.execute_workflow(
                    RollingDeployWorkflow.run,
                    RollingDeployInput(inventory=inv, package_path=str(lab.package(2))),
                    id=wf_id("fail"),
                    task_queue=lab_worker,
                    execution_timeout=timedelta(minutes=5),
                )
    finally:
        inject.unlink()

    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "ProcedureFailed"
    message = str(cause)
    assert "failed at 'N7 wait healthy, check version' on node2" in message
    assert "injected failure" in message
    assert "Rolled back: node node2, node node1, database migrations" in message
    # Node 2 (and node 1, already upgraded) are back on v1, in the pool, file for file.
    assert await served_versions(lab) == {lab.node_name(i): "1.0.0" for i in lab.node_indexes}
    assert app_manifests(lab) == folders_before
    states = lab_haproxy.server_states(lab)
    assert [states[("app", f"node{i}")] for i in lab.node_indexes] == ["UP"] * lab.nodes
    assert lab_mariadb.schema_version(lab) == 1
    # Node 3 was never touched; and nobody noticed any of it.
    node3_commands = ssh_commands(lab, 3)[node3_commands_before:]
    assert not [c for c in node3_commands if "ctl stop" in c or "ctl start" in c], node3_commands
    assert run.summary["failed"] == 0, run.failures()[:5]
    assert_no_write_lost(lab, run)


async def test_worker_killed_during_drain_wait_resumes_on_a_new_worker(
    fresh_lab: LabConfig, temporal_env: WorkflowEnvironment, task_queue: str, tmp_path: Path
) -> None:
    lab = fresh_lab
    client = temporal_env.client
    inv = load_inventory(lab.site_yaml)
    commands_before = {i: len(ssh_commands(lab, i)) for i in lab.node_indexes}
    worker_log = tmp_path / "worker.log"
    first = start_worker_process(temporal_address(temporal_env), task_queue, worker_log)
    second: subprocess.Popen[bytes] | None = None
    try:
        # Long-lived requests (6 s, one in ten: ~20 open per node) so every drain must wait.
        with probe(lab, tmp_path, slow_every=10, slow_ms=6000) as run:
            handle = await client.start_workflow(
                RollingDeployWorkflow.run,
                RollingDeployInput(inventory=inv, package_path=str(lab.package(2))),
                id=wf_id("kill"),
                task_queue=task_queue,
                execution_timeout=timedelta(minutes=5),
            )
            killed_during = await kill_worker_during(handle, first, "N2 wait", timeout_s=60)
            second = start_worker_process(temporal_address(temporal_env), task_queue, worker_log)
            result: RollingDeployResult = await handle.result()
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)

    assert await served_versions(lab) == {lab.node_name(i): "2.0.0" for i in lab.node_indexes}
    assert run.summary["failed"] == 0, run.failures()[:5]
    assert_no_write_lost(lab, run)
    # No step done twice: each node was stopped, deployed and started exactly once ...
    for i in lab.node_indexes:
        new_commands = ssh_commands(lab, i)[commands_before[i] :]
        assert sum("ctl stop" in c for c in new_commands) == 1, new_commands
        assert sum("ctl start" in c for c in new_commands) == 1, new_commands
    assert [s.seed_step for s in result.steps if s.node == "node2"] == [
        "N1",
        "N2",
        "N2",
        "N3",
        "N4",
        "N5",
        "N6",
        "N7",
        "N8",
        "N9",
    ]
    # ... and the history shows that only the interrupted drain wait ran again: it timed out
    # (its heartbeat stopped) and the workflow ran it once more on the new worker. (When the
    # kill lands just after the wait completed, only the workflow task is redone: nothing ran
    # twice either way.)
    history = await handle.fetch_history()
    scheduled = {
        e.event_id: e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    }
    timed_out = [
        scheduled[e.activity_task_timed_out_event_attributes.scheduled_event_id]
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT
    ]
    names = list(scheduled.values())
    assert names.count("deploy_package") == lab.nodes and names.count("stop_service") == lab.nodes
    assert timed_out in ([], ["lb_wait_drained"]), f"killed during {killed_during}; timed out: {timed_out}"
    assert names.count("lb_wait_drained") == lab.nodes + len(timed_out)
    assert sum(s.retries for s in result.steps) == len(timed_out)


async def test_worker_killed_during_a_slow_migration_sends_its_statement_once(
    fresh_lab: LabConfig, temporal_env: WorkflowEnvironment, task_queue: str, tmp_path: Path
) -> None:
    """Issue 17.1: a statement that outlives the heartbeat timeout, its worker SIGKILLed while
    it runs. Sent again, the CREATE TABLE would fail ("already exists") and roll the upgrade
    back; the retry instead waits for it (or reads its effect back) and goes on."""
    lab = fresh_lab
    client = temporal_env.client
    files = package_files(2)
    slow = "CREATE TABLE zd_slow_migration AS SELECT SLEEP(8) AS slept, NOW(6) AS at;\n"
    files["migrations/002_up.sql"] += slow.encode()
    files["migrations/002_down.sql"] += b"DROP TABLE IF EXISTS zd_slow_migration;\n"
    package = tmp_path / "labapp-2.0.0-slow.zip"
    package.write_bytes(zip_bytes(files))
    address = temporal_address(temporal_env)
    with (
        worker_processes(address, task_queue, tmp_path / "worker.log") as workers,
        probe(lab, tmp_path) as run,
    ):
        handle = await client.start_workflow(
            RollingDeployWorkflow.run,
            RollingDeployInput(inventory=load_inventory(lab.site_yaml), package_path=str(package)),
            id=wf_id("slow-migration"),
            task_queue=task_queue,
            execution_timeout=timedelta(minutes=5),
        )
        await kill_worker_during(handle, workers[0], "D2 apply migration", timeout_s=60)
        await asyncio.sleep(1)  # the statement is well under way on the server
        workers.append(start_worker_process(address, task_queue, tmp_path / "worker.log"))
        result: RollingDeployResult = await handle.result()

    assert await served_versions(lab) == {lab.node_name(i): "2.0.0" for i in lab.node_indexes}
    assert run.summary["failed"] == 0, run.failures()[:5]
    assert_no_write_lost(lab, run)
    assert lab_mariadb.query(
        lab, "primary", "SELECT COUNT(*) FROM zd_slow_migration", database=lab_mariadb.DB_NAME
    ) == [(1,)]
    await keep_history(handle)
    history = await handle.fetch_history()
    migrations = [
        e
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name == "db_apply_migration"
    ]
    assert len(migrations) == 2  # the lost attempt (timed out), then the one that went on
    migrate = next(s for s in result.steps if s.seed_step == "D2")
    assert migrate.result == "ok" and migrate.retries == 1, migrate
    # The migration's log: each of its three statements done once, the slow one included.
    log = lab_mariadb.query(
        lab,
        "primary",
        "SELECT statement, state FROM zerodown_migration_log WHERE run_key LIKE %s ORDER BY statement",
        (f"{handle.id}/%",),
        database=lab_mariadb.DB_NAME,
    )
    assert log == [(1, "done"), (2, "done"), (3, "done")], log


async def test_a_migration_behind_an_open_transaction_fails_in_time_and_the_site_keeps_answering(
    fresh_lab: LabConfig, client: Client, lab_worker: str, tmp_path: Path
) -> None:
    """Issue 17.2: a transaction holds `items` open; the ALTER of migration 2 waits for its
    lock at most the inventory's lock_wait_timeout_s (2 s here), then the upgrade rolls back,
    while the site's queries, queued behind the ALTER meanwhile, all get answered."""
    lab = fresh_lab
    inv = load_inventory(lab.site_yaml)
    db = dataclasses.replace(inv.databases[0], lock_wait_timeout_s=2)
    inv = dataclasses.replace(inv, databases=(db, *inv.databases[1:]))
    holder = lab_mariadb.connect(lab, "primary", database=lab_mariadb.DB_NAME)
    try:
        with holder.cursor() as cur:
            cur.execute("START TRANSACTION")
            cur.execute("SELECT COUNT(*) FROM items")  # a shared metadata lock until COMMIT
        with probe(lab, tmp_path) as run:
            handle = await client.start_workflow(
                RollingDeployWorkflow.run,
                RollingDeployInput(inventory=inv, package_path=str(lab.package(2))),
                id=wf_id("lock-wait"),
                task_queue=lab_worker,
                execution_timeout=timedelta(minutes=5),
            )
            with pytest.raises(WorkflowFailureError) as info:
                await handle.result()
    finally:
        holder.commit()
        holder.close()
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "ProcedureFailed"
    assert "failed at 'D2 apply migration 2'" in str(cause)
    assert "could not get its table lock within 2 s" in str(cause)
    assert "open transactions: connection" in str(cause)
    await keep_history(handle)
    progress = await handle.query("progress", result_type=Progress)
    migrate = next(s for s in progress.steps if s.name == "D2 apply migration 2")
    assert migrate.result == "failed" and migrate.retries == 0
    assert migrate.ended is not None and (migrate.ended - migrate.started).total_seconds() < 6
    # Nothing changed: v1 everywhere, schema 1; and nobody noticed.
    assert await served_versions(lab) == {lab.node_name(i): "1.0.0" for i in lab.node_indexes}
    assert lab_mariadb.schema_version(lab) == 1
    assert run.summary["failed"] == 0, run.failures()[:5]
    assert_no_write_lost(lab, run)
