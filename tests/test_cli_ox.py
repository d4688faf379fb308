"""The Open-Xchange procedures from the `zerodown` CLI as a user types it (`python -m starter`
in a subprocess), against the session dev server, the lab's OX part and a worker in this
test's event loop: plan, start, status, resolve and watch of ox-upgradeschemata, the plan of
ox-node-upgrade, options a procedure does not take, unknown nodes and schemata, and the OX
traffic probe. The inventory is the lab's own ox-site.yaml (approvers alice and bob), so
every run is started as carol (ZERODOWN_USER): nobody may decide their own run's gates.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from datetime import UTC, datetime

import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from lab.config import LabConfig
from lab.ox import configdb
from starter.client import ChildStatus, RunStatus, child_steps
from starter.report import ox_nodes_summary, status_notes
from tests.e2e_support import closed_port, zerodown
from tests.gate_support import pending
from tests.ox_support import NEW_SERVER, NEW_VERSION, classify, new_server_id, ox_fresh, s, states
from tests.signing_support import key_args
from tests.temporal_env import temporal_address
from workflows.ox_node_upgrade import NodeShare, OxNodeUpgradeResult
from workflows.ox_upgradeschemata import OxSchemataProgress
from workflows.timeline import Progress, StepRecord

SCHEMATA_ROW = re.compile(r"schemata\s*│\s*(total .*?)\s*│")


@pytest.fixture
async def ox(lab: LabConfig, monkeypatch: pytest.MonkeyPatch) -> LabConfig:
    """The lab's OX part as after lab up, with ox1 holding the new release (the update node)."""
    monkeypatch.setenv("ZERODOWN_USER", "carol")
    await ox_fresh(lab)
    return lab


def temporal(env: WorkflowEnvironment, task_queue: str) -> tuple[str, ...]:
    return ("--address", temporal_address(env), "--task-queue", task_queue)


def schemata_args(lab: LabConfig, *more: str) -> tuple[str, ...]:
    return (
        "-i",
        str(lab.ox_site_yaml),
        "--server-name",
        NEW_SERVER,
        "--update-node",
        "ox1",
        "--admin-node",
        "ox2",
        *more,
    )


def world(lab: LabConfig) -> tuple[dict[str, configdb.SchemaState], list[tuple[int, str]]]:
    """What an OX run could change: every schema's state and the registered servers."""
    return states(lab), configdb.servers(lab)


def plan_hash(out: str) -> str:
    m = re.search(r"plan hash ([0-9a-f]{64})", out)
    assert m, out
    return m.group(1)


# ============================================================================ refused locally


async def test_options_are_refused_before_anything_starts(lab: LabConfig) -> None:
    nowhere = ("--address", f"127.0.0.1:{closed_port()}")
    ox_site, site, package = str(lab.ox_site_yaml), str(lab.site_yaml), str(lab.package(2))
    node_upgrade = (
        "start",
        "ox-node-upgrade",
        "-i",
        ox_site,
        "--version",
        NEW_VERSION,
        "--server-name",
        NEW_SERVER,
    )
    cases: list[tuple[tuple[str, ...], str]] = [
        (
            ("start", "rolling-deploy", "-i", site, "-p", package, "--force"),
            "rolling-deploy does not take --force",
        ),
        (
            ("plan", "ox-upgradeschemata", *schemata_args(lab), "-p", package),
            "ox-upgradeschemata does not take --package",
        ),
        (
            ("start", "rolling-deploy", "-i", site),
            "rolling-deploy needs --package (the release package, a zip)",
        ),
        (
            ("start", "ox-upgradeschemata", "-i", ox_site, "--update-node", "ox1"),
            "ox-upgradeschemata needs --server-name",
        ),
        (
            (
                "start",
                "ox-upgradeschemata",
                "-i",
                ox_site,
                "--server-name",
                NEW_SERVER,
                "--update-node",
                "ox9",
            ),
            "unknown node(s) ox9 in site lab-ox (known: ox1, ox2, ox3), given as --update-node",
        ),
        (
            (*node_upgrade, "--nodes", "ox2,ox7"),
            "unknown node(s) ox7 in site lab-ox (known: ox1, ox2, ox3), given as --nodes",
        ),
        (
            (*node_upgrade, "--schemata", s(1), "--resume-from", s(1)),
            "ox-node-upgrade does not take --resume-from, --schemata",
        ),
        (
            ("plan", "ox-upgradeschemata", *schemata_args(lab), "--nodes", "ox1"),
            "ox-upgradeschemata does not take --nodes",
        ),
    ]
    results = await asyncio.gather(*(zerodown(*args, *nowhere) for args, _ in cases))
    for (args, expected), (code, out) in zip(cases, results, strict=True):
        # Exit 2 with the reason; Temporal (on a closed port: exit 3) was never contacted.
        assert code == 2 and expected in out, (args, out)
        assert "started" not in out and "cannot reach Temporal" not in out


# ============================================================================ ox-upgradeschemata


async def test_plan_prints_the_schemata_plan_and_changes_nothing(
    ox: LabConfig, temporal_env: WorkflowEnvironment, lab_worker: str
) -> None:
    before = world(ox)
    code, out = await zerodown(
        "plan",
        "ox-upgradeschemata",
        *schemata_args(ox, "--skip", f"{s(4)},{s(5)}"),
        "--concurrency",
        "2",
        *temporal(temporal_env, lab_worker),
    )
    assert code == 0, out
    assert "plan (dry run, nothing was changed)" in out
    assert f"ox-upgradeschemata on lab-ox: new server {NEW_SERVER}" in out
    assert "- 3 register it" in out
    assert "runupdate on ox1, enable (tools on ox2); at most 2 at a time" in out
    assert f"schemata to upgrade: 18 ({s(1)} .. {s(20)})" in out
    assert f"skipped (-k): {s(4)}, {s(5)}" in out
    assert re.search(r"plan hash: [0-9a-f]{64}", out)
    assert world(ox) == before


async def test_a_bad_schema_name_fails_the_preflight_and_changes_nothing(
    ox: LabConfig, temporal_env: WorkflowEnvironment, lab_worker: str
) -> None:
    before = world(ox)
    code, out = await zerodown(
        "start",
        "ox-upgradeschemata",
        *schemata_args(ox, "--schemata", f"{s(1)},oxdatabase_99", "--skip", "nope"),
        *temporal(temporal_env, lab_worker),
    )
    assert code == 1, out
    assert "failed: PreflightFailed: preflight failed, nothing was changed:" in out
    # Every problem on its own line, as the workflow's preflight listed them.
    assert re.search(r"^\s*skip \(-k\): no such schema nope \(known: oxdatabase_1, ", out, re.M), out
    assert re.search(r"^\s*schemata: no such schema oxdatabase_99 \(known: oxdatabase_1, ", out, re.M), out
    assert world(ox) == before


async def test_start_upgrades_the_schemata_and_status_shows_their_progress(
    ox: LabConfig, temporal_env: WorkflowEnvironment, lab_worker: str
) -> None:
    wf_id = f"cli-oxs-{uuid.uuid4().hex[:10]}"
    code, out = await zerodown(
        "start",
        "ox-upgradeschemata",
        *schemata_args(ox, "--schemata", f"{s(1)},{s(2)}"),
        "--id",
        wf_id,
        *temporal(temporal_env, lab_worker),
    )
    assert code == 0, out
    assert f"started ox-upgradeschemata as workflow {wf_id}" in out
    assert f"7 enable schema {s(2)}" in out  # the steps table
    new_id = new_server_id(ox)
    assert new_id is not None
    assert f"server {NEW_SERVER} id {new_id} (registered by this run)" in out
    assert f"upgraded: 2 ({s(1)}, {s(2)})" in out
    for line in (
        "failed: none",
        "left disabled: none",
        "reverted to the old server: none",
        "skipped (--skip): none",
        "passed over (--resume-from): none",
    ):
        assert line in out, (line, out)
    assert "runs: 1" in out and f"done: 2 schemata on server {NEW_SERVER}" in out
    assert classify(ox) == {"upgraded": {s(1), s(2)}, "untouched": {s(i) for i in range(3, 21)}}

    code, out = await zerodown("status", wf_id, "--address", temporal_address(temporal_env))
    assert code == 0, out
    assert "COMPLETED" in out and "nodes done" not in out
    row = SCHEMATA_ROW.search(out)
    assert row, out
    assert row.group(1) == (
        "total 2, upgraded 2, failed 0, left disabled 0, reverted 0, skipped 0, "
        f"remaining 0; current: none; run 1; server id {new_id}"
    )


async def test_failure_gate_listed_by_status_and_resolved_with_revert(
    ox: LabConfig, client: Client, temporal_env: WorkflowEnvironment, lab_worker: str
) -> None:
    configdb.inject_update_failure(ox, s(2))
    wf_id = f"cli-oxs-gate-{uuid.uuid4().hex[:10]}"
    code, out = await zerodown(
        "start",
        "ox-upgradeschemata",
        *schemata_args(ox, "--schemata", f"{s(1)},{s(2)},{s(3)}"),
        "--no-wait",
        "--id",
        wf_id,
        *temporal(temporal_env, lab_worker),
    )
    assert code == 0 and f"follow it: zerodown watch {wf_id}" in out, out
    gate = f"failure:6@{s(2)}"
    await pending(client.get_workflow_handle(wf_id), gate)

    address = ("--address", temporal_address(temporal_env))
    code, out = await zerodown("status", wf_id, *address)
    assert code == 0, out
    assert f"waiting at gate {gate}" in out and "may decide: alice, bob" in out, out
    assert "choices: retry, skip, revert, abort" in out
    row = SCHEMATA_ROW.search(out)
    assert row and row.group(1).startswith(
        "total 3, upgraded 1, failed 0, left disabled 0, reverted 0, skipped 0, remaining 2; "
        f"current: {s(2)}; run 1"
    ), out
    h = plan_hash(out)
    # A choice the gate does not offer, or the run's own starter: refused, the gate still waits.
    code, out = await zerodown(
        "resolve",
        wf_id,
        "--gate",
        gate,
        "--choice",
        "rollback",
        "--by",
        "bob",
        "--plan-hash",
        h,
        *key_args("bob"),
        *address,
    )
    assert code == 2 and f"'rollback' is not a choice of gate '{gate}'" in out, out
    code, out = await zerodown(
        "resolve",
        wf_id,
        "--gate",
        gate,
        "--choice",
        "revert",
        "--by",
        "bob",
        "--plan-hash",
        h,
        *key_args("bob"),
        *address,
    )
    assert code == 0 and f"gate {gate}: revert chosen by bob" in out, out

    code, out = await zerodown("watch", wf_id, *address)
    assert code == 1, out  # finished, but a schema is not upgraded: not a plain success
    assert f"upgraded: 2 ({s(1)}, {s(3)})" in out
    assert (
        f"failed: 1\n  {s(2)} at step 6: UpdateTasksFailed: update task(s) failed on {s(2)}: "
        f"{configdb.FAILING_TASK}\n"
    ) in out
    assert f"reverted to the old server: 1 ({s(2)})" in out and "left disabled: none" in out
    assert "done with failures: 2 upgraded, 1 failed" in out
    assert classify(ox) == {
        "upgraded": {s(1), s(3)},
        "failed_enabled_old": {s(2)},
        "untouched": {s(i) for i in range(4, 21)},
    }


async def test_server_already_registered_gate_continue_from_the_cli(
    ox: LabConfig, client: Client, temporal_env: WorkflowEnvironment, lab_worker: str
) -> None:
    with configdb.connect(
        port=ox.primary_db_port, password=configdb.ox_db_password_file(ox).read_text().strip()
    ) as conn:
        existing = configdb.register_server(conn, NEW_SERVER)
    wf_id = f"cli-oxs-reg-{uuid.uuid4().hex[:10]}"
    address = ("--address", temporal_address(temporal_env))
    code, out = await zerodown(
        "start",
        "ox-upgradeschemata",
        *schemata_args(ox, "--schemata", s(1)),
        "--no-wait",
        "--id",
        wf_id,
        *temporal(temporal_env, lab_worker),
    )
    assert code == 0, out
    gate = "server-already-registered"
    await pending(client.get_workflow_handle(wf_id), gate)
    code, out = await zerodown("status", wf_id, *address)
    assert f"waiting at gate {gate}" in out and f"registered with id '{existing}'" in out, out
    assert "choices: continue, abort" in out
    code, out = await zerodown(
        "resolve",
        wf_id,
        "--gate",
        gate,
        "--choice",
        "continue",
        "--by",
        "alice",
        "--plan-hash",
        plan_hash(out),
        *key_args("alice"),
        *address,
    )
    assert code == 0 and f"gate {gate}: continue chosen by alice" in out, out
    code, out = await zerodown("watch", wf_id, *address)
    assert code == 0, out
    assert f"server {NEW_SERVER} id {existing} (already registered, used)" in out
    assert f"upgraded: 1 ({s(1)})" in out
    assert [i for i, n in configdb.servers(ox) if n == NEW_SERVER] == [existing]


# ============================================================================ ox-node-upgrade


async def test_plan_ox_node_upgrade_in_the_order_given(
    lab: LabConfig, temporal_env: WorkflowEnvironment, lab_worker: str
) -> None:
    await ox_fresh(lab, upgraded=())  # every node on 7.10.0, as the procedure expects
    try:
        before = world(lab)
        code, out = await zerodown(
            "plan",
            "ox-node-upgrade",
            "-i",
            str(lab.ox_site_yaml),
            "--version",
            NEW_VERSION,
            "--server-name",
            NEW_SERVER,
            "--nodes",
            "ox2,ox1,ox3",
            *temporal(temporal_env, lab_worker),
        )
        assert code == 0, out
        assert f"ox-node-upgrade on lab-ox: 7.10.0 -> {NEW_VERSION}, new server {NEW_SERVER}" in out
        # --nodes is ox-node-upgrade's upgrade order: the first node registers, moves the pilot.
        order = [m.group(1) for m in re.finditer(r"- (ox\d): 1 out of main", out)]
        assert order == ["ox2", "ox1", "ox3"], out
        assert (
            "ox2: 1 out of main, 2 upgrade, 8 no redirect URL, 9 into secondary, 3 register, "
            f"4-7 1 schemata ({s(1)} .. {s(1)})"
        ) in out
        assert "ox3: 1 out of main, 2 upgrade, 8 no redirect URL, 9 into secondary, 4-7 no schema" in out
        assert world(lab) == before
    finally:
        await ox_fresh(lab)  # the new release on ox1 again, as the OX tests expect


def test_ox_node_upgrade_summary_and_running_child() -> None:
    res = OxNodeUpgradeResult(
        site="lab-ox",
        version=NEW_VERSION,
        previous_version="7.10.0",
        server_name=NEW_SERVER,
        nodes=("ox1", "ox2", "ox3"),
        shares=(
            NodeShare("ox1", (s(1),)),
            NodeShare("ox2", tuple(s(i) for i in range(2, 21))),
            NodeShare("ox3", ()),
        ),
        dry_run=False,
        plan=(),
        plan_hash="h",
        steps=(),
        upgraded_schemata=tuple(s(i) for i in range(1, 21)),
        children=("run-schemata-ox1", "run-schemata-ox2"),
    )
    lines = ox_nodes_summary(res)
    assert "nodes (in order): ox1, ox2, ox3" in lines
    # Long name lists are abbreviated: the first six, the last one and the count.
    assert (
        f"schemata per node: ox1 1 ({s(1)}); ox2 19 ({', '.join(s(i) for i in range(2, 8))}, …, {s(20)} "
        "(19 in all)); ox3 none"
    ) in lines
    assert "child workflows: run-schemata-ox1, run-schemata-ox2" in lines
    assert lines[-1] == f"[green]done[/]: ox1, ox2, ox3 now at {NEW_VERSION}"

    now = datetime.now(UTC)
    steps = (
        StepRecord("3-7 upgrade 1 schemata (child workflow run-schemata-ox1)", "3", "ox1", now, now, "ok"),
        StepRecord("4-7 upgrade 19 schemata (child workflow run-schemata-ox2)", "4", "ox2", now),
    )
    p = Progress(
        procedure="ox-node-upgrade", phase="3-7", node="ox2", nodes_done=("ox1",), nodes_total=3, steps=steps
    )
    assert child_steps(p) == [("run-schemata-ox1", "ox1", "ok"), ("run-schemata-ox2", "ox2", "running")]
    sp = OxSchemataProgress(
        total=19,
        upgraded=4,
        failed=0,
        left_disabled=0,
        reverted=0,
        skipped=0,
        remaining=15,
        current=(s(6),),
        run=1,
        server_id=3,
    )
    st = RunStatus(
        progress=p,
        children=(
            ChildStatus("run-schemata-ox1", "ox1", "ok"),
            ChildStatus("run-schemata-ox2", "ox2", "running", schemata=sp),
        ),
    )
    assert st.running_child is not None and st.running_child.workflow_id == "run-schemata-ox2"
    assert status_notes(st) == [
        "child workflow run-schemata-ox1 (ox1): ok",
        "running child workflow run-schemata-ox2 (ox2): schemata total 19, upgraded 4, failed 0, "
        f"left disabled 0, reverted 0, skipped 0, remaining 15; current: {s(6)}; run 1; server id 3 "
        "(zerodown status run-schemata-ox2)",
    ]


# ============================================================================ the OX probe


async def test_lab_probe_ox_logs_in_to_every_schema(ox: LabConfig) -> None:
    code, out = await zerodown(
        "lab", "probe", "--ox", "--rate", "40", "--duration", "1.5", "--root", str(ox.root)
    )
    assert code == 0, out
    assert f"OX probe: 20 contexts of 20 schemata via {ox.ox_main_url}" in out
    summary = json.loads((ox.abs_root / "ox-probe-summary.json").read_text())
    assert summary["contexts"] == 20 and summary["url"] == ox.ox_main_url
    assert summary["total"] >= 40 and summary["ok"] == summary["total"] and summary["failed"] == 0, summary
    assert len(summary["by_schema"]) == 20
    assert f"requests={summary['total']} ok={summary['ok']} failed=0" in out
