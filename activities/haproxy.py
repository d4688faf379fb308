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
lb_set_maintenance) need no reload either; see the section "run-time servers".
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import ipaddress
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import urlsplit

from temporalio import activity

from activities.common import (
    DRAIN_TIMEOUT,
    INVALID_REQUEST,
    LB_MEMBER_BUSY,
    LB_MEMBER_CONFLICT,
    LB_MEMBER_NOT_FOUND,
    LB_RUNTIME_API_ERROR,
    LB_UNSUPPORTED,
    NOT_UP_TIMEOUT,
    fail,
    heartbeat,
    previous_heartbeat,
)
from workflows.inventory import LoadBalancer, MaintenanceSwitch

POLL_S = 0.25
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
        fail(LB_RUNTIME_API_ERROR, f"HAProxy runtime API {api}: {command!r} failed: {reason}",
             retryable=True, cause=e)
    return data.decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- parsers


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
        out.append(ServerStat(pxname=r.get("pxname") or "", svname=r.get("svname") or "",
                              status=status, scur=_int(r.get("scur")), weight=_int(r.get("weight")),
                              check_status=(r.get("check_status") or "").strip(),
                              admin=_admin_from_status(status)))
    return out


# srv_admin_state bits (haproxy include/haproxy/server-t.h)
_ADMF_FMAINT, _ADMF_IMAINT, _ADMF_CMAINT = 0x01, 0x02, 0x04
_ADMF_FDRAIN, _ADMF_IDRAIN = 0x08, 0x10
_ADMF_RMAINT, _ADMF_HMAINT = 0x20, 0x40
_MAINT_BITS = _ADMF_FMAINT | _ADMF_IMAINT | _ADMF_CMAINT | _ADMF_RMAINT | _ADMF_HMAINT
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
        out.append(ServerState(be_name=row.get("be_name", ""), srv_name=row.get("srv_name", ""),
                               srv_addr=row.get("srv_addr", ""),
                               op_state=_OP_STATES.get(_int(row.get("srv_op_state")), "unknown"),
                               admin_bits=bits, admin=admin, weight=_int(row.get("srv_uweight")),
                               srv_port=_int(row.get("srv_port")),
                               check_state=_int(row.get("srv_check_state"))))
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
    if lb.kind == "f5":
        fail(LB_UNSUPPORTED, f"load balancer {lb.name}: kind f5 is not supported yet "
                             "(only haproxy); drain the member by hand or use an haproxy site")
    if lb.kind != "haproxy":
        fail(LB_UNSUPPORTED, f"load balancer {lb.name}: unknown kind {lb.kind!r}")
    if not lb.runtime_api or not lb.backend:
        fail(INVALID_REQUEST, f"load balancer {lb.name}: runtime_api and backend are required")
    server = lb.members.get(node_name)
    if server is None:
        fail(LB_MEMBER_NOT_FOUND, f"load balancer {lb.name}: node {node_name!r} is not a member "
                                  f"(members: {', '.join(sorted(lb.members)) or 'none'})")
    return lb.runtime_api, lb.backend, server


async def member_state(lb: LoadBalancer, node_name: str, timeout_s: float = CMD_TIMEOUT_S,
                       between: Callable[[ServerStat], None] | None = None) -> MemberState:
    """The member's status and sessions (`show stat`) and admin state (`show servers state`).

    `timeout_s` bounds each of the two runtime API calls; `between` is called with the
    `show stat` row between them (the wait loops heartbeat there).
    """
    api, backend, server = _member(lb, node_name)
    stat_text = await runtime_command(api, "show stat", timeout_s)
    try:
        stats = parse_show_stat(stat_text)
    except ValueError:
        fail(LB_RUNTIME_API_ERROR, f"HAProxy {api}: unexpected answer to 'show stat': "
                                   f"{stat_text.strip()[:300]!r}")
    if not any(s.pxname == backend for s in stats):
        fail(LB_MEMBER_NOT_FOUND, f"load balancer {lb.name} ({api}): no such backend {backend!r}")
    stat = next((s for s in stats if s.pxname == backend and s.svname == server), None)
    if stat is None:
        fail(LB_MEMBER_NOT_FOUND,
             f"load balancer {lb.name} ({api}): no such server {backend}/{server} (node {node_name})")
    admin = stat.admin
    if between is not None:
        between(stat)
    states_text = await runtime_command(api, f"show servers state {backend}", timeout_s)
    for st in parse_servers_state(states_text):
        if st.be_name == backend and st.srv_name == server:
            admin = st.admin
    return MemberState(lb_name=lb.name, node_name=node_name, backend=backend, server=server,
                       status=stat.status, scur=stat.scur, admin=admin, weight=stat.weight,
                       check_status=stat.check_status)


async def set_member_state(lb: LoadBalancer, node_name: str, state: str) -> MemberState:
    """`set server <backend>/<server> state <state>` - a set, so re-running it is harmless."""
    if state not in STATES:
        fail(INVALID_REQUEST, f"member state {state!r}: expected one of {', '.join(STATES)}")
    api, backend, server = _member(lb, node_name)
    answer = (await runtime_command(api, f"set server {backend}/{server} state {state}")).strip()
    if answer:
        if "no such" in answer.lower():
            fail(LB_MEMBER_NOT_FOUND,
                 f"load balancer {lb.name} ({api}): set {backend}/{server} state {state}: {answer}")
        fail(LB_RUNTIME_API_ERROR,
             f"load balancer {lb.name} ({api}): set {backend}/{server} state {state}: {answer}")
    return await member_state(lb, node_name)


def _carried_waited() -> float:
    """Seconds already waited by previous attempts (from their last heartbeat)."""
    prev = previous_heartbeat()
    if isinstance(prev, dict):
        try:
            return float(prev.get("waited_s", 0.0))
        except (TypeError, ValueError):
            return 0.0
    return 0.0


async def _poll_member(lb: LoadBalancer, node_name: str, limit: float,
                       done: Callable[[MemberState], bool],
                       details: Callable[[ServerStat | MemberState], dict[str, Any]],
                       timed_out: Callable[[MemberState], NoReturn]) -> tuple[MemberState, float]:
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
    limit = timeout_s if timeout_s is not None else lb.drain_timeout_s

    def timed_out(st: MemberState) -> NoReturn:
        fail(DRAIN_TIMEOUT,
             f"load balancer {lb.name}: {st.backend}/{st.server} (node {node_name}) still has "
             f"{st.scur} open session(s) after {limit:g}s of draining (admin {st.admin})")

    _, waited = await _poll_member(lb, node_name, limit, lambda st: st.scur == 0,
                                   lambda st: {"scur": st.scur, "admin": st.admin}, timed_out)
    return int(waited)


async def wait_up(lb: LoadBalancer, node_name: str, timeout_s: float | None) -> MemberState:
    limit = timeout_s if timeout_s is not None else 60.0

    def timed_out(st: MemberState) -> NoReturn:
        fail(NOT_UP_TIMEOUT,
             f"load balancer {lb.name}: {st.backend}/{st.server} (node {node_name}) not UP after "
             f"{limit:g}s: status {st.status!r}, admin {st.admin}, check {st.check_status!r}")

    st, _ = await _poll_member(lb, node_name, limit, lambda st: st.is_up,
                               lambda st: {"status": st.status, "admin": st.admin}, timed_out)
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
    state: str  # ready | drain | maint


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
    """Preflight: the runtime API answers, the backend and the server exist."""
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
        fail(LB_UNSUPPORTED, f"load balancer {lb.name}: servers are attached at run time only on "
                             f"kind haproxy, not {lb.kind!r}")
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
        fail(INVALID_REQUEST, f"server address {address!r}: expected <IP address>:<port> (HAProxy "
                              "does not resolve host names of servers added at run time)")
    return host, port_n


def _same_address(state: ServerState, host: str, port: int) -> bool:
    try:
        return (ipaddress.ip_address(state.srv_addr) == ipaddress.ip_address(host)
                and state.srv_port == port)
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
        kind = LB_MEMBER_NOT_FOUND if "no such" in answer.lower() else LB_RUNTIME_API_ERROR
        fail(kind, f"load balancer {lb.name} ({api}): {command!r}: {answer}")
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
        fail(LB_MEMBER_CONFLICT, f"load balancer {lb.name} ({api}): {backend}/{server} already exists "
                                 f"at {existing.srv_addr}:{existing.srv_port}, not {address}; "
                                 "detach it first (or pick another server name)")
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


async def del_server(lb: LoadBalancer, node_name: str, force: bool = False,
                     retry_s: float = DEL_RETRY_S) -> None:
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
        fail(LB_MEMBER_BUSY, f"load balancer {lb.name} ({api}): {backend}/{server} (node {node_name}) "
                             f"still has {st.scur} open session(s); drain it first (wait for zero "
                             "sessions) or detach it with force, which cuts them")
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
            fail(LB_RUNTIME_API_ERROR, f"load balancer {lb.name} ({api}): 'del server {name}' "
                                       f"(in maintenance now): {answer}", retryable=True)
        heartbeat({"waited_s": round(waited, 1), "answer": answer})
        await asyncio.sleep(POLL_S)


def _switch(lb: LoadBalancer) -> tuple[str, MaintenanceSwitch]:
    api, _ = _backend_of(lb)
    if lb.maintenance is None or not lb.maintenance.map or not lb.maintenance.key:
        fail(INVALID_REQUEST, f"load balancer {lb.name}: no maintenance page declared (maintenance: "
                              "{map, key}: the map entry its frontend's rule reads)")
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
        fail(LB_RUNTIME_API_ERROR, f"load balancer {lb.name} ({api}): no map {sw.map!r} in the running "
                                   f"HAProxy ({text.strip()}); its frontend's maintenance rule must use it")
    return _map_value(text, sw.key) == "on"


async def set_maintenance(lb: LoadBalancer, on: bool) -> bool:
    """Set the maintenance page on or off (`set map`; `add map` when the entry is missing);
    a set, so re-running it is harmless. Returns the state read back."""
    api, sw = _switch(lb)
    value = "on" if on else "off"
    answer = (await runtime_command(api, f"set map {sw.map} {sw.key} {value}")).strip()
    if answer and "entry not found" in answer.lower():
        answer = (await runtime_command(api, f"add map {sw.map} {sw.key} {value}")).strip()
    if answer:
        fail(LB_RUNTIME_API_ERROR, f"load balancer {lb.name} ({api}): set map {sw.map} {sw.key} "
                                   f"{value}: {answer}")
    state = await maintenance_state(lb)
    if state != on:
        fail(LB_RUNTIME_API_ERROR, f"load balancer {lb.name} ({api}): the maintenance entry reads "
                                   f"{'on' if state else 'off'} after setting it {value}", retryable=True)
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


@dataclass(frozen=True)
class LbRequest:
    lb: LoadBalancer


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


@activity.defn
async def lb_maintenance_state(req: LbRequest) -> bool:
    return await maintenance_state(req.lb)


@activity.defn
async def lb_list_servers(req: LbRequest) -> tuple[ServerStat, ...]:
    """The backend's servers, e.g. to see whether anything is still attached."""
    return await list_servers(req.lb)
