"""A stand-in for `lb_guard` (workflows/balancers.py) for the fake sites of workflow-logic
tests: the balancer's process never changes, so the guard finds nothing to set again. The
rolling-deploy fake site has its own, which can simulate a reload."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from temporalio import activity

import activities.haproxy as haproxy

STEADY = haproxy.LbProcess(pid=100, started=1_700_000_000)


def steady_lb_guard() -> Callable[..., Any]:
    @activity.defn(name="lb_guard")
    async def lb_guard(arg: dict[str, Any]) -> haproxy.GuardResult:
        return haproxy.GuardResult(process=STEADY, reloaded=False)

    return lb_guard
