"""No secret in what zerodown writes: every e2e test is checked (issue 17.5).

The lab marks every secret it generates (`lab.config.SECRET_MARKER`): the database
passwords, the admin token, the log-on password, OX's master password, and through them the
secret config value every node's `database.config` holds (`application.secret_keys`). The
`lab_worker` fixture, after each test, searches for the marker (and for the lines of the
lab's SSH private key):

* every history on the test's task queue, each payload decoded from its base64;
* each run's timeline: a closed run's is its result (or failure) in the history; a run still
  going is asked (the progress query) and rendered as `zerodown status` shows it;
* every log record the process emitted during the test.

It records the procedures it checked in a file of the session (`ZERODOWN_SECRET_CHECKS`);
conftest's `pytest_sessionfinish` fails a whole-suite run in which some procedure was never
checked, so "every procedure ran with marked secrets, and none leaked" holds for the suite.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from temporalio.client import Client, WorkflowExecutionStatus

from lab.config import SECRET_MARKER

CHECKS_ENV = "ZERODOWN_SECRET_CHECKS"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextmanager
def captured_logs() -> Iterator[list[str]]:
    """Every log record of the process at INFO or above, formatted (exception text too)."""
    root = logging.getLogger()
    handler = _Records()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    level = root.level
    # asyncssh logs every connection and channel at INFO (no command text): warnings only,
    # or formatting its lines costs the suite more than the check is worth.
    chatty = logging.getLogger("asyncssh")
    chatty_level = chatty.level
    root.addHandler(handler)
    root.setLevel(min(level, logging.INFO) if level else logging.INFO)
    chatty.setLevel(logging.WARNING)
    try:
        yield handler.lines
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        chatty.setLevel(chatty_level)


def decoded(value: Any) -> Iterator[str]:
    """Every string in a history's JSON, each payload's data decoded from base64."""
    if isinstance(value, dict):
        if isinstance(value.get("data"), str) and "metadata" in value:
            try:
                yield base64.b64decode(value["data"]).decode("utf-8", errors="replace")
            except ValueError:
                yield value["data"]
        for k, v in value.items():
            if isinstance(v, dict) and k == "metadata":
                yield from (
                    base64.b64decode(x).decode("utf-8", errors="replace")
                    for x in v.values()
                    if isinstance(x, str)
                )
            else:
                yield from decoded(v)
    elif isinstance(value, list):
        for v in value:
            yield from decoded(v)
    elif isinstance(value, str):
        yield value


def markers(lab_secrets_dir: Path | None = None) -> tuple[str, ...]:
    """The marker, and each body line of the lab's SSH private key."""
    found = [SECRET_MARKER]
    if lab_secrets_dir is not None:
        key = lab_secrets_dir / "id_ed25519"
        if key.exists():
            found += [
                ln for ln in key.read_text().splitlines() if len(ln) >= 16 and not ln.startswith("-----")
            ]
    return tuple(found)


def _hits(where: str, text: str, needles: tuple[str, ...]) -> list[str]:
    out = []
    for needle in needles:
        i = text.find(needle)
        if i >= 0:
            out.append(f"{where}: ...{text[max(0, i - 120) : i + 60]!r}...")
    return out


async def leaks(
    client: Client, task_queue: str, log_lines: list[str], needles: tuple[str, ...]
) -> tuple[list[str], set[str]]:
    """(where a secret was found, the procedures whose runs were searched)."""
    from starter.client import run_status
    from starter.report import status_view

    found: list[str] = []
    procedures: set[str] = set()
    async for wf in client.list_workflows(f'TaskQueue="{task_queue}"'):
        procedures.add(wf.workflow_type)
        handle = client.get_workflow_handle(wf.id, run_id=wf.run_id)
        history = await handle.fetch_history()
        text = "\n".join(decoded(json.loads(history.to_json())))
        found += _hits(f"history of {wf.id}", text, needles)
        if wf.status != WorkflowExecutionStatus.RUNNING:
            # A closed run's timeline is its result's `steps` (or its failure), in the
            # history just searched; querying it would replay the whole run once more.
            continue
        try:
            st = await run_status(client, handle, wf.workflow_type)
        except Exception:  # a run without the progress query (none today); its history was read
            continue
        out = io.StringIO()
        Console(file=out, width=200, color_system=None).print(status_view(st, last=10_000))
        found += _hits(f"status of {wf.id}", out.getvalue() + repr(st), needles)
    found += _hits("log", "\n".join(log_lines), needles)
    return found, procedures


def record_checked(procedures: set[str]) -> None:
    """Append the procedures searched to this session's record (when the session keeps one)."""
    path = os.environ.get(CHECKS_ENV)
    if path and procedures:
        with open(Path(path) / f"{os.getpid()}.txt", "a", encoding="utf-8") as f:
            f.write("".join(p + "\n" for p in sorted(procedures)))


def checked_procedures(directory: Path) -> set[str]:
    return {ln.strip() for p in directory.glob("*.txt") for ln in p.read_text().splitlines() if ln.strip()}
