"""The warm replica of seed 004 on MariaDB: initialise it from the primary (steps 5-6), wait
until the primary's writes have stopped (19) and the replica is in sync (21), stop
replication keeping the server (22), promote it for a revert (30), release it (37); and the
row counts and checksums that prove data written before the window is all there.

Everything here connects over TCP as the inventory's admin account (`admin_at`): the warm
server has no application account before it is initialised, and dumping every database,
CHANGE MASTER and read_only need more than the application's grants.

What zerodown did to the warm server is recorded on the warm server itself, in
`zerodown_warm.state` (one row, written with sql_log_bin=0 like everything zerodown writes
there: a GTID of the warm server's own would clash, under gtid_strict_mode, with the
primary's it replicates), so every activity is idempotent across workers and retries:

    (none) --init--> loading --dump loaded--> loaded --CHANGE MASTER, START SLAVE--> replicating
    replicating --stop--> stopped        replicating | stopped --promote--> promoted
    any but promoted --release--> (none, server empty again)

An initialisation never overwrites what it did not put there: a warm server that holds
databases without the record, replicates from another server, was stopped (it is then the
warm backup) or promoted (it is then a primary with writes of its own) is refused
(WarmReplicaConflict, non-retryable).

The copy is the whole server (`--all-databases`): replication applies every database's
changes and the grant statements, which fail on a server that lacks them. The warm server's
accounts therefore become the primary's (the admin account exists on both).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiomysql
import pymysql
from temporalio import activity

from activities.common import fail, heartbeat, previous_heartbeat, tail, with_heartbeat
from activities.mysql import DbRequest, ReplicaStatus, admin_at, connection, query, replica_status
from activities.mysql.connect import _qi, _raise_db
from activities.mysql.dump import _SYSTEM_SCHEMAS, _option_file
from activities.secrets import resolve_secret
from errors import (
    DATABASE_ERROR,
    DB_REPLICA_TIMEOUT,
    DB_REPLICATION_BROKEN,
    DB_WRITES_CONTINUE,
    INVALID_REQUEST,
    WARM_REPLICA_CONFLICT,
)
from inventory.model import Database, DatabaseEndpoint

WARM_STATE_DB = "zerodown_warm"
_STATE_TABLE = f"{_qi(WARM_STATE_DB)}.`state`"
LOADING, LOADED, REPLICATING, STOPPED, PROMOTED = "loading", "loaded", "replicating", "stopped", "promoted"
POLL_S = 0.5
# MASTER_GTID_WAIT blocks server-side; in slices this long, so the activity heartbeats.
WAIT_SLICE_S = 1.0
# How long START SLAVE may take to show both threads running.
START_TIMEOUT_S = 30.0
# The dump's GTID position (--gtid --master-data=2 prints it as a comment near its end).
_GTID_RE = re.compile(rb"^-- SET GLOBAL gtid_slave_pos='([0-9,\-]*)';", re.MULTILINE)
_COPY_CHUNK = 1 << 16
# Connections of an account other than the asking one.
_USER_CONNECTIONS = (
    "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = %s AND ID <> CONNECTION_ID()"
)
# Open transactions (of other sessions) that changed or locked rows: writes not committed
# yet, so not in the GTID position, that a commit would still add.
_PENDING_WRITES = (
    "SELECT COUNT(*) FROM information_schema.INNODB_TRX "
    "WHERE trx_mysql_thread_id <> CONNECTION_ID() "
    "AND (trx_rows_modified > 0 OR trx_rows_locked > 0)"
)


# --------------------------------------------------------------------------- endpoints


def _warm_endpoint(db: Database) -> DatabaseEndpoint:
    if db.kind != "mysql":
        fail(INVALID_REQUEST, f"database {db.name}: kind {db.kind}: the warm replica is MariaDB / MySQL only")
    if db.warm_replica is None:
        fail(INVALID_REQUEST, f"database {db.name}: no warm_replica in the inventory")
    if not db.admin_user or db.admin_password is None:
        fail(INVALID_REQUEST, f"database {db.name}: the warm replica needs admin_user and admin_password")
    return db.warm_replica


def _warm(db: Database) -> Database:
    return admin_at(db, _warm_endpoint(db))


def _is_from(st: ReplicaStatus, db: Database) -> bool:
    """Does this SHOW SLAVE STATUS replicate from the inventory's primary?"""
    return st.configured and st.master_host == db.host and st.master_port == db.port


@dataclass(frozen=True)
class _WarmSeen:
    """The warm server as a verb finds it: where it is, the admin connection to it, its
    replication status and zerodown's record on it."""

    endpoint: DatabaseEndpoint
    conn: Database
    where: str
    status: ReplicaStatus
    record: WarmRecord | None


async def _look_at_warm(db: Database, refusal: str) -> _WarmSeen:
    """Read the warm server's state; a server replicating from another server than this
    primary is refused (WarmReplicaConflict, ending with `refusal`): zerodown never touches it."""
    endpoint = _warm_endpoint(db)
    warm = _warm(db)
    where = f"database {db.name}: warm replica {endpoint.host}:{endpoint.port}"
    st = await replica_status(db, endpoint)
    record = await _read_record(warm)
    if st.configured and not _is_from(st, db):
        fail(
            WARM_REPLICA_CONFLICT,
            f"{where} replicates from {st.master_host}:{st.master_port}, not from "
            f"the primary {db.host}:{db.port}: {refusal}",
        )
    return _WarmSeen(endpoint=endpoint, conn=warm, where=where, status=st, record=record)


@contextlib.asynccontextmanager
async def _session(target: Database, no_binlog: bool = False) -> AsyncIterator[aiomysql.Cursor]:
    """One connection's cursor (no default database); with `no_binlog` nothing it runs is
    binlogged (the warm server: see the module docstring)."""
    async with connection(target, use_database=False) as conn, conn.cursor() as cur:
        if no_binlog:
            await _run(target, cur, "SET SESSION sql_log_bin = 0")
        yield cur


async def _run(target: Database, cur: aiomysql.Cursor, sql: str, args: Any = None) -> list[tuple[Any, ...]]:
    try:
        await cur.execute(sql, args)
        return list(await cur.fetchall())
    except (pymysql.MySQLError, OSError) as e:
        # The statement's text holds no secret (values are arguments), so it can be named.
        _raise_db(target, target.host, target.port, f"{sql[:120]!r}", e)
    raise AssertionError("unreachable")


async def _user_databases(target: Database) -> list[str]:
    """The server's databases other than its own and zerodown's record."""
    rows = await query(target, "SHOW DATABASES", use_database=False)
    return sorted(
        str(r[0]) for r in rows if str(r[0]).casefold() not in _SYSTEM_SCHEMAS and str(r[0]) != WARM_STATE_DB
    )


# --------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class WarmRecord:
    state: str
    primary: str  # host:port it was copied from
    gtid: str  # the dump's position (loaded..), where it stopped (stopped, promoted)
    databases: str  # comma-separated, as copied


async def _read_record(warm: Database) -> WarmRecord | None:
    exists = await query(
        warm,
        "SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s AND TABLE_NAME = 'state'",
        (WARM_STATE_DB,),
        use_database=False,
    )
    if not exists:
        return None
    rows = await query(
        warm, f"SELECT state, source, gtid, copied FROM {_STATE_TABLE} WHERE id = 1", use_database=False
    )
    if not rows:
        return None
    state, source, gtid, copied = rows[0]
    return WarmRecord(
        state=str(state), primary=str(source or ""), gtid=str(gtid or ""), databases=str(copied or "")
    )


async def _write_record(
    warm: Database, db: Database, state: str, gtid: str | None = None, databases: list[str] | None = None
) -> None:
    """Set the record's state (gtid / databases kept unless given)."""
    async with _session(warm, no_binlog=True) as cur:
        exists = await _run(
            warm,
            cur,
            "SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s AND TABLE_NAME = 'state'",
            (WARM_STATE_DB,),
        )
        if not exists:  # (IF NOT EXISTS all the same: a concurrent attempt may create it)
            await _run(warm, cur, f"CREATE DATABASE IF NOT EXISTS {_qi(WARM_STATE_DB)}")
            await _run(
                warm,
                cur,
                f"CREATE TABLE IF NOT EXISTS {_STATE_TABLE} (id TINYINT PRIMARY KEY, "
                "state VARCHAR(16) NOT NULL, source VARCHAR(300) NOT NULL, gtid TEXT NULL, "
                "copied TEXT NULL, updated_at DATETIME(3) NOT NULL) ENGINE=InnoDB",
            )
        await _run(
            warm,
            cur,
            f"INSERT INTO {_STATE_TABLE} (id, state, source, gtid, copied, updated_at) "
            "VALUES (1, %s, %s, %s, %s, NOW(3)) ON DUPLICATE KEY UPDATE "
            "state = VALUES(state), source = VALUES(source), "
            "gtid = COALESCE(VALUES(gtid), gtid), "
            "copied = COALESCE(VALUES(copied), copied), updated_at = VALUES(updated_at)",
            (state, f"{db.host}:{db.port}", gtid, ",".join(databases) if databases is not None else None),
        )


# --------------------------------------------------------------------------- initialise


async def init_warm_replica(db: Database) -> ReplicaStatus:
    """Make the warm server a replica of the primary (seed 004 steps 5-6); idempotent.

    Already replicating from this primary: nothing is copied again (a stopped thread is
    started, read_only set). Otherwise, on an empty server: read_only=ON, its binlog reset
    (it holds nothing of value on an empty server, and GTIDs of its own would break
    replication under gtid_strict_mode), a consistent dump of the whole primary with its
    GTID position (`--single-transaction --gtid --master-data=2`: no global read lock)
    piped into it without binlogging, gtid_slave_pos set to that position, CHANGE MASTER
    ... MASTER_USE_GTID=slave_pos, START SLAVE, both threads confirmed running. A retry
    after a crash resumes from the record (a half-loaded copy is dropped and loaded again).
    """
    if not db.replication_user or db.replication_password is None:
        fail(
            INVALID_REQUEST,
            f"database {db.name}: the warm replica needs replication_user and replication_password",
        )
    seen = await _look_at_warm(db, "refusing to re-initialise it")
    warm, where, st, record = seen.conn, seen.where, seen.status, seen.record
    if record is not None and record.state in (STOPPED, PROMOTED):
        fail(
            WARM_REPLICA_CONFLICT,
            f"{where} was {record.state} at GTID {record.gtid!r} (the warm backup of a run): refusing to "
            "overwrite it; release it (db_release_warm_replica) to start again",
        )
    if _is_from(st, db):
        if record is None:  # set up by hand: adopted, so stop / promote / release know it
            await _write_record(warm, db, REPLICATING, st.gtid_slave_pos, await _user_databases(warm))
        return await _start_replication(db, warm, where)
    if record is None:
        found = await _user_databases(warm)
        if found:
            fail(
                WARM_REPLICA_CONFLICT,
                f"{where} holds database(s) {', '.join(found)} that zerodown did not "
                "copy there: refusing to overwrite them (an empty server is needed)",
            )
    elif record.state == REPLICATING:
        fail(
            WARM_REPLICA_CONFLICT,
            f"{where} was replicating from {record.primary}, but its replication "
            "settings were removed since: its data may have diverged; release it "
            "to start again",
        )
    if record is None or record.state == LOADING:
        gtid = await _copy_primary(db, warm, where, partial=record is not None)
    else:  # loaded: the copy is complete, only replication is missing
        gtid = record.gtid
    return await _configure(db, warm, gtid, where)


async def _copy_primary(db: Database, warm: Database, where: str, partial: bool) -> str:
    """Load the primary's dump into the warm server; returns the dump's GTID position."""
    async with _session(warm, no_binlog=True) as cur:
        # Nobody but the copy (and later the replication thread) writes to it from now on.
        await _run(warm, cur, "SET GLOBAL read_only = ON")
        if partial:  # an earlier attempt's half-loaded copy: everything on it came from there
            for name in await _user_databases(warm):
                await _run(warm, cur, f"DROP DATABASE IF EXISTS {_qi(name)}")
        await _run(warm, cur, "RESET MASTER")
    primary = admin_at(db)
    databases = await _user_databases(primary)
    await _write_record(warm, db, LOADING, "", databases)
    gtid = await _pipe_dump(primary, warm, where)
    async with _session(warm, no_binlog=True) as cur:
        # The copied grant tables take effect (LOCAL: never binlogged).
        await _run(warm, cur, "FLUSH LOCAL PRIVILEGES")
    await _write_record(warm, db, LOADED, gtid)
    return gtid


def _client_argv(binary: str, option_file: str, target: Database) -> list[str]:
    return [
        binary,
        f"--defaults-extra-file={option_file}",
        "--protocol=TCP",
        f"--host={target.host}",
        f"--port={target.port}",
        f"--user={target.user}",
    ]


async def _pipe_dump(primary: Database, warm: Database, where: str) -> str:
    """mariadb-dump of the primary piped into the mariadb client on the warm server, with a
    heartbeat per second; returns the GTID position the dump recorded."""
    dump_args = [
        "--all-databases",
        "--single-transaction",
        "--gtid",
        "--master-data=2",
        "--routines",
        "--events",
        "--triggers",
        "--hex-blob",
        "--skip-dump-date",
        # The warm server's own replication position is set after the load.
        "--ignore-table=mysql.gtid_slave_pos",
    ]
    procs: list[asyncio.subprocess.Process] = []
    with _option_file(primary) as opt:
        try:
            try:
                dump = await asyncio.create_subprocess_exec(
                    *_client_argv("mariadb-dump", opt, primary),
                    *dump_args,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                procs.append(dump)
                load = await asyncio.create_subprocess_exec(
                    *_client_argv("mariadb", opt, warm),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                )
                procs.append(load)
            except OSError as e:
                fail(DATABASE_ERROR, f"{where}: cannot run the MariaDB client tools: {e.strerror or e}")
            assert dump.stdout and dump.stderr and load.stdin and load.stderr
            errors = asyncio.gather(dump.stderr.read(), load.stderr.read())
            gtid, copied = None, 0
            try:
                gtid, copied = await _copy_stream(dump.stdout, load.stdin)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the load ended early: its exit status and stderr say why
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                load.stdin.close()
            await with_heartbeat(
                asyncio.gather(dump.wait(), load.wait()),
                lambda: {"step": "warm replica copy", "doing": "finishing the load"},
            )
            dump_err, load_err = (b.decode("utf-8", errors="replace") for b in await errors)
        finally:
            for p in procs:
                if p.returncode is None:  # cancelled / failed: no half-done copy left running
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
                    with contextlib.suppress(Exception):
                        await p.wait()
    for proc, what, err in (
        (dump, f"mariadb-dump of {primary.host}:{primary.port}", dump_err),
        (load, "loading it", load_err),
    ):
        if proc.returncode != 0:
            retryable = bool(re.search(r"Can't connect|Lost connection|gone away|Too many connections", err))
            fail(
                DATABASE_ERROR,
                f"{where}: {what} exited with status {proc.returncode}: {tail(err)}",
                retryable=retryable,
            )
    if gtid is None:
        fail(
            DATABASE_ERROR,
            f"{where}: the dump of {primary.host}:{primary.port} ({copied} bytes) holds no "
            "GTID position (-- SET GLOBAL gtid_slave_pos): is the primary's binlog on?",
        )
    return gtid


async def _copy_stream(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> tuple[str | None, int]:
    """Copy src to dst (the load's session first turns binlogging off); returns the last
    GTID position comment seen and the bytes copied."""
    dst.write(b"SET SESSION sql_log_bin = 0;\n")
    gtid: str | None = None
    copied, carry, beat_at = 0, b"", time.monotonic()
    while chunk := await src.read(_COPY_CHUNK):
        # Scan across chunk borders: the previous chunk's last line is kept in `carry`.
        window = carry + chunk
        for m in _GTID_RE.finditer(window):
            gtid = m.group(1).decode("ascii")
        carry = window[window.rfind(b"\n") + 1 :][-4096:]
        dst.write(chunk)
        await dst.drain()
        copied += len(chunk)
        if time.monotonic() - beat_at >= 1.0:
            heartbeat({"step": "warm replica copy", "copied_bytes": copied})
            beat_at = time.monotonic()
    return gtid, copied


async def _configure(db: Database, warm: Database, gtid: str, where: str) -> ReplicaStatus:
    assert db.replication_password is not None
    password = resolve_secret(db.replication_password, needed_by=f"database {db.name} (replication)")
    async with _session(warm, no_binlog=True) as cur:
        await _run(warm, cur, "SET GLOBAL gtid_slave_pos = %s", (gtid,))
        await _run(
            warm,
            cur,
            "CHANGE MASTER TO MASTER_HOST = %s, MASTER_PORT = %s, MASTER_USER = %s, "
            "MASTER_USE_GTID = slave_pos, MASTER_CONNECT_RETRY = 5, MASTER_PASSWORD = %s",
            (db.host, db.port, db.replication_user, password),
        )
    return await _start_replication(db, warm, where)


async def _start_replication(db: Database, warm: Database, where: str) -> ReplicaStatus:
    """read_only=ON, START SLAVE when a thread is not running, until both run; records
    `replicating`."""
    endpoint = _warm_endpoint(db)
    async with _session(warm, no_binlog=True) as cur:
        await _run(warm, cur, "SET GLOBAL read_only = ON")
    st = await replica_status(db, endpoint)
    if not st.running:
        async with _session(warm, no_binlog=True) as cur:
            await _run(warm, cur, "START SLAVE")
    deadline = time.monotonic() + START_TIMEOUT_S
    while not st.running:
        await asyncio.sleep(0.2)
        st = await replica_status(db, endpoint)
        if st.sql_running == "No" and st.last_sql_error:
            fail(DB_REPLICATION_BROKEN, f"{where}: replication's SQL thread stopped: {st.last_sql_error}")
        if time.monotonic() > deadline:
            fail(
                DB_REPLICATION_BROKEN,
                f"{where}: replication not running {START_TIMEOUT_S:g}s after START SLAVE (IO "
                f"{st.io_running}, SQL {st.sql_running}): {st.last_error or 'no error'}",
                retryable=True,
            )
        heartbeat({"step": "warm replica start", "io": st.io_running, "sql": st.sql_running})
    record = await _read_record(warm)
    if record is None or record.state != REPLICATING:
        await _write_record(warm, db, REPLICATING)
    return st


# --------------------------------------------------------------------------- waits


def _carried() -> dict[str, Any]:
    prev = previous_heartbeat()
    return prev if isinstance(prev, dict) else {}


def _carried_waited() -> float:
    try:
        return float(_carried().get("waited_s", 0.0))
    except (TypeError, ValueError):
        return 0.0


async def wait_in_sync(db: Database, timeout_s: float) -> ReplicaStatus:
    """Wait until the warm replica applied the primary's current @@gtid_binlog_pos and shows
    Seconds_Behind_Master 0 (seed 004 step 21). The target is read again for every slice,
    so what returns is in sync with the primary as of at most one slice ago. The time
    waited is carried across retries (heartbeat details). DbReplicationBroken when
    replication is not running, DbReplicaTimeout at the deadline."""
    endpoint = _warm_endpoint(db)
    warm, primary = _warm(db), admin_at(db)
    where = f"database {db.name}: warm replica {endpoint.host}:{endpoint.port}"
    carried, started = _carried_waited(), time.monotonic()
    while True:
        rows = await query(primary, "SELECT @@GLOBAL.gtid_binlog_pos", use_database=False)
        target = str(rows[0][0] or "")
        reached = True
        if target:
            got = (
                await query(
                    warm, "SELECT MASTER_GTID_WAIT(%s, %s)", (target, WAIT_SLICE_S), use_database=False
                )
            )[0][0]
            reached = got == 0
        st = await replica_status(db, endpoint)
        waited = carried + time.monotonic() - started
        if not st.configured:
            fail(DB_REPLICATION_BROKEN, f"{where} is not replicating (SHOW SLAVE STATUS is empty)")
        if st.sql_running != "Yes":
            fail(
                DB_REPLICATION_BROKEN,
                f"{where}: replication's SQL thread is not running "
                f"({st.last_sql_error or 'stopped'}), at GTID {st.gtid_slave_pos!r}",
            )
        if reached and st.seconds_behind == 0:
            return st
        if waited >= timeout_s:
            fail(
                DB_REPLICA_TIMEOUT,
                f"{where} not in sync after {waited:.0f}s (timeout {timeout_s:g}s): primary at {target!r}, "
                f"replica at {st.gtid_slave_pos!r}, {st.seconds_behind} s behind, IO {st.io_running}"
                + (f", IO error {st.last_io_error!r}" if st.last_io_error else ""),
            )
        heartbeat(
            {
                "waited_s": round(waited, 2),
                "target": target,
                "at": st.gtid_slave_pos,
                "behind_s": st.seconds_behind,
            }
        )
        if reached:  # applied, but Seconds_Behind_Master not 0 yet
            await asyncio.sleep(POLL_S)


@dataclass(frozen=True)
class WritesStopped:
    gtid: str  # the primary's @@gtid_binlog_pos, unchanged for quiet_s
    waited_s: float  # in all attempts
    quiet_s: float  # how long it has been unchanged
    # Connections of the application's account (db.user) still open on the primary: no
    # writes came through them for quiet_s, but an idle client can still write.
    user_connections: int
    # Open transactions that had changed rows when the wait ended (0: nothing uncommitted).
    pending_writes: int = 0
    # Since when (the primary's clock, Unix seconds) the position has been `gtid`: what a
    # later wait is given as `seen_since` to go on from this one.
    since: float = 0.0


async def wait_writes_stopped(
    db: Database,
    quiet_s: float,
    timeout_s: float,
    seen_gtid: str | None = None,
    seen_since: float | None = None,
) -> WritesStopped:
    """Wait until the primary's @@gtid_binlog_pos has not changed for `quiet_s` with no
    open transaction holding changed rows (seed 004 step 19: no more writes, to any database
    of the server; an uncommitted write is not in the position yet, its commit would be);
    DbWritesContinue at the deadline. Polls every 0.5 s on one connection, heartbeating.
    Time is the primary's clock (one clock, whichever worker asks). The position last seen
    is carried into a retry (from the heartbeat) or given by the caller (`seen_gtid` at
    `seen_since`, e.g. a watch that ran while the writers were being stopped): while the
    position is still that one, the quiet time counts from then."""
    primary = admin_at(db)
    prev = _carried()
    carried, started = _carried_waited(), time.monotonic()
    if isinstance(prev.get("gtid"), str):
        seen_gtid, seen_since = str(prev["gtid"]), float(prev.get("since", 0.0))
    last_gtid: str | None = seen_gtid
    since = seen_since or 0.0
    changes = 0
    async with _session(primary) as cur:
        while True:
            row = (await _run(primary, cur, "SELECT @@GLOBAL.gtid_binlog_pos, UNIX_TIMESTAMP(NOW(6))"))[0]
            gtid, now = str(row[0] or ""), float(row[1])
            conns = int((await _run(primary, cur, _USER_CONNECTIONS, (db.user,)))[0][0])
            pending = int((await _run(primary, cur, _PENDING_WRITES))[0][0])
            if gtid != last_gtid or pending or not since:
                if last_gtid is not None and gtid != last_gtid:
                    changes += 1
                last_gtid, since = gtid, now
            quiet, waited = now - since, carried + time.monotonic() - started
            if quiet >= quiet_s:
                return WritesStopped(
                    gtid=gtid,
                    waited_s=round(waited, 2),
                    quiet_s=round(quiet, 2),
                    user_connections=conns,
                    pending_writes=pending,
                    since=since,
                )
            if waited >= timeout_s:
                fail(
                    DB_WRITES_CONTINUE,
                    f"database {db.name}: the primary {db.host}:{db.port} is still being written to after "
                    f"{waited:.0f}s (its GTID position moved {changes} time(s), now {gtid!r}; needed "
                    f"{quiet_s:g}s without a write; {pending} open transaction(s) hold changed rows); "
                    f"{conns} connection(s) of {db.user} are open",
                )
            heartbeat(
                {
                    "waited_s": round(waited, 2),
                    "gtid": gtid,
                    "since": since,
                    "quiet_s": round(quiet, 2),
                    "user_connections": conns,
                    "pending_writes": pending,
                }
            )
            await asyncio.sleep(min(POLL_S, max(0.02, quiet_s - quiet)))


# --------------------------------------------------------------------------- stop, promote, release


async def stop_replication(db: Database) -> ReplicaStatus:
    """STOP SLAVE on the warm replica (seed 004 step 22): the server keeps running and keeps
    its replication settings, as the warm backup of the data at that moment; idempotent.
    The result's gtid_slave_pos is where it stopped."""
    seen = await _look_at_warm(db, "not stopping it")
    endpoint, warm, where, st, record = seen.endpoint, seen.conn, seen.where, seen.status, seen.record
    if not st.configured:
        if record is not None and record.state == PROMOTED:
            return st  # promoted since: it no longer replicates, which is what was asked
        fail(WARM_REPLICA_CONFLICT, f"{where} is not a replica (never initialised, or released)")
    if (st.io_running, st.sql_running) != ("No", "No"):
        async with _session(warm, no_binlog=True) as cur:
            await _run(warm, cur, "STOP SLAVE")  # returns once both threads have stopped
        st = await replica_status(db, endpoint)
    if record is None or record.state != STOPPED or record.gtid != st.gtid_slave_pos:
        await _write_record(warm, db, STOPPED, st.gtid_slave_pos)
    return st


async def promote_warm_replica(db: Database) -> DatabaseEndpoint:
    """Make the warm replica a writable primary (seed 004 step 30): STOP SLAVE, RESET SLAVE
    ALL, read_only OFF; idempotent. Only a server zerodown initialised (or that replicates
    from this primary): promoting an empty one would point the application at no data.
    Whether it is in sync is the caller's to check first (it was stopped at step 22)."""
    seen = await _look_at_warm(db, "refusing to promote it")
    endpoint, warm, where, st, record = seen.endpoint, seen.conn, seen.where, seen.status, seen.record
    if record is None and not st.configured:
        fail(WARM_REPLICA_CONFLICT, f"{where} was never initialised from the primary: refusing to promote it")
    if record is not None and record.state in (LOADING, LOADED):
        fail(WARM_REPLICA_CONFLICT, f"{where}: its copy of the primary is not complete ({record.state})")
    async with _session(warm, no_binlog=True) as cur:
        if st.configured:
            await _stop_and_forget(warm, cur, st)
        await _run(warm, cur, "SET GLOBAL read_only = OFF")
    if record is None or record.state != PROMOTED:
        await _write_record(warm, db, PROMOTED, st.gtid_slave_pos if st.configured else None)
    return endpoint


async def _stop_and_forget(warm: Database, cur: aiomysql.Cursor, st: ReplicaStatus) -> None:
    """STOP SLAVE (when a thread runs), RESET SLAVE ALL: no longer a replica of anything."""
    if (st.io_running, st.sql_running) != ("No", "No"):
        await _run(warm, cur, "STOP SLAVE")
    await _run(warm, cur, "RESET SLAVE ALL")


@dataclass(frozen=True)
class WarmReleased:
    host: str
    port: int
    dropped: tuple[str, ...]  # databases dropped on the warm server
    was_replicating: bool


async def _user_connections(target: Database, user: str) -> int:
    return int((await query(target, _USER_CONNECTIONS, (user,), use_database=False))[0][0])


async def release_warm_replica(db: Database) -> WarmReleased:
    """The end of the warm backup (seed 004 step 37, "terminate the warm slave"): STOP SLAVE,
    RESET SLAVE ALL and every database copied there dropped (zerodown's record last), so
    the server is empty again. Only after the caller's gate; idempotent. Refused for a
    promoted server (it holds the writes made since) and while connections of the
    application's account are open on it. The accounts copied from the primary stay."""
    seen = await _look_at_warm(db, "not releasing a server zerodown did not initialise")
    endpoint, warm, where, st, record = seen.endpoint, seen.conn, seen.where, seen.status, seen.record
    databases = await _user_databases(warm)
    if record is None and not st.configured:
        if databases:
            fail(
                WARM_REPLICA_CONFLICT,
                f"{where} holds database(s) {', '.join(databases)} that zerodown did "
                "not copy there: not dropping them",
            )
        return WarmReleased(host=endpoint.host, port=endpoint.port, dropped=(), was_replicating=False)
    if record is not None and record.state == PROMOTED:
        fail(
            WARM_REPLICA_CONFLICT,
            f"{where} was promoted to primary: it holds the writes made since, not releasing it",
        )
    conns = await _user_connections(warm, db.user)
    if conns:
        fail(
            WARM_REPLICA_CONFLICT,
            f"{where}: {conns} connection(s) of {db.user} are open on it (an "
            "application uses it?): not releasing it",
        )
    async with _session(warm, no_binlog=True) as cur:
        if st.configured:
            await _stop_and_forget(warm, cur, st)
        for name in databases:
            await _run(warm, cur, f"DROP DATABASE IF EXISTS {_qi(name)}")
        await _run(warm, cur, f"DROP DATABASE IF EXISTS {_qi(WARM_STATE_DB)}")
    return WarmReleased(
        host=endpoint.host, port=endpoint.port, dropped=tuple(databases), was_replicating=st.configured
    )


# --------------------------------------------------------------------------- row counts, checksums


@dataclass(frozen=True)
class TableStat:
    table: str
    rows: int
    checksum: str  # CHECKSUM TABLE


@dataclass(frozen=True)
class TableStats:
    host: str
    port: int
    database: str
    tables: tuple[TableStat, ...]
    gtid: str  # the server's @@gtid_current_pos when they were read

    def differences(self, other: TableStats) -> tuple[str, ...]:
        """What differs from `other` (another server's or an earlier reading), one line per
        table; empty when every table holds the same rows."""
        mine, theirs = {t.table: t for t in self.tables}, {t.table: t for t in other.tables}
        out: list[str] = []
        for name in sorted(set(mine) | set(theirs)):
            a, b = mine.get(name), theirs.get(name)
            if a is None or b is None:
                out.append(
                    f"{name}: only on {self.host}:{self.port}"
                    if b is None
                    else f"{name}: missing on {self.host}:{self.port}"
                )
            elif (a.rows, a.checksum) != (b.rows, b.checksum):
                out.append(
                    f"{name}: {a.rows} rows checksum {a.checksum} vs {b.rows} rows checksum {b.checksum}"
                )
        return tuple(out)


async def table_stats(
    db: Database, endpoint: DatabaseEndpoint | None = None, database: str | None = None
) -> TableStats:
    """Row count and CHECKSUM TABLE of every base table of `database` (default
    db.database) on `endpoint` (default the primary; e.g. db.warm_replica), all read in one
    consistent snapshot, as the admin account."""
    target = admin_at(db, endpoint)
    name = database or db.database
    async with _session(target) as cur:
        await _run(target, cur, "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        await _run(target, cur, "START TRANSACTION WITH CONSISTENT SNAPSHOT")
        gtid = str((await _run(target, cur, "SELECT @@GLOBAL.gtid_current_pos"))[0][0] or "")
        rows = await _run(
            target,
            cur,
            "SELECT TABLE_NAME FROM information_schema.TABLES WHERE "
            "TABLE_SCHEMA = %s AND TABLE_TYPE = 'BASE TABLE' ORDER BY TABLE_NAME",
            (name,),
        )
        if not rows and not await _run(
            target, cur, "SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s", (name,)
        ):
            fail(DATABASE_ERROR, f"database {db.name}: {target.host}:{target.port} has no database {name}")
        tables = [str(r[0]) for r in rows]

        async def read() -> list[TableStat]:
            out: list[TableStat] = []
            for t in tables:
                count = (await _run(target, cur, f"SELECT COUNT(*) FROM {_qi(name)}.{_qi(t)}"))[0][0]
                ((_, checksum),) = await _run(target, cur, f"CHECKSUM TABLE {_qi(name)}.{_qi(t)}")
                out.append(
                    TableStat(table=t, rows=int(count), checksum="" if checksum is None else str(checksum))
                )
            return out

        stats = await with_heartbeat(read(), lambda: {"step": "row counts and checksums", "database": name})
        await _run(target, cur, "COMMIT")
    return TableStats(host=target.host, port=target.port, database=name, tables=tuple(stats), gtid=gtid)


# --------------------------------------------------------------------------- activities


@dataclass(frozen=True)
class WaitSyncRequest:
    db: Database
    timeout_s: float = 300.0


@dataclass(frozen=True)
class WritesStoppedRequest:
    db: Database
    quiet_s: float = 10.0
    timeout_s: float = 300.0
    # A position an earlier wait saw unchanged since `seen_since` (the primary's clock): the
    # quiet time counts from then while the position is still that one.
    seen_gtid: str | None = None
    seen_since: float | None = None


@activity.defn
async def db_init_warm_replica(req: DbRequest) -> ReplicaStatus:
    """Seed 004 steps 5-6: the warm server initialised from the primary and replicating."""
    return await init_warm_replica(req.db)


@activity.defn
async def db_wait_replica_in_sync(req: WaitSyncRequest) -> ReplicaStatus:
    """Seed 004 step 21: the warm replica has applied the primary's position, 0 s behind."""
    return await wait_in_sync(req.db, req.timeout_s)


@activity.defn
async def db_stop_replication(req: DbRequest) -> ReplicaStatus:
    """Seed 004 step 22: STOP SLAVE on the warm replica, which keeps running."""
    return await stop_replication(req.db)


@activity.defn
async def db_promote_warm_replica(req: DbRequest) -> DatabaseEndpoint:
    """Seed 004 step 30: the warm replica becomes a writable primary; returns its address."""
    return await promote_warm_replica(req.db)


@activity.defn
async def db_wait_writes_stopped(req: WritesStoppedRequest) -> WritesStopped:
    """Seed 004 step 19: the primary's GTID position unchanged for quiet_s."""
    return await wait_writes_stopped(req.db, req.quiet_s, req.timeout_s, req.seen_gtid, req.seen_since)


@activity.defn
async def db_release_warm_replica(req: DbRequest) -> WarmReleased:
    """Seed 004 step 37: the warm server emptied (after the caller's gate)."""
    return await release_warm_replica(req.db)


REPLICATION_ACTIVITIES: list[Callable[..., Any]] = [
    db_init_warm_replica,
    db_wait_replica_in_sync,
    db_stop_replication,
    db_promote_warm_replica,
    db_wait_writes_stopped,
    db_release_warm_replica,
]
