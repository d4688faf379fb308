"""What the blue-green end-to-end tests (minor-blue-green, major-maintenance-window) share: the
site cut to two old servers, gates decided by choice, a step awaited, the servers
provisioned and on the main balancer."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from temporalio.client import WorkflowHandle

from inventory.model import Inventory
from lab import haproxy as lab_haproxy
from lab import provision as lab_provision
from lab.config import BACKEND, LabConfig
from tests.signing_support import signed
from workflows.gates import Decision, GateRecord, PendingGate


def two_old(lab: LabConfig, inv: Inventory) -> Inventory:
    """A two-server site, cheaper to replace: node1 and node2 are the balancer's members;
    node3 and node4 are put in maintenance (fresh_lab puts them back after the test)."""
    for n in ("node3", "node4"):
        assert not lab_haproxy.runtime_command(lab, f"set server {BACKEND}/{n} state maint").strip()
    lb = inv.load_balancers[0]
    members = {n: s for n, s in lb.members.items() if n in ("node1", "node2")}
    return dataclasses.replace(
        inv, load_balancers=(dataclasses.replace(lb, members=members), *inv.load_balancers[1:])
    )


async def pending(handle: WorkflowHandle[Any, Any], gate: str, timeout_s: float = 180) -> PendingGate:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        try:
            for g in await handle.query("pending_gates", result_type=list[PendingGate]):
                if g.gate == gate:
                    return g
        except Exception:  # a worker being replaced may not answer for a moment
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"gate {gate} never opened")


async def choose(handle: WorkflowHandle[Any, Any], gate: str, choice: str) -> None:
    g = await pending(handle, gate)
    decision = Decision(gate=g.gate, by="alice", plan_hash=g.plan_hash, choice=choice, comment="e2e")
    await handle.execute_update("choose", signed(handle.id, g, decision), result_type=GateRecord)


async def wait_step(handle: WorkflowHandle[Any, Any], prefix: str, timeout_s: float = 180) -> None:
    from workflows.timeline import Progress

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        progress = await handle.query("progress", result_type=Progress)
        if any(s.name.startswith(prefix) for s in progress.steps):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"step {prefix!r} never started")


def provisioned(lab: LabConfig) -> set[str]:
    return set(lab_provision.provisioned(lab))


def main_servers(lab: LabConfig) -> dict[str, str]:
    return {s: st for (b, s), st in lab_haproxy.server_states(lab).items() if b == BACKEND}
