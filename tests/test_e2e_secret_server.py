"""Secret Server's own stack end to end (`zerodown lab up --profile secret-server`): the
lab's nodes seen as Windows/IIS nodes through their Win32-OpenSSH stand-ins (drive paths over
SFTP, PowerShell through cmd.exe, app pools that pass through Starting and Stopping), behind
the BIG-IP stand-in (iControl REST over the real HAProxy), on the SQL Server stand-in (TDS
through FreeTDS), with XML web.configs. Every run is under the probe with writes."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

import activities.app_admin as app_admin
from activities import f5
from inventory.load import load_inventory
from inventory.model import Inventory
from lab import haproxy as lab_haproxy
from lab import mariadb as lab_mariadb
from lab.config import LabConfig
from lab.nodes import node_connection_strings, node_customisations
from lab.packages import read_web_config_xml
from tests.e2e_support import (
    app_manifests,
    assert_no_write_lost,
    ensure_v1,
    probe,
    served_versions,
    zerodown,
)
from tests.signing_support import signed
from tests.ss_support import checksums, enforce_version_match, wait_gate, wf_id
from tests.temporal_env import temporal_address
from workflows.gates import Decision, GateRecord
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


def site_inventory(site: LabConfig) -> Inventory:
    inv = load_inventory(site.site_yaml)
    assert {n.os for n in inv.nodes} == {"windows"} and inv.load_balancers[0].kind == "f5"
    assert inv.databases[0].kind == "mssql" and inv.staging is not None and inv.staging.os == "windows"
    return dataclasses.replace(inv, approvers=APPROVERS)


@pytest.fixture
async def ss_site(lab: LabConfig) -> AsyncIterator[LabConfig]:
    """The session lab as the secret-server profile at v1 (XML configs), version match on."""
    site = dataclasses.replace(lab, profile="secret-server")
    await ensure_v1(site)
    inv = site_inventory(site)
    await enforce_version_match(inv, True)
    yield site
    await enforce_version_match(inv, False)
    await ensure_v1(site)


async def approve(handle: WorkflowHandle[Any, Any], gate_name: str, by: str) -> None:
    gate = await wait_gate(handle, gate_name)
    decision = signed(handle.id, gate, Decision(gate=gate_name, by=by, plan_hash=gate.plan_hash))
    await handle.execute_update("approve", decision, result_type=GateRecord)


def encryption_configs(site: LabConfig) -> dict[str, bytes]:
    return {
        site.node_name(i): (site.node_dir(i) / "app" / "encryption.config").read_bytes()
        for i in site.node_indexes
    }


def assert_xml_customisations_carried(site: LabConfig) -> None:
    """Each node's web.config: its own appSettings and connection string, the release's new
    defaults, and everything else exactly as the package has it."""
    package = read_web_config_xml(_package_web_config(site))
    for i in site.node_indexes:
        text = (site.node_dir(i) / "app" / "web.config").read_bytes().decode("utf-8")
        settings, conns = read_web_config_xml(text)
        assert {k: settings.get(k) for k in node_customisations(site, i)} == node_customisations(site, i)
        assert conns == node_connection_strings(site, i)
        assert settings["greeting"] == package[0]["greeting"] == "Welcome to labapp 2"
        assert settings["feature.notes"] == "on"
        tail = _package_web_config(site).split("</connectionStrings>")[1]
        assert text.split("</connectionStrings>")[1] == tail  # <system.webServer> as shipped


def _package_web_config(site: LabConfig) -> str:
    import zipfile

    with zipfile.ZipFile(site.package(2)) as z:
        return z.read("web.config").decode("utf-8")


async def member_states(inv: Inventory) -> dict[str, tuple[str, str, int]]:
    """Each pool member's state as the BIG-IP reports it (not its connection count)."""
    states = {}
    for n in inv.nodes:
        m = await f5.member_state(inv.load_balancers[0], n.name)
        states[n.name] = (m.admin, m.status, m.weight)
    return states


def powershell_scripts(site: LabConfig, i: int) -> list[str]:
    """What the node's Win32-OpenSSH stand-in ran (its ssh.log), as text."""
    lines = (site.node_dir(i) / "ssh.log").read_text(encoding="utf-8").splitlines()
    return [json.dumps(e) for e in map(json.loads, lines) if e.get("shell") == "cmd"]


async def test_ss_rolling_on_windows_nodes_behind_the_f5_with_zero_failed_requests(
    ss_site: LabConfig, client: Client, lab_worker: str, tmp_path: Path
) -> None:
    site = ss_site
    inv = site_inventory(site)
    keys = encryption_configs(site)
    assert len(set(keys.values())) == 1
    with probe(site, tmp_path) as run:
        handle = await client.start_workflow(
            SsRollingWorkflow.run,
            SsRollingInput(inventory=inv, package_path=str(site.package(2)), started_by="carol"),
            id=wf_id("windows"),
            task_queue=lab_worker,
            execution_timeout=timedelta(minutes=8),
        )
        await approve(handle, "staging-test", "alice")
        await approve(handle, "upgrade-successful", "bob")
        result: SsRollingResult = await handle.result()
    assert run.summary["failed"] == 0, run.failures()[:5]
    assert_no_write_lost(site, run)
    assert run.summary["total"] >= 300
    assert await served_versions(site) == {site.node_name(i): "2.0.0" for i in site.node_indexes}
    assert lab_mariadb.schema_version(site) == 2
    assert encryption_configs(site) == keys
    assert_xml_customisations_carried(site)
    columns = [r[0] for r in lab_mariadb.query(site, "primary", "SHOW COLUMNS FROM labapp.items")]
    assert "notes" in columns  # the T-SQL migration ran, through the stand-in
    # Task two tested the script on a restored copy (the scratch database), then dropped it.
    assert {"1.5", "2.2", "5.5", "6.6", "7.7"} <= {s.seed_step for s in result.steps if s.result == "ok"}
    dbs = {r[0] for r in lab_mariadb.query(site, "primary", "SHOW DATABASES")}
    assert "labapp_test" not in dbs and not any(d.startswith("zerodown_keep_") for d in dbs)
    # Three SQL Server backups, written by the server on its host, each verified.
    assert len(result.db_backups) == 3
    for path in result.db_backups:
        assert path.endswith(".bak") and Path(path).stat().st_size > 0
    # Through IIS: the app pools were stopped and started by PowerShell over the stand-in's cmd.exe.
    scripts = "\n".join(powershell_scripts(site, 1))
    assert "Stop-WebAppPool" in scripts and "Start-WebAppPool" in scripts and "Get-FileHash" in scripts
    states = lab_haproxy.server_states(site)
    assert all(states[("app", site.node_name(i))] == "UP" for i in site.node_indexes)


async def test_failed_production_sql_on_windows_nodes_rolls_everything_back(
    ss_site: LabConfig, client: Client, lab_worker: str, tmp_path: Path
) -> None:
    site = ss_site
    inv = site_inventory(site)
    members_before = await member_states(inv)
    db_before = await checksums(inv)
    folders_before = app_manifests(site)
    try:
        with probe(site, tmp_path) as run:
            handle = await client.start_workflow(
                SsRollingWorkflow.run,
                SsRollingInput(inventory=inv, package_path=str(site.package(2)), started_by="carol"),
                id=wf_id("windows-sqlfail"),
                task_queue=lab_worker,
                execution_timeout=timedelta(minutes=8),
            )
            gate = await wait_gate(handle, "staging-test")
            lab_mariadb.inject_migration_failure(site, "labapp", True)
            decision = signed(
                handle.id, gate, Decision(gate="staging-test", by="alice", plan_hash=gate.plan_hash)
            )
            await handle.execute_update("approve", decision, result_type=GateRecord)
            failure = await wait_gate(handle, "failure:7.7")
            progress = await handle.query("progress", result_type=Progress)
            failed = [s.detail for s in progress.steps if s.seed_step == "7.7" and s.result == "failed"]
            assert failed and "lab fault injected: migration-2" in failed[-1], failed
            assert "batch 1/2" in failed[-1] and "(50001)" in failed[-1], failed  # SQL Server's own error
            choice = Decision(gate="failure:7.7", by="bob", plan_hash=failure.plan_hash, choice="rollback")
            await handle.execute_update("choose", signed(handle.id, failure, choice), result_type=GateRecord)
            with pytest.raises(WorkflowFailureError) as info:
                await handle.result()
    finally:
        lab_mariadb.inject_migration_failure(site, "labapp", False)
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "ProcedureFailed"
    after = await checksums(inv)
    assert {t: c for t, c in after.items() if t != "items"} == {
        t: c for t, c in db_before.items() if t != "items"
    }
    acked = assert_no_write_lost(site, run)
    rows_before = int(db_before["items"].split(":")[0])
    assert after["items"].startswith(f"{rows_before + acked}:"), (db_before["items"], after["items"], acked)
    assert await member_states(inv) == members_before
    assert app_manifests(site) == folders_before
    assert await served_versions(site) == {site.node_name(i): "1.0.0" for i in site.node_indexes}
    assert inv.application.admin is not None
    events = await app_admin.list_audit(inv.nodes[0].url, inv.application.admin)
    actions = [e.action for e in events if e.audit_type == "ManualUpgrade"]
    assert actions[-1] == "CANCEL" and "STARTED" in actions  # the audit trail was kept


async def test_ss_load_balanced_on_windows_nodes_behind_the_f5_with_zero_failed_requests(
    ss_site: LabConfig, client: Client, lab_worker: str, tmp_path: Path
) -> None:
    site = ss_site
    inv = site_inventory(site)
    keys = encryption_configs(site)
    big_ip = inv.load_balancers[0]
    try:
        with probe(site, tmp_path) as run:
            handle = await client.start_workflow(
                SsLoadBalancedWorkflow.run,
                SsLoadBalancedInput(inventory=inv, package_path=str(site.package(2)), started_by="carol"),
                id=wf_id("windows-lb"),
                task_queue=lab_worker,
                execution_timeout=timedelta(minutes=6),
            )
            await approve(handle, "swap", "alice")
            result: SsLoadBalancedResult = await handle.result()
        assert (await f5.service_down_action(big_ip, "")).now == "reset"
    finally:
        from lab.f5 import lab as lab_f5

        lab_f5.reset(site)
    assert run.summary["failed"] == 0, run.failures()[:5]
    assert_no_write_lost(site, run)
    assert await served_versions(site) == {site.node_name(i): "2.0.0" for i in site.node_indexes}
    assert encryption_configs(site) == keys
    assert_xml_customisations_carried(site)
    assert ("9.5", "ok") in [(s.seed_step, s.result) for s in result.steps]
    # The script was tested on a restored copy (steps 3-6) before production (15).
    seeds = [s.seed_step for s in result.steps if s.result == "ok" and s.seed_step]
    assert seeds.index("5") < seeds.index("15") and seeds.index("6") < seeds.index("15")
    # Each node left the pool and came back through the F5: drained, then enabled.
    drains = {s.node for s in result.steps if s.name.startswith(("9 drain", "16 drain")) and s.node}
    assert drains == {n.name for n in inv.nodes}, [s.name for s in result.steps]


async def test_rolling_deploy_on_windows_nodes_behind_the_f5(
    ss_site: LabConfig, client: Client, lab_worker: str, tmp_path: Path
) -> None:
    site = ss_site
    inv = site_inventory(site)
    keys = encryption_configs(site)
    # A generic rolling deploy has old and new nodes serving side by side: no Secret Server
    # version-mismatch page for it.
    await enforce_version_match(inv, False)
    with probe(site, tmp_path) as run:
        result: RollingDeployResult = await client.execute_workflow(
            RollingDeployWorkflow.run,
            RollingDeployInput(inventory=inv, package_path=str(site.package(2))),
            id=wf_id("windows-rolling"),
            task_queue=lab_worker,
            execution_timeout=timedelta(minutes=5),
        )
    assert run.summary["failed"] == 0, run.failures()[:5]
    assert_no_write_lost(site, run)
    assert await served_versions(site) == {site.node_name(i): "2.0.0" for i in site.node_indexes}
    assert encryption_configs(site) == keys
    assert_xml_customisations_carried(site)
    assert result.db_backup is not None and result.db_backup.endswith(".bak")


async def test_zerodown_plan_accepts_the_profiles_inventory_and_changes_nothing(
    ss_site: LabConfig, temporal_env: WorkflowEnvironment, lab_worker: str
) -> None:
    """README's F5 + IIS + SQL Server inventory: `zerodown plan` runs every procedure's
    preflight on it (SSH through cmd.exe, PowerShell storage, the F5's members over iControl
    REST, SQL Server over TDS) and prints the plan."""
    site = ss_site
    before = app_manifests(site)
    states = lab_haproxy.server_states(site)
    for procedure in ("ss-rolling", "ss-load-balanced", "rolling-deploy"):
        code, out = await zerodown(
            "plan",
            procedure,
            "-i",
            str(site.site_yaml),
            "-p",
            str(site.package(2)),
            "--address",
            temporal_address(temporal_env),
            "--task-queue",
            lab_worker,
        )
        assert code == 0, out
        assert "plan (dry run, nothing was changed)" in out and "plan hash: " in out, out
    assert app_manifests(site) == before and lab_haproxy.server_states(site) == states


async def test_failed_production_sql_in_ss_load_balanced_rolls_node_a_the_f5_and_the_database_back(
    ss_site: LabConfig, client: Client, lab_worker: str, tmp_path: Path
) -> None:
    """Seed 000 step 15 fails on production (the script passed on the restored copy): the
    rollback puts node A's folder, the F5 (its members and the pool's Action on Service Down,
    set to Reject at 9.5) and the database back, under the probe with writes."""
    site = ss_site
    inv = site_inventory(site)
    big_ip = inv.load_balancers[0]
    members_before = await member_states(inv)
    service_down_before = (await f5.service_down_action(big_ip, "")).now
    db_before = await checksums(inv)
    folders_before = app_manifests(site)
    lab_mariadb.inject_migration_failure(site, "labapp", True)
    try:
        with probe(site, tmp_path) as run, pytest.raises(WorkflowFailureError) as info:
            await client.execute_workflow(
                SsLoadBalancedWorkflow.run,
                SsLoadBalancedInput(
                    inventory=inv,
                    package_path=str(site.package(2)),
                    started_by="carol",
                    on_failure="rollback",
                ),
                id=wf_id("windows-lb-fail"),
                task_queue=lab_worker,
                execution_timeout=timedelta(minutes=6),
            )
    finally:
        lab_mariadb.inject_migration_failure(site, "labapp", False)
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "ProcedureFailed"
    assert "15 run the upgrade script on production (migration 2)" in str(cause)
    assert "Action on Service Down of main" in str(cause)  # rolled back with the rest
    assert await member_states(inv) == members_before
    assert (await f5.service_down_action(big_ip, "")).now == service_down_before
    after = await checksums(inv)
    assert {t: c for t, c in after.items() if t != "items"} == {
        t: c for t, c in db_before.items() if t != "items"
    }
    assert run.summary["failed"] == 0, run.failures()[:5]
    assert_no_write_lost(site, run)
    assert app_manifests(site) == folders_before
    assert await served_versions(site) == {site.node_name(i): "1.0.0" for i in site.node_indexes}
