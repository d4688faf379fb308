"""The bench's figures, from synthetic workflow histories (no lab, no server, no timing)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent

from bench import secret_server as ss_bench
from bench.rolling_deploy import (
    Event,
    Figures,
    RunResult,
    activity_intervals,
    covered_s,
    event_type_name,
    events_from_history,
    figures,
    merge_intervals,
    run_line,
    summary_line,
)
from bench.secret_server import SsRun, narrow_site
from bench.secret_server import run_line as ss_run_line
from bench.secret_server import summary_lines as ss_summary_lines
from inventory.load import parse_inventory
from lab.config import LabConfig
from lab.manager import site_inventory
from workflows import ss_rolling


def _activity(sched_id: int, start: float, end: float, close: str = "ActivityTaskCompleted") -> list[Event]:
    return [
        Event("ActivityTaskScheduled", start - 0.01, sched_id),
        Event("ActivityTaskStarted", start, sched_id + 1, scheduled_id=sched_id),
        Event(close, end, sched_id + 2, scheduled_id=sched_id),
    ]


def test_merge_intervals_merges_overlapping_and_touching_keeps_gaps() -> None:
    assert merge_intervals([(5, 6), (0, 2), (1, 3), (3, 4), (10, 10.5)]) == [(0, 4), (5, 6), (10, 10.5)]
    assert merge_intervals([(0, 10), (2, 3)]) == [(0, 10)]  # nested
    assert merge_intervals([]) == []
    assert covered_s([(0, 2), (1, 3), (5, 6)]) == pytest.approx(4.0)


def test_figures_of_a_history_with_concurrent_preflight() -> None:
    # Preflight: three activities in parallel (covering 10.0-12.0), then two sequential
    # ones (13.0-14.0 and 14.5-15.0); the workflow runs 9.5 -> 16.0.
    events = [Event("WorkflowExecutionStarted", 9.5, 1), Event("WorkflowTaskScheduled", 9.5, 2)]
    events += _activity(10, 10.0, 11.0) + _activity(20, 10.5, 12.0) + _activity(30, 10.2, 11.5)
    events += _activity(40, 13.0, 14.0) + _activity(50, 14.5, 15.0, close="ActivityTaskFailed")
    events.append(Event("WorkflowExecutionCompleted", 16.0, 99))

    f = figures(events)
    assert f.procedure_s == pytest.approx(6.5)
    assert f.activity_s == pytest.approx(2.0 + 1.0 + 0.5)
    assert f.activities == 5
    assert f.completed
    assert f.overhead_ms_per_step == pytest.approx((6.5 - 3.5) * 1000 / 5)


def test_pairs_by_scheduled_id_not_by_order() -> None:
    # Started/closed events of concurrent activities interleave in any order.
    events = [
        Event("WorkflowExecutionStarted", 0.0, 1),
        Event("ActivityTaskStarted", 1.0, 5, scheduled_id=3),
        Event("ActivityTaskStarted", 2.0, 6, scheduled_id=4),
        Event("ActivityTaskCompleted", 3.0, 7, scheduled_id=4),
        Event("ActivityTaskCompleted", 8.0, 8, scheduled_id=3),
        Event("WorkflowExecutionCompleted", 9.0, 9),
    ]
    assert sorted(activity_intervals(events)) == [(1.0, 8.0), (2.0, 3.0)]
    assert figures(events).activity_s == pytest.approx(7.0)


def test_failed_workflow_and_activity_cut_by_the_close() -> None:
    events = [
        Event("WorkflowExecutionStarted", 0.0, 1),
        *_activity(2, 1.0, 2.0),
        Event("ActivityTaskStarted", 3.0, 6, scheduled_id=5),
        Event("WorkflowExecutionFailed", 4.0, 7),
    ]
    f = figures(events)
    assert not f.completed and f.closed_as == "WorkflowExecutionFailed"
    assert f.activities == 2
    assert f.activity_s == pytest.approx(2.0)


def test_no_activities_and_no_start() -> None:
    f = figures([Event("WorkflowExecutionStarted", 0.0, 1), Event("WorkflowExecutionCompleted", 1.0, 2)])
    assert f.activities == 0 and f.overhead_ms_per_step == 0.0
    with pytest.raises(ValueError):
        figures([Event("WorkflowExecutionCompleted", 1.0, 2)])


def _proto(event_id: int, kind: EventType.ValueType, t_ns: int, scheduled: int = 0) -> HistoryEvent:
    e = HistoryEvent(event_id=event_id, event_type=kind)
    e.event_time.FromNanoseconds(t_ns)
    if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
        e.activity_task_started_event_attributes.scheduled_event_id = scheduled
    elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
        e.activity_task_completed_event_attributes.scheduled_event_id = scheduled
    elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
        e.workflow_execution_started_event_attributes.attempt = 1
    return e


def test_events_from_temporal_history_protos() -> None:
    base = 1_700_000_000_000_000_000
    history = [
        _proto(1, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED, base),
        _proto(5, EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED, base + 100_000_000),
        _proto(6, EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED, base + 250_000_000, scheduled=5),
        _proto(7, EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED, base + 1_250_000_000, scheduled=5),
        _proto(11, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED, base + 1_500_000_000),
    ]
    events = events_from_history(history)
    assert [e.type for e in events] == [
        "WorkflowExecutionStarted",
        "ActivityTaskScheduled",
        "ActivityTaskStarted",
        "ActivityTaskCompleted",
        "WorkflowExecutionCompleted",
    ]
    assert events[2].scheduled_id == 5 and events[3].scheduled_id == 5
    assert events[0].scheduled_id == 0
    f = figures(events)
    assert f.procedure_s == pytest.approx(1.5)
    assert f.activity_s == pytest.approx(1.0)
    assert f.overhead_ms_per_step == pytest.approx(500.0)
    assert event_type_name(EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED) == "WorkflowTaskScheduled"


def _run(failed: int, procedure_s: float, ok: bool = True) -> RunResult:
    closed = "WorkflowExecutionCompleted" if ok else "WorkflowExecutionFailed"
    return RunResult(
        requests=1000,
        failed=failed,
        steps=30,
        probe_p50_ms=2.0,
        probe_max_ms=1600.0,
        figures=Figures(
            procedure_s=procedure_s, activity_s=procedure_s - 4.0, activities=40, closed_as=closed
        ),
    )


def test_lines_and_median_summary() -> None:
    r = _run(0, 30.0)
    assert r.ok
    assert run_line(r) == (
        "requests=1000 failed=0 procedure_s=30.00 activity_s=26.00 "
        "overhead_ms_per_step=100.0 steps=30 activities=40 probe_p50_ms=2.0 "
        "probe_max_ms=1600.0"
    )
    runs = [_run(0, 30.0), _run(2, 40.0), _run(0, 32.0, ok=False)]
    assert not runs[1].ok and not runs[2].ok
    line = summary_line(runs)
    assert line.startswith("median of 3 runs: requests=1000 failed=0 procedure_s=32.00 activity_s=28.00 ")
    assert line.endswith(" failed_total=2")


# --------------------------------------------------------------------------- bench.secret_server


def _ss(procedure: str, nodes: int, failed: int, refused: int, procedure_s: float, ok: bool = True) -> SsRun:
    r = _run(failed, procedure_s, ok)
    return SsRun(procedure=procedure, nodes=nodes, run=dataclasses.replace(r, refused=refused))


def test_secret_server_lines_and_median_per_procedure() -> None:
    r = _ss("ss-rolling", 4, 0, 37, 61.234)
    assert r.ok
    assert ss_run_line(r) == (
        "procedure=ss-rolling nodes=4 requests=1000 failed=0 refused=37 "
        "procedure_s=61.23 steps=30 activities=40 probe_p50_ms=2.0 "
        "probe_max_ms=1600.0"
    )
    # Refused changes (maintenance mode answered 423) do not make a run fail; a lost request does.
    assert not _ss("ss-rolling", 4, 1, 0, 60.0).ok
    assert not _ss("ss-load-balanced", 3, 0, 0, 60.0, ok=False).ok
    runs = [
        _ss("ss-rolling", 4, 0, 10, 60.0),
        _ss("ss-load-balanced", 3, 0, 5, 40.0),
        _ss("ss-rolling", 4, 3, 30, 70.0),
        _ss("ss-load-balanced", 3, 0, 7, 44.0),
        _ss("ss-rolling", 4, 0, 20, 64.0),
        _ss("ss-load-balanced", 3, 0, 6, 42.0),
    ]
    lines = ss_summary_lines(runs)
    assert lines == [
        "median of 3 runs: procedure=ss-rolling nodes=4 requests=1000 failed=0 refused=20 procedure_s=64.00 "
        "steps=30 activities=40 probe_p50_ms=2.0 probe_max_ms=1600.0 failed_total=3",
        "median of 3 runs: procedure=ss-load-balanced nodes=3 requests=1000 failed=0 refused=6 "
        "procedure_s=42.00 steps=30 activities=40 probe_p50_ms=2.0 probe_max_ms=1600.0 failed_total=0",
    ]


def test_secret_server_sites_inputs_and_approver(tmp_path: Path) -> None:
    cfg = LabConfig(root=tmp_path, nodes=ss_bench.LAB_NODES)
    inv = parse_inventory(site_inventory(cfg), base_dir=tmp_path)
    assert dict(ss_bench.PROCEDURES) == {"ss-rolling": 4, "ss-load-balanced": 3}
    assert len(inv.nodes) == 4 and narrow_site(inv, 4) is inv
    three = narrow_site(inv, 3)
    assert [n.name for n in three.nodes] == ["node1", "node2", "node3"]
    # The main balancer cut to the three; the temporary test balancer has no members.
    assert [sorted(lb.members) for lb in three.load_balancers] == [["node1", "node2", "node3"], []]
    # ss-rolling's groups on 4 nodes: two and two (B upgraded first).
    assert [n.group for n in inv.nodes] == ["A", "A", "B", "B"]
    # The bench approves every gate as someone the lab lists, who is not the run's starter.
    for gate in (*ss_rolling.GATES, "swap"):
        assert ss_bench.APPROVER in inv.approvers[gate]
    assert ss_bench.STARTED_BY != ss_bench.APPROVER
    for procedure, nodes in ss_bench.PROCEDURES:
        arg, result_type = ss_bench.procedure_input(procedure, narrow_site(inv, nodes), "/p/v2.zip")
        assert arg.started_by == ss_bench.STARTED_BY and arg.package_path == "/p/v2.zip"
        assert len(arg.inventory.nodes) == nodes and not arg.dry_run
        assert (
            result_type.__name__
            == {"ss-rolling": "SsRollingResult", "ss-load-balanced": "SsLoadBalancedResult"}[procedure]
        )
    with pytest.raises(ValueError):
        ss_bench.procedure_input("rolling-deploy", inv, "/p/v2.zip")


def test_secret_server_refuses_bad_options() -> None:
    for argv in (["--runs", "0"], ["--rate", "0"], ["--timeout", "-1"]):
        with pytest.raises(SystemExit) as e:
            ss_bench.main(argv)
        assert e.value.code == 2
