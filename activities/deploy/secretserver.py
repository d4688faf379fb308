"""The Secret Server builders: the upgrade zip and the SQL script, written on the worker.

`build_upgrade_zip` (the seed's "Download Application Zip File") writes a package holding
only what differs from a node's application folder; `generate_sql_script` (the seed's
"Generate SQL Script") writes a package's `up` migrations as one reviewable script. Both
go into a private (mode 700) output folder as mode-600 files, are deterministic, and are
published atomically (an identical file already there is reused).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.common import check_id, fail, heartbeat, sha256_file, with_heartbeat
from activities.deploy.appfolder import _check_relpath, folder_manifest
from activities.deploy.package import PackageInfo, _verify_package, inspect_package_file
from errors import INVALID_REQUEST, PACKAGE_CORRUPT
from inventory.model import Node

# 1980-01-01, the earliest date a zip entry can carry: fixed, so equal content gives equal bytes.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_SYSTEM_MEMBER = "release.json"


@dataclass(frozen=True)
class UpgradeZip:
    path: str  # on the worker: <out_dir>/<zip_id>.zip (mode 600)
    sha256: str
    size: int
    files: tuple[str, ...]  # the zip's members, sorted (release.json always among them)
    unchanged: int  # package files left out: the node already holds them byte for byte
    base_node: str  # the node whose application folder the difference was taken against
    reused: bool = False  # an identical zip was already at `path` (left as it was)


@dataclass(frozen=True)
class SqlScript:
    path: str  # on the worker: <out_dir>/<script_id>.sql (mode 600)
    sha256: str
    migrations: tuple[int, ...]  # the migration versions it runs, in order
    reused: bool = False


def _private_out_dir(directory: str) -> None:
    """Create `directory` mode 700, or tighten an existing one: zips hold the application's
    files and scripts its schema, neither is for other local users."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if stat.S_IMODE(os.stat(directory).st_mode) & 0o077:
            os.chmod(directory, 0o700)
    except OSError as e:
        fail(
            INVALID_REQUEST,
            f"output directory {directory} cannot be created or made private (mode 700): {e.strerror or e}",
        )


def _publish(tmp: str, path: str) -> tuple[str, int, bool]:
    """Put the finished temporary file `tmp` at `path` atomically: (sha256, size, reused).

    When `path` already holds the same bytes (a retry, or the same inputs again) it is kept,
    mtime and all, and `tmp` is removed; other content is replaced, never appended to.
    """
    digest = sha256_file(tmp)
    try:
        same = os.path.isfile(path) and sha256_file(path) == digest
    except OSError:
        same = False
    if same:
        os.unlink(tmp)
        if stat.S_IMODE(os.stat(path).st_mode) & 0o077:
            os.chmod(path, 0o600)
        return digest, os.path.getsize(path), True
    os.replace(tmp, path)
    return digest, os.path.getsize(path), False


def _prepare_out(directory: str, name: str) -> tuple[str, str]:
    """(final path, an empty private temporary file beside it) in the private `directory`.
    mkstemp: mode 600 and a fresh name, so a concurrent or crashed attempt never shares it."""
    _private_out_dir(directory)
    path = os.path.join(os.path.abspath(directory), name)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    return path, tmp


def _member_sha256(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> str:
    h = hashlib.sha256()
    with zf.open(info) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _member_mode(info: zipfile.ZipInfo) -> int:
    """The permission bits the package gives a member (0644 when it gives none), so an
    executable script stays executable when the upgrade zip is extracted."""
    mode = (info.external_attr >> 16) & 0o777 if info.create_system == 3 else 0
    return mode or 0o644


def _write_upgrade_zip(
    package_path: str, node_manifest: dict[str, str], protected: set[str], merge: set[str], out: str
) -> tuple[tuple[str, ...], int]:
    """Write the upgrade zip into `out`: (members, unchanged count). Deterministic: sorted
    entries, fixed dates, modes from the package, one compression setting."""
    with zipfile.ZipFile(package_path) as src:
        members: dict[str, zipfile.ZipInfo] = {}
        for info in src.infolist():  # the last entry of a name wins, as when extracting
            if not info.is_dir():
                members[posixpath.normpath(info.filename)] = info
        release = json.loads(src.read(members[_SYSTEM_MEMBER]).decode("utf-8"))
        referenced = {
            posixpath.normpath(m[k])
            for m in release.get("migrations", []) or []
            if isinstance(m, dict)
            for k in ("up", "down")
            if isinstance(m.get(k), str)
        }
        # Merge files are merged per node at deploy (their node copy never equals the
        # package's), migration scripts are read from the package by inspect_package.
        always = {_SYSTEM_MEMBER, *merge, *referenced}
        chosen: list[str] = []
        unchanged = 0
        for name in sorted(members):
            if name in protected:
                continue
            if name not in always and node_manifest.get(name) == _member_sha256(src, members[name]):
                unchanged += 1
                continue
            chosen.append(name)
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as dst:
            for name in chosen:
                info = members[name]
                entry = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
                entry.compress_type = zipfile.ZIP_DEFLATED
                entry.create_system = 3  # unix, so the permission bits are honoured
                entry.external_attr = (stat.S_IFREG | _member_mode(info)) << 16
                # Known up front, so zipfile decides on zip64 the same way every time.
                entry.file_size = info.file_size
                with src.open(info) as r, dst.open(entry, "w") as w:
                    shutil.copyfileobj(r, w, 1 << 20)
    return tuple(chosen), unchanged


async def build_zip(
    node: Node,
    package: PackageInfo,
    out_dir: str,
    zip_id: str,
    protected_files: tuple[str, ...],
    merge_files: tuple[str, ...],
) -> UpgradeZip:
    check_id("zip id", zip_id)
    for p in (*protected_files, *merge_files):
        _check_relpath("file", p)
    protected = {posixpath.normpath(p) for p in protected_files}
    if _SYSTEM_MEMBER in protected:
        fail(INVALID_REQUEST, f"{_SYSTEM_MEMBER} cannot be a protected file: every package needs it")
    await _verify_package(package)
    heartbeat({"node": node.name, "step": "manifest"})
    manifest = await folder_manifest(node, node.app_dir)
    path, tmp = await asyncio.to_thread(_prepare_out, out_dir, f"{zip_id}.zip")
    try:
        files, unchanged = await with_heartbeat(
            asyncio.to_thread(
                _write_upgrade_zip,
                package.path,
                manifest,
                protected,
                {posixpath.normpath(m) for m in merge_files},
                tmp,
            ),
            lambda: {"node": node.name, "step": "zip", "zip_id": zip_id},
        )
        # The zip must itself be a valid package (deploy_package inspects nothing, the
        # workflow does): e.g. a migration script that is also a protected file is not.
        try:
            await asyncio.to_thread(inspect_package_file, tmp)
        except ApplicationError as e:
            fail(
                PACKAGE_CORRUPT,
                f"the upgrade zip {zip_id} built from {package.path} against node "
                f"{node.name} would not be a valid package: {e.message}",
                cause=e,
            )
        digest, size, reused = await asyncio.to_thread(_publish, tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return UpgradeZip(
        path=path,
        sha256=digest,
        size=size,
        files=files,
        unchanged=unchanged,
        base_node=node.name,
        reused=reused,
    )


def _terminated(sql: str) -> str:
    """`sql` with its last statement ending in ';' and a final newline, so concatenated
    scripts never run into each other (the `mariadb` client would join the statements)."""
    lines = sql.rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        s = lines[i].strip()
        if s and not s.startswith(("--", "#")):
            if not s.endswith(";"):
                lines[i] = lines[i].rstrip() + ";"
            break
    return "\n".join(lines) + "\n" if lines else ""


def sql_script_text(package: PackageInfo, from_schema: int) -> tuple[str, tuple[int, ...]]:
    """The upgrade script from schema `from_schema`: (text, migration versions).

    The `up` scripts of the package's migrations above `from_schema`, ascending, each under
    a comment header. It does not record schema_version (db_apply_migration does that when
    zerodown runs the migrations itself): it is the reviewable, runnable form of them.
    """
    todo = [m for m in sorted(package.migrations, key=lambda m: m.version) if m.version > from_schema]
    versions = tuple(m.version for m in todo)
    out = [
        f"-- zerodown upgrade script: {package.name} {package.version}, schema {from_schema} -> "
        f"{versions[-1] if versions else from_schema}",
        f"-- package {os.path.basename(package.path)} sha256 {package.sha256}",
        f"-- migrations: {', '.join(map(str, versions)) if versions else 'none'}",
    ]
    if not versions:
        out.append(f"-- Nothing to run: the package has no migration above schema {from_schema}.")
    text = "\n".join(out) + "\n"
    for m in todo:
        text += (
            f"\n-- ---------------------------------------------------------------- migration "
            f"{m.version} (up){' DESTRUCTIVE' if m.destructive else ''}\n"
        )
        text += (
            _batch_ended(m.up_sql) if package.database == "mssql" else _terminated(m.up_sql)
        ) or "-- (empty)\n"
    return text, versions


def _batch_ended(sql: str) -> str:
    """A T-SQL script whose last batch ends with a GO line, so the next migration's batches
    never join it (sqlcmd runs up to each GO; activities/mssql/scripts.py)."""
    from activities.mssql.scripts import split_batches

    text = sql.rstrip()
    if not text:
        return ""
    # Ended by GO exactly when a statement after it would start a batch of its own.
    ends_with_go = len(split_batches(text + "\nSELECT 1")) > len(split_batches(text))
    return text + ("\n" if ends_with_go else "\nGO\n")


def _write_text_private(directory: str, name: str, text: str) -> tuple[str, str, int, bool]:
    path, tmp = _prepare_out(directory, name)
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        return (path, *_publish(tmp, path))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


async def generate_script(package: PackageInfo, from_schema: int, out_dir: str, script_id: str) -> SqlScript:
    check_id("script id", script_id)
    if isinstance(from_schema, bool) or not isinstance(from_schema, int) or from_schema < 0:
        fail(INVALID_REQUEST, f"from_schema must be an integer >= 0, got {from_schema!r}")
    text, versions = sql_script_text(package, from_schema)
    path, digest, _size, reused = await asyncio.to_thread(
        _write_text_private, out_dir, f"{script_id}.sql", text
    )
    return SqlScript(path=path, sha256=digest, migrations=versions, reused=reused)


# =========================================================================== activities


@dataclass(frozen=True)
class UpgradeZipRequest:
    node: Node  # the node whose application folder the package is compared with
    package: PackageInfo
    out_dir: str  # on the worker; created mode 700
    zip_id: str  # the zip is <out_dir>/<zip_id>.zip
    protected_files: tuple[str, ...] = ()
    merge_files: tuple[str, ...] = ()


@dataclass(frozen=True)
class SqlScriptRequest:
    package: PackageInfo
    from_schema: int
    out_dir: str  # on the worker; created mode 700
    script_id: str  # the script is <out_dir>/<script_id>.sql


@activity.defn
async def build_upgrade_zip(req: UpgradeZipRequest) -> UpgradeZip:
    """The seed's "Download Application Zip File": a package holding only what differs from
    the node's application folder (plus release.json, the merge files and the migration
    scripts; never a protected file). A valid package for inspect_package / deploy_package.
    Deterministic and idempotent: same package and folder -> same bytes (an identical zip
    already there is reused)."""
    return await build_zip(
        req.node, req.package, req.out_dir, req.zip_id, tuple(req.protected_files), tuple(req.merge_files)
    )


@activity.defn
async def generate_sql_script(req: SqlScriptRequest) -> SqlScript:
    """The seed's "Generate SQL Script": the package's `up` migrations above from_schema in
    one file (mode 600), each under a comment header; idempotent."""
    return await generate_script(req.package, req.from_schema, req.out_dir, req.script_id)
