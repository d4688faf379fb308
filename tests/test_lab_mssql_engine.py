"""The lab's SQL Server behaves as SQL Server does where adapters trip (lab/mssql/README.md),
seen through the real FreeTDS driver: errors per statement or per batch, transactional DDL,
BACKUP / RESTORE sets and their failures, KILL, and T-SQL outside its subset refused."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyodbc
import pytest

from activities.mssql.connect import connection_string
from activities.secrets import resolve_secret
from inventory.load import load_inventory
from lab import mariadb as lab_mariadb
from lab.config import LabConfig
from lab.mssql import lab as mssql_lab

DB = "zdtest_engine"


def connect(lab: LabConfig, database: str = "master", autocommit: bool = True) -> pyodbc.Connection:
    db = load_inventory(dataclasses.replace(lab, db="mssql").site_yaml).databases[0]
    cs = connection_string(db, resolve_secret(db.password, needed_by="test"), database)
    return pyodbc.connect(cs, autocommit=autocommit, timeout=10)


def drain(cur: pyodbc.Cursor) -> list[list[tuple[object, ...]]]:
    """Every result set of the batch (raises at the first error met)."""
    sets = []
    while True:
        if cur.description is not None:
            sets.append([tuple(r) for r in cur.fetchall()])
        if not cur.nextset():
            return sets


@pytest.fixture
def engine_db(lab: LabConfig) -> Iterator[pyodbc.Connection]:
    with connect(lab) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB}")
        conn.execute(f"CREATE DATABASE {DB}")
    with connect(lab, DB) as conn:
        conn.execute("CREATE TABLE dbo.t (id INT NOT NULL PRIMARY KEY, name NVARCHAR(20) NULL)")
        yield conn
    with connect(lab) as conn:
        conn.execute(f"ALTER DATABASE {DB} SET SINGLE_USER WITH ROLLBACK IMMEDIATE")
        conn.execute(f"DROP DATABASE {DB}")


def ids(conn: pyodbc.Connection) -> list[int]:
    return [r[0] for r in conn.execute("SELECT id FROM dbo.t ORDER BY id").fetchall()]


def test_an_error_ends_the_statement_unless_xact_abort_ends_the_batch(engine_db: pyodbc.Connection) -> None:
    conn = engine_db
    batch = (
        "INSERT INTO dbo.t VALUES (1, N'a'); INSERT INTO dbo.t VALUES (1, N'dup'); "
        "INSERT INTO dbo.t VALUES (2, N'b')"
    )
    with pytest.raises(pyodbc.Error, match=r"Violation of PRIMARY KEY constraint .*\(2627\)"):
        drain(conn.execute(batch))
    assert ids(conn) == [1, 2]  # the statement after the error ran
    conn.execute("DELETE FROM dbo.t")
    with pytest.raises(pyodbc.Error, match=r"\(2627\)"):
        drain(conn.execute("SET XACT_ABORT ON; BEGIN TRANSACTION; " + batch + "; COMMIT"))
    assert ids(conn) == []  # XACT_ABORT: the batch ended and the transaction rolled back
    assert conn.execute("SELECT @@TRANCOUNT").fetchone()[0] == 0
    # GO is sqlcmd's, not the server's.
    with pytest.raises(pyodbc.Error, match=r"Incorrect syntax near 'GO'\. \(102\)"):
        drain(conn.execute("CREATE TABLE dbo.g (x INT)\nGO\nSELECT 2"))
    assert conn.execute("SELECT COUNT(*) FROM sys.tables WHERE name = N'g'").fetchone()[0] == 0


def test_ddl_in_a_transaction_is_undone_by_rollback_and_by_a_lost_connection(
    lab: LabConfig, engine_db: pyodbc.Connection
) -> None:
    conn = engine_db
    conn.execute("INSERT INTO dbo.t VALUES (1, N'kept')")
    drain(
        conn.execute(
            "BEGIN TRAN; ALTER TABLE dbo.t ADD extra INT NULL; DROP TABLE dbo.t; CREATE TABLE dbo.n (x INT)"
        )
    )
    assert conn.execute("SELECT COUNT(*) FROM sys.tables WHERE name = N't'").fetchone()[0] == 0
    conn.execute("ROLLBACK")
    cols = [
        r[0]
        for r in conn.execute("SELECT name FROM sys.columns WHERE object_id = OBJECT_ID(N'dbo.t')").fetchall()
    ]
    assert cols == ["id", "name"] and ids(conn) == [1]
    assert conn.execute("SELECT COUNT(*) FROM sys.tables WHERE name = N'n'").fetchone()[0] == 0
    # A connection that goes away in the middle of a transaction: the server rolls it back.
    lost = connect(lab, DB)
    drain(
        lost.execute(
            "BEGIN TRANSACTION; ALTER TABLE dbo.t ADD gone INT NULL; INSERT INTO dbo.t (id) VALUES (9)"
        )
    )
    lost.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "gone" in [
        r[0] for r in lab_mariadb.query(lab, "primary", f"SHOW COLUMNS FROM {DB}.t")
    ]:
        time.sleep(0.1)
    assert "gone" not in [r[0] for r in lab_mariadb.query(lab, "primary", f"SHOW COLUMNS FROM {DB}.t")]


def test_backup_sets_append_verify_and_a_damaged_file_is_caught(
    lab: LabConfig, engine_db: pyodbc.Connection
) -> None:
    path = str(mssql_lab.backups_dir(lab) / "engine-sets.bak")
    with connect(lab) as conn:
        drain(conn.execute(f"BACKUP DATABASE {DB} TO DISK = N'{path}' WITH INIT, CHECKSUM, NAME = N'first'"))
        engine_db.execute("INSERT INTO dbo.t VALUES (5, N'later')")
        cur = conn.execute(f"BACKUP DATABASE {DB} TO DISK = N'{path}' WITH NOINIT, NAME = N'second'")
        drain(cur)
        heads = conn.execute(f"RESTORE HEADERONLY FROM DISK = N'{path}'").fetchall()
        assert [(h.BackupName, h.Position, h.DatabaseName, h.HasBackupChecksums) for h in heads] == [
            ("first", 1, DB, True),
            ("second", 2, DB, False),
        ]
        cur = conn.execute(f"RESTORE VERIFYONLY FROM DISK = N'{path}' WITH FILE = 1, CHECKSUM")
        assert any("(3262)" in m[0] for m in cur.messages), cur.messages
        drain(cur)
        # WITH CHECKSUM on a set written without one: 3187 (the pair's first).
        with pytest.raises(pyodbc.Error, match=r"\(3187\)"):
            drain(conn.execute(f"RESTORE VERIFYONLY FROM DISK = N'{path}' WITH FILE = 2, CHECKSUM"))
        # Restoring set 1 to a new name without MOVE collides with the original's files.
        with pytest.raises(pyodbc.Error, match=r"cannot be overwritten.*\(1834\)"):
            drain(conn.execute(f"RESTORE DATABASE {DB}_copy FROM DISK = N'{path}' WITH FILE = 1"))
        # One flipped byte in the first set's content: the checksum it carries catches it.
        data = bytearray(Path(path).read_bytes())
        data[data.index(b"\n") + 40] ^= 0xFF
        Path(path).write_bytes(bytes(data))
        with pytest.raises(pyodbc.Error, match=r"Damage to the backup set was detected\. \(3189\)"):
            drain(conn.execute(f"RESTORE VERIFYONLY FROM DISK = N'{path}' WITH CHECKSUM"))
        Path(path).write_bytes(b"not a backup")
        with pytest.raises(pyodbc.Error, match=r"incorrectly formed.*\(3241\)"):
            drain(conn.execute(f"RESTORE VERIFYONLY FROM DISK = N'{path}'"))
    os.unlink(path)


def test_kill_ends_another_session_and_refuses_its_own_and_unknown_ones(
    lab: LabConfig, engine_db: pyodbc.Connection
) -> None:
    victim = connect(lab, DB)
    spid = victim.execute("SELECT @@SPID").fetchone()[0]
    outcome: list[BaseException] = []

    def wait() -> None:
        try:
            drain(victim.execute("WAITFOR DELAY '00:00:20'"))
        except BaseException as e:  # the connection is gone
            outcome.append(e)

    t = threading.Thread(target=wait)
    t.start()
    try:
        with connect(lab) as killer:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                running = killer.execute(
                    f"SELECT command FROM sys.dm_exec_requests WHERE session_id = {spid}"
                ).fetchall()
                if running:
                    break
                time.sleep(0.05)
            assert running and running[0][0] == "WAITFOR"
            killer.execute(f"KILL {spid}")
            own = killer.execute("SELECT @@SPID").fetchone()[0]
            with pytest.raises(pyodbc.Error, match=r"\(6104\)"):
                killer.execute(f"KILL {own}")
            with pytest.raises(pyodbc.Error, match=r"Process ID 999 is not an active process ID\. \(6106\)"):
                killer.execute("KILL 999")
        t.join(10)
        assert outcome and isinstance(outcome[0], pyodbc.Error)
    finally:
        t.join(1)
        victim.close()


def test_t_sql_outside_the_subset_is_refused_with_sql_servers_messages(engine_db: pyodbc.Connection) -> None:
    conn = engine_db
    for sql, expected in (
        ("DECLARE @x INT = 1", r"Keyword or statement option 'DECLARE' is not supported .*\(40517\)"),
        (
            "MERGE dbo.t AS target USING dbo.t AS source ON 1 = 1 WHEN MATCHED THEN DELETE;",
            r"'MERGE'.*\(40517\)",
        ),
        ("SELEC 1", r"Incorrect syntax near 'SELEC'\. \(102\)"),
        (
            "EXEC dbo.sp_upgrade_everything",
            r"Could not find stored procedure 'dbo.sp_upgrade_everything'\. \(2812\)",
        ),
        ("SET FMTONLY_PLUS ON", r"'FMTONLY_PLUS' is not a recognized SET option\. \(195\)"),
        ("SELECT * FROM dbo.nothing_here", r"Invalid object name 'nothing_here'\. \(208\)"),
        ("ALTER TABLE dbo.t ADD name INT", r"Column names in each table must be unique.*\(2705\)"),
    ):
        with pytest.raises(pyodbc.Error, match=expected):
            drain(conn.execute(sql))
    assert ids(conn) == []
