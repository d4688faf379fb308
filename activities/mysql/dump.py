"""MariaDB / MySQL logical backup and restore, and the copies and space around them.

Logical backups use the `mariadb-dump` / `mariadb` client binaries on the worker; the
password reaches them through a temporary --defaults-extra-file (mode 600, in a private
mode-700 temporary folder, both deleted afterwards), never through the command line where
`ps` would show it. Dumps hold every row of the database (password hashes, secrets): the
backup folder is made mode 700 and each dump file is created mode 600.

Also here: a restore keeping the current rows of some tables, dropping a copy of the
database, and the worker-side backup-space preflight.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiomysql
import pymysql
from temporalio import activity

from activities.common import check_id, fail, heartbeat, sha256_file, tail, with_heartbeat
from activities.mysql.connect import (
    MIGRATION_LOG_TABLE,
    _checksums_on,
    _endpoint,
    _qi,
    _raise_db,
    base_tables,
    connection,
    query,
    table_checksums,
)
from activities.secrets import resolve_secret
from errors import BACKUP_CORRUPT, DATABASE_ERROR, INVALID_REQUEST
from inventory.model import Database

# --------------------------------------------------------------------------- dump / load


@contextlib.contextmanager
def _option_file(db: Database) -> Iterator[str]:
    """A client option file with the password, for the duration of the block.

    It lives in a fresh mode-700 temporary folder (mkdtemp) and is created mode 600, so no
    other user can open it or even see its name; folder and file are removed afterwards,
    whatever happens in the block.
    """
    password = resolve_secret(db.password, needed_by=f"database {db.name}")
    escaped = password.replace("\\", "\\\\").replace('"', '\\"')
    folder = tempfile.mkdtemp(prefix="zerodown-my-")  # mode 0700
    try:
        path = os.path.join(folder, "client.cnf")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f'[client]\npassword="{escaped}"\n')
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _open_private(path: str) -> int:
    """Open `path` for writing (created or truncated) with mode 600, also when it existed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
    except BaseException:
        os.close(fd)
        raise
    return fd


def _private_dir(db: Database, directory: str) -> None:
    """Create the backup folder mode 700, or tighten an existing one that is more open."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        mode = stat.S_IMODE(os.stat(directory).st_mode)
        if mode & 0o077:
            os.chmod(directory, 0o700)
    except OSError as e:
        fail(
            INVALID_REQUEST,
            f"database {db.name}: backup directory {directory} cannot be created "
            f"or made private (mode 700): {e.strerror or e}",
        )


async def _run_client(
    db: Database,
    argv_tail: list[str],
    stdin_path: str | None,
    stdout_path: str | None,
    what: str,
    binary: str,
) -> None:
    """Run mariadb / mariadb-dump against the primary, heartbeating; fail with its stderr.

    `stdout_path` (a dump) is created mode 600 before anything is written into it.
    """
    proc: asyncio.subprocess.Process | None = None
    with _option_file(db) as opt:
        try:
            argv = [
                binary,
                f"--defaults-extra-file={opt}",
                "--protocol=TCP",
                f"--host={db.host}",
                f"--port={db.port}",
                f"--user={db.user}",
                *argv_tail,
            ]
            with contextlib.ExitStack() as stack:
                devnull = asyncio.subprocess.DEVNULL
                stdin = stack.enter_context(open(stdin_path, "rb")) if stdin_path else devnull
                stdout = (
                    stack.enter_context(os.fdopen(_open_private(stdout_path), "wb"))
                    if stdout_path
                    else devnull
                )
                try:
                    proc = await asyncio.create_subprocess_exec(
                        *argv, stdin=stdin, stdout=stdout, stderr=asyncio.subprocess.PIPE
                    )
                except OSError as e:
                    fail(DATABASE_ERROR, f"database {db.name}: cannot run {binary}: {e.strerror or e}")
                _, err = await with_heartbeat(proc.communicate(), lambda: {"database": db.name, "step": what})
            if proc.returncode != 0:
                text = err.decode("utf-8", errors="replace")
                retryable = bool(
                    re.search(r"Can't connect|Lost connection|gone away|Too many connections", text)
                )
                fail(
                    DATABASE_ERROR,
                    f"database {db.name} ({db.user}@{db.host}:{db.port}/{db.database}): "
                    f"{what} ({binary}) exited with status {proc.returncode}: {tail(text)}",
                    retryable=retryable,
                )
        finally:
            if proc is not None and proc.returncode is None:
                # cancelled / timed out: do not leave a half-done dump or load running
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(Exception):
                    await proc.wait()


@dataclass(frozen=True)
class DbBackup:
    db: Database
    backup_id: str
    path: str
    sha256: str
    size: int
    table_checksums: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    reused: bool = False


def _backup_paths(directory: str, backup_id: str) -> tuple[str, str, str]:
    base = os.path.join(directory, f"{backup_id}.sql")
    return base, base + ".sha256", os.path.join(directory, f"{backup_id}.json")


def _load_existing(db: Database, directory: str, backup_id: str) -> DbBackup | None:
    path, sidecar, meta_path = _backup_paths(directory, backup_id)
    try:
        recorded = open(sidecar, encoding="utf-8").read().split()[0]
        meta = json.loads(open(meta_path, encoding="utf-8").read())
    except (OSError, IndexError, ValueError):
        return None
    if not os.path.exists(path) or sha256_file(path) != recorded:
        return None
    # A dump written before dumps were created private: tighten it now.
    with contextlib.suppress(OSError):
        if stat.S_IMODE(os.stat(path).st_mode) & 0o077:
            os.chmod(path, 0o600)
    return DbBackup(
        db=db,
        backup_id=backup_id,
        path=path,
        sha256=recorded,
        size=os.path.getsize(path),
        table_checksums=dict(meta.get("table_checksums", {})),
        created_at=float(meta.get("created_at", 0.0)),
        reused=True,
    )


async def backup(db: Database, backup_id: str, directory: str | None) -> DbBackup:
    """Logical backup of the database into <directory>/<backup_id>.sql (+ .sha256, .json).

    The recorded table checksums must describe exactly what the dump holds, or a restore
    could never be proven. So writes are held (LOCK TABLES ... READ; readers are never
    blocked) only while a checksum snapshot is opened and until the dump
    (--single-transaction) has opened its own - seen as its first data SELECT in the
    process list - never for the whole dump: on a big database that would stall writes
    for minutes. Idempotent: a complete backup with this id (sha256 matching its sidecar) is
    reused.
    """
    if db.kind == "mssql":  # SQL Server: activities/mssql (imported here: it builds on this module)
        from activities.mssql import backup as _mssql

        return await _mssql.backup(db, backup_id, directory)
    check_id("backup id", backup_id)
    directory = directory or db.backup_dir
    if not directory:
        fail(INVALID_REQUEST, f"database {db.name}: no backup directory (request or inventory backup_dir)")
    await asyncio.to_thread(_private_dir, db, directory)
    existing = await asyncio.to_thread(_load_existing, db, directory, backup_id)
    if existing is not None:
        return existing
    path = _backup_paths(directory, backup_id)[0]
    tmp = path + ".tmp"
    tables = await base_tables(db)
    # One database named without --databases: the dump holds no CREATE DATABASE / USE, so it
    # loads into whichever database the restore names (a test or staging copy too).
    dump_args = [
        "--single-transaction",
        "--routines",
        "--triggers",
        "--events",
        "--hex-blob",
        "--no-tablespaces",
        "--skip-dump-date",
        db.database,
    ]
    checksums = await _consistent_dump(db, tables, dump_args, tmp, "backup")
    digest, size, created = await asyncio.to_thread(_finish_backup, tmp, backup_id, db, checksums)
    return DbBackup(
        db=db,
        backup_id=backup_id,
        path=path,
        sha256=digest,
        size=size,
        table_checksums=checksums,
        created_at=created,
    )


async def _consistent_dump(
    db: Database, tables: list[str], dump_args: list[str], tmp: str, what: str
) -> dict[str, str]:
    """Run mariadb-dump (`dump_args`, --single-transaction) into `tmp` and return the
    CHECKSUM TABLE of `tables` exactly as the dump holds them (see backup())."""
    host, port = _endpoint(db, False)
    # Session `lk` holds the write lock, session `snap` opens a snapshot under it and takes
    # the checksums after the lock is gone (CHECKSUM TABLE reads InnoDB through the
    # snapshot), so writes only wait for the dump to open its own snapshot.
    async with (
        connection(db) as lk_conn,
        connection(db) as snap_conn,
        lk_conn.cursor() as lk,
        snap_conn.cursor() as snap,
    ):
        try:
            await lk.execute("SELECT ID FROM information_schema.PROCESSLIST")
            existing_ids = {int(r[0]) for r in await lk.fetchall()}
            # Do not queue behind a long transaction forever (app writes queue behind us).
            await lk.execute("SET SESSION lock_wait_timeout = %s", (db.lock_wait_timeout_s,))
            asked = asyncio.get_running_loop().time()
            if tables:
                await lk.execute("LOCK TABLES " + ", ".join(f"{_qi(t)} READ" for t in tables))
            await snap.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            await snap.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT")
        except (pymysql.MySQLError, OSError) as e:
            _raise_db(db, host, port, "locking tables for a consistent backup", e)
        dump = asyncio.ensure_future(_run_client(db, dump_args, None, tmp, what, "mariadb-dump"))
        try:
            # Writes wait from the moment the lock was asked for: waiting and holding together
            # stay within the inventory's lock_wait_timeout_s (at least a second to hold).
            waited = asyncio.get_running_loop().time() - asked
            await _wait_dump_snapshot(lk, dump, existing_ids, what, max(1.0, db.lock_wait_timeout_s - waited))
        except BaseException:
            dump.cancel()  # cancelled activity: the dump process is killed, not orphaned
            raise
        finally:
            with contextlib.suppress(pymysql.MySQLError, OSError):
                await lk.execute("UNLOCK TABLES")
        try:
            checksums = await with_heartbeat(
                _checksums_on(snap, tables), lambda: {"step": what, "doing": "checksums"}
            )
            await snap.execute("COMMIT")
        except (pymysql.MySQLError, OSError) as e:
            dump.cancel()
            _raise_db(db, host, port, "CHECKSUM TABLE in the backup snapshot", e)
        except BaseException:
            dump.cancel()
            raise
        await dump  # (cancelling the activity here cancels the dump task too)
    return checksums


async def _wait_dump_snapshot(
    cur: aiomysql.Cursor,
    dump: asyncio.Future[None],
    existing_ids: set[int],
    what: str = "backup",
    budget_s: float = 10.0,
) -> None:
    """Return once mariadb-dump reads table data (its consistent snapshot exists) or ended.

    A new connection running `SELECT /*!40001 SQL_NO_CACHE */` is the dump: it opens its
    snapshot (START TRANSACTION WITH CONSISTENT SNAPSHOT) before its first data SELECT.
    Small tables are read too fast to be seen; then the lock simply lasts until the dump
    ends, which for such a database is short anyway. Writes wait while the lock is held, so
    it is held at most `budget_s` (the inventory's lock_wait_timeout_s): then released, and
    the backup fails to be tried again.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget_s
    while not dump.done():
        try:
            await cur.execute(
                "SELECT ID FROM information_schema.PROCESSLIST "
                "WHERE ID <> CONNECTION_ID() AND INFO LIKE '%40001 SQL_NO_CACHE%'"
            )
            if any(int(r[0]) not in existing_ids for r in await cur.fetchall()):
                return
        except (pymysql.MySQLError, OSError):
            pass  # keep the lock until the dump ends or the budget is spent
        if loop.time() > deadline:
            # Writes wait while the lock is held: never longer than the lock wait allows.
            fail(
                DATABASE_ERROR,
                f"{what}: the dump did not open its snapshot within {budget_s:g} s of taking the "
                "write lock (lock_wait_timeout_s in the inventory); lock released, writes go on",
                retryable=True,
            )
        heartbeat({"step": what, "waiting_for": "dump snapshot"})
        await asyncio.wait({dump}, timeout=0.02)


def _finish_backup(
    tmp: str, backup_id: str, db: Database, checksums: dict[str, str]
) -> tuple[str, int, float]:
    """Move the dump in place, write the metadata, then the sidecar that marks completion."""
    path, sidecar, meta_path = _backup_paths(os.path.dirname(tmp), backup_id)
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    size, created = os.path.getsize(path), time.time()
    with os.fdopen(_open_private(meta_path + ".tmp"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "backup_id": backup_id,
                "database": db.database,
                "host": db.host,
                "port": db.port,
                "sha256": digest,
                "size": size,
                "table_checksums": checksums,
                "created_at": created,
            },
            f,
            indent=2,
            sort_keys=True,
        )
    os.replace(meta_path + ".tmp", meta_path)
    # The sidecar is written last: its presence marks the backup complete.
    with os.fdopen(_open_private(sidecar + ".tmp"), "w", encoding="utf-8") as f:
        f.write(f"{digest}  {os.path.basename(path)}\n")
    os.replace(sidecar + ".tmp", sidecar)
    return digest, size, created


@dataclass(frozen=True)
class DbRestoreResult:
    path: str
    tables: int
    dropped: tuple[str, ...]  # tables/views that did not exist at backup time
    checksums: dict[str, str]
    # Tables whose checksum differs from the backup's (empty: data proven restored); for a
    # kept table, from its checksum when it was saved.
    mismatched: tuple[str, ...]
    # db_restore_keeping: the tables whose current rows were kept (saved, then reloaded).
    kept: tuple[str, ...] = ()
    # The target database did not exist and was created (a restore into a copy).
    created_database: bool = False
    # Loaded beside the live tables (the scratch database) and swapped in by one RENAME
    # TABLE: readers never saw a table missing or half loaded.
    swapped: bool = False


# Schemas of the server itself: never a restore target, never dropped.
_SYSTEM_SCHEMAS = frozenset({"mysql", "information_schema", "performance_schema", "sys"})
# Database and table names zerodown accepts for the copies it makes and the tables it keeps
# (they reach SQL quoted, and mariadb-dump's argument list, where a leading '-' would be an
# option).
_NAME_RE = re.compile(r"[A-Za-z0-9_$][A-Za-z0-9_$-]{0,63}")
# A statement of a dump that selects or creates a database: mariadb-dump writes them only
# with --databases / --all-databases, which zerodown never uses.
_SWITCH_RE = re.compile(rb"^\s*(?:/\*!\d*\s*)?(USE|CREATE\s+(?:DATABASE|SCHEMA))\b(.*)$", re.IGNORECASE)
_DUMP_COMMENT_RE = re.compile(rb"/\*.*?\*/")
_DUMP_NAME_RE = re.compile(rb"\s*(?:IF\s+NOT\s+EXISTS\s+)?(`(?:[^`]|``)+`|[^\s;`]+)", re.IGNORECASE)


def _check_database_name(db: Database, what: str, name: str, strict: bool = True) -> None:
    """InvalidRequest for a system schema, and (strict: names zerodown makes or drops) for a
    name outside the plain alphabet."""
    if not isinstance(name, str) or not name or (strict and not _NAME_RE.fullmatch(name)):
        fail(
            INVALID_REQUEST,
            f"database {db.name}: {what} {name!r}: use letters, digits, '_', '$' or '-' "
            "(at most 64, not starting with '-')",
        )
    if name.casefold() in _SYSTEM_SCHEMAS:
        fail(INVALID_REQUEST, f"database {db.name}: {what} {name!r} is a system schema of the server")


def _scan_dump(path: str) -> tuple[str, list[str]]:
    """(sha256 of the file, databases its USE / CREATE DATABASE statements name) in one pass.

    A dump line never starts inside a string value (mariadb-dump escapes newlines), so a
    statement at the start of a line is a statement.
    """
    h = hashlib.sha256()
    names: list[str] = []
    with open(path, "rb") as f:
        for line in f:
            h.update(line)
            m = _SWITCH_RE.match(line)
            if m:
                rest = _DUMP_COMMENT_RE.sub(b" ", m.group(2))
                n = _DUMP_NAME_RE.match(rest)
                raw = n.group(1) if n else b"?"
                if raw.startswith(b"`"):
                    raw = raw[1:-1].replace(b"``", b"`")
                names.append(raw.decode("utf-8", errors="replace"))
    return h.hexdigest(), names


async def _verify_backup_file(bk: DbBackup) -> None:
    """BackupCorrupt unless the file is the one backed up; InvalidRequest when it would
    write into another database than the target (a dump with USE / CREATE DATABASE)."""
    db = bk.db
    _check_database_name(db, "restore target", db.database, strict=False)
    try:
        actual, switches = await asyncio.to_thread(_scan_dump, bk.path)
    except OSError as e:
        fail(BACKUP_CORRUPT, f"database {db.name}: backup file {bk.path} is unreadable: {e.strerror or e}")
    if actual != bk.sha256:
        fail(
            BACKUP_CORRUPT,
            f"database {db.name}: backup {bk.path} has sha256 {actual}, "
            f"expected {bk.sha256}: refusing to restore",
        )
    others = sorted({n for n in switches if n != db.database})
    if others:
        fail(
            INVALID_REQUEST,
            f"database {db.name}: backup {bk.path} selects database(s) {', '.join(others)} "
            f"(USE / CREATE DATABASE): loading it into {db.database} would write there. "
            "Refusing; back it up with db_backup (one database, no --databases)",
        )


async def _ensure_database(bk: DbBackup) -> bool:
    """Create the target database when missing (a restore into a test / staging copy);
    True when created. Its default character set and collation are the backed-up
    database's when that one is on this server (tables a migration creates on the copy
    then get what they would get in production)."""
    db = bk.db
    exists = await query(
        db,
        "SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s",
        (db.database,),
        use_database=False,
    )
    if exists:
        return False
    spec = ""
    meta_path = _backup_paths(os.path.dirname(bk.path), bk.backup_id)[2]
    try:
        with open(meta_path, encoding="utf-8") as f:
            source = json.load(f).get("database")
    except (OSError, ValueError, AttributeError):
        source = None
    if isinstance(source, str) and source:
        rows = await query(
            db,
            "SELECT DEFAULT_CHARACTER_SET_NAME, DEFAULT_COLLATION_NAME FROM "
            "information_schema.SCHEMATA WHERE SCHEMA_NAME = %s",
            (source,),
            use_database=False,
        )
        if rows and all(re.fullmatch(r"[A-Za-z0-9_]+", str(v)) for v in rows[0]):
            spec = f" CHARACTER SET {rows[0][0]} COLLATE {rows[0][1]}"
    await query(db, f"CREATE DATABASE IF NOT EXISTS {_qi(db.database)}{spec}", use_database=False)
    return True


async def _load_backup(bk: DbBackup) -> DbRestoreResult:
    db = bk.db
    rows = await query(
        db, "SELECT TABLE_NAME, TABLE_TYPE FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()"
    )
    extra = sorted(
        (str(n), str(t))
        for n, t in rows
        if str(n) not in bk.table_checksums and str(n) != MIGRATION_LOG_TABLE
    )
    host, port = _endpoint(db, False)
    if extra:
        async with connection(db) as conn, conn.cursor() as cur:
            try:
                await cur.execute("SET FOREIGN_KEY_CHECKS = 0")
                for name, kind in extra:
                    verb = "VIEW" if kind == "VIEW" else "TABLE"
                    await cur.execute(f"DROP {verb} IF EXISTS {_qi(name)}")
            except (pymysql.MySQLError, OSError) as e:
                _raise_db(db, host, port, "dropping tables created after the backup", e)
    await _run_client(db, [db.database], bk.path, None, "restore", "mariadb")
    checksums = await table_checksums(db)
    mismatched = tuple(sorted(t for t, c in bk.table_checksums.items() if checksums.get(t) != c))
    return DbRestoreResult(
        path=bk.path,
        tables=len(checksums),
        dropped=tuple(n for n, _ in extra),
        checksums=checksums,
        mismatched=mismatched,
    )


async def _can_swap(bk: DbBackup) -> bool:
    """A restore into the database a site serves from goes through the scratch database
    when the inventory names one (other than the target) and the target holds no view."""
    db = bk.db
    scratch = db.scratch_database
    if not scratch or scratch == db.database or scratch in _SYSTEM_SCHEMAS:
        return False
    rows = await query(
        db,
        "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s AND TABLE_TYPE = 'VIEW'",
        (db.database,),
        use_database=False,
    )
    return not rows[0][0]


async def _swap_in(bk: DbBackup, keep: list[str]) -> DbRestoreResult:
    """Restore `bk` without the site ever seeing a table missing: the dump is loaded into the
    scratch database and checked there, then one RENAME TABLE (atomic: a query waits for it
    a moment instead of failing) puts each of the backup's tables in place of the live one,
    and moves out the tables made after the backup; `keep` tables are never touched (their
    live rows are the current ones). The old tables leave with the scratch database.
    Re-running it after a crash starts again from an empty scratch database."""
    db = bk.db
    scratch = required_scratch(db)
    host, port = _endpoint(db, False)
    shadow = dataclasses.replace(db, database=scratch)
    await query(db, f"DROP DATABASE IF EXISTS {_qi(scratch)}", use_database=False)
    await query(db, f"CREATE DATABASE {_qi(scratch)}", use_database=False)
    await _run_client(shadow, [scratch], bk.path, None, "restore (loaded beside the live tables)", "mariadb")
    loaded = await table_checksums(shadow)
    wrong = sorted(t for t, c in bk.table_checksums.items() if t not in keep and loaded.get(t) != c)
    if wrong:
        fail(
            BACKUP_CORRUPT,
            f"database {db.name}: backup {bk.backup_id} loaded into {scratch} does not match "
            f"its checksums ({', '.join(wrong)}); nothing was swapped, the live tables are as they were",
        )
    live = {
        str(r[0])
        for r in await query(
            db,
            "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s",
            (db.database,),
            use_database=False,
        )
    }
    restored = sorted(t for t in loaded if t not in keep)
    extra = sorted(t for t in live - set(loaded) if t not in keep and t != MIGRATION_LOG_TABLE)
    renames: list[str] = []
    for i, t in enumerate([*restored, *extra]):
        if t in live:  # the live table leaves for the scratch database, under a free name
            renames.append(f"{_qi(db.database)}.{_qi(t)} TO {_qi(scratch)}.{_qi(f'zd_replaced_{i}')}")
        if t in restored:
            renames.append(f"{_qi(scratch)}.{_qi(t)} TO {_qi(db.database)}.{_qi(t)}")
    # The RENAME waits for every table's lock, and the site's queries queue behind it: a
    # second at a time, then they go through, within the inventory's lock_wait_timeout_s.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + db.lock_wait_timeout_s
    while renames:
        try:
            async with connection(db, use_database=False) as conn, conn.cursor() as cur:
                await cur.execute("SET SESSION lock_wait_timeout = 1")
                await cur.execute("RENAME TABLE " + ", ".join(renames))
            break
        except (pymysql.MySQLError, OSError) as e:
            waited_out = isinstance(e, pymysql.MySQLError) and bool(e.args) and e.args[0] == 1205
            if not waited_out or loop.time() + 0.5 >= deadline:
                _raise_db(db, host, port, "swapping the restored tables in (RENAME TABLE)", e)
        heartbeat({"step": "restore", "waiting_for": "table locks to swap"})
        await asyncio.sleep(0.5)
    await query(db, f"DROP DATABASE IF EXISTS {_qi(scratch)}", use_database=False)
    checksums = await table_checksums(db)
    mismatched = tuple(sorted(t for t in restored if checksums.get(t) != bk.table_checksums.get(t)))
    return DbRestoreResult(
        path=bk.path,
        tables=len(checksums),
        dropped=tuple(extra),
        checksums=checksums,
        mismatched=mismatched,
        kept=tuple(t for t in keep if t in live),
        swapped=True,
    )


def required_scratch(db: Database) -> str:
    if not db.scratch_database:
        fail(INVALID_REQUEST, f"database {db.name}: no scratch_database to restore through")
    return db.scratch_database


async def restore(bk: DbBackup) -> DbRestoreResult:
    """Load a backup into `bk.db.database` on the primary (replicas follow through the binlog).

    The file's sha256 is verified first (BackupCorrupt otherwise). The target may be another
    database than the one backed up - pass the backup with `db.database` replaced, e.g. a
    test copy - since the dump names no database; it is created when missing. Tables and
    views created after the backup (e.g. by a migration) are dropped, then the dump
    recreates every table it holds. Re-running it is harmless. The result compares the
    checksums afterwards with the ones recorded at backup time.
    """
    if bk.db.kind == "mssql":  # SQL Server: activities/mssql (imported here: it builds on this module)
        from activities.mssql import backup as _mssql

        return await _mssql.restore(bk)
    await _verify_backup_file(bk)
    created = await _ensure_database(bk)
    if not created and await _can_swap(bk):
        return await _swap_in(bk, [])
    result = await _load_backup(bk)
    return dataclasses.replace(result, created_database=created)


# --- restore keeping the current rows of some tables

# Files of db_restore_keeping, next to the backup (private like it):
#   <backup_id>.keep.<database>.sql       the kept tables as they were just before the restore
#   <backup_id>.keep.<database>.json      tables, sha256 and checksums of that dump; written
#                                         last, so its presence means "saved, complete"
#   <backup_id>.keep.<database>.restoring written before the restore starts: from then on the
#                                         live tables may hold the backup's rows, so the saved
#                                         dump is the current copy of the kept tables


def _keep_paths(bk: DbBackup) -> tuple[str, str, str]:
    base = os.path.join(os.path.dirname(bk.path), f"{bk.backup_id}.keep.{bk.db.database}")
    return base + ".sql", base + ".json", base + ".restoring"


def _load_saved(sql: str, meta_path: str) -> dict[str, Any] | None:
    """The saved kept tables' metadata when the save completed and its dump is intact."""
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            return None
        if meta.get("present") and sha256_file(sql) != meta.get("sha256"):
            return None
    except (OSError, ValueError):
        return None
    return meta


def _write_meta(path: str, meta: dict[str, Any]) -> None:
    with os.fdopen(_open_private(path + ".tmp"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def _touch_private(path: str) -> None:
    os.close(_open_private(path))


def _remove(*paths: str) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


async def _save_kept(db: Database, keep: list[str], sql: str, meta_path: str) -> dict[str, Any]:
    """Dump the kept tables that exist now (consistently, with their checksums)."""
    present = [t for t in keep if t in set(await base_tables(db))]
    await asyncio.to_thread(_remove, meta_path)  # no longer "saved" while rewriting the dump
    checksums: dict[str, str] = {}
    digest = ""
    if present:
        tmp = sql + ".tmp"
        args = [
            "--single-transaction",
            "--triggers",
            "--hex-blob",
            "--no-tablespaces",
            "--skip-dump-date",
            db.database,
            *present,
        ]
        checksums = await _consistent_dump(db, present, args, tmp, "saving kept tables")
        digest = await asyncio.to_thread(sha256_file, tmp)
        await asyncio.to_thread(os.replace, tmp, sql)
    else:
        await asyncio.to_thread(_remove, sql)
    meta = {
        "database": db.database,
        "tables": keep,
        "present": present,
        "sha256": digest,
        "checksums": checksums,
        "saved_at": time.time(),
    }
    await asyncio.to_thread(_write_meta, meta_path, meta)
    return meta


async def restore_keeping(bk: DbBackup, keep_tables: tuple[str, ...]) -> DbRestoreResult:
    """Restore `bk` but keep the current rows of `keep_tables` (e.g. an audit trail that
    must survive a rollback): save them, restore, reload them (definition and rows).

    Which copy of a kept table is current, on a retry:
    * no complete save, or a save without the `.restoring` marker: the restore has not
      begun, the live tables are current (and may have grown since): they are saved anew;
    * the `.restoring` marker exists: the restore may have replaced the live tables with
      the backup's rows, the saved dump is the current copy: it is reloaded, never re-taken;
    * the marker without a complete save cannot happen unless someone removed the save:
      BackupCorrupt, an operator must decide.
    The marker goes after the reload, then the save; a crash between the reload and the
    marker's removal reloads the save again on retry, losing rows written to a kept table
    in that moment. Rows written to a kept table while the restore runs are lost as well:
    run it with the application stopped or in maintenance mode.
    """
    if bk.db.kind == "mssql":  # SQL Server: activities/mssql (imported here: it builds on this module)
        from activities.mssql import backup as _mssql

        return await _mssql.restore_keeping(bk, keep_tables)
    db = bk.db
    keep = list(dict.fromkeys(keep_tables))
    for t in keep:
        if not isinstance(t, str) or not _NAME_RE.fullmatch(t) or t.startswith("-"):
            fail(
                INVALID_REQUEST,
                f"database {db.name}: table to keep {t!r}: use letters, digits, '_', '$' or '-' (not first)",
            )
    await _verify_backup_file(bk)
    if not keep:
        return await restore(bk)
    sql, meta_path, marker = _keep_paths(bk)
    saved = await asyncio.to_thread(_load_saved, sql, meta_path)
    restoring = await asyncio.to_thread(os.path.exists, marker)
    if restoring:
        if saved is None:
            fail(
                BACKUP_CORRUPT,
                f"database {db.name}: a restore of {bk.backup_id} keeping {', '.join(keep)} "
                f"began, but the saved rows ({sql}) are gone or damaged; the tables may "
                "now hold the backup's rows. Refusing to continue: an operator must decide",
            )
        if list(saved.get("tables", [])) != keep:
            fail(
                INVALID_REQUEST,
                f"database {db.name}: a restore of {bk.backup_id} keeping "
                f"{', '.join(saved.get('tables', []))} is under way; asked to keep "
                f"{', '.join(keep)}",
            )
    else:
        if await _can_swap(bk):
            # The kept tables stay where they are, untouched: nothing to save or reload.
            return await _swap_in(bk, keep)
        saved = await _save_kept(db, keep, sql, meta_path)
        await asyncio.to_thread(_touch_private, marker)
    created = await _ensure_database(bk)
    result = await _load_backup(bk)
    present = [str(t) for t in saved.get("present", [])]
    if present:
        await _run_client(db, [db.database], sql, None, "reloading kept tables", "mariadb")
    checksums = await table_checksums(db)
    kept_sums: dict[str, str] = dict(saved.get("checksums", {}))
    # Kept tables are compared with their saved state, every other one with the backup.
    expected = {**bk.table_checksums, **kept_sums}
    mismatched = sorted(t for t, c in expected.items() if checksums.get(t) != c)
    await asyncio.to_thread(_remove, marker)
    await asyncio.to_thread(_remove, sql, meta_path)
    return DbRestoreResult(
        path=bk.path,
        tables=len(checksums),
        dropped=tuple(t for t in result.dropped if t not in kept_sums),
        checksums=checksums,
        mismatched=tuple(mismatched),
        kept=tuple(present),
        created_database=created,
    )


# --------------------------------------------------------------------------- copies, space


async def db_size_bytes(db: Database, database: str | None = None) -> int:
    """Data + index bytes of a database (information_schema; InnoDB's are estimates)."""
    if db.kind == "mssql":  # SQL Server: activities/mssql (imported here: it builds on this module)
        from activities.mssql import backup as _mssql

        return await _mssql.db_size_bytes(db)
    rows = await query(
        db,
        "SELECT COALESCE(SUM(DATA_LENGTH + INDEX_LENGTH), 0) FROM "
        "information_schema.TABLES WHERE TABLE_SCHEMA = %s",
        (database or db.database,),
        use_database=False,
    )
    return int(rows[0][0] or 0)


@dataclass(frozen=True)
class DropDatabaseResult:
    database: str
    dropped: bool  # False: it did not exist (nothing was done)


async def drop_database(db: Database, database: str) -> DropDatabaseResult:
    """DROP DATABASE IF EXISTS `database` (a test / staging copy); idempotent. Refuses the
    inventory's own database and the server's system schemas."""
    if db.kind == "mssql":  # SQL Server: activities/mssql (imported here: it builds on this module)
        from activities.mssql import backup as _mssql

        return await _mssql.drop_database(db, database)
    _check_database_name(db, "database to drop", database)
    if database.casefold() == db.database.casefold():
        fail(
            INVALID_REQUEST,
            f"database {db.name}: refusing to drop {database}: it is the database the "
            "inventory names (production), not a copy",
        )
    existed = await query(
        db,
        "SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s",
        (database,),
        use_database=False,
    )
    if existed:
        # IF EXISTS: a concurrent attempt may have dropped it since (no warning is raised
        # for the usual case, where it is simply absent: nothing is sent then).
        await query(db, f"DROP DATABASE IF EXISTS {_qi(database)}", use_database=False)
    return DropDatabaseResult(database=database, dropped=bool(existed))


@dataclass(frozen=True)
class BackupSpace:
    db_bytes: int
    free_bytes: int
    need_bytes: int
    ok: bool
    detail: str
    # The folder whose filesystem was measured: `directory` or its nearest existing parent.
    measured: str = ""


# Room for the dump (text: about the data's size, hex blobs twice) and a second one - the
# saved kept tables, a copy while the previous backup is still there - plus some slack.
BACKUP_SPACE_SLACK = 10 << 20


def _free_space(directory: str) -> tuple[str, int]:
    p = os.path.abspath(directory)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p, shutil.disk_usage(p).free


async def backup_space(db: Database, directory: str) -> BackupSpace:
    """Worker-side preflight, read-only: room in `directory` (default db.backup_dir) for a
    dump of the database? need = 2 x (data + index) + 10 MiB."""
    if db.kind == "mssql":  # SQL Server: activities/mssql (imported here: it builds on this module)
        from activities.mssql import backup as _mssql

        return await _mssql.backup_space(db, directory)
    directory = directory or db.backup_dir or ""
    if not directory:
        fail(INVALID_REQUEST, f"database {db.name}: no backup directory (request or inventory backup_dir)")
    size = await db_size_bytes(db)
    try:
        measured, free = await asyncio.to_thread(_free_space, directory)
    except OSError as e:
        fail(
            INVALID_REQUEST,
            f"database {db.name}: cannot measure free space of {directory}: {e.strerror or e}",
        )
    return space_verdict(db, size, free, measured, "of data and indexes, dumps", f"in {measured}")


def space_verdict(db: Database, size: int, free: int, measured: str, holds: str, where: str) -> BackupSpace:
    """Room for two backups of `size` bytes and some slack (BACKUP_SPACE_SLACK) in `free`,
    described for a person: `holds` what is measured and copied, `where` the room is."""
    need = 2 * size + BACKUP_SPACE_SLACK

    def mib(n: int) -> str:
        return f"{n / (1 << 20):.1f} MiB"

    detail = (
        f"database {db.name} ({db.database}): {mib(size)} {holds} need {mib(need)} "
        f"(2 x + 10 MiB); {mib(free)} free {where}"
    )
    ok = free >= need
    return BackupSpace(
        db_bytes=size,
        free_bytes=free,
        need_bytes=need,
        ok=ok,
        detail=detail if ok else f"not enough space: {detail}",
        measured=measured,
    )


# --------------------------------------------------------------------------- activities


@dataclass(frozen=True)
class BackupRequest:
    db: Database
    backup_id: str
    # None: the inventory's db.backup_dir.
    directory: str | None = None


@activity.defn
async def db_backup(req: BackupRequest) -> DbBackup:
    return await backup(req.db, req.backup_id, req.directory)


@activity.defn
async def db_restore(req: DbBackup) -> DbRestoreResult:
    return await restore(req)


@activity.defn
async def db_changed_since(req: DbBackup) -> tuple[str, ...]:
    """Read-only: the tables whose content differs now from the backup's (CHECKSUM TABLE
    against the checksums taken with it; tables made or dropped since included), sorted.
    Restoring the backup undoes every write to them since: a gate says so before it asks."""
    from activities.mysql.connect import table_checksums

    now = await table_checksums(req.db)  # SQL Server's too (table_checksums dispatches on kind)
    then = req.table_checksums
    return tuple(sorted(t for t in set(now) | set(then) if now.get(t) != then.get(t)))


@dataclass(frozen=True)
class DropDatabaseRequest:
    db: Database  # the production database (its `database` is never dropped)
    database: str  # the copy to drop, on the same server


@dataclass(frozen=True)
class RestoreKeepingRequest:
    backup: DbBackup
    keep_tables: tuple[str, ...]


@dataclass(frozen=True)
class BackupSpaceRequest:
    db: Database
    # Where dumps go on the worker; "" = the inventory's db.backup_dir.
    directory: str = ""


@activity.defn
async def db_drop_database(req: DropDatabaseRequest) -> DropDatabaseResult:
    """Drop a copy of the database (test / staging) on the same server; idempotent.
    InvalidRequest (non-retryable) for the inventory's own database or a system schema."""
    return await drop_database(req.db, req.database)


@activity.defn
async def db_restore_keeping(req: RestoreKeepingRequest) -> DbRestoreResult:
    """db_restore, but the current rows of `keep_tables` survive (e.g. the audit trail of a
    rollback); see restore_keeping() for what a retry does."""
    return await restore_keeping(req.backup, tuple(req.keep_tables))


@activity.defn
async def check_backup_space(req: BackupSpaceRequest) -> BackupSpace:
    """Preflight on the worker: room for the database dumps (BackupSpace.ok); reports,
    never raises for a shortage."""
    return await backup_space(req.db, req.directory)
