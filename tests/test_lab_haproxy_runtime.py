"""HAProxy without reloads, against the session lab's real HAProxy and app nodes: servers
attached and detached at run time (seed 003 steps 11/14, seed 004 steps 10/16/24/25), the
health-check file drain (seed 003 step 12, `http-check disable-on-404`), the temporary
test frontend `test1` (seed 004 steps 7 to 11), the maintenance page (seed 004 step 18) and
the test through it with a one-time preview key (step 30).

Every test leaves the lab as it found it (the autouse fixture puts node1's health file
back and the runtime state of HAProxy as after start: no server attached at run time,
maintenance page off, no preview key, every node ready and UP). Servers are attached
pointing at a *spare* node (index cfg.nodes + 1: its own folder and port, in no backend of
haproxy.cfg).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import secrets
import shutil
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities import haproxy as lb_api
from activities.haproxy import (
    AddServerRequest,
    DelServerRequest,
    MaintenanceRequest,
    PreviewCheckRequest,
)
from inventory.load import load_inventory
from inventory.model import Inventory, LoadBalancer
from lab import haproxy, nodes
from lab.config import BACKEND, TEST_BACKEND, LabConfig
from lab.probe import run_probe
from lab.procs import read_pid

SLOW_MS = 3000


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def inv(lab: LabConfig) -> Inventory:
    return load_inventory(lab.site_yaml)


def _lb(inv: Inventory, name: str) -> LoadBalancer:
    return next(lb for lb in inv.load_balancers if lb.name == name)


@pytest.fixture(scope="module")
def spare(lab: LabConfig) -> Iterator[int]:
    """A throwaway node (package 1) running on its own port, behind no configured backend."""
    i = lab.nodes + 1
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", lab.app_port(i))) == 0:
            pytest.fail(f"port {lab.app_port(i)} of the spare node is already in use")
    nodes.install_node(lab, i, lab.package(1))
    try:
        nodes.start_node(lab, i)
        yield i
    finally:
        nodes.stop_node(lab, i)
        shutil.rmtree(lab.node_dir(i), ignore_errors=True)


@pytest.fixture(autouse=True)
async def restore(lab: LabConfig) -> AsyncIterator[None]:
    yield
    nodes.write_health_file(lab.node_dir(1), only_if_missing=True)
    await asyncio.to_thread(haproxy.reset_servers, lab)
    await asyncio.to_thread(haproxy.wait_all_up, lab)


def _env() -> ActivityEnvironment:
    return ActivityEnvironment()


def _pid(lab: LabConfig) -> int | None:
    return read_pid(haproxy.pid_file(lab))


async def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, CIMultiDict[str], str]:
    # A fresh connection per request: keep-alive would pin it to one server. Headers stay
    # case-insensitive (HAProxy sends the ones it sets lower-cased).
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s, \
            s.get(url, headers={"Connection": "close", **(headers or {})}) as r:
        return r.status, r.headers.copy(), await r.text()


async def _wait_scur(lb: LoadBalancer, node: str, at_least: int = 1, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (await lb_api.member_state(lb, node)).scur < at_least:
        assert time.monotonic() < deadline, f"{node}: no session opened within {timeout}s"
        await asyncio.sleep(0.05)


async def _wait_status(lab: LabConfig, backend: str, server: str, want: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (status := haproxy.server_states(lab).get((backend, server))) != want:
        assert time.monotonic() < deadline, f"{backend}/{server} is {status!r}, not {want!r}"
        await asyncio.sleep(0.1)


# --------------------------------------------------------------------------- the lab's declarations


async def test_lab_declares_the_runtime_balancers(lab: LabConfig, inv: Inventory) -> None:
    main, test = _lb(inv, "main"), _lb(inv, "test")
    assert main.frontend_url == lab.main_url and test.frontend_url == lab.test_url
    assert main.add_server_options == test.add_server_options == \
        "check inter 500ms fastinter 50ms downinter 50ms fall 2 rise 2"
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


# --------------------------------------------------------------------------- add / del server


async def test_add_server_serves_del_refuses_with_a_session_then_detaches(
        lab: LabConfig, inv: Inventory, spare: int) -> None:
    test, name = _lb(inv, "test"), lab.node_name(spare)
    address = lb_api.server_address(f"http://127.0.0.1:{lab.app_port(spare)}")
    pid, env = _pid(lab), _env()

    st = await env.run(lb_api.lb_add_server, AddServerRequest(test, name, address))
    assert (st.backend, st.server, st.admin) == (TEST_BACKEND, name, "ready")
    # Not in rotation before its checks passed (HAProxy alone would put it UP unchecked).
    assert st.status.startswith("DOWN") and not st.is_up
    assert (await _get(f"{lab.test_url}/version"))[0] == 503
    member = dataclasses.replace(test, members={name: name})
    up = await lb_api.wait_up(member, name, 15)
    assert up.is_up and up.status == "UP" and up.check_status.startswith("L7OK")
    # Idempotent: the same server again is only enabled; another address is a conflict.
    again = await env.run(lb_api.lb_add_server, AddServerRequest(test, name, address))
    assert again.server == name and again.is_up
    with pytest.raises(ApplicationError) as e:
        await env.run(lb_api.lb_add_server, AddServerRequest(test, name, f"127.0.0.1:{lab.app_port(1)}"))
    assert e.value.type == "LbMemberConflict" and e.value.non_retryable
    with pytest.raises(ApplicationError) as e:
        await env.run(lb_api.lb_add_server, AddServerRequest(test, name, f"localhost:{lab.app_port(spare)}"))
    assert e.value.type == "InvalidRequest" and "does not resolve host names" in e.value.message

    status, headers, _ = await _get(f"{lab.test_url}/version")
    assert status == 200 and headers["X-Served-By"] == headers["X-Node"] == name
    rows = await lb_api.list_servers(test)
    assert [(r.svname, r.status, r.check_status) for r in rows] == [(name, "UP", "L7OK")]

    async with aiohttp.ClientSession() as session:
        slow = asyncio.ensure_future(session.get(f"{lab.test_url}/slow?ms={SLOW_MS}"))
        await _wait_scur(member, name)
        with pytest.raises(ApplicationError) as e:
            await env.run(lb_api.lb_del_server, DelServerRequest(test, name))
        assert e.value.type == "LbMemberBusy" and e.value.non_retryable
        assert "1 open session(s)" in e.value.message
        # Refused means untouched: still ready and serving.
        assert (await lb_api.member_state(member, name)).is_up
        resp = await slow
        assert resp.status == 200 and resp.headers["X-Node"] == name
        resp.release()
    assert (await lb_api.member_state(member, name)).scur == 0
    await env.run(lb_api.lb_del_server, DelServerRequest(test, name))
    assert await lb_api.list_servers(test) == ()
    assert (await _get(f"{lab.test_url}/version"))[0] == 503
    await env.run(lb_api.lb_del_server, DelServerRequest(test, name))  # already detached: done
    assert _pid(lab) == pid  # no reload


async def test_del_server_with_force_cuts_the_sessions(lab: LabConfig, inv: Inventory, spare: int) -> None:
    test, name = _lb(inv, "test"), lab.node_name(spare)
    member = dataclasses.replace(test, members={name: name})
    await lb_api.add_server(test, name, f"127.0.0.1:{lab.app_port(spare)}")
    await lb_api.wait_up(member, name, 15)
    async with aiohttp.ClientSession() as session:
        t0 = time.monotonic()
        slow = asyncio.ensure_future(session.get(f"{lab.test_url}/slow?ms={SLOW_MS}"))
        await _wait_scur(member, name)
        await _env().run(lb_api.lb_del_server, DelServerRequest(test, name, force=True))
        assert await lb_api.list_servers(test) == ()
        try:
            resp = await slow
            cut = resp.status != 200
            resp.release()
        except aiohttp.ClientError:
            cut = True
        assert cut and time.monotonic() - t0 < SLOW_MS / 1000


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


async def test_health_file_drain_keeps_the_open_session(lab: LabConfig, inv: Inventory,
                                                        tmp_path: Path) -> None:
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


# --------------------------------------------------------------------------- maintenance page


async def test_maintenance_page_switched_without_reload(lab: LabConfig, inv: Inventory) -> None:
    main, env = _lb(inv, "main"), _env()
    pid = _pid(lab)
    assert await lb_api.maintenance_state(main) is False
    assert await env.run(lb_api.lb_set_maintenance, MaintenanceRequest(main, True)) is True
    assert await env.run(lb_api.lb_set_maintenance, MaintenanceRequest(main, True)) is True  # a set
    for path in ("/items", "/version", "/"):
        status, headers, body = await _get(lab.main_url + path)
        assert status == 503 and headers["Retry-After"] == str(haproxy.MAINTENANCE_RETRY_AFTER_S)
        assert headers["Content-Type"].startswith("text/html") and "Down for maintenance" in body
        assert "X-Served-By" not in headers and "X-Node" not in headers  # HAProxy answered
    async with aiohttp.ClientSession() as s, s.post(f"{lab.main_url}/items", json={"body": "x"}) as r:
        assert r.status == 503 and "Retry-After" in r.headers
    # Only the main frontend: the secondary still reaches its (maintenance) servers.
    assert "Retry-After" not in (await _get(f"http://127.0.0.1:{lab.secondary_port}/health"))[1]
    assert await lb_api.maintenance_state(main) is True
    assert _pid(lab) == pid
    assert await env.run(lb_api.lb_set_maintenance, MaintenanceRequest(main, False)) is False
    status, headers, _ = await _get(f"{lab.main_url}/version")
    assert status == 200 and "Retry-After" not in headers
    assert _pid(lab) == pid

    with pytest.raises(ApplicationError) as e:
        await env.run(lb_api.lb_set_maintenance, MaintenanceRequest(_lb(inv, "test"), True))
    assert e.value.type == "InvalidRequest" and "no maintenance page" in e.value.message



def _is_page(status: int, headers: CIMultiDict[str]) -> bool:
    return status == 503 and headers.get("Retry-After") == str(haproxy.MAINTENANCE_RETRY_AFTER_S)


async def _node_version(lab: LabConfig, i: int) -> dict[str, object]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s, \
            s.get(f"http://127.0.0.1:{lab.app_port(i)}/version") as r:
        assert r.status == 200
        data: dict[str, object] = await r.json()
        return data


def _preview(inv: Inventory, version: str, nodes: tuple[str, ...], db_schema: int | None = None,
             lb: LoadBalancer | None = None) -> PreviewCheckRequest:
    return PreviewCheckRequest(lb=lb or _lb(inv, "main"), check=inv.application.version,
                               expect_version=version, expect_nodes=nodes, expect_db_schema=db_schema)


async def test_preview_check_passes_the_page_with_a_one_time_key(lab: LabConfig, inv: Inventory) -> None:
    """Seed 004 step 30: with the page on for everyone, lb_preview_check reaches every node
    through `main` with a key it adds and deletes; a leftover key of an interrupted check is
    deleted first; a made-up key, or the switch's own key, gets the page."""
    main, names = _lb(inv, "main"), tuple(n.name for n in inv.nodes)
    assert main.maintenance is not None and main.maintenance.preview_header == haproxy.PREVIEW_HEADER
    v1 = await _node_version(lab, 1)
    # The lab app reports its inventory name as "node" (provisioned clones too:
    # tests/test_lab_provision.py), so expect_nodes are inventory names.
    assert v1["node"] == lab.node_name(1)
    pid = _pid(lab)
    await lb_api.set_maintenance(main, True)
    assert _is_page(*(await _get(f"{lab.main_url}/version"))[:2])
    # A key left by an interrupted attempt lets its holder past the page until deleted.
    left = f"{haproxy.PREVIEW_KEY_PREFIX}{secrets.token_hex(16)}"
    answer = haproxy.runtime_command(lab, f"add map {haproxy.maintenance_map(lab)} {left} preview")
    assert answer.strip() == ""
    status, headers, _ = await _get(f"{lab.main_url}/version", {haproxy.PREVIEW_HEADER: left})
    assert status == 200 and headers["X-Node"] in names

    beats: list[object] = []
    env = _env()
    env.on_heartbeat = lambda *details: beats.append(details)
    req = _preview(inv, str(v1["version"]), names, int(str(v1["db_schema"])))
    res = await env.run(lb_api.lb_preview_check, req)
    assert res.page_on is True and res.url == f"{lab.main_url}/version"
    # Sequential requests on fresh connections, round robin: 4 each.
    assert res.requests == 4 * len(names) and res.nodes == tuple((n, 4) for n in sorted(names))
    assert beats and not any(haproxy.PREVIEW_KEY_PREFIX in repr(b) for b in beats)
    assert haproxy.preview_keys(lab) == []  # its own key and the leftover
    assert "preview" not in haproxy.runtime_command(lab, f"show map {haproxy.maintenance_map(lab)}")
    for value in (left, f"{haproxy.PREVIEW_KEY_PREFIX}{secrets.token_hex(16)}", haproxy.MAINTENANCE_KEY, ""):
        assert _is_page(*(await _get(f"{lab.main_url}/version", {haproxy.PREVIEW_HEADER: value}))[:2]), value
    assert await lb_api.maintenance_state(main) is True
    # With the page off the same check passes (and says the page was off).
    await lb_api.set_maintenance(main, False)
    res = await env.run(lb_api.lb_preview_check, dataclasses.replace(
        _preview(inv, str(v1["version"]), names), requests=len(names)))
    assert res.page_on is False and res.requests == len(names) and sum(c for _, c in res.nodes) == len(names)
    assert haproxy.preview_keys(lab) == [] and _pid(lab) == pid  # no reload


async def test_preview_check_fails_on_a_wrong_answer_or_node_set(lab: LabConfig, inv: Inventory) -> None:
    main, names = _lb(inv, "main"), tuple(n.name for n in inv.nodes)
    v1 = await _node_version(lab, 1)
    version, env, pid = str(v1["version"]), _env(), _pid(lab)
    await lb_api.set_maintenance(main, True)

    async def failure(req: PreviewCheckRequest) -> ApplicationError:
        with pytest.raises(ApplicationError) as e:
            await env.run(lb_api.lb_preview_check, req)
        # The key is gone after a failure too, and never shown.
        assert haproxy.preview_keys(lab) == []
        assert not re.search(rf"{haproxy.PREVIEW_KEY_PREFIX}[0-9a-f]", e.value.message)
        return e.value

    err = await failure(_preview(inv, "9.9.9", names))
    assert err.type == "LbPreviewCheckFailed" and err.non_retryable
    assert f"version {version!r}, expected '9.9.9'" in err.message
    assert "(answer 1)" in err.message
    assert any(f"from node {n!r}" in err.message for n in names)
    err = await failure(_preview(inv, version, names, db_schema=int(str(v1["db_schema"])) + 1))
    assert err.type == "LbPreviewCheckFailed" and "db_schema" in err.message
    # An expected node that is not in the backend never answers.
    err = await failure(_preview(inv, version, (*names, "ghost")))
    assert err.type == "LbPreviewCheckFailed" and err.non_retryable
    # It is given 4 answers per expected node, then 20 more per node while one is missing.
    assert f"ghost never answered in {24 * (len(names) + 1)} requests" in err.message
    assert all(f"{n} x" in err.message for n in names)
    # A node answering that should not be behind the balancer (an old server still attached).
    err = await failure(_preview(inv, version, names[1:]))
    assert err.type == "LbPreviewCheckFailed" and f"node {names[0]!r} answered" in err.message
    assert await lb_api.maintenance_state(main) is True and _pid(lab) == pid

    # What the balancer lacks is said before anything is sent.
    sw = main.maintenance
    assert sw is not None
    for lb, words in ((_lb(inv, "test"), "no maintenance page"),
                      (dataclasses.replace(main, maintenance=dataclasses.replace(sw, preview_header="")),
                       "preview_header"),
                      (dataclasses.replace(main, frontend_url=None), "no frontend_url")):
        with pytest.raises(ApplicationError) as e:
            await env.run(lb_api.lb_preview_check, _preview(inv, version, names, lb=lb))
        assert e.value.type == "InvalidRequest" and e.value.non_retryable and words in e.value.message


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


async def test_reload_keeps_the_switch_and_drops_runtime_servers(lab: LabConfig, inv: Inventory,
                                                                 spare: int) -> None:
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
