"""The lab's SQL Server stand-in, wire half: a TDS 7.4 server on asyncio.

Speaks enough of the Tabular Data Stream protocol for the FreeTDS ODBC driver (through
pyodbc / aioodbc) to log in, run SQL batches, drive transactions and cancel a running
batch; the SQL itself is the engine's (`lab/mssql/engine.py`, through the contract in
`lab/mssql/results.py`).

Sources (facts only, no code taken):

* [MS-TDS] Tabular Data Stream Protocol, Microsoft Open Specifications: packet header
  (2.2.3.1), PRELOGIN (2.2.6.5), LOGIN7 (2.2.6.4), ALL_HEADERS (2.2.5.3), SQLBatch
  (2.2.6.7), Transaction Manager request (2.2.6.9), tokens COLMETADATA / ROW / DONE /
  ENVCHANGE / ERROR / INFO / LOGINACK (2.2.7), data types (2.2.5.4-2.2.5.6), attention
  and its acknowledgment (2.2.1.7, 3.3.5.9), encryption negotiation table (2.2.6.5).
* FreeTDS 1.3 (github.com/FreeTDS/freetds, branch-1_3; Debian ships 1.3.17):
  src/tds/login.c (tds71_do_login: what PRELOGIN it sends, that it gives up on
  ENCRYPT_NOT_SUP when encryption is required; tds7_send_login: LOGIN7 layout, password
  obfuscation; tds_process_login_tokens takes the SPID from the reply's packet header),
  src/tds/token.c (tds_process_loginack, tds_process_env_chg: ENVCHANGE 8 stores the
  transaction descriptor that later ALL_HEADERS carry, 9 / 10 zero it; tds_process_end),
  src/tds/query.c (tds_start_query_head: ALL_HEADERS with one transaction descriptor
  header; tds_submit_begin_tran / _commit / _rollback: Transaction Manager requests;
  tds_send_cancel), src/odbc/odbc.c (change_autocommit, change_transaction, SQLCancel).
* pytds (github.com/denisenkom/pytds): tests/simple_server.py (a test TDS server's
  PRELOGIN handling) and src/pytds/tds_types.py (DATETIME2 / DECIMAL encodings).

What FreeTDS sends for transactions (src/odbc/odbc.c change_autocommit and
change_transaction, src/tds/query.c tds_submit_begin_tran / _commit / _rollback), TDS 7.2+:

* autocommit off (SQL_ATTR_AUTOCOMMIT=OFF; pyodbc's default autocommit=False does this
  right after login): TM_BEGIN_XACT (5), isolation level 0, no name. No "SET
  IMPLICIT_TRANSACTIONS ON" batch.
* SQLEndTran commit / rollback (pyodbc conn.commit() / conn.rollback(), only while
  autocommit is off): TM_COMMIT_XACT (7) / TM_ROLLBACK_XACT (8) with fBeginXact set, so a
  new transaction starts at once (the "chained" mode of autocommit off).
* autocommit back on: TM_ROLLBACK_XACT (8) without fBeginXact. A rollback, where the ODBC
  reference ("Setting the Commit Mode") says switching to auto-commit commits the open
  transaction: with FreeTDS, work not committed before autocommit goes on is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import decimal
import enum
import logging
import struct
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from lab.mssql.results import (
    Column,
    Done,
    Engine,
    EnvChange,
    Item,
    Login,
    LoginFailed,
    Message,
    ResultSet,
    Session,
    TransactionRequest,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- constants


class PacketType(enum.IntEnum):
    SQL_BATCH = 0x01
    RPC = 0x03
    REPLY = 0x04  # "tabular result": every server-to-client message
    ATTENTION = 0x06
    TRANSACTION_MANAGER = 0x0E
    LOGIN7 = 0x10
    PRELOGIN = 0x12


STATUS_EOM = 0x01
STATUS_IGNORE = 0x02  # the client abandons a request it could not finish sending
HEADER = struct.Struct(">BBHHBB")  # type, status, length, spid, packet id, window

TDS_74 = 0x74000004
TDS_72 = 0x72090002  # the oldest version with ALL_HEADERS, which this server expects
DEFAULT_PACKET_SIZE = 4096
MIN_PACKET_SIZE = 512
MAX_PACKET_SIZE = 32767  # SQL Server's own limit
MAX_MESSAGE = 64 * 1024 * 1024  # a client message larger than this is not a lab's

PRELOGIN_VERSION = 0x00
PRELOGIN_ENCRYPTION = 0x01
PRELOGIN_INSTOPT = 0x02
PRELOGIN_THREADID = 0x03
PRELOGIN_MARS = 0x04
PRELOGIN_TERMINATOR = 0xFF
ENCRYPT_ON = 0x01
ENCRYPT_NOT_SUP = 0x02
ENCRYPT_REQ = 0x03

TOKEN_COLMETADATA = 0x81
TOKEN_ERROR = 0xAA
TOKEN_INFO = 0xAB
TOKEN_LOGINACK = 0xAD
TOKEN_ROW = 0xD1
TOKEN_ENVCHANGE = 0xE3
TOKEN_DONE = 0xFD

DONE_FINAL = 0x00
DONE_MORE = 0x01
DONE_ERROR = 0x02
DONE_INXACT = 0x04
DONE_COUNT = 0x10
DONE_ATTN = 0x20

ENV_DATABASE = 1
ENV_LANGUAGE = 2
ENV_PACKET_SIZE = 4
ENV_COLLATION = 7
ENV_BEGIN = 8
ENV_COMMIT = 9
ENV_ROLLBACK = 10
ENV_KINDS = {"begin": ENV_BEGIN, "commit": ENV_COMMIT, "rollback": ENV_ROLLBACK}

# Transaction Manager request types ([MS-TDS] 2.2.6.9) and the commit / rollback flag.
TM_BEGIN_XACT = 5
TM_COMMIT_XACT = 7
TM_ROLLBACK_XACT = 8
TM_SAVE_XACT = 9
TM_BEGIN_NEW = 0x01  # fBeginXact
TM_REQUESTS: dict[int, TransactionRequest] = {
    TM_BEGIN_XACT: "begin",
    TM_COMMIT_XACT: "commit",
    TM_ROLLBACK_XACT: "rollback",
}
HEADER_TRANSACTION_DESCRIPTOR = 2

# SQL_Latin1_General_CP1_CI_AS, the default server collation: LCID 0x0409 with flags
# IgnoreCase / IgnoreKana / IgnoreWidth (0xD0 in the third byte), sort id 52.
COLLATION = bytes.fromhex("0904d00034")
LANGUAGE = "us_english"
PROGRAM_NAME = "Microsoft SQL Server"

# RPC requests name well-known procedures by number ([MS-TDS] 2.2.6.6).
RPC_PROCEDURES = {
    1: "sp_cursor",
    2: "sp_cursoropen",
    3: "sp_cursorprepare",
    4: "sp_cursorexecute",
    5: "sp_cursorprepexec",
    6: "sp_cursorunprepare",
    7: "sp_cursorfetch",
    8: "sp_cursoroption",
    9: "sp_cursorclose",
    10: "sp_executesql",
    11: "sp_prepare",
    12: "sp_execute",
    13: "sp_prepexec",
    14: "sp_prepexecrpc",
    15: "sp_unprepare",
}

# The error number of what only the lab refuses (SQL Server's own for RAISERROR messages).
LAB_UNSUPPORTED = 50000

NVARCHAR_MAX_CHARS = 4000  # longer nvarchar columns go as nvarchar(max)
VARBINARY_MAX_BYTES = 8000
PLP_NULL = 0xFFFFFFFFFFFFFFFF
PLP_CHUNK = 65536
DATETIME2_SCALE = 7
DATE_ZERO = dt.date(1, 1, 1)


class ProtocolError(Exception):
    """The client broke the protocol: its connection is closed (and logged)."""


# --------------------------------------------------------------------------- framing


@dataclass(frozen=True)
class Request:
    """One client message: the payloads of its packets up to the one marked EOM."""

    type: int
    payload: bytes
    ignored: bool = False  # the client set the IGNORE bit: drop the request


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """The next client message, or None when the client closed the connection cleanly."""
    parts: list[bytes] = []
    size = 0
    first_type: int | None = None
    while True:
        try:
            header = await reader.readexactly(HEADER.size)
        except asyncio.IncompleteReadError as e:
            if not e.partial and not parts:
                return None
            raise ConnectionResetError("the client went away in the middle of a message") from e
        packet_type, status, length, _spid, _packet_id, _window = HEADER.unpack(header)
        if length < HEADER.size:
            raise ProtocolError(f"packet length {length} is shorter than its header")
        if first_type is None:
            first_type = packet_type
        elif packet_type != first_type:
            raise ProtocolError(f"packet type {packet_type:#x} inside a message of type {first_type:#x}")
        size += length - HEADER.size
        if size > MAX_MESSAGE:
            raise ProtocolError(f"message larger than {MAX_MESSAGE} bytes")
        parts.append(await reader.readexactly(length - HEADER.size))
        if status & STATUS_EOM:
            return Request(first_type, b"".join(parts), bool(status & STATUS_IGNORE))


class ReplyWriter:
    """Sends one reply message at a time as packets of the negotiated size.

    Tokens are added whole and full packets go out as they fill, so a large result streams.
    The writer remembers where each token starts: an attention acknowledgment may drop the
    tokens not yet begun, but must finish one already half sent ([MS-TDS] 2.2.1.7: the
    client reads the reply up to the acknowledgment, token by token)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self.spid = 0
        self.packet_size = DEFAULT_PACKET_SIZE
        self.open = False  # a message is under way (its EOM packet not yet written)
        self._buffer = bytearray()
        self._sent = 0  # bytes of this message already written
        self._starts: deque[int] = deque()  # where the unsent tokens start, from the message start
        self._packet_id = 1

    def start(self) -> None:
        self.open = True
        self._buffer.clear()
        self._sent = 0
        self._starts.clear()
        self._packet_id = 1

    def add(self, token: bytes) -> None:
        self._starts.append(self._sent + len(self._buffer))
        self._buffer += token

    async def flush(self) -> None:
        """Write the full packets (keeping at least one byte for the EOM packet)."""
        if len(self._buffer) > self.packet_size - HEADER.size:
            self._write(final=False)
            await self._writer.drain()

    async def finish(self) -> None:
        """Write the rest, the last packet marked EOM."""
        self._write(final=True)
        self.open = False
        await self._writer.drain()

    def discard_unsent(self) -> None:
        """Drop every token not yet begun on the wire (the rest of a half-sent one stays)."""
        cut = self._starts[0] - self._sent if self._starts else len(self._buffer)
        del self._buffer[cut:]
        self._starts.clear()

    def _write(self, final: bool) -> None:
        payload = self.packet_size - HEADER.size
        packets: list[bytes] = []
        offset = 0
        while len(self._buffer) - offset > payload:
            packets.append(self._packet(self._buffer[offset : offset + payload], 0))
            offset += payload
        if final:
            packets.append(self._packet(self._buffer[offset:], STATUS_EOM))
            offset = len(self._buffer)
        self._writer.writelines(packets)  # one call per flush: a cancellation never tears a packet
        del self._buffer[:offset]
        self._sent += offset
        while self._starts and self._starts[0] < self._sent:  # begun: no longer droppable
            self._starts.popleft()

    def _packet(self, chunk: bytes | bytearray, status: int) -> bytes:
        header = HEADER.pack(
            PacketType.REPLY, status, len(chunk) + HEADER.size, self.spid, self._packet_id, 0
        )
        self._packet_id = (self._packet_id + 1) % 256
        return header + chunk


# --------------------------------------------------------------------------- primitive encodings


def b_varchar(text: str) -> bytes:
    """B_VARCHAR: a character count byte, then UCS-2 (UTF-16LE)."""
    data = text.encode("utf-16-le")[: 255 * 2]
    return bytes([len(data) // 2]) + data


def us_varchar(text: str) -> bytes:
    """US_VARCHAR: a character count USHORT, then UCS-2."""
    data = text.encode("utf-16-le")[: 0xFFFF * 2]
    return struct.pack("<H", len(data) // 2) + data


def b_varbyte(data: bytes) -> bytes:
    return bytes([len(data)]) + data


def token_with_length(token: int, body: bytes) -> bytes:
    """A token whose USHORT length follows its type byte."""
    return struct.pack("<BH", token, len(body)) + body


def done_token(status: int, rowcount: int = 0) -> bytes:
    # CurCmd (the statement kind) is informational only; FreeTDS ignores it.
    return struct.pack("<BHHQ", TOKEN_DONE, status, 0, rowcount)


def message_token(message: Message, server_name: str) -> bytes:
    """ERROR (severity > 10) or INFO ([MS-TDS] 2.2.7.10 / 2.2.7.13)."""
    # The token's length is a USHORT: a message text longer than SQL Server's own limit
    # (2047 characters for RAISERROR) is cut rather than breaking the stream.
    body = (
        struct.pack("<iBB", message.number, _byte(message.state), _byte(message.severity))
        + us_varchar(message.text[:16000])
        + b_varchar(server_name)
        + b_varchar(message.procedure)
        + struct.pack("<i", message.line)
    )
    return token_with_length(TOKEN_ERROR if message.is_error else TOKEN_INFO, body)


def _byte(value: int) -> int:
    return min(max(value, 0), 255)


def envchange_token(kind: int, new: bytes, old: bytes) -> bytes:
    """ENVCHANGE; new and old already carry their length prefix (B_VARCHAR / B_VARBYTE)."""
    return token_with_length(TOKEN_ENVCHANGE, bytes([kind]) + new + old)


def loginack_token(version: tuple[int, int, int]) -> bytes:
    major, minor, build = version
    body = (
        bytes([1])  # interface: SQL
        + TDS_74.to_bytes(4, "big")
        + b_varchar(PROGRAM_NAME)
        + bytes([major & 0xFF, minor & 0xFF])
        + (build & 0xFFFF).to_bytes(2, "big")
    )
    return token_with_length(TOKEN_LOGINACK, body)


# --------------------------------------------------------------------------- column types


@dataclass(frozen=True)
class _Format:
    """How one column goes on the wire: its TYPE_INFO and its value encoder."""

    type_info: bytes
    encode: Callable[[Any], bytes]


_INT_SIZES = {"tinyint": 1, "smallint": 2, "int": 4, "bigint": 8}
# DECIMALN's value length (sign byte included) by precision ([MS-TDS] 2.2.5.5.1.6).
_DECIMAL_SIZES = ((9, 5), (19, 9), (28, 13), (38, 17))
# Room for decimal(38) exactly: the default context's 28 digits would round it.
_WIDE = decimal.Context(prec=80)


def _intn(size: int, signed: bool) -> _Format:
    def encode(value: Any) -> bytes:
        return (
            b"\x00" if value is None else bytes([size]) + int(value).to_bytes(size, "little", signed=signed)
        )

    return _Format(bytes([0x26, size]), encode)


def _bitn(value: Any) -> bytes:
    return b"\x00" if value is None else b"\x01" + (b"\x01" if value else b"\x00")


def _fltn(value: Any) -> bytes:
    return b"\x00" if value is None else b"\x08" + struct.pack("<d", float(value))


def _plp(data: bytes | None) -> bytes:
    """A PLP value (the (max) types): total length, chunks, a zero-length terminator."""
    if data is None:
        return struct.pack("<Q", PLP_NULL)
    chunks = [struct.pack("<Q", len(data))]
    for start in range(0, len(data), PLP_CHUNK):
        piece = data[start : start + PLP_CHUNK]
        chunks += [struct.pack("<I", len(piece)), piece]
    chunks.append(b"\x00\x00\x00\x00")
    return b"".join(chunks)


def _ushort_len(data: bytes | None) -> bytes:
    return b"\xff\xff" if data is None else struct.pack("<H", len(data)) + data


def _text(value: Any) -> bytes | None:
    return None if value is None else str(value).encode("utf-16-le")


def _binary(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


def _variable(kind: int, column: Column, rows: Sequence[tuple[Any, ...]], index: int) -> _Format:
    """NVARCHAR / BIGVARBINARY, as (max) (PLP) when declared so or too long for a plain one.

    A declared length shorter than a value (or 0, "unknown") is widened to fit: the engine
    says what it has, the wire must describe it truthfully."""
    to_bytes = _text if kind == 0xE7 else _binary
    longest = max((len(b) for row in rows if (b := to_bytes(row[index])) is not None), default=0)
    limit = NVARCHAR_MAX_CHARS * 2 if kind == 0xE7 else VARBINARY_MAX_BYTES
    declared = column.length * 2 if kind == 0xE7 else column.length
    collation = COLLATION if kind == 0xE7 else b""
    if column.length == -1 or longest > limit:
        return _Format(bytes([kind]) + b"\xff\xff" + collation, lambda v: _plp(to_bytes(v)))
    size = min(max(declared, longest, 2 if kind == 0xE7 else 1), limit)
    return _Format(bytes([kind]) + struct.pack("<H", size) + collation, lambda v: _ushort_len(to_bytes(v)))


def _datetime2(value: Any) -> bytes:
    if value is None:
        return b"\x00"
    if not isinstance(value, dt.datetime):  # a date: its midnight
        value = dt.datetime.combine(value, dt.time())
    midnight = value.replace(hour=0, minute=0, second=0, microsecond=0)
    ticks = (value - midnight) // dt.timedelta(microseconds=1) * 10  # 100 ns units (scale 7)
    days = (value.date() - DATE_ZERO).days
    return b"\x08" + ticks.to_bytes(5, "little") + days.to_bytes(3, "little")


def _guid(value: Any) -> bytes:
    if value is None:
        return b"\x00"
    guid = value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    return b"\x10" + guid.bytes_le  # the first three groups little-endian, as SQL Server stores them


def _decimaln(column: Column) -> _Format:
    precision = min(max(column.precision, 1), 38)
    scale = min(max(column.scale, 0), precision)
    size = next(size for top, size in _DECIMAL_SIZES if precision <= top)

    def encode(value: Any) -> bytes:
        if value is None:
            return b"\x00"
        scaled = decimal.Decimal(value).scaleb(scale, _WIDE).to_integral_value(decimal.ROUND_HALF_EVEN, _WIDE)
        magnitude = abs(int(scaled))
        if magnitude >= 10**precision:
            raise ValueError(f"{value} does not fit decimal({precision},{scale})")
        return bytes([size, 0 if scaled < 0 else 1]) + magnitude.to_bytes(size - 1, "little")

    return _Format(bytes([0x6A, size, precision, scale]), encode)


def column_format(column: Column, rows: Sequence[tuple[Any, ...]], index: int) -> _Format:
    kind = column.type
    if kind in _INT_SIZES:
        return _intn(_INT_SIZES[kind], signed=kind != "tinyint")
    if kind == "bit":
        return _Format(b"\x68\x01", _bitn)
    if kind == "float":
        return _Format(b"\x6d\x08", _fltn)
    if kind == "nvarchar":
        return _variable(0xE7, column, rows, index)
    if kind == "varbinary":
        return _variable(0xA5, column, rows, index)
    if kind == "datetime2":
        return _Format(bytes([0x2A, DATETIME2_SCALE]), _datetime2)
    if kind == "uniqueidentifier":
        return _Format(b"\x24\x10", _guid)
    if kind == "decimal":
        return _decimaln(column)
    raise ValueError(f"column {column.name!r}: no TDS encoding for type {kind!r}")


def result_tokens(result: ResultSet) -> Iterator[bytes]:
    """COLMETADATA, then one ROW token per row (one at a time: large results stream)."""
    if not result.columns:
        return  # SQL Server never sends a result without columns; neither does the lab
    formats = [column_format(c, result.rows, i) for i, c in enumerate(result.columns)]
    meta = [struct.pack("<BH", TOKEN_COLMETADATA, len(formats))]
    for column, fmt in zip(result.columns, formats, strict=True):
        # UserType 0, Flags: fNullable only (the rest describe base-table columns).
        meta += [
            struct.pack("<IH", 0, 0x0001 if column.nullable else 0),
            fmt.type_info,
            b_varchar(column.name),
        ]
    yield b"".join(meta)
    for row in result.rows:
        if len(row) != len(formats):
            raise ValueError(f"a row of {len(row)} values for {len(formats)} columns")
        yield bytes([TOKEN_ROW]) + b"".join(fmt.encode(v) for fmt, v in zip(formats, row, strict=True))


# --------------------------------------------------------------------------- client messages


def parse_prelogin(payload: bytes) -> dict[int, bytes]:
    """PRELOGIN options: (type, offset, length) entries up to 0xFF, data after them."""
    options: dict[int, bytes] = {}
    at = 0
    while True:
        if at >= len(payload):
            raise ProtocolError("PRELOGIN without its terminator")
        option = payload[at]
        if option == PRELOGIN_TERMINATOR:
            return options
        if at + 5 > len(payload):
            raise ProtocolError("PRELOGIN option entry cut short")
        offset, length = struct.unpack_from(">HH", payload, at + 1)
        if offset + length > len(payload):
            raise ProtocolError(f"PRELOGIN option {option:#x} points past the message")
        options[option] = payload[offset : offset + length]
        at += 5


def prelogin_reply(version: tuple[int, int, int]) -> bytes:
    major, minor, build = version
    options = [
        (
            PRELOGIN_VERSION,
            bytes([major & 0xFF, minor & 0xFF]) + (build & 0xFFFF).to_bytes(2, "big") + b"\0\0",
        ),
        # The lab has no TLS. A client that asked for encryption gets NOT_SUP and gives up.
        (PRELOGIN_ENCRYPTION, bytes([ENCRYPT_NOT_SUP])),
        (PRELOGIN_INSTOPT, b"\x00"),  # 0: whatever instance the client named is this one
        (PRELOGIN_THREADID, b""),  # the server sends it empty
        (PRELOGIN_MARS, b"\x00"),
    ]
    data_at = len(options) * 5 + 1
    table, data = bytearray(), bytearray()
    for option, value in options:
        table += struct.pack(">BHH", option, data_at + len(data), len(value))
        data += value
    return bytes(table) + bytes([PRELOGIN_TERMINATOR]) + bytes(data)


# LOGIN7's fixed part ([MS-TDS] 2.2.6.4): where each (offset, character count) pair sits.
_LOGIN_FIELDS = {"host_name": 36, "user": 40, "password": 44, "app_name": 48, "language": 64, "database": 68}
# The fixed part is 94 bytes from TDS 7.2 on; 86 lets a TDS 7.1 client reach the clear
# version refusal in _login7 rather than a protocol error (only offsets up to 72 are read).
_LOGIN_FIXED = 86


def _login_string(payload: bytes, at: int, password: bool = False) -> str:
    offset, chars = struct.unpack_from("<HH", payload, at)
    if offset + chars * 2 > len(payload):
        raise ProtocolError("LOGIN7 field points past the message")
    data = payload[offset : offset + chars * 2]
    if password:  # undo the obfuscation: XOR 0xA5, then swap the nibbles
        data = bytes((((b ^ 0xA5) << 4) & 0xF0) | ((b ^ 0xA5) >> 4) for b in data)
    try:
        return data.decode("utf-16-le")
    except UnicodeDecodeError as e:
        raise ProtocolError(f"LOGIN7 field is not UCS-2: {e}") from e


def parse_login7(payload: bytes) -> Login:
    if len(payload) < _LOGIN_FIXED:
        raise ProtocolError(f"LOGIN7 of {len(payload)} bytes, shorter than its fixed part")
    _length, version, packet_size, _prog, pid = struct.unpack_from("<IIIII", payload, 0)
    flags1, flags2, type_flags, flags3 = payload[24:28]
    fields = {name: _login_string(payload, at, name == "password") for name, at in _LOGIN_FIELDS.items()}
    return Login(
        user=fields["user"],
        password=fields["password"],
        database=fields["database"],
        app_name=fields["app_name"],
        host_name=fields["host_name"],
        language=fields["language"],
        tds_version=version,
        packet_size=packet_size,
        options={
            "option_flags1": flags1,
            "option_flags2": flags2,
            "type_flags": type_flags,
            "option_flags3": flags3,
            "client_pid": pid,
        },
    )


def negotiate_packet_size(requested: int) -> int:
    """The client's packet size if SQL Server would take it, else the default (0 asks for it)."""
    return requested if MIN_PACKET_SIZE <= requested <= MAX_PACKET_SIZE else DEFAULT_PACKET_SIZE


def parse_all_headers(payload: bytes) -> tuple[int | None, int]:
    """ALL_HEADERS ([MS-TDS] 2.2.5.3): the transaction descriptor (None when absent) and
    where the request proper starts."""
    if len(payload) < 4:
        raise ProtocolError("request shorter than its ALL_HEADERS")
    (total,) = struct.unpack_from("<I", payload, 0)
    if total < 4 or total > len(payload):
        raise ProtocolError(f"ALL_HEADERS length {total} does not fit a {len(payload)}-byte request")
    descriptor: int | None = None
    at = 4
    while at < total:
        if at + 6 > total:
            raise ProtocolError("ALL_HEADERS header cut short")
        length, kind = struct.unpack_from("<IH", payload, at)
        if length < 6 or at + length > total:
            raise ProtocolError(f"ALL_HEADERS header of length {length} does not fit")
        if kind == HEADER_TRANSACTION_DESCRIPTOR:
            if length < 18:
                raise ProtocolError("transaction descriptor header too short")
            (descriptor,) = struct.unpack_from("<Q", payload, at + 6)
        at += length
    return descriptor, total


def _ucs2(data: bytes, what: str) -> str:
    if len(data) % 2:
        raise ProtocolError(f"{what} of odd length {len(data)}")
    try:
        return data.decode("utf-16-le")
    except UnicodeDecodeError as e:
        raise ProtocolError(f"{what} is not UCS-2: {e}") from e


@dataclass(frozen=True)
class TransactionCall:
    """A Transaction Manager request, parsed; request None: one the lab refuses."""

    request: TransactionRequest | None
    begin_new: bool
    code: int


def parse_transaction(body: bytes) -> TransactionCall:
    """The request after ALL_HEADERS: RequestType USHORT, then per type a name (B_VARCHAR)
    and, for commit / rollback, a flags byte (fBeginXact) and the new transaction's
    isolation level and name. Names and isolation levels do not reach the engine."""
    if len(body) < 2:
        raise ProtocolError("Transaction Manager request without its type")
    (code,) = struct.unpack_from("<H", body, 0)
    begin_new = False
    if code in (TM_COMMIT_XACT, TM_ROLLBACK_XACT):
        if len(body) < 3 or len(body) < 3 + body[2] * 2 + 1:
            raise ProtocolError("Transaction Manager commit / rollback cut short")
        begin_new = bool(body[3 + body[2] * 2] & TM_BEGIN_NEW)
    return TransactionCall(TM_REQUESTS.get(code), begin_new, code)


def rpc_procedure(body: bytes) -> str:
    """The procedure an RPC request names (by name, or 0xFFFF and a well-known number)."""
    if len(body) < 4:
        return "?"
    (length,) = struct.unpack_from("<H", body, 0)
    if length == 0xFFFF:
        (number,) = struct.unpack_from("<H", body, 2)
        return RPC_PROCEDURES.get(number, f"procedure #{number}")
    return body[2 : 2 + length * 2].decode("utf-16-le", errors="replace")


# --------------------------------------------------------------------------- a connection


async def _items(*items: Item) -> AsyncIterator[Item]:
    for item in items:
        yield item


class _Reply:
    """Turns one request's items into tokens. Each Done is held back until the next item
    shows whether more follow (DONE_MORE); its other flags are fixed when it arrives."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._held: tuple[int, int] | None = None  # a Done's status (no DONE_MORE yet), rowcount
        self._error = False  # an error message since the last Done

    def tokens(self, item: Item) -> Iterator[bytes]:
        if self._held is not None:
            status, rowcount = self._held
            self._held = None
            yield done_token(status | DONE_MORE, rowcount)
        if isinstance(item, Message):
            self._error |= item.is_error
            yield message_token(item, self._conn.engine.server_name)
        elif isinstance(item, ResultSet):
            yield from result_tokens(item)
        elif isinstance(item, EnvChange):
            yield self._conn.envchange(item)
        else:
            count = DONE_COUNT if item.rowcount is not None else 0
            self._held = (self._status() | count, item.rowcount or 0)
            self._error = False

    def _status(self) -> int:
        status = DONE_ERROR if self._error else DONE_FINAL
        session = self._conn.session
        if session is not None and session.in_transaction:
            status |= DONE_INXACT
        return status

    def end(self) -> bytes:
        """The reply's last DONE: the held one, or one of its own if the engine gave none."""
        if self._held is not None:
            return done_token(*self._held)
        return done_token(self._status())


class _Connection:
    """One client: PRELOGIN, LOGIN7, then requests, each answered by a task while this
    coroutine keeps reading the socket (an ATTENTION or a disconnect arrives mid-batch)."""

    def __init__(self, engine: Engine, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.engine = engine
        self.session: Session | None = None
        self._reader = reader
        self._writer = writer
        self._out = ReplyWriter(writer)
        self._running: asyncio.Task[None] | None = None
        self._descriptor = 0  # the transaction descriptor last announced (0: none)
        self._descriptors_given = 0
        self._peer = writer.get_extra_info("peername")

    async def run(self) -> None:
        try:
            if await self._log_in():
                await self._serve_requests()
        except ProtocolError as e:
            log.warning("TDS client %s broke the protocol (%s): closing its connection", self._peer, e)
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            log.info("TDS client %s went away: %s", self._peer, e)
        except Exception:
            log.exception("TDS connection of %s failed", self._peer)
        finally:
            await self._close()

    # ------------------------------------------------------------------ login

    async def _log_in(self) -> bool:
        request = await read_request(self._reader)
        if request is not None and request.type == PacketType.PRELOGIN:
            if not await self._prelogin(request.payload):
                return False
            request = await read_request(self._reader)
        if request is None:
            return False
        if request.type != PacketType.LOGIN7:
            raise ProtocolError(f"expected LOGIN7, got a message of type {request.type:#x}")
        return await self._login7(parse_login7(request.payload))

    async def _prelogin(self, payload: bytes) -> bool:
        options = parse_prelogin(payload)
        await self._send(prelogin_reply(self.engine.version))
        encryption = options.get(PRELOGIN_ENCRYPTION, b"")
        if encryption[:1] in (bytes([ENCRYPT_ON]), bytes([ENCRYPT_REQ])):
            # [MS-TDS] 2.2.6.5: client ENCRYPT_ON against server ENCRYPT_NOT_SUP ends the
            # connection. FreeTDS (login.c) fails by itself on our NOT_SUP; others may not.
            log.warning("TDS client %s requires encryption; the lab has no TLS: closing", self._peer)
            return False
        return True

    async def _login7(self, login: Login) -> bool:
        if login.tds_version < TDS_72:
            return await self._refuse_login(
                Message(
                    4002,
                    16,
                    f"The lab's SQL Server stand-in speaks TDS 7.2 or later (7.4); "
                    f"the client asked for TDS {login.tds_version:#010x}.",
                )
            )
        try:
            session, items = await self.engine.open_session(login)
        except LoginFailed as failed:
            return await self._refuse_login(*failed.messages)
        self.session = session
        if hasattr(session, "disconnect"):
            # KILL and ROLLBACK IMMEDIATE end the client's connection, as SQL Server does.
            session.disconnect = self.abort
        self._out.spid = session.spid  # FreeTDS takes the SPID from this reply's header
        # Roughly SQL Server's own order: the engine's database ENVCHANGE and INFO 5701,
        # collation and language, LOGINACK, the packet size, DONE. FreeTDS reads them all
        # up to the DONE in any order (token.c tds_process_login_tokens).
        self._out.start()
        for item in items:
            self._login_item(item)
        self._out.add(envchange_token(ENV_COLLATION, b_varbyte(COLLATION), b"\x00"))
        self._out.add(envchange_token(ENV_LANGUAGE, b_varchar(LANGUAGE), b_varchar("")))
        self._out.add(loginack_token(self.engine.version))
        packet_size = negotiate_packet_size(login.packet_size)
        self._out.add(
            envchange_token(ENV_PACKET_SIZE, b_varchar(str(packet_size)), b_varchar(str(packet_size)))
        )
        self._out.add(done_token(DONE_FINAL))
        await self._out.finish()
        self._out.packet_size = packet_size  # from the next message on
        log.info("TDS client %s logged in as %r (spid %d)", self._peer, login.user, session.spid)
        return True

    def _login_item(self, item: Item) -> None:
        if isinstance(item, Message):
            self._out.add(message_token(item, self.engine.server_name))
        elif isinstance(item, EnvChange):
            self._out.add(self.envchange(item))
        else:
            log.warning("a login reply has no room for %r: left out", item)

    async def _refuse_login(self, *messages: Message) -> bool:
        await self._send(
            *(message_token(m, self.engine.server_name) for m in messages), done_token(DONE_ERROR)
        )
        log.info("TDS client %s: login refused (%s)", self._peer, "; ".join(m.text for m in messages))
        return False

    # ------------------------------------------------------------------ requests

    async def _serve_requests(self) -> None:
        while (request := await read_request(self._reader)) is not None:
            if request.type == PacketType.ATTENTION:
                await self._attention()
                continue
            if request.ignored:
                # [MS-TDS] 2.2.3.1.2: a request abandoned with the IGNORE bit is answered by
                # a single DONE with DONE_ERROR (and no attention acknowledgment).
                await self._send(done_token(DONE_ERROR))
                continue
            if self._running is not None:
                # The client sent a request before the last reply ended: [MS-TDS] 3.3.5.9
                # says queue it. FreeTDS never does; waiting for the running one is enough.
                await asyncio.gather(self._running, return_exceptions=True)
            items = self._dispatch(request)
            self._out.start()  # before the task: an ATTENTION from now on finds the reply open
            self._running = asyncio.create_task(self._respond(items))

    def _dispatch(self, request: Request) -> AsyncIterator[Item]:
        """The engine's items for a request; parse errors raise here and close the connection."""
        assert self.session is not None
        if request.type == PacketType.SQL_BATCH:
            descriptor, start = parse_all_headers(request.payload)
            sql = _ucs2(request.payload[start:], "SQL batch text")
            return self._checked(descriptor) or self.session.batch(sql)
        if request.type == PacketType.TRANSACTION_MANAGER:
            descriptor, start = parse_all_headers(request.payload)
            call = parse_transaction(request.payload[start:])
            return self._checked(descriptor) or self._transaction(call)
        if request.type == PacketType.RPC:
            # Not required of the lab: FreeTDS sends RPC (sp_executesql, sp_prepexec, ...)
            # for statements with parameter markers. Refuse clearly rather than hang up.
            _descriptor, start = parse_all_headers(request.payload)
            name = rpc_procedure(request.payload[start:])
            text = (
                f"Could not find stored procedure '{name}': the lab's SQL Server stand-in does not "
                "support RPC requests (statements with parameters); send plain SQL batches."
            )
            return _items(Message(2812, 16, text), Done())
        raise ProtocolError(f"unexpected message type {request.type:#x} after login")

    def _checked(self, descriptor: int | None) -> AsyncIterator[Item] | None:
        """An error reply when the request names a transaction other than the one announced."""
        if descriptor is None or descriptor == self._descriptor:
            return None
        text = f"The server failed to resume the transaction. Desc:{descriptor:x}."
        return _items(Message(3971, 16, text), Done())

    def _transaction(self, call: TransactionCall) -> AsyncIterator[Item]:
        assert self.session is not None
        if call.request is None:
            text = (
                f"Transaction Manager request {call.code} is not supported by the lab's SQL Server stand-in."
            )
            return _items(Message(LAB_UNSUPPORTED, 16, text), Done())
        return self.session.transaction(call.request, call.begin_new)

    async def _respond(self, items: AsyncIterator[Item]) -> None:
        reply = _Reply(self)
        try:
            async for item in items:
                for token in reply.tokens(item):
                    self._out.add(token)
                    await self._out.flush()
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as e:
            # An engine bug (or a value its column type cannot carry): the client gets an
            # error, the connection lives on.
            log.exception("the SQL engine failed a request of TDS client %s", self._peer)
            for token in reply.tokens(
                Message(LAB_UNSUPPORTED, 16, f"The lab's SQL Server stand-in failed: {e!r}")
            ):
                self._out.add(token)
        finally:
            await _close_iterator(items)
        self._out.add(reply.end())
        await self._out.finish()

    async def _attention(self) -> None:
        """Cancel the running request, drop what it has not sent, acknowledge ([MS-TDS]
        2.2.1.7: a DONE with DONE_ATTN, also when the reply was complete already)."""
        task, self._running = self._running, None
        if task is not None and self._out.open:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert self.session is not None
            await self._safely(self.session.cancel(), "session.cancel()")
            self._out.discard_unsent()
        else:
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)
            self._out.start()  # the acknowledgment is a message of its own
        self._out.add(done_token(DONE_ATTN))
        await self._out.finish()

    async def _send(self, *tokens: bytes) -> None:
        """A whole reply message at once (no request task running)."""
        self._out.start()
        for token in tokens:
            self._out.add(token)
        await self._out.finish()

    # ------------------------------------------------------------------ transactions

    def envchange(self, change: EnvChange) -> bytes:
        """An ENVCHANGE token; begin / commit / rollback keep the connection's descriptor."""
        if change.kind == "database":
            return envchange_token(ENV_DATABASE, b_varchar(str(change.new)), b_varchar(str(change.old)))
        if change.kind == "begin":
            given = change.new if isinstance(change.new, int) else 0
            self._descriptor = given & 0xFFFFFFFFFFFFFFFF or self._new_descriptor()
            return envchange_token(ENV_BEGIN, b_varbyte(self._descriptor.to_bytes(8, "little")), b"\x00")
        ended = self._descriptor or (change.old if isinstance(change.old, int) else 0)
        self._descriptor = 0
        old = b_varbyte((ended & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"))
        return envchange_token(ENV_KINDS[change.kind], b"\x00", old)

    def _new_descriptor(self) -> int:
        self._descriptors_given += 1
        spid = self.session.spid if self.session is not None else 0
        return (spid & 0xFFFF) << 32 | self._descriptors_given

    # ------------------------------------------------------------------ the end

    def abort(self) -> None:
        """Drop the socket: the reading loop sees the end of the stream and closes up."""
        self._writer.transport.abort()

    async def _close(self) -> None:
        task, self._running = self._running, None
        interrupted = task is not None and not task.done()
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self.session is not None:
            if interrupted:
                await self._safely(self.session.cancel(), "session.cancel()")
            await self._safely(self.session.close(), "session.close()")
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    async def _safely(self, call: Awaitable[None], what: str) -> None:
        """session.cancel() / close(): their failure is the engine's to log, not a crash here."""
        try:
            await call
        except Exception:
            log.exception("%s of TDS client %s failed", what, self._peer)


async def _close_iterator(items: AsyncIterator[Item]) -> None:
    """Close an engine's async generator now (its finally blocks run in this task), not at
    garbage collection."""
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


# --------------------------------------------------------------------------- the server


class TdsServer:
    """A listening TDS endpoint for an Engine; close() also ends the open connections."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], _Connection] = {}

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port)

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = connection = _Connection(self.engine, reader, writer)
        try:
            await connection.run()
        finally:
            del self._connections[task]

    def drop_connections(self) -> None:
        """Drop every client's socket, as a crashing server would; each connection then ends
        its own way (running batch cancelled, session closed).

        Aborting sockets rather than cancelling the handler tasks also keeps Python 3.11's
        start_server quiet: it logs a handler task that ends cancelled as an error."""
        for connection in self._connections.values():
            connection.abort()

    async def close(self) -> None:
        """Stop listening, end every connection (as a client disconnect would), wait for them."""
        if self._server is not None:
            self._server.close()
        self.drop_connections()
        tasks = list(self._connections)
        if tasks:
            _done, stuck = await asyncio.wait(tasks, timeout=10)
            for task in stuck:
                task.cancel()
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> TdsServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def serve(engine: Engine, host: str, port: int) -> TdsServer:
    """Listen for TDS clients on host:port (port 0: any free one, see TdsServer.port)."""
    server = TdsServer(engine)
    await server.start(host, port)
    return server


__all__ = ["ProtocolError", "ReplyWriter", "TdsServer", "serve"]
