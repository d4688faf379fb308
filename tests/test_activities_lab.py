"""Integration tests of the activity adapters against the real lab (session fixture `lab`).

Every test leaves the lab as it found it: v1 on every node, every app running, every
`app` member ready and UP, schema version 1, replica replicating. Activities run inside
temporalio's ActivityEnvironment (real heartbeats and cancellation, no worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import stat
import uuid
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities import deploy, haproxy, http_checks, mysql, node, ssh
from activities.deploy import AppBackupRequest, DeployRequest, PackageRequest
from activities.haproxy import MemberRequest, SetStateRequest, WaitRequest
from activities.http_checks import HttpCheckRequest, LoginRequest, VersionRequest, WaitHealthyRequest
from activities.mysql import BackupRequest, DbRequest, MigrationRequest
from activities.node import ServiceRequest
from inventory.load import load_inventory
from inventory.model import Inventory, Node, SecretRef
from lab.config import LabConfig
from tests.db_support import replica_caught_up


@pytest.fixture(scope="module")
async def inv(lab: LabConfig) -> AsyncIterator[Inventory]:
    yield load_inventory(lab.site_yaml)
    # Pooled SSH connections belong to this module's tests; close them before the lab goes.
    await ssh.POOL.close_all()


def _env(beats: list[Any] | None = None) -> ActivityEnvironment:
    env = ActivityEnvironment()
    if beats is not None:
        env.on_heartbeat = lambda *d: beats.append(d[0] if d else None)
    return env


async def _ensure_member_up(inv: Inventory, name: str) -> None:
    lb = inv.load_balancers[0]
    await haproxy.set_member_state(lb, name, "ready")
    await haproxy.wait_up(lb, name, 30)


# =========================================================================== ssh


async def test_ssh_run_output_and_exit_status(inv: Inventory) -> None:
    n1 = inv.node("node1")
    res = await ssh.run(n1.ssh, "pwd; echo oops >&2; exit 3", timeout_s=10, check=False)
    assert res.exit_status == 3 and res.stdout.strip().endswith("nodes/node1") and res.stderr == "oops\n"
    with pytest.raises(ApplicationError) as e:
        await ssh.run(n1.ssh, "echo boom >&2; exit 7", timeout_s=10)
    err = e.value
    assert err.type == "SshCommandFailed" and err.non_retryable
    assert f"127.0.0.1:{n1.ssh.port}" in err.message and "exit 7" in err.message
    assert "status 7" in err.message and "boom" in err.message
    # the pooled connection is reused
    conn1, _ = await ssh.POOL.connection(n1.ssh)
    await ssh.run(n1.ssh, "true")
    conn2, reused = await ssh.POOL.connection(n1.ssh)
    assert conn1 is conn2 and reused


async def test_ssh_reconnects_when_the_pooled_connection_closed(inv: Inventory) -> None:
    n1 = inv.node("node1")
    conn, _ = await ssh.POOL.connection(n1.ssh)
    conn.close()
    await conn.wait_closed()
    assert (await ssh.run(n1.ssh, "echo again")).stdout == "again\n"


async def test_ssh_connection_lost_mid_command_is_retryable(inv: Inventory) -> None:
    n1 = inv.node("node1")
    conn, _ = await ssh.POOL.connection(n1.ssh)
    task = asyncio.ensure_future(ssh.run(n1.ssh, "sleep 2", timeout_s=10))
    await asyncio.sleep(0.5)
    conn.close()
    with pytest.raises(ApplicationError) as e:
        await task
    assert e.value.type == "SshUnreachable" and not e.value.non_retryable
    assert (await ssh.run(n1.ssh, "echo back")).stdout == "back\n"


async def test_ssh_probe(inv: Inventory) -> None:
    r = await _env().run(ssh.ssh_probe, ssh.SshProbeRequest(inv.node("node2").ssh))
    assert r.ok and r.uname.startswith("Linux") and r.port == inv.node("node2").ssh.port


async def test_ssh_wrong_key_is_auth_failed(inv: Inventory, tmp_path: Path) -> None:
    key = tmp_path / "other_key"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(key))
    target = dataclasses.replace(inv.node("node1").ssh, key=SecretRef(file=str(key)))
    with pytest.raises(ApplicationError) as e:
        await ssh.run(target, "true")
    assert e.value.type == "SshAuthFailed" and e.value.non_retryable
    probe = await _env().run(ssh.ssh_probe, ssh.SshProbeRequest(target))
    assert not probe.ok and probe.error_type == "SshAuthFailed"


async def test_ssh_closed_port_is_unreachable(inv: Inventory, lab: LabConfig) -> None:
    target = dataclasses.replace(inv.node("node1").ssh, port=lab.port_base + 99, connect_timeout_s=3)
    with pytest.raises(ApplicationError) as e:
        await ssh.run(target, "true")
    assert e.value.type == "SshUnreachable" and not e.value.non_retryable


async def test_ssh_unknown_host_key_is_mismatch(inv: Inventory, tmp_path: Path) -> None:
    n1 = inv.node("node1")
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key("openssh").decode().split()
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{n1.ssh.port} {other[0]} {other[1]}\n")
    with pytest.raises(ApplicationError) as e:
        await ssh.run(dataclasses.replace(n1.ssh, known_hosts=str(kh)), "true")
    assert e.value.type == "SshHostKeyMismatch" and e.value.non_retryable


async def test_ssh_command_timeout_and_cancellation(inv: Inventory) -> None:
    n1 = inv.node("node1")
    with pytest.raises(ApplicationError) as e:
        await ssh.run(n1.ssh, "sleep 3", timeout_s=0.5)
    assert e.value.type == "SshCommandTimeout"

    beats: list[Any] = []
    env = _env(beats)

    async def long_command() -> None:
        await ssh.run(n1.ssh, "sleep 4", timeout_s=30)

    task = asyncio.ensure_future(env.run(long_command))
    await asyncio.sleep(1.3)
    env.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)
    assert beats and beats[0]["command"] == "sleep 4"
    # the connection is still usable afterwards
    assert (await ssh.run(n1.ssh, "echo ok")).stdout == "ok\n"


async def test_sftp_round_trip(inv: Inventory, lab: LabConfig, tmp_path: Path) -> None:
    n3 = inv.node("node3")
    name = f".zerodown/test-{uuid.uuid4().hex}/data.bin"
    try:
        await ssh.put_bytes(n3.ssh, b"\x00hello\xff", name)
        assert await ssh.get_file(n3.ssh, name) == b"\x00hello\xff"
        assert (lab.node_dir(3) / name).read_bytes() == b"\x00hello\xff"
        local = tmp_path / "f.txt"
        local.write_bytes(b"x" * 100_000)
        await ssh.put_file(n3.ssh, str(local), name)
        assert await ssh.get_file(n3.ssh, name) == local.read_bytes()
        assert await ssh.get_file(n3.ssh, ".zerodown/does-not-exist") is None
    finally:
        await ssh.run(n3.ssh, f"rm -rf {Path(name).parent}")


# =========================================================================== service


async def test_stop_start_status_command_kind(inv: Inventory) -> None:
    n3, lb = inv.node("node3"), inv.load_balancers[0]
    env = _env()
    await haproxy.set_member_state(lb, "node3", "maint")
    try:
        st = await env.run(node.service_status, ServiceRequest(n3))
        assert st.running and st.detail.startswith("running")
        st = await env.run(node.stop_service, ServiceRequest(n3))
        assert not st.running and st.changed and st.detail == "stopped"
        st = await env.run(node.stop_service, ServiceRequest(n3))
        assert not st.running and not st.changed
        assert not (await env.run(node.service_status, ServiceRequest(n3))).running
        st = await env.run(node.start_service, ServiceRequest(n3))
        assert st.running and st.changed
        st = await env.run(node.start_service, ServiceRequest(n3))
        assert st.running and not st.changed
    finally:
        await node.set_running(n3, True)
        await _ensure_member_up(inv, "node3")


async def test_broken_service_command_is_reported(inv: Inventory) -> None:
    n3 = inv.node("node3")
    broken = dataclasses.replace(n3, service=dataclasses.replace(n3.service, status="./no-such-ctl status"))
    with pytest.raises(ApplicationError) as e:
        await _env().run(node.service_status, ServiceRequest(broken))
    assert e.value.type == "SshCommandFailed" and "127" in e.value.message


# =========================================================================== haproxy


async def test_record_show_stat_fixture_shape(inv: Inventory) -> None:
    """The recorded fixture still matches what this HAProxy prints (same header)."""
    lb = inv.load_balancers[0]
    assert lb.runtime_api
    live = await haproxy.runtime_command(lb.runtime_api, "show stat")
    recorded = (Path(__file__).parent / "fixtures" / "haproxy_show_stat.csv").read_text()
    assert live.splitlines()[0] == recorded.splitlines()[0]
    names = {(r.pxname, r.svname) for r in haproxy.parse_show_stat(live)}
    assert {("app", "node1"), ("app", "node2"), ("app", "node3")} <= names


async def test_drain_wait_drained_ready_wait_up(inv: Inventory, lab: LabConfig) -> None:
    lb = inv.load_balancers[0]
    env = _env()
    # Route one slow request to node2: the other members are drained while it starts.
    others = [n.name for n in inv.nodes if n.name != "node2"]
    for other in others:
        await env.run(haproxy.lb_set_state, SetStateRequest(lb, other, "drain"))
    try:
        async with aiohttp.ClientSession() as session:
            slow = asyncio.ensure_future(session.get(f"{lab.main_url}/slow?ms=2500"))
            for _ in range(40):
                st = await haproxy.member_state(lb, "node2")
                if st.scur >= 1:
                    break
                await asyncio.sleep(0.05)
            assert st.scur == 1
            for other in others:
                await env.run(haproxy.lb_set_state, SetStateRequest(lb, other, "ready"))
            st = await env.run(haproxy.lb_set_state, SetStateRequest(lb, "node2", "drain"))
            assert st.admin == "drain" and st.status == "DRAIN"
            beats: list[Any] = []
            waited = await _env(beats).run(haproxy.lb_wait_drained, WaitRequest(lb, "node2", timeout_s=20))
            assert waited >= 1 and beats and beats[0]["scur"] == 1
            resp = await slow
            assert resp.status == 200 and resp.headers["X-Node"] == "node2"
            resp.release()
    finally:
        for name in (n.name for n in inv.nodes):
            await haproxy.set_member_state(lb, name, "ready")
    st = await _env().run(haproxy.lb_wait_up, WaitRequest(lb, "node2", timeout_s=20))
    assert st.is_up and st.admin == "ready"


async def test_drain_timeout_with_an_open_session(inv: Inventory, lab: LabConfig) -> None:
    lb = inv.load_balancers[0]
    for other in (n.name for n in inv.nodes if n.name != "node3"):
        await haproxy.set_member_state(lb, other, "drain")
    try:
        async with aiohttp.ClientSession() as session:
            slow = asyncio.ensure_future(session.get(f"{lab.main_url}/slow?ms=2500"))
            for _ in range(40):
                if (await haproxy.member_state(lb, "node3")).scur:
                    break
                await asyncio.sleep(0.05)
            await haproxy.set_member_state(lb, "node3", "drain")
            with pytest.raises(ApplicationError) as e:
                await _env().run(haproxy.lb_wait_drained, WaitRequest(lb, "node3", timeout_s=0.8))
            assert e.value.type == "DrainTimeout" and "1 open session(s)" in e.value.message
            (await slow).release()
    finally:
        for name in (n.name for n in inv.nodes):
            await haproxy.set_member_state(lb, name, "ready")
        for name in (n.name for n in inv.nodes):
            await haproxy.wait_up(lb, name, 20)


async def test_unknown_backend_or_server(inv: Inventory) -> None:
    lb = inv.load_balancers[0]
    env = _env()
    bad_server = dataclasses.replace(lb, members={**lb.members, "node1": "node9"})
    for act in (haproxy.lb_check_member, haproxy.lb_member_state):
        with pytest.raises(ApplicationError) as e:
            await env.run(act, MemberRequest(bad_server, "node1"))
        assert e.value.type == "LbMemberNotFound" and "app/node9" in e.value.message
    with pytest.raises(ApplicationError) as e:
        await env.run(haproxy.lb_set_state, SetStateRequest(bad_server, "node1", "drain"))
    assert e.value.type == "LbMemberNotFound" and "No such server" in e.value.message
    bad_backend = dataclasses.replace(lb, backend="nope")
    with pytest.raises(ApplicationError) as e:
        await env.run(haproxy.lb_set_state, SetStateRequest(bad_backend, "node1", "maint"))
    assert e.value.type == "LbMemberNotFound" and "No such backend" in e.value.message
    with pytest.raises(ApplicationError) as e:
        await env.run(haproxy.lb_check_member, MemberRequest(bad_backend, "node1"))
    assert e.value.type == "LbMemberNotFound"
    ok = await env.run(haproxy.lb_check_member, MemberRequest(lb, "node1"))
    assert ok.is_up


# =========================================================================== database


async def test_db_versions(inv: Inventory) -> None:
    db, env = inv.databases[0], _env()
    assert await env.run(mysql.db_schema_version, DbRequest(db)) == 1


async def test_db_wrong_password_is_non_retryable(inv: Inventory, tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("wrong\n")
    db = dataclasses.replace(inv.databases[0], password=SecretRef(file=str(pw)))
    with pytest.raises(ApplicationError) as e:
        await _env().run(mysql.db_schema_version, DbRequest(db))
    assert e.value.type == "DatabaseError" and e.value.non_retryable and "1045" in e.value.message


def _size(path: str) -> int:
    return Path(path).stat().st_size


async def test_db_backup_restore_round_trip(inv: Inventory, lab: LabConfig) -> None:
    db, env = inv.databases[0], _env()
    backup_id = f"test-{uuid.uuid4().hex[:8]}"
    # Writes keep coming while the backup runs (the site is live): the recorded checksums
    # must still match exactly what the dump holds, which the restore below proves.
    stop = asyncio.Event()
    written = 0

    async def writer() -> None:
        nonlocal written
        async with mysql.connection(db) as conn, conn.cursor() as cur:
            while not stop.is_set():
                await cur.execute("INSERT INTO items (node, body) VALUES ('test', 'during backup')")
                written += 1
                await asyncio.sleep(0.002)

    task = asyncio.ensure_future(writer())
    await asyncio.sleep(0.1)
    try:
        bk = await env.run(mysql.db_backup, BackupRequest(db, backup_id))
        await asyncio.sleep(0.1)
    finally:
        stop.set()
        await task
    try:
        assert bk.size == _size(bk.path) > 0 and not bk.reused and written > 10
        # a dump holds every row (password hashes): private folder, private file
        assert _mode(Path(bk.path)) == 0o600 and _mode(Path(bk.path).parent) == 0o700
        assert set(bk.table_checksums) >= {"items", "schema_version", "users"}
        again = await env.run(mysql.db_backup, BackupRequest(db, backup_id))
        assert again.reused and again.sha256 == bk.sha256 and again.table_checksums == bk.table_checksums

        await mysql.query(db, "INSERT INTO items (node, body) VALUES ('test', 'written after the backup')")
        await mysql.query(db, "CREATE TABLE IF NOT EXISTS zd_test_extra (id INT)")
        changed = await mysql.table_checksums(db)
        assert changed["items"] != bk.table_checksums["items"] and "zd_test_extra" in changed

        restored = await env.run(mysql.db_restore, bk)
        assert restored.mismatched == () and restored.dropped == ("zd_test_extra",)
        assert await mysql.table_checksums(db) == bk.table_checksums
        # replicas follow the restore through the binlog
        await replica_caught_up(db)
        assert db.replica is not None
        replica_as_db = dataclasses.replace(db, host=db.replica.host, port=db.replica.port)
        assert await mysql.table_checksums(replica_as_db) == bk.table_checksums
        # a restore again is harmless
        assert (await env.run(mysql.db_restore, bk)).mismatched == ()
    finally:
        if "zd_test_extra" in await mysql.base_tables(db):
            await mysql.query(db, "DROP TABLE zd_test_extra")
        await mysql.query(db, "DELETE FROM items WHERE body = 'during backup'")
        await replica_caught_up(db)
        for suffix in (".sql", ".sql.sha256", ".json"):
            Path(bk.path).with_name(backup_id + suffix).unlink(missing_ok=True)


async def test_db_restore_refuses_a_modified_backup(inv: Inventory, tmp_path: Path) -> None:
    db = inv.databases[0]
    bk = await mysql.backup(db, "tamper", str(tmp_path))
    with open(bk.path, "a") as f:
        f.write("DROP TABLE items;\n")
    with pytest.raises(ApplicationError) as e:
        await _env().run(mysql.db_restore, bk)
    assert e.value.type == "BackupCorrupt" and bk.sha256 in e.value.message
    assert await mysql.schema_version(db) == 1


async def test_db_migration_up_down_idempotent(inv: Inventory, lab: LabConfig) -> None:
    db, env = inv.databases[0], _env()
    pkg = await env.run(deploy.inspect_package, PackageRequest(str(lab.package(2))))
    mig = pkg.migrations[0]

    async def has_notes() -> bool:
        rows = await mysql.query(
            db,
            "SELECT COUNT(*) FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = "
            "DATABASE() AND TABLE_NAME = 'items' AND COLUMN_NAME = 'notes'",
        )
        return bool(rows[0][0])

    try:
        up_req = MigrationRequest(db, mig.version, mig.up_sql, "up")
        down_req = MigrationRequest(db, mig.version, mig.down_sql, "down")
        up = await env.run(mysql.db_apply_migration, up_req)
        assert up.applied and up.statements == 2  # the lab's fault-injection hook, then the ALTER
        assert (up.schema_version_before, up.schema_version_after) == (1, 2)
        assert await has_notes()
        again = await env.run(mysql.db_apply_migration, up_req)
        assert not again.applied and again.schema_version_after == 2
        down = await env.run(mysql.db_apply_migration, down_req)
        assert down.applied and down.schema_version_after == 1 and not await has_notes()
        again = await env.run(mysql.db_apply_migration, down_req)
        assert not again.applied and again.schema_version_after == 1
    finally:
        if await mysql.schema_version(db) != 1:
            await mysql.apply_migration(db, mig.version, mig.down_sql, "down")
    rows = await mysql.query(db, "SELECT version FROM schema_version")
    assert rows == [(1,)]


@pytest.mark.filterwarnings("ignore:Can't DROP COLUMN")  # the down script re-run: IF EXISTS notes it
async def test_db_migration_forced_down_undoes_a_half_applied_up(inv: Inventory) -> None:
    """An up whose 2nd statement failed left its 1st change but no schema_version record:
    only a forced down (re-runnable, IF EXISTS) removes it."""
    db, env = inv.databases[0], _env()

    async def columns() -> list[str]:
        rows = await mysql.query(
            db,
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE "
            "TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'items' "
            "ORDER BY ORDINAL_POSITION",
        )
        return [str(r[0]) for r in rows]

    original = await columns()
    up = (
        "ALTER TABLE items ADD COLUMN IF NOT EXISTS zd_half INT NULL;\n"
        "ALTER TABLE no_such_table ADD COLUMN x INT;\n"
    )
    down = "ALTER TABLE items DROP COLUMN IF EXISTS zd_half;\n"
    try:
        with pytest.raises(ApplicationError) as e:
            await env.run(mysql.db_apply_migration, MigrationRequest(db, 2, up, "up"))
        assert "statement 2/2" in e.value.message
        assert await columns() == [*original, "zd_half"] and await mysql.schema_version(db) == 1
        # without force: schema_version says 2 is not applied, nothing runs
        skipped = await env.run(mysql.db_apply_migration, MigrationRequest(db, 2, down, "down"))
        assert not skipped.applied and not skipped.forced and "zd_half" in await columns()
        forced = await env.run(mysql.db_apply_migration, MigrationRequest(db, 2, down, "down", force=True))
        assert forced.applied and forced.forced and forced.statements == 1
        assert (forced.schema_version_before, forced.schema_version_after) == (1, 1)
        assert await columns() == original
        # re-runnable, and schema_version never lists 2
        again = await env.run(mysql.db_apply_migration, MigrationRequest(db, 2, down, "down", force=True))
        assert again.applied and await columns() == original
        assert await mysql.query(db, "SELECT version FROM schema_version") == [(1,)]
        with pytest.raises(ApplicationError) as e:
            await env.run(mysql.db_apply_migration, MigrationRequest(db, 2, up, "up", force=True))
        assert e.value.type == "InvalidRequest"
    finally:
        await mysql.query(db, "ALTER TABLE items DROP COLUMN IF EXISTS zd_half")
        await replica_caught_up(db)
    assert await mysql.schema_version(db) == 1


async def test_db_migration_sql_error_is_non_retryable(inv: Inventory) -> None:
    db = inv.databases[0]
    with pytest.raises(ApplicationError) as e:
        await _env().run(
            mysql.db_apply_migration, MigrationRequest(db, 7, "ALTER TABLE nope ADD x INT;", "up")
        )
    assert e.value.type == "DatabaseError" and e.value.non_retryable
    assert "migration 7 up, statement 1/1" in e.value.message
    assert await mysql.schema_version(db) == 1


# =========================================================================== deploy


def _files(lab: LabConfig, i: int, names: tuple[str, ...]) -> dict[str, bytes]:
    return {n: (lab.node_dir(i) / "app" / n).read_bytes() for n in names}


async def _take_out(inv: Inventory, name: str) -> Node:
    n, lb = inv.node(name), inv.load_balancers[0]
    await haproxy.set_member_state(lb, name, "maint")
    await haproxy.wait_drained(lb, name, 30)
    await node.set_running(n, False)
    return n


async def _put_back(inv: Inventory, name: str) -> None:
    n = inv.node(name)
    await node.set_running(n, True)
    await http_checks.poll_healthy(n.url, inv.application.health, 30, 2, 0.2)
    await _ensure_member_up(inv, name)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _app_modes(lab: LabConfig, i: int) -> dict[str, int]:
    root = lab.node_dir(i) / "app"
    return {str(p.relative_to(root)): _mode(p) for p in root.rglob("*") if p.is_file()}


async def test_backup_deploy_restore_round_trip(inv: Inventory, lab: LabConfig) -> None:
    app, env = inv.application, _env()
    name, i = "node2", 2
    rid = uuid.uuid4().hex[:8]
    protected = tuple(app.protected_files)
    before = _files(lab, i, protected)
    modes_before = _app_modes(lab, i)
    n = await _take_out(inv, name)
    bk = None
    try:
        # zerodown's folders may have been created more open by an older version
        await ssh.run(n.ssh, "mkdir -p .zerodown/backups && chmod 755 .zerodown .zerodown/backups")
        bk = await env.run(deploy.backup_app_folder, AppBackupRequest(n, f"bk-{rid}", protected))
        assert bk.files == len(bk.manifest) and set(bk.protected) == set(protected)
        assert (lab.node_dir(i) / bk.path).is_file() and not (lab.node_dir(i) / "app" / ".zerodown").exists()
        # the backup holds the protected files (encryption keys): private to the deploy user
        zd = lab.node_dir(i) / ".zerodown"
        assert _mode(zd) == 0o700 and _mode(zd / "backups") == 0o700
        for suffix in (".tar", ".manifest", ".defaults.tar"):
            assert _mode(zd / "backups" / f"bk-{rid}{suffix}") & 0o077 == 0, suffix
        assert await deploy.folder_manifest(n, n.app_dir) == bk.manifest
        again = await env.run(deploy.backup_app_folder, AppBackupRequest(n, f"bk-{rid}", protected))
        assert again.reused and again.manifest == bk.manifest

        pkg = await env.run(deploy.inspect_package, PackageRequest(str(lab.package(2))))
        req = DeployRequest(n, pkg, protected, tuple(app.merge_files), f"rel-{rid}")
        res = await env.run(deploy.deploy_package, req)
        assert res.version == "2.0.0" and res.files_written == pkg.files and not res.already_deployed
        (report,) = res.merged
        assert report.file == "web.config" and report.had_recorded_defaults
        assert set(report.carried) == {"http.port", "node.name", "custom.banner"}
        assert "greeting" in report.changed_defaults
        # no config value travels in the result (it goes into Temporal's history) ...
        assert report.diff == () and "Welcome to node2" not in repr(res)
        assert str(lab.app_port(i)) not in repr(res)
        # ... the diff stays on the node, readable by the deploy user only
        assert report.diff_path == f".zerodown/releases/rel-{rid}.web.config.merge.diff"
        diff_file = lab.node_dir(i) / report.diff_path
        diff = diff_file.read_text().splitlines()
        assert f"+node.name = {name}" in diff and "+custom.banner = Welcome to node2" in diff
        assert _mode(diff_file) == 0o600
        # the app folder keeps the modes the package / app expect (no umask 077 there)
        modes_after = _app_modes(lab, i)
        kept = set(modes_before) & set(modes_after)
        assert {k: modes_after[k] for k in kept} == {k: modes_before[k] for k in kept}
        assert _mode(lab.node_dir(i) / "app" / "migrations" / "002_up.sql") == _mode(
            lab.node_dir(i) / "app" / "web.config"
        )
        # protected files byte-identical, customisation kept on top of the v2 defaults
        assert _files(lab, i, protected) == before
        web = (lab.node_dir(i) / "app" / "web.config").read_text()
        assert f"node.name = {name}" in web and f"http.port = {lab.app_port(i)}" in web
        assert "custom.banner = Welcome to node2" in web and "greeting = Welcome to labapp 2" in web
        assert "feature.notes = on" in web
        recorded = (lab.node_dir(i) / ".zerodown" / "defaults" / "web.config").read_text()
        assert "release 2.0.0" in recorded and "node2" not in recorded
        # idempotent
        again_res = await env.run(deploy.deploy_package, req)
        assert again_res.already_deployed and again_res.files_written == 0
        (again_report,) = again_res.merged
        assert (again_report.carried, again_report.diff_path) == (report.carried, report.diff_path)
        assert diff_file.read_text().splitlines() == diff
        assert (lab.node_dir(i) / "app" / "web.config").read_text() == web

        await node.set_running(n, True)
        await env.run(http_checks.wait_healthy, WaitHealthyRequest(n.url, app.health, 30, 2, 0.2))
        assert (
            await env.run(http_checks.get_version, VersionRequest(n.url, app.version, expect="2.0.0"))
            == "2.0.0"
        )
        await node.set_running(n, False)

        rr = await env.run(deploy.restore_app_folder, bk)
        assert rr.removed == ("migrations/002_down.sql", "migrations/002_up.sql") and rr.rewritten > 0
        assert await deploy.folder_manifest(n, n.app_dir) == bk.manifest
        assert not (lab.node_dir(i) / "app" / "migrations").exists()
        assert _files(lab, i, protected) == before
        recorded = (lab.node_dir(i) / ".zerodown" / "defaults" / "web.config").read_text()
        assert "release 1.0.0" in recorded
        rr2 = await env.run(deploy.restore_app_folder, bk)
        assert rr2.rewritten == 0 and rr2.removed == ()
        await node.set_running(n, True)
        assert await http_checks.version_of(n.url, app.version, 5) == "1.0.0"
    finally:
        if bk is not None:
            with contextlib.suppress(Exception):
                await node.set_running(n, False)
                await deploy.restore_app(bk)
        await _put_back(inv, name)
    assert await http_checks.version_of(n.url, app.version, 5) == "1.0.0"


async def test_backup_refuses_a_missing_protected_file(inv: Inventory, lab: LabConfig) -> None:
    n = inv.node("node3")
    bid = f"bk-{uuid.uuid4().hex[:8]}"
    try:
        with pytest.raises(ApplicationError) as e:
            await _env().run(
                deploy.backup_app_folder, AppBackupRequest(n, bid, ("encryption.config", "missing.key"))
            )
        assert e.value.type == "ProtectedFileMissing" and e.value.non_retryable
        assert "missing.key" in e.value.message and "node3" in e.value.message
    finally:
        await ssh.run(n.ssh, f"rm -f .zerodown/backups/{bid}.*")


async def test_backup_id_reused_only_for_the_same_folder(inv: Inventory, lab: LabConfig) -> None:
    n = inv.node("node3")
    bid = f"bk-{uuid.uuid4().hex[:8]}"
    extra = lab.node_dir(3) / "app" / "zd-test-extra.txt"
    try:
        first = await _env().run(deploy.backup_app_folder, AppBackupRequest(n, bid, ("encryption.config",)))
        assert not first.reused
        again = await _env().run(deploy.backup_app_folder, AppBackupRequest(n, bid, ("encryption.config",)))
        assert again.reused and again.manifest == first.manifest
        extra.write_text("written after the backup\n")
        with pytest.raises(ApplicationError) as e:
            await _env().run(deploy.backup_app_folder, AppBackupRequest(n, bid, ("encryption.config",)))
        err = e.value
        assert err.type == "BackupConflict" and err.non_retryable
        assert bid in err.message and "differs from the application folder" in err.message
        assert "zd-test-extra.txt" in err.message
        extra.unlink()
        assert (await _env().run(deploy.backup_app_folder, AppBackupRequest(n, bid, ()))).reused
    finally:
        extra.unlink(missing_ok=True)
        await ssh.run(n.ssh, f"rm -f .zerodown/backups/{bid}.*")


def _with_member(src: Path, dst: Path, name: str, data: str) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info))
        zout.writestr(name, data)
    return dst


async def test_deploy_refuses_an_xml_merge_file_that_does_not_parse_and_leaves_the_node_untouched(
    inv: Inventory, lab: LabConfig, tmp_path: Path
) -> None:
    n = inv.node("node3")
    xml = (
        '<?xml version="1.0"?>\n<configuration><appSettings>\n'
        '  <add key="A" value="1" />\n  <add key="B" value="2" />\n</appSetings></configuration>\n'
    )
    pkg = deploy.inspect_package_file(
        str(_with_member(lab.package(2), tmp_path / "app-2x.zip", "settings.xml", xml))
    )
    rid = f"rel-{uuid.uuid4().hex[:8]}"
    releases = lab.node_dir(3) / ".zerodown" / "releases"
    before = await deploy.folder_manifest(n, n.app_dir)
    with pytest.raises(ApplicationError) as e:
        await _env().run(
            deploy.deploy_package,
            DeployRequest(
                n, pkg, tuple(inv.application.protected_files), ("web.config", "settings.xml"), rid
            ),
        )
    err = e.value
    assert err.type == "MergeUnsupported" and err.non_retryable
    assert "node node3: settings.xml" in err.message and "XML" in err.message
    assert await deploy.folder_manifest(n, n.app_dir) == before
    assert not releases.exists() or not list(releases.glob(f"{rid}*"))  # not even uploaded


async def test_deploy_refuses_a_package_changed_since_inspection(
    inv: Inventory, lab: LabConfig, tmp_path: Path
) -> None:
    copy = tmp_path / "app-2.zip"
    copy.write_bytes(lab.package(2).read_bytes())
    pkg = deploy.inspect_package_file(str(copy))
    copy.write_bytes(lab.package(1).read_bytes())
    with pytest.raises(ApplicationError) as e:
        await _env().run(deploy.deploy_package, DeployRequest(inv.node("node3"), pkg, (), (), "never"))
    assert e.value.type == "PackageCorrupt" and "changed since it was inspected" in e.value.message


# =========================================================================== http


async def test_http_checks_against_the_lab(inv: Inventory, lab: LabConfig) -> None:
    app, env = inv.application, _env()
    assert app.url and app.login
    r = await env.run(http_checks.check_health, HttpCheckRequest(inv.node("node1").url, app.health))
    assert r.status == 200 and r.node == "node1"
    assert await env.run(http_checks.get_version, VersionRequest(app.url, app.version)) == "1.0.0"
    ok = await env.run(http_checks.check_login, LoginRequest(app.url, app.login))
    assert ok.status == 200
    with pytest.raises(ApplicationError) as e:
        await env.run(
            http_checks.check_login,
            LoginRequest(
                app.url, dataclasses.replace(app.login, password=SecretRef(file=str(lab.db_password_file)))
            ),
        )
    assert e.value.type == "LoginFailed" and "401" in e.value.message
