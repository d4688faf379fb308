"""The lab's infrastructure against the real processes: MariaDB replication, HAProxy,
the Temporal dev server, lab status / idempotent lab_up / lab_reset.

The reset test changes the lab (schema v2, a v2 node, a server in maintenance) and then
checks lab_reset undoes it, so it runs last in this file.
"""

from __future__ import annotations

import asyncio
import time
import uuid
import zipfile
from pathlib import Path

import aiohttp
from multidict import CIMultiDict
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import Client

from inventory.load import load_inventory
from lab import devserver, haproxy, manager, mariadb, nodes
from lab.config import BACKEND, DB_NAME, DB_USER, SECONDARY_BACKEND, LabConfig
from lab.procs import pid_alive, pid_running, read_pid


async def _get_versions(cfg: LabConfig, n: int) -> list[tuple[int, CIMultiDict[str], dict[str, object]]]:
    """n sequential GET /version through the main frontend: (status, headers, json).
    Headers stay case-insensitive (HAProxy sends them lower-cased)."""
    out = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        for _ in range(n):
            # A fresh connection each time: keep-alive would pin us to one server.
            async with s.get(f"{cfg.main_url}/version", headers={"Connection": "close"}) as r:
                out.append((r.status, r.headers.copy(), await r.json()))
    return out


async def test_replication_replicates_a_write(lab: LabConfig) -> None:
    body = f"replication-{uuid.uuid4().hex}"

    def write_then_read() -> tuple[int, str, list[tuple[object, ...]], dict[str, object]]:
        # As the zerodown user over TCP, like the activities (not root over the socket).
        with mariadb.connect(lab, "primary", user=DB_USER, database=DB_NAME) as conn, conn.cursor() as cur:
            cur.execute("INSERT INTO items (node, body) VALUES ('test', %s)", (body,))
            item_id = int(cur.lastrowid)
        gtid = mariadb.wait_replica_caught_up(lab, timeout=10)
        with mariadb.connect(lab, "replica", user=DB_USER, database=DB_NAME) as conn, conn.cursor() as cur:
            cur.execute("SELECT node, body FROM items WHERE id = %s", (item_id,))
            rows = list(cur.fetchall())
        return item_id, gtid, rows, mariadb.replica_status(lab) or {}

    item_id, gtid, rows, st = await asyncio.to_thread(write_then_read)
    assert rows == [("test", body)], f"item {item_id} not on the replica after GTID {gtid}"
    assert st["Using_Gtid"] == "Slave_Pos"
    assert st["Slave_IO_Running"] == "Yes" and st["Slave_SQL_Running"] == "Yes"
    # The replica applied exactly the primary's position (same domain-server-sequence).
    replica_pos = mariadb.query(lab, "replica", "SELECT @@GLOBAL.gtid_slave_pos")[0][0]
    assert replica_pos == gtid
    # The replica refuses ordinary writes (read_only); zerodown's user has no way around it
    # except an explicit promote.
    assert mariadb.query(lab, "replica", "SELECT @@GLOBAL.read_only")[0][0] == 1


def test_haproxy_runtime_api_lists_servers(lab: LabConfig) -> None:
    text = haproxy.runtime_command(lab, "show stat")
    assert text.startswith("# pxname,svname,"), text[:200]
    states = haproxy.server_states(lab)
    for i in lab.node_indexes:
        assert states[(BACKEND, lab.node_name(i))] == "UP"
        # The secondary pool holds the same servers, all in maintenance until a procedure
        # moves them.
        assert states[(SECONDARY_BACKEND, lab.node_name(i))] == "MAINT"
    assert len([k for k in states if k[0] == BACKEND]) == lab.nodes


async def test_secondary_members_can_be_put_in_service_and_states_survive_a_reload(lab: LabConfig) -> None:
    node = lab.node_name(1)
    try:
        # A member of the secondary pool is in maintenance the runtime API can lift (not a
        # configuration maintenance, which `state ready` would leave in place).
        answer = haproxy.runtime_command(lab, f"set server {SECONDARY_BACKEND}/{node} state ready")
        assert answer.strip() == ""
        await asyncio.to_thread(_wait_status, lab, SECONDARY_BACKEND, node, "UP")
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{lab.secondary_port}/health") as r:
            assert r.status == 200 and r.headers["X-Served-By"] == node
        haproxy.runtime_command(lab, f"set server {BACKEND}/{node} state maint")
        # A reload (new process) keeps what the runtime API set.
        old_pid = read_pid(haproxy.pid_file(lab))
        await asyncio.to_thread(haproxy.reload, lab)
        assert read_pid(haproxy.pid_file(lab)) != old_pid
        states = haproxy.server_states(lab)
        assert states[(SECONDARY_BACKEND, node)].startswith("UP") and states[(BACKEND, node)] == "MAINT"
    finally:
        await asyncio.to_thread(haproxy.reset_servers, lab)
        await asyncio.to_thread(haproxy.wait_all_up, lab)
    assert haproxy.server_states(lab)[(SECONDARY_BACKEND, node)] == "MAINT"


def _wait_status(lab: LabConfig, backend: str, server: str, prefix: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not haproxy.server_states(lab)[(backend, server)].startswith(prefix):
        assert time.monotonic() < deadline, haproxy.server_states(lab)[(backend, server)]
        time.sleep(0.1)


async def test_main_frontend_serves_and_rotates(lab: LabConfig) -> None:
    # Every node UP with a passing check first; then every node must be served. HAProxy's
    # weighted round robin does not promise a strict 1-2-3 order once servers have changed
    # state (drains, maintenance), so ask in rounds, a bounded number of times.
    await asyncio.to_thread(haproxy.wait_all_up, lab)
    wanted = {lab.node_name(i) for i in lab.node_indexes}
    answers = []
    for _ in range(10):
        answers += await _get_versions(lab, lab.nodes)
        if {h["X-Served-By"] for _, h, _ in answers} == wanted:
            break
    assert all(status == 200 for status, _, _ in answers), answers
    served = [h["X-Served-By"] for _, h, _ in answers]
    assert set(served) == wanted, served
    for _, headers, body in answers:
        # HAProxy's view (X-Served-By) and the app's (X-Node, JSON) agree.
        assert headers["X-Node"] == headers["X-Served-By"] == body["node"]
        assert body["version"] == "1.0.0" and body["db_schema"] == 1
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{lab.secondary_port}/health") as r:
        assert r.status == 503  # every server of app_secondary is in maintenance


def test_lab_status_reports_all_up(lab: LabConfig) -> None:
    rows = manager.lab_status(lab, with_temporal=False)
    down = [(part, detail) for part, up, detail in rows if not up]
    assert not down, down
    parts = {part for part, _, _ in rows}
    assert {
        "mariadb primary",
        "mariadb replica",
        "sshd",
        "haproxy",
        *(lab.node_name(i) for i in lab.node_indexes),
        *(f"haproxy {BACKEND}/{lab.node_name(i)}" for i in lab.node_indexes),
    } <= parts


def test_site_yaml_describes_the_lab(lab: LabConfig) -> None:
    inv = load_inventory(lab.site_yaml)
    assert [n.name for n in inv.nodes] == [lab.node_name(i) for i in lab.node_indexes]
    half = (lab.nodes + 1) // 2
    assert [n.group for n in inv.nodes] == ["A"] * half + ["B"] * (lab.nodes - half)
    assert inv.nodes[0].ssh.port == lab.ssh_port(1)
    assert inv.nodes[0].ssh.key is not None and Path(inv.nodes[0].ssh.key.file or "") == lab.client_key
    assert inv.load_balancers[0].runtime_api == f"unix:{lab.haproxy_socket}"
    db = inv.databases[0]
    assert (db.port, db.replica and db.replica.port) == (lab.primary_db_port, lab.replica_db_port)
    assert Path(db.password.file or "").read_text().strip() == lab.db_password_file.read_text().strip()
    assert inv.application.url == lab.main_url


async def test_lab_up_again_changes_nothing(lab: LabConfig) -> None:
    pids = {
        p: read_pid(p)
        for p in (
            mariadb.pid_file(lab, "primary"),
            mariadb.pid_file(lab, "replica"),
            haproxy.pid_file(lab),
            *(lab.node_dir(i) / "run" / "app.pid" for i in lab.node_indexes),
        )
    }
    assert all(pids.values()), pids
    await manager.lab_up(lab, with_temporal=False)
    assert {p: read_pid(p) for p in pids} == pids


async def test_dev_server_start_and_stop(lab_cfg: LabConfig, tmp_path: Path) -> None:
    port, ui_port = lab_cfg.temporal_port, lab_cfg.temporal_ui_port
    try:
        await asyncio.to_thread(devserver.start_dev_server, tmp_path, port, ui_port)
        pid = read_pid(tmp_path / "temporal.pid")
        assert pid and pid_alive(tmp_path / "temporal.pid")
        # Idempotent: a second start finds it running and keeps it.
        await asyncio.to_thread(devserver.start_dev_server, tmp_path, port, ui_port)
        assert read_pid(tmp_path / "temporal.pid") == pid
        st = devserver.server_status(tmp_path)
        assert st["running"] and st["serving"] and st["address"] == f"127.0.0.1:{port}"

        client = await Client.connect(f"127.0.0.1:{port}")
        attrs = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace="default")
        )
        assert {"ZerodownProcedure", "ZerodownSite"} <= set(attrs.custom_attributes)
        assert (tmp_path / "temporal.db").exists()
    finally:
        stopped = await asyncio.to_thread(devserver.stop_dev_server, tmp_path)
    assert stopped
    assert not (tmp_path / "temporal.pid").exists()
    assert not pid_running(pid)
    assert (tmp_path / "temporal.db").exists()  # the state outlives the server
    assert devserver.server_status(tmp_path)["running"] is False
    assert await asyncio.to_thread(devserver.stop_dev_server, tmp_path) is False  # safe twice


async def test_lab_reset_restores_v1(lab: LabConfig) -> None:
    # Break the lab the way upgrade / failover tests would: schema 2, node2 on v2, node3 in
    # maintenance, a fault injected on node1, the replica promoted and written to directly.
    def upgrade() -> None:
        with zipfile.ZipFile(lab.package(2)) as z:
            up = lab.abs_root / "002_up.sql"
            up.write_bytes(z.read("migrations/002_up.sql"))
        mariadb.run_sql_file(lab, "primary", up)
        mariadb.query(lab, "primary", "UPDATE schema_version SET version = 2", database=DB_NAME)
        nodes.stop_node(lab, 2)
        nodes.install_node(lab, 2, lab.package(2))
        nodes.start_node(lab, 2)
        haproxy.runtime_command(lab, f"set server {BACKEND}/node3 state maint")
        (lab.node_dir(1) / "inject" / "fail_health_version").write_text("9.9.9")
        for stmt in (
            "STOP SLAVE",
            "RESET SLAVE ALL",
            "SET GLOBAL read_only = OFF",
            "INSERT INTO labapp.items (node, body) VALUES ('replica', 'diverged')",
        ):
            mariadb.query(lab, "replica", stmt)

    await asyncio.to_thread(upgrade)
    assert mariadb.schema_version(lab) == 2
    assert haproxy.server_states(lab)[(BACKEND, "node3")] == "MAINT"

    done = await manager.lab_reset(lab)

    assert any("down migration 2" in d for d in done), done
    assert any("rebuilt the replica" in d for d in done), done
    assert mariadb.schema_version(lab) == 1
    cols = mariadb.query(
        lab,
        "primary",
        "SELECT COLUMN_NAME FROM information_schema.COLUMNS "
        "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = 'items' ORDER BY ORDINAL_POSITION",
        (DB_NAME,),
    )
    assert [c for (c,) in cols] == mariadb.SCHEMA_V1_COLUMNS["items"]
    await asyncio.to_thread(mariadb.wait_replica_caught_up, lab, 10)
    assert mariadb.query(lab, "replica", "SELECT version FROM labapp.schema_version") == [(1,)]
    # The replica is a replica again: read-only, without the diverged row, and new writes
    # on the primary reach it.
    assert mariadb.query(lab, "replica", "SELECT @@GLOBAL.read_only")[0][0] == 1
    count = "SELECT COUNT(*) FROM labapp.items WHERE body = %s"
    assert mariadb.query(lab, "replica", count, ("diverged",)) == [(0,)]
    mariadb.query(lab, "primary", "INSERT INTO labapp.items (node, body) VALUES ('test', 'after-reset')")
    await asyncio.to_thread(mariadb.wait_replica_caught_up, lab, 10)
    assert mariadb.query(lab, "replica", count, ("after-reset",)) == [(1,)]
    assert not (lab.node_dir(1) / "inject" / "fail_health_version").exists()
    states = haproxy.server_states(lab)
    assert all(states[(BACKEND, lab.node_name(i))] == "UP" for i in lab.node_indexes), states
    await asyncio.to_thread(haproxy.wait_all_up, lab)
    # Every node answers through the load balancer again (a bounded number of tries: a
    # server just back from maintenance takes its turn in the next round-robin round).
    wanted = {lab.node_name(i) for i in lab.node_indexes}
    answers = []
    for _ in range(10):
        answers += await _get_versions(lab, lab.nodes)
        if {b["node"] for _, _, b in answers} == wanted:
            break
    assert {b["version"] for _, _, b in answers} == {"1.0.0"}
    counters = {
        r["svname"]: {
            k: r.get(k)
            for k in ("status", "weight", "check_status", "stot", "wretr", "wredis", "econ", "eresp")
        }
        for r in haproxy.stat_rows(lab)
        if r.get("pxname") == BACKEND
    }
    assert {b["node"] for _, _, b in answers} == wanted, counters
