"""Database helpers for tests (not product code): wait until the lab's replica applied what
the primary has binlogged, so a test reads the replica after its writes."""

from __future__ import annotations

import time

from activities import mysql
from inventory.model import Database


async def replica_caught_up(db: Database, timeout_s: float = 30.0) -> str:
    """The primary's GTID position once the replica has applied it (MASTER_GTID_WAIT in 1 s
    slices); AssertionError after `timeout_s` or when the replica's SQL thread stopped."""
    started = time.monotonic()
    pos = str((await mysql.query(db, "SELECT @@GLOBAL.gtid_binlog_pos", use_database=False))[0][0] or "")
    while pos:
        got = (
            await mysql.query(db, "SELECT MASTER_GTID_WAIT(%s, 1)", (pos,), replica=True, use_database=False)
        )[0][0]
        if got == 0:
            break
        st = await mysql.replica_status(db)
        assert st.configured and st.sql_running == "Yes", f"replica not applying: {st}"
        assert time.monotonic() - started < timeout_s, f"replica did not reach {pos}: {st}"
    return pos
