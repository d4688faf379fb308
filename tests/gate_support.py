"""Deciding gates from a test: wait until a gate is pending (the `pending_gates` query),
then choose at it (the `choose` update)."""

from __future__ import annotations

import asyncio
from typing import Any

from temporalio.client import WorkflowHandle

from tests.signing_support import signed
from workflows.gates import Decision, GateRecord, PendingGate


async def pending(handle: WorkflowHandle[Any, Any], gate: str) -> PendingGate:
    for _ in range(200):
        gates = await handle.query("pending_gates", result_type=list[PendingGate])
        for g in gates:
            if g.gate == gate:
                return g
        await asyncio.sleep(0.1)
    raise AssertionError(f"gate {gate} never opened")


async def choose(
    handle: WorkflowHandle[Any, Any], gate: PendingGate, choice: str, by: str = "ops1"
) -> GateRecord:
    decision = Decision(gate=gate.gate, by=by, plan_hash=gate.plan_hash, choice=choice, comment="t")
    record: GateRecord = await handle.execute_update(
        "choose", signed(handle.id, gate, decision), result_type=GateRecord
    )
    return record
