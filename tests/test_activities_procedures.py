"""Building blocks of the Secret Server procedures against the real lab (session `lab`):
the upgrade zip holding only the changed files, the SQL script, the preflight storage
checks, and the MariaDB copies (restore into another database, drop it, restore keeping
the current rows of some tables).

Every test leaves the lab as it found it: v1 on every node, every member UP, labapp at
schema 1 with its rows, no scratch database, no file left in the worker's folders.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import subprocess
import uuid
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities import deploy, haproxy, http_checks, mysql, node, ssh
from activities.deploy import (
    AppBackupRequest,
    DeployRequest,
    PackageRequest,
    SqlScriptRequest,
    UpgradeZipRequest,
)
from activities.mysql import (
    BackupRequest,
    BackupSpaceRequest,
    DbBackup,
    DropDatabaseRequest,
    RestoreKeepingRequest,
)
from activities.node import NodeStorageRequest
from inventory.load import load_inventory
from inventory.model import Database, Inventory, Node
from lab import mariadb as lab_mariadb
from lab.config import DB_USER, LabConfig
from tests.db_support import replica_caught_up

# The lab's scratch database (lab.config.SCRATCH_DB_NAME): the lab DB user may create and
# drop it, and a lab reset drops it.
COPY = "labapp_test"


@pytest.fixture(scope="module")
async def inv(lab: LabConfig) -> AsyncIterator[Inventory]:
    yield load_inventory(lab.site_yaml)
    await ssh.POOL.close_all()


@pytest.fixture(scope="module")
def copy_grants(lab: LabConfig) -> Iterator[None]:
    """The lab DB user's privileges on the scratch database: granted here (and revoked
    afterwards) only if the lab did not grant them itself."""
    exact = COPY.replace("_", "\\_")
    granted: list[str] = []
    for host in ("127.0.0.1", "localhost"):
        grants = " ".join(
            str(r[0]) for r in lab_mariadb.query(lab, "primary", f"SHOW GRANTS FOR '{DB_USER}'@'{host}'")
        )
        if f"`{exact}`" not in grants and f"`{COPY}`" not in grants:
            lab_mariadb.query(lab, "primary", f"GRANT ALL PRIVILEGES ON `{exact}`.* TO '{DB_USER}'@'{host}'")
            granted.append(host)
    try:
        yield
    finally:
        for host in granted:
            lab_mariadb.query(
                lab, "primary", f"REVOKE ALL PRIVILEGES ON `{exact}`.* FROM '{DB_USER}'@'{host}'"
            )


def _env() -> ActivityEnvironment:
    return ActivityEnvironment()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _copy_of(db: Database, database: str = COPY) -> Database:
    return dataclasses.replace(db, database=database)


def _remove_backup(bk: DbBackup) -> None:
    base = Path(bk.path)
    for suffix in (".sql", ".sql.sha256", ".json"):
        base.with_name(bk.backup_id + suffix).unlink(missing_ok=True)


async def _databases(db: Database) -> set[str]:
    return {str(r[0]) for r in await mysql.query(db, "SHOW DATABASES", use_database=False)}


async def _cleanup_copy(db: Database) -> None:
    if COPY in await _databases(db):
        await mysql.drop_database(db, COPY)
    await replica_caught_up(db)


# =========================================================================== upgrade zip


async def _take_out(inv: Inventory, name: str) -> Node:
    n, lb = inv.node(name), inv.load_balancers[0]
    await haproxy.set_member_state(lb, name, "maint")
    await haproxy.wait_drained(lb, name, 30)
    await node.set_running(n, False)
    return n


async def _put_back(inv: Inventory, name: str) -> None:
    n, lb = inv.node(name), inv.load_balancers[0]
    await node.set_running(n, True)
    await http_checks.poll_healthy(n.url, inv.application.health, 30, 2, 0.2)
    await haproxy.set_member_state(lb, name, "ready")
    await haproxy.wait_up(lb, name, 30)


def _members(path: str) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i) for i in z.infolist() if not i.is_dir()}


async def test_upgrade_zip_against_a_v1_node_is_a_smaller_valid_package(
    inv: Inventory, lab: LabConfig, tmp_path: Path
) -> None:
    app, env = inv.application, _env()
    name, i = "node3", 3
    protected, merge = tuple(app.protected_files), tuple(app.merge_files)
    full = await env.run(deploy.inspect_package, PackageRequest(str(lab.package(2))))
    req = UpgradeZipRequest(inv.node(name), full, str(tmp_path / "out"), f"up-{name}", protected, merge)
    z = await env.run(deploy.build_upgrade_zip, req)
    assert z.base_node == name and not z.reused and z.unchanged > 0
    full_members = _members(full.path)
    node_app = lab.node_dir(i) / "app"
    changed = {
        m
        for m, data in full_members.items()
        if not (node_app / m).is_file() or _sha((node_app / m).read_bytes()) != _sha(data)
    }
    assert {
        "release.json",
        "web.config",
        "static/index.html",
        "migrations/002_up.sql",
        "migrations/002_down.sql",
    } <= set(z.files)
    assert set(z.files) == changed - set(protected) and "app.py" not in z.files
    assert z.unchanged == len(full_members) - len(changed)
    assert not set(protected) & set(z.files)
    # a package in its own right, smaller than the full one, with the same release
    part = await env.run(deploy.inspect_package, PackageRequest(z.path))
    assert part.sha256 == z.sha256 and part.files == len(z.files) < full.files
    assert (part.name, part.version, part.migrations, part.requires) == (
        full.name,
        full.version,
        full.migrations,
        full.requires,
    )
    assert all(_members(z.path)[m] == full_members[m] for m in z.files)
    again = await env.run(deploy.build_upgrade_zip, req)
    assert again.reused and again.sha256 == z.sha256

    # Deployed, it leaves the node as the full package would (merge files merged).
    rid = uuid.uuid4().hex[:8]
    n = await _take_out(inv, name)
    bk = None
    try:
        bk = await env.run(deploy.backup_app_folder, AppBackupRequest(n, f"bk-{rid}", protected))
        res = await env.run(deploy.deploy_package, DeployRequest(n, part, protected, merge, f"rel-{rid}"))
        assert res.version == "2.0.0" and res.files_written == len(z.files)
        for m, data in full_members.items():
            if m not in protected and m not in merge:
                assert _sha((node_app / m).read_bytes()) == _sha(data), m
        assert "greeting = Welcome to labapp 2" in (node_app / "web.config").read_text()
        await node.set_running(n, True)
        await http_checks.poll_healthy(n.url, app.health, 30, 2, 0.2)
        assert await http_checks.version_of(n.url, app.version, 5) == "2.0.0"
        await node.set_running(n, False)
    finally:
        if bk is not None:
            await node.set_running(n, False)
            await deploy.restore_app(bk)
            await ssh.run(n.ssh, f"rm -rf .zerodown/backups/bk-{rid}.* .zerodown/releases/rel-{rid}*")
        await _put_back(inv, name)
    assert await http_checks.version_of(n.url, app.version, 5) == "1.0.0"


# =========================================================================== SQL script


async def test_sql_script_runs_on_a_restored_copy(
    inv: Inventory, lab: LabConfig, tmp_path: Path, copy_grants: None
) -> None:
    db, env = inv.databases[0], _env()
    pkg = await env.run(deploy.inspect_package, PackageRequest(str(lab.package(2))))
    out = tmp_path / "scripts"
    script = await env.run(deploy.generate_sql_script, SqlScriptRequest(pkg, 1, str(out), "up-1"))
    assert script.migrations == (2,) and Path(script.path) == out / "up-1.sql"
    text = Path(script.path).read_text()
    assert text.startswith("-- zerodown upgrade script: labapp 2.0.0, schema 1 -> 2\n")
    assert "-- ---------------------------------------------------------------- migration 2 (up)" in text
    assert pkg.migrations[0].up_sql.strip() in text and _sha(text.encode()) == script.sha256
    assert oct(Path(script.path).stat().st_mode & 0o777) == "0o600"
    assert oct(out.stat().st_mode & 0o777) == "0o700"
    again = await env.run(deploy.generate_sql_script, SqlScriptRequest(pkg, 1, str(out), "up-1"))
    assert again.reused and again.sha256 == script.sha256
    none = await env.run(deploy.generate_sql_script, SqlScriptRequest(pkg, 2, str(out), "up-2"))
    assert none.migrations == () and "migrations: none" in Path(none.path).read_text()

    # The seed's "run the script on the Test SQL Server": a copy of labapp takes it, labapp
    # does not change.
    bk = await mysql.backup(db, f"script-{uuid.uuid4().hex[:8]}", str(tmp_path / "dumps"))
    copy = _copy_of(db)
    try:
        await mysql.restore(dataclasses.replace(bk, db=copy))
        await mysql._run_client(copy, [copy.database], script.path, None, "upgrade script", "mariadb")
        cols = await mysql.query(
            copy,
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE "
            "TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'items'",
        )
        assert "notes" in {str(r[0]) for r in cols}
        assert await mysql.table_checksums(db) == bk.table_checksums
    finally:
        await _cleanup_copy(db)
        _remove_backup(bk)


# =========================================================================== storage


async def test_inspect_node_storage(inv: Inventory, lab: LabConfig) -> None:
    n, env = inv.node("node1"), _env()
    protected = tuple(inv.application.protected_files)
    pkg_size = lab.package(2).stat().st_size
    st = await env.run(node.inspect_node_storage, NodeStorageRequest(n, protected, pkg_size))
    du = subprocess.run(
        ["du", "-sk", str(lab.node_dir(1) / "app")], capture_output=True, text=True, check=True
    )
    assert st.app_bytes == int(du.stdout.split()[0]) * 1024 > 0
    vfs = os.statvfs(lab.node_dir(1))
    assert abs(st.free_bytes - vfs.f_bavail * vfs.f_frsize) < 64 << 20  # others write meanwhile
    assert st.need_bytes == node.storage_need(st.app_bytes, pkg_size)
    assert st.need_bytes > st.app_bytes + 3 * pkg_size
    assert st.ok and st.missing_protected == () and st.detail.startswith("node node1: ok")
    assert st.node_name == "node1"

    missing = await env.run(
        node.inspect_node_storage, NodeStorageRequest(n, (*protected, "no-such.key"), pkg_size)
    )
    assert not missing.ok and missing.missing_protected == ("no-such.key",)
    assert "no-such.key" in missing.detail
    full = await env.run(node.inspect_node_storage, NodeStorageRequest(n, protected, 1 << 60))
    assert not full.ok and full.missing_protected == () and "free in the login directory" in full.detail
    with pytest.raises(ApplicationError) as e:
        await env.run(node.inspect_node_storage, NodeStorageRequest(n, protected, -1))
    assert e.value.type == "InvalidRequest"


async def test_check_backup_space(inv: Inventory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db, env = inv.databases[0], _env()
    size = await mysql.db_size_bytes(db)
    assert size > 0
    target = tmp_path / "not" / "yet"
    sp = await env.run(mysql.check_backup_space, BackupSpaceRequest(db, str(target)))
    assert sp.db_bytes == size and sp.need_bytes == 2 * size + (10 << 20)
    assert sp.ok and sp.measured == str(tmp_path) and not target.exists()  # read-only
    assert sp.free_bytes > 0 and str(tmp_path) in sp.detail

    class Usage:
        free = 1 << 20

    monkeypatch.setattr(mysql.dump.shutil, "disk_usage", lambda p: Usage())
    short = await env.run(mysql.check_backup_space, BackupSpaceRequest(db, str(target)))
    assert not short.ok and short.free_bytes == 1 << 20 and short.detail.startswith("not enough space")


# =========================================================================== MariaDB copies


async def test_restore_a_backup_into_another_database_then_drop_it(
    inv: Inventory, tmp_path: Path, copy_grants: None
) -> None:
    db, env = inv.databases[0], _env()
    bk = await env.run(mysql.db_backup, BackupRequest(db, f"copy-{uuid.uuid4().hex[:8]}", str(tmp_path)))
    dump = Path(bk.path).read_bytes()
    # the dump names no database: it loads into whichever the restore names
    assert b"\nUSE " not in dump and b"CREATE DATABASE" not in dump
    copy = _copy_of(db)
    try:
        assert COPY not in await _databases(db)
        res = await env.run(mysql.db_restore, dataclasses.replace(bk, db=copy))
        assert res.created_database and res.mismatched == () and res.dropped == ()
        assert res.checksums == bk.table_checksums == await mysql.table_checksums(copy)
        assert await mysql.table_checksums(db) == bk.table_checksums  # the source is untouched
        charset = await mysql.query(
            db,
            "SELECT SCHEMA_NAME, DEFAULT_CHARACTER_SET_NAME FROM "
            "information_schema.SCHEMATA WHERE SCHEMA_NAME IN (%s, %s)",
            (db.database, COPY),
            use_database=False,
        )
        assert len({str(r[1]) for r in charset}) == 1 and len(charset) == 2
        again = await env.run(mysql.db_restore, dataclasses.replace(bk, db=copy))
        assert not again.created_database and again.mismatched == ()

        # only copies are dropped
        for name, why in (
            (db.database, "the database the inventory names"),
            ("LabApp", "inventory"),
            ("mysql", "system schema"),
            ("information_schema", "system schema"),
            ("a`b", "use letters"),
        ):
            with pytest.raises(ApplicationError) as e:
                await env.run(mysql.db_drop_database, DropDatabaseRequest(db, name))
            assert e.value.type == "InvalidRequest" and e.value.non_retryable and why in e.value.message
        dropped = await env.run(mysql.db_drop_database, DropDatabaseRequest(db, COPY))
        assert dropped.dropped and dropped.database == COPY and COPY not in await _databases(db)
        assert not (await env.run(mysql.db_drop_database, DropDatabaseRequest(db, COPY))).dropped
        await replica_caught_up(db)
        assert db.replica is not None
        replica = dataclasses.replace(db, host=db.replica.host, port=db.replica.port)
        assert COPY not in await _databases(replica)
    finally:
        await _cleanup_copy(db)
        _remove_backup(bk)


async def test_restore_refuses_a_dump_that_selects_another_database(
    inv: Inventory, tmp_path: Path, copy_grants: None
) -> None:
    db = inv.databases[0]
    dump = tmp_path / "other.sql"
    dump.write_bytes(
        b"-- dump\nCREATE DATABASE /*!32312 IF NOT EXISTS*/ `labapp` /*!40100 x */;\n"
        b"USE `labapp`;\nDROP TABLE IF EXISTS items;\n"
    )
    bk = DbBackup(db=_copy_of(db), backup_id="other", path=str(dump), sha256=_sha(dump.read_bytes()), size=1)
    with pytest.raises(ApplicationError) as e:
        await _env().run(mysql.db_restore, bk)
    assert e.value.type == "InvalidRequest" and "selects database(s) labapp" in e.value.message
    assert COPY not in await _databases(db) and await mysql.schema_version(db) == 1
    for target in ("mysql", "performance_schema"):
        with pytest.raises(ApplicationError) as e:
            await _env().run(mysql.db_restore, dataclasses.replace(bk, db=_copy_of(db, target)))
        assert e.value.type == "InvalidRequest" and "system schema" in e.value.message


async def _audit(db: Database) -> list[str]:
    rows = await mysql.query(db, "SELECT Notes FROM tbAudit ORDER BY AuditId")
    return [str(r[0]) for r in rows]


async def _add_audit(db: Database, *notes: str) -> None:
    for note in notes:
        await mysql.query(
            db,
            "INSERT INTO tbAudit (AuditTypeName, Action, Notes, DateRecorded) "
            "VALUES ('ManualUpgrade', 'STARTED', %s, NOW(3))",
            (note,),
        )


async def test_restore_keeping_the_audit_trail(inv: Inventory, tmp_path: Path, copy_grants: None) -> None:
    db, env = inv.databases[0], _env()
    src = await mysql.backup(db, f"src-{uuid.uuid4().hex[:8]}", str(tmp_path))
    site = _copy_of(db)  # the copy stands for production here: labapp keeps its rows
    bk: DbBackup | None = None
    try:
        await mysql.restore(dataclasses.replace(src, db=site))
        if "tbAudit" not in await mysql.base_tables(site):  # a lab without the Secret Server tables
            await mysql.query(
                site,
                "CREATE TABLE tbAudit (AuditId BIGINT AUTO_INCREMENT PRIMARY KEY, "
                "AuditTypeName VARCHAR(32) NOT NULL, Action VARCHAR(32) NOT NULL, "
                "Notes VARCHAR(1000) NULL, DateRecorded DATETIME(3) NOT NULL)",
            )
        await _add_audit(site, "a")
        bk = await env.run(mysql.db_backup, BackupRequest(site, "site", str(tmp_path)))
        await _add_audit(site, "b")
        await mysql.query(site, "INSERT INTO items (node, body) VALUES ('test', 'after the backup')")
        await mysql.query(site, "CREATE TABLE zd_after (id INT)")

        res = await env.run(mysql.db_restore_keeping, RestoreKeepingRequest(bk, ("tbAudit", "no_such_table")))
        assert res.kept == ("tbAudit",) and res.mismatched == () and res.dropped == ("zd_after",)
        assert await _audit(site) == ["a", "b"]
        sums = await mysql.table_checksums(site)
        assert {t: c for t, c in sums.items() if t != "tbAudit"} == {
            t: c for t, c in bk.table_checksums.items() if t != "tbAudit"
        }
        sql, meta, marker = mysql._keep_paths(bk)
        assert not any(Path(p).exists() for p in (sql, meta, marker))

        # A retry after the restore began (marker there, live tbAudit already holding the
        # backup's rows): the saved rows are the current ones and are reloaded.
        await _add_audit(site, "c")
        await mysql._save_kept(site, ["tbAudit"], sql, meta)
        assert oct(Path(sql).stat().st_mode & 0o777) == "0o600"
        Path(marker).touch()
        await mysql._load_backup(bk)  # ... and the worker died here
        assert await _audit(site) == ["a"]
        res = await env.run(mysql.db_restore_keeping, RestoreKeepingRequest(bk, ("tbAudit",)))
        assert res.kept == ("tbAudit",) and res.mismatched == ()
        assert await _audit(site) == ["a", "b", "c"]
        assert not any(Path(p).exists() for p in (sql, meta, marker))

        # A save without the marker: the restore had not begun, the live rows are newer.
        await mysql._save_kept(site, ["tbAudit"], sql, meta)
        await _add_audit(site, "d")
        await env.run(mysql.db_restore_keeping, RestoreKeepingRequest(bk, ("tbAudit",)))
        assert await _audit(site) == ["a", "b", "c", "d"]

        # The marker without its save: nobody can tell which rows are current.
        Path(marker).touch()
        with pytest.raises(ApplicationError) as e:
            await env.run(mysql.db_restore_keeping, RestoreKeepingRequest(bk, ("tbAudit",)))
        assert e.value.type == "BackupCorrupt" and e.value.non_retryable
        assert await _audit(site) == ["a", "b", "c", "d"]
        Path(marker).unlink()
        with pytest.raises(ApplicationError) as e:
            await env.run(mysql.db_restore_keeping, RestoreKeepingRequest(bk, ("tb`Audit",)))
        assert e.value.type == "InvalidRequest"
    finally:
        await _cleanup_copy(db)
        _remove_backup(src)
        if bk is not None:
            _remove_backup(bk)
            for p in mysql._keep_paths(bk):
                Path(p).unlink(missing_ok=True)
    assert await mysql.table_checksums(db) == src.table_checksums
    assert sorted(p.name for p in tmp_path.iterdir()) == []


async def test_a_restore_through_the_scratch_database_never_shows_a_missing_table(
    inv: Inventory, tmp_path: Path
) -> None:
    """Issue 17.7: a reader running all through the restore of the site's own database never
    gets an error: the backup is loaded into the scratch database and swapped in by one
    RENAME TABLE (a query waits for it, none finds a table missing or half loaded)."""
    db, env = inv.databases[0], _env()
    assert db.scratch_database
    bk = await env.run(mysql.db_backup, BackupRequest(db, f"swap-{uuid.uuid4().hex[:6]}", str(tmp_path)))
    await mysql.query(db, "INSERT INTO items (node, body) VALUES ('test', 'after the backup')")
    stop, errors, reads = asyncio.Event(), [], 0

    async def reader() -> None:
        nonlocal reads
        async with mysql.connection(db) as conn, conn.cursor() as cur:
            while not stop.is_set():
                try:
                    await cur.execute("SELECT COUNT(*) FROM items")
                    await cur.fetchall()
                    reads += 1
                except Exception as e:  # what a site's request would have failed with
                    errors.append(repr(e))
                await asyncio.sleep(0.001)

    task = asyncio.ensure_future(reader())
    try:
        res = await env.run(mysql.db_restore_keeping, RestoreKeepingRequest(bk, ("tbAudit",)))
    finally:
        stop.set()
        await task
        _remove_backup(bk)
    assert res.swapped and res.mismatched == ()
    assert errors == [] and reads > 10
    assert await mysql.query(db, "SELECT COUNT(*) FROM items WHERE body = 'after the backup'") == [(0,)]
    scratch = await mysql.query(
        db, "SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s", (db.scratch_database,)
    )
    assert scratch == [(0,)]  # the replaced tables left with it
    await replica_caught_up(db)
