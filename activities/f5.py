"""F5 BIG-IP (`kind: f5`): pool members through iControl REST - enable, drain, force
offline, read the state, wait for the connections to end.

Facts from F5's public documentation and sources (F5Networks/f5-common-python's
`f5/bigip/tm/ltm/pool.py` and token auth in `icontrol`; the F5 Ansible collection's
`bigip_pool_member` module; "iControl REST Authentication Token Management", K04472520 /
the iControl REST user guide):

- log in with `POST /mgmt/shared/authn/login` {username, password, loginProviderName:
  "tmos"}; the reply's `token.token` goes in the `X-F5-Auth-Token` header; a token lives
  `token.timeout` seconds (1200 by default), extended with `PATCH
  /mgmt/shared/authz/tokens/<token>` {"timeout": n} and removed with `DELETE` on the same
  path (BIG-IP limits tokens per user, so each session deletes its own at the end);
- a pool member is `/mgmt/tm/ltm/pool/~<Partition>~<pool>/members/~<Partition>~<node>:<port>`;
- enabled: `{"session": "user-enabled", "state": "user-up"}`; disabled (a drain: persistent
  and active connections still reach it, no new ones): `{"session": "user-disabled",
  "state": "user-up"}`;
  forced offline: `{"session": "user-disabled", "state": "user-down"}`; the member reads
  back `session` monitor-enabled or user-enabled (enabled), user-disabled, and `state` up,
  down, user-down, unchecked, checking;
- its connections are `serverside.curConns` in `.../stats` (`entries` -> the member's stats
  URL -> `nestedStats.entries`), sessions `curSessions` (persistence);
- a missing member answers 404; BIG-IP answers 5xx while its configuration daemons restart,
  which is worth a retry.

The member states map onto the haproxy adapter's (`MemberState`): ready / drain / maint,
so the workflows drive either kind through the same `lb_*` activities.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import quote

import aiohttp
from temporalio import activity

from activities.common import fail, heartbeat
from activities.haproxy import MemberState, _carried_waited
from activities.secrets import resolve_secret
from errors import DRAIN_TIMEOUT, INVALID_REQUEST, LB_MEMBER_NOT_FOUND, LB_RUNTIME_API_ERROR, NOT_UP_TIMEOUT
from inventory.model import LoadBalancer

REQUEST_TIMEOUT_S = 15.0
# A token is renewed when less than this remains (a drain may outlast it).
RENEW_MARGIN_S = 60.0
# 5xx replies while BIG-IP's configuration daemons restart: tries and pause.
RETRIES_5XX = 5
RETRY_PAUSE_S = 1.0
POLL_S = 0.5
ENABLED_SESSIONS = ("user-enabled", "monitor-enabled")


def _ref(path: str) -> str:
    """`/Common/pool` -> `~Common~pool` (iControl REST's path form of a full name)."""
    full = path if path.startswith("/") else f"/Common/{path}"
    return quote(full.replace("/", "~"), safe="~:.-_")


def member_path(lb: LoadBalancer, node_name: str) -> str:
    if not lb.pool:
        fail(INVALID_REQUEST, f"load balancer {lb.name}: kind f5 needs `pool`")
    member = lb.members.get(node_name)
    if member is None:
        fail(
            LB_MEMBER_NOT_FOUND,
            f"load balancer {lb.name}: node {node_name!r} is not a member "
            f"(members: {', '.join(sorted(lb.members)) or 'none'})",
        )
    partition = lb.pool.strip("/").split("/")[0] if lb.pool.startswith("/") else "Common"
    full_member = member if member.startswith("/") else f"/{partition}/{member}"
    return f"/mgmt/tm/ltm/pool/{_ref(lb.pool)}/members/{_ref(full_member)}"


class F5Session:
    """One login: the token, renewed before it expires and again on a 401, deleted at the end."""

    def __init__(self, lb: LoadBalancer, http: aiohttp.ClientSession) -> None:
        self.lb = lb
        self.http = http
        self.base = (lb.url or "").rstrip("/")
        self.token = ""
        self.expires = 0.0

    async def login(self) -> None:
        password = (
            resolve_secret(self.lb.credential, needed_by=f"load balancer {self.lb.name}")
            if self.lb.credential
            else ""
        )
        body = {"username": self.lb.user, "password": password, "loginProviderName": "tmos"}
        status, data = await self._send("POST", "/mgmt/shared/authn/login", body, auth=False)
        if status != 200 or not isinstance(data, dict) or not isinstance(data.get("token"), dict):
            fail(
                LB_RUNTIME_API_ERROR,
                f"load balancer {self.lb.name}: login as {self.lb.user} refused ({status}): {_message(data)}",
            )
        token = data["token"]
        self.token = str(token.get("token", ""))
        self.expires = time.monotonic() + float(token.get("timeout", 1200))

    async def renew(self) -> None:
        """Extend the token (PATCH .../tokens/<token>); a new login when that is refused."""
        status, _ = await self._send("PATCH", f"/mgmt/shared/authz/tokens/{self.token}", {"timeout": 3600})
        if status == 200:
            self.expires = time.monotonic() + 3600
        else:
            await self.login()

    async def logout(self) -> None:
        if self.token:
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                await self._send("DELETE", f"/mgmt/shared/authz/tokens/{self.token}", None)
            self.token = ""

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """A /mgmt/tm call: renewed token, a retried 5xx, a 404 as LbMemberNotFound."""
        if not self.token:
            await self.login()
        elif self.expires - time.monotonic() < RENEW_MARGIN_S:
            await self.renew()
        for attempt in range(1, RETRIES_5XX + 1):
            status, data = await self._send(method, path, body)
            if status == 401:  # the token expired or was removed: once more with a new one
                await self.login()
                status, data = await self._send(method, path, body)
            if status < 500 or attempt == RETRIES_5XX:
                break
            await asyncio.sleep(RETRY_PAUSE_S)
        if status == 404:
            fail(LB_MEMBER_NOT_FOUND, f"load balancer {self.lb.name}: {method} {path}: {_message(data)}")
        if status >= 300:
            fail(
                LB_RUNTIME_API_ERROR,
                f"load balancer {self.lb.name}: {method} {path} answered {status}: {_message(data)}",
                retryable=status >= 500,
            )
        return data

    async def _send(
        self, method: str, path: str, body: dict[str, Any] | None, auth: bool = True
    ) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["X-F5-Auth-Token"] = self.token
        try:
            async with self.http.request(method, self.base + path, json=body, headers=headers) as r:
                try:
                    data = await r.json(content_type=None)
                except ValueError:
                    data = await r.text()
                return r.status, data
        except (TimeoutError, aiohttp.ClientError) as e:
            fail(
                LB_RUNTIME_API_ERROR,
                f"load balancer {self.lb.name}: {method} {self.base}{path}: {type(e).__name__}: {e}",
                retryable=True,
                cause=e,
            )


def _message(data: Any) -> str:
    if isinstance(data, dict):
        return str(data.get("message") or data)[:300]
    return str(data)[:300]


def _ssl_context(lb: LoadBalancer) -> ssl.SSLContext:
    """TLS verified: against the inventory's CA bundle, else the system's."""
    return ssl.create_default_context(cafile=lb.ca_bundle) if lb.ca_bundle else ssl.create_default_context()


@contextlib.asynccontextmanager
async def session(lb: LoadBalancer) -> AsyncIterator[F5Session]:
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(ssl=_ssl_context(lb))
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        s = F5Session(lb, http)
        try:
            yield s
        finally:
            await s.logout()


@dataclass(frozen=True)
class F5Member:
    session: str
    state: str
    conns: int
    sessions: int
    name: str

    @property
    def open(self) -> int:
        """What still holds the member: its connections, or its sessions where persistence
        keeps more (BIG-IP counts a connection in both)."""
        return max(self.conns, self.sessions)


async def read_member(s: F5Session, path: str) -> F5Member:
    member = await s.call("GET", path)
    stats = await s.call("GET", path + "/stats")
    entries = _stat_entries(stats)
    return F5Member(
        session=str(member.get("session", "")),
        state=str(member.get("state", "")),
        conns=_value(entries, "serverside.curConns"),
        sessions=_value(entries, "curSessions"),
        name=str(member.get("fullPath") or member.get("name", "")),
    )


def _stat_entries(stats: Any) -> dict[str, Any]:
    """The member's `nestedStats.entries` (the one entry under `entries`)."""
    if isinstance(stats, dict):
        for value in (stats.get("entries") or {}).values():
            nested = value.get("nestedStats", {}) if isinstance(value, dict) else {}
            if isinstance(nested.get("entries"), dict):
                return dict(nested["entries"])
    return {}


def _value(entries: dict[str, Any], key: str) -> int:
    v = entries.get(key)
    try:
        return int(v.get("value", 0)) if isinstance(v, dict) else 0
    except (TypeError, ValueError):
        return 0


def admin_of(m: F5Member) -> str:
    if m.state == "user-down":
        return "maint"
    return "ready" if m.session in ENABLED_SESSIONS else "drain"


def status_of(m: F5Member) -> str:
    return {
        "up": "UP",
        "down": "DOWN",
        "user-down": "MAINT",
        "unchecked": "no check",
        "checking": "DOWN",
    }.get(m.state, m.state.upper())


_BODIES = {
    "ready": {"session": "user-enabled", "state": "user-up"},
    "drain": {"session": "user-disabled", "state": "user-up"},
    "maint": {"session": "user-disabled", "state": "user-down"},
}


def _as_member_state(lb: LoadBalancer, node_name: str, m: F5Member) -> MemberState:
    return MemberState(
        lb_name=lb.name,
        node_name=node_name,
        backend=lb.pool or "",
        server=lb.members.get(node_name, ""),
        status=status_of(m),
        scur=m.open,
        admin=admin_of(m),
        weight=1,
        check_status=m.state,
    )


async def member_state(lb: LoadBalancer, node_name: str) -> MemberState:
    path = member_path(lb, node_name)
    async with session(lb) as s:
        return _as_member_state(lb, node_name, await read_member(s, path))


async def set_member_state(lb: LoadBalancer, node_name: str, state: str) -> MemberState:
    """PATCH the member's session/state (a set: re-running it is harmless), then read back."""
    if state not in _BODIES:
        fail(INVALID_REQUEST, f"member state {state!r}: expected one of {', '.join(_BODIES)}")
    path = member_path(lb, node_name)
    async with session(lb) as s:
        await s.call("PATCH", path, _BODIES[state])
        after = await read_member(s, path)
    if admin_of(after) != state:
        fail(
            LB_RUNTIME_API_ERROR,
            f"load balancer {lb.name}: {after.name} reads session {after.session}, state {after.state} "
            f"after it was set {state}",
            retryable=True,
        )
    return _as_member_state(lb, node_name, after)


async def _poll(
    lb: LoadBalancer,
    node_name: str,
    limit: float,
    done: Callable[[F5Member], bool],
    timed_out: Callable[[F5Member], NoReturn],
) -> tuple[F5Member, float]:
    """One session for the whole wait (its token renewed as it goes), heartbeating."""
    path = member_path(lb, node_name)
    carried, started = _carried_waited(), time.monotonic()
    async with session(lb) as s:
        while True:
            m = await read_member(s, path)
            waited = carried + time.monotonic() - started
            if done(m):
                return m, waited
            if waited >= limit:
                timed_out(m)
            heartbeat(
                {"waited_s": round(waited, 2), "conns": m.conns, "sessions": m.sessions, "state": m.state}
            )
            await asyncio.sleep(POLL_S)


async def wait_drained(lb: LoadBalancer, node_name: str, timeout_s: float | None) -> int:
    """Poll `serverside.curConns` (and `curSessions`) until 0; the seconds waited."""
    limit = timeout_s if timeout_s is not None else lb.drain_timeout_s

    def timed_out(m: F5Member) -> NoReturn:
        fail(
            DRAIN_TIMEOUT,
            f"load balancer {lb.name}: {m.name} (node {node_name}) still has {m.conns} connection(s) and "
            f"{m.sessions} session(s) after {limit:g}s of draining (session {m.session})",
        )

    _, waited = await _poll(lb, node_name, limit, lambda m: m.open == 0, timed_out)
    return int(waited)


async def wait_up(lb: LoadBalancer, node_name: str, timeout_s: float | None) -> MemberState:
    limit = timeout_s if timeout_s is not None else 60.0

    def timed_out(m: F5Member) -> NoReturn:
        fail(
            NOT_UP_TIMEOUT,
            f"load balancer {lb.name}: {m.name} (node {node_name}) not up after {limit:g}s: "
            f"state {m.state}, session {m.session}",
        )

    m, _ = await _poll(
        lb,
        node_name,
        limit,
        lambda m: m.state in ("up", "unchecked") and m.session in ENABLED_SESSIONS,
        timed_out,
    )
    return _as_member_state(lb, node_name, m)


# --------------------------------------------------------------------------- the pool's service-down action


@dataclass(frozen=True)
class ServiceDownRequest:
    lb: LoadBalancer
    # BIG-IP's serviceDownAction: none | reset (the UI's "Reject") | drop | reselect; "" reads only.
    action: str = ""


@dataclass(frozen=True)
class ServiceDownAction:
    pool: str
    before: str
    now: str


SERVICE_DOWN_ACTIONS = ("none", "reset", "drop", "reselect")


async def service_down_action(lb: LoadBalancer, action: str) -> ServiceDownAction:
    """The pool's Action on Service Down (`serviceDownAction`, read, then set when `action` is
    given: a set, so re-running it is harmless). Seed 000 step 9.5 wants Reject (`reset`):
    a client still sent to a member that went down is refused at once instead of hanging."""
    if action and action not in SERVICE_DOWN_ACTIONS:
        fail(
            INVALID_REQUEST,
            f"serviceDownAction {action!r}: expected one of {', '.join(SERVICE_DOWN_ACTIONS)}",
        )
    if not lb.pool:
        fail(INVALID_REQUEST, f"load balancer {lb.name}: kind f5 needs `pool`")
    path = f"/mgmt/tm/ltm/pool/{_ref(lb.pool)}"
    async with session(lb) as s:
        before = str((await s.call("GET", path)).get("serviceDownAction", "none"))
        now = before
        if action and action != before:
            now = str(
                (await s.call("PATCH", path, {"serviceDownAction": action})).get("serviceDownAction", "")
            )
            if now != action:
                fail(
                    LB_RUNTIME_API_ERROR,
                    f"load balancer {lb.name}: pool {lb.pool} reads serviceDownAction {now!r} after it "
                    f"was set {action!r}",
                    retryable=True,
                )
    return ServiceDownAction(pool=lb.pool, before=before, now=now)


@activity.defn
async def lb_service_down_action(req: ServiceDownRequest) -> ServiceDownAction:
    return await service_down_action(req.lb, req.action)
