"""Benchmark: ox-upgradeschemata on 10,000 schemata, concurrency 1 vs 8, on a private lab.

    python -m bench.ox_upgradeschemata [--schemata 10000] [--sample 300] [--concurrency 8]
                                       [--runupdate-s 0.5] [--schemata-per-run 100]
                                       [--root .lab-bench-ox] [--port-base 19200] [--no-full]
                                       [--keep] [--timeout S]

Its own lab under --root (1 app node, 2 OX nodes: ox1 gets the new release and runs
runupdate, ox2 runs the other tools), its own Temporal dev server (port_base+50, UI +51) and a
worker (`python -m worker`), like the other benches. The config DB holds --schemata schemata
of 1 context with 1 user each (light to create and reset); runupdate works --runupdate-s per
schema (OX_RUNUPDATE_SECONDS). Three runs, the config DB reset (`configdb.reset`) before each:

    c1 sample   concurrency 1 on the first --sample schemata
    cN sample   concurrency --concurrency on the same schemata
    cN full     concurrency --concurrency on all --schemata (skipped with --no-full)

A concurrency-1 run over 10,000 schemata takes hours here, so c1_s is extrapolated: the
sample's time per schema x --schemata. speedup compares the two runs of the same sample.
Every run continues as new every --schemata-per-run schemata. Per run, on stderr: progress
(the workflow's `schemata` query), then its time, the CPU each lab process spent per schema
(/proc), and the unavailability of its schemata from the config DB's own record
(schema_state: enabled_at - disabled_at, and that minus the update run's duration). Then the
one line on stdout:

    schemata=<n> c1_s=<s> c8_s=<s> speedup=<x> max_events_per_run=<n>
    max_unavailable_ms_beyond_runupdate=<ms>

(c8 is c<--concurrency>; without the full run c8_s is the sample's figure extrapolated too).
Exit status 1 when a run failed, timed out or left a schema not upgraded, 2 when the bench
itself failed; the lab is torn down at the end unless --keep.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from temporalio.client import Client, WorkflowFailureError

from bench.rolling_deploy import check_ports_free, launch, say, wait_worker_polling
from inventory.load import load_inventory
from inventory.model import Inventory
from lab import manager, mariadb, procs
from lab.config import LabConfig
from lab.ox import configdb
from lab.ox import nodes as ox_nodes
from lab.procs import read_pid
from starter import client as zc
from starter.demo import TASK_QUEUE, start_worker
from worker.main import connect
from workflows.ox_upgradeschemata import (
    PROCEDURE,
    OxSchemataProgress,
    OxUpgradeSchemataInput,
    OxUpgradeSchemataResult,
)

NEW_SERVER = "oxserver-xyz"
NEW_VERSION = "7.10.1"
UPDATE_NODE, ADMIN_NODE = 1, 2  # ox1 runs the new release (runupdate), ox2 the other tools
LAB_OX_NODES = 2
STARTED_BY = "bench"
PROGRESS_EVERY_S = 10.0
WORKER_READY_TIMEOUT_S = 60.0
# What the issue asks: a schema unavailable no longer than its runupdate + this.
BEYOND_RUNUPDATE_GOAL_MS = 200.0
SPEEDUP_GOAL = 6.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# =========================================================================== figures (pure)


@dataclass(frozen=True)
class Unavailability:
    """Per schema, from schema_state (the DB's clock): seconds it was disabled, and that
    minus its update run's duration."""

    schemata: int
    max_ms: float
    p50_ms: float
    beyond_max_ms: float
    beyond_p50_ms: float
    missing: int  # schemata without a complete record (not disabled and enabled again)


def unavailability(states: Iterable[configdb.SchemaState]) -> Unavailability:
    total: list[float] = []
    beyond: list[float] = []
    missing = 0
    for st in states:
        down, update = st.unavailable_s, st.update_s
        if down is None or update is None:
            missing += 1
            continue
        total.append(down * 1000)
        beyond.append((down - update) * 1000)

    def p50(xs: list[float]) -> float:
        return float(statistics.median(xs)) if xs else 0.0

    return Unavailability(
        schemata=len(total),
        max_ms=max(total, default=0.0),
        p50_ms=p50(total),
        beyond_max_ms=max(beyond, default=0.0),
        beyond_p50_ms=p50(beyond),
        missing=missing,
    )


@dataclass(frozen=True)
class Cpu:
    """CPU seconds per lab process over a run (children included: the SSH endpoint's are the
    tools it ran), and of the whole machine (other users' load too)."""

    per_process: dict[str, float]
    machine_s: float


@dataclass(frozen=True)
class Measured:
    label: str
    concurrency: int
    schemata: int
    wall_s: float
    runs: int
    max_events_per_run: int
    # The largest history of the chain's runs as the server lists them (None: not checked).
    max_history_listed: int | None
    upgraded: int
    ok: bool
    error: str | None
    unavailable: Unavailability
    cpu: Cpu

    @property
    def per_schema_s(self) -> float:
        return self.wall_s / self.schemata if self.schemata else 0.0


def describe(m: Measured) -> list[str]:
    """The explanatory lines of one run (stderr)."""
    u, cpu = m.unavailable, m.cpu
    per = {k: v * 1000 / m.schemata for k, v in cpu.per_process.items()} if m.schemata else {}
    lines = [
        f"{m.label}: {m.schemata} schemata at concurrency {m.concurrency}: {m.wall_s:.1f} s "
        f"({m.per_schema_s * 1000:.0f} ms/schema), {m.upgraded} upgraded, {m.runs} runs, "
        f"max_events_per_run {m.max_events_per_run}"
        + (f" (largest listed history {m.max_history_listed})" if m.max_history_listed is not None else "")
        + ("" if m.ok else f" - FAILED: {m.error}"),
        f"{m.label}: CPU ms/schema: "
        + ", ".join(f"{k} {v:.1f}" for k, v in per.items())
        + f"; sum {sum(per.values()):.1f}; machine {cpu.machine_s * 1000 / max(m.schemata, 1):.1f} "
        f"({cpu.machine_s / max(m.wall_s, 1e-9) * 100:.0f}% of one core, 2 cores = 200%)",
        f"{m.label}: unavailable (enabled_at - disabled_at) max {u.max_ms:.0f} ms p50 {u.p50_ms:.0f} ms; "
        f"beyond runupdate max {u.beyond_max_ms:.0f} ms p50 {u.beyond_p50_ms:.0f} ms"
        + (f"; {u.missing} schemata without a record" if u.missing else ""),
    ]
    return lines


@dataclass(frozen=True)
class Summary:
    schemata: int
    c1_s: float
    c8_s: float
    speedup: float
    full_ratio: float | None  # c1 extrapolated / the measured full run
    max_events_per_run: int
    max_beyond_ms: float
    c8_extrapolated: bool
    # The largest history of every run of every chain, as the server lists them (None: some
    # run not listed): what max_events_per_run is checked against.
    max_history_listed: int | None = None


def summarize(total: int, c1: Measured, cn_sample: Measured, cn_full: Measured | None) -> Summary:
    runs = [m for m in (c1, cn_sample, cn_full) if m is not None]
    c1_s = c1.per_schema_s * total
    c8_s = cn_full.wall_s if cn_full is not None else cn_sample.per_schema_s * total
    speedup = c1.per_schema_s / cn_sample.per_schema_s if cn_sample.per_schema_s else 0.0
    full_ratio = c1_s / cn_full.wall_s if cn_full is not None and cn_full.wall_s else None
    listed = [m.max_history_listed for m in runs]
    return Summary(
        schemata=total,
        c1_s=c1_s,
        c8_s=c8_s,
        speedup=speedup,
        full_ratio=full_ratio,
        max_events_per_run=max(m.max_events_per_run for m in runs),
        max_beyond_ms=max(m.unavailable.beyond_max_ms for m in runs),
        c8_extrapolated=cn_full is None,
        max_history_listed=None if None in listed else max(x for x in listed if x is not None),
    )


def result_line(s: Summary) -> str:
    return (
        f"schemata={s.schemata} c1_s={s.c1_s:.1f} c8_s={s.c8_s:.1f} speedup={s.speedup:.2f} "
        f"max_events_per_run={s.max_events_per_run} "
        f"max_unavailable_ms_beyond_runupdate={s.max_beyond_ms:.0f}"
    )


def parse_result_line(line: str) -> dict[str, float]:
    """The figures of a result line (key=value, all numbers)."""
    out: dict[str, float] = {}
    for part in line.split():
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"not key=value: {part!r}")
        out[key] = float(value)
    return out


# =========================================================================== CPU from /proc


def proc_cpu_s(pid: int, children: bool = True) -> float | None:
    """utime + stime (+ reaped children's) of a process in seconds; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    # fields[11:15] = utime stime cutime cstime (man 5 proc, counted from `state`).
    ticks = int(fields[11]) + int(fields[12]) + ((int(fields[13]) + int(fields[14])) if children else 0)
    return ticks / _CLK_TCK


def machine_cpu_s() -> float:
    """Busy CPU seconds of the whole machine since boot (every core, every process)."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in parts[:8])
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def lab_pids(cfg: LabConfig) -> dict[str, int]:
    """The lab's processes that take part in a run (those running), by role."""
    files = {
        "worker": cfg.worker_pidfile,
        "temporal": cfg.abs_root / "temporal.pid",
        "sshd+tools": cfg.abs_root / "sshd.pid",
        "mariadb": mariadb.pid_file(cfg, "primary"),
        **{f"ox{i}": cfg.ox_node_dir(i) / "run" / "ox.pid" for i in cfg.ox_node_indexes},
    }
    pids = {name: pid for name, f in files.items() if (pid := read_pid(f)) is not None}
    pids["bench"] = os.getpid()  # with an in-process worker (the test) its CPU counts here
    return pids


class CpuMeter:
    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self.start = {k: proc_cpu_s(p) for k, p in self.pids.items()}
        self.machine = machine_cpu_s()

    def stop(self) -> Cpu:
        out: dict[str, float] = {}
        for k, p in self.pids.items():
            a, b = self.start[k], proc_cpu_s(p)
            if a is not None and b is not None:
                out[k] = b - a
        return Cpu(per_process=out, machine_s=machine_cpu_s() - self.machine)


# =========================================================================== one run


def run_timeout_s(schemata: int, concurrency: int, runupdate_s: float) -> float:
    """A generous bound for one run: twice the time at 1.5 s of overhead per schema."""
    return 120.0 + 2 * schemata * (runupdate_s + 1.5) / max(1, min(concurrency, schemata))


async def _progress(client: Client, wf_id: str, label: str, t0: float, every_s: float) -> None:
    handle = client.get_workflow_handle(wf_id)  # no run id: follows continue-as-new
    while True:
        await asyncio.sleep(every_s)
        try:
            p: OxSchemataProgress | None = await handle.query("schemata", result_type=OxSchemataProgress)
        except Exception as e:  # between two runs of the chain, or the worker is busy
            say(f"{label}: progress not available ({e.__class__.__name__})")
            continue
        if p is None:
            continue
        elapsed = time.monotonic() - t0
        rate = p.upgraded / elapsed if elapsed else 0.0
        eta = f", ~{p.remaining / rate:.0f} s to go" if rate > 0 else ""
        say(
            f"{label}: {p.upgraded}/{p.total} upgraded, {len(p.current)} under way, run {p.run}, "
            f"{elapsed:.0f} s{eta}"
        )


async def _listed_history_max(client: Client, wf_id: str, runs: int, timeout_s: float = 30.0) -> int | None:
    """The largest history length of the chain's runs, as the server's visibility lists
    them (it may lag the close by a moment: wait for every run)."""
    deadline = time.monotonic() + timeout_s
    while True:
        lengths = [e.history_length async for e in client.list_workflows(f"WorkflowId = '{wf_id}'")]
        if len(lengths) >= runs or time.monotonic() > deadline:
            return max(lengths) if len(lengths) >= runs else None
        await asyncio.sleep(0.5)


async def measure(
    cfg: LabConfig,
    client: Client,
    task_queue: str,
    inv: Inventory,
    label: str,
    names: Sequence[str],
    all_schemata: bool,
    concurrency: int,
    runupdate_s: float,
    schemata_per_run: int,
    timeout_s: float | None = None,
    progress_every_s: float = PROGRESS_EVERY_S,
) -> Measured:
    """One run on a freshly reset config DB: `names` (or every schema, all_schemata=True, so
    10,000 names are not put in the input) at `concurrency`; time, CPU, unavailability."""
    await asyncio.to_thread(configdb.reset, cfg)
    inp = OxUpgradeSchemataInput(
        inventory=inv,
        server_name=NEW_SERVER,
        update_node=cfg.ox_node_name(UPDATE_NODE),
        admin_node=cfg.ox_node_name(ADMIN_NODE),
        schemata=() if all_schemata else tuple(names),
        concurrency=concurrency,
        schemata_per_run=schemata_per_run,
        started_by=STARTED_BY,
        on_failure="rollback",
    )
    wf_id = f"bench-oxs-{label.replace(' ', '-')}-{int(time.time() * 1000)}"
    bound = timeout_s if timeout_s is not None else run_timeout_s(len(names), concurrency, runupdate_s)
    meter = CpuMeter(lab_pids(cfg))
    t0 = time.monotonic()
    handle = await zc.start_procedure(client, PROCEDURE, inv, inp, task_queue, workflow_id=wf_id)
    say(
        f"{label}: workflow {wf_id} started ({len(names)} schemata, concurrency {concurrency}, "
        f"bound {bound:.0f} s)"
    )
    watcher = asyncio.ensure_future(_progress(client, wf_id, label, t0, progress_every_s))
    typed = client.get_workflow_handle(wf_id, result_type=OxUpgradeSchemataResult)
    result: OxUpgradeSchemataResult | None = None
    error: str | None = None
    try:
        result = await asyncio.wait_for(typed.result(), bound)
    except WorkflowFailureError as e:
        error = zc.failure_message(e)
    except TimeoutError:
        error = f"still running after {bound:.0f} s: terminated"
        await handle.terminate(reason=f"bench bound ({bound:.0f} s)")
    finally:
        wall = time.monotonic() - t0
        cpu = meter.stop()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    states = await asyncio.to_thread(configdb.schema_states, cfg)
    mine = [states[n] for n in names if n in states]
    new_id = next((i for i, n in await asyncio.to_thread(configdb.servers, cfg) if n == NEW_SERVER), None)
    upgraded = sum(
        1
        for st in mine
        if (st.update_state, st.enabled, st.server_id, st.version) == ("done", True, new_id, NEW_VERSION)
    )
    if error is None and upgraded != len(names):
        error = f"{len(names) - upgraded} of {len(names)} schemata not upgraded on the site"
    runs = result.runs if result is not None else 0
    listed = await _listed_history_max(client, wf_id, runs) if result is not None else None
    return Measured(
        label=label,
        concurrency=concurrency,
        schemata=len(names),
        wall_s=wall,
        runs=runs,
        max_events_per_run=result.max_events_per_run if result is not None else 0,
        max_history_listed=listed,
        upgraded=upgraded,
        ok=error is None,
        error=error,
        unavailable=unavailability(mine),
        cpu=cpu,
    )


async def bench_runs(
    cfg: LabConfig,
    client: Client,
    task_queue: str,
    inv: Inventory,
    total: int,
    sample: int,
    concurrency: int,
    runupdate_s: float,
    schemata_per_run: int,
    full: bool,
    timeout_s: float | None = None,
    progress_every_s: float = PROGRESS_EVERY_S,
) -> tuple[list[Measured], Summary]:
    """The three runs (c1 sample, cN sample, cN full) on a prepared OX part, their lines on
    stderr; returns them and the summary."""
    every = sorted(await asyncio.to_thread(configdb.schema_states, cfg), key=configdb.natural_key)
    if len(every) < total:
        raise RuntimeError(f"the config DB has {len(every)} schemata, {total} asked for")
    names = every[:total]
    cn = f"c{concurrency}"
    plan: list[tuple[str, int, Sequence[str]]] = [
        ("c1 sample", 1, names[:sample]),
        (f"{cn} sample", concurrency, names[:sample]),
    ]
    if full:
        plan.append((f"{cn} full", concurrency, names))
    measured: list[Measured] = []
    for label, c, subset in plan:
        m = await measure(
            cfg,
            client,
            task_queue,
            inv,
            label,
            subset,
            all_schemata=len(subset) == len(every),
            concurrency=c,
            runupdate_s=runupdate_s,
            schemata_per_run=schemata_per_run,
            timeout_s=timeout_s,
            progress_every_s=progress_every_s,
        )
        measured.append(m)
        for line in describe(m):
            say(line)
    summary = summarize(total, measured[0], measured[1], measured[2] if full else None)
    return measured, summary


def summary_lines(s: Summary, sample: int, concurrency: int, runupdate_s: float) -> list[str]:
    c8 = "; c8_s too" if s.c8_extrapolated else f"; c8_s measured (c{concurrency})"
    goal = BEYOND_RUNUPDATE_GOAL_MS
    lines = [
        f"runupdate {runupdate_s:g} s per schema; c1_s extrapolated from {sample} schemata "
        f"(x {s.schemata})" + c8,
        f"speedup on the same {sample} schemata: {s.speedup:.2f} (goal >= {SPEEDUP_GOAL:g})"
        + (f"; c1 extrapolated / c{concurrency} full run: {s.full_ratio:.2f}" if s.full_ratio else ""),
        f"max unavailable beyond runupdate: {s.max_beyond_ms:.0f} ms (goal <= {goal:g})",
        f"max_events_per_run: {s.max_events_per_run} (the results'); the server lists every run of "
        "the chains: largest history "
        + (
            f"{s.max_history_listed} (the results' figure is taken before a run's last workflow task "
            "and close event)"
            if s.max_history_listed is not None
            else "not listed"
        ),
    ]
    return lines


# =========================================================================== the lab


def light_configdb(cfg: LabConfig, schemata: int) -> bool:
    """The config DB as the bench wants it: `schemata` schemata of 1 context with 1 user;
    (re)created when it is not. True when it was created."""
    if configdb.exists(cfg):
        rows = mariadb.query(
            cfg,
            "primary",
            "SELECT (SELECT COUNT(*) FROM schema_state), (SELECT COUNT(*) FROM context)",
            database=configdb.CONFIGDB,
        )
        if tuple(int(x) for x in rows[0]) == (schemata, schemata):
            return False
    configdb.create(cfg, schemata=schemata, contexts_per_schema=1, users_per_context=1)
    return True


def prepare_ox(cfg: LabConfig, runupdate_s: float) -> None:
    """The OX nodes for the runs: the new release installed on the update node (not restarted:
    runupdate targets the installed release), runupdate working `runupdate_s` per schema."""
    ox_nodes.set_runupdate_seconds(cfg, runupdate_s)
    ox_nodes.oxpkg(cfg, UPDATE_NODE, "install", NEW_VERSION)


@asynccontextmanager
async def bench_ox_lab(cfg: LabConfig, schemata: int, keep: bool) -> AsyncIterator[Client]:
    """The private lab with its OX part, Temporal dev server and a polling worker."""
    check_ports_free(cfg)
    try:
        t0 = time.monotonic()
        # MariaDB first, and the light config DB made before lab_up would make the default
        # one (2 contexts of 3 users per schema): lab_up keeps a config DB that exists.
        cfg.abs_root.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(mariadb.ensure_db_secrets, cfg)
        await asyncio.to_thread(mariadb.start_mariadb, cfg)
        if await asyncio.to_thread(light_configdb, cfg, schemata):
            say(
                f"config DB created: {schemata} schemata of 1 context, 1 user ({time.monotonic() - t0:.1f} s)"
            )
        await manager.lab_up(cfg, with_temporal=True)
        # The OX part as installed by this checkout (a kept lab's node folders may be older:
        # lab_up never reinstalls them), restarting only the nodes that need it.
        for line in await manager.reset_ox(cfg):
            say(f"OX part: {line}")
        start_worker(cfg, restart=True)  # this checkout's code
        client = await connect(cfg.temporal_address, tracing=False)
        await wait_worker_polling(client, TASK_QUEUE, WORKER_READY_TIMEOUT_S)
        say(f"lab, Temporal ({cfg.temporal_address}) and worker ready in {time.monotonic() - t0:.1f} s")
        yield client
    finally:
        if keep:
            say(
                f"--keep: lab left running under {cfg.abs_root}; `zerodown lab down --root {cfg.root}` "
                f"stops it, and the worker (pid file {cfg.worker_pidfile})"
            )
        else:
            say("tearing the lab down")
            procs.stop_pidfile(cfg.worker_pidfile, timeout=15, expect="worker")
            await asyncio.to_thread(manager.lab_down, cfg)


async def run_bench(
    cfg: LabConfig,
    total: int,
    sample: int,
    concurrency: int,
    runupdate_s: float,
    schemata_per_run: int,
    full: bool,
    keep: bool,
    timeout_s: float | None,
) -> int:
    async with bench_ox_lab(cfg, total, keep) as client:
        await asyncio.to_thread(prepare_ox, cfg, runupdate_s)
        inv = load_inventory(cfg.ox_site_yaml)
        measured, summary = await bench_runs(
            cfg,
            client,
            TASK_QUEUE,
            inv,
            total,
            sample,
            concurrency,
            runupdate_s,
            schemata_per_run,
            full,
            timeout_s,
        )
        for line in summary_lines(summary, sample, concurrency, runupdate_s):
            say(line)
        print(result_line(summary), flush=True)
    return 0 if all(m.ok for m in measured) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.ox_upgradeschemata",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--schemata", type=int, default=10_000, help="schemata in the config DB (the full run)")
    p.add_argument("--sample", type=int, default=300, help="schemata of the c1 and the cN sample runs")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--runupdate-s", type=float, default=0.5, help="runupdate's work per schema")
    p.add_argument("--schemata-per-run", type=int, default=100, help="continue-as-new after this many")
    p.add_argument("--no-full", dest="full", action="store_false", help="skip the full cN run")
    p.add_argument("--root", type=Path, default=Path(".lab-bench-ox"))
    p.add_argument(
        "--port-base", type=int, default=19200, help="lab ports from here; Temporal on +50, its UI on +51"
    )
    p.add_argument("--keep", action="store_true", help="leave the lab and worker running")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds one run may take before it is terminated (default: from its size)",
    )
    a = p.parse_args(argv)
    if (
        a.schemata < 1
        or not 1 <= a.sample <= a.schemata
        or a.concurrency < 2
        or a.runupdate_s < 0
        or a.schemata_per_run < 1
        or (a.timeout is not None and a.timeout <= 0)
    ):
        p.error(
            "--schemata >= 1, 1 <= --sample <= --schemata, --concurrency >= 2, --runupdate-s >= 0, "
            "--schemata-per-run >= 1, --timeout > 0"
        )
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = LabConfig(
        root=a.root,
        nodes=1,
        port_base=a.port_base,
        temporal_port=a.port_base + 50,
        temporal_ui_port=a.port_base + 51,
        ox_nodes=LAB_OX_NODES,
        ox_schemata=a.schemata,
    )
    return launch(
        run_bench(
            cfg,
            a.schemata,
            a.sample,
            a.concurrency,
            a.runupdate_s,
            a.schemata_per_run,
            a.full,
            a.keep,
            a.timeout,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
