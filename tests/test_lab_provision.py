"""The lab's provisioning (lab/provision.py, `python -m lab.provision`) against the real lab
(session fixture `lab`): the lab's own inventory provisions through commands (as any site's
would) that clone, launch and terminate its app nodes; an inventory of the command kind
written here drives the same CLI (two creations at once, a clone of a clone); bad names and
templates refused; the CLI's output and exit codes; and lab_reset putting the lab back. The
product's provisioning adapter (activities/provision.py) against it is tested in
tests/test_adapter_provision.py.

Every test destroys the nodes it created; the one that destroys an original node resets
the lab.
"""

# ruff: noqa: F811  (the fixtures imported from tests.provision_support are named as test parameters)
from __future__ import annotations

import asyncio
import json
import socket
import stat
import sys
import tarfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from temporalio.exceptions import ApplicationError

from activities import ssh
from activities.provision import (
    CreateServerRequest,
    ServerRequest,
    provision_create,
    provision_destroy,
    provision_start,
)
from inventory.model import Inventory, Node
from lab import provision as lab_provision
from lab.config import BACKEND, LabConfig
from tests.provision_support import activity_env as _env
from tests.provision_support import command_inventory, created, inv, lab_cli  # noqa: F401  (fixtures)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
    except OSError:
        return True
    return False


async def get_json(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s, s.get(url) as r:
        return r.status, (await r.json() if r.content_type == "application/json" else await r.text())


def port_of(node: Node) -> int:
    return int(node.url.rsplit(":", 1)[1])


# =========================================================================== the lab's inventory


async def test_the_labs_inventory_clones_launches_terminates(
    lab: LabConfig, inv: Inventory, created: list[str]
) -> None:
    # The lab plugs in from outside: its inventory names commands, like a site's.
    prov = inv.provisioning
    assert prov is not None and prov.kind == "command" and "-m lab.provision create" in (prov.create or "")
    template = inv.node("node1")
    # A backup on the template must not travel with the clone.
    backups = lab.node_dir(1) / ".zerodown" / "backups"
    backups.mkdir(parents=True, exist_ok=True)
    (backups / "provision-test.tar").write_bytes(b"not for the clone")
    req = CreateServerRequest(
        provisioning=prov, template=template, name="web-a", inventory_dir=str(lab.abs_root)
    )
    created.append("web-a")
    try:
        node = await _env().run(provision_create, req)
    finally:
        (backups / "provision-test.tar").unlink()
    taken = {p for n in inv.nodes for p in (n.ssh.port, port_of(n))}
    assert node.name == "web-a" and node.ssh.port not in taken and port_of(node) not in taken
    slot = port_of(node) - lab.app_port(0)
    assert lab.nodes + 2 <= slot <= lab_provision.MAX_SLOT and node.ssh.port == lab.ssh_port(slot)
    assert node.app_dir == "app" and node.service == template.service
    assert node.ssh.key == template.ssh.key and node.ssh.known_hosts == template.ssh.known_hosts
    # Creating it again is the same server.
    assert await _env().run(provision_create, req) == node
    assert lab_provision.read_registry(lab)["nodes"]["web-a"]["slot"] == slot

    folder = lab.nodes_dir / "web-a"
    web = (folder / "app" / "web.config").read_text()
    assert f"http.port = {port_of(node)}" in web and "node.name = web-a" in web
    assert (folder / "health_check.html").is_file()
    assert (folder / ".zerodown" / "defaults" / "web.config").read_bytes() == (
        lab.node_dir(1) / ".zerodown" / "defaults" / "web.config"
    ).read_bytes()
    for f in ("database.config", "encryption.config", "admin.config"):
        assert (folder / "app" / f).read_bytes() == (lab.node_dir(1) / "app" / f).read_bytes()
    assert not (folder / ".zerodown" / "backups").exists() and not (folder / "ssh.log").exists()
    assert list((folder / "run").iterdir()) == []
    assert f"[127.0.0.1]:{node.ssh.port} " in lab.known_hosts.read_text()

    # Its own SSH endpoint, rooted in its folder.
    res = await ssh.run(node.ssh, "pwd; ./ctl status", timeout_s=10, check=False)
    assert res.stdout.splitlines()[0].endswith("nodes/web-a") and res.exit_status == 3

    # Launched: healthy, serving the template's release under its own name.
    await _env().run(
        provision_start, ServerRequest(provisioning=prov, name="web-a", inventory_dir=str(lab.abs_root))
    )
    status, _ = await get_json(f"{node.url}/health")
    assert status == 200
    _, mine = await get_json(f"{node.url}/version")
    _, theirs = await get_json(f"{template.url}/version")
    assert mine["version"] == theirs["version"] and mine["node"] == "web-a"

    # Terminated: service and endpoint gone (its sessions too), folder archived, slot free.
    await _env().run(
        provision_destroy, ServerRequest(provisioning=prov, name="web-a", inventory_dir=str(lab.abs_root))
    )
    assert refused(port_of(node)) and refused(node.ssh.port) and not folder.exists()
    with pytest.raises(ApplicationError) as e:
        await ssh.run(node.ssh, "true", timeout_s=5)
    assert e.value.type == "SshUnreachable"
    assert "web-a" not in lab_provision.read_registry(lab)["nodes"]
    archives = sorted((lab.abs_root / "terminated").glob("web-a-*.tar.gz"))
    assert archives and stat.S_IMODE(archives[-1].stat().st_mode) == 0o600
    with tarfile.open(archives[-1]) as tar:
        names = tar.getnames()
    assert "web-a/app/web.config" in names and "web-a/ctl" in names and "web-a/run/app.log" in names
    # Destroying an absent node is a no-op.
    await _env().run(
        provision_destroy, ServerRequest(provisioning=prov, name="web-a", inventory_dir=str(lab.abs_root))
    )
    assert sorted((lab.abs_root / "terminated").glob("web-a-*.tar.gz")) == archives
    # The lab's own nodes kept serving.
    status, _ = await get_json(f"{template.url}/health")
    assert status == 200


def test_lab_refuses_bad_names_and_templates(lab: LabConfig) -> None:
    for name in ("node9", "ox4", "staging", "../x", ""):
        with pytest.raises(lab_provision.ProvisionError):
            lab_provision.create_node(lab, "node1", name)
    with pytest.raises(lab_provision.ProvisionError, match="not an app node"):
        lab_provision.create_node(lab, "staging", "web-x")
    with pytest.raises(lab_provision.ProvisionError, match="not a node the lab provisioned"):
        lab_provision.destroy_node(lab, "staging")
    assert "web-x" not in lab_provision.read_registry(lab)["nodes"]


# =========================================================================== the command kind


async def test_command_kind_drives_the_lab_cli(lab: LabConfig, created: list[str]) -> None:
    inv = command_inventory(
        lab,
        kind="command",
        create=lab_cli("create"),
        start=lab_cli("start"),
        destroy=lab_cli("destroy"),
        timeout_s=120,
    )
    prov = inv.provisioning
    assert prov is not None and prov.kind == "command"
    here = str(lab.abs_root)
    created.extend(["cmd-b", "cmd-c"])
    b = await _env().run(provision_create, CreateServerRequest(prov, inv.node("node2"), "cmd-b", here))
    # Two at once: one a clone of the clone; the lab's lock gives each its own slot.
    c, b_again = await asyncio.gather(
        _env().run(provision_create, CreateServerRequest(prov, b, "cmd-c", here)),
        _env().run(provision_create, CreateServerRequest(prov, inv.node("node2"), "cmd-b", here)),
    )
    assert b_again == b and port_of(b) != port_of(c) and b.ssh.port != c.ssh.port
    assert b.ssh.key is not None and Path(b.ssh.key.file or "").is_absolute()
    for n in (b, c):
        await _env().run(provision_start, ServerRequest(prov, n.name, here))
        status, _ = await get_json(f"{n.url}/health")
        _, version = await get_json(f"{n.url}/version")
        assert status == 200 and version["node"] == n.name
        res = await ssh.run(n.ssh, "pwd", timeout_s=10)
        assert res.stdout.strip().endswith(f"nodes/{n.name}")
    for n in (c, b):
        await _env().run(provision_destroy, ServerRequest(prov, n.name, here))
        assert refused(port_of(n)) and refused(n.ssh.port) and not (lab.nodes_dir / n.name).exists()
    assert not {"cmd-b", "cmd-c"} & set(lab_provision.read_registry(lab)["nodes"])


# =========================================================================== lab reset


async def test_lab_reset_removes_provisioned_and_restores_destroyed_nodes(
    lab: LabConfig, inv: Inventory, created: list[str]
) -> None:
    from lab import haproxy
    from lab.manager import lab_reset

    prov = inv.provisioning
    assert prov is not None
    here = str(lab.abs_root)
    created.append("web-r")
    node = await _env().run(provision_create, CreateServerRequest(prov, inv.node("node1"), "web-r", here))
    await _env().run(provision_start, ServerRequest(prov, "web-r", here))
    last = inv.node(lab.node_name(lab.nodes))
    await _env().run(provision_destroy, ServerRequest(prov, last.name, here))
    assert refused(port_of(last)) and refused(last.ssh.port) and not lab.node_dir(lab.nodes).exists()
    assert sorted((lab.abs_root / "terminated").glob(f"{last.name}-*.tar.gz"))

    done = await lab_reset(lab)
    assert "destroyed provisioned node web-r" in done and f"re-created {last.name}" in done
    assert refused(port_of(node)) and refused(node.ssh.port) and not (lab.nodes_dir / "web-r").exists()
    assert lab_provision.read_registry(lab) == {"nodes": {}, "destroyed": []}
    status, version = await get_json(f"{last.url}/version")
    assert status == 200 and version["version"] == "1.0.0" and version["node"] == last.name
    res = await ssh.run(last.ssh, "pwd", timeout_s=10)
    assert res.stdout.strip().endswith(f"nodes/{last.name}")
    assert haproxy.server_states(lab)[(BACKEND, last.name)].startswith("UP")


async def test_cli_prints_absolute_paths_and_clear_exit_codes(
    lab: LabConfig, tmp_path: Path, created: list[str]
) -> None:
    async def cli(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "lab.provision",
            *args,
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        return proc.returncode or 0, out.decode(), err.decode()

    root = str(lab.abs_root)
    created.append("cli-a")
    rc, out, _ = await cli("create", "--root", root, "--template", "node1", "--name", "cli-a")
    entry = json.loads(out)
    assert rc == 0 and entry["name"] == "cli-a"
    assert entry["ssh"]["key"]["file"] == str(lab.client_key)
    assert entry["ssh"]["known_hosts"] == str(lab.known_hosts)
    rc, out, _ = await cli("destroy", "--root", root, "--name", "cli-a")
    assert rc == 0 and json.loads(out)["destroyed"] is True
    rc, out, _ = await cli("destroy", "--root", root, "--name", "cli-a")
    assert rc == 0 and json.loads(out)["destroyed"] is False
    rc, _, err = await cli("create", "--root", root, "--name", "cli-a")
    assert rc == 2 and "create needs --template" in err
    rc, _, err = await cli("start", "--root", str(tmp_path), "--name", "cli-a")
    assert rc == 1 and "no lab at" in err
