"""Approval gates: a named wait for a human decision, shared by every procedure.

A procedure declares a `GateSpec` and awaits `Gates.wait(spec)`. People decide through
  * the `approve` / `reject` **updates**, whose validator refuses a wrong call to the
    caller at once (no such gate pending, approver not listed for that gate in the
    inventory, self-approval by the run's starter, a plan hash other than the plan this
    run executes), or
  * the `decide` **signal** (what the Web UI can send): the same checks, but a refused
    signal cannot answer back, so it is recorded in the timeline and ignored.
A gate may offer *choices* instead of approve / reject (the guided-failure gates
`failure:<step>` offer retry / skip / rollback / abort): those are decided with the
`choose` update (or the `decide` signal carrying a `choice`), validated the same way plus
"is this one of the gate's choices".
The `pending_gates` query says what waits, since when, who may decide and what it guards.
Every gate has a timeout with a fail-safe default: `reject` (the procedure rolls back),
`hold` (keep waiting) or, for a choice gate, one of its choices. Every decision is kept
(who, when, how, comment, plan hash).
Approvers are looked up by the gate's full name, then by its family (`failure` for
`failure:N5@node2`), so an inventory lists the people for every failure gate once.
Signed decisions (workflows/signatures.py): when the inventory lists approvers' SSH keys
(`approver_keys`; the loader requires one for every approver), a decision carries an SSHSIG
signature over (workflow id, gate, the gate's occurrence in the run, choice, plan hash) by
one of the decider's keys, and is refused without it: the name typed into `by` is bound to
a key. The record keeps the key's fingerprint.
Deterministic: only workflow APIs inside.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from temporalio import workflow
from temporalio.exceptions import ApplicationError

from errors import GATE_REFUSED
from workflows import signatures
from workflows.timeline import Timeline

ON_TIMEOUT = ("reject", "hold")


def gate_family(gate: str) -> str:
    """`failure:N5@node2` -> `failure`; a plain gate name is its own family."""
    return gate.split(":", 1)[0]


# How a gate was decided.
GateOutcome = Literal["approved", "rejected", "chosen", "timed out"]


@dataclass(frozen=True)
class GateSpec:
    name: str
    # What approving lets happen, in the operator's words.
    guards: str
    timeout_s: float
    # Fail-safe default when nobody decides in time: reject (roll back), hold (keep waiting)
    # or, for a choice gate, one of `choices`.
    on_timeout: str = "reject"
    # Empty: an approve / reject gate. Otherwise the options a decider picks from.
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    gate: str
    by: str
    # The plan hash shown by `zerodown plan`: the decider approves *this* plan.
    plan_hash: str
    comment: str = ""
    # For a choice gate (`choose` update): one of the gate's choices.
    choice: str = ""
    # The decider's SSHSIG signature (armored) over the decision message
    # (workflows/signatures.py); required when the inventory lists approver keys.
    signature: str = ""


@dataclass(frozen=True)
class SignalDecision:
    """The signal form of a decision: approve or reject, or a `choice` for a choice gate."""

    gate: str
    by: str
    plan_hash: str
    approve: bool = False
    comment: str = ""
    choice: str = ""
    signature: str = ""


@dataclass(frozen=True)
class GateRecord:
    gate: str
    outcome: GateOutcome
    by: str | None
    at: datetime
    via: str  # update | signal | timeout
    comment: str = ""
    plan_hash: str = ""
    # A choice gate: what was chosen (on timeout: the fail-safe default applied).
    choice: str = ""
    # The fingerprint of the SSH key whose signature verified (empty: unsigned decision).
    key: str = ""
    # Which opening of the gate in the run this decided (1 first).
    occurrence: int = 0

    @property
    def approved(self) -> bool:
        return self.outcome == "approved"


@dataclass(frozen=True)
class PendingGate:
    gate: str
    since: datetime
    approvers: tuple[str, ...]
    guards: str
    deadline: datetime | None
    on_timeout: str
    plan_hash: str
    choices: tuple[str, ...] = ()
    # How many times this gate has opened in the run (1 first): part of what a signature
    # signs, so one given for an earlier opening cannot decide this one.
    occurrence: int = 1
    # True when a decision must be signed (the inventory lists approver keys).
    signed: bool = False


def refused(message: str) -> ApplicationError:
    return ApplicationError(message, type=GATE_REFUSED, non_retryable=True)


class Gates:
    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline
        self.approvers: dict[str, tuple[str, ...]] = {}
        self.started_by: str | None = None
        self.plan_hash = ""
        self.records: list[GateRecord] = []
        self.approver_keys: dict[str, tuple[str, ...]] = {}
        # Openings per gate name (a continued run starts from its predecessor's).
        self.opened: dict[str, int] = {}
        self._pending: dict[str, PendingGate] = {}
        self._decided: dict[str, GateRecord] = {}

    def approvers_of(self, gate: str) -> tuple[str, ...]:
        return self.approvers.get(gate) or self.approvers.get(gate_family(gate), ())

    def configure(
        self,
        approvers: dict[str, tuple[str, ...]],
        started_by: str | None,
        plan_hash: str,
        approver_keys: dict[str, tuple[str, ...]] | None = None,
        opened: dict[str, int] | None = None,
    ) -> None:
        self.approvers, self.started_by, self.plan_hash = dict(approvers), started_by, plan_hash
        self.approver_keys = dict(approver_keys or {})
        self.opened = dict(opened or {})

    @property
    def signed(self) -> bool:
        return bool(self.approver_keys)

    def pending(self) -> list[PendingGate]:
        return list(self._pending.values())

    def check(self, d: Decision, choosing: bool = False, approve: bool = False) -> str:
        """Raise GateRefused (to the caller of an update) unless `d` may decide its gate;
        the fingerprint of the key that signed it ("" when decisions are not signed)."""
        if d.gate not in self._pending:
            waiting = ", ".join(self._pending) or "none"
            raise refused(f"no gate {d.gate!r} is waiting for a decision (waiting: {waiting})")
        choices = self._pending[d.gate].choices
        if choices and not choosing:
            raise refused(
                f"gate {d.gate!r} takes a choice ({', '.join(choices)}), not approve / reject: "
                f"use `zerodown resolve {d.gate} --choice ...` (update `choose`)"
            )
        if choosing and not choices:
            raise refused(f"gate {d.gate!r} is an approve / reject gate: use approve or reject")
        if choosing and d.choice not in choices:
            raise refused(f"{d.choice!r} is not a choice of gate {d.gate!r} (choices: {', '.join(choices)})")
        allowed = self.approvers_of(d.gate)
        if d.by not in allowed:
            raise refused(
                f"{d.by!r} may not decide gate {d.gate!r}: the inventory lists "
                f"{', '.join(allowed) or 'nobody'}"
            )
        if self.started_by is not None and d.by == self.started_by:
            raise refused(
                f"{d.by!r} started this run and may not decide its gate {d.gate!r} (no self-approval)"
            )
        if d.plan_hash != self.plan_hash:
            raise refused(
                f"the decision names plan {d.plan_hash[:12] or '(none)'}, but this run "
                f"executes plan {self.plan_hash[:12]}: review it with `zerodown plan` "
                "or `zerodown status`, then decide on that plan"
            )
        return self.signer(d, approve)

    def choice_of(self, d: Decision, approve: bool) -> str:
        """What the decision chooses, as the signed message names it."""
        return d.choice or ("approve" if approve else "reject")

    def signer(self, d: Decision, approve: bool) -> str:
        """The fingerprint of the decider's key that signed `d` ("" when decisions are not
        signed); GateRefused when the signature is missing or does not bind this decision."""
        if not self.signed:
            return ""
        keys = self.approver_keys.get(d.by, ())
        if not keys:
            raise refused(f"the inventory lists no key for {d.by!r} (approver_keys): decisions are signed")
        if not d.signature.strip():
            raise refused(
                f"gate {d.gate!r} takes signed decisions only: sign with the key the inventory lists for "
                f"{d.by!r} (zerodown approve / reject / resolve --key, or ssh-keygen -Y sign -n "
                f"{signatures.NAMESPACE}: README 'Signed decisions')"
            )
        occurrence = self._pending[d.gate].occurrence
        message = signatures.decision_message(
            workflow.info().workflow_id, d.gate, occurrence, self.choice_of(d, approve), d.plan_hash
        )
        try:
            return signatures.verify(d.signature, message, keys)
        except signatures.SignatureRefused as e:
            others = [n for n in self.approvers_of(d.gate) if n != d.by]
            raise refused(
                f"signature refused for {d.by!r} at gate {d.gate!r}: {e}. It must be made with one of "
                f"{d.by}'s keys over workflow {workflow.info().workflow_id}, gate {d.gate}, occurrence "
                f"{occurrence}, choice {self.choice_of(d, approve)}, plan {d.plan_hash[:12]}"
                + (f" (other approvers of this gate: {', '.join(others)})" if others else "")
            ) from None

    def decide(self, d: Decision, approve: bool, via: str, key: str | None = None) -> GateRecord:
        """Record `d` (checked already: by the update's validator, or `key` from the signal
        handler's check; an update handler, its validator not run on replay, finds the key
        again)."""
        outcome: GateOutcome = "chosen" if d.choice else "approved" if approve else "rejected"
        pending = self._pending.get(d.gate)
        if key is None:
            key = self.signer(d, approve) if pending is not None else ""
        record = GateRecord(
            gate=d.gate,
            outcome=outcome,
            by=d.by,
            at=workflow.now(),
            via=via,
            comment=d.comment,
            plan_hash=d.plan_hash,
            choice=d.choice,
            key=key,
            occurrence=pending.occurrence if pending is not None else 0,
        )
        self._pending.pop(d.gate, None)
        self._decided[d.gate] = record
        self.records.append(record)
        what = f"{d.choice} chosen" if d.choice else outcome
        self.timeline.record(
            f"gate {d.gate}: {what} by {d.by}",
            "ok",
            detail=f"via {via}"
            + (f", signed by key {key}" if key else "")
            + (f": {d.comment}" if d.comment else ""),
        )
        return record

    def refuse_signal(self, d: SignalDecision, error: ApplicationError) -> None:
        self.timeline.record(
            f"gate {d.gate}: signal from {d.by} refused", "skipped", detail=str(error.message)
        )

    async def wait(self, spec: GateSpec) -> GateRecord:
        """Wait for a decision on `spec`; on timeout apply its fail-safe default."""
        now = workflow.now()
        hold = spec.on_timeout == "hold"
        self.opened[spec.name] = self.opened.get(spec.name, 0) + 1
        self._pending[spec.name] = PendingGate(
            gate=spec.name,
            since=now,
            approvers=self.approvers_of(spec.name),
            guards=spec.guards,
            deadline=None if hold else now + timedelta(seconds=spec.timeout_s),
            on_timeout=spec.on_timeout,
            plan_hash=self.plan_hash,
            choices=spec.choices,
            occurrence=self.opened[spec.name],
            signed=self.signed,
        )
        before = (self.timeline.phase, self.timeline.node)
        waiting = f"waiting for a decision on gate {spec.name}"
        self.timeline.set_phase(waiting)
        try:
            await workflow.wait_condition(
                lambda: spec.name in self._decided,
                timeout=None if hold else timedelta(seconds=spec.timeout_s),
            )
        except TimeoutError:
            self._pending.pop(spec.name, None)
            record = GateRecord(
                gate=spec.name,
                outcome="timed out",
                by=None,
                at=workflow.now(),
                via="timeout",
                comment=f"no decision within {spec.timeout_s:g}s: {spec.on_timeout} (fail-safe default)",
                choice=spec.on_timeout if spec.choices else "",
            )
            self.records.append(record)
            applied = spec.on_timeout if spec.choices else "rejected"
            self.timeline.record(f"gate {spec.name}: timed out, {applied}", "failed", detail=record.comment)
            return record
        finally:
            # Decided: the run is back where it was (unless it has moved on meanwhile, e.g.
            # other schemata going on beside this gate).
            if self.timeline.phase == waiting:
                self.timeline.set_phase(*before)
        return self._decided.pop(spec.name)


class GatedWorkflow:
    """Mix into a procedure's workflow class: the gate handlers, once for all procedures."""

    gates: Gates

    @workflow.update(name="approve")
    def approve(self, decision: Decision) -> GateRecord:
        return self.gates.decide(decision, True, "update")

    @approve.validator
    def _check_approve(self, decision: Decision) -> None:
        self.gates.check(decision, approve=True)

    @workflow.update(name="reject")
    def reject(self, decision: Decision) -> GateRecord:
        return self.gates.decide(decision, False, "update")

    @reject.validator
    def _check_reject(self, decision: Decision) -> None:
        self.gates.check(decision)

    @workflow.update(name="choose")
    def choose(self, decision: Decision) -> GateRecord:
        return self.gates.decide(decision, False, "update")

    @choose.validator
    def _check_choose(self, decision: Decision) -> None:
        self.gates.check(decision, choosing=True)

    @workflow.signal(name="decide")
    def decide(self, decision: SignalDecision) -> None:
        d = Decision(
            gate=decision.gate,
            by=decision.by,
            plan_hash=decision.plan_hash,
            comment=decision.comment,
            choice=decision.choice,
            signature=decision.signature,
        )
        try:
            key = self.gates.check(d, choosing=bool(decision.choice), approve=decision.approve)
        except ApplicationError as e:
            self.gates.refuse_signal(decision, e)
            return
        self.gates.decide(d, decision.approve, "signal", key)

    @workflow.query(name="pending_gates")
    def pending_gates(self) -> list[PendingGate]:
        return self.gates.pending()

    @workflow.query(name="decisions")
    def decisions(self) -> list[GateRecord]:
        return list(self.gates.records)
