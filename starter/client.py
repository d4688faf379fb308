"""Starting, watching and replaying procedures: what the CLI does, as plain async functions."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes
from temporalio.service import RPCError
from temporalio.worker import Replayer

from workflows.inventory import Inventory
from workflows.registry import ALL_WORKFLOWS, INPUTS, PROCEDURES
from workflows.timeline import Progress

PROCEDURE_KEY = SearchAttributeKey.for_keyword("ZerodownProcedure")
SITE_KEY = SearchAttributeKey.for_keyword("ZerodownSite")


class UnknownProcedureError(ValueError):
    pass


# Input fields whose CLI option is not simply the field's name.
_CLI_OPTION = {"only_nodes": "--nodes"}


def procedure_input(procedure: str, **fields: Any) -> Any:
    """The procedure's input from the CLI's options; an option the procedure does not take
    is refused when it was given (not empty), silently left out otherwise."""
    if procedure not in PROCEDURES:
        raise UnknownProcedureError(
            f"unknown procedure {procedure!r} (known: {', '.join(sorted(PROCEDURES))})")
    cls = INPUTS[procedure]
    accepted = {f.name for f in dataclasses.fields(cls)}
    unusable = sorted(k for k, v in fields.items() if k not in accepted and v)
    if unusable:
        options = ", ".join(_CLI_OPTION.get(k, "--" + k.replace("_", "-").removesuffix("-s"))
                            for k in unusable)
        raise UnknownProcedureError(f"{procedure} does not take {options}")
    return cls(**{k: v for k, v in fields.items() if k in accepted})


def new_workflow_id(procedure: str, site: str, now: datetime | None = None) -> str:
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S%f")[:-3]
    return f"{procedure}-{re.sub(r'[^A-Za-z0-9_.-]', '-', site)}-{stamp}"


async def start_procedure(client: Client, procedure: str, inventory: Inventory, arg: Any,
                          task_queue: str, workflow_id: str | None = None) -> WorkflowHandle[Any, Any]:
    """Start a procedure, tagged with search attributes (skipped if the server lacks them)."""
    wf_id = workflow_id or new_workflow_id(procedure, inventory.site)
    attrs = TypedSearchAttributes([SearchAttributePair(PROCEDURE_KEY, procedure),
                                   SearchAttributePair(SITE_KEY, inventory.site)])
    try:
        return await client.start_workflow(procedure, arg, id=wf_id, task_queue=task_queue,
                                           search_attributes=attrs)
    except RPCError as e:
        if "search attribute" not in str(e).lower():
            raise
        # A server that was not started by `zerodown server` may lack our attributes.
        return await client.start_workflow(procedure, arg, id=wf_id, task_queue=task_queue)


async def progress(handle: WorkflowHandle[Any, Any]) -> Progress:
    result: Progress = await handle.query("progress", result_type=Progress)
    return result


@dataclass(frozen=True)
class Outcome:
    ok: bool
    result: Any
    error: str | None


async def wait_with_progress(client: Client, handle: WorkflowHandle[Any, Any], result_type: type,
                             on_progress: Callable[[Progress], None] | None = None,
                             interval_s: float = 0.5) -> Outcome:
    """Wait for the result, calling on_progress with the live timeline meanwhile."""
    typed = client.get_workflow_handle(handle.id, run_id=handle.run_id, result_type=result_type)
    task = asyncio.ensure_future(typed.result())
    try:
        while not task.done():
            if on_progress is not None:
                try:
                    on_progress(await progress(handle))
                except RPCError:
                    pass  # no worker answered the query yet
            await asyncio.wait([task], timeout=interval_s)
        return Outcome(ok=True, result=task.result(), error=None)
    except WorkflowFailureError as e:
        return Outcome(ok=False, result=None, error=failure_message(e))
    finally:
        task.cancel()  # a no-op when done; when we are cancelled, nothing is left behind


def failure_message(e: BaseException) -> str:
    from workflows.saga import reason

    return reason(e)


async def describe(handle: WorkflowHandle[Any, Any]) -> tuple[WorkflowExecutionStatus | None, str]:
    d = await handle.describe()
    return d.status, d.workflow_type


class DecisionRefused(RuntimeError):
    """The workflow's validator refused a gate decision (the message says why)."""


async def decide(handle: WorkflowHandle[Any, Any], approve: bool, decision: Any) -> Any:
    from workflows.gates import GateRecord

    name = "choose" if getattr(decision, "choice", "") else "approve" if approve else "reject"
    try:
        return await handle.execute_update(name, decision, result_type=GateRecord)
    except WorkflowUpdateFailedError as e:
        raise DecisionRefused(failure_message(e.cause or e)) from None


async def pending_gates(handle: WorkflowHandle[Any, Any]) -> list[Any]:
    from workflows.gates import PendingGate

    gates: list[Any] = await handle.query("pending_gates", result_type=list[PendingGate])
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


async def auto_approve(handle: WorkflowHandle[Any, Any], approver: Callable[[Any], str | None],
                       comment: str, interval_s: float = 0.3,
                       on_decision: Callable[[Any], None] | None = None) -> list[Any]:
    """Approve every approve / reject gate the run waits at, until it ends (the demo and the
    bench: a person does this in production). Choice gates (`failure:*`) are left alone, so a
    failure still rolls back by its default. `approver(pending_gate)` names who approves
    (None: leave that gate alone). Returns the gate records."""
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
                record = await decide(handle, True, Decision(gate=g.gate, by=by, plan_hash=g.plan_hash,
                                                             comment=comment))
            except DecisionRefused:
                continue  # decided meanwhile (or no longer waiting): look again
            records.append(record)
            if on_decision is not None:
                on_decision(record)
        await asyncio.sleep(interval_s)
