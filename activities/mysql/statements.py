"""A migration's statements, sent at most once across the retries of one activity.

Why: a statement outlives the attempt that sent it. When a worker dies mid-`ALTER TABLE`,
the server goes on with the statement (it notices the lost client only when it replies),
while Temporal hands the activity to another worker after the heartbeat timeout. A retry
that simply sent the statement again would queue behind the first one's lock, then fail
("Duplicate column name") or, worse, apply a data change twice.

How: every statement is logged in `zerodown_migration_log` in the migrated database, keyed
by the workflow run, the version and the direction (the same for every attempt of the step,
each its own activity execution), before it is sent (`running`, with the connection's id)
and after it returned (`done`). A data change (INSERT, UPDATE, DELETE, REPLACE) runs in one transaction
with its `done` mark, so the mark is there exactly when the change is. A retry:

  1. reads the log; a statement still `running` belongs to a lost attempt;
  2. waits (heartbeating) until that attempt's connection has left the server's process
     list: the statement finished, one way or the other;
  3. decides whether it took effect: a data change by its mark; DDL by what it changes
     (`effect_of`: the table, column or index); a statement that only sets session state
     never did; anything else cannot be told, and the step fails for a person to check
     (non-retryable, with the statement named);
  4. goes on with the first statement that has not taken effect.

The log rows are kept (an audit of what ran, when, on which connection); the restore of a
backup taken before the migration drops the table with everything else the migration made.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Literal

import aiomysql
import pymysql

from activities.common import fail, heartbeat
from activities.mysql.connect import MIGRATION_LOG_TABLE
from errors import DATABASE_ERROR

LOG_TABLE = MIGRATION_LOG_TABLE
_CREATE_LOG = (
    f"CREATE TABLE IF NOT EXISTS {LOG_TABLE} ("
    "run_key VARCHAR(255) NOT NULL, version INT NOT NULL, direction VARCHAR(4) NOT NULL, "
    "statement INT NOT NULL, connection_id BIGINT UNSIGNED NOT NULL, "
    "state VARCHAR(8) NOT NULL, changed_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), "
    "PRIMARY KEY (run_key, version, direction, statement)) ENGINE=InnoDB"
)
WAIT_POLL_S = 0.5
# A statement waits for a table lock at most LOCK_TRY_S at a time (lock_wait_timeout is whole
# seconds; 0 would not wait at all), then steps aside for LOCK_PAUSE_S so the site's queries
# queued behind it get through, and tries again within the inventory's budget.
LOCK_TRY_S = 1
LOCK_PAUSE_S = 0.5

# --------------------------------------------------------------------------- effects

_NAME = r"`(?:[^`]|``)+`|[A-Za-z0-9_$]+"
_QUALIFIED = rf"(?:(?:{_NAME})\s*\.\s*)?(?P<table>{_NAME})"
_I = re.IGNORECASE | re.DOTALL

# (pattern, what exists afterwards) of the DDL forms whose effect can be read back.
_TABLE_CREATED = re.compile(
    rf"^CREATE\s+(?:OR\s+REPLACE\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?{_QUALIFIED}", _I
)
_TABLE_DROPPED = re.compile(rf"^DROP\s+TABLE\s+(?:IF\s+EXISTS\s+)?{_QUALIFIED}\s*$", _I)
_ALTER = re.compile(rf"^ALTER\s+(?:ONLINE\s+|IGNORE\s+)*TABLE\s+{_QUALIFIED}\s+(?P<rest>.*)$", _I)
_COLUMN_ADDED = re.compile(rf"^ADD\s+(?:COLUMN\s+)?(?:IF\s+NOT\s+EXISTS\s+)?(?P<column>{_NAME})\s", _I)
_COLUMN_DROPPED = re.compile(rf"^DROP\s+(?:COLUMN\s+)?(?:IF\s+EXISTS\s+)?(?P<column>{_NAME})$", _I)
_INDEX_ADDED = re.compile(
    rf"^ADD\s+(?:UNIQUE\s+|FULLTEXT\s+|SPATIAL\s+)?(?:INDEX|KEY)\s+(?:IF\s+NOT\s+EXISTS\s+)?(?P<index>{_NAME})",
    _I,
)
_INDEX_DROPPED = re.compile(rf"^DROP\s+(?:INDEX|KEY)\s+(?:IF\s+EXISTS\s+)?(?P<index>{_NAME})$", _I)
_INDEX_CREATED = re.compile(
    rf"^CREATE\s+(?:OR\s+REPLACE\s+)?(?:UNIQUE\s+|FULLTEXT\s+|SPATIAL\s+)?INDEX\s+(?:IF\s+NOT\s+EXISTS\s+)?"
    rf"(?P<index>{_NAME})\s+ON\s+{_QUALIFIED}",
    _I,
)
_DATA_CHANGE = re.compile(r"^(?:INSERT|UPDATE|DELETE|REPLACE)\b", _I)
_SESSION_ONLY = re.compile(r"^(?:SET|SELECT|DO)\b", _I)
# Trailing options of an ALTER that change nothing by themselves.
_ALTER_OPTIONS = re.compile(r",\s*(?:ALGORITHM|LOCK)\s*=?\s*\w+\s*", _I)


def _unquote(name: str) -> str:
    return name[1:-1].replace("``", "`") if name.startswith("`") else name


def _top_level_commas(text: str) -> int:
    depth, quote, n = 0, "", 0
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"`":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            n += 1
    return n


EffectKind = Literal[
    "table", "no table", "column", "no column", "index", "no index", "data", "session", "unknown"
]


@dataclass(frozen=True)
class Effect:
    """What statement leaves behind that a retry can read back."""

    kind: EffectKind
    table: str = ""
    name: str = ""  # the column or index


def effect_of(statement: str) -> Effect:
    """The readable effect of one statement (see the module's docstring, step 3)."""
    s = statement.strip()
    if _DATA_CHANGE.match(s):
        return Effect("data")
    if _SESSION_ONLY.match(s):
        return Effect("session")
    if m := _INDEX_CREATED.match(s):
        return Effect("index", _unquote(m["table"]), _unquote(m["index"]))
    if m := _TABLE_CREATED.match(s):
        return Effect("table", _unquote(m["table"]))
    if m := _TABLE_DROPPED.match(s):
        return Effect("no table", _unquote(m["table"]))
    if m := _ALTER.match(s):
        table = _unquote(m["table"])
        rest = _ALTER_OPTIONS.sub(" ", m["rest"]).strip()
        if _top_level_commas(rest) == 0:  # one change: more could have been half-applied
            if c := _INDEX_ADDED.match(rest):
                return Effect("index", table, _unquote(c["index"]))
            if c := _INDEX_DROPPED.match(rest):
                return Effect("no index", table, _unquote(c["index"]))
            if c := _COLUMN_DROPPED.match(rest):
                return Effect("no column", table, _unquote(c["column"]))
            if c := _COLUMN_ADDED.match(rest + " "):
                if _unquote(c["column"]).upper() not in ("CONSTRAINT", "PRIMARY", "FOREIGN", "CHECK"):
                    return Effect("column", table, _unquote(c["column"]))
    return Effect("unknown")


async def took_effect(cur: aiomysql.Cursor, effect: Effect) -> bool | None:
    """Whether a DDL statement's effect is in the database now; None: it cannot be told."""
    if effect.kind in ("table", "no table"):
        await cur.execute(
            "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() "
            "AND TABLE_NAME = %s",
            (effect.table,),
        )
    elif effect.kind in ("column", "no column"):
        await cur.execute(
            "SELECT COUNT(*) FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() "
            "AND TABLE_NAME = %s AND COLUMN_NAME = %s",
            (effect.table, effect.name),
        )
    elif effect.kind in ("index", "no index"):
        await cur.execute(
            "SELECT COUNT(*) FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE() "
            "AND TABLE_NAME = %s AND INDEX_NAME = %s",
            (effect.table, effect.name),
        )
    elif effect.kind == "session":
        return False
    else:
        return None
    row = await cur.fetchone()
    present = bool(row and row[0])
    return present if not effect.kind.startswith("no ") else not present


# --------------------------------------------------------------------------- the log


@dataclass(frozen=True)
class Resumed:
    """Where a retry goes on: the first statement to send, and what it found."""

    next_statement: int  # 1-based
    waited_for_connection: int = 0  # a lost attempt's connection that was still running
    in_flight_took_effect: bool = False


async def _connection_alive(cur: aiomysql.Cursor, connection_id: int) -> bool:
    await cur.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = %s", (connection_id,))
    row = await cur.fetchone()
    return bool(row and row[0])


async def wait_for_connection_gone(cur: aiomysql.Cursor, connection_id: int, what: str) -> bool:
    """Wait, heartbeating, until `connection_id` is no longer on the server; True when it
    was there at first. Bounded by the activity's own start-to-close timeout."""
    waited = False
    while await _connection_alive(cur, connection_id):
        waited = True
        heartbeat({"step": what, "waiting_for_connection": connection_id})
        await asyncio.sleep(WAIT_POLL_S)
    return waited


async def resume(
    cur: aiomysql.Cursor, run_key: str, version: int, direction: str, statements: list[str], what: str
) -> Resumed:
    """Create the log if needed and find where this execution goes on (docstring, 1-4)."""
    await cur.execute(_CREATE_LOG)
    # The other direction of this version, tried earlier in the run (an up that failed, now
    # undone; a down before an up again): its statement may still run - wait for it - and
    # its log says nothing about this direction's statements.
    other = "down" if direction == "up" else "up"
    await cur.execute(
        f"SELECT connection_id FROM {LOG_TABLE} WHERE run_key = %s AND version = %s AND direction = %s "
        "AND state <> 'done'",
        (run_key, version, other),
    )
    for (conn_id,) in list(await cur.fetchall()):
        await wait_for_connection_gone(cur, int(conn_id), what)
    await forget(cur, run_key, version, other)
    await cur.execute(
        f"SELECT statement, connection_id, state FROM {LOG_TABLE} "
        "WHERE run_key = %s AND version = %s AND direction = %s ORDER BY statement",
        (run_key, version, direction),
    )
    rows = list(await cur.fetchall())
    done = {int(r[0]) for r in rows if r[2] == "done"}
    running = [(int(r[0]), int(r[1])) for r in rows if r[2] != "done"]
    nxt = 1
    while nxt in done:
        nxt += 1
    if not running:
        return Resumed(next_statement=nxt)
    stmt_no, conn_id = running[-1]
    waited = await wait_for_connection_gone(cur, conn_id, what)
    # The connection is gone: its transaction, if any, is committed or rolled back by now.
    await cur.execute(
        f"SELECT state FROM {LOG_TABLE} WHERE run_key = %s AND version = %s AND direction = %s "
        "AND statement = %s",
        (run_key, version, direction, stmt_no),
    )
    row = await cur.fetchone()
    if row and row[0] == "done":
        return Resumed(
            next_statement=stmt_no + 1,
            waited_for_connection=conn_id if waited else 0,
            in_flight_took_effect=True,
        )
    effect = effect_of(statements[stmt_no - 1]) if stmt_no <= len(statements) else Effect("unknown")
    if effect.kind == "data":  # ran in a transaction with its mark: no mark, no change
        return Resumed(next_statement=stmt_no, waited_for_connection=conn_id if waited else 0)
    taken = await took_effect(cur, effect)
    if taken is None:
        fail(
            DATABASE_ERROR,
            f"{what}: statement {stmt_no}/{len(statements)} "
            f"{statements[stmt_no - 1][:200]!r} was running when the attempt that sent it was "
            "lost; it has ended, but whether it took effect cannot be read back. Check the "
            "database, then decide at the failure gate (retry runs the migration from its first "
            "statement; skip if it took effect)",
        )
    if taken:
        await mark(cur, run_key, version, direction, stmt_no, "done")
    return Resumed(
        next_statement=stmt_no + 1 if taken else stmt_no,
        waited_for_connection=conn_id if waited else 0,
        in_flight_took_effect=taken,
    )


async def mark(
    cur: aiomysql.Cursor, run_key: str, version: int, direction: str, statement: int, state: str
) -> None:
    await cur.execute(
        f"INSERT INTO {LOG_TABLE} (run_key, version, direction, statement, connection_id, state) "
        "VALUES (%s, %s, %s, %s, CONNECTION_ID(), %s) "
        "ON DUPLICATE KEY UPDATE connection_id = CONNECTION_ID(), state = VALUES(state), "
        "changed_at = CURRENT_TIMESTAMP(6)",
        (run_key, version, direction, statement, state),
    )


async def send_once(
    cur: aiomysql.Cursor,
    run_key: str,
    version: int,
    direction: str,
    statement_no: int,
    statement: str,
    lock_budget_s: float = 10.0,
) -> None:
    """Log, send and mark one statement; a data change commits together with its mark.

    The session waits at most LOCK_TRY_S for a lock (set by the caller): a statement queued
    behind a lock holds every later query on the table, so it queues a second at most, lets
    the queries behind it through, and tries again until `lock_budget_s` is spent; then the
    lock wait timeout (1205) is raised. Nothing of the statement was applied meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + lock_budget_s
    while True:
        try:
            await _send(cur, run_key, version, direction, statement_no, statement)
            return
        except pymysql.MySQLError as e:
            if not (e.args and e.args[0] == 1205) or loop.time() + LOCK_PAUSE_S >= deadline:
                raise
        heartbeat({"statement": statement_no, "waiting_for": "table lock"})
        await asyncio.sleep(LOCK_PAUSE_S)


async def _send(
    cur: aiomysql.Cursor, run_key: str, version: int, direction: str, statement_no: int, statement: str
) -> None:
    await mark(cur, run_key, version, direction, statement_no, "running")
    if effect_of(statement).kind == "data":
        await cur.execute("START TRANSACTION")
        try:
            await cur.execute(statement)
            await mark(cur, run_key, version, direction, statement_no, "done")
            await cur.execute("COMMIT")
        except (pymysql.MySQLError, OSError):
            await _rollback_quietly(cur)
            raise
        return
    await cur.execute(statement)
    await mark(cur, run_key, version, direction, statement_no, "done")


async def _rollback_quietly(cur: aiomysql.Cursor) -> None:
    try:
        await cur.execute("ROLLBACK")
    except (pymysql.MySQLError, OSError):
        pass  # the connection is gone: the server rolls back on its own


async def forget(cur: aiomysql.Cursor, run_key: str, version: int, direction: str) -> None:
    await cur.execute(
        f"DELETE FROM {LOG_TABLE} WHERE run_key = %s AND version = %s AND direction = %s",
        (run_key, version, direction),
    )
