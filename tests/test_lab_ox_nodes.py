"""The lab's Open-Xchange cluster (lab/ox/nodes.py, lab/ox/middleware.py, the OX part of
lab/manager.py and lab/haproxy.py) against the session lab, which has three OX nodes.

Node folders and services are driven the way a procedure drives them: over SSH (the
endpoints of ox-site.yaml), with `ctl`, `oxpkg` and the tools in bin/. Tests that change the
OX part use the `ox` fixture, which puts it back (manager.reset_ox) before and after.
"""

from __future__ import annotations

import asyncio
import io
import json
import shlex
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from activities import ssh
from activities.ssh import CommandResult
from inventory.load import load_inventory
from lab import haproxy, manager
from lab.config import OX_BACKEND, OX_SECONDARY_BACKEND, LabConfig
from lab.ox import configdb, tools
from lab.ox import nodes as ox_nodes
from lab.procs import port_open, read_pid

OLD = "7.10.0"
NEW = "7.10.1"
NEW_SERVER = "oxserver-xyz"
REDIRECT_KEY = "com.openexchange.server.migrationRedirectURL"


# --------------------------------------------------------------------------- helpers


@pytest.fixture
async def ox(lab: LabConfig) -> AsyncIterator[LabConfig]:
    """The session lab with its OX part as just after lab up, put back after the test."""
    await manager.reset_ox(lab)
    yield lab
    await manager.reset_ox(lab)


async def run(lab: LabConfig, i: int, command: str, timeout_s: float = 60) -> CommandResult:
    """`command` on OX node i over SSH, with the endpoint ox-site.yaml names."""
    node = load_inventory(lab.ox_site_yaml).nodes[i - 1]
    assert node.name == lab.ox_node_name(i)
    return await ssh.run(node.ssh, command, timeout_s=timeout_s, check=False)


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # names lower-cased (HAProxy sends them so)
    body: Any  # JSON when it is JSON, else the text

    def h(self, name: str) -> str | None:
        return self.headers.get(name.lower())


async def get(url: str) -> Answer:
    """One GET on a fresh connection (keep-alive would pin a balancer to one server),
    redirects not followed."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s,
        s.get(url, allow_redirects=False, headers={"Connection": "close"}) as r,
    ):
        text = await r.text()
        try:
            body: Any = json.loads(text)
        except ValueError:
            body = text
        return Answer(r.status, {k.lower(): v for k, v in r.headers.items()}, body)


def node_url(lab: LabConfig, i: int) -> str:
    return f"http://127.0.0.1:{lab.ox_app_port(i)}"


def login(base: str, cid: int, uid: int = 1) -> str:
    return f"{base}/ox/login?context={cid}&user={uid}"


def pid(lab: LabConfig, i: int) -> int | None:
    return read_pid(lab.ox_node_dir(i) / "run" / "ox.pid")


def db(lab: LabConfig) -> Any:
    password = configdb.ox_db_password_file(lab).read_text(encoding="utf-8").strip()
    return configdb.connect(port=lab.primary_db_port, password=password)


def runupdate(lab: LabConfig) -> str:
    """bin/runupdate with the master admin's credentials: OX's 7.10.1+ runupdate requires -A and
    -P when master authentication is on (lab/ox/tools.py; it reads no ADMIN_PASSWORD)."""
    password = configdb.master_password_file(lab).read_text(encoding="utf-8").strip()
    return f"bin/runupdate -A {configdb.MASTER_ADMIN} -P {shlex.quote(password)}"


def first_context(lab: LabConfig, schema: str) -> int:
    return configdb.contexts(lab, schema)[0][0]


async def wait_server(lab: LabConfig, backend: str, server: str, want: str, timeout: float = 15) -> None:
    """Until HAProxy shows `backend/server` in state `want` (UP: with a passing check)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = {r["svname"]: r for r in haproxy.stat_rows(lab) if r.get("pxname") == backend}
        row = rows.get(server, {})
        if row.get("status") == want and (want != "UP" or (row.get("check_status") or "").startswith("L7OK")):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{backend}/{server} not {want} after {timeout}s: {row}")
        await asyncio.sleep(0.2)


def runtime(lab: LabConfig, command: str) -> None:
    answer = haproxy.runtime_command(lab, command).strip()
    assert answer == "", f"{command!r}: {answer!r}"


async def set_redirect_and_reload(lab: LabConfig, i: int, url: str) -> CommandResult:
    r = await run(lab, i, f"echo '{REDIRECT_KEY}={url}' >> etc/server.properties")
    assert r.exit_status == 0, r
    return await run(lab, i, "./ctl reload")


async def upgrade_by_hand(lab: LabConfig, i: int, server_name: str = NEW_SERVER, version: str = NEW) -> None:
    """Steps 1-2 of the seed on OX node i: out of `ox`, package upgraded, SERVER_NAME set,
    restarted (not yet in `ox_secondary`)."""
    runtime(lab, f"set server {OX_BACKEND}/{lab.ox_node_name(i)} state maint")
    for command in (
        f"./oxpkg install {version}",
        f"sed -i 's/^SERVER_NAME=.*/SERVER_NAME={server_name}/' etc/system.properties",
        "./ctl restart",
    ):
        r = await run(lab, i, command)
        assert r.exit_status == 0, (command, r)


# --------------------------------------------------------------------------- layout and inventory


def test_config_ports_and_validation(lab: LabConfig) -> None:
    b = lab.port_base
    assert (lab.ox_main_port, lab.ox_secondary_port) == (b + 4, b + 5)
    assert [lab.ox_app_port(i) for i in lab.ox_node_indexes] == [b + 61, b + 62, b + 63]
    assert [lab.ox_ssh_port(i) for i in lab.ox_node_indexes] == [b + 71, b + 72, b + 73]
    ports = lab.all_ports()
    assert {b + 4, b + 5, b + 61, b + 63, b + 71, b + 73} <= set(ports)
    assert len(ports) == len(set(ports))
    no_ox = LabConfig(root=lab.root, nodes=lab.nodes, port_base=b)
    assert not {b + 4, b + 5, b + 61, b + 71} & set(no_ox.all_ports())
    assert LabConfig(ox_nodes=9).ox_ssh_port(9) == 18079
    for bad in (10, -1):
        with pytest.raises(ValueError, match="ox_nodes"):
            LabConfig(ox_nodes=bad)
    with pytest.raises(ValueError, match="ox_schemata"):
        LabConfig(ox_schemata=0)
    # lab.json remembers the OX part for `zerodown lab status/down` without flags.
    state = json.loads((lab.abs_root / "lab.json").read_text())
    assert (state["ox_nodes"], state["ox_schemata"]) == (3, 20)


def test_ox_site_yaml_describes_the_cluster(lab: LabConfig) -> None:
    inv = load_inventory(lab.ox_site_yaml)
    assert inv.site == "lab-ox"
    assert [n.name for n in inv.nodes] == ["ox1", "ox2", "ox3"]
    for i, node in enumerate(inv.nodes, 1):
        assert node.ssh.port == lab.ox_ssh_port(i) and node.ssh.user == "zerodown"
        assert node.url == node_url(lab, i)
        assert node.app_dir == "opt" and (lab.ox_node_dir(i) / "opt").is_dir()
        assert (node.service.kind, node.service.start, node.service.stop, node.service.status) == (
            "command",
            "./ctl start",
            "./ctl stop",
            "./ctl status",
        )
    lbs = {lb.name: lb for lb in inv.load_balancers}
    assert (lbs["main"].backend, lbs["secondary"].backend) == (OX_BACKEND, OX_SECONDARY_BACKEND)
    assert lbs["main"].runtime_api == lbs["secondary"].runtime_api == f"unix:{lab.haproxy_socket}"
    assert dict(lbs["secondary"].members) == {"ox1": "ox1", "ox2": "ox2", "ox3": "ox3"}
    assert inv.application.url == lab.ox_main_url
    assert inv.ox is not None
    assert (inv.ox.server_name, inv.ox.main_lb, inv.ox.secondary_lb) == ("oxserver", "main", "secondary")
    assert inv.ox.secondary_url == lab.ox_secondary_url
    assert inv.ox.admin_password.file is not None
    assert Path(inv.ox.admin_password.file) == configdb.master_password_file(lab)
    assert (inv.ox.tools_dir, inv.ox.reload_command, inv.ox.install_command, inv.ox.version_command) == (
        "bin",
        "./ctl reload",
        "./oxpkg install {version}",
        "./oxpkg version",
    )
    assert set(inv.approvers) == {"failure", "server-already-registered", "continue"}
    assert manager.ox_site_inventory(lab)["ox"]["server_properties"] == "etc/server.properties"


async def test_node_folders_as_installed(ox: LabConfig) -> None:
    for i in ox.ox_node_indexes:
        d = ox.ox_node_dir(i)
        for f in ("ctl", "oxpkg", *(f"bin/{t}" for t in tools.TOOLS)):
            assert (d / f).stat().st_mode & 0o111, f
        server = (d / "etc" / "server.properties").read_text()
        assert REDIRECT_KEY not in server and server.startswith("#")
        assert "SERVER_NAME=oxserver\n" in (d / "etc" / "system.properties").read_text()
        assert (d / "installed" / "version").read_text() == f"{OLD}\n"
        env = (d / "bin" / tools.ENV_FILE_NAME).read_text()
        assert f"OX_VERSION_FILE={d / 'installed' / 'version'}\n" in env
        assert configdb.ox_db_password_file(ox).read_text().strip() not in env  # paths, not secrets
        assert (d / "run" / "ox.pid").exists() and (d / "inject").is_dir()
        # The service: what it read at start, and its server's id from the config DB.
        v = (await get(f"{node_url(ox, i)}/version")).body
        assert v == {
            "version": OLD,
            "node": f"ox{i}",
            "server_name": "oxserver",
            "server_id": 2,
            "migration_redirect_url": None,
        }


async def test_haproxy_ox_backends_and_status(ox: LabConfig) -> None:
    states = haproxy.server_states(ox)
    for i in ox.ox_node_indexes:
        assert states[(OX_BACKEND, f"ox{i}")] == "UP"
        assert states[(OX_SECONDARY_BACKEND, f"ox{i}")] == "MAINT"
    assert len([k for k in states if k[0] == OX_BACKEND]) == 3
    rows = {part: (up, detail) for part, up, detail in manager.lab_status(ox, with_temporal=False)}
    for i in ox.ox_node_indexes:
        assert rows[f"ox{i}"][0] and rows[f"haproxy ox/ox{i}"] == (True, "UP")
    assert f"ox_main :{ox.ox_main_port}" in rows["haproxy"][1]
    shallow = {part: up for part, up, _ in manager.lab_status(ox, with_temporal=False, shallow=True)}
    assert all(shallow[f"ox{i}"] for i in ox.ox_node_indexes)
    # ox_main rotates over every OX node (bounded rounds: round robin order is not promised).
    served: set[str] = set()
    for _ in range(10):
        for _ in ox.ox_node_indexes:
            a = await get(f"{ox.ox_main_url}/health")
            assert a.status == 200 and a.body == "ok"
            assert a.h("x-node") == a.h("x-served-by")
            served.add(str(a.h("x-node")))
        if served == {"ox1", "ox2", "ox3"}:
            break
    assert served == {"ox1", "ox2", "ox3"}
    assert (await get(f"{ox.ox_secondary_url}/health")).status == 503  # all in maintenance


# --------------------------------------------------------------------------- service control


async def test_ctl_verbs_over_ssh(ox: LabConfig) -> None:
    r = await run(ox, 2, "./ctl status")
    before = pid(ox, 2)
    assert (r.exit_status, r.stdout) == (0, f"running {before}\n")

    r = await run(ox, 2, "./ctl stop")
    assert (r.exit_status, r.stdout) == (0, "stopped\n")
    assert not port_open("127.0.0.1", ox.ox_app_port(2))
    assert not (ox.ox_node_dir(2) / "run" / "ox.pid").exists()
    r = await run(ox, 2, "./ctl status")
    assert (r.exit_status, r.stdout) == (3, "stopped\n")
    r = await run(ox, 2, "./ctl reload")
    assert r.exit_status != 0 and "not running" in r.stderr
    assert (await run(ox, 2, "./ctl stop")).exit_status == 0  # stopping a stopped node is fine
    await wait_server(ox, OX_BACKEND, "ox2", "DOWN")

    r = await run(ox, 2, "./ctl start")
    assert r.exit_status == 0 and r.stdout.startswith("running "), r
    assert port_open("127.0.0.1", ox.ox_app_port(2))  # start returns once the port accepts
    started = pid(ox, 2)
    assert started is not None and started != before
    assert (await run(ox, 2, "./ctl start")).stdout == f"running {started}\n"  # idempotent
    r = await run(ox, 2, "./ctl restart")
    assert r.exit_status == 0 and pid(ox, 2) not in (None, started)
    await wait_server(ox, OX_BACKEND, "ox2", "UP")

    r = await run(ox, 2, "./ctl frobnicate")
    assert r.exit_status == 2 and "start|stop|status|restart|reload" in r.stderr
    log = [json.loads(line) for line in (ox.ox_node_dir(2) / "ssh.log").read_text().splitlines()]
    assert {"command": "./ctl restart", "exit_status": 0, "node": "ox2"}.items() <= log[-2].items()


async def test_lab_down_stops_an_ox_folder_by_its_pid_file(ox: LabConfig) -> None:
    # What lab_down does per folder under nodes/: an oxN folder is an OX node.
    manager._stop_node_dir(ox, ox.ox_node_dir(3))
    assert not port_open("127.0.0.1", ox.ox_app_port(3))
    shallow = {part: up for part, up, _ in manager.lab_status(ox, with_temporal=False, shallow=True)}
    assert shallow["ox3"] is False and shallow["ox1"] is True
    done = await manager.reset_ox(ox)
    assert "started ox3" in done
    assert ox_nodes.ox_node_running(ox, 3)


async def test_reload_applies_a_redirect_url_without_a_restart(ox: LabConfig) -> None:
    before = pid(ox, 1)
    r = await run(ox, 1, f"echo '{REDIRECT_KEY}={ox.ox_secondary_url}' >> etc/server.properties")
    assert r.exit_status == 0
    # Not before the reload: the service read its properties at start.
    assert (await get(f"{node_url(ox, 1)}/version")).body["migration_redirect_url"] is None
    r = await run(ox, 1, "./ctl reload")
    assert r.exit_status == 0 and "reloaded" in r.stdout, r
    v = (await get(f"{node_url(ox, 1)}/version")).body
    assert v["migration_redirect_url"] == ox.ox_secondary_url
    assert pid(ox, 1) == before and v["version"] == OLD
    # system.properties too: another SERVER_NAME (not registered: no server id).
    r = await run(
        ox,
        1,
        "sed -i 's/^SERVER_NAME=.*/SERVER_NAME=unregistered/' etc/system.properties"
        f" && sed -i '/{REDIRECT_KEY}/d' etc/server.properties && ./ctl reload",
    )
    assert r.exit_status == 0, r
    v = (await get(f"{node_url(ox, 1)}/version")).body
    assert (v["server_name"], v["server_id"], v["migration_redirect_url"]) == ("unregistered", None, None)
    assert pid(ox, 1) == before
    assert (await get(f"{node_url(ox, 2)}/version")).body["migration_redirect_url"] is None  # per node


async def test_oxpkg_install_takes_effect_at_the_restart(ox: LabConfig) -> None:
    assert (await run(ox, 1, "./oxpkg version")).stdout == f"{OLD}\n"
    for bad in ("7.10", "7.10.x", "7..10", "'7.10.1; rm -rf x'", "''"):
        r = await run(ox, 1, f"./oxpkg install {bad}")
        assert r.exit_status != 0 and "invalid release" in r.stderr, (bad, r)
    r = await run(ox, 1, f"./oxpkg install {NEW}")
    assert r.exit_status == 0 and "restart" in r.stdout, r
    r = await run(ox, 1, f"./oxpkg install {NEW}")
    assert r.exit_status == 0 and "already installed" in r.stdout  # idempotent
    assert (await run(ox, 1, "./oxpkg version")).stdout == f"{NEW}\n"
    assert (ox.ox_node_dir(1) / "installed" / "version").read_text() == f"{NEW}\n"
    # Installed is not running: the service keeps the release it started with.
    assert (await get(f"{node_url(ox, 1)}/version")).body["version"] == OLD
    assert (await run(ox, 1, "./ctl restart")).exit_status == 0
    assert (await get(f"{node_url(ox, 1)}/version")).body["version"] == NEW
    assert (await get(f"{node_url(ox, 2)}/version")).body["version"] == OLD
    # The lab-side helper runs the same script.
    assert ox_nodes.oxpkg(ox, 2, "version") == f"{OLD}\n"
    with pytest.raises(RuntimeError, match="invalid release"):
        ox_nodes.oxpkg(ox, 2, "install", "latest")


def test_runupdate_target_prefers_the_version_file(tmp_path: Path) -> None:
    def target(env: dict[str, str]) -> str:
        ctx = tools.Ctx("runupdate", env, io.StringIO(), io.StringIO(), io.StringIO())
        return tools._update_settings(ctx)[1]

    version_file = tmp_path / "version"
    version_file.write_text("7.10.5\n")
    assert target({"OX_VERSION_FILE": str(version_file), "OX_VERSION": "7.10.1"}) == "7.10.5"
    assert target({"OX_VERSION_FILE": str(tmp_path / "missing"), "OX_VERSION": "7.10.1"}) == "7.10.1"
    version_file.write_text("")
    assert target({"OX_VERSION_FILE": str(version_file)}) == configdb.DEFAULT_TARGET_VERSION


async def test_runupdate_brings_a_schema_to_the_nodes_installed_release(ox: LabConfig) -> None:
    assert (await run(ox, 3, "./oxpkg install 7.10.2")).exit_status == 0
    r = await run(ox, 3, f"{runupdate(ox)} -n oxdatabase_1")
    assert (r.exit_status, r.stdout, r.stderr) == (0, "", "")
    # On a node still at 7.10.0 the update tasks are those of 7.10.0 (not OX_VERSION's 7.10.1).
    r = await run(ox, 1, f"{runupdate(ox)} -n oxdatabase_2")
    assert r.exit_status == 0, r
    states = configdb.schema_states(ox)
    assert (states["oxdatabase_1"].update_state, states["oxdatabase_1"].version) == ("done", "7.10.2")
    assert (states["oxdatabase_2"].update_state, states["oxdatabase_2"].version) == ("done", OLD)
    assert states["oxdatabase_3"].update_state == "none"

    # set_runupdate_seconds: every node's runupdate works that long per schema.
    ox_nodes.set_runupdate_seconds(ox, 1.5)
    for i in ox.ox_node_indexes:
        assert "OX_RUNUPDATE_SECONDS=1.5\n" in (ox.ox_node_dir(i) / "bin" / tools.ENV_FILE_NAME).read_text()
    t0 = time.monotonic()
    assert (await run(ox, 2, f"{runupdate(ox)} -n oxdatabase_3")).exit_status == 0
    assert time.monotonic() - t0 >= 1.5
    ox_nodes.set_runupdate_seconds(ox, 0)
    t0 = time.monotonic()
    assert (await run(ox, 2, f"{runupdate(ox)} -n oxdatabase_4")).exit_status == 0
    assert time.monotonic() - t0 < 1.5
    assert configdb.schema_states(ox)["oxdatabase_4"].update_state == "done"


# --------------------------------------------------------------------------- context resolution


async def test_login_outcomes_on_one_node(ox: LabConfig) -> None:
    n1 = node_url(ox, 1)
    cid = first_context(ox, "oxdatabase_1")
    a = await get(login(n1, cid, 7))
    assert (a.status, a.h("x-node")) == (200, "ox1")
    assert a.body == {
        "context": cid,
        "user": 7,
        "schema": "oxdatabase_1",
        "server": "oxserver",
        "node": "ox1",
        "version": OLD,
    }
    # a) unknown context
    a = await get(login(n1, 999999))
    assert (a.status, a.h("x-node")) == (404, "ox1")
    assert a.body == {"code": "CTX-0002", "error": "Context 999999 does not exist"}
    assert (await get(f"{n1}/ox/login?context=abc")).status == 400
    assert (await get(f"{n1}/ox/login")).status == 400
    with db(ox) as conn:
        # b) disabled (disableschema), checked before where the context lives
        configdb.disable_schema(conn, "oxdatabase_2")
        off = first_context(ox, "oxdatabase_2")
        a = await get(login(n1, off))
        assert (a.status, a.h("x-ox-refused"), a.h("x-node")) == (403, "disabled", "ox1")
        assert a.body["code"] == "LGI-0016" and a.body["error"] == f"Context {off} is disabled"
        # d) on another server, no redirect URL set: CTX-0012, no redirect
        sid = configdb.register_server(conn, NEW_SERVER)
        configdb.change_server(conn, sid, "oxdatabase_1")
        a = await get(login(n1, cid))
        assert (a.status, a.h("location"), a.h("x-node")) == (409, None, "ox1")
        assert a.body == {
            "code": "CTX-0012",
            "error": f"The context {cid} is located in server with id {sid}",
        }
        # d) with the redirect URL (reloaded, no restart): 302 to the secondary balancer
        assert (await set_redirect_and_reload(ox, 1, ox.ox_secondary_url)).exit_status == 0
        a = await get(login(n1, cid, 7))
        assert (a.status, a.h("x-ox-redirect"), a.h("x-node")) == (302, "migration", "ox1")
        assert a.h("location") == f"{ox.ox_secondary_url}/ox/login?context={cid}&user=7"
        # A schema being upgraded is disabled *and* moved: refused, not redirected.
        configdb.change_server(conn, sid, "oxdatabase_2")
        a = await get(login(n1, off))
        assert (a.status, a.h("x-ox-refused"), a.h("location")) == (403, "disabled", None)
        # The config DB is read on every request: enabled again, it is redirected at once.
        configdb.enable_schema(conn, "oxdatabase_2")
        assert (await get(login(n1, off))).status == 302
        # c) this node's server: another SERVER_NAME makes the moved contexts its own.
        r = await run(
            ox,
            1,
            f"sed -i 's/^SERVER_NAME=.*/SERVER_NAME={NEW_SERVER}/' etc/system.properties && ./ctl reload",
        )
        assert r.exit_status == 0
        a = await get(login(n1, cid))
        assert (a.status, a.body["server"], a.body["schema"]) == (200, NEW_SERVER, "oxdatabase_1")
        other = first_context(ox, "oxdatabase_3")
        a = await get(login(n1, other))  # now on the other server, with the redirect URL set
        assert a.status == 302


async def test_login_through_both_balancers_reaches_the_upgraded_node(ox: LabConfig) -> None:
    """The seed's picture after steps 0-9 for one node and one schema: ox3 upgraded and in
    the secondary pool, oxdatabase_1 on its server, ox1 and ox2 (7.10.0) redirecting."""
    moved, stays = first_context(ox, "oxdatabase_1"), first_context(ox, "oxdatabase_2")
    off = first_context(ox, "oxdatabase_3")
    for i in (1, 2):  # step 0
        before = pid(ox, i)
        assert (await set_redirect_and_reload(ox, i, ox.ox_secondary_url)).exit_status == 0
        assert pid(ox, i) == before
    await upgrade_by_hand(ox, 3)  # steps 1-2
    with db(ox) as conn:
        sid = configdb.register_server(conn, NEW_SERVER)  # step 3
        configdb.change_server(conn, sid, "oxdatabase_1")  # steps 4-7 (without the update)
        configdb.disable_schema(conn, "oxdatabase_3")
    runtime(ox, "set server ox_secondary/ox3 state ready")  # step 9
    await wait_server(ox, OX_SECONDARY_BACKEND, "ox3", "UP")
    v3 = (await get(f"{node_url(ox, 3)}/version")).body
    assert (v3["version"], v3["server_name"], v3["server_id"]) == (NEW, NEW_SERVER, sid)

    for _ in range(6):  # every old node (round robin) redirects, the secondary serves
        a = await get(login(ox.ox_main_url, moved, 2))
        assert (a.status, a.h("x-ox-redirect")) == (302, "migration"), a
        assert a.h("x-served-by") in ("ox1", "ox2")
        location = a.h("location")
        assert location == login(ox.ox_secondary_url, moved, 2)
        b = await get(location)
        assert (b.status, b.h("x-served-by"), b.h("x-node")) == (200, "ox3", "ox3"), b
        assert b.body == {
            "context": moved,
            "user": 2,
            "schema": "oxdatabase_1",
            "server": NEW_SERVER,
            "node": "ox3",
            "version": NEW,
        }
        a = await get(login(ox.ox_main_url, stays))
        assert a.status == 200 and a.body["node"] in ("ox1", "ox2") and a.body["version"] == OLD
    # Q & A: a context still on the old server, asked on the secondary: CTX-0012, no redirect.
    a = await get(login(ox.ox_secondary_url, stays))
    assert (a.status, a.body["code"], a.h("location")) == (409, "CTX-0012", None)
    assert a.body["error"] == f"The context {stays} is located in server with id 2"
    for base in (ox.ox_main_url, ox.ox_secondary_url):
        a = await get(login(base, off))
        assert (a.status, a.h("x-ox-refused")) == (403, "disabled")
        assert (await get(login(base, 424242))).body["code"] == "CTX-0002"


# --------------------------------------------------------------------------- reset


async def test_lab_reset_puts_the_ox_part_back(ox: LabConfig) -> None:
    await upgrade_by_hand(ox, 2)
    assert (await set_redirect_and_reload(ox, 1, ox.ox_secondary_url)).exit_status == 0
    assert (await run(ox, 3, "./ctl stop")).exit_status == 0
    runtime(ox, "set server ox_secondary/ox2 state ready")
    runtime(ox, "set server ox/ox1 state maint")
    with db(ox) as conn:
        sid = configdb.register_server(conn, NEW_SERVER)
        configdb.change_server(conn, sid, "oxdatabase_1")
        configdb.disable_schema(conn, "oxdatabase_2")
    ox_nodes.set_runupdate_seconds(ox, 5)
    (ox.ox_node_dir(1) / "inject" / "some_fault").write_text("x")
    untouched_pid = pid(ox, 1)

    done = await manager.lab_reset(ox)

    assert {"restarted ox1 as installed", "restarted ox2 as installed", "started ox3"} <= set(done), done
    assert configdb.servers(ox) == [(2, "oxserver")]
    states = configdb.schema_states(ox)
    assert len(states) == ox.ox_schemata
    assert all(
        s.enabled and s.context_servers == (2,) and s.version == OLD and s.update_state == "none"
        for s in states.values()
    )
    for i in ox.ox_node_indexes:
        d = ox.ox_node_dir(i)
        assert (d / "installed" / "version").read_text() == f"{OLD}\n"
        assert REDIRECT_KEY not in (d / "etc" / "server.properties").read_text()
        assert "SERVER_NAME=oxserver\n" in (d / "etc" / "system.properties").read_text()
        assert "OX_RUNUPDATE_SECONDS=0.2\n" in (d / "bin" / tools.ENV_FILE_NAME).read_text()
        assert not any((d / "inject").iterdir())
        v = (await get(f"{node_url(ox, i)}/version")).body
        assert (v["version"], v["server_name"], v["server_id"], v["migration_redirect_url"]) == (
            OLD,
            "oxserver",
            2,
            None,
        )
    assert pid(ox, 1) != untouched_pid
    states_lb = haproxy.server_states(ox)
    assert all(states_lb[(OX_BACKEND, f"ox{i}")] == "UP" for i in ox.ox_node_indexes), states_lb
    assert all(states_lb[(OX_SECONDARY_BACKEND, f"ox{i}")] == "MAINT" for i in ox.ox_node_indexes), states_lb
    assert load_inventory(ox.ox_site_yaml).site == "lab-ox"
    # Nothing left to do: a second reset restarts nothing.
    pids = [pid(ox, i) for i in ox.ox_node_indexes]
    assert await manager.reset_ox(ox) == []
    assert [pid(ox, i) for i in ox.ox_node_indexes] == pids


async def test_reset_ox_recreates_a_dropped_config_db(ox: LabConfig) -> None:
    # tests/test_lab_ox_tools.py drops the config DB after its module: the nodes' /health
    # fails (HAProxy takes them out) until a reset creates it again.
    await asyncio.to_thread(configdb.drop, ox)
    a = await get(f"{node_url(ox, 1)}/health")
    assert (a.status, a.h("x-node")) == (503, "ox1")
    await wait_server(ox, OX_BACKEND, "ox1", "DOWN")
    done = await manager.reset_ox(ox)
    assert f"created the OX config DB ({ox.ox_schemata} schemata)" in done
    assert (await get(f"{node_url(ox, 1)}/health")).status == 200
    assert (await get(login(ox.ox_main_url, 1))).status == 200


# --------------------------------------------------------------------------- tools in the middleware


async def test_tools_run_in_the_middleware_and_fail_while_it_is_down(ox: LabConfig) -> None:
    """bin/<tool> is a thin client of the node's middleware (lab/ox/admin.py), like OX's tools
    of its RMI interface: same outputs and exit codes, standard input forwarded to
    upgradeschemata, a long runupdate not blocking other tools, no middleware -> exit 105."""
    d = ox.ox_node_dir(2)
    assert ox.ox_admin_port(2) == ox.port_base + 82 and ox.ox_admin_port(2) in ox.all_ports()
    assert port_open("127.0.0.1", ox.ox_admin_port(2))
    client = (d / "bin" / "listserver").read_text()
    assert "-m lab.ox.tools" not in client and f"PORT={ox.ox_admin_port(2)}\n" in client
    password = configdb.master_password_file(ox).read_text().strip()
    admin = "IFS= read -r ADMIN_PASSWORD && export ADMIN_PASSWORD && exec bin/{} -A oxadminmaster"
    node = load_inventory(ox.ox_site_yaml).nodes[1]

    async def tool(command: str, extra: str = "") -> CommandResult:
        return await ssh.run(node.ssh, admin.format(command), input=password + "\n" + extra, check=False)

    r = await tool("listserver --csv")
    assert (r.exit_status, r.stdout, r.stderr) == (0, 'id,name\n"2","oxserver"\n', "")
    # Arguments travel byte-exact (framed by their length in bytes): multibyte, newline.
    r = await tool("listserver --csv -s " + shlex.quote("oxs\u00e9rv\ner*"))
    assert (r.exit_status, r.stdout) == (0, "id,name\n")
    r = await tool("registerserver -n " + shlex.quote("n\u00e9w\nserver"))
    assert r.exit_status == 0 and r.stdout.endswith(" registered\n")
    assert configdb.servers(ox)[-1][1] == "n\u00e9w\nserver"
    r = await tool("registerserver")
    assert (r.exit_status, r.stderr) == (
        104,
        'server could not be registered: \nError: Option(s) "name" missing\n',
    )
    assert r.stdout.startswith("Usage: registerserver ")
    r = await run(ox, 2, "bin/listserver -A oxadminmaster -P wrong")
    assert r.exit_status == 101  # the server's message, then (lab-made) stack frames
    assert r.stderr.startswith(
        "servers could not be listed: \nServer response:\n Authentication failed\n\tat "
    )
    # The prompt's answer reaches upgradeschemata (the server exists: the WARNING, then abort).
    r = await tool("upgradeschemata -n oxserver", extra="abort\n")
    assert r.exit_status == 0 and r.stdout.endswith("OK, aborting upgrade\n") and r.stderr == ""
    # The client's OX_* environment counts (over the node's env file), as in the direct mode.
    r = await run(ox, 2, f"OX_UPDATE_FAULTS=oxdatabase_5 {runupdate(ox)} -n oxdatabase_5")
    assert r.exit_status == 0 and r.stdout.startswith("The following update task(s) failed:\n"), r

    # A runupdate at work does not hold up the node's other tools (each runs in its own thread).
    slow = asyncio.ensure_future(run(ox, 2, f"OX_RUNUPDATE_SECONDS=3 {runupdate(ox)} -n oxdatabase_6"))
    deadline = time.monotonic() + 15
    while configdb.schema_states(ox)["oxdatabase_6"].update_state != "running":
        assert time.monotonic() < deadline and not slow.done(), "runupdate did not start"
        await asyncio.sleep(0.05)
    assert (await tool("listserver --csv")).exit_status == 0
    assert (await get(f"{node_url(ox, 2)}/health")).status == 200
    assert configdb.schema_states(ox)["oxdatabase_6"].update_state == "running"  # still at work
    assert (await slow).exit_status == 0
    st = configdb.schema_states(ox)["oxdatabase_6"]
    assert st.update_state == "done" and st.update_s is not None and st.update_s >= 3

    # Middleware down: OX's "Connection refused to host" and SYSEXIT_COMMUNICATION_ERROR.
    assert (await run(ox, 2, "./ctl stop")).exit_status == 0
    assert not port_open("127.0.0.1", ox.ox_admin_port(2))
    r = await tool("listserver")
    assert r.exit_status == 105 and r.stdout == ""
    assert r.stderr.startswith("Error: Connection refused to host: localhost") and "not answer" in r.stderr
    assert (await run(ox, 2, f"{runupdate(ox)} -n oxdatabase_7")).exit_status == 105
    assert configdb.schema_states(ox)["oxdatabase_7"].update_state == "none"
    assert (await run(ox, 2, "./ctl start")).exit_status == 0
    assert (await tool("listserver")).exit_status == 0
