"""The node adapters on a Windows node, against the lab's Win32-OpenSSH stand-in (lab/windows):
the IIS service control of the hardening issue (17, point 4: PowerShell with
`$ErrorActionPreference = 'Stop'`, a stop that waits for the worker process, a shared app
pool refused), the storage preflight, open sessions and the health file, each the same as the
Linux path on the same node where both exist."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from temporalio.exceptions import ApplicationError

from activities import node as node_acts
from activities import powershell, ssh
from inventory.load import load_inventory
from inventory.model import Inventory, Node
from lab import nodes as lab_nodes
from lab.config import LabConfig
from lab.mssql import lab as mssql_lab
from lab.windows import state as win_state
from workflows import prerequisites

INDEX = 3


@pytest.fixture(scope="module")
async def site(lab: LabConfig) -> AsyncIterator[Inventory]:
    yield load_inventory(dataclasses.replace(lab, profile="secret-server").site_yaml)
    await ssh.POOL.close_all()


@pytest.fixture
async def iis_node(site: Inventory, lab: LabConfig) -> AsyncIterator[Node]:
    """node3 as an IIS node, running, its IIS configuration as installed afterwards."""
    n = site.node(lab.node_name(INDEX))
    assert n.os == "windows" and n.service.kind == "iis"
    config = win_state.iis_config(lab, INDEX)
    yield n
    win_state.set_iis_config(lab, INDEX, config)
    await node_acts.set_running(n, True)


def _alive(pid: int) -> bool:
    """Running, not a zombie (PID 1 here may never reap the app's orphans)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _app_pid(lab: LabConfig) -> int | None:
    try:
        pid = int((lab.node_dir(INDEX) / "run" / "app.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


async def test_a_stop_waits_for_the_worker_process_and_a_start_for_started(
    iis_node: Node, lab: LabConfig
) -> None:
    pid = _app_pid(lab)
    assert pid is not None
    # A script zerodown did not write stops the pool: Stopping, then Stopped while the
    # worker process may still run. zerodown's stop then waits for both.
    await powershell.run(
        iis_node.ssh, "Import-Module WebAdministration; Stop-WebAppPool -Name 'SecretServer'", what="stop"
    )
    stopped = await node_acts.set_running(iis_node, False)
    assert not stopped.running and stopped.settled and stopped.detail == "Stopped"
    assert _app_pid(lab) is None and not _alive(pid)
    assert not lab_nodes.node_running(lab, INDEX)
    started = await node_acts.set_running(iis_node, True)
    assert started.running and started.changed and started.detail == "Started"
    async with aiohttp.ClientSession() as s, s.get(f"{iis_node.url}/health") as r:
        assert r.status == 200
    # Idempotent: a second start changes nothing.
    assert not (await node_acts.set_running(iis_node, True)).changed


async def test_a_pool_that_serves_other_applications_is_not_stopped(iis_node: Node, lab: LabConfig) -> None:
    config = win_state.iis_config(lab, INDEX)
    shared = dict(config)
    shared["applications"] = [
        {
            "site": "Default Web Site",
            "path": "/reports",
            "applicationPool": "SecretServer",
            "physicalPath": "C:\\reports",
        }
    ]
    win_state.set_iis_config(lab, INDEX, shared)
    with pytest.raises(ApplicationError) as info:
        await node_acts.set_running(iis_node, False)
    assert info.value.type == "SshCommandFailed"
    assert "exited with status 5" in info.value.message and "also serves /reports" in info.value.message
    assert (await node_acts.status_of(iis_node)).running  # nothing was stopped
    # Declared as intended: the stop goes ahead.
    allowed = dataclasses.replace(iis_node, service=dataclasses.replace(iis_node.service, shared_pool=True))
    assert not (await node_acts.set_running(allowed, False)).running


async def test_an_unknown_site_fails_with_powershells_error_and_stops_nothing(iis_node: Node) -> None:
    wrong = dataclasses.replace(iis_node, service=dataclasses.replace(iis_node.service, site="SecretServr"))
    with pytest.raises(ApplicationError) as info:
        await node_acts.set_running(wrong, False)
    assert info.value.type == "SshCommandFailed" and "exited with status 1" in info.value.message
    assert "SecretServr" in info.value.message
    assert (await node_acts.status_of(iis_node)).running


async def test_storage_sessions_and_health_file_on_the_windows_path(iis_node: Node, lab: LabConfig) -> None:
    linux = Node(
        name=iis_node.name,
        ssh=dataclasses.replace(iis_node.ssh, port=lab.ssh_port(INDEX)),
        app_dir="app",
        service=iis_node.service,
        url=iis_node.url,
    )
    storage = await node_acts.inspect_storage(iis_node, ("encryption.config", "missing.key"), 1000)
    app = lab.node_dir(INDEX) / "app"
    assert storage.app_bytes == sum(p.stat().st_size for p in app.rglob("*") if p.is_file())
    assert storage.free_bytes > 0 and storage.missing_protected == ("missing.key",) and not storage.ok
    posix = await node_acts.inspect_storage(linux, ("encryption.config", "missing.key"), 1000)
    assert posix.missing_protected == storage.missing_protected
    assert abs(posix.free_bytes - storage.free_bytes) < 64 << 20  # the same filesystem
    # One open keep-alive connection to the node: both counts see it.
    reader, writer = await asyncio.open_connection("127.0.0.1", lab.app_port(INDEX))
    try:
        request = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{lab.app_port(INDEX)}\r\n\r\n"
        writer.write(request.encode())
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        win = await node_acts.count_open_sessions(node_acts.ServiceRequest(iis_node))
        lin = await node_acts.count_open_sessions(node_acts.ServiceRequest(linux))
        assert win.sessions == lin.sessions >= 1
    finally:
        writer.close()
    health = lab.node_dir(INDEX) / "health_check.html"
    original = health.read_bytes()
    try:
        req = node_acts.HealthFileRequest(iis_node, "health_check.html", present=False)
        assert (await node_acts.set_health_file(req)).changed and not health.exists()
        assert not (await node_acts.set_health_file(req)).changed
        back = node_acts.HealthFileRequest(iis_node, "health_check.html", present=True)
        assert (await node_acts.set_health_file(back)).changed and health.read_bytes() == original
    finally:
        if not health.exists():
            health.write_bytes(original)


async def test_a_recycle_gives_the_pool_a_new_worker_process(iis_node: Node, lab: LabConfig) -> None:
    before = _app_pid(lab)
    assert before is not None
    state = await node_acts.recycle(iis_node)
    assert state.running and state.changed and state.detail == "Started"
    deadline = asyncio.get_running_loop().time() + 30
    async with aiohttp.ClientSession() as s:
        while True:  # the recycled worker comes back on the node's port
            try:
                async with s.get(f"{iis_node.url}/health") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.2)
    after = _app_pid(lab)
    assert after is not None and after != before and not _alive(before)
    script = node_acts.iis_scripts("SecretServer", "SecretServer", 60).recycle
    assert "Restart-WebAppPool -Name 'SecretServer'" in script


async def test_the_prerequisite_facts_come_from_the_node_and_the_database(
    iis_node: Node, site: Inventory, lab: LabConfig
) -> None:
    from activities import facts

    got = await facts.read_node_facts(facts.NodeFactsRequest(iis_node))
    system = win_state.iis_config(lab, INDEX)["system"]
    assert (got.os, got.os_version, got.dotnet_release, got.pipeline_mode) == (
        "windows",
        system["version"],
        system["net_release"],
        "Integrated",
    )
    assert "Windows Server" in got.os_caption
    # Changed on the node (an old server, Classic mode): the facts say so.
    config = win_state.iis_config(lab, INDEX)
    config["system"] = {**config["system"], "version": "6.0.6002", "net_release": 378389}
    config["pools"] = [{**p, "managedPipelineMode": "Classic"} for p in config["pools"]]
    win_state.set_iis_config(lab, INDEX, config)
    changed = await facts.read_node_facts(facts.NodeFactsRequest(iis_node))
    assert (changed.os_version, changed.dotnet_release, changed.pipeline_mode) == (
        "6.0.6002",
        378389,
        "Classic",
    )
    linux = dataclasses.replace(iis_node, os="linux")
    assert await facts.read_node_facts(facts.NodeFactsRequest(linux)) == facts.NodeFacts(
        node_name="node3", os="linux"
    )
    sql = await facts.read_database_version(facts.DatabaseFactsRequest(site.databases[0]))
    assert sql.kind == "mssql" and sql.version.startswith("16.")
    # The rules on what was read: the old server, Classic mode and .NET 4.5 fail, each naming it.
    mssql_lab.set_product_version(lab, "10.50.6000.34")  # SQL Server 2008 R2
    try:
        old_sql = await facts.read_database_version(facts.DatabaseFactsRequest(site.databases[0]))
    finally:
        mssql_lab.set_product_version(lab, None)
    assert old_sql.version == "10.50.6000.34"
    fact = prerequisites.NodeFact(
        node=changed.node_name,
        os=changed.os,
        os_version=changed.os_version,
        dotnet_release=changed.dotnet_release,
        pipeline_mode=changed.pipeline_mode,
        installed_version="10.6.000000",
    )
    failed = prerequisites.failures(prerequisites.check("11.0.000000", "mssql", old_sql.version, [fact]))
    assert [f.split(":")[0] for f in failed] == [
        "10.7 and later need SQL Server 2012 or later",
        "10.0 and later need the integrated pipeline mode",
        "8.9 and later need Windows Server 2008 R2 or later",
        "8.5 and later need .NET Framework 4.5.1",
    ]
    assert "SQL Server 10.50.6000.34" in failed[0] and "Classic" in failed[1] and "6.0.6002" in failed[2]
    maria = load_inventory(lab.site_yaml).databases[0]
    assert "MariaDB" in (await facts.read_database_version(facts.DatabaseFactsRequest(maria))).version
