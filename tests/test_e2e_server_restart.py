"""The Temporal server killed (SIGKILL) in the middle of a procedure and started again on its
database file: the run completes, under the probe, with no failed request.

Its own dev server (lab/devserver.py, the one `make demo` starts: SQLite state in
--db-filename) on the test lab's Temporal ports, and a worker process that outlives the
outage (its pollers retry until the server is back).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio.client import Client, WorkflowHandle
from temporalio.service import RPCError

from inventory.load import load_inventory
from lab.config import LabConfig
from lab.devserver import start_dev_server, stop_dev_server
from lab.procs import read_pid
from tests.e2e_support import (
    assert_no_write_lost,
    probe,
    served_versions,
    ssh_commands,
    start_worker_process,
    stop_process,
)
from workflows.rolling_deploy import RollingDeployInput, RollingDeployResult, RollingDeployWorkflow
from workflows.timeline import Progress

TASK_QUEUE = "server-restart"


@pytest.fixture
async def own_server(lab: LabConfig, tmp_path: Path) -> AsyncIterator[Path]:
    root = tmp_path / "temporal"
    await asyncio.to_thread(start_dev_server, root, lab.temporal_port, lab.temporal_ui_port)
    try:
        yield root
    finally:
        await asyncio.to_thread(stop_dev_server, root)


async def connect(address: str) -> Client:
    from worker.main import connect as zerodown_connect

    for _ in range(120):
        try:
            return await zerodown_connect(address)
        except (RuntimeError, RPCError):
            await asyncio.sleep(0.5)
    raise AssertionError(f"no Temporal server at {address}")


async def step_running(
    handle: WorkflowHandle[RollingDeployWorkflow, RollingDeployResult], prefix: str, node: str
) -> None:
    for _ in range(600):
        progress = await handle.query("progress", result_type=Progress)
        if any(
            s.result == "running" and s.name.startswith(prefix) and s.node == node for s in progress.steps
        ):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"step {prefix} on {node} never ran")


async def result_across_outage(address: str, workflow_id: str) -> RollingDeployResult:
    """The run's result, reconnecting while the server is down."""
    for _ in range(300):
        try:
            client = await connect(address)
            handle = client.get_workflow_handle(workflow_id, result_type=RollingDeployResult)
            return await handle.result()
        except RPCError:
            await asyncio.sleep(0.5)
    raise AssertionError("no result after the server came back")


async def test_the_server_killed_mid_procedure_and_restarted_loses_nothing(
    fresh_lab: LabConfig, own_server: Path, tmp_path: Path
) -> None:
    lab = fresh_lab
    address = f"127.0.0.1:{lab.temporal_port}"
    client = await connect(address)
    commands_before = {i: len(ssh_commands(lab, i)) for i in lab.node_indexes}
    worker = start_worker_process(address, TASK_QUEUE, tmp_path / "worker.log")
    try:
        with probe(lab, tmp_path) as run:
            handle = await client.start_workflow(
                RollingDeployWorkflow.run,
                RollingDeployInput(inventory=load_inventory(lab.site_yaml), package_path=str(lab.package(2))),
                id="server-restart",
                task_queue=TASK_QUEUE,
                execution_timeout=timedelta(minutes=6),
            )
            await step_running(handle, "N", "node2")
            pid = read_pid(own_server / "temporal.pid")
            assert pid is not None
            os.kill(pid, signal.SIGKILL)  # no flush, no goodbye
            await asyncio.sleep(2.0)
            assert worker.poll() is None  # the worker waits for the server
            await asyncio.to_thread(stop_dev_server, own_server)  # the stale pid file only
            await asyncio.to_thread(start_dev_server, own_server, lab.temporal_port, lab.temporal_ui_port)
            result = await asyncio.wait_for(result_across_outage(address, "server-restart"), timeout=300)
    finally:
        stop_process(worker)
    assert run.summary["failed"] == 0, run.failures()[:5]
    assert_no_write_lost(lab, run)
    assert await served_versions(lab) == {lab.node_name(i): "2.0.0" for i in lab.node_indexes}
    assert set(result.previous_versions.values()) == {"1.0.0"}
    # Nothing was done twice across the outage: each node stopped and started once.
    for i in lab.node_indexes:
        new = ssh_commands(lab, i)[commands_before[i] :]
        assert sum("ctl stop" in c for c in new) == 1 and sum("ctl start" in c for c in new) == 1, new
