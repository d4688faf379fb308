"""Benchmark: many procedures at once on one worker - the worker's peak memory.

    python -m bench.many_runs [--runs 50] [--nodes 3] [--root .lab-bench-many]
                              [--port-base 19400] [--keep] [--timeout 600]

Its own lab and Temporal dev server (like bench.rolling_deploy) and ONE worker process
(`python -m worker`, as in production). Starts --runs `rolling-deploy` dry runs at once (each
a full preflight against the lab - SSH to every node, HAProxy, MariaDB, the package - and a
plan: real activities, no change) and waits for all of them. The worker's peak resident
memory is the kernel's own high-water mark of that process (/proc/<pid>/status VmHWM), read
after the runs; its resident memory before them (VmRSS) is given for comparison. One line
on stdout:

    runs=<n> completed=<n> worker_rss_before_mb=<mb> worker_peak_rss_mb=<mb> wall_s=<s>

Goal (issue 15): a peak of 200 MB or less for 50 runs. Exit status 1 when a run failed or the
goal was missed, 2 when the bench itself failed.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import timedelta
from pathlib import Path

from temporalio.client import Client

from bench.rolling_deploy import bench_lab, lab_config, lab_options, launch, say
from inventory.load import load_inventory
from lab.config import LabConfig
from lab.procs import read_pid
from starter.demo import TASK_QUEUE
from workflows.rolling_deploy import RollingDeployInput, RollingDeployResult, RollingDeployWorkflow

PEAK_RSS_GOAL_MB = 200.0


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (the peak since the process started) of `pid`, in MB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024.0
    return out


def result_line(runs: int, completed: int, before_mb: float, peak_mb: float, wall_s: float) -> str:
    return (
        f"runs={runs} completed={completed} worker_rss_before_mb={before_mb:.1f} "
        f"worker_peak_rss_mb={peak_mb:.1f} wall_s={wall_s:.1f}"
    )


async def one(client: Client, inp: RollingDeployInput, n: int, stamp: int, timeout_s: float) -> bool:
    handle = await client.start_workflow(
        RollingDeployWorkflow.run,
        inp,
        id=f"bench-many-{stamp}-{n}",
        task_queue=TASK_QUEUE,
        execution_timeout=timedelta(seconds=timeout_s),
    )
    try:
        result: RollingDeployResult = await handle.result()
    except Exception as e:
        say(f"run {n} failed: {e}")
        return False
    return bool(result.dry_run)


async def run_bench(cfg: LabConfig, runs: int, keep: bool, timeout_s: float) -> int:
    async with bench_lab(cfg, keep) as (site, client):
        pid = read_pid(cfg.worker_pidfile)
        if pid is None:
            raise RuntimeError(f"no worker pid in {cfg.worker_pidfile}")
        before = memory_mb(pid)["VmRSS"]
        inp = RollingDeployInput(
            inventory=load_inventory(site), package_path=str(cfg.package(2)), dry_run=True
        )
        t0 = time.monotonic()
        stamp = int(time.time())
        done = await asyncio.gather(*(one(client, inp, n, stamp, timeout_s) for n in range(runs)))
        wall = time.monotonic() - t0
        peak = memory_mb(pid)["VmHWM"]
        completed = sum(done)
        print(result_line(runs, completed, before, peak, wall), flush=True)
        if peak > PEAK_RSS_GOAL_MB:
            say(f"peak {peak:.1f} MB is over the goal of {PEAK_RSS_GOAL_MB:.0f} MB")
    return 0 if completed == runs and peak <= PEAK_RSS_GOAL_MB else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.many_runs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--nodes", type=int, default=3)
    lab_options(p, ".lab-bench-many", 19400)
    a = p.parse_args(argv)
    if a.runs < 1 or a.nodes < 1:
        p.error("--runs and --nodes must be >= 1")
    cfg = lab_config(a, a.nodes)
    return launch(run_bench(cfg, a.runs, a.keep, a.timeout))


if __name__ == "__main__":
    import sys

    sys.exit(main())
