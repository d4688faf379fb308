"""The lab's SQL Server stand-in, wire half (lab/mssql/tds.py), through the real FreeTDS
ODBC driver (Debian tdsodbc 1.3) via pyodbc and aioodbc, against a fake engine defined
here (the real one is lab/mssql/engine.py's, not used).

What these tests found out about the client side, for the adapter's author:

* pyodbc's connect sends four SQL batches before anything else: FreeTDS's
  SQLGetTypeInfo as "sp_datatype_info_100 12,3" (then -9, -3, 93). pyodbc ignores their
  outcome: an error reply does no harm (the fake engine answers 2812).
* Autocommit off (pyodbc's default!) is a Transaction Manager TM_BEGIN_XACT right after
  login; commit() / rollback() are TM_COMMIT_XACT / TM_ROLLBACK_XACT with fBeginXact (a
  new transaction at once); autocommit back on is TM_ROLLBACK_XACT without it: a
  ROLLBACK of uncommitted work, not the commit ODBC prescribes. No IMPLICIT_TRANSACTIONS
  batch (FreeTDS src/odbc/odbc.c, see lab/mssql/tds.py).
* An error pair (3021 then 3013, both severity 16): pyodbc's exception text carries only
  the FIRST (3021). FreeTDS keeps both diagnostic records, but pyodbc reads only record 1
  outside Windows (pyodbc src/errors.cpp GetErrorFromHandle). FreeTDS ranks its records
  (src/odbc/error.c rank_errors, a selection sort): transaction errors first, then by
  severity, highest first. Equal severities keep the server's order unless a higher one
  moves ahead of them (it swaps places with the first). So the first record, the one
  pyodbc shows, is the most severe error; of equals, the server's first. The same ranking
  orders cursor.messages: two INFOs of severities 0 and 10 come out 10 first.
* Encryption: FreeTDS 1.3's keyword is Encryption=require (fails against the lab, which
  has no TLS); Encrypt=require / Encrypt=yes are ignored and connect UNENCRYPTED.
* INFO messages land in cursor.messages as ('[01000] (number)', '[FreeTDS][SQL Server]text').
* Parameters (cursor.execute(sql, value)) go as an RPC (sp_prepexec), which the stand-in
  refuses with error 2812: the adapter must send plain SQL batches.
* FreeTDS sends an ATTENTION whenever a statement with unread results is closed or
  executed again (SQLFreeStmt: a fetchone() leaves the final DONE unread), so attentions
  arrive after complete replies all the time; the stand-in acknowledges them without
  calling session.cancel(). One that arrives while a batch still streams cancels the rest
  of that batch, as on SQL Server.
* conn.timeout is applied by pyodbc when a cursor is created (SQL_ATTR_QUERY_TIMEOUT);
  FreeTDS ignores the connection-level attribute for queries. Set it before cursor().
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, cast

import aioodbc
import pyodbc
import pytest

from lab.mssql.results import (
    Column,
    Done,
    EnvChange,
    Item,
    Login,
    LoginFailed,
    Message,
    ResultSet,
    TransactionRequest,
)
from lab.mssql.tds import ReplyWriter, TdsServer, serve

USER, PASSWORD, DATABASE = "lab", "S3cret!pw", "shop"

# Every SqlType with a value that exercises its encoding, then a row of NULLs and a row of
# edge values (empty strings, zero, the extremes).
TYPED_COLUMNS = (
    Column("i", "int"),
    Column("bi", "bigint"),
    Column("si", "smallint"),
    Column("ti", "tinyint"),
    Column("b", "bit"),
    Column("f", "float"),
    Column("s", "nvarchar", length=20),
    Column("smax", "nvarchar", length=-1),
    Column("vb", "varbinary", length=16),
    Column("vbmax", "varbinary", length=-1),
    Column("d2", "datetime2"),
    Column("g", "uniqueidentifier"),
    Column("dec", "decimal", precision=18, scale=4),
    Column("dec38", "decimal", precision=38, scale=0),
)
TYPED_ROWS: tuple[tuple[Any, ...], ...] = (
    (
        -2147483648,
        2**63 - 1,
        -32768,
        255,
        True,
        3.141592653589793,
        "Grüße ✓ 😀",
        "max: ünïcode",
        b"\x00\x01\xfe\xff",
        bytes(range(256)) * 40,
        dt.datetime(2026, 12, 7, 13, 45, 59, 123456),
        uuid.UUID("12345678-1234-5678-9abc-def012345678"),
        Decimal("-12345678901234.5678"),
        Decimal("12345678901234567890123456789012345678"),
    ),
    (None,) * len(TYPED_COLUMNS),
    (
        0,
        -(2**63),
        32767,
        0,
        False,
        -0.5,
        "",
        "",
        b"",
        b"",
        dt.datetime(1, 1, 1),
        uuid.UUID(int=0),
        Decimal(0),
        Decimal(0),
    ),
)
TEST_DEADLINE_S = 6  # the slowest test (a 1 s query timeout) takes about 1 s
BIG_TEXT = "".join(chr(0x41 + i % 26) for i in range(50_000)) + "é" * 50_000  # 100 k characters


# --------------------------------------------------------------------------- the fake engine


@dataclass
class FakeSession:
    """Answers a few fixed statements and records what reaches it."""

    spid: int
    database: str
    login: Login
    events: list[tuple[Any, ...]] = field(default_factory=list)
    slow_started: threading.Event = field(default_factory=threading.Event)
    _in_transaction: bool = False
    _descriptors: int = 0

    @property
    def in_transaction(self) -> bool:
        return self._in_transaction

    async def batch(self, sql: str) -> AsyncIterator[Item]:
        self.events.append(("batch", sql))
        statement = STATEMENTS.get(sql.strip())
        if statement is not None:
            async for item in statement(self):
                yield item
        elif sql.startswith("sp_datatype_info_100"):
            yield Message(2812, 16, "Could not find stored procedure 'sp_datatype_info_100'.")
            yield Done()
        else:
            yield Message(102, 15, f"Incorrect syntax near '{sql[:20]}'.")
            yield Done()

    async def transaction(self, request: TransactionRequest, begin_new: bool = False) -> AsyncIterator[Item]:
        self.events.append(("transaction", request, begin_new))
        if request != "begin":
            self._in_transaction = False
            yield EnvChange(request)
        if request == "begin" or begin_new:
            # Descriptors of the engine's choosing: FreeTDS must echo them in ALL_HEADERS,
            # or the TDS layer refuses the next request (error 3971).
            self._descriptors += 1
            self._in_transaction = True
            yield EnvChange("begin", new=0x5EED_0000_0000 + self.spid * 1000 + self._descriptors)
        yield Done()

    async def cancel(self) -> None:
        self.events.append(("cancel",))

    async def close(self) -> None:
        self.events.append(("close",))

    async def slow(self) -> AsyncIterator[Item]:
        self.slow_started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.events.append(("slow cancelled",))
            raise
        yield Done()


async def _select_1(session: FakeSession) -> AsyncIterator[Item]:
    yield ResultSet((Column("", "int"),), [(1,)])
    yield Done(1)


async def _spid(session: FakeSession) -> AsyncIterator[Item]:
    yield ResultSet((Column("spid", "smallint"),), [(session.spid,)])
    yield Done(1)


async def _types(session: FakeSession) -> AsyncIterator[Item]:
    yield ResultSet(TYPED_COLUMNS, TYPED_ROWS)
    yield Done(len(TYPED_ROWS))


async def _three_results(session: FakeSession) -> AsyncIterator[Item]:
    for n in range(3):
        yield ResultSet((Column("n", "int"), Column("label", "nvarchar", 10)), [(n, f"set {n}")] * (n + 1))
        yield Done(n + 1)


async def _infos(session: FakeSession) -> AsyncIterator[Item]:
    yield Message(5701, 0, "Changed database context to 'shop'.")
    yield Message(50000, 0, "second, same severity")
    yield ResultSet((Column("x", "int"),), [(7,)])
    yield Done(1)


async def _ranked_infos(session: FakeSession) -> AsyncIterator[Item]:
    yield Message(50001, 0, "severity 0, sent first")
    yield Message(50002, 10, "severity 10, sent second")
    yield Done()


async def _error_pair(session: FakeSession) -> AsyncIterator[Item]:
    yield Message(3021, 16, "Cannot perform a backup or restore operation within a transaction.", state=1)
    yield Message(3013, 16, "BACKUP DATABASE is terminating abnormally.", state=1)
    yield Done()


async def _update(session: FakeSession) -> AsyncIterator[Item]:
    yield Done(rowcount=3)


async def _big(session: FakeSession) -> AsyncIterator[Item]:
    yield ResultSet((Column("doc", "nvarchar", -1),), [(BIG_TEXT,)])
    yield Done(1)


async def _many(session: FakeSession) -> AsyncIterator[Item]:
    rows = [(n, f"row {n:05d} " + "x" * 30) for n in range(3000)]
    yield ResultSet((Column("n", "int"), Column("text", "nvarchar", 50)), rows)
    yield Done(len(rows))


async def _crash(session: FakeSession) -> AsyncIterator[Item]:
    yield ResultSet((Column("x", "int"),), [(1,)])
    raise RuntimeError("engine bug")


def _slow(session: FakeSession) -> AsyncIterator[Item]:
    return session.slow()


async def _result_then_slow(session: FakeSession) -> AsyncIterator[Item]:
    yield ResultSet((Column("x", "int"),), [(1,)])  # stays in the server's buffer: less than a packet
    async for item in session.slow():
        yield item


STATEMENTS: dict[str, Callable[[FakeSession], AsyncIterator[Item]]] = {
    "SELECT 1": _select_1,
    "SELECT @@SPID": _spid,
    "SELECT types": _types,
    "SELECT three": _three_results,
    "PRINT infos": _infos,
    "PRINT ranked": _ranked_infos,
    "BACKUP DATABASE shop TO DISK = 'x'": _error_pair,
    "UPDATE t SET x = 1": _update,
    "SELECT big": _big,
    "SELECT many": _many,
    "SELECT crash": _crash,
    "WAITFOR DELAY '00:01:00'": _slow,
    "SELECT 1; WAITFOR DELAY '00:01:00'": _result_then_slow,
}


class FakeEngine:
    server_name = "LABSQL"
    version = (16, 0, 1000)

    def __init__(self) -> None:
        self.logins: list[Login] = []
        self.sessions: dict[int, FakeSession] = {}

    async def open_session(self, login: Login) -> tuple[FakeSession, list[Item]]:
        self.logins.append(login)
        if (login.user, login.password) != (USER, PASSWORD):
            raise LoginFailed(Message(18456, 14, f"Login failed for user '{login.user}'.", state=8))
        session = FakeSession(spid=51 + len(self.sessions), database=login.database, login=login)
        self.sessions[session.spid] = session
        changed = Message(5701, 0, f"Changed database context to '{login.database}'.")
        return session, [EnvChange("database", new=login.database, old="master"), changed]


# --------------------------------------------------------------------------- fixtures


@dataclass
class Server:
    engine: FakeEngine
    port: int
    drop_connections: Callable[[], None]

    def connection_string(self, **extra: str) -> str:
        parts = {
            "DRIVER": "{FreeTDS}",
            "SERVER": "127.0.0.1",
            "PORT": str(self.port),
            "UID": USER,
            "PWD": PASSWORD,
            "DATABASE": DATABASE,
            "TDS_Version": "7.4",
            **extra,
        }
        return "".join(f"{k}={v};" for k, v in parts.items())


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """The TDS server on its own event loop in a thread: pyodbc blocks, the server must not."""
    loop = asyncio.new_event_loop()
    engine = FakeEngine()
    tds: TdsServer = loop.run_until_complete(serve(engine, "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, name="tds-server", daemon=True)
    thread.start()

    def drop_connections() -> None:
        loop.call_soon_threadsafe(tds.drop_connections)

    try:
        yield Server(engine, tds.port, drop_connections)
    finally:
        asyncio.run_coroutine_threadsafe(tds.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture(autouse=True)
def watchdog(server: Server) -> Iterator[None]:
    """A reply the driver cannot finish (a token cut short, an attention never acknowledged)
    leaves FreeTDS waiting for ever, query timeout or not: after a deadline the server drops
    every connection, so the test fails in seconds instead of hanging."""
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        server.drop_connections()

    timer = threading.Timer(TEST_DEADLINE_S, fire)
    timer.start()
    yield
    timer.cancel()
    assert not fired.is_set(), f"the test outlived {TEST_DEADLINE_S} s: the server dropped its connections"


@pytest.fixture
def connect(server: Server) -> Iterator[Callable[..., pyodbc.Connection]]:
    """pyodbc connections (autocommit on unless asked), all closed after the test."""
    opened: list[pyodbc.Connection] = []

    def open_one(autocommit: bool = True, **extra: str) -> pyodbc.Connection:
        conn = pyodbc.connect(server.connection_string(**extra), autocommit=autocommit, timeout=5)
        opened.append(conn)
        return conn

    yield open_one
    for conn in opened:
        conn.close()


def session_of(server: Server, conn: pyodbc.Connection) -> FakeSession:
    (spid,) = conn.cursor().execute("SELECT @@SPID").fetchone()
    return server.engine.sessions[spid]


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


# --------------------------------------------------------------------------- login


def test_login_carries_the_clients_credentials(
    server: Server, connect: Callable[..., pyodbc.Connection]
) -> None:
    conn = connect(APP="zerodown-test")
    assert conn.cursor().execute("SELECT 1").fetchone()[0] == 1
    login = server.engine.logins[-1]
    assert (login.user, login.password, login.database) == (USER, PASSWORD, DATABASE)
    assert login.app_name == "zerodown-test"
    assert login.tds_version == 0x74000004
    assert login.packet_size == 4096
    # pyodbc's own first batches: FreeTDS's SQLGetTypeInfo, answered with an error here.
    session = session_of(server, conn)
    assert session.events[0] == ("batch", "sp_datatype_info_100 12,3")


def test_wrong_password_shows_the_engines_message(
    server: Server, connect: Callable[..., pyodbc.Connection]
) -> None:
    with pytest.raises(pyodbc.Error) as failure:
        connect(PWD="wrong")
    assert "(18456)" in str(failure.value)
    assert f"Login failed for user '{USER}'." in str(failure.value)
    assert server.engine.logins[-1].password == "wrong"
    assert connect().cursor().execute("SELECT 1").fetchval() == 1  # the server lives on


def test_encryption_required_fails_clearly(server: Server, connect: Callable[..., pyodbc.Connection]) -> None:
    logins = len(server.engine.logins)
    with pytest.raises(pyodbc.OperationalError) as failure:
        connect(Encryption="require")
    # FreeTDS gives up on the pre-login reply (ENCRYPT_NOT_SUP) before any LOGIN7.
    assert "08001" in str(failure.value)
    assert "Unable to connect" in str(failure.value)
    assert len(server.engine.logins) == logins
    # FreeTDS 1.3 knows no "Encrypt" keyword: Encrypt=require connects, unencrypted.
    assert connect(Encrypt="require").cursor().execute("SELECT 1").fetchval() == 1


# --------------------------------------------------------------------------- results


def test_every_type_round_trips(connect: Callable[..., pyodbc.Connection]) -> None:
    cursor = connect().cursor()
    rows = cursor.execute("SELECT types").fetchall()
    assert [d[0] for d in cursor.description] == [c.name for c in TYPED_COLUMNS]
    assert len(rows) == len(TYPED_ROWS)
    for got, want in zip(rows, TYPED_ROWS, strict=True):
        # pyodbc gives uniqueidentifier as text unless pyodbc.native_uuid is set.
        values = [
            uuid.UUID(v) if isinstance(v, str) and c.type == "uniqueidentifier" else v
            for c, v in zip(TYPED_COLUMNS, got, strict=True)
        ]
        assert values == list(want)
    assert isinstance(rows[0].b, bool) and isinstance(rows[0].dec, Decimal)


def test_several_result_sets_and_a_rowcount(connect: Callable[..., pyodbc.Connection]) -> None:
    cursor = connect().cursor()
    cursor.execute("SELECT three")
    sets = [cursor.fetchall()]
    while cursor.nextset():
        sets.append(cursor.fetchall())
    assert [[tuple(r) for r in rows] for rows in sets] == [[(n, f"set {n}")] * (n + 1) for n in range(3)]
    cursor.execute("UPDATE t SET x = 1")
    assert cursor.rowcount == 3


def test_info_messages_reach_cursor_messages(connect: Callable[..., pyodbc.Connection]) -> None:
    cursor = connect().cursor()
    assert cursor.execute("PRINT infos").fetchval() == 7
    assert cursor.messages == [
        ("[01000] (5701)", "[FreeTDS][SQL Server]Changed database context to 'shop'."),
        ("[01000] (50000)", "[FreeTDS][SQL Server]second, same severity"),
    ]
    cursor.execute("PRINT ranked")
    # FreeTDS ranks diagnostic records by severity, highest first (src/odbc/error.c).
    assert [number for number, _text in cursor.messages] == ["[01000] (50002)", "[01000] (50001)"]


def test_an_error_pair_raises_with_the_first_error(connect: Callable[..., pyodbc.Connection]) -> None:
    cursor = connect().cursor()
    with pytest.raises(pyodbc.ProgrammingError) as failure:
        cursor.execute("BACKUP DATABASE shop TO DISK = 'x'")
    text = str(failure.value)
    assert "(3021)" in text and "Cannot perform a backup or restore operation" in text
    assert "3013" not in text  # pyodbc reads one diagnostic record only (see the module docstring)
    assert cursor.execute("SELECT 1").fetchval() == 1


def test_unknown_sql_and_engine_failures_are_errors_not_hangups(
    connect: Callable[..., pyodbc.Connection],
) -> None:
    cursor = connect().cursor()
    with pytest.raises(pyodbc.ProgrammingError, match=r"Incorrect syntax near 'SELEC nothing'.*\(102\)"):
        cursor.execute("SELEC nothing")
    with pytest.raises(pyodbc.Error, match=r"engine bug.*\(50000\)"):
        cursor.execute("SELECT crash").fetchall()
    assert cursor.execute("SELECT 1").fetchval() == 1


def test_parameters_are_refused_as_rpc(connect: Callable[..., pyodbc.Connection]) -> None:
    cursor = connect().cursor()
    with pytest.raises(pyodbc.ProgrammingError, match=r"does not support RPC requests.*\(2812\)"):
        cursor.execute("SELECT ?", 5)
    assert cursor.execute("SELECT 1").fetchval() == 1


def test_large_values_and_multi_packet_replies_arrive_intact(
    server: Server, connect: Callable[..., pyodbc.Connection]
) -> None:
    for packet_size in ("4096", "8192"):
        cursor = connect(PacketSize=packet_size).cursor()
        assert server.engine.logins[-1].packet_size == int(packet_size)
        assert cursor.execute("SELECT big").fetchval() == BIG_TEXT
        rows = cursor.execute("SELECT many").fetchall()
        assert [tuple(r) for r in rows] == [(n, f"row {n:05d} " + "x" * 30) for n in range(3000)]


def test_replies_are_split_at_the_negotiated_packet_size(server: Server) -> None:
    with RawClient(server.port) as client:
        client.log_in(packet_size=8192)
        payload = client.batch("SELECT many", descriptor=0)
        sizes = [length for _status, length, _id in client.packets]
        assert len(sizes) > 2 and set(sizes[:-1]) == {8192} and sizes[-1] <= 8192
        assert [status for status, _length, _id in client.packets] == [0] * (len(sizes) - 1) + [1]
        assert [packet_id for _s, _l, packet_id in client.packets] == [
            (n + 1) % 256 for n in range(len(sizes))
        ]
        assert len(payload) == sum(sizes) - 8 * len(sizes)
        assert payload.endswith(done(DONE_COUNT, 3000))


# --------------------------------------------------------------------------- transactions


def test_autocommit_off_commit_and_rollback_reach_the_engine(
    server: Server, connect: Callable[..., pyodbc.Connection]
) -> None:
    conn = connect(autocommit=False)
    session = session_of(server, conn)
    cursor = conn.cursor()
    assert cursor.execute("SELECT 1").fetchval() == 1  # the announced descriptor was echoed
    conn.commit()
    assert cursor.execute("SELECT 1").fetchval() == 1  # and the new one after the commit
    conn.rollback()
    conn.autocommit = True
    assert session.in_transaction is False
    assert [e for e in session.events if e[0] == "transaction"] == [
        ("transaction", "begin", False),  # autocommit off, right after login
        ("transaction", "commit", True),
        ("transaction", "rollback", True),
        ("transaction", "rollback", False),  # autocommit back on
    ]
    assert cursor.execute("SELECT 1").fetchval() == 1


def test_a_foreign_transaction_descriptor_is_refused(server: Server) -> None:
    with RawClient(server.port) as client:
        client.log_in()
        reply = client.batch("SELECT 1", descriptor=0xDEAD)
        assert reply[0] == 0xAA and reply[3:7] == struct.pack("<i", 3971)  # ERROR 3971, no rows
        assert "failed to resume the transaction. Desc:dead".encode("utf-16-le") in reply
        assert reply.endswith(done(DONE_ERROR))
        assert client.batch("SELECT 1", descriptor=0)[0] == 0x81  # COLMETADATA: this one runs


def test_transaction_manager_requests_on_the_wire(server: Server) -> None:
    with RawClient(server.port) as client:
        client.log_in()
        session = max(server.engine.sessions.values(), key=lambda s: s.spid)
        client.send(0x0E, all_headers(0) + struct.pack("<HBB", 5, 0, 0))  # TM_BEGIN_XACT
        reply = client.reply()
        # ENVCHANGE 8 (begin): new value the 8-byte descriptor, old value empty.
        descriptor = 0x5EED_0000_0000 + session.spid * 1000 + 1
        assert reply == b"\xe3\x0b\x00\x08\x08" + struct.pack("<Q", descriptor) + b"\x00" + done(DONE_INXACT)
        assert client.batch("SELECT 1", descriptor).endswith(done(DONE_COUNT | DONE_INXACT, 1))
        client.send(0x0E, all_headers(descriptor) + struct.pack("<HBB", 7, 0, 0))  # TM_COMMIT_XACT
        # ENVCHANGE 9 (commit): new value empty, old value the descriptor.
        assert client.reply() == b"\xe3\x0b\x00\x09\x00\x08" + struct.pack("<Q", descriptor) + done(0)
        client.send(0x0E, all_headers(0) + struct.pack("<HB", 9, 0))  # TM_SAVE_XACT: refused
        assert client.reply().endswith(done(DONE_ERROR))
        assert [e for e in session.events if e[0] == "transaction"] == [
            ("transaction", "begin", False),
            ("transaction", "commit", False),
        ]


# --------------------------------------------------------------------------- cancellation


def test_cancel_from_another_thread_ends_the_slow_statement(
    server: Server, connect: Callable[..., pyodbc.Connection]
) -> None:
    conn = connect()
    session = session_of(server, conn)
    cursor = conn.cursor()
    canceller = threading.Thread(target=lambda: (session.slow_started.wait(5), cursor.cancel()))
    canceller.start()
    started = time.monotonic()
    with pytest.raises(pyodbc.Error, match="HY008"):
        cursor.execute("WAITFOR DELAY '00:01:00'")
    canceller.join()
    assert time.monotonic() - started < 5
    assert ("slow cancelled",) in session.events and ("cancel",) in session.events
    assert cursor.execute("SELECT 1").fetchval() == 1


def test_query_timeout_cancels_through_attention(
    server: Server, connect: Callable[..., pyodbc.Connection]
) -> None:
    conn = connect()
    session = session_of(server, conn)
    conn.timeout = 1  # pyodbc applies it to cursors created from now on
    cursor = conn.cursor()
    started = time.monotonic()
    with pytest.raises(pyodbc.OperationalError, match="HYT00"):
        cursor.execute("WAITFOR DELAY '00:01:00'")
    assert time.monotonic() - started < 3
    assert ("cancel",) in session.events
    assert cursor.execute("SELECT 1").fetchval() == 1


def test_attention_drops_unsent_output_and_is_acknowledged(server: Server) -> None:
    with RawClient(server.port) as client:
        client.log_in()
        session = max(server.engine.sessions.values(), key=lambda s: s.spid)
        client.send(0x01, all_headers(0) + "SELECT 1; WAITFOR DELAY '00:01:00'".encode("utf-16-le"))
        assert session.slow_started.wait(5)
        client.send(0x06, b"")
        assert client.reply() == ATTENTION_ACK  # the buffered result was never sent: dropped
        assert session.events[-2:] == [("slow cancelled",), ("cancel",)]
        client.send(0x06, b"")  # an attention after the reply: acknowledged all the same
        assert client.reply() == ATTENTION_ACK
        assert session.events[1:] == [("slow cancelled",), ("cancel",)]  # no second cancel()
        assert client.batch("SELECT 1", descriptor=0)[0] == 0x81


class _Wire:
    """Stands in for an asyncio.StreamWriter: keeps what ReplyWriter writes."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writelines(self, packets: list[bytes]) -> None:
        for packet in packets:
            self.data += packet

    async def drain(self) -> None:
        pass


async def test_an_attention_finishes_a_half_sent_token() -> None:
    wire = _Wire()
    out = ReplyWriter(cast(asyncio.StreamWriter, wire))
    out.packet_size = 16  # 8 bytes of payload a packet
    out.start()
    out.add(b"A" * 12)
    await out.flush()  # the first 8 bytes of the token leave in a packet
    out.add(b"B" * 4)
    out.discard_unsent()  # the rest of A must follow (the client reads whole tokens); B goes
    out.add(b"Z")
    await out.finish()
    packets, at = [], 0
    while at < len(wire.data):
        _type, status, length, _spid, _id, _window = struct.unpack_from(">BBHHBB", wire.data, at)
        packets.append((status, bytes(wire.data[at + 8 : at + length])))
        at += length
    assert packets == [(0, b"A" * 8), (1, b"A" * 4 + b"Z")]


def test_a_client_gone_mid_batch_cancels_it_and_closes_the_session(server: Server) -> None:
    with RawClient(server.port) as client:
        client.log_in()
        client.send(0x01, all_headers(0) + "WAITFOR DELAY '00:01:00'".encode("utf-16-le"))
        session = max(server.engine.sessions.values(), key=lambda s: s.spid)
        assert session.slow_started.wait(5)
    wait_for(lambda: ("close",) in session.events)
    assert session.events[-3:] == [("slow cancelled",), ("cancel",), ("close",)]


def test_a_malformed_packet_closes_only_its_connection(
    server: Server, connect: Callable[..., pyodbc.Connection], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="lab.mssql.tds")
    survivor = connect()
    with RawClient(server.port) as client:
        client.sock.sendall(struct.pack(">BBHHBB", 0x12, 1, 4, 0, 1, 0))  # length 4 < its header
        assert client.sock.recv(100) == b""  # closed by the server
    wait_for(lambda: any("broke the protocol" in r.getMessage() for r in caplog.records))
    assert survivor.cursor().execute("SELECT 1").fetchval() == 1


# --------------------------------------------------------------------------- aioodbc


async def test_aioodbc_works_too(server: Server) -> None:
    conn = await aioodbc.connect(dsn=server.connection_string(), autocommit=True)
    try:
        cursor = await conn.cursor()
        await cursor.execute("SELECT types")
        rows = await cursor.fetchall()
        assert rows[0].dec == TYPED_ROWS[0][12] and rows[0].smax == TYPED_ROWS[0][7]
        await cursor.execute("SELECT big")
        assert (await cursor.fetchone())[0] == BIG_TEXT
        await cursor.close()
    finally:
        await conn.close()


# --------------------------------------------------------------------------- a raw client


DONE_ERROR, DONE_INXACT, DONE_COUNT = 0x02, 0x04, 0x10
ATTENTION_ACK = b"\xfd\x20\x00" + bytes(10)  # DONE, status DONE_ATTN (0x20), no count


def done(status: int, rowcount: int = 0) -> bytes:
    """A DONE token: status, CurCmd 0, an 8-byte row count."""
    return struct.pack("<BHHQ", 0xFD, status, 0, rowcount)


def all_headers(descriptor: int) -> bytes:
    """ALL_HEADERS with one transaction descriptor header (outstanding requests: 1)."""
    return struct.pack("<IIHQI", 22, 18, 2, descriptor, 1)


def login7(user: str, password: str, database: str, packet_size: int) -> bytes:
    """A minimal LOGIN7 (TDS 7.4): the fixed part, then user, password, database."""
    fixed = bytearray(94)
    data = bytearray()
    for at, text in ((40, user), (44, password), (68, database)):
        encoded = text.encode("utf-16-le")
        if at == 44:
            encoded = bytes((((b << 4) | (b >> 4)) & 0xFF) ^ 0xA5 for b in encoded)
        struct.pack_into("<HH", fixed, at, len(fixed) + len(data), len(text))
        data += encoded
    struct.pack_into("<IIII", fixed, 0, len(fixed) + len(data), 0x74000004, packet_size, 0)
    return bytes(fixed + data)


class RawClient:
    """A TDS client on a bare socket, for what pyodbc cannot do (vanish, send garbage)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, packet_type: int, payload: bytes) -> None:
        self.sock.sendall(struct.pack(">BBHHBB", packet_type, 1, len(payload) + 8, 0, 1, 0) + payload)

    def reply(self) -> bytes:
        """One reply message; its packets' (status, length, packet id) in self.packets."""
        payload = b""
        self.packets: list[tuple[int, int, int]] = []
        while True:
            _type, status, length, _spid, packet_id, _window = struct.unpack(">BBHHBB", self._exactly(8))
            self.packets.append((status, length, packet_id))
            payload += self._exactly(length - 8)
            if status & 1:
                return payload

    def log_in(self, packet_size: int = 4096) -> None:
        self.send(0x10, login7(USER, PASSWORD, DATABASE, packet_size))
        assert b"\xad" in self.reply()  # LOGINACK

    def batch(self, sql: str, descriptor: int) -> bytes:
        self.send(0x01, all_headers(descriptor) + sql.encode("utf-16-le"))
        return self.reply()

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "the server closed the connection"
            data += chunk
        return data
