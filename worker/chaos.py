"""Fault injection for bench/chaos.py: hold named activities a moment at their start.

A `during` boundary of an activity that ends in a few milliseconds cannot be hit by a kill
from outside; held, it runs long enough to be killed inside. Only the bench sets
`ZERODOWN_CHAOS_HOLD` (`<activity>[,<activity>...]:<seconds>`, e.g. `check_login:1.5`), in
the environment of the worker it starts; a production worker never has it. The hold comes
before the activity's own code, with the heartbeat interceptor beating meanwhile, so what is
killed is the attempt as it would run, only later.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from temporalio import activity
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput, Interceptor

HOLD_ENV = "ZERODOWN_CHAOS_HOLD"


class _Hold(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, names: frozenset[str], seconds: float) -> None:
        super().__init__(next)
        self.names, self.seconds = names, seconds

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        if activity.info().activity_type in self.names:
            await asyncio.sleep(self.seconds)
        return await super().execute_activity(input)


class HoldInterceptor(Interceptor):
    def __init__(self, names: frozenset[str], seconds: float) -> None:
        self.names, self.seconds = names, seconds

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _Hold(next, self.names, self.seconds)


def hold_from_env() -> list[Interceptor]:
    """The interceptor `ZERODOWN_CHAOS_HOLD` asks for, or none."""
    spec = os.environ.get(HOLD_ENV, "")
    if not spec:
        return []
    names, _, seconds = spec.rpartition(":")
    return [HoldInterceptor(frozenset(n for n in names.split(",") if n), float(seconds))]
