"""MariaDB / MySQL migrations: run a migration script up or down, recorded in schema_version.

Idempotent through the `schema_version` table (see apply_migration); the statements of a
script are split by split_sql. Errors follow connect.py's policy.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Literal

import pymysql
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.common import fail, heartbeat
from activities.mysql import statements
from activities.mysql.connect import (
    _SCHEMA_TABLE_EXISTS,
    LOCK_WAIT_TIMEOUT,
    _endpoint,
    _raise_db,
    connection,
    query,
    schema_version,
)
from errors import DATABASE_ERROR, INVALID_REQUEST
from inventory.model import Database


def split_sql(sql: str) -> list[str]:
    """Statements of a migration script: a statement ends with a line ending in ';'.

    Whole-line comments (`--`, `#`) between statements are dropped; the trailing ';' is
    removed. Deliberately simple (no DELIMITER support): migrations are plain DDL/DML.
    """
    stmts: list[str] = []
    buf: list[str] = []
    for line in sql.splitlines():
        s = line.strip()
        if not buf and (not s or s.startswith("--") or s.startswith("#")):
            continue
        buf.append(line)
        if s.endswith(";"):
            stmt = "\n".join(buf).strip()[:-1].rstrip()
            if stmt:
                stmts.append(stmt)
            buf = []
    rest = "\n".join(ln for ln in buf if not ln.strip().startswith(("--", "#"))).strip()
    if rest:
        stmts.append(rest)
    return stmts


def _run_key() -> str:
    """The run the migration belongs to: each attempt of the step is its own activity
    execution (the workflow retries, workflows/procedure.py), so the key is the workflow run;
    with the version and direction it names one migration of that run. Outside an activity,
    one call (nothing to resume)."""
    if activity.in_activity():
        info = activity.info()
        return f"{info.workflow_id}/{info.workflow_run_id}"[:255]
    return f"local/{uuid.uuid4().hex}"


def _is_lock_wait_timeout(e: BaseException) -> bool:
    return isinstance(e, pymysql.MySQLError) and bool(e.args) and e.args[0] == LOCK_WAIT_TIMEOUT


async def _fail_lock_wait(db: Database, host: str, port: int, where: str, e: BaseException) -> None:
    """A statement that could not get its lock in time: not retried (each try would hold the
    table's queries as long again); the error names who holds a transaction open."""
    try:
        holders = await query(
            db,
            "SELECT p.ID, p.USER, p.HOST, p.TIME, LEFT(COALESCE(p.INFO, ''), 80) FROM "
            "information_schema.PROCESSLIST p JOIN information_schema.INNODB_TRX t ON "
            "t.trx_mysql_thread_id = p.ID ORDER BY t.trx_started LIMIT 5",
        )
        who = (
            "; ".join(f"connection {r[0]} {r[1]}@{r[2]}, open {r[3]} s {r[4]!r}" for r in holders)
            or "none left"
        )
    except ApplicationError:
        who = "(could not be read)"
    fail(
        DATABASE_ERROR,
        f"database {db.name} ({db.user}@{host}:{port}/{db.database}): {where}: could not get "
        f"its table lock within {db.lock_wait_timeout_s} s (lock_wait_timeout_s in the inventory); "
        f"open transactions: {who}. The site kept answering; nothing of this statement was "
        "applied. End those transactions, then retry",
        cause=e,
    )


# Which script of a migration runs.
MigrationDirection = Literal["up", "down"]


@dataclass(frozen=True)
class MigrationResult:
    version: int
    direction: MigrationDirection
    applied: bool  # False: skipped because schema_version already said so
    statements: int
    schema_version_before: int
    schema_version_after: int
    # True: a forced `down` ran although schema_version did not list the migration.
    forced: bool = False
    # A retry: the statement it went on from (0: from the first), and the lost attempt's
    # connection it waited for while that one's statement still ran (0: none).
    resumed_at_statement: int = 0
    waited_for_connection: int = 0


async def apply_migration(
    db: Database, version: int, sql: str, direction: MigrationDirection, force: bool = False
) -> MigrationResult:
    """Run one migration up or down and record it in schema_version (one row per version).

    Idempotent via schema_version: `up` is skipped when MAX(version) >= version, `down` when
    MAX(version) < version. DDL is not transactional in MariaDB, so a crash between the
    statements and the record re-runs the statements: migrations are expected to be
    re-runnable (IF [NOT] EXISTS), as the lab's are.

    `force` (down only): run the down statements even when schema_version says the
    migration is not applied - an `up` that failed half-way leaves its first changes but
    no record - and make sure schema_version no longer lists `version` afterwards. Down
    scripts must therefore be re-runnable (DROP ... IF EXISTS). A newer migration still
    recorded is refused as without force.
    """
    if db.kind == "mssql":  # SQL Server: activities/mssql (imported here: it builds on this module)
        from activities.mssql import migrations as _mssql

        return await _mssql.apply_migration(db, version, sql, direction, force)
    if direction not in ("up", "down"):
        fail(INVALID_REQUEST, f"migration direction {direction!r}: expected up or down")
    if force and direction != "down":
        fail(INVALID_REQUEST, f"migration {version}: force applies to direction down only")
    before = await schema_version(db)
    forced = direction == "down" and before < version and force
    if (direction == "up" and before >= version) or (direction == "down" and before < version and not force):
        return MigrationResult(
            version=version,
            direction=direction,
            applied=False,
            statements=0,
            schema_version_before=before,
            schema_version_after=before,
        )
    if direction == "down" and before > version:
        fail(
            DATABASE_ERROR,
            f"database {db.name}: cannot roll back migration {version} while schema "
            f"version is {before}: roll back the newer migrations first",
        )
    stmts = split_sql(sql)
    host, port = _endpoint(db, False)
    what = f"database {db.name}: migration {version} {direction}"
    run_key = _run_key()
    async with connection(db) as conn:
        async with conn.cursor() as cur:
            try:
                # A statement queued behind a lock holds every later query on its table: it
                # queues at most a second at a time (statements.LOCK_TRY_S), for at most the
                # inventory's lock_wait_timeout_s in all, then fails.
                await cur.execute(
                    "SET SESSION lock_wait_timeout = %s, innodb_lock_wait_timeout = %s",
                    (statements.LOCK_TRY_S, statements.LOCK_TRY_S),
                )
                # A retry goes on where the lost attempt's statements ended (statements.py).
                resumed = await statements.resume(cur, run_key, version, direction, stmts, what)
            except (pymysql.MySQLError, OSError) as e:
                _raise_db(db, host, port, f"migration {version} {direction}: reading its log", e)
            for i, stmt in enumerate(stmts, 1):
                if i < resumed.next_statement:
                    if statements.effect_of(stmt).kind == "session":
                        await cur.execute(stmt)  # session state is this connection's: set it again
                    continue
                heartbeat({"migration": version, "direction": direction, "statement": i})
                try:
                    await statements.send_once(
                        cur, run_key, version, direction, i, stmt, float(db.lock_wait_timeout_s)
                    )
                except (pymysql.MySQLError, OSError) as e:
                    where = (
                        f"migration {version} {direction}{' (forced)' if forced else ''}, "
                        f"statement {i}/{len(stmts)} {stmt[:200]!r}"
                    )
                    if _is_lock_wait_timeout(e):
                        await _fail_lock_wait(db, host, port, where, e)
                    _raise_db(db, host, port, where, e)
            try:
                await cur.execute(_SCHEMA_TABLE_EXISTS)
                exists = await cur.fetchone()
                table_exists = bool(exists and exists[0])
                if direction == "up":
                    if not table_exists:
                        await cur.execute("CREATE TABLE schema_version (version INT NOT NULL)")
                    await cur.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
                elif table_exists:
                    await cur.execute("DELETE FROM schema_version WHERE version >= %s", (version,))
                    removed = cur.rowcount
                    await cur.execute("SELECT COUNT(*) FROM schema_version")
                    row = await cur.fetchone()
                    if removed and row and row[0] == 0 and version > 1:
                        # single-row style tables: keep recording the version below
                        await cur.execute("INSERT INTO schema_version (version) VALUES (%s)", (version - 1,))
            except (pymysql.MySQLError, OSError) as e:
                _raise_db(db, host, port, f"recording migration {version} {direction}", e)
    after = await schema_version(db)
    if direction == "down" and after >= version:
        fail(
            DATABASE_ERROR,
            f"database {db.name}: schema_version still lists version {after} after "
            f"rolling back migration {version}",
        )
    return MigrationResult(
        version=version,
        direction=direction,
        applied=True,
        statements=len(stmts),
        schema_version_before=before,
        schema_version_after=after,
        forced=forced,
        resumed_at_statement=resumed.next_statement if resumed.next_statement > 1 else 0,
        waited_for_connection=resumed.waited_for_connection,
    )


# --------------------------------------------------------------------------- activities


@dataclass(frozen=True)
class MigrationRequest:
    db: Database
    version: int
    sql: str
    direction: MigrationDirection
    # down only: run the down script even when schema_version does not list `version` (an
    # `up` that failed half-way); the down script must be re-runnable (IF EXISTS).
    force: bool = False


@activity.defn
async def db_apply_migration(req: MigrationRequest) -> MigrationResult:
    return await apply_migration(req.db, req.version, req.sql, req.direction, req.force)
