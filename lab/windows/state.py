"""Each Windows node's IIS configuration and system facts: a JSON file under
`.lab/windows/<node name>/iis.json`, with defaults, for tests and `lab reset` to change.

Defaults (a Secret Server web node as the vendor's install guide sets it up):
* site `SecretServer` (id 1), physicalPath `C:\\inetpub\\wwwroot\\SecretServer`, one http
  binding on the node's app port, application pool `SecretServer`;
* application pool `SecretServer`: Integrated pipeline, .NET CLR v4.0;
* no applications besides the sites' root ones (Get-WebApplication lists none);
* Windows Server 2019 (10.0.17763, UBR 5458), .NET Framework 4.8 (Release 528049:
  Microsoft Learn "How to: Determine which .NET Framework versions are installed", the
  Release value of 4.8 on all Windows versions other than Windows 10 1903+/11).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from lab.config import STAGING_NAME, LabConfig
from lab.windows import APP_POOL, MAX_NODES, SITE
from lab.windows.drive import WinNode, ensure_layout

_lock = threading.Lock()


def windows_root(cfg: LabConfig) -> Path:
    return cfg.abs_root / "windows"


def win_node(cfg: LabConfig, i: int | None) -> WinNode:
    """Node i's Windows view (None: the staging system)."""
    if i is None:
        return WinNode(STAGING_NAME, cfg.staging_dir, windows_root(cfg) / STAGING_NAME, cfg.staging_app_port)
    name = cfg.node_name(i)
    return WinNode(name, cfg.node_dir(i), windows_root(cfg) / name, cfg.app_port(i))


def win_nodes(cfg: LabConfig) -> list[tuple[int | None, WinNode]]:
    """Every node with a Windows endpoint: nodes 1..min(nodes, 9), then staging."""
    return [(i, win_node(cfg, i)) for i in cfg.node_indexes if i <= MAX_NODES] + [(None, win_node(cfg, None))]


def default_config(node: WinNode) -> dict[str, Any]:
    return {
        "system": {
            # Win32_OperatingSystem (Microsoft Learn "Win32_OperatingSystem class"): Version
            # "10.0.17763", BuildNumber "17763", Caption as Server 2019 Standard shows it.
            "version": "10.0.17763",
            "build": "17763",
            "ubr": 5458,
            "caption": "Microsoft Windows Server 2019 Standard",
            "net_release": 528049,
            "net_version": "4.8.03761",
        },
        "sites": [
            {
                "name": SITE,
                "id": 1,
                "state": "Started",
                "physicalPath": "C:\\inetpub\\wwwroot\\SecretServer",
                "applicationPool": APP_POOL,
                "bindings": [{"protocol": "http", "bindingInformation": f"*:{node.app_port}:"}],
            }
        ],
        "applications": [],
        "pools": [
            {
                "name": APP_POOL,
                "managedPipelineMode": "Integrated",
                "managedRuntimeVersion": "v4.0",
                # This pool IS the node's service (./ctl); other pools keep "state" here.
                "service": True,
                "state": "Started",
            }
        ],
    }


def read_config(node: WinNode) -> dict[str, Any]:
    with _lock:
        try:
            data = json.loads(node.config_file.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                return data
        except (OSError, ValueError):
            pass
        data = default_config(node)
        _write(node, data)
        return copy.deepcopy(data)


def write_config(node: WinNode, data: dict[str, Any]) -> None:
    with _lock:
        _write(node, data)


def _write(node: WinNode, data: dict[str, Any]) -> None:
    node.root.mkdir(parents=True, exist_ok=True)
    tmp = node.config_file.with_name(node.config_file.name + f".{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(node.config_file)


def prepare(node: WinNode) -> None:
    """The endpoint's fake drive and config (idempotent; the endpoint calls it at start)."""
    ensure_layout(node)
    read_config(node)


# --------------------------------------------------------------------------- public helpers


def iis_config(cfg: LabConfig, i: int | None) -> dict[str, Any]:
    """Node i's IIS configuration and system facts (None: staging), defaults if unset."""
    return read_config(win_node(cfg, i))


def set_iis_config(cfg: LabConfig, i: int | None, config: dict[str, Any]) -> None:
    """Replace node i's configuration (e.g. a test adds an application, sets Classic mode)."""
    write_config(win_node(cfg, i), config)


def reset(cfg: LabConfig) -> list[str]:
    """Every Windows node's configuration back to the defaults and its fake drive emptied
    except the two mounts (the node's own folders, untouched). Returns what changed."""
    done: list[str] = []
    for _, node in win_nodes(cfg):
        want = default_config(node)
        try:
            current = json.loads(node.config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            current = None
        if current != want:
            write_config(node, want)
            done.append(f"{node.name}: IIS configuration reset")
        if node.drive_root.exists():
            for path in node.drive_root.rglob("*"):
                if path.is_file() or path.is_symlink():
                    path.unlink(missing_ok=True)
                    done.append(f"{node.name}: removed C:\\{path.relative_to(node.drive_root)}")
            for sub in sorted(node.drive_root.iterdir()):
                if sub.name not in ("inetpub", "Users", "Windows", "ProgramData", "Program Files"):
                    shutil.rmtree(sub, ignore_errors=True)
        ensure_layout(node)
    from lab.windows.iis import forget_transitions

    forget_transitions()
    return done
