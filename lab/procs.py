"""Small process helpers shared by everything in `lab/`.

Every lab process is a detached background process (own session, so a Ctrl-C in the
terminal that started the lab does not kill it) identified by a pid file. Stopping is by
pid file only - never by process name - so two labs (or a test lab next to a developer's
lab) on one machine never touch each other's processes.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "ProcessStartError",
    "log_tail",
    "pid_alive",
    "pid_running",
    "port_open",
    "read_pid",
    "start_background",
    "stop_pidfile",
    "wait_port",
    "wait_port_async",
]


class ProcessStartError(RuntimeError):
    """A lab process did not start (or did not come up in time); the message names the log."""


def log_tail(logfile: Path | str, lines: int = 20) -> str:
    """The last `lines` lines of a log file ('' when it does not exist), for error messages."""
    try:
        with open(logfile, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def read_pid(pidfile: Path | str) -> int | None:
    """The pid stored in `pidfile`, or None when the file is missing or not a pid."""
    try:
        text = Path(pidfile).read_text().strip()
    except OSError:
        return None
    # HAProxy may write several pids (one per line) in master-worker mode; the first is ours.
    first = text.split()[0] if text else ""
    return int(first) if first.isdigit() and int(first) > 0 else None


# Children started by this process, kept so their Popen objects are not garbage collected
# while the child runs (that warns "subprocess N is still running") and so they get reaped.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@atexit.register
def _detach_children() -> None:
    # Lab processes are meant to outlive the process that started them (`zerodown lab up`
    # returns, the lab keeps running). Mark the ones still running as handed off, so
    # subprocess does not warn "still running" about them at interpreter exit.
    for proc in list(_CHILDREN.values()):
        if proc.poll() is None:
            proc.returncode = 0
    _CHILDREN.clear()


def _reap(pid: int) -> None:
    """Collect the exit status if `pid` is our child, so it does not linger as a zombie
    (a zombie still answers kill(pid, 0) and would look alive)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is not None:
            _CHILDREN.pop(pid, None)  # pop: another thread may have reaped it meanwhile
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def pid_running(pid: int) -> bool:
    """True when process `pid` exists and is not a zombie."""
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    # A zombie that is not our child (its parent has not reaped it yet) is dead for us.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        state = stat.rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def _ours(pid: int, expect: str | None) -> bool:
    """A pid file can go stale (crash, reboot) and its pid be reused by an unrelated process;
    with `expect`, the process only counts when its command line contains that text."""
    return pid_running(pid) and (expect is None or expect in _cmdline(pid))


def pid_alive(pidfile: Path | str, expect: str | None = None) -> bool:
    """True when `pidfile` names a running (non-zombie) process - whose command line
    contains `expect`, when given."""
    pid = read_pid(pidfile)
    return pid is not None and _ours(pid, expect)


def start_background(
    cmd: Sequence[str | os.PathLike[str]],
    pidfile: Path | str,
    logfile: Path | str,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    """Start `cmd` detached (new session, stdin from /dev/null, stdout+stderr appended to
    `logfile`), write its pid to `pidfile` and return the pid.

    The caller decides idempotency (check `pid_alive` first); this always starts.
    """
    pidfile, logfile = Path(pidfile), Path(logfile)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "ab") as log:
        try:
            proc = subprocess.Popen(
                [os.fspath(c) for c in cmd],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=dict(env) if env is not None else None,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as e:
            raise ProcessStartError(f"cannot start {os.fspath(cmd[0])!s}: {e}") from e
    _CHILDREN[proc.pid] = proc
    # Write atomically so a concurrent reader never sees an empty pid file.
    tmp = pidfile.with_name(pidfile.name + ".tmp")
    tmp.write_text(f"{proc.pid}\n")
    tmp.replace(pidfile)
    return proc.pid


def stop_pidfile(pidfile: Path | str, timeout: float = 10.0, expect: str | None = None) -> bool:
    """Stop the process named by `pidfile`: SIGTERM, wait up to `timeout`, then SIGKILL.

    Removes the pid file. Safe to call when nothing runs (returns False then); returns
    True when a running process was stopped. With `expect`, a process whose command line
    does not contain it is left alone (stale pid file, pid reused).
    """
    pidfile = Path(pidfile)
    pid = read_pid(pidfile)
    if pid is None or not _ours(pid, expect):
        pidfile.unlink(missing_ok=True)
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_running(pid):
            break
        time.sleep(0.05)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        # SIGKILL cannot be refused; a short wait covers the kernel tearing it down.
        kill_deadline = time.monotonic() + 5
        while pid_running(pid) and time.monotonic() < kill_deadline:
            time.sleep(0.05)
    pidfile.unlink(missing_ok=True)
    return True


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _not_up_error(
    what: str, host: str, port: int, timeout: float, logfile: Path | str | None, died: bool
) -> ProcessStartError:
    reason = "exited" if died else f"did not listen on {host}:{port} within {timeout:.0f}s"
    msg = f"{what} {reason}"
    if logfile is not None:
        tail = log_tail(logfile)
        msg += f"; log: {logfile}" + (f"\n--- last lines ---\n{tail}" if tail else " (empty)")
    return ProcessStartError(msg)


def wait_port(
    host: str,
    port: int,
    timeout: float = 30.0,
    *,
    pidfile: Path | str | None = None,
    logfile: Path | str | None = None,
    what: str | None = None,
) -> None:
    """Block until host:port accepts connections.

    With `pidfile`, fail fast when the process dies while we wait; the error names `what`
    and includes the tail of `logfile`.
    """
    label = what or f"process for port {port}"
    deadline = time.monotonic() + timeout
    while True:
        if port_open(host, port):
            return
        if pidfile is not None and not pid_alive(pidfile):
            # One last look: the process may have daemonised and rewritten its pid file.
            if port_open(host, port):
                return
            raise _not_up_error(label, host, port, timeout, logfile, died=True)
        if time.monotonic() >= deadline:
            raise _not_up_error(label, host, port, timeout, logfile, died=False)
        time.sleep(0.1)


async def wait_port_async(
    host: str,
    port: int,
    timeout: float = 30.0,
    *,
    pidfile: Path | str | None = None,
    logfile: Path | str | None = None,
    what: str | None = None,
) -> None:
    """`wait_port` for async callers (does not block the event loop)."""
    label = what or f"process for port {port}"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 0.5)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        except (TimeoutError, OSError):
            pass
        if pidfile is not None and not pid_alive(pidfile):
            raise _not_up_error(label, host, port, timeout, logfile, died=True)
        if loop.time() >= deadline:
            raise _not_up_error(label, host, port, timeout, logfile, died=False)
        await asyncio.sleep(0.1)
