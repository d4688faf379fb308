"""The product's warm-replica adapter (activities/replication.py, seed 004 steps 5-6, 19, 21,
22, 30, 37) against the lab's real MariaDB primary and its empty `warm` server (lab/mariadb.py):
initialising the warm replica (a server holding data it did not copy refused, an interrupted
copy redone, a repeat a no-op), waiting until it is in sync, waiting until writes stopped,
stopping replication, promoting the warm server and releasing it. The lab's own warm server
(its empty start, its reset) is tested in tests/test_lab_replication.py.

Each test brings the warm server into the state it needs itself (`_replicating`, or the lab's
reset_warm), so any one of them runs alone; the module leaves the warm server empty.
Activities run inside temporalio's ActivityEnvironment (real heartbeats, no worker).
"""

# ruff: noqa: F811  (the fixtures imported from tests.replication_support are named as test parameters)
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities import mysql, replication
from activities.mysql import DbRequest
from activities.replication import WaitSyncRequest, WritesStoppedRequest
from errors import DB_REPLICA_TIMEOUT, DB_REPLICATION_BROKEN, DB_WRITES_CONTINUE, WARM_REPLICA_CONFLICT
from inventory.model import Database, DatabaseEndpoint
from lab import mariadb as lab_mariadb
from lab.config import DB_NAME, LabConfig
from tests.replication_support import activity_env as _env
from tests.replication_support import db  # noqa: F401  (fixture)
from tests.replication_support import record_state as _record_state
from tests.replication_support import replicating as _replicating
from tests.replication_support import warm_admin as _warm


async def _insert(db: Database, body: str) -> None:
    await mysql.query(db, "INSERT INTO items (node, body) VALUES ('replication-test', %s)", (body,))


async def _count(target: Database, body: str) -> int:
    rows = await mysql.query(
        target, f"SELECT COUNT(*) FROM `{DB_NAME}`.items WHERE body = %s", (body,), use_database=False
    )
    return int(rows[0][0])


async def _status_counter(target: Database, name: str) -> int:
    rows = await mysql.query(target, "SHOW GLOBAL STATUS LIKE %s", (name,), use_database=False)
    return int(rows[0][1])


async def _primary_pos(db: Database) -> str:
    return str((await mysql.query(db, "SELECT @@GLOBAL.gtid_binlog_pos", use_database=False))[0][0])


async def _stats(db: Database, endpoint: DatabaseEndpoint | None = None) -> replication.TableStats:
    return await replication.table_stats(db, endpoint)


async def _sync(db: Database, timeout_s: float = 30) -> Any:
    return await _env().run(replication.db_wait_replica_in_sync, WaitSyncRequest(db, timeout_s))


async def _expect(error_type: str, fn: Any, req: Any, env: ActivityEnvironment | None = None) -> str:
    with pytest.raises(ApplicationError) as e:
        await (env or _env()).run(fn, req)
    assert e.value.type == error_type, e.value
    return str(e.value)


# =========================================================================== init refused


async def test_init_refuses_a_server_holding_data_it_did_not_copy(lab: LabConfig, db: Database) -> None:
    await asyncio.to_thread(lab_mariadb.reset_warm, lab)
    with lab_mariadb.connect(lab, "warm") as conn, conn.cursor() as cur:
        cur.execute("SET SESSION sql_log_bin = 0")
        cur.execute("CREATE DATABASE customer_data")
        cur.execute("CREATE TABLE customer_data.t (id INT PRIMARY KEY)")
        cur.execute("INSERT INTO customer_data.t VALUES (1)")
    try:
        msg = await _expect(WARM_REPLICA_CONFLICT, replication.db_init_warm_replica, DbRequest(db))
        assert "customer_data" in msg
        # Nothing was touched: the data is there, no replication, no record.
        assert lab_mariadb.query(lab, "warm", "SELECT COUNT(*) FROM customer_data.t")[0][0] == 1
        assert lab_mariadb.replica_status_of(lab, "warm") is None
        assert await _record_state(db) is None
        # Promotion and release refuse it as well.
        await _expect(WARM_REPLICA_CONFLICT, replication.db_promote_warm_replica, DbRequest(db))
        await _expect(WARM_REPLICA_CONFLICT, replication.db_release_warm_replica, DbRequest(db))
        assert lab_mariadb.query(lab, "warm", "SELECT COUNT(*) FROM customer_data.t")[0][0] == 1
    finally:
        await asyncio.to_thread(lab_mariadb.reset_warm, lab)


# =========================================================================== init, in sync


async def test_init_copies_the_primary_then_follows_it_and_is_idempotent(
    lab: LabConfig, db: Database
) -> None:
    await asyncio.to_thread(lab_mariadb.reset_warm, lab)
    before = f"before-init-{uuid.uuid4().hex[:8]}"
    for _ in range(3):
        await _insert(db, before)
    st = await _env().run(replication.db_init_warm_replica, DbRequest(db))
    assert st.running and st.read_only and (st.master_host, st.master_port) == (db.host, db.port)
    assert st.gtid_slave_pos
    assert await _record_state(db) == replication.REPLICATING

    # Data written before the copy is all there: every table's rows and checksum.
    await _sync(db)
    on_primary, on_warm = await _stats(db), await _stats(db, db.warm_replica)
    assert on_warm.differences(on_primary) == ()
    assert {t.table for t in on_warm.tables} >= {"items", "users", "schema_version", "tbAudit"}
    assert next(t for t in on_warm.tables if t.table == "items").rows >= 3
    assert await _count(_warm(db), before) == 3
    # The whole server was copied (replication applies every database's changes), not binlogged there.
    assert {"labapp", "zdlab"} <= set(await asyncio.to_thread(lab_mariadb.warm_databases, lab))
    own = str(lab_mariadb.query(lab, "warm", "SELECT @@GLOBAL.gtid_binlog_pos")[0][0] or "")
    assert all(g.split("-")[1] != "3" for g in own.split(",") if g), own  # no GTID of server_id 3

    # A write made on the primary after the copy arrives.
    after = f"after-init-{uuid.uuid4().hex[:8]}"
    await _insert(db, after)
    await _sync(db)
    assert await _count(_warm(db), after) == 1

    # Again: a no-op (no new CHANGE MASTER, nothing copied), still replicating.
    changes = await _status_counter(_warm(db), "Com_change_master")
    again = await _env().run(replication.db_init_warm_replica, DbRequest(db))
    assert again.running and again.read_only
    assert await _status_counter(_warm(db), "Com_change_master") == changes
    assert await _count(_warm(db), before) == 3


async def test_init_redoes_a_copy_that_was_interrupted(lab: LabConfig, db: Database) -> None:
    """A worker lost during the copy leaves the record at `loading` and a half-loaded copy;
    the retry drops that copy and loads the primary again."""
    await asyncio.to_thread(lab_mariadb.reset_warm, lab)
    await replication._write_record(_warm(db), db, replication.LOADING, "", [DB_NAME])
    with lab_mariadb.connect(lab, "warm") as conn, conn.cursor() as cur:
        cur.execute("SET SESSION sql_log_bin = 0")
        cur.execute(f"CREATE DATABASE {DB_NAME}")
        cur.execute(f"CREATE TABLE {DB_NAME}.half_loaded (id INT PRIMARY KEY)")
    st = await _env().run(replication.db_init_warm_replica, DbRequest(db))
    assert st.running and await _record_state(db) == replication.REPLICATING
    await _sync(db)
    assert (await _stats(db, db.warm_replica)).differences(await _stats(db)) == ()


async def test_wait_in_sync_reaches_the_primary_position_zero_behind(lab: LabConfig, db: Database) -> None:
    await _replicating(lab, db)
    burst = f"burst-{uuid.uuid4().hex[:8]}"
    async with mysql.connection(db) as conn, conn.cursor() as cur:
        for _ in range(200):
            await cur.execute("INSERT INTO items (node, body) VALUES ('replication-test', %s)", (burst,))
    beats: list[Any] = []
    st = await _env(beats).run(replication.db_wait_replica_in_sync, WaitSyncRequest(db, 60))
    assert st.seconds_behind == 0 and st.running
    assert st.gtid_slave_pos == await _primary_pos(db)
    assert await _count(_warm(db), burst) == 200
    for beat in beats:  # when it had to wait: how long, and the gap
        assert {"waited_s", "target", "at", "behind_s"} <= set(beat)


async def test_wait_in_sync_times_out_keeping_the_deadline_of_earlier_attempts(
    lab: LabConfig, db: Database
) -> None:
    await _replicating(lab, db)
    # The replica's SQL thread is paused (IO keeps receiving), so the primary's newest write
    # cannot be applied: never in sync.
    with lab_mariadb.connect(lab, "warm") as conn, conn.cursor() as cur:
        cur.execute("STOP SLAVE SQL_THREAD")
    try:
        await _insert(db, "unapplied")
        msg = await _expect(
            DB_REPLICATION_BROKEN, replication.db_wait_replica_in_sync, WaitSyncRequest(db, 5)
        )
        assert "SQL thread" in msg
        # SQL thread running but applying slowly: the deadline counts the previous attempt.
        with lab_mariadb.connect(lab, "warm") as conn, conn.cursor() as cur:
            cur.execute("STOP SLAVE")
            cur.execute("CHANGE MASTER TO MASTER_DELAY = 30")
            cur.execute("START SLAVE")
        await _insert(db, "delayed")
        t0 = asyncio.get_running_loop().time()
        env = _env(previous={"waited_s": 9.0})
        msg = await _expect(
            DB_REPLICA_TIMEOUT, replication.db_wait_replica_in_sync, WaitSyncRequest(db, 10), env
        )
        assert asyncio.get_running_loop().time() - t0 < 5, "the retry did not keep the earlier deadline"
        assert "not in sync" in msg
    finally:
        with lab_mariadb.connect(lab, "warm") as conn, conn.cursor() as cur:
            cur.execute("STOP SLAVE")
            cur.execute("CHANGE MASTER TO MASTER_DELAY = 0")
            cur.execute("START SLAVE")
    await _sync(db)


# =========================================================================== writes stopped


@contextlib.asynccontextmanager
async def _writer(db: Database, every_s: float) -> AsyncIterator[list[int]]:
    """A client of the application's account inserting a row every `every_s` seconds on one
    connection; yields the count written so far."""
    written = [0]
    stop = asyncio.Event()

    async def run() -> None:
        async with mysql.connection(db) as conn, conn.cursor() as cur:
            while not stop.is_set():
                await cur.execute("INSERT INTO items (node, body) VALUES ('replication-test', 'busy')")
                written[0] += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), every_s)

    task = asyncio.create_task(run())
    try:
        yield written
    finally:
        stop.set()
        await task


async def test_writes_stopped_passes_when_idle_and_reports_open_connections(db: Database) -> None:
    # An idle client of the application's account: reported, but no write comes through it.
    async with mysql.connection(db) as idle:
        beats: list[Any] = []
        res = await _env(beats).run(replication.db_wait_writes_stopped, WritesStoppedRequest(db, 1.5, 30))
        assert res.quiet_s >= 1.5 and res.waited_s >= 1.5
        assert res.gtid == await _primary_pos(db)
        assert res.user_connections >= 1
        assert beats and {"waited_s", "gtid", "since"} <= set(beats[-1])
        assert not idle.closed


async def test_writes_stopped_times_out_while_a_client_keeps_writing(db: Database) -> None:
    async with _writer(db, 0.2) as written:
        msg = await _expect(
            DB_WRITES_CONTINUE,
            replication.db_wait_writes_stopped,
            WritesStoppedRequest(db, quiet_s=1.5, timeout_s=4),
        )
        assert written[0] >= 10
    assert "still being written to" in msg and f"of {db.user} are open" in msg
    # Once the writer is gone, it passes.
    res = await _env().run(replication.db_wait_writes_stopped, WritesStoppedRequest(db, 1.0, 30))
    assert res.quiet_s >= 1.0


async def test_writes_stopped_waits_for_an_uncommitted_write(db: Database) -> None:
    # A write not committed yet leaves the GTID position as it is: only its commit moves it.
    async with mysql.connection(db) as conn, conn.cursor() as cur:
        await conn.begin()
        await cur.execute("INSERT INTO items (node, body) VALUES ('replication-test', 'uncommitted')")
        msg = await _expect(
            DB_WRITES_CONTINUE,
            replication.db_wait_writes_stopped,
            WritesStoppedRequest(db, quiet_s=0.5, timeout_s=2),
        )
        assert "1 open transaction(s) hold changed rows" in msg
        await conn.rollback()
    res = await _env().run(replication.db_wait_writes_stopped, WritesStoppedRequest(db, 0.5, 30))
    assert res.pending_writes == 0 and res.quiet_s >= 0.5


async def test_writes_stopped_goes_on_from_an_earlier_watch(db: Database) -> None:
    # A watch saw the position unchanged for 2 s (while the writers were being stopped):
    # a wait given that sighting needs no more quiet time while the position is the same ...
    first = await _env().run(replication.db_wait_writes_stopped, WritesStoppedRequest(db, 0.3, 30))
    await asyncio.sleep(0.5)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    res = await _env().run(
        replication.db_wait_writes_stopped,
        WritesStoppedRequest(db, 0.7, 30, seen_gtid=first.gtid, seen_since=first.since),
    )
    assert loop.time() - t0 < 0.3 and res.quiet_s >= 0.7 and res.since == first.since
    # ... and the whole of it once a write moved the position.
    await _insert(db, "after-the-watch")
    t0 = loop.time()
    res = await _env().run(
        replication.db_wait_writes_stopped,
        WritesStoppedRequest(db, 0.7, 30, seen_gtid=first.gtid, seen_since=first.since),
    )
    assert loop.time() - t0 >= 0.7 and res.gtid != first.gtid and res.since > first.since


async def test_writes_stopped_retry_keeps_the_quiet_time_already_seen(db: Database) -> None:
    pos = await _primary_pos(db)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    # The previous attempt saw this position unchanged for 10 of the 12 s asked for.
    env = _env(previous={"waited_s": 10.0, "gtid": pos, "since": time.time() - 10.0})
    res = await env.run(replication.db_wait_writes_stopped, WritesStoppedRequest(db, 12, 60))
    assert loop.time() - t0 < 6 and res.quiet_s >= 12 and res.waited_s >= 12


# =========================================================================== stop, promote


async def test_stop_replication_keeps_the_warm_server_at_that_point(lab: LabConfig, db: Database) -> None:
    await _replicating(lab, db)
    await _insert(db, "before-stop")
    await _sync(db)
    st = await _env().run(replication.db_stop_replication, DbRequest(db))
    assert st.configured and (st.io_running, st.sql_running) == ("No", "No")
    assert st.gtid_slave_pos == await _primary_pos(db)
    at_stop, warm_at_stop = await _stats(db), await _stats(db, db.warm_replica)
    assert warm_at_stop.differences(at_stop) == ()

    # A later write on the primary does not arrive; the warm server keeps running and answering.
    later = f"after-stop-{uuid.uuid4().hex[:8]}"
    await _insert(db, later)
    await asyncio.sleep(1.5)
    assert await _count(_warm(db), later) == 0
    assert await asyncio.to_thread(lab_mariadb.instance_running, lab, "warm")
    again = await _env().run(replication.db_stop_replication, DbRequest(db))
    assert again.gtid_slave_pos == st.gtid_slave_pos and not again.running
    warm_now = await _stats(db, db.warm_replica)
    assert warm_now.differences(warm_at_stop) == ()
    # Not in sync any more, and never silently restarted by an initialisation.
    await _expect(DB_REPLICATION_BROKEN, replication.db_wait_replica_in_sync, WaitSyncRequest(db, 5))
    msg = await _expect(WARM_REPLICA_CONFLICT, replication.db_init_warm_replica, DbRequest(db))
    assert "stopped" in msg
    assert await _count(_warm(db), later) == 0


async def test_promote_makes_the_warm_server_a_writable_primary(lab: LabConfig, db: Database) -> None:
    if await _record_state(db) != replication.STOPPED:
        await _replicating(lab, db)
        await _env().run(replication.db_stop_replication, DbRequest(db))
    endpoint = await _env().run(replication.db_promote_warm_replica, DbRequest(db))
    assert endpoint == db.warm_replica
    st = await mysql.replica_status(db, db.warm_replica)
    assert not st.configured and not st.read_only
    # The application's account (copied with the data) writes there now.
    app_on_warm = dataclasses.replace(db, host=endpoint.host, port=endpoint.port, replica=None)
    body = f"on-promoted-{uuid.uuid4().hex[:8]}"
    await _insert(app_on_warm, body)
    assert await _count(app_on_warm, body) == 1
    assert await _count(db, body) == 0  # the primary knows nothing of it
    # Idempotent; then what would lose those writes is refused.
    assert await _env().run(replication.db_promote_warm_replica, DbRequest(db)) == endpoint
    for refused in (replication.db_release_warm_replica, replication.db_init_warm_replica):
        assert "promoted" in await _expect(WARM_REPLICA_CONFLICT, refused, DbRequest(db))
    assert await _count(app_on_warm, body) == 1


# =========================================================================== release


async def test_release_empties_the_warm_server_and_it_can_be_initialised_again(
    lab: LabConfig, db: Database
) -> None:
    await _replicating(lab, db)
    released = await _env().run(replication.db_release_warm_replica, DbRequest(db))
    assert released.was_replicating and "labapp" in released.dropped
    assert await asyncio.to_thread(lab_mariadb.warm_databases, lab) == []
    assert lab_mariadb.replica_status_of(lab, "warm") is None
    again = await _env().run(replication.db_release_warm_replica, DbRequest(db))
    assert again.dropped == () and not again.was_replicating
    st = await _env().run(replication.db_init_warm_replica, DbRequest(db))
    assert st.running
    await _sync(db)
