"""`make demo`: the lab, a worker and the probe, Secret Server's Manual Rolling Upgrade
(`ss-rolling`) from v1 to v2 with its gates approved automatically, and a report."""

from __future__ import annotations

import asyncio
import sys
import time

import aiohttp
from rich.console import Console
from rich.live import Live

import activities.app_admin as app_admin
from inventory.load import load_inventory
from inventory.model import Inventory
from lab import manager, procs
from lab import mariadb as lab_mariadb
from lab.config import LabConfig
from lab.probe import start_probe_process, stop_probe_process
from starter import client as zc
from starter.report import kv_table, progress_view, steps_table
from worker.main import TASK_QUEUE, connect
from workflows.gates import GateRecord, PendingGate
from workflows.ss_rolling import SsRollingInput, SsRollingResult

PROCEDURE = "ss-rolling"
# The demo stands in for the people who decide the gates: it says so, and decides as one of
# the approvers the lab's inventory lists (never as the starter: no self-approval).
DEMO_STARTER = "zerodown-demo"
AUTO_COMMENT = "approved automatically by `make demo` (in production a listed person decides)"


def start_worker(cfg: LabConfig, restart: bool = False) -> None:
    """A background worker for the lab (idempotent), log in ROOT/worker.log. `restart`
    replaces a running one, so the worker runs this checkout's code."""
    if restart:
        procs.stop_pidfile(cfg.worker_pidfile, expect="worker")
    elif procs.pid_alive(cfg.worker_pidfile):
        return
    procs.start_background(
        [sys.executable, "-m", "worker", "--address", cfg.temporal_address, "--task-queue", TASK_QUEUE],
        cfg.worker_pidfile,
        cfg.worker_log,
    )


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


async def _enforce_version_match(inv: Inventory, on: bool) -> None:
    """The lab app shows Secret Server's version mismatch page only when the site enforces it."""
    assert inv.application.admin is not None
    await app_admin.set_settings(
        app_admin.SettingsRequest(
            base_url=inv.nodes[0].url, admin=inv.application.admin, scope="site", enforce_version_match=on
        )
    )


async def run_demo(cfg: LabConfig, rate: float, console: Console) -> int:
    console.rule("[bold]zerodown demo: Secret Server Manual Rolling Upgrade (ss-rolling)")
    console.print("starting Temporal, the lab and a worker …")
    t0 = time.monotonic()
    site = await manager.lab_up(cfg)
    if set((await node_versions(cfg)).values()) != {"1.0.0"}:
        console.print("lab nodes are not all at 1.0.0 (an earlier demo?): resetting the lab to v1")
        await manager.lab_reset(cfg)
    elif await asyncio.to_thread(lab_mariadb.site_state_problems, cfg):
        await asyncio.to_thread(lab_mariadb.reset_site_state, cfg)  # audit rows of an earlier demo
    start_worker(cfg, restart=True)
    console.print(f"lab ready in {time.monotonic() - t0:.1f}s: {site}")
    inv = load_inventory(site)
    await _enforce_version_match(inv, True)

    # The probe runs for the whole procedure, in its own process like a real client.
    probe = start_probe_process(cfg.main_url, rate, cfg.probe_log, cfg.probe_summary)
    decisions: list[str] = []
    try:
        client = await connect(cfg.temporal_address, tracing=False)
        handle = await zc.start_procedure(
            client,
            PROCEDURE,
            inv,
            SsRollingInput(inventory=inv, package_path=str(cfg.package(2)), started_by=DEMO_STARTER),
            TASK_QUEUE,
        )
        console.print(
            f"{PROCEDURE} started: workflow [cyan]{handle.id}[/] "
            f"(probe at {rate:g} req/s through {cfg.main_url})"
        )
        console.print(
            "[bold yellow]note:[/] the demo approves the gates staging-test and upgrade-successful "
            "itself, as 'alice'; in production a person listed in the inventory decides "
            "(`zerodown approve`, the Web UI or `temporal workflow update`)"
        )

        def approver(gate: PendingGate) -> str:
            return "alice"

        def said(record: GateRecord) -> None:
            line = f"gate {record.gate}: approved automatically by {record.by}"
            decisions.append(line)
            console.print(line)

        approvals = asyncio.ensure_future(
            zc.auto_approve(handle, approver, AUTO_COMMENT, on_decision=said, key_of=cfg.approver_key)
        )
        with Live(console=console, refresh_per_second=4, transient=True) as live:
            outcome = await zc.wait_with_progress(
                client, handle, SsRollingResult, lambda p: live.update(progress_view(p))
            )
        await approvals
        audit = await app_admin.list_audit(inv.nodes[0].url, inv.application.admin)  # type: ignore[arg-type]
    finally:
        summary = await asyncio.to_thread(stop_probe_process, probe, cfg.probe_summary)
        await _enforce_version_match(inv, False)

    versions = await node_versions(cfg)
    console.rule("[bold]report")
    if outcome.ok:
        res: SsRollingResult = outcome.result
        console.print(steps_table(res.steps, title=f"{PROCEDURE} steps"))
        total_s = sum(s.duration_s or 0 for s in res.steps)
        console.print(
            f"procedure: {len(res.steps)} steps, {total_s:.1f}s of step time; groups A: "
            f"{', '.join(res.group_a)}, B: {', '.join(res.group_b)} (B first)"
        )
        console.print(
            f"upgrade zip: {len(res.upgrade_zip_files)} changed file(s) ({res.upgrade_zip}); "
            f"SQL script: {res.sql_script}"
        )
        kept = [line for line in res.merge_report if ": kept " in line]
        if kept:
            console.print("per-node config customisations carried onto the new defaults:")
            for line in kept:
                console.print(f"  {line}")
    else:
        console.print(f"[bold red]{PROCEDURE} failed:[/] {outcome.error}")
    console.print(
        kv_table(
            "gates (decided by the demo, not by a person)",
            {str(i): d for i, d in enumerate(decisions, start=1)} or {"-": "none"},
        )
    )
    console.print(
        kv_table(
            "audit trail (tbAudit, ManualUpgrade)", {str(e.audit_id): f"{e.action}: {e.notes}" for e in audit}
        )
    )
    console.print(kv_table("versions per node", versions))
    console.print(
        kv_table(
            "traffic probe",
            {
                "requests": summary.get("total", "?"),
                "failed": summary.get("failed", "?"),
                "refused (maintenance mode, not failures)": summary.get("refused", "?"),
                "by node": summary.get("by_node", {}),
                "failures log": cfg.probe_log,
            },
        )
    )
    console.print(f"failed={summary.get('failed', '?')} refused={summary.get('refused', '?')}")
    console.print(
        f"Temporal web UI: http://127.0.0.1:{cfg.temporal_ui_port}/namespaces/default/workflows/{handle.id}",
        soft_wrap=True,
    )
    console.print("The lab keeps running: try `zerodown lab status`; stop it with `make lab-down`.")
    return 0 if outcome.ok and summary.get("failed") == 0 else 1
