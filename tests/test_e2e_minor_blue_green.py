"""minor-blue-green (seed 003) end to end on the lab: new servers cloned by the lab's own
provisioning, attached to the real HAProxy at run time, the old ones drained by taking their
health-check file away (`http-check disable-on-404`), detached and terminated, with the
traffic probe counting every failed request."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from inventory.load import load_inventory
from inventory.model import SecretRef
from lab import mariadb as lab_mariadb
from lab.config import LabConfig, new_secret
from tests.blue_green_support import choose, main_servers, provisioned, two_old, wait_step
from tests.e2e_support import (
    assert_no_write_lost,
    keep_history,
    kill_worker_during,
    probe,
    start_worker_process,
)
from tests.temporal_env import temporal_address
from workflows.minor_blue_green import MinorBlueGreenInput, MinorBlueGreenResult, MinorBlueGreenWorkflow


def wf_id(name: str) -> str:
    return f"e2e-mbg-{name}-{uuid.uuid4().hex[:8]}"


async def start(
    client: Client, task_queue: str, inp: MinorBlueGreenInput, name: str
) -> WorkflowHandle[Any, Any]:
    return await client.start_workflow(
        MinorBlueGreenWorkflow.run,
        inp,
        id=wf_id(name),
        task_queue=task_queue,
        execution_timeout=timedelta(minutes=6),
    )


async def long_requests(lab: LabConfig, n: int, ms: int) -> list[tuple[int, str]]:
    """n slow requests through the main frontend at once: (status or -1, the server)."""

    async def one(session: aiohttp.ClientSession) -> tuple[int, str]:
        try:
            async with session.get(f"{lab.main_url}/slow?ms={ms}") as r:
                await r.read()
                return r.status, r.headers.get("X-Served-By", "")
        except aiohttp.ClientError:
            return -1, ""

    # One connection per request: each is its own session on its server.
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True, limit=0),
        timeout=aiohttp.ClientTimeout(total=ms / 1000 + 60),
    ) as s:
        return list(await asyncio.gather(*(one(s) for _ in range(n))))


async def test_minor_upgrade_with_zero_failed_requests_and_sessions_outliving_the_drain(
    fresh_lab: LabConfig, client: Client, lab_worker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = fresh_lab
    # A secret setting (issue 17.5): its reference travels, the worker resolves it; the
    # lab_worker fixture then finds the marked value in no history, status nor log.
    smtp_password = new_secret()
    monkeypatch.setenv("ZD_TEST_SMTP_PASSWORD", smtp_password)
    inv = load_inventory(lab.site_yaml)
    old = [lab.node_name(i) for i in lab.node_indexes]
    before = lab_mariadb.query(lab, "primary", "SELECT COUNT(*) FROM labapp.items")[0][0]
    inp = MinorBlueGreenInput(
        inventory=inv,
        package_path=str(lab.package(2)),
        drain_deadline_s=120,
        settings={"web.config": {"custom.banner": "Welcome to the blue-green site"}},
        secret_settings={"web.config": {"smtp.password": SecretRef(env="ZD_TEST_SMTP_PASSWORD")}},
    )
    with probe(lab, tmp_path, rate=100.0) as run:
        handle = await start(client, lab_worker, inp, "happy")
        # Long-lived sessions opened on the old servers just before they are drained.
        await wait_step(handle, "11 attach")
        sessions = asyncio.create_task(long_requests(lab, 2 * len(old), 6000))
        await choose(handle, "terminate", "terminate")
        result: MinorBlueGreenResult = await handle.result()
        long = await sessions

    assert run.summary["failed"] == 0, run.failures()[:5]

    assert_no_write_lost(lab, run)
    assert run.summary["total"] >= 500
    # The long requests: all finished untouched, some of them on old servers being drained.
    assert all(status == 200 for status, _ in long), long
    assert {srv for _, srv in long} & set(old), long
    new = [n.name for n in result.new_servers]
    assert len(new) == len(old) and result.terminated == tuple(old)
    # HAProxy: only the new servers in the backend, UP; the old ones detached.
    servers = main_servers(lab)
    assert set(servers) == set(new) and all(st.startswith("UP") for st in servers.values()), servers
    # Each new server runs 2.0.0 with the new setting; the old ones are gone (archived).
    for n in result.new_servers:
        async with aiohttp.ClientSession() as s, s.get(f"{n.url}/version") as r:
            assert (await r.json())["version"] == "2.0.0"
    assert provisioned(lab) == set(new)
    for name in old:
        assert not (lab.nodes_dir / name).exists()
    banner = (lab.nodes_dir / new[0] / "app" / "web.config").read_text()
    assert "custom.banner = Welcome to the blue-green site" in banner
    assert f"smtp.password = {smtp_password}" in banner
    # Step 5's copy of the settings: the template's old values, before the change.
    assert len(result.settings_copy) == 1
    saved = Path(result.settings_copy[0]).read_text()
    assert "custom.banner" in saved and "smtp.password" in saved
    # The additive migration ran before the new servers; no row was lost.
    assert lab_mariadb.schema_version(lab) == 2
    assert lab_mariadb.query(lab, "primary", "SELECT COUNT(*) FROM labapp.items")[0][0] >= before
    names = [(s.seed_step, s.name) for s in result.steps]
    assert ("10", "10 disable the server array") in names  # not applicable, recorded
    assert any(st == "13" for st, _ in names) and any(st == "18" for st, _ in names)


# "wait" (the gate opens again each deadline until the sessions end) is the logic tests'
# (test_minor_blue_green_logic.test_drain_deadline_wait_or_force): here, what the real
# balancer and sessions do when they are cut or the old servers come back.
@pytest.mark.parametrize("choice", ["force", "rollback"])
async def test_drain_deadline_gate(
    fresh_lab: LabConfig, client: Client, lab_worker: str, choice: str
) -> None:
    lab = fresh_lab
    inv = two_old(lab, load_inventory(lab.site_yaml))
    inp = MinorBlueGreenInput(
        inventory=inv, package_path=str(lab.package(2)), drain_deadline_s=2, gate_timeout_s=120
    )
    # Sessions opened before the run, long enough to outlive the drain's start: with node3
    # and node4 in maintenance they are all on node1 and node2.
    sessions = asyncio.create_task(long_requests(lab, 4, 25_000))
    await asyncio.sleep(0.5)
    handle = await start(client, lab_worker, inp, f"drain-{choice}")
    await choose(handle, "drain-deadline", choice)
    if choice == "rollback":
        # Newest first: the old servers back, the new ones destroyed, then the snapshot's gate.
        await choose(handle, "restore-snapshot", "keep")
        with pytest.raises(WorkflowFailureError):
            await handle.result()
        await keep_history(handle)  # the snapshot gate naming what a restore would undo
        long = await sessions
        # Back as before: node1 and node2 in the pool with their health files, no new server left.
        assert provisioned(lab) == set()
        servers = main_servers(lab)
        assert set(servers) == {lab.node_name(i) for i in lab.node_indexes}, servers
        assert servers["node1"].startswith("UP") and servers["node2"].startswith("UP"), servers
        assert all((lab.node_dir(i) / "health_check.html").is_file() for i in (1, 2))
        assert len(long) == 4 and all(r[0] == 200 and r[1] in ("node1", "node2") for r in long), long
        return
    await choose(handle, "terminate", "keep")
    result: MinorBlueGreenResult = await handle.result()
    long = await sessions
    assert result.forced_detach
    assert result.terminated == ()  # kept at the gate
    # Forcing cut the sessions the old servers still held (none finished there) without
    # waiting for them; HAProxy's l7 retry (`retry-on empty-response`, GET only) may
    # replay a cut request on a new server.
    assert not {srv for _, srv in long} & {"node1", "node2"}, long
    assert result.drain_s < 20, result.drain_s
    servers = main_servers(lab)
    assert "node1" not in servers and "node2" not in servers
    assert {n.name for n in result.new_servers} <= set(servers)


async def test_worker_killed_during_the_drain_wait_completes(
    fresh_lab: LabConfig, client: Client, tmp_path: Path, temporal_env: WorkflowEnvironment
) -> None:
    lab = fresh_lab
    inv = two_old(lab, load_inventory(lab.site_yaml))
    task_queue = f"mbg-kill-{uuid.uuid4().hex[:6]}"
    address = temporal_address(temporal_env)
    worker = start_worker_process(address, task_queue, tmp_path / "worker1.log")
    try:
        inp = MinorBlueGreenInput(inventory=inv, package_path=str(lab.package(2)), drain_deadline_s=60)
        sessions = asyncio.create_task(long_requests(lab, 4, 20_000))
        await asyncio.sleep(0.5)
        handle = await start(client, task_queue, inp, "kill")
        killed = await kill_worker_during(handle, worker, "13 wait for zero sessions")
        worker = start_worker_process(address, task_queue, tmp_path / "worker2.log")
        await choose(handle, "terminate", "terminate")
        result: MinorBlueGreenResult = await handle.result()
        long = await sessions
    finally:
        worker.kill()
        worker.wait()
    assert killed.startswith("13 wait for zero sessions"), killed
    assert len(long) == 4 and all(r[0] == 200 and r[1] in ("node1", "node2") for r in long), long
    assert result.terminated == ("node1", "node2")
    assert not (lab.nodes_dir / "node1").exists()
