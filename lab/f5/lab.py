"""The lab's F5 BIG-IP as a lab process: `python -m lab.f5` on port base+52, over the lab's
HAProxy, with its state in `.lab/f5/` (config.json, tls/ with the CA bundle ca.pem, the
pool settings, the restart switch) and one user, `zerodown`, whose password is
`secrets/f5_password`.

Two pools, one per site backend of lab/haproxy.py, each member named BIG-IP's way
"<node>:<port>" (node1:<app port 1>, ...): POOL over `app` and SECONDARY_POOL over
`app_secondary`. A PATCH of a member changes its HAProxy server (ready / drain / maint).
"""

from __future__ import annotations

import sys
from pathlib import Path

from lab import mariadb
from lab.config import BACKEND, SECONDARY_BACKEND, LabConfig
from lab.f5 import config as f5_config
from lab.f5 import facts
from lab.f5.tls import tls_files
from lab.procs import log_tail, pid_alive, start_background, stop_pidfile, wait_port

USER = "zerodown"
POOL = "labapp"
SECONDARY_POOL = "labapp_secondary"
EXPECT = "lab.f5"


def port(cfg: LabConfig) -> int:
    # +50/+51 are a test dev server's (tests/conftest.py), +60.. the OX part's.
    return cfg.port_base + 52


def base_url(cfg: LabConfig) -> str:
    return f"https://127.0.0.1:{port(cfg)}"


def state_dir(cfg: LabConfig) -> Path:
    return cfg.abs_root / "f5"


def config_file(cfg: LabConfig) -> Path:
    return state_dir(cfg) / "config.json"


def ca_bundle(cfg: LabConfig) -> Path:
    """What an inventory names to verify the stand-in's certificate (exists once started)."""
    return tls_files(state_dir(cfg)).ca


def password_file(cfg: LabConfig) -> Path:
    return cfg.secrets_dir / "f5_password"


def password(cfg: LabConfig) -> str:
    return mariadb._ensure_secret(password_file(cfg))


def member_name(cfg: LabConfig, i: int) -> str:
    """Node i's pool member name: "<node>:<port>"."""
    return f"{cfg.node_name(i)}:{cfg.app_port(i)}"


def _pidfile(cfg: LabConfig) -> Path:
    return state_dir(cfg) / "f5.pid"


def _logfile(cfg: LabConfig) -> Path:
    return state_dir(cfg) / "f5.log"


def write_config(cfg: LabConfig) -> Path:
    def members() -> dict[str, dict[str, str]]:
        return {
            member_name(cfg, i): {"server": cfg.node_name(i), "address": "127.0.0.1"}
            for i in cfg.node_indexes
        }

    data = {
        "pools": {
            POOL: {"backend": BACKEND, "members": members()},
            SECONDARY_POOL: {"backend": SECONDARY_BACKEND, "members": members()},
        },
        "users": {USER: password(cfg)},
    }
    f5_config.write_private_json(config_file(cfg), data)
    return config_file(cfg)


def running(cfg: LabConfig) -> bool:
    return pid_alive(_pidfile(cfg), expect=EXPECT)


def start(cfg: LabConfig, token_lifetime_s: int = facts.DEFAULT_TOKEN_TIMEOUT_S) -> None:
    """Start the stand-in (idempotent: a running one keeps its token lifetime; stop it
    first to change that). HAProxy should run; without it every LTM call answers 500."""
    d = state_dir(cfg)
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    path = write_config(cfg)
    if running(cfg):
        return
    start_background(
        [
            sys.executable,
            "-m",
            "lab.f5",
            "--port",
            str(port(cfg)),
            "--config",
            str(path),
            "--state-dir",
            str(d),
            "--haproxy-socket",
            str(cfg.haproxy_socket),
            "--token-lifetime-s",
            str(token_lifetime_s),
        ],
        _pidfile(cfg),
        _logfile(cfg),
        cwd=Path(__file__).resolve().parents[2],
    )
    wait_port("127.0.0.1", port(cfg), 30.0, pidfile=_pidfile(cfg), logfile=_logfile(cfg), what="F5 stand-in")


def stop(cfg: LabConfig) -> bool:
    return stop_pidfile(_pidfile(cfg), timeout=10, expect=EXPECT)


def status(cfg: LabConfig) -> tuple[bool, str]:
    up = running(cfg)
    return up, base_url(cfg) + ("" if up else f" not running: {log_tail(_logfile(cfg), 3)}")


def simulate_restart(cfg: LabConfig, requests: int, daemon: f5_config.Daemon = "restjavad") -> None:
    """The lab's switch (no BIG-IP interface): the next `requests` requests are answered as
    BIG-IP answers while `daemon` restarts - restjavad: 503 "Configuration Utility
    restarting..." on every call; mcpd: 500 "The connection to mcpd has been lost, try
    again." on the configuration calls (/mgmt/tm). 0 turns it off."""
    f5_config.write_restart(state_dir(cfg), requests, daemon)


def reset(cfg: LabConfig) -> list[str]:
    """Back to BIG-IP's defaults: no restart pending, pool settings as configured (member
    states are HAProxy's, which lab/haproxy.py reset_servers resets)."""
    done: list[str] = []
    d = state_dir(cfg)
    if f5_config.restart_file(d).exists():
        simulate_restart(cfg, 0)
        done.append("F5 stand-in: no restart pending")
    if f5_config.pool_settings_file(d).exists():
        f5_config.pool_settings_file(d).unlink()
        done.append("F5 stand-in: pool settings back to the defaults")
    return done
