"""SQL Server: backup, verification, restore (into a copy, over the live database, keeping
tables), dropping a copy, table checksums, size and room, schema_version.

Everything runs from `master` (a RESTORE refuses a database its own session uses, 3102) with
autocommit on (BACKUP / RESTORE refuse a transaction, 3021), and every batch is read to its
end (connect.run_batch). Success is SQL Server's word for it: 3014 for BACKUP and RESTORE
DATABASE, 3262 for VERIFYONLY (Microsoft Learn, "BACKUP (Transact-SQL)", "RESTORE
VERIFYONLY"). The backup file is written by the SQL Server, on its host, in
`databases[].backup_dir` (a folder of that host).

The results are the MariaDB adapter's dataclasses (activities/mysql/dump.py): DbBackup.path
is the .bak on the server's host and DbBackup.sha256 holds "backupset:<BackupSetGUID>"
(RESTORE HEADERONLY), as the worker cannot read a file on another host to hash it.
"""

from __future__ import annotations

import asyncio
import hashlib
import ntpath
import posixpath
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import aioodbc

from activities.common import check_id, fail, heartbeat
from activities.mssql.connect import (
    BatchOutcome,
    SqlServerError,
    check_name,
    connection,
    ident,
    nstring,
    raise_db,
    require_primary,
    run_batch,
)
from activities.mysql.dump import (
    BackupSpace,
    DbBackup,
    DbRestoreResult,
    DropDatabaseResult,
    space_verdict,
)
from errors import BACKUP_CORRUPT, DATABASE_ERROR, INVALID_REQUEST
from inventory.model import Database

T = TypeVar("T")
HEARTBEAT_S = 5.0
BACKUP_DONE, RESTORE_DONE, SET_VALID = 3014, 3014, 3262
KEEP_DB_PREFIX = "zerodown_keep_"
_SYSTEM = frozenset({"master", "tempdb", "model", "msdb"})


async def beating(what: str, work: Awaitable[T]) -> T:
    """Await `work` (a blocking driver call in a thread) while heartbeating every few seconds."""
    task = asyncio.ensure_future(work)
    started = time.monotonic()
    while True:
        done, _ = await asyncio.wait({task}, timeout=HEARTBEAT_S)
        if done:
            return task.result()
        heartbeat({"step": what, "elapsed_s": round(time.monotonic() - started)})


async def batch(conn: aioodbc.Connection, db: Database, what: str, sql: str) -> BatchOutcome:
    try:
        return await beating(what, run_batch(conn, sql))
    except SqlServerError as e:
        raise_db(db, what, e)
    raise AssertionError("unreachable")


def _require(outcome: BatchOutcome, number: int, db: Database, what: str) -> None:
    """SQL Server said it worked (message `number`), or the step failed: a BACKUP / RESTORE
    whose success message is missing did not complete, whatever the driver returned."""
    if number not in outcome.numbers():
        said = "; ".join(f"{m.text} ({m.number})" for m in outcome.messages) or "no message"
        fail(
            DATABASE_ERROR,
            f"database {db.name}: {what}: SQL Server did not report success ({number}): {said}",
        )


def _join(directory: str, name: str) -> str:
    """A path on the SQL Server's host (Windows or Linux, by the folder's form)."""
    windows = "\\" in directory or (len(directory) > 1 and directory[1] == ":")
    return str(ntpath.join(directory, name) if windows else posixpath.join(directory, name))


# --------------------------------------------------------------------------- reads


async def schema_version(db: Database, database: str | None = None) -> int:
    """MAX(version) of dbo.schema_version; 0 when the table does not exist yet."""
    sql = (
        "IF OBJECT_ID(N'dbo.schema_version') IS NULL SELECT 0 AS v "
        "ELSE SELECT ISNULL(MAX(version), 0) AS v FROM dbo.schema_version"
    )
    async with connection(db, database) as conn:
        rows = (await batch(conn, db, "reading schema_version", sql)).first_rows()
    return int(rows[0][0]) if rows else 0


async def base_tables(conn: aioodbc.Connection, db: Database) -> list[str]:
    out = await batch(conn, db, "listing tables", "SELECT name FROM sys.tables ORDER BY name")
    return [str(r[0]) for r in out.first_rows()]


async def table_checksums(db: Database, database: str | None = None) -> dict[str, str]:
    """Per table "rows:CHECKSUM_AGG(BINARY_CHECKSUM(*))" (Learn: order-independent; like any
    checksum it can miss a change, so a mismatch proves a difference, equality is evidence)."""
    async with connection(db, database) as conn:
        tables = await base_tables(conn, db)
        if not tables:
            return {}
        sql = "\n".join(
            f"SELECT COUNT_BIG(*), CHECKSUM_AGG(BINARY_CHECKSUM(*)) FROM {ident(t)};" for t in tables
        )
        out = await batch(conn, db, "table checksums", sql)
    return {t: f"{rs[0][0]}:{rs[0][1]}" for t, rs in zip(tables, out.result_sets, strict=True)}


async def db_size_bytes(db: Database) -> int:
    async with connection(db) as conn:
        rows = (
            await batch(
                conn,
                db,
                "database size",
                "SELECT SUM(CAST(size AS BIGINT)) * 8192 FROM sys.database_files WHERE type = 0",
            )
        ).first_rows()
    return int(rows[0][0] or 0) if rows else 0


async def backup_space(db: Database, directory: str) -> BackupSpace:
    """Room for two backups on the server's volume (sys.dm_os_volume_stats of the data
    file: the backup folder is on the server's host, which the worker cannot measure)."""
    directory = directory or db.backup_dir or ""
    if not directory:
        fail(INVALID_REQUEST, f"database {db.name}: no backup directory (inventory backup_dir)")
    size = await db_size_bytes(db)
    async with connection(db) as conn:
        rows = (
            await batch(
                conn,
                db,
                "free space",
                "SELECT available_bytes, volume_mount_point FROM sys.dm_os_volume_stats(DB_ID(), 1)",
            )
        ).first_rows()
    free = int(rows[0][0]) if rows else 0
    measured = f"{db.host}:{rows[0][1] if rows else '?'}"
    return space_verdict(db, size, free, measured, "of data, backups", f"on the server's volume {measured}")


# --------------------------------------------------------------------------- backup


async def backup(db: Database, backup_id: str, directory: str | None) -> DbBackup:
    """BACKUP DATABASE ... WITH COPY_ONLY, CHECKSUM, INIT (a full copy outside the backup
    chain), checked by RESTORE VERIFYONLY WITH CHECKSUM. Table checksums read just before and
    just after are recorded when they agree (no write in between: they describe the backup);
    otherwise none are, and a restore of it is verified by VERIFYONLY alone. A retry backs up
    again (INIT overwrites the file): the result is a backup of the database as it is then."""
    check_id("backup id", backup_id)
    directory = directory or db.backup_dir
    if not directory:
        fail(INVALID_REQUEST, f"database {db.name}: no backup directory (request or inventory backup_dir)")
    await require_primary(db)
    path = _join(directory, f"{backup_id}.bak")
    before = await table_checksums(db)
    started = time.time()
    async with connection(db, "master") as conn:
        out = await batch(
            conn,
            db,
            f"BACKUP DATABASE to {path}",
            f"BACKUP DATABASE {ident(db.database)} TO DISK = {nstring(path)} "
            f"WITH COPY_ONLY, CHECKSUM, INIT, NAME = {nstring(backup_id)}, STATS = 10",
        )
        _require(out, BACKUP_DONE, db, f"BACKUP DATABASE to {path}")
        verify = await batch(
            conn,
            db,
            f"RESTORE VERIFYONLY of {path}",
            f"RESTORE VERIFYONLY FROM DISK = {nstring(path)} WITH CHECKSUM",
        )
        _require(verify, SET_VALID, db, f"RESTORE VERIFYONLY of {path}")
        header = await _header(conn, db, path)
    after = await table_checksums(db)
    return DbBackup(
        db=db,
        backup_id=backup_id,
        path=path,
        sha256=f"backupset:{header['BackupSetGUID']}",
        size=int(header.get("BackupSize") or 0),
        table_checksums=after if after == before else {},
        created_at=started,
    )


async def _header(conn: aioodbc.Connection, db: Database, path: str) -> dict[str, Any]:
    out = await batch(
        conn, db, f"RESTORE HEADERONLY of {path}", f"RESTORE HEADERONLY FROM DISK = {nstring(path)}"
    )
    rows = out.first_dicts()
    if not rows:
        fail(BACKUP_CORRUPT, f"database {db.name}: {path} holds no backup set")
    return dict(rows[-1])


async def _verify_set(conn: aioodbc.Connection, bk: DbBackup) -> dict[str, Any]:
    """BackupCorrupt unless the file still holds the set this backup wrote, intact; its
    RESTORE HEADERONLY row."""
    db = bk.db
    try:
        out = await beating(
            "verify", run_batch(conn, f"RESTORE VERIFYONLY FROM DISK = {nstring(bk.path)} WITH CHECKSUM")
        )
        header = await _header(conn, db, bk.path)
    except SqlServerError as e:
        fail(BACKUP_CORRUPT, f"database {db.name}: backup {bk.path} does not verify: {e.text}", cause=e)
    if SET_VALID not in out.numbers():
        fail(BACKUP_CORRUPT, f"database {db.name}: backup {bk.path}: RESTORE VERIFYONLY did not report 3262")
    if bk.sha256.startswith("backupset:") and f"backupset:{header['BackupSetGUID']}" != bk.sha256:
        fail(BACKUP_CORRUPT, f"database {db.name}: {bk.path} now holds another backup set than this run's")
    return header


# --------------------------------------------------------------------------- restore


async def _files_moved(conn: aioodbc.Connection, db: Database, path: str, target: str) -> list[str]:
    """MOVE clauses putting each of the backup's files beside the original, named after the
    copy (restoring to a new name without MOVE collides with the original's files: 1834)."""
    out = await batch(
        conn, db, f"RESTORE FILELISTONLY of {path}", f"RESTORE FILELISTONLY FROM DISK = {nstring(path)}"
    )
    moves = []
    for row in out.first_rows():
        logical, physical, kind = str(row[0]), str(row[1]), str(row[2]).strip()
        folder = (ntpath if "\\" in physical else posixpath).dirname(physical)
        ext = ".ldf" if kind == "L" else ".mdf" if int(row[6]) == 1 else ".ndf"
        moves.append(f"MOVE {nstring(logical)} TO {nstring(_join(folder, f'{target}_{logical}{ext}'))}")
    return moves


async def _exists(conn: aioodbc.Connection, db: Database, name: str) -> bool:
    out = await batch(
        conn, db, "sys.databases", f"SELECT COUNT(*) FROM sys.databases WHERE name = {nstring(name)}"
    )
    return bool(out.first_rows() and out.first_rows()[0][0])


async def _drop(conn: aioodbc.Connection, db: Database, name: str) -> bool:
    if not await _exists(conn, db, name):
        return False
    # Its users are put out first (a staging site's app may hold connections): 3702 otherwise.
    await batch(
        conn, db, f"drop {name}", f"ALTER DATABASE {ident(name)} SET SINGLE_USER WITH ROLLBACK IMMEDIATE"
    )
    await batch(conn, db, f"drop {name}", f"DROP DATABASE {ident(name)}")
    return True


async def restore(bk: DbBackup) -> DbRestoreResult:
    """Restore `bk` into `bk.db.database`: over the live database it came from (its users
    put out: SINGLE_USER WITH ROLLBACK IMMEDIATE, then REPLACE, then MULTI_USER again), or
    into a copy (scratch, staging), whose files are MOVEd beside the original's. Verified
    against the backup's table checksums when it has them."""
    db = bk.db
    target = db.database
    check_name(db, "database", target)
    if target.lower() in _SYSTEM:
        fail(INVALID_REQUEST, f"database {db.name}: will not restore over system database {target}")
    await require_primary(db)
    created = False
    async with connection(db, "master") as conn:
        header = await _verify_set(conn, bk)
        over_source = str(header.get("DatabaseName", "")).lower() == target.lower()
        what = f"RESTORE DATABASE {target} from {bk.path}"
        if over_source:
            await batch(
                conn, db, what, f"ALTER DATABASE {ident(target)} SET SINGLE_USER WITH ROLLBACK IMMEDIATE"
            )
            try:
                out = await batch(
                    conn,
                    db,
                    what,
                    f"RESTORE DATABASE {ident(target)} FROM DISK = {nstring(bk.path)} "
                    "WITH REPLACE, CHECKSUM, RECOVERY",
                )
            finally:
                await batch(conn, db, what, f"ALTER DATABASE {ident(target)} SET MULTI_USER")
        else:
            created = not await _drop(conn, db, target)
            moves = await _files_moved(conn, db, bk.path, target)
            out = await batch(
                conn,
                db,
                what,
                f"RESTORE DATABASE {ident(target)} FROM DISK = {nstring(bk.path)} WITH {', '.join(moves)}, "
                "REPLACE, CHECKSUM, RECOVERY",
            )
        _require(out, RESTORE_DONE, db, what)
    checksums = await table_checksums(db, target)
    mismatched = tuple(
        sorted(
            t
            for t in set(checksums) | set(bk.table_checksums)
            if bk.table_checksums and checksums.get(t) != bk.table_checksums.get(t)
        )
    )
    return DbRestoreResult(
        path=bk.path,
        tables=len(checksums),
        dropped=(),
        checksums=checksums,
        mismatched=mismatched,
        created_database=created,
    )


async def restore_keeping(bk: DbBackup, keep_tables: tuple[str, ...]) -> DbRestoreResult:
    """restore(), but the current rows of `keep_tables` survive (the audit trail of the run
    being rolled back). They are copied into a side database on the server first (its
    marker table says the copy is complete, so a retry does not copy the restored rows over
    it), put back after the restore, and the side database dropped. Idempotent."""
    db = bk.db
    for t in keep_tables:
        check_name(db, "table", t)
    # Named after the backup (a retry finds it), short: backup ids run long, names are capped.
    keep_db = KEEP_DB_PREFIX + hashlib.sha256(bk.backup_id.encode()).hexdigest()[:16]
    check_name(db, "database", keep_db)
    kept: list[str] = []
    async with connection(db, "master") as conn:
        if not await _exists(conn, db, keep_db) or not await _saved(conn, db, keep_db):
            await _drop(conn, db, keep_db)
            await batch(conn, db, "saving the kept tables", f"CREATE DATABASE {ident(keep_db)}")
            for t in keep_tables:
                exists = await batch(
                    conn,
                    db,
                    "saving the kept tables",
                    f"SELECT OBJECT_ID({nstring(f'{db.database}.dbo.{t}')})",
                )
                if exists.first_rows() and exists.first_rows()[0][0] is not None:
                    await batch(
                        conn,
                        db,
                        f"saving {t}",
                        f"SELECT * INTO {ident(keep_db)}.dbo.{ident(t)} "
                        f"FROM {ident(db.database)}.dbo.{ident(t)}",
                    )
            await batch(
                conn,
                db,
                "saving the kept tables",
                f"CREATE TABLE {ident(keep_db)}.dbo.zerodown_keep_complete (done INT)",
            )
    result = await restore(bk)
    async with connection(db, "master") as conn:
        saved = await batch(
            conn,
            db,
            "kept tables",
            f"SELECT name FROM {ident(keep_db)}.sys.tables WHERE name <> N'zerodown_keep_complete'",
        )
        for (t,) in saved.first_rows():
            t = str(t)
            cols = await _columns(conn, db, keep_db, t)
            live_cols = set(await _columns(conn, db, db.database, t))
            shared = [c for c in cols if c in live_cols]
            names = ", ".join(ident(c) for c in shared)
            identity = await _has_identity(conn, db, t)
            body = (
                f"SET XACT_ABORT ON; BEGIN TRANSACTION; DELETE FROM {ident(db.database)}.dbo.{ident(t)}; "
                + (f"SET IDENTITY_INSERT {ident(db.database)}.dbo.{ident(t)} ON; " if identity else "")
                + f"INSERT INTO {ident(db.database)}.dbo.{ident(t)} ({names}) "
                f"SELECT {names} FROM {ident(keep_db)}.dbo.{ident(t)}; "
                + (f"SET IDENTITY_INSERT {ident(db.database)}.dbo.{ident(t)} OFF; " if identity else "")
                + "COMMIT TRANSACTION;"
            )
            await batch(conn, db, f"putting back {t}", body)
            kept.append(t)
        await _drop(conn, db, keep_db)
    checksums = await table_checksums(db)
    mismatched = tuple(
        sorted(
            t
            for t in set(checksums) | set(bk.table_checksums)
            if t not in kept and bk.table_checksums and checksums.get(t) != bk.table_checksums.get(t)
        )
    )
    return DbRestoreResult(
        path=result.path,
        tables=len(checksums),
        dropped=(),
        checksums=checksums,
        mismatched=mismatched,
        kept=tuple(kept),
    )


async def _saved(conn: aioodbc.Connection, db: Database, keep_db: str) -> bool:
    out = await batch(
        conn,
        db,
        "kept tables",
        f"SELECT COUNT(*) FROM {ident(keep_db)}.sys.tables WHERE name = N'zerodown_keep_complete'",
    )
    return bool(out.first_rows() and out.first_rows()[0][0])


async def _columns(conn: aioodbc.Connection, db: Database, database: str, table: str) -> list[str]:
    out = await batch(
        conn,
        db,
        f"columns of {table}",
        f"SELECT COLUMN_NAME FROM {ident(database)}.INFORMATION_SCHEMA.COLUMNS "
        f"WHERE TABLE_NAME = {nstring(table)} "
        "ORDER BY ORDINAL_POSITION",
    )
    return [str(r[0]) for r in out.first_rows()]


async def _has_identity(conn: aioodbc.Connection, db: Database, table: str) -> bool:
    out = await batch(
        conn,
        db,
        f"identity of {table}",
        f"SELECT COUNT(*) FROM {ident(db.database)}.sys.columns "
        f"WHERE object_id = OBJECT_ID({nstring(f'{db.database}.dbo.{table}')}) "
        "AND is_identity = 1",
    )
    return bool(out.first_rows() and out.first_rows()[0][0])


async def drop_database(db: Database, database: str) -> DropDatabaseResult:
    """Drop a copy (test / staging) on the same server; idempotent. Never the inventory's
    own database or a system one."""
    check_name(db, "database", database)
    if database.lower() == db.database.lower() or database.lower() in _SYSTEM:
        fail(
            INVALID_REQUEST,
            f"database {db.name}: refusing to drop {database} (the production or a system database)",
        )
    async with connection(db, "master") as conn:
        dropped = await _drop(conn, db, database)
    return DropDatabaseResult(database=database, dropped=dropped)


async def changed_since(bk: DbBackup) -> tuple[str, ...]:
    now = await table_checksums(bk.db)
    then = bk.table_checksums
    return tuple(sorted(t for t in set(now) | set(then) if now.get(t) != then.get(t)))
