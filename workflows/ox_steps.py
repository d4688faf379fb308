"""What the two Open-Xchange procedures share (`ox-upgradeschemata` and its parent
`ox-node-upgrade`, which starts it as a child workflow per node): OX's order of schemata,
the "server already registered" gate (OX's prompt), a schema's failure record."""

from __future__ import annotations

from dataclasses import dataclass

from workflows.gates import GateSpec
from workflows.procedure import Procedure

# Versioned change (workflow.patched), in both procedures: schemata in OX's order (the number
# after the last '_', as upgradeschemata sorts for -m), schemata without contexts skipped
# (disableschema refuses them), -k refused with drive_tool.
PATCH_ORDER_AND_EMPTY = "ox-schemata-order-and-empty-v1"
REGISTERED_GATE = "server-already-registered"
REGISTERED_CHOICES = ("continue", "abort")


@dataclass(frozen=True)
class SchemaFailure:
    schema: str
    seed_step: str
    error: str


def schema_order(name: str) -> tuple[int, int, str]:
    """OX's order of schemata: by the number after the last '_' (UpgradeSchemata.listSchemata
    sorts so for -m); names without one last, by name."""
    tail = name.rpartition("_")[2]
    return (0, int(tail), name) if tail.isdigit() else (1, 0, name)


async def registered_gate(proc: Procedure, server_name: str, existing: int, timeout_s: float) -> str:
    """Step 3 when a server of that name is registered: what OX's tool asks on its prompt,
    `continue` (use it) or `abort` (also when nobody may decide, or nobody does in time)."""
    spec = GateSpec(
        name=REGISTERED_GATE,
        guards=f"The specified server is already registered with id '{existing}'. continue: the "
        f"existing server {server_name} is used to point the updated schemata to; abort: "
        "stop, nothing is changed",
        timeout_s=timeout_s,
        on_timeout="abort",
        choices=REGISTERED_CHOICES,
    )
    if not proc.gates.approvers_of(REGISTERED_GATE):
        proc.timeline.record(
            f"gate {REGISTERED_GATE}: nobody may decide it",
            "skipped",
            detail="the inventory lists no approvers for it: abort (nothing changed)",
        )
        return "abort"
    record = await proc.gates.wait(spec)
    return record.choice or "abort"
