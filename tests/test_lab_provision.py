"""Servers that come and go, against the real lab (session fixture `lab`): the lab's own
inventory provisions through commands (`python -m lab.provision`, as any site's would), an
inventory of the command kind written here driving the same CLI, a request of a run started
before v0.3.0 (kind lab) still served, failing and misbehaving commands, the saved copy of
settings (seed 003 step 5) and lab_reset putting the lab back.

Every test destroys the nodes it created; the one that destroys an original node resets
the lab.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import shlex
import socket
import stat
import sys
import tarfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities import ssh
from activities.provision import (
    ArrayRequest,
    CreateServerRequest,
    SaveSettingsRequest,
    ServerRequest,
    provision_array_disable,
    provision_array_enable,
    provision_create,
    provision_destroy,
    provision_start,
    save_settings_copy,
)
from inventory.load import load_inventory
from inventory.model import Inventory, Node, Provisioning, ServerArray
from lab import provision as lab_provision
from lab.config import BACKEND, LabConfig


@pytest.fixture(scope="module")
async def inv(lab: LabConfig) -> AsyncIterator[Inventory]:
    yield load_inventory(lab.site_yaml)
    await ssh.POOL.close_all()


@pytest.fixture
def created(lab: LabConfig) -> Iterator[list[str]]:
    """Names a test provisions; whatever is left of them is destroyed afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        lab_provision.destroy_node(lab, name)


def _env() -> ActivityEnvironment:
    return ActivityEnvironment()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
    except OSError:
        return True
    return False


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


async def get_json(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s, s.get(url) as r:
        return r.status, (await r.json() if r.content_type == "application/json" else await r.text())


def port_of(node: Node) -> int:
    return int(node.url.rsplit(":", 1)[1])


def command_inventory(lab: LabConfig, **provisioning: Any) -> Inventory:
    """The lab's site.yaml with `provisioning` replaced, written next to it (so its relative
    paths still hold) and loaded."""
    raw = yaml.safe_load(lab.site_yaml.read_text(encoding="utf-8"))
    raw["provisioning"] = provisioning
    path = lab.abs_root / "provision-test-site.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return load_inventory(path)


def lab_cli(action: str) -> str:
    """A command template running the lab's provisioning CLI on the lab in the command's
    folder (the inventory's: the lab root)."""
    template = " --template {template}" if action == "create" else ""
    return f"{shlex.quote(sys.executable)} -m lab.provision {action} --root .{template} --name {{name}}"


# =========================================================================== the lab's inventory


async def test_the_labs_inventory_clones_launches_terminates(lab: LabConfig, inv: Inventory,
                                                             created: list[str]) -> None:
    # The lab plugs in from outside: its inventory names commands, like a site's.
    prov = inv.provisioning
    assert prov is not None and prov.kind == "command" and "-m lab.provision create" in (prov.create or "")
    template = inv.node("node1")
    # A backup on the template must not travel with the clone.
    backups = lab.node_dir(1) / ".zerodown" / "backups"
    backups.mkdir(parents=True, exist_ok=True)
    (backups / "provision-test.tar").write_bytes(b"not for the clone")
    req = CreateServerRequest(provisioning=prov, template=template, name="web-a",
                              inventory_dir=str(lab.abs_root))
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
    assert (folder / ".zerodown" / "defaults" / "web.config").read_bytes() == \
        (lab.node_dir(1) / ".zerodown" / "defaults" / "web.config").read_bytes()
    for f in ("database.config", "encryption.config", "admin.config"):
        assert (folder / "app" / f).read_bytes() == (lab.node_dir(1) / "app" / f).read_bytes()
    assert not (folder / ".zerodown" / "backups").exists() and not (folder / "ssh.log").exists()
    assert list((folder / "run").iterdir()) == []
    assert f"[127.0.0.1]:{node.ssh.port} " in lab.known_hosts.read_text()

    # Its own SSH endpoint, rooted in its folder.
    res = await ssh.run(node.ssh, "pwd; ./ctl status", timeout_s=10, check=False)
    assert res.stdout.splitlines()[0].endswith("nodes/web-a") and res.exit_status == 3

    # Launched: healthy, serving the template's release under its own name.
    await _env().run(provision_start, ServerRequest(provisioning=prov, name="web-a",
                                                    inventory_dir=str(lab.abs_root)))
    status, _ = await get_json(f"{node.url}/health")
    assert status == 200
    _, mine = await get_json(f"{node.url}/version")
    _, theirs = await get_json(f"{template.url}/version")
    assert mine["version"] == theirs["version"] and mine["node"] == "web-a"

    # Terminated: service and endpoint gone (its sessions too), folder archived, slot free.
    await _env().run(provision_destroy, ServerRequest(provisioning=prov, name="web-a",
                                                      inventory_dir=str(lab.abs_root)))
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
    await _env().run(provision_destroy, ServerRequest(provisioning=prov, name="web-a",
                                                      inventory_dir=str(lab.abs_root)))
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


async def test_a_run_started_before_v030_still_provisions(lab: LabConfig, inv: Inventory,
                                                         created: list[str]) -> None:
    # Its stored input says kind lab: the activity runs the lab's commands for it.
    prov = Provisioning(kind="lab", lab_root=str(lab.abs_root))
    created.append("old-run")
    here = str(lab.abs_root)
    node = await _env().run(provision_create, CreateServerRequest(prov, inv.node("node1"), "old-run", here))
    assert node.name == "old-run" and (lab.nodes_dir / "old-run").is_dir()
    await _env().run(provision_destroy, ServerRequest(prov, "old-run", here))
    assert not (lab.nodes_dir / "old-run").exists()


async def test_command_kind_drives_the_lab_cli(lab: LabConfig, created: list[str]) -> None:
    inv = command_inventory(lab, kind="command", create=lab_cli("create"), start=lab_cli("start"),
                            destroy=lab_cli("destroy"), timeout_s=120)
    prov = inv.provisioning
    assert prov is not None and prov.kind == "command"
    here = str(lab.abs_root)
    created.extend(["cmd-b", "cmd-c"])
    b = await _env().run(provision_create, CreateServerRequest(prov, inv.node("node2"), "cmd-b", here))
    # Two at once: one a clone of the clone; the lab's lock gives each its own slot.
    c, b_again = await asyncio.gather(
        _env().run(provision_create, CreateServerRequest(prov, b, "cmd-c", here)),
        _env().run(provision_create, CreateServerRequest(prov, inv.node("node2"), "cmd-b", here)))
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


async def test_failing_command_reports_its_stderr(lab: LabConfig, inv: Inventory) -> None:
    here = str(lab.abs_root)
    bad = command_inventory(lab, kind="command", destroy="exit 3 # {name}",
                            create="echo starting {name}; echo quota exceeded >&2; exit 4").provisioning
    assert bad is not None
    with pytest.raises(ApplicationError) as e:
        await _env().run(provision_create, CreateServerRequest(bad, inv.node("node1"), "web-f", here))
    assert e.value.type == "ProvisioningFailed" and "status 4" in e.value.message
    assert "quota exceeded" in e.value.message
    with pytest.raises(ApplicationError) as e:
        await _env().run(provision_destroy, ServerRequest(bad, "web-f", here))
    assert e.value.type == "ProvisioningFailed" and "status 3" in e.value.message
    # The lab's CLI fails the same way, with its reason on stderr.
    cli = command_inventory(lab, kind="command", create=lab_cli("create"),
                            destroy=lab_cli("destroy")).provisioning
    assert cli is not None
    ghost = Node(name="no-such-node", ssh=inv.node("node1").ssh, app_dir="app",
                 service=inv.node("node1").service, url="http://127.0.0.1:1")
    with pytest.raises(ApplicationError) as e:
        await _env().run(provision_create, CreateServerRequest(cli, ghost, "web-f", here))
    assert e.value.type == "ProvisioningFailed" and "status 1" in e.value.message
    assert "'no-such-node' is not an app node" in e.value.message
    assert not (lab.nodes_dir / "web-f").exists()


async def test_timeout_stops_the_command(inv: Inventory, tmp_path: Path) -> None:
    pidfile = tmp_path / "sleeper.pid"
    slow = Provisioning(kind="command", destroy="true {name}", timeout_s=1,
                        create=f"sleep 30 & echo $! > {shlex.quote(str(pidfile))}; wait # {{name}}")
    req = CreateServerRequest(slow, inv.node("node1"), "web-t", str(tmp_path))
    with pytest.raises(ApplicationError) as e:
        await _env().run(provision_create, req)
    assert e.value.type == "ProvisioningTimeout" and not e.value.non_retryable
    # What the command started went with it (its process group).
    pid = int(pidfile.read_text().strip())
    for _ in range(40):  # SIGTERM reached it with the shell; give it a moment to exit
        if not alive(pid):
            break
        await asyncio.sleep(0.05)
    assert not alive(pid)


async def test_invalid_output_is_refused(lab: LabConfig, inv: Inventory) -> None:
    here = str(lab.abs_root)
    not_json = Provisioning(kind="command", create="echo created {name}", destroy="true {name}")
    with pytest.raises(ApplicationError) as e:
        await _env().run(provision_create, CreateServerRequest(not_json, inv.node("node1"), "web-j", here))
    assert e.value.type == "ProvisioningOutputInvalid" and "created web-j" in e.value.message
    entry = json.dumps({"name": "web-j", "app_dir": "app", "url": "http://127.0.0.1:1"})
    # Braces doubled: the command is a str.format template.
    braced = shlex.quote(entry).replace("{", "{{").replace("}", "}}")
    incomplete = Provisioning(kind="command", create=f"echo {braced} # {{name}}",
                              destroy="true {name}")
    with pytest.raises(ApplicationError) as e:
        await _env().run(provision_create, CreateServerRequest(incomplete, inv.node("node1"), "web-j", here))
    assert e.value.type == "ProvisioningOutputInvalid"
    assert "node.ssh: required field is missing" in e.value.message
    assert "node.service: required field is missing" in e.value.message


async def test_array_commands_run_in_the_inventory_folder(tmp_path: Path) -> None:
    array = ServerArray(name="web-array", disable="echo disabled {name} > array.state",
                        enable="echo enabled {name} > array.state")
    req = ArrayRequest(Provisioning(kind="command", array=array), str(tmp_path))
    await _env().run(provision_array_disable, req)
    assert (tmp_path / "array.state").read_text() == "disabled web-array\n"
    await _env().run(provision_array_enable, req)
    assert (tmp_path / "array.state").read_text() == "enabled web-array\n"
    with pytest.raises(ApplicationError) as e:
        await _env().run(provision_array_enable, ArrayRequest(Provisioning(kind="command"), str(tmp_path)))
    assert e.value.type == "InvalidRequest" and "no server array" in e.value.message


# =========================================================================== saved settings


async def test_save_settings_copy_writes_the_old_values(lab: LabConfig, inv: Inventory,
                                                        tmp_path: Path) -> None:
    node1 = inv.node("node1")
    out = tmp_path / "backups"
    req = SaveSettingsRequest(node=node1, file="database.config", backup_dir=str(out), backup_id="run-1",
                              keys=("host", "port", "password", "pool.max"))
    saved = await _env().run(save_settings_copy, req)
    password = lab.db_password_file.read_text().strip()
    assert saved.path == str(out / "run-1-inputs.csv") and saved.values_count == 3
    assert saved.missing == ("pool.max",) and password not in repr(saved)
    assert stat.S_IMODE(Path(saved.path).stat().st_mode) == 0o600
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    text = Path(saved.path).read_text()
    assert list(csv.reader(io.StringIO(text))) == [
        ["key", "old_value", "present"], ["host", "127.0.0.1", "true"],
        ["port", str(lab.primary_db_port), "true"], ["password", password, "true"], ["pool.max", "", "false"]]
    # A retry rewrites the same copy.
    assert await _env().run(save_settings_copy, req) == saved
    assert Path(saved.path).read_text() == text
    with pytest.raises(ApplicationError) as e:
        await _env().run(save_settings_copy, SaveSettingsRequest(
            node=node1, file="no-such.config", keys=("a",), backup_dir=str(out), backup_id="run-1"))
    assert e.value.type == "SettingsFileMissing"


# =========================================================================== lab reset


async def test_lab_reset_removes_provisioned_and_restores_destroyed_nodes(
        lab: LabConfig, inv: Inventory, created: list[str]) -> None:
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


async def test_cli_prints_absolute_paths_and_clear_exit_codes(lab: LabConfig, tmp_path: Path,
                                                               created: list[str]) -> None:
    async def cli(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lab.provision", *args, cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
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
