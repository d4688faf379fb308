"""The lab's HAProxy behind the stand-in, through its runtime API (the admin UNIX socket
lab/haproxy.py creates): one command per connection, the answer read until HAProxy closes.

A pool member's admin state (ready / drain / maint) comes from `show servers state`
(srv_admin_state bits), its health and counters from `show stat` (HAProxy's management
guide, "show servers state" and "show stat"; bit values from haproxy
include/haproxy/server-t.h, as lab/haproxy.py and the project's adapter read them).
"""

from __future__ import annotations

import asyncio
import csv
import io
from dataclasses import dataclass
from typing import Literal

Admin = Literal["ready", "drain", "maint"]

# srv_admin_state: FMAINT 0x01, IMAINT 0x02, RMAINT 0x20 keep a server in maintenance
# (CMAINT 0x04 only remembers a `disabled` in the configuration); FDRAIN 0x08, IDRAIN 0x10.
_MAINT_BITS = 0x01 | 0x02 | 0x20
_DRAIN_BITS = 0x08 | 0x10
# srv_op_state: 0 stopped, 1 starting, 2 running, 3 stopping.
_OP_STOPPED = 0
TIMEOUT_S = 5.0


class RuntimeError_(Exception):
    """HAProxy's runtime API is unreachable or refused a command."""


@dataclass(frozen=True)
class ServerView:
    """One server of a backend as the stand-in reports it."""

    admin: Admin
    running: bool  # srv_op_state is not stopped (UP, starting, NOLB)
    check_status: str  # last check: L7OK, L4CON, INI, ... ('' before any)
    scur: int
    smax: int
    stot: int
    bin: int
    bout: int
    req_tot: int


async def command(socket_path: str, cmd: str, timeout_s: float = TIMEOUT_S) -> str:
    async def run() -> str:
        reader, writer = await asyncio.open_unix_connection(socket_path)
        try:
            writer.write(cmd.encode() + b"\n")
            await writer.drain()
            return (await reader.read()).decode("utf-8", "replace")
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(run(), timeout_s)
    except (OSError, TimeoutError) as e:
        raise RuntimeError_(f"HAProxy runtime API {socket_path}: {cmd!r}: {e or type(e).__name__}") from e


async def set_admin(socket_path: str, backend: str, server: str, admin: Admin) -> None:
    cmd = f"set server {backend}/{server} state {admin}"
    answer = (await command(socket_path, cmd)).strip()
    if answer:  # `set server` answers nothing on success
        raise RuntimeError_(f"HAProxy runtime API: {cmd!r} answered {answer!r}")


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _server_states(text: str) -> dict[str, tuple[Admin, bool]]:
    """server -> (admin state, running) from `show servers state <backend>` (a version line,
    a `# field ...` header, one space-separated row per server)."""
    header: list[str] = []
    out: dict[str, tuple[Admin, bool]] = {}
    for line in text.splitlines():
        if line.startswith("# "):
            header = line[2:].split()
        elif header and line.strip():
            row = dict(zip(header, line.split(), strict=False))
            bits = _int(row.get("srv_admin_state"))
            admin: Admin = "maint" if bits & _MAINT_BITS else "drain" if bits & _DRAIN_BITS else "ready"
            out[row.get("srv_name", "")] = (admin, _int(row.get("srv_op_state")) != _OP_STOPPED)
    return out


def _stat_rows(text: str, backend: str) -> dict[str, dict[str, str]]:
    if not text.startswith("# "):
        raise RuntimeError_(f"HAProxy runtime API: unexpected answer to 'show stat': {text[:200]!r}")
    rows = csv.DictReader(io.StringIO(text[2:]))
    return {r["svname"]: r for r in rows if r.get("pxname") == backend}


async def servers(socket_path: str, backend: str) -> dict[str, ServerView]:
    """Every server of `backend` (empty when HAProxy has no such backend)."""
    stat_text = await command(socket_path, "show stat")
    state_text = await command(socket_path, f"show servers state {backend}")
    stats = _stat_rows(stat_text, backend)
    states = _server_states(state_text)
    out: dict[str, ServerView] = {}
    for name, row in stats.items():
        if name in ("FRONTEND", "BACKEND") or name not in states:
            continue
        admin, running = states[name]
        out[name] = ServerView(
            admin=admin,
            running=running,
            check_status=(row.get("check_status") or "").strip(),
            scur=_int(row.get("scur")),
            smax=_int(row.get("smax")),
            stot=_int(row.get("stot")),
            bin=_int(row.get("bin")),
            bout=_int(row.get("bout")),
            req_tot=_int(row.get("req_tot")),
        )
    return out
