"""What a run has set on its load balancers, so that a reload cannot undo it unnoticed.

HAProxy keeps server states, servers added at run time and map entries in the running
process only: a reload (without `server-state-file`) puts a node the run took out of
rotation back in, drops the servers it attached and lifts the maintenance page. So a
procedure keeps a ledger of what it set on each balancer (`record`, after each change went
through), and before every change to the site (`Procedure.change`, `Procedure.wait`) looks
at each balancer it has touched (`lb_guard`, a local activity: `show info`'s Pid and
Start_time_sec). A new process means a reload: the guard sets the ledger's state again and
the timeline says what it found and did; if that fails, the step fails like any other
(failure gate or rollback). Stopping a node that a reload put back in rotation is exactly
what the guard before `stop_service` prevents.

Deterministic: only workflow state; the balancers are read by the activity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    import activities.haproxy as haproxy
    from inventory.model import LoadBalancer

# Runs started before this guard replay without it.
PATCH_LB_GUARD = "procedure-balancer-reload-guard-v1"
lb_guard = haproxy.lb_guard


def activity_name(fn: Callable[..., Any]) -> str:
    definition = getattr(fn, "__temporal_activity_definition", None)
    return str(getattr(definition, "name", "")) if definition is not None else ""


class Balancers:
    def __init__(self) -> None:
        self._lbs: dict[str, LoadBalancer] = {}
        self._seen: dict[str, haproxy.LbProcess] = {}
        self._members: dict[str, dict[str, str]] = {}
        self._maintenance: dict[str, bool] = {}
        self._added: dict[str, dict[str, str]] = {}
        self._removed: dict[str, list[str]] = {}

    def to_guard(self, arg: Any) -> list[LoadBalancer]:
        """The HAProxy balancers to look at before a change: every one this run has changed,
        and the one this change is about (so its process is known before it first changes)."""
        lbs = dict(self._lbs)
        lb = getattr(arg, "lb", None)
        if isinstance(lb, LoadBalancer) and lb.kind == "haproxy" and lb.runtime_api and lb.name not in lbs:
            lbs[lb.name] = lb
        return list(lbs.values())

    def request(self, lb: LoadBalancer) -> haproxy.GuardRequest:
        name = lb.name
        state = haproxy.LbRunState(
            members=tuple(sorted(self._members.get(name, {}).items())),
            maintenance=self._maintenance.get(name),
            added=tuple(sorted(self._added.get(name, {}).items())),
            removed=tuple(self._removed.get(name, [])),
        )
        return haproxy.GuardRequest(lb=lb, expected=self._seen.get(name), state=state)

    def saw(self, lb: LoadBalancer, result: haproxy.GuardResult) -> None:
        self._seen[lb.name] = result.process

    def record(self, fn: Callable[..., Any], arg: Any) -> None:
        """Note what a change that went through set on its balancer."""
        name = activity_name(fn)
        lb = getattr(arg, "lb", None)
        if not isinstance(lb, LoadBalancer) or lb.kind != "haproxy":
            return
        key = lb.name
        members = self._members.setdefault(key, {})
        added = self._added.setdefault(key, {})
        removed = self._removed.setdefault(key, [])
        if name == "lb_set_state":
            members[arg.node] = arg.state
        elif name == "lb_set_maintenance":
            self._maintenance[key] = bool(arg.on)
        elif name == "lb_add_server":
            added[arg.node] = arg.address
            members[arg.node] = "ready"
            if arg.node in removed:
                removed.remove(arg.node)
        elif name == "lb_del_server":
            members.pop(arg.node, None)
            if added.pop(arg.node, None) is None and arg.node not in removed:
                removed.append(arg.node)  # a server of the configuration: a reload brings it back
        else:
            return
        self._lbs[key] = lb  # the latest: it names the servers attached meanwhile
