"""The lab's SQL Server as a lab process: `python -m lab.mssql` in front of the primary
MariaDB, on port base+10, with its state in `.lab/mssql/` (database files, backups,
availability state) and one login, `zerodown`, whose password is `secrets/mssql_password`.

It runs in every lab (a small asyncio process); the inventory decides whether a site uses
it (`zerodown lab up --db mssql` writes site.yaml with a `kind: mssql` database).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from lab import mariadb
from lab.config import LabConfig
from lab.procs import log_tail, pid_alive, start_background, stop_pidfile, wait_port

LOGIN = "zerodown"
# The zerodown login's server roles (README "SQL Server": the permissions it needs).
ROLES = ("dbcreator", "processadmin", "db_backupoperator", "db_ddladmin")
EXPECT = "lab.mssql"


def port(cfg: LabConfig) -> int:
    return cfg.port_base + 10


def state_dir(cfg: LabConfig) -> Path:
    return cfg.abs_root / "mssql"


def backups_dir(cfg: LabConfig) -> Path:
    """Where the site's backups go "on the SQL Server host" (backup_dir in the inventory)."""
    return state_dir(cfg) / "backups"


def password_file(cfg: LabConfig) -> Path:
    return cfg.secrets_dir / "mssql_password"


def ha_file(cfg: LabConfig) -> Path:
    return state_dir(cfg) / "ha.json"


def _pidfile(cfg: LabConfig) -> Path:
    return state_dir(cfg) / "mssql.pid"


def _logfile(cfg: LabConfig) -> Path:
    return state_dir(cfg) / "mssql.log"


def _write_logins(cfg: LabConfig) -> Path:
    password = mariadb._ensure_secret(password_file(cfg))
    path = state_dir(cfg) / "logins.json"
    data = json.dumps({LOGIN: {"password": password, "roles": list(ROLES), "default_database": "master"}})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(data)
    return path


def running(cfg: LabConfig) -> bool:
    return pid_alive(_pidfile(cfg), expect=EXPECT)


def start(cfg: LabConfig) -> None:
    """Start the stand-in (idempotent); the primary MariaDB must be up."""
    d = state_dir(cfg)
    for sub in (d, backups_dir(cfg)):
        sub.mkdir(parents=True, exist_ok=True)
        os.chmod(sub, 0o700)
    logins = _write_logins(cfg)
    if running(cfg):
        return
    start_background(
        [
            sys.executable,
            "-m",
            "lab.mssql",
            "--port",
            str(port(cfg)),
            "--mariadb-socket",
            str(mariadb.socket_path(cfg, "primary")),
            "--state-dir",
            str(d),
            "--logins",
            str(logins),
        ],
        _pidfile(cfg),
        _logfile(cfg),
        cwd=Path(__file__).resolve().parents[2],
    )
    wait_port("127.0.0.1", port(cfg), 30.0, pidfile=_pidfile(cfg), logfile=_logfile(cfg))


def stop(cfg: LabConfig) -> bool:
    return stop_pidfile(_pidfile(cfg), timeout=10, expect=EXPECT)


def set_availability(cfg: LabConfig, state: dict[str, object] | None) -> None:
    """The stand-in's availability state (lab/mssql/engine.py ServerConfig.ha_file): an
    availability group role or a mirroring role for tests; None: a standalone server."""
    path = ha_file(cfg)
    if state is None:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(path)


def set_product_version(cfg: LabConfig, version: str | None) -> None:
    """Make the stand-in report another SERVERPROPERTY('ProductVersion') (e.g. "10.50.6000.34",
    SQL Server 2008 R2) for a prerequisite test; None: SQL Server 2022's again."""
    path = ha_file(cfg).with_name("server.json")
    if version is None:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"product_version": version}))
    tmp.replace(path)


def status(cfg: LabConfig) -> tuple[bool, str]:
    up = running(cfg)
    return up, f"127.0.0.1:{port(cfg)}" + ("" if up else f" not running: {log_tail(_logfile(cfg), 3)}")


def reset(cfg: LabConfig) -> list[str]:
    """Back to a standalone server with no copies zerodown left (kept-table side databases
    of a rollback, the stand-in's own restore shadows); started if it is not running."""
    done: list[str] = []
    if ha_file(cfg).exists():
        set_availability(cfg, None)
        done.append("SQL Server stand-in: standalone again")
    if ha_file(cfg).with_name("server.json").exists():
        set_product_version(cfg, None)
        done.append("SQL Server stand-in: its own version again")
    if not running(cfg):
        start(cfg)
        done.append("started the SQL Server stand-in")
    leftovers = [
        r[0]
        for r in mariadb.query(cfg, "primary", "SHOW DATABASES")
        if str(r[0]).startswith(("zerodown_keep_", "zdlab_mssql_r", "zdlab_mssql_t"))
    ]
    for name in leftovers:
        mariadb.query(cfg, "primary", f"DROP DATABASE `{name}`")
    if leftovers:
        done.append(f"dropped {', '.join(leftovers)}")
    return done
