"""ss-load-balanced (Secret Server Load Balanced Configuration Upgrade) end to end on three
nodes of the real lab, with the probe, the gate decided by the signal form through the real
`temporal` binary, and the swap checked to leave no gap."""

from __future__ import annotations

import dataclasses
import json
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from inventory.load import load_inventory
from inventory.model import Inventory
from lab import haproxy as lab_haproxy
from lab import mariadb as lab_mariadb
from lab.config import LabConfig
from tests.e2e_support import (
    app_manifests,
    assert_no_write_lost,
    probe,
    run_command,
    served_versions,
    snapshot,
)
from tests.signing_support import fingerprint_of, signal_input
from tests.ss_support import TEMPORAL, checksums, enforce_version_match, wait_gate, wf_id
from tests.temporal_env import temporal_address
from workflows.ss_load_balanced import SsLoadBalancedInput, SsLoadBalancedResult, SsLoadBalancedWorkflow

THREE = ("node1", "node2", "node3")


def three_node_site(lab: LabConfig) -> Inventory:
    """The lab's site narrowed to three nodes (the seed's A, B and C)."""
    inv = load_inventory(lab.site_yaml)
    lbs = tuple(
        dataclasses.replace(lb, members={k: v for k, v in lb.members.items() if k in THREE})
        for lb in inv.load_balancers
    )
    return dataclasses.replace(
        inv,
        nodes=tuple(n for n in inv.nodes if n.name in THREE),
        load_balancers=lbs,
        approvers={"swap": ("alice",), "failure": ("alice",)},
    )


async def test_ss_load_balanced_on_three_nodes_swaps_without_a_gap(
    fresh_lab: LabConfig, client: Client, lab_worker: str, tmp_path: Path, temporal_env: WorkflowEnvironment
) -> None:
    lab = fresh_lab
    inv = three_node_site(lab)
    extra = [lab.node_name(i) for i in lab.node_indexes if lab.node_name(i) not in THREE]
    for name in extra:  # outside this site: out of the pool for the test (reset afterwards)
        lab_haproxy.runtime_command(lab, f"set server app/{name} state maint")
    await enforce_version_match(inv, True)
    protected = {n: (lab.node_dir(int(n[4:])) / "app" / "encryption.config").read_bytes() for n in THREE}
    try:
        with probe(lab, tmp_path) as run:
            handle = await client.start_workflow(
                SsLoadBalancedWorkflow.run,
                SsLoadBalancedInput(inventory=inv, package_path=str(lab.package(2)), started_by="carol"),
                id=wf_id("lb"),
                task_queue=lab_worker,
                execution_timeout=timedelta(minutes=6),
            )
            gate = await wait_gate(handle, "swap")
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
                        gate="swap",
                        by="alice",
                        plan_hash=gate.plan_hash,
                        approve=True,
                        comment="A looks good",
                    )
                ),
            )
            assert code == 0, out
            result: SsLoadBalancedResult = await handle.result()
    finally:
        await enforce_version_match(inv, False)

    assert run.summary["failed"] == 0, run.failures()[:5]

    assert_no_write_lost(lab, run)
    assert run.summary["total"] >= 300 and run.summary["refused"] > 0
    versions = await served_versions(lab)
    assert {n: versions[n] for n in THREE} == dict.fromkeys(THREE, "2.0.0")
    assert lab_mariadb.schema_version(lab) == 2
    # The seed's order: the script tested on a copy (2-6), A upgraded out of the pool, the
    # production script (15), the swap, then B and C.
    seeds = [s.seed_step for s in result.steps if s.result == "ok" and s.seed_step]
    for before, after in (("5", "9"), ("6", "10"), ("10", "14"), ("14", "15"), ("15", "16"), ("17", "21")):
        assert seeds.index(before) < seeds.index(after), (before, after, seeds)
    # No gap: A was seen UP before B or C started draining.
    names = [s.name for s in result.steps]
    a_up = names.index("17 wait UP on main")
    first_drain = min(i for i, s in enumerate(result.steps) if s.seed_step == "16" and "drain on" in s.name)
    assert a_up < first_drain
    assert [s.node for s in result.steps if s.name.startswith("10 copy the package")] == ["node1"]
    assert [s.node for s in result.steps if s.name.startswith("21 copy the package")] == ["node2", "node3"]
    # Maintenance mode on B and C during the script, off again at the end.
    assert [s.node for s in result.steps if s.seed_step == "24"] == ["node2", "node3"]
    for n in THREE:
        i = int(n[4:])
        assert (lab.node_dir(i) / "app" / "encryption.config").read_bytes() == protected[n]
        assert f"custom.banner = Welcome to {n}" in (lab.node_dir(i) / "app" / "web.config").read_text()
    states = lab_haproxy.server_states(lab)
    assert all(states[("app", n)] == "UP" for n in THREE)
    decided = [(s.name, s.detail) for s in result.steps]
    signed = f"via signal, signed by key {fingerprint_of('alice')}: A looks good"
    assert ("gate swap: approved by alice", signed) in decided


async def test_failed_production_script_rolls_node_a_and_the_database_back(
    fresh_lab: LabConfig, client: Client, lab_worker: str, tmp_path: Path
) -> None:
    # The fault only hits `labapp`: the script passes on the test copy (steps 3-6), then
    # fails on production (step 15); on_failure=rollback undoes everything at once - under
    # the probe with writes (issue 17.7): every write the site answered 201 is still there
    # after the database went back (swapped in through the scratch database), no request
    # failed, and every other table is as before.
    lab = fresh_lab
    assert three_node_site(lab).databases[0].scratch_database
    inv = three_node_site(lab)
    extra = [lab.node_name(i) for i in lab.node_indexes if lab.node_name(i) not in THREE]
    for name in extra:
        lab_haproxy.runtime_command(lab, f"set server app/{name} state maint")
    await enforce_version_match(inv, True)
    try:
        lb_before = (await snapshot(lab)).servers
        db_before = await checksums(inv)
        folders_before = app_manifests(lab)
        lab_mariadb.inject_migration_failure(lab, "labapp", True)
        try:
            with probe(lab, tmp_path) as run, pytest.raises(WorkflowFailureError) as info:
                await client.execute_workflow(
                    SsLoadBalancedWorkflow.run,
                    SsLoadBalancedInput(
                        inventory=inv,
                        package_path=str(lab.package(2)),
                        started_by="carol",
                        on_failure="rollback",
                    ),
                    id=wf_id("lb-fail"),
                    task_queue=lab_worker,
                    execution_timeout=timedelta(minutes=6),
                )
        finally:
            lab_mariadb.inject_migration_failure(lab, "labapp", False)
        cause = info.value.cause
        assert isinstance(cause, ApplicationError) and cause.type == "ProcedureFailed"
        assert "15 run the upgrade script on production (migration 2)" in str(cause)
        assert "Rolled back: database, maintenance mode on the other nodes, node node1" in str(cause)
        # Everything as before: LB states, every table (the settings too), every app file.
        assert (await snapshot(lab)).servers == lb_before
        after = await checksums(inv)
        assert {t: c for t, c in after.items() if t != "items"} == {
            t: c for t, c in db_before.items() if t != "items"
        }
        assert run.summary["failed"] == 0, run.failures()[:5]
        assert_no_write_lost(lab, run)  # items: as before plus every acknowledged write
        assert app_manifests(lab) == folders_before
        versions = await served_versions(lab)
        assert {n: versions[n] for n in THREE} == dict.fromkeys(THREE, "1.0.0")
    finally:
        await enforce_version_match(inv, False)
