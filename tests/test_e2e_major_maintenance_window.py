"""major-maintenance-window (seed 004) end to end on the lab: a warm replica on the lab's
third MariaDB server, the temporary test balancer, HAProxy's maintenance page switched at
run time, the swap of old and new servers, and the revert by promotion - with the traffic
probe counting every request."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from inventory.load import load_inventory
from lab import haproxy as lab_haproxy
from lab import mariadb as lab_mariadb
from lab.config import LabConfig
from tests.blue_green_support import choose, main_servers, pending, provisioned, two_old, wait_step
from tests.e2e_support import assert_no_write_lost, kill_worker_during, probe, start_worker_process
from tests.temporal_env import temporal_address
from workflows.major_maintenance_window import (
    MajorMaintenanceInput,
    MajorMaintenanceResult,
    MajorMaintenanceWindowWorkflow,
)
from workflows.timeline import Progress


async def start(
    client: Client, task_queue: str, inp: MajorMaintenanceInput, name: str
) -> WorkflowHandle[Any, Any]:
    return await client.start_workflow(
        MajorMaintenanceWindowWorkflow.run,
        inp,
        id=f"e2e-mmw-{name}-{uuid.uuid4().hex[:8]}",
        task_queue=task_queue,
        execution_timeout=timedelta(minutes=6),
    )


def rows_before(lab: LabConfig, role: str = "primary", upto: int | None = None) -> tuple[int, int, int]:
    """(max id, row count, checksum) of the items up to `upto` (default: all) on a server."""
    where = f"WHERE id <= {int(upto)}" if upto is not None else ""
    sql = (
        "SELECT COALESCE(MAX(id), 0), COUNT(*), "
        "COALESCE(SUM(CRC32(CONCAT_WS('|', id, node, body))), 0) FROM items " + where
    )
    rows = lab_mariadb.query(lab, role, sql, database="labapp")  # type: ignore[arg-type]
    return int(rows[0][0]), int(rows[0][1]), int(rows[0][2])


def step_times(result: MajorMaintenanceResult, seed: str) -> tuple[dt.datetime, dt.datetime]:
    steps = [s for s in result.steps if s.seed_step == seed and s.ended is not None]
    return min(s.started for s in steps), max(s.ended for s in steps if s.ended is not None)


async def test_major_upgrade_shows_only_the_maintenance_page_and_survives_a_killed_worker(
    fresh_lab: LabConfig, client: Client, tmp_path: Path, temporal_env: WorkflowEnvironment
) -> None:
    lab = fresh_lab
    inv = two_old(lab, load_inventory(lab.site_yaml))
    task_queue = f"mmw-{uuid.uuid4().hex[:6]}"
    address = temporal_address(temporal_env)
    worker = start_worker_process(address, task_queue, tmp_path / "worker1.log")
    inp = MajorMaintenanceInput(inventory=inv, package_path=str(lab.package(2)), writes_quiet_s=0.5)
    try:
        with probe(lab, tmp_path, rate=100.0) as run:
            handle = await start(client, task_queue, inp, "happy")
            await wait_step(handle, "7-9")
            # The warm replica applies events 4 s late (MariaDB's delayed replication): the
            # probe's last writes before step 19 keep step 21 waiting that long, and the
            # worker is killed while it waits.
            lab_mariadb.query(lab, "warm", "STOP SLAVE")
            lab_mariadb.query(lab, "warm", "CHANGE MASTER TO MASTER_DELAY = 4")
            lab_mariadb.query(lab, "warm", "START SLAVE")
            killed = await kill_worker_during(handle, worker, "21 warm replica in sync")
            worker = start_worker_process(address, task_queue, tmp_path / "worker2.log")
            await pending(handle, "go-live")
            # Writes stopped at 19 (the page is up, the old servers stopped): what is there now
            # is every row written before the window.
            before = rows_before(lab)
            await choose(handle, "go-live", "go-live")
            await choose(handle, "terminate", "terminate")
            result: MajorMaintenanceResult = await handle.result()
            await asyncio.sleep(1.0)
    finally:
        worker.kill()
        worker.wait()

    assert killed.startswith("21 warm replica in sync"), killed
    assert [s for s in result.steps if s.seed_step == "21" and s.result == "ok"]
    summary = run.summary
    # Only the maintenance page, never a failure: the page covers 18 to 31.
    assert summary["failed"] == 0, run.failures()[:5]
    assert summary["maintenance"] > 0
    first = dt.datetime.fromisoformat(summary["maintenance_first"])
    last = dt.datetime.fromisoformat(summary["maintenance_last"])
    page_on, _ = step_times(result, "18")
    _, page_off = step_times(result, "31")
    assert page_on - timedelta(seconds=1) <= first and last <= page_off + timedelta(seconds=1)
    # The data written before the window is all there, row for row (the probe writes items).
    assert before[1] > 0 and rows_before(lab, upto=before[0]) == before
    assert lab_mariadb.schema_version(lab) == 2
    # The new servers serve 2.0.0 behind main; the old ones are gone; the warm server is empty.
    servers = main_servers(lab)
    new = {n.name for n in result.new_servers}
    assert new <= set(servers) and "node1" not in servers and "node2" not in servers
    assert result.terminated == ("node1", "node2")
    assert provisioned(lab) == new
    assert not lab_mariadb.warm_problems(lab) or lab_mariadb.warm_databases(lab) == []
    assert not lab_haproxy.maintenance_on(lab)
    assert result.migration_s > 0 and result.downtime_s > result.migration_s
    seeds = [s.seed_step for s in result.steps]
    for seed in (
        "1",
        "5",
        "11",
        "12",
        "13",
        "16",
        "17",
        "18",
        "19",
        "20",
        "21",
        "22",
        "23",
        "24",
        "25",
        "30",
        "31",
        "32",
        "33",
        "37",
    ):
        assert seed in seeds, seed
    # The lab app reads the schema as it goes: the new servers ran before the window and were
    # not restarted in it; step 30 saw each of them through main, behind the page.
    started = [
        s.node or ""
        for s in result.steps
        if s.seed_step in ("12", "13")
        and s.result == "ok"
        and (" start it on " in s.name or "launch and test" in s.name)
    ]
    assert sorted(started) == sorted(new)
    restart = [s for s in result.steps if s.seed_step == "26"]
    assert [(s.name, s.result) for s in restart] == [("26-29 restart the new servers", "skipped")]
    assert [s.result for s in result.steps if s.name == "30 test through main behind the page"] == ["ok"]


async def test_revert_after_the_point_of_no_return_promotes_the_warm_replica(
    fresh_lab: LabConfig, client: Client, lab_worker: str, tmp_path: Path
) -> None:
    lab = fresh_lab
    inv = two_old(lab, load_inventory(lab.site_yaml))
    # An application that must be restarted after a migration: the new servers stay stopped
    # from step 12 and are started inside the window (26-29).
    inv = dataclasses.replace(
        inv, application=dataclasses.replace(inv.application, restart_after_migration=True)
    )
    inp = MajorMaintenanceInput(inventory=inv, package_path=str(lab.package(2)), writes_quiet_s=1.0)
    with probe(lab, tmp_path, rate=100.0) as run:
        handle = await start(client, lab_worker, inp, "revert")
        await pending(handle, "go-live")
        progress = await handle.query("progress", result_type=Progress)
        started_in_window = sorted(
            s.node or ""
            for s in progress.steps
            if s.seed_step == "26" and s.name == "26-29 start the new server"
        )
        before = rows_before(lab)
        await choose(handle, "go-live", "revert")
        with pytest.raises(WorkflowFailureError):
            await handle.result()
        await asyncio.sleep(1.0)
        after = rows_before(lab, "warm")
    assert run.summary["failed"] == 0, run.failures()[:5]
    assert_no_write_lost(lab, run, "warm")  # the promoted warm server serves the site now
    assert run.summary["maintenance"] > 0
    assert len(started_in_window) == 2 and "node1" not in started_in_window
    # The old servers are back, on v1, pointed at the promoted warm server, which is writable.
    servers = main_servers(lab)
    assert servers.get("node1", "").startswith("UP") and servers.get("node2", "").startswith("UP"), servers
    assert provisioned(lab) == set()
    assert not lab_haproxy.maintenance_on(lab)
    assert len(lab_mariadb.nodes_on_warm(lab)) == 2
    assert lab_mariadb.query(lab, "warm", "SELECT @@GLOBAL.read_only")[0][0] == 0
    # The promoted server has the old schema and every row written before the window; the
    # probe's writes after the page lifted went there.
    assert lab_mariadb.query(lab, "warm", "SELECT MAX(version) FROM labapp.schema_version")[0][0] == 1
    assert rows_before(lab, "warm", upto=before[0]) == before
    assert after[0] > before[0]
