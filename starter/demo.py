"""`make demo`: the lab, a worker and the probe, one rolling deploy v1 -> v2, and a report."""

from __future__ import annotations

import asyncio
import sys
import time

import aiohttp
from rich.console import Console
from rich.live import Live

from lab import manager, procs
from lab.config import LabConfig
from lab.probe import start_probe_process, stop_probe_process
from starter import client as zc
from starter.report import kv_table, progress_view, steps_table
from worker.main import TASK_QUEUE, connect
from workflows.inventory import load_inventory
from workflows.rolling_deploy import RollingDeployInput, RollingDeployResult


def start_worker(cfg: LabConfig, restart: bool = False) -> None:
    """A background worker for the lab (idempotent), log in ROOT/worker.log. `restart`
    replaces a running one, so the worker runs this checkout's code."""
    if restart:
        procs.stop_pidfile(cfg.worker_pidfile, expect="worker")
    elif procs.pid_alive(cfg.worker_pidfile):
        return
    procs.start_background([sys.executable, "-m", "worker", "--address", cfg.temporal_address,
                            "--task-queue", TASK_QUEUE], cfg.worker_pidfile, cfg.worker_log)


async def node_versions(cfg: LabConfig) -> dict[str, str]:
    out: dict[str, str] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        for i in cfg.node_indexes:
            try:
                async with s.get(f"http://127.0.0.1:{cfg.app_port(i)}/version") as r:
                    out[cfg.node_name(i)] = (await r.json())["version"]
            except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as e:
                out[cfg.node_name(i)] = f"unreachable ({e.__class__.__name__})"
    return out


async def run_demo(cfg: LabConfig, rate: float, console: Console) -> int:
    console.rule("[bold]zerodown demo")
    console.print("starting Temporal, the lab and a worker …")
    t0 = time.monotonic()
    site = await manager.lab_up(cfg)
    if set((await node_versions(cfg)).values()) != {"1.0.0"}:
        console.print("lab nodes are not all at 1.0.0 (an earlier demo?): resetting the lab to v1")
        await manager.lab_reset(cfg)
    start_worker(cfg, restart=True)
    console.print(f"lab ready in {time.monotonic() - t0:.1f}s: {site}")

    # The probe runs for the whole procedure, in its own process like a real client.
    probe = start_probe_process(cfg.main_url, rate, cfg.probe_log, cfg.probe_summary)
    try:
        inv = load_inventory(site)
        client = await connect(cfg.temporal_address, tracing=False)
        handle = await zc.start_procedure(
            client, "rolling-deploy", inv,
            RollingDeployInput(inventory=inv, package_path=str(cfg.package(2))), TASK_QUEUE)
        console.print(f"rolling-deploy started: workflow [cyan]{handle.id}[/] "
                      f"(probe at {rate:g} req/s through {cfg.main_url})")
        with Live(console=console, refresh_per_second=4, transient=True) as live:
            outcome = await zc.wait_with_progress(client, handle, RollingDeployResult,
                                                  lambda p: live.update(progress_view(p)))
    finally:
        summary = await asyncio.to_thread(stop_probe_process, probe, cfg.probe_summary)

    versions = await node_versions(cfg)
    console.rule("[bold]report")
    if outcome.ok:
        res: RollingDeployResult = outcome.result
        console.print(steps_table(res.steps, title="rolling-deploy steps"))
        total_s = sum(s.duration_s or 0 for s in res.steps if s.name.startswith(("P", "D", "N")))
        console.print(f"procedure: {len(res.steps)} steps, {total_s:.1f}s of step time")
        kept = [line for line in res.merge_report if ": kept " in line]
        if kept:
            console.print("per-node config customisations carried onto the new defaults:")
            for line in kept:
                console.print(f"  {line}")
    else:
        console.print(f"[bold red]rolling-deploy failed:[/] {outcome.error}")
    console.print(kv_table("versions per node", versions))
    console.print(kv_table("traffic probe", {
        "requests": summary.get("total", "?"), "failed": summary.get("failed", "?"),
        "by node": summary.get("by_node", {}), "failures log": cfg.probe_log}))
    console.print(f"failed={summary.get('failed', '?')}")
    console.print(f"Temporal web UI: http://127.0.0.1:{cfg.temporal_ui_port}/namespaces/default/"
                  f"workflows/{handle.id}", soft_wrap=True)
    console.print("The lab keeps running: try `zerodown lab status`; stop it with `make lab-down`.")
    return 0 if outcome.ok and summary.get("failed") == 0 else 1
