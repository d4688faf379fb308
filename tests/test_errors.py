"""One registry of error types (errors/), and retry by the error's own flag.

The registry is checked against the code: every type raised or matched anywhere in
activities, workflows, worker and starter is registered, every registered type is raised
somewhere, and each type's `retryable` says how it is raised (an AST walk: a constant flag,
or an expression). Then a workflow on the dev server: a retryable DatabaseError (a deadlock)
is tried again and the step succeeds; a non-retryable one fails the step at once - before
this registry, procedure.py listed DatabaseError as never retryable and a deadlock failed
the step.
"""

from __future__ import annotations

import ast
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest
from temporalio import activity, workflow
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.testing import WorkflowEnvironment

import errors
from tests.temporal_env import running_worker
from workflows.procedure import Procedure

LAYERS = ("activities", "workflows", "worker", "starter")
CONSTANTS = {k: v for k, v in vars(errors).items() if k.isupper() and isinstance(v, str)}


def _types_in(expr: ast.expr) -> set[str]:
    """The error types an expression can evaluate to: string constants and registry names
    (a conditional or `or` contributes each branch)."""
    found: set[str] = set()
    for n in ast.walk(expr):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value[:1].isupper():
            found.add(n.value)
        elif isinstance(n, ast.Name) and n.id in CONSTANTS:
            found.add(CONSTANTS[n.id])
        elif isinstance(n, ast.Attribute) and n.attr in CONSTANTS:
            found.add(CONSTANTS[n.attr])
    return found


def _flag(expr: ast.expr | None, default: bool) -> str:
    """'retryable', 'not' or 'either' for a keyword's value (None: absent, `default`)."""
    if expr is None:
        return "retryable" if default else "not"
    if isinstance(expr, ast.Constant) and isinstance(expr.value, bool):
        return "retryable" if expr.value else "not"
    return "either"


def scan() -> tuple[dict[str, set[str]], set[str], list[str]]:
    """(type -> how it is raised, types matched in comparisons, raises whose type is unknown)."""
    raised: dict[str, set[str]] = defaultdict(set)
    matched: set[str] = set()
    unknown: list[str] = []
    root = Path(__file__).resolve().parent.parent  # not at import: the sandbox imports this module
    for layer in LAYERS:
        for path in sorted((root / layer).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            where = f"{path.relative_to(root)}"
            if where == "activities/common.py":  # `fail` itself: its callers are scanned
                continue
            if where == "worker/redaction.py":  # re-raises an activity's own error, type kept
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    name = (
                        node.func.id
                        if isinstance(node.func, ast.Name)
                        else (node.func.attr if isinstance(node.func, ast.Attribute) else "")
                    )
                    kw = {k.arg: k.value for k in node.keywords}
                    if name == "fail" and node.args:
                        how = _flag(kw.get("retryable"), default=False)
                        types = _types_in(node.args[0])
                    elif name == "ApplicationError" and "type" in kw:
                        nr = kw.get("non_retryable")
                        how = {"retryable": "not", "not": "retryable", "either": "either"}[
                            _flag(nr, default=False)
                        ]
                        types = _types_in(kw["type"])
                    else:
                        continue
                    if not types:
                        unknown.append(f"{where}:{node.lineno}")
                    for t in types:
                        raised[t].add(how)
                elif isinstance(node, ast.Compare):
                    sides = [node.left, *node.comparators]
                    if any(isinstance(s, ast.Attribute) and s.attr == "type" for s in sides) or any(
                        isinstance(s, ast.Call) and isinstance(s.func, ast.Name) and s.func.id == "error_type"
                        for s in sides
                    ):
                        for s in sides:
                            matched |= _types_in(s)
    return raised, matched, unknown


def test_every_error_type_is_registered_and_raised_as_registered() -> None:
    raised, matched, unknown = scan()
    # A raise whose type is computed elsewhere (a parameter, a result's field) is fine only
    # when it also names a registered fallback; none is fully unknown.
    assert unknown == []
    unregistered = sorted(set(raised) - set(errors.REGISTRY))
    assert unregistered == [], f"raised but not in errors.REGISTRY: {unregistered}"
    unmatched = sorted(matched - set(errors.REGISTRY))
    assert unmatched == [], f"matched but not registered: {unmatched}"
    dead = sorted(set(errors.REGISTRY) - set(raised))
    assert dead == [], f"registered but raised nowhere: {dead}"
    wrong = {}
    for name, hows in raised.items():
        expected = "always" if hows == {"retryable"} else "never" if hows == {"not"} else "either"
        if errors.REGISTRY[name].retryable != expected:
            wrong[name] = (errors.REGISTRY[name].retryable, expected, sorted(hows))
    assert wrong == {}, f"registry's retryable differs from the raises (registry, raises): {wrong}"
    # The workflow's old list named a type nothing raises; no such entry survives.
    assert "MigrationFailed" not in errors.REGISTRY


def test_constants_and_registry_agree() -> None:
    assert set(CONSTANTS.values()) == set(errors.REGISTRY)
    assert len(CONSTANTS) == len(set(CONSTANTS.values()))


# ---------------------------------------------------------------- retry by the flag
ATTEMPTS: dict[str, int] = defaultdict(int)


@dataclass(frozen=True)
class DbCall:
    key: str
    fail_first: int  # attempts that fail before one succeeds
    retryable: bool


@activity.defn
async def db_call(c: DbCall) -> str:
    ATTEMPTS[c.key] += 1
    if ATTEMPTS[c.key] <= c.fail_first:
        # What activities/mysql/connect.py raises for MariaDB's 1213 (deadlock) or 1045 (access denied).
        raise ApplicationError(
            "error 1213: Deadlock found when trying to get lock"
            if c.retryable
            else "error 1045: Access denied",
            type=errors.DATABASE_ERROR,
            non_retryable=not c.retryable,
        )
    return f"done after {ATTEMPTS[c.key]}"


@workflow.defn(name="test-retry-by-flag")
class RetryByFlagWorkflow(Procedure):
    @workflow.run
    async def run(self, c: DbCall) -> str:
        result: str = await self.change(db_call, c)
        return result


async def _run(client: Client, c: DbCall) -> str:
    task_queue = f"retry-{uuid.uuid4().hex[:8]}"
    async with running_worker(client, task_queue, [RetryByFlagWorkflow], [db_call]):
        result: str = await client.execute_workflow(
            RetryByFlagWorkflow.run, c, id=task_queue, task_queue=task_queue
        )
        return result


async def test_a_deadlock_is_tried_again(time_skipping_env: WorkflowEnvironment) -> None:
    c = DbCall(key=uuid.uuid4().hex, fail_first=2, retryable=True)
    # (The retries' backoff timers pass at once on the time-skipping server.)
    assert await _run(time_skipping_env.client, c) == "done after 3"


async def test_a_refused_login_fails_the_step_at_once(client: Client) -> None:
    c = DbCall(key=uuid.uuid4().hex, fail_first=5, retryable=False)
    with pytest.raises(WorkflowFailureError) as info:
        await _run(client, c)
    assert ATTEMPTS[c.key] == 1
    cause = info.value.cause
    assert isinstance(cause, ActivityError) or "Access denied" in str(info.value.cause)
