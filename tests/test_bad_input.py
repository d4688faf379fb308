"""Bad input gets a clear error and nothing is touched (end-to-end on the real lab).

Each case starts the real `rolling-deploy` workflow on the session dev server with the real
worker against the running lab, with one thing broken, and checks that:

* the workflow fails with `PreflightFailed`, whose message names the problem (node,
  host:port, backend/server, path, variable) and whose details name the underlying error
  type (SshUnreachable, SshAuthFailed, LbMemberNotFound, PackageMissing, ...);
* nothing was touched: HAProxy states, no `ctl stop`/`ctl start` over SSH, every node's
  app folder and `.zerodown` folder byte for byte, the database schema version;
* no secret value appears in the failure or anywhere in the workflow's history.

Inventory-level bad input (YAML, unknown keys, missing fields) is in test_inventory.py;
the CLI's checks are in test_cli.py.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import os
import re
import socket
import uuid
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError

from activities import ssh
from activities.haproxy import parse_servers_state
from lab import haproxy as lab_haproxy
from lab import mariadb as lab_mariadb
from lab.config import BACKEND, LabConfig
from workflows.inventory import Inventory, SecretRef, load_inventory
from workflows.rolling_deploy import RollingDeployInput, RollingDeployWorkflow

# ============================================================================ the world's state


@dataclass(frozen=True)
class World:
    """What a run could have changed on the lab."""

    # "backend/server" -> "<show stat status> admin=<ready|drain|maint>"
    servers: dict[str, str]
    # node name -> number of lines in its ssh.log
    ssh_log_lines: dict[str, int]
    # node name -> {relative path -> sha256} of app/ and .zerodown/
    files: dict[str, dict[str, str]]
    schema_version: int


def _tree_hashes(node_dir: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for top in ("app", ".zerodown"):
        root = node_dir / top
        if not root.exists():
            continue
        for p in sorted(root.rglob("*")):
            rel = str(p.relative_to(node_dir))
            if p.is_symlink():
                out[rel] = "symlink:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                out[rel] = "dir"
    return out


def _ssh_log(lab: LabConfig, i: int) -> list[str]:
    log = lab.node_dir(i) / "ssh.log"
    return log.read_text(encoding="utf-8").splitlines() if log.exists() else []


def _snapshot_sync(lab: LabConfig) -> World:
    stats = lab_haproxy.server_states(lab)
    admin: dict[str, str] = {}
    for backend in sorted({b for b, _ in stats}):
        text = lab_haproxy.runtime_command(lab, f"show servers state {backend}")
        admin.update({f"{s.be_name}/{s.srv_name}": s.admin for s in parse_servers_state(text)})
    return World(
        servers={f"{b}/{s}": f"{st} admin={admin.get(f'{b}/{s}', '?')}" for (b, s), st in stats.items()},
        ssh_log_lines={lab.node_name(i): len(_ssh_log(lab, i)) for i in lab.node_indexes},
        files={lab.node_name(i): _tree_hashes(lab.node_dir(i)) for i in lab.node_indexes},
        schema_version=lab_mariadb.schema_version(lab),
    )


async def snapshot(lab: LabConfig) -> World:
    return await asyncio.to_thread(_snapshot_sync, lab)


async def assert_untouched(lab: LabConfig, before: World) -> None:
    """Nothing a deploy changes has changed since `before`; every app server ready and UP."""
    after = await snapshot(lab)
    assert after.servers == before.servers
    for i in lab.node_indexes:
        assert after.servers[f"{BACKEND}/{lab.node_name(i)}"] == "UP admin=ready"
    for i in lab.node_indexes:
        new = _ssh_log(lab, i)[before.ssh_log_lines[lab.node_name(i)]:]
        commands = [json.loads(line)["command"] for line in new]
        assert not [c for c in commands if re.search(r"ctl (stop|start)", c)], commands
    assert after.files == before.files
    assert after.schema_version == before.schema_version


def secret_values(lab: LabConfig) -> list[str]:
    """Every secret of the lab (DB, admin and SSH private key), as text that must never leak."""
    values = [lab.db_password_file.read_text().strip(), lab.admin_password_file.read_text().strip()]
    key_lines = lab.client_key.read_text().strip().splitlines()
    values += [ln for ln in key_lines if ln and not ln.startswith("-----")]
    assert all(len(v) >= 8 for v in values)
    return values


async def history_text(client: Client, workflow_id: str) -> str:
    """The workflow's whole history as text, with every payload's data decoded."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    raw = history.to_json()
    decoded = [base64.b64decode(m).decode("utf-8", "replace")
               for m in re.findall(r'"data":\s*"([A-Za-z0-9+/=]*)"', raw)]
    return "\n".join([raw, *decoded])


async def ensure_v1(lab: LabConfig) -> None:
    """Reset the lab unless it already is as just after `lab up`: v1 on every node, schema 1,
    every app server ready and UP, no fault injected."""
    async def version(i: int) -> str:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s, \
                s.get(f"http://127.0.0.1:{lab.app_port(i)}/version") as r:
            return str((await r.json())["version"]) if r.status == 200 else f"status {r.status}"

    try:
        world = await snapshot(lab)
        versions = await asyncio.gather(*(version(i) for i in lab.node_indexes))
        fresh = (world.schema_version == 1 and set(versions) == {"1.0.0"}
                 and all(world.servers.get(f"{BACKEND}/{lab.node_name(i)}") == "UP admin=ready"
                         for i in lab.node_indexes)
                 and not any(any((lab.node_dir(i) / "inject").glob("*")) for i in lab.node_indexes))
    except (OSError, aiohttp.ClientError, ValueError, KeyError):
        fresh = False
    if not fresh:
        from lab.manager import lab_reset

        await lab_reset(lab)


# ============================================================================ running a case


@pytest.fixture(scope="module")
async def inv(lab: LabConfig) -> AsyncIterator[Inventory]:
    await ensure_v1(lab)
    yield load_inventory(lab.site_yaml)
    # Connections pooled by the in-process worker belong to this module's tests.
    await ssh.POOL.close_all()


async def rejected(client: Client, task_queue: str, lab: LabConfig, inventory: Inventory,
                   package: Path | str, error_type: str,
                   expected: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """Run rolling-deploy and assert it was refused before touching anything.

    PreflightFailed, with `error_type` in its details and one problem line per subject in
    `expected` (node name, "package" or "database"): exactly those subjects,
    each line containing every expected fragment. Nothing touched, no secret anywhere in the
    failure or the history. Returns {subject: problem line}."""
    before = await snapshot(lab)
    wf_id = f"bad-input-{uuid.uuid4().hex[:12]}"
    with pytest.raises(WorkflowFailureError) as info:
        await client.execute_workflow(
            RollingDeployWorkflow.run,
            RollingDeployInput(inventory=inventory, package_path=str(package)),
            id=wf_id, task_queue=task_queue, execution_timeout=timedelta(seconds=90))
    cause = info.value.cause
    assert isinstance(cause, ApplicationError), repr(cause)
    assert (cause.type, cause.non_retryable) == ("PreflightFailed", True), cause
    head, *lines = cause.message.splitlines()
    assert head == "preflight failed, nothing was changed:", cause.message
    assert error_type in cause.details, (cause.details, cause.message)
    problems = dict(line.strip().split(": ", 1) for line in lines)
    assert sorted(problems) == sorted(expected), cause.message
    for subject, fragments in expected.items():
        for text in fragments:
            assert text in problems[subject], f"{text!r} not in {subject}'s problem {problems[subject]!r}"
    await assert_untouched(lab, before)
    history = await history_text(client, wf_id)
    for secret in secret_values(lab):
        assert secret not in cause.message and secret not in str(cause.details)
        assert secret not in history
    return problems


def with_node(inv: Inventory, name: str, **changes: Any) -> Inventory:
    return dataclasses.replace(inv, nodes=tuple(
        dataclasses.replace(n, **changes) if n.name == name else n for n in inv.nodes))


def with_ssh(inv: Inventory, name: str, **changes: Any) -> Inventory:
    return with_node(inv, name, ssh=dataclasses.replace(inv.node(name).ssh, **changes))


def with_lb(inv: Inventory, **changes: Any) -> Inventory:
    return dataclasses.replace(inv, load_balancers=(
        dataclasses.replace(inv.load_balancers[0], **changes), *inv.load_balancers[1:]))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# ============================================================================ SSH


async def test_unreachable_ssh_host(client: Client, lab_worker: str, lab: LabConfig,
                                    inv: Inventory) -> None:
    port = closed_port()
    await rejected(client, lab_worker, lab, with_ssh(inv, "node2", port=port), lab.package(2),
                   "SshUnreachable", {"node2": (f"zerodown@127.0.0.1:{port}", "cannot connect")})


async def test_wrong_ssh_key(client: Client, lab_worker: str, lab: LabConfig, inv: Inventory,
                             tmp_path: Path) -> None:
    key = tmp_path / "other_ed25519"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(key))
    port = inv.node("node1").ssh.port
    problems = await rejected(
        client, lab_worker, lab, with_ssh(inv, "node1", key=SecretRef(file=str(key))), lab.package(2),
        "SshAuthFailed", {"node1": (f"zerodown@127.0.0.1:{port}", "authentication refused")})
    assert key.read_text().splitlines()[1] not in problems["node1"]  # not even the wrong key leaks


# ============================================================================ HAProxy


async def test_haproxy_backend_not_found(client: Client, lab_worker: str, lab: LabConfig,
                                         inv: Inventory) -> None:
    where = ("load balancer main", str(lab.haproxy_socket), "no such backend 'no_such_backend'")
    await rejected(client, lab_worker, lab, with_lb(inv, backend="no_such_backend"), lab.package(2),
                   "LbMemberNotFound", {lab.node_name(i): where for i in lab.node_indexes})


async def test_haproxy_server_not_found(client: Client, lab_worker: str, lab: LabConfig,
                                        inv: Inventory) -> None:
    members = {**inv.load_balancers[0].members, "node3": "ghost3"}
    await rejected(client, lab_worker, lab, with_lb(inv, members=members), lab.package(2),
                   "LbMemberNotFound",
                   {"node3": ("load balancer main", "no such server app/ghost3 (node node3)")})


# ============================================================================ packages


async def test_package_missing(client: Client, lab_worker: str, lab: LabConfig, inv: Inventory,
                               tmp_path: Path) -> None:
    missing = tmp_path / "app-9.zip"
    await rejected(client, lab_worker, lab, inv, missing, "PackageMissing",
                   {"package": (f"package {missing} does not exist",)})


async def test_package_corrupt_garbage(client: Client, lab_worker: str, lab: LabConfig,
                                       inv: Inventory, tmp_path: Path) -> None:
    garbage = tmp_path / "app-2.zip"
    garbage.write_bytes(os.urandom(4096))
    await rejected(client, lab_worker, lab, inv, garbage, "PackageCorrupt",
                   {"package": (str(garbage), "not a zip file")})


async def test_package_corrupt_without_release_json(client: Client, lab_worker: str, lab: LabConfig,
                                                    inv: Inventory, tmp_path: Path) -> None:
    pkg = tmp_path / "app-2-no-release.zip"
    with zipfile.ZipFile(lab.package(2)) as src, zipfile.ZipFile(pkg, "w") as dst:
        for item in src.infolist():
            if item.filename != "release.json":
                dst.writestr(item, src.read(item))
    await rejected(client, lab_worker, lab, inv, pkg, "PackageCorrupt",
                   {"package": (str(pkg), "no release.json at the root")})


async def test_version_not_newer(client: Client, lab_worker: str, lab: LabConfig,
                                 inv: Inventory) -> None:
    await rejected(client, lab_worker, lab, inv, lab.package(1), "VersionNotNewer",
                   {lab.node_name(i): (f"node{i} runs 1.0.0; package 1.0.0 is not newer",)
                    for i in lab.node_indexes})


# ============================================================================ secrets


async def test_secret_unset_environment_variable(client: Client, lab_worker: str, lab: LabConfig,
                                                 inv: Inventory, monkeypatch: pytest.MonkeyPatch) -> None:
    var = f"ZERODOWN_TEST_UNSET_{uuid.uuid4().hex[:8].upper()}"
    monkeypatch.delenv(var, raising=False)
    db = dataclasses.replace(inv.databases[0], password=SecretRef(env=var))
    await rejected(client, lab_worker, lab, dataclasses.replace(inv, databases=(db,)), lab.package(2),
                   "SecretUnavailable",
                   {"database": ("database main", f"environment variable {var} is not set")})


async def test_secret_missing_file(client: Client, lab_worker: str, lab: LabConfig, inv: Inventory,
                                   tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    await rejected(client, lab_worker, lab, with_ssh(inv, "node2", key=SecretRef(file=str(missing))),
                   lab.package(2), "SecretUnavailable",
                   {"node2": (f"secret file {missing} does not exist", "needed by ssh")})
