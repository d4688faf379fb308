"""What the lab's SQL Server engine hands the TDS layer: the contract between the two halves.

`lab/mssql/tds.py` speaks the wire protocol (TDS 7.4: pre-login, LOGIN7, SQL batches,
Transaction Manager requests, ATTENTION) and knows nothing of SQL; `lab/mssql/engine.py`
runs T-SQL (against the lab's MariaDB, with BACKUP / RESTORE on real files) and knows
nothing of the wire. A batch's outcome is a stream of the items below, in the order SQL
Server sends them: a statement's messages and result sets, then its Done.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

# The column types the engine produces. Each maps to a nullable TDS type (INTN, BITN,
# FLTN, NVARCHAR, BIGVARBINARY, DATETIME2N, DECIMALN, GUID); lengths follow SQL Server's.
# A declared nvarchar / varbinary length shorter than a value (or 0) is widened by the TDS
# layer, and beyond 4000 characters / 8000 bytes the column goes as (max).
SqlType = Literal[
    "int",
    "bigint",
    "smallint",
    "tinyint",
    "bit",
    "float",
    "nvarchar",  # nvarchar(length); length=-1 is nvarchar(max)
    "varbinary",  # varbinary(length); length=-1 is varbinary(max)
    "datetime2",
    "uniqueidentifier",
    "decimal",  # decimal(precision, scale)
]


@dataclass(frozen=True)
class Message:
    """An INFO (severity <= 10) or ERROR (severity >= 11) token: SQL Server's own numbers."""

    number: int
    severity: int
    text: str
    state: int = 1
    line: int = 1
    procedure: str = ""

    @property
    def is_error(self) -> bool:
        return self.severity > 10


@dataclass(frozen=True)
class Column:
    name: str
    type: SqlType
    length: int = 0  # nvarchar / varbinary: characters / bytes, -1 for (max)
    precision: int = 18  # decimal
    scale: int = 0  # decimal
    nullable: bool = True


@dataclass(frozen=True)
class ResultSet:
    """COLMETADATA then one ROW per row. Values are Python values of the column's type
    (int, bool, float, str, bytes, datetime.datetime, decimal.Decimal, uuid.UUID) or None."""

    columns: tuple[Column, ...]
    rows: Sequence[tuple[Any, ...]] = ()


@dataclass(frozen=True)
class Done:
    """The end of one statement. rowcount None: no count (DONE_COUNT clear). The TDS layer
    sets DONE_MORE on all but a batch's last Done, DONE_ERROR when an error message came
    since the previous Done, and DONE_INXACT from the session's transaction state."""

    rowcount: int | None = None


@dataclass(frozen=True)
class EnvChange:
    """ENVCHANGE token. database: new/old names. begin / commit / rollback: a transaction's
    8-byte descriptor (begin sends it as new value; commit / rollback as old value)."""

    kind: Literal["database", "begin", "commit", "rollback"]
    new: str | int = ""
    old: str | int = ""


Item = Message | ResultSet | Done | EnvChange


@dataclass(frozen=True)
class Login:
    """What a LOGIN7 packet carries (password decoded)."""

    user: str
    password: str
    database: str = ""
    app_name: str = ""
    host_name: str = ""
    language: str = ""  # LOGIN7's language (FreeTDS sends "us_english" or nothing)
    tds_version: int = 0x74000004
    packet_size: int = 4096
    options: dict[str, int] = field(default_factory=dict)


class LoginFailed(Exception):
    """Raised by Engine.open_session: the TDS layer sends the message(s) and closes."""

    def __init__(self, *messages: Message) -> None:
        super().__init__(messages[0].text if messages else "login failed")
        self.messages = messages


TransactionRequest = Literal["begin", "commit", "rollback"]


class Session(Protocol):
    """One client connection, after a successful login."""

    spid: int
    database: str

    @property
    def in_transaction(self) -> bool: ...

    def batch(self, sql: str) -> AsyncIterator[Item]:
        """Run a SQL batch; yields its items. The TDS layer cancels the consuming task when
        an ATTENTION arrives, then calls cancel()."""
        ...

    def transaction(self, request: TransactionRequest, begin_new: bool = False) -> AsyncIterator[Item]:
        """A Transaction Manager request (TM_BEGIN_XACT / TM_COMMIT_XACT / TM_ROLLBACK_XACT;
        begin_new: the commit/rollback's fBeginXact flag)."""
        ...

    async def cancel(self) -> None:
        """An ATTENTION stopped the running batch: stop its server-side work."""
        ...

    async def close(self) -> None: ...


class Engine(Protocol):
    async def open_session(self, login: Login) -> tuple[Session, list[Item]]:
        """A new session and what the login reply carries besides LOGINACK (the database
        ENVCHANGE, INFO 5701 "Changed database context to ..." and the like). Raises
        LoginFailed."""
        ...

    @property
    def server_name(self) -> str: ...

    @property
    def version(self) -> tuple[int, int, int]:
        """Product version for LOGINACK (major, minor, build), e.g. (16, 0, 1000)."""
        ...


__all__ = [
    "Column",
    "Done",
    "Engine",
    "EnvChange",
    "Item",
    "Login",
    "LoginFailed",
    "Message",
    "ResultSet",
    "Session",
    "SqlType",
    "TransactionRequest",
]
