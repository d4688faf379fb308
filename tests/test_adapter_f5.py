"""The F5 adapter (activities/f5.py) against the lab's BIG-IP stand-in (lab/f5), which drives
the lab's real HAProxy: the member verbs the procedures use (through the same `lb_*`
functions as HAProxy), the drain wait on real connections, a token that disappears, BIG-IP
restarting its daemons, an unknown member, TLS verified against the inventory's CA."""

from __future__ import annotations

import asyncio
import dataclasses

import aiohttp
import pytest
from temporalio.exceptions import ApplicationError

from activities import f5
from activities import haproxy as lb_adapter
from inventory.model import LoadBalancer, SecretRef
from lab import haproxy
from lab.config import BACKEND, LabConfig
from lab.f5 import lab as lab_f5
from tests.haproxy_support import restore  # noqa: F401  (autouse fixture)


def big_ip(lab: LabConfig) -> LoadBalancer:
    return LoadBalancer(
        name="f5",
        kind="f5",
        members={lab.node_name(i): lab_f5.member_name(lab, i) for i in lab.node_indexes},
        url=lab_f5.base_url(lab),
        pool=f"/Common/{lab_f5.POOL}",
        user="zerodown",
        credential=SecretRef(file=str(lab_f5.password_file(lab))),
        ca_bundle=str(lab_f5.ca_bundle(lab)),
        drain_timeout_s=5,
    )


def admin_of(lab: LabConfig, i: int) -> str:
    return haproxy.server_states(lab)[(BACKEND, lab.node_name(i))]


async def test_drain_force_offline_and_enable_through_the_lb_verbs(lab: LabConfig) -> None:
    lb = big_ip(lab)
    st = await lb_adapter.set_member_state(lb, "node1", "drain")
    assert st.admin == "drain" and admin_of(lab, 1).startswith("DRAIN"), admin_of(lab, 1)
    st = await lb_adapter.set_member_state(lb, "node1", "maint")
    assert st.admin == "maint" and st.status == "MAINT" and admin_of(lab, 1).startswith("MAINT")
    st = await lb_adapter.set_member_state(lb, "node1", "ready")
    assert st.admin == "ready"
    up = await lb_adapter.wait_up(lb, "node1", 20)
    assert up.is_up and up.server == lab_f5.member_name(lab, 1)
    assert (await lb_adapter.member_state(lb, "node2")).admin == "ready"


async def test_the_drain_wait_follows_real_connections(lab: LabConfig) -> None:
    lb = big_ip(lab)
    for i in lab.node_indexes:
        if i != 1:
            await lb_adapter.set_member_state(lb, lab.node_name(i), "drain")
    async with aiohttp.ClientSession() as plain:
        slow = asyncio.ensure_future(plain.get(f"{lab.main_url}/slow?ms=2500"))
        for _ in range(100):
            if (await f5.member_state(lb, "node1")).scur >= 1:
                break
            await asyncio.sleep(0.05)
        await lb_adapter.set_member_state(lb, "node1", "drain")
        # Still open when the drain starts, then gone: the wait ends once it is.
        waited = await lb_adapter.wait_drained(lb, "node1", 10)
        resp = await slow
        assert resp.status == 200 and resp.headers["X-Served-By"] == "node1"
        resp.release()
    assert waited >= 1
    short = dataclasses.replace(lb, drain_timeout_s=1)
    async with aiohttp.ClientSession() as plain:
        await lb_adapter.set_member_state(lb, "node1", "ready")
        for i in lab.node_indexes:
            if i != 1:
                await lb_adapter.set_member_state(lb, lab.node_name(i), "drain")
        slow = asyncio.ensure_future(plain.get(f"{lab.main_url}/slow?ms=3000"))
        await asyncio.sleep(0.5)
        await lb_adapter.set_member_state(lb, "node1", "drain")
        with pytest.raises(ApplicationError) as info:
            await lb_adapter.wait_drained(short, "node1", None)
        assert info.value.type == "DrainTimeout" and "still has 1 connection(s)" in info.value.message
        (await slow).release()


async def test_a_lost_token_a_restarting_daemon_and_an_unknown_member(lab: LabConfig) -> None:
    lb = big_ip(lab)
    async with f5.session(lb) as s:
        path = f5.member_path(lb, "node1")
        await f5.read_member(s, path)
        lost = s.token
        await s._send("DELETE", f"/mgmt/shared/authz/tokens/{lost}", None)  # as an admin might
        assert (await f5.read_member(s, path)).session  # a 401, a new login, the answer
        assert s.token != lost
        lab_f5.simulate_restart(lab, 2, "mcpd")  # 500 twice: retried
        assert (await f5.read_member(s, path)).state
    with pytest.raises(ApplicationError) as info:
        await lb_adapter.member_state(dataclasses.replace(lb, members={"node9": "node9:1"}), "node9")
    assert info.value.type == "LbMemberNotFound" and "01020036:3" in info.value.message
    # TLS is verified: without the lab's CA the certificate is not trusted.
    with pytest.raises(ApplicationError) as info:
        await lb_adapter.member_state(dataclasses.replace(lb, ca_bundle=None), "node1")
    assert info.value.type == "LbRuntimeApiError" and "certificate" in info.value.message.lower()
