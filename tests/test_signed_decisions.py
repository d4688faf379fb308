"""Gate decisions bound to the approver's SSH key (issue 17.6; workflows/signatures.py).

The signatures are OpenSSH's own (`ssh-keygen -Y sign -n zerodown`, what README tells an
approver to run by hand and what `zerodown approve` runs), and what our verifier accepts
`ssh-keygen -Y verify` accepts too. On the dev server, rolling-deploy's failure gate (it
opens twice when a retry fails again) refuses, each with its own test: a missing signature,
a key not listed for the gate, a signature over another plan, one made for another
workflow, one made for the gate's earlier opening; and the `decide` signal records a wrongly
signed decision in the timeline and ignores it.
"""

from __future__ import annotations

import dataclasses
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError

from inventory.load import parse_inventory
from inventory.model import Inventory, InventoryError
from starter.signing import sign, sign_decision
from tests.fake_site import FakeSite, site
from tests.gate_support import pending
from tests.temporal_env import running_worker
from workflows.gates import Decision, GateRecord, PendingGate
from workflows.rolling_deploy import RollingDeployInput, RollingDeployWorkflow
from workflows.signatures import NAMESPACE, SignatureRefused, decision_message, verify
from workflows.timeline import Progress

GATE = "failure:N7@n2"


def keypair(tmp_path: Path, name: str, kind: str = "ed25519") -> tuple[Path, str]:
    key = tmp_path / f"{name}-{kind}"
    extra = ["-b", "2048"] if kind == "rsa" else []
    subprocess.run(["ssh-keygen", "-q", "-t", kind, *extra, "-N", "", "-C", name, "-f", str(key)], check=True)
    return key, key.with_name(key.name + ".pub").read_text().strip()


def ssh_keygen_verifies(tmp_path: Path, public: str, signature: str, message: bytes) -> bool:
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f"signer {public}\n")
    sig = tmp_path / "msg.sig"
    sig.write_text(signature + "\n")
    proc = subprocess.run(
        ["ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", "signer", "-n", NAMESPACE, "-s", str(sig)],
        input=message,
        capture_output=True,
        check=False,
    )
    return proc.returncode == 0


@pytest.mark.parametrize("kind", ["ed25519", "rsa", "ecdsa"])
def test_signatures_of_ssh_keygen_verify_exactly_when_ssh_keygen_says_so(tmp_path: Path, kind: str) -> None:
    key, public = keypair(tmp_path, "alice", kind)
    message = decision_message("wf-1", GATE, 1, "retry", "a" * 64)
    signature = sign(message, key)
    assert verify(signature, message, [public]).startswith("SHA256:")
    assert ssh_keygen_verifies(tmp_path, public, signature, message)
    # Any other decision: another workflow, opening, choice or plan.
    for other in (
        decision_message("wf-2", GATE, 1, "retry", "a" * 64),
        decision_message("wf-1", GATE, 2, "retry", "a" * 64),
        decision_message("wf-1", GATE, 1, "rollback", "a" * 64),
        decision_message("wf-1", GATE, 1, "retry", "b" * 64),
    ):
        with pytest.raises(SignatureRefused, match="is not one of this decision"):
            verify(signature, other, [public])
        assert not ssh_keygen_verifies(tmp_path, public, signature, other)
    _, stranger = keypair(tmp_path, "mallory")
    with pytest.raises(SignatureRefused, match="which is not listed"):
        verify(signature, message, [stranger])


def test_the_decision_message_bytes_are_the_documented_ones() -> None:
    assert decision_message("ss-rolling-lab-1", "failure:7.7", 2, "rollback", "ab" * 32) == (
        b"zerodown-decision-v1\n"
        b"workflow: ss-rolling-lab-1\n"
        b"gate: failure:7.7\n"
        b"occurrence: 2\n"
        b"choice: rollback\n"
        b"plan: " + b"ab" * 32 + b"\n"
    )


def test_other_namespaces_and_garbage_are_refused(tmp_path: Path) -> None:
    key, public = keypair(tmp_path, "alice")
    message = decision_message("wf", "g", 1, "approve", "c" * 64)
    git = subprocess.run(
        ["ssh-keygen", "-Y", "sign", "-n", "git", "-f", str(key), "-q"], input=message, capture_output=True
    ).stdout.decode()
    with pytest.raises(SignatureRefused, match="namespace 'git'"):
        verify(git, message, [public])
    for junk in ("", "hello", "-----BEGIN SSH SIGNATURE-----\n!!\n-----END SSH SIGNATURE-----"):
        with pytest.raises(SignatureRefused):
            verify(junk, message, [public])


def test_the_inventory_lists_a_key_for_every_approver(tmp_path: Path) -> None:
    _, alice = keypair(tmp_path, "alice")
    raw: dict[str, Any] = {
        "site": "s",
        "nodes": [
            {
                "name": "n1",
                "ssh": {"host": "h", "key": {"env": "K"}},
                "app_dir": "/app",
                "service": {"kind": "systemd", "unit": "app"},
                "url": "http://n1",
            }
        ],
        "approvers": {"failure": ["alice", "bob"]},
        "approver_keys": {"alice": [alice]},
    }
    with pytest.raises(InventoryError) as info:
        parse_inventory(yaml.safe_load(yaml.safe_dump(raw)))
    assert "bob has no key in approver_keys" in str(info.value)
    raw["approver_keys"]["bob"] = "ssh-ed25519 AAAAnot-base64 bob"
    with pytest.raises(InventoryError) as info:
        parse_inventory(raw)
    assert "approver_keys.bob" in str(info.value)
    raw["approver_keys"]["bob"] = alice
    with pytest.raises(InventoryError, match="one key, one person"):
        parse_inventory(raw)
    raw["approver_keys"]["bob"] = [keypair(tmp_path, "bob")[1]]
    inv = parse_inventory(raw)
    assert inv.approver_keys["alice"] == (alice,)


# ------------------------------------------------------------------ on the dev server


@dataclasses.dataclass
class Approvers:
    ops1: Path
    ops2: Path
    stranger: Path
    inventory: Inventory


@pytest.fixture
def approvers(tmp_path: Path) -> Approvers:
    ops1, ops1_pub = keypair(tmp_path, "ops1")
    ops2, ops2_pub = keypair(tmp_path, "ops2")
    stranger, _ = keypair(tmp_path, "stranger")
    inv = dataclasses.replace(
        site(),
        approvers={"failure": ("ops1", "ops2")},
        approver_keys={"ops1": (ops1_pub,), "ops2": (ops2_pub,)},
    )
    return Approvers(ops1, ops2, stranger, inv)


async def start(client: Client, task_queue: str, inv: Inventory) -> WorkflowHandle[Any, Any]:
    inp = RollingDeployInput(
        inventory=inv,
        package_path="/p.zip",
        on_failure="ask",
        failure_gate_timeout_s=120,
        started_by="starter",
    )
    return await client.start_workflow(
        RollingDeployWorkflow.run,
        inp,
        id=f"wf-{task_queue}",
        task_queue=task_queue,
        execution_timeout=timedelta(seconds=90),
    )


async def refused(handle: WorkflowHandle[Any, Any], decision: Decision) -> str:
    with pytest.raises(WorkflowUpdateFailedError) as info:
        await handle.execute_update("choose", decision, result_type=GateRecord)
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "GateRefused"
    return cause.message


def retry_by(key: Path, workflow_id: str, gate: PendingGate, **changes: Any) -> Decision:
    """ops1's retry decision, signed with `key` over the message `changes` alter."""
    parts: dict[str, Any] = {
        "workflow_id": workflow_id,
        "gate": gate.gate,
        "occurrence": gate.occurrence,
        "choice": "retry",
        "plan_hash": gate.plan_hash,
        **changes,
    }
    signature = sign_decision(key, **parts)
    return Decision(gate=gate.gate, by="ops1", plan_hash=gate.plan_hash, choice="retry", signature=signature)


async def test_signed_decisions_and_every_refusal(
    client: Client, task_queue: str, approvers: Approvers
) -> None:
    fake = FakeSite(["n1", "n2", "n3"], fail_health_on=("n2", "2.0.0"))
    async with running_worker(client, task_queue, [RollingDeployWorkflow], fake.activities()):
        handle = await start(client, task_queue, approvers.inventory)
        gate = await pending(handle, GATE)
        assert gate.signed and gate.occurrence == 1
        wf = handle.id
        unsigned = Decision(gate=GATE, by="ops1", plan_hash=gate.plan_hash, choice="retry")
        assert "takes signed decisions only" in await refused(handle, unsigned)
        # A key the inventory does not list for the gate, or another approver's key.
        assert "which is not listed" in await refused(handle, retry_by(approvers.stranger, wf, gate))
        assert "which is not listed" in await refused(handle, retry_by(approvers.ops2, wf, gate))
        # Signed over another plan, for another workflow, for another choice.
        assert "is not one of this decision" in await refused(
            handle, retry_by(approvers.ops1, wf, gate, plan_hash="0" * 64)
        )
        assert "is not one of this decision" in await refused(
            handle, retry_by(approvers.ops1, "wf-of-another-run", gate)
        )
        assert "is not one of this decision" in await refused(
            handle, retry_by(approvers.ops1, wf, gate, choice="abort")
        )
        # The right one: accepted, its key's fingerprint kept.
        first = retry_by(approvers.ops1, wf, gate)
        record: GateRecord = await handle.execute_update("choose", first, result_type=GateRecord)
        assert record.key.startswith("SHA256:") and record.occurrence == 1 and record.choice == "retry"
        # The retry fails again: the same gate opens a second time; the first signature is
        # refused there (a replay of an earlier opening), a fresh one decides it.
        again = await _reopened(handle)
        assert again.occurrence == 2 and again.plan_hash == gate.plan_hash
        assert "occurrence 2" in await refused(handle, first)
        # The signal form: a wrongly signed decision is recorded and ignored.
        await handle.signal(
            "decide",
            {
                "gate": GATE,
                "by": "ops1",
                "plan_hash": gate.plan_hash,
                "choice": "abort",
                "signature": first.signature,
            },
        )
        progress = await handle.query("progress", result_type=Progress)
        assert any(
            s.name == f"gate {GATE}: signal from ops1 refused" and "not one of this decision" in s.detail
            for s in progress.steps
        ), [s.name for s in progress.steps]
        assert [g.gate for g in await handle.query("pending_gates", result_type=list[PendingGate])] == [GATE]
        fake.fail_health_on = None
        record = await handle.execute_update(
            "choose", retry_by(approvers.ops1, wf, again), result_type=GateRecord
        )
        assert record.occurrence == 2
        await handle.result()
    assert fake.version == {"n1": "2.0.0", "n2": "2.0.0", "n3": "2.0.0"}


async def _reopened(handle: WorkflowHandle[Any, Any]) -> PendingGate:
    import asyncio

    for _ in range(200):
        for g in await handle.query("pending_gates", result_type=list[PendingGate]):
            if g.gate == GATE and g.occurrence == 2:
                return g
        await asyncio.sleep(0.05)
    raise AssertionError("the failure gate did not open a second time")
