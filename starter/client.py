"""Starting, watching and replaying procedures: what the CLI does, as plain async functions."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
)
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes
from temporalio.service import RPCError
from temporalio.worker import Replayer

from inventory.model import Inventory
from workflows import timeouts
from workflows.gates import PendingGate
from workflows.ox_upgradeschemata import OxSchemataProgress
from workflows.registry import ALL_WORKFLOWS, INPUTS, PROCEDURES
from workflows.timeline import Progress

PROCEDURE_KEY = SearchAttributeKey.for_keyword("ZerodownProcedure")
SITE_KEY = SearchAttributeKey.for_keyword("ZerodownSite")
T = TypeVar("T")


class ProcedureInputError(ValueError):
    """The CLI's options do not make an input for the procedure (the message says why)."""


class UnknownProcedureError(ProcedureInputError):
    pass


# Input fields whose CLI option is not simply the field's name.
_CLI_OPTION = {
    "only_nodes": "--nodes",
    "package_path": "--package",
    "gate_timeout_s": "--gate-timeout",
    "failure_gate_timeout_s": "--failure-gate-timeout",
    "settings": "--setting",
    "secret_settings": "--secret-setting",
    "system_commands": "--system-command",
    "drain_deadline_s": "--drain-deadline",
}
# CLI options that fill a differently named field depending on the procedure: `--nodes` is
# rolling-deploy's `only_nodes` (deploy only these) but ox-node-upgrade's `nodes` (the
# upgrade order); the first field the procedure's input has is used.
_ALIASES = {"nodes": ("only_nodes", "nodes")}
# What a missing required option is, for the error message.
_WHAT = {
    "package_path": "the release package, a zip",
    "version": "the release to install",
    "server_name": "the new server's name, upgradeschemata -n",
    "update_node": "the node with the new release, where runupdate runs",
}


def option_name(field_name: str) -> str:
    return _CLI_OPTION.get(field_name, "--" + field_name.replace("_", "-"))


def _given(value: Any) -> bool:
    """An option the user gave: not None and not an empty default (False, "", (), {}); 0 counts."""
    return value is not None and value is not False and value != "" and value != () and value != {}


def input_fields(procedure: str) -> set[str]:
    if procedure not in PROCEDURES:
        raise UnknownProcedureError(
            f"unknown procedure {procedure!r} (known: {', '.join(sorted(PROCEDURES))})"
        )
    return {f.name for f in dataclasses.fields(INPUTS[procedure])}


def procedure_input(procedure: str, **options: Any) -> Any:
    """The procedure's input from the CLI's options (keyed by field name, or by an alias in
    _ALIASES). An option the procedure does not take is refused when it was given (see
    _given), silently left out otherwise; None means "not given" (the field's default); a
    required field (no default) that is not given is refused with its option's name."""
    accepted = input_fields(procedure)
    fields: dict[str, Any] = {}
    unusable: list[str] = []
    for key, value in options.items():
        name = next((f for f in _ALIASES.get(key, (key,)) if f in accepted), None)
        if name is None:
            if _given(value):
                unusable.append(option_name(_ALIASES[key][0]) if key in _ALIASES else option_name(key))
        elif value is not None:
            fields[name] = value
    if unusable:
        raise ProcedureInputError(f"{procedure} does not take {', '.join(sorted(unusable))}")
    missing = [
        f.name
        for f in dataclasses.fields(INPUTS[procedure])
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and not _given(fields.get(f.name))
    ]
    if missing:
        raise ProcedureInputError(
            f"{procedure} needs "
            + ", ".join(option_name(m) + (f" ({_WHAT[m]})" if m in _WHAT else "") for m in missing)
        )
    return INPUTS[procedure](**fields)


def new_workflow_id(procedure: str, site: str, now: datetime | None = None) -> str:
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S%f")[:-3]
    return f"{procedure}-{re.sub(r'[^A-Za-z0-9_.-]', '-', site)}-{stamp}"


async def start_procedure(
    client: Client,
    procedure: str,
    inventory: Inventory,
    arg: Any,
    task_queue: str,
    workflow_id: str | None = None,
) -> WorkflowHandle[Any, Any]:
    """Start a procedure, tagged with search attributes (skipped if the server lacks them)."""
    wf_id = workflow_id or new_workflow_id(procedure, inventory.site)
    attrs = TypedSearchAttributes(
        [SearchAttributePair(PROCEDURE_KEY, procedure), SearchAttributePair(SITE_KEY, inventory.site)]
    )
    try:
        return await client.start_workflow(
            procedure,
            arg,
            id=wf_id,
            task_queue=task_queue,
            search_attributes=attrs,
            task_timeout=timeouts.WORKFLOW_TASK,
        )
    except RPCError as e:
        if "search attribute" not in str(e).lower():
            raise
        # A server that was not started by `zerodown server` may lack our attributes.
        return await client.start_workflow(
            procedure, arg, id=wf_id, task_queue=task_queue, task_timeout=timeouts.WORKFLOW_TASK
        )


async def progress(handle: WorkflowHandle[Any, Any]) -> Progress:
    result: Progress = await handle.query("progress", result_type=Progress)
    return result


@dataclass(frozen=True)
class Outcome:
    ok: bool
    result: Any
    error: str | None


async def wait_with_progress(
    client: Client,
    handle: WorkflowHandle[Any, Any],
    result_type: type,
    on_progress: Callable[[Progress], None] | None = None,
    interval_s: float = 0.5,
) -> Outcome:
    """Wait for the result, calling on_progress with the live timeline meanwhile."""

    async def tick() -> None:
        if on_progress is not None:
            on_progress(await progress(handle))

    return await _wait(client, handle, result_type, tick, interval_s)


async def wait_with_status(
    client: Client,
    handle: WorkflowHandle[Any, Any],
    result_type: type,
    procedure: str,
    on_status: Callable[[RunStatus], None],
    interval_s: float = 0.5,
) -> Outcome:
    """Wait for the result, calling on_status with the live RunStatus meanwhile (the
    timeline plus what the procedure tells apart: OX schemata, a running child)."""

    async def tick() -> None:
        on_status(await run_status(client, handle, procedure))

    return await _wait(client, handle, result_type, tick, interval_s)


async def _wait(
    client: Client,
    handle: WorkflowHandle[Any, Any],
    result_type: type,
    tick: Callable[[], Awaitable[None]],
    interval_s: float,
) -> Outcome:
    typed = client.get_workflow_handle(handle.id, run_id=handle.run_id, result_type=result_type)
    task = asyncio.ensure_future(typed.result())
    try:
        while not task.done():
            try:
                await tick()
            except RPCError:
                pass  # no worker answered the query yet
            await asyncio.wait([task], timeout=interval_s)
        return Outcome(ok=True, result=task.result(), error=None)
    except WorkflowFailureError as e:
        return Outcome(ok=False, result=None, error=failure_message(e))
    finally:
        task.cancel()  # a no-op when done; when we are cancelled, nothing is left behind


# ---------------------------------------------------------------- what a run is doing

# ox-node-upgrade names each child in its step: "3-7 upgrade 1 schemata (child workflow <id>)".
_CHILD_STEP = re.compile(r"\(child workflow ([^)\s]+)\)")


@dataclass(frozen=True)
class ChildStatus:
    """A child workflow a procedure started (ox-node-upgrade's ox-upgradeschemata runs)."""

    workflow_id: str
    node: str | None
    state: str  # the parent's step result: running | ok | failed
    schemata: OxSchemataProgress | None = None
    gates: tuple[PendingGate, ...] = ()


@dataclass(frozen=True)
class RunStatus:
    progress: Progress
    # ox-upgradeschemata's `schemata` query (None for other procedures, or not walking yet).
    schemata: OxSchemataProgress | None = None
    children: tuple[ChildStatus, ...] = ()

    @property
    def running_child(self) -> ChildStatus | None:
        return next((c for c in self.children if c.state == "running"), None)


def child_steps(p: Progress) -> list[tuple[str, str | None, str]]:
    """(child workflow id, node, step result) for every step that ran a child workflow, in
    order; a child re-run after a failure gate's retry is listed once, with its last result."""
    found: dict[str, tuple[str, str | None, str]] = {}
    for st in p.steps:
        m = _CHILD_STEP.search(st.name)
        if m:
            found[m.group(1)] = (m.group(1), st.node, st.result)
    return list(found.values())


async def schemata_progress(handle: WorkflowHandle[Any, Any]) -> OxSchemataProgress | None:
    """ox-upgradeschemata's `schemata` query; None before its walk started (preflight)."""
    result: OxSchemataProgress | None = await handle.query("schemata", result_type=OxSchemataProgress | None)  # type: ignore[arg-type]
    return result


async def run_status(client: Client, handle: WorkflowHandle[Any, Any], procedure: str) -> RunStatus:
    p = await progress(handle)
    if procedure == "ox-upgradeschemata":
        return RunStatus(progress=p, schemata=await _optional(schemata_progress(handle)))
    children: list[ChildStatus] = []
    for wf_id, node, state in child_steps(p):
        child = ChildStatus(workflow_id=wf_id, node=node, state=state)
        if state == "running":
            # Only the running child is asked: a finished one's result is in the parent's.
            ch = client.get_workflow_handle(wf_id)
            child = dataclasses.replace(
                child,
                schemata=await _optional(schemata_progress(ch)),
                gates=tuple(await _optional(pending_gates(ch)) or ()),
            )
        children.append(child)
    return RunStatus(progress=p, children=tuple(children))


async def _optional(call: Awaitable[T]) -> T | None:
    """A query that may fail without making the whole status fail (a child not started yet,
    no worker answering it): None."""
    try:
        return await call
    except (RPCError, WorkflowQueryFailedError):
        return None


def failure_message(e: BaseException) -> str:
    from workflows.saga import reason

    return reason(e)


async def describe(handle: WorkflowHandle[Any, Any]) -> tuple[WorkflowExecutionStatus | None, str]:
    d = await handle.describe()
    return d.status, d.workflow_type


class DecisionRefused(RuntimeError):
    """The workflow's validator refused a gate decision (the message says why)."""


async def decide(
    handle: WorkflowHandle[Any, Any],
    approve: bool,
    decision: Any,
    key: Path | None = None,
    waiting: PendingGate | None = None,
) -> Any:
    """Send a gate decision (the update that fits it); with `key` (or $ZERODOWN_APPROVAL_KEY),
    signed first for the gate's current opening (starter/signing.py): `waiting`, when the
    caller has just asked for it, else asked here."""
    from starter.signing import env_key
    from workflows.gates import GateRecord

    name = "choose" if getattr(decision, "choice", "") else "approve" if approve else "reject"
    key = key or env_key()
    if key is not None and not decision.signature:
        decision = await signed(handle, approve, decision, key, waiting)
    try:
        return await handle.execute_update(name, decision, result_type=GateRecord)
    except WorkflowUpdateFailedError as e:
        raise DecisionRefused(failure_message(e.cause or e)) from None


async def signed(
    handle: WorkflowHandle[Any, Any],
    approve: bool,
    decision: Any,
    key: Path,
    gate: PendingGate | None = None,
) -> Any:
    """`decision` with its signature over the pending gate's opening (left unsigned when the
    gate is not waiting: the workflow then says why it cannot be decided)."""
    from starter.signing import sign_decision

    if gate is None or gate.gate != decision.gate:
        gate = next((g for g in await pending_gates(handle) if g.gate == decision.gate), None)
    if gate is None:
        return decision
    choice = decision.choice or ("approve" if approve else "reject")
    signature = await asyncio.to_thread(
        sign_decision, key, handle.id, decision.gate, gate.occurrence, choice, decision.plan_hash
    )
    return dataclasses.replace(decision, signature=signature)


async def pending_gates(handle: WorkflowHandle[Any, Any]) -> list[PendingGate]:
    gates: list[PendingGate] = await handle.query("pending_gates", result_type=list[PendingGate])
    return gates


class ReplayFailed(RuntimeError):
    """The current code does not reproduce the history (non-determinism or a code error)."""


async def replay(client: Client, workflow_id: str, run_id: str | None = None) -> str:
    """Replay a workflow's history through the current code; ReplayFailed if it differs."""
    handle = client.get_workflow_handle(workflow_id, run_id=run_id)
    history = await handle.fetch_history()
    result = await Replayer(workflows=ALL_WORKFLOWS).replay_workflow(history, raise_on_replay_failure=False)
    if result.replay_failure is not None:
        raise ReplayFailed(f"{workflow_id}: {result.replay_failure}")
    return f"{workflow_id}: {len(history.events)} events replayed on the current code, deterministic"


async def auto_approve(
    handle: WorkflowHandle[Any, Any],
    approver: Callable[[Any], str | None],
    comment: str,
    interval_s: float = 0.3,
    on_decision: Callable[[Any], None] | None = None,
    key_of: Callable[[str], Path | None] | None = None,
) -> list[Any]:
    """Approve every approve / reject gate the run waits at, until it ends (the demo and the
    bench: a person does this in production). Choice gates (`failure:*`) are left alone, so a
    failure still rolls back by its default. `approver(pending_gate)` names who approves
    (None: leave that gate alone); `key_of(name)` is the key that person signs with (the
    lab's approver keys). Returns the gate records."""
    from temporalio.client import WorkflowExecutionStatus as Status

    from workflows.gates import Decision

    records: list[Any] = []
    while True:
        status, _ = await describe(handle)
        if status is not None and status != Status.RUNNING:
            return records
        try:
            waiting = await pending_gates(handle)
        except RPCError:
            waiting = []  # no worker answered the query yet
        for g in waiting:
            by = None if g.choices else approver(g)
            if by is None:
                continue
            try:
                record = await decide(
                    handle,
                    True,
                    Decision(gate=g.gate, by=by, plan_hash=g.plan_hash, comment=comment),
                    key=key_of(by) if key_of is not None else None,
                )
            except DecisionRefused:
                continue  # decided meanwhile (or no longer waiting): look again
            records.append(record)
            if on_decision is not None:
                on_decision(record)
        await asyncio.sleep(interval_s)
