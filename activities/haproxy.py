"""HAProxy through its runtime API (stats socket): member state, drain, maint, ready.

The runtime API takes one command per connection (non-interactive mode): send the
command and a newline, read the answer until HAProxy closes the connection. `set server`
answers nothing on success, an error text otherwise.

A member is (LoadBalancer, node name); the server name comes from `lb.members`. The
admin state (ready / drain / maint) is read from `show servers state` (srv_admin_state
bits), the operational status and current sessions from `show stat`: the stat `status`
column alone hides a drain while the server is DOWN.

Servers attached and detached at run time (`add server` / `del server`: lb_add_server,
lb_del_server) and the maintenance page switched through a map entry (`set map`:
lb_set_maintenance) need no reload either; see the section "run-time servers". The
servers behind the page are tested through it with a one-time preview key (`add map`,
`del map`: lb_preview_check, section "preview past the page").
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import ipaddress
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, cast
from urllib.parse import urlsplit

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.common import fail, heartbeat, previous_heartbeat
from activities.http_checks import fetch_full
from errors import (
    DRAIN_TIMEOUT,
    INVALID_REQUEST,
    LB_MEMBER_BUSY,
    LB_MEMBER_CONFLICT,
    LB_MEMBER_NOT_FOUND,
    LB_PREVIEW_CHECK_FAILED,
    LB_RUNTIME_API_ERROR,
    LB_UNSUPPORTED,
    NOT_UP_TIMEOUT,
)
from inventory.model import HttpCheck, LoadBalancer, MaintenanceSwitch

# Between two looks at a member waiting for UP or zero sessions: a `show stat` is cheap, and
# inside a maintenance window every poll interval is downtime.
POLL_S = 0.05
STATES = ("ready", "drain", "maint")
# Per-command timeout of the runtime API client outside waits.
CMD_TIMEOUT_S = 10.0
# Inside the wait loops: each poll makes two calls and heartbeats after each, so one hung
# call must end well within the workflows' 10 s heartbeat timeout.
WAIT_CMD_TIMEOUT_S = 4.0


# --------------------------------------------------------------------------- client


async def runtime_command(api: str, command: str, timeout_s: float = CMD_TIMEOUT_S) -> str:
    """Send one command to `unix:/path` or `tcp:host:port`; return the full answer."""
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    try:
        async with asyncio.timeout(timeout_s):
            if api.startswith("unix:"):
                reader, writer = await asyncio.open_unix_connection(api[5:])
            elif api.startswith("tcp:"):
                host, _, port = api[4:].rpartition(":")
                reader, writer = await asyncio.open_connection(host, int(port))
            else:
                fail(INVALID_REQUEST, f"runtime API address {api!r}: expected unix:/path or tcp:host:port")
            try:
                writer.write(command.encode() + b"\n")
                await writer.drain()
                data = await reader.read()
            finally:
                writer.close()
    except (OSError, TimeoutError) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        fail(
            LB_RUNTIME_API_ERROR,
            f"HAProxy runtime API {api}: {command!r} failed: {reason}",
            retryable=True,
            cause=e,
        )
    return data.decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- parsers


# A member's administrative state, as HAProxy's runtime API names it.
LbState = Literal["ready", "drain", "maint"]


@dataclass(frozen=True)
class ServerStat:
    pxname: str
    svname: str
    # UP, DOWN, MAINT, DRAIN, "UP 1/2", "DOWN 1/2", NOLB, "no check", "MAINT (via x/y)"...
    status: str
    scur: int
    weight: int
    check_status: str
    # Derived from status: "maint" | "drain" | "ready" (see ServerState for the exact one).
    admin: str


def _admin_from_status(status: str) -> str:
    if status.startswith("MAINT"):
        return "maint"
    if status.startswith("DRAIN"):
        return "drain"
    return "ready"


def _int(v: str | None) -> int:
    try:
        return int(v) if v else 0
    except ValueError:
        return 0


def parse_show_stat(csv_text: str) -> list[ServerStat]:
    """Rows of `show stat` (CSV with a `# pxname,svname,...` header). Includes FRONTEND and
    BACKEND pseudo rows; filter on svname for servers."""
    lines = csv_text.splitlines()
    if not lines or not lines[0].startswith("# "):
        raise ValueError(f"not a show stat answer: {csv_text[:200]!r}")
    lines[0] = lines[0][2:]
    rows = csv.DictReader(io.StringIO("\n".join(ln for ln in lines if ln.strip())))
    out = []
    for r in rows:
        status = (r.get("status") or "").strip()
        out.append(
            ServerStat(
                pxname=r.get("pxname") or "",
                svname=r.get("svname") or "",
                status=status,
                scur=_int(r.get("scur")),
                weight=_int(r.get("weight")),
                check_status=(r.get("check_status") or "").strip(),
                admin=_admin_from_status(status),
            )
        )
    return out


# srv_admin_state bits (haproxy include/haproxy/server-t.h)
_ADMF_FMAINT, _ADMF_IMAINT, _ADMF_CMAINT = 0x01, 0x02, 0x04
_ADMF_FDRAIN, _ADMF_IDRAIN = 0x08, 0x10
_ADMF_RMAINT, _ADMF_HMAINT = 0x20, 0x40
# SRV_ADMF_MAINT (0x23): what keeps a server in maintenance. CMAINT only remembers that the
# configuration said `disabled` (cleared by FMAINT's `set server ... state ready`, the flag
# stays), HMAINT that the FQDN was set from the CLI: neither is maintenance by itself.
_MAINT_BITS = _ADMF_FMAINT | _ADMF_IMAINT | _ADMF_RMAINT
_DRAIN_BITS = _ADMF_FDRAIN | _ADMF_IDRAIN
_OP_STATES = {0: "stopped", 1: "starting", 2: "running", 3: "stopping"}
# srv_check_state bits (haproxy include/haproxy/check-t.h)
_CHK_ST_ENABLED = 0x04


@dataclass(frozen=True)
class ServerState:
    be_name: str
    srv_name: str
    srv_addr: str
    op_state: str  # stopped | starting | running | stopping
    admin_bits: int
    admin: str  # maint | drain | ready
    weight: int
    srv_port: int = 0
    check_state: int = 0  # srv_check_state bits (CHK_ST_*)

    @property
    def check_enabled(self) -> bool:
        return bool(self.check_state & _CHK_ST_ENABLED)


def parse_servers_state(text: str) -> list[ServerState]:
    """`show servers state [backend]`: a version line, a `# field ...` header, one row per
    server (space separated)."""
    header: list[str] | None = None
    out = []
    for line in text.splitlines():
        if line.startswith("# "):
            header = line[2:].split()
            continue
        if header is None or not line.strip():
            continue
        row = dict(zip(header, line.split(), strict=False))
        bits = _int(row.get("srv_admin_state"))
        admin = "maint" if bits & _MAINT_BITS else "drain" if bits & _DRAIN_BITS else "ready"
        out.append(
            ServerState(
                be_name=row.get("be_name", ""),
                srv_name=row.get("srv_name", ""),
                srv_addr=row.get("srv_addr", ""),
                op_state=_OP_STATES.get(_int(row.get("srv_op_state")), "unknown"),
                admin_bits=bits,
                admin=admin,
                weight=_int(row.get("srv_uweight")),
                srv_port=_int(row.get("srv_port")),
                check_state=_int(row.get("srv_check_state")),
            )
        )
    return out


# --------------------------------------------------------------------------- member logic


@dataclass(frozen=True)
class MemberState:
    lb_name: str
    node_name: str
    backend: str
    server: str
    status: str  # show stat status: UP, DOWN, MAINT, DRAIN, "UP 1/2", "no check", ...
    scur: int  # current sessions on the server
    admin: str  # ready | drain | maint (from srv_admin_state)
    weight: int
    check_status: str

    @property
    def is_up(self) -> bool:
        """Taking traffic: operationally UP (or unchecked) and administratively ready."""
        return self.admin == "ready" and (self.status.startswith("UP") or self.status == "no check")


def _member(lb: LoadBalancer, node_name: str) -> tuple[str, str, str]:
    """(runtime_api, backend, server) for a haproxy member; typed errors otherwise."""
    if lb.kind == "f5":  # what reaches here is HAProxy's alone (runtime servers, maps)
        fail(LB_UNSUPPORTED, f"load balancer {lb.name}: kind f5: this step needs HAProxy's runtime API")
    if lb.kind != "haproxy":
        fail(LB_UNSUPPORTED, f"load balancer {lb.name}: unknown kind {lb.kind!r}")
    if not lb.runtime_api or not lb.backend:
        fail(INVALID_REQUEST, f"load balancer {lb.name}: runtime_api and backend are required")
    server = lb.members.get(node_name)
    if server is None:
        fail(
            LB_MEMBER_NOT_FOUND,
            f"load balancer {lb.name}: node {node_name!r} is not a member "
            f"(members: {', '.join(sorted(lb.members)) or 'none'})",
        )
    return lb.runtime_api, lb.backend, server


async def member_state(
    lb: LoadBalancer,
    node_name: str,
    timeout_s: float = CMD_TIMEOUT_S,
    between: Callable[[ServerStat], None] | None = None,
) -> MemberState:
    """The member's status and sessions (`show stat`) and admin state (`show servers state`).

    `timeout_s` bounds each of the two runtime API calls; `between` is called with the
    `show stat` row between them (the wait loops heartbeat there).
    """
    if lb.kind == "f5":  # iControl REST (activities/f5.py; imported here: it builds on this module)
        from activities import f5

        return await f5.member_state(lb, node_name)
    api, backend, server = _member(lb, node_name)
    stat_text = await runtime_command(api, "show stat", timeout_s)
    try:
        stats = parse_show_stat(stat_text)
    except ValueError:
        fail(
            LB_RUNTIME_API_ERROR,
            f"HAProxy {api}: unexpected answer to 'show stat': {stat_text.strip()[:300]!r}",
        )
    if not any(s.pxname == backend for s in stats):
        fail(LB_MEMBER_NOT_FOUND, f"load balancer {lb.name} ({api}): no such backend {backend!r}")
    stat = next((s for s in stats if s.pxname == backend and s.svname == server), None)
    if stat is None:
        fail(
            LB_MEMBER_NOT_FOUND,
            f"load balancer {lb.name} ({api}): no such server {backend}/{server} (node {node_name})",
        )
    admin = stat.admin
    if between is not None:
        between(stat)
    states_text = await runtime_command(api, f"show servers state {backend}", timeout_s)
    for st in parse_servers_state(states_text):
        if st.be_name == backend and st.srv_name == server:
            admin = st.admin
    return MemberState(
        lb_name=lb.name,
        node_name=node_name,
        backend=backend,
        server=server,
        status=stat.status,
        scur=stat.scur,
        admin=admin,
        weight=stat.weight,
        check_status=stat.check_status,
    )


async def set_member_state(lb: LoadBalancer, node_name: str, state: LbState) -> MemberState:
    """`set server <backend>/<server> state <state>` - a set, so re-running it is harmless."""
    if state not in STATES:
        fail(INVALID_REQUEST, f"member state {state!r}: expected one of {', '.join(STATES)}")
    if lb.kind == "f5":
        from activities import f5

        return await f5.set_member_state(lb, node_name, state)
    api, backend, server = _member(lb, node_name)
    answer = (await runtime_command(api, f"set server {backend}/{server} state {state}")).strip()
    if answer:
        if "no such" in answer.lower():
            fail(
                LB_MEMBER_NOT_FOUND,
                f"load balancer {lb.name} ({api}): set {backend}/{server} state {state}: {answer}",
            )
        fail(
            LB_RUNTIME_API_ERROR,
            f"load balancer {lb.name} ({api}): set {backend}/{server} state {state}: {answer}",
        )
    # Read back: HAProxy answers nothing also when the state cannot take (a server disabled
    # in its configuration, or in maintenance through a tracked server, stays in maint).
    after = await member_state(lb, node_name)
    if after.admin != state:
        fail(
            LB_RUNTIME_API_ERROR,
            f"load balancer {lb.name} ({api}): {backend}/{server} is {after.admin} "
            f"(status {after.status}) after `set server ... state {state}`",
            retryable=True,
        )
    return after


async def require_admin_level(lb: LoadBalancer, api: str) -> None:
    """The runtime API must take admin commands (`set server`, `add server`, `set map`): an
    operator- or user-level socket would first fail mid-procedure, after the migrations."""
    level = (await runtime_command(api, "show cli level")).strip().lower()
    if level in ("operator", "user"):
        fail(
            LB_RUNTIME_API_ERROR,
            f"load balancer {lb.name}: the runtime API {api} is at level {level}; zerodown "
            "sets server states and map entries, which need level admin (`stats socket ... "
            "level admin`, or `level admin` on the stats socket's bind line)",
        )
    # An HAProxy older than 2.0 knows no `show cli level`: its socket's level shows at the
    # first change, as before.


def _carried_waited() -> float:
    """Seconds already waited by previous attempts (from their last heartbeat)."""
    prev = previous_heartbeat()
    if isinstance(prev, dict):
        try:
            return float(prev.get("waited_s", 0.0))
        except (TypeError, ValueError):
            return 0.0
    return 0.0


async def _poll_member(
    lb: LoadBalancer,
    node_name: str,
    limit: float,
    done: Callable[[MemberState], bool],
    details: Callable[[ServerStat | MemberState], dict[str, Any]],
    timed_out: Callable[[MemberState], NoReturn],
) -> tuple[MemberState, float]:
    """Poll a member until `done`, heartbeating (waited time carried across retries, so a
    retry keeps the first attempt's deadline); `timed_out` raises once `limit` has passed."""
    carried = _carried_waited()
    started = time.monotonic()

    def waited() -> float:
        return carried + time.monotonic() - started

    def beat(stat: ServerStat | MemberState) -> None:
        heartbeat({"waited_s": round(waited(), 2), **details(stat)})

    while True:
        st = await member_state(lb, node_name, WAIT_CMD_TIMEOUT_S, beat)
        if done(st):
            return st, waited()
        if waited() >= limit:
            timed_out(st)
        beat(st)
        await asyncio.sleep(POLL_S)


async def wait_drained(lb: LoadBalancer, node_name: str, timeout_s: float | None) -> int:
    """Poll until the member has no sessions; returns the seconds waited (all attempts)."""
    if lb.kind == "f5":
        from activities import f5

        return await f5.wait_drained(lb, node_name, timeout_s)
    limit = timeout_s if timeout_s is not None else lb.drain_timeout_s

    def timed_out(st: MemberState) -> NoReturn:
        fail(
            DRAIN_TIMEOUT,
            f"load balancer {lb.name}: {st.backend}/{st.server} (node {node_name}) still has "
            f"{st.scur} open session(s) after {limit:g}s of draining (admin {st.admin})",
        )

    _, waited = await _poll_member(
        lb,
        node_name,
        limit,
        lambda st: st.scur == 0,
        lambda st: {"scur": st.scur, "admin": st.admin},
        timed_out,
    )
    return int(waited)


async def wait_up(lb: LoadBalancer, node_name: str, timeout_s: float | None) -> MemberState:
    if lb.kind == "f5":
        from activities import f5

        return await f5.wait_up(lb, node_name, timeout_s)
    limit = timeout_s if timeout_s is not None else 60.0

    def timed_out(st: MemberState) -> NoReturn:
        fail(
            NOT_UP_TIMEOUT,
            f"load balancer {lb.name}: {st.backend}/{st.server} (node {node_name}) not UP after "
            f"{limit:g}s: status {st.status!r}, admin {st.admin}, check {st.check_status!r}",
        )

    st, _ = await _poll_member(
        lb,
        node_name,
        limit,
        lambda st: st.is_up,
        lambda st: {"status": st.status, "admin": st.admin},
        timed_out,
    )
    return st


# --------------------------------------------------------------------------- activities


@dataclass(frozen=True)
class MemberRequest:
    lb: LoadBalancer
    node: str  # node name (key of lb.members)


@dataclass(frozen=True)
class SetStateRequest:
    lb: LoadBalancer
    node: str
    state: LbState


@dataclass(frozen=True)
class WaitRequest:
    lb: LoadBalancer
    node: str
    # None: lb.drain_timeout_s for lb_wait_drained, 60 s for lb_wait_up.
    timeout_s: float | None = None


@activity.defn
async def lb_member_state(req: MemberRequest) -> MemberState:
    return await member_state(req.lb, req.node)


@activity.defn
async def lb_check_member(req: MemberRequest) -> MemberState:
    """Preflight: the runtime API answers at admin level, the backend and the server exist
    (an F5: its iControl REST logs in and the pool member exists)."""
    if req.lb.kind != "f5":
        api, _, _ = _member(req.lb, req.node)
        await require_admin_level(req.lb, api)
    return await member_state(req.lb, req.node)


@activity.defn
async def lb_set_state(req: SetStateRequest) -> MemberState:
    return await set_member_state(req.lb, req.node, req.state)


@activity.defn
async def lb_wait_drained(req: WaitRequest) -> int:
    """Wait until the member's current sessions reach 0 (DrainTimeout otherwise);
    returns the seconds waited. Heartbeats every poll with the current scur."""
    return await wait_drained(req.lb, req.node, req.timeout_s)


@activity.defn
async def lb_wait_up(req: WaitRequest) -> MemberState:
    """Wait until the member is UP and administratively ready (NotUpTimeout otherwise)."""
    return await wait_up(req.lb, req.node, req.timeout_s)


# --------------------------------------------------------------------------- run-time servers
# Seed 003 steps 11 and 14, seed 004 steps 10, 16, 24 and 25: servers attached to and
# detached from a backend through the runtime API (`add server` / `del server`, HAProxy
# 2.4+), never with a reload. A server attached this way lives only in the running
# process: a reload (a new process reading haproxy.cfg) does not know it.

# The answers HAProxy 2.6 gives on success.
_ADDED = "New server registered."
_DELETED = "Server deleted."
# `del server` refuses while the server still holds connections (idle keep-alive ones to the
# server included, which HAProxy closes shortly after the sessions ended).
_STILL_CONNECTED = "still has connections"
DEL_RETRY_S = 15.0
_SERVER_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def server_address(url: str) -> str:
    """`host:port` where HAProxy reaches a node, from the node's url (its scheme's default
    port when it names none; an IPv6 host in brackets). Pure: a workflow may call it."""
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        raise ValueError(f"node url {url!r} names no host")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def server_name(lb: LoadBalancer, node_name: str) -> str:
    """The server's name in the backend: what lb.members maps the node to, else the node's name."""
    return lb.members.get(node_name, node_name)


def _backend_of(lb: LoadBalancer) -> tuple[str, str]:
    """(runtime_api, backend) of an haproxy balancer; typed errors otherwise."""
    if lb.kind != "haproxy":
        fail(
            LB_UNSUPPORTED,
            f"load balancer {lb.name}: servers are attached at run time only on "
            f"kind haproxy, not {lb.kind!r}",
        )
    if not lb.runtime_api or not lb.backend:
        fail(INVALID_REQUEST, f"load balancer {lb.name}: runtime_api and backend are required")
    return lb.runtime_api, lb.backend


def _split_address(address: str) -> tuple[str, int]:
    """(host, port) of `host:port` / `[v6]:port`; InvalidRequest unless the host is an IP
    address: HAProxy resolves no name of a server added at run time (init-addr none)."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
        port_n = int(port)
    except ValueError:
        port_n = 0
    if not sep or not 0 < port_n < 65536 or not host:
        fail(
            INVALID_REQUEST,
            f"server address {address!r}: expected <IP address>:<port> (HAProxy "
            "does not resolve host names of servers added at run time)",
        )
    return host, port_n


def _same_address(state: ServerState, host: str, port: int) -> bool:
    try:
        return ipaddress.ip_address(state.srv_addr) == ipaddress.ip_address(host) and state.srv_port == port
    except ValueError:
        return False


async def _server_states(lb: LoadBalancer, api: str, backend: str) -> list[ServerState]:
    text = await runtime_command(api, f"show servers state {backend}")
    if "can't find backend" in text.lower():
        fail(LB_MEMBER_NOT_FOUND, f"load balancer {lb.name} ({api}): no such backend {backend!r}")
    return [s for s in parse_servers_state(text) if s.be_name == backend]


async def _admin_command(lb: LoadBalancer, api: str, command: str, ok: tuple[str, ...] = ("",)) -> str:
    """A state-changing command; LbRuntimeApiError (LbMemberNotFound for a missing server)
    unless HAProxy answers one of `ok`."""
    answer = (await runtime_command(api, command)).strip()
    if answer not in ok:
        fail(
            LB_MEMBER_NOT_FOUND if "no such" in answer.lower() else LB_RUNTIME_API_ERROR,
            f"load balancer {lb.name} ({api}): {command!r}: {answer}",
        )
    return answer


def _checked(options: str) -> bool:
    return "check" in options.split()


async def add_server(lb: LoadBalancer, node_name: str, address: str) -> MemberState:
    """Attach the node as `<backend>/<server>` at `address` with lb.add_server_options, its
    health checks on and the server administratively ready. Idempotent: a server of that
    name at the same address that is ready already is left as it is (one not yet ready, from
    an interrupted attempt, is made ready); at another address: LbMemberConflict.

    With checks, the server comes out DOWN and takes traffic only once its checks passed
    (`rise` of them: wait with lb_wait_up): HAProxy would otherwise put a dynamic server
    UP, unchecked, as soon as it leaves maintenance. It is drained (not in rotation) while
    its health is forced down, so no request reaches it before a check did."""
    api, backend = _backend_of(lb)
    server = server_name(lb, node_name)
    if not _SERVER_NAME_RE.match(server):
        fail(INVALID_REQUEST, f"server name {server!r}: letters, digits, '_', '.', ':', '-' only")
    host, port = _split_address(address)
    existing = next((s for s in await _server_states(lb, api, backend) if s.srv_name == server), None)
    if existing is not None and not _same_address(existing, host, port):
        fail(
            LB_MEMBER_CONFLICT,
            f"load balancer {lb.name} ({api}): {backend}/{server} already exists "
            f"at {existing.srv_addr}:{existing.srv_port}, not {address}; "
            "detach it first (or pick another server name)",
        )
    name = f"{backend}/{server}"
    if existing is None:
        # A dynamic server starts in maintenance with its checks off.
        await _admin_command(lb, api, f"add server {name} {address} {lb.add_server_options}", ok=(_ADDED,))
    checked = _checked(lb.add_server_options)
    if checked and (existing is None or not existing.check_enabled):
        await _admin_command(lb, api, f"enable health {name}")
    if existing is None or existing.admin != "ready":
        if checked:
            await _admin_command(lb, api, f"set server {name} state drain")
            await _admin_command(lb, api, f"set server {name} health down")
        await _admin_command(lb, api, f"set server {name} state ready")
    member_lb = dataclasses.replace(lb, members={**lb.members, node_name: server})
    return await member_state(member_lb, node_name)


async def del_server(
    lb: LoadBalancer, node_name: str, force: bool = False, retry_s: float = DEL_RETRY_S
) -> None:
    """Detach the node's server: refused (LbMemberBusy, nothing changed) while it has
    sessions, unless `force` (they are cut: `shutdown sessions server`). Maintenance, then
    `del server`. A server that is not there is already detached."""
    api, backend = _backend_of(lb)
    server = server_name(lb, node_name)
    if not any(s.srv_name == server for s in await _server_states(lb, api, backend)):
        return
    member_lb = dataclasses.replace(lb, members={**lb.members, node_name: server})
    st = await member_state(member_lb, node_name)
    if st.scur > 0 and not force:
        fail(
            LB_MEMBER_BUSY,
            f"load balancer {lb.name} ({api}): {backend}/{server} (node {node_name}) "
            f"still has {st.scur} open session(s); drain it first (wait for zero "
            "sessions) or detach it with force, which cuts them",
        )
    name = f"{backend}/{server}"
    await _admin_command(lb, api, f"set server {name} state maint")
    if force:
        await _admin_command(lb, api, f"shutdown sessions server {name}")
    started = time.monotonic()
    while True:
        answer = (await runtime_command(api, f"del server {name}")).strip()
        if answer == _DELETED or "no such server" in answer.lower():
            return
        waited = time.monotonic() - started
        if _STILL_CONNECTED not in answer.lower() or waited >= retry_s:
            # In maintenance no new session arrives; one that slipped in between the check
            # and the maintenance is still running: a retry after the drain deletes it.
            fail(
                LB_RUNTIME_API_ERROR,
                f"load balancer {lb.name} ({api}): 'del server {name}' (in maintenance now): {answer}",
                retryable=True,
            )
        heartbeat({"waited_s": round(waited, 1), "answer": answer})
        await asyncio.sleep(POLL_S)


def _switch(lb: LoadBalancer) -> tuple[str, MaintenanceSwitch]:
    api, _ = _backend_of(lb)
    if lb.maintenance is None or not lb.maintenance.map or not lb.maintenance.key:
        fail(
            INVALID_REQUEST,
            f"load balancer {lb.name}: no maintenance page declared (maintenance: "
            "{map, key}: the map entry its frontend's rule reads)",
        )
    return api, lb.maintenance


def _map_value(text: str, key: str) -> str | None:
    """The value of `key` in a `show map <map>` answer (`<ref> <key> <value>` lines)."""
    for line in text.splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) == 3 and parts[1] == key:
            return parts[2].strip()
    return None


async def maintenance_state(lb: LoadBalancer) -> bool:
    """True while the maintenance page is on (its map entry is `on`); a missing entry is off."""
    api, sw = _switch(lb)
    text = await runtime_command(api, f"show map {sw.map}")
    if text.strip() and not text.lstrip().startswith("0x") and "unknown map" in text.lower():
        fail(
            LB_RUNTIME_API_ERROR,
            f"load balancer {lb.name} ({api}): no map {sw.map!r} in the running "
            f"HAProxy ({text.strip()}); its frontend's maintenance rule must use it",
        )
    return _map_value(text, sw.key) == sw.on_value


async def set_maintenance(lb: LoadBalancer, on: bool) -> bool:
    """Set the maintenance page on or off: the entry gets the inventory's `on_value` or
    `off_value` (`set map`; `add map` when it is missing), or, with an empty `off_value`, is
    deleted (`del map`). A set, so re-running it is harmless. Returns the state read back."""
    api, sw = _switch(lb)
    value = sw.on_value if on else sw.off_value
    if value:
        command = f"set map {sw.map} {sw.key} {value}"
        answer = (await runtime_command(api, command)).strip()
        if answer and "entry not found" in answer.lower():
            command = f"add map {sw.map} {sw.key} {value}"
            answer = (await runtime_command(api, command)).strip()
    else:
        command = f"del map {sw.map} {sw.key}"
        answer = (await runtime_command(api, command)).strip()
        if answer and answer.lower().rstrip(".") in ("key not found", "entry not found"):
            answer = ""  # deleted already (HAProxy 2.6 answers "Key not found.")
    if answer:
        fail(LB_RUNTIME_API_ERROR, f"load balancer {lb.name} ({api}): {command}: {answer}")
    state = await maintenance_state(lb)
    if state != on:
        fail(
            LB_RUNTIME_API_ERROR,
            f"load balancer {lb.name} ({api}): the maintenance page is "
            f"{'on' if state else 'off'} after `{command}`",
            retryable=True,
        )
    return state


async def list_servers(lb: LoadBalancer) -> tuple[ServerStat, ...]:
    """Every server of the balancer's backend (`show stat` rows), attached at run time or not."""
    api, backend = _backend_of(lb)
    text = await runtime_command(api, "show stat")
    try:
        stats = parse_show_stat(text)
    except ValueError:
        fail(LB_RUNTIME_API_ERROR, f"HAProxy {api}: unexpected answer to 'show stat': {text.strip()[:300]!r}")
    if not any(s.pxname == backend for s in stats):
        fail(LB_MEMBER_NOT_FOUND, f"load balancer {lb.name} ({api}): no such backend {backend!r}")
    return tuple(s for s in stats if s.pxname == backend and s.svname not in ("FRONTEND", "BACKEND"))


@dataclass(frozen=True)
class AddServerRequest:
    # lb.members may already map the node to its server name (else the node's name is used).
    lb: LoadBalancer
    node: str
    address: str  # "<IP>:<port>" where HAProxy reaches the node (server_address(node.url))


@dataclass(frozen=True)
class DelServerRequest:
    lb: LoadBalancer
    node: str
    # Cut the server's open sessions instead of refusing while it has some.
    force: bool = False


@dataclass(frozen=True)
class MaintenanceRequest:
    lb: LoadBalancer
    on: bool


@activity.defn
async def lb_add_server(req: AddServerRequest) -> MemberState:
    """Attach a server at run time (`add server`, `enable health`, `enable server`)."""
    return await add_server(req.lb, req.node, req.address)


@activity.defn
async def lb_del_server(req: DelServerRequest) -> None:
    """Detach a server at run time (maint, `del server`); LbMemberBusy while it has sessions
    unless force."""
    await del_server(req.lb, req.node, req.force)


@activity.defn
async def lb_set_maintenance(req: MaintenanceRequest) -> bool:
    """The balancer's maintenance page on / off through its map entry; the state after."""
    return await set_maintenance(req.lb, req.on)


# --------------------------------------------------------------------------- preview past the page
# Seed 004 step 30: the new servers tested *through* the balancer while its maintenance page
# is still up for everyone else. The frontend's page rule lets a request pass whose
# `preview_header` holds a key of the maintenance map with the value `preview`
# (`!{ req.hdr(<header>),map(<map>,none) -m str preview }`); lb_preview_check adds a
# one-time random key, sends its requests with it and deletes the key again. The key is a
# credential for the bypass: it never leaves the activity (not in its result, errors or
# heartbeats) and lives only in the running HAProxy (`add map` writes no file). One preview
# check at a time per map: a check deletes the preview keys it finds as leftovers.

PREVIEW_KEY_PREFIX = "zdpreview-"
PREVIEW_VALUE = "preview"
PREVIEW_REQUESTS_PER_NODE = 4
PREVIEW_MIN_REQUESTS = 4
PREVIEW_MAX_REQUESTS = 1000
# Beyond `requests`, while an expected node has not answered yet: round robin is uneven for a
# while after servers come UP (HAProxy's weighted round robin places a server that just came
# up apart from the others), so 4 answers per node can miss one of them. Per expected node.
PREVIEW_EXTRA_PER_NODE = 20
_HIDDEN_KEY = PREVIEW_KEY_PREFIX + "***"


@dataclass(frozen=True)
class PreviewCheckRequest:
    lb: LoadBalancer  # with maintenance.preview_header and frontend_url
    # The application's version check (application.version): its path and expected status.
    check: HttpCheck
    expect_version: str
    # Exactly these must answer, by the name the application reports (the JSON's "node",
    # else its X-Node header; the lab app reports its inventory node name, clones included).
    expect_nodes: tuple[str, ...]
    # When set: an answer that has "db_schema" must report this one.
    expect_db_schema: int | None = None
    # None: PREVIEW_REQUESTS_PER_NODE per expected node, at least PREVIEW_MIN_REQUESTS; then
    # more (up to PREVIEW_EXTRA_PER_NODE per node) while an expected node has not answered.
    requests: int | None = None
    timeout_s: float = 5.0  # per request


@dataclass(frozen=True)
class PreviewCheckResult:
    url: str  # what was requested: the balancer's frontend_url and the check's path
    requests: int
    nodes: tuple[tuple[str, int], ...]  # (node, answers), sorted by node
    page_on: bool  # the maintenance page was on when the check began


@dataclass(frozen=True)
class VersionAnswer:
    node: str  # "" when the answer names none
    version: str  # "" when there is none
    problem: str  # "" when the answer is the expected one


def judge_version_answer(
    status: int,
    body: str,
    header_node: str,
    expect_status: int,
    expect_version: str,
    expect_db_schema: int | None,
) -> VersionAnswer:
    """One answer of the version check through the balancer, judged: the expected status,
    a JSON object whose "version" is `expect_version` and, when `expect_db_schema` is set and
    the object has "db_schema", that too; the node is its "node", else `header_node`. Pure."""
    if status != expect_status:
        hint = (
            " (503 with the page on: the frontend's page rule may not honour the preview "
            "header, or no server is UP)"
            if status == 503
            else ""
        )
        return VersionAnswer(header_node, "", f"status {status}, expected {expect_status}{hint}")
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return VersionAnswer(header_node, "", f"not a JSON object: {body.strip()[:120]!r}")
    raw_node = data.get("node")
    node = str(raw_node) if raw_node not in (None, "") else header_node
    if data.get("version") is None:
        return VersionAnswer(node, "", 'no "version" in the answer')
    version = str(data["version"])
    if version != expect_version:
        return VersionAnswer(node, version, f"version {version!r}, expected {expect_version!r}")
    if expect_db_schema is not None and "db_schema" in data:
        db = data["db_schema"]
        if isinstance(db, bool) or db != expect_db_schema:
            return VersionAnswer(node, version, f"db_schema {db!r}, expected {expect_db_schema}")
    if not node:
        return VersionAnswer("", version, 'names no node (no "node" in the JSON, no X-Node header)')
    return VersionAnswer(node, version, "")


def _preview_target(lb: LoadBalancer) -> tuple[str, MaintenanceSwitch, str]:
    """(runtime_api, switch, preview header) of a balancer whose page has a preview bypass."""
    api, sw = _switch(lb)
    if not sw.preview_header:
        fail(
            INVALID_REQUEST,
            f"load balancer {lb.name}: its maintenance switch declares no "
            "preview_header (the header whose one-time key passes the page)",
        )
    if not lb.frontend_url:
        fail(
            INVALID_REQUEST,
            f"load balancer {lb.name}: no frontend_url (where the servers behind it are tested)",
        )
    return api, sw, sw.preview_header


async def _keyed_command(lb: LoadBalancer, api: str, command: str, key: str, gone_ok: bool = False) -> None:
    """A map command naming a preview key: it must answer nothing (`gone_ok`: or that the
    key is not there); errors never show the key, and are retryable."""
    try:
        problem = (await runtime_command(api, command)).strip()
    except ApplicationError as e:
        # Its message quotes the command (the key); raised below, outside this handler,
        # so neither the message nor the exception chain carries it.
        problem = e.message
    if gone_ok and "not found" in problem.lower():
        return
    if problem:
        # A retry starts by deleting the preview keys it finds, then tries again.
        shown = command.replace(key, _HIDDEN_KEY)
        fail(
            LB_RUNTIME_API_ERROR,
            f"load balancer {lb.name} ({api}): {shown!r}: {problem.replace(key, _HIDDEN_KEY)}",
            retryable=True,
        )


async def _delete_preview_keys(lb: LoadBalancer, api: str, sw: MaintenanceSwitch) -> int:
    """Delete the preview keys an interrupted earlier check left; returns how many."""
    text = await runtime_command(api, f"show map {sw.map}")
    keys = {
        parts[1]
        for line in text.splitlines()
        if len(parts := line.split()) == 3 and parts[1].startswith(PREVIEW_KEY_PREFIX)
    }
    for key in sorted(keys):
        await _keyed_command(lb, api, f"del map {sw.map} {key}", key, gone_ok=True)
    return len(keys)


async def preview_check(req: PreviewCheckRequest) -> PreviewCheckResult:
    lb = req.lb
    api, sw, header = _preview_target(lb)
    expected = set(req.expect_nodes)
    if not expected:
        fail(INVALID_REQUEST, f"load balancer {lb.name}: preview check without expected nodes")
    count = (
        req.requests
        if req.requests is not None
        else max(PREVIEW_MIN_REQUESTS, PREVIEW_REQUESTS_PER_NODE * len(expected))
    )
    if not len(expected) <= count <= PREVIEW_MAX_REQUESTS:
        fail(
            INVALID_REQUEST,
            f"preview check: {count} requests for {len(expected)} node(s): expected "
            f"{len(expected)}-{PREVIEW_MAX_REQUESTS} (every node must be able to answer)",
        )
    path = req.check.path if req.check.path.startswith("/") else "/" + req.check.path
    url = (lb.frontend_url or "").rstrip("/") + path
    page_on = await maintenance_state(lb)
    left = await _delete_preview_keys(lb, api, sw)
    key = PREVIEW_KEY_PREFIX + secrets.token_hex(16)
    counts: dict[str, int] = {}
    problem: tuple[str, bool] | None = None  # (message, retryable)
    try:
        await _keyed_command(lb, api, f"add map {sw.map} {key} {PREVIEW_VALUE}", key)
        limit = count + PREVIEW_EXTRA_PER_NODE * len(expected)
        n = 0
        while n < count or (n < limit and not expected <= set(counts)):
            n += 1
            r, body = await fetch_full("GET", url, req.timeout_s, headers={header: key})
            where = f"GET {url} with a preview key (answer {n})"
            if r.status == 0:
                # No HTTP answer from the balancer itself: a retry may get one.
                problem = (f"{where}: no HTTP answer ({r.error})", True)
                break
            ans = judge_version_answer(
                r.status, body, r.node, req.check.expect_status, req.expect_version, req.expect_db_schema
            )
            if ans.problem:
                problem = (
                    f"{where}" + (f" from node {ans.node!r}" if ans.node else "") + f": {ans.problem}",
                    False,
                )
                break
            if ans.node not in expected:
                problem = (
                    f"{where}: node {ans.node!r} answered, which is not one of the expected "
                    f"{', '.join(sorted(expected))} (is another server still in "
                    f"{lb.backend or 'the backend'}?)",
                    False,
                )
                break
            counts[ans.node] = counts.get(ans.node, 0) + 1
            heartbeat(
                {
                    "sent": n,
                    "of": count,
                    "nodes": dict(sorted(counts.items())),
                    "left_over_keys_deleted": left,
                }
            )
    finally:
        # Always, also when the check failed or was cancelled: the key must not outlive it.
        # (Gone already: a reload dropped it.)
        await _keyed_command(lb, api, f"del map {sw.map} {key}", key, gone_ok=True)
    if problem is None:
        missing = sorted(expected - set(counts))
        if missing:
            problem = (
                f"GET {url} with a preview key: {', '.join(missing)} never answered in "
                f"{n} requests (answered: "
                f"{', '.join(f'{k} x{v}' for k, v in sorted(counts.items())) or 'none'}); "
                f"{await _backend_line(lb)}",
                False,
            )
    if problem is not None:
        fail(
            LB_PREVIEW_CHECK_FAILED,
            f"load balancer {lb.name}: {problem[0].replace(key, _HIDDEN_KEY)}",
            retryable=problem[1],
        )
    return PreviewCheckResult(url=url, requests=n, nodes=tuple(sorted(counts.items())), page_on=page_on)


async def _backend_line(lb: LoadBalancer) -> str:
    """What the balancer thinks of its servers, for an operator reading a failure."""
    try:
        stats = await list_servers(lb)
    except ApplicationError as e:
        return f"the backend could not be read ({e})"
    rows = ", ".join(
        f"{s.svname} {s.status}" + (f" ({s.check_status})" if s.check_status else "") for s in stats
    )
    return f"backend {lb.backend or '?'}: {rows or 'no server'}"


@activity.defn
async def lb_preview_check(req: PreviewCheckRequest) -> PreviewCheckResult:
    """Seed 004 step 30: the servers behind the balancer tested through its frontend while
    the maintenance page is up, with a one-time preview key (added, used, deleted)."""
    return await preview_check(req)


# --------------------------------------------------------------------------- reloads

# HAProxy keeps server states, servers added at run time and map entries in the running
# process only. A reload (a new process, unless `server-state-file` carries the states over)
# puts a node a run took out back in rotation and lifts the maintenance page. The workflow
# calls lb_guard before each change to a balancer and each wait on one (workflows/balancers.py).


@dataclass(frozen=True)
class LbProcess:
    """Which HAProxy process answers (`show info`): a reload makes a new one."""

    pid: int
    started: int  # Start_time_sec (Unix time)


@dataclass(frozen=True)
class LbRunState:
    """What a run has set on one balancer, to set again after a reload."""

    members: tuple[tuple[str, str], ...] = ()  # (node, ready|drain|maint), last set
    maintenance: bool | None = None  # the maintenance page, when the run switched it
    added: tuple[tuple[str, str], ...] = ()  # (node, address) of servers it attached
    removed: tuple[str, ...] = ()  # nodes whose servers it detached


@dataclass(frozen=True)
class GuardRequest:
    lb: LoadBalancer
    # The process the run saw last (None: the first look).
    expected: LbProcess | None
    state: LbRunState


@dataclass(frozen=True)
class GuardResult:
    process: LbProcess
    reloaded: bool
    # What was set again, in the operator's words ("node3 maint", "maintenance page on").
    reapplied: tuple[str, ...] = ()


def _info_fields(text: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines()) if v}


async def process_of(lb: LoadBalancer) -> LbProcess:
    api, _ = _backend_of(lb)
    fields = _info_fields(await runtime_command(api, "show info"))
    try:
        return LbProcess(pid=int(fields["Pid"]), started=int(fields["Start_time_sec"]))
    except (KeyError, ValueError):
        fail(LB_RUNTIME_API_ERROR, f"load balancer {lb.name} ({api}): no Pid / Start_time_sec in `show info`")


async def guard(req: GuardRequest) -> GuardResult:
    """Compare the process with the one the run saw; after a reload set the run's state again:
    servers it attached (and their states), the states it set, servers it detached, the
    maintenance page. Every part is a set, so a retry repeats it harmlessly."""
    lb, state = req.lb, req.state
    process = await process_of(lb)
    if req.expected is None or process == req.expected:
        return GuardResult(process=process, reloaded=False)
    done: list[str] = []
    added = dict(state.added)
    for node, address in state.added:
        await add_server(lb, node, address)
        done.append(f"{node} attached at {address}")
    for node, wanted in state.members:
        member_lb = dataclasses.replace(lb, members={**lb.members, node: server_name(lb, node)})
        if node in added and wanted == "ready":
            continue  # attached ready above
        await set_member_state(member_lb, node, cast(LbState, wanted))
        done.append(f"{node} {wanted}")
    for node in state.removed:
        await del_server(lb, node, force=True)
        done.append(f"{node} detached")
    if state.maintenance is not None:
        await set_maintenance(lb, state.maintenance)
        done.append(f"maintenance page {'on' if state.maintenance else 'off'}")
    return GuardResult(process=await process_of(lb), reloaded=True, reapplied=tuple(done))


@activity.defn
async def lb_guard(req: GuardRequest) -> GuardResult:
    """Notice a reload of the balancer since the run last looked, and set its state again."""
    return await guard(req)
