"""Benchmark: the Secret Server procedures v1 -> v2 on a private lab, under probe traffic.

    python -m bench.secret_server [--rate 100] [--runs 1] [--root .lab-bench-ss]
                                  [--port-base 19100] [--db mariadb|mssql] [--keep] [--timeout 600]

The lab, its Temporal dev server (port_base+50, UI +51) and the worker are those of
`bench.rolling_deploy` (`bench_lab`), on a 4-node lab of their own. Each run is one of:

    ss-rolling        on the 4 nodes (groups A = node1, node2 and B = node3, node4)
    ss-load-balanced  on 3 of them: the site narrowed to node1-node3, node4 in maintenance
                      in HAProxy for the run (the lab reset puts it back)

with the probe at --rate through the main frontend, the site setting EnforceVersionMatch on
(the lab app shows Secret Server's version mismatch page only then; off again after the run),
the run started by "bench" and its gates approved by "alice" (`starter.client.auto_approve`,
which leaves failure gates alone: a failed step rolls back by its default). The lab goes back
to v1 (`lab_reset`) before every run but the first. `--db mssql`: the site's database is the
lab's SQL Server (the TDS stand-in in front of the same MariaDB, reached through aioodbc and
FreeTDS) and the package's migration is T-SQL. One line per run on stdout:

    procedure=<name> nodes=<n> requests=<n> failed=<n> refused=<n> procedure_s=<s> steps=<n>
    activities=<n> probe_p50_ms=<ms> probe_max_ms=<ms>

`refused`: changes the app refused in maintenance mode (HTTP 423), not failures.
`procedure_s` is workflow start -> close from the history, so it includes the time the run
waited at its gates (the auto-approver polls every 0.3 s). With --runs > 1 a median line per
procedure follows (and `failed_total`). Exit status 1 when a run failed a request or the
workflow failed, 2 when the bench itself failed; the lab is torn down at the end unless --keep.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from temporalio.client import Client, WorkflowHandle

import activities.app_admin as app_admin
from bench.rolling_deploy import RunResult, bench_lab, launch, measure_run, reset_lab, say
from inventory.load import load_inventory
from inventory.model import Inventory
from lab import haproxy as lab_haproxy
from lab import mariadb as lab_mariadb
from lab.config import BACKEND, DB_PROFILES, PROFILES, LabConfig
from starter import client as zc
from workflows.ss_load_balanced import SsLoadBalancedInput, SsLoadBalancedResult
from workflows.ss_rolling import SsRollingInput, SsRollingResult

# (procedure, nodes): the counts the issue asks for; the lab has the larger one.
PROCEDURES: tuple[tuple[str, int], ...] = (("ss-rolling", 4), ("ss-load-balanced", 3))
LAB_NODES = max(n for _, n in PROCEDURES)
STARTED_BY = "bench"  # the starter may not approve its own run
APPROVER = "alice"  # listed for every gate in the lab inventory
COMMENT = "approved automatically by bench.secret_server"
SETTINGS_CACHE_S = 0.6  # the lab's nodes cache the site settings for up to half a second


# =========================================================================== figures (pure)


@dataclass(frozen=True)
class SsRun:
    procedure: str
    nodes: int
    run: RunResult

    @property
    def ok(self) -> bool:
        return self.run.ok


def _line(
    procedure: str,
    nodes: float,
    requests: float,
    failed: float,
    refused: float,
    procedure_s: float,
    steps: float,
    activities: float,
    p50_ms: float,
    max_ms: float,
) -> str:
    return (
        f"procedure={procedure} nodes={nodes:g} requests={requests:g} failed={failed:g} "
        f"refused={refused:g} procedure_s={procedure_s:.2f} steps={steps:g} "
        f"activities={activities:g} probe_p50_ms={p50_ms:.1f} probe_max_ms={max_ms:.1f}"
    )


def run_line(r: SsRun) -> str:
    x = r.run
    return _line(
        r.procedure,
        r.nodes,
        x.requests,
        x.failed,
        x.refused,
        x.figures.procedure_s,
        x.steps,
        x.figures.activities,
        x.probe_p50_ms,
        x.probe_max_ms,
    )


def summary_lines(runs: Sequence[SsRun]) -> list[str]:
    """Per procedure (in the order they ran), the median of every figure over its runs;
    failed_total: the sum, so one bad run cannot hide behind the median."""

    def med(values: Iterable[float]) -> float:
        return float(statistics.median(list(values)))

    lines: list[str] = []
    for procedure in dict.fromkeys(r.procedure for r in runs):
        rs = [r.run for r in runs if r.procedure == procedure]
        nodes = next(r.nodes for r in runs if r.procedure == procedure)
        lines.append(
            f"median of {len(rs)} runs: "
            + _line(
                procedure,
                nodes,
                med(r.requests for r in rs),
                med(r.failed for r in rs),
                med(r.refused for r in rs),
                med(r.figures.procedure_s for r in rs),
                med(r.steps for r in rs),
                med(r.figures.activities for r in rs),
                med(r.probe_p50_ms for r in rs),
                med(r.probe_max_ms for r in rs),
            )
            + f" failed_total={sum(r.failed for r in rs)}"
        )
    return lines


def narrow_site(inv: Inventory, nodes: int) -> Inventory:
    """The site cut to its first `nodes` nodes (and the load balancers' members to them)."""
    if nodes >= len(inv.nodes):
        return inv
    keep = {n.name for n in inv.nodes[:nodes]}
    lbs = tuple(
        dataclasses.replace(lb, members={k: v for k, v in lb.members.items() if k in keep})
        for lb in inv.load_balancers
    )
    return dataclasses.replace(inv, nodes=inv.nodes[:nodes], load_balancers=lbs)


def procedure_input(procedure: str, inv: Inventory, package_path: str) -> tuple[Any, type]:
    """The procedure's input (started by STARTED_BY) and result type."""
    if procedure == "ss-rolling":
        return (
            SsRollingInput(inventory=inv, package_path=package_path, started_by=STARTED_BY),
            SsRollingResult,
        )
    if procedure == "ss-load-balanced":
        return (
            SsLoadBalancedInput(inventory=inv, package_path=package_path, started_by=STARTED_BY),
            SsLoadBalancedResult,
        )
    raise ValueError(f"no bench for {procedure!r}")


# =========================================================================== the bench


async def enforce_version_match(inv: Inventory, on: bool) -> None:
    if inv.application.admin is None:
        raise RuntimeError("the lab inventory declares no admin interface")
    await app_admin.set_settings(
        app_admin.SettingsRequest(
            base_url=inv.nodes[0].url, admin=inv.application.admin, scope="site", enforce_version_match=on
        )
    )
    await asyncio.sleep(SETTINGS_CACHE_S)


def _approver(gate: Any) -> str | None:
    return APPROVER


async def _approve(handle: WorkflowHandle[Any, Any]) -> None:
    def said(record: Any) -> None:
        say(f"gate {record.gate}: approved by {record.by}")

    await zc.auto_approve(handle, _approver, COMMENT, on_decision=said)


def lab_problems(cfg: LabConfig) -> list[str]:
    """What keeps the lab from being as `lab up` left it ([] when nothing), besides versions."""
    out = lab_mariadb.site_state_problems(cfg)
    out += [
        f"{s} is {st}" for (b, s), st in lab_haproxy.server_states(cfg).items() if b == BACKEND and st != "UP"
    ]
    return out


async def one_run(
    cfg: LabConfig,
    client: Client,
    rate: float,
    site: Path,
    procedure: str,
    nodes: int,
    timeout_s: float = 600.0,
) -> SsRun:
    inv = narrow_site(load_inventory(site), nodes)
    arg, result_type = procedure_input(procedure, inv, str(cfg.package(2)))
    outside = [cfg.node_name(i) for i in cfg.node_indexes if i > nodes]
    for name in outside:  # not part of this site: out of the pool (lab_reset puts it back)
        await asyncio.to_thread(lab_haproxy.runtime_command, cfg, f"set server {BACKEND}/{name} state maint")
    if outside:
        say(f"{procedure} on {nodes} nodes: {', '.join(outside)} in maintenance in HAProxy")
    await enforce_version_match(inv, True)
    try:
        run = await measure_run(
            cfg, client, rate, procedure, inv, arg, result_type, timeout_s, alongside=_approve
        )
    finally:
        await enforce_version_match(inv, False)
    return SsRun(procedure=procedure, nodes=nodes, run=run)


async def run_bench(cfg: LabConfig, rate: float, runs: int, keep: bool, timeout_s: float = 600.0) -> int:
    results: list[SsRun] = []
    async with bench_lab(cfg, keep) as (site, client):
        dirty = await asyncio.to_thread(lab_problems, cfg)
        if dirty:
            say(f"lab not as after `lab up` ({'; '.join(dirty)}): resetting it")
        for _ in range(runs):
            for procedure, nodes in PROCEDURES:
                if results or dirty:
                    await reset_lab(cfg)
                    dirty = []
                result = await one_run(cfg, client, rate, site, procedure, nodes, timeout_s)
                results.append(result)
                print(run_line(result), flush=True)
        if runs > 1:
            for line in summary_lines(results):
                print(line, flush=True)
        if keep and results and results[-1].nodes < LAB_NODES:
            say(
                f"--keep: the nodes after node{results[-1].nodes} stay in maintenance in HAProxy "
                f"(at v1): `zerodown lab reset --root {cfg.root}` puts them back"
            )
    return 0 if results and all(r.ok for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.secret_server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rate", type=float, default=100.0, help="probe requests per second")
    p.add_argument("--runs", type=int, default=1, help="runs of each procedure")
    p.add_argument("--root", type=Path, default=Path(".lab-bench-ss"))
    p.add_argument(
        "--port-base", type=int, default=19100, help="lab ports from here; Temporal on +50, its UI on +51"
    )
    p.add_argument(
        "--db",
        choices=DB_PROFILES,
        default="mariadb",
        help="the site's database: MariaDB, or SQL Server (the lab's TDS stand-in, T-SQL packages)",
    )
    p.add_argument(
        "--profile",
        choices=PROFILES,
        default="default",
        help="the site: default (Linux nodes, HAProxy, --db), or secret-server (Windows/IIS nodes "
        "through their Win32-OpenSSH stand-ins, behind the lab's F5, on SQL Server)",
    )
    p.add_argument("--keep", action="store_true", help="leave the lab and worker running")
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds one workflow may run before it is terminated (run failed)",
    )
    a = p.parse_args(argv)
    if a.runs < 1 or a.rate <= 0 or a.timeout <= 0:
        p.error("--runs must be >= 1, --rate and --timeout > 0")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = LabConfig(
        root=a.root,
        nodes=LAB_NODES,
        port_base=a.port_base,
        temporal_port=a.port_base + 50,
        temporal_ui_port=a.port_base + 51,
        db="mssql" if a.profile == "secret-server" else a.db,
        profile=a.profile,
    )
    say(f"profile: {cfg.profile}, database: {cfg.db}")
    return launch(run_bench(cfg, a.rate, a.runs, a.keep, a.timeout))


if __name__ == "__main__":
    sys.exit(main())
