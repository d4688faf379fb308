"""zerodown upgraded while a run waits at a gate (ARCHITECTURE.md, "Versioning"; README,
"Upgrading zerodown with runs in flight").

The previous release (the CHANGELOG's second entry: its commit, checked out as a git worktree)
runs its own worker; an `ox-upgradeschemata` run started there reaches a gate; the operator
upgrades as README says - stop the old worker, start this tree's - and decides the gate; the
run completes on the new code, and a new run takes the new code's paths (its history holds
the new patch markers). The previous release's `ox-upgradeschemata` differs from this tree's
(issue 14's patched changes), which the test checks first: without a difference it proves
nothing.

The run is stopped at `failure:6@<schema>` by a runupdate failure injected once (against
v0.1.0 the story is also a real one: that release runs runupdate without the -A/-P that
7.10.1 requires); after the upgrade `retry` completes it, its history replays on this tree,
and a new run takes this tree's patched paths.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from lab.config import LabConfig
from lab.ox import configdb
from tests.e2e_support import stop_process
from tests.gate_support import choose, pending
from tests.ox_support import classify, names, ox_fresh, s, schemata_input
from tests.temporal_env import temporal_address
from workflows.ox_upgradeschemata import PATCH_ORDER_AND_EMPTY, OxUpgradeSchemataResult
from workflows.registry import ALL_WORKFLOWS

ROOT = Path(__file__).resolve().parents[1]
PROCEDURE_FILE = "workflows/ox_upgradeschemata.py"
_RELEASE = re.compile(r"^## (v\d+\.\d+\.\d+)\b.*?commit `([0-9a-f]{7,40})`", re.M)


def releases() -> list[tuple[str, str]]:
    """(version, commit) of every release in CHANGELOG.md, newest first."""
    return _RELEASE.findall((ROOT / "CHANGELOG.md").read_text(encoding="utf-8"))


def previous_release() -> tuple[str, str]:
    """The newest release whose `ox-upgradeschemata` differs from this tree's: the upgrade an
    operator makes across a change of that workflow (an upgrade across none proves nothing)."""
    mine = (ROOT / PROCEDURE_FILE).read_text(encoding="utf-8")
    for version, commit in releases():
        theirs = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{commit}:{PROCEDURE_FILE}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        if theirs != mine:
            return version, commit
    raise AssertionError(f"CHANGELOG.md names no release whose {PROCEDURE_FILE} differs from this tree's")


@pytest.fixture(scope="module")
def previous_tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    version, commit = previous_release()
    tree = tmp_path_factory.mktemp("release") / version
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), commit],
        check=True,
        capture_output=True,
    )
    try:
        yield tree
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
            check=False,
            capture_output=True,
        )


def start_worker(tree: Path, address: str, task_queue: str, log: Path) -> subprocess.Popen[bytes]:
    """`python -m worker` from `tree` (this venv's packages, that tree's code: the editable
    install's finder, which maps the packages to this tree, is taken out by a sitecustomize)."""
    site = log.parent / f"site-{tree.name}"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import sys\nsys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{tree}", "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "worker", "--address", address, "--task-queue", task_queue]
    return subprocess.Popen(argv, cwd=tree, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


async def patch_markers(client: Client, workflow_id: str) -> set[str]:
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    found: set[str] = set()
    for e in history.events:
        if e.event_type == EventType.EVENT_TYPE_MARKER_RECORDED:
            attrs = e.marker_recorded_event_attributes
            if attrs.marker_name == "core_patch":  # data: {"id": <patch id>, "deprecated": ...}
                found |= {json.loads(p.data)["id"] for p in attrs.details["patch-data"].payloads}
    return found


async def test_a_run_waiting_at_a_gate_survives_the_upgrade_to_this_tree(
    lab: LabConfig,
    client: Client,
    temporal_env: WorkflowEnvironment,
    task_queue: str,
    previous_tree: Path,
    tmp_path: Path,
) -> None:
    # Worthless unless the two releases differ in this procedure's workflow code.
    old = (previous_tree / PROCEDURE_FILE).read_text(encoding="utf-8")
    assert old != (ROOT / PROCEDURE_FILE).read_text(encoding="utf-8")

    await ox_fresh(lab)
    configdb.inject_update_failure(lab, s(1), times=1)
    address, log = temporal_address(temporal_env), tmp_path / "workers.log"
    two = (s(1), s(2))
    old_worker = start_worker(previous_tree, address, task_queue, log)
    new_worker = None
    try:
        handle = await client.start_workflow(
            "ox-upgradeschemata",
            schemata_input(lab, schemata=two),
            id="upgrade-in-flight",
            task_queue=task_queue,
            execution_timeout=timedelta(minutes=5),
            result_type=OxUpgradeSchemataResult,
        )
        gate = await pending(handle, f"failure:6@{s(1)}")

        # README: stop the old worker, start the new one; the run waits at its gate meanwhile.
        stop_process(old_worker)
        new_worker = start_worker(ROOT, address, task_queue, log)
        # Asked again, as `zerodown resolve` does: this tree's code answers (and, the lab's
        # inventory listing approver keys, takes a signed decision only).
        gate = await pending(handle, gate.gate)
        await choose(handle, gate, "retry")
        result: OxUpgradeSchemataResult = await handle.result()
        assert set(result.upgraded) == set(two) and result.failed == ()
        assert classify(lab) == {"upgraded": names(1, 2), "untouched": names(*range(3, 21))}
        # Its whole history (old code before the gate, this tree's after) replays on this tree.
        history = await handle.fetch_history()
        replayer = Replayer(workflows=ALL_WORKFLOWS)
        replay = await replayer.replay_workflow(history, raise_on_replay_failure=False)
        assert replay.replay_failure is None, replay.replay_failure

        # A new run goes to the new code.
        fresh = await client.start_workflow(
            "ox-upgradeschemata",
            schemata_input(lab, schemata=(s(3),), expect_registered=True),
            id="upgrade-new-run",
            task_queue=task_queue,
            execution_timeout=timedelta(minutes=5),
        )
        await asyncio.wait_for(fresh.result(), timeout=120)
        assert PATCH_ORDER_AND_EMPTY in await patch_markers(client, "upgrade-new-run")
    finally:
        stop_process(old_worker)
        stop_process(new_worker)
        await ox_fresh(lab)
