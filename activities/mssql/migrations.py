"""SQL Server migrations: a T-SQL script (GO batches) run up or down in one transaction and
recorded in dbo.schema_version, on the same terms as MariaDB's (activities/mysql/migrations.py):
idempotent through schema_version, lock waits bounded by `lock_wait_timeout_s`, a retry that
never sends the statements twice.

SQL Server's DDL is transactional, so the whole script and its schema_version row commit
together or not at all (SET XACT_ABORT ON: any error rolls the transaction back and ends the
batch; Learn, "SET XACT_ABORT"). A retry after a lost connection first waits for the lost
attempt's session to end (the server rolls back a transaction whose connection is gone only
when it notices; until then the session may still run a statement), found by its program
name in sys.dm_exec_sessions, then reads schema_version again: committed means done.
"""

from __future__ import annotations

import asyncio
import time

import aioodbc

from activities.common import fail, heartbeat
from activities.mssql.backup import batch, schema_version
from activities.mssql.connect import (
    LOCK_TIMEOUT,
    SqlServerError,
    connection,
    nstring,
    raise_db,
    require_primary,
    run_batch,
)
from activities.mssql.scripts import Batch, ScriptError, split_batches
from activities.mysql.migrations import MigrationDirection, MigrationResult, _run_key
from errors import DATABASE_ERROR, INVALID_REQUEST
from inventory.model import Database

# How long a retry waits for the lost attempt's session to leave before it gives up.
LOST_SESSION_WAIT_S = 600.0
POLL_S = 0.5


def batches_of(db: Database, version: int, direction: str, sql: str) -> list[Batch]:
    try:
        return split_batches(sql)
    except ScriptError as e:
        fail(INVALID_REQUEST, f"database {db.name}: migration {version} {direction}: {e}")


def _app_name(run_key: str, version: int, direction: str) -> str:
    """The program name the migration's session carries (sys.dm_exec_sessions.program_name):
    how a retry finds the lost attempt's session."""
    return f"zerodown migration {version} {direction} {run_key}"[:128]


async def _wait_lost_session(conn: aioodbc.Connection, db: Database, app: str) -> int:
    """Wait until no other session with this program name is connected; its id, or 0."""
    sql = (
        "SELECT session_id FROM sys.dm_exec_sessions WHERE program_name = "
        f"{nstring(app)} AND session_id <> @@SPID"
    )
    deadline = time.monotonic() + LOST_SESSION_WAIT_S
    waited = 0
    while True:
        rows = (await batch(conn, db, "looking for the lost attempt's session", sql)).first_rows()
        if not rows:
            return waited
        waited = int(rows[0][0])
        if time.monotonic() > deadline:
            fail(
                DATABASE_ERROR,
                f"database {db.name}: the lost attempt's session {waited} ({app}) is still connected after "
                f"{LOST_SESSION_WAIT_S:.0f} s: end it (KILL {waited}) once it is safe, then retry",
            )
        heartbeat({"waiting_for_session": waited})
        await asyncio.sleep(POLL_S)


async def _blockers(conn: aioodbc.Connection, db: Database) -> str:
    rows = (
        await batch(
            conn,
            db,
            "open transactions",
            "SELECT session_id, login_name, program_name, open_transaction_count FROM sys.dm_exec_sessions "
            "WHERE open_transaction_count > 0 AND session_id <> @@SPID",
        )
    ).first_rows()
    return ", ".join(f"session {r[0]} ({r[1]}, {r[2] or 'no program name'})" for r in rows) or "none seen now"


async def apply_migration(
    db: Database, version: int, sql: str, direction: MigrationDirection, force: bool = False
) -> MigrationResult:
    """Run one migration up or down and record it in dbo.schema_version, atomically."""
    if direction not in ("up", "down"):
        fail(INVALID_REQUEST, f"migration direction {direction!r}: expected up or down")
    if force and direction != "down":
        fail(INVALID_REQUEST, f"migration {version}: force applies to direction down only")
    batches = batches_of(db, version, direction, sql)
    await require_primary(db)
    run_key = _run_key()
    app = _app_name(run_key, version, direction)
    async with connection(db, app=app) as conn:
        waited = await _wait_lost_session(conn, db, app)
        before = await schema_version(db)
        forced = direction == "down" and before < version and force
        skip = (direction == "up" and before >= version) or (
            direction == "down" and before < version and not force
        )
        if skip:
            return MigrationResult(version, direction, False, 0, before, before, waited_for_connection=waited)
        if direction == "down" and before > version:
            fail(
                DATABASE_ERROR,
                f"database {db.name}: cannot roll back migration {version} while schema version is {before}: "
                "roll back the newer migrations first",
            )
        # A statement waits for a lock at most lock_wait_timeout_s; then 1222 ends the batch
        # and (XACT_ABORT) the transaction: nothing of the migration stays.
        await batch(
            conn,
            db,
            f"migration {version} {direction}: begin",
            f"SET XACT_ABORT ON; SET LOCK_TIMEOUT {db.lock_wait_timeout_s * 1000}; BEGIN TRANSACTION",
        )
        statements = 0
        for b in batches:
            for _ in range(b.repeat):
                heartbeat({"migration": version, "direction": direction, "batch": b.number})
                try:
                    out = await run_batch(conn, b.text)
                except SqlServerError as e:
                    await _rollback(conn)
                    where = (
                        f"migration {version} {direction}{' (forced)' if forced else ''}, batch {b.number}/"
                        f"{len(batches)} (script line {b.first_line})"
                    )
                    if LOCK_TIMEOUT in e.numbers:
                        fail(
                            DATABASE_ERROR,
                            f"database {db.name}: {where}: waited {db.lock_wait_timeout_s} s for a lock "
                            "(lock_wait_timeout_s); sessions with open transactions: "
                            f"{await _blockers(conn, db)}. "
                            "Nothing of the migration was kept",
                        )
                    raise_db(db, where, e)
                statements += max(1, len(out.rowcounts) + len(out.result_sets))
        record = (
            "IF OBJECT_ID(N'dbo.schema_version') IS NULL "
            "CREATE TABLE dbo.schema_version (version INT NOT NULL); "
            f"INSERT INTO dbo.schema_version (version) VALUES ({int(version)});"
            if direction == "up"
            else "IF OBJECT_ID(N'dbo.schema_version') IS NOT NULL "
            f"DELETE FROM dbo.schema_version WHERE version >= {int(version)};"
        )
        try:
            await run_batch(conn, record + " COMMIT TRANSACTION;")
        except SqlServerError as e:
            await _rollback(conn)
            raise_db(db, f"recording migration {version} {direction}", e)
    after = await schema_version(db)
    if direction == "down" and after >= version:
        fail(
            DATABASE_ERROR,
            f"database {db.name}: schema_version still lists {after} after rolling back {version}",
        )
    return MigrationResult(
        version=version,
        direction=direction,
        applied=True,
        statements=statements,
        schema_version_before=before,
        schema_version_after=after,
        forced=forced,
        waited_for_connection=waited,
    )


async def _rollback(conn: aioodbc.Connection) -> None:
    try:
        await run_batch(conn, "IF @@TRANCOUNT > 0 ROLLBACK TRANSACTION")
    except SqlServerError:
        pass  # XACT_ABORT already rolled back, or the connection is gone: the server undoes it
