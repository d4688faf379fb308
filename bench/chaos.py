"""Benchmark: chaos at every step - the worker SIGKILLed at each activity boundary of a run.

    python -m bench.chaos [--procedure ss-rolling|rolling-deploy] [--sample N] [--kills-per-run K]
                          [--moments after|during|both] [--first-index I] [--root .lab-bench-chaos]
                          [--port-base 19600] [--keep] [--timeout 600]

Its own lab, Temporal dev server and worker process (`bench_lab`, as the other benches). A
reference run without a crash gives the boundaries, two per activity it executes: while it
runs (`during`: as soon as it is seen running, or in its middle when it takes 1 s or more)
and right after it ended (`after`: between two activities, where the workflow decides).
Then, for each boundary (or --sample N of them, spread over the whole run), a run
from a reset lab in which the worker is killed with SIGKILL at that boundary and a new one is
started at once (--kills-per-run K: K boundaries in one run, one after the other). Each run
must:

  * complete;
  * leave the site as the reference run did: every node's version, the balancer's states,
    the app database's table checksums (the audit table by its events, not its timestamps),
    every app-folder file's hash (encryption.config's bytes among them);
  * do no side effect twice: per node no more service stops, starts and deploys (the copy
    into the app folder) in ssh.log, nor backups (tar files), than the reference run, and
    no audit event more often.

Only a boundary the worker was actually killed at counts as survived: a crash run may end
before a boundary of the reference run (its side-by-side activities in another order), and
such a boundary gets a run of its own, killed there alone; one still not reached is listed
as `not_reached`. `resume_s`: from the new worker's start to the next activity starting (the
server's event time). One line on stdout:

    boundaries=<n> survived=<n> duplicated_effects=<n> max_resume_s=<s> [not_reached=<n>]

Exit status 1 when a run did not survive, duplicated an effect or ended elsewhere, 2 when
the bench itself failed.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from temporalio.api.enums.v1 import EventType, PendingActivityState
from temporalio.client import Client, WorkflowHandle

from bench.rolling_deploy import bench_lab, lab_config, lab_options, launch, say
from bench.secret_server import _approve, enforce_version_match, procedure_input
from inventory.load import load_inventory
from lab import haproxy as lab_haproxy
from lab import manager
from lab import mariadb as lab_mariadb
from lab.config import LabConfig
from lab.procs import pid_alive, read_pid
from starter.demo import TASK_QUEUE, node_versions, start_worker
from worker.chaos import HOLD_ENV
from workflows import timeouts
from workflows.rolling_deploy import RollingDeployInput, RollingDeployResult

INSIDE_MIN_S = 1.0  # an activity this long also gets a kill in its middle
POLL_S = 0.05
# A `during` boundary too quick to be killed inside gets a run with its activity held this
# long at its start (worker/chaos.py).
HOLD_S = 1.5
# Effects read from a node's ssh.log (commands the activities sent), by what they do.
LOG_EFFECTS = {"stop": "ctl stop", "start": "ctl start", "deploy": '-cf "$R.copy.tar"'}


@dataclass(frozen=True)
class Boundary:
    index: int  # the index-th activity of the reference run (1-based)
    activity: str
    during: bool = False  # False: right after it ended (between activities); True: while it runs
    after_s: float = 0.0  # during: this long after it is seen running (the middle of a long one)

    def __str__(self) -> str:
        where = "after" if not self.during else "during" + (f" +{self.after_s:.1f}s" if self.after_s else "")
        return f"#{self.index} {self.activity} ({where})"


@dataclass
class Outcome:
    completed: bool
    world: dict[str, Any] = field(default_factory=dict)
    effects: Counter[str] = field(default_factory=Counter)
    resume_s: list[float] = field(default_factory=list)
    error: str = ""
    # The boundaries of the plan the worker was killed at (the run may end before a boundary
    # of the reference run: another order of side-by-side activities, a transient retry less).
    killed: list[Boundary] = field(default_factory=list)


# --------------------------------------------------------------------------- the site, as a run left it


def world(cfg: LabConfig) -> dict[str, Any]:
    """What the run leaves on the site (compared with the reference run's)."""
    tables = [r[0] for r in lab_mariadb.query(cfg, "primary", "SHOW TABLES", database=lab_mariadb.DB_NAME)]
    checksums = {}
    for t in tables:
        if t == "tbAudit":  # by its events: no timestamps, no run id (the reference names the run)
            rows = lab_mariadb.query(
                cfg,
                "primary",
                "SELECT AuditTypeName, Action, UserName FROM tbAudit ORDER BY AuditId",
                database=lab_mariadb.DB_NAME,
            )
            checksums[t] = [list(map(str, r)) for r in rows]
        elif t == "zerodown_migration_log":  # by what ran: no run key, connection or time
            rows = lab_mariadb.query(
                cfg,
                "primary",
                "SELECT version, direction, statement, state FROM zerodown_migration_log "
                "ORDER BY version, direction, statement, state",
                database=lab_mariadb.DB_NAME,
            )
            checksums[t] = [list(map(str, r)) for r in rows]
        else:
            checksums[t] = lab_mariadb.query(
                cfg, "primary", f"CHECKSUM TABLE `{t}`", database=lab_mariadb.DB_NAME
            )[0][1]
    files = {}
    for i in cfg.node_indexes:
        app = cfg.node_dir(i) / "app"
        files[cfg.node_name(i)] = {
            str(p.relative_to(app)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(app.rglob("*"))
            if p.is_file()
        }
    return {
        "lb": {f"{b}/{s}": st for (b, s), st in sorted(lab_haproxy.server_states(cfg).items())},
        "db": checksums,
        "files": files,
    }


def ssh_commands(cfg: LabConfig, i: int) -> list[str]:
    log = cfg.node_dir(i) / "ssh.log"
    if not log.exists():
        return []
    return [json.loads(line)["command"] for line in log.read_text().splitlines() if line.strip()]


def effects(cfg: LabConfig, since: dict[str, int]) -> Counter[str]:
    """Side effects per node since `since` (ssh.log lines), plus backups and audit events."""
    out: Counter[str] = Counter()
    for i in cfg.node_indexes:
        name = cfg.node_name(i)
        for command in ssh_commands(cfg, i)[since.get(name, 0) :]:
            for kind, marker in LOG_EFFECTS.items():
                if marker in command:
                    out[f"{name} {kind}"] += 1
        backups = cfg.node_dir(i) / ".zerodown" / "backups"
        if backups.is_dir():
            out[f"{name} backup"] = sum(
                1 for p in backups.glob("*.tar") if not p.name.endswith(".defaults.tar")
            )
    audit = "SELECT CONCAT(AuditTypeName, ' ', Action) FROM tbAudit"
    for (event,) in lab_mariadb.query(cfg, "primary", audit, database=lab_mariadb.DB_NAME):
        out[f"audit {event}"] += 1
    return out


def log_lengths(cfg: LabConfig) -> dict[str, int]:
    return {cfg.node_name(i): len(ssh_commands(cfg, i)) for i in cfg.node_indexes}


def duplicated(reference: Counter[str], run: Counter[str]) -> list[str]:
    return [
        f"{k}: {run[k]} (reference {reference.get(k, 0)})"
        for k in sorted(run)
        if run[k] > reference.get(k, 0)
    ]


def differences(reference: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """What differs: a key of the world, or `key.part` where both are mappings (a table, a
    node's folder), so a failed run names what to look at."""
    out = []
    for key in reference:
        ref, got = reference[key], run.get(key)
        if ref == got:
            continue
        if isinstance(ref, dict) and isinstance(got, dict):
            out += [f"{key}.{k}" for k in sorted(set(ref) | set(got)) if ref.get(k) != got.get(k)]
        else:
            out.append(key)
    return out


# --------------------------------------------------------------------------- the runs


def started_events(history: Any) -> list[tuple[float, str]]:
    """(server time, activity type) of every activity start, in order."""
    scheduled: dict[int, str] = {}
    out: list[tuple[float, str]] = []
    for e in history.events:
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            scheduled[e.event_id] = e.activity_task_scheduled_event_attributes.activity_type.name
        elif e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            name = scheduled.get(e.activity_task_started_event_attributes.scheduled_event_id, "?")
            out.append((e.event_time.ToDatetime().timestamp(), name))
    return out


def boundaries_of(history: Any) -> list[Boundary]:
    starts = started_events(history)
    ends: dict[int, float] = {}
    for e in history.events:
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            ends[e.activity_task_completed_event_attributes.started_event_id] = (
                e.event_time.ToDatetime().timestamp()
            )
    started_ids = [
        e.event_id for e in history.events if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
    ]
    out: list[Boundary] = []
    for k, ((t, name), eid) in enumerate(zip(starts, started_ids, strict=True), start=1):
        took = ends.get(eid, t) - t
        middle = round(took / 2, 1) if took >= INSIDE_MIN_S else 0.0
        out.append(Boundary(k, name, during=True, after_s=middle))
        out.append(Boundary(k, name))
    return out


_CLOSED = {
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED,
}


def ended_activities(history: Any) -> int:
    """Activity executions that ended other than by a timeout (a timed-out attempt is the
    one a killed worker lost; its retry is the same step of the reference run)."""
    started = sum(1 for e in history.events if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED)
    lost = sum(1 for e in history.events if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT)
    return started - lost


async def running_activity(handle: WorkflowHandle[Any, Any]) -> bool:
    desc = await handle.describe()
    return any(
        p.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
        for p in desc.raw_description.pending_activities
    )


class Workers(Protocol):
    """How a run's worker is started and killed (the bench: the lab's pid-file worker; the
    tests: a worker process on the session's server)."""

    task_queue: str

    def start(self) -> None: ...

    def kill(self) -> None: ...


@dataclass
class LabWorkers:
    cfg: LabConfig
    task_queue: str = TASK_QUEUE

    def start(self) -> None:
        start_worker(self.cfg)

    def kill(self) -> None:
        pid = read_pid(self.cfg.worker_pidfile)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return  # gone already (a held run's worker killed twice)
            for _ in range(200):
                if not pid_alive(self.cfg.worker_pidfile):
                    break
                time.sleep(0.01)


async def crash_at(
    workers: Workers,
    handle: WorkflowHandle[Any, Any],
    plan: list[Boundary],
    resumes: list[float],
    killed: list[Boundary],
) -> None:
    """Kill the worker at each boundary of `plan` (in order), start a new one at once, and
    measure how soon the next activity starts; `killed` gets the boundaries reached."""
    for b in plan:
        # An activity's start event is written when it ends (or times out): `index` ended,
        # not counting attempts that timed out (lost with a killed worker), mean "after
        # #index"; index - 1 ended and one running mean "during #index".
        target = b.index - (1 if b.during else 0)
        while True:
            history = await handle.fetch_history()
            if ended_activities(history) >= target and (not b.during or await running_activity(handle)):
                break
            if any(e.event_type in _CLOSED for e in history.events):
                return  # the run ended before this boundary: nothing left to kill
            await asyncio.sleep(POLL_S)
        if b.after_s:
            await asyncio.sleep(b.after_s)
        await asyncio.to_thread(workers.kill)
        killed.append(b)
        t0 = time.time()
        await asyncio.to_thread(workers.start)
        while True:
            # A start event is written when its activity ends, with the time it started: the
            # first one that started after the new worker did is the resumed work.
            after = [(t, name) for t, name in started_events(await handle.fetch_history()) if t > t0]
            if after:
                t, name = min(after)
                resumes.append(t - t0)
                say(f"killed at {b}: resumed after {resumes[-1]:.1f} s ({name})")
                break
            desc = await handle.describe()
            if desc.status is not None and desc.status.name != "RUNNING":
                break
            await asyncio.sleep(POLL_S)


async def one_run(
    cfg: LabConfig,
    client: Client,
    workers: Workers,
    site: Path,
    procedure: str,
    plan: list[Boundary],
    timeout_s: float,
    label: str,
) -> tuple[Outcome, Any]:
    """A run from a reset lab, the worker killed at each boundary of `plan`; what it left."""
    await manager.lab_reset(cfg)
    await asyncio.to_thread(workers.start)
    inv = load_inventory(site)
    since = log_lengths(cfg)
    if procedure == "rolling-deploy":
        arg: Any = RollingDeployInput(inventory=inv, package_path=str(cfg.package(2)))
        result_type: type = RollingDeployResult
    else:
        arg, result_type = procedure_input(procedure, inv, str(cfg.package(2)))
        await enforce_version_match(inv, True)
    handle = await client.start_workflow(
        procedure,
        arg,
        id=f"chaos-{label}-{int(time.time() * 1000)}",
        task_queue=workers.task_queue,
        result_type=result_type,
        task_timeout=timeouts.WORKFLOW_TASK,
        execution_timeout=timedelta(seconds=timeout_s),
    )
    outcome = Outcome(completed=False)
    approver = asyncio.ensure_future(_approve(handle)) if procedure != "rolling-deploy" else None
    try:
        await asyncio.wait_for(
            crash_at(workers, handle, plan, outcome.resume_s, outcome.killed), timeout=timeout_s
        )
        await handle.result()
        outcome.completed = True
    except Exception as e:
        outcome.error = f"{e.__class__.__name__}: {e}"
    finally:
        if approver is not None:
            approver.cancel()
        if procedure != "rolling-deploy":
            await enforce_version_match(inv, False)
    outcome.world = {"versions": await node_versions(cfg), **world(cfg)}
    outcome.effects = effects(cfg, since)
    return outcome, await handle.fetch_history()


def spread(items: list[Boundary], n: int) -> list[Boundary]:
    if n >= len(items):
        return items
    step = len(items) / n
    return [items[int(i * step + step / 2)] for i in range(n)]


@dataclass
class Verdict:
    boundaries: int
    survived: int
    duplicated_effects: int
    max_resume_s: float
    notes: list[str] = field(default_factory=list)
    # Boundaries no run reached (not killed there, so not counted as survived).
    not_reached: list[Boundary] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"boundaries={self.boundaries} survived={self.survived} "
            f"duplicated_effects={self.duplicated_effects} max_resume_s={self.max_resume_s:.1f}"
            + (f" not_reached={len(self.not_reached)}" if self.not_reached else "")
        )


async def chaos(
    cfg: LabConfig,
    client: Client,
    workers: Workers,
    site: Path,
    procedure: str,
    sample: int | None,
    per_run: int,
    timeout_s: float,
    moments: str = "both",
    first_index: int = 1,
) -> Verdict:
    """The reference run, then the crash runs; their verdict. `moments`: after (between
    activities), during (inside them) or both; `first_index`: only the boundaries of the
    reference run's activities from that one on."""
    reference, history = await one_run(cfg, client, workers, site, procedure, [], timeout_s, "reference")
    if not reference.completed:
        raise RuntimeError(f"the reference run failed: {reference.error}")
    every = [
        b
        for b in boundaries_of(history)
        if (moments == "both" or b.during == (moments == "during")) and b.index >= first_index
    ]
    chosen = spread(every, sample) if sample else every
    say(f"reference run: {len(every)} boundaries; crashing at {len(chosen)}")
    verdict = Verdict(boundaries=len(chosen), survived=0, duplicated_effects=0, max_resume_s=0.0)
    plans = [chosen[start : start + per_run] for start in range(0, len(chosen), per_run)]
    missed: list[Boundary] = []
    held: set[Boundary] = set()
    runs = 0
    while plans:
        plan = plans.pop(0)
        runs += 1
        # The label names the workflow id, and that backup ids: letters, digits and '-' only.
        label = f"r{runs}-{plan[0].index}{'d' if plan[0].during else 'a'}"
        hold = len(plan) == 1 and plan[0] in held
        if hold:
            os.environ[HOLD_ENV] = f"{plan[0].activity}:{HOLD_S}"  # the workers it starts inherit it
            await asyncio.to_thread(workers.kill)  # the idle worker of the last run has no hold
            label += "h"
        try:
            outcome, _ = await one_run(cfg, client, workers, site, procedure, plan, timeout_s, label)
        finally:
            if hold:
                os.environ.pop(HOLD_ENV, None)
                await asyncio.to_thread(workers.kill)  # the next run's worker holds nothing
        dups = duplicated(reference.effects, outcome.effects)
        diff = differences(reference.world, outcome.world)
        verdict.max_resume_s = max([verdict.max_resume_s, *outcome.resume_s])
        verdict.duplicated_effects += len(dups)
        ok = outcome.completed and not diff and not dups
        # Only a boundary the worker was killed at counts; one the run ended before (its
        # side-by-side activities ran in another order than the reference's) gets a run of
        # its own, killed there alone, once.
        verdict.survived += len(outcome.killed) if ok else 0
        unreached = [b for b in plan if b not in outcome.killed]
        if ok and unreached:
            if len(plan) > 1:
                plans += [[b] for b in unreached]
            elif plan[0].during and plan[0] not in held:
                # Too quick to be killed inside, even alone: once more, with the worker
                # holding that activity a moment at its start (worker/chaos.py).
                held.add(plan[0])
                plans.append(plan)
            else:
                missed += unreached
        note = (
            f"{', '.join(map(str, outcome.killed)) or 'no kill'}: {'survived' if ok else 'FAILED'}"
            + (f" ({outcome.error})" if outcome.error else "")
            + (f"; site differs in {', '.join(diff)}" if diff else "")
            + (f"; done twice: {'; '.join(dups)}" if dups else "")
            + (f"; not reached: {', '.join(map(str, unreached))}" if unreached else "")
        )
        verdict.notes.append(note)
        say(note)
    verdict.not_reached = missed
    return verdict


async def run_bench(
    cfg: LabConfig,
    procedure: str,
    sample: int | None,
    per_run: int,
    keep: bool,
    timeout_s: float,
    moments: str,
    first_index: int = 1,
) -> int:
    async with bench_lab(cfg, keep) as (site, client):
        verdict = await chaos(
            cfg, client, LabWorkers(cfg), site, procedure, sample, per_run, timeout_s, moments, first_index
        )
        print(verdict.line(), flush=True)
    return 0 if verdict.survived == verdict.boundaries and verdict.duplicated_effects == 0 else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--procedure", choices=("ss-rolling", "rolling-deploy"), default="ss-rolling")
    p.add_argument("--sample", type=int, default=None, help="only this many boundaries, spread over the run")
    p.add_argument("--kills-per-run", type=int, default=1)
    p.add_argument(
        "--moments",
        choices=("after", "during", "both"),
        default="both",
        help="kill between activities (after one ended), inside them (during), or both",
    )
    p.add_argument(
        "--first-index",
        type=int,
        default=1,
        help="only the boundaries of the reference run's activities from this one on (1-based)",
    )
    lab_options(p, ".lab-bench-chaos", 19600)
    a = p.parse_args(argv)
    if (a.sample is not None and a.sample < 1) or a.kills_per_run < 1:
        p.error("--sample and --kills-per-run must be >= 1")
    cfg = lab_config(a, 4 if a.procedure == "ss-rolling" else 3)
    return launch(
        run_bench(cfg, a.procedure, a.sample, a.kills_per_run, a.keep, a.timeout, a.moments, a.first_index)
    )


if __name__ == "__main__":
    import sys

    sys.exit(main())
