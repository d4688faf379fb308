"""The lab application's Secret Server behaviour against the running session lab: the site's
files (the admin interface, staging and scratch database in site.yaml; package 3), maintenance
mode, the version mismatch page, the encryption key check, the staging system, the lab DB
user's grants and the migration fault-injection hook - and the lab's reset putting all of it
back. The product's admin-interface adapter (activities/app_admin.py) against it is tested in
tests/test_adapter_app_admin.py.

The lab is shared by the whole session: every test starts and ends with the Secret Server
side at its defaults (`site_defaults`, tests/app_admin_support.py). Tests that need a node in
an odd state (another release, another key) use a spare node folder next to the lab's (index
nodes + 2: its own port, not behind HAProxy), never one of the lab's nodes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import shutil
import zipfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncssh
import pymysql
import pytest
from temporalio.exceptions import ApplicationError

from activities import app_admin, mysql
from activities.app_admin import (
    AuditRequest,
    SettingsRequest,
    WaitSettingsRequest,
)
from inventory.load import load_inventory
from inventory.model import AdminApi, Database, SecretRef
from lab import haproxy, manager, mariadb, nodes, packages
from lab.config import DB_NAME, DB_USER, SCRATCH_DB_NAME, STAGING_DB_NAME, STAGING_NAME, LabConfig
from lab.probe import run_probe
from tests.app_admin_support import admin_api, node_url, request, site_defaults  # noqa: F401  (fixture)
from tests.e2e_support import staging_problems, zerodown

MISMATCH_HEADER = "version-mismatch"


# --------------------------------------------------------------------------- helpers


async def set_site(
    lab: LabConfig,
    maintenance_mode: bool | None = None,
    ignore_version_mismatch: bool | None = None,
    enforce_version_match: bool | None = None,
) -> None:
    """Site settings through node1's admin interface, then wait until every node sees them."""
    api = admin_api(lab)
    state = await app_admin.set_settings(
        SettingsRequest(
            node_url(lab, 1),
            api,
            "site",
            maintenance_mode=maintenance_mode,
            ignore_version_mismatch=ignore_version_mismatch,
            enforce_version_match=enforce_version_match,
        )
    )
    await asyncio.gather(
        *(
            app_admin.wait_settings(
                WaitSettingsRequest(
                    node_url(lab, i), api, state.site.maintenance_mode, state.site.ignore_version_mismatch, 10
                )
            )
            for i in lab.node_indexes
        )
    )


def lab_db(lab: LabConfig, database: str) -> Database:
    """The site's database entry, pointed at another database on the same server."""
    db = load_inventory(lab.site_yaml).databases[0]
    return Database(
        name=db.name,
        kind=db.kind,
        host=db.host,
        port=db.port,
        database=database,
        user=db.user,
        password=db.password,
    )


def create_v1_database(lab: LabConfig, name: str) -> None:
    """A database at schema 1, created as the lab's DB user (what its grants allow)."""
    with mariadb.connect(lab, "primary", user=DB_USER) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE IF NOT EXISTS `{name}`")
        cur.execute(f"USE `{name}`")
        for stmt in mariadb.SCHEMA_V1:
            cur.execute(stmt)
        cur.execute("INSERT INTO schema_version (version) VALUES (1)")


@asynccontextmanager
async def spare_node(lab: LabConfig, major: int, other_key: bool = False) -> AsyncIterator[str]:
    """A node outside the load balancer running package `major` (optionally with another
    encryption key) against the site's database; yields its URL; removed afterwards."""
    i = lab.nodes + 2
    try:
        await asyncio.to_thread(nodes.install_node, lab, i, lab.package(major))
        if other_key:
            (lab.node_dir(i) / "app" / "encryption.config").write_text(f"key = {secrets.token_hex(32)}\n")
        await asyncio.to_thread(nodes.start_node, lab, i)
        yield node_url(lab, i)
    finally:
        await asyncio.to_thread(nodes.stop_node, lab, i)
        shutil.rmtree(lab.node_dir(i), ignore_errors=True)


# --------------------------------------------------------------------------- the site's files


def test_site_yaml_has_admin_staging_and_scratch(lab: LabConfig) -> None:
    inv = load_inventory(lab.site_yaml)
    assert inv.application.admin == AdminApi(
        token=SecretRef(file=str(lab.admin_token_file)), path_prefix="/admin"
    )
    assert "admin.config" in inv.application.protected_files
    assert inv.databases[0].scratch_database == SCRATCH_DB_NAME
    st = inv.staging
    assert st is not None
    assert (st.ssh.port, st.url, st.database) == (lab.staging_ssh_port, lab.staging_url, STAGING_DB_NAME)
    assert st.config["web.config"]["http.port"] == str(lab.staging_app_port)
    assert st.config["web.config"]["node.name"] == STAGING_NAME
    assert st.config["database.config"] == {"database": STAGING_DB_NAME}
    # The token is a private file; nodes only hold its sha256.
    assert lab.admin_token_file.stat().st_mode & 0o777 == 0o600
    token = lab.admin_token_file.read_text().strip()
    for i in lab.node_indexes:
        conf = lab.node_dir(i) / "app" / "admin.config"
        assert conf.stat().st_mode & 0o777 == 0o600
        text = conf.read_text()
        assert f"token_sha256 = {hashlib.sha256(token.encode()).hexdigest()}" in text and token not in text
    # Staging ports are the lab's own and outside every node's.
    node_ports = {p for i in range(1, 20) for p in (lab.app_port(i), lab.ssh_port(i))}
    assert {lab.staging_app_port, lab.staging_ssh_port} <= set(lab.all_ports())
    assert not {lab.staging_app_port, lab.staging_ssh_port} & node_ports


def test_v3_package_requires_v2(lab: LabConfig) -> None:
    r1, r2, r3 = (packages.release_of(lab.package(m)) for m in (1, 2, 3))
    assert r1["requires"] == [] and r2["requires"] == []
    assert r3 == {
        "name": "labapp",
        "version": "3.0.0",
        "min_upgrade_from": "2.0.0",
        "requires": ["2.0.0"],
        "schema_version": 2,
        "migrations": [],
    }
    with zipfile.ZipFile(lab.package(2)) as z2, zipfile.ZipFile(lab.package(3)) as z3:
        assert z3.read("app.py") == z2.read("app.py")  # same application code
        names = set(z3.namelist())
        assert "Welcome to labapp 3" in z3.read("web.config").decode()
    assert not any(n.startswith("migrations/") for n in names)
    assert not names & {"encryption.config", "database.config", "admin.config"}


# --------------------------------------------------------------------------- maintenance mode


async def test_maintenance_refuses_changes_and_serves_reads(lab: LabConfig) -> None:
    base = node_url(lab, 2)
    password = lab.admin_password_file.read_text().strip()
    await set_site(lab, maintenance_mode=True)
    status, body, headers = await request("POST", f"{base}/items", json_body={"body": "in maintenance"})
    assert status == 423 and headers["X-Refused"] == "maintenance"
    assert json.loads(body) == {"error": "maintenance mode: changes are refused, reads are served"}
    status, _, headers = await request("POST", f"{base}/secrets", json_body={"name": "m", "value": "v"})
    assert (status, headers["X-Refused"]) == (423, "maintenance")
    assert (await request("GET", f"{base}/items"))[0] == 200
    login = {"user": "probe", "password": password}
    assert (await request("POST", f"{base}/login", json_body=login))[0] == 200
    assert (await request("GET", f"{base}/health"))[:2] == (200, "ok")
    version = json.loads((await request("GET", f"{base}/version"))[1])
    assert version["maintenance_mode"] is True and version["mismatch"] is False

    # A node override wins over the site: node2 leaves maintenance, the others stay in it.
    api = admin_api(lab)
    state = await app_admin.set_settings(SettingsRequest(base, api, "node", maintenance_mode=False))
    assert state.node == "node2" and state.maintenance_mode is False and state.site.maintenance_mode is True
    assert state.node_override == app_admin.NodeOverride(maintenance_mode=False)
    assert (await request("POST", f"{base}/items", json_body={"body": "override"}))[0] == 201
    assert (await request("POST", f"{node_url(lab, 3)}/items", json_body={"body": "x"}))[0] == 423
    # Clearing the override deletes the node's row: the site's value applies again.
    state = await app_admin.set_settings(SettingsRequest(base, api, "node", clear_node_override=True))
    assert state.node_override is None and state.maintenance_mode is True
    await set_site(lab, maintenance_mode=False)
    assert (await request("POST", f"{base}/items", json_body={"body": "after"}))[0] == 201


async def test_probe_counts_refusals_apart(lab: LabConfig, tmp_path: Path) -> None:
    await set_site(lab, maintenance_mode=True)
    stop = asyncio.Event()
    out = tmp_path / "probe.jsonl"
    asyncio.get_running_loop().call_later(2.0, stop.set)
    summary = await asyncio.wait_for(run_probe(lab.main_url, 50, stop, out, slow_every=0), 30)
    assert summary.failed == 0, out.read_text()[:2000] if out.exists() else ""
    assert summary.refused == summary.by_status.get("423", 0) >= 20, summary  # ~30% writes
    assert summary.by_status.get("201", 0) == 0
    assert summary.by_status["200"] + summary.refused == summary.total
    assert f"failed=0 refused={summary.refused} " in summary.line()
    assert json.loads(summary.to_json())["refused"] == summary.refused


# --------------------------------------------------------------------------- version mismatch


async def test_mismatch_page_with_enforcement_unless_maintenance_and_ignore(lab: LabConfig) -> None:
    api = admin_api(lab)
    async with spare_node(lab, 2) as base:  # code at schema 2, the database at schema 1
        state = await app_admin.get_state(base, api)
        assert (state.code_schema, state.db_schema) == (2, 1)
        assert (state.mismatch, state.mismatch_page) == (True, False)
        assert (await request("GET", f"{base}/items"))[0] == 200  # not enforced: rolling deploys need that

        await set_site(lab, enforce_version_match=True)
        await app_admin.wait_settings(WaitSettingsRequest(base, api, False, False, 10))
        want = "Version mismatch: this node runs 2.0.0 (schema 2); the database is at schema 1"
        for method, path in (("GET", "/items"), ("POST", "/items"), ("GET", "/"), ("POST", "/login")):
            status, body, headers = await request(
                method, base + path, json_body={} if method == "POST" else None
            )
            assert (status, headers.get("X-Refused"), body.strip()) == (409, MISMATCH_HEADER, want), path
        status, body, _ = await request("GET", f"{base}/health")
        assert status == 200 and body == f"ok ({want.replace('Version', 'version')})"
        version = json.loads((await request("GET", f"{base}/version"))[1])
        assert (version["mismatch"], version["mismatch_page"]) == (True, True)
        assert (await app_admin.get_state(base, api)).mismatch_page is True
        # The lab's own nodes run the database's schema: no page there.
        assert (await request("GET", f"{node_url(lab, 1)}/items"))[0] == 200

        # Ignore without maintenance mode does not lift it (the setting only applies in
        # maintenance mode)...
        await app_admin.set_settings(SettingsRequest(base, api, "node", ignore_version_mismatch=True))
        assert (await request("GET", f"{base}/items"))[0] == 409
        # ...both do: reads are served again, changes refused by maintenance mode.
        state = await app_admin.set_settings(SettingsRequest(base, api, "node", maintenance_mode=True))
        assert (state.maintenance_mode, state.ignore_version_mismatch) == (True, True)
        assert state.mismatch_page is False
        assert (await request("GET", f"{base}/items"))[0] == 200
        status, _, headers = await request("POST", f"{base}/items", json_body={"body": "x"})
        assert (status, headers["X-Refused"]) == (423, "maintenance")
        # Other nodes are untouched by this node's override.
        assert (await app_admin.get_state(node_url(lab, 1), api)).maintenance_mode is False

        state = await app_admin.set_settings(SettingsRequest(base, api, "node", clear_node_override=True))
        assert state.node_override is None and state.mismatch_page is True
        await set_site(lab, enforce_version_match=False)
        await app_admin.wait_settings(WaitSettingsRequest(base, api, False, False, 10))
        assert (await request("GET", f"{base}/items"))[0] == 200


async def test_key_mismatch_is_named(lab: LabConfig) -> None:
    name = f"key-test-{secrets.token_hex(4)}"
    status, _, _ = await request(
        "POST", f"{node_url(lab, 1)}/secrets", json_body={"name": name, "value": "v"}
    )
    assert status == 201
    async with spare_node(lab, 1, other_key=True) as base:
        status, body, _ = await request("GET", f"{base}/health")
        assert status == 503 and body.startswith("encryption key mismatch"), body
        status, body, _ = await request("GET", f"{base}/secrets/{name}")
        assert status == 409 and "encryption key mismatch" in json.loads(body)["error"], body
    assert (await request("GET", f"{node_url(lab, 2)}/secrets/{name}"))[0] == 200


# --------------------------------------------------------------------------- staging


async def _ssh_staging(lab: LabConfig) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect(
        "127.0.0.1",
        lab.staging_ssh_port,
        username="zerodown",
        client_keys=[str(lab.client_key)],
        known_hosts=str(lab.known_hosts),
        connect_timeout=10,
    )


async def test_staging_receives_files_and_starts(lab: LabConfig, tmp_path: Path) -> None:
    inv = load_inventory(lab.site_yaml)
    assert inv.staging is not None
    assert ("app", STAGING_NAME) not in haproxy.server_states(lab)  # outside the load balancer
    async with await _ssh_staging(lab) as conn:
        assert (await conn.run("pwd", timeout=20)).stdout == f"{lab.staging_dir}\n"
        assert (await conn.run("ls -A app", timeout=20)).stdout == ""
        r = await conn.run("./ctl status", timeout=20)
        assert (r.exit_status, r.stdout) == (3, "stopped\n")
        assert (await conn.run("./ctl stop", timeout=20)).exit_status == 0
        r = await conn.run("./ctl start", timeout=20)
        assert r.exit_status != 0 and "no application" in str(r.stderr)

        # What the procedure does: a node's files (protected ones included) into app/, the
        # inventory's overrides written over them, the staging database restored.
        src = tmp_path / "app"
        shutil.copytree(lab.node_dir(1) / "app", src)
        for name, values in inv.staging.config.items():
            (src / name).write_text(nodes.customise((src / name).read_text(), values))
        async with conn.start_sftp_client() as sftp:
            await sftp.put([str(p) for p in src.iterdir()], "app", recurse=True)
        await asyncio.to_thread(create_v1_database, lab, STAGING_DB_NAME)
        r = await conn.run("./ctl start", timeout=30)
        assert r.exit_status == 0, r.stderr
    status, body, headers = await request("GET", f"{lab.staging_url}/version")
    assert status == 200 and headers["X-Node"] == STAGING_NAME
    assert json.loads(body)["config"]["http.port"] == str(lab.staging_app_port)
    assert (await request("GET", f"{lab.staging_url}/health"))[:2] == (200, "ok")
    # Its own database: maintenance mode set there leaves production alone.
    api = admin_api(lab)
    state = await app_admin.set_settings(SettingsRequest(lab.staging_url, api, "site", maintenance_mode=True))
    assert state.node == STAGING_NAME and state.maintenance_mode is True
    assert (await app_admin.get_state(node_url(lab, 1), api)).maintenance_mode is False
    assert await asyncio.to_thread(nodes.staging_running, lab)

    await asyncio.to_thread(nodes.wipe_staging, lab)
    assert not await asyncio.to_thread(nodes.staging_running, lab)
    assert staging_problems(lab) == []


def test_lab_db_user_grants_are_exact(lab: LabConfig) -> None:
    with mariadb.connect(lab, "primary", user=DB_USER) as conn, conn.cursor() as cur:
        for db in (STAGING_DB_NAME, SCRATCH_DB_NAME):
            cur.execute(f"CREATE DATABASE `{db}`")
            cur.execute(f"CREATE TABLE `{db}`.t (id INT PRIMARY KEY)")
            cur.execute(f"DROP DATABASE `{db}`")
        # '_' is not a wildcard in these grants, and nothing else is granted.
        for db in ("labappXstaging", "labapp_staging2", "other"):
            with pytest.raises(pymysql.err.OperationalError) as info:
                cur.execute(f"CREATE DATABASE `{db}`")
            assert info.value.args[0] == 1044, info.value
        cur.execute("SELECT COUNT(*) FROM zdlab.faults")
        with pytest.raises(pymysql.err.OperationalError) as info:
            cur.execute("INSERT INTO zdlab.faults VALUES ('labapp', 'migration-2')")
        assert info.value.args[0] == 1142


# --------------------------------------------------------------------------- migration fault injection


async def test_injected_migration_failure_hits_only_its_database(lab: LabConfig) -> None:
    with zipfile.ZipFile(lab.package(2)) as z:
        up = z.read("migrations/002_up.sql").decode()
    production = lab_db(lab, DB_NAME)
    scratch, staging = lab_db(lab, SCRATCH_DB_NAME), lab_db(lab, STAGING_DB_NAME)
    for name in (SCRATCH_DB_NAME, STAGING_DB_NAME):
        await asyncio.to_thread(create_v1_database, lab, name)
    before = await mysql.table_checksums(production)

    code, out = await zerodown(
        "lab", "inject", "migration-fail", "--database", SCRATCH_DB_NAME, "--root", str(lab.abs_root)
    )
    assert code == 0 and "on" in out, out
    assert await asyncio.to_thread(mariadb.injected_faults, lab) == [(SCRATCH_DB_NAME, "migration-2")]
    assert await mysql.table_checksums(production) == before  # the injection touches no labapp table

    with pytest.raises(ApplicationError) as info:
        await mysql.apply_migration(scratch, 2, up, "up")
    assert info.value.type == "DatabaseError"
    assert "1242" in str(info.value) and "statement 1/" in str(info.value)
    assert await mysql.schema_version(scratch) == 1
    cols = mariadb.query(
        lab,
        "primary",
        "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s AND TABLE_NAME = 'items'",
        (SCRATCH_DB_NAME,),
    )
    assert "notes" not in {c for (c,) in cols}
    # Another database runs the same script fine: the hook is a no-op there.
    result = await mysql.apply_migration(staging, 2, up, "up")
    assert result.applied and result.schema_version_after == 2
    hook = next(ln for ln in up.splitlines() if ln.startswith("SET @zerodown_lab_fault"))
    assert await mysql.query(production, hook.rstrip(";")) == []

    code, out = await zerodown(
        "lab", "inject", "migration-fail", "--database", SCRATCH_DB_NAME, "--off", "--root", str(lab.abs_root)
    )
    assert code == 0, out
    assert await asyncio.to_thread(mariadb.injected_faults, lab) == []
    assert (await mysql.apply_migration(scratch, 2, up, "up")).schema_version_after == 2
    assert await mysql.table_checksums(production) == before

    # The Python helper is idempotent and reports whether it changed anything.
    assert await asyncio.to_thread(mariadb.inject_migration_failure, lab, SCRATCH_DB_NAME, True)
    assert not await asyncio.to_thread(mariadb.inject_migration_failure, lab, SCRATCH_DB_NAME, True)


# --------------------------------------------------------------------------- reset


async def test_reset_puts_the_secret_server_side_back(lab: LabConfig) -> None:
    api = admin_api(lab)
    await set_site(lab, maintenance_mode=True, ignore_version_mismatch=True, enforce_version_match=True)
    await app_admin.set_settings(SettingsRequest(node_url(lab, 2), api, "node", maintenance_mode=False))
    await app_admin.record_audit(AuditRequest(node_url(lab, 1), api, "STARTED", reference="reset-test"))
    for name in (SCRATCH_DB_NAME, STAGING_DB_NAME):
        await asyncio.to_thread(create_v1_database, lab, name)
    await asyncio.to_thread(mariadb.inject_migration_failure, lab, DB_NAME, True)
    shutil.copytree(lab.node_dir(1) / "app", lab.staging_dir / "app", dirs_exist_ok=True)
    (lab.staging_dir / "leftover.tar").write_text("x")
    problems = await asyncio.to_thread(mariadb.site_state_problems, lab)
    assert len(problems) == 5, problems  # settings, audit, 2 databases, the fault
    assert staging_problems(lab)

    done = await manager.lab_reset(lab)

    assert any("deleted 1 audit" in d for d in done) and any("dropped database" in d for d in done), done
    assert await asyncio.to_thread(mariadb.site_state_problems, lab) == []
    assert staging_problems(lab) == []
    rows = mariadb.query(lab, "primary", "SELECT * FROM tbUpgradeSettings", database=DB_NAME)
    assert rows == [("*", 0, 0, 0)]
    for i in lab.node_indexes:
        state = await app_admin.get_state(node_url(lab, i), api)
        assert (state.maintenance_mode, state.ignore_version_mismatch, state.enforce_version_match) == (
            False,
            False,
            False,
        )
        status, _, _ = await request("POST", f"{node_url(lab, i)}/items", json_body={"body": "after reset"})
        assert status == 201
