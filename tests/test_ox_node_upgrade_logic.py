"""ox-node-upgrade's logic (seed 002, steps 0 to 9 and the post process) under Temporal's
time-skipping test server, with the same-name stand-in activities of tests/ox_fake_site.py;
its ox-upgradeschemata children run on the same worker.

Covered: the happy path (step 0 on every old node, then node by node 1, 2, 8, 3 (first node
only), 2 start, 9, 4-7 by a child workflow for the node's share of the schemata, and the
post process; the main balancer never empty); the `server-already-registered` gate (an
hour without a decision: abort, nothing changed; continue: the existing server used); the
failure gate `failure:2@ox1` (retry after the fix, rollback, abort, its timeout) and the
child's own gate `failure:6@<schema>` decided on the child; retryable errors retried and
counted; the rollback after a failed pilot schema (the child reverts the schema, then the
compensations newest first); and the rollback after a schema has moved to the new server
(the upgraded nodes stay, and the old nodes must keep redirecting its users).
Gate timeouts are an hour: time skipping makes them pass at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from temporalio.client import WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from errors import LB_RUNTIME_API_ERROR, SSH_UNREACHABLE
from tests.gate_support import choose, pending
from tests.ox_fake_site import (
    MAIN,
    NEW,
    NEW_SERVER,
    OLD,
    OLD_GROUP,
    OLD_SERVER,
    OLD_SERVER_ID,
    SECONDARY,
    SECONDARY_URL,
    FakeOx,
    ox_site,
    schema_name,
)
from tests.temporal_env import running_worker
from workflows.gates import PendingGate
from workflows.ox_node_upgrade import (
    HAZELCAST_GROUP_KEY,
    REDIRECT_KEY,
    SERVER_NAME_KEY,
    NodeShare,
    OxNodeUpgradeInput,
    OxNodeUpgradeResult,
    OxNodeUpgradeWorkflow,
)
from workflows.ox_steps import REGISTERED_GATE
from workflows.ox_upgradeschemata import OxUpgradeSchemataResult, OxUpgradeSchemataWorkflow
from workflows.timeline import StepRecord

S1, S2, S10 = (schema_name(i) for i in (1, 2, 10))
HOUR = 3600.0
NEW_ID = OLD_SERVER_ID + 1
NEW_GROUP = f"{OLD_GROUP}-{NEW}"
HEALTHY = f"2 healthy on {NEW}"
Handle = WorkflowHandle[Any, OxNodeUpgradeResult]
Move = tuple[str, str | None, str]


def inp(n: int = 2, **kw: Any) -> OxNodeUpgradeInput:
    fields: dict[str, Any] = {
        "inventory": ox_site(n),
        "version": NEW,
        "server_name": NEW_SERVER,
        "started_by": "starter",
        "failure_gate_timeout_s": HOUR,
        "gate_timeout_s": HOUR,
    }
    fields.update(kw)
    return OxNodeUpgradeInput(**fields)


def fake_site(n: int = 2, **kw: Any) -> FakeOx:
    return FakeOx([f"ox{i}" for i in range(1, n + 1)], **kw)


@asynccontextmanager
async def started(
    env: WorkflowEnvironment, task_queue: str, fake: FakeOx, arg: OxNodeUpgradeInput
) -> AsyncIterator[Handle]:
    async with running_worker(
        env.client, task_queue, [OxNodeUpgradeWorkflow, OxUpgradeSchemataWorkflow], fake.activities()
    ):
        yield await env.client.start_workflow(
            OxNodeUpgradeWorkflow.run, arg, id=f"wf-{task_queue}", task_queue=task_queue
        )


async def finish(handle: Handle) -> OxNodeUpgradeResult:
    return await asyncio.wait_for(handle.result(), 60)


async def failed(handle: Handle) -> tuple[ApplicationError, list[StepRecord]]:
    """The run's failure and its timeline (queried after the end)."""
    with pytest.raises(WorkflowFailureError) as info:
        await finish(handle)
    cause = info.value.cause
    assert isinstance(cause, ApplicationError)
    progress = await handle.query(OxNodeUpgradeWorkflow.progress)
    return cause, list(progress.steps)


async def child_gate(
    env: WorkflowEnvironment, child_id: str, gate: str
) -> tuple[WorkflowHandle[Any, Any], PendingGate]:
    """A gate of a child workflow, once the child exists."""
    child = env.client.get_workflow_handle(child_id)
    for _ in range(100):
        try:
            return child, await pending(child, gate)
        except RPCError:  # not started yet
            await asyncio.sleep(0.1)
    raise AssertionError(f"child {child_id} never started")


def moves(fake: FakeOx) -> list[Move]:
    return [(c.name, c.target, c.detail) for c in fake.mutations()]


# ---------------------------------------------------------------------------- the runbook's calls
def redirect_on(n: str) -> list[Move]:
    """0: migrationRedirectURL to the secondary balancer, configuration reloaded."""
    return [("ox_set_property", n, f"redirect={SECONDARY_URL}"), ("ox_reload_configuration", n, "")]


def out_of(lb: str, n: str) -> list[Move]:
    return [("lb_set_state", n, f"{lb}=drain"), ("lb_set_state", n, f"{lb}=maint")]


def into(lb: str, n: str) -> list[Move]:
    return [("lb_set_state", n, f"{lb}=ready")]


def node_turn(n: str, register_on: str | None = None) -> list[Move]:
    """1 out of main; 2 stop, install, its own Hazelcast cluster, SERVER_NAME; 8 no redirect;
    3 (first node) register; 2 start; 9 into the secondary."""
    return [
        *out_of(MAIN, n),
        ("stop_service", n, ""),
        ("ox_install_version", n, NEW),
        ("ox_set_property", n, f"hazelcast={NEW_GROUP}"),
        ("ox_set_property", n, f"SERVER_NAME={NEW_SERVER}"),
        ("ox_set_property", n, "redirect=None"),
        *([("ox_register_server", register_on, NEW_SERVER)] if register_on else []),
        ("start_service", n, ""),
        *into(SECONDARY, n),
    ]


def schemata_by(n: str, *schemata: str) -> list[Move]:
    """4-7 (the child workflow): runupdate on the node just upgraded."""
    return [("ox_upgrade_schema", s, n) for s in schemata]


def node_back(n: str) -> list[Move]:
    """A node's rollback: out of the secondary, the old release and properties, into main."""
    return [
        *out_of(SECONDARY, n),
        ("stop_service", n, ""),
        ("ox_install_version", n, OLD),
        ("ox_set_property", n, "redirect=None"),
        ("ox_set_property", n, f"hazelcast={OLD_GROUP}"),
        ("ox_set_property", n, f"SERVER_NAME={OLD_SERVER}"),
        ("start_service", n, ""),
        *into(MAIN, n),
    ]


def redirect_back(n: str) -> list[Move]:
    return [("ox_set_property", n, "redirect=None"), ("ox_reload_configuration", n, "")]


def assert_balancers_as_at_start(fake: FakeOx) -> None:
    """Every node serving in the main balancer, none in the secondary."""
    assert set(fake.members(MAIN).values()) == {"ready"}
    assert set(fake.members(SECONDARY).values()) == {"maint"}


def assert_upgraded(fake: FakeOx) -> None:
    for n in fake.nodes:
        assert (fake.installed[n], fake.running[n]) == (NEW, NEW), n
        assert fake.prop(n, SERVER_NAME_KEY) == NEW_SERVER and fake.prop(n, REDIRECT_KEY) is None, n
        assert fake.prop(n, HAZELCAST_GROUP_KEY) == NEW_GROUP, n
    assert_balancers_as_at_start(fake)
    assert set(fake.states().values()) == {(fake.server_id(NEW_SERVER), True, NEW)}


def assert_as_before(fake: FakeOx) -> None:
    for n in fake.nodes:
        assert (fake.installed[n], fake.running[n]) == (OLD, OLD), n
        assert fake.prop(n, SERVER_NAME_KEY) == OLD_SERVER and fake.prop(n, REDIRECT_KEY) is None, n
        assert fake.prop(n, HAZELCAST_GROUP_KEY) == OLD_GROUP, n
    assert_balancers_as_at_start(fake)
    assert set(fake.states().values()) == {(OLD_SERVER_ID, True, OLD)}


def outcomes(steps: list[StepRecord] | tuple[StepRecord, ...], name: str, n: str) -> list[tuple[str, int]]:
    return [(s.result, s.retries) for s in steps if s.name == name and s.node == n]


def seed_order(steps: tuple[StepRecord, ...], n: str) -> list[str | None]:
    """A node's seed steps in the order they ran after preflight, repeats folded."""
    out: list[str | None] = []
    for s in steps:
        if s.node == n and not s.name.startswith("P") and (not out or out[-1] != s.seed_step):
            out.append(s.seed_step)
    return out


# ---------------------------------------------------------------------------- 1 happy path
async def test_node_by_node_in_the_runbooks_order(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = fake_site(3)
    async with started(time_skipping_env, task_queue, fake, inp(3)) as handle:
        res = await finish(handle)
    # Default shares on three nodes: ox1 a pilot schema, ox2 the rest (OX's order), ox3 none.
    assert res.shares == (NodeShare("ox1", (S1,)), NodeShare("ox2", (S2, S10)), NodeShare("ox3", ()))
    assert moves(fake) == [
        *redirect_on("ox1"),
        *redirect_on("ox2"),
        *redirect_on("ox3"),
        *node_turn("ox1", register_on="ox3"),
        *schemata_by("ox1", S1),
        *node_turn("ox2"),
        *schemata_by("ox2", S2, S10),
        # Post process pulled forward: the new nodes into main before the last old one leaves.
        *into(MAIN, "ox1"),
        *into(MAIN, "ox2"),
        *node_turn("ox3"),
        *into(MAIN, "ox3"),
        *out_of(SECONDARY, "ox1"),
        *out_of(SECONDARY, "ox2"),
        *out_of(SECONDARY, "ox3"),
    ]
    assert_upgraded(fake)
    assert fake.main_low >= 1  # no moment without a node serving in the main balancer
    assert fake.servers == {OLD_SERVER_ID: OLD_SERVER, NEW_ID: NEW_SERVER}
    assert (res.previous_version, res.version, res.dry_run) == (OLD, NEW, False)
    assert res.upgraded_schemata == (S1, S2, S10) and res.failed_schemata == ()
    assert res.children == (f"wf-{task_queue}-schemata-ox1", f"wf-{task_queue}-schemata-ox2")
    assert seed_order(res.steps, "ox1") == ["0", "1", "2", "8", "2", "9", "4", "post"]
    assert seed_order(res.steps, "ox3") == ["0", "3", "1", "2", "8", "2", "9", "post"]
    assert all(s.result == "ok" and s.retries == 0 for s in res.steps if s.result != "skipped")
    # The first child used the server step 3 registered, without asking.
    child = await time_skipping_env.client.get_workflow_handle(
        res.children[0], result_type=OxUpgradeSchemataResult
    ).result()
    assert (child.upgraded, child.server_id, child.server_registered) == ((S1,), NEW_ID, False)


# ---------------------------------------------------------------------------- 2 the registered-server gate
async def test_registered_server_gate_times_out_to_abort_before_anything_changes(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = fake_site()
    fake.servers[7] = NEW_SERVER
    async with started(time_skipping_env, task_queue, fake, inp()) as handle:
        error, steps = await failed(handle)  # nobody decides within the hour
    assert error.type == "ProcedureAborted" and "nothing was changed" in str(error)
    assert f"gate {REGISTERED_GATE}: timed out, abort" in [s.name for s in steps]
    assert fake.mutations() == []
    assert_as_before(fake)


async def test_registered_server_continue_uses_it_on_every_node(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = fake_site()
    fake.servers[7] = NEW_SERVER
    async with started(time_skipping_env, task_queue, fake, inp()) as handle:
        gate = await pending(handle, REGISTERED_GATE)
        assert gate.on_timeout == "abort" and fake.mutations() == []
        await choose(handle, gate, "continue")
        res = await finish(handle)
    assert "ox_register_server" not in [m[0] for m in moves(fake)]
    assert_upgraded(fake)
    assert fake.server_id(NEW_SERVER) == 7 and set(fake.states().values()) == {(7, True, NEW)}
    assert res.upgraded_schemata == (S1, S2, S10)


# ---------------------------------------------------------------------------- 3 failure gates
@pytest.mark.parametrize("how", ["retry", "rollback", "abort", "timeout"])
async def test_failure_gate_on_an_unhealthy_node(
    time_skipping_env: WorkflowEnvironment, task_queue: str, how: str
) -> None:
    fake = fake_site(unhealthy={"ox1"})
    async with started(time_skipping_env, task_queue, fake, inp()) as handle:
        if how != "timeout":
            gate = await pending(handle, "failure:2@ox1")
            assert gate.choices == ("retry", "rollback", "abort") and gate.on_timeout == "rollback"
            assert "/health answered 500" in gate.guards
            if how == "retry":
                fake.unhealthy.clear()  # the operator fixed the node
            await choose(handle, gate, how)
        if how == "retry":
            res = await finish(handle)
        else:
            error, steps = await failed(handle)  # timeout: the hour passes at once
    if how == "retry":
        assert_upgraded(fake)
        assert outcomes(res.steps, HEALTHY, "ox1") == [("failed", 0), ("ok", 1)]
        assert "gate failure:2@ox1: retry chosen by ops1" in [s.name for s in res.steps]
        return
    if how == "abort":
        # Nothing undone, nothing further: ox1 drained, on the new release; ox2 still redirecting.
        assert error.type == "ProcedureAborted"
        assert "changes not undone (newest first): ox1: back to 7.10.0, ox2: " in str(error)
        assert moves(fake)[-1] == ("start_service", "ox1", "")
        assert (fake.installed["ox1"], fake.members(MAIN)) == (NEW, {"ox1": "maint", "ox2": "ready"})
        assert fake.prop("ox2", REDIRECT_KEY) == SECONDARY_URL
        assert "ox_upgrade_schema" not in [m[0] for m in moves(fake)]
        return
    expected = {
        "rollback": "gate failure:2@ox1: rollback chosen by ops1",
        "timeout": "gate failure:2@ox1: timed out, rollback",
    }[how]
    assert expected in [s.name for s in steps]
    assert_as_before(fake)
    assert error.type == "ProcedureFailed" and "HealthCheckFailed: ox1 /health answered 500" in str(error)
    # The report names the step that failed - not the failure gate's own record, which a
    # timeout marks "failed" too.
    assert f"failed at '{HEALTHY}' on ox1" in str(error)


async def test_the_childs_failure_gate_retry_completes_the_whole_run(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = fake_site(update_fails={S1: 1})
    async with started(time_skipping_env, task_queue, fake, inp()) as handle:
        child, gate = await child_gate(time_skipping_env, f"wf-{task_queue}-schemata-ox1", f"failure:6@{S1}")
        assert gate.choices == ("retry", "skip", "revert", "abort") and gate.on_timeout == "abort"
        assert [m[0] for m in moves(fake)].count("ox_upgrade_schema") == 1  # S2 waits for the decision
        await choose(child, gate, "retry")
        res = await finish(handle)
    assert_upgraded(fake)
    assert res.upgraded_schemata == (S1, S2, S10) and fake.schemata[S1].runupdates == 2


# ---------------------------------------------------------------------------- 4 retries
async def test_retryable_errors_are_retried_and_counted(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = fake_site(flaky={"ox_install_version": [SSH_UNREACHABLE], "lb_set_state": [LB_RUNTIME_API_ERROR]})
    async with started(time_skipping_env, task_queue, fake, inp()) as handle:
        res = await finish(handle)
    assert_upgraded(fake)
    install = [s for s in res.steps if s.name == f"2 install {NEW}" and s.node == "ox1"]
    drain = [s for s in res.steps if s.name == f"1 drain on {MAIN}" and s.node == "ox1"]
    assert [(s.result, s.retries) for s in install + drain] == [("ok", 1), ("ok", 1)]
    assert install[0].detail is not None and "injected SshUnreachable" in install[0].detail
    assert all(s.retries == 0 for s in res.steps if s not in install + drain)
    assert [m[1] for m in moves(fake) if m[0] == "ox_install_version"] == ["ox1", "ox1", "ox2"]


# ---------------------------------------------------------------------------- 5 rollback
async def test_failed_pilot_schema_compensates_newest_first(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = fake_site(update_fails={S1: 1})
    async with started(time_skipping_env, task_queue, fake, inp(on_failure="rollback")) as handle:
        error, steps = await failed(handle)
    assert error.type == "ProcedureFailed"
    assert (
        f"Rolled back: ox1: back to {OLD}, ox2: {REDIRECT_KEY} as before, ox1: {REDIRECT_KEY} as before."
        in str(error)
    )
    done = moves(fake)
    failure = done.index(("ox_upgrade_schema", S1, "ox1"))
    assert done[:failure] == [*redirect_on("ox1"), *redirect_on("ox2"), *node_turn("ox1", register_on="ox2")]
    # The child reverts the schema; then the compensations, newest first: the node, then the
    # redirect URL of every old node in reverse order.
    assert done[failure + 1 :] == [
        ("ox_revert_schema", S1, f"server {OLD_SERVER_ID}"),
        *node_back("ox1"),
        *redirect_back("ox2"),
        *redirect_back("ox1"),
    ]
    assert_as_before(fake)
    assert fake.main_low >= 1
    rollback = [s for s in steps if s.name.startswith("rollback")]
    assert rollback[0].name == f"rollback drain on {SECONDARY}" and rollback[0].node == "ox1"
    assert all(s.result == "ok" for s in rollback)


async def test_rollback_after_a_schema_moved_keeps_its_users_served(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    # The pilot schema is on the new server (served by ox1 through the secondary balancer)
    # when ox2 fails its health check. The docstring: the upgraded nodes stay. The seed:
    # an old node redirects a moved context's users only while migrationRedirectURL is set,
    # so ox3 - the only node left in the main balancer - must keep it.
    fake = fake_site(3, unhealthy={"ox2"})
    async with started(time_skipping_env, task_queue, fake, inp(3, on_failure="rollback")) as handle:
        error, steps = await failed(handle)
    assert error.type == "ProcedureFailed" and f"failed at '{HEALTHY}' on ox2" in str(error)
    names = [s.name for s in steps]
    assert f"rollback: ox2 stays on {NEW}" in names and f"rollback: ox1 stays on {NEW}" in names
    assert fake.states()[S1] == (NEW_ID, True, NEW)
    assert (fake.running["ox1"], fake.lb[(SECONDARY, "ox1")]) == (NEW, "ready")
    assert (fake.running["ox3"], fake.lb[(MAIN, "ox3")]) == (OLD, "ready")
    assert fake.prop("ox3", REDIRECT_KEY) == SECONDARY_URL, (
        f"ox3 lost {REDIRECT_KEY} in the rollback while {S1} lives on the new server: "
        f"{[m for m in moves(fake) if m[1] == 'ox3'][-2:]}"
    )
