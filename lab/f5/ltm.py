"""LTM pools and pool members as BIG-IP shows them, computed from HAProxy's state.

BIG-IP's two member properties and what the lab does with them:

* PATCH accepts `session` user-enabled | user-disabled and `state` user-up | user-down
  (f5-common-python f5/bigip/tm/ltm/pool.py Members._modify: "The accepted values are
  'user-up' or 'user-down'" / "'user-enabled' or 'user-disabled'").
* enabled = user-enabled + user-up, disabled (drain: open and persistent connections go on,
  no new ones) = user-disabled + user-up, forced offline = user-disabled + user-down
  (f5-ansible plugins/modules/bigip_pool_member.py, _update_api_state_attributes). The lab
  maps them onto HAProxy's admin states ready, drain and maint.
* Read back with a monitor attached (every lab pool: HAProxy checks each server), an enabled
  member's session is "monitor-enabled" and its state the monitor's verdict "up" / "down" /
  "checking"; a disabled one keeps session "user-disabled" with state "up" / "down"; a forced
  offline one reads "user-disabled" / "user-down" (bigip_pool_member.py ApiParameters.state
  and its fixture pool_members_subcollection.json: session user-disabled, state up).
"""

from __future__ import annotations

from typing import Any

from lab.f5 import facts
from lab.f5.config import MemberSpec, PoolSpec
from lab.f5.runtime import Admin, ServerView

MEMBER_KIND = "tm:ltm:pool:members:membersstate"
MEMBERS_KIND = "tm:ltm:pool:members:memberscollectionstate"
MEMBER_STATS_KIND = "tm:ltm:pool:members:membersstats"
MEMBERS_STATS_KIND = "tm:ltm:pool:members:memberscollectionstats"
POOL_KIND = "tm:ltm:pool:poolstate"
SESSION_VALUES = ("user-enabled", "user-disabled")
STATE_VALUES = ("user-up", "user-down")
# bigip_pool.py service_down_action choices; "reset" is the GUI's "Reject".
SERVICE_DOWN_ACTIONS = ("none", "reset", "drop", "reselect")
DEFAULT_SERVICE_DOWN_ACTION = "none"  # a new pool's value (f5-telemetry-streaming collectPools.js)
BASE = "https://localhost/mgmt/tm/ltm/pool"
P = facts.PARTITION


def pool_link(pool: str) -> str:
    return f"{BASE}/~{P}~{pool}"


def member_link(pool: str, member: str) -> str:
    return f"{pool_link(pool)}/members/~{P}~{member}"


def _ver(link: str) -> str:
    return f"{link}?ver={facts.TMOS_VERSION}"


# ---------------------------------------------------------------------------- states


def health(view: ServerView) -> str:
    """The monitor's verdict: "up", "down", or "checking" before the first check."""
    if view.check_status.startswith("INI") or not view.check_status:
        return "checking"
    return "up" if view.running else "down"


def monitor_status(view: ServerView) -> str:
    """The stats' monitorStatus. HAProxy stops checking a server in maintenance (its
    check_status goes empty), so a forced-offline member reads "unchecked", the value BIG-IP
    shows for a member no monitor checks (collectPools.js); BIG-IP's own value for a forced
    offline member was not found."""
    return "unchecked" if view.admin == "maint" else health(view)


def session_and_state(view: ServerView) -> tuple[str, str]:
    """(session, state) as BIG-IP reads them back (module docstring)."""
    if view.admin == "maint":
        return "user-disabled", "user-down"
    return ("user-disabled" if view.admin == "drain" else "monitor-enabled"), health(view)


def target_admin(current: Admin, session: str | None, state: str | None) -> Admin:
    """The HAProxy admin state after a PATCH of `session` and/or `state` (None: not sent).
    A state sent alone keeps the session, a session sent alone keeps a forced offline: the
    two are independent properties on BIG-IP."""
    if state == "user-down":
        return "maint"
    if session is None:  # state user-up or nothing: the session stays as it is
        return current if state is None or current == "ready" else "drain"
    if state is None and current == "maint":
        return "maint"
    return "drain" if session == "user-disabled" else "ready"


# ---------------------------------------------------------------------------- bodies


def member_body(pool: PoolSpec, member: MemberSpec, view: ServerView, generation: int) -> dict[str, Any]:
    """A pool member (fields as in f5-ansible tests/unit/.../fixtures/
    pool_members_subcollection.json)."""
    session, state = session_and_state(view)
    return {
        "kind": MEMBER_KIND,
        "name": member.name,
        "partition": P,
        "fullPath": f"/{P}/{member.name}",
        "generation": generation,
        "selfLink": _ver(member_link(pool.name, member.name)),
        "address": member.address,
        "connectionLimit": 0,
        "dynamicRatio": 1,
        "ephemeral": "false",
        "fqdn": {"autopopulate": "disabled"},
        "inheritProfile": "enabled",
        "logging": "disabled",
        "monitor": "default",  # the pool's monitor
        "priorityGroup": 0,
        "rateLimit": "disabled",
        "ratio": 1,
        "session": session,
        "state": state,
    }


def members_body(pool: PoolSpec, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"kind": MEMBERS_KIND, "selfLink": _ver(f"{pool_link(pool.name)}/members"), "items": items}


def pool_body(pool: PoolSpec, service_down_action: str, generation: int) -> dict[str, Any]:
    """A pool (fields as in f5-ansible tests/unit/.../fixtures/load_ltm_pool.json)."""
    return {
        "kind": POOL_KIND,
        "name": pool.name,
        "partition": P,
        "fullPath": f"/{P}/{pool.name}",
        "generation": generation,
        "selfLink": _ver(pool_link(pool.name)),
        "allowNat": "yes",
        "allowSnat": "yes",
        "ignorePersistedWeight": "disabled",
        "ipTosToClient": "pass-through",
        "ipTosToServer": "pass-through",
        "linkQosToClient": "pass-through",
        "linkQosToServer": "pass-through",
        "loadBalancingMode": "round-robin",  # HAProxy's `balance roundrobin` (lab/haproxy.py)
        "minActiveMembers": 0,
        "minUpMembers": 0,
        "minUpMembersAction": "failover",
        "minUpMembersChecking": "disabled",
        "monitor": pool.monitor,
        "queueDepthLimit": 0,
        "queueOnConnectionLimit": "disabled",
        "queueTimeLimit": 0,
        "reselectTries": 0,
        "serviceDownAction": service_down_action,
        "slowRampTime": 10,
        "membersReference": {"link": _ver(f"{pool_link(pool.name)}/members"), "isSubcollection": True},
    }


# ---------------------------------------------------------------------------- statistics


def _status(view: ServerView) -> tuple[str, str, str]:
    """(status.availabilityState, status.enabledState, status.statusReason). The reasons are
    BIG-IP's: "Pool member is available" and "Pool member has been marked down by a monitor"
    (f5-telemetry-streaming test/unit/data/propertiesJsonTests/collectPools.js), "Pool member
    is available, user disabled" and "Forced down" (read by public BIG-IP exporters, found by
    text search). Forced down as "offline"/"disabled" is the lab's reading of the GUI's
    black diamond; no capture was found."""
    if view.admin == "maint":
        return "offline", "disabled", "Forced down"
    enabled = "enabled" if view.admin == "ready" else "disabled"
    verdict = health(view)
    if verdict == "checking":
        return "unknown", enabled, " "
    if verdict == "down":
        return "offline", enabled, "Pool member has been marked down by a monitor"
    reason = "Pool member is available" + ("" if view.admin == "ready" else ", user disabled")
    return "available", enabled, reason


def _v(value: int) -> dict[str, int]:
    return {"value": value}


def _d(text: str) -> dict[str, str]:
    return {"description": text}


def stats_entries(pool: PoolSpec, member: MemberSpec, view: ServerView) -> dict[str, Any]:
    """The member's nestedStats entries (names from collectPools.js), values from HAProxy's
    `show stat`: scur is both the current connections and sessions (HAProxy proxies one
    server-side connection per session), stot the total, bin/bout bytes (BIG-IP counts bits);
    HAProxy counts no packets and has no connection queue here, so those stay 0."""
    availability, enabled, reason = _status(view)
    return {
        "addr": _d(member.address),
        **{f"connq.{k}": _v(0) for k in ("ageEdm", "ageEma", "ageHead", "ageMax", "depth", "serviced")},
        "curSessions": _v(view.scur),
        "monitorRule": _d(f"{pool.monitor} (pool monitor)"),
        "monitorStatus": _d(monitor_status(view)),
        "nodeName": _d(f"/{P}/{member.node}"),
        "poolName": _d(f"/{P}/{pool.name}"),
        "port": _v(member.port),
        "serverside.bitsIn": _v(view.bin * 8),
        "serverside.bitsOut": _v(view.bout * 8),
        "serverside.curConns": _v(view.scur),
        "serverside.maxConns": _v(view.smax),
        "serverside.pktsIn": _v(0),
        "serverside.pktsOut": _v(0),
        "serverside.totConns": _v(view.stot),
        "sessionStatus": _d("enabled" if view.admin == "ready" else "user-disabled"),
        "status.availabilityState": _d(availability),
        "status.enabledState": _d(enabled),
        "status.statusReason": _d(reason),
        "totRequests": _v(view.req_tot or view.stot),
    }


def _nested(pool: PoolSpec, member: MemberSpec, view: ServerView) -> tuple[str, dict[str, Any]]:
    link = f"{member_link(pool.name, member.name)}/stats"
    nested = {"kind": MEMBER_STATS_KIND, "selfLink": _ver(link), "entries": stats_entries(pool, member, view)}
    return link, {"nestedStats": nested}


def member_stats_body(
    pool: PoolSpec, member: MemberSpec, view: ServerView, generation: int
) -> dict[str, Any]:
    """One member's stats: the entries keyed by the stats link, inside nestedStats (a 14.1
    answer quoted in public BIG-IP tooling; f5-common-python f5/utils/responses/handlers.py
    reads any URL-keyed entry's nestedStats, "as json format changed in v12.x")."""
    link, entry = _nested(pool, member, view)
    return {
        "kind": MEMBER_STATS_KIND,
        "generation": generation,
        "selfLink": _ver(link),
        "entries": {link: entry},
    }


def members_stats_body(pool: PoolSpec, views: dict[str, ServerView]) -> dict[str, Any]:
    """All members' stats (collectPools.js: kind memberscollectionstats)."""
    entries = dict(_nested(pool, m, views[m.server]) for m in pool.members.values() if m.server in views)
    link = f"{pool_link(pool.name)}/members/stats"
    return {"kind": MEMBERS_STATS_KIND, "selfLink": _ver(link), "entries": entries}
