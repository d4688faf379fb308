"""`zerodown plan` and `zerodown start` as a user types them, against the real dev server, the
lab and a worker: the CLI runs in a subprocess, the worker in this test's event loop."""

from __future__ import annotations

from temporalio.testing import WorkflowEnvironment

from lab.config import LabConfig
from tests.e2e_support import assert_untouched, served_versions, snapshot, ssh_commands, zerodown
from tests.temporal_env import temporal_address


async def test_plan_prints_the_steps_and_changes_nothing(
    fresh_lab: LabConfig, temporal_env: WorkflowEnvironment, lab_worker: str
) -> None:
    lab = fresh_lab
    before = {i: len(ssh_commands(lab, i)) for i in lab.node_indexes}
    code, out = await zerodown(
        "plan",
        "rolling-deploy",
        "-i",
        str(lab.site_yaml),
        "-p",
        str(lab.package(2)),
        "--address",
        temporal_address(temporal_env),
        "--task-queue",
        lab_worker,
    )
    assert code == 0, out
    assert "plan (dry run, nothing was changed)" in out
    assert "D2 apply migration 2 (expand; down script present)" in out
    assert [line.split(":")[0].strip(" -") for line in out.splitlines() if "batch " in line] == [
        f"batch {b}" for b in lab.node_indexes
    ]
    for i in lab.node_indexes:
        assert not [c for c in ssh_commands(lab, i)[before[i] :] if "ctl stop" in c or "ctl start" in c]
    assert await served_versions(lab) == {lab.node_name(i): "1.0.0" for i in lab.node_indexes}


async def test_start_deploys_the_chosen_node_and_reports(
    fresh_lab: LabConfig, temporal_env: WorkflowEnvironment, lab_worker: str
) -> None:
    lab = fresh_lab
    code, out = await zerodown(
        "start",
        "rolling-deploy",
        "--inventory",
        str(lab.site_yaml),
        "--package",
        str(lab.package(2)),
        "--nodes",
        "node2",
        "--address",
        temporal_address(temporal_env),
        "--task-queue",
        lab_worker,
    )
    assert code == 0, out
    assert "started rolling-deploy as workflow rolling-deploy-lab-" in out
    assert "N9 wait UP on main" in out and "done: node2 now at 2.0.0" in out
    assert await served_versions(lab) == {
        **{lab.node_name(i): "1.0.0" for i in lab.node_indexes},
        "node2": "2.0.0",
    }


async def test_plan_ss_rolling_runs_its_preflight_and_prints_the_tasks(
    fresh_lab: LabConfig, temporal_env: WorkflowEnvironment, lab_worker: str
) -> None:
    lab = fresh_lab
    before = await snapshot(lab)
    args = (
        "-i",
        str(lab.site_yaml),
        "-p",
        str(lab.package(2)),
        "--address",
        temporal_address(temporal_env),
        "--task-queue",
        lab_worker,
    )
    code, out = await zerodown("plan", "ss-rolling", *args)
    assert code == 0, out
    assert "plan (dry run, nothing was changed)" in out and "plan hash: " in out
    half = (lab.nodes + 1) // 2
    group_b = ", ".join(lab.node_name(i) for i in lab.node_indexes if i > half)
    assert f"task seven: group B ({group_b}) out, upgrade, back" in out
    assert "task five: maintenance on, back up, maintenance off; staging at" in out
    await assert_untouched(lab, before)
    # An option the procedure does not take is refused before anything runs.
    code, out = await zerodown("plan", "ss-rolling", *args, "--nodes", "node1")
    assert code == 2 and "ss-rolling does not take --nodes" in out, out
    # A package Version Guard refuses: the preflight lists the versions to install first.
    code, out = await zerodown(
        "plan", "ss-load-balanced", "-i", str(lab.site_yaml), "-p", str(lab.package(3)), *args[4:]
    )
    assert code == 1 and "install 2.0.0 first, then 3.0.0" in out, out
    await assert_untouched(lab, before)
