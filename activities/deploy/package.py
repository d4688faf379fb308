"""Release packages: inspect a release zip (ARCHITECTURE.md "Release packages") and check it.

`inspect_package_file` validates a package (a zip with `release.json` at its root, safe
member names, no symbolic links, intact CRCs, well-formed versions and migrations) and
describes it as a PackageInfo; `inspect_package` is the activity. A corrupt or unreadable
package is PackageCorrupt / PackageMissing (non-retryable). `_verify_package` checks that
the file is still the one inspected (its sha256 travels in PackageInfo) before a deploy or
an upgrade zip reads it again.
"""

from __future__ import annotations

import asyncio
import json
import os
import posixpath
import re
import stat
import zipfile
from dataclasses import dataclass

from temporalio import activity

from activities.common import fail, sha256_file
from activities.deploy.versions import _ascending_unique, compare_versions, parse_version
from errors import PACKAGE_CORRUPT, PACKAGE_MISSING


@dataclass(frozen=True)
class MigrationSpec:
    version: int
    up_sql: str
    down_sql: str
    destructive: bool = False


@dataclass(frozen=True)
class PackageInfo:
    path: str
    sha256: str
    name: str
    version: str
    min_upgrade_from: str
    schema_version: int
    migrations: tuple[MigrationSpec, ...]
    files: int
    size: int = 0
    # Versions that must be installed before this one (release.json `requires`), ascending.
    requires: tuple[str, ...] = ()
    # The database its migrations are written for (release.json `database`): "mysql"
    # (MariaDB / MySQL SQL, the default) or "mssql" (T-SQL scripts with GO batches).
    database: str = "mysql"


def _corrupt(path: str, why: str) -> None:
    fail(PACKAGE_CORRUPT, f"package {path}: {why}")


def _safe_member(name: str) -> bool:
    if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or "\\" in name:
        return False
    return ".." not in name.split("/")


def inspect_package_file(path: str) -> PackageInfo:
    """Validate a release zip (ARCHITECTURE.md "Release packages") and describe it."""
    if not os.path.isfile(path):
        fail(PACKAGE_MISSING, f"package {path} does not exist")
    try:
        digest = sha256_file(path)
    except OSError as e:
        fail(PACKAGE_MISSING, f"package {path} is not readable: {e.strerror or e}")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        _corrupt(path, f"not a zip file ({e})")
    with zf:
        infos = zf.infolist()
        for info in infos:
            if not _safe_member(info.filename):
                _corrupt(path, f"unsafe member name {info.filename!r} (absolute or '..')")
            if stat.S_ISLNK(info.external_attr >> 16):
                _corrupt(path, f"member {info.filename!r} is a symbolic link")
        try:
            bad = zf.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            _corrupt(path, f"unreadable ({e})")
        if bad is not None:
            _corrupt(path, f"CRC check failed for member {bad!r}")
        names = {i.filename for i in infos}
        if "release.json" not in names:
            _corrupt(path, "no release.json at the root")
        try:
            release = json.loads(zf.read("release.json").decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            _corrupt(path, f"release.json is not valid JSON ({e})")
        if not isinstance(release, dict):
            _corrupt(path, "release.json must be a JSON object")

        def text(member: str, what: str) -> str:
            if member not in names:
                _corrupt(path, f"{what} names {member!r}, which is not in the package")
            try:
                return zf.read(member).decode("utf-8")
            except UnicodeDecodeError:
                _corrupt(path, f"{member} is not UTF-8 text")
            raise AssertionError("unreachable")

        name, version = release.get("name"), release.get("version")
        if not isinstance(name, str) or not name:
            _corrupt(path, "release.json: 'name' must be a non-empty string")
        if not isinstance(version, str):
            _corrupt(path, "release.json: 'version' must be a string like \"2.0.0\"")
        min_from = release.get("min_upgrade_from") or ""
        for key, v in (("version", version), ("min_upgrade_from", min_from)):
            if v:
                try:
                    parse_version(v)
                except (ValueError, AttributeError):
                    _corrupt(path, f"release.json: {key} {v!r} is not a dotted numeric version")
        if min_from and version and compare_versions(min_from, version) > 0:
            _corrupt(path, f"release.json: min_upgrade_from {min_from} is newer than version {version}")
        raw_requires = release.get("requires", [])
        if not isinstance(raw_requires, list):
            _corrupt(path, 'release.json: requires must be a list of versions like ["2.0.0"]')
        for i, r in enumerate(raw_requires):
            try:
                parse_version(r)
            except (ValueError, AttributeError):
                _corrupt(path, f"release.json: requires[{i}] {r!r} is not a dotted numeric version")
            if version and compare_versions(r, version) >= 0:
                _corrupt(path, f"release.json: requires[{i}] {r} is not older than version {version}")
        schema = release.get("schema_version", 0)
        if isinstance(schema, bool) or not isinstance(schema, int) or schema < 0:
            _corrupt(path, f"release.json: schema_version must be an integer >= 0, got {schema!r}")
        raw_migrations = release.get("migrations", [])
        if not isinstance(raw_migrations, list):
            _corrupt(path, "release.json: migrations must be a list")
        migrations: list[MigrationSpec] = []
        for i, m in enumerate(raw_migrations):
            where = f"release.json: migrations[{i}]"
            if not isinstance(m, dict):
                _corrupt(path, f"{where} must be an object")
            mv = m.get("version")
            if isinstance(mv, bool) or not isinstance(mv, int):
                _corrupt(path, f"{where}.version must be an integer")
            if not isinstance(m.get("up"), str):
                _corrupt(path, f"{where}.up must name the up script")
            down = m.get("down")
            if down is not None and not isinstance(down, str):
                _corrupt(path, f"{where}.down must name the down script")
            migrations.append(
                MigrationSpec(
                    version=mv,
                    up_sql=text(m["up"], f"{where}.up"),
                    down_sql=text(down, f"{where}.down") if down else "",
                    destructive=bool(m.get("destructive", False)),
                )
            )
        database = release.get("database", "mysql")
        if database not in ("mysql", "mssql"):
            _corrupt(path, f'release.json: database must be "mysql" or "mssql", got {database!r}')
        if database == "mssql":
            # Split now as sqlcmd would, so a bad GO line stops the preflight, not the upgrade.
            from activities.mssql.scripts import ScriptError, split_batches

            for m in migrations:
                for direction, script in (("up", m.up_sql), ("down", m.down_sql)):
                    try:
                        split_batches(script)
                    except ScriptError as e:
                        _corrupt(path, f"migration {m.version} {direction}: {e}")
        versions = [m.version for m in migrations]
        if len(set(versions)) != len(versions):
            _corrupt(path, f"release.json: duplicate migration versions {versions}")
        files = sum(1 for i in infos if not i.is_dir())
    return PackageInfo(
        path=os.path.abspath(path),
        sha256=digest,
        name=name,
        version=version,
        min_upgrade_from=min_from,
        schema_version=schema,
        migrations=tuple(sorted(migrations, key=lambda m: m.version)),
        files=files,
        size=os.path.getsize(path),
        requires=_ascending_unique(raw_requires),
        database=database,
    )


async def _verify_package(package: PackageInfo) -> None:
    """The package file must still be the one inspected (its sha256 travels in PackageInfo)."""
    try:
        local_sha = await asyncio.to_thread(sha256_file, package.path)
    except OSError:
        fail(PACKAGE_MISSING, f"package {package.path} does not exist (or is unreadable)")
    if local_sha != package.sha256:
        fail(
            PACKAGE_CORRUPT,
            f"package {package.path} changed since it was inspected "
            f"(sha256 {local_sha}, inspected {package.sha256})",
        )


def _zip_member(path: str, member: str) -> bytes | None:
    """A file of the (already inspected) package, or None when it has no such file."""
    want = posixpath.normpath(member)
    found: zipfile.ZipInfo | None = None
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():  # the last entry of a name wins, as when extracting
                if not info.is_dir() and posixpath.normpath(info.filename) == want:
                    found = info
            return zf.read(found) if found is not None else None
    except (zipfile.BadZipFile, OSError, KeyError, ValueError) as e:
        fail(PACKAGE_CORRUPT, f"package {path}: cannot read {member}: {e}")


# =========================================================================== activities


@dataclass(frozen=True)
class PackageRequest:
    path: str


@activity.defn
async def inspect_package(req: PackageRequest) -> PackageInfo:
    return await asyncio.to_thread(inspect_package_file, req.path)


def database_problem(package: PackageInfo, db_kind: str) -> str | None:
    """Why the package's migrations cannot run on a database of `db_kind` (None: they can).
    Pure: the workflows' preflights call it."""
    if package.migrations and package.database != db_kind:
        return (
            f"package {package.name} {package.version}: its migrations are written for "
            f"{_DIALECTS.get(package.database, package.database)}, the inventory's database is "
            f"{_DIALECTS.get(db_kind, db_kind)} (use the release built for it)"
        )
    return None


_DIALECTS = {"mysql": "MariaDB / MySQL", "mssql": "SQL Server"}
