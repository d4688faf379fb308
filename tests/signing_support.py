"""Signed gate decisions on the lab (issue 17.6): its inventories list each approver's key
(lab/sshd.py `approver_public_keys`), so a test decides a lab gate the way an approver does,
with that person's key (starter/signing.py, i.e. `ssh-keygen -Y sign`). Gates of sites
without approver keys (the fake sites of the logic tests) stay unsigned."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from inventory.keys import fingerprint, key_blob
from lab.config import LabConfig
from starter.signing import sign_decision
from workflows.gates import Decision, PendingGate

# The session's lab (set by conftest's lab_cfg fixture): where its approvers' keys are.
LAB: LabConfig | None = None


def key_of(by: str) -> Path | None:
    """The lab approver's private key, if the lab has one for `by`."""
    key = LAB.approver_key(by) if LAB is not None else None
    return key if key is not None and key.exists() else None


def fingerprint_of(by: str) -> str:
    """The SHA256 fingerprint of the lab approver's key, as a GateRecord / the timeline names it."""
    key = key_of(by)
    assert key is not None, f"the lab has no key for approver {by!r}"
    public = key.with_name(key.name + ".pub").read_text(encoding="utf-8")
    return fingerprint(key_blob(public))


def key_args(by: str) -> list[str]:
    """`--key <path>` for a zerodown approve / reject / resolve as `by`."""
    key = key_of(by)
    assert key is not None, f"the lab has no key for approver {by!r}"
    return ["--key", str(key)]


def signature(workflow_id: str, gate: PendingGate, by: str, choice: str) -> str:
    """`by`'s signature for deciding the pending `gate` with `choice` ("" when the gate takes
    unsigned decisions or `by` has no lab key: the workflow then refuses, as it should)."""
    key = key_of(by)
    if not gate.signed or key is None:
        return ""
    return sign_decision(key, workflow_id, gate.gate, gate.occurrence, choice, gate.plan_hash)


def signed(workflow_id: str, gate: PendingGate, decision: Decision, approve: bool = True) -> Decision:
    choice = decision.choice or ("approve" if approve else "reject")
    return dataclasses.replace(decision, signature=signature(workflow_id, gate, decision.by, choice))


def signal_input(workflow_id: str, pending: PendingGate, /, **fields: Any) -> dict[str, Any]:
    """The JSON of a `decide` signal, signed by `fields["by"]`."""
    choice = fields.get("choice") or ("approve" if fields.get("approve") else "reject")
    return {**fields, "signature": signature(workflow_id, pending, fields["by"], choice)}
