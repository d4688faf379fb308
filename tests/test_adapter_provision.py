"""The product's provisioning adapter (activities/provision.py), against the real lab (session
fixture `lab`) where it needs one: a request of a run started before v0.3.0 (kind lab) still
served by the lab's commands, failing commands reporting their stderr, a command past its
timeout stopped with what it started, invalid output refused, a server array's commands run in
the inventory's folder, and the saved copy of settings (seed 003 step 5). The lab's own
provisioning is tested in tests/test_lab_provision.py.

Every test destroys the nodes it created. Activities run inside temporalio's
ActivityEnvironment (no worker).
"""

# ruff: noqa: F811  (the fixtures imported from tests.provision_support are named as test parameters)
from __future__ import annotations

import asyncio
import csv
import io
import json
import shlex
import stat
from pathlib import Path

import pytest
from temporalio.exceptions import ApplicationError

from activities.provision import (
    ArrayRequest,
    CreateServerRequest,
    SaveSettingsRequest,
    ServerRequest,
    provision_array_disable,
    provision_array_enable,
    provision_create,
    provision_destroy,
    save_settings_copy,
)
from inventory.model import Inventory, Node, Provisioning, ServerArray
from lab.config import LabConfig
from tests.provision_support import activity_env as _env
from tests.provision_support import command_inventory, created, inv, lab_cli  # noqa: F401  (fixtures)


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# =========================================================================== commands


async def test_a_run_started_before_v030_still_provisions(
    lab: LabConfig, inv: Inventory, created: list[str]
) -> None:
    # Its stored input says kind lab: the activity runs the lab's commands for it.
    prov = Provisioning(kind="lab", lab_root=str(lab.abs_root))
    created.append("old-run")
    here = str(lab.abs_root)
    node = await _env().run(provision_create, CreateServerRequest(prov, inv.node("node1"), "old-run", here))
    assert node.name == "old-run" and (lab.nodes_dir / "old-run").is_dir()
    await _env().run(provision_destroy, ServerRequest(prov, "old-run", here))
    assert not (lab.nodes_dir / "old-run").exists()


async def test_failing_command_reports_its_stderr(lab: LabConfig, inv: Inventory) -> None:
    here = str(lab.abs_root)
    bad = command_inventory(
        lab,
        kind="command",
        destroy="exit 3 # {name}",
        create="echo starting {name}; echo quota exceeded >&2; exit 4",
    ).provisioning
    assert bad is not None
    with pytest.raises(ApplicationError) as e:
        await _env().run(provision_create, CreateServerRequest(bad, inv.node("node1"), "web-f", here))
    assert e.value.type == "ProvisioningFailed" and "status 4" in e.value.message
    assert "quota exceeded" in e.value.message
    with pytest.raises(ApplicationError) as e:
        await _env().run(provision_destroy, ServerRequest(bad, "web-f", here))
    assert e.value.type == "ProvisioningFailed" and "status 3" in e.value.message
    # The lab's CLI fails the same way, with its reason on stderr.
    cli = command_inventory(
        lab, kind="command", create=lab_cli("create"), destroy=lab_cli("destroy")
    ).provisioning
    assert cli is not None
    ghost = Node(
        name="no-such-node",
        ssh=inv.node("node1").ssh,
        app_dir="app",
        service=inv.node("node1").service,
        url="http://127.0.0.1:1",
    )
    with pytest.raises(ApplicationError) as e:
        await _env().run(provision_create, CreateServerRequest(cli, ghost, "web-f", here))
    assert e.value.type == "ProvisioningFailed" and "status 1" in e.value.message
    assert "'no-such-node' is not an app node" in e.value.message
    assert not (lab.nodes_dir / "web-f").exists()


async def test_timeout_stops_the_command(inv: Inventory, tmp_path: Path) -> None:
    pidfile = tmp_path / "sleeper.pid"
    slow = Provisioning(
        kind="command",
        destroy="true {name}",
        timeout_s=1,
        create=f"sleep 30 & echo $! > {shlex.quote(str(pidfile))}; wait # {{name}}",
    )
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
    incomplete = Provisioning(kind="command", create=f"echo {braced} # {{name}}", destroy="true {name}")
    with pytest.raises(ApplicationError) as e:
        await _env().run(provision_create, CreateServerRequest(incomplete, inv.node("node1"), "web-j", here))
    assert e.value.type == "ProvisioningOutputInvalid"
    assert "node.ssh: required field is missing" in e.value.message
    assert "node.service: required field is missing" in e.value.message


async def test_array_commands_run_in_the_inventory_folder(tmp_path: Path) -> None:
    array = ServerArray(
        name="web-array",
        disable="echo disabled {name} > array.state",
        enable="echo enabled {name} > array.state",
    )
    req = ArrayRequest(Provisioning(kind="command", array=array), str(tmp_path))
    await _env().run(provision_array_disable, req)
    assert (tmp_path / "array.state").read_text() == "disabled web-array\n"
    await _env().run(provision_array_enable, req)
    assert (tmp_path / "array.state").read_text() == "enabled web-array\n"
    with pytest.raises(ApplicationError) as e:
        await _env().run(provision_array_enable, ArrayRequest(Provisioning(kind="command"), str(tmp_path)))
    assert e.value.type == "InvalidRequest" and "no server array" in e.value.message


# =========================================================================== saved settings


async def test_save_settings_copy_writes_the_old_values(
    lab: LabConfig, inv: Inventory, tmp_path: Path
) -> None:
    node1 = inv.node("node1")
    out = tmp_path / "backups"
    req = SaveSettingsRequest(
        node=node1,
        file="database.config",
        backup_dir=str(out),
        backup_id="run-1",
        keys=("host", "port", "password", "pool.max"),
    )
    saved = await _env().run(save_settings_copy, req)
    password = lab.db_password_file.read_text().strip()
    assert saved.path == str(out / "run-1-inputs.csv") and saved.values_count == 3
    assert saved.missing == ("pool.max",) and password not in repr(saved)
    assert stat.S_IMODE(Path(saved.path).stat().st_mode) == 0o600
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    text = Path(saved.path).read_text()
    assert list(csv.reader(io.StringIO(text))) == [
        ["key", "old_value", "present"],
        ["host", "127.0.0.1", "true"],
        ["port", str(lab.primary_db_port), "true"],
        ["password", password, "true"],
        ["pool.max", "", "false"],
    ]
    # A retry rewrites the same copy.
    assert await _env().run(save_settings_copy, req) == saved
    assert Path(saved.path).read_text() == text
    with pytest.raises(ApplicationError) as e:
        await _env().run(
            save_settings_copy,
            SaveSettingsRequest(
                node=node1, file="no-such.config", keys=("a",), backup_dir=str(out), backup_id="run-1"
            ),
        )
    assert e.value.type == "SettingsFileMissing"
