"""Every activity heartbeats, whatever it does: a worker interceptor.

Why: a worker lost mid-activity (SIGKILL, a crashed host) is noticed by the server only when
the activity's heartbeat timeout passes - or, without one, its whole start-to-close timeout
(90 s for a service start, 30 min for a long step). With every activity heartbeating once a
second from here, the workflows give every activity one short heartbeat timeout
(`workflows/timeouts.py`), so the work resumes on another worker within seconds.

The beat repeats the details the activity itself last sent (its progress, read back by a
retry through `activity.info().heartbeat_details`), so it never overwrites them.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from temporalio import activity
from temporalio.worker import (
    ActivityInboundInterceptor,
    ActivityOutboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

BEAT_EVERY_S = 1.0


class _Outbound(ActivityOutboundInterceptor):
    def __init__(self, next: ActivityOutboundInterceptor) -> None:
        super().__init__(next)
        self.details: tuple[Any, ...] = ()

    def heartbeat(self, *details: Any) -> None:
        self.details = details
        super().heartbeat(*details)


class _Inbound(ActivityInboundInterceptor):
    def init(self, outbound: ActivityOutboundInterceptor) -> None:
        self.outbound = _Outbound(outbound)
        super().init(self.outbound)

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        if activity.info().is_local:
            return await super().execute_activity(input)
        # What an earlier attempt last reported stays the details until this one reports.
        self.outbound.details = tuple(activity.info().heartbeat_details)
        beat = asyncio.create_task(self._beat())
        try:
            return await super().execute_activity(input)
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(BEAT_EVERY_S)
            activity.heartbeat(*self.outbound.details)


class HeartbeatInterceptor(Interceptor):
    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _Inbound(next)
