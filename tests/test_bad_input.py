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

import dataclasses
import os
import uuid
import zipfile
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError

from activities import ssh
from inventory.load import load_inventory
from inventory.model import Inventory, SecretRef
from lab.config import LabConfig
from tests.e2e_support import (
    assert_untouched,
    closed_port,
    ensure_v1,
    history_text,
    secret_values,
    snapshot,
)
from workflows.rolling_deploy import RollingDeployInput, RollingDeployWorkflow

# ============================================================================ running a case


@pytest.fixture(scope="module")
async def inv(lab: LabConfig) -> AsyncIterator[Inventory]:
    await ensure_v1(lab)
    yield load_inventory(lab.site_yaml)
    # Connections pooled by the in-process worker belong to this module's tests.
    await ssh.POOL.close_all()


async def rejected(
    client: Client,
    task_queue: str,
    lab: LabConfig,
    inventory: Inventory,
    package: Path | str,
    error_type: str,
    expected: dict[str, tuple[str, ...]],
) -> dict[str, str]:
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
            id=wf_id,
            task_queue=task_queue,
            execution_timeout=timedelta(seconds=90),
        )
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
    return dataclasses.replace(
        inv, nodes=tuple(dataclasses.replace(n, **changes) if n.name == name else n for n in inv.nodes)
    )


def with_ssh(inv: Inventory, name: str, **changes: Any) -> Inventory:
    return with_node(inv, name, ssh=dataclasses.replace(inv.node(name).ssh, **changes))


def with_lb(inv: Inventory, **changes: Any) -> Inventory:
    return dataclasses.replace(
        inv, load_balancers=(dataclasses.replace(inv.load_balancers[0], **changes), *inv.load_balancers[1:])
    )


# ============================================================================ SSH


async def test_unreachable_ssh_host(client: Client, lab_worker: str, lab: LabConfig, inv: Inventory) -> None:
    port = closed_port()
    await rejected(
        client,
        lab_worker,
        lab,
        with_ssh(inv, "node2", port=port),
        lab.package(2),
        "SshUnreachable",
        {"node2": (f"zerodown@127.0.0.1:{port}", "cannot connect")},
    )


async def test_wrong_ssh_key(
    client: Client, lab_worker: str, lab: LabConfig, inv: Inventory, tmp_path: Path
) -> None:
    key = tmp_path / "other_ed25519"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(key))
    port = inv.node("node1").ssh.port
    problems = await rejected(
        client,
        lab_worker,
        lab,
        with_ssh(inv, "node1", key=SecretRef(file=str(key))),
        lab.package(2),
        "SshAuthFailed",
        {"node1": (f"zerodown@127.0.0.1:{port}", "authentication refused")},
    )
    assert key.read_text().splitlines()[1] not in problems["node1"]  # not even the wrong key leaks


# ============================================================================ HAProxy


async def test_haproxy_backend_not_found(
    client: Client, lab_worker: str, lab: LabConfig, inv: Inventory
) -> None:
    where = ("load balancer main", str(lab.haproxy_socket), "no such backend 'no_such_backend'")
    await rejected(
        client,
        lab_worker,
        lab,
        with_lb(inv, backend="no_such_backend"),
        lab.package(2),
        "LbMemberNotFound",
        {lab.node_name(i): where for i in lab.node_indexes},
    )


async def test_haproxy_server_not_found(
    client: Client, lab_worker: str, lab: LabConfig, inv: Inventory
) -> None:
    members = {**inv.load_balancers[0].members, "node3": "ghost3"}
    await rejected(
        client,
        lab_worker,
        lab,
        with_lb(inv, members=members),
        lab.package(2),
        "LbMemberNotFound",
        {"node3": ("load balancer main", "no such server app/ghost3 (node node3)")},
    )


# ============================================================================ packages


async def test_package_missing(
    client: Client, lab_worker: str, lab: LabConfig, inv: Inventory, tmp_path: Path
) -> None:
    missing = tmp_path / "app-9.zip"
    await rejected(
        client,
        lab_worker,
        lab,
        inv,
        missing,
        "PackageMissing",
        {"package": (f"package {missing} does not exist",)},
    )


async def test_package_corrupt_garbage(
    client: Client, lab_worker: str, lab: LabConfig, inv: Inventory, tmp_path: Path
) -> None:
    garbage = tmp_path / "app-2.zip"
    garbage.write_bytes(os.urandom(4096))
    await rejected(
        client, lab_worker, lab, inv, garbage, "PackageCorrupt", {"package": (str(garbage), "not a zip file")}
    )


async def test_package_corrupt_without_release_json(
    client: Client, lab_worker: str, lab: LabConfig, inv: Inventory, tmp_path: Path
) -> None:
    pkg = tmp_path / "app-2-no-release.zip"
    with zipfile.ZipFile(lab.package(2)) as src, zipfile.ZipFile(pkg, "w") as dst:
        for item in src.infolist():
            if item.filename != "release.json":
                dst.writestr(item, src.read(item))
    await rejected(
        client,
        lab_worker,
        lab,
        inv,
        pkg,
        "PackageCorrupt",
        {"package": (str(pkg), "no release.json at the root")},
    )


async def test_version_not_newer(client: Client, lab_worker: str, lab: LabConfig, inv: Inventory) -> None:
    await rejected(
        client,
        lab_worker,
        lab,
        inv,
        lab.package(1),
        "VersionNotNewer",
        {lab.node_name(i): (f"node{i} runs 1.0.0; package 1.0.0 is not newer",) for i in lab.node_indexes},
    )


# ============================================================================ secrets


async def test_secret_unset_environment_variable(
    client: Client, lab_worker: str, lab: LabConfig, inv: Inventory, monkeypatch: pytest.MonkeyPatch
) -> None:
    var = f"ZERODOWN_TEST_UNSET_{uuid.uuid4().hex[:8].upper()}"
    monkeypatch.delenv(var, raising=False)
    db = dataclasses.replace(inv.databases[0], password=SecretRef(env=var))
    await rejected(
        client,
        lab_worker,
        lab,
        dataclasses.replace(inv, databases=(db,)),
        lab.package(2),
        "SecretUnavailable",
        {"database": ("database main", f"environment variable {var} is not set")},
    )


async def test_secret_missing_file(
    client: Client, lab_worker: str, lab: LabConfig, inv: Inventory, tmp_path: Path
) -> None:
    missing = tmp_path / "missing"
    await rejected(
        client,
        lab_worker,
        lab,
        with_ssh(inv, "node2", key=SecretRef(file=str(missing))),
        lab.package(2),
        "SecretUnavailable",
        {"node2": (f"secret file {missing} does not exist", "needed by ssh")},
    )


async def test_protected_file_missing_on_a_node(
    client: Client, lab_worker: str, lab: LabConfig, inv: Inventory
) -> None:
    # The backup must hold encryption.config (seed 000, task one's Important box): a node
    # without it is refused before anything is backed up or changed.
    key = lab.node_dir(2) / "app" / "encryption.config"
    aside = key.with_name("encryption.config.aside")
    key.rename(aside)
    try:
        await rejected(
            client,
            lab_worker,
            lab,
            inv,
            lab.package(2),
            "ProtectedFileMissing",
            {"node2": ("protected file(s) missing: encryption.config",)},
        )
    finally:
        aside.rename(key)
