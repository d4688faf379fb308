"""The Windows personality of a lab SSH endpoint (served by lab/sshd.py's process).

An exec request runs `cmd.exe /c <command>` (lab/windows/cmd.py) with the working directory
C:\\Users\\zerodown (the node's folder); SFTP is lab/windows/sftp.py. Each command is logged
to `<node dir>/ssh.log` like the Linux endpoints, with `"shell": "cmd"` and the decoded
PowerShell scripts it ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import asyncssh
from asyncssh.packet import UInt32

from lab.config import STAGING_NAME, LabConfig
from lab.windows import ENDPOINT_PREFIX
from lab.windows.cmd import Session, run_cmd_line
from lab.windows.drive import WinEnv, WinNode
from lab.windows.state import prepare, win_node

log = logging.getLogger("lab.windows")


def endpoint_name(node_name: str) -> str:
    return ENDPOINT_PREFIX + node_name


def is_windows(endpoint: str) -> bool:
    return endpoint.startswith(ENDPOINT_PREFIX)


def node_for(cfg: LabConfig, endpoint: str) -> WinNode:
    """The WinNode behind a Windows endpoint name ("win:node3", "win:staging")."""
    name = endpoint[len(ENDPOINT_PREFIX) :]
    if name == STAGING_NAME:
        return win_node(cfg, None)
    for i in cfg.node_indexes:
        if cfg.node_name(i) == name:
            return win_node(cfg, i)
    raise KeyError(endpoint)


class _Stdin:
    """The channel's stdin for a command running in a thread: read all of it, on demand."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._eof = threading.Event()

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)

    def eof(self) -> None:
        self._eof.set()

    def read_all(self) -> bytes:
        self._eof.wait()
        return b"".join(self._chunks)


async def _pump_stdin(src: asyncssh.SSHReader[bytes], sink: _Stdin) -> None:
    try:
        while data := await src.read(65536):
            sink.feed(data)
    except (OSError, asyncssh.Error, asyncssh.BreakReceived, asyncssh.TerminalSizeChanged):
        pass
    finally:
        sink.eof()


def _append_log(path: Path, entry: dict[str, Any]) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
    except OSError as e:
        log.warning("cannot write %s: %s", path, e)


async def run_command(process: asyncssh.SSHServerProcess[bytes], node: WinNode, name: str) -> None:
    command = process.command
    if not command:
        # Win32-OpenSSH would start an interactive cmd.exe; zerodown only runs commands.
        process.stderr.write(b"this endpoint runs commands only (no interactive shell)\r\n")
        process.exit(1)
        return
    if isinstance(command, bytes):  # pragma: no cover - asyncssh gives str
        command = command.decode("utf-8", errors="replace")
    started, t0 = dt.datetime.now(dt.UTC), time.monotonic()
    loop = asyncio.get_running_loop()
    connected = True

    def writer(stream: asyncssh.SSHWriter[bytes]) -> Any:
        def write(data: bytes) -> None:
            def do() -> None:
                nonlocal connected
                if not connected or not data:
                    return
                try:
                    stream.write(data)
                except (OSError, asyncssh.Error, asyncssh.BreakReceived):
                    connected = False

            loop.call_soon_threadsafe(do)

        return write

    stdin = _Stdin()
    feeder = asyncio.create_task(_pump_stdin(process.stdin, stdin))
    session = Session(WinEnv(node), writer(process.stdout), writer(process.stderr), stdin.read_all)
    try:
        status = await asyncio.to_thread(run_cmd_line, session, command)
    except Exception as e:  # a bug in the stand-in must show, not hang the client
        log.exception("%s: command failed in the stand-in", name)
        session.write_err(f"lab Windows stand-in error: {e}\r\n".encode())
        status = 1
    stdin.eof()
    feeder.cancel()
    await asyncio.sleep(0)  # let the scheduled writes run first
    entry: dict[str, Any] = {
        "time": started.isoformat(timespec="milliseconds"),
        "node": node.name,
        "shell": "cmd",
        "command": command,
        "exit_status": status,
        "duration_s": round(time.monotonic() - t0, 3),
    }
    if session.scripts:
        entry["powershell"] = session.scripts
    _append_log(node.node_dir / "ssh.log", entry)
    with contextlib.suppress(OSError, asyncssh.Error):
        with contextlib.suppress(OSError, asyncssh.Error, asyncssh.BreakReceived):
            await process.stdout.drain()
        _exit(process, status & 0xFFFFFFFF)


def _exit(process: asyncssh.SSHServerProcess[bytes], status: int) -> None:
    """Send the whole exit code: Win32-OpenSSH reports a Windows process's 32-bit exit code
    (cmd's 9009) as the SSH exit-status (RFC 4254 6.10: a uint32); asyncssh's exit() would
    keep only its low byte. (asyncssh CLIENTS mask what they receive to a byte as well.)"""
    chan: Any = process.channel
    if status <= 0xFF or not hasattr(chan, "_send_request"):
        process.exit(status)
        return
    if chan._send_state not in {"close_pending", "closed"}:
        chan._send_request(b"exit-status", UInt32(status))
        chan.close()


def prepare_endpoint(cfg: LabConfig, endpoint: str) -> WinNode:
    node = node_for(cfg, endpoint)
    prepare(node)
    return node
