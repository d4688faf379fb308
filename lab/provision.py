"""Servers that come and go: the lab creates a node from an existing one and destroys nodes.

Seeds 003 and 004 clone an application server, launch the clone and terminate the old
servers. In the lab a server is a node folder (its SSH root), its service (`./ctl`) and its
SSH endpoint; `create_node` clones a node into a free slot of the port block:

```
nodes/<new>/
    app/                   the template's app folder, per-node files included (database,
                           encryption, admin config), web.config with the new node's own
                           http.port / node.name / custom.banner
    .zerodown/defaults/    the template's pristine config defaults (merges keep working)
    ctl                    generated for the new port and name
    health_check.html      the health-check file (absent: /health answers 404)
    run/ inject/           empty (no logs, pids or faults of the template)
```
The template's run/, ssh.log and .zerodown/backups (and releases) are not copied. The node
is recorded in `<root>/provisioned.json`, which the SSH endpoint process (lab/sshd.py)
reads on SIGHUP: `{"nodes": {name: {slot, template, state, created_at}}, "destroyed":
[original node names]}`. Slots are cfg.nodes + 2 .. MAX_SLOT (cfg.nodes + 1 is the tests'
spare node); slot i uses cfg.app_port(i) / cfg.ssh_port(i).

`destroy_node` stops the service, closes the endpoint (and its open sessions), keeps a
tar.gz of the folder in `<root>/terminated/<name>-<n>.tar.gz` (0600: it holds the node's
secrets), removes the folder and frees the slot. The lab's original nodes (node1..N) can be
destroyed too; `lab_reset` re-creates them. Every operation is idempotent and serialised by
a lock file, so concurrent callers (several provisioning commands) never share a slot.

CLI (the `command` provisioning kind drives the lab through it)::

    python -m lab.provision create  --root R --template T --name N   # prints the nodes entry
    python -m lab.provision start   --root R --name N
    python -m lab.provision destroy --root R --name N

Exit status 0 on success, 1 when the operation failed (message on stderr), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lab.config import STAGING_NAME, LabConfig
from lab.nodes import MERGED_CONFIG, customise, render_ctl, write_health_file
from lab.procs import port_open, stop_pidfile

REGISTRY = "provisioned.json"
TERMINATED = "terminated"
# The highest node slot the port block has room for (+10+i HTTP, +30+i SSH: i <= 19).
MAX_SLOT = 19
APP_DIR = "app"
CTL_TIMEOUT_S = 60.0
# The lab's own naming schemes: app nodes nodeN (originals and the tests' spare), OX nodes.
_RESERVED_RE = re.compile(r"^(node|ox)[0-9]+$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class ProvisionError(RuntimeError):
    """A provisioning operation failed; the message says what and why."""


# --------------------------------------------------------------------------- config


def lab_config(root: Path | str) -> LabConfig:
    """The LabConfig of the lab at `root`, as `lab_up` recorded it (ports, node counts)."""
    from lab.manager import config_from_state

    cfg = config_from_state(Path(root))
    if cfg is None:
        raise ProvisionError(
            f"no lab at {Path(root).resolve()}: lab.json is missing or unreadable "
            "(start the lab with `zerodown lab up`)"
        )
    return cfg


# --------------------------------------------------------------------------- registry


def registry_file(cfg: LabConfig) -> Path:
    return cfg.abs_root / REGISTRY


def read_registry(cfg: LabConfig) -> dict[str, Any]:
    """The registry ({"nodes": {}, "destroyed": []} when there is none). Written by atomic
    replace, so a reader without the lock (the sshd) always sees a whole version."""
    try:
        data = json.loads(registry_file(cfg).read_text(encoding="utf-8"))
    except FileNotFoundError:
        data = {}
    except (OSError, ValueError) as e:
        raise ProvisionError(f"{registry_file(cfg)} is unreadable: {e}") from e
    nodes = data.get("nodes") if isinstance(data, dict) else None
    destroyed = data.get("destroyed") if isinstance(data, dict) else None
    return {
        "nodes": nodes if isinstance(nodes, dict) else {},
        "destroyed": destroyed if isinstance(destroyed, list) else [],
    }


def _write_registry(cfg: LabConfig, reg: dict[str, Any]) -> None:
    path = registry_file(cfg)
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(json.dumps(reg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


@contextlib.contextmanager
def _locked(cfg: LabConfig) -> Iterator[None]:
    """One provisioning operation at a time per lab (across processes)."""
    cfg.abs_root.mkdir(parents=True, exist_ok=True)
    fd = os.open(cfg.abs_root / "provisioned.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def endpoint_changes(cfg: LabConfig) -> tuple[list[tuple[str, int, Path]], set[str]]:
    """For the SSH endpoint process: (name, SSH port, folder) of every provisioned node that
    is ready, and the names of the original nodes that were destroyed (no endpoint)."""
    try:
        reg = read_registry(cfg)
    except ProvisionError:
        return [], set()
    extra = [
        (name, cfg.ssh_port(int(e["slot"])), cfg.nodes_dir / name)
        for name, e in sorted(reg["nodes"].items())
        if e.get("state") == "active"
    ]
    return extra, {str(n) for n in reg["destroyed"]}


def provisioned(cfg: LabConfig) -> dict[str, int]:
    """Name -> slot of every node the lab provisioned (whatever its state)."""
    try:
        reg = read_registry(cfg)
    except ProvisionError:
        return {}
    return {name: int(e["slot"]) for name, e in sorted(reg["nodes"].items())}


def _original_index(cfg: LabConfig, name: str) -> int | None:
    for i in cfg.node_indexes:
        if cfg.node_name(i) == name:
            return i
    return None


# --------------------------------------------------------------------------- entries


def node_entry(cfg: LabConfig, name: str, slot: int, absolute: bool = False) -> dict[str, Any]:
    """The node's `nodes` inventory entry; paths relative to the lab root as in site.yaml
    (absolute=True: absolute, for callers in any folder)."""
    from lab.manager import CTL_SERVICE, SSH_USER

    def path(p: Path) -> str:
        return str(p) if absolute else str(p.relative_to(cfg.abs_root))

    return {
        "name": name,
        "ssh": {
            "host": "127.0.0.1",
            "port": cfg.ssh_port(slot),
            "user": SSH_USER,
            "key": {"file": path(cfg.client_key)},
            "known_hosts": path(cfg.known_hosts),
        },
        "app_dir": APP_DIR,
        "service": dict(CTL_SERVICE),
        "url": f"http://127.0.0.1:{cfg.app_port(slot)}",
    }


def _check_name(cfg: LabConfig, name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise ProvisionError(
            f"node name {name!r}: use letters, digits, '-', '_' or '.' "
            "(starting with a letter or digit, at most 63 characters)"
        )
    if _RESERVED_RE.fullmatch(name) or name == STAGING_NAME:
        raise ProvisionError(
            f"node name {name!r} is one of the lab's own names (nodeN, oxN, {STAGING_NAME}); pick another"
        )


def _template_dir(cfg: LabConfig, template: str, reg: dict[str, Any]) -> Path:
    """The folder of an app node that may be cloned: an original node or a provisioned one."""
    d = cfg.nodes_dir / template
    ok = _original_index(cfg, template) is not None or reg["nodes"].get(template, {}).get("state") == "active"
    if not _NAME_RE.fullmatch(template) or not ok or not (d / APP_DIR / MERGED_CONFIG).is_file():
        known = sorted(
            [cfg.node_name(i) for i in cfg.node_indexes if (cfg.node_dir(i) / APP_DIR).is_dir()]
            + [n for n, e in reg["nodes"].items() if e.get("state") == "active"]
        )
        raise ProvisionError(
            f"template {template!r} is not an app node of this lab (nodes: {', '.join(known) or 'none'})"
        )
    return d


def _free_slot(cfg: LabConfig, reg: dict[str, Any]) -> int:
    used = {int(e["slot"]) for e in reg["nodes"].values()}
    for slot in range(cfg.nodes + 2, MAX_SLOT + 1):
        # Ports in use by anything else (another lab's process) make a slot unusable too.
        if (
            slot not in used
            and not port_open("127.0.0.1", cfg.app_port(slot), 0.2)
            and not port_open("127.0.0.1", cfg.ssh_port(slot), 0.2)
        ):
            return slot
    raise ProvisionError(
        f"no free node slot: slots {cfg.nodes + 2}-{MAX_SLOT} are all taken ({len(used)} provisioned nodes)"
    )


# --------------------------------------------------------------------------- create


def _customisations(cfg: LabConfig, name: str, slot: int) -> dict[str, str]:
    # What makes a lab node itself (lab/nodes.py node_customisations); everything else in
    # web.config is the template's, as on a clone.
    return {"http.port": str(cfg.app_port(slot)), "node.name": name, "custom.banner": f"Welcome to {name}"}


def _build_folder(cfg: LabConfig, src: Path, name: str, slot: int) -> None:
    """Clone `src` into nodes/<name>: built aside, then renamed into place, so the node
    folder is never half-built."""
    work = cfg.abs_root / ".provisioning" / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # symlinks=True: a link in the app folder stays a link (never follows it out of the node).
    shutil.copytree(src / APP_DIR, work / APP_DIR, symlinks=True)
    zd = work / ".zerodown"
    zd.mkdir(mode=0o700)
    if (src / ".zerodown" / "defaults").is_dir():
        shutil.copytree(src / ".zerodown" / "defaults", zd / "defaults", symlinks=True)
    for sub in ("run", "inject"):
        (work / sub).mkdir()
    web = work / APP_DIR / MERGED_CONFIG
    web.write_text(
        customise(web.read_text(encoding="utf-8"), _customisations(cfg, name, slot)), encoding="utf-8"
    )
    # Always present, even when the template's was removed (an old server being drained):
    # the new server is launched to take sessions.
    write_health_file(work)
    ctl = work / "ctl"
    ctl.write_text(render_ctl(cfg, name, cfg.app_port(slot), generator="lab/provision.py"), encoding="utf-8")
    ctl.chmod(0o755)
    dest = cfg.nodes_dir / name
    shutil.rmtree(dest, ignore_errors=True)  # a crashed earlier attempt's folder
    work.rename(dest)


def create_node(cfg: LabConfig, template_name: str, new_name: str) -> dict[str, Any]:
    """Clone node `template_name` into a new node `new_name` with its own slot, service and
    SSH endpoint (not started, in no pool). Returns its `nodes` entry (paths relative to the
    lab root). Creating an existing name from the same template returns the same entry."""
    _check_name(cfg, new_name)
    with _locked(cfg):
        reg = read_registry(cfg)
        entry = reg["nodes"].get(new_name)
        if entry is not None and entry.get("template") != template_name:
            raise ProvisionError(
                f"node {new_name!r} exists already, cloned from {entry.get('template')!r} "
                f"(not {template_name!r})"
            )
        if entry is not None and entry.get("state") == "terminating":
            raise ProvisionError(f"node {new_name!r} is being destroyed; destroy it again, then create it")
        if entry is None:
            if (cfg.nodes_dir / new_name).exists():
                raise ProvisionError(
                    f"{cfg.nodes_dir / new_name} exists and is not a node the lab provisioned"
                )
            _template_dir(cfg, template_name, reg)  # checked before a slot is taken
            entry = {
                "slot": _free_slot(cfg, reg),
                "template": template_name,
                "state": "creating",
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            reg["nodes"][new_name] = entry
            _write_registry(cfg, reg)  # the slot is ours from here on
        slot = int(entry["slot"])
        if entry["state"] != "active" or not (cfg.nodes_dir / new_name / "ctl").exists():
            _build_folder(cfg, _template_dir(cfg, template_name, reg), new_name, slot)
            entry["state"] = "active"
            _write_registry(cfg, reg)
        _sync_endpoints(cfg, opened=[cfg.ssh_port(slot)])
        return node_entry(cfg, new_name, slot)


# --------------------------------------------------------------------------- start / stop


def _ctl(folder: Path, action: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", "-c", f"./ctl {shlex.quote(action)}"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=CTL_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def start_node(cfg: LabConfig, name: str) -> None:
    """Launch the node's service (`./ctl start`); returns once it accepts connections."""
    folder = cfg.nodes_dir / name
    if not _NAME_RE.fullmatch(name) or not (folder / "ctl").is_file():
        raise ProvisionError(f"no node {name!r} in {cfg.nodes_dir}")
    r = _ctl(folder, "start")
    if r.returncode != 0:
        raise ProvisionError(f"{name}: ctl start exited {r.returncode}: {r.stderr.strip()}")


def _stop_service(folder: Path) -> None:
    if (folder / "ctl").is_file():
        r = _ctl(folder, "stop")
        if r.returncode != 0:
            raise ProvisionError(f"{folder.name}: ctl stop exited {r.returncode}: {r.stderr.strip()}")
    # A folder whose ctl is gone (half-built, hand-edited) may still have an app running.
    stop_pidfile(folder / "run" / "app.pid", timeout=10, expect="app.py")


# --------------------------------------------------------------------------- destroy


def _archive(cfg: LabConfig, folder: Path, name: str) -> Path:
    """tar.gz of the node folder in terminated/ (0600, the folder holds the node's secrets)."""
    out = cfg.abs_root / TERMINATED
    out.mkdir(mode=0o700, exist_ok=True)
    taken = [
        int(m.group(1))
        for p in out.iterdir()
        if (m := re.fullmatch(re.escape(name) + r"-([0-9]+)\.tar\.gz", p.name))
    ]
    path = out / f"{name}-{max(taken, default=0) + 1}.tar.gz"
    tmp = out / f".{path.name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w:gz") as tar:
        # Sockets and fifos cannot be archived (none are expected); skip them, keep the rest.
        tar.add(
            folder, arcname=name, filter=lambda ti: ti if ti.isreg() or ti.isdir() or ti.issym() else None
        )
    tmp.replace(path)
    return path


def destroy_node(cfg: LabConfig, name: str) -> Path | None:
    """Terminate a provisioned node or an original one: service stopped, SSH endpoint closed,
    folder archived then removed, slot freed. Returns the archive; None when there was no
    such node (destroying an absent node is a no-op)."""
    with _locked(cfg):
        reg = read_registry(cfg)
        entry = reg["nodes"].get(name)
        index = _original_index(cfg, name)
        folder = cfg.nodes_dir / name
        if entry is None and index is None:
            if _NAME_RE.fullmatch(name) and folder.exists():
                raise ProvisionError(
                    f"{folder} is not a node the lab provisioned nor one of its original "
                    f"nodes ({cfg.node_name(1)}..{cfg.node_name(cfg.nodes)}): not destroyed"
                )
            return None
        if entry is not None:
            port = cfg.ssh_port(int(entry["slot"]))
            entry["state"] = "terminating"  # no endpoint from here on, the slot still taken
        else:
            assert index is not None
            port = cfg.ssh_port(index)
            if name in reg["destroyed"] and not folder.exists():
                return None
            if name not in reg["destroyed"]:
                reg["destroyed"].append(name)
        _write_registry(cfg, reg)
        if folder.is_dir():
            _stop_service(folder)
        _sync_endpoints(cfg, closed=[port])
        archive = _archive(cfg, folder, name) if folder.is_dir() else None
        shutil.rmtree(folder, ignore_errors=True)
        if entry is not None:
            del reg["nodes"][name]
            _write_registry(cfg, reg)
        return archive


def destroy_provisioned(cfg: LabConfig) -> list[str]:
    """Destroy every node the lab provisioned (lab reset / down); returns their names."""
    names = list(provisioned(cfg))
    for name in names:
        destroy_node(cfg, name)
    return names


def destroyed_originals(cfg: LabConfig) -> list[str]:
    try:
        return [str(n) for n in read_registry(cfg)["destroyed"]]
    except ProvisionError:
        return []


def forget_destroyed(cfg: LabConfig, sync: bool = True) -> list[str]:
    """The original nodes stop counting as destroyed (call once their folders are installed
    again): their SSH endpoints come back (sync=True: now, if the endpoint process runs;
    sync=False: when it is next started). Returns their names."""
    with _locked(cfg):
        reg = read_registry(cfg)
        names = [str(n) for n in reg["destroyed"]]
        if not names:
            return []
        reg["destroyed"] = []
        _write_registry(cfg, reg)
        if sync:
            ports = [cfg.ssh_port(i) for n in names if (i := _original_index(cfg, n)) is not None]
            _sync_endpoints(cfg, opened=ports)
        return names


def _sync_endpoints(cfg: LabConfig, opened: Sequence[int] = (), closed: Sequence[int] = ()) -> None:
    """Make the SSH endpoint process serve what the registry says now."""
    from lab import sshd

    sshd.ensure_keys(cfg)  # known_hosts lines for the new ports
    if sshd.sshd_running(cfg):
        sshd.reload_sshd(cfg, opened=opened, closed=closed)
    elif opened:
        sshd.start_sshd(cfg)  # serves every endpoint, the registry's included


def inventory_commands(cfg: LabConfig) -> dict[str, Any]:
    """The lab's `provisioning` entry: a command provisioner running this module's CLI (in
    the inventory's folder, the lab root), as a site's inventory names its own commands."""
    cli = f"{shlex.quote(str(Path(cfg.python).absolute()))} -m lab.provision"
    return {
        "kind": "command",
        "create": f"{cli} create --root . --template {{template}} --name {{name}}",
        "start": f"{cli} start --root . --name {{name}}",
        "destroy": f"{cli} destroy --root . --name {{name}}",
    }


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.provision", description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("create", "start", "destroy"))
    p.add_argument("--root", type=Path, required=True, help="the lab's folder (holds lab.json)")
    p.add_argument("--name", required=True, help="the node created, started or destroyed")
    p.add_argument("--template", help="create: the node cloned")
    a = p.parse_args(argv)
    if a.action == "create" and not a.template:
        p.error("create needs --template")
    try:
        cfg = lab_config(a.root)
        if a.action == "create":
            create_node(cfg, a.template, a.name)
            print(json.dumps(node_entry(cfg, a.name, provisioned(cfg)[a.name], absolute=True)))
        elif a.action == "start":
            start_node(cfg, a.name)
            print(json.dumps({"name": a.name, "started": True}))
        else:
            archive = destroy_node(cfg, a.name)
            print(
                json.dumps(
                    {
                        "name": a.name,
                        "destroyed": archive is not None,
                        "archive": str(archive) if archive else None,
                    }
                )
            )
    except (ProvisionError, OSError, subprocess.TimeoutExpired, RuntimeError) as e:
        print(f"lab.provision {a.action} {a.name}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
