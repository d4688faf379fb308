"""`ox-upgradeschemata` on the lab's OX part: the real config DB, OX's tools over SSH on the
OX nodes (ox1 has the new release installed: runupdate runs there; the other tools on ox2).

The seed's five invocations of `upgradeschemata` (plain, -f, -f -m, -k, -f -m -k) each with
injected runupdate failures, asserting exactly which schemata were upgraded, skipped, failed
and left disabled; the failure gate's choices; the already-registered gate; continue-as-new;
bounded concurrency; driving OX's own tool; bad input refused before anything is touched.
Most runs take the first 8 of the lab's 20 schemata (`schemata=`), which OX's tool would
not do but which keeps the suite short; the semantics of -m and -k are the same.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from activities import detached
from lab.config import LabConfig
from lab.ox import configdb
from lab.ox import nodes as ox_nodes
from tests.e2e_support import keep_history, start_worker_process
from tests.gate_support import choose, pending
from tests.ox_support import (
    APPROVER,
    NEW_SERVER,
    classify,
    names,
    new_server_id,
    old_server_id,
    ox_fresh,
    ox_inventory,
    s,
    schemata_input,
    start_schemata,
    states,
)
from tests.temporal_env import temporal_address
from workflows.ox_upgradeschemata import OxSchemataProgress, OxUpgradeSchemataResult

EIGHT = tuple(s(i) for i in range(1, 9))


@pytest.fixture
async def ox(lab: LabConfig) -> LabConfig:
    await ox_fresh(lab)
    return lab


async def run_ok(
    client: Client, task_queue: str, wf_id: str, cfg: LabConfig, **kw: Any
) -> OxUpgradeSchemataResult:
    handle = await start_schemata(client, task_queue, schemata_input(cfg, **kw), wf_id)
    result: OxUpgradeSchemataResult = await handle.result()
    return result


async def test_plain_stops_at_the_first_failure_and_abort_leaves_it_disabled(
    ox: LabConfig, client: Client, lab_worker: str
) -> None:
    configdb.inject_update_failure(ox, s(3))
    handle = await start_schemata(client, lab_worker, schemata_input(ox, schemata=EIGHT), "oxs-plain")
    gate = await pending(handle, f"failure:6@{s(3)}")
    assert gate.choices == ("retry", "skip", "revert", "abort") and gate.approvers == (APPROVER,)
    assert "LabInjectedFailureTask" in gate.guards
    progress = await handle.query("schemata", result_type=OxSchemataProgress)
    # Without -f no other schema starts while one waits at its gate.
    assert (progress.upgraded, progress.current, progress.remaining) == (2, (s(3),), 6)
    await choose(handle, gate, "abort")
    with pytest.raises(WorkflowFailureError) as info:
        await handle.result()
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "ProcedureAborted"
    assert f"aborted at schema {s(3)} by {APPROVER}" in str(cause)
    assert f"resume_from={s(2)} (-m {s(2)})" in str(cause)
    assert classify(ox) == {
        "upgraded": names(1, 2),
        "failed_disabled": names(3),
        "untouched": names(*range(4, 21)),
    }
    # ... and the seed's -m resumes after it: the failed schema is skipped, the rest upgraded.
    result = await run_ok(
        client, lab_worker, "oxs-plain-resume", ox, schemata=EIGHT, resume_from=s(3), expect_registered=True
    )
    assert set(result.upgraded) == names(*range(4, 9)) and result.passed_over == EIGHT[:3]
    assert classify(ox) == {
        "upgraded": names(1, 2, *range(4, 9)),
        "failed_disabled": names(3),
        "untouched": names(*range(9, 21)),
    }


async def test_force_goes_on_and_reports_the_failed_schemata(
    ox: LabConfig, client: Client, lab_worker: str
) -> None:
    for i in (3, 7):
        configdb.inject_update_failure(ox, s(i))
    result = await run_ok(client, lab_worker, "oxs-force", ox, schemata=EIGHT, force=True)
    assert [f.schema for f in result.failed] == [s(3), s(7)]
    assert all(f.seed_step == "6" and "LabInjectedFailureTask" in f.error for f in result.failed)
    assert set(result.left_disabled) == names(3, 7) and set(result.upgraded) == names(1, 2, 4, 5, 6, 8)
    assert result.server_registered and result.server_id == new_server_id(ox)
    assert classify(ox) == {
        "upgraded": names(1, 2, 4, 5, 6, 8),
        "failed_disabled": names(3, 7),
        "untouched": names(*range(9, 21)),
    }


async def test_force_and_resume_from_a_schema(ox: LabConfig, client: Client, lab_worker: str) -> None:
    configdb.inject_update_failure(ox, s(7))
    result = await run_ok(
        client, lab_worker, "oxs-force-resume", ox, schemata=EIGHT, force=True, resume_from=s(4)
    )
    assert result.passed_over == EIGHT[:4] and [f.schema for f in result.failed] == [s(7)]
    assert classify(ox) == {
        "upgraded": names(5, 6, 8),
        "failed_disabled": names(7),
        "untouched": names(1, 2, 3, 4, *range(9, 21)),
    }


async def test_skip_list_is_never_touched(ox: LabConfig, client: Client, lab_worker: str) -> None:
    configdb.inject_update_failure(ox, s(4))  # never reached: skipped
    result = await run_ok(client, lab_worker, "oxs-skip", ox, schemata=EIGHT, skip=(s(2), s(4)))
    assert result.skipped == (s(2), s(4)) and result.failed == ()
    assert classify(ox) == {"upgraded": names(1, 3, 5, 6, 7, 8), "untouched": names(2, 4, *range(9, 21))}
    assert states(ox)[s(4)].update_runs == 0


async def test_force_resume_and_skip_combined(ox: LabConfig, client: Client, lab_worker: str) -> None:
    for i in (5, 6):
        configdb.inject_update_failure(ox, s(i))
    result = await run_ok(
        client, lab_worker, "oxs-fmk", ox, schemata=EIGHT, force=True, resume_from=s(2), skip=(s(4), s(6))
    )
    assert result.passed_over == EIGHT[:2] and result.skipped == (s(4), s(6))
    assert [f.schema for f in result.failed] == [s(5)]
    assert classify(ox) == {
        "upgraded": names(3, 7, 8),
        "failed_disabled": names(5),
        "untouched": names(1, 2, 4, 6, *range(9, 21)),
    }


async def test_failure_gate_retry_revert_and_skip(ox: LabConfig, client: Client, lab_worker: str) -> None:
    configdb.inject_update_failure(ox, s(2), times=1)  # fails once: a retry succeeds
    configdb.inject_update_failure(ox, s(4))
    configdb.inject_update_failure(ox, s(6))
    handle = await start_schemata(client, lab_worker, schemata_input(ox, schemata=EIGHT), "oxs-gates")
    await choose(handle, await pending(handle, f"failure:6@{s(2)}"), "retry")
    await choose(handle, await pending(handle, f"failure:6@{s(4)}"), "revert")
    await choose(handle, await pending(handle, f"failure:6@{s(6)}"), "skip")
    result: OxUpgradeSchemataResult = await handle.result()
    assert set(result.upgraded) == names(1, 2, 3, 5, 7, 8)
    assert result.reverted == (s(4),) and result.left_disabled == (s(6),)
    assert [f.schema for f in result.failed] == [s(4), s(6)]
    assert classify(ox) == {
        "upgraded": names(1, 2, 3, 5, 7, 8),
        "failed_enabled_old": names(4),
        "failed_disabled": names(6),
        "untouched": names(*range(9, 21)),
    }
    assert states(ox)[s(2)].update_runs == 2  # the failed run and the retry
    retried = [st for st in result.steps if st.name == f"4 disable schema {s(2)}"]
    assert [st.retries for st in retried] == [0, 1]


async def test_unguided_failure_reverts_the_schema_and_stops(
    ox: LabConfig, client: Client, lab_worker: str
) -> None:
    configdb.inject_update_failure(ox, s(2))
    inp = schemata_input(ox, schemata=EIGHT, on_failure="rollback")
    handle = await start_schemata(client, lab_worker, inp, "oxs-unguided")
    with pytest.raises(WorkflowFailureError) as info:
        await handle.result()
    assert isinstance(info.value.cause, ApplicationError)
    assert info.value.cause.type == "SchemaUpgradeStopped"
    assert f"reverted at schema {s(2)}" in str(info.value.cause)
    assert classify(ox) == {
        "upgraded": names(1),
        "failed_enabled_old": names(2),
        "untouched": names(*range(3, 21)),
    }


async def test_server_already_registered_continue_and_abort(
    ox: LabConfig, client: Client, lab_worker: str
) -> None:
    with configdb.connect(
        port=ox.primary_db_port, password=configdb.ox_db_password_file(ox).read_text().strip()
    ) as conn:
        existing = configdb.register_server(conn, NEW_SERVER)
    # abort: nothing is changed.
    handle = await start_schemata(client, lab_worker, schemata_input(ox, schemata=EIGHT[:2]), "oxs-reg-abort")
    gate = await pending(handle, "server-already-registered")
    assert gate.choices == ("continue", "abort") and f"with id '{existing}'" in gate.guards
    await choose(handle, gate, "abort")
    result: OxUpgradeSchemataResult = await handle.result()
    assert result.aborted_at_registration and result.upgraded == ()
    assert classify(ox) == {"untouched": names(*range(1, 21))}
    # continue: the existing server is used.
    handle = await start_schemata(client, lab_worker, schemata_input(ox, schemata=EIGHT[:2]), "oxs-reg-go")
    await choose(handle, await pending(handle, "server-already-registered"), "continue")
    result = await handle.result()
    assert (result.server_id, result.server_registered) == (existing, False)
    assert classify(ox) == {"upgraded": names(1, 2), "untouched": names(*range(3, 21))}
    assert [i for i, n in configdb.servers(ox) if n == NEW_SERVER] == [existing]


async def test_continues_as_new_with_progress_carried(ox: LabConfig, client: Client, lab_worker: str) -> None:
    configdb.inject_update_failure(ox, s(9))
    result = await run_ok(client, lab_worker, "oxs-can", ox, force=True, schemata_per_run=6, concurrency=2)
    # 20 schemata, 6 started per run: four runs, one history each.
    assert result.runs == 4 and 0 < result.max_events_per_run < 400
    assert set(result.upgraded) == names(*range(1, 21)) - names(9) and result.left_disabled == (s(9),)
    assert classify(ox) == {"upgraded": names(*range(1, 21)) - names(9), "failed_disabled": names(9)}
    assert all(st.update_runs == 1 for st in states(ox).values())


async def test_concurrency_bounds_the_schemata_disabled_at_once(
    ox: LabConfig, client: Client, lab_worker: str
) -> None:
    result = await run_ok(client, lab_worker, "oxs-c4", ox, concurrency=4, schemata=EIGHT)
    assert set(result.upgraded) == set(EIGHT)
    # Each schema is disabled from its step 4's start to its step 7's end, and never more
    # than four at a time.
    windows = []
    for name in EIGHT:
        disable = next(st for st in result.steps if st.name == f"4 disable schema {name}")
        enable = next(st for st in result.steps if st.name == f"7 enable schema {name}")
        assert disable.started is not None and enable.ended is not None
        windows.append((disable.started, enable.ended))
    overlaps = [sum(1 for a, b in windows if a <= t < b) for t, _ in windows]
    assert max(overlaps) <= 4 and max(overlaps) >= 2


async def test_drive_the_tool_itself(ox: LabConfig, client: Client, lab_worker: str) -> None:
    configdb.inject_update_failure(ox, s(3))
    # -m: OX's tool sorts the schemata by their number and starts after the named one.
    result = await run_ok(client, lab_worker, "oxs-tool", ox, drive_tool=True, force=True, resume_from=s(14))
    assert result.drove_tool and result.server_registered
    assert set(result.upgraded) == names(*range(15, 21)) and result.failed == ()
    assert classify(ox) == {"upgraded": names(*range(15, 21)), "untouched": names(*range(1, 15))}


async def test_bad_input_is_refused_before_anything_is_touched(
    ox: LabConfig, client: Client, lab_worker: str
) -> None:
    inv = ox_inventory(ox)
    cases: list[tuple[dict[str, Any], str]] = [
        (dict(skip=("oxdatabase_99",)), "skip (-k): no such schema oxdatabase_99"),
        (
            dict(resume_from="nope_1"),
            "resume_from (-m): no such schema nope_1 (OX's upgradeschemata would "
            "silently start from the first schema; zerodown refuses instead)",
        ),
        # OX's upgradeschemata ignores -k (it splits a literal ','): never report a skip it did not do.
        (dict(drive_tool=True, skip=(s(2),)), "skip (-k) with drive_tool: OX's upgradeschemata ignores -k"),
        (dict(concurrency=0), "concurrency must be 1 to 32, got 0"),
        (dict(update_node="ox2"), "the update node and the admin node are both ox2"),
        (dict(update_node="ox3"), "ox3 runs 7.10.0 like ox2: upgrade it first"),
        (dict(server_name="oxserver"), "-n oxserver is the old cluster's own server name"),
    ]
    for n, (kw, expected) in enumerate(cases):
        handle = await start_schemata(client, lab_worker, schemata_input(ox, inv, **kw), f"oxs-bad-{n}")
        with pytest.raises(WorkflowFailureError) as info:
            await handle.result()
        assert expected in str(info.value.cause), (kw, str(info.value.cause))
    assert [n for _, n in configdb.servers(ox)] == ["oxserver"]
    assert classify(ox) == {"untouched": names(*range(1, 21))}
    assert old_server_id(ox) == configdb.servers(ox)[0][0]


async def test_worker_killed_mid_schema_resumes_without_updating_a_schema_twice(
    lab: LabConfig, client: Client, temporal_env: WorkflowEnvironment, task_queue: str, tmp_path: Path
) -> None:
    await ox_fresh(lab, runupdate_s=1.5)
    first = start_worker_process(temporal_address(temporal_env), task_queue, tmp_path / "worker.log")
    second = None
    try:
        handle = await start_schemata(client, task_queue, schemata_input(lab, schemata=EIGHT[:4]), "oxs-kill")
        # Killed while the schema's runupdate runs on the node (the config DB says so).
        for _ in range(600):
            if states(lab)[s(2)].update_state == "running":
                break
            await asyncio.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert states(lab)[s(2)].update_state == "running"
        second = start_worker_process(temporal_address(temporal_env), task_queue, tmp_path / "worker.log")
        result: OxUpgradeSchemataResult = await handle.result()
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
    assert set(result.upgraded) == set(EIGHT[:4])
    # The lost attempt's runupdate went on on the node; the retry waited for it (OX's schema
    # lock) and found nothing left to do: every schema was updated exactly once.
    runs = {n: st.update_runs for n, st in states(lab).items() if n in EIGHT[:4]}
    assert runs == dict.fromkeys(EIGHT[:4], 1)
    assert classify(lab) == {"upgraded": set(EIGHT[:4]), "untouched": names(*range(5, 21))}
    upgrade = [st for st in result.steps if st.name == f"4-7 upgrade schema {s(2)}"]
    assert len(upgrade) == 1 and upgrade[0].retries >= 1
    await ox_fresh(lab)


async def test_a_stopped_run_is_resumed_from_where_it_stopped(
    ox: LabConfig, client: Client, lab_worker: str
) -> None:
    await asyncio.to_thread(ox_nodes.set_runupdate_seconds, ox, 0.5)
    handle = await start_schemata(client, lab_worker, schemata_input(ox, schemata=EIGHT), "oxs-stop")
    for _ in range(300):  # let a few schemata go through
        progress = await handle.query("schemata", result_type=OxSchemataProgress)
        if progress is not None and progress.upgraded >= 2:
            break
        await asyncio.sleep(0.05)
    await handle.cancel()
    with pytest.raises(WorkflowFailureError) as info:
        await handle.result()
    text = str(info.value.cause)
    # The schema under way finished (a change is never abandoned half-way); the message
    # says where to resume.
    done = classify(ox)["upgraded"]
    assert 2 <= len(done) < 8 and classify(ox).get("other") is None
    assert set(EIGHT[: len(done)]) == done
    last = EIGHT[len(done) - 1]
    assert f"resume_from={last} (-m {last})" in text, text
    result = await run_ok(
        client, lab_worker, "oxs-resumed", ox, schemata=EIGHT, resume_from=last, expect_registered=True
    )
    assert set(result.upgraded) == set(EIGHT) - done
    assert classify(ox) == {"upgraded": set(EIGHT), "untouched": names(*range(9, 21))}
    assert all(st.update_runs == 1 for n, st in states(ox).items() if n in EIGHT)


# ------------------------------------------------------------------ against the real tools' rules
# (issue 14: each of these failed against the tools re-derived from OX's source before the fix)


async def test_resume_from_follows_oxs_number_order_not_the_listings(
    ox: LabConfig, client: Client, lab_worker: str
) -> None:
    # listdatabaseschema promises no order (the lab lists oxdatabase_10.._12 before _2); OX's
    # tool sorts by the number after the last '_' and starts after the -m schema.
    twelve = tuple(s(i) for i in range(1, 13))
    result = await run_ok(client, lab_worker, "oxs-order", ox, schemata=twelve, resume_from=s(9))
    assert result.passed_over == tuple(s(i) for i in range(1, 10))
    assert set(result.upgraded) == names(10, 11, 12)
    assert classify(ox) == {"upgraded": names(10, 11, 12), "untouched": names(*range(1, 10), *range(13, 21))}


async def test_schemata_without_contexts_are_skipped_and_recorded(
    ox: LabConfig, client: Client, lab_worker: str
) -> None:
    empty = s(21)
    configdb.add_empty_schema(ox, empty)
    handle = await start_schemata(
        client,
        lab_worker,
        schemata_input(ox, schemata=(s(1), s(2), s(3), empty)),
        "ox-upgradeschemata-empty-schema-skipped",
    )
    result: OxUpgradeSchemataResult = await handle.result()
    await keep_history(handle)
    assert result.skipped_empty == (empty,) and set(result.upgraded) == names(1, 2, 3) and result.failed == ()
    record = next(st for st in result.steps if "without contexts: skipped" in st.name)
    assert record.result == "skipped" and empty in (record.detail or "")
    assert states(ox)[empty].update_runs == 0
    # The master admin's password went to the tools (runupdate takes it only from -P) but is
    # nowhere in the history.
    password = configdb.master_password_file(ox).read_text().strip()
    assert password and password not in (await handle.fetch_history()).to_json()


async def test_a_transient_tool_failure_is_retried(ox: LabConfig, client: Client, lab_worker: str) -> None:
    # 107: a RemoteException (ObjectNamingAbstraction.printErrors): worth another attempt.
    configdb.inject_tool_fault(ox, "changeserver", "remote", 1)
    result = await run_ok(client, lab_worker, "oxs-transient", ox, schemata=EIGHT[:2], on_failure="rollback")
    assert set(result.upgraded) == names(1, 2)
    steps = [st for st in result.steps if st.name == f"4-7 upgrade schema {s(1)}"]
    assert len(steps) == 1 and steps[0].retries == 1


async def test_a_failed_disable_is_reverted_by_the_tools_rules(
    ox: LabConfig, client: Client, lab_worker: str
) -> None:
    # disableschema refuses a schema whose contexts use two write pools (SchemaMoveImpl); the
    # revert must not call changeserver on the still enabled schema (it refuses: 106).
    configdb.split_write_pools(ox, s(2))
    handle = await start_schemata(
        client,
        lab_worker,
        schemata_input(ox, schemata=EIGHT[:3]),
        "ox-upgradeschemata-revert-after-failed-disable",
    )
    gate = await pending(handle, f"failure:4@{s(2)}")
    await choose(handle, gate, "revert")
    result: OxUpgradeSchemataResult = await handle.result()
    await keep_history(handle)
    assert result.reverted == (s(2),) and set(result.upgraded) == names(1, 3)
    st = states(ox)[s(2)]
    assert st.enabled and st.server_id == old_server_id(ox) and st.update_runs == 0


async def test_nobody_to_decide_leaves_the_failed_schema_disabled(
    ox: LabConfig, client: Client, lab_worker: str
) -> None:
    # The safe default: OX's tool stops and leaves it disabled; a revert would serve a
    # half-updated schema from old nodes (OX supports no mixed versions).
    configdb.inject_update_failure(ox, s(2))
    inv = ox_inventory(ox, server_already_registered=(APPROVER,))
    handle = await start_schemata(client, lab_worker, schemata_input(ox, inv, schemata=EIGHT[:4]), "oxs-safe")
    with pytest.raises(WorkflowFailureError) as info:
        await handle.result()
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "ProcedureAborted"
    assert classify(ox) == {
        "upgraded": names(1),
        "failed_disabled": names(2),
        "untouched": names(*range(3, 21)),
    }


async def test_a_runupdate_over_its_budget_is_left_running_not_doubled(
    ox: LabConfig, client: Client, lab_worker: str
) -> None:
    await asyncio.to_thread(ox_nodes.set_runupdate_seconds, ox, 3.0)
    inv = ox_inventory(ox)
    assert inv.ox is not None
    inv = dataclasses.replace(inv, ox=dataclasses.replace(inv.ox, runupdate_timeout_s=1.0))
    result = await run_ok(client, lab_worker, "oxs-budget", ox, inventory=inv, schemata=EIGHT[:1], force=True)
    assert result.left_disabled == (s(1),)
    assert "still running after its budget of 1s" in result.failed[0].error
    for _ in range(100):  # the runupdate goes on on the node, once
        if states(ox)[s(1)].update_state == "done":
            break
        await asyncio.sleep(0.1)
    assert (states(ox)[s(1)].update_state, states(ox)[s(1)].update_runs) == ("done", 1)
    # Its end, past the budget, enables nothing: the run reported it left disabled.
    await asyncio.sleep(1.0)
    assert not states(ox)[s(1)].enabled


async def test_enable_follows_runupdate_on_the_update_node(
    ox: LabConfig, client: Client, lab_worker: str
) -> None:
    # Step 7 runs on the update node as runupdate's follow-up (activities/detached `then`): no
    # trip through the worker while the schema is disabled. A follow-up that fails there (a
    # transient 107) is run again from the worker; the schema ends enabled either way.
    configdb.inject_tool_fault(ox, "enableschema", "remote", 1)
    wf_id = "oxs-enable-on-update"
    handle = await start_schemata(
        client, lab_worker, schemata_input(ox, schemata=EIGHT[:2], on_failure="rollback"), wf_id
    )
    result: OxUpgradeSchemataResult = await handle.result()
    assert set(result.upgraded) == names(1, 2) and not result.failed
    assert all(states(ox)[x].enabled and states(ox)[x].server_id == new_server_id(ox) for x in EIGHT[:2])
    enables = [st for st in result.steps if st.name.startswith("7 enable schema")]
    assert {st.node for st in enables} == {"ox1"} and len(enables) == 2
    jobs = ox.ox_node_dir(1) / detached.JOBS_DIR
    follow_ups = {
        x: (jobs / detached.job_key(f"runupdate-{x}", wf_id, handle.result_run_id or "", x, "0") / "then.rc")
        .read_text()
        .strip()
        for x in EIGHT[:2]
    }
    assert follow_ups == {s(1): "107", s(2): "0"}
