"""Benchmark: minor-blue-green v1 -> v2 on a private lab, under probe traffic.

    python -m bench.minor_blue_green [--nodes 3] [--rate 100] [--root .lab-bench-bg]
                                     [--port-base 19300] [--long 6] [--long-ms 10000]
                                     [--keep] [--timeout 600]

The arrangement of bench/rolling_deploy.py: its own lab under --root with its own Temporal
dev server (port_base+50, UI +51) and a worker (`python -m worker`); the probe at --rate
through the main frontend for the whole run. `minor-blue-green` (seed 003) clones new v2
servers beside the old v1 ones, attaches them, drains the old ones and terminates them. While
the last new server is being tested (before anything is attached), --long long-lived
requests (`GET /slow?ms=--long-ms`, one connection each) are opened through the main
frontend, so they land on the old servers: the drain has to wait for them, and they must
all finish 200. The `terminate` gate is decided "terminate" as alice. One line on stdout:

    procedure=minor-blue-green requests=<n> failed=<n> maintenance_s=<s> migration_s=<s>

maintenance_s: how long the probe saw the maintenance page (first to last; blue-green shows
none: 0); migration_s: the steps of seed step 2 (the additive migration), from the result's
timeline. stderr: the drain time, the long requests' outcome, every step's duration, the
total. Exit 1 when a request failed, a long request did not finish 200 or the run failed;
2 when the bench itself could not run. The lab is torn down at the end unless --keep.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle

from bench.rolling_deploy import RunResult, bench_lab, launch, measure_run, say
from inventory.load import load_inventory
from inventory.model import Inventory
from lab.config import LabConfig
from starter import client as zc
from workflows.gates import Decision
from workflows.minor_blue_green import PROCEDURE, MinorBlueGreenInput, MinorBlueGreenResult
from workflows.timeline import StepRecord

STARTED_BY = "bench"  # the starter may not decide its own run's gates
APPROVER = "alice"  # listed for every gate in the lab inventory
MIGRATION_STEP = "2"  # seed 003 step 2: the pre-upgrade (additive) migrations
POLL_S = 0.1
GATE_TIMEOUT_S = 600.0
R = TypeVar("R")  # a procedure's result type


# =========================================================================== figures (pure)


class StepLike(Protocol):
    """What the figures read of a timeline step (workflows.timeline.StepRecord)."""

    @property
    def name(self) -> str: ...
    @property
    def seed_step(self) -> str | None: ...
    @property
    def node(self) -> str | None: ...
    @property
    def result(self) -> str: ...
    @property
    def duration_s(self) -> float | None: ...


def maintenance_s(summary: Mapping[str, Any]) -> float:
    """Seconds between the first and the last maintenance page the probe saw (0 without one)."""
    first, last = summary.get("maintenance_first") or "", summary.get("maintenance_last") or ""
    if not first or not last:
        return 0.0
    span = (dt.datetime.fromisoformat(last) - dt.datetime.fromisoformat(first)).total_seconds()
    return max(span, 0.0)


def migration_s(steps: Iterable[StepLike]) -> float:
    """The duration of the seed step 2 steps (one per pending migration), summed."""
    return sum(s.duration_s or 0.0 for s in steps if s.seed_step == MIGRATION_STEP)


def result_line(
    requests: int, failed: int, maintenance: float, migration: float, procedure: str = PROCEDURE
) -> str:
    """The stdout line (also bench/major_maintenance_window.py's, with its procedure)."""
    return (
        f"procedure={procedure} requests={requests} failed={failed} "
        f"maintenance_s={maintenance:.2f} migration_s={migration:.2f}"
    )


def parse_result_line(line: str) -> dict[str, str | int | float]:
    """The stdout line back into its figures (the inverse of result_line)."""
    out: dict[str, str | int | float] = {}
    for part in line.split():
        key, sep, value = part.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"not a bench line: {line!r}")
        out[key] = value if key == "procedure" else float(value) if "." in value else int(value)
    missing = {"procedure", "requests", "failed", "maintenance_s", "migration_s"} - set(out)
    if missing:
        raise ValueError(f"bench line without {', '.join(sorted(missing))}: {line!r}")
    return out


def step_lines(steps: Iterable[StepLike]) -> list[str]:
    """One line per timeline step: seed step, name, node, duration, result."""
    lines = []
    for s in steps:
        took = "-" if s.duration_s is None else f"{s.duration_s:.2f}s"
        where = f" [{s.node}]" if s.node else ""
        lines.append(f"{s.seed_step or '-':>3} {s.name}{where}: {took} {s.result}")
    return lines


@dataclass(frozen=True)
class LongRequest:
    status: int  # -1: no answer (connection error, timeout)
    served_by: str  # X-Served-By ("" without an answer)


@dataclass
class LongOutcome:
    """The long requests of a run (empty until they all ended)."""

    requests: list[LongRequest] = field(default_factory=list)
    old_servers: tuple[str, ...] = ()
    error: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.requests) and all(r.status == 200 for r in self.requests)

    @property
    def on_old(self) -> int:
        return sum(r.served_by in self.old_servers for r in self.requests)

    def describe(self) -> str:
        if not self.requests:
            return f"long requests: none finished ({self.error or 'never opened'})"
        by: dict[str, list[int]] = {}
        for r in self.requests:
            by.setdefault(r.served_by or "-", []).append(r.status)
        where = ", ".join(f"{srv}: {' '.join(map(str, st))}" for srv, st in sorted(by.items()))
        ok = sum(r.status == 200 for r in self.requests)
        return (
            f"long requests: {ok}/{len(self.requests)} finished 200, {self.on_old} on the old "
            f"servers ({where})"
        )


def exit_status(run: RunResult, long: LongOutcome, result: MinorBlueGreenResult | None) -> int:
    return 0 if run.ok and long.ok and result is not None else 1


def old_servers(inv: Inventory) -> tuple[str, ...]:
    """The servers minor-blue-green replaces: the first balancer's members."""
    lb = inv.load_balancers[0]
    return tuple(n.name for n in inv.nodes if n.name in lb.members)


def bench_input(inv: Inventory, package_path: str) -> MinorBlueGreenInput:
    return MinorBlueGreenInput(
        inventory=inv, package_path=package_path, started_by=STARTED_BY, gate_timeout_s=GATE_TIMEOUT_S
    )


def before_attach(steps: Sequence[StepLike], servers: int) -> bool:
    """True once the last new server is being tested (nothing attached yet), or later."""
    tested = sum(s.name.startswith("test:") and s.seed_step in ("7", "9") for s in steps)
    return tested >= servers or any(s.seed_step in ("10", "11", "12") for s in steps)


# =========================================================================== the bench


async def open_long_requests(url: str, n: int, ms: int) -> list[LongRequest]:
    """n slow requests through the frontend at once, one connection each (each its own
    session on its server, as a user's long download would be)."""

    async def one(session: aiohttp.ClientSession) -> LongRequest:
        try:
            async with session.get(f"{url}/slow?ms={ms}") as r:
                await r.read()
                return LongRequest(r.status, r.headers.get("X-Served-By", ""))
        except (aiohttp.ClientError, TimeoutError):
            return LongRequest(-1, "")

    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True, limit=0),
        timeout=aiohttp.ClientTimeout(total=ms / 1000 + 60),
    ) as s:
        return list(await asyncio.gather(*(one(s) for _ in range(n))))


def gate_wait_s(since: dt.datetime, at: dt.datetime) -> float:
    """How long a gate waited for its decision: opened (PendingGate.since) -> decided
    (GateRecord.at), both on the workflow's clock."""
    return max((at - since).total_seconds(), 0.0)


async def decide_gate(handle: WorkflowHandle[Any, Any], gate: str, choice: str, poll_s: float = 0.3) -> float:
    """Decide `gate` `choice` as APPROVER as soon as it opens; the seconds it waited."""
    while True:
        try:
            waiting = await zc.pending_gates(handle)
        except Exception:  # no worker answered the query yet
            waiting = []
        for g in waiting:
            if g.gate == gate:
                decision = Decision(
                    gate=g.gate, by=APPROVER, plan_hash=g.plan_hash, choice=choice, comment="bench"
                )
                record = await zc.decide(handle, True, decision)
                waited = gate_wait_s(g.since, record.at)
                say(f"gate {gate}: {choice} ({APPROVER}) after {waited:.2f}s")
                return waited
        await asyncio.sleep(poll_s)


async def choose_terminate(handle: WorkflowHandle[Any, Any]) -> None:
    """Decide the `terminate` gate "terminate" as APPROVER as soon as it opens."""
    await decide_gate(handle, "terminate", "terminate")


@dataclass
class Alongside:
    """Next to the workflow: the long requests before the drain, then the terminate gate."""

    url: str
    old: tuple[str, ...]
    count: int
    ms: int
    long: LongOutcome = field(default_factory=LongOutcome)
    handle: WorkflowHandle[Any, Any] | None = None

    async def __call__(self, handle: WorkflowHandle[Any, Any]) -> None:
        self.handle = handle
        self.long.old_servers = self.old
        try:
            while not before_attach((await zc.progress(handle)).steps, len(self.old)):
                await asyncio.sleep(POLL_S)
            say(f"opening {self.count} long requests ({self.ms} ms) on the old servers")
            # They end during the drain (13), before the gate opens: awaited first, so the
            # outcome is kept even if this task is cancelled once the workflow is over.
            self.long.requests = await open_long_requests(self.url, self.count, self.ms)
        except Exception as e:
            self.long.error = f"{e.__class__.__name__}: {e}"
            raise
        await choose_terminate(handle)


async def fetch_result(
    client: Client, handle: WorkflowHandle[Any, Any] | None, result_type: type[R]
) -> R | None:
    """The run's result (None: no run, or it failed)."""
    if handle is None:
        return None
    typed = client.get_workflow_handle(handle.id, run_id=handle.run_id, result_type=result_type)
    try:
        result: R = await typed.result()
    except WorkflowFailureError:
        return None
    return result


async def steps_so_far(handle: WorkflowHandle[Any, Any] | None) -> tuple[StepRecord, ...]:
    """A failed run's timeline (for the step lines on stderr)."""
    if handle is None:
        return ()
    try:
        return (await zc.progress(handle)).steps
    except Exception:
        return ()


def read_summary(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data


async def run_bench(
    cfg: LabConfig, rate: float, keep: bool, long_count: int, long_ms: int, timeout_s: float
) -> int:
    async with bench_lab(cfg, keep) as (site, client):
        inv = load_inventory(site)
        side = Alongside(url=cfg.main_url, old=old_servers(inv), count=long_count, ms=long_ms)
        t0 = time.monotonic()
        run = await measure_run(
            cfg,
            client,
            rate,
            PROCEDURE,
            inv,
            bench_input(inv, str(cfg.package(2))),
            MinorBlueGreenResult,
            timeout_s,
            alongside=side,
        )
        wall = time.monotonic() - t0
        result = await fetch_result(client, side.handle, MinorBlueGreenResult)
        # measure_run read the probe's summary file; the maintenance times are in it too.
        summary = read_summary(cfg.probe_summary)
        steps = result.steps if result is not None else await steps_so_far(side.handle)
        for line in step_lines(steps):
            say(f"step {line}")
        if result is not None:
            say(
                f"drain: {result.drain_s:.2f}s (forced: {result.forced_detach}); new servers "
                f"{', '.join(n.name for n in result.new_servers)}; terminated {', '.join(result.terminated)}"
            )
        say(side.long.describe())
        say(
            f"total: procedure {run.figures.procedure_s:.2f}s ({run.figures.closed_as or 'open'}), "
            f"{wall:.1f}s with the probe; probe p50 {run.probe_p50_ms:.1f} ms, "
            f"max {run.probe_max_ms:.1f} ms, {summary.get('maintenance', 0)} maintenance pages"
        )
        print(result_line(run.requests, run.failed, maintenance_s(summary), migration_s(steps)), flush=True)
        return exit_status(run, side.long, result)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.minor_blue_green",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--nodes", type=int, default=3, help="old servers (the lab's nodes)")
    p.add_argument("--rate", type=float, default=100.0, help="probe requests per second")
    p.add_argument("--root", type=Path, default=Path(".lab-bench-bg"))
    p.add_argument(
        "--port-base", type=int, default=19300, help="lab ports from here; Temporal on +50, its UI on +51"
    )
    p.add_argument("--long", type=int, default=6, help="long-lived requests opened before the drain")
    p.add_argument("--long-ms", type=int, default=10_000, help="how long each long request takes")
    p.add_argument("--keep", action="store_true", help="leave the lab and worker running")
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds the workflow may run before it is terminated (run failed)",
    )
    a = p.parse_args(argv)
    if a.nodes < 1 or a.rate <= 0 or a.long < 1 or a.long_ms < 1 or a.timeout <= 0:
        p.error("--nodes, --long and --long-ms must be >= 1, --rate and --timeout > 0")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = LabConfig(
        root=a.root,
        nodes=a.nodes,
        port_base=a.port_base,
        temporal_port=a.port_base + 50,
        temporal_ui_port=a.port_base + 51,
    )
    return launch(run_bench(cfg, a.rate, a.keep, a.long, a.long_ms, a.timeout))


if __name__ == "__main__":
    sys.exit(main())
