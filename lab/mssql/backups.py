"""The lab SQL Server's backup files: real files on its host, one or more backup sets each.

A set is a header line (JSON: the database, its files, name, dates, whether it carries a
checksum) followed by the database's content (a mariadb-dump of the MariaDB database the
stand-in serves it from). SQL Server's own format (Microsoft Tape Format) is not needed: what
the adapter depends on is the statements' behaviour (Microsoft Learn, "BACKUP (Transact-SQL)",
"RESTORE Statements", "RESTORE VERIFYONLY", "RESTORE FILELISTONLY", "RESTORE HEADERONLY"):
NOINIT appends a set and INIT overwrites the media, FILE = n picks one, WITH CHECKSUM
verifies a checksum the backup wrote, a damaged set fails verification, and the result
sets' columns, which follow Learn's tables in order.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from lab.mssql.results import Column

MAGIC = b"ZDLABMSSQL1 "
PAGE = 8192


class MediaError(Exception):
    """The file is not a backup (kind 'format'), a set is damaged ('damaged'), or absent."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(detail or kind)
        self.kind = kind


@dataclass(frozen=True)
class DbFile:
    logical: str
    physical: str
    type: str  # D (data) or L (log)
    file_id: int
    size: int = 8 * 1024 * 1024


@dataclass(frozen=True)
class SetHeader:
    database: str
    files: tuple[DbFile, ...]
    name: str
    description: str
    size: int  # bytes of content
    checksum: str | None  # sha256 of the content (WITH CHECKSUM), else None
    copy_only: bool
    started: str
    finished: str
    server: str
    position: int = 1
    backup_set_guid: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def pages(self) -> int:
        return max(1, -(-self.size // PAGE))


def _encode(h: SetHeader) -> bytes:
    d = asdict(h)
    return MAGIC + json.dumps(d, separators=(",", ":")).encode() + b"\n"


def _decode(line: bytes) -> SetHeader:
    d = json.loads(line[len(MAGIC) :])
    d["files"] = tuple(DbFile(**f) for f in d["files"])
    return SetHeader(**d)


def read_sets(path: str) -> list[tuple[SetHeader, int]]:
    """Every set on the media: (header, offset of its content). OSError when unreadable,
    MediaError('format') when the file is not a backup, ('damaged') when a set is cut short."""
    sets: list[tuple[SetHeader, int]] = []
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        while True:
            pos = f.tell()
            if pos >= size:
                break
            line = f.readline(1 << 20)
            if not line.startswith(MAGIC) or not line.endswith(b"\n"):
                raise MediaError("format" if not sets else "damaged", path)
            try:
                header = _decode(line)
            except (ValueError, TypeError, KeyError) as e:
                raise MediaError("format", str(e)) from e
            start = f.tell()
            if start + header.size > size:
                raise MediaError("damaged", path)
            sets.append((header, start))
            f.seek(start + header.size)
    if not sets:
        raise MediaError("format", path)
    return sets


def read_content(path: str, offset: int, header: SetHeader) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(header.size)
    if len(data) != header.size:
        raise MediaError("damaged", path)
    return data


def content_intact(content: bytes, header: SetHeader) -> bool:
    return header.checksum is None or hashlib.sha256(content).hexdigest() == header.checksum


def write_set(path: str, header: SetHeader, content: bytes, init: bool) -> SetHeader:
    """Append a set (NOINIT) or start the media afresh (INIT); returns the header with its
    position. The file is created mode 600 (it holds the whole database)."""
    position = 1
    if not init and os.path.exists(path) and os.path.getsize(path) > 0:
        position = len(read_sets(path)) + 1
    header = SetHeader(**{**asdict(header), "files": header.files, "position": position})
    fresh = init or position == 1
    # A fresh media is written beside and renamed in (a reader never sees half of it); a set
    # is appended in place, as NOINIT does.
    target = path + ".zdtmp" if fresh else path
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if fresh else os.O_APPEND)
    with os.fdopen(os.open(target, flags, 0o600), "wb") as f:
        f.write(_encode(header))
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    if fresh:
        os.replace(target, path)
    return header


def now() -> str:
    return dt.datetime.now().isoformat(timespec="milliseconds")


# ------------------------------------------------------------------ result sets (Learn's columns)

FILELIST_COLUMNS: tuple[Column, ...] = (
    Column("LogicalName", "nvarchar", 128),
    Column("PhysicalName", "nvarchar", 260),
    Column("Type", "nvarchar", 1),
    Column("FileGroupName", "nvarchar", 128),
    Column("Size", "decimal", precision=20, scale=0),
    Column("MaxSize", "decimal", precision=20, scale=0),
    Column("FileID", "bigint"),
    Column("CreateLSN", "decimal", precision=25, scale=0),
    Column("DropLSN", "decimal", precision=25, scale=0),
    Column("UniqueID", "uniqueidentifier"),
    Column("ReadOnlyLSN", "decimal", precision=25, scale=0),
    Column("ReadWriteLSN", "decimal", precision=25, scale=0),
    Column("BackupSizeInBytes", "bigint"),
    Column("SourceBlockSize", "int"),
    Column("FileGroupID", "int"),
    Column("LogGroupGUID", "uniqueidentifier"),
    Column("DifferentialBaseLSN", "decimal", precision=25, scale=0),
    Column("DifferentialBaseGUID", "uniqueidentifier"),
    Column("IsReadOnly", "bit"),
    Column("IsPresent", "bit"),
    Column("TDEThumbprint", "varbinary", 32),
    Column("SnapshotURL", "nvarchar", 360),
)


def filelist_rows(header: SetHeader) -> list[tuple[Any, ...]]:
    import decimal

    rows = []
    for f in header.files:
        data = f.type == "D"
        rows.append(
            (
                f.logical,
                f.physical,
                f.type,
                "PRIMARY" if data else None,
                decimal.Decimal(f.size),
                decimal.Decimal(35184372080640 if data else 2199023255552),
                f.file_id,
                decimal.Decimal(0),
                None,
                uuid.uuid5(uuid.NAMESPACE_URL, f.physical),
                None,
                None,
                header.size if data else 0,
                4096,
                1 if data else 0,
                None,
                None,
                None,
                False,
                True,
                None,
                None,
            )
        )
    return rows


HEADER_COLUMNS: tuple[Column, ...] = (
    Column("BackupName", "nvarchar", 128),
    Column("BackupDescription", "nvarchar", 255),
    Column("BackupType", "smallint"),
    Column("ExpirationDate", "datetime2"),
    Column("Compressed", "bit"),
    Column("Position", "smallint"),
    Column("DeviceType", "tinyint"),
    Column("UserName", "nvarchar", 128),
    Column("ServerName", "nvarchar", 128),
    Column("DatabaseName", "nvarchar", 128),
    Column("DatabaseVersion", "int"),
    Column("DatabaseCreationDate", "datetime2"),
    Column("BackupSize", "decimal", precision=20, scale=0),
    Column("FirstLSN", "decimal", precision=25, scale=0),
    Column("LastLSN", "decimal", precision=25, scale=0),
    Column("CheckpointLSN", "decimal", precision=25, scale=0),
    Column("DatabaseBackupLSN", "decimal", precision=25, scale=0),
    Column("BackupStartDate", "datetime2"),
    Column("BackupFinishDate", "datetime2"),
    Column("SortOrder", "smallint"),
    Column("CodePage", "smallint"),
    Column("UnicodeLocaleId", "int"),
    Column("UnicodeComparisonStyle", "int"),
    Column("CompatibilityLevel", "tinyint"),
    Column("SoftwareVendorId", "int"),
    Column("SoftwareVersionMajor", "int"),
    Column("SoftwareVersionMinor", "int"),
    Column("SoftwareVersionBuild", "int"),
    Column("MachineName", "nvarchar", 128),
    Column("Flags", "int"),
    Column("BindingID", "uniqueidentifier"),
    Column("RecoveryForkID", "uniqueidentifier"),
    Column("Collation", "nvarchar", 128),
    Column("FamilyGUID", "uniqueidentifier"),
    Column("HasBulkLoggedData", "bit"),
    Column("IsSnapshot", "bit"),
    Column("IsReadOnly", "bit"),
    Column("IsSingleUser", "bit"),
    Column("HasBackupChecksums", "bit"),
    Column("IsDamaged", "bit"),
    Column("BeginsLogChain", "bit"),
    Column("HasIncompleteMetaData", "bit"),
    Column("IsForceOffline", "bit"),
    Column("IsCopyOnly", "bit"),
    Column("FirstRecoveryForkID", "uniqueidentifier"),
    Column("ForkPointLSN", "decimal", precision=25, scale=0),
    Column("RecoveryModel", "nvarchar", 60),
    Column("DifferentialBaseLSN", "decimal", precision=25, scale=0),
    Column("DifferentialBaseGUID", "uniqueidentifier"),
    Column("BackupTypeDescription", "nvarchar", 60),
    Column("BackupSetGUID", "uniqueidentifier"),
    Column("CompressedBackupSize", "bigint"),
    Column("containment", "tinyint"),
    Column("KeyAlgorithm", "nvarchar", 32),
    Column("EncryptorThumbprint", "varbinary", 20),
    Column("EncryptorType", "nvarchar", 32),
)


def header_row(h: SetHeader, version: tuple[int, int, int]) -> tuple[Any, ...]:
    import decimal

    def date(s: str) -> dt.datetime:
        return dt.datetime.fromisoformat(s)

    values: dict[str, Any] = {
        "BackupName": h.name or None,
        "BackupDescription": h.description or None,
        "BackupType": 1,
        "Compressed": False,
        "Position": h.position,
        "DeviceType": 2,
        "UserName": "zerodown",
        "ServerName": h.server,
        "DatabaseName": h.database,
        "DatabaseVersion": 957,
        "BackupSize": decimal.Decimal(h.size),
        "BackupStartDate": date(h.started),
        "BackupFinishDate": date(h.finished),
        "CodePage": 0,
        "CompatibilityLevel": 160,
        "SoftwareVendorId": 4608,
        "SoftwareVersionMajor": version[0],
        "SoftwareVersionMinor": version[1],
        "SoftwareVersionBuild": version[2],
        "MachineName": h.server,
        "Collation": "SQL_Latin1_General_CP1_CI_AS",
        "HasBackupChecksums": h.checksum is not None,
        "IsDamaged": False,
        "IsCopyOnly": h.copy_only,
        "IsReadOnly": False,
        "IsSingleUser": False,
        "RecoveryModel": "FULL",
        "BackupTypeDescription": "Database",
        "BackupSetGUID": uuid.UUID(h.backup_set_guid),
        "CompressedBackupSize": h.size,
        "containment": 0,
    }
    return tuple(values.get(c.name) for c in HEADER_COLUMNS)
