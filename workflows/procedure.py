"""What every procedure shares: how it touches the world, and what happens when a step fails.

A procedure's workflow class derives from `Procedure` and gets, once for all:

* **activity calls** with the right safety: `read` (a read-only check, safe to cancel),
  `change` (a change to the site, never abandoned half-way: on cancellation it finishes
  before anything is compensated, see `settle`) and `wait` (a long wait with its own
  deadline). Timeouts follow one model (workflows/timeouts.py): every activity heartbeats,
  so a lost worker is noticed within `HEARTBEAT` whatever the activity. Retries are made
  here, in workflow code (each attempt is one activity execution with its own history events), so the timeline
  counts them per step and shows why a step is retrying;
* **steps** (`step`): one timeline record per step, with **guided failure**: when a step
  still fails after its retries and the run is guided (`on_failure="ask"`), the workflow
  opens the gate `failure:<seed step>[@node]` offering `retry`, `skip` (only for steps
  marked skippable), `rollback` and `abort`; the fail-safe default on timeout is
  `rollback`. `abort` stops the run as is, leaving everything in place, and fails it with
  a report of the state (what was changed and not undone, the backups kept);
* **the rollback frame** (`run_changes`): runs the change phase and, on failure or
  cancellation, the saga's compensations newest first (an abort skips them);
* the approval gates (`GatedWorkflow`), the saga and the timeline.

Deterministic: only workflow APIs inside.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception
from temporalio.exceptions import TimeoutError as ActivityTimeout

from errors import (
    GATE_REJECTED,
    INVALID_INPUT,
    PREFLIGHT_FAILED,
    PROCEDURE_ABORTED,
    PROCEDURE_FAILED,
    UNEXPECTED_STATE,
)
from workflows import timeouts
from workflows.balancers import PATCH_LB_GUARD, Balancers, lb_guard
from workflows.gates import GatedWorkflow, Gates, GateSpec
from workflows.saga import Saga, reason
from workflows.timeline import Progress, Timeline

T = TypeVar("T")
A = TypeVar("A")  # an activity's argument
R = TypeVar("R")  # an activity's result

# Whether a failed attempt is tried again is the error's own `non_retryable` flag (errors/:
# one type may be either, e.g. a deadlock and a refused login are both DatabaseError). Runs
# started before PATCH_RETRY_BY_FLAG also failed at once on the types of this list, which
# stays for them to replay as they ran.
LEGACY_NON_RETRYABLE = [
    "SecretUnavailable",
    "SshAuthFailed",
    "SshHostKeyMismatch",
    "SshCommandFailed",
    "LbMemberNotFound",
    "PackageMissing",
    "PackageCorrupt",
    "VersionNotNewer",
    "VersionMismatch",
    "LoginFailed",
    "DrainTimeout",
    "NotUpTimeout",
    "HealthCheckFailed",
    "AdminAuthFailed",
    "InvalidRequest",
    "MigrationFailed",
    "DatabaseError",
]
PATCH_RETRY_BY_FLAG = "procedure-retry-by-error-flag-v1"
# A local activity's retryable failure is retried like an activity's (it arrives unwrapped).
PATCH_RETRY_LOCAL = "procedure-retry-local-activities-v1"
PREFLIGHT_RETRY = RetryPolicy(
    maximum_attempts=3, initial_interval=timedelta(seconds=1), non_retryable_error_types=LEGACY_NON_RETRYABLE
)
ACTION_RETRY = RetryPolicy(
    maximum_attempts=5,
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
    non_retryable_error_types=LEGACY_NON_RETRYABLE,
)
# The timeout model (workflows/timeouts.py): every activity heartbeats, so every one gets
# the same heartbeat timeout; these names stay for the procedures that import them.
HEARTBEAT = timeouts.HEARTBEAT
LONG_HEARTBEAT = timeouts.HEARTBEAT
LONG = timeouts.LONG
# One attempt per activity execution: the retry loop below is the workflow's own.
_ONE_ATTEMPT = RetryPolicy(maximum_attempts=1)

# Versioned change (ARCHITECTURE.md, "Versioning"): no back-off before re-running an attempt
# that timed out (its worker was lost).
PATCH_RETRY_LOST_AT_ONCE = "procedure-retry-lost-attempt-at-once-v1"

FAILURE_CHOICES = ("retry", "skip", "rollback", "abort")
# A failed step: roll back at once, or ask at a gate `failure:<step>` (retry / skip /
# rollback / abort; rollback when nobody decides in time).
OnFailure = Literal["ask", "rollback"]
ON_FAILURE: tuple[OnFailure, ...] = ("ask", "rollback")


@dataclass(frozen=True, kw_only=True)
class ProcedureOptions:
    """The options every procedure takes: each Input derives from this (keyword-only, so a
    procedure's own fields come first), and its fields stay top-level in the input's JSON,
    as stored histories hold them. A procedure states its own `on_failure` default where it
    differs (rolling-deploy, minor-blue-green and major-maintenance-window roll back: their
    changes undo cleanly and quickly; the others ask)."""

    # Check everything and return the plan; change nothing.
    dry_run: bool = False
    # Who started the run (the CLI fills it in): may not decide its own gates.
    started_by: str | None = None
    # How long an approval gate waits before its fail-safe default.
    gate_timeout_s: float = 3600.0
    on_failure: OnFailure = "ask"
    # How long a failure gate waits; then rollback.
    failure_gate_timeout_s: float = 3600.0


class Aborted(Exception):
    """An operator chose `abort` at a failure gate: stop as is, undo nothing."""

    def __init__(self, step: str, by: str | None, cause: BaseException) -> None:
        super().__init__(step)
        self.step, self.by, self.cause = step, by, cause


class Procedure(GatedWorkflow):
    """Base of every procedure workflow (see the module docstring)."""

    procedure = "procedure"

    def __init__(self) -> None:
        self.timeline = Timeline(self.procedure)
        self.saga = Saga()
        self.gates = Gates(self.timeline)
        self.plan_hash = ""
        # Guided failure: off during preflight (read-only, it just reports) and rollback.
        self.guided = False
        self.failure_gate_timeout_s = 3600.0
        # What the abort report lists as kept (backups, artefacts): name -> where.
        self.kept: dict[str, str] = {}
        # Changes under way: on cancellation they finish before anything is compensated.
        self._in_flight: set[asyncio.Future[Any]] = set()
        # What the run set on its balancers, set again after a reload (workflows/balancers.py).
        self.balancers = Balancers()

    @workflow.query
    def progress(self) -> Progress:
        return self.timeline.snapshot()

    # ------------------------------------------------------------------ the opening
    def begin(self, opts: ProcedureOptions) -> None:
        """Before anything is read: the options checked (bad input stops the run here), the
        failure gates' timeout kept."""
        check_on_failure(opts.on_failure)
        self.failure_gate_timeout_s = opts.failure_gate_timeout_s

    def planned(
        self,
        opts: ProcedureOptions,
        approvers: Mapping[str, tuple[str, ...]],
        plan: Sequence[str],
        approver_keys: Mapping[str, tuple[str, ...]] | None = None,
    ) -> bool:
        """Once preflight has made the plan: its hash (what a decider approves; `zerodown
        plan` prints it) and the gates configured. True for a dry run: the caller returns the
        plan, nothing was changed."""
        self.plan_hash = hashlib.sha256("\n".join(plan).encode()).hexdigest()
        self.gates.configure(dict(approvers), opts.started_by, self.plan_hash, dict(approver_keys or {}))
        if opts.dry_run:
            self.timeline.set_phase("planned (dry run): nothing was changed")
        return opts.dry_run

    # ------------------------------------------------------------------ steps
    async def step(
        self,
        name: str,
        make: Callable[[], Awaitable[T]],
        *,
        node: str | None = None,
        seed_step: str | None = None,
    ) -> T:
        """Run one step (a timeline record); on failure, guided as the module docstring says.
        `make` builds the step's awaitable afresh for each run (an operator's `retry`)."""
        result = await self._guided_step(name, make, node, seed_step, skippable=False)
        return result  # type: ignore[return-value]  # None only when skipped, not offered here

    async def all_of(self, *steps: Awaitable[T]) -> list[T]:
        """Steps side by side (one per server, or reads of a site that no longer changes):
        every one is let finish before the first failure, in the order given, is raised, so
        a rollback never starts while a sibling is still changing the site."""
        results = await asyncio.gather(*steps, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results  # type: ignore[return-value]  # no exception left: all T

    async def skippable_step(
        self,
        name: str,
        make: Callable[[], Awaitable[T]],
        *,
        node: str | None = None,
        seed_step: str | None = None,
    ) -> T | None:
        """A step the run can do without (a check, a cleanup): `skip` is offered on failure,
        and then None is returned."""
        return await self._guided_step(name, make, node, seed_step, skippable=True)

    async def _guided_step(
        self,
        name: str,
        make: Callable[[], Awaitable[T]],
        node: str | None,
        seed_step: str | None,
        skippable: bool,
    ) -> T | None:
        reruns = 0
        while True:
            try:
                return await self.timeline.step(name, make(), node=node, seed_step=seed_step, retries=reruns)
            except Exception as e:
                if not self._guidable(e):
                    raise
                choice, by = await self._failure_gate(name, node, seed_step, e, skippable)
                if choice == "retry":
                    reruns += 1
                    continue
                if choice == "skip":
                    self.timeline.record(
                        f"{name}: skipped",
                        "skipped",
                        node=node,
                        seed_step=seed_step,
                        detail=f"skipped by {by} after: {reason(e)}",
                    )
                    return None
                if choice == "abort":
                    raise Aborted(name + (f" on {node}" if node else ""), by, e) from e
                raise  # rollback

    def _guidable(self, e: BaseException) -> bool:
        if not self.guided or is_cancelled_exception(e) or isinstance(e, Aborted):
            return False
        if isinstance(e, ApplicationError) and e.type in (GATE_REJECTED, PREFLIGHT_FAILED):
            return False  # a decision or a refusal, not a failure to recover from
        return True

    async def _failure_gate(
        self, name: str, node: str | None, seed_step: str | None, e: BaseException, skippable: bool
    ) -> tuple[str, str | None]:
        gate = "failure:" + (seed_step or _slug(name)) + (f"@{node}" if node else "")
        choices = tuple(c for c in FAILURE_CHOICES if c != "skip" or skippable)
        if not self.gates.approvers_of(gate):
            self.timeline.record(
                f"gate {gate}: nobody may decide it",
                "skipped",
                detail="the inventory lists no approvers for failure gates: rolling back",
            )
            return "rollback", None
        record = await self.gates.wait(
            GateSpec(
                name=gate,
                guards=f"'{name}'" + (f" on {node}" if node else "") + f" failed: {reason(e)}",
                timeout_s=self.failure_gate_timeout_s,
                on_timeout="rollback",
                choices=choices,
            )
        )
        return record.choice or "rollback", record.by

    # ------------------------------------------------------------------ the change phase
    async def run_changes(self, body: Callable[[], Awaitable[T]], what: str) -> T:
        """Run the change phase; on failure or cancellation compensate (an abort does not)."""
        try:
            return await body()
        except asyncio.CancelledError:
            self.guided = False
            self.timeline.set_phase("cancelled: finishing the step under way, then rolling back")
            await self.settle()
            await self.saga.compensate()
            self.timeline.set_phase("cancelled, rolled back")
            raise
        except Aborted as a:
            self.guided = False
            self.timeline.set_phase("aborted by an operator: everything left in place")
            raise ApplicationError(
                self._abort_report(what, a), type=PROCEDURE_ABORTED, non_retryable=True
            ) from a.cause
        except Exception as e:
            self.guided = False
            # Name the step that failed before the compensations add steps of their own (not a
            # failure gate that timed out after it: that gate only decided to roll back).
            failed = next(
                (
                    s
                    for s in reversed(self.timeline.steps)
                    if s.result == "failed" and not s.name.startswith("gate failure:")
                ),
                None,
            )
            where = (f" at '{failed.name}'" + (f" on {failed.node}" if failed.node else "")) if failed else ""
            self.timeline.set_phase("failed: rolling back")
            records = await self.saga.compensate()
            undone = ", ".join(r.name + ("" if r.ok else f" (FAILED: {r.error})") for r in records)
            self.timeline.set_phase("failed, rolled back")
            raise ApplicationError(
                f"{what} failed{where}: {reason(e)}. Rolled back: {undone or 'nothing to undo'}.",
                type=PROCEDURE_FAILED,
                non_retryable=True,
            ) from e

    def _abort_report(self, what: str, a: Aborted) -> str:
        done = [s for s in self.timeline.steps if s.result == "ok" and not s.name.startswith("gate ")]
        last = (
            f" (last: {done[-1].name}" + (f" on {done[-1].node}" if done[-1].node else "") + ")"
            if done
            else ""
        )
        lines = [
            f"{what} aborted by {a.by or 'an operator'} at '{a.step}' ({reason(a.cause)}); "
            "nothing was undone. State:",
            f"  steps completed: {len(done)}{last}",
            "  changes not undone (newest first): " + (", ".join(self.saga.pending()) or "none"),
        ]
        lines += [f"  kept: {k}: {v}" for k, v in self.kept.items()]
        return "\n".join(lines)

    # ------------------------------------------------------------------ activity calls
    # Typed like the SDK's execute_activity: the activity's one argument and its result, so a
    # caller's request and result types are checked, not annotated by hand.
    async def read(
        self,
        fn: Callable[[A], Awaitable[R]],
        arg: A,
        retry: RetryPolicy = PREFLIGHT_RETRY,
        timeout: timedelta = timeouts.READ,
        local: bool = False,
    ) -> R:
        """A read-only check: safe to cancel at any moment. `local`: see `change`."""
        return await self._attempts(fn, arg, timeout, None, retry, local)

    async def change(
        self,
        fn: Callable[[A], Awaitable[R]],
        arg: A,
        timeout: timedelta = timeouts.CHANGE,
        heartbeat: timedelta | None = None,
        local: bool = False,
    ) -> R:
        """A change to the site: never abandoned half-way. On cancellation the workflow lets
        it finish (see `settle`) before compensating, so a half-copied folder is never
        restored over and a half-applied migration never raced by its down script.
        `heartbeat`: its heartbeat timeout (default: the model's HEARTBEAT; every activity
        heartbeats, see workflows/timeouts.py). `local`: a quick one (a runtime API command,
        well under a second, no heartbeat) run as a local activity, in the worker that runs
        the workflow, without the server's round trips: for steps where every millisecond is
        downtime (a maintenance window). A worker lost during it runs it again (it must be
        idempotent, as every activity is)."""
        await self._guard_balancers(arg)
        task = asyncio.ensure_future(self._attempts(fn, arg, timeout, heartbeat, ACTION_RETRY, local))
        self._in_flight.add(task)
        try:
            result = await asyncio.shield(task)
        finally:
            if task.done():
                self._in_flight.discard(task)
        self.balancers.record(fn, arg)
        return result

    async def wait(self, fn: Callable[[A], Awaitable[R]], arg: A, timeout_s: float) -> R:
        """A long wait: heartbeating, so a lost worker is detected within HEARTBEAT."""
        await self._guard_balancers(arg)
        return await self._attempts(fn, arg, timeouts.wait(timeout_s), HEARTBEAT, ACTION_RETRY)

    async def _guard_balancers(self, arg: Any) -> None:
        """Before a change: has a balancer this run changed been reloaded meanwhile? Then set
        what the run set on it again (workflows/balancers.py)."""
        lbs = self.balancers.to_guard(arg)
        if not lbs or not workflow.patched(PATCH_LB_GUARD):
            return
        for lb in lbs:
            request = self.balancers.request(lb)
            result = await self._attempts(lb_guard, request, timeouts.READ, None, ACTION_RETRY, local=True)
            self.balancers.saw(lb, result)
            if result.reloaded and request.expected is not None:
                self.timeline.record(
                    f"balancer {lb.name} reloaded",
                    "ok",
                    detail=(
                        f"HAProxy pid {request.expected.pid} -> {result.process.pid}: the run's "
                        f"state set again: {', '.join(result.reapplied) or 'nothing to set'}"
                    ),
                )

    async def settle(self) -> None:
        """Wait for every change under way to finish (its outcome is the saga's to undo)."""
        for task in list(self._in_flight):
            try:
                await task
            except BaseException as e:  # its failure is what the compensation is for
                workflow.logger.info("change under way at cancellation ended with: %s", e)
        self._in_flight.clear()

    async def _attempts(
        self,
        fn: Callable[[A], Awaitable[R]],
        arg: A,
        timeout: timedelta,
        heartbeat: timedelta | None,
        retry: RetryPolicy,
        local: bool = False,
    ) -> R:
        """Run an activity with `retry`'s policy, one execution per attempt, counting retries."""
        attempt = 1
        while True:
            try:
                if local:
                    return await workflow.execute_local_activity(
                        fn, arg, start_to_close_timeout=timeout, retry_policy=_ONE_ATTEMPT
                    )
                return await workflow.execute_activity(
                    fn,
                    arg,
                    start_to_close_timeout=timeout,
                    heartbeat_timeout=heartbeat or HEARTBEAT,
                    retry_policy=_ONE_ATTEMPT,
                )
            except (ActivityError, ApplicationError) as e:
                if isinstance(e, ApplicationError):
                    # A local activity's failure arrives as the activity's own error, not
                    # wrapped in ActivityError: retried alike since PATCH_RETRY_LOCAL (before,
                    # it failed the step at once).
                    if (
                        not local
                        or e.non_retryable
                        or attempt >= (retry.maximum_attempts or 1)
                        or not workflow.patched(PATCH_RETRY_LOCAL)
                    ):
                        raise
                    cause: BaseException | None = e
                else:
                    if attempt >= (retry.maximum_attempts or 1) or not _retryable(e, retry):
                        raise
                    cause = e.cause
                self.timeline.retrying(reason(e))
                # An attempt lost with its worker (timed out) is run again at once: waiting
                # adds nothing, the failure was not the site's.
                if not (isinstance(cause, ActivityTimeout) and workflow.patched(PATCH_RETRY_LOST_AT_ONCE)):
                    await workflow.sleep(_backoff(retry, attempt))
                attempt += 1


def _retryable(e: ActivityError, retry: RetryPolicy) -> bool:
    cause = e.cause
    if isinstance(cause, ApplicationError):
        if cause.non_retryable:
            return False
        if cause.type not in (retry.non_retryable_error_types or ()):
            return True
        # Only where the old rule differs is the patch asked (runs that never met such an
        # error carry no marker): a retryable DatabaseError (deadlock, lost connection).
        return workflow.patched(PATCH_RETRY_BY_FLAG)
    # Timeouts (a lost worker, a stuck call) are worth another attempt; a cancel is not.
    return isinstance(cause, ActivityTimeout)


def _backoff(retry: RetryPolicy, attempt: int) -> timedelta:
    first = retry.initial_interval.total_seconds()
    delay = first * (retry.backoff_coefficient ** (attempt - 1))
    cap = retry.maximum_interval.total_seconds() if retry.maximum_interval else 100 * first
    return timedelta(seconds=min(delay, cap))


def required(value: T | None, what: str) -> T:
    """`value`, which an earlier check guarantees; otherwise a non-retryable UnexpectedState
    fails the run with `what` (an `assert` would fail the workflow task, retried forever)."""
    if value is None:
        raise ApplicationError(
            f"internal: {what} is missing (a check before should have said so)",
            type=UNEXPECTED_STATE,
            non_retryable=True,
        )
    return value


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")[:40] or "step"


def check_on_failure(value: str) -> None:
    if value not in ON_FAILURE:
        raise ApplicationError(
            f"on_failure must be one of {', '.join(ON_FAILURE)}, got {value!r}",
            type=INVALID_INPUT,
            non_retryable=True,
        )


async def require_approval(gates: Gates, spec: GateSpec) -> None:
    """Wait at an approve / reject gate; anything but an approval stops the run (rolls back)."""
    decision = await gates.wait(spec)
    if not decision.approved:
        by = f" by {decision.by}" if decision.by else ""
        raise ApplicationError(
            f"gate {spec.name} {decision.outcome}{by}"
            + (f": {decision.comment}" if decision.comment else ""),
            type=GATE_REJECTED,
            non_retryable=True,
        )
