"""`ox-node-upgrade` end to end on the lab's OX part (3 middleware nodes, 20 schemata, the
main and secondary HAProxy frontends, OX's tools over SSH) with the OX probe logging in to a
context of every schema through the main frontend the whole time.

What the seed promises, measured: no failed request (a user whose schema is not being
updated is always served; a user whose context moved is redirected, never failed; a user
whose context did not move never reaches a new node - it would get CTX-0012, a failure);
each context refused as "disabled" only while its own schema is disabled; redirects seen
and followed. And a failed schema rolls the node back to where it was.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError

from lab import haproxy
from lab.config import LabConfig
from lab.ox import configdb
from lab.ox import nodes as ox_nodes
from lab.ox.probe import lab_targets, read_events, start_ox_probe_process, stop_ox_probe_process
from tests.e2e_support import keep_history
from tests.ox_support import NEW_SERVER, NEW_VERSION, classify, names, ox_fresh, ox_inventory, s
from workflows.ox_node_upgrade import (
    REDIRECT_KEY,
    OxNodeUpgradeInput,
    OxNodeUpgradeResult,
    OxNodeUpgradeWorkflow,
)
from workflows.ox_upgradeschemata import OxUpgradeSchemataResult

RATE = 60.0


@dataclass
class OxProbeRun:
    summary: dict[str, Any] = field(default_factory=dict)
    events: Path = Path()

    def events_of(self, outcome: str) -> list[dict[str, Any]]:
        return [e for e in read_events(self.events) if e["outcome"] == outcome]


@contextmanager
def ox_probe(lab: LabConfig, out: Path) -> Iterator[OxProbeRun]:
    run = OxProbeRun(events=out / "ox-probe.jsonl")
    summary = out / "ox-probe-summary.json"
    proc = start_ox_probe_process(lab.ox_main_url, RATE, lab_targets(lab), run.events, summary)
    try:
        yield run
    finally:
        run.summary = stop_ox_probe_process(proc, summary)


def node_upgrade_input(lab: LabConfig, **kw: Any) -> OxNodeUpgradeInput:
    fields: dict[str, Any] = {
        "inventory": ox_inventory(lab),
        "version": NEW_VERSION,
        "server_name": NEW_SERVER,
        "started_by": "starter",
        "failure_gate_timeout_s": 120.0,
    }
    fields.update(kw)
    return OxNodeUpgradeInput(**fields)


def properties(lab: LabConfig, i: int, name: str) -> str:
    return (lab.ox_node_dir(i) / "etc" / name).read_text(encoding="utf-8")


def backend_states(lab: LabConfig) -> dict[str, str]:
    servers = haproxy.status(lab).get("servers")
    assert isinstance(servers, dict)
    return {str(k): str(v) for k, v in servers.items() if str(k).startswith("ox")}


async def wait_probe_started(run: OxProbeRun, lab: LabConfig) -> None:
    await asyncio.sleep(1.0)  # the probe process warms up: the procedure starts under load


def windows_from(children: list[OxUpgradeSchemataResult]) -> dict[str, tuple[dt.datetime, dt.datetime]]:
    """schema -> (its step 4 started, its step 7 ended): when its contexts could be disabled."""
    out: dict[str, tuple[dt.datetime, dt.datetime]] = {}
    for child in children:
        for st in child.steps:
            if st.name.startswith("4 disable schema "):
                schema = st.name.rsplit(" ", 1)[1]
                out[schema] = (st.started, out.get(schema, (st.started, st.started))[1])
            elif st.name.startswith("7 enable schema ") and st.ended is not None:
                schema = st.name.rsplit(" ", 1)[1]
                out[schema] = (out[schema][0], st.ended)
    return out


@pytest.fixture
async def ox(lab: LabConfig) -> Any:
    await ox_fresh(lab, upgraded=(), runupdate_s=0.3)
    yield lab
    await ox_fresh(lab, upgraded=())


async def test_node_by_node_upgrade_without_a_failed_request(
    ox: LabConfig, client: Client, lab_worker: str, tmp_path: Path
) -> None:
    with ox_probe(ox, tmp_path) as probe:
        await wait_probe_started(probe, ox)
        handle = await client.start_workflow(
            OxNodeUpgradeWorkflow.run,
            node_upgrade_input(ox),
            id="ox-node-upgrade-register-first-hazelcast",
            task_queue=lab_worker,
            execution_timeout=timedelta(minutes=6),
        )
        result: OxNodeUpgradeResult = await handle.result()
        await asyncio.sleep(1.0)  # traffic after the last step: served by the new cluster alone
    await keep_history(handle)
    summary = probe.summary
    print(
        "ox-node-upgrade probe:",
        {k: summary.get(k) for k in ("total", "ok", "failed", "disabled", "redirected")},
    )  # shown with -s
    assert summary["total"] > 0 and summary["failed"] == 0, probe.events_of("failed")[:5]
    # Users of moved contexts who landed on an old node were redirected to the secondary
    # balancer and served there.
    assert summary["redirected"] > 0
    assert summary["by_version"].get(NEW_VERSION, 0) > 0

    # Shares: the first node a pilot schema, the second all the others, the last none.
    assert [(sh.node, len(sh.schemata)) for sh in result.shares] == [("ox1", 1), ("ox2", 19), ("ox3", 0)]
    assert len(result.children) == 2 and set(result.upgraded_schemata) == names(*range(1, 21))
    children = [
        await client.get_workflow_handle(c, result_type=OxUpgradeSchemataResult).result()
        for c in result.children
    ]
    # The parent registered the server (before ox1 started under its name): both children use it.
    assert not children[0].server_registered and not children[1].server_registered
    assert {c.server_id for c in children} == {configdb.servers(ox)[-1][0]}

    # Each context was refused as disabled only while its own schema was disabled (the
    # request may have started up to its latency before the disable step began).
    windows = windows_from(children)
    assert set(windows) == names(*range(1, 21))
    slack = dt.timedelta(seconds=1)
    disabled = probe.events_of("disabled")
    outside = [
        e
        for e in disabled
        if not (
            windows[e["schema"]][0] - slack <= dt.datetime.fromisoformat(e["t"]) <= windows[e["schema"]][1]
        )
    ]
    assert outside == []

    # The site as the seed leaves it: every node on x.y.z under the new server's name, no
    # redirect URL, all in the main balancer; the secondary emptied; every schema upgraded.
    for i in ox.ox_node_indexes:
        version = ox_nodes.running_version(ox, i)
        assert version is not None
        assert (version["version"], version["server_name"], version["migration_redirect_url"]) == (
            NEW_VERSION,
            NEW_SERVER,
            None,
        )
        assert REDIRECT_KEY not in properties(ox, i, "server.properties")
        assert f"SERVER_NAME={NEW_SERVER}" in properties(ox, i, "system.properties")
    states = backend_states(ox)
    assert {k: v for k, v in states.items() if k.startswith("ox/")} == {f"ox/ox{i}": "UP" for i in (1, 2, 3)}
    assert all(v.startswith("MAINT") for k, v in states.items() if k.startswith("ox_secondary/"))
    assert classify(ox) == {"upgraded": names(*range(1, 21))}
    assert all(st.update_runs == 1 for st in configdb.schema_states(ox).values())

    # The runbook's order on every node: out of main (1) before its upgrade (2), the
    # redirect URL removed (8) before it serves again, into the secondary (9) before its
    # schemata move (4-7); the post process puts the new nodes into main before the last
    # old node leaves it.
    def first(prefix: str, node: str) -> int:
        return next(i for i, st in enumerate(result.steps) if st.name.startswith(prefix) and st.node == node)

    for n in ("ox1", "ox2"):
        assert (
            first("1 drain", n)
            < first("2 stop", n)
            < first("8 remove", n)
            < first("2 start", n)
            < first("9 set ready", n)
            < first("4-7", n)
        )
    # 3 before the first new node starts under its new SERVER_NAME: real OX cannot resolve an
    # unregistered server (the seed registers first, then activates the node).
    register = next(i for i, st in enumerate(result.steps) if st.name == f"3 register server {NEW_SERVER}")
    assert register < first("2 start", "ox1")
    # 2: the new release forms its own Hazelcast cluster, apart from the old one's.
    for i in ox.ox_node_indexes:
        assert f"com.openexchange.hazelcast.group.name=oxcluster-{NEW_VERSION}\n" in properties(
            ox, i, "hazelcast.properties"
        )
    assert [
        st.node for st in result.steps if st.name == f"2 Hazelcast group oxcluster-{NEW_VERSION}: set"
    ] == ["ox1", "ox2", "ox3"]
    assert first("post set ready on main", "ox1") < first("1 drain", "ox3")
    assert first("post set ready on main", "ox2") < first("1 drain", "ox3")


async def test_a_failed_pilot_schema_rolls_the_node_back(
    ox: LabConfig, client: Client, lab_worker: str, tmp_path: Path
) -> None:
    configdb.inject_update_failure(ox, s(1))
    before = {
        i: (properties(ox, i, "server.properties"), properties(ox, i, "system.properties"))
        for i in ox.ox_node_indexes
    }
    with ox_probe(ox, tmp_path) as probe:
        await wait_probe_started(probe, ox)
        handle = await client.start_workflow(
            OxNodeUpgradeWorkflow.run,
            node_upgrade_input(ox, on_failure="rollback"),
            id="e2e-ox-rollback",
            task_queue=lab_worker,
            execution_timeout=timedelta(minutes=6),
        )
        with pytest.raises(WorkflowFailureError) as info:
            await handle.result()
        await asyncio.sleep(1.0)
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "ProcedureFailed"
    assert f"reverted at schema {s(1)}" in str(cause) or s(1) in str(cause)
    assert probe.summary["failed"] == 0, probe.events_of("failed")[:5]
    # ox1 is back on 7.10.0 as the old server, every node as before (redirect URL gone
    # again), all in the main balancer, none in the secondary; the pilot schema reverted to
    # the old server and enabled; nothing else touched.
    for i in ox.ox_node_indexes:
        version = ox_nodes.running_version(ox, i)
        assert version is not None and (version["version"], version["server_name"]) == ("7.10.0", "oxserver")
        assert (properties(ox, i, "server.properties"), properties(ox, i, "system.properties")) == before[i]
    states = backend_states(ox)
    assert {k: v for k, v in states.items() if k.startswith("ox/")} == {f"ox/ox{i}": "UP" for i in (1, 2, 3)}
    assert all(v.startswith("MAINT") for k, v in states.items() if k.startswith("ox_secondary/"))
    assert classify(ox) == {"failed_enabled_old": names(1), "untouched": names(*range(2, 21))}


async def test_an_already_registered_server_aborted_at_its_gate_stops_the_run(
    ox: LabConfig, client: Client, lab_worker: str
) -> None:
    """The gate is asked before anything changes; abort stops the whole run (a child's abort
    used to let the parent go on to the next node)."""
    from tests.gate_support import choose, pending

    with configdb.connect(
        port=ox.primary_db_port, password=configdb.ox_db_password_file(ox).read_text().strip()
    ) as conn:
        existing = configdb.register_server(conn, NEW_SERVER)
    handle = await client.start_workflow(
        OxNodeUpgradeWorkflow.run,
        node_upgrade_input(ox, gate_timeout_s=120.0),
        id="e2e-ox-registered-abort",
        task_queue=lab_worker,
        execution_timeout=timedelta(minutes=3),
    )
    gate = await pending(handle, "server-already-registered")
    assert f"with id '{existing}'" in gate.guards
    await choose(handle, gate, "abort")
    with pytest.raises(WorkflowFailureError) as info:
        await handle.result()
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "ProcedureAborted"
    assert "nothing was changed" in str(cause)
    for i in ox.ox_node_indexes:
        version = ox_nodes.running_version(ox, i)
        assert version is not None and (version["version"], version["server_name"]) == ("7.10.0", "oxserver")
        assert REDIRECT_KEY not in properties(ox, i, "server.properties")
    assert classify(ox) == {"untouched": names(*range(1, 21))}


async def test_a_closed_pool_holding_contexts_is_refused_before_anything_is_touched(
    ox: LabConfig, client: Client, lab_worker: str
) -> None:
    """listdatabaseschema leaves out pools whose maxUnits is 0: their schemata would never move
    and the "every schema moved" check would pass over them."""
    closed = configdb.add_closed_pool(ox, schemata=1)
    handle = await client.start_workflow(
        OxNodeUpgradeWorkflow.run,
        node_upgrade_input(ox),
        id="e2e-ox-closed-pool",
        task_queue=lab_worker,
        execution_timeout=timedelta(minutes=3),
    )
    with pytest.raises(WorkflowFailureError) as info:
        await handle.result()
    text = str(info.value.cause)
    assert "PreflightFailed" in text or "preflight failed" in text
    assert "database pool oxclosed (id 1000) has maxUnits 0 and holds 2 contexts" in text
    assert configdb.schema_states(ox)[closed[0]].server_id == configdb.servers(ox)[0][0]
    assert {n for n in classify(ox)["untouched"] if n.startswith("oxdatabase_")} == names(*range(1, 21))
