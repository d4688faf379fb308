"""A migration's statement is sent at most once across the attempts of one activity
(activities/mysql/statements.py), on the lab's real MariaDB.

A lost attempt is made the way a dead worker leaves it: its connection's socket closes
while the statement runs on the server (the attempt's task is cancelled mid-statement).
The retry is the same activity execution again (same workflow, run and activity id).
`test_e2e_rolling_deploy.py` does the same with a worker process SIGKILLed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities import mysql
from activities.mysql import BackupRequest, MigrationRequest
from activities.mysql.statements import LOG_TABLE, Effect, effect_of
from inventory.load import load_inventory
from inventory.model import Database
from lab.config import LabConfig

# --------------------------------------------------------------------------- effects (unit)


@pytest.mark.parametrize(
    ("statement", "effect"),
    [
        ("ALTER TABLE items ADD COLUMN notes VARCHAR(200) NULL", Effect("column", "items", "notes")),
        ("alter table `it``ems` add if not exists `n` int", Effect("column", "it`ems", "n")),
        ("ALTER TABLE db.items ADD notes INT, ALGORITHM=COPY", Effect("column", "items", "notes")),
        ("ALTER TABLE items DROP COLUMN IF EXISTS notes", Effect("no column", "items", "notes")),
        ("ALTER TABLE items ADD UNIQUE INDEX ix_name (name)", Effect("index", "items", "ix_name")),
        ("ALTER TABLE items DROP INDEX ix_name", Effect("no index", "items", "ix_name")),
        ("CREATE INDEX ix_a ON items (a, b)", Effect("index", "items", "ix_a")),
        ("CREATE TABLE IF NOT EXISTS t2 (id INT)", Effect("table", "t2")),
        ("CREATE TABLE t3 AS SELECT SLEEP(1)", Effect("table", "t3")),
        ("DROP TABLE IF EXISTS t2", Effect("no table", "t2")),
        ("UPDATE items SET n = n + 1", Effect("data")),
        ("insert into items (name) values ('a, b')", Effect("data")),
        ("SET @x = (SELECT 1)", Effect("session")),
        # Two changes in one ALTER: the first may be there without the second.
        ("ALTER TABLE items ADD a INT, ADD b INT", Effect("unknown")),
        ("ALTER TABLE items ADD CONSTRAINT fk FOREIGN KEY (a) REFERENCES t (id)", Effect("unknown")),
        ("RENAME TABLE a TO b", Effect("unknown")),
    ],
)
def test_the_effect_a_retry_reads_back(statement: str, effect: Effect) -> None:
    assert effect_of(statement) == effect


# --------------------------------------------------------------------------- on the lab


@pytest.fixture
async def db(lab: LabConfig) -> AsyncIterator[Database]:
    database = load_inventory(lab.site_yaml).databases[0]
    yield database
    await mysql.query(database, "DROP TABLE IF EXISTS zd_slow_once, zd_counter")
    await mysql.query(database, f"DELETE FROM {LOG_TABLE} WHERE run_key LIKE 'wf-once-%'")
    if await mysql.schema_version(database) > 1:
        await mysql.query(database, "DELETE FROM schema_version WHERE version > 1")


def execution() -> ActivityEnvironment:
    """One workflow run: every `run` of it is an attempt of the same migration step."""
    env = ActivityEnvironment()
    env.info = dataclasses.replace(
        env.info,
        workflow_id=f"wf-once-{uuid.uuid4().hex[:8]}",
        workflow_run_id=uuid.uuid4().hex,
    )
    return env


async def lose_attempt_mid_statement(
    env: ActivityEnvironment, req: MigrationRequest, db: Database, statement_start: str
) -> None:
    """Start an attempt and drop its connection once its slow statement runs on the server."""
    attempt = asyncio.create_task(env.run(mysql.db_apply_migration, req))
    for _ in range(200):
        rows = await mysql.query(
            db,
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST "
            "WHERE ID <> CONNECTION_ID() AND INFO LIKE %s",
            (statement_start + "%",),
        )
        if rows[0][0]:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the attempt's statement never ran")
    attempt.cancel()  # its connection closes; the server goes on with the statement
    with pytest.raises(asyncio.CancelledError):
        await attempt


async def test_a_retry_waits_for_the_lost_attempts_ddl_and_does_not_send_it_again(db: Database) -> None:
    sql = "CREATE TABLE zd_slow_once AS SELECT SLEEP(3) AS slept;\nCREATE TABLE zd_counter (n INT);\n"
    req = MigrationRequest(db, 2, sql, "up")
    env = execution()
    await lose_attempt_mid_statement(env, req, db, "CREATE TABLE zd_slow_once")
    retry = await env.run(mysql.db_apply_migration, req)
    # Sent again, the CREATE TABLE would have failed ("already exists"): it ran once.
    assert retry.applied and retry.schema_version_after == 2
    assert retry.waited_for_connection > 0 and retry.resumed_at_statement == 2
    tables = await mysql.base_tables(db)
    assert "zd_slow_once" in tables and "zd_counter" in tables and LOG_TABLE not in tables
    log = await mysql.query(
        db,
        f"SELECT statement, state FROM {LOG_TABLE} WHERE run_key LIKE %s ORDER BY statement",
        (f"{env.info.workflow_id}/%",),
    )
    assert log == [(1, "done"), (2, "done")]


async def test_a_lost_data_change_is_sent_again_exactly_once(db: Database) -> None:
    await mysql.query(db, "CREATE TABLE zd_counter (n INT NOT NULL)")
    await mysql.query(db, "INSERT INTO zd_counter VALUES (0)")
    sql = "UPDATE zd_counter SET n = n + 1 WHERE SLEEP(3) = 0;\n"
    req = MigrationRequest(db, 2, sql, "up")
    env = execution()
    await lose_attempt_mid_statement(env, req, db, "UPDATE zd_counter")
    retry = await env.run(mysql.db_apply_migration, req)
    # The lost attempt's transaction was rolled back with its connection; the retry waited
    # for it, then sent the change once more: one increment in all.
    assert retry.applied and retry.waited_for_connection > 0 and retry.resumed_at_statement == 0
    assert await mysql.query(db, "SELECT n FROM zd_counter") == [(1,)]
    again = await env.run(mysql.db_apply_migration, req)  # recorded: skipped
    assert not again.applied and await mysql.query(db, "SELECT n FROM zd_counter") == [(1,)]


async def test_a_lost_statement_whose_effect_cannot_be_read_back_stops_for_a_person(db: Database) -> None:
    await mysql.query(db, "CREATE TABLE zd_counter (n INT NOT NULL)")
    sql = "ALTER TABLE zd_counter ADD a INT, ADD b INT, COMMENT = 'slow', ALGORITHM = COPY, LOCK = SHARED;\n"
    # Made slow on purpose: a metadata lock held by another session while the ALTER waits.
    env = execution()
    async with mysql.connection(db) as holder, holder.cursor() as cur:
        await cur.execute("START TRANSACTION")
        await cur.execute("SELECT * FROM zd_counter")
        attempt = asyncio.create_task(env.run(mysql.db_apply_migration, MigrationRequest(db, 2, sql, "up")))
        for _ in range(200):
            rows = await mysql.query(
                db,
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST "
                "WHERE INFO LIKE 'ALTER TABLE zd_counter%'",
            )
            if rows[0][0]:
                break
            await asyncio.sleep(0.02)
        attempt.cancel()  # lost while its ALTER waits for the lock
        with pytest.raises(asyncio.CancelledError):
            await attempt
        await cur.execute("COMMIT")
    with pytest.raises(ApplicationError) as e:
        await env.run(mysql.db_apply_migration, MigrationRequest(db, 2, sql, "up"))
    assert e.value.non_retryable and "cannot be read back" in e.value.message
    assert "statement 1/1" in e.value.message


async def test_a_backup_waits_for_its_write_lock_at_most_the_lock_wait(db: Database, tmp_path: Path) -> None:
    """The backup's LOCK TABLES ... READ queues behind an open write transaction at most the
    inventory's lock_wait_timeout_s, then gives up (to be tried again): writes queued behind
    it wait no longer than that."""
    quick = dataclasses.replace(db, lock_wait_timeout_s=2)
    loop = asyncio.get_running_loop()
    async with mysql.connection(db) as holder, holder.cursor() as cur:
        await cur.execute("START TRANSACTION")
        await cur.execute("INSERT INTO items (node, body) VALUES ('test', 'held open')")
        started = loop.time()
        with pytest.raises(ApplicationError) as e:
            await ActivityEnvironment().run(
                mysql.db_backup, BackupRequest(quick, f"lockwait-{uuid.uuid4().hex[:6]}", str(tmp_path))
            )
        waited = loop.time() - started
        await cur.execute("ROLLBACK")
    assert 1.5 < waited < 4, waited
    assert not e.value.non_retryable and "error 1205" in e.value.message
    assert "locking tables for a consistent backup" in e.value.message
