"""bench/minor_blue_green.py: its line and figures from synthetic probe summaries and
timelines (pure: no lab processes, no server), its input on the lab's inventory."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from bench import minor_blue_green as bg
from bench.rolling_deploy import Figures, RunResult
from inventory.load import parse_inventory
from lab.config import LabConfig
from lab.manager import site_inventory
from workflows.minor_blue_green import MinorBlueGreenResult
from workflows.timeline import StepRecord, StepResult

T0 = dt.datetime(2024, 1, 1, 12, 0, 0, tzinfo=dt.UTC)


def _step(
    name: str,
    seed: str | None,
    start: float,
    end: float | None,
    node: str | None = None,
    result: StepResult = "ok",
) -> StepRecord:
    return StepRecord(
        name=name,
        seed_step=seed,
        node=node,
        started=T0 + dt.timedelta(seconds=start),
        ended=None if end is None else T0 + dt.timedelta(seconds=end),
        result=result,
    )


def test_maintenance_seconds_from_the_probe_summary() -> None:
    # Blue-green shows no maintenance page: the probe's summary has empty times.
    assert (
        bg.maintenance_s(
            {"total": 100, "failed": 0, "maintenance": 0, "maintenance_first": "", "maintenance_last": ""}
        )
        == 0.0
    )
    assert bg.maintenance_s({}) == 0.0  # an older probe or no summary
    summary = {
        "maintenance": 40,
        "maintenance_first": "2024-01-01T12:00:01.250+00:00",
        "maintenance_last": "2024-01-01T12:00:05.000+00:00",
    }
    assert bg.maintenance_s(summary) == pytest.approx(3.75)
    assert bg.maintenance_s({**summary, "maintenance_last": summary["maintenance_first"]}) == 0.0


def test_migration_seconds_are_the_seed_step_2_steps() -> None:
    steps = [
        _step("P1 inspect package", "P1", 0.0, 0.2),
        _step("1 snapshot the database", "1", 0.2, 1.0),
        _step("2 pre-upgrade migration (migration 2)", "2", 1.0, 1.4),
        _step("2 pre-upgrade migration (migration 3)", "2", 1.4, 2.0),
        _step("3 clone from node1", "3", 2.0, 3.0, node="node1-v2-0-0"),
        _step("13 wait for zero sessions", "13", 5.0, None, node="node1"),
    ]  # still running
    assert bg.migration_s(steps) == pytest.approx(1.0)
    assert bg.migration_s(steps[:2]) == 0.0  # no pending migration
    lines = bg.step_lines(steps)
    assert lines[2] == "  2 2 pre-upgrade migration (migration 2): 0.40s ok"
    assert lines[4] == "  3 3 clone from node1 [node1-v2-0-0]: 1.00s ok"
    assert lines[5] == " 13 13 wait for zero sessions [node1]: - ok"


def test_the_line_and_its_parse() -> None:
    line = bg.result_line(2345, 0, 0.0, 0.4321)
    assert line == "procedure=minor-blue-green requests=2345 failed=0 maintenance_s=0.00 migration_s=0.43"
    assert bg.parse_result_line(line) == {
        "procedure": "minor-blue-green",
        "requests": 2345,
        "failed": 0,
        "maintenance_s": 0.0,
        "migration_s": 0.43,
    }
    for bad in ("procedure=minor-blue-green requests=1", "requests 12", "failed= x=1"):
        with pytest.raises(ValueError):
            bg.parse_result_line(bad)


def _run(failed: int, completed: bool = True) -> RunResult:
    closed = "WorkflowExecutionCompleted" if completed else "WorkflowExecutionFailed"
    return RunResult(
        requests=1000,
        failed=failed,
        steps=60,
        probe_p50_ms=2.0,
        probe_max_ms=1600.0,
        figures=Figures(procedure_s=40.0, activity_s=35.0, activities=70, closed_as=closed),
    )


def test_long_requests_outcome_and_exit_status() -> None:
    old = ("node1", "node2", "node3")
    ok = bg.LongOutcome(
        [bg.LongRequest(200, "node1"), bg.LongRequest(200, "node2"), bg.LongRequest(200, "node1-v2-0-0")],
        old_servers=old,
    )
    assert ok.ok and ok.on_old == 2
    assert ok.describe() == (
        "long requests: 3/3 finished 200, 2 on the old servers (node1: 200, node1-v2-0-0: 200, node2: 200)"
    )
    cut = bg.LongOutcome([bg.LongRequest(200, "node1"), bg.LongRequest(-1, "")], old_servers=old)
    assert not cut.ok and "1/2 finished 200" in cut.describe()
    never = bg.LongOutcome(old_servers=old, error="TimeoutError: ")
    assert not never.ok and "none finished" in never.describe()

    result = MinorBlueGreenResult(
        site="lab",
        version="2.0.0",
        old_servers=old,
        new_servers=(),
        terminated=old,
        dry_run=False,
        plan=(),
        steps=(),
    )
    assert bg.exit_status(_run(0), ok, result) == 0
    assert bg.exit_status(_run(1), ok, result) == 1  # a request failed
    assert bg.exit_status(_run(-1), ok, result) == 1  # the probe wrote no summary
    assert bg.exit_status(_run(0), cut, result) == 1  # a long request was cut
    assert bg.exit_status(_run(0, completed=False), ok, None) == 1  # the run failed


def test_long_requests_open_before_anything_is_attached() -> None:
    # Three old servers: the moment the third new server is being tested.
    steps = [
        _step("test: healthy, version 2.0.0, log-on", "7", 0, 1),
        _step("test: healthy, version 2.0.0, log-on", "9", 2, 3),
    ]
    assert not bg.before_attach(steps, 3)
    steps.append(_step("test: healthy, version 2.0.0, log-on", "9", 4, None, result="running"))
    assert bg.before_attach(steps, 3)
    # Polled too late (the test was quick): any later step still opens them.
    assert bg.before_attach([_step("11 attach to main", "11", 5, None)], 3)


def test_input_on_the_lab_inventory(tmp_path: Path) -> None:
    cfg = LabConfig(root=tmp_path, nodes=3)
    inv = parse_inventory(site_inventory(cfg), base_dir=tmp_path)
    assert bg.old_servers(inv) == ("node1", "node2", "node3")
    inp = bg.bench_input(inv, "/p/v2.zip")
    assert (inp.package_path, inp.started_by, inp.dry_run) == ("/p/v2.zip", bg.STARTED_BY, False)
    # The bench decides the gate as someone the lab lists, who did not start the run.
    assert bg.APPROVER in inv.approvers["terminate"] and bg.STARTED_BY != bg.APPROVER
    # What preflight needs of the site to clone and drain.
    assert inv.provisioning is not None and inv.application.health_file


def test_refuses_bad_options() -> None:
    for argv in (["--nodes", "0"], ["--rate", "0"], ["--long", "0"], ["--timeout", "-1"]):
        with pytest.raises(SystemExit) as e:
            bg.main(argv)
        assert e.value.code == 2
