"""The lab's MariaDB servers: a primary, a GTID replica and an empty "warm" server, as
local processes.

Each instance lives in `<root>/mysql/<role>/`, which is both its datadir and the home of its
my.cnf, socket, pid file and error log. The instances never read /etc/mysql (the first
option is always `--defaults-file`), bind 127.0.0.1 only and are sized small
(16M buffer pool, no performance_schema) because the lab shares 2 cores with everything else.

Bootstrap (once, on the primary): database `labapp` with the lab application's schema at
version 1, the `zerodown` user (the account zerodown itself uses: app data plus replica
status / promote / backups) and a replication user. `ensure_lab_extras` (every lab up and
reset, idempotent) adds what came later: the Secret Server tables (tbAudit,
tbUpgradeSettings with its site row), the grants on the staging and scratch databases and
the fault-injection database `zdlab`. The replica starts empty and replays
the primary's binary log from the beginning (MASTER_USE_GTID=slave_pos with an empty
position), so users and schema arrive there through replication, exactly as on a real site.

Administration uses root over the instance's unix socket (no password: the socket is only
reachable by the local root user, and `mariadb-install-db` set root up that way).

The third instance, `warm` (port_base + 7, server_id 3), is the empty server seed 004 steps
5-6 clone into a "warm" backup: system tables and the admin account `zdadmin` only, not
replicating, writable (as a freshly provisioned server is). zerodown itself initialises it
from the primary (activities/replication.py) with `zdadmin`, which exists on the primary
too (ALL PRIVILEGES WITH GRANT OPTION, over TCP from 127.0.0.1). Everything done to it by
the lab runs with sql_log_bin=0: a GTID of its own in its binlog would clash (gtid_strict_mode)
with the primary's when it replicates. `reset_warm` empties it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
import zipfile
from pathlib import Path
from typing import Any, Literal

import pymysql
import pymysql.cursors

from lab.config import (
    DB_NAME,
    DB_USER,
    FAULTS_DB_NAME,
    SCRATCH_DB_NAME,
    STAGING_DB_NAME,
    LabConfig,
    new_secret,
)
from lab.procs import log_tail, pid_alive, port_open, read_pid, start_background, stop_pidfile, wait_port

Role = Literal["primary", "replica", "warm"]
ROLES: tuple[Role, ...] = ("primary", "replica", "warm")
REPL_USER = "repl"
# The administrative account of the primary and the warm server (replication control,
# promotion, initialising the warm replica); its password is secrets/db_admin_password.
ADMIN_USER = "zdadmin"
# Databases of the server itself: whatever else the warm server holds is "data".
SYSTEM_SCHEMAS = frozenset({"mysql", "information_schema", "performance_schema", "sys"})
PROBE_USER = "probe"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0

# The lab application's schema at version 1 (later versions come from package migrations).
SCHEMA_V1 = [
    "CREATE TABLE IF NOT EXISTS schema_version (version INT NOT NULL) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS items (id BIGINT AUTO_INCREMENT PRIMARY KEY, node VARCHAR(32), "
    "body VARCHAR(255), created_at TIMESTAMP(6) DEFAULT CURRENT_TIMESTAMP(6)) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS users (name VARCHAR(64) PRIMARY KEY, password_sha256 CHAR(64)) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS secrets (id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(64), "
    "ciphertext TEXT) ENGINE=InnoDB",
    # Secret Server's audit table; the manual rolling upgrade records its steps there as
    # AuditTypeName 'ManualUpgrade'. Reference makes a recorded step idempotent.
    "CREATE TABLE IF NOT EXISTS tbAudit (AuditId BIGINT AUTO_INCREMENT PRIMARY KEY, "
    "AuditTypeName VARCHAR(32) NOT NULL, Action VARCHAR(32) NOT NULL, Notes VARCHAR(1000) NULL, "
    "UserName VARCHAR(64) NULL, Reference VARCHAR(190) NULL UNIQUE, DateRecorded DATETIME(3) NOT NULL) "
    "ENGINE=InnoDB",
    # Maintenance mode / ignore version mismatch / enforce version match: the site row
    # (Scope '*') and per-node overrides (Scope = node.name; NULL = use the site value).
    "CREATE TABLE IF NOT EXISTS tbUpgradeSettings (Scope VARCHAR(64) PRIMARY KEY, "
    "MaintenanceMode TINYINT NULL, IgnoreVersionMismatch TINYINT NULL, EnforceVersionMatch TINYINT NULL) "
    "ENGINE=InnoDB",
]
SITE_SCOPE = "*"
_SITE_ROW = (
    "INSERT INTO tbUpgradeSettings (Scope, MaintenanceMode, IgnoreVersionMismatch, "
    "EnforceVersionMatch) VALUES ('*', 0, 0, 0) ON DUPLICATE KEY UPDATE Scope = Scope"
)
# Column names per table at schema version 1, to verify a reset really reached version 1.
SCHEMA_V1_COLUMNS: dict[str, list[str]] = {
    "schema_version": ["version"],
    "items": ["id", "node", "body", "created_at"],
    "users": ["name", "password_sha256"],
    "secrets": ["id", "name", "ciphertext"],
    "tbAudit": ["AuditId", "AuditTypeName", "Action", "Notes", "UserName", "Reference", "DateRecorded"],
    "tbUpgradeSettings": ["Scope", "MaintenanceMode", "IgnoreVersionMismatch", "EnforceVersionMatch"],
}
# The fault-injection hook of the lab's migrations (002_up.sql fails when a row names the
# database it runs in). Outside labapp, so injecting changes no table of the application.
FAULTS_TABLE = f"`{FAULTS_DB_NAME}`.`faults`"
MIGRATION_FAULT_POINT = "migration-2"
# What zerodown needs beyond its own database: replica status (REPLICATION CLIENT / SLAVE
# MONITOR), promote (SUPER, REPLICATION SLAVE ADMIN, READ_ONLY ADMIN - in 10.11 SUPER no
# longer implies the last one), consistent backups (RELOAD, PROCESS).
ZERODOWN_GLOBAL_PRIVS = (
    "RELOAD, PROCESS, REPLICATION CLIENT, REPLICATION SLAVE, SUPER, "
    "REPLICATION SLAVE ADMIN, READ_ONLY ADMIN, SLAVE MONITOR"
)


class MariaDBError(RuntimeError):
    """A lab MariaDB instance failed; the message names the instance and its error log."""


# --------------------------------------------------------------------------- paths


def instance_dir(cfg: LabConfig, role: Role) -> Path:
    return cfg.mysql_dir / role


def socket_path(cfg: LabConfig, role: Role) -> Path:
    return instance_dir(cfg, role) / "mysql.sock"


def pid_file(cfg: LabConfig, role: Role) -> Path:
    return instance_dir(cfg, role) / "mariadbd.pid"


def error_log(cfg: LabConfig, role: Role) -> Path:
    return instance_dir(cfg, role) / "error.log"


def cnf_path(cfg: LabConfig, role: Role) -> Path:
    return instance_dir(cfg, role) / "my.cnf"


def port_of(cfg: LabConfig, role: Role) -> int:
    return {"primary": cfg.primary_db_port, "replica": cfg.replica_db_port, "warm": cfg.warm_db_port}[role]


def repl_password_file(cfg: LabConfig) -> Path:
    return cfg.secrets_dir / "repl_password"


def admin_password_file(cfg: LabConfig) -> Path:
    """The password of ADMIN_USER (on the primary and the warm server)."""
    return cfg.secrets_dir / "db_admin_password"


def _with_log(cfg: LabConfig, role: Role, msg: str) -> str:
    log = error_log(cfg, role)
    tail = log_tail(log, 15)
    return f"MariaDB {role}: {msg}; error log: {log}" + (f"\n--- last lines ---\n{tail}" if tail else "")


# --------------------------------------------------------------------------- secrets


def _ensure_secret(path: Path) -> str:
    """Read a secret file, generating a random value (mode 600) the first time."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(new_secret(24) + "\n")
    os.chmod(path, 0o600)
    return path.read_text(encoding="utf-8").strip()


def ensure_db_secrets(cfg: LabConfig) -> None:
    """db_password (zerodown user), admin_password (application user `probe`), repl_password,
    db_admin_password (ADMIN_USER)."""
    cfg.secrets_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(cfg.secrets_dir, 0o700)
    for p in (
        cfg.db_password_file,
        cfg.admin_password_file,
        repl_password_file(cfg),
        admin_password_file(cfg),
    ):
        _ensure_secret(p)


def _secret(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise MariaDBError(f"secret file {path} is unreadable ({e.strerror}); run ensure_db_secrets") from e


# --------------------------------------------------------------------------- instances


def write_cnf(cfg: LabConfig, role: Role) -> Path:
    d = instance_dir(cfg, role)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d.parent / f"{role}.tmp"  # beside the datadir: inside, it would show as a database
    tmp.mkdir(exist_ok=True)
    sock = socket_path(cfg, role)
    if len(str(sock)) > 107:  # sun_path limit; mariadbd's own error is obscure
        raise MariaDBError(f"socket path {sock} is longer than 107 bytes; use a shorter lab root")
    lines = [
        "# Generated by lab/mariadb.py - the lab's MariaDB " + role,
        "[mariadbd]",
        f"datadir = {d}",
        f"port = {port_of(cfg, role)}",
        "bind-address = 127.0.0.1",
        f"socket = {sock}",
        f"pid-file = {pid_file(cfg, role)}",
        f"log-error = {error_log(cfg, role)}",
        # Its own temporary directory: instances started side by side (two test sessions)
        # would otherwise share /tmp's `#sql-temptable-*` names, and one bootstrap removed
        # the other's ("Could not remove temporary table", mariadb-install-db failed).
        f"tmpdir = {tmp}",
        # Small footprint: the lab shares two cores and little RAM with everything else.
        "innodb_buffer_pool_size = 16M",
        "innodb_log_file_size = 16M",
        "performance_schema = OFF",
        "skip-name-resolve",
        "max_connections = 100",
        "open_files_limit = 4096",
        "table_open_cache = 400",
        # The redo log is written at each commit and flushed to disk once a second, not at
        # each commit: the lab's data lives as long as the lab, and a flush per commit on a
        # disk shared with everything else stalls commits for tens of ms now and then, which
        # would show in the figures as the procedures' time (a mariadbd crash loses nothing;
        # only a machine crash could lose the last second).
        "innodb_flush_log_at_trx_commit = 2",
        # Replication: row-based binlog with GTIDs, so a replica can be promoted and the
        # old primary re-pointed without binlog file/position bookkeeping.
        f"server_id = {ROLES.index(role) + 1}",
        "log_bin = binlog",
        f"relay_log = {role}-relay-bin",
        "binlog_format = ROW",
        "gtid_strict_mode = ON",
        "log_slave_updates = ON",
        "expire_logs_days = 7",
    ]
    if role == "replica":
        lines.append("read_only = ON")
    if os.geteuid() == 0:
        lines.append("user = root")  # mariadbd refuses to run as root without it
    cnf = cnf_path(cfg, role)
    cnf.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return cnf


def is_initialized(cfg: LabConfig, role: Role) -> bool:
    return (instance_dir(cfg, role) / "mysql" / "user.frm").exists() or (
        instance_dir(cfg, role) / "mysql" / "global_priv.MAI"
    ).exists()


def init_instance(cfg: LabConfig, role: Role) -> bool:
    """Write my.cnf and create the system tables (once). Returns True when it initialised."""
    cnf = write_cnf(cfg, role)
    if is_initialized(cfg, role):
        return False
    log = instance_dir(cfg, role) / "install-db.log"
    with open(log, "wb") as out:
        r = subprocess.run(
            [
                "mariadb-install-db",
                f"--defaults-file={cnf}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=120,
            check=False,
        )
    if r.returncode != 0 or not is_initialized(cfg, role):
        raise MariaDBError(
            f"MariaDB {role}: mariadb-install-db exited {r.returncode}; log: {log}\n"
            f"--- last lines ---\n{log_tail(log, 15)}"
        )
    return True


def instance_running(cfg: LabConfig, role: Role) -> bool:
    return pid_alive(pid_file(cfg, role), expect="mariadbd")


def start_instance(cfg: LabConfig, role: Role) -> None:
    """Start the instance unless running; returns once it accepts SQL connections."""
    if not instance_running(cfg, role):
        port = port_of(cfg, role)
        if port_open("127.0.0.1", port):
            raise MariaDBError(
                f"MariaDB {role}: port 127.0.0.1:{port} is already in use by another "
                "process (not this lab's instance)"
            )
        cnf = write_cnf(cfg, role)
        # mariadbd stays in the foreground; it also writes its own pid to the same file.
        start_background(
            ["mariadbd", f"--defaults-file={cnf}"],
            pid_file(cfg, role),
            error_log(cfg, role),
            cwd=instance_dir(cfg, role),
        )
    try:
        wait_port(
            "127.0.0.1",
            port_of(cfg, role),
            START_TIMEOUT_S,
            pidfile=pid_file(cfg, role),
            logfile=error_log(cfg, role),
            what=f"MariaDB {role}",
        )
    except RuntimeError as e:
        raise MariaDBError(str(e)) from e
    # The TCP listener opens a moment before the server accepts logins; wait for a query.
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            query(cfg, role, "SELECT 1")
            return
        except pymysql.MySQLError as e:
            if time.monotonic() > deadline:
                raise MariaDBError(_with_log(cfg, role, f"does not answer queries: {e}")) from e
            time.sleep(0.2)


def stop_instance(cfg: LabConfig, role: Role) -> bool:
    """Stop the instance (SIGTERM = clean shutdown). Safe when not running."""
    return stop_pidfile(pid_file(cfg, role), timeout=STOP_TIMEOUT_S, expect="mariadbd")


# --------------------------------------------------------------------------- SQL access


def connect(
    cfg: LabConfig, role: Role, *, user: str = "root", database: str | None = None, dict_rows: bool = False
) -> pymysql.connections.Connection[Any]:
    """A connection to an instance: root over the unix socket, any other user over TCP
    (with the `zerodown` password from the lab's secrets)."""
    cursor = pymysql.cursors.DictCursor if dict_rows else pymysql.cursors.Cursor
    if user == "root":
        return pymysql.connect(
            unix_socket=str(socket_path(cfg, role)),
            user="root",
            database=database,
            autocommit=True,
            connect_timeout=5,
            cursorclass=cursor,
        )
    password = (
        _secret(cfg.db_password_file)
        if user == DB_USER
        else _secret(admin_password_file(cfg))
        if user == ADMIN_USER
        else ""
    )
    return pymysql.connect(
        host="127.0.0.1",
        port=port_of(cfg, role),
        user=user,
        password=password,
        database=database,
        autocommit=True,
        connect_timeout=5,
        cursorclass=cursor,
    )


def query(
    cfg: LabConfig, role: Role, sql: str, args: Any = None, *, database: str | None = None
) -> list[tuple[Any, ...]]:
    """Run one statement as root; returns all rows."""
    with connect(cfg, role, database=database) as conn, conn.cursor() as cur:
        cur.execute(sql, args)
        return list(cur.fetchall())


def query_dict(cfg: LabConfig, role: Role, sql: str) -> list[dict[str, Any]]:
    with connect(cfg, role, dict_rows=True) as conn, conn.cursor() as cur:
        cur.execute(sql)
        return list(cur.fetchall())


def run_sql_file(cfg: LabConfig, role: Role, path: Path, database: str = DB_NAME) -> None:
    """Run a SQL script with the `mariadb` client (it handles comments and delimiters)."""
    with open(path, "rb") as f:
        r = subprocess.run(
            ["mariadb", "--no-defaults", f"--socket={socket_path(cfg, role)}", "-uroot", database],
            stdin=f,
            capture_output=True,
            timeout=120,
            check=False,
        )
    if r.returncode != 0:
        raise MariaDBError(
            f"MariaDB {role}: {path} failed (exit {r.returncode}): "
            f"{r.stderr.decode(errors='replace').strip()}"
        )


# --------------------------------------------------------------------------- bootstrap


def bootstrap_primary(cfg: LabConfig) -> bool:
    """Create labapp (schema v1), users and grants on the primary, once (a marker file
    records success; every statement is idempotent, so an interrupted run can be redone).
    Returns True when it ran."""
    marker = instance_dir(cfg, "primary") / ".bootstrapped"
    if marker.exists():
        return False
    db_pw, admin_pw, repl_pw = (
        _secret(cfg.db_password_file),
        _secret(cfg.admin_password_file),
        _secret(repl_password_file(cfg)),
    )
    with connect(cfg, "primary") as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE IF NOT EXISTS `{DB_NAME}` CHARACTER SET utf8mb4")
        for host in ("127.0.0.1", "localhost"):
            cur.execute(f"CREATE USER IF NOT EXISTS '{DB_USER}'@'{host}' IDENTIFIED BY %s", (db_pw,))
            cur.execute(f"ALTER USER '{DB_USER}'@'{host}' IDENTIFIED BY %s", (db_pw,))
            cur.execute(f"GRANT ALL PRIVILEGES ON `{DB_NAME}`.* TO '{DB_USER}'@'{host}'")
            cur.execute(f"GRANT {ZERODOWN_GLOBAL_PRIVS} ON *.* TO '{DB_USER}'@'{host}'")
        cur.execute(f"CREATE USER IF NOT EXISTS '{REPL_USER}'@'127.0.0.1' IDENTIFIED BY %s", (repl_pw,))
        cur.execute(f"ALTER USER '{REPL_USER}'@'127.0.0.1' IDENTIFIED BY %s", (repl_pw,))
        cur.execute(f"GRANT REPLICATION SLAVE ON *.* TO '{REPL_USER}'@'127.0.0.1'")
        cur.execute(f"USE `{DB_NAME}`")
        _create_schema_v1(cur, admin_pw)
    marker.write_text("bootstrapped\n")
    return True


def _create_schema_v1(cur: pymysql.cursors.Cursor, admin_pw: str) -> None:
    for stmt in SCHEMA_V1:
        cur.execute(stmt)
    cur.execute(_SITE_ROW)
    cur.execute("SELECT COUNT(*) FROM schema_version")
    row = cur.fetchone()
    if row is None or row[0] == 0:
        cur.execute("INSERT INTO schema_version (version) VALUES (1)")
    digest = hashlib.sha256(admin_pw.encode("utf-8")).hexdigest()
    cur.execute(
        "INSERT INTO users (name, password_sha256) VALUES (%s, %s) "
        "ON DUPLICATE KEY UPDATE password_sha256 = VALUES(password_sha256)",
        (PROBE_USER, digest),
    )


def _exact_db(name: str) -> str:
    """A database name for GRANT ... ON `db`.*: '_' and '%' are wildcards there, so escape
    them to grant exactly this database (labapp_test must not also match labappXtest)."""
    return name.replace("_", "\\_").replace("%", "\\%")


def ensure_lab_extras(cfg: LabConfig) -> None:
    """Idempotent, on every lab up and reset (labs bootstrapped before these existed get
    them too): the Secret Server tables in labapp with the site row, the fault-injection
    database, and the lab DB user's grants on the staging and scratch databases (all of it,
    create and drop included, so a procedure can restore a backup there) and on the faults
    table (SELECT: the migration's hook reads it as that user)."""
    with connect(cfg, "primary") as conn, conn.cursor() as cur:
        cur.execute(f"USE `{DB_NAME}`")
        for stmt in SCHEMA_V1:
            cur.execute(stmt)
        cur.execute(_SITE_ROW)
        cur.execute(f"CREATE DATABASE IF NOT EXISTS `{FAULTS_DB_NAME}` CHARACTER SET utf8mb4")
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {FAULTS_TABLE} (target VARCHAR(64) NOT NULL, "
            "point VARCHAR(64) NOT NULL, PRIMARY KEY (target, point)) ENGINE=InnoDB"
        )
        for host in ("127.0.0.1", "localhost"):
            for db in (STAGING_DB_NAME, SCRATCH_DB_NAME):
                cur.execute(f"GRANT ALL PRIVILEGES ON `{_exact_db(db)}`.* TO '{DB_USER}'@'{host}'")
            cur.execute(f"GRANT SELECT ON {FAULTS_TABLE} TO '{DB_USER}'@'{host}'")
        # Binlogged: the replica gets the account too (it is a copy of the primary).
        _ensure_admin_account(cur, _secret(admin_password_file(cfg)))


def _ensure_admin_account(cur: pymysql.cursors.Cursor, password: str) -> None:
    cur.execute(f"CREATE USER IF NOT EXISTS '{ADMIN_USER}'@'127.0.0.1' IDENTIFIED BY %s", (password,))
    cur.execute(f"ALTER USER '{ADMIN_USER}'@'127.0.0.1' IDENTIFIED BY %s", (password,))
    cur.execute(f"GRANT ALL PRIVILEGES ON *.* TO '{ADMIN_USER}'@'127.0.0.1' WITH GRANT OPTION")


def inject_migration_failure(cfg: LabConfig, database: str, on: bool) -> bool:
    """Make the lab's migration 2 (002_up.sql) fail when it runs in `database` (on), or
    work again (off). Only zdlab.faults changes, never a table of the application's
    databases. Returns True when something changed."""
    if not database or len(database) > 64:
        raise ValueError(f"database name {database!r}: expected 1-64 characters")
    with connect(cfg, "primary") as conn, conn.cursor() as cur:
        if on:
            cur.execute(
                f"INSERT IGNORE INTO {FAULTS_TABLE} (target, point) VALUES (%s, %s)",
                (database, MIGRATION_FAULT_POINT),
            )
        else:
            cur.execute(
                f"DELETE FROM {FAULTS_TABLE} WHERE target = %s AND point = %s",
                (database, MIGRATION_FAULT_POINT),
            )
        return bool(cur.rowcount)


def injected_faults(cfg: LabConfig) -> list[tuple[str, str]]:
    """(target, point) of every injected fault."""
    try:
        rows = query(cfg, "primary", f"SELECT target, point FROM {FAULTS_TABLE} ORDER BY target, point")
    except pymysql.MySQLError as e:
        if e.args and e.args[0] in (1049, 1146):  # unknown database / table: nothing injected
            return []
        raise
    return [(str(t), str(p)) for t, p in rows]


def site_state_problems(cfg: LabConfig) -> list[str]:
    """How the Secret Server side of the lab differs from its defaults ([] when it does not):
    settings, audit rows, staging / scratch databases, injected faults."""
    out: list[str] = []
    try:
        rows = query(
            cfg,
            "primary",
            "SELECT Scope, MaintenanceMode, IgnoreVersionMismatch, "
            "EnforceVersionMatch FROM tbUpgradeSettings ORDER BY Scope",
            database=DB_NAME,
        )
        audits = query(cfg, "primary", "SELECT COUNT(*) FROM tbAudit", database=DB_NAME)[0][0]
    except pymysql.MySQLError as e:
        return [f"Secret Server tables unreadable: {e}"]
    if [tuple(r) for r in rows] != [(SITE_SCOPE, 0, 0, 0)]:
        out.append(f"tbUpgradeSettings is {[tuple(r) for r in rows]}")
    if audits:
        out.append(f"tbAudit holds {audits} rows")
    dbs = {str(r[0]) for r in query(cfg, "primary", "SHOW DATABASES")}
    out += [f"database {d} exists" for d in (STAGING_DB_NAME, SCRATCH_DB_NAME) if d in dbs]
    if FAULTS_DB_NAME not in dbs:
        out.append(f"database {FAULTS_DB_NAME} is missing")
    out += [f"fault {p} injected on {t}" for t, p in injected_faults(cfg)]
    return out


def reset_site_state(cfg: LabConfig) -> list[str]:
    """Secret Server side back to its defaults; returns what was done: site settings
    (0, 0, 0), node overrides deleted, tbAudit emptied, staging and scratch databases
    dropped, injected faults cleared (tables and grants ensured first)."""
    ensure_lab_extras(cfg)
    done: list[str] = []
    with connect(cfg, "primary", database=DB_NAME) as conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE tbUpgradeSettings SET MaintenanceMode = 0, IgnoreVersionMismatch = 0, "
            "EnforceVersionMatch = 0 WHERE Scope = %s",
            (SITE_SCOPE,),
        )
        if cur.rowcount:
            done.append("site settings back to maintenance 0, ignore mismatch 0, enforce 0")
        cur.execute("DELETE FROM tbUpgradeSettings WHERE Scope <> %s", (SITE_SCOPE,))
        if cur.rowcount:
            done.append(f"deleted {cur.rowcount} node setting override(s)")
        cur.execute("DELETE FROM tbAudit")
        if cur.rowcount:
            done.append(f"deleted {cur.rowcount} audit row(s)")
        for db in (STAGING_DB_NAME, SCRATCH_DB_NAME):
            cur.execute("SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s", (db,))
            if cur.fetchone()[0]:
                cur.execute(f"DROP DATABASE `{db}`")
                done.append(f"dropped database {db}")
        cur.execute(f"DELETE FROM {FAULTS_TABLE}")
        if cur.rowcount:
            done.append(f"cleared {cur.rowcount} injected fault(s)")
    return done


def replica_status(cfg: LabConfig) -> dict[str, Any] | None:
    """SHOW SLAVE STATUS of the replica as a dict, or None when replication is not set up."""
    return replica_status_of(cfg, "replica")


def setup_replication(cfg: LabConfig) -> None:
    """Point the replica at the primary (GTID, from slave_pos) and start it; idempotent."""
    st = replica_status(cfg)
    if st and st.get("Slave_IO_Running") == "Yes" and st.get("Slave_SQL_Running") == "Yes":
        return
    repl_pw = _secret(repl_password_file(cfg))
    with connect(cfg, "replica") as conn, conn.cursor() as cur:
        if st:
            cur.execute("STOP SLAVE")
        cur.execute(
            "CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT=%s, MASTER_USER=%s, "
            "MASTER_PASSWORD=%s, MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1",
            (cfg.primary_db_port, REPL_USER, repl_pw),
        )
        cur.execute("START SLAVE")
    # START SLAVE returns at once; confirm both threads really run (a wrong password or a
    # GTID conflict shows up here instead of later as a silently stale replica).
    deadline = time.monotonic() + 15
    while True:
        st = replica_status(cfg) or {}
        if st.get("Slave_IO_Running") == "Yes" and st.get("Slave_SQL_Running") == "Yes":
            return
        if time.monotonic() > deadline:
            raise MariaDBError(
                _with_log(
                    cfg,
                    "replica",
                    "replication did not start: IO={} SQL={} io_error={!r} sql_error={!r}".format(
                        st.get("Slave_IO_Running"),
                        st.get("Slave_SQL_Running"),
                        st.get("Last_IO_Error"),
                        st.get("Last_SQL_Error"),
                    ),
                )
            )
        time.sleep(0.2)


def primary_gtid(cfg: LabConfig) -> str:
    return str(query(cfg, "primary", "SELECT @@GLOBAL.gtid_binlog_pos")[0][0] or "")


def wait_replica_caught_up(cfg: LabConfig, timeout: float = 30.0) -> str:
    """Wait until the replica applied everything the primary has binlogged; returns the GTID
    position. Raises MariaDBError when replication is stopped / broken or too slow."""
    pos = primary_gtid(cfg)
    if not pos:
        return pos
    st = replica_status(cfg)
    if not st:
        raise MariaDBError("MariaDB replica: replication is not configured (SHOW SLAVE STATUS is empty)")
    if st.get("Slave_SQL_Running") != "Yes":
        raise MariaDBError(f"MariaDB replica: SQL thread not running: {st.get('Last_SQL_Error')!r}")
    # MASTER_GTID_WAIT blocks server-side until the position is applied (0) or times out (-1).
    r = query(cfg, "replica", "SELECT MASTER_GTID_WAIT(%s, %s)", (pos, timeout))[0][0]
    if r != 0:
        st = replica_status(cfg) or {}
        raise MariaDBError(
            _with_log(
                cfg,
                "replica",
                f"did not reach GTID {pos} within {timeout:.0f}s "
                f"(at {st.get('Gtid_IO_Pos')!r}, IO={st.get('Slave_IO_Running')}, "
                f"io_error={st.get('Last_IO_Error')!r}, sql_error={st.get('Last_SQL_Error')!r})",
            )
        )
    return pos


# --------------------------------------------------------------------------- whole pair


def start_mariadb(cfg: LabConfig) -> None:
    """Everything, idempotently: secrets, init all three, start them, bootstrap the primary,
    replication, the warm server's accounts, and wait until the replica has caught up."""
    ensure_db_secrets(cfg)
    for role in ROLES:
        init_instance(cfg, role)
    for role in ROLES:
        start_instance(cfg, role)
    bootstrap_primary(cfg)
    ensure_lab_extras(cfg)
    ensure_warm_accounts(cfg)
    setup_replication(cfg)
    wait_replica_caught_up(cfg)


def stop_mariadb(cfg: LabConfig) -> None:
    """Stop the replicas first (so they do not log reconnect errors), then the primary."""
    for role in ("warm", "replica", "primary"):
        stop_instance(cfg, role)


def instance_status(cfg: LabConfig, role: Role) -> dict[str, Any]:
    """{running, pid, port, answering, read_only, gtid, [replication fields]}."""
    out: dict[str, Any] = {
        "running": instance_running(cfg, role),
        "pid": read_pid(pid_file(cfg, role)),
        "port": port_of(cfg, role),
        "answering": False,
        "log": str(error_log(cfg, role)),
    }
    if not out["running"]:
        out["pid"] = None
        return out
    try:
        ro, gtid = query(cfg, role, "SELECT @@GLOBAL.read_only, @@GLOBAL.gtid_current_pos")[0]
        out.update(answering=True, read_only=bool(ro), gtid=gtid)
        if role in ("replica", "warm"):
            st = replica_status_of(cfg, role) or {}
            out.update(
                io_running=st.get("Slave_IO_Running"),
                sql_running=st.get("Slave_SQL_Running"),
                seconds_behind=st.get("Seconds_Behind_Master"),
                last_error=st.get("Last_IO_Error") or st.get("Last_SQL_Error") or "",
                replicating_from=(f"{st.get('Master_Host')}:{st.get('Master_Port')}" if st else None),
            )
        if role == "warm":
            out["databases"] = warm_databases(cfg)
    except pymysql.MySQLError as e:
        out["error"] = str(e)
    return out


def mariadb_status(cfg: LabConfig) -> dict[str, dict[str, Any]]:
    return {role: instance_status(cfg, role) for role in ROLES}


# --------------------------------------------------------------------------- reset


def schema_version(cfg: LabConfig) -> int:
    rows = query(cfg, "primary", "SELECT COALESCE(MAX(version), 0) FROM schema_version", database=DB_NAME)
    return int(rows[0][0])


def _columns(cfg: LabConfig) -> dict[str, list[str]]:
    rows = query(
        cfg,
        "primary",
        "SELECT TABLE_NAME, COLUMN_NAME FROM information_schema.COLUMNS "
        "WHERE TABLE_SCHEMA = %s ORDER BY TABLE_NAME, ORDINAL_POSITION",
        (DB_NAME,),
    )
    cols: dict[str, list[str]] = {}
    for table, column in rows:
        cols.setdefault(str(table), []).append(str(column))
    return cols


def _down_migrations(package: Path, above: int) -> list[tuple[int, str]]:
    """(version, down SQL) of every migration in `package` newer than `above`, newest first."""
    with zipfile.ZipFile(package) as z:
        release = json.loads(z.read("release.json"))
        out = [
            (int(m["version"]), z.read(m["down"]).decode("utf-8"))
            for m in release.get("migrations", [])
            if int(m["version"]) > above and m.get("down")
        ]
    return sorted(out, reverse=True)


def reset_schema(cfg: LabConfig, package_v2: Path | None = None) -> list[str]:
    """Bring labapp back to schema version 1 and return what was done.

    Runs the down migrations of `package_v2` (default cfg.package(2)) when the recorded
    version is above 1; if the tables still do not match version 1 afterwards (a migration
    half-applied by a failed test), they are recreated at version 1 (losing their rows)."""
    done: list[str] = []
    version = schema_version(cfg)
    if version > 1:
        pkg = package_v2 or cfg.package(2, "mariadb")  # the lab resets in MariaDB's own SQL
        for v, sql in _down_migrations(pkg, 1):
            if v > version:
                continue
            script = instance_dir(cfg, "primary") / f"down_{v:03d}.sql"
            script.write_text(sql, encoding="utf-8")
            run_sql_file(cfg, "primary", script)
            script.unlink()
            done.append(f"ran down migration {v} of {pkg.name}")
    with connect(cfg, "primary", database=DB_NAME) as conn, conn.cursor() as cur:
        cur.execute("SELECT COUNT(*), COALESCE(MAX(version), 0) FROM schema_version")
        count, current = cur.fetchone()
        if count != 1 or current != 1:
            cur.execute("DELETE FROM schema_version")
            cur.execute("INSERT INTO schema_version (version) VALUES (1)")
            done.append(f"schema_version {current} -> 1")
    # Tables added after a lab was bootstrapped are created here rather than counted as a
    # mismatch (which would recreate every table and lose the rows); zerodown's migration
    # log is zerodown's, not the application's: a site as installed has none.
    ensure_lab_extras(cfg)
    with connect(cfg, "primary", database=DB_NAME) as conn, conn.cursor() as cur:
        cur.execute("SHOW TABLES LIKE 'zerodown_migration_log'")
        if cur.fetchone():
            cur.execute("DROP TABLE zerodown_migration_log")
            done.append("dropped zerodown_migration_log")
    cols = _columns(cfg)
    wanted = SCHEMA_V1_COLUMNS
    if {t: cols.get(t) for t in wanted} != wanted or set(cols) - set(wanted):
        with connect(cfg, "primary", database=DB_NAME) as conn, conn.cursor() as cur:
            for table in cols:
                cur.execute(f"DROP TABLE IF EXISTS `{table}`")
            _create_schema_v1(cur, _secret(cfg.admin_password_file))
        done.append(f"tables did not match schema 1 ({sorted(cols)}): recreated at version 1")
    return done


def rebuild_replica(cfg: LabConfig) -> None:
    """Throw the replica away and re-seed it from a consistent dump of the primary (used by
    a reset when replication is broken, the replica was promoted or has diverged).

    A dump, not a replay of the primary's binlog from the start, so this also works after
    old binlogs expired. The load runs with sql_log_bin=0: written to the replica's own
    binlog it would carry server_id 2 GTIDs that gtid_strict_mode then refuses to follow
    with the primary's (lower) sequence numbers."""
    stop_instance(cfg, "replica")
    shutil.rmtree(instance_dir(cfg, "replica"), ignore_errors=True)
    init_instance(cfg, "replica")
    start_instance(cfg, "replica")
    dump = subprocess.run(
        [
            "mariadb-dump",
            "--no-defaults",
            f"--socket={socket_path(cfg, 'primary')}",
            "-uroot",
            "--all-databases",
            "--single-transaction",
            "--gtid",
            "--master-data=1",
            "--routines",
            "--events",
            "--triggers",
        ],
        capture_output=True,
        timeout=300,
        check=False,
    )
    if dump.returncode != 0:
        raise MariaDBError(
            f"MariaDB primary: mariadb-dump for the replica failed (exit {dump.returncode}): "
            f"{dump.stderr.decode(errors='replace').strip()}"
        )
    load = subprocess.run(
        ["mariadb", "--no-defaults", f"--socket={socket_path(cfg, 'replica')}", "-uroot"],
        input=b"SET SESSION sql_log_bin = 0;\n" + dump.stdout,
        capture_output=True,
        timeout=300,
        check=False,
    )
    if load.returncode != 0:
        raise MariaDBError(
            _with_log(
                cfg,
                "replica",
                f"loading the primary's dump failed (exit "
                f"{load.returncode}): {load.stderr.decode(errors='replace').strip()}",
            )
        )
    # The dump replaced the grant tables; make the loaded users effective. LOCAL: a plain
    # FLUSH is binlogged and would give the replica a GTID of its own (see above).
    query(cfg, "replica", "FLUSH LOCAL PRIVILEGES")
    setup_replication(cfg)
    wait_replica_caught_up(cfg)


def ensure_primary_role(cfg: LabConfig) -> list[str]:
    """Make the primary a writable primary again (after a failover / switchover test left it
    read-only or replicating from the other instance); returns what was changed."""
    done: list[str] = []
    if replica_status_of(cfg, "primary"):
        query(cfg, "primary", "STOP SLAVE")
        query(cfg, "primary", "RESET SLAVE ALL")
        done.append("primary no longer replicates")
    if query(cfg, "primary", "SELECT @@GLOBAL.read_only")[0][0]:
        query(cfg, "primary", "SET GLOBAL read_only = OFF")
        done.append("primary writable again")
    return done


def replica_status_of(cfg: LabConfig, role: Role) -> dict[str, Any] | None:
    rows = query_dict(cfg, role, "SHOW SLAVE STATUS")
    return rows[0] if rows else None


def replica_in_sync(cfg: LabConfig, timeout: float = 10.0) -> bool:
    """True when the replica replicates, is read-only and holds exactly the primary's GTID
    position once caught up (a write made on the replica itself shows up as a difference)."""
    if not replica_healthy(cfg):
        return False
    try:
        pos = wait_replica_caught_up(cfg, timeout)
    except MariaDBError:
        return False
    current = str(query(cfg, "replica", "SELECT @@GLOBAL.gtid_current_pos")[0][0] or "")
    return current == pos


def replica_healthy(cfg: LabConfig) -> bool:
    st = instance_status(cfg, "replica")
    return bool(
        st.get("answering")
        and st.get("read_only")
        and st.get("io_running") == "Yes"
        and st.get("sql_running") == "Yes"
    )


# --------------------------------------------------------------------------- the warm server


def _warm_baseline_file(cfg: LabConfig) -> Path:
    return instance_dir(cfg, "warm") / "baseline-users.json"


def _accounts(cur: pymysql.cursors.Cursor) -> set[tuple[str, str]]:
    cur.execute("SELECT User, Host FROM mysql.user")
    return {(str(u), str(h)) for u, h in cur.fetchall()}


def warm_databases(cfg: LabConfig) -> list[str]:
    """The warm server's databases other than the server's own (empty when it is empty)."""
    return sorted(str(r[0]) for r in query(cfg, "warm", "SHOW DATABASES") if str(r[0]) not in SYSTEM_SCHEMAS)


def ensure_warm_accounts(cfg: LabConfig) -> None:
    """ADMIN_USER on the warm server (idempotent, not binlogged). The accounts present the
    first time it is seen empty are recorded as its baseline: reset_warm drops the others
    (those an initialisation copied from the primary)."""
    password = _secret(admin_password_file(cfg))
    with connect(cfg, "warm") as conn, conn.cursor() as cur:
        cur.execute("SET SESSION sql_log_bin = 0")
        _ensure_admin_account(cur, password)
        baseline = _warm_baseline_file(cfg)
        if not baseline.exists() and not warm_databases(cfg) and not replica_status_of(cfg, "warm"):
            users = sorted(_accounts(cur))
            baseline.write_text(json.dumps(users) + "\n", encoding="utf-8")


def _warm_baseline(cfg: LabConfig) -> set[tuple[str, str]] | None:
    try:
        return {(str(u), str(h)) for u, h in json.loads(_warm_baseline_file(cfg).read_text(encoding="utf-8"))}
    except (OSError, ValueError, TypeError):
        return None


def warm_problems(cfg: LabConfig) -> list[str]:
    """How the warm server differs from an empty server ([] when it is empty): replication
    configured, databases, read_only, GTIDs in its binlog or slave position."""
    out: list[str] = []
    st = replica_status_of(cfg, "warm")
    if st:
        out.append(
            f"replicates from {st.get('Master_Host')}:{st.get('Master_Port')} "
            f"(IO {st.get('Slave_IO_Running')}, SQL {st.get('Slave_SQL_Running')})"
        )
    dbs = warm_databases(cfg)
    if dbs:
        out.append(f"holds databases {', '.join(dbs)}")
    ro, binlog_pos, slave_pos = query(
        cfg, "warm", "SELECT @@GLOBAL.read_only, @@GLOBAL.gtid_binlog_pos, @@GLOBAL.gtid_slave_pos"
    )[0]
    if ro:
        out.append("read_only is ON")
    if binlog_pos or slave_pos:
        out.append(f"GTIDs recorded (binlog {binlog_pos!r}, slave position {slave_pos!r})")
    return out


def reset_warm(cfg: LabConfig) -> list[str]:
    """The warm server back to empty, as lab_up leaves it; returns what was done. STOP SLAVE,
    RESET SLAVE ALL, its databases dropped, the accounts copied from the primary dropped, its
    binlog and slave position cleared, read_only OFF. Nothing is binlogged (sql_log_bin=0),
    and a replica never follows the warm server, so nothing else changes."""
    start_instance(cfg, "warm")
    done: list[str] = []
    baseline = _warm_baseline(cfg)
    with connect(cfg, "warm") as conn, conn.cursor() as cur:
        cur.execute("SET SESSION sql_log_bin = 0")
        if replica_status_of(cfg, "warm"):
            cur.execute("STOP SLAVE")
            cur.execute("RESET SLAVE ALL")
            done.append("warm server no longer replicates")
        dbs = warm_databases(cfg)
        for db in dbs:
            cur.execute(f"DROP DATABASE IF EXISTS `{db.replace('`', '``')}`")
        if dbs:
            done.append(f"dropped on the warm server: {', '.join(dbs)}")
        if baseline is not None:
            extra = sorted(_accounts(cur) - baseline - {(ADMIN_USER, "127.0.0.1")})
            for user, host in extra:
                cur.execute("DROP USER IF EXISTS %s@%s", (user, host))
            if extra:
                done.append(f"dropped {len(extra)} account(s) copied to the warm server")
        cur.execute("SELECT @@GLOBAL.gtid_binlog_pos, @@GLOBAL.gtid_slave_pos, @@GLOBAL.read_only")
        binlog_pos, slave_pos, ro = cur.fetchone()
        if binlog_pos or slave_pos:
            # Its binlog holds the primary's transactions (log_slave_updates) or, once
            # promoted, its own: an empty server has neither.
            cur.execute("RESET MASTER")
            cur.execute("SET GLOBAL gtid_slave_pos = ''")
            done.append("warm server's binlog and slave position cleared")
        if ro:
            cur.execute("SET GLOBAL read_only = OFF")
            done.append("warm server writable again")
    ensure_warm_accounts(cfg)
    return done


def _kv_lines(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            out[key.strip()] = value.strip()
    return out


def _set_kv(text: str, values: dict[str, str]) -> str:
    lines = text.splitlines()
    for n, line in enumerate(lines):
        key, sep, _ = line.partition("=")
        if sep and not line.lstrip().startswith("#") and key.strip() in values:
            lines[n] = f"{key.strip()} = {values[key.strip()]}"
    return "\n".join(lines) + "\n"


def nodes_on_warm(cfg: LabConfig) -> list[Path]:
    """Node folders (any: app nodes, clones, staging) whose app/database.config names the
    warm server (the revert path of seed 004 moves them there)."""
    if not cfg.nodes_dir.is_dir():
        return []
    out: list[Path] = []
    for node in sorted(p for p in cfg.nodes_dir.iterdir() if p.is_dir()):
        conf = node / "app" / "database.config"
        try:
            kv = _kv_lines(conf.read_text(encoding="utf-8"))
        except OSError:
            continue
        if kv.get("port") == str(cfg.warm_db_port):
            out.append(node)
    return out


def point_nodes_at_primary(
    cfg: LabConfig, restart: bool = True, no_restart: frozenset[str] = frozenset()
) -> list[str]:
    """Every node whose database.config names the warm server is pointed back at the
    primary (host and port rewritten, the rest of the file kept, mode 600 as installed); with `restart`,
    those whose app runs are restarted (the app reads database.config at start), but not
    the folders named in `no_restart`. Returns what was done. lab_reset calls it before it
    reinstalls (and restarts) its nodes: clones outside cfg.nodes are not reinstalled."""
    done: list[str] = []
    for node in nodes_on_warm(cfg):
        conf = node / "app" / "database.config"
        text = _set_kv(
            conf.read_text(encoding="utf-8"), {"host": "127.0.0.1", "port": str(cfg.primary_db_port)}
        )
        tmp = conf.with_name(conf.name + ".new")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        tmp.replace(conf)
        done.append(f"{node.name} pointed back at the primary")
        if (
            restart
            and node.name not in no_restart
            and (node / "ctl").exists()
            and _ctl(node, "status").returncode == 0
        ):
            for action in ("stop", "start"):
                r = _ctl(node, action)
                if r.returncode != 0:
                    raise MariaDBError(f"{node.name}: ctl {action} exited {r.returncode}: {r.stderr.strip()}")
            done.append(f"{node.name} restarted")
    return done


def _ctl(node: Path, action: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", "-c", f"./ctl {action}"],
        cwd=node,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
