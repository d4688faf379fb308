"""The Open-Xchange stand-in's data on the lab MariaDB primary: OX's configuration database
and the content of its database schemata, plus the operations OX's tools perform on them.

Two databases (both created, reset and dropped here, as root over the primary's socket):

`oxconfigdb` - OX's configuration database. The OX tables keep OX's own names and columns
(a subset, from OX's `configdb.sql`), so SQL written against a real config DB reads the lab's:
    configdb_sequence(id)                         one row: the last id handed out (pools, servers)
    db_pool(db_pool_id, url, driver, login, password, hardlimit, max, initial, name)
                                                  one pool: the lab primary, name "oxdatabase"
    server(server_id, name UNIQUE)                registered OX servers (registerserver)
    context(cid, name UNIQUE, enabled, reason_id) disableschema sets enabled=0 with the
                                                  schema-move reason id; enableschema only
                                                  re-enables contexts carrying that reason
    context_server2db_pool(server_id, cid, read_db_pool_id, write_db_pool_id, db_schema)
                                                  context -> server + schema (changeserver)
    contexts_per_dbschema(db_pool_id, schemaname, count)
                                                  the schema list (listdatabaseschema)
    db_cluster(cluster_id, read_db_pool_id, write_db_pool_id, weight, max_units)
                                                  one row per write pool (configdb.sql); a pool
                                                  whose max_units is 0 takes no new contexts and
                                                  listdatabaseschema leaves its schemata out
    contexts_per_dbpool(db_pool_id, count)        contexts per pool (listdatabase's curctx)
  and four lab-only tables (a real config DB has none of them):
    schema_state(schema_name, enabled, server_id, update_state, schema_version, updated_at,
                 last_error, update_runs, disabled_at, enabled_at, update_started_at,
                 update_ended_at)                 what the tools did to each schema; update_state
                                                  is none | running | done | failed (runupdate);
                                                  update_runs counts the update runs that started;
                                                  the *_at times (the DB's clock, microseconds):
                                                  when the tools last took it from enabled to
                                                  disabled and back, and its last update run's
                                                  start and end - the site's own record of how
                                                  long a schema was unavailable (bench/)
    update_faults(schema_name, task_name, remaining)
                                                  fault injection: runupdate fails on that schema
                                                  (remaining NULL: always; N: the next N runs)
    tool_faults(tool, kind, remaining)            fault injection: the next `remaining` calls of
                                                  a tool fail as OX's tools do when the RMI
                                                  server is unreachable (kind `connect`) or the
                                                  call breaks (kind `remote`); lab only
    lab_meta(k, v)                                the initial server, version, pool and number
                                                  of schemata, for reset()

`oxschemata` - the schemata's content. On a real site every schema `oxdatabase_<n>` is its own
database; here all of them are rows of two tables keyed by `schema_name`:
    contexts(cid, schema_name, name)   users(cid, id, schema_name, name, mail)
Decision: rows, not databases. 10,000 schemata as real databases would be 20,000 InnoDB tables
(files, table cache, replication of every CREATE) and minutes to create and drop on the lab's
small instance; as rows they take seconds (measured: see tests/test_lab_ox_tools.py's notes).

The tools connect as `openexchange` (password in secrets/ox_db_password; DML rights on both
databases only). The operations below take an open pymysql connection (autocommit on) so
the tools and tests share one implementation; errors that OX reports as a server exception
raise `OxError` with a `kind` the tools map to OX's exit codes.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymysql

from lab import mariadb
from lab.config import LabConfig, new_secret

CONFIGDB = "oxconfigdb"
SCHEMATA_DB = "oxschemata"
OX_DB_USER = "openexchange"
POOL_NAME = "oxdatabase"  # db_pool.name; the schemata are oxdatabase_1 .. oxdatabase_K
MASTER_ADMIN = "oxadminmaster"
# hosting.properties `com.openexchange.admin.schemamove.contextdisablereasonid` marks contexts
# disabled by disableschema, so enableschema leaves contexts disabled for other reasons alone
# (OX 7.6.2 release notes). Its default value is a guess.
SCHEMA_MOVE_REASON_ID = 1431655765
DEFAULT_VERSION = "7.10.0"  # what every schema is at after create()
DEFAULT_TARGET_VERSION = "7.10.1"  # what runupdate brings a schema to unless OX_VERSION says
UPDATE_STATES = ("none", "running", "done", "failed")
# The task name runupdate reports for an injected failure (lab-made; real names look alike).
FAILING_TASK = "com.openexchange.groupware.update.tasks.LabInjectedFailureTask"

# schema_state's times (see the module doc); reset() clears them.
_TIME_COLUMNS = ("disabled_at", "enabled_at", "update_started_at", "update_ended_at")

_OX_COUNT_TABLES = [
    "CREATE TABLE IF NOT EXISTS db_cluster (cluster_id INT UNSIGNED NOT NULL, "
    "read_db_pool_id INT UNSIGNED NOT NULL, write_db_pool_id INT UNSIGNED NOT NULL, weight INT UNSIGNED, "
    "max_units INT, PRIMARY KEY (cluster_id), "
    "FOREIGN KEY (write_db_pool_id) REFERENCES db_pool (db_pool_id)) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS contexts_per_dbpool (db_pool_id INT UNSIGNED NOT NULL, "
    "count INT UNSIGNED NOT NULL, PRIMARY KEY (db_pool_id)) ENGINE=InnoDB",
]
# Lab only: see the module doc and inject_tool_fault.
_TOOL_FAULTS_TABLE = (
    "CREATE TABLE IF NOT EXISTS tool_faults (tool VARCHAR(64) NOT NULL PRIMARY KEY, "
    "kind VARCHAR(16) NOT NULL, remaining INT UNSIGNED NOT NULL) ENGINE=InnoDB"
)
TOOL_FAULT_KINDS = ("connect", "remote")
# registerdatabase's default max units (documentation/command_line_tools/database/registerdatabase.md:
# "-x ... If this option is omitted then the default of 1000 is applied").
DEFAULT_MAX_UNITS = 1000
_INSERT_CLUSTER = (
    "INSERT INTO db_cluster (cluster_id, read_db_pool_id, write_db_pool_id, weight, "
    "max_units) VALUES (%s, 0, %s, 100, %s)"
)
_INSERT_STATE = (
    "INSERT INTO schema_state (schema_name, enabled, server_id, update_state, schema_version) "
    "VALUES (%s, 1, %s, 'none', %s)"
)
CLOSED_POOL_NAME = "oxclosed"  # add_closed_pool's pool (lab only)
_LAB_POOL_ID_BASE = 1000  # pools the lab helpers add get ids from here (not from the id sequence)

_CONFIGDB_TABLES = [
    "CREATE TABLE configdb_sequence (id INT UNSIGNED NOT NULL, PRIMARY KEY (id)) ENGINE=InnoDB",
    "CREATE TABLE db_pool (db_pool_id INT UNSIGNED NOT NULL, url VARCHAR(255) NOT NULL, "
    "driver VARCHAR(128) NOT NULL, login VARCHAR(128) NOT NULL, password VARCHAR(128) NOT NULL, "
    "hardlimit INT, max INT, initial INT, name VARCHAR(128) NOT NULL, PRIMARY KEY (db_pool_id), "
    "INDEX (name)) ENGINE=InnoDB",
    "CREATE TABLE server (server_id INT UNSIGNED NOT NULL, name VARCHAR(255) NOT NULL, "
    "PRIMARY KEY (server_id), CONSTRAINT server_name_unique UNIQUE (name)) ENGINE=InnoDB",
    "CREATE TABLE context (cid INT UNSIGNED NOT NULL, name VARCHAR(128) NOT NULL, enabled BOOLEAN, "
    "reason_id INT UNSIGNED, PRIMARY KEY (cid), UNIQUE KEY context_name_unique (name)) ENGINE=InnoDB",
    "CREATE TABLE context_server2db_pool (server_id INT UNSIGNED NOT NULL, cid INT UNSIGNED NOT NULL, "
    "read_db_pool_id INT UNSIGNED NOT NULL, write_db_pool_id INT UNSIGNED NOT NULL, "
    "db_schema VARCHAR(32) NOT NULL, PRIMARY KEY (cid, server_id), INDEX (server_id), "
    "INDEX (db_schema), FOREIGN KEY (cid) REFERENCES context (cid) ON DELETE CASCADE "
    "ON UPDATE CASCADE) ENGINE=InnoDB",
    "CREATE TABLE contexts_per_dbschema (db_pool_id INT UNSIGNED NOT NULL, "
    "schemaname VARCHAR(32) NOT NULL, count INT UNSIGNED NOT NULL, "
    "PRIMARY KEY (db_pool_id, schemaname)) ENGINE=InnoDB",
    # OX's configdb.sql (com.openexchange.admin, "Tables for the Configuration Database":
    # CREATE TABLE db_cluster) and the contexts_per_dbpool table OX's update task creates
    # (createDBPoolCountTable: db_pool_id INT4 UNSIGNED, count INT4 UNSIGNED, PRIMARY KEY).
    *_OX_COUNT_TABLES,
    # ---- lab only
    "CREATE TABLE schema_state (schema_name VARCHAR(32) NOT NULL PRIMARY KEY, "
    "enabled TINYINT NOT NULL, server_id INT UNSIGNED NOT NULL, "
    "update_state ENUM('none', 'running', 'done', 'failed') NOT NULL DEFAULT 'none', "
    "schema_version VARCHAR(32) NOT NULL, updated_at DATETIME(3) NULL, "
    "last_error VARCHAR(255) NULL, update_runs INT UNSIGNED NOT NULL DEFAULT 0, "
    f"{', '.join(f'{c} DATETIME(6) NULL' for c in _TIME_COLUMNS)}) ENGINE=InnoDB",
    "CREATE TABLE update_faults (schema_name VARCHAR(32) NOT NULL PRIMARY KEY, "
    "task_name VARCHAR(190) NOT NULL, remaining INT NULL) ENGINE=InnoDB",
    "CREATE TABLE lab_meta (k VARCHAR(64) NOT NULL PRIMARY KEY, v VARCHAR(255) NOT NULL) ENGINE=InnoDB",
    _TOOL_FAULTS_TABLE,
]
_SCHEMATA_TABLES = [
    "CREATE TABLE contexts (cid INT UNSIGNED NOT NULL PRIMARY KEY, schema_name VARCHAR(32) NOT NULL, "
    "name VARCHAR(128) NOT NULL, INDEX (schema_name)) ENGINE=InnoDB",
    "CREATE TABLE users (cid INT UNSIGNED NOT NULL, id INT UNSIGNED NOT NULL, "
    "schema_name VARCHAR(32) NOT NULL, name VARCHAR(128) NOT NULL, mail VARCHAR(255) NOT NULL, "
    "PRIMARY KEY (cid, id), INDEX (schema_name)) ENGINE=InnoDB",
]
_HOSTS = ("127.0.0.1", "localhost")
_BATCH = 5000


class OxError(Exception):
    """What OX reports as a server-side exception. `kind`: invalid_data (OX's
    InvalidDataException) | storage (StorageException) | no_such_object (NoSuchObjectException)
    | target_database (TargetDatabaseException) | update_running (SchemaExceptionCodes
    .ALREADY_LOCKED); the tools map it to OX's output and exit code."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class OxSite:
    """What create() made."""

    server_id: int
    server_name: str
    pool_id: int
    schemata: tuple[str, ...]
    contexts_per_schema: int
    users_per_context: int
    version: str


@dataclass(frozen=True)
class SchemaRow:
    """One line of listdatabaseschema (OX's columns, then the lab's state)."""

    pool_id: int
    pool_name: str
    schema: str
    url: str
    contexts: int
    enabled: bool
    server_id: int
    update_state: str
    version: str


@dataclass(frozen=True)
class SchemaState:
    """A schema as the tools left it (lab-only view for tests and checks)."""

    name: str
    enabled: bool
    server_id: int
    update_state: str
    version: str
    updated_at: dt.datetime | None
    last_error: str | None
    contexts: int
    contexts_enabled: int
    context_servers: tuple[int, ...]  # distinct server ids of its contexts
    update_runs: int = 0  # update runs started on it (runupdate / upgradeschemata)
    # When the tools last disabled it (enabled -> disabled) and enabled it again (disabled ->
    # enabled), and when its last update run started and ended (None: not yet / running).
    disabled_at: dt.datetime | None = None
    enabled_at: dt.datetime | None = None
    update_started_at: dt.datetime | None = None
    update_ended_at: dt.datetime | None = None

    @property
    def unavailable_s(self) -> float | None:
        """How long its contexts were refused as disabled (last disable -> enable), if both happened."""
        if self.disabled_at is None or self.enabled_at is None or self.enabled_at < self.disabled_at:
            return None
        return (self.enabled_at - self.disabled_at).total_seconds()

    @property
    def update_s(self) -> float | None:
        """How long its last update run took, if it ended."""
        if self.update_started_at is None or self.update_ended_at is None:
            return None
        return (self.update_ended_at - self.update_started_at).total_seconds()


# --------------------------------------------------------------------------- names and secrets


def schema_name(i: int) -> str:
    return f"{POOL_NAME}_{i}"


def natural_key(name: str) -> tuple[str, int, str]:
    """Sort key: oxdatabase_2 before oxdatabase_10 (OX sorts by the integer suffix)."""
    m = re.match(r"^(.*?)(\d+)$", name)
    return (m.group(1), int(m.group(2)), name) if m else (name, -1, name)


def ox_db_password_file(cfg: LabConfig) -> Path:
    return cfg.secrets_dir / "ox_db_password"


def master_password_file(cfg: LabConfig) -> Path:
    """The password of OX's master admin (`oxadminmaster`), which the tools check."""
    return cfg.secrets_dir / "ox_master_password"


def _ensure_secret(path: Path) -> str:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(new_secret(18) + "\n")
    os.chmod(path, 0o600)
    return path.read_text(encoding="utf-8").strip()


def tools_env(cfg: LabConfig, **overrides: str) -> dict[str, str]:
    """The environment the tools read (the env file install_tools writes): how to reach the
    config DB, the master admin's password file, runupdate's duration and target version.
    Secret values are never in it, only the paths of their files."""
    _ensure_secret(ox_db_password_file(cfg))
    _ensure_secret(master_password_file(cfg))
    env = {
        "OX_CONFIGDB_HOST": "127.0.0.1",
        "OX_CONFIGDB_PORT": str(cfg.primary_db_port),
        "OX_CONFIGDB_USER": OX_DB_USER,
        "OX_CONFIGDB_PASSWORD_FILE": str(ox_db_password_file(cfg)),
        "OX_MASTER_ADMIN": MASTER_ADMIN,
        "OX_MASTER_PASSWORD_FILE": str(master_password_file(cfg)),
        "OX_RUNUPDATE_SECONDS": "0.2",
        "OX_VERSION": DEFAULT_TARGET_VERSION,
    }
    env.update(overrides)
    return env


def connect(
    *,
    host: str = "127.0.0.1",
    port: int = 3306,
    user: str = OX_DB_USER,
    password: str = "",
    unix_socket: str | None = None,
) -> pymysql.connections.Connection[Any]:
    """A connection for the operations below (autocommit on, default database oxconfigdb).

    No TLS: the config DB is on the lab's own host, and pymysql otherwise builds a default
    SSL context (loading the system's CA certificates) per connection - ~20 ms of CPU, more
    than the tool's work; every tool call connects once."""
    if unix_socket:
        return pymysql.connect(
            unix_socket=unix_socket,
            user=user,
            password=password,
            database=CONFIGDB,
            autocommit=True,
            connect_timeout=5,
            ssl_disabled=True,
        )
    return pymysql.connect(
        host=host,
        port=port,
        user=user,
        password=password,
        database=CONFIGDB,
        autocommit=True,
        connect_timeout=5,
        ssl_disabled=True,
    )


def _root(cfg: LabConfig) -> pymysql.connections.Connection[Any]:
    return mariadb.connect(cfg, "primary")


# --------------------------------------------------------------------------- create / reset / drop


def _insert_many(cur: Any, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
    for i in range(0, len(rows), _BATCH):
        cur.executemany(sql, rows[i : i + _BATCH])


def create(
    cfg: LabConfig,
    schemata: int = 20,
    contexts_per_schema: int = 2,
    server_name: str = "oxserver",
    users_per_context: int = 3,
    version: str = DEFAULT_VERSION,
) -> OxSite:
    """(Re)create both databases from scratch: one pool, one server `server_name` that every
    context points to, `schemata` schemata with `contexts_per_schema` contexts of
    `users_per_context` users each, all enabled at `version`; and the `openexchange` user."""
    if schemata < 1 or contexts_per_schema < 0 or users_per_context < 0:
        raise ValueError("schemata >= 1, contexts_per_schema >= 0, users_per_context >= 0")
    password = _ensure_secret(ox_db_password_file(cfg))
    _ensure_secret(master_password_file(cfg))
    names = tuple(schema_name(i) for i in range(1, schemata + 1))
    with _root(cfg) as conn, conn.cursor() as cur:
        for db, tables in ((CONFIGDB, _CONFIGDB_TABLES), (SCHEMATA_DB, _SCHEMATA_TABLES)):
            cur.execute(f"DROP DATABASE IF EXISTS `{db}`")
            cur.execute(f"CREATE DATABASE `{db}` CHARACTER SET utf8mb4")
            cur.execute(f"USE `{db}`")
            for stmt in tables:
                cur.execute(stmt)
        for host in _HOSTS:
            cur.execute(f"CREATE USER IF NOT EXISTS '{OX_DB_USER}'@'{host}' IDENTIFIED BY %s", (password,))
            cur.execute(f"ALTER USER '{OX_DB_USER}'@'{host}' IDENTIFIED BY %s", (password,))
            for db in (CONFIGDB, SCHEMATA_DB):
                cur.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON `{db}`.* TO '{OX_DB_USER}'@'{host}'")
        cur.execute(f"USE `{CONFIGDB}`")
        pool_id, server_id = 1, 2  # from OX's shared id sequence, in creation order
        cur.execute("INSERT INTO configdb_sequence (id) VALUES (%s)", (server_id,))
        cur.execute(
            "INSERT INTO db_pool (db_pool_id, url, driver, login, password, hardlimit, max, initial, "
            "name) VALUES (%s, %s, 'com.mysql.jdbc.Driver', %s, '', 1, 100, 0, %s)",
            (pool_id, f"jdbc:mysql://127.0.0.1:{cfg.primary_db_port}", OX_DB_USER, POOL_NAME),
        )
        # One cluster for the pool (no read pool: read_db_pool_id 0, as registerdatabase leaves a
        # master without slave), open for new contexts (max_units > 0).
        cur.execute(_INSERT_CLUSTER, (1, pool_id, DEFAULT_MAX_UNITS))
        cur.execute(
            "INSERT INTO contexts_per_dbpool (db_pool_id, count) VALUES (%s, %s)",
            (pool_id, schemata * contexts_per_schema),
        )
        cur.execute("INSERT INTO server (server_id, name) VALUES (%s, %s)", (server_id, server_name))
        contexts: list[tuple[int, str, str]] = []
        for n, schema in enumerate(names):
            for j in range(1, contexts_per_schema + 1):
                cid = n * contexts_per_schema + j
                contexts.append((cid, schema, f"context{cid}"))
        # Every value a parameter: pymysql batches executemany into multi-row INSERTs only then.
        _insert_many(
            cur,
            "INSERT INTO context (cid, name, enabled, reason_id) VALUES (%s, %s, %s, %s)",
            [(cid, name, 1, None) for cid, _, name in contexts],
        )
        _insert_many(
            cur,
            "INSERT INTO context_server2db_pool (server_id, cid, read_db_pool_id, "
            "write_db_pool_id, db_schema) VALUES (%s, %s, %s, %s, %s)",
            [(server_id, cid, pool_id, pool_id, schema) for cid, schema, _ in contexts],
        )
        _insert_many(
            cur,
            "INSERT INTO contexts_per_dbschema (db_pool_id, schemaname, count) VALUES (%s, %s, %s)",
            [(pool_id, s, contexts_per_schema) for s in names],
        )
        _insert_many(
            cur,
            "INSERT INTO schema_state (schema_name, enabled, server_id, update_state, "
            "schema_version) VALUES (%s, %s, %s, %s, %s)",
            [(s, 1, server_id, "none", version) for s in names],
        )
        cur.executemany(
            "INSERT INTO lab_meta (k, v) VALUES (%s, %s)",
            [
                ("initial_server_id", str(server_id)),
                ("initial_version", version),
                ("pool_id", str(pool_id)),
                ("schemata", str(schemata)),
            ],
        )
        _insert_many(
            cur,
            f"INSERT INTO `{SCHEMATA_DB}`.contexts (cid, schema_name, name) VALUES (%s, %s, %s)",
            contexts,
        )
        _insert_many(
            cur,
            f"INSERT INTO `{SCHEMATA_DB}`.users (cid, id, schema_name, name, mail) "
            "VALUES (%s, %s, %s, %s, %s)",
            [
                (cid, u, schema, f"user{u}", f"user{u}@context{cid}.lab")
                for cid, schema, _ in contexts
                for u in range(1, users_per_context + 1)
            ],
        )
    return OxSite(
        server_id=server_id,
        server_name=server_name,
        pool_id=pool_id,
        schemata=names,
        contexts_per_schema=contexts_per_schema,
        users_per_context=users_per_context,
        version=version,
    )


def exists(cfg: LabConfig) -> bool:
    rows = mariadb.query(
        cfg,
        "primary",
        "SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME IN (%s, %s)",
        (CONFIGDB, SCHEMATA_DB),
    )
    return int(rows[0][0]) == 2


def reset(cfg: LabConfig) -> list[str]:
    """Back to the state just after create() (schemata and contexts as created): every
    context enabled and on the initial server, every schema enabled, not updated, at the
    initial version, servers registered since deleted, injected failures and tool faults
    cleared, what add_empty_schema / add_closed_pool added removed, the pool open again
    (max_units). Returns what was done ([] when nothing differed)."""
    done: list[str] = []
    with _root(cfg) as conn, conn.cursor() as cur:
        cur.execute(f"USE `{CONFIGDB}`")
        cur.execute("SELECT k, v FROM lab_meta")
        meta = {str(k): str(v) for k, v in cur.fetchall()}
        server_id, version = int(meta["initial_server_id"]), meta["initial_version"]
        pool_id = int(meta.get("pool_id", "1"))
        # A config DB created before db_cluster, contexts_per_dbpool and tool_faults (a lab kept
        # from earlier): add them, so the tools of this checkout work on it after a reset.
        cur.execute("SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s", (CONFIGDB,))
        tables = {str(r[0]) for r in cur.fetchall()}
        for stmt in (*_OX_COUNT_TABLES, _TOOL_FAULTS_TABLE):
            cur.execute(stmt)
        if "db_cluster" not in tables:
            cur.execute(_INSERT_CLUSTER, (1, pool_id, DEFAULT_MAX_UNITS))
            done.append("added db_cluster")
        if "schemata" not in meta:  # the initial schemata: every one there before the lab helpers
            cur.execute("SELECT COUNT(*) FROM schema_state")
            meta["schemata"] = str(int(cur.fetchone()[0]))
            cur.execute("INSERT INTO lab_meta (k, v) VALUES ('schemata', %s)", (meta["schemata"],))
        initial = int(meta["schemata"])
        # What add_empty_schema / add_closed_pool added: schemata other than oxdatabase_1..K
        # (with their contexts and users) and pools other than the initial one.
        lab_added = (
            "({col} NOT REGEXP '^"
            + POOL_NAME
            + "_[0-9]+$' OR CAST(SUBSTRING({col}, "
            + str(len(POOL_NAME) + 2)
            + ") AS UNSIGNED) NOT BETWEEN 1 AND %s)"
        )
        cur.execute(
            f"DELETE c FROM context c JOIN context_server2db_pool m ON m.cid = c.cid "
            f"WHERE {lab_added.format(col='m.db_schema')}",
            (initial,),
        )
        removed_contexts = int(cur.rowcount)
        for table in ("users", "contexts"):
            cur.execute(
                f"DELETE FROM `{SCHEMATA_DB}`.{table} WHERE {lab_added.format(col='schema_name')}", (initial,)
            )
        cur.execute(
            f"DELETE FROM contexts_per_dbschema WHERE db_pool_id <> %s OR "
            f"{lab_added.format(col='schemaname')}",
            (pool_id, initial),
        )
        cur.execute(f"DELETE FROM schema_state WHERE {lab_added.format(col='schema_name')}", (initial,))
        if cur.rowcount:
            done.append(f"removed {cur.rowcount} lab-added schema(s) ({removed_contexts} context(s))")
        cur.execute("DELETE FROM db_cluster WHERE write_db_pool_id <> %s", (pool_id,))
        cur.execute("DELETE FROM contexts_per_dbpool WHERE db_pool_id <> %s", (pool_id,))
        cur.execute("DELETE FROM db_pool WHERE db_pool_id <> %s", (pool_id,))
        if cur.rowcount:
            done.append(f"removed {cur.rowcount} lab-added database pool(s)")
        cur.execute(
            "UPDATE db_cluster SET max_units = %s WHERE write_db_pool_id = %s AND NOT max_units <=> %s",
            (DEFAULT_MAX_UNITS, pool_id, DEFAULT_MAX_UNITS),
        )
        # Quiet: the initial pool's context count, as create() set it.
        cur.execute(
            "INSERT INTO contexts_per_dbpool (db_pool_id, count) SELECT %s, COUNT(*) FROM "
            "context_server2db_pool WHERE write_db_pool_id = %s ON DUPLICATE KEY UPDATE "
            "count = VALUES(count)",
            (pool_id, pool_id),
        )
        # A config DB created before schema_state had its times (a lab kept from earlier):
        # add them, so the tools of this checkout work on it after a reset.
        cur.execute(
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s "
            "AND TABLE_NAME = 'schema_state'",
            (CONFIGDB,),
        )
        have = {str(r[0]) for r in cur.fetchall()}
        for column in _TIME_COLUMNS:
            if column not in have:
                cur.execute(f"ALTER TABLE schema_state ADD COLUMN {column} DATETIME(6) NULL")
                done.append(f"added schema_state.{column}")
        times_null = " AND ".join(f"{c} IS NULL" for c in _TIME_COLUMNS)
        times_cleared = ", ".join(f"{c} = NULL" for c in _TIME_COLUMNS)
        steps = [
            ("DELETE FROM server WHERE server_id <> %s", (server_id,), "deleted {} registered server(s)"),
            (
                "UPDATE context SET enabled = 1, reason_id = NULL "
                "WHERE NOT (enabled <=> 1 AND reason_id IS NULL)",
                (),
                "re-enabled {} context(s)",
            ),
            (
                "UPDATE context_server2db_pool SET server_id = %s WHERE server_id <> %s",
                (server_id, server_id),
                "pointed {} context(s) back to the initial server",
            ),
            (
                "UPDATE context_server2db_pool SET write_db_pool_id = read_db_pool_id "
                "WHERE write_db_pool_id <> read_db_pool_id",
                (),
                "joined {} split write pool(s) again",
            ),
            (
                "UPDATE schema_state SET enabled = 1, server_id = %s, update_state = 'none', "
                "schema_version = %s, updated_at = NULL, last_error = NULL, update_runs = 0, "
                f"{times_cleared} "
                "WHERE NOT (enabled = 1 AND server_id = %s AND update_state = 'none' AND schema_version = %s "
                f"AND updated_at IS NULL AND last_error IS NULL AND update_runs = 0 AND {times_null})",
                (server_id, version, server_id, version),
                "reset {} schema state(s)",
            ),
            ("DELETE FROM update_faults", (), "cleared {} injected update failure(s)"),
            ("DELETE FROM tool_faults", (), "cleared {} injected tool fault(s)"),
        ]
        for sql, args, what in steps:
            cur.execute(sql, args)
            if cur.rowcount:
                done.append(what.format(cur.rowcount))
        # New servers get the same ids again after a reset (quiet: not a state of the site).
        cur.execute("UPDATE configdb_sequence SET id = %s WHERE id <> %s", (server_id, server_id))
    return done


def drop(cfg: LabConfig) -> list[str]:
    """Remove both databases and the `openexchange` user; returns what was dropped."""
    done: list[str] = []
    with _root(cfg) as conn, conn.cursor() as cur:
        for db in (CONFIGDB, SCHEMATA_DB):
            cur.execute("SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s", (db,))
            if cur.fetchone()[0]:
                cur.execute(f"DROP DATABASE `{db}`")
                done.append(f"dropped database {db}")
        for host in _HOSTS:
            cur.execute("SELECT COUNT(*) FROM mysql.user WHERE User = %s AND Host = %s", (OX_DB_USER, host))
            if cur.fetchone()[0]:
                cur.execute(f"DROP USER '{OX_DB_USER}'@'{host}'")
                done.append(f"dropped user {OX_DB_USER}@{host}")
    return done


# --------------------------------------------------------------------------- readers (lab side)


def schema_states(cfg: LabConfig) -> dict[str, SchemaState]:
    """Every schema's state, in natural order."""
    rows = mariadb.query(
        cfg,
        "primary",
        "SELECT s.schema_name, s.enabled, s.server_id, s.update_state, s.schema_version, s.updated_at, "
        "s.last_error, COUNT(m.cid), COALESCE(SUM(c.enabled = 1), 0), "
        "COALESCE(GROUP_CONCAT(DISTINCT m.server_id ORDER BY m.server_id), ''), s.update_runs, "
        f"{', '.join('s.' + c for c in _TIME_COLUMNS)} "
        "FROM schema_state s LEFT JOIN context_server2db_pool m ON m.db_schema = s.schema_name "
        "LEFT JOIN context c ON c.cid = m.cid GROUP BY s.schema_name, s.update_runs",
        database=CONFIGDB,
    )
    states = [
        SchemaState(
            name=str(r[0]),
            enabled=bool(r[1]),
            server_id=int(r[2]),
            update_state=str(r[3]),
            version=str(r[4]),
            updated_at=r[5],
            last_error=r[6],
            contexts=int(r[7]),
            contexts_enabled=int(r[8]),
            context_servers=tuple(int(x) for x in str(r[9]).split(",") if x),
            update_runs=int(r[10]),
            disabled_at=r[11],
            enabled_at=r[12],
            update_started_at=r[13],
            update_ended_at=r[14],
        )
        for r in rows
    ]
    return {s.name: s for s in sorted(states, key=lambda s: natural_key(s.name))}


def servers(cfg: LabConfig) -> list[tuple[int, str]]:
    rows = mariadb.query(
        cfg, "primary", "SELECT server_id, name FROM server ORDER BY server_id", database=CONFIGDB
    )
    return [(int(i), str(n)) for i, n in rows]


def contexts(cfg: LabConfig, schema: str) -> list[tuple[int, bool, int | None, int]]:
    """(cid, enabled, reason_id, server_id) of every context in `schema`."""
    rows = mariadb.query(
        cfg,
        "primary",
        "SELECT c.cid, c.enabled, c.reason_id, m.server_id FROM context c "
        "JOIN context_server2db_pool m ON m.cid = c.cid WHERE m.db_schema = %s "
        "ORDER BY c.cid",
        (schema,),
        database=CONFIGDB,
    )
    return [(int(c), bool(e), None if r is None else int(r), int(s)) for c, e, r, s in rows]


def inject_update_failure(
    cfg: LabConfig, schema: str, on: bool = True, times: int | None = None, task: str = FAILING_TASK
) -> bool:
    """Make runupdate fail on `schema` (always, or the next `times` runs), or stop that.
    Returns True when something changed."""
    with _root(cfg) as conn, conn.cursor() as cur:
        if on:
            cur.execute(
                f"INSERT INTO `{CONFIGDB}`.update_faults (schema_name, task_name, remaining) "
                "VALUES (%s, %s, %s) ON DUPLICATE KEY UPDATE task_name = VALUES(task_name), "
                "remaining = VALUES(remaining)",
                (schema, task, times),
            )
        else:
            cur.execute(f"DELETE FROM `{CONFIGDB}`.update_faults WHERE schema_name = %s", (schema,))
        return bool(cur.rowcount)


def split_write_pools(cfg: LabConfig, schema: str) -> None:
    """Lab only: one context of `schema` written through another pool (id 999, read pool as
    before), the state OX's disableschema refuses with "Multiple write pool IDs are in use"
    (a permanent failure, exit 1). reset() joins them again."""
    with _root(cfg) as conn, conn.cursor() as cur:
        cur.execute(
            f"UPDATE `{CONFIGDB}`.context_server2db_pool SET write_db_pool_id = 999 "
            "WHERE db_schema = %s ORDER BY cid LIMIT 1",
            (schema,),
        )
        if cur.rowcount != 1:
            raise ValueError(f"schema {schema} has no context")


def add_empty_schema(cfg: LabConfig, name: str) -> None:
    """Lab only: a schema without contexts in the initial pool (as `createschema` leaves one, or
    one whose contexts were all deleted): listed by listdatabaseschema with currentunits 0.
    reset() removes it (unless `name` is one of create()'s oxdatabase_1..K, which is refused)."""
    with _root(cfg) as conn, conn.cursor() as cur:
        cur.execute(f"USE `{CONFIGDB}`")
        cur.execute("SELECT k, v FROM lab_meta")
        meta = {str(k): str(v) for k, v in cur.fetchall()}
        cur.execute("SELECT COUNT(*) FROM contexts_per_dbschema WHERE schemaname = %s", (name,))
        if cur.fetchone()[0]:
            raise ValueError(f"schema {name} exists")
        cur.execute(
            "INSERT INTO contexts_per_dbschema (db_pool_id, schemaname, count) VALUES (%s, %s, 0)",
            (int(meta.get("pool_id", "1")), name),
        )
        cur.execute(_INSERT_STATE, (name, int(meta["initial_server_id"]), meta["initial_version"]))


def add_closed_pool(
    cfg: LabConfig, schemata: int = 1, contexts_per_schema: int = 2, users_per_context: int = 1
) -> tuple[str, ...]:
    """Lab only: a second database pool (`oxclosed`, id 1000+) whose db_cluster max_units is 0 -
    OX's way of closing a pool for new contexts - holding `schemata` schemata
    (oxclosed_1..N) of `contexts_per_schema` enabled contexts each on the initial server.
    listdatabaseschema (and so upgradeschemata) leaves them out, listdatabase lists the pool.
    Returns the schema names; reset() removes all of it."""
    if schemata < 1 or contexts_per_schema < 1:
        raise ValueError("schemata >= 1, contexts_per_schema >= 1")
    with _root(cfg) as conn, conn.cursor() as cur:
        cur.execute(f"USE `{CONFIGDB}`")
        cur.execute("SELECT k, v FROM lab_meta")
        meta = {str(k): str(v) for k, v in cur.fetchall()}
        server_id, version = int(meta["initial_server_id"]), meta["initial_version"]
        cur.execute(
            "SELECT COALESCE(MAX(db_pool_id), 0) FROM db_pool WHERE db_pool_id >= %s", (_LAB_POOL_ID_BASE,)
        )
        pool_id = max(_LAB_POOL_ID_BASE, int(cur.fetchone()[0]) + 1)
        cur.execute(
            "SELECT url, driver, login, password FROM db_pool WHERE db_pool_id = %s",
            (int(meta.get("pool_id", "1")),),
        )
        url, driver, login, password = cur.fetchone()
        pool_name = f"{CLOSED_POOL_NAME}{pool_id - _LAB_POOL_ID_BASE or ''}"
        cur.execute(
            "INSERT INTO db_pool (db_pool_id, url, driver, login, password, hardlimit, max, initial, "
            "name) VALUES (%s, %s, %s, %s, %s, 1, 100, 0, %s)",
            (pool_id, url, driver, login, password, pool_name),
        )
        cur.execute(_INSERT_CLUSTER, (pool_id, pool_id, 0))
        cur.execute("SELECT COALESCE(MAX(cid), 0) FROM context")
        cid = int(cur.fetchone()[0])
        cur.execute(
            "SELECT COUNT(*) FROM contexts_per_dbschema WHERE schemaname LIKE %s",
            (CLOSED_POOL_NAME + "\\_%",),
        )
        first = int(cur.fetchone()[0]) + 1
        names = tuple(f"{CLOSED_POOL_NAME}_{n}" for n in range(first, first + schemata))
        for schema in names:
            for _ in range(contexts_per_schema):
                cid += 1
                cur.execute(
                    "INSERT INTO context (cid, name, enabled, reason_id) VALUES (%s, %s, 1, NULL)",
                    (cid, f"context{cid}"),
                )
                cur.execute(
                    "INSERT INTO context_server2db_pool (server_id, cid, read_db_pool_id, "
                    "write_db_pool_id, db_schema) VALUES (%s, %s, %s, %s, %s)",
                    (server_id, cid, pool_id, pool_id, schema),
                )
                cur.execute(
                    f"INSERT INTO `{SCHEMATA_DB}`.contexts (cid, schema_name, name) VALUES (%s, %s, %s)",
                    (cid, schema, f"context{cid}"),
                )
                for u in range(1, users_per_context + 1):
                    cur.execute(
                        f"INSERT INTO `{SCHEMATA_DB}`.users (cid, id, schema_name, name, mail) "
                        "VALUES (%s, %s, %s, %s, %s)",
                        (cid, u, schema, f"user{u}", f"user{u}@context{cid}.lab"),
                    )
            cur.execute(
                "INSERT INTO contexts_per_dbschema (db_pool_id, schemaname, count) VALUES (%s, %s, %s)",
                (pool_id, schema, contexts_per_schema),
            )
            cur.execute(_INSERT_STATE, (schema, server_id, version))
        cur.execute(
            "INSERT INTO contexts_per_dbpool (db_pool_id, count) VALUES (%s, %s)",
            (pool_id, schemata * contexts_per_schema),
        )
    return names


def inject_tool_fault(cfg: LabConfig, tool: str, kind: str, times: int = 1) -> None:
    """Lab only: the next `times` calls of `tool` fail transiently, as OX's tools do when the
    middleware's RMI registry does not answer (kind "connect": java.rmi.ConnectException ->
    exit 105) or a remote call breaks (kind "remote": java.rmi.RemoteException -> exit 107;
    runupdate, a commons-cli tool, exits 1 for both). times 0 clears it; reset() clears all."""
    if kind not in TOOL_FAULT_KINDS:
        raise ValueError(f"kind must be one of {TOOL_FAULT_KINDS}")
    with _root(cfg) as conn, conn.cursor() as cur:
        if times <= 0:
            cur.execute(f"DELETE FROM `{CONFIGDB}`.tool_faults WHERE tool = %s", (tool,))
        else:
            cur.execute(
                f"INSERT INTO `{CONFIGDB}`.tool_faults (tool, kind, remaining) VALUES (%s, %s, %s) "
                "ON DUPLICATE KEY UPDATE kind = VALUES(kind), remaining = VALUES(remaining)",
                (tool, kind, times),
            )


def take_tool_fault(conn: Any, tool: str) -> str | None:
    """The tools' side of inject_tool_fault: the kind of fault this call of `tool` suffers (one
    of the remaining calls used up), or None."""

    def body(cur: Any) -> str | None:
        cur.execute(
            f"SELECT kind, remaining FROM `{CONFIGDB}`.tool_faults WHERE tool = %s FOR UPDATE", (tool,)
        )
        row = cur.fetchone()
        if row is None:
            return None
        if int(row[1]) <= 1:
            cur.execute(f"DELETE FROM `{CONFIGDB}`.tool_faults WHERE tool = %s", (tool,))
        else:
            cur.execute(
                f"UPDATE `{CONFIGDB}`.tool_faults SET remaining = remaining - 1 WHERE tool = %s", (tool,)
            )
        return str(row[0])

    try:
        result: str | None = _in_transaction(conn, body)
    except pymysql.err.ProgrammingError:  # no tool_faults table (a config DB older than it)
        return None
    return result


# --------------------------------------------------------------------------- operations (the tools)


def _like(pattern: str) -> str:
    """OX's search pattern as SQL LIKE pattern: `*` -> `%` (OXUtilMySQLStorage.searchForServer /
    searchForDatabaseSchema: searchPattern.replace('*', '%')); `_` and `%` keep LIKE's meaning."""
    return pattern.replace("*", "%")


def list_servers(conn: Any, pattern: str = "*") -> list[tuple[int, str]]:
    """(id, name) of the servers OX's listServer finds: "SELECT name,server_id FROM server WHERE
    name LIKE ? OR server_id = ?" with the pattern in both (OXUtilMySQLStorage.searchForServer;
    MariaDB compares the id with the pattern cast to a number, as MySQL does for OX). OX's SQL
    has no ORDER BY; the lab orders by id."""
    with conn.cursor() as cur:
        cur.execute(
            f"SELECT server_id, name FROM `{CONFIGDB}`.server WHERE name LIKE %s OR server_id = %s "
            "ORDER BY server_id",
            (_like(pattern), pattern),
        )
        return [(int(i), str(n)) for i, n in cur.fetchall()]


def register_server(conn: Any, name: str) -> int:
    """Register a server; its id comes from OX's shared id sequence. An existing name is
    refused with OX's message."""
    if not name.strip():
        raise OxError("invalid_data", "Invalid server name")
    conn.begin()
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT id FROM `{CONFIGDB}`.configdb_sequence FOR UPDATE")
            current = int(cur.fetchone()[0])
            cur.execute(f"SELECT COUNT(*) FROM `{CONFIGDB}`.server WHERE name = %s", (name,))
            if cur.fetchone()[0]:
                raise OxError("invalid_data", f"Server {name} already exists!")
            cur.execute(f"UPDATE `{CONFIGDB}`.configdb_sequence SET id = %s", (current + 1,))
            cur.execute(
                f"INSERT INTO `{CONFIGDB}`.server (server_id, name) VALUES (%s, %s)", (current + 1, name)
            )
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    return current + 1


def list_schemata(conn: Any, pattern: str = "*", only_empty: bool = False) -> list[SchemaRow]:
    """listdatabaseschema's rows, with OX's query (OXUtilMySQLStorage.searchForDatabaseSchema):
    the schemata of pools whose db_cluster.max_units is not 0 ("WHERE (c.max_units <> 0)"),
    matched by pool name, schema name, pool id or URL ("d.name LIKE ? OR s.schemaname LIKE ? OR
    d.db_pool_id LIKE ? OR d.url LIKE ?"; not for "*"), with --only-empty-schemas
    "AND s.count=0"; a pool without schema rows gives none (rs.wasNull()).

    Order: OX's SQL has no ORDER BY, so OX promises none (what MySQL returns follows its plan).
    The lab lists in the database's string order of the schema name (oxdatabase_10 before
    oxdatabase_2), deliberately not numerically, so that nothing downstream can come to rely on
    an order OX does not give (upgradeschemata without -m processes them in this order)."""
    like = _like(pattern)
    where = (
        ""
        if like == "%"
        else (" AND (p.name LIKE %s OR d.schemaname LIKE %s OR p.db_pool_id LIKE %s OR p.url LIKE %s)")
    )
    with conn.cursor() as cur:
        cur.execute(
            f"SELECT p.db_pool_id, p.name, d.schemaname, p.url, d.count, s.enabled, s.server_id, "
            f"s.update_state, s.schema_version FROM `{CONFIGDB}`.db_pool p "
            f"JOIN `{CONFIGDB}`.db_cluster c ON c.write_db_pool_id = p.db_pool_id "
            f"JOIN `{CONFIGDB}`.contexts_per_dbschema d ON d.db_pool_id = p.db_pool_id "
            f"LEFT JOIN `{CONFIGDB}`.schema_state s ON s.schema_name = d.schemaname "
            f"WHERE (c.max_units <> 0){where}{' AND d.count = 0' if only_empty else ''} "
            "ORDER BY d.schemaname",
            () if like == "%" else (like,) * 4,
        )
        return [
            SchemaRow(
                pool_id=int(r[0]),
                pool_name=str(r[1]),
                schema=str(r[2]),
                url=str(r[3]),
                contexts=int(r[4]),
                enabled=bool(r[5]) if r[5] is not None else True,
                server_id=int(r[6] or 0),
                update_state=str(r[7] or "none"),
                version=str(r[8] or ""),
            )
            for r in cur.fetchall()
        ]


@dataclass(frozen=True)
class DatabaseRow:
    """One line of listdatabase (OXUtilMySQLStorage.searchForDatabase: a write pool is a master
    with masterid 0 and its context count; a read pool is a slave of its write pool)."""

    pool_id: int
    name: str
    url: str
    master: bool
    master_id: int
    max_units: int
    current_units: int
    hardlimit: int
    pool_max: int
    pool_initial: int
    login: str
    password: str
    driver: str


def list_databases(conn: Any, pattern: str = "*") -> list[DatabaseRow]:
    """listdatabase's rows: OX's query (searchForDatabase) - every pool of a cluster, whatever
    its max_units, matched by name, id or URL ("d.name LIKE ? OR d.db_pool_id LIKE ? OR d.url
    LIKE ?"; not for "*"). No ORDER BY in OX; the lab orders by pool id."""
    like = _like(pattern)
    where = "" if like == "%" else " WHERE (p.name LIKE %s OR p.db_pool_id LIKE %s OR p.url LIKE %s)"
    with conn.cursor() as cur:
        cur.execute(
            f"SELECT p.db_pool_id, p.url, p.driver, p.login, p.password, p.hardlimit, p.max, "
            f"p.initial, p.name, c.max_units, c.read_db_pool_id, c.write_db_pool_id, n.count "
            f"FROM `{CONFIGDB}`.db_pool p JOIN `{CONFIGDB}`.db_cluster c "
            f"ON (c.write_db_pool_id = p.db_pool_id OR c.read_db_pool_id = p.db_pool_id) "
            f"LEFT JOIN `{CONFIGDB}`.contexts_per_dbpool n ON n.db_pool_id = p.db_pool_id{where} "
            "ORDER BY p.db_pool_id",
            () if like == "%" else (like,) * 3,
        )
        rows = cur.fetchall()
    out = []
    for r in rows:
        pool_id, read_id, write_id, max_units = int(r[0]), int(r[10]), int(r[11]), int(r[9] or 0)
        master = read_id != pool_id
        if master and max_units != 0 and r[12] is None:
            raise OxError(
                "storage",
                "Unable to count contexts. Consider running 'checkcountsconsistency' "
                "command-line tool to correct it.",
            )
        out.append(
            DatabaseRow(
                pool_id=pool_id,
                name=str(r[8]),
                url=str(r[1]),
                master=master,
                master_id=0 if master else write_id,
                max_units=max_units,
                current_units=int(r[12] or 0) if master else 0,
                hardlimit=int(r[5] or 0),
                pool_max=int(r[6] or 0),
                pool_initial=int(r[7] or 0),
                login=str(r[3]),
                password=str(r[4]),
                driver=str(r[2]),
            )
        )
    return out


def _in_transaction(conn: Any, fn: Any) -> Any:
    conn.begin()
    try:
        with conn.cursor() as cur:
            result = fn(cur)
        conn.commit()
        return result
    except BaseException:
        conn.rollback()
        raise


def disable_schema(conn: Any, schema: str) -> int:
    """disableschema: every enabled context of the schema disabled with the schema-move reason
    (idempotent); returns how many contexts it disabled. As OX (SchemaMoveImpl.disableSchema ->
    OXToolMySQLStorage.isDistinctWritePoolIDForSchema: "SELECT DISTINCT write_db_pool_id FROM
    context_server2db_pool WHERE db_schema = ?"): no row (an empty or unknown schema) ->
    NoSuchObjectException "No such schema <s>"; more than one write pool ->
    TargetDatabaseException."""

    def body(cur: Any) -> int:
        cur.execute(
            f"SELECT DISTINCT write_db_pool_id FROM `{CONFIGDB}`.context_server2db_pool WHERE db_schema = %s",
            (schema,),
        )
        pools = cur.fetchall()
        if not pools:
            raise OxError("no_such_object", f"No such schema {schema}")
        if len(pools) > 1:
            raise OxError(
                "target_database",
                f"Cannot proceed with schema move: Multiple write pool IDs are in use for schema {schema}",
            )
        cur.execute(
            f"UPDATE `{CONFIGDB}`.context c JOIN `{CONFIGDB}`.context_server2db_pool m "
            "ON m.cid = c.cid SET c.enabled = 0, c.reason_id = %s "
            "WHERE m.db_schema = %s AND c.enabled = 1",
            (SCHEMA_MOVE_REASON_ID, schema),
        )
        n = int(cur.rowcount)
        # disabled_at first: MariaDB assigns left to right, so it still sees the old `enabled`
        # (a repeated disable keeps the time the schema became unavailable).
        cur.execute(
            f"UPDATE `{CONFIGDB}`.schema_state SET "
            "disabled_at = IF(enabled = 1, NOW(6), disabled_at), enabled = 0 WHERE schema_name = %s",
            (schema,),
        )
        return n

    return int(_in_transaction(conn, body))


def enable_schema(conn: Any, schema: str) -> int:
    """enableschema: the contexts disableschema disabled enabled again (others stay as they
    are; idempotent); returns how many contexts it enabled. OX checks nothing here
    (SchemaMoveImpl.enableSchema: contextStorage.enable(schema, reason)), so an empty or unknown
    schema is no error: nothing changes."""

    def body(cur: Any) -> int:
        cur.execute(
            f"UPDATE `{CONFIGDB}`.context c JOIN `{CONFIGDB}`.context_server2db_pool m "
            "ON m.cid = c.cid SET c.enabled = 1, c.reason_id = NULL WHERE m.db_schema = %s "
            "AND c.enabled = 0 AND c.reason_id = %s",
            (schema, SCHEMA_MOVE_REASON_ID),
        )
        n = int(cur.rowcount)
        cur.execute(
            f"UPDATE `{CONFIGDB}`.schema_state SET "
            "enabled_at = IF(enabled = 0, NOW(6), enabled_at), enabled = 1 WHERE schema_name = %s",
            (schema,),
        )
        return n

    return int(_in_transaction(conn, body))


def server_object_text(server_id: int) -> str:
    """How OX prints the Server object changeserver sends (only its id set): Server.toString()
    lists the non-null fields in declaration order (id, idset, name, nameset; name is null)
    (com.openexchange.admin.rmi/.../dataobjects/Server.java, toString)."""
    return f"[ \n  id: {server_id}\n  idset: true\n  nameset: false\n]"


def change_server(conn: Any, server_id: int, schema: str, *, refuse_enabled: bool = False) -> int:
    """changeserver: every context of the schema points to `server_id`; returns how many
    contexts it found. As OX (OXUtil.changeServer, OXUtilMySQLStorage.changeServer):
      * an unknown server id: InvalidDataException "No such server <Server.toString()>";
      * `refuse_enabled` (the tools; isSchemaDisabled): any enabled context -> StorageException
        "The schema '<s>' is not disabled. The following contexts are still enabled: [<cids>]";
        lab-side callers (tests, shortcuts) may leave it off to re-point a live schema;
      * "UPDATE context_server2db_pool SET server_id=? WHERE db_schema=?" touching no row (an
        empty or unknown schema): StorageException "Unable to change to server '<id>' for the
        specified schema '<s>'. The schema is empty.". OX reads the row count from MySQL
        Connector/J, which reports found (matched) rows, not changed ones (useAffectedRows is
        off by default), so re-pointing a schema already on that server succeeds; the lab counts
        the matched rows to the same effect."""

    def body(cur: Any) -> int:
        cur.execute(f"SELECT COUNT(*) FROM `{CONFIGDB}`.server WHERE server_id = %s", (server_id,))
        if not cur.fetchone()[0]:
            raise OxError("invalid_data", f"No such server {server_object_text(server_id)}")
        cur.execute(
            f"SELECT m.cid, c.enabled FROM `{CONFIGDB}`.context_server2db_pool m "
            f"JOIN `{CONFIGDB}`.context c ON c.cid = m.cid WHERE m.db_schema = %s ORDER BY m.cid "
            "FOR UPDATE",
            (schema,),
        )
        rows = cur.fetchall()
        enabled = [int(cid) for cid, on in rows if on]
        if refuse_enabled and enabled:
            raise OxError(
                "storage",
                f"The schema '{schema}' is not disabled. The following contexts are "
                f"still enabled: [{', '.join(str(c) for c in enabled)}]",
            )
        if not rows:
            raise OxError(
                "storage",
                f"Unable to change to server '{server_id}' for the specified schema "
                f"'{schema}'. The schema is empty.",
            )
        cur.execute(
            f"UPDATE `{CONFIGDB}`.context_server2db_pool SET server_id = %s WHERE db_schema = %s",
            (server_id, schema),
        )
        cur.execute(
            f"UPDATE `{CONFIGDB}`.schema_state SET server_id = %s WHERE schema_name = %s", (server_id, schema)
        )
        return len(rows)

    return int(_in_transaction(conn, body))


def schema_of_context(conn: Any, cid: int) -> str:
    with conn.cursor() as cur:
        cur.execute(f"SELECT db_schema FROM `{CONFIGDB}`.context_server2db_pool WHERE cid = %s", (cid,))
        row = cur.fetchone()
    if row is None:
        raise OxError("no_such_object", f"Cannot find context {cid}")
    return str(row[0])


# OX refuses a second update of a schema while one runs: its schema lock (SchemaStoreImpl
# insertLock) throws SchemaExceptionCodes.ALREADY_LOCKED (UPD-0003) with this text
# (com.openexchange.server/src/com/openexchange/groupware/update/internal/SchemaExceptionCodes.java).
# A lock older than this is taken as left behind by a killed runupdate and taken over (OX:
# isNotTimedOut(task, idiom); the threshold here is a lab choice).
STALE_UPDATE_S = 120.0
UPDATE_CONFLICT = "Update conflict detected. Another process is currently updating schema {}."
# UpdateExceptionCodes.UNKNOWN_SCHEMA (UPD-0016), thrown by UpdateTaskToolkit.getInfoBySchemaName.
UNKNOWN_SCHEMA = "Unknown schema name: {}."


def run_update(
    conn: Any, schema: str, *, seconds: float, target_version: str, fail_schemata: Collection[str] = ()
) -> list[str]:
    """runupdate: the schema's update tasks. A schema already updated to `target_version`
    has none pending (returns at once). One update at a time per schema: while another runs,
    OxError("update_running"). Otherwise: update_state `running` (update_runs + 1), `seconds`
    of work, then `done` at target_version - or `failed` when a failure is injected for it
    (update_faults, or `fail_schemata`). Returns the names of the failed tasks."""

    def claim(cur: Any) -> bool:
        cur.execute(
            f"SELECT update_state, schema_version, "
            f"TIMESTAMPDIFF(MICROSECOND, updated_at, NOW(3)) / 1e6 FROM `{CONFIGDB}`.schema_state "
            "WHERE schema_name = %s FOR UPDATE",
            (schema,),
        )
        row = cur.fetchone()
        if row is None:
            raise OxError("no_such_object", UNKNOWN_SCHEMA.format(schema))
        if (str(row[0]), str(row[1])) == ("done", target_version):
            return False
        if str(row[0]) == "running" and row[2] is not None and float(row[2]) < STALE_UPDATE_S + seconds:
            raise OxError("update_running", UPDATE_CONFLICT.format(schema))
        cur.execute(
            f"UPDATE `{CONFIGDB}`.schema_state SET update_state = 'running', updated_at = NOW(3), "
            "last_error = NULL, update_runs = update_runs + 1, update_started_at = NOW(6), "
            "update_ended_at = NULL WHERE schema_name = %s",
            (schema,),
        )
        return True

    if not _in_transaction(conn, claim):
        return []
    if seconds > 0:
        time.sleep(seconds)

    def finish(cur: Any) -> list[str]:
        cur.execute(
            f"SELECT task_name, remaining FROM `{CONFIGDB}`.update_faults WHERE schema_name = %s FOR UPDATE",
            (schema,),
        )
        fault = cur.fetchone()
        failed: list[str] = []
        if fault is not None:
            failed = [str(fault[0])]
            if fault[1] is not None:
                if int(fault[1]) <= 1:
                    cur.execute(f"DELETE FROM `{CONFIGDB}`.update_faults WHERE schema_name = %s", (schema,))
                else:
                    cur.execute(
                        f"UPDATE `{CONFIGDB}`.update_faults SET remaining = remaining - 1 "
                        "WHERE schema_name = %s",
                        (schema,),
                    )
        elif schema in fail_schemata:
            failed = [FAILING_TASK]
        if failed:
            error = f"update task(s) failed: {', '.join(failed)}"
            cur.execute(
                f"UPDATE `{CONFIGDB}`.schema_state SET update_state = 'failed', updated_at = NOW(3), "
                "update_ended_at = NOW(6), last_error = %s WHERE schema_name = %s",
                (error[:255], schema),
            )
        else:
            cur.execute(
                f"UPDATE `{CONFIGDB}`.schema_state SET update_state = 'done', schema_version = %s, "
                "updated_at = NOW(3), update_ended_at = NOW(6) WHERE schema_name = %s",
                (target_version, schema),
            )
        return failed

    return list(_in_transaction(conn, finish))
