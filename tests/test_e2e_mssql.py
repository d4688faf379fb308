"""Secret Server's procedures on SQL Server (`kind: mssql`) end to end: the lab's TDS
stand-in (lab/mssql) in front of the lab's MariaDB, reached through aioodbc and the real
FreeTDS driver, under the probe with writes. The upgrade script is T-SQL (GO batches), tested
on a restored scratch copy first; a failed production script rolls back to the backup."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError

import activities.app_admin as app_admin
from activities import f5
from inventory.load import load_inventory
from inventory.model import Inventory, LoadBalancer, SecretRef
from lab import haproxy as lab_haproxy
from lab import mariadb as lab_mariadb
from lab.config import LabConfig
from lab.f5 import lab as lab_f5
from tests.e2e_support import app_manifests, assert_no_write_lost, probe, served_versions, snapshot
from tests.signing_support import signed
from tests.ss_support import checksums, enforce_version_match, wait_gate, wf_id
from workflows.gates import Decision, GateRecord
from workflows.major_maintenance_window import MajorMaintenanceInput, MajorMaintenanceWindowWorkflow
from workflows.rolling_deploy import RollingDeployInput, RollingDeployResult, RollingDeployWorkflow
from workflows.ss_load_balanced import SsLoadBalancedInput, SsLoadBalancedResult, SsLoadBalancedWorkflow
from workflows.ss_rolling import SsRollingInput, SsRollingResult, SsRollingWorkflow
from workflows.timeline import Progress

APPROVERS = {
    "staging-test": ("alice", "bob"),
    "upgrade-successful": ("alice", "bob"),
    "failure": ("bob",),
    "swap": ("alice",),
}


def mssql_lab(lab: LabConfig) -> LabConfig:
    return dataclasses.replace(lab, db="mssql")


def mssql_inventory(lab: LabConfig, nodes: tuple[str, ...] = ()) -> Inventory:
    inv = load_inventory(mssql_lab(lab).site_yaml)
    assert inv.databases[0].kind == "mssql"
    inv = dataclasses.replace(inv, approvers=APPROVERS)
    if not nodes:
        return inv
    lbs = tuple(
        dataclasses.replace(lb, members={k: v for k, v in lb.members.items() if k in nodes})
        for lb in inv.load_balancers
    )
    return dataclasses.replace(inv, nodes=tuple(n for n in inv.nodes if n.name in nodes), load_balancers=lbs)


async def approve(handle: WorkflowHandle[Any, Any], gate_name: str, by: str) -> None:
    gate = await wait_gate(handle, gate_name)
    decision = signed(handle.id, gate, Decision(gate=gate_name, by=by, plan_hash=gate.plan_hash))
    await handle.execute_update("approve", decision, result_type=GateRecord)


@pytest.fixture
async def ss_mssql_lab(fresh_lab: LabConfig) -> Any:
    inv = mssql_inventory(fresh_lab)
    await enforce_version_match(inv, True)
    yield fresh_lab
    await enforce_version_match(inv, False)


async def test_ss_rolling_on_sql_server_with_zero_failed_requests(
    ss_mssql_lab: LabConfig, client: Client, lab_worker: str, tmp_path: Path
) -> None:
    lab = ss_mssql_lab
    inv = mssql_inventory(lab)
    with probe(lab, tmp_path) as run:
        handle = await client.start_workflow(
            SsRollingWorkflow.run,
            SsRollingInput(inventory=inv, package_path=str(lab.package(2, "mssql")), started_by="carol"),
            id=wf_id("mssql"),
            task_queue=lab_worker,
            execution_timeout=timedelta(minutes=8),
        )
        await approve(handle, "staging-test", "alice")
        await approve(handle, "upgrade-successful", "bob")
        result: SsRollingResult = await handle.result()

    assert run.summary["failed"] == 0, run.failures()[:5]
    assert_no_write_lost(lab, run)
    assert run.summary["total"] >= 300
    assert await served_versions(lab) == {f"node{i}": "2.0.0" for i in lab.node_indexes}
    # The T-SQL migration ran (through the stand-in, on the lab app's MariaDB database).
    assert lab_mariadb.schema_version(lab) == 2
    columns = [r[0] for r in lab_mariadb.query(lab, "primary", "SHOW COLUMNS FROM labapp.items")]
    assert "notes" in columns
    # Task two tested the script on a restored copy (the scratch database), then dropped it.
    ok = {s.seed_step for s in result.steps if s.result == "ok"}
    assert {"1.5", "2.2", "5.5", "6.6", "7.7"} <= ok
    dbs = {r[0] for r in lab_mariadb.query(lab, "primary", "SHOW DATABASES")}
    assert "labapp_test" not in dbs and not any(d.startswith("zerodown_keep_") for d in dbs)
    # Three SQL Server backups, written by the server on its host, each verified.
    assert len(result.db_backups) == 3
    for path in result.db_backups:
        assert path.endswith(".bak") and Path(path).stat().st_size > 0
    states = lab_haproxy.server_states(lab)
    assert all(states[("app", f"node{i}")] == "UP" for i in lab.node_indexes)


async def test_failed_production_script_on_sql_server_rolls_back_to_the_snapshot(
    ss_mssql_lab: LabConfig, client: Client, lab_worker: str, tmp_path: Path
) -> None:
    lab = ss_mssql_lab
    inv = mssql_inventory(lab)
    lb_before = (await snapshot(lab)).servers
    db_before = await checksums(inv)
    folders_before = app_manifests(lab)
    try:
        with probe(lab, tmp_path) as run:
            handle = await client.start_workflow(
                SsRollingWorkflow.run,
                SsRollingInput(inventory=inv, package_path=str(lab.package(2, "mssql")), started_by="carol"),
                id=wf_id("mssql-sqlfail"),
                task_queue=lab_worker,
                execution_timeout=timedelta(minutes=8),
            )
            gate = await wait_gate(handle, "staging-test")
            # The script passed on the copies; production's will fail (THROW in batch 1).
            lab_mariadb.inject_migration_failure(lab, "labapp", True)
            decision = signed(
                handle.id, gate, Decision(gate="staging-test", by="alice", plan_hash=gate.plan_hash)
            )
            await handle.execute_update("approve", decision, result_type=GateRecord)
            failure = await wait_gate(handle, "failure:7.7")
            # SQL Server's own error, with the failing batch of the script.
            progress = await handle.query("progress", result_type=Progress)
            failed = [s.detail for s in progress.steps if s.seed_step == "7.7" and s.result == "failed"]
            assert failed and "lab fault injected: migration-2" in failed[-1], failed
            assert "batch 1/2" in failed[-1] and "(50001)" in failed[-1], failed
            choice = Decision(gate="failure:7.7", by="bob", plan_hash=failure.plan_hash, choice="rollback")
            await handle.execute_update("choose", signed(handle.id, failure, choice), result_type=GateRecord)
            with pytest.raises(WorkflowFailureError) as info:
                await handle.result()
    finally:
        lab_mariadb.inject_migration_failure(lab, "labapp", False)
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "ProcedureFailed"
    # Every table's checksum (CHECKSUM_AGG over TDS) as before the run, but `items`, where
    # the probe wrote: it holds exactly the writes the site acknowledged, none lost (the
    # backup restored was taken once upgrade mode refused changes: none came after it).
    after = await checksums(inv)
    assert {t: c for t, c in after.items() if t != "items"} == {
        t: c for t, c in db_before.items() if t != "items"
    }
    acked = assert_no_write_lost(lab, run)
    rows_before = int(db_before["items"].split(":")[0])
    assert after["items"].startswith(f"{rows_before + acked}:"), (db_before["items"], after["items"], acked)
    assert (await snapshot(lab)).servers == lb_before
    assert app_manifests(lab) == folders_before
    assert await served_versions(lab) == {f"node{i}": "1.0.0" for i in lab.node_indexes}
    assert inv.application.admin is not None
    events = await app_admin.list_audit(inv.nodes[0].url, inv.application.admin)
    actions = [e.action for e in events if e.audit_type == "ManualUpgrade"]
    assert actions[-1] == "CANCEL" and "STARTED" in actions  # the audit trail was kept


async def test_ss_load_balanced_on_sql_server_with_zero_failed_requests(
    fresh_lab: LabConfig, client: Client, lab_worker: str, tmp_path: Path
) -> None:
    lab = fresh_lab
    three = ("node1", "node2", "node3")
    inv = mssql_inventory(lab, three)
    for i in lab.node_indexes:
        if lab.node_name(i) not in three:  # outside this site: out of the pool (reset afterwards)
            lab_haproxy.runtime_command(lab, f"set server app/{lab.node_name(i)} state maint")
    await enforce_version_match(inv, True)
    try:
        with probe(lab, tmp_path) as run:
            handle = await client.start_workflow(
                SsLoadBalancedWorkflow.run,
                SsLoadBalancedInput(
                    inventory=inv, package_path=str(lab.package(2, "mssql")), started_by="carol"
                ),
                id=wf_id("mssql-lb"),
                task_queue=lab_worker,
                execution_timeout=timedelta(minutes=6),
            )
            await approve(handle, "swap", "alice")
            result: SsLoadBalancedResult = await handle.result()
    finally:
        await enforce_version_match(inv, False)
    assert run.summary["failed"] == 0, run.failures()[:5]
    assert_no_write_lost(lab, run)
    versions = await served_versions(lab)
    assert {n: versions[n] for n in three} == dict.fromkeys(three, "2.0.0")
    assert lab_mariadb.schema_version(lab) == 2
    # The script was tested on a restored copy (steps 3-6) before production (15).
    seeds = [s.seed_step for s in result.steps if s.result == "ok" and s.seed_step]
    assert seeds.index("5") < seeds.index("15") and seeds.index("6") < seeds.index("15")


async def test_rolling_deploy_on_sql_server_and_a_package_for_the_other_database_refused(
    fresh_lab: LabConfig, client: Client, lab_worker: str, tmp_path: Path
) -> None:
    lab = fresh_lab
    inv = load_inventory(mssql_lab(lab).site_yaml)
    # The MariaDB release (its migration is MariaDB SQL): refused before anything is touched.
    before = await snapshot(lab)
    with pytest.raises(WorkflowFailureError) as info:
        await client.execute_workflow(
            RollingDeployWorkflow.run,
            RollingDeployInput(inventory=inv, package_path=str(lab.package(2, "mariadb"))),
            id=wf_id("mssql-wrong-sql"),
            task_queue=lab_worker,
            execution_timeout=timedelta(minutes=2),
        )
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "PreflightFailed"
    assert "written for MariaDB / MySQL, the inventory's database is SQL Server" in str(cause)
    assert (await snapshot(lab)).servers == before.servers and lab_mariadb.schema_version(lab) == 1
    # The SQL Server release: backup over TDS, the T-SQL migration, node by node.
    with probe(lab, tmp_path) as run:
        result: RollingDeployResult = await client.execute_workflow(
            RollingDeployWorkflow.run,
            RollingDeployInput(inventory=inv, package_path=str(lab.package(2, "mssql"))),
            id=wf_id("mssql-rolling"),
            task_queue=lab_worker,
            execution_timeout=timedelta(minutes=5),
        )
    assert run.summary["failed"] == 0, run.failures()[:5]
    assert_no_write_lost(lab, run)
    assert await served_versions(lab) == {lab.node_name(i): "2.0.0" for i in lab.node_indexes}
    assert lab_mariadb.schema_version(lab) == 2
    assert result.db_backup is not None and result.db_backup.endswith(".bak")


async def test_major_maintenance_window_refuses_sql_server_in_preflight(
    fresh_lab: LabConfig, client: Client, lab_worker: str
) -> None:
    lab = fresh_lab
    inv = load_inventory(mssql_lab(lab).site_yaml)
    with pytest.raises(WorkflowFailureError) as info:
        await client.execute_workflow(
            MajorMaintenanceWindowWorkflow.run,
            MajorMaintenanceInput(inventory=inv, package_path=str(lab.package(2, "mssql"))),
            id=wf_id("mssql-mmw"),
            task_queue=lab_worker,
            execution_timeout=timedelta(minutes=2),
        )
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "PreflightFailed"
    assert "databases[0] main is mssql: the warm replica (steps 5-6, 20-22, 30) is MariaDB / MySQL" in str(
        cause
    )


async def test_ss_load_balanced_through_the_lab_f5_on_sql_server(
    fresh_lab: LabConfig, client: Client, lab_worker: str, tmp_path: Path
) -> None:
    """Secret Server's stack so far: the F5 (iControl REST, lab/f5, driving the real HAProxy)
    and SQL Server; seed 000 step 9.5 sets the pool's Action on Service Down to Reject."""
    lab = fresh_lab
    three = ("node1", "node2", "node3")
    inv = mssql_inventory(lab, three)
    big_ip = LoadBalancer(
        name="main",
        kind="f5",
        members={n: lab_f5.member_name(lab, int(n[4:])) for n in three},
        url=lab_f5.base_url(lab),
        pool=f"/Common/{lab_f5.POOL}",
        user="zerodown",
        credential=SecretRef(file=str(lab_f5.password_file(lab))),
        ca_bundle=str(lab_f5.ca_bundle(lab)),
    )
    inv = dataclasses.replace(inv, load_balancers=(big_ip,))
    lab_haproxy.runtime_command(lab, "set server app/node4 state maint")  # outside this site
    await enforce_version_match(inv, True)
    try:
        assert (await f5.service_down_action(big_ip, "")).now == "none"
        with probe(lab, tmp_path) as run:
            handle = await client.start_workflow(
                SsLoadBalancedWorkflow.run,
                SsLoadBalancedInput(
                    inventory=inv, package_path=str(lab.package(2, "mssql")), started_by="carol"
                ),
                id=wf_id("f5-lb"),
                task_queue=lab_worker,
                execution_timeout=timedelta(minutes=6),
            )
            await approve(handle, "swap", "alice")
            result: SsLoadBalancedResult = await handle.result()
        assert (await f5.service_down_action(big_ip, "")).now == "reset"
    finally:
        await enforce_version_match(inv, False)
        lab_f5.reset(lab)
    assert run.summary["failed"] == 0, run.failures()[:5]
    assert_no_write_lost(lab, run)
    versions = await served_versions(lab)
    assert {n: versions[n] for n in three} == dict.fromkeys(three, "2.0.0")
    assert ("9.5", "ok") in [(s.seed_step, s.result) for s in result.steps]
    # Each node left the pool and came back through the F5: drained, then enabled.
    drains = [s.node for s in result.steps if s.name.startswith(("9 drain", "16 drain")) and s.node]
    assert sorted({d for d in drains if d}) == list(three), [s.name for s in result.steps]
    states = lab_haproxy.server_states(lab)
    assert all(states[("app", n)] == "UP" for n in three)
