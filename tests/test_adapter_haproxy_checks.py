"""What the HAProxy adapter checks instead of trusting an empty answer (issue 17.3), against a
real HAProxy of its own (a scratch process per test, configured for the case; the lab's
HAProxy stays as the site has it):

* a `set server ... state` is read back: a server that tracks one in maintenance stays in
  maintenance whatever it is told, and HAProxy answers nothing all the same;
* a server `disabled` in the configuration and made ready at run time reads ready (its
  CMAINT flag stays, but is not maintenance: SRV_ADMF_MAINT in HAProxy's server-t.h);
* preflight refuses a runtime API that is not at level admin;
* the maintenance switch writes the values the inventory declares, or deletes the entry.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities import haproxy as lb_api
from activities.haproxy import GuardRequest, LbRunState, MaintenanceRequest, MemberRequest, SetStateRequest
from inventory.model import LoadBalancer, MaintenanceSwitch


@dataclass
class ScratchHaproxy:
    admin: str  # unix:<socket> at level admin
    operator: str  # unix:<socket> at level operator
    map_file: Path
    config: Path
    process: subprocess.Popen[bytes]

    def reload(self) -> None:
        """What an operator's `systemctl reload` does: a new process takes over (-sf), with
        the configuration's states; the runtime changes die with the old one."""
        old = self.process
        self.process = subprocess.Popen(["haproxy", "-db", "-f", str(self.config), "-sf", str(old.pid)])
        old.wait(timeout=10)
        wait_for(lambda: self.process.poll() is None and Path(self.admin[5:]).exists())


def wait_for(ready: Callable[[], bool]) -> None:
    for _ in range(100):
        if ready():
            return
        time.sleep(0.05)
    raise AssertionError("HAProxy did not come up")


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[ScratchHaproxy]:
    map_file = tmp_path / "maintenance.map"
    map_file.write_text("")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        f"""global
    stats socket {tmp_path}/admin.sock mode 600 level admin
    stats socket {tmp_path}/operator.sock mode 600 level operator
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
frontend main
    bind unix@{tmp_path}/frontend.sock
    http-request return status 503 if {{ str(main),map({map_file}) -m str 1 }}
    default_backend app
backend app
    server leader 127.0.0.1:9 check disabled
    server follower 127.0.0.1:9 track app/leader
    server plain 127.0.0.1:9
"""
    )
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)])
    h = ScratchHaproxy(f"unix:{tmp_path}/admin.sock", f"unix:{tmp_path}/operator.sock", map_file, cfg, proc)
    try:
        wait_for(lambda: (tmp_path / "operator.sock").exists() and h.process.poll() is None)
        yield h
    finally:
        h.process.terminate()
        h.process.wait(timeout=10)


def balancer(api: str, maintenance: MaintenanceSwitch | None = None) -> LoadBalancer:
    members = {"n1": "leader", "n2": "follower", "n3": "plain"}
    return LoadBalancer(
        name="scratch",
        kind="haproxy",
        members=members,
        runtime_api=api,
        backend="app",
        maintenance=maintenance,
    )


async def test_a_state_that_does_not_take_is_an_error_not_an_empty_answer(scratch: ScratchHaproxy) -> None:
    lb, env = balancer(scratch.admin), ActivityEnvironment()
    # The follower inherits the leader's maintenance: `state ready` is answered with nothing.
    assert (await lb_api.runtime_command(scratch.admin, "set server app/follower state ready")).strip() == ""
    with pytest.raises(ApplicationError) as e:
        await env.run(lb_api.lb_set_state, SetStateRequest(lb=lb, node="n2", state="ready"))
    assert e.value.type == "LbRuntimeApiError" and not e.value.non_retryable
    assert "app/follower is maint" in e.value.message and "state ready" in e.value.message
    # What does take is read back as asked.
    assert (
        await env.run(lb_api.lb_set_state, SetStateRequest(lb=lb, node="n3", state="drain"))
    ).admin == "drain"


async def test_a_server_disabled_in_the_configuration_reads_ready_once_made_ready(
    scratch: ScratchHaproxy,
) -> None:
    lb, env = balancer(scratch.admin), ActivityEnvironment()
    assert (await lb_api.member_state(lb, "n1")).admin == "maint"  # disabled: FMAINT | CMAINT
    ready = await env.run(lb_api.lb_set_state, SetStateRequest(lb=lb, node="n1", state="ready"))
    assert ready.admin == "ready"  # CMAINT stays in srv_admin_state, and is no maintenance
    # ...and the follower, tracking it, leaves maintenance with it.
    assert (
        await env.run(lb_api.lb_set_state, SetStateRequest(lb=lb, node="n2", state="ready"))
    ).admin == "ready"


async def test_preflight_refuses_a_runtime_api_below_level_admin(scratch: ScratchHaproxy) -> None:
    env = ActivityEnvironment()
    with pytest.raises(ApplicationError) as e:
        await env.run(lb_api.lb_check_member, MemberRequest(lb=balancer(scratch.operator), node="n3"))
    assert (
        e.value.non_retryable and "at level operator" in e.value.message and "level admin" in e.value.message
    )
    assert (
        await env.run(lb_api.lb_check_member, MemberRequest(lb=balancer(scratch.admin), node="n3"))
    ).server == "plain"


@pytest.mark.parametrize("off_value", ["0", ""])
async def test_the_maintenance_switch_writes_the_declared_values(
    scratch: ScratchHaproxy, off_value: str
) -> None:
    switch = MaintenanceSwitch(map=str(scratch.map_file), key="main", on_value="1", off_value=off_value)
    lb, env = balancer(scratch.admin, switch), ActivityEnvironment()
    show = f"show map {scratch.map_file}"
    assert await env.run(lb_api.lb_set_maintenance, MaintenanceRequest(lb=lb, on=True)) is True
    assert (await lb_api.runtime_command(scratch.admin, show)).split()[1:3] == ["main", "1"]
    assert await env.run(lb_api.lb_set_maintenance, MaintenanceRequest(lb=lb, on=False)) is False
    entries = (await lb_api.runtime_command(scratch.admin, show)).split()
    assert entries[1:3] == ["main", "0"] if off_value else entries == []
    # Re-running either is harmless (a deleted entry stays deleted).
    assert await env.run(lb_api.lb_set_maintenance, MaintenanceRequest(lb=lb, on=False)) is False


async def test_the_guard_sees_a_reload_and_sets_the_runs_state_again(scratch: ScratchHaproxy) -> None:
    switch = MaintenanceSwitch(map=str(scratch.map_file), key="main", on_value="1", off_value="0")
    lb, env = balancer(scratch.admin, switch), ActivityEnvironment()
    first = await env.run(lb_api.lb_guard, GuardRequest(lb=lb, expected=None, state=LbRunState()))
    assert not first.reloaded
    await lb_api.set_member_state(lb, "n3", "maint")
    await lb_api.set_maintenance(lb, True)
    state = LbRunState(members=(("n3", "maint"),), maintenance=True)
    same = await env.run(lb_api.lb_guard, GuardRequest(lb=lb, expected=first.process, state=state))
    assert not same.reloaded and same.process == first.process
    scratch.reload()
    # The reload undid the run's changes...
    assert (await lb_api.member_state(lb, "n3")).admin == "ready" and not await lb_api.maintenance_state(lb)
    # ...the guard notices (another process) and sets them again.
    after = await env.run(lb_api.lb_guard, GuardRequest(lb=lb, expected=first.process, state=state))
    assert after.reloaded and after.process.pid != first.process.pid
    assert after.reapplied == ("n3 maint", "maintenance page on")
    assert (await lb_api.member_state(lb, "n3")).admin == "maint" and await lb_api.maintenance_state(lb)
