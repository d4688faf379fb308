"""Terminal rendering of plans, timelines and reports (rich)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml
from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from inventory.model import Node
from starter.client import RunStatus
from workflows.gates import PendingGate
from workflows.major_maintenance_window import MajorMaintenanceResult
from workflows.minor_blue_green import MinorBlueGreenResult
from workflows.ox_node_upgrade import OxNodeUpgradeResult
from workflows.ox_upgradeschemata import OxSchemataProgress, OxUpgradeSchemataResult
from workflows.timeline import Progress, StepRecord

_RESULT_STYLE = {
    "ok": "green",
    "failed": "bold red",
    "running": "yellow",
    "skipped": "dim",
    "compensated": "magenta",
}
# More steps than this are shown as their tail: an OX run has four steps per schema.
MAX_STEPS_SHOWN = 100
# How many failures an OX summary lists one by one (10,000 schemata may fail alike).
MAX_FAILURES_LISTED = 10


def steps_table(steps: Iterable[StepRecord], title: str = "steps", start: int = 1) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("#", "seed", "step", "node", "seconds", "retries", "result"):
        table.add_column(col, justify="right" if col in ("#", "seconds", "retries") else "left")
    for i, s in enumerate(steps, start=start):
        secs = f"{s.duration_s:.2f}" if s.duration_s is not None else "…"
        result = Text(s.result, style=_RESULT_STYLE.get(s.result, ""))
        if s.detail and (s.result != "ok" or s.retries):
            result.append(f" {s.detail}", style="dim")
        table.add_row(str(i), s.seed_step or "", s.name, s.node or "", secs, str(s.retries or ""), result)
    return table


def recent_steps_table(steps: Sequence[StepRecord], last: int = MAX_STEPS_SHOWN) -> Table:
    """Every step, or the last `last` of them when there are more (numbered as in the run)."""
    if len(steps) <= last:
        return steps_table(steps)
    return steps_table(steps[-last:], title=f"last {last} of {len(steps)} steps", start=len(steps) - last + 1)


def progress_view(p: Progress, last: int = 12, notes: Sequence[str] = ()) -> Group:
    head = Text.assemble(
        (f"{p.procedure}", "bold"),
        f"  phase: {p.phase}",
        f"  node: {p.node}" if p.node else "",
        f"  nodes done: {len(p.nodes_done)}/{p.nodes_total}" if p.nodes_total else "",
    )
    return Group(
        head,
        *(Text(n) for n in notes),
        steps_table(p.steps[-last:], title=f"last {min(last, len(p.steps))} steps"),
    )


def status_view(st: RunStatus, last: int = 12) -> Group:
    return progress_view(st.progress, last, status_notes(st))


def kv_table(title: str, rows: Mapping[str, object]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for k, v in rows.items():
        table.add_row(k, str(v))
    return table


# ---------------------------------------------------------------- Open-Xchange
def abbreviate(names: Sequence[str], head: int = 6) -> str:
    """Names on one line: all of them when few, else the first `head`, the last and the count."""
    if not names:
        return "none"
    if len(names) <= head + 2:
        return ", ".join(names)
    return f"{', '.join(names[:head])}, …, {names[-1]} ({len(names)} in all)"


def counted(names: Sequence[str]) -> str:
    return f"{len(names)} ({abbreviate(names)})" if names else "none"


def schemata_line(sp: OxSchemataProgress) -> str:
    """ox-upgradeschemata's `schemata` query on one line."""
    line = (
        f"total {sp.total}, upgraded {sp.upgraded}, failed {sp.failed}, left disabled "
        f"{sp.left_disabled}, reverted {sp.reverted}, skipped {sp.skipped}, remaining {sp.remaining}; "
        f"current: {abbreviate(sp.current)}; run {sp.run}"
    )
    if sp.server_id:
        line += f"; server id {sp.server_id}"
    return line + (f"; {sp.stopped}" if sp.stopped else "")


def gate_line(g: PendingGate) -> str:
    """A gate waiting for a decision, with who may decide it and how (rich markup)."""
    return (
        f"[bold yellow]waiting at gate {escape(g.gate)}[/] since {g.since:%H:%M:%S}: {escape(g.guards)}; "
        f"may decide: {', '.join(g.approvers) or 'nobody'}; "
        + (f"choices: {', '.join(g.choices)}; " if g.choices else "")
        + f"plan hash {g.plan_hash}"
    )


def status_notes(st: RunStatus) -> list[str]:
    """What a procedure tells apart besides its timeline, one line each (plain text)."""
    notes: list[str] = []
    if st.schemata is not None:
        notes.append("schemata: " + schemata_line(st.schemata))
    for c in st.children:
        where = f" ({c.node})" if c.node else ""
        if c.state != "running":
            notes.append(f"child workflow {c.workflow_id}{where}: {c.state}")
            continue
        notes.append(
            f"running child workflow {c.workflow_id}{where}"
            + (f": schemata {schemata_line(c.schemata)}" if c.schemata else "")
            + f" (zerodown status {c.workflow_id})"
        )
        notes += [
            f"  child waiting at gate {g.gate}: decide with zerodown resolve {c.workflow_id} "
            f"--gate {g.gate} --choice {'|'.join(g.choices)} --by … --plan-hash {g.plan_hash}"
            for g in c.gates
        ]
    return notes


def _one_line(text: str, limit: int = 200) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= limit else first[: limit - 1] + "…"


def ox_schemata_summary(res: OxUpgradeSchemataResult) -> list[str]:
    """The outcome of an ox-upgradeschemata run (rich markup, names escaped)."""
    how = (
        "registered by this run"
        if res.server_registered
        else "already registered, used"
        if res.server_id
        else "not registered"
    )
    lines = [
        f"[bold]ox-upgradeschemata[/] on {escape(res.site)}: server {escape(res.server_name)}"
        + (f" id {res.server_id}" if res.server_id else "")
        + f" ({how})"
        + (", driven by OX's upgradeschemata" if res.drove_tool else ""),
        f"upgraded: {escape(counted(res.upgraded))}",
    ]
    lines.append(f"failed: {len(res.failed)}" if res.failed else "failed: none")
    for f in res.failed[:MAX_FAILURES_LISTED]:
        lines.append(f"  {escape(f.schema)} at step {f.seed_step}: {escape(_one_line(f.error))}")
    if len(res.failed) > MAX_FAILURES_LISTED:
        lines.append(
            f"  … and {len(res.failed) - MAX_FAILURES_LISTED} more: "
            f"{escape(abbreviate([f.schema for f in res.failed[MAX_FAILURES_LISTED:]]))}"
        )
    lines += [
        f"left disabled: {escape(counted(res.left_disabled))}",
        f"reverted to the old server: {escape(counted(res.reverted))}",
        f"skipped (--skip): {escape(counted(res.skipped))}",
        f"passed over (--resume-from): {escape(counted(res.passed_over))}",
        f"runs: {res.runs}"
        + (" (continued as new)" if res.runs > 1 else "")
        + (f", longest history {res.max_events_per_run} events" if res.max_events_per_run else ""),
    ]
    if res.aborted_at_registration:
        lines.append(
            "[bold yellow]aborted[/] at gate server-already-registered (or the tool's prompt): "
            "nothing was changed"
        )
    elif res.failed:
        lines.append(
            f"[bold yellow]done with failures[/]: {len(res.upgraded)} upgraded, {len(res.failed)} "
            "failed (see above; fix and resume with --resume-from or --schemata)"
        )
    else:
        lines.append(f"[green]done[/]: {len(res.upgraded)} schemata on server {escape(res.server_name)}")
    return lines


def ox_nodes_summary(res: OxNodeUpgradeResult) -> list[str]:
    """The outcome of an ox-node-upgrade run (rich markup, names escaped)."""
    shares = "; ".join(f"{s.node} {counted(s.schemata)}" for s in res.shares)
    lines = [
        f"[bold]ox-node-upgrade[/] on {escape(res.site)}: {res.previous_version} -> {res.version}, "
        f"new server {escape(res.server_name)}",
        f"nodes (in order): {', '.join(res.nodes)}",
        f"schemata per node: {escape(shares)}",
        f"child workflows: {', '.join(res.children) or 'none'}",
        f"upgraded schemata: {escape(counted(res.upgraded_schemata))}",
        f"failed schemata: {escape(counted(res.failed_schemata))}",
    ]
    if res.failed_schemata:
        lines.append(
            f"[bold yellow]done with failures[/]: {', '.join(res.nodes)} at {res.version}; "
            f"{len(res.failed_schemata)} schemata failed (see the child workflows)"
        )
    else:
        lines.append(f"[green]done[/]: {', '.join(res.nodes)} now at {res.version}")
    return lines


# ---------------------------------------------------------------- RightScale minor upgrade
def _without_none(value: Any) -> Any:
    """A dataclasses.asdict tree without its None fields: what an inventory file would say
    (a SecretRef becomes `{file: PATH}` or `{env: NAME}`, a reference, never its value)."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_without_none(v) for v in value]
    return value


def node_entries_yaml(nodes: Sequence[Node]) -> str:
    """`nodes:` entries for a site's inventory, in its YAML format (parse_node_entry reads
    each back). A Node holds secret references only, so nothing secret is printed."""
    entries = [_without_none(dataclasses.asdict(n)) for n in nodes]
    return yaml.safe_dump({"nodes": entries}, sort_keys=False, default_flow_style=False)


def blue_green_summary(res: MinorBlueGreenResult) -> list[str]:
    """The outcome of a minor-blue-green run (rich markup, names escaped), ending with the
    new servers' inventory entries: the site's inventory should list them from now on."""
    new = [n.name for n in res.new_servers]
    kept = [o for o in res.old_servers if o not in res.terminated]
    lines = [
        f"[bold]minor-blue-green[/] on {escape(res.site)}: {escape(', '.join(res.old_servers))} "
        f"replaced by {escape(', '.join(new) or 'none')} at {escape(res.version)}",
        "new servers: " + escape(", ".join(f"{n.name} ({n.url})" for n in res.new_servers) or "none"),
    ]
    if res.terminated:
        lines.append(f"old servers terminated: {escape(', '.join(res.terminated))}")
    if kept:
        lines.append(
            f"old servers kept (detached from the load balancer, still running; terminate "
            f"them by hand when done): {escape(', '.join(kept))}"
        )
    lines += [
        f"settings copy: {escape(', '.join(res.settings_copy) or 'none (no --setting)')}",
        f"database snapshot: {escape(res.db_snapshot or 'none (no database)')}",
        f"drain: {res.drain_s:.1f}s, "
        + (
            "detach forced at gate drain-deadline (open sessions were closed)"
            if res.forced_detach
            else "detach not forced (no session was cut)"
        ),
    ]
    if res.new_servers:
        lines.append(
            "[bold]update the site's inventory[/]: list the new servers below under `nodes` and "
            "as the load balancer's members, in place of "
            + escape(", ".join(res.old_servers))
            + (" (and remove the terminated ones)" if res.terminated else "")
        )
        lines.append(escape(node_entries_yaml(res.new_servers).rstrip("\n")))
    lines.append(f"[green]done[/]: {escape(', '.join(new))} now at {escape(res.version)}")
    return lines


def maintenance_window_summary(res: MajorMaintenanceResult) -> list[str]:
    """The outcome of a major-maintenance-window run (rich markup, names escaped), ending
    with the new servers' inventory entries."""
    new = [n.name for n in res.new_servers]
    kept = [o for o in res.old_servers if o not in res.terminated]
    lines = [
        f"[bold]major-maintenance-window[/] on {escape(res.site)}: {escape(', '.join(res.old_servers))} "
        f"replaced by {escape(', '.join(new) or 'none')} at {escape(res.version)}",
        f"downtime (steps 17-33): {res.downtime_s:.2f}s, of which the migrations (step 23) "
        f"{res.migration_s:.2f}s",
        "database snapshots: " + escape(", ".join(res.snapshots) or "none"),
    ]
    if res.terminated:
        lines.append(f"terminated: {escape(', '.join(res.terminated))} and the warm replica released")
    if kept:
        lines.append(f"kept (detached, stopped): {escape(', '.join(kept))}; the warm replica too")
    if res.new_servers:
        lines.append(
            "[bold]update the site's inventory[/]: list the new servers below under `nodes` and "
            "as the load balancer's members, in place of " + escape(", ".join(res.old_servers))
        )
        lines.append(escape(node_entries_yaml(res.new_servers).rstrip("\n")))
    lines.append(f"[green]done[/]: {escape(', '.join(new))} now at {escape(res.version)}")
    return lines
