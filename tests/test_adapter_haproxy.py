"""The product's HAProxy adapter (activities/haproxy.py), against the session lab's real
HAProxy and app nodes, without reloads: servers attached and detached at run time (seed 003
steps 11/14, seed 004 steps 10/16/24/25) on the temporary test frontend `test1` (seed 004
steps 7 to 11), a detach refused while a session is open unless forced; the maintenance page
switched (seed 004 step 18); the test through it with a one-time preview key (step 30) and
the check's failures. The lab's own HAProxy (its declarations, drain, reset, reload, probe) is
tested in tests/test_lab_haproxy_runtime.py.

Every test leaves the lab as it found it (the autouse fixture `restore` of
tests/haproxy_support.py puts node1's health file back and the runtime state of HAProxy as
after start: no server attached at run time, maintenance page off, no preview key, every node
ready and UP). Servers are attached pointing at a *spare* node (index cfg.nodes + 1: its own
folder and port, in no backend of haproxy.cfg). Activities run inside temporalio's
ActivityEnvironment (no worker).
"""

# ruff: noqa: F811  (the fixtures imported from tests.haproxy_support are named as test parameters)
from __future__ import annotations

import asyncio
import dataclasses
import re
import secrets
import time

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
from inventory.model import Inventory, LoadBalancer
from lab import haproxy
from lab.config import TEST_BACKEND, LabConfig
from tests.haproxy_support import SLOW_MS, inv, restore, spare  # noqa: F401  (fixtures)
from tests.haproxy_support import balancer as _lb
from tests.haproxy_support import get as _get
from tests.haproxy_support import haproxy_pid as _pid
from tests.haproxy_support import wait_scur as _wait_scur

# --------------------------------------------------------------------------- helpers


def _env() -> ActivityEnvironment:
    return ActivityEnvironment()


# --------------------------------------------------------------------------- add / del server


async def test_add_server_serves_del_refuses_with_a_session_then_detaches(
    lab: LabConfig, inv: Inventory, spare: int
) -> None:
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
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s,
        s.get(f"http://127.0.0.1:{lab.app_port(i)}/version") as r,
    ):
        assert r.status == 200
        data: dict[str, object] = await r.json()
        return data


def _preview(
    inv: Inventory,
    version: str,
    nodes: tuple[str, ...],
    db_schema: int | None = None,
    lb: LoadBalancer | None = None,
) -> PreviewCheckRequest:
    return PreviewCheckRequest(
        lb=lb or _lb(inv, "main"),
        check=inv.application.version,
        expect_version=version,
        expect_nodes=nodes,
        expect_db_schema=db_schema,
    )


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
    res = await env.run(
        lb_api.lb_preview_check,
        dataclasses.replace(_preview(inv, str(v1["version"]), names), requests=len(names)),
    )
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
    for lb, words in (
        (_lb(inv, "test"), "no maintenance page"),
        (dataclasses.replace(main, maintenance=dataclasses.replace(sw, preview_header="")), "preview_header"),
        (dataclasses.replace(main, frontend_url=None), "no frontend_url"),
    ):
        with pytest.raises(ApplicationError) as e:
            await env.run(lb_api.lb_preview_check, _preview(inv, version, names, lb=lb))
        assert e.value.type == "InvalidRequest" and e.value.non_retryable and words in e.value.message
