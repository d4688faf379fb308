"""Stop / start / inspect a node's application service over SSH.

Three kinds of service control (ServiceControl.kind):
  command  the inventory's own shell commands (`status` exits 0 when running)
  systemd  systemctl stop|start|is-active <unit>
  iis      PowerShell (WebAdministration) on a Windows node, sent as -EncodedCommand so no
           quoting survives two shells; scripts wait for the app pool to reach the state.

The activities are idempotent: they look at the status first and only act when needed,
then wait (heartbeating) until the status confirms the wanted state.
"""

from __future__ import annotations

import asyncio
import base64
import shlex
import time
from dataclasses import dataclass

from temporalio import activity

from activities import ssh
from activities.common import INVALID_REQUEST, SERVICE_TIMEOUT, SSH_COMMAND_FAILED, fail, heartbeat
from workflows.inventory import Node, ServiceControl


@dataclass(frozen=True)
class ServiceCommands:
    stop: str
    start: str
    status: str


def _ps_quote(name: str) -> str:
    """A PowerShell single-quoted string literal (a quote inside is doubled)."""
    return "'" + name.replace("'", "''") + "'"


def _fmt_seconds(s: float) -> str:
    return str(int(s)) if float(s).is_integer() else f"{s:g}"


def iis_scripts(site: str, pool: str, timeout_s: float) -> ServiceCommands:
    """The plain PowerShell scripts (before encoding) for an IIS site and its app pool."""
    q_site, q_pool = _ps_quote(site), _ps_quote(pool)
    state = f"(Get-WebAppPoolState -Name {q_pool}).Value"
    deadline = f"$deadline = (Get-Date).AddSeconds({_fmt_seconds(timeout_s)}); "

    def wait_for(wanted: str) -> str:
        return (deadline
                + f"while ({state} -ne '{wanted}') {{ "
                + "if ((Get-Date) -gt $deadline) { "
                + f"Write-Output ('app pool ' + {q_pool} + ' did not reach {wanted}, state: ' + {state}); "
                + "exit 1 }; Start-Sleep -Milliseconds 500 }; exit 0")

    stop = (f"Import-Module WebAdministration; Stop-Website -Name {q_site}; "
            f"Stop-WebAppPool -Name {q_pool}; " + wait_for("Stopped"))
    start = (f"Import-Module WebAdministration; Start-WebAppPool -Name {q_pool}; "
             f"Start-Website -Name {q_site}; " + wait_for("Started"))
    status = (f"Import-Module WebAdministration; $s = {state}; Write-Output $s; "
              "if ($s -eq 'Started') { exit 0 } else { exit 3 }")
    return ServiceCommands(stop=stop, start=start, status=status)


def powershell_encoded(script: str) -> str:
    encoded = base64.b64encode(script.encode("utf-16-le")).decode("ascii")
    return f"powershell -NoProfile -NonInteractive -EncodedCommand {encoded}"


def service_commands(svc: ServiceControl) -> ServiceCommands:
    """The exact command lines that stop, start and inspect the service."""
    if svc.kind == "command":
        if not (svc.stop and svc.start and svc.status):
            fail(INVALID_REQUEST, "service kind 'command' needs stop, start and status commands")
        return ServiceCommands(stop=svc.stop, start=svc.start, status=svc.status)
    if svc.kind == "systemd":
        if not svc.unit:
            fail(INVALID_REQUEST, "service kind 'systemd' needs a unit")
        unit = shlex.quote(svc.unit)
        return ServiceCommands(stop=f"systemctl stop {unit}", start=f"systemctl start {unit}",
                               status=f"systemctl is-active {unit}")
    if svc.kind == "iis":
        if not (svc.site and svc.app_pool):
            fail(INVALID_REQUEST, "service kind 'iis' needs site and app_pool")
        scripts = iis_scripts(svc.site, svc.app_pool, svc.timeout_s)
        return ServiceCommands(stop=powershell_encoded(scripts.stop),
                               start=powershell_encoded(scripts.start),
                               status=powershell_encoded(scripts.status))
    fail(INVALID_REQUEST, f"unknown service kind {svc.kind!r}")


# --------------------------------------------------------------------------- logic

# Exit statuses that mean "the status command itself is broken", not "service stopped":
# 126 not executable, 127 not found, 255 ssh-level failure.
_BROKEN_STATUS = (126, 127, 255)


@dataclass(frozen=True)
class ServiceRequest:
    node: Node


@dataclass(frozen=True)
class ServiceState:
    node_name: str
    running: bool
    # Output of the status command (e.g. "active", "Started", the ctl's message).
    detail: str
    # True when this call changed something (False: it already was in the wanted state).
    changed: bool = False


async def status_of(node: Node) -> ServiceState:
    cmds = service_commands(node.service)
    res = await ssh.run(node.ssh, cmds.status, timeout_s=node.service.timeout_s, check=False)
    if res.exit_status in _BROKEN_STATUS:
        fail(SSH_COMMAND_FAILED,
             f"node {node.name} ({ssh.where(node.ssh)}): status command {cmds.status!r} exited "
             f"with status {res.exit_status}; stderr: {res.stderr.strip()[-500:] or '(empty)'}")
    detail = (res.stdout.strip() or res.stderr.strip())[-500:]
    return ServiceState(node_name=node.name, running=res.exit_status == 0, detail=detail)


async def _wait_state(node: Node, running: bool, deadline: float, verb: str) -> ServiceState:
    while True:
        st = await status_of(node)
        if st.running == running:
            return st
        left = deadline - time.monotonic()
        if left <= 0:
            fail(SERVICE_TIMEOUT,
                 f"node {node.name}: service still {'stopped' if running else 'running'} "
                 f"{node.service.timeout_s:g}s after {verb}; status: {st.detail or '(no output)'}")
        heartbeat({"node": node.name, "waiting_for": "running" if running else "stopped"})
        await asyncio.sleep(min(0.5, left))


async def set_running(node: Node, running: bool) -> ServiceState:
    """Bring the service into the wanted state; a no-op when it already is."""
    current = await status_of(node)
    if current.running == running:
        return current
    cmds = service_commands(node.service)
    deadline = time.monotonic() + node.service.timeout_s
    command = cmds.start if running else cmds.stop
    await ssh.run(node.ssh, command, timeout_s=node.service.timeout_s, check=True)
    st = await _wait_state(node, running, deadline, "start" if running else "stop")
    return ServiceState(node_name=st.node_name, running=st.running, detail=st.detail, changed=True)


# --------------------------------------------------------------------------- activities


@activity.defn
async def stop_service(req: ServiceRequest) -> ServiceState:
    """Stop the node's service (idempotent) and wait until its status says stopped."""
    return await set_running(req.node, running=False)


@activity.defn
async def start_service(req: ServiceRequest) -> ServiceState:
    """Start the node's service (idempotent) and wait until its status says running.
    Application health is a separate check (http_checks.wait_healthy)."""
    return await set_running(req.node, running=True)


@activity.defn
async def service_status(req: ServiceRequest) -> ServiceState:
    return await status_of(req.node)
