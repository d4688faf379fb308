"""Benchmark: rolling-deploy v1 -> v2 on a private lab, under probe traffic.

    python -m bench.rolling_deploy [--nodes 3] [--rate 100] [--runs 1] [--root .lab-bench]
                                   [--port-base 19000] [--keep] [--timeout 600]

Starts its own lab under --root with its own Temporal dev server (port_base+50, UI +51), so
the developer's `.lab` (7233 / 18000) is never touched; a worker (`python -m worker`, as in
production and in `make demo`); then for each run: the probe at --rate through the main
frontend, the workflow, the probe stopped, and one line on stdout:

    requests=<n> failed=<n> procedure_s=<s> activity_s=<s> overhead_ms_per_step=<ms> steps=<n>
    activities=<n> probe_p50_ms=<ms> probe_max_ms=<ms>

The time figures come from the workflow's event history (see `figures`). Between runs the
lab goes back to v1 (`lab_reset`). With --runs > 1 a last line gives the median of every
figure. The lab is torn down at the end (also on failure or Ctrl-C) unless --keep. Exit
status 1 when a run lost a request or the workflow failed, 2 when the bench itself failed.
Progress and diagnostics go to stderr; stdout holds only the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from temporalio.api.enums.v1 import EventType, TaskQueueType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle

from inventory.load import load_inventory
from inventory.model import Inventory
from lab import manager, mariadb, procs, provision
from lab.config import LabConfig
from lab.probe import start_probe_process, stop_probe_process
from starter import client as zc
from starter.demo import TASK_QUEUE, node_versions, start_worker
from starter.signing import KEY_ENV
from worker.main import connect
from workflows.rolling_deploy import RollingDeployInput, RollingDeployResult

# The probe is a fresh interpreter (imports aiohttp): let it reach its rate before the
# workflow starts, so the whole procedure is under traffic.
PROBE_WARMUP_S = 2.0
WORKER_READY_TIMEOUT_S = 60.0

ACTIVITY_STARTED = "ActivityTaskStarted"
ACTIVITY_CLOSED = frozenset(
    {"ActivityTaskCompleted", "ActivityTaskFailed", "ActivityTaskTimedOut", "ActivityTaskCanceled"}
)
WORKFLOW_STARTED = "WorkflowExecutionStarted"
WORKFLOW_CLOSED = frozenset(
    {
        "WorkflowExecutionCompleted",
        "WorkflowExecutionFailed",
        "WorkflowExecutionTimedOut",
        "WorkflowExecutionCanceled",
        "WorkflowExecutionTerminated",
        "WorkflowExecutionContinuedAsNew",
    }
)


# =========================================================================== figures (pure)


@dataclass(frozen=True)
class Event:
    """The part of a history event the figures need.

    type: the event type as the Web UI names it ("ActivityTaskStarted"); time: seconds
    since the epoch; scheduled_id: for activity started / closed events, the id of the
    ActivityTaskScheduled event they belong to (how starts and ends are paired)."""

    type: str
    time: float
    event_id: int = 0
    scheduled_id: int = 0


@dataclass(frozen=True)
class Figures:
    procedure_s: float  # workflow start -> close
    activity_s: float  # time covered by at least one running activity
    activities: int  # activity executions (started and closed, or cut by the close)
    closed_as: str  # "WorkflowExecutionCompleted", ... ("" when still open)

    @property
    def overhead_ms_per_step(self) -> float:
        """Orchestration cost per activity: scheduling, workflow tasks, queueing."""
        if self.activities == 0:
            return 0.0
        return (self.procedure_s - self.activity_s) * 1000 / self.activities

    @property
    def completed(self) -> bool:
        return self.closed_as == "WorkflowExecutionCompleted"


def event_type_name(event_type: int) -> str:
    """EVENT_TYPE_ACTIVITY_TASK_STARTED -> ActivityTaskStarted."""
    name = EventType.Name(event_type).removeprefix("EVENT_TYPE_")  # type: ignore[arg-type]
    return "".join(word.capitalize() for word in name.split("_"))


def events_from_history(events: Iterable[HistoryEvent]) -> list[Event]:
    """Temporal history events (`(await handle.fetch_history()).events`) -> `Event`s."""
    out: list[Event] = []
    for e in events:
        kind = e.WhichOneof("attributes")
        attrs = getattr(e, kind) if kind else None
        scheduled = getattr(attrs, "scheduled_event_id", 0) if kind and kind.startswith("activity_") else 0
        out.append(
            Event(
                type=event_type_name(e.event_type),
                time=e.event_time.seconds + e.event_time.nanos / 1e9,
                event_id=e.event_id,
                scheduled_id=int(scheduled),
            )
        )
    return out


def merge_intervals(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, disjoint intervals covering exactly what the given ones cover (overlapping
    or touching intervals are merged)."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted((min(a, b), max(a, b)) for a, b in intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def covered_s(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length of the union of the intervals."""
    return sum(end - start for start, end in merge_intervals(intervals))


def activity_intervals(events: Sequence[Event]) -> list[tuple[float, float]]:
    """[ActivityTaskStarted, its close event] per activity execution, paired by scheduled
    event id. An activity still running when the workflow closed ends at the close.

    Temporal writes ActivityTaskStarted for the attempt that closed the activity, so the
    time of earlier failed attempts and their retry backoff counts as overhead."""
    started: dict[int, float] = {}
    intervals: list[tuple[float, float]] = []
    for e in events:
        if e.type == ACTIVITY_STARTED:
            started[e.scheduled_id] = e.time
        elif e.type in ACTIVITY_CLOSED and e.scheduled_id in started:
            intervals.append((started.pop(e.scheduled_id), e.time))
    close = next((e.time for e in events if e.type in WORKFLOW_CLOSED), None)
    if close is not None:
        intervals.extend((t, max(t, close)) for t in started.values())
    return intervals


def figures(events: Sequence[Event]) -> Figures:
    """The bench figures of one workflow run, from its history."""
    start = next((e.time for e in events if e.type == WORKFLOW_STARTED), None)
    if start is None:
        raise ValueError("history has no WorkflowExecutionStarted event")
    close = next((e for e in events if e.type in WORKFLOW_CLOSED), None)
    end = close.time if close is not None else max(e.time for e in events)
    intervals = activity_intervals(events)
    return Figures(
        procedure_s=end - start,
        activity_s=covered_s(intervals),
        activities=len(intervals),
        closed_as=close.type if close is not None else "",
    )


@dataclass(frozen=True)
class RunResult:
    requests: int
    failed: int
    figures: Figures
    steps: int
    probe_p50_ms: float
    probe_max_ms: float
    # Changes the app refused in maintenance mode (HTTP 423): answered as designed, not failed.
    refused: int = 0

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.figures.completed


def _line(
    requests: float,
    failed: float,
    procedure_s: float,
    activity_s: float,
    overhead_ms: float,
    steps: float,
    activities: float,
    p50_ms: float,
    max_ms: float,
) -> str:
    return (
        f"requests={requests:g} failed={failed:g} procedure_s={procedure_s:.2f} "
        f"activity_s={activity_s:.2f} overhead_ms_per_step={overhead_ms:.1f} steps={steps:g} "
        f"activities={activities:g} probe_p50_ms={p50_ms:.1f} probe_max_ms={max_ms:.1f}"
    )


def run_line(r: RunResult) -> str:
    f = r.figures
    return _line(
        r.requests,
        r.failed,
        f.procedure_s,
        f.activity_s,
        f.overhead_ms_per_step,
        r.steps,
        f.activities,
        r.probe_p50_ms,
        r.probe_max_ms,
    )


def summary_line(runs: Sequence[RunResult]) -> str:
    """The median of every figure over the runs (failed_total: the sum, so one bad run
    cannot hide behind the median)."""

    def med(values: Iterable[float]) -> float:
        return float(statistics.median(list(values)))

    return (
        f"median of {len(runs)} runs: "
        + _line(
            med(r.requests for r in runs),
            med(r.failed for r in runs),
            med(r.figures.procedure_s for r in runs),
            med(r.figures.activity_s for r in runs),
            med(r.figures.overhead_ms_per_step for r in runs),
            med(r.steps for r in runs),
            med(r.figures.activities for r in runs),
            med(r.probe_p50_ms for r in runs),
            med(r.probe_max_ms for r in runs),
        )
        + f" failed_total={sum(r.failed for r in runs)}"
    )


# =========================================================================== the bench


def say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def check_ports_free(cfg: LabConfig) -> None:
    """A lab that is not running under cfg.root needs all its ports free: fail before
    starting anything rather than half-start next to someone else's processes."""
    if any(up for _, up, _ in manager.lab_status(cfg, with_temporal=True, shallow=True)):
        return  # our own lab (an earlier --keep): lab_up reuses it
    ports = [*cfg.all_ports(), cfg.temporal_port, cfg.temporal_ui_port]
    busy = [p for p in ports if procs.port_open("127.0.0.1", p)]
    if busy:
        raise RuntimeError(
            f"ports {', '.join(map(str, busy))} are in use by another process; "
            f"pick another --port-base (lab ports {min(ports)}-{max(ports)})"
        )


async def wait_worker_polling(client: Client, task_queue: str, timeout_s: float) -> None:
    """Until a worker polls both the workflow and the activity task queue (so the first
    run's procedure time does not include the worker's start-up)."""
    deadline = time.monotonic() + timeout_s
    kinds = (TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW, TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY)
    while True:
        polled = []
        for kind in kinds:
            resp = await client.workflow_service.describe_task_queue(
                DescribeTaskQueueRequest(
                    namespace=client.namespace, task_queue=TaskQueue(name=task_queue), task_queue_type=kind
                )
            )
            polled.append(bool(resp.pollers))
        if all(polled):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"no worker polls task queue {task_queue!r} after {timeout_s:.0f}s")
        await asyncio.sleep(0.25)


async def measure_run(
    cfg: LabConfig,
    client: Client,
    rate: float,
    procedure: str,
    inv: Inventory,
    arg: Any,
    result_type: type,
    timeout_s: float = 600.0,
    alongside: Callable[[WorkflowHandle[Any, Any]], Awaitable[Any]] | None = None,
    slow_every: int = 50,
) -> RunResult:
    """One measured run of any procedure: the probe at `rate` through the main frontend
    (every `slow_every`-th request a long one, 0: none), the workflow started (and
    `alongside(handle)` run next to it, e.g. approving its gates, cancelled once the
    workflow is over), the probe stopped, the figures from the history."""
    probe = start_probe_process(cfg.main_url, rate, cfg.probe_log, cfg.probe_summary, slow_every=slow_every)
    side: asyncio.Future[Any] | None = None
    try:
        await asyncio.sleep(PROBE_WARMUP_S)
        if probe.poll() is not None:
            raise RuntimeError(f"the probe exited at once (status {probe.returncode})")
        handle = await zc.start_procedure(client, procedure, inv, arg, TASK_QUEUE)
        say(f"workflow {handle.id} started (probe at {rate:g} req/s on {cfg.main_url})")
        if alongside is not None:
            side = asyncio.ensure_future(alongside(handle))
        typed = client.get_workflow_handle(handle.id, run_id=handle.run_id, result_type=result_type)
        try:
            outcome = zc.Outcome(
                ok=True, result=await asyncio.wait_for(typed.result(), timeout_s), error=None
            )
        except WorkflowFailureError as e:
            outcome = zc.Outcome(ok=False, result=None, error=zc.failure_message(e))
        except TimeoutError:
            say(f"workflow {handle.id} still running after {timeout_s:g}s: terminating it")
            await handle.terminate(reason=f"bench timeout ({timeout_s:g}s)")
            outcome = zc.Outcome(ok=False, result=None, error=f"timed out after {timeout_s:g}s")
    finally:
        if side is not None:
            side.cancel()  # a no-op when it ended with the workflow
            await asyncio.wait([side])
            if not side.cancelled() and side.exception() is not None:
                say(f"alongside the workflow: {side.exception()!r}")
        summary = await asyncio.to_thread(stop_probe_process, probe, cfg.probe_summary)
    if not outcome.ok:
        say(f"workflow {handle.id} failed: {outcome.error}")
    if not summary:
        say(f"the probe wrote no summary ({cfg.probe_summary}): counting the run as failed")
    history = await handle.fetch_history()
    if outcome.ok:
        steps = len(outcome.result.steps)
    else:
        try:
            steps = len((await zc.progress(handle)).steps)
        except Exception:
            steps = 0
    return RunResult(
        requests=int(summary.get("total", 0)),
        failed=int(summary.get("failed", -1)),
        figures=figures(events_from_history(history.events)),
        steps=steps,
        probe_p50_ms=float(summary.get("latency_p50_ms", 0.0)),
        probe_max_ms=float(summary.get("latency_max_ms", 0.0)),
        refused=int(summary.get("refused", 0)),
    )


async def one_run(
    cfg: LabConfig, client: Client, rate: float, site: Path, timeout_s: float = 600.0
) -> RunResult:
    inv = load_inventory(site)
    return await measure_run(
        cfg,
        client,
        rate,
        "rolling-deploy",
        inv,
        RollingDeployInput(inventory=inv, package_path=str(cfg.package(2))),
        RollingDeployResult,
        timeout_s,
    )


async def left_by_earlier_run(cfg: LabConfig) -> str:
    """Why the lab is not as lab_up makes it ("" when it is): a bench's figures are only
    comparable from v1 with schema 1 and the original nodes alone."""
    versions = set((await node_versions(cfg)).values())
    if versions != {"1.0.0"}:
        return f"nodes at {', '.join(sorted(versions)) or 'no version'}, not all at 1.0.0"
    schema = await asyncio.to_thread(mariadb.schema_version, cfg)
    if schema != 1:
        return f"database at schema {schema}, not 1"
    if provision.provisioned(cfg) or provision.destroyed_originals(cfg):
        return "servers provisioned or destroyed by a procedure"
    return ""


@contextlib.asynccontextmanager
async def bench_lab(cfg: LabConfig, keep: bool) -> AsyncIterator[tuple[Path, Client]]:
    """The private lab at v1 with its Temporal dev server and a polling worker: yields the
    site.yaml and a client; tears it all down on the way out (also on failure) unless keep."""
    check_ports_free(cfg)  # before the try: nothing of ours to tear down yet
    try:
        t0 = time.monotonic()
        site = await manager.lab_up(cfg, with_temporal=True)
        # The benches decide their gates as alice, signed with her lab key (issue 17.6).
        os.environ.setdefault(KEY_ENV, str(cfg.approver_key("alice")))
        left = await left_by_earlier_run(cfg)
        if left:
            say(f"{left} (left by an earlier run): resetting the lab to v1")
            await manager.lab_reset(cfg)
        start_worker(cfg)
        client = await connect(cfg.temporal_address, tracing=False)
        await wait_worker_polling(client, TASK_QUEUE, WORKER_READY_TIMEOUT_S)
        say(f"lab, Temporal ({cfg.temporal_address}) and worker ready in {time.monotonic() - t0:.1f}s")
        yield site, client
    finally:
        if keep:
            say(
                f"--keep: lab left running under {cfg.abs_root} (Temporal UI "
                f"http://127.0.0.1:{cfg.temporal_ui_port}); stop it with "
                f"`zerodown lab down --root {cfg.root}` and the worker (pid file {cfg.worker_pidfile})"
            )
        else:
            say("tearing the lab down")
            procs.stop_pidfile(cfg.worker_pidfile, timeout=15, expect="worker")
            await asyncio.to_thread(manager.lab_down, cfg)


async def reset_lab(cfg: LabConfig) -> None:
    """Back to v1 between runs."""
    t1 = time.monotonic()
    await manager.lab_reset(cfg)
    say(f"lab reset to v1 in {time.monotonic() - t1:.1f}s")


async def run_bench(cfg: LabConfig, rate: float, runs: int, keep: bool, timeout_s: float = 600.0) -> int:
    results: list[RunResult] = []
    async with bench_lab(cfg, keep) as (site, client):
        for n in range(runs):
            if n > 0:
                await reset_lab(cfg)
            result = await one_run(cfg, client, rate, site, timeout_s)
            results.append(result)
            print(run_line(result), flush=True)
        if runs > 1:
            print(summary_line(results), flush=True)
    return 0 if results and all(r.ok for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.rolling_deploy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--rate", type=float, default=100.0, help="probe requests per second")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--root", type=Path, default=Path(".lab-bench"))
    p.add_argument(
        "--port-base", type=int, default=19000, help="lab ports from here; Temporal on +50, its UI on +51"
    )
    p.add_argument("--keep", action="store_true", help="leave the lab and worker running")
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds one workflow may run before it is terminated (run failed)",
    )
    a = p.parse_args(argv)
    if a.nodes < 1 or a.runs < 1 or a.rate <= 0 or a.timeout <= 0:
        p.error("--nodes and --runs must be >= 1, --rate and --timeout > 0")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = LabConfig(
        root=a.root,
        nodes=a.nodes,
        port_base=a.port_base,
        temporal_port=a.port_base + 50,
        temporal_ui_port=a.port_base + 51,
    )
    return launch(run_bench(cfg, a.rate, a.runs, a.keep, a.timeout))


def lab_options(p: argparse.ArgumentParser, root: str, port_base: int) -> None:
    """The options every bench on a private lab takes: --root, --port-base, --keep, --timeout."""
    p.add_argument("--root", type=Path, default=Path(root))
    p.add_argument(
        "--port-base", type=int, default=port_base, help="lab ports from here; Temporal on +50, its UI on +51"
    )
    p.add_argument("--keep", action="store_true", help="leave the lab and worker running")
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds one workflow may run before it is terminated (run failed)",
    )


def lab_config(a: argparse.Namespace, nodes: int) -> LabConfig:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return LabConfig(
        root=a.root,
        nodes=nodes,
        port_base=a.port_base,
        temporal_port=a.port_base + 50,
        temporal_ui_port=a.port_base + 51,
    )


def launch(bench: Coroutine[Any, Any, int]) -> int:
    """Run a bench to its exit status: 130 on Ctrl-C, 2 when the bench itself failed."""
    try:
        return asyncio.run(bench)
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except Exception as e:
        say(f"failed: {e.__class__.__name__}: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
