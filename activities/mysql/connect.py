"""MariaDB / MySQL: connecting, queries, the error policy, and what a query reads.

Queries go through aiomysql. Besides the connection and the query helpers this holds the
reads the other modules and the workflows build on: schema_version, base tables and their
CHECKSUM TABLE, and a replica's SHOW SLAVE STATUS (admin_at, replica_status).

Error policy: connection-level failures (server down, connection lost, too many
connections, deadlocks) are retryable DatabaseErrors; access denied, SQL errors and
anything else a retry cannot fix are non-retryable.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiomysql
import pymysql
from temporalio import activity

from activities.common import fail
from activities.secrets import resolve_secret
from errors import DATABASE_ERROR, DB_UNSUPPORTED, INVALID_REQUEST
from inventory.model import Database, DatabaseEndpoint

# MySQL error codes after which a retry can succeed (server restarting, network, load).
_RETRYABLE_CODES = {1040, 1053, 1205, 1213, 1927, 2002, 2003, 2006, 2013, 2014, 2055}
# ER_LOCK_WAIT_TIMEOUT: lock_wait_timeout (metadata locks) or innodb_lock_wait_timeout (rows).
LOCK_WAIT_TIMEOUT = 1205
POLL_S = 0.5
_SCHEMA_TABLE_EXISTS = (
    "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = "
    "DATABASE() AND TABLE_NAME = 'schema_version'"
)


def _endpoint(db: Database, replica: bool) -> tuple[str, int]:
    if not replica:
        return db.host, db.port
    if db.replica is None:
        fail(INVALID_REQUEST, f"database {db.name}: no replica in the inventory")
    return db.replica.host, db.replica.port


def _raise_db(db: Database, host: str, port: int, what: str, e: BaseException) -> None:
    code = e.args[0] if isinstance(e, pymysql.MySQLError) and e.args and isinstance(e.args[0], int) else None
    msg = e.args[1] if isinstance(e, pymysql.MySQLError) and len(e.args) > 1 else str(e) or type(e).__name__
    retryable = code in _RETRYABLE_CODES or isinstance(e, (OSError, asyncio.TimeoutError))
    fail(
        DATABASE_ERROR,
        f"database {db.name} ({db.user}@{host}:{port}/{db.database}): {what}: "
        f"{f'error {code}: ' if code else ''}{msg}",
        retryable=retryable,
        cause=e,
    )


@contextlib.asynccontextmanager
async def connection(
    db: Database, replica: bool = False, use_database: bool = True
) -> AsyncIterator[aiomysql.Connection]:
    if db.kind != "mysql":
        # SQL Server's verbs dispatch to activities/mssql before they connect; what reaches
        # here is MariaDB-only (the warm replica, CHECKSUM TABLE, the process list).
        fail(DB_UNSUPPORTED, f"database {db.name}: kind {db.kind}: this step needs MariaDB / MySQL")
    host, port = _endpoint(db, replica)
    password = resolve_secret(db.password, needed_by=f"database {db.name}")
    try:
        conn = await aiomysql.connect(
            host=host,
            port=port,
            user=db.user,
            password=password,
            db=db.database if use_database else None,
            autocommit=True,
            connect_timeout=10,
        )
    except (TimeoutError, pymysql.MySQLError, OSError) as e:
        _raise_db(db, host, port, "connect", e)
    try:
        yield conn
    finally:
        conn.close()


async def query(
    db: Database, sql: str, args: Any = None, replica: bool = False, use_database: bool = True
) -> list[tuple[Any, ...]]:
    host, port = _endpoint(db, replica)
    async with connection(db, replica, use_database) as conn:
        try:
            async with conn.cursor() as cur:
                await cur.execute(sql, args)
                return list(await cur.fetchall())
        except (pymysql.MySQLError, OSError) as e:
            _raise_db(db, host, port, f"query {sql[:120]!r}", e)
    raise AssertionError("unreachable")


async def query_dicts(db: Database, sql: str, replica: bool = False) -> list[dict[str, Any]]:
    host, port = _endpoint(db, replica)
    async with connection(db, replica, use_database=False) as conn:
        try:
            async with conn.cursor(aiomysql.DictCursor) as cur:
                await cur.execute(sql)
                return list(await cur.fetchall())
        except (pymysql.MySQLError, OSError) as e:
            _raise_db(db, host, port, f"query {sql[:120]!r}", e)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- versions


async def schema_version(db: Database) -> int:
    """MAX(version) of table schema_version; 0 when the table does not exist yet."""
    if db.kind == "mssql":  # SQL Server: activities/mssql (imported here: it builds on this module)
        from activities.mssql import backup as _mssql

        return await _mssql.schema_version(db)
    rows = await query(db, _SCHEMA_TABLE_EXISTS)
    if not rows[0][0]:
        return 0
    return int((await query(db, "SELECT COALESCE(MAX(version), 0) FROM schema_version"))[0][0])


# --------------------------------------------------------------------------- checksums


# zerodown's own bookkeeping in a migrated database (statements.py): not the application's
# data, so never part of a backup's checksums or a comparison.
MIGRATION_LOG_TABLE = "zerodown_migration_log"


async def base_tables(db: Database) -> list[str]:
    """The application's base tables (zerodown's migration log left out)."""
    rows = await query(
        db,
        "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = "
        "DATABASE() AND TABLE_TYPE = 'BASE TABLE' ORDER BY TABLE_NAME",
    )
    return [str(r[0]) for r in rows if str(r[0]) != MIGRATION_LOG_TABLE]


def _qi(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


async def _checksums_on(cur: aiomysql.Cursor, tables: list[str]) -> dict[str, str]:
    if not tables:
        return {}
    await cur.execute("CHECKSUM TABLE " + ", ".join(_qi(t) for t in tables))
    out: dict[str, str] = {}
    for name, checksum in await cur.fetchall():
        out[str(name).split(".", 1)[-1]] = "" if checksum is None else str(checksum)
    return out


async def table_checksums(db: Database) -> dict[str, str]:
    """CHECKSUM TABLE of every base table: table name -> checksum (as text)."""
    if db.kind == "mssql":  # SQL Server: activities/mssql (imported here: it builds on this module)
        from activities.mssql import backup as _mssql

        return await _mssql.table_checksums(db)
    tables = await base_tables(db)
    host, port = _endpoint(db, False)
    async with connection(db) as conn, conn.cursor() as cur:
        try:
            return await _checksums_on(cur, tables)
        except (pymysql.MySQLError, OSError) as e:
            _raise_db(db, host, port, "CHECKSUM TABLE", e)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- replication


@dataclass(frozen=True)
class ReplicaStatus:
    host: str
    port: int
    configured: bool  # False: SHOW SLAVE STATUS is empty (not a replica / promoted)
    io_running: str = ""  # Yes | No | Connecting
    sql_running: str = ""
    seconds_behind: int | None = None
    gtid_io_pos: str = ""
    gtid_slave_pos: str = ""
    last_io_error: str = ""
    last_sql_error: str = ""
    read_only: bool = False
    # The server it replicates from (SHOW SLAVE STATUS Master_Host / Master_Port).
    master_host: str = ""
    master_port: int = 0

    @property
    def running(self) -> bool:
        return self.io_running == "Yes" and self.sql_running == "Yes"

    @property
    def last_error(self) -> str:
        return self.last_io_error or self.last_sql_error


def admin_at(db: Database, endpoint: DatabaseEndpoint | None = None) -> Database:
    """`db` as its admin account sees it on `endpoint` (default: the primary): a copy whose
    host, port, user and password are those, no replica, and the same `database`. Without
    an admin account in the inventory, the application's account."""
    host, port = (endpoint.host, endpoint.port) if endpoint is not None else (db.host, db.port)
    user, password = (
        (db.admin_user, db.admin_password) if db.admin_user and db.admin_password else (db.user, db.password)
    )
    return dataclasses.replace(db, host=host, port=port, user=user, password=password, replica=None)


async def replica_status(db: Database, endpoint: DatabaseEndpoint | None = None) -> ReplicaStatus:
    """SHOW SLAVE STATUS of db.replica (as the application's account), or of `endpoint` (as
    the admin account: a warm server has no application account before it is initialised)."""
    if endpoint is None:
        return await _replica_status_on(db, replica=True)
    return await _replica_status_on(admin_at(db, endpoint), replica=False)


async def _replica_status_on(db: Database, replica: bool) -> ReplicaStatus:
    host, port = _endpoint(db, replica)
    rows = await query_dicts(db, "SHOW SLAVE STATUS", replica=replica)
    pos, ro = (
        await query(
            db, "SELECT @@GLOBAL.gtid_slave_pos, @@GLOBAL.read_only", replica=replica, use_database=False
        )
    )[0]
    if not rows:
        return ReplicaStatus(
            host=host, port=port, configured=False, gtid_slave_pos=str(pos or ""), read_only=bool(ro)
        )
    r = rows[0]
    sbm = r.get("Seconds_Behind_Master")
    return ReplicaStatus(
        host=host,
        port=port,
        configured=True,
        io_running=str(r.get("Slave_IO_Running") or ""),
        sql_running=str(r.get("Slave_SQL_Running") or ""),
        seconds_behind=int(sbm) if sbm is not None else None,
        gtid_io_pos=str(r.get("Gtid_IO_Pos") or ""),
        gtid_slave_pos=str(pos or ""),
        last_io_error=str(r.get("Last_IO_Error") or ""),
        last_sql_error=str(r.get("Last_SQL_Error") or ""),
        read_only=bool(ro),
        master_host=str(r.get("Master_Host") or ""),
        master_port=int(r.get("Master_Port") or 0),
    )


# --------------------------------------------------------------------------- activities


@dataclass(frozen=True)
class DbRequest:
    db: Database


@activity.defn
async def db_schema_version(req: DbRequest) -> int:
    return await schema_version(req.db)
