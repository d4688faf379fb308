"""The SQL Server adapter (activities/mssql) against the lab's stand-in through the real
FreeTDS driver: backup, verification, restore into a copy and over a database in use, the
upgrade script's T-SQL, availability roles, lock waits. Where the real server catches
adapters out (a backup in a transaction, results left unread, an error reported as a pair,
a restore over a database in use) the raw driver shows the trap and the adapter copes."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import pyodbc
import pytest
from temporalio.exceptions import ApplicationError

from activities.mssql import backup as mssql
from activities.mssql import migrations
from activities.mssql.connect import SqlServerError, connection, connection_string, run_batch
from activities.secrets import resolve_secret
from inventory.load import load_inventory
from inventory.model import Database
from lab import mariadb as lab_mariadb
from lab.config import SCRATCH_DB_NAME, LabConfig
from lab.mssql import lab as mssql_lab
from lab.mssql.engine import LabSqlServer, ServerConfig, load_logins
from lab.mssql.results import Login, Message


def sql_server(lab: LabConfig) -> Database:
    db = load_inventory(dataclasses.replace(lab, db="mssql").site_yaml).databases[0]
    assert db.kind == "mssql"
    return db


def raw(db: Database, database: str = "master", autocommit: bool = True) -> pyodbc.Connection:
    """A plain pyodbc connection, as a script would open one (no adapter in between)."""
    password = resolve_secret(db.password, needed_by="test")
    return pyodbc.connect(connection_string(db, password, database), autocommit=autocommit, timeout=10)


@pytest.fixture
def scratch(fresh_lab: LabConfig) -> Iterator[Database]:
    db = sql_server(fresh_lab)
    yield dataclasses.replace(db, database=SCRATCH_DB_NAME)
    lab_mariadb.query(fresh_lab, "primary", f"DROP DATABASE IF EXISTS {SCRATCH_DB_NAME}")


async def test_backup_verified_restored_into_a_copy_with_equal_checksums_then_dropped(
    fresh_lab: LabConfig, scratch: Database
) -> None:
    db = sql_server(fresh_lab)
    bk = await mssql.backup(db, "adapter-copy", None)
    assert Path(bk.path).is_file() and bk.path.startswith(str(mssql_lab.backups_dir(fresh_lab)))
    assert bk.sha256.startswith("backupset:") and bk.table_checksums, bk
    assert set(bk.table_checksums) >= {"items", "tbAudit", "tbUpgradeSettings"}
    restored = await mssql.restore(dataclasses.replace(bk, db=scratch))
    assert restored.created_database and restored.mismatched == ()
    assert restored.checksums == bk.table_checksums
    # The copy's files were moved beside the original's: both databases stand.
    with raw(db) as conn:
        files = conn.execute(
            f"SELECT name, physical_name FROM [{SCRATCH_DB_NAME}].sys.database_files"
        ).fetchall()
    assert files and all(SCRATCH_DB_NAME in str(f[1]) for f in files), files
    dropped = await mssql.drop_database(db, SCRATCH_DB_NAME)
    assert dropped.dropped and not (await mssql.drop_database(db, SCRATCH_DB_NAME)).dropped
    with pytest.raises(ApplicationError, match="refusing to drop labapp"):
        await mssql.drop_database(db, "labapp")


async def test_a_backup_in_a_transaction_fails_and_the_adapter_never_opens_one(fresh_lab: LabConfig) -> None:
    db = sql_server(fresh_lab)
    path = str(mssql_lab.backups_dir(fresh_lab) / "in-tx.bak")
    # pyodbc's default is autocommit off: FreeTDS opens a transaction, and BACKUP refuses it.
    with raw(db, autocommit=False) as conn, pytest.raises(pyodbc.Error) as info:
        conn.execute(f"BACKUP DATABASE labapp TO DISK = N'{path}' WITH INIT")
    assert "(3021)" in str(info.value) and "within a transaction" in str(info.value)
    assert not os.path.exists(path)
    bk = await mssql.backup(db, "in-tx", None)  # autocommit on, from master
    assert os.path.exists(bk.path)


async def test_results_left_unread_hide_an_error_that_reading_every_result_finds(
    fresh_lab: LabConfig,
) -> None:
    db = sql_server(fresh_lab)
    path = str(mssql_lab.backups_dir(fresh_lab) / "unread.bak")
    batch = f"BACKUP DATABASE labapp TO DISK = N'{path}' WITH INIT; THROW 50002, N'after the backup', 1"
    with raw(db) as conn:
        cur = conn.execute(batch)  # returns at the first result: no error yet
        with pytest.raises(pyodbc.Error, match=r"after the backup \(50002\)"):
            while cur.nextset():
                pass
    async with connection(db, "master") as conn:
        with pytest.raises(SqlServerError) as err:
            await run_batch(conn, batch)
    assert err.value.numbers == (50002,)
    # The backup's own messages were read on the way (4035, 3014): judged by its numbers.
    assert {4035, 3014} <= {m.number for m in err.value.messages}


async def test_a_failed_backup_is_a_pair_and_the_adapter_reports_the_cause(
    fresh_lab: LabConfig, tmp_path: Path
) -> None:
    db = sql_server(fresh_lab)
    # What the server sends: the cause, then 3013 (seen at the engine, below the driver).
    cfg = ServerConfig(
        mariadb_socket=str(lab_mariadb.socket_path(fresh_lab, "primary")),
        state_dir=str(tmp_path),
        logins=load_logins(str(mssql_lab.state_dir(fresh_lab) / "logins.json")),
    )
    engine = LabSqlServer(cfg)
    password = resolve_secret(db.password, needed_by="test")
    session, _ = await engine.open_session(Login(user=mssql_lab.LOGIN, password=password, database="master"))
    try:
        items = [i async for i in session.batch("BACKUP DATABASE labapp TO DISK = N'/nonexistent/dir/x.bak'")]
    finally:
        await session.close()
    errors = [i.number for i in items if isinstance(i, Message) and i.is_error]
    assert errors == [3201, 3013]
    # pyodbc on Linux raises with the first record only; the adapter says which and why.
    with pytest.raises(ApplicationError) as info:
        await mssql.backup(db, "nowhere", "/nonexistent/dir")
    assert "(3201)" in str(info.value) and "Cannot open backup device" in str(info.value)
    assert info.value.non_retryable


async def test_a_restore_over_a_database_in_use_fails_until_its_users_are_put_out(
    fresh_lab: LabConfig,
) -> None:
    db = sql_server(fresh_lab)
    bk = await mssql.backup(db, "in-use", None)
    # The lab app holds connections to labapp (its pool): exclusive access is refused.
    with raw(db) as conn, pytest.raises(pyodbc.Error, match=r"\(3101\)"):
        cur = conn.execute(f"RESTORE DATABASE labapp FROM DISK = N'{bk.path}' WITH REPLACE")
        while cur.nextset():
            pass
    restored = await mssql.restore(bk)  # SINGLE_USER WITH ROLLBACK IMMEDIATE, REPLACE, MULTI_USER
    assert restored.mismatched == () and not restored.created_database
    with raw(db) as conn:
        access = conn.execute("SELECT user_access_desc FROM sys.databases WHERE name = N'labapp'").fetchone()
    assert access[0] == "MULTI_USER"


UPGRADE_SCRIPT = """\
/* Secret Server style upgrade script: written by hand, not by zerodown. */
SET NOCOUNT ON
GO
IF NOT EXISTS (SELECT * FROM sys.tables WHERE name = N'tbSecretTemplate')
BEGIN
    CREATE TABLE [dbo].[tbSecretTemplate] (
        [SecretTemplateId] INT IDENTITY(1,1) NOT NULL,
        [Name] NVARCHAR(100) NOT NULL,
        [Active] BIT NOT NULL CONSTRAINT [DF_tbSecretTemplate_Active] DEFAULT ((1)),
        [Created] DATETIME2(7) NOT NULL CONSTRAINT [DF_tbSecretTemplate_Created] DEFAULT (SYSUTCDATETIME()),
        CONSTRAINT [PK_tbSecretTemplate] PRIMARY KEY CLUSTERED ([SecretTemplateId] ASC)
    ) ON [PRIMARY]
END
GO
-- a GO inside a comment is not a separator: GO
IF NOT EXISTS (SELECT 1 FROM sys.indexes WHERE name = N'IX_tbSecretTemplate_Name'
               AND object_id = OBJECT_ID(N'[dbo].[tbSecretTemplate]'))
    CREATE NONCLUSTERED INDEX [IX_tbSecretTemplate_Name] ON [dbo].[tbSecretTemplate] ([Name])
GO
IF COL_LENGTH(N'dbo.items', N'Folder') IS NULL
    ALTER TABLE dbo.items ADD Folder NVARCHAR(50) NULL, Rank INT NOT NULL CONSTRAINT DF_items_Rank DEFAULT (0)
GO
INSERT INTO dbo.tbSecretTemplate (Name) VALUES (N'Password'), (N'Windows Account'), (N'It''s a ''quote''')
UPDATE dbo.items SET Folder = N'GO
here' WHERE Folder IS NULL
GO 2
"""


async def test_an_upgrade_script_it_did_not_write_runs_batch_by_batch(
    fresh_lab: LabConfig, scratch: Database
) -> None:
    db = sql_server(fresh_lab)
    bk = await mssql.backup(db, "script", None)
    await mssql.restore(dataclasses.replace(bk, db=scratch))
    result = await migrations.apply_migration(scratch, 7, UPGRADE_SCRIPT, "up")
    assert result.applied and result.schema_version_after == 7
    q = lambda sql: lab_mariadb.query(fresh_lab, "primary", sql, database=SCRATCH_DB_NAME)  # noqa: E731
    assert [r[0] for r in q("SELECT Name FROM tbSecretTemplate ORDER BY SecretTemplateId")] == [
        "Password",
        "Windows Account",
        "It's a 'quote'",
        "Password",  # GO 2: the batch ran twice
        "Windows Account",
        "It's a 'quote'",
    ]
    assert (
        q(
            "SELECT COUNT(*) FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE() "
            "AND INDEX_NAME = 'IX_tbSecretTemplate_Name'"
        )[0][0]
        == 1
    )
    cols = {r[0] for r in q("SHOW COLUMNS FROM items")}
    assert {"Folder", "Rank"} <= cols
    assert {r[0] for r in q("SELECT DISTINCT Folder FROM items")} <= {"GO\nhere"}
    again = await migrations.apply_migration(scratch, 7, UPGRADE_SCRIPT, "up")
    assert not again.applied  # schema_version says so


async def test_a_failing_batch_keeps_nothing_and_names_the_batch(
    fresh_lab: LabConfig, scratch: Database
) -> None:
    db = sql_server(fresh_lab)
    await mssql.restore(dataclasses.replace(await mssql.backup(db, "failing", None), db=scratch))
    script = (
        "CREATE TABLE dbo.tbNew (Id INT NOT NULL)\nGO\nALTER TABLE dbo.items ADD Extra INT NULL\nGO\n"
        "-- outside the stand-in's subset: refused, never run halfway\nDECLARE @n INT = 1\nGO\n"
    )
    with pytest.raises(ApplicationError) as info:
        await migrations.apply_migration(scratch, 8, script, "up")
    text = str(info.value)
    assert "batch 3/3 (script line 5)" in text and "(40517)" in text and "DECLARE" in text, text
    # One transaction: the table and the column of batches 1 and 2 are gone again.
    tables = {r[0] for r in lab_mariadb.query(fresh_lab, "primary", "SHOW TABLES", database=SCRATCH_DB_NAME)}
    assert "tbNew" not in tables
    cols = {
        r[0]
        for r in lab_mariadb.query(fresh_lab, "primary", "SHOW COLUMNS FROM items", database=SCRATCH_DB_NAME)
    }
    assert "Extra" not in cols
    assert await mssql.schema_version(scratch) == 1


async def test_a_secondary_or_a_mirror_is_refused_naming_the_primary(fresh_lab: LabConfig) -> None:
    db = sql_server(fresh_lab)
    try:
        mssql_lab.set_availability(
            fresh_lab,
            {
                "availability_group": {
                    "name": "ag-secret",
                    "local_role": "SECONDARY",
                    "local_replica": "SQL2",
                    "primary_replica": "SQL1",
                    "databases": ["labapp"],
                }
            },
        )
        with pytest.raises(
            ApplicationError,
            match=r"is the secondary, not the writable primary .*point the inventory at SQL1",
        ):
            await mssql.backup(db, "secondary", None)
        mssql_lab.set_availability(
            fresh_lab,
            {
                "mirroring": {
                    "labapp": {
                        "role": "MIRROR",
                        "partner_instance": "SQL1\\MAIN",
                        "partner_name": "TCP://sql1:5022",
                    }
                }
            },
        )
        with pytest.raises(ApplicationError, match=r"is the mirror, .*point the inventory at SQL1\\MAIN"):
            await migrations.apply_migration(db, 9, "SELECT 1", "up")
        mssql_lab.set_availability(
            fresh_lab,
            {
                "availability_group": {
                    "name": "ag-secret",
                    "local_role": "PRIMARY",
                    "local_replica": "SQL1",
                    "primary_replica": "SQL1",
                    "databases": ["labapp"],
                }
            },
        )
        check = await mssql.require_primary(db)
        assert check.role == "PRIMARY" and check.writable
    finally:
        mssql_lab.set_availability(fresh_lab, None)


async def test_a_lock_wait_is_bounded_and_names_the_open_transaction(fresh_lab: LabConfig) -> None:
    db = dataclasses.replace(sql_server(fresh_lab), lock_wait_timeout_s=1)
    holder = raw(db, "labapp", autocommit=False)  # an open transaction holding items
    holder.execute("UPDATE dbo.items SET body = body WHERE id > 0")
    try:
        with pytest.raises(ApplicationError) as info:
            await asyncio.wait_for(
                migrations.apply_migration(db, 9, "ALTER TABLE dbo.items ADD Blocked INT NULL", "up"), 30
            )
        text = str(info.value)
        assert "waited 1 s for a lock" in text and "Nothing of the migration was kept" in text, text
        assert "session " in text and mssql_lab.LOGIN in text, text
    finally:
        holder.rollback()
        holder.close()
    cols = {r[0] for r in lab_mariadb.query(fresh_lab, "primary", "SHOW COLUMNS FROM labapp.items")}
    assert "Blocked" not in cols
    assert await mssql.schema_version(db) == 1


async def test_a_retry_waits_for_the_lost_attempts_session_before_it_runs(
    fresh_lab: LabConfig, scratch: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = sql_server(fresh_lab)
    await mssql.restore(dataclasses.replace(await mssql.backup(db, "lost", None), db=scratch))
    monkeypatch.setattr(migrations, "_run_key", lambda: "run-lost")
    app = migrations._app_name("run-lost", 11, "up")
    password = resolve_secret(db.password, needed_by="test")
    lost = pyodbc.connect(connection_string(scratch, password, None, app=app), autocommit=True, timeout=10)
    spid = lost.execute("SELECT @@SPID").fetchone()[0]
    # The lost attempt's session is still busy with its statement (the server has not
    # noticed its client is gone): the retry must not send the script beside it.
    loop = asyncio.get_running_loop()
    busy = loop.run_in_executor(None, lambda: (lost.execute("WAITFOR DELAY '00:00:02'"), lost.close()))
    await asyncio.sleep(0.3)
    started = loop.time()
    result = await migrations.apply_migration(scratch, 11, "ALTER TABLE dbo.items ADD Waited INT NULL", "up")
    await busy
    assert result.applied and result.waited_for_connection == spid
    assert loop.time() - started >= 1.0
