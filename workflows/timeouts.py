"""One timeout model for every activity, by kind of activity.

Every activity heartbeats at least once a second, whatever it does (worker/heartbeat.py, a
worker interceptor), so every activity gets the same short heartbeat timeout: a worker lost
mid-activity is noticed after `HEARTBEAT`, not after the activity's start-to-close (90 s for
a service start, 30 minutes for a long step). The start-to-close timeouts bound how long an
attempt may work; they differ by kind:

  READ     a check (read-only, safe to cancel)                      2 minutes
  CHANGE   a quick change to the site                               2 minutes
  LONG     copies, dumps, restores, migrations, provisioning       30 minutes
  wait(s)  a wait with its own deadline s (drain, sync, in-sync)    s + 60 s
  service  a service stop / start: the inventory's service timeout + 30 s
  tool(s)  a vendor tool with its own budget s (OX's runupdate)     s + 5 minutes

A workflow task lost with its worker (the worker died while deciding the next step) is
given to another worker after `WORKFLOW_TASK` (Temporal's default is 10 s); runs are started
with it (starter/client.py) and it is handed to child workflows.

Timeouts are not part of a history's commands: changing them here needs no patch.
"""

from __future__ import annotations

from datetime import timedelta

HEARTBEAT = timedelta(seconds=4)
WORKFLOW_TASK = timedelta(seconds=3)
READ = timedelta(minutes=2)
CHANGE = timedelta(minutes=2)
LONG = timedelta(minutes=30)
WAIT_MARGIN_S = 60.0
SERVICE_MARGIN_S = 30.0
TOOL_MARGIN_S = 300.0


def wait(deadline_s: float) -> timedelta:
    return timedelta(seconds=deadline_s + WAIT_MARGIN_S)


def service(service_timeout_s: float) -> timedelta:
    return timedelta(seconds=service_timeout_s + SERVICE_MARGIN_S)


def tool(budget_s: float) -> timedelta:
    return timedelta(seconds=budget_s + TOOL_MARGIN_S)
