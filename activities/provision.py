"""Servers that come and go (seeds 003 and 004): create a server from a template, launch it,
terminate it; stop a server array from launching and let it launch again; save a copy of
the settings a procedure is about to change.

Provisioning is the inventory's own commands (Provisioning, inventory/model.py), run on
the worker's machine in the inventory's folder with `{template}` / `{name}` (shell quoted)
substituted by str.format (a literal brace is written `{{` / `}}`). `create` prints the new
server's `nodes` entry as JSON, validated like an inventory's (relative paths: the
inventory's folder). The embedded lab plugs in the same way (its inventory names
`python -m lab.provision` commands); nothing here knows the lab. A request of a run started
before v0.3.0 may still say kind=lab with a `lab_root`: it gets the lab's commands
(`legacy_lab_commands`), so such a run finishes on this worker.

Every command must be safe to run twice (a retried step runs it again); the activities add
nothing that is not. They heartbeat while a command runs and stop it (its whole process
group) after `timeout_s` or when the activity is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import io
import json
import os
import posixpath
import shlex
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from temporalio import activity

from activities import ssh
from activities.common import check_id, fail, tail, with_heartbeat
from errors import (
    INVALID_REQUEST,
    MERGE_UNSUPPORTED,
    PROVISIONING_FAILED,
    PROVISIONING_OUTPUT_INVALID,
    PROVISIONING_TIMEOUT,
    SETTINGS_FILE_MISSING,
)
from inventory.load import parse_node_entry
from inventory.model import InventoryError, Node, Provisioning

# How long a stopped command gets between SIGTERM and SIGKILL.
KILL_GRACE_S = 5.0


@dataclass(frozen=True)
class CreateServerRequest:
    provisioning: Provisioning
    template: Node  # the server cloned
    name: str  # the new server's name
    inventory_dir: str  # where the commands run; relative paths of their output start here


@dataclass(frozen=True)
class ServerRequest:
    provisioning: Provisioning
    name: str
    inventory_dir: str


@dataclass(frozen=True)
class ArrayRequest:
    provisioning: Provisioning
    inventory_dir: str


@dataclass(frozen=True)
class SaveSettingsRequest:
    node: Node  # the server whose current values are saved (e.g. the template)
    file: str  # a `key = value` file relative to the node's app_dir
    keys: tuple[str, ...]  # the settings about to change ("section.key" inside sections)
    backup_dir: str  # on the worker
    backup_id: str  # the copy is <backup_dir>/<backup_id>-inputs.csv
    # Keys whose values are secrets (application.secret_keys, --secret-setting): masked
    # wherever this worker might show them (activities/secrets.py).
    secret_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class SavedSettings:
    path: str
    values_count: int  # keys that had a value (rows with present=true)
    missing: tuple[str, ...] = ()  # keys the file did not have (present=false)


# --------------------------------------------------------------------------- commands


def _check_name(name: str) -> None:
    check_id("server name", name)


def _inventory_dir(path: str) -> str:
    if not path or not os.path.isdir(path):
        fail(INVALID_REQUEST, f"inventory folder {path!r} does not exist (provisioning commands run there)")
    return path


def render_command(command: str, **values: str) -> str:
    """The command line with each value shell-quoted in its `{placeholder}`."""
    try:
        return command.format(**{k: shlex.quote(v) for k, v in values.items()})
    except (KeyError, IndexError, ValueError) as e:
        fail(
            INVALID_REQUEST,
            f"provisioning command {command!r}: cannot substitute "
            f"{', '.join('{' + k + '}' for k in values)}: {e!r} (write a literal "
            "brace as {{ or }})",
        )


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """Stop the command and whatever it started (it runs in its own session)."""
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5.0)):
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), grace)


async def run_command(command: str, cwd: str, timeout_s: float, what: str) -> str:
    """Run a shell command on the worker's machine; its stdout, or ProvisioningFailed
    (exit status and stderr tail) / ProvisioningTimeout. Heartbeats meanwhile."""
    proc = await asyncio.create_subprocess_shell(
        command,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    started = time.monotonic()
    try:
        out, err = await asyncio.wait_for(
            with_heartbeat(
                proc.communicate(),
                lambda: {
                    "provisioning": what,
                    "command": command[:200],
                    "running_s": round(time.monotonic() - started, 1),
                },
            ),
            timeout_s,
        )
    except TimeoutError:
        fail(
            PROVISIONING_TIMEOUT,
            f"{what}: command {command!r} did not finish within {timeout_s:g}s",
            retryable=True,
        )
    finally:
        if proc.returncode is None:  # timed out or cancelled: nothing is left running
            await asyncio.shield(_kill_group(proc))
    if proc.returncode != 0:
        fail(
            PROVISIONING_FAILED,
            f"{what}: command {command!r} exited with status {proc.returncode}; "
            f"stderr: {tail(err.decode('utf-8', 'replace'), 1000) or '(empty)'}",
        )
    return out.decode("utf-8", "replace")


def _json_output(stdout: str) -> Any:
    """The whole output as JSON, else its last non-empty line (after progress lines)."""
    text = stdout.strip()
    candidates = [text] + ([text.splitlines()[-1]] if "\n" in text else [])
    for c in candidates:
        with contextlib.suppress(ValueError):
            return json.loads(c)
    raise ValueError("not JSON")


def node_from_output(stdout: str, name: str, base_dir: str, what: str) -> Node:
    """The node entry a create command printed, validated like an inventory's entry."""
    try:
        raw = _json_output(stdout)
    except ValueError:
        fail(
            PROVISIONING_OUTPUT_INVALID,
            f"{what}: the command printed no JSON node entry; its output "
            f"ends: {tail(stdout, 300) or '(nothing)'}",
        )
    try:
        node = parse_node_entry(raw, base_dir=Path(base_dir), source=f"{what} output")
    except InventoryError as e:
        fail(
            PROVISIONING_OUTPUT_INVALID,
            f"{what}: the printed node entry is invalid: " + "; ".join(e.problems),
        )
    if node.name != name:
        fail(
            PROVISIONING_OUTPUT_INVALID,
            f"{what}: the printed node entry is named {node.name!r}, not {name!r}",
        )
    return node


# --------------------------------------------------------------------------- the lab kind


def legacy_lab_commands(prov: Provisioning) -> Provisioning:
    """kind=lab (runs started before v0.3.0) as the command provisioner the lab's inventory
    names now: the lab's CLI (`python -m lab.provision`), by the worker's interpreter."""
    if prov.kind != "lab":
        return prov
    if not prov.lab_root:
        fail(INVALID_REQUEST, "provisioning kind lab needs lab_root")
    cli = f"{shlex.quote(sys.executable)} -m lab.provision"
    root = shlex.quote(prov.lab_root).replace("{", "{{").replace("}", "}}")
    return dataclasses.replace(
        prov,
        kind="command",
        lab_root=None,
        create=f"{cli} create --root {root} --template {{template}} --name {{name}}",
        start=f"{cli} start --root {root} --name {{name}}",
        destroy=f"{cli} destroy --root {root} --name {{name}}",
    )


def _commands(prov: Provisioning) -> Provisioning:
    prov = legacy_lab_commands(prov)
    if prov.kind != "command":
        fail(INVALID_REQUEST, f"provisioning kind {prov.kind!r} is not supported (command)")
    return prov


# --------------------------------------------------------------------------- activities


@activity.defn
async def provision_create(req: CreateServerRequest) -> Node:
    """Seed 003 step 3 / 004 step 10: clone `template` into a new server `name` (not
    launched, in no pool). Creating an existing server again returns the same node."""
    _check_name(req.name)
    prov = _commands(req.provisioning)
    what = f"create {req.name} from {req.template.name}"
    cwd = _inventory_dir(req.inventory_dir)
    if not prov.create:
        fail(INVALID_REQUEST, "provisioning kind command needs a create command")
    command = render_command(prov.create, template=req.template.name, name=req.name)
    out = await run_command(command, cwd, prov.timeout_s, what)
    return node_from_output(out, req.name, cwd, what)


@activity.defn
async def provision_start(req: ServerRequest) -> None:
    """Launch a created server (seed 003 step 7). No `start` command: `create` launched it,
    nothing to do."""
    _check_name(req.name)
    prov = _commands(req.provisioning)
    if prov.start:
        await run_command(
            render_command(prov.start, name=req.name),
            _inventory_dir(req.inventory_dir),
            prov.timeout_s,
            f"start {req.name}",
        )


@activity.defn
async def provision_destroy(req: ServerRequest) -> None:
    """Terminate a server (seed 003 step 18, 004's old servers); an absent one is fine."""
    _check_name(req.name)
    prov = _commands(req.provisioning)
    if not prov.destroy:
        fail(INVALID_REQUEST, "provisioning kind command needs a destroy command")
    await run_command(
        render_command(prov.destroy, name=req.name),
        _inventory_dir(req.inventory_dir),
        prov.timeout_s,
        f"destroy {req.name}",
    )


async def _array(req: ArrayRequest, action: str) -> None:
    array = req.provisioning.array
    if array is None:
        fail(INVALID_REQUEST, "the inventory's provisioning has no server array")
    command = array.disable if action == "disable" else array.enable
    if not command:
        fail(INVALID_REQUEST, f"server array {array.name!r} has no {action} command")
    await run_command(
        render_command(command, name=array.name),
        _inventory_dir(req.inventory_dir),
        req.provisioning.timeout_s,
        f"{action} server array {array.name}",
    )


@activity.defn
async def provision_array_disable(req: ArrayRequest) -> None:
    """Seed 003 step 10: the array launches no new servers (running ones stay)."""
    await _array(req, "disable")


@activity.defn
async def provision_array_enable(req: ArrayRequest) -> None:
    """Seed 003 step 16: the array may launch servers again."""
    await _array(req, "enable")


def settings_csv(values: dict[str, str | None], keys: tuple[str, ...]) -> str:
    """`key,old_value,present` rows in the order asked (present=false: the file had no such
    key, so reverting means removing it)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("key", "old_value", "present"))
    for k in keys:
        v = values.get(k)
        w.writerow((k, v if v is not None else "", "true" if v is not None else "false"))
    return buf.getvalue()


@activity.defn
async def save_settings_copy(req: SaveSettingsRequest) -> SavedSettings:
    """Seed 003 step 5: before settings are changed, save their current values on the
    worker (`<backup_dir>/<backup_id>-inputs.csv`, mode 0600; the same content is rewritten
    on a retry). The values may be secrets: only keys, a count and the path come back."""
    from activities.deploy.merge import NotKeyValueError, _key_name, _parse_kv
    from activities.deploy.secretserver import _write_text_private
    from activities.secrets import register_secret

    check_id("backup id", req.backup_id)
    rel = req.file
    if not rel or rel.startswith("/") or ".." in rel.split("/"):
        fail(INVALID_REQUEST, f"settings file {rel!r} must be a path relative to the application folder")
    if not req.keys or len(set(req.keys)) != len(req.keys):
        fail(INVALID_REQUEST, f"keys must be a non-empty list without repeats, got {list(req.keys)}")
    path = posixpath.join(req.node.app_dir, rel)
    data = await ssh.get_file(req.node.ssh, path)
    if data is None:
        fail(SETTINGS_FILE_MISSING, f"node {req.node.name}: {path} does not exist")
    try:
        parsed = _parse_kv(data.decode("utf-8", errors="replace"))
    except NotKeyValueError as e:  # the reason names a line, never a value
        fail(MERGE_UNSUPPORTED, f"node {req.node.name}: {path}: {e}", cause=e)
    current = {_key_name(k): v for k, (v, _) in parsed.values.items()}
    values: dict[str, str | None] = {k: current.get(k) for k in req.keys}
    for k in req.secret_keys:
        if values.get(k):
            register_secret(values[k] or "")
    out, *_ = await asyncio.to_thread(
        _write_text_private, req.backup_dir, f"{req.backup_id}-inputs.csv", settings_csv(values, req.keys)
    )
    return SavedSettings(
        path=out,
        values_count=sum(v is not None for v in values.values()),
        missing=tuple(k for k in req.keys if values[k] is None),
    )


PROVISION_ACTIVITIES: list[Callable[..., Any]] = [
    provision_create,
    provision_start,
    provision_destroy,
    provision_array_disable,
    provision_array_enable,
    save_settings_copy,
]
