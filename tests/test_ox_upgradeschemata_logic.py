"""ox-upgradeschemata's logic (seed 002, steps 3 to 7) under Temporal's time-skipping test
server, with the same-name stand-in activities of tests/ox_fake_site.py.

ox1 has the new release installed (the update node: runupdate runs there), ox2 is the
working old node that runs the admin tools. The config DB lists its schemata out of OX's
order (oxdatabase_10, _2, _1), so the walk's order is the workflow's own. Covered: the
happy path (3 register, then 4-7 per schema in OX's order, an empty schema skipped); the
`server-already-registered` gate (timeout: abort, nothing changed; continue: the existing
server used); the failure gate `failure:<step>@<schema>` (retry after the fix, skip,
revert, abort - chosen, by its timeout, or when nobody may decide); retryable errors
retried and counted; `on_failure="rollback"` (the failed schema reverted by the tools'
rules, the finished ones kept, the rest untouched); continue-as-new; a dry run.
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
from temporalio.testing import WorkflowEnvironment

from errors import DATABASE_ERROR, SECRET_UNAVAILABLE, SSH_UNREACHABLE
from tests.gate_support import choose, pending
from tests.ox_fake_site import NEW, NEW_SERVER, OLD, OLD_SERVER_ID, FakeOx, ox_site, schema_name, schemata
from tests.temporal_env import running_worker
from workflows.ox_steps import REGISTERED_GATE
from workflows.ox_upgradeschemata import (
    OxSchemataProgress,
    OxUpgradeSchemataInput,
    OxUpgradeSchemataResult,
    OxUpgradeSchemataWorkflow,
)
from workflows.timeline import StepRecord

S1, S2, S3, S10 = (schema_name(i) for i in (1, 2, 3, 10))
HOUR = 3600.0
NEW_ID = OLD_SERVER_ID + 1  # what registerserver gives the new server on this config DB
UPGRADED = (NEW_ID, True, NEW)
UNTOUCHED = (OLD_SERVER_ID, True, OLD)
TOOLS = ("disableschema", "changeserver", "runupdate", "enableschema")
# A revert by the tools' rules: changeserver refuses an enabled schema.
REVERT = ("disableschema", "changeserver", "enableschema")
Handle = WorkflowHandle[Any, OxUpgradeSchemataResult]


def fake_site(**kw: Any) -> FakeOx:
    return FakeOx(["ox1", "ox2"], installed={"ox1": NEW}, **kw)


def inp(**kw: Any) -> OxUpgradeSchemataInput:
    fields: dict[str, Any] = {
        "inventory": ox_site(2),
        "server_name": NEW_SERVER,
        "update_node": "ox1",
        "admin_node": "ox2",
        "started_by": "starter",
        "failure_gate_timeout_s": HOUR,
        "gate_timeout_s": HOUR,
    }
    fields.update(kw)
    return OxUpgradeSchemataInput(**fields)


@asynccontextmanager
async def started(
    env: WorkflowEnvironment, task_queue: str, fake: FakeOx, arg: OxUpgradeSchemataInput
) -> AsyncIterator[Handle]:
    async with running_worker(env.client, task_queue, [OxUpgradeSchemataWorkflow], fake.activities()):
        yield await env.client.start_workflow(
            OxUpgradeSchemataWorkflow.run, arg, id=f"wf-{task_queue}", task_queue=task_queue
        )


async def finish(handle: Handle) -> OxUpgradeSchemataResult:
    return await asyncio.wait_for(handle.result(), 60)


async def run(
    env: WorkflowEnvironment, task_queue: str, fake: FakeOx, arg: OxUpgradeSchemataInput
) -> OxUpgradeSchemataResult:
    async with started(env, task_queue, fake, arg) as handle:
        return await finish(handle)


async def failed(handle: Handle) -> tuple[ApplicationError, list[StepRecord]]:
    """The run's failure and its timeline (queried after the end)."""
    with pytest.raises(WorkflowFailureError) as info:
        await finish(handle)
    cause = info.value.cause
    assert isinstance(cause, ApplicationError)
    progress = await handle.query(OxUpgradeSchemataWorkflow.progress)
    return cause, list(progress.steps)


def moves(fake: FakeOx) -> list[tuple[str, str | None]]:
    return [(c.name, c.target) for c in fake.mutations()]


def names(steps: list[StepRecord] | tuple[StepRecord, ...]) -> list[str]:
    return [s.name for s in steps]


def runs_of(steps: tuple[StepRecord, ...], name: str) -> list[tuple[str, int]]:
    return [(s.result, s.retries) for s in steps if s.name == name]


# ---------------------------------------------------------------------------- 1 happy path
async def test_registers_then_upgrades_each_schema_in_oxs_order(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = fake_site(schemata=schemata((10, 5), (2, 3), (3, 0), (1, 4)))
    res = await run(time_skipping_env, task_queue, fake, inp())
    # 3 once, then 4-7 per schema in OX's number order (not the listing's); the empty one untouched.
    assert moves(fake) == [
        ("ox_register_server", "ox2"),
        ("ox_upgrade_schema", S1),
        ("ox_upgrade_schema", S2),
        ("ox_upgrade_schema", S10),
    ]
    assert fake.tools == [(tool, s) for s in (S1, S2, S10) for tool in TOOLS]
    assert fake.servers[NEW_ID] == NEW_SERVER
    assert fake.states() == {S1: UPGRADED, S2: UPGRADED, S10: UPGRADED, S3: UNTOUCHED}
    assert (res.upgraded, res.skipped_empty, res.failed, res.left_disabled) == ((S1, S2, S10), (S3,), (), ())
    assert res.server_registered and res.server_id == NEW_ID and not res.aborted_at_registration
    assert res.runs == 1 and not res.dry_run
    # The timeline: preflight, the empty schema recorded, 3, then 4-7 and its four steps per schema.
    walk = [s for s in res.steps if not s.name.startswith("P")]
    assert [s.seed_step for s in walk] == ["4", "3", *(["4-7", "4", "5", "6", "7"] * 3)]
    assert walk[0].result == "skipped" and S3 in (walk[0].detail or "")
    assert all(s.result == "ok" and s.retries == 0 for s in res.steps if s is not walk[0])
    s1_steps = [s for s in res.steps if S1 in s.name.split() and s.seed_step in ("4", "5", "6", "7")]
    # The admin tools on ox2; runupdate and the enable after it on the update node ox1.
    assert [(s.seed_step, s.node) for s in s1_steps] == [
        ("4", "ox2"),
        ("5", "ox2"),
        ("6", "ox1"),
        ("7", "ox1"),
    ]
    listed_on = [c.target for c in fake.calls if c.name in ("ox_list_schemata", "ox_list_servers")]
    assert listed_on == ["ox2", "ox2"]


async def test_dry_run_plans_and_changes_nothing(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = fake_site()
    res = await run(time_skipping_env, task_queue, fake, inp(dry_run=True))
    assert res.dry_run and fake.mutations() == [] and res.upgraded == ()
    assert f"schemata to upgrade: 3 ({S1} .. {S10})" in res.plan and res.plan_hash


# ---------------------------------------------------------------------------- 2 the registered-server gate
async def test_registered_server_gate_times_out_to_abort_and_changes_nothing(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = fake_site()
    fake.servers[7] = NEW_SERVER
    res = await run(time_skipping_env, task_queue, fake, inp())  # nobody decides within the hour
    assert res.aborted_at_registration and res.upgraded == () and res.server_id == 7
    assert not res.server_registered
    assert f"gate {REGISTERED_GATE}: timed out, abort" in names(res.steps)
    assert fake.mutations() == [] and fake.tools == []
    assert set(fake.states().values()) == {UNTOUCHED}


async def test_registered_server_continue_uses_the_existing_server(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = fake_site()
    fake.servers[7] = NEW_SERVER
    async with started(time_skipping_env, task_queue, fake, inp()) as handle:
        gate = await pending(handle, REGISTERED_GATE)
        assert gate.choices == ("continue", "abort") and gate.on_timeout == "abort"
        assert "already registered with id '7'" in gate.guards and fake.mutations() == []
        await choose(handle, gate, "continue")
        res = await finish(handle)
    assert "ox_register_server" not in [name for name, _ in moves(fake)]
    assert fake.states() == {s: (7, True, NEW) for s in (S1, S2, S10)}
    assert (res.server_id, res.server_registered, res.upgraded) == (7, False, (S1, S2, S10))


# ---------------------------------------------------------------------------- 3 the failure gate
@pytest.mark.parametrize("cause", ["update tasks", "secret"])
async def test_failure_gate_retry_after_the_fix_completes(
    time_skipping_env: WorkflowEnvironment, task_queue: str, cause: str
) -> None:
    # update tasks: runupdate reports a failed task (a result: gate failure:6@<schema>, the
    # schema disabled and moved); secret: the activity raises a non-retryable error before
    # touching anything (gate failure:4-7@<schema>).
    if cause == "update tasks":
        fake, schema, gate_name = fake_site(update_fails={S2: 1}), S2, f"failure:6@{S2}"
    else:
        fake, schema, gate_name = (
            fake_site(broken={"ox_upgrade_schema": [SECRET_UNAVAILABLE]}),
            S1,
            f"failure:4-7@{S1}",
        )
    async with started(time_skipping_env, task_queue, fake, inp()) as handle:
        gate = await pending(handle, gate_name)
        assert gate.choices == ("retry", "skip", "revert", "abort") and gate.on_timeout == "abort"
        progress = await handle.query(OxUpgradeSchemataWorkflow.schemata_progress)
        assert isinstance(progress, OxSchemataProgress) and progress.current == (schema,)
        assert S10 not in [c.target for c in fake.calls]  # no new schema starts while one waits
        record = await choose(handle, gate, "retry")  # the cause is gone: the injection is used up
        assert (record.choice, record.by) == ("retry", "ops1")
        res = await finish(handle)
    assert fake.states() == {S1: UPGRADED, S2: UPGRADED, S10: UPGRADED}
    assert (res.upgraded, res.failed) == ((S1, S2, S10), ())
    assert [t for t in moves(fake) if t[1] == schema] == [("ox_upgrade_schema", schema)] * 2
    assert f"gate {gate_name}: retry chosen by ops1" in names(res.steps)
    whole = runs_of(res.steps, f"4-7 upgrade schema {schema}")
    if cause == "update tasks":
        assert whole == [("ok", 0), ("ok", 1)] and fake.schemata[S2].runupdates == 2
        assert runs_of(res.steps, f"6 run the update tasks of {S2}") == [("failed", 0), ("ok", 1)]
    else:
        assert whole == [("failed", 0), ("ok", 1)] and fake.schemata[S1].runupdates == 1


@pytest.mark.parametrize("choice", ["skip", "revert"])
async def test_failure_gate_skip_or_revert_goes_on_with_the_others(
    time_skipping_env: WorkflowEnvironment, task_queue: str, choice: str
) -> None:
    fake = fake_site(update_fails={S2: 1})
    async with started(time_skipping_env, task_queue, fake, inp()) as handle:
        await choose(handle, await pending(handle, f"failure:6@{S2}"), choice)
        res = await finish(handle)
    assert res.upgraded == (S1, S10) and [f.schema for f in res.failed] == [S2]
    assert res.failed[0].seed_step == "6" and "FakeUpdateTask" in res.failed[0].error
    if choice == "skip":
        # Left disabled on the new server: its update tasks did not all run.
        assert (res.left_disabled, res.reverted) == ((S2,), ())
        assert fake.states()[S2] == (NEW_ID, False, OLD)
        assert moves(fake) == [
            ("ox_register_server", "ox2"),
            ("ox_upgrade_schema", S1),
            ("ox_upgrade_schema", S2),
            ("ox_upgrade_schema", S10),
        ]
    else:
        # Back on the old server and enabled, by the tools' rules (disable, changeserver,
        # enable), before the next schema starts.
        assert (res.left_disabled, res.reverted) == ((), (S2,))
        assert fake.states()[S2] == UNTOUCHED
        assert moves(fake) == [
            ("ox_register_server", "ox2"),
            ("ox_upgrade_schema", S1),
            ("ox_upgrade_schema", S2),
            ("ox_revert_schema", S2),
            ("ox_upgrade_schema", S10),
        ]
        assert [t for t, s in fake.tools if s == S2] == [*TOOLS[:3], *REVERT]
    assert fake.states()[S1] == fake.states()[S10] == UPGRADED


@pytest.mark.parametrize("how", ["abort", "timeout", "nobody"])
async def test_abort_by_choice_by_timeout_or_nobody_stops_and_leaves_it_disabled(
    time_skipping_env: WorkflowEnvironment, task_queue: str, how: str
) -> None:
    fake = fake_site(update_fails={S2: 1})
    arg = inp(inventory=ox_site(2, approvers={})) if how == "nobody" else inp()
    async with started(time_skipping_env, task_queue, fake, arg) as handle:
        if how == "abort":
            await choose(handle, await pending(handle, f"failure:6@{S2}"), "abort")
        error, steps = await failed(handle)  # timeout: the hour passes at once
    assert error.type == "ProcedureAborted"
    text = str(error)
    assert f"aborted at schema {S2}" + (" by ops1" if how == "abort" else " (") in text
    assert f"left disabled: {S2}" in text and "not started: 1" in text
    assert f"resume_from={S1} (-m {S1})" in text
    expected = {
        "abort": f"gate failure:6@{S2}: abort chosen by ops1",
        "timeout": f"gate failure:6@{S2}: timed out, abort",
        "nobody": f"gate failure:6@{S2}: not asked",
    }[how]
    assert expected in names(steps)
    # Nothing undone, nothing further: S1 stays upgraded, S2 disabled, S10 never touched.
    assert fake.states() == {S1: UPGRADED, S2: (NEW_ID, False, OLD), S10: UNTOUCHED}
    assert moves(fake)[-1] == ("ox_upgrade_schema", S2) and S10 not in [c.target for c in fake.calls]


# ---------------------------------------------------------------------------- 4 retries
async def test_retryable_errors_are_retried_and_counted(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    # A lost database connection while listing, an unreachable node at the first schema: each
    # once, retryable, before the activity touched anything.
    fake = fake_site(flaky={"ox_list_schemata": [DATABASE_ERROR], "ox_upgrade_schema": [SSH_UNREACHABLE]})
    res = await run(time_skipping_env, task_queue, fake, inp())
    assert res.upgraded == (S1, S2, S10) and set(fake.states().values()) == {UPGRADED}
    listing = next(s for s in res.steps if s.name.startswith("P1 list the schemata"))
    first = next(s for s in res.steps if s.name == f"4-7 upgrade schema {S1}")
    assert (listing.result, listing.retries) == ("ok", 1) and (first.result, first.retries) == ("ok", 1)
    assert first.detail is not None and "injected SshUnreachable" in first.detail
    assert all(s.retries == 0 for s in res.steps if s not in (listing, first))
    # Called twice, updated once: the failed attempt had not started runupdate.
    assert [c.target for c in fake.calls if c.name == "ox_upgrade_schema"] == [S1, S1, S2, S10]
    assert fake.schemata[S1].runupdates == 1


# ---------------------------------------------------------------------------- 5 rollback
async def test_unguided_failure_reverts_the_schema_and_stops(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = fake_site(update_fails={S2: 1})
    async with started(time_skipping_env, task_queue, fake, inp(on_failure="rollback")) as handle:
        error, steps = await failed(handle)
    assert error.type == "SchemaUpgradeStopped"
    text = str(error)
    assert f"reverted at schema {S2}" in text and f"reverted to the old server: {S2}" in text
    assert f"resume_from={S1}" in text and "upgraded: 1 of 3" in text
    # The one compensation (the revert) comes right after the failure, and nothing after it.
    assert moves(fake) == [
        ("ox_register_server", "ox2"),
        ("ox_upgrade_schema", S1),
        ("ox_upgrade_schema", S2),
        ("ox_revert_schema", S2),
    ]
    assert [t for t, s in fake.tools if s == S2] == [*TOOLS[:3], *REVERT]
    # A finished schema is not undone (its users are served by the new server); S10 untouched.
    assert fake.states() == {S1: UPGRADED, S2: UNTOUCHED, S10: UNTOUCHED}
    assert f"gate failure:6@{S2}: not asked" in names(steps)
    revert = next(s for s in steps if s.name.startswith(f"revert {S2}"))
    assert revert.result == "ok" and f"point it back to server {OLD_SERVER_ID}" in revert.name


# ---------------------------------------------------------------------------- history size
async def test_continues_as_new_carrying_its_progress(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    fake = fake_site()
    res = await run(time_skipping_env, task_queue, fake, inp(schemata_per_run=1))
    assert res.runs == 3 and res.upgraded == (S1, S2, S10) and res.server_registered
    assert [c.target for c in fake.calls if c.name == "ox_upgrade_schema"] == [S1, S2, S10]
    assert [name for name, _ in moves(fake)].count("ox_register_server") == 1
    assert set(fake.states().values()) == {UPGRADED}
