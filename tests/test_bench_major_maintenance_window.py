"""bench/major_maintenance_window.py: its line and figures from synthetic probe summaries,
failure logs and timelines (pure: no lab processes, no server), its input on the lab's
inventory."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from bench import major_maintenance_window as mw
from bench import minor_blue_green as bg
from bench.rolling_deploy import Figures, RunResult
from inventory.load import parse_inventory
from lab.config import LabConfig
from lab.manager import site_inventory
from workflows.major_maintenance_window import MajorMaintenanceInput, MajorMaintenanceResult
from workflows.timeline import StepRecord, StepResult

T0 = dt.datetime(2024, 1, 1, 12, 0, 0, tzinfo=dt.UTC)


def _at(s: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=s)


def _step(
    name: str, seed: str | None, start: float, end: float | None, result: StepResult = "ok"
) -> StepRecord:
    return StepRecord(
        name=name,
        seed_step=seed,
        node=None,
        started=_at(start),
        ended=None if end is None else _at(end),
        result=result,
    )


def _failure(s: float, status: int | None = 502, error: str | None = None) -> dict[str, object]:
    return {
        "t": _at(s).isoformat(timespec="milliseconds"),
        "method": "GET",
        "path": "/items",
        "status": status,
        "error": error,
        "node": None,
    }


HAPPY = [
    _step("16 detach from test", "16", 0.0, 0.1),
    _step("17 BEGIN SITE DOWNTIME", "17", 0.1, 0.1),
    _step("18 maintenance page on", "18", 0.1, 0.2),
    _step("23 migration (migration 2)", "23", 4.0, 4.5),
    _step("31 maintenance page off", "31", 9.0, 9.25),
    _step("33 END SITE DOWNTIME", "33", 9.5, 9.5),
]


def test_the_line_is_minor_blue_greens_with_this_procedure() -> None:
    line = bg.result_line(1800, 0, 8.456, 0.5, mw.PROCEDURE)
    assert line == (
        "procedure=major-maintenance-window requests=1800 failed=0 maintenance_s=8.46 migration_s=0.50"
    )
    assert bg.parse_result_line(line) == {
        "procedure": "major-maintenance-window",
        "requests": 1800,
        "failed": 0,
        "maintenance_s": 8.46,
        "migration_s": 0.5,
    }
    # The probe saw the page from its first to its last one.
    assert bg.maintenance_s(
        {
            "maintenance": 800,
            "maintenance_first": _at(0.3).isoformat(),
            "maintenance_last": _at(9.1).isoformat(),
        }
    ) == pytest.approx(8.8)


def test_page_window_from_the_timeline() -> None:
    assert mw.page_window(HAPPY) == (_at(0.1), _at(9.25))
    # Failed before 18: the page never went on.
    assert mw.page_window(HAPPY[:2]) == (None, None)
    # Still up (31 running or never reached).
    assert mw.page_window([*HAPPY[:4], _step("31 maintenance page off", "31", 9.0, None, "running")]) == (
        _at(0.1),
        None,
    )
    # A revert lifts the page in its own step (no seed step): the last lifting counts.
    reverted = [
        *HAPPY[:4],
        _step("revert: promote the warm replica", None, 5.0, 6.0),
        _step("revert: maintenance page off", None, 8.0, 8.5),
    ]
    assert mw.page_window(reverted) == (_at(0.1), _at(8.5))


def test_failures_between_page_on_and_off(tmp_path: Path) -> None:
    log = tmp_path / "probe.jsonl"
    assert mw.read_failures(log) == []  # no failure: the probe never creates the file
    records = [_failure(0.05), _failure(3.0, None, "ServerDisconnectedError"), _failure(9.25), _failure(12.0)]
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"t": "2024-01', encoding="utf-8")
    failures = mw.read_failures(log)
    assert failures == records  # the torn last line is skipped
    on, off = mw.page_window(HAPPY)
    assert on is not None
    inside = mw.failures_between(failures, on, off)
    assert inside == records[1:3]
    assert mw.failures_between(failures, _at(0.1), None) == records[1:]
    line = mw.window_failures_line(inside, on, off)
    assert line.startswith("page on -> page off: 2 failures other than the maintenance page: ")
    assert "GET /items: ServerDisconnectedError" in line and "GET /items: 502" in line
    assert mw.window_failures_line([], on, off) == (
        "page on -> page off: no failure other than the maintenance page"
    )
    assert "never went on" in mw.window_failures_line([], None, None)
    assert "(+2 more)" in mw.window_failures_line([_failure(1.0)] * (mw.SHOWN_FAILURES + 2), on, None)


def test_gate_wait_and_maintenance_without_it() -> None:
    assert bg.gate_wait_s(_at(5.0), _at(5.35)) == pytest.approx(0.35)
    assert bg.gate_wait_s(_at(5.0), _at(4.0)) == 0.0  # never negative
    assert mw.without_gate_s(8.8, 0.35) == pytest.approx(8.45)
    assert mw.without_gate_s(8.8, None) == pytest.approx(8.8)  # the gate never opened
    assert mw.without_gate_s(0.2, 0.35) == 0.0


def _run(failed: int, completed: bool = True) -> RunResult:
    closed = "WorkflowExecutionCompleted" if completed else "WorkflowExecutionFailed"
    return RunResult(
        requests=1800,
        failed=failed,
        steps=80,
        probe_p50_ms=2.0,
        probe_max_ms=1600.0,
        figures=Figures(procedure_s=30.0, activity_s=25.0, activities=90, closed_as=closed),
    )


def test_exit_status() -> None:
    result = MajorMaintenanceResult(
        site="lab",
        version="2.0.0",
        old_servers=("node1",),
        new_servers=(),
        terminated=("node1",),
        dry_run=False,
        plan=(),
        steps=tuple(HAPPY),
        migration_s=0.5,
        downtime_s=9.4,
    )
    assert mw.exit_status(_run(0), result) == 0
    assert mw.exit_status(_run(1), result) == 1  # a request failed
    assert mw.exit_status(_run(-1), result) == 1  # the probe wrote no summary
    assert mw.exit_status(_run(0, completed=False), None) == 1  # the run failed


def test_input_on_the_lab_inventory(tmp_path: Path) -> None:
    cfg = LabConfig(root=tmp_path, nodes=3)
    inv = parse_inventory(site_inventory(cfg), base_dir=tmp_path)
    inp = mw.bench_input(inv, "/p/v2.zip", 1.5)
    assert (inp.package_path, inp.started_by, inp.writes_quiet_s, inp.dry_run) == (
        "/p/v2.zip",
        bg.STARTED_BY,
        1.5,
        False,
    )
    # The bench decides both gates as someone the lab lists, who did not start the run.
    for gate in ("go-live", "terminate"):
        assert bg.APPROVER in inv.approvers[gate]
    assert bg.STARTED_BY != bg.APPROVER
    # The bench runs the input's own quiet time unless told otherwise.
    assert mw.bench_input(inv, "/p/v2.zip").writes_quiet_s == MajorMaintenanceInput(inv, "/p").writes_quiet_s
    # What preflight needs of the site: a maintenance switch, the test balancer, a warm replica.
    lbs = {lb.name: lb for lb in inv.load_balancers}
    assert lbs[inv.load_balancers[0].name].maintenance is not None and lbs[inp.test_lb].frontend_url
    assert inv.databases[0].warm_replica is not None and inv.provisioning is not None


def test_refuses_bad_options() -> None:
    for argv in (
        ["--nodes", "0"],
        ["--rate", "0"],
        ["--writes-quiet", "-1"],
        ["--timeout", "-1"],
        ["--slow-every", "-1"],
    ):
        with pytest.raises(SystemExit) as e:
            mw.main(argv)
        assert e.value.code == 2
