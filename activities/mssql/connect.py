"""SQL Server: connecting (aioodbc over unixODBC), running a batch to its end, the error policy,
and finding the writable primary.

Driver: FreeTDS by default (Debian `tdsodbc`); Microsoft's "ODBC Driver 18 for SQL Server"
when the inventory names it (README "SQL Server"). The connection string is built from the
inventory (`databases[].odbc`), the password resolved from its secret reference here, never
earlier.

How outcomes are judged (pyodbc over unixODBC, as its maintainers describe it in
mkleehammer/pyodbc issues #471, #740 and #851, and its source, src/errors.cpp): a batch
returns one result per statement and per progress message; until every one has been read
with nextset(), a BACKUP may not have finished and an error behind the first result is never
raised. So `run_batch` reads every result and every informational message, and the caller
judges a BACKUP / RESTORE by SQL Server's own message numbers (3014, 3262), not by the
absence of an exception. SQL Server reports a failed BACKUP / RESTORE as a pair, the cause
then 3013 "... terminating abnormally"; pyodbc on Linux raises with only the first
diagnostic record, and FreeTDS orders records by severity (src/odbc/error.c, rank_errors),
so an error may show either number: the policy matches on every number it finds.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aioodbc
import pyodbc

from activities.common import fail
from activities.secrets import resolve_secret
from errors import DATABASE_ERROR, DB_UNSUPPORTED, INVALID_REQUEST
from inventory.model import Database

FREETDS = "FreeTDS"
MS_DRIVER_18 = "ODBC Driver 18 for SQL Server"
# A connection and a login may take this long (seconds).
CONNECT_TIMEOUT_S = 10
# Native errors a retry can fix: deadlock victim (1205); the server starting, failing over
# or busy (4060 while a database recovers, 40613/40501/49918 on Azure SQL); severity-20
# "severe error" (0).
RETRYABLE_NUMBERS = frozenset({0, 1205, 4060, 40501, 40613, 49918})
# A database this server cannot open because it is an availability group secondary (976)
# or a mirror (954): not retried; the error names the primary (require_primary).
NOT_PRIMARY_NUMBERS = frozenset({976, 954})
# ODBC SQLSTATEs of a lost or unreachable connection, or a query timeout (HYT00/HYT01).
RETRYABLE_STATES = frozenset({"08S01", "08001", "08003", "08004", "08007", "HYT00", "HYT01", "01002"})
LOCK_TIMEOUT = 1222
_NATIVE = re.compile(r"\[SQL Server\](.*?)\s*\((\d+)\)(?:\s*\(SQL\w+\))?(?:;|$)", re.DOTALL)
_MESSAGE_ID = re.compile(r"\((\d+)\)")


@dataclass(frozen=True)
class ServerMessage:
    number: int
    text: str


@dataclass(frozen=True)
class BatchOutcome:
    """Every result set (as rows) and every informational message of one batch, in order."""

    result_sets: list[list[tuple[Any, ...]]] = field(default_factory=list)
    columns: list[list[str]] = field(default_factory=list)  # each result set's column names
    messages: list[ServerMessage] = field(default_factory=list)
    rowcounts: list[int] = field(default_factory=list)

    def numbers(self) -> set[int]:
        return {m.number for m in self.messages}

    def first_rows(self) -> list[tuple[Any, ...]]:
        return self.result_sets[0] if self.result_sets else []

    def first_dicts(self) -> list[dict[str, Any]]:
        if not self.result_sets:
            return []
        return [dict(zip(self.columns[0], row, strict=False)) for row in self.result_sets[0]]


class SqlServerError(Exception):
    """A failed batch with SQL Server's native numbers (every one the driver reported)."""

    def __init__(
        self, sqlstate: str, numbers: tuple[int, ...], text: str, messages: list[ServerMessage]
    ) -> None:
        super().__init__(text)
        self.sqlstate = sqlstate
        self.numbers = numbers
        self.text = text
        self.messages = messages  # informational ones that came before the error

    @property
    def retryable(self) -> bool:
        return bool(set(self.numbers) & RETRYABLE_NUMBERS) or self.sqlstate in RETRYABLE_STATES


def _brace(value: str) -> str:
    """An ODBC connection-string value: in braces, a '}' doubled (ODBC's quoting rule)."""
    return "{" + value.replace("}", "}}") + "}"


def connection_string(db: Database, password: str, database: str | None, app: str = "zerodown") -> str:
    """The ODBC connection string for `db` (README "SQL Server": the driver and TLS keywords);
    `database` instead of the inventory's (e.g. master)."""
    odbc = db.odbc
    driver = odbc.driver if odbc else FREETDS
    parts: dict[str, str] = {"DRIVER": _brace(driver)}
    if driver == MS_DRIVER_18 or driver.startswith("ODBC Driver"):
        # Microsoft's driver has no Port keyword: Server=tcp:host,port.
        parts["SERVER"] = f"tcp:{db.host},{db.port}"
        parts["Encrypt"] = odbc.encrypt if odbc and odbc.encrypt else "yes"
        parts["TrustServerCertificate"] = "yes" if odbc and odbc.trust_server_certificate else "no"
        if odbc and odbc.host_name_in_certificate:
            parts["HostNameInCertificate"] = odbc.host_name_in_certificate
    else:
        parts["SERVER"] = db.host
        parts["PORT"] = str(db.port)
        parts["TDS_Version"] = "7.4"
        parts["ClientCharset"] = "UTF-8"
        parts["Encryption"] = odbc.encrypt if odbc and odbc.encrypt else "request"
    parts["UID"] = _brace(db.user)
    parts["PWD"] = _brace(password)
    parts["DATABASE"] = _brace(database or db.database)
    parts["APP"] = _brace(app)
    for key, value in (odbc.options if odbc else {}).items():
        parts[key] = _brace(value) if any(c in value for c in ";{}") else value
    return ";".join(f"{k}={v}" for k, v in parts.items()) + ";"


def parse_error(e: BaseException) -> SqlServerError:
    """SQL Server's numbers out of a pyodbc error ("[state] [driver][SQL Server]text (n) ...")."""
    if isinstance(e, SqlServerError):
        return e
    state = str(e.args[0]) if isinstance(e, pyodbc.Error) and e.args else ""
    text = str(e.args[1]) if isinstance(e, pyodbc.Error) and len(e.args) > 1 else str(e) or type(e).__name__
    found = _NATIVE.findall(text)
    numbers = tuple(int(n) for _, n in found)
    clean = "; ".join(f"{t.strip()} ({n})" for t, n in found) if found else text
    return SqlServerError(state, numbers, clean, [])


def raise_db(db: Database, what: str, e: BaseException, retryable: bool | None = None) -> None:
    err = parse_error(e)
    fail(
        DATABASE_ERROR,
        f"database {db.name} ({db.user}@{db.host}:{db.port}/{db.database}): {what}: {err.text}",
        retryable=err.retryable if retryable is None else retryable,
        cause=e,
    )


@contextlib.asynccontextmanager
async def connection(
    db: Database, database: str | None = None, autocommit: bool = True, app: str = "zerodown"
) -> AsyncIterator[aioodbc.Connection]:
    """A connection to `database` (default: the inventory's; "master" for server-level work).
    Autocommit is on unless asked: BACKUP / RESTORE refuse to run in a transaction, and
    pyodbc's default (off) leaves one open after the first statement."""
    if db.kind != "mssql":
        fail(DB_UNSUPPORTED, f"database {db.name}: kind {db.kind} is not SQL Server")
    password = resolve_secret(db.password, needed_by=f"database {db.name}")
    dsn = connection_string(db, password, database or db.database, app)
    try:
        conn = await aioodbc.connect(dsn=dsn, autocommit=autocommit, timeout=CONNECT_TIMEOUT_S)
    except (pyodbc.Error, OSError) as e:
        if set(parse_error(e).numbers) & NOT_PRIMARY_NUMBERS and (database or db.database) != "master":
            await require_primary(db)  # names the primary (from master, which a secondary opens)
        raise_db(db, "connect", e)
    try:
        yield conn
    finally:
        with contextlib.suppress(pyodbc.Error, OSError):
            await conn.close()


def _messages_of(cursor: Any) -> list[ServerMessage]:
    out: list[ServerMessage] = []
    for ident, text in getattr(cursor, "messages", None) or []:
        m = _MESSAGE_ID.search(str(ident))
        body = str(text).split("[SQL Server]", 1)[-1]
        out.append(ServerMessage(int(m.group(1)) if m else 0, body))
    return out


def _run_blocking(cursor: pyodbc.Cursor, sql: str) -> BatchOutcome:
    """Execute and read the batch to its end: every result set, message and row count."""
    outcome = BatchOutcome()
    try:
        cursor.execute(sql)
        while True:
            outcome.messages.extend(_messages_of(cursor))
            if cursor.description is not None:
                outcome.columns.append([str(d[0]) for d in cursor.description])
                outcome.result_sets.append([tuple(r) for r in cursor.fetchall()])
            else:
                outcome.rowcounts.append(cursor.rowcount)
            if not cursor.nextset():
                break
    except pyodbc.Error as e:
        err = parse_error(e)
        err.messages = outcome.messages + _messages_of(cursor)
        raise err from e
    return outcome


async def run_batch(conn: aioodbc.Connection, sql: str) -> BatchOutcome:
    """One batch, read to its end (see the module docstring); SqlServerError on failure.
    The driver blocks, so it runs in a thread; the caller heartbeats meanwhile."""
    raw: pyodbc.Connection = conn._conn  # aioodbc's wrapped pyodbc connection
    cursor = raw.cursor()
    try:
        return await asyncio.to_thread(_run_blocking, cursor, sql)
    finally:
        with contextlib.suppress(pyodbc.Error):
            cursor.close()


async def query(db: Database, sql: str, database: str | None = None) -> list[tuple[Any, ...]]:
    async with connection(db, database) as conn:
        try:
            return (await run_batch(conn, sql)).first_rows()
        except SqlServerError as e:
            raise_db(db, f"query {sql[:120]!r}", e)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- names and literals


def ident(name: str) -> str:
    """A T-SQL delimited identifier: [name] with ']' doubled."""
    return "[" + name.replace("]", "]]") + "]"


def nstring(value: str) -> str:
    """A T-SQL Unicode string literal: N'...' with quotes doubled."""
    return "N'" + value.replace("'", "''") + "'"


_NAME_RE = re.compile(r"[A-Za-z0-9_$][A-Za-z0-9_$-]{0,127}")


def check_name(db: Database, what: str, name: str) -> None:
    if not _NAME_RE.fullmatch(name or ""):
        fail(INVALID_REQUEST, f"database {db.name}: {what} {name!r} is not a plain name")


# --------------------------------------------------------------------------- high availability


@dataclass(frozen=True)
class PrimaryCheck:
    writable: bool
    role: str  # STANDALONE, PRIMARY, SECONDARY, PRINCIPAL, MIRROR
    primary: str  # the server to point the inventory at when this one is not writable
    detail: str


_AG_ROLE = (
    "SELECT ars.role_desc, ags.primary_replica FROM sys.dm_hadr_availability_replica_states ars "
    "JOIN sys.dm_hadr_availability_group_states ags ON ags.group_id = ars.group_id "
    "JOIN sys.availability_databases_cluster adc ON adc.group_id = ars.group_id "
    "WHERE ars.is_local = 1 AND adc.database_name = {db}"
)
_MIRROR_ROLE = (
    "SELECT mirroring_role_desc, mirroring_partner_instance, mirroring_state_desc "
    "FROM sys.database_mirroring "
    "WHERE database_id = DB_ID({db}) AND mirroring_guid IS NOT NULL"
)


async def primary_check(db: Database) -> PrimaryCheck:
    """Is this server the writable primary of the database? An Always On availability
    group (sys.dm_hadr_*) or database mirroring (sys.database_mirroring) may make it a
    secondary or a mirror; read from master, as a mirror's database cannot be opened."""
    name = nstring(db.database)
    async with connection(db, "master") as conn:
        try:
            hadr = (await run_batch(conn, "SELECT SERVERPROPERTY('IsHadrEnabled')")).first_rows()
            if hadr and hadr[0][0] == 1:
                rows = (await run_batch(conn, _AG_ROLE.format(db=name))).first_rows()
                if rows:
                    role, primary = str(rows[0][0]), str(rows[0][1] or "")
                    return PrimaryCheck(
                        role == "PRIMARY",
                        role,
                        primary,
                        f"availability group replica role {role}, primary {primary}",
                    )
            rows = (await run_batch(conn, _MIRROR_ROLE.format(db=name))).first_rows()
        except SqlServerError as e:
            raise_db(db, "reading the availability state", e)
    if rows:
        role, partner, state = str(rows[0][0]), str(rows[0][1] or ""), str(rows[0][2] or "")
        return PrimaryCheck(
            role == "PRINCIPAL", role, partner, f"database mirroring role {role} ({state}), partner {partner}"
        )
    return PrimaryCheck(
        True, "STANDALONE", f"{db.host}:{db.port}", "not in an availability group or mirroring session"
    )


async def require_primary(db: Database) -> PrimaryCheck:
    """DatabaseError (not retryable) naming the primary when this server is a secondary."""
    check = await primary_check(db)
    if not check.writable:
        fail(
            DATABASE_ERROR,
            f"database {db.name} ({db.host}:{db.port}/{db.database}) is the {check.role.lower()}, not the "
            f"writable primary ({check.detail}): point the inventory at {check.primary}",
            retryable=False,
        )
    return check
