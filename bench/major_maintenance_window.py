"""Benchmark: major-maintenance-window v1 -> v2 on a private lab, under probe traffic.

    python -m bench.major_maintenance_window [--nodes 3] [--rate 100] [--root .lab-bench-mw]
                                             [--port-base 19400] [--writes-quiet 0.5]
                                             [--slow-every 0] [--keep] [--timeout 600]

The arrangement of bench/minor_blue_green.py (bench/rolling_deploy.py's `bench_lab` and
`measure_run`): its own lab under --root with its own Temporal dev server (port_base+50, UI
+51) and a worker (`python -m worker`); the probe at --rate through the main frontend for
the whole run, without long requests unless --slow-every N (every N-th a 1.5 s one): the
old servers' stop at step 19 lets every request in flight finish, so a site's longest
request adds to its downtime, and that is the site's, not the procedure's.
`major-maintenance-window` (seed 004) prepares the warm replica and the new
servers beside the site, then takes the site down behind HAProxy's maintenance page (18),
stops the old servers, migrates (23), swaps old for new and tests them; the `go-live` gate
is decided "go-live" and the `terminate` gate "terminate", both as alice, as soon as they
open. One line on stdout:

    procedure=major-maintenance-window requests=<n> failed=<n> maintenance_s=<s> migration_s=<s>

maintenance_s: how long the probe saw only the maintenance page (its first to its last one);
migration_s: the result's step 23 (the migrations). stderr: the downtime (the result's, 17
to 33 on the workflow's clock), how long the go-live gate waited for the bench's decision
and the maintenance time without it, every step's duration, and whether the probe had a
failure other than the maintenance page between page on and page off. Exit 1 when a
request failed or the run failed; 2 when the bench itself could not run. The lab is torn
down at the end unless --keep.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from temporalio.client import WorkflowHandle

from bench.minor_blue_green import (
    GATE_TIMEOUT_S,
    STARTED_BY,
    StepLike,
    decide_gate,
    fetch_result,
    maintenance_s,
    read_summary,
    result_line,
    step_lines,
    steps_so_far,
)
from bench.rolling_deploy import RunResult, bench_lab, launch, measure_run, say
from inventory.load import load_inventory
from inventory.model import Inventory
from lab.config import LabConfig
from workflows.major_maintenance_window import PROCEDURE, MajorMaintenanceInput, MajorMaintenanceResult

# The go-live gate's wait is part of the downtime: poll for it often.
GATE_POLL_S = 0.02
PAGE_ON_STEP = "18"
# Step 31, or a rollback's / revert's own lifting of the page.
PAGE_OFF_NAMES = ("maintenance page off", "maintenance page lifted")
SHOWN_FAILURES = 5


# =========================================================================== figures (pure)


class TimedStep(StepLike, Protocol):
    """A timeline step with its start (workflows.timeline.StepRecord)."""

    @property
    def started(self) -> dt.datetime: ...


def page_window(steps: Iterable[TimedStep]) -> tuple[dt.datetime | None, dt.datetime | None]:
    """(page on, page off) of a run: the start of step 18 and the end of the last step
    that lifted the page; None where the timeline has no such step (a run that failed
    before 18, or whose page is still up)."""
    on: dt.datetime | None = None
    off: dt.datetime | None = None
    for s in steps:
        if on is None and s.seed_step == PAGE_ON_STEP:
            on = s.started
        if s.name.endswith(PAGE_OFF_NAMES) and s.duration_s is not None:
            off = s.started + dt.timedelta(seconds=s.duration_s)
    return on, off


def failures_between(
    failures: Iterable[Mapping[str, Any]], start: dt.datetime, end: dt.datetime | None
) -> list[Mapping[str, Any]]:
    """The probe's failure records (lab/probe.py: {t, method, path, status, error, node})
    from start to end (None: to the end of the probe). The maintenance page is never one:
    the probe counts it apart."""
    out = []
    for f in failures:
        t = dt.datetime.fromisoformat(str(f.get("t", "")))
        if start <= t and (end is None or t <= end):
            out.append(f)
    return out


def read_failures(path: Path) -> list[dict[str, Any]]:
    """The probe's JSONL failure log (none when there is no file); a torn last line is skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def describe_failure(f: Mapping[str, Any]) -> str:
    what = f.get("status") if f.get("status") is not None else f.get("error") or "?"
    node = f" [{f['node']}]" if f.get("node") else ""
    return f"{f.get('t', '?')} {f.get('method', '?')} {f.get('path', '?')}: {what}{node}"


def window_failures_line(
    failures: Sequence[Mapping[str, Any]], on: dt.datetime | None, off: dt.datetime | None
) -> str:
    if on is None:
        return "page on -> off: the page never went on"
    until = "page off" if off is not None else "the probe's end (the page was not seen lifted)"
    if not failures:
        return f"page on -> {until}: no failure other than the maintenance page"
    shown = "; ".join(describe_failure(f) for f in failures[:SHOWN_FAILURES])
    more = f" (+{len(failures) - SHOWN_FAILURES} more)" if len(failures) > SHOWN_FAILURES else ""
    return f"page on -> {until}: {len(failures)} failures other than the maintenance page: {shown}{more}"


def without_gate_s(maintenance: float, gate_wait: float | None) -> float:
    """The maintenance time the procedure itself took: the operator's go-live wait taken out."""
    return max(maintenance - (gate_wait or 0.0), 0.0)


def exit_status(run: RunResult, result: MajorMaintenanceResult | None) -> int:
    return 0 if run.ok and result is not None else 1


def bench_input(inv: Inventory, package_path: str, writes_quiet_s: float = 0.5) -> MajorMaintenanceInput:
    return MajorMaintenanceInput(
        inventory=inv,
        package_path=package_path,
        started_by=STARTED_BY,
        writes_quiet_s=writes_quiet_s,
        gate_timeout_s=GATE_TIMEOUT_S,
    )


# =========================================================================== the bench


@dataclass
class Gatekeeper:
    """Next to the workflow: go-live, then terminate, each decided as soon as it opens."""

    go_live_wait_s: float | None = None
    handle: WorkflowHandle[Any, Any] | None = None

    async def __call__(self, handle: WorkflowHandle[Any, Any]) -> None:
        self.handle = handle
        self.go_live_wait_s = await decide_gate(handle, "go-live", "go-live", GATE_POLL_S)
        await decide_gate(handle, "terminate", "terminate", GATE_POLL_S)


async def run_bench(
    cfg: LabConfig, rate: float, keep: bool, writes_quiet_s: float, timeout_s: float, slow_every: int = 0
) -> int:
    async with bench_lab(cfg, keep) as (site, client):
        inv = load_inventory(site)
        side = Gatekeeper()
        t0 = time.monotonic()
        run = await measure_run(
            cfg,
            client,
            rate,
            PROCEDURE,
            inv,
            bench_input(inv, str(cfg.package(2)), writes_quiet_s),
            MajorMaintenanceResult,
            timeout_s,
            alongside=side,
            slow_every=slow_every,
        )
        wall = time.monotonic() - t0
        result = await fetch_result(client, side.handle, MajorMaintenanceResult)
        summary = read_summary(cfg.probe_summary)
        steps = result.steps if result is not None else await steps_so_far(side.handle)
        for line in step_lines(steps):
            say(f"step {line}")
        maintenance = maintenance_s(summary)
        on, off = page_window(steps)
        window = failures_between(read_failures(cfg.probe_log), on, off) if on is not None else []
        say(window_failures_line(window, on, off))
        if result is not None:
            say(
                f"downtime (17 -> 33, workflow clock): {result.downtime_s:.2f}s; migrations (23): "
                f"{result.migration_s:.2f}s; new servers {', '.join(n.name for n in result.new_servers)}; "
                f"terminated {', '.join(result.terminated) or 'none'}"
            )
        gate = "-" if side.go_live_wait_s is None else f"{side.go_live_wait_s:.2f}s"
        pages = summary.get("maintenance", 0)
        say(
            f"maintenance page seen by the probe: {maintenance:.2f}s ({pages} pages); "
            f"go-live gate waited {gate}; maintenance without the operator's gate: "
            f"{without_gate_s(maintenance, side.go_live_wait_s):.2f}s"
        )
        say(
            f"total: procedure {run.figures.procedure_s:.2f}s ({run.figures.closed_as or 'open'}), "
            f"{wall:.1f}s with the probe; probe p50 {run.probe_p50_ms:.1f} ms, max {run.probe_max_ms:.1f} ms"
        )
        migration = result.migration_s if result is not None else 0.0
        print(result_line(run.requests, run.failed, maintenance, migration, PROCEDURE), flush=True)
        return exit_status(run, result)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.major_maintenance_window",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--nodes", type=int, default=3, help="old servers (the lab's nodes)")
    p.add_argument("--rate", type=float, default=100.0, help="probe requests per second")
    p.add_argument("--root", type=Path, default=Path(".lab-bench-mw"))
    p.add_argument(
        "--port-base", type=int, default=19400, help="lab ports from here; Temporal on +50, its UI on +51"
    )
    p.add_argument(
        "--writes-quiet",
        type=float,
        default=0.5,
        help="step 19: seconds the primary must show no write (the input's default)",
    )
    p.add_argument(
        "--slow-every",
        type=int,
        default=0,
        help="every N-th probe request a long one (GET /slow?ms=1500); 0: none",
    )
    p.add_argument("--keep", action="store_true", help="leave the lab and worker running")
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds the workflow may run before it is terminated (run failed)",
    )
    a = p.parse_args(argv)
    if a.nodes < 1 or a.rate <= 0 or a.writes_quiet < 0 or a.timeout <= 0 or a.slow_every < 0:
        p.error("--nodes must be >= 1, --rate and --timeout > 0, --writes-quiet and --slow-every >= 0")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = LabConfig(
        root=a.root,
        nodes=a.nodes,
        port_base=a.port_base,
        temporal_port=a.port_base + 50,
        temporal_ui_port=a.port_base + 51,
    )
    return launch(run_bench(cfg, a.rate, a.keep, a.writes_quiet, a.timeout, a.slow_every))


if __name__ == "__main__":
    sys.exit(main())
