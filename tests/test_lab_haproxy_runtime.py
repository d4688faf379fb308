"""The lab's HAProxy at run time (lab/haproxy.py), against the session lab's real HAProxy and
app nodes: the runtime balancers the lab's inventory and haproxy.cfg declare, the health-check
file drain its configuration makes (seed 003 step 12, `http-check disable-on-404`), the lab's
reset (servers attached at run time detached, maintenance page off, preview keys deleted), what
a reload keeps, and the lab's probe (lab/probe.py) counting the maintenance page apart from
failures. The product's HAProxy adapter against the same HAProxy (servers attached and
detached, the maintenance page, the preview check) is tested in tests/test_adapter_haproxy.py.

Every test leaves the lab as it found it (the autouse fixture `restore` of
tests/haproxy_support.py puts node1's health file back and the runtime state of HAProxy as
after start: no server attached at run time, maintenance page off, no preview key, every node
ready and UP). Servers are attached pointing at a *spare* node (index cfg.nodes + 1: its own
folder and port, in no backend of haproxy.cfg).
"""

# ruff: noqa: F811  (the fixtures imported from tests.haproxy_support are named as test parameters)
from __future__ import annotations

import asyncio
import dataclasses
import secrets
import shutil
import time
from pathlib import Path

import aiohttp

from activities import haproxy as lb_api
from inventory.model import Inventory
from lab import haproxy
from lab.config import BACKEND, TEST_BACKEND, LabConfig
from lab.probe import run_probe
from tests.haproxy_support import SLOW_MS, inv, restore, spare  # noqa: F401  (fixtures)
from tests.haproxy_support import balancer as _lb
from tests.haproxy_support import get as _get
from tests.haproxy_support import haproxy_pid as _pid
from tests.haproxy_support import wait_scur as _wait_scur

# --------------------------------------------------------------------------- helpers


async def _wait_status(lab: LabConfig, backend: str, server: str, want: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (status := haproxy.server_states(lab).get((backend, server))) != want:
        assert time.monotonic() < deadline, f"{backend}/{server} is {status!r}, not {want!r}"
        await asyncio.sleep(0.1)


# --------------------------------------------------------------------------- the lab's declarations


async def test_lab_declares_the_runtime_balancers(lab: LabConfig, inv: Inventory) -> None:
    main, test = _lb(inv, "main"), _lb(inv, "test")
    assert main.frontend_url == lab.main_url and test.frontend_url == lab.test_url
    assert (
        main.add_server_options
        == test.add_server_options
        == "check inter 500ms fastinter 50ms downinter 50ms fall 2 rise 2"
    )
    assert main.maintenance is not None and main.maintenance.key == "main"
    assert main.maintenance.map == str(haproxy.maintenance_map(lab))  # the map's name in HAProxy
    assert test.backend == TEST_BACKEND and test.members == {} and test.maintenance is None
    assert inv.application.health_file == "health_check.html"
    assert all((lab.node_dir(i) / "health_check.html").is_file() for i in lab.node_indexes)
    text = haproxy.config_path(lab).read_text()
    assert text.count("http-check disable-on-404") == 3  # app, app_secondary, app_test
    # The test frontend starts without servers: HAProxy's own 503, no Retry-After.
    assert await lb_api.list_servers(test) == ()
    status, headers, _ = await _get(f"{lab.test_url}/version")
    assert status == 503 and "Retry-After" not in headers
    assert lb_api.server_address(f"http://127.0.0.1:{lab.app_port(1)}/") == f"127.0.0.1:{lab.app_port(1)}"
    assert lb_api.server_address("https://[::1]/x") == "[::1]:443"


# --------------------------------------------------------------------------- the lab's reset


async def test_reset_servers_detaches_runtime_servers(lab: LabConfig, inv: Inventory, spare: int) -> None:
    """A server attached to the production pool takes traffic there; reset_servers (lab
    reset) detaches whatever was attached at run time and switches the page off."""
    main, name = _lb(inv, "main"), lab.node_name(spare)
    member = dataclasses.replace(main, members={**main.members, name: name})
    await lb_api.add_server(main, name, f"127.0.0.1:{lab.app_port(spare)}")
    await lb_api.wait_up(member, name, 15)
    served = set()
    for _ in range(4 * (lab.nodes + 1)):
        status, headers, _ = await _get(f"{lab.main_url}/version")
        assert status == 200
        served.add(headers["X-Served-By"])
    assert name in served
    await lb_api.set_maintenance(main, True)
    assert haproxy.runtime_servers(lab) == [(BACKEND, name)]
    await asyncio.to_thread(haproxy.reset_servers, lab)
    assert haproxy.runtime_servers(lab) == [] and not haproxy.maintenance_on(lab)
    assert (BACKEND, name) not in haproxy.server_states(lab)


# --------------------------------------------------------------------------- health-file drain


async def test_health_file_drain_keeps_the_open_session(
    lab: LabConfig, inv: Inventory, tmp_path: Path
) -> None:
    main, node1 = _lb(inv, "main"), lab.node_name(1)
    others = [n.name for n in inv.nodes if n.name != node1]
    pid = _pid(lab)
    # Route one long request to node1: the other members are drained while it starts.
    for other in others:
        await lb_api.set_member_state(main, other, "drain")
    async with aiohttp.ClientSession() as session:
        slow = asyncio.ensure_future(session.get(f"{lab.main_url}/slow?ms={SLOW_MS}"))
        try:
            await _wait_scur(main, node1)
        finally:
            for other in others:
                await lb_api.set_member_state(main, other, "ready")
        health = lab.node_dir(1) / "health_check.html"
        shutil.move(health, tmp_path / health.name)
        await _wait_status(lab, BACKEND, node1, "NOLB")
        st = await lb_api.member_state(main, node1)
        assert st.admin == "ready" and not st.is_up and st.scur == 1
        # No new request lands on node1 while its session runs on.
        served = [(await _get(f"{lab.main_url}/version"))[1]["X-Served-By"] for _ in range(3 * lab.nodes)]
        assert node1 not in served and set(served) == set(others)
        resp = await slow
        assert resp.status == 200 and resp.headers["X-Node"] == node1
        resp.release()
    assert await lb_api.wait_drained(main, node1, 5) >= 0
    shutil.move(tmp_path / health.name, health)
    await _wait_status(lab, BACKEND, node1, "UP")
    assert (await lb_api.member_state(main, node1)).is_up
    assert _pid(lab) == pid


# --------------------------------------------------------------------------- around the maintenance page


async def test_reset_servers_deletes_preview_keys(lab: LabConfig, inv: Inventory) -> None:
    """The lab reset (and so ensure_v1's clean state) has no key left that passes the page."""
    main = _lb(inv, "main")
    key = f"{haproxy.PREVIEW_KEY_PREFIX}{secrets.token_hex(16)}"
    await lb_api.set_maintenance(main, True)
    haproxy.runtime_command(lab, f"add map {haproxy.maintenance_map(lab)} {key} preview")
    assert haproxy.preview_keys(lab) == [key] and haproxy.maintenance_on(lab)
    await asyncio.to_thread(haproxy.reset_servers, lab)
    assert haproxy.preview_keys(lab) == [] and not haproxy.maintenance_on(lab)


async def test_probe_counts_the_maintenance_page_apart(lab: LabConfig, inv: Inventory) -> None:
    """At 100 req/s across the switch (off, on, off): nothing failed, the page's answers are
    `maintenance`, the others succeeded."""
    main = _lb(inv, "main")
    stop = asyncio.Event()
    probe = asyncio.ensure_future(run_probe(lab.main_url, 100.0, stop, None, slow_every=0))
    await asyncio.sleep(0.7)
    await lb_api.set_maintenance(main, True)
    await asyncio.sleep(1.5)
    await lb_api.set_maintenance(main, False)
    await asyncio.sleep(0.7)
    stop.set()
    s = await probe
    assert s.failed == 0, s
    assert s.maintenance >= 100 and s.by_status["503"] == s.maintenance
    assert set(s.by_status) <= {"200", "201", "503"} and sum(s.by_status.values()) == s.total
    assert s.total - s.maintenance >= 100
    assert s.started < s.maintenance_first < s.maintenance_last < s.ended
    assert f"failed=0 refused={s.refused} maintenance={s.maintenance} " in s.line()


async def test_probe_counts_other_503s_as_failed(lab: LabConfig) -> None:
    """HAProxy's own 503 (no server in `app_test`) carries no Retry-After: a failure."""
    stop = asyncio.Event()
    probe = asyncio.ensure_future(run_probe(lab.test_url, 50.0, stop, None, slow_every=0))
    await asyncio.sleep(0.5)
    stop.set()
    s = await probe
    assert s.total > 0 and s.failed == s.total == s.by_status["503"] and s.maintenance == 0


async def test_reload_keeps_the_switch_and_drops_runtime_servers(
    lab: LabConfig, inv: Inventory, spare: int
) -> None:
    """What survives a reload (documented in lab/haproxy.py): the maintenance switch yes
    (carried into the map file), a server attached at run time no."""
    main, test, name = _lb(inv, "main"), _lb(inv, "test"), lab.node_name(spare)
    await lb_api.add_server(test, name, f"127.0.0.1:{lab.app_port(spare)}")
    await lb_api.set_maintenance(main, True)
    pid = _pid(lab)
    await asyncio.to_thread(haproxy.reload, lab)
    assert _pid(lab) != pid
    assert await lb_api.maintenance_state(main) is True
    assert (await _get(f"{lab.main_url}/version"))[0] == 503
    assert await lb_api.list_servers(test) == ()
    await lb_api.set_maintenance(main, False)
    await asyncio.to_thread(haproxy.wait_all_up, lab)
