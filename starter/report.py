"""Terminal rendering of plans, timelines and reports (rich)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from rich.console import Group
from rich.table import Table
from rich.text import Text

from workflows.timeline import Progress, StepRecord

_RESULT_STYLE = {"ok": "green", "failed": "bold red", "running": "yellow", "skipped": "dim",
                 "compensated": "magenta"}


def steps_table(steps: Iterable[StepRecord], title: str = "steps") -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("#", "seed", "step", "node", "seconds", "retries", "result"):
        table.add_column(col, justify="right" if col in ("#", "seconds", "retries") else "left")
    for i, s in enumerate(steps, start=1):
        secs = f"{s.duration_s:.2f}" if s.duration_s is not None else "…"
        result = Text(s.result, style=_RESULT_STYLE.get(s.result, ""))
        if s.detail and (s.result != "ok" or s.retries):
            result.append(f" {s.detail}", style="dim")
        table.add_row(str(i), s.seed_step or "", s.name, s.node or "", secs, str(s.retries or ""), result)
    return table


def progress_view(p: Progress, last: int = 12) -> Group:
    head = Text.assemble((f"{p.procedure}", "bold"), f"  phase: {p.phase}",
                         f"  node: {p.node}" if p.node else "",
                         f"  nodes done: {len(p.nodes_done)}/{p.nodes_total}")
    return Group(head, steps_table(p.steps[-last:], title=f"last {min(last, len(p.steps))} steps"))


def kv_table(title: str, rows: Mapping[str, object]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for k, v in rows.items():
        table.add_row(k, str(v))
    return table
