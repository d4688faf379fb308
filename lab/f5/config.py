"""The stand-in's inputs and its small persistent state, all files:

* the configuration the lab writes (lab/f5/lab.py write_config): which pools exist, their
  members and the HAProxy backend/server behind each, and the users with their passwords:

      {"pools": {"labapp": {"backend": "app",
                            "members": {"node1:18011": {"server": "node1", "address": "127.0.0.1"}}}},
       "users": {"zerodown": "<password>"}}

  A member's name is BIG-IP's "<node>:<port>"; `monitor` (optional, default /Common/http)
  is what the pool reports: the lab's HAProxy checks every server with GET /health.
* <state-dir>/pools.json: what a PATCH changed on a pool (serviceDownAction), kept across
  restarts of the stand-in as BIG-IP keeps its configuration.
* <state-dir>/restart.json: THE LAB'S OWN SWITCH (no BIG-IP interface): while it holds
  {"remaining": N, "daemon": "restjavad" | "mcpd"}, the next N requests are answered the
  way BIG-IP answers while that daemon restarts (lab/f5/facts.py RESTARTING_PAGE,
  MCPD_LOST_MESSAGE); lab/f5/lab.py simulate_restart writes it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Daemon = Literal["restjavad", "mcpd"]
DAEMONS: tuple[Daemon, ...] = ("restjavad", "mcpd")
DEFAULT_MONITOR = "/Common/http"


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class MemberSpec:
    name: str  # "<node>:<port>"
    server: str  # the HAProxy server
    address: str

    @property
    def node(self) -> str:
        return self.name.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.name.rsplit(":", 1)[1])


@dataclass(frozen=True)
class PoolSpec:
    name: str
    backend: str
    monitor: str
    members: dict[str, MemberSpec] = field(default_factory=dict)


@dataclass(frozen=True)
class StandInConfig:
    pools: dict[str, PoolSpec]
    users: dict[str, str]


def _member(name: str, raw: Any) -> MemberSpec:
    node, _, port = name.rpartition(":")
    if not node or not port.isdigit() or not isinstance(raw, dict) or not raw.get("server"):
        raise ConfigError(f"member {name!r}: want '<node>:<port>': {{'server': ..., 'address': ...}}")
    return MemberSpec(name=name, server=str(raw["server"]), address=str(raw.get("address", "127.0.0.1")))


def _pool(name: str, raw: Any) -> PoolSpec:
    if not isinstance(raw, dict) or not raw.get("backend"):
        raise ConfigError(f"pool {name!r}: a backend is required")
    members = {m: _member(m, r) for m, r in dict(raw.get("members") or {}).items()}
    return PoolSpec(
        name=name,
        backend=str(raw["backend"]),
        monitor=str(raw.get("monitor", DEFAULT_MONITOR)),
        members=members,
    )


def load_config(path: Path) -> StandInConfig:
    raw = json.loads(path.read_text(encoding="utf-8"))
    pools = {name: _pool(name, p) for name, p in dict(raw.get("pools") or {}).items()}
    users = {str(u): str(p) for u, p in dict(raw.get("users") or {}).items()}
    if not users:
        raise ConfigError(f"{path}: no users")
    return StandInConfig(pools=pools, users=users)


def write_private_json(path: Path, data: object) -> None:
    """Write JSON atomically, readable by the owner only (it may hold passwords)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    tmp.replace(path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------- pool settings


def pool_settings_file(state_dir: Path) -> Path:
    return state_dir / "pools.json"


def load_pool_settings(state_dir: Path) -> dict[str, dict[str, str]]:
    raw = _read_json(pool_settings_file(state_dir))
    if not isinstance(raw, dict):
        return {}
    return {str(k): {str(a): str(b) for a, b in v.items()} for k, v in raw.items() if isinstance(v, dict)}


def save_pool_settings(state_dir: Path, settings: dict[str, dict[str, str]]) -> None:
    write_private_json(pool_settings_file(state_dir), settings)


# ---------------------------------------------------------------------------- restart switch


def restart_file(state_dir: Path) -> Path:
    return state_dir / "restart.json"


def write_restart(state_dir: Path, remaining: int, daemon: Daemon) -> None:
    path = restart_file(state_dir)
    if remaining <= 0:
        path.unlink(missing_ok=True)
        return
    write_private_json(path, {"remaining": remaining, "daemon": daemon})


def pending_restart(state_dir: Path) -> Daemon | None:
    """The daemon the switch says is restarting, or None when it is off."""
    path = restart_file(state_dir)
    if not path.exists():
        return None
    raw = _read_json(path)
    if not isinstance(raw, dict) or raw.get("daemon") not in DAEMONS or int(raw.get("remaining", 0)) <= 0:
        path.unlink(missing_ok=True)
        return None
    daemon: Daemon = raw["daemon"]
    return daemon


def count_off_restart(state_dir: Path) -> None:
    """One request answered as during the restart. The server does this between two awaits
    of one request, so no lock is needed."""
    raw = _read_json(restart_file(state_dir))
    if isinstance(raw, dict) and raw.get("daemon") in DAEMONS:
        write_restart(state_dir, int(raw.get("remaining", 0)) - 1, raw["daemon"])
