"""The lab's SQL Server engine: T-SQL sessions over the lab's MariaDB, with the catalog,
transactions, BACKUP / RESTORE on real files, KILL and availability state.

Each TDS session (lab/mssql/tds.py) gets one MariaDB connection (root over the socket,
NO_BACKSLASH_ESCAPES: T-SQL has no backslash escapes) and runs its statements there after
translating them (lab/mssql/tsql.py, lab/mssql/catalog.py); a SQL Server database is the
MariaDB database of the same name, so the lab app keeps serving from the data zerodown
migrates and backs up. What SQL Server does that catches adapters out is kept:

- an error ends the statement, not the batch (unless it is one that aborts the batch, or
  XACT_ABORT is ON): a script that ignores errors goes on past them;
- BACKUP / RESTORE refuse to run in a transaction (3021 + 3013);
- a RESTORE over a database others use fails (3101 + 3013) unless they were put out
  (ALTER DATABASE ... SET SINGLE_USER WITH ROLLBACK IMMEDIATE);
- a restore to a new name without MOVE collides with the original's files (1834 / 3156 /
  3119 / 3013);
- a failed BACKUP / RESTORE reports a pair, the specific message then 3013;
- success is only in the messages (4035, 3014, 3262): nothing else says a backup worked.

DDL is transactional in SQL Server and not in MariaDB: inside a transaction the engine keeps
an undo list (a created table, column or index is dropped again; a table altered, truncated
or dropped is first copied into the `zdlab_mssql` database and swapped back), run on
ROLLBACK, on XACT_ABORT and when the connection is lost. Data changed before a DDL statement
in the same transaction is committed by MariaDB's implicit commit: the lab's scripts do not
mix the two, and lab/mssql/README.md says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import decimal
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiomysql
import pymysql

from lab.mssql import backups
from lab.mssql import messages as msg
from lab.mssql.catalog import Catalog, View, checksum_expression
from lab.mssql.results import Column, Done, EnvChange, Item, Login, LoginFailed, Message, ResultSet, SqlType
from lab.mssql.tsql import (
    Block,
    If,
    Node,
    Statement,
    Token,
    TsqlError,
    literal,
    object_name,
    parse,
    quote_ident,
    quote_string,
    table_of,
    tokenize,
    translate,
)

log = logging.getLogger("lab.mssql")

VERSION = (16, 0, 1000)
VERSION_TEXT = (
    "Microsoft SQL Server 2022 (RTM) - 16.0.1000.6 (X64) \n\tOct  8 2022 05:58:25 \n\tCopyright (C) 2022 "
    "Microsoft Corporation\n\tDeveloper Edition (64-bit) on Linux (zerodown lab stand-in) <X64>"
)
SYSTEM_DATABASES = {"master": 1, "tempdb": 2, "model": 3, "msdb": 4}
# MariaDB databases that are not SQL Server databases of the lab: the server's own, the
# engine's (master's stand-in and the undo copies) and the lab's fault switches.
HIDDEN = frozenset({"mysql", "information_schema", "performance_schema", "sys", "zdlab", "zdlab_mssql"})
MASTER_STANDIN = "zdlab_mssql_master"
UNDO_DB = "zdlab_mssql"
# Statements that open a transaction when IMPLICIT_TRANSACTIONS is ON (Learn, "SET
# IMPLICIT_TRANSACTIONS": ALTER TABLE, CREATE, DELETE, DROP, FETCH, GRANT, INSERT, OPEN,
# REVOKE, SELECT (with a table), TRUNCATE TABLE, UPDATE).
_IMPLICIT = frozenset({"ALTER", "CREATE", "DELETE", "DROP", "INSERT", "SELECT", "TRUNCATE", "UPDATE"})
# Errors that end the whole batch, not only the statement (Learn, "Database engine error
# severities" and the behaviour of deferred name resolution / conversion errors).
_BATCH_ABORTING = frozenset({207, 208, 245, 1205, 0})


class BatchAbort(Exception):
    pass


class Terminated(Exception):
    """The session was killed or lost its MariaDB connection: the TDS layer closes it."""


@dataclass(frozen=True)
class LoginSpec:
    password: str
    roles: tuple[str, ...] = ()
    default_database: str = "master"


@dataclass
class DbState:
    database_id: int
    files: list[backups.DbFile]
    user_access: str = "MULTI_USER"  # or SINGLE_USER
    single_user_spid: int = 0


@dataclass(frozen=True)
class ServerConfig:
    mariadb_socket: str
    state_dir: str
    logins: dict[str, LoginSpec]
    server_name: str = "LABSQL"

    @property
    def data_dir(self) -> str:
        return os.path.join(self.state_dir, "data")

    @property
    def ha_file(self) -> str:
        """Availability state (JSON); tests and `zerodown lab` write it: {"availability_group":
        {"name", "local_role": PRIMARY|SECONDARY, "primary_replica", "local_replica",
        "databases": [...]}} or {"mirroring": {db: {"role": PRINCIPAL|MIRROR,
        "partner_instance", "partner_name", "state"}}}."""
        return os.path.join(self.state_dir, "ha.json")


def load_logins(path: str) -> dict[str, LoginSpec]:
    raw = json.loads(Path(path).read_text())
    return {
        user: LoginSpec(
            spec["password"], tuple(spec.get("roles", ())), spec.get("default_database", "master")
        )
        for user, spec in raw.items()
    }


@dataclass
class Running:
    command: str
    started: dt.datetime
    database: str
    percent: float = 0.0


class LabSqlServer:
    """The Engine (lab/mssql/results.py) the TDS layer serves."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.sessions: dict[int, LabSession] = {}
        self._next_spid = 51  # user sessions start above the system ones
        self._state_path = os.path.join(cfg.state_dir, "databases.json")
        self._dbs: dict[str, DbState] = {}
        self._lock = asyncio.Lock()
        os.makedirs(cfg.data_dir, exist_ok=True)
        self._load_state()

    @property
    def server_name(self) -> str:
        return self.cfg.server_name

    @property
    def version(self) -> tuple[int, int, int]:
        return VERSION

    # ------------------------------------------------------------------ state
    def _load_state(self) -> None:
        try:
            raw = json.loads(Path(self._state_path).read_text())
        except (OSError, ValueError):
            raw = {}
        for name, d in raw.items():
            self._dbs[name] = DbState(
                d["database_id"],
                [backups.DbFile(**f) for f in d["files"]],
                d.get("user_access", "MULTI_USER"),
            )

    def save_state(self) -> None:
        data = {
            name: {
                "database_id": s.database_id,
                "files": [vars(f) for f in s.files],
                "user_access": s.user_access,
            }
            for name, s in self._dbs.items()
        }
        tmp = self._state_path + ".tmp"
        Path(tmp).write_text(json.dumps(data, indent=1))
        os.replace(tmp, self._state_path)

    def default_files(self, name: str) -> list[backups.DbFile]:
        d = self.cfg.data_dir
        return [
            backups.DbFile(name, os.path.join(d, f"{name}.mdf"), "D", 1),
            backups.DbFile(f"{name}_log", os.path.join(d, f"{name}_log.ldf"), "L", 2),
        ]

    def db_state(self, name: str) -> DbState:
        """The stand-in's record of a database (made on first sight: a database the lab
        created in MariaDB directly gets default files)."""
        key = name.lower()
        for existing, st in self._dbs.items():
            if existing.lower() == key:
                return st
        used = {s.database_id for s in self._dbs.values()} | set(SYSTEM_DATABASES.values())
        st = DbState(max(used) + 1, self.default_files(name))
        self._dbs[name] = st
        for f in st.files:
            with contextlib.suppress(OSError):
                Path(f.physical).touch(mode=0o600)
        self.save_state()
        return st

    def forget(self, name: str) -> None:
        for existing in list(self._dbs):
            if existing.lower() == name.lower():
                for f in self._dbs[existing].files:
                    with contextlib.suppress(OSError):
                        os.unlink(f.physical)
                del self._dbs[existing]
        self.save_state()

    def set_files(self, name: str, files: list[backups.DbFile]) -> None:
        st = self.db_state(name)
        st.files = files
        for f in files:
            with contextlib.suppress(OSError):
                Path(f.physical).touch(mode=0o600)
        self.save_state()

    def file_owner(self, physical: str) -> str | None:
        for name, st in self._dbs.items():
            if any(os.path.abspath(f.physical) == os.path.abspath(physical) for f in st.files):
                return name
        return None

    def product_version(self) -> str:
        """SERVERPROPERTY('ProductVersion'): SQL Server 2022's unless a test made the server
        another version (lab/mssql/lab.py set_product_version: `server.json` next to ha.json)."""
        try:
            data = json.loads(Path(self.cfg.ha_file).with_name("server.json").read_text())
            return str(data["product_version"])
        except (OSError, ValueError, KeyError, TypeError):
            return "16.0.1000.6"

    def ha(self) -> dict[str, Any]:
        try:
            data = json.loads(Path(self.cfg.ha_file).read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    # ------------------------------------------------------------------ MariaDB
    async def mariadb(self, database: str | None = None) -> aiomysql.Connection:
        conn = await aiomysql.connect(
            unix_socket=self.cfg.mariadb_socket, user="root", db=database, autocommit=True, connect_timeout=10
        )
        async with conn.cursor() as cur:
            await cur.execute("SET SESSION sql_mode = CONCAT(@@sql_mode, ',NO_BACKSLASH_ESCAPES')")
        return conn

    async def admin(self, sql: str) -> list[tuple[Any, ...]]:
        conn = await self.mariadb()
        try:
            async with conn.cursor() as cur:
                await cur.execute(sql)
                return list(await cur.fetchall())
        finally:
            conn.close()

    async def databases(self) -> list[str]:
        rows = await self.admin("SELECT SCHEMA_NAME FROM information_schema.SCHEMATA ORDER BY SCHEMA_NAME")
        return [r[0] for r in rows if r[0] not in HIDDEN and r[0] != MASTER_STANDIN]

    async def exists(self, name: str) -> str | None:
        """The database's name as stored, or None."""
        if name.lower() in SYSTEM_DATABASES:
            return name.lower()
        for d in await self.databases():
            if d.lower() == name.lower():
                return d
        return None

    async def refresh(self) -> None:
        """Know every database MariaDB has (the lab creates some directly); forget dropped ones."""
        names = await self.databases()
        for n in names:
            self.db_state(n)
        gone = [n for n in self._dbs if n not in names]
        for n in gone:
            del self._dbs[n]
        if gone:
            self.save_state()

    async def users_of(self, name: str, except_spid: int) -> list[str]:
        """Who uses a database besides session `except_spid`: other TDS sessions, and
        MariaDB connections on it that are not the engine's own (the lab app's pool)."""
        users = [
            f"spid {s.spid}"
            for s in self.sessions.values()
            if s.spid != except_spid and s.database.lower() == name.lower()
        ]
        own = {s.thread_id for s in self.sessions.values()}
        rows = await self.admin(
            "SELECT ID, USER, HOST FROM information_schema.PROCESSLIST WHERE DB = "
            + quote_string(name)
            + " AND ID <> CONNECTION_ID() AND COMMAND <> 'Daemon'"
        )
        users += [f"connection {r[0]} ({r[1]}@{r[2]})" for r in rows if r[0] not in own]
        return users

    async def put_out(self, name: str, except_spid: int) -> None:
        """SINGLE_USER WITH ROLLBACK IMMEDIATE: every other user of the database is put out."""
        for s in list(self.sessions.values()):
            if s.spid != except_spid and s.database.lower() == name.lower():
                await s.terminate()
        own = {s.thread_id for s in self.sessions.values()}
        rows = await self.admin(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = "
            + quote_string(name)
            + " AND ID <> CONNECTION_ID()"
        )
        for (tid,) in rows:
            if tid not in own:
                with contextlib.suppress(pymysql.MySQLError):
                    await self.admin(f"KILL CONNECTION {int(tid)}")

    # ------------------------------------------------------------------ sessions
    async def open_session(self, login: Login) -> tuple[LabSession, list[Item]]:
        spec = self.cfg.logins.get(login.user)
        if spec is None or spec.password != login.password:
            raise LoginFailed(msg.LOGIN_FAILED(user=login.user))
        database = login.database or spec.default_database
        found = await self.exists(database)
        if found is None:
            raise LoginFailed(msg.CANNOT_OPEN_AT_LOGIN(name=database), msg.LOGIN_FAILED(user=login.user))
        refusal = self.refuses(found)
        if refusal is not None:
            raise LoginFailed(refusal, msg.LOGIN_FAILED(user=login.user))
        spid = self._next_spid
        self._next_spid += 1
        conn = await self.mariadb()
        session = LabSession(self, spid, login, spec, conn)
        await session.use_mariadb(found)
        session.database = found
        self.sessions[spid] = session
        items: list[Item] = [EnvChange("database", found, "master"), msg.CHANGED_DATABASE(name=found)]
        return session, items

    def refuses(self, database: str) -> Message | None:
        """A database this replica cannot open: an availability group's secondary (976) or a
        mirror (954), as the real server refuses them."""
        ha = self.ha()
        ag = ha.get("availability_group")
        if ag and ag.get("local_role") == "SECONDARY" and database in ag.get("databases", []):
            return msg.Template(
                976,
                14,
                "The target database, '{name}', is participating in an availability group and is currently "
                "not accessible for queries. Either data movement is suspended or the availability replica "
                "is not enabled for read access. To allow read-only access to this and other databases in "
                "the availability group, enable read access to one or more secondary availability replicas "
                "in the group.  For more information, see the ALTER AVAILABILITY GROUP statement in SQL "
                "Server Books Online.",
            )(name=database)
        mirror = ha.get("mirroring", {}).get(database)
        if mirror and mirror.get("role") == "MIRROR":
            return msg.Template(
                954, 14, 'The database "{name}" cannot be opened. It is acting as a mirror database.'
            )(name=database)
        return None

    def catalog_views(self, session: LabSession) -> dict[str, View]:
        return _catalog_views(self, session)


# ====================================================================== a session


@dataclass
class _Tx:
    descriptor: int
    undo: list[str] = field(default_factory=list)  # MariaDB statements, newest last
    on_commit: list[str] = field(default_factory=list)


class LabSession:
    def __init__(
        self, engine: LabSqlServer, spid: int, login: Login, spec: LoginSpec, conn: aiomysql.Connection
    ) -> None:
        self.engine = engine
        self.spid = spid
        self.login = login
        self.spec = spec
        self.conn = conn
        self.thread_id: int = conn.thread_id()
        self.database = "master"
        self.trancount = 0
        self.tx: _Tx | None = None
        self.implicit = False
        self.xact_abort = False
        self.lock_timeout_ms = -1
        self.rowcount = 0
        self.running: Running | None = None
        self.login_time = dt.datetime.now()
        self.disconnect: Callable[[], None] | None = None  # set by the TDS layer
        self._undo_seq = 0
        self._descriptors = 0

    @property
    def in_transaction(self) -> bool:
        return self.trancount > 0

    # ------------------------------------------------------------------ Session protocol
    async def batch(self, sql: str) -> AsyncIterator[Item]:
        await self.engine.refresh()
        try:
            nodes = parse(sql)
        except TsqlError as e:  # a compile error: nothing of the batch runs
            yield e.message
            yield Done()
            return
        try:
            for node in nodes:
                async for item in self._guarded(node):
                    yield item
        except BatchAbort:
            return
        finally:
            self.running = None

    async def transaction(self, request: str, begin_new: bool = False) -> AsyncIterator[Item]:
        if request == "begin":
            async for item in self._begin():
                yield item
        elif request == "commit":
            async for item in self._commit(all_levels=True):
                yield item
        else:
            async for item in self._rollback():
                yield item
        if begin_new and request != "begin":
            async for item in self._begin():
                yield item
        yield Done()

    async def cancel(self) -> None:
        """ATTENTION: the running statement stops (its MariaDB query killed); an open
        transaction stays open, as in SQL Server (unless XACT_ABORT is ON)."""
        self.running = None
        with contextlib.suppress(pymysql.MySQLError, OSError):
            await self.engine.admin(f"KILL QUERY {self.thread_id}")
        if self.xact_abort and self.trancount:
            async for _ in self._rollback():
                pass

    async def close(self) -> None:
        """The client went away: an open transaction is rolled back, DDL included."""
        self.engine.sessions.pop(self.spid, None)
        if self.trancount:
            with contextlib.suppress(Exception):
                async for _ in self._rollback():
                    pass
        self.conn.close()

    async def terminate(self) -> None:
        """KILL / ROLLBACK IMMEDIATE: the session is rolled back and its connection closed."""
        with contextlib.suppress(pymysql.MySQLError, OSError):
            await self.engine.admin(f"KILL QUERY {self.thread_id}")
        await self.close()
        if self.disconnect is not None:
            self.disconnect()

    # ------------------------------------------------------------------ running nodes
    async def _guarded(self, node: Node) -> AsyncIterator[Item]:
        """A node's items; an error ends the statement (SQL Server's default), or the batch
        (a batch-aborting error, or any error under XACT_ABORT ON, which also rolls back)."""
        try:
            async for item in self._node(node):
                yield item
        except TsqlError as e:
            yield e.message
            for extra in e.more:
                yield extra
            yield Done()
            # XACT_ABORT does not apply to RAISERROR (Learn, "SET XACT_ABORT").
            aborting = e.message.number in _BATCH_ABORTING or (self.xact_abort and not e.raiserror)
            if aborting and self.trancount and (self.xact_abort or e.message.number == 1205):
                async for item in self._rollback():
                    yield item
            if aborting:
                raise BatchAbort() from e

    async def _node(self, node: Node) -> AsyncIterator[Item]:
        if isinstance(node, Block):
            for inner in node.body:
                async for item in self._guarded(inner):
                    yield item
        elif isinstance(node, If):
            cond = await self._scalar(
                "SELECT CASE WHEN (" + self._mariadb_text(node.condition) + ") THEN 1 ELSE 0 END", node.line
            )
            branch = node.then if cond == 1 else node.otherwise
            if branch is not None:
                async for item in self._guarded(branch):
                    yield item
        else:
            async for item in self._statement(node):
                yield item

    async def _statement(self, st: Statement) -> AsyncIterator[Item]:
        verb = st.verb
        self.running = Running(_command_of(st), dt.datetime.now(), self.database)
        try:
            if verb in _IMPLICIT and self.implicit and not self.trancount and not _is_database_statement(st):
                async for item in self._begin():
                    yield item
            if verb in _NOT_SUPPORTED:
                # Valid T-SQL outside the stand-in's subset (lab/mssql/README.md): refused
                # with SQL Server's "not supported" message, never run halfway.
                raise TsqlError(msg.NOT_SUPPORTED(line=st.line, keyword=verb))
            handler = self._handlers().get(verb)
            if handler is None:
                raise TsqlError(msg.SYNTAX_NEAR(line=st.line, near=st.tokens[0].text))
            async for item in handler(st):
                yield item
        finally:
            self.running = None

    def _handlers(self) -> dict[str, Callable[[Statement], AsyncIterator[Item]]]:
        """The statement each first word begins, and what runs it."""
        return {
            "SELECT": self._dml,
            "INSERT": self._dml,
            "UPDATE": self._dml,
            "DELETE": self._dml,
            "CREATE": self._any_ddl,
            "ALTER": self._any_ddl,
            "DROP": self._any_ddl,
            "TRUNCATE": self._any_ddl,
            "BEGIN": self._begin_statement,
            "COMMIT": self._commit_statement,
            "ROLLBACK": self._rollback_statement,
            "SET": self._set,
            "USE": self._use,
            "PRINT": self._print,
            "RAISERROR": self._raise,
            "THROW": self._raise,
            "EXEC": self._exec,
            "EXECUTE": self._exec,
            "KILL": self._kill,
            "BACKUP": self._backup,
            "RESTORE": self._restore,
            "WAITFOR": self._waitfor,
        }

    async def _any_ddl(self, st: Statement) -> AsyncIterator[Item]:
        inner = self._database_ddl(st) if _is_database_statement(st) else self._ddl(st)
        async for item in inner:
            yield item

    async def _begin_statement(self, st: Statement) -> AsyncIterator[Item]:
        async for item in self._begin(explicit=True):
            yield item
        yield Done()

    async def _commit_statement(self, st: Statement) -> AsyncIterator[Item]:
        async for item in self._commit():
            yield item
        yield Done()

    async def _rollback_statement(self, st: Statement) -> AsyncIterator[Item]:
        if not self.trancount:
            raise TsqlError(
                msg.Template(
                    3903, 16, "The ROLLBACK TRANSACTION request has no corresponding BEGIN TRANSACTION."
                )(line=st.line)
            )
        async for item in self._rollback():
            yield item
        yield Done()

    async def _print(self, st: Statement) -> AsyncIterator[Item]:
        text = await self._scalar("SELECT " + self._mariadb_text(st.tokens[1:]), st.line)
        yield Message(0, 0, str(text), line=st.line)
        yield Done()

    async def _raise(self, st: Statement) -> AsyncIterator[Item]:
        raise TsqlError(self._user_error(st), raiserror=st.verb == "RAISERROR")
        yield Done()  # pragma: no cover (an async generator needs a yield)

    # ------------------------------------------------------------------ SQL to MariaDB
    def _catalog(self) -> Catalog:
        return Catalog(self.engine.catalog_views(self), _variables(self), _functions(self))

    def _mariadb_text(self, tokens: list[Token]) -> str:
        return translate(self._catalog().substitute(tokens))

    async def use_mariadb(self, database: str) -> None:
        target = MASTER_STANDIN if database.lower() in SYSTEM_DATABASES else database
        async with self.conn.cursor() as cur:
            if target == MASTER_STANDIN:
                await cur.execute(f"CREATE DATABASE IF NOT EXISTS {MASTER_STANDIN}")
            await cur.execute("USE " + quote_ident(target))

    async def _execute(self, sql: str, line: int, table: str = "") -> tuple[list[tuple[Any, ...]], Any, int]:
        """Run MariaDB text; SQL Server's message for MariaDB's error."""
        log.debug("spid %s: %s", self.spid, sql)
        try:
            async with self.conn.cursor() as cur:
                await cur.execute(sql)
                rows = list(await cur.fetchall()) if cur.description else []
                return rows, cur.description, cur.rowcount
        except pymysql.MySQLError as e:
            raise _translate_error(e, line, table, self.spid) from e

    async def _scalar(self, sql: str, line: int) -> Any:
        rows, _, _ = await self._execute(sql, line)
        return rows[0][0] if rows and rows[0] else None

    async def _dml(self, st: Statement) -> AsyncIterator[Item]:
        tokens = self._catalog().substitute(st.tokens)
        if any(t.kind == "raw" and t.text.startswith("\x00CHECKSUM_AGG") for t in tokens):
            tokens = await self._expand_checksum(tokens, st.line)
        into = _select_into(tokens) if st.verb == "SELECT" else None
        if into is not None:
            # SELECT ... INTO new_table FROM ...: the table is made from the result.
            at, end, target = into
            rest = tokens[:at] + tokens[end:]
            exists = await self._scalar(
                "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = "
                + (quote_string(target[0]) if target[0] else "DATABASE()")
                + " AND TABLE_NAME = "
                + quote_string(target[1]),
                st.line,
            )
            if exists:
                raise TsqlError(msg.OBJECT_EXISTS(line=st.line, name=target[1]))
            name = (quote_ident(target[0]) + "." if target[0] else "") + quote_ident(target[1])
            _, _, rowcount = await self._execute(
                f"CREATE TABLE {name} AS " + translate(rest), st.line, target[1]
            )
            self.rowcount = rowcount
            yield Done(rowcount)
            return
        sql = translate(tokens)
        rows, description, rowcount = await self._execute(sql, st.line, _first_table(st))
        if description is not None:
            yield _result_set(description, rows)
            self.rowcount = len(rows)
            yield Done(len(rows))
        else:
            self.rowcount = rowcount
            yield Done(rowcount)

    async def _expand_checksum(self, tokens: list[Token], line: int) -> list[Token]:
        table = None
        for i, t in enumerate(tokens):
            if t.is_("FROM"):
                parts, _ = object_name(tokens, i + 1)
                table = table_of(parts)[1]
                break
        if table is None:
            raise TsqlError(msg.SYNTAX_NEAR(line=line, near="*"))
        rows, _, _ = await self._execute(
            "SELECT COLUMN_NAME, DATA_TYPE FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA = DATABASE() AND "
            f"TABLE_NAME = {quote_string(table)} ORDER BY ORDINAL_POSITION",
            line,
        )
        expr = checksum_expression([(r[0], r[1]) for r in rows]) if rows else None
        if expr is None:
            raise TsqlError(msg.INVALID_OBJECT(line=line, name=table))
        return [
            Token("raw", expr, t.line) if t.kind == "raw" and t.text.startswith("\x00CHECKSUM_AGG") else t
            for t in tokens
        ]

    # ------------------------------------------------------------------ DDL
    async def _ddl(self, st: Statement) -> AsyncIterator[Item]:
        sql, table, creates, index = _ddl_text(st)
        if creates:  # CREATE TABLE / INDEX / ALTER ... ADD: undone by dropping
            undo = _undo_create(st, table, index)
            await self._execute(sql, st.line, table)
            if self.trancount and undo:
                await self._after_ddl_in_tx(undo, [])
        else:
            undo_sql, cleanup = await self._snapshot(table, st.line) if self.trancount else ([], [])
            await self._execute(sql, st.line, table)
            if self.trancount:
                await self._after_ddl_in_tx(undo_sql, cleanup)
        yield Done()

    async def _snapshot(self, table: str, line: int) -> tuple[list[str], list[str]]:
        """A copy of `table` before DDL changes it in a transaction, to swap back on rollback."""
        exists = await self._scalar(
            "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = "
            + quote_string(table),
            line,
        )
        if not exists:
            return [], []
        self._undo_seq += 1
        db = await self._scalar("SELECT DATABASE()", line)
        copy = f"{UNDO_DB}.{quote_ident(f's{self.spid}_{self._undo_seq}_{table}')}"
        live = f"{quote_ident(db)}.{quote_ident(table)}"
        gone = f"{UNDO_DB}.{quote_ident(f'g{self.spid}_{self._undo_seq}_{table}')}"
        await self._execute(f"CREATE DATABASE IF NOT EXISTS {UNDO_DB}", line)
        await self._execute(f"CREATE TABLE {copy} LIKE {live}", line)
        await self._execute(f"INSERT INTO {copy} SELECT * FROM {live}", line)
        undo = [
            f"DROP TABLE IF EXISTS {gone}",
            f"CREATE TABLE IF NOT EXISTS {live} LIKE {copy}",
            f"RENAME TABLE {live} TO {gone}, {copy} TO {live}",
            f"DROP TABLE IF EXISTS {gone}",
        ]
        return undo, [f"DROP TABLE IF EXISTS {copy}"]

    async def _after_ddl_in_tx(self, undo: list[str], cleanup: list[str]) -> None:
        assert self.tx is not None
        self.tx.undo.append("\n".join(undo))
        self.tx.on_commit.extend(cleanup)
        # MariaDB committed implicitly: the rest of the transaction needs a new one.
        await self._execute("START TRANSACTION", 1)

    async def _database_ddl(self, st: Statement) -> AsyncIterator[Item]:
        verb = st.verb
        if verb == "TRUNCATE":
            raise TsqlError(msg.SYNTAX_NEAR_KEYWORD(line=st.line, near="DATABASE"))
        i = 2
        if_exists = False
        if verb == "DROP" and st.words(4)[2:4] == ("IF", "EXISTS"):
            if_exists, i = True, 4
        parts, j = object_name(st.tokens, i)
        if not parts:
            raise TsqlError(msg.SYNTAX_NEAR(line=st.line, near="DATABASE"))
        name = parts[-1]
        if self.trancount:
            raise TsqlError(
                msg.Template(226, 16, "{what} statement not allowed within multi-statement transaction.")(
                    line=st.line, what=f"{verb} DATABASE"
                )
            )
        found = await self.engine.exists(name)
        if verb == "CREATE":
            if found is not None:
                raise TsqlError(msg.DATABASE_EXISTS(line=st.line, name=name))
            await self._execute(f"CREATE DATABASE {quote_ident(name)}", st.line)
            self.engine.db_state(name)
        elif verb == "DROP":
            if found is None:
                if if_exists:
                    yield Done()
                    return
                raise TsqlError(msg.CANNOT_DROP(line=st.line, what="database", name=name))
            if found.lower() in SYSTEM_DATABASES:
                raise TsqlError(
                    msg.Template(
                        3708, 16, "Cannot drop the database '{name}' because it is a system database."
                    )(line=st.line, name=found)
                )
            users = await self.engine.users_of(found, self.spid)
            if users or self.database.lower() == found.lower():
                raise TsqlError(msg.DROP_IN_USE(line=st.line, name=found))
            await self._execute(f"DROP DATABASE {quote_ident(found)}", st.line)
            self.engine.forget(found)
        else:  # ALTER DATABASE x SET ...
            if found is None:
                raise TsqlError(msg.NO_SUCH_DATABASE(line=st.line, name=name))
            rest = [t.upper or t.text.upper() for t in st.tokens[j:]]
            if rest[:1] != ["SET"] or len(rest) < 2 or rest[1] not in ("SINGLE_USER", "MULTI_USER"):
                raise TsqlError(
                    msg.NOT_SUPPORTED(line=st.line, keyword=" ".join(rest[:2]) or "ALTER DATABASE")
                )
            state = self.engine.db_state(found)
            if rest[1] == "SINGLE_USER":
                immediate = "IMMEDIATE" in rest or "AFTER" in rest
                if immediate:
                    await self.engine.put_out(found, self.spid)
                else:
                    while await self.engine.users_of(found, self.spid):  # waits, as SQL Server does
                        await asyncio.sleep(0.1)
                state.user_access, state.single_user_spid = "SINGLE_USER", self.spid
            else:
                state.user_access, state.single_user_spid = "MULTI_USER", 0
            self.engine.save_state()
        yield Done()

    # ------------------------------------------------------------------ transactions
    async def _begin(self, explicit: bool = False) -> AsyncIterator[Item]:
        self.trancount += 1
        if self.trancount == 1:
            await self._execute("START TRANSACTION", 1)
            self._descriptors += 1
            self.tx = _Tx(descriptor=(self.spid << 32) | self._descriptors)
            yield EnvChange("begin", self.tx.descriptor)

    async def _commit(self, all_levels: bool = False) -> AsyncIterator[Item]:
        if not self.trancount:
            raise TsqlError(
                msg.Template(
                    3902, 16, "The COMMIT TRANSACTION request has no corresponding BEGIN TRANSACTION."
                )()
            )
        self.trancount = 0 if all_levels else self.trancount - 1
        if self.trancount == 0:
            tx = self.tx
            await self._execute("COMMIT", 1)
            self.tx = None
            for sql in tx.on_commit if tx else ():
                with contextlib.suppress(TsqlError):
                    await self._execute(sql, 1)
            yield EnvChange("commit", old=tx.descriptor if tx else 0)

    async def _rollback(self) -> AsyncIterator[Item]:
        tx = self.tx
        self.trancount = 0
        self.tx = None
        with contextlib.suppress(TsqlError):
            await self._execute("ROLLBACK", 1)
        for undo in reversed(tx.undo if tx else []):
            for sql in undo.split("\n"):
                try:
                    await self._execute(sql, 1)
                except TsqlError as e:
                    log.warning("spid %s: undo %r failed: %s", self.spid, sql, e)
        for sql in tx.on_commit if tx else ():
            with contextlib.suppress(TsqlError):
                await self._execute(sql, 1)
        if tx is not None:
            yield EnvChange("rollback", old=tx.descriptor)

    # ------------------------------------------------------------------ SET / USE / EXEC / KILL
    async def _set(self, st: Statement) -> AsyncIterator[Item]:
        words = [t.upper or t.text.upper() for t in st.tokens[1:]]
        option = words[0] if words else ""
        value = words[1] if len(words) > 1 else ""
        if option == "IMPLICIT_TRANSACTIONS":
            self.implicit = value == "ON"
        elif option == "XACT_ABORT":
            self.xact_abort = value == "ON"
        elif option == "LOCK_TIMEOUT":
            ms = (
                int(st.tokens[2].text)
                if len(st.tokens) > 2 and st.tokens[2].kind == "number"
                else (-int(st.tokens[3].text) if len(st.tokens) > 3 else -1)
            )
            self.lock_timeout_ms = ms
            # MariaDB counts whole seconds: a wait of n ms gives up after ceil(n / 1000) s.
            seconds = 31536000 if ms < 0 else -(-ms // 1000)
            await self._execute(
                f"SET SESSION lock_wait_timeout = {max(seconds, 0)}, "
                f"innodb_lock_wait_timeout = {max(min(seconds, 1073741824), 0)}",
                st.line,
            )
        elif option in _ACCEPTED_SET_OPTIONS:
            pass
        else:
            raise TsqlError(
                msg.Template(195, 15, "'{name}' is not a recognized SET option.")(line=st.line, name=option)
            )
        yield Done()

    async def _use(self, st: Statement) -> AsyncIterator[Item]:
        parts, _ = object_name(st.tokens, 1)
        name = parts[-1] if parts else ""
        found = await self.engine.exists(name)
        if found is None:
            raise TsqlError(msg.NO_SUCH_DATABASE(line=st.line, name=name))
        refusal = self.engine.refuses(found)
        if refusal is not None:
            raise TsqlError(replace(refusal, line=st.line))
        state = self.engine.db_state(found) if found.lower() not in SYSTEM_DATABASES else None
        if state and state.user_access == "SINGLE_USER" and state.single_user_spid not in (0, self.spid):
            if state.single_user_spid in self.engine.sessions:
                raise TsqlError(msg.SINGLE_USER_OPEN(line=st.line, name=found))
        old = self.database
        await self.use_mariadb(found)
        self.database = found
        yield EnvChange("database", found, old)
        yield msg.CHANGED_DATABASE(name=found)
        yield Done()

    async def _exec(self, st: Statement) -> AsyncIterator[Item]:
        parts, j = object_name(st.tokens, 1)
        proc = parts[-1] if parts else ""
        args = [t.text for t in st.tokens[j:] if t.kind == "string"]
        if proc.lower() == "sp_rename" and len(args) >= 2:
            kind = args[2].upper() if len(args) > 2 else "OBJECT"
            _, obj = table_of(tokenize_name(args[0]))
            if kind == "COLUMN":
                table_parts = tokenize_name(args[0])
                table, column = table_parts[-2], table_parts[-1]
                await self._execute(
                    f"ALTER TABLE {quote_ident(table)} RENAME COLUMN {quote_ident(column)} "
                    f"TO {quote_ident(args[1])}",
                    st.line,
                    table,
                )
            else:
                await self._execute(
                    f"RENAME TABLE {quote_ident(obj)} TO {quote_ident(args[1])}", st.line, obj
                )
            yield Message(
                15477,
                0,
                "Caution: Changing any part of an object name could break scripts and stored procedures.",
                line=st.line,
            )
            yield Done()
            return
        raise TsqlError(msg.NO_SUCH_PROCEDURE(line=st.line, name=".".join(p for p in parts if p)))

    async def _kill(self, st: Statement) -> AsyncIterator[Item]:
        if len(st.tokens) < 2 or st.tokens[1].kind != "number":
            raise TsqlError(msg.SYNTAX_NEAR(line=st.line, near=st.tokens[-1].text))
        spid = int(st.tokens[1].text)
        if spid == self.spid:
            raise TsqlError(msg.KILL_SELF(line=st.line))
        if self.trancount:
            raise TsqlError(
                msg.Template(6115, 16, "KILL command cannot be used inside user transactions.")(line=st.line)
            )
        if "processadmin" not in self.spec.roles and "sysadmin" not in self.spec.roles:
            raise TsqlError(
                msg.Template(6102, 14, "User does not have permission to use the KILL statement.")(
                    line=st.line
                )
            )
        target = self.engine.sessions.get(spid)
        if target is None:
            raise TsqlError(msg.KILL_NOT_ACTIVE(line=st.line, spid=spid))
        await target.terminate()
        yield Done()

    async def _waitfor(self, st: Statement) -> AsyncIterator[Item]:
        if len(st.tokens) < 3 or not st.tokens[1].is_("DELAY") or st.tokens[2].kind != "string":
            raise TsqlError(msg.NOT_SUPPORTED(line=st.line, keyword="WAITFOR"))
        h, m, s = [*st.tokens[2].text.split(":"), "0", "0"][:3]
        await asyncio.sleep(int(h) * 3600 + int(m) * 60 + float(s))
        yield Done()

    def _user_error(self, st: Statement) -> Message:
        strings = [t for t in st.tokens if t.kind == "string"]
        numbers = [int(t.text) for t in st.tokens if t.kind == "number" and t.text.isdigit()]
        text = strings[0].text if strings else ""
        if st.verb == "THROW":
            return Message(
                numbers[0] if numbers else 50000,
                16,
                text,
                state=numbers[1] if len(numbers) > 1 else 1,
                line=st.line,
            )
        severity = numbers[0] if numbers else 16
        return Message(50000, severity, text, state=numbers[1] if len(numbers) > 1 else 1, line=st.line)

    # ------------------------------------------------------------------ BACKUP / RESTORE
    async def _backup(self, st: Statement) -> AsyncIterator[Item]:
        verb = "BACKUP DATABASE"
        opts = _backup_options(st)
        if st.words(2) != ("BACKUP", "DATABASE"):
            raise TsqlError(msg.NOT_SUPPORTED(line=st.line, keyword=" ".join(st.words(2))))
        pair = _pair(verb, st.line)
        if self.trancount:
            raise pair(msg.IN_TRANSACTION(line=st.line))
        found = await self.engine.exists(opts.database)
        if found is None or found.lower() in SYSTEM_DATABASES:
            raise pair(msg.NO_SUCH_DATABASE(line=st.line, name=opts.database))
        if not opts.disk:
            raise TsqlError(msg.SYNTAX_NEAR(line=st.line, near=opts.database))
        if not _parent_dir_exists(opts.disk):
            raise pair(
                msg.CANNOT_OPEN_DEVICE(
                    line=st.line, path=opts.disk, error="2(The system cannot find the path specified.)"
                )
            )
        started = time.monotonic()
        begin = backups.now()
        content = await _dump(self.engine.cfg.mariadb_socket, found)
        st_db = self.engine.db_state(found)
        header = backups.SetHeader(
            database=found,
            files=tuple(st_db.files),
            name=opts.name,
            description=opts.description,
            size=len(content),
            checksum=__import__("hashlib").sha256(content).hexdigest() if opts.checksum else None,
            copy_only=opts.copy_only,
            started=begin,
            finished=backups.now(),
            server=self.engine.server_name,
        )
        try:
            header = await asyncio.to_thread(
                backups.write_set, opts.disk, header, content, opts.init or opts.format
            )
        except OSError as e:
            raise pair(_device_error(e, opts.disk, st.line)) from e
        except backups.MediaError as e:
            raise pair(_media_message(e, opts.disk, st.line)) from e
        for item in _succeeded(
            verb, opts.stats, header, found, st_db.files, header.position, time.monotonic() - started, st.line
        ):
            yield item
        yield Done()

    async def _restore(self, st: Statement) -> AsyncIterator[Item]:
        kind = st.words(2)[1] if len(st.tokens) > 1 else ""
        opts = _backup_options(st)
        verb = {
            "DATABASE": "RESTORE DATABASE",
            "VERIFYONLY": "VERIFY DATABASE",
            "FILELISTONLY": "RESTORE FILELIST",
            "HEADERONLY": "RESTORE HEADERONLY",
        }.get(kind)
        if verb is None:
            raise TsqlError(msg.NOT_SUPPORTED(line=st.line, keyword=f"RESTORE {kind}"))
        pair = _pair(verb, st.line)
        if self.trancount:
            raise pair(msg.IN_TRANSACTION(line=st.line))
        if not opts.disk:
            raise TsqlError(msg.SYNTAX_NEAR(line=st.line, near=kind))
        try:
            sets = await asyncio.to_thread(backups.read_sets, opts.disk)
        except FileNotFoundError as e:
            raise pair(
                msg.CANNOT_OPEN_DEVICE(
                    line=st.line, path=opts.disk, error="2(The system cannot find the file specified.)"
                )
            ) from e
        except OSError as e:
            raise pair(_device_error(e, opts.disk, st.line)) from e
        except backups.MediaError as e:
            raise pair(_media_message(e, opts.disk, st.line)) from e
        if kind == "HEADERONLY":
            yield ResultSet(backups.HEADER_COLUMNS, [backups.header_row(h, VERSION) for h, _ in sets])
            yield Done(len(sets))
            return
        if not 1 <= opts.file <= len(sets):
            raise pair(
                msg.Template(4038, 16, "Cannot find file ID {file} on device '{path}'.")(
                    line=st.line, file=opts.file, path=opts.disk
                )
            )
        header, offset = sets[opts.file - 1]
        if kind == "FILELISTONLY":
            yield ResultSet(backups.FILELIST_COLUMNS, backups.filelist_rows(header))
            yield Done(len(header.files))
            return
        if opts.checksum and header.checksum is None:
            raise pair(
                msg.Template(
                    3187,
                    16,
                    "RESTORE WITH CHECKSUM cannot be specified because the backup set does not contain "
                    "checksum information.",
                )(line=st.line)
            )
        content = await asyncio.to_thread(backups.read_content, opts.disk, offset, header)
        if not backups.content_intact(content, header):
            raise pair(msg.DAMAGED(line=st.line))
        if kind == "VERIFYONLY":
            yield msg.SET_VALID(line=st.line, file=opts.file)
            yield Done()
            return
        async for item in self._restore_database(st, opts, header, content, pair):
            yield item

    async def _restore_database(
        self,
        st: Statement,
        opts: _BackupOptions,
        header: backups.SetHeader,
        content: bytes,
        pair: Callable[..., TsqlError],
    ) -> AsyncIterator[Item]:
        started = time.monotonic()
        target = opts.database
        found = await self.engine.exists(target)
        if found is not None and found.lower() in SYSTEM_DATABASES:
            raise pair(msg.NOT_SUPPORTED(line=st.line, keyword=f"RESTORE of {found}"))
        logical = {f.logical.lower(): f for f in header.files}
        for name in opts.move:
            if name.lower() not in logical:
                raise pair(msg.NOT_PART_OF(line=st.line, logical=name, name=header.database))
        if self.database.lower() == target.lower():
            raise pair(
                msg.Template(
                    3102,
                    16,
                    "RESTORE cannot process database '{name}' because it is in use by this session. "
                    "It is recommended that the master database be used when performing this operation.",
                )(line=st.line, name=target)
            )
        if found is not None and not opts.replace:
            if found.lower() != header.database.lower():
                raise pair(msg.OTHER_DATABASE(line=st.line, name=found))
            raise pair(msg.TAIL_OF_LOG(line=st.line, name=found))
        # Where each file goes: MOVE, else where it was; a file another database holds stops it.
        moves = {k.lower(): v for k, v in opts.move.items()}
        planned = [replace(f, physical=moves.get(f.logical.lower(), f.physical)) for f in header.files]
        problems: list[Message] = []
        for f in planned:
            owner = self.engine.file_owner(f.physical)
            if owner is not None and (found is None or owner.lower() != found.lower()):
                problems.append(msg.FILE_IN_USE(line=st.line, path=f.physical, name=owner))
                problems.append(msg.MOVE_NEEDED(line=st.line, logical=f.logical, path=f.physical))
        if problems:
            problems.append(msg.PLANNING_FAILED(line=st.line))
            err = pair(*problems)
            raise err
        if found is not None:
            state = self.engine.db_state(found)
            if state.user_access != "SINGLE_USER" and await self.engine.users_of(found, self.spid):
                raise pair(msg.IN_USE(line=st.line))
        await _load(self.engine, target, found, content)
        self.engine.set_files(target, planned)
        self.engine.db_state(target).user_access = "MULTI_USER"  # the backup's setting comes back
        self.engine.save_state()
        for item in _succeeded(
            "RESTORE DATABASE",
            opts.stats,
            header,
            target,
            planned,
            opts.file,
            time.monotonic() - started,
            st.line,
        ):
            yield item
        yield Done()


# ====================================================================== helpers

# Valid T-SQL the stand-in does not run (lab/mssql/README.md): SQL Server's "not supported".
_NOT_SUPPORTED = frozenset(
    {
        "DECLARE",
        "WHILE",
        "MERGE",
        "GRANT",
        "REVOKE",
        "DENY",
        "SAVE",
        "DBCC",
        "CHECKPOINT",
        "GOTO",
        "RETURN",
        "WITH",
    }
)
_ACCEPTED_SET_OPTIONS = frozenset(
    {
        "NOCOUNT",
        "ANSI_NULLS",
        "ANSI_PADDING",
        "ANSI_WARNINGS",
        "ANSI_NULL_DFLT_ON",
        "ARITHABORT",
        "CONCAT_NULL_YIELDS_NULL",
        "QUOTED_IDENTIFIER",
        "NUMERIC_ROUNDABORT",
        "TEXTSIZE",
        "DATEFORMAT",
        "DATEFIRST",
        "LANGUAGE",
        "DEADLOCK_PRIORITY",
        "TRANSACTION",
        "CURSOR_CLOSE_ON_COMMIT",
        "STATISTICS",
        "ROWCOUNT",
        # MariaDB takes explicit values for an AUTO_INCREMENT column without asking.
        "IDENTITY_INSERT",
    }
)


def tokenize_name(name: str) -> list[str]:
    parts, _ = object_name(tokenize(name), 0)
    return parts


def _command_of(st: Statement) -> str:
    w = st.words(2)
    if w[:1] in (("BACKUP",), ("RESTORE",), ("CREATE",), ("ALTER",), ("DROP",)):
        return " ".join(w)
    return w[0] if w else ""


def _is_database_statement(st: Statement) -> bool:
    return len(st.tokens) > 1 and st.tokens[1].is_("DATABASE")


def _select_into(tokens: list[Token]) -> tuple[int, int, tuple[str | None, str]] | None:
    """SELECT ... INTO [db.][dbo.]table FROM ...: (index of INTO, index after the name,
    (database, table)), or None."""
    depth = 0
    for i, t in enumerate(tokens):
        if t.kind == "op" and t.text == "(":
            depth += 1
        elif t.kind == "op" and t.text == ")":
            depth -= 1
        elif depth == 0 and t.is_("INTO"):
            parts, j = object_name(tokens, i + 1)
            return i, j, table_of(parts)
        elif depth == 0 and t.is_("FROM"):
            return None
    return None


def _first_table(st: Statement) -> str:
    for i, t in enumerate(st.tokens):
        if t.is_("FROM", "INTO", "UPDATE", "TABLE", "ON"):
            parts, _ = object_name(st.tokens, i + 1)
            if parts:
                return table_of(parts)[1]
    return ""


def _parent_dir_exists(path: str) -> bool:
    """Whether the folder that would hold ``path`` exists (kept sync: plain os.path calls)."""
    return os.path.isdir(os.path.dirname(os.path.abspath(path)))


def _pair(verb: str, line: int) -> Callable[..., TsqlError]:
    """SQL Server's failed BACKUP / RESTORE: the specific message(s), then 3013."""

    def make(*first: Message) -> TsqlError:
        return TsqlError(first[0], *first[1:], msg.TERMINATING(line=line, verb=verb))

    return make


def _media_message(e: backups.MediaError, path: str, line: int) -> Message:
    if e.kind == "damaged":
        return msg.DAMAGED(line=line)
    return msg.Template(
        3241,
        16,
        "The media family on device '{path}' is incorrectly formed. "
        "SQL Server cannot process this media family.",
    )(line=line, path=path)


def _device_error(e: OSError, path: str, line: int) -> Message:
    """3201 with the operating system's error, as SQL Server words it."""
    return msg.CANNOT_OPEN_DEVICE(line=line, path=path, error=f"{e.errno}({e.strerror})")


def _succeeded(
    verb: str,
    stats: bool,
    header: backups.SetHeader,
    database: str,
    files: Sequence[backups.DbFile],
    file: int,
    seconds: float,
    line: int,
) -> list[Item]:
    """A BACKUP's or RESTORE's messages when it worked: [3211,] 4035 per file, 3014."""
    items: list[Item] = [Message(3211, 0, "100 percent processed.", line=line)] if stats else []
    items.append(
        msg.PROCESSED(line=line, pages=header.pages, name=database, logical=files[0].logical, file=file)
    )
    items.append(msg.PROCESSED(line=line, pages=2, name=database, logical=files[-1].logical, file=file))
    items.append(_done_message(verb, header.pages + 2, seconds, header.size, line))
    return items


def _done_message(verb: str, pages: int, seconds: float, size: int, line: int) -> Message:
    seconds = max(seconds, 0.001)
    return msg.BACKUP_DONE(
        line=line, verb=verb, pages=pages, seconds=f"{seconds:.3f}", rate=f"{size / (1 << 20) / seconds:.3f}"
    )


@dataclass
class _BackupOptions:
    database: str = ""
    disk: str = ""
    init: bool = False
    format: bool = False
    checksum: bool = False
    copy_only: bool = False
    replace: bool = False
    stats: bool = False
    file: int = 1
    name: str = ""
    description: str = ""
    move: dict[str, str] = field(default_factory=dict)


def _backup_options(st: Statement) -> _BackupOptions:
    """BACKUP DATABASE db TO DISK = '...' WITH ... / RESTORE {DATABASE db | VERIFYONLY |
    FILELISTONLY | HEADERONLY} FROM DISK = '...' WITH ...; unknown options are refused (155)."""
    o = _BackupOptions()
    t = st.tokens
    i = 2
    if len(t) > 1 and t[1].is_("DATABASE"):
        parts, i = object_name(t, 2)
        o.database = parts[-1] if parts else ""
    while i < len(t) and not t[i].is_("DISK"):
        i += 1
    if i + 2 < len(t) and t[i + 1].text == "=" and t[i + 2].kind == "string":
        o.disk = t[i + 2].text
        i += 3
    while i < len(t) and not t[i].is_("WITH"):
        i += 1
    i += 1
    while i < len(t):
        tok = t[i]
        w = tok.upper
        if tok.kind == "op" and tok.text == ",":
            i += 1
            continue
        value = t[i + 2] if i + 2 < len(t) and t[i + 1].text == "=" else None
        if w in (
            "INIT",
            "NOINIT",
            "FORMAT",
            "NOFORMAT",
            "CHECKSUM",
            "NO_CHECKSUM",
            "COPY_ONLY",
            "REPLACE",
            "RECOVERY",
            "SKIP",
            "NOSKIP",
            "COMPRESSION",
            "NO_COMPRESSION",
            "STOP_ON_ERROR",
            "CONTINUE_AFTER_ERROR",
            "NOUNLOAD",
            "NOREWIND",
        ):
            o.init |= w == "INIT"
            o.format |= w == "FORMAT"
            o.checksum |= w == "CHECKSUM"
            o.copy_only |= w == "COPY_ONLY"
            o.replace |= w == "REPLACE"
            i += 1
        elif w == "STATS":
            o.stats = True
            i += 3 if value is not None else 1
        elif w in ("NAME", "DESCRIPTION", "FILE") and value is not None:
            if w == "FILE":
                o.file = int(value.text)
            elif w == "NAME":
                o.name = value.text
            else:
                o.description = value.text
            i += 3
        elif (
            w == "MOVE"
            and i + 3 < len(t)
            and t[i + 1].kind == "string"
            and t[i + 2].is_("TO")
            and t[i + 3].kind == "string"
        ):
            o.move[t[i + 1].text] = t[i + 3].text
            i += 4
        elif w == "NORECOVERY" or w == "STANDBY":
            raise TsqlError(msg.NOT_SUPPORTED(line=tok.line, keyword=w))
        else:
            raise TsqlError(
                msg.Template(155, 15, "'{name}' is not a recognized {what} option.")(
                    line=tok.line, name=tok.text, what=st.verb
                )
            )
    return o


async def _run_tool(argv: list[str], stdin: bytes | None = None) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin)
    if proc.returncode != 0:
        raise TsqlError(
            msg.Template(3203, 16, 'Read on "{path}" failed: {error}')(
                path=argv[-1], error=err.decode(errors="replace").strip()[:300]
            )
        )
    return out


async def _dump(socket: str, database: str) -> bytes:
    return await _run_tool(
        [
            "mariadb-dump",
            "--no-defaults",
            f"--socket={socket}",
            "-uroot",
            "--single-transaction",
            "--hex-blob",
            "--no-tablespaces",
            "--skip-dump-date",
            "--routines",
            "--triggers",
            database,
        ]
    )


async def _load(engine: LabSqlServer, target: str, found: str | None, content: bytes) -> None:
    """The backup's content becomes database `target`. Over an existing database it is
    loaded beside (a shadow database) and swapped in with one RENAME TABLE, so the lab app
    never reads a half-restored table; tables the backup lacks go too."""
    socket = engine.cfg.mariadb_socket
    if found is None:
        await engine.admin(f"CREATE DATABASE {quote_ident(target)}")
        await _run_tool(["mariadb", "--no-defaults", f"--socket={socket}", "-uroot", target], content)
        return
    shadow = f"zdlab_mssql_r{uuid.uuid4().hex[:10]}"
    trash = f"zdlab_mssql_t{uuid.uuid4().hex[:10]}"
    await engine.admin(f"CREATE DATABASE {shadow}")
    await engine.admin(f"CREATE DATABASE {trash}")
    try:
        await _run_tool(["mariadb", "--no-defaults", f"--socket={socket}", "-uroot", shadow], content)
        new = [
            r[0]
            for r in await engine.admin(
                f"SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = '{shadow}'"
            )
        ]
        old = [
            r[0]
            for r in await engine.admin(
                f"SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = {quote_string(found)}"
            )
        ]
        renames = [f"{quote_ident(found)}.{quote_ident(t)} TO {trash}.{quote_ident(t)}" for t in old]
        renames += [f"{shadow}.{quote_ident(t)} TO {quote_ident(found)}.{quote_ident(t)}" for t in new]
        if renames:
            await engine.admin("RENAME TABLE " + ", ".join(renames))
    finally:
        await engine.admin(f"DROP DATABASE IF EXISTS {shadow}")
        await engine.admin(f"DROP DATABASE IF EXISTS {trash}")


def _translate_error(e: pymysql.MySQLError, line: int, table: str, spid: int) -> TsqlError:
    code = e.args[0] if e.args and isinstance(e.args[0], int) else 0
    text = str(e.args[1]) if len(e.args) > 1 else str(e)
    quoted = re.findall(r"'([^']*)'", text)
    first = quoted[0] if quoted else ""
    bare = first.split(".")[-1]
    if code == 1146:
        return TsqlError(msg.INVALID_OBJECT(line=line, name=bare or table))
    if code == 1054:
        return TsqlError(msg.INVALID_COLUMN(line=line, column=first))
    if code == 1060:
        return TsqlError(msg.COLUMN_TWICE(line=line, column=first, table=table))
    if code == 1050:
        return TsqlError(msg.OBJECT_EXISTS(line=line, name=bare or table))
    if code == 1061:
        return TsqlError(msg.INDEX_EXISTS(line=line, index=first, table=f"dbo.{table}"))
    if code == 1091:
        col = re.search(r"DROP (?:COLUMN|INDEX|CONSTRAINT) `?([^`;]+)`?", text)
        what = col.group(1) if col else first
        if "COLUMN" in text.upper():
            return TsqlError(msg.NO_SUCH_COLUMN_TO_DROP(line=line, column=what, table=table))
        return TsqlError(msg.CANNOT_DROP(line=line, what="index", name=f"{table}.{what}"))
    if code == 1051:
        return TsqlError(msg.CANNOT_DROP(line=line, what="table", name=bare or table))
    if code == 1062:
        key = quoted[1] if len(quoted) > 1 else ""
        if key.split(".")[-1] == "PRIMARY":
            return TsqlError(
                msg.DUPLICATE_KEY(
                    line=line, constraint=f"PK_{table}", table=f"dbo.{table}", value=f"({first})"
                )
            )
        return TsqlError(
            msg.Template(
                2601,
                14,
                "Cannot insert duplicate key row in object '{table}' with unique index '{index}'. "
                "The duplicate key value is {value}.",
            )(line=line, table=f"dbo.{table}", index=key.split(".")[-1], value=f"({first})")
        )
    if code == 1205:
        return TsqlError(msg.LOCK_TIMEOUT(line=line))
    if code == 1213:
        return TsqlError(msg.DEADLOCK(line=line, spid=spid))
    if code == 1242:
        return TsqlError(msg.SUBQUERY_ROWS(line=line))
    if code == 1049:
        return TsqlError(msg.NO_SUCH_DATABASE(line=line, name=first))
    if code == 1064:
        near = re.search(r"near '(.*?)' at line", text, re.DOTALL)
        return TsqlError(msg.SYNTAX_NEAR(line=line, near=(near.group(1).split() or [""])[0] if near else ""))
    if code in (1292, 1366):
        return TsqlError(
            msg.Template(
                245, 16, "Conversion failed when converting the varchar value '{v}' to data type int."
            )(line=line, v=first)
        )
    if code in (1317,):
        return TsqlError(
            msg.Template(
                3980,
                16,
                "The request failed to run because the batch is aborted, this can be caused by abort "
                "signal sent from client, or another request is running in the same session, which makes "
                "the session busy.",
            )(line=line)
        )
    if code in (2006, 2013) or code >= 2000:
        return TsqlError(
            Message(
                0,
                20,
                "A severe error occurred on the current command.  The results, if any, should be discarded.",
                line=line,
            )
        )
    # A MariaDB error the stand-in has no SQL Server equivalent for: said plainly, never
    # passed off as success.
    return TsqlError(msg.USER_ERROR(line=line, text=f"lab stand-in: MariaDB error {code}: {text}"))


def _ddl_text(st: Statement) -> tuple[str, str, bool, str]:
    """(MariaDB text, table, whether it only adds, index name) of CREATE / ALTER / DROP /
    TRUNCATE TABLE and CREATE / DROP INDEX."""
    t = st.tokens
    words = [x.upper for x in t[:4]]
    if words[:2] == ["CREATE", "TABLE"]:
        parts, _ = object_name(t, 2)
        return translate(_strip_table_options(t)), table_of(parts)[1], True, ""
    if words[0] == "CREATE" and "INDEX" in words:
        k = words.index("INDEX")
        unique = "UNIQUE " if "UNIQUE" in words[:k] else ""
        index = t[k + 1].text
        on = next(i for i, x in enumerate(t) if x.is_("ON"))
        parts, j = object_name(t, on + 1)
        table = table_of(parts)[1]
        cols_end = j
        depth = 0
        for cols_end in range(j, len(t)):
            if t[cols_end].text == "(":
                depth += 1
            elif t[cols_end].text == ")":
                depth -= 1
                if depth == 0:
                    break
        rest = t[cols_end + 1 :]
        if any(x.is_("WHERE") for x in rest):
            raise TsqlError(msg.NOT_SUPPORTED(line=st.line, keyword="filtered index"))
        cols = translate(t[j : cols_end + 1])
        return f"CREATE {unique}INDEX {quote_ident(index)} ON {quote_ident(table)} {cols}", table, True, index
    if words[:2] == ["ALTER", "TABLE"]:
        parts, j = object_name(t, 2)
        table = table_of(parts)[1]
        return _alter_table(st, table, j), table, bool(j < len(t) and t[j].is_("ADD")), ""
    if words[:2] == ["DROP", "TABLE"]:
        i = 2
        if_exists = words[2:4] == ["IF", "EXISTS"]
        if if_exists:
            i = 4
        parts, _ = object_name(t, i)
        table = table_of(parts)[1]
        return f"DROP TABLE {'IF EXISTS ' if if_exists else ''}{quote_ident(table)}", table, False, ""
    if words[:2] == ["DROP", "INDEX"]:
        i = 2
        if_exists = words[2:4] == ["IF", "EXISTS"]
        if if_exists:
            i = 4
        parts, j = object_name(t, i)
        if j < len(t) and t[j].is_("ON"):
            index = parts[-1]
            tparts, _ = object_name(t, j + 1)
            table = table_of(tparts)[1]
        else:  # DROP INDEX table.index (the old form)
            table, index = parts[-2], parts[-1]
        return (
            f"DROP INDEX {'IF EXISTS ' if if_exists else ''}{quote_ident(index)} ON {quote_ident(table)}",
            table,
            False,
            index,
        )
    if words[:2] == ["TRUNCATE", "TABLE"]:
        parts, _ = object_name(t, 2)
        table = table_of(parts)[1]
        return f"TRUNCATE TABLE {quote_ident(table)}", table, False, ""
    raise TsqlError(msg.NOT_SUPPORTED(line=st.line, keyword=" ".join(w for w in words[:2] if w)))


def _strip_table_options(t: list[Token]) -> list[Token]:
    """CREATE TABLE's trailing ON [PRIMARY] / TEXTIMAGE_ON x / WITH (...) (storage, not
    schema) dropped; anything else after the column list is a syntax error, as on SQL
    Server (a `GO` sent to the server lands here)."""
    depth = 0
    for i, x in enumerate(t):
        if x.text == "(":
            depth += 1
        elif x.text == ")":
            depth -= 1
            if depth == 0:
                _check_storage_options(t[i + 1 :])
                return _strip_inline_constraint_names(t[: i + 1])
    return _strip_inline_constraint_names(t)


def _check_storage_options(rest: list[Token]) -> None:
    i = 0
    while i < len(rest):
        tok = rest[i]
        if tok.is_("ON", "TEXTIMAGE_ON", "FILESTREAM_ON") and i + 1 < len(rest):
            i += 2
        elif tok.is_("WITH") and i + 1 < len(rest) and rest[i + 1].text == "(":
            depth, i = 0, i + 1
            while i < len(rest):
                depth += {"(": 1, ")": -1}.get(rest[i].text, 0)
                i += 1
                if depth == 0:
                    break
        else:
            raise TsqlError(msg.SYNTAX_NEAR(line=tok.line, near=tok.text))


def _strip_inline_constraint_names(t: list[Token]) -> list[Token]:
    """`CONSTRAINT DF_x DEFAULT ...` inside a column: MariaDB names no DEFAULT."""
    out: list[Token] = []
    i = 0
    while i < len(t):
        if t[i].is_("CONSTRAINT") and i + 2 < len(t) and t[i + 2].is_("DEFAULT"):
            i += 2
            continue
        if t[i].is_("WITH") and i + 1 < len(t) and t[i + 1].is_("VALUES"):
            i += 2
            continue
        out.append(t[i])
        i += 1
    return out


def _split_commas(t: list[Token]) -> list[list[Token]]:
    items: list[list[Token]] = [[]]
    depth = 0
    for x in t:
        if x.kind == "op" and x.text == "(":
            depth += 1
        elif x.kind == "op" and x.text == ")":
            depth -= 1
        if depth == 0 and x.kind == "op" and x.text == ",":
            items.append([])
            continue
        items[-1].append(x)
    return [i for i in items if i]


def _alter_table(st: Statement, table: str, j: int) -> str:
    t = st.tokens
    head = f"ALTER TABLE {quote_ident(table)} "
    if j >= len(t):
        raise TsqlError(msg.SYNTAX_NEAR(line=st.line, near=table))
    action = t[j].upper
    rest = t[j + 1 :]
    if action == "ADD":
        clauses = []
        for item in _split_commas(_strip_inline_constraint_names(rest)):
            if item[0].is_("CONSTRAINT", "PRIMARY", "UNIQUE", "FOREIGN", "CHECK"):
                clauses.append("ADD " + translate(item))
            else:
                clauses.append("ADD COLUMN " + translate(item))
        return head + ", ".join(clauses)
    if action == "DROP":
        if rest and rest[0].is_("COLUMN"):
            rest = rest[1:]
            if_exists = len(rest) > 1 and rest[0].is_("IF") and rest[1].is_("EXISTS")
            if if_exists:
                rest = rest[2:]
            cols = [translate(c) for c in _split_commas(rest)]
            return head + ", ".join(f"DROP COLUMN {'IF EXISTS ' if if_exists else ''}{c}" for c in cols)
        if rest and rest[0].is_("CONSTRAINT"):
            return head + "DROP CONSTRAINT " + translate(rest[1:])
        raise TsqlError(msg.SYNTAX_NEAR(line=st.line, near=rest[0].text if rest else "DROP"))
    if action == "ALTER" and rest and rest[0].is_("COLUMN"):
        return head + "MODIFY COLUMN " + translate(rest[1:])
    raise TsqlError(msg.NOT_SUPPORTED(line=st.line, keyword=f"ALTER TABLE {action}"))


def _undo_create(st: Statement, table: str, index: str) -> list[str]:
    t = st.tokens
    if st.verb == "CREATE" and index:
        return [f"DROP INDEX IF EXISTS {quote_ident(index)} ON {quote_ident(table)}"]
    if st.words(2) == ("CREATE", "TABLE"):
        return [f"DROP TABLE IF EXISTS {quote_ident(table)}"]
    # ALTER TABLE t ADD col ..., col ...: the columns (constraints go with them)
    _parts, j = object_name(t, 2)
    undo = []
    for item in _split_commas(t[j + 1 :]):
        if item and not item[0].is_("CONSTRAINT", "PRIMARY", "UNIQUE", "FOREIGN", "CHECK"):
            undo.append(f"ALTER TABLE {quote_ident(table)} DROP COLUMN IF EXISTS {quote_ident(item[0].text)}")
    return undo


def _result_set(description: Any, rows: list[tuple[Any, ...]]) -> ResultSet:
    from pymysql.constants import FIELD_TYPE as F

    columns: list[Column] = []
    converted = [list(r) for r in rows]
    for k, d in enumerate(description):
        name, code = d[0], d[1]
        values = [r[k] for r in converted if r[k] is not None]
        sql_type: SqlType
        length = 0
        if code in (F.TINY, F.SHORT, F.LONG, F.INT24, F.LONGLONG, F.YEAR) or (
            values
            and all(isinstance(v, int) and not isinstance(v, bool) for v in values)
            and code not in (F.DECIMAL, F.NEWDECIMAL)
        ):
            sql_type = (
                "int" if all(-(2**31) <= v < 2**31 for v in values) and code != F.LONGLONG else "bigint"
            )
            if not all(-(2**63) <= v < 2**63 for v in values):
                sql_type, length = "nvarchar", 40
                for r in converted:
                    r[k] = None if r[k] is None else str(r[k])
        elif code in (F.FLOAT, F.DOUBLE):
            sql_type = "float"
        elif code in (F.DECIMAL, F.NEWDECIMAL):
            scale = max(
                (
                    -int(v.as_tuple().exponent)
                    for v in values
                    if isinstance(v, decimal.Decimal)
                    and isinstance(v.as_tuple().exponent, int)
                    and int(v.as_tuple().exponent) < 0
                ),
                default=0,
            )
            columns.append(Column(_column_name(name), "decimal", precision=38, scale=min(scale, 38)))
            for r in converted:
                if r[k] is not None:
                    r[k] = decimal.Decimal(r[k]).quantize(decimal.Decimal(1).scaleb(-min(scale, 38)))
            continue
        elif code in (F.DATETIME, F.TIMESTAMP, F.DATE):
            sql_type = "datetime2"
            for r in converted:
                if isinstance(r[k], dt.date) and not isinstance(r[k], dt.datetime):
                    r[k] = dt.datetime.combine(r[k], dt.time())
        elif values and all(isinstance(v, bytes | bytearray) for v in values):
            sql_type, length = "varbinary", -1
        else:
            sql_type = "nvarchar"
            for r in converted:
                if r[k] is not None and not isinstance(r[k], str):
                    r[k] = (
                        r[k].decode("utf-8", "replace") if isinstance(r[k], bytes | bytearray) else str(r[k])
                    )
            longest = max((len(r[k]) for r in converted if r[k] is not None), default=0)
            length = 4000 if longest <= 4000 else -1
        columns.append(Column(_column_name(name), sql_type, length))
    return ResultSet(tuple(columns), [tuple(r) for r in converted])


def _column_name(name: str) -> str:
    """An expression without an alias has no name in SQL Server (MariaDB names it by its text)."""
    return "" if any(c in name for c in "( +-*/'") else name


def _variables(s: LabSession) -> dict[str, Any]:
    return {
        "@@SPID": s.spid,
        "@@TRANCOUNT": s.trancount,
        "@@VERSION": VERSION_TEXT,
        "@@SERVERNAME": s.engine.server_name,
        "@@ROWCOUNT": s.rowcount,
        "@@ERROR": 0,
        "@@LOCK_TIMEOUT": s.lock_timeout_ms,
        "@@LANGID": 0,
        "@@LANGUAGE": "us_english",
        "@@MAX_PRECISION": 38,
    }


def _functions(s: LabSession) -> dict[str, Callable[[list[Any]], Any]]:
    eng = s.engine
    roles = set(s.spec.roles)

    def db_id(args: list[Any]) -> Any:
        name = str(args[0]) if args else s.database
        if name.lower() in SYSTEM_DATABASES:
            return SYSTEM_DATABASES[name.lower()]
        known = [n for n in eng._dbs if n.lower() == name.lower()]
        return eng.db_state(known[0]).database_id if known else None

    def db_name(args: list[Any]) -> Any:
        if not args:
            return s.database
        for n, v in SYSTEM_DATABASES.items():
            if v == args[0]:
                return n
        return next((n for n, st in eng._dbs.items() if st.database_id == args[0]), None)

    def server_property(args: list[Any]) -> Any:
        prop = str(args[0]).lower() if args else ""
        return {
            "productversion": eng.product_version(),
            "productmajorversion": eng.product_version().split(".")[0],
            "productlevel": "RTM",
            "edition": "Developer Edition (64-bit)",
            "engineedition": 3,
            "servername": eng.server_name,
            "machinename": eng.server_name,
            "ishadrenabled": 1 if eng.ha().get("availability_group") else 0,
            "pathseparator": "/",
            "instancedefaultbackuppath": eng.cfg.data_dir,
        }.get(prop)

    def is_srvrolemember(args: list[Any]) -> Any:
        return 1 if args and (str(args[0]).lower() in roles or "sysadmin" in roles) else 0

    def fn_hadr_is_primary(args: list[Any]) -> Any:
        ag = eng.ha().get("availability_group")
        if not ag or not args or str(args[0]) not in ag.get("databases", []):
            return None
        return 1 if ag.get("local_role") == "PRIMARY" else 0

    return {
        "DB_ID": db_id,
        "DB_NAME": db_name,
        "SERVERPROPERTY": server_property,
        "IS_SRVROLEMEMBER": is_srvrolemember,
        "SUSER_SNAME": lambda args: s.login.user,
        "SUSER_NAME": lambda args: s.login.user,
        "SCHEMA_NAME": lambda args: "dbo",
        "SCHEMA_ID": lambda args: 1,
        "HOST_NAME": lambda args: s.login.host_name,
        "APP_NAME": lambda args: s.login.app_name,
        "HAS_PERMS_BY_NAME": lambda args: 1,
        "FN_HADR_IS_PRIMARY_REPLICA": fn_hadr_is_primary,
    }


def _catalog_views(eng: LabSqlServer, s: LabSession) -> dict[str, View]:
    def databases(database: str | None = None) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = [
            (
                n,
                i,
                "ONLINE",
                0,
                "MULTI_USER",
                0,
                1 if n != "tempdb" else 3,
                "FULL" if n != "tempdb" else "SIMPLE",
                160,
                None,
            )
            for n, i in SYSTEM_DATABASES.items()
        ]
        for name in sorted(eng._dbs):
            st = eng._dbs[name]
            refused = eng.refuses(name)
            rows.append(
                (
                    name,
                    st.database_id,
                    "RESTORING" if refused and refused.number == 954 else "ONLINE",
                    1 if st.user_access == "SINGLE_USER" else 0,
                    st.user_access,
                    0,
                    1,
                    "FULL",
                    160,
                    None,
                )
            )
        return rows

    def database_files(database: str | None = None) -> list[tuple[Any, ...]]:
        name = database or s.database
        if name.lower() in SYSTEM_DATABASES:
            return [(1, 0, "ROWS", "master", os.path.join(eng.cfg.data_dir, "master.mdf"), 1024, -1)]
        st = eng.db_state(name)
        return [
            (
                f.file_id,
                0 if f.type == "D" else 1,
                "ROWS" if f.type == "D" else "LOG",
                f.logical,
                f.physical,
                max(1, f.size // 8192),
                -1,
            )
            for f in st.files
        ]

    def volume(database: str | None = None) -> list[tuple[Any, ...]]:
        usage = shutil.disk_usage(eng.cfg.data_dir)
        return [(1, 1, "/", "lab", "ext4", usage.total, usage.free)]

    def sessions(database: str | None = None) -> list[tuple[Any, ...]]:
        return [
            (
                x.spid,
                x.login_time,
                x.login.host_name,
                x.login.app_name,
                x.login.user,
                "running" if x.running else "sleeping",
                1,
                _db_id_of(eng, x.database),
                x.trancount,
                x.lock_timeout_ms,
            )
            for x in eng.sessions.values()
        ]

    def requests(database: str | None = None) -> list[tuple[Any, ...]]:
        return [
            (
                x.spid,
                0,
                x.running.started,
                "running",
                x.running.command,
                _db_id_of(eng, x.running.database),
                0,
                None,
                x.trancount,
                x.running.percent,
                int((dt.datetime.now() - x.running.started).total_seconds() * 1000),
            )
            for x in eng.sessions.values()
            if x.running is not None
        ]

    ha = eng.ha()
    ag = ha.get("availability_group") or {}
    group_id = str(uuid.uuid5(uuid.NAMESPACE_DNS, ag.get("name", "none")))

    def replica_id(name: str) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_DNS, name))

    def replicas(database: str | None = None) -> list[tuple[Any, ...]]:
        if not ag:
            return []
        local, primary = ag.get("local_replica", eng.server_name), ag.get("primary_replica", eng.server_name)
        names = [local] + ([primary] if primary != local else [])
        return [
            (replica_id(n), group_id, n, f"TCP://{n}:5022", "SYNCHRONOUS_COMMIT", "AUTOMATIC") for n in names
        ]

    def replica_states(database: str | None = None) -> list[tuple[Any, ...]]:
        if not ag:
            return []
        local = ag.get("local_replica", eng.server_name)
        role = ag.get("local_role", "PRIMARY")
        rows: list[tuple[Any, ...]] = [
            (
                replica_id(local),
                group_id,
                1,
                1 if role == "PRIMARY" else 2,
                role,
                "ONLINE",
                "CONNECTED",
                "HEALTHY",
            )
        ]
        primary = ag.get("primary_replica", local)
        if role == "PRIMARY" and primary != local:  # a secondary's row shows only on the primary
            pass
        return rows

    def groups(database: str | None = None) -> list[tuple[Any, ...]]:
        return [(group_id, ag["name"])] if ag else []

    def group_states(database: str | None = None) -> list[tuple[Any, ...]]:
        return [(group_id, ag.get("primary_replica", eng.server_name), "ONLINE", "HEALTHY")] if ag else []

    def db_replica_states(database: str | None = None) -> list[tuple[Any, ...]]:
        if not ag:
            return []
        local = ag.get("local_replica", eng.server_name)
        primary = 1 if ag.get("local_role", "PRIMARY") == "PRIMARY" else 0
        return [
            (_db_id_of(eng, d), group_id, replica_id(local), 1, primary, "SYNCHRONIZED", "HEALTHY")
            for d in ag.get("databases", [])
        ]

    def ag_databases(database: str | None = None) -> list[tuple[Any, ...]]:
        return [(group_id, d) for d in ag.get("databases", [])] if ag else []

    def mirroring(database: str | None = None) -> list[tuple[Any, ...]]:
        m = ha.get("mirroring", {})
        out: list[tuple[Any, ...]] = []
        for name in [*SYSTEM_DATABASES, *sorted(eng._dbs)]:
            cfg = m.get(name)
            if cfg:
                role = cfg.get("role", "PRINCIPAL")
                out.append(
                    (
                        _db_id_of(eng, name),
                        str(uuid.uuid5(uuid.NAMESPACE_DNS, name)),
                        4,
                        cfg.get("state", "SYNCHRONIZED"),
                        1 if role == "PRINCIPAL" else 2,
                        role,
                        cfg.get("partner_name", ""),
                        cfg.get("partner_instance", ""),
                        "FULL",
                    )
                )
            else:
                out.append((_db_id_of(eng, name), None, None, None, None, None, None, None, None))
        return out

    return {
        "databases": View(
            (
                "name",
                "database_id",
                "state_desc",
                "user_access",
                "user_access_desc",
                "is_read_only",
                "recovery_model",
                "recovery_model_desc",
                "compatibility_level",
                "source_database_id",
            ),
            databases,
        ),
        "database_files": View(
            ("file_id", "type", "type_desc", "name", "physical_name", "size", "max_size"), database_files
        ),
        "master_files": View(
            ("file_id", "type", "type_desc", "name", "physical_name", "size", "max_size"), database_files
        ),
        "dm_os_volume_stats": View(
            (
                "database_id",
                "file_id",
                "volume_mount_point",
                "logical_volume_name",
                "file_system_type",
                "total_bytes",
                "available_bytes",
            ),
            volume,
        ),
        "dm_exec_sessions": View(
            (
                "session_id",
                "login_time",
                "host_name",
                "program_name",
                "login_name",
                "status",
                "is_user_process",
                "database_id",
                "open_transaction_count",
                "lock_timeout",
            ),
            sessions,
        ),
        "dm_exec_requests": View(
            (
                "session_id",
                "request_id",
                "start_time",
                "status",
                "command",
                "database_id",
                "blocking_session_id",
                "wait_type",
                "open_transaction_count",
                "percent_complete",
                "total_elapsed_time",
            ),
            requests,
        ),
        "availability_replicas": View(
            (
                "replica_id",
                "group_id",
                "replica_server_name",
                "endpoint_url",
                "availability_mode_desc",
                "failover_mode_desc",
            ),
            replicas,
        ),
        "dm_hadr_availability_replica_states": View(
            (
                "replica_id",
                "group_id",
                "is_local",
                "role",
                "role_desc",
                "operational_state_desc",
                "connected_state_desc",
                "synchronization_health_desc",
            ),
            replica_states,
        ),
        "availability_groups": View(("group_id", "name"), groups),
        "dm_hadr_availability_group_states": View(
            ("group_id", "primary_replica", "primary_recovery_health_desc", "synchronization_health_desc"),
            group_states,
        ),
        "dm_hadr_database_replica_states": View(
            (
                "database_id",
                "group_id",
                "replica_id",
                "is_local",
                "is_primary_replica",
                "synchronization_state_desc",
                "synchronization_health_desc",
            ),
            db_replica_states,
        ),
        "availability_databases_cluster": View(("group_id", "database_name"), ag_databases),
        "database_mirroring": View(
            (
                "database_id",
                "mirroring_guid",
                "mirroring_state",
                "mirroring_state_desc",
                "mirroring_role",
                "mirroring_role_desc",
                "mirroring_partner_name",
                "mirroring_partner_instance",
                "mirroring_safety_level_desc",
            ),
            mirroring,
        ),
    }


def _db_id_of(eng: LabSqlServer, name: str) -> int | None:
    if name.lower() in SYSTEM_DATABASES:
        return SYSTEM_DATABASES[name.lower()]
    for n, st in eng._dbs.items():
        if n.lower() == name.lower():
            return st.database_id
    return None


__all__ = ["LabSession", "LabSqlServer", "LoginSpec", "ServerConfig", "literal", "load_logins"]
