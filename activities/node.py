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
import posixpath
import re
import shlex
import time
from dataclasses import dataclass, field

from temporalio import activity

from activities import powershell, ssh
from activities.common import fail, heartbeat, tail
from errors import INVALID_REQUEST, SERVICE_TIMEOUT, SSH_COMMAND_FAILED
from inventory.model import Node, SecretRef, ServiceControl


@dataclass(frozen=True)
class ServiceCommands:
    stop: str
    start: str
    status: str
    # Recycling in place (IIS: Restart-WebAppPool); "" where the service has no such verb and
    # a recycle is a stop then a start.
    recycle: str = ""


def _fmt_seconds(s: float) -> str:
    return str(int(s)) if float(s).is_integer() else f"{s:g}"


# The IIS status script's exit statuses: the app pool's state (Get-WebAppPoolState, an
# ObjectState: Starting, Started, Stopping, Stopped, Unknown) mapped so that only Stopped
# with no worker process left is "stopped": Starting, Stopping, Unknown and a Stopped pool
# whose w3wp still finishes requests are in between (IIS_UNSETTLED), and a stop or start
# waits them out. 5: the pool serves other sites too (IIS_SHARED_POOL).
IIS_STOPPED = 3
IIS_UNSETTLED = 4
IIS_SHARED_POOL = 5


def iis_scripts(site: str, pool: str, timeout_s: float, shared_pool: bool = False) -> ServiceCommands:
    """The plain PowerShell scripts (before encoding) for an IIS site and its app pool.

    Every script runs with `$ErrorActionPreference = 'Stop'`, so a failing cmdlet (no such
    site or pool, access denied) ends it with exit 1 and its message, instead of printing
    the error and going on to report success; the site and the pool are looked up first
    (Get-Item on the IIS: drive), so a wrong name fails with the provider's "Cannot find
    path" before anything is touched. Stop-WebAppPool on a pool that is not Started, and
    Start-WebAppPool on one that is not Stopped, fail with HRESULT 0x800710D8: a script
    first waits out Starting / Stopping, then acts only from the settled state. A stop
    waits until the pool is Stopped *and* its worker processes (w3wp) have exited, within
    the budget: until then they hold the app folder's files. Stopping a pool that other
    sites or applications use stops them too: refused unless the inventory says so
    (`service.shared_pool: true`)."""
    q_site, q_pool = powershell.quote(site), powershell.quote(pool)
    head = (
        "$ErrorActionPreference = 'Stop'; Import-Module WebAdministration; "
        f"$null = Get-Item ('IIS:\\Sites\\' + {q_site}); $null = Get-Item ('IIS:\\AppPools\\' + {q_pool}); "
    )
    state = f"(Get-WebAppPoolState -Name {q_pool}).Value"
    deadline = f"$deadline = (Get-Date).AddSeconds({_fmt_seconds(timeout_s)}); "
    workers = (
        f"@(Get-ChildItem ('IIS:\\AppPools\\' + {q_pool} + '\\WorkerProcesses') "
        "-ErrorAction SilentlyContinue).Count"
    )

    def wait_while(condition: str, wanted: str, with_workers: bool = False) -> str:
        return (
            f"while ({condition}) {{ "
            + "if ((Get-Date) -gt $deadline) { "
            + f"Write-Output ('app pool ' + {q_pool} + ' did not reach {wanted}, state: ' + {state}"
            + (f" + ', worker processes: ' + {workers}" if with_workers else "")
            + "); exit 1 }; Start-Sleep -Milliseconds 250 }; "
        )

    settle = wait_while(f"@('Starting', 'Stopping') -contains {state}", "a settled state")
    sharing = (
        ""
        if shared_pool
        else (
            f"$others = @(Get-WebApplication | Where-Object {{ $_.applicationPool -eq {q_pool} }}) + "
            f"@(Get-Website | Where-Object {{ $_.applicationPool -eq {q_pool} -and $_.name -ne {q_site} }}); "
            "if ($others.Count -gt 0) { "
            f"Write-Output ('app pool ' + {q_pool} + ' also serves ' + (($others | ForEach-Object "
            "{ if ($_.name) { $_.name } else { $_.path } }) -join ', ') + "
            "': stopping it stops them too (service.shared_pool: true if intended)'); "
            f"exit {IIS_SHARED_POOL} }}; "
        )
    )
    stop = (
        head
        + sharing
        + deadline
        + f"Stop-Website -Name {q_site}; "
        + settle
        + f"if ({state} -eq 'Started') {{ Stop-WebAppPool -Name {q_pool} }}; "
        + wait_while(f"({state} -ne 'Stopped') -or ({workers} -gt 0)", "Stopped", with_workers=True)
        + "exit 0"
    )
    start = (
        head
        + deadline
        + settle
        + f"if ({state} -eq 'Stopped') {{ Start-WebAppPool -Name {q_pool} }}; "
        + wait_while(f"{state} -ne 'Started'", "Started")
        + f"Start-Website -Name {q_site}; exit 0"
    )
    status = (
        head + f"$s = {state}; $w = {workers}; "
        f"if ($s -eq 'Started') {{ Write-Output $s; exit 0 }} "
        f"elseif ($s -eq 'Stopped' -and $w -eq 0) {{ Write-Output $s; exit {IIS_STOPPED} }} "
        f"elseif ($s -eq 'Stopped') {{ Write-Output ('Stopped, worker processes still running: ' + $w); "
        f"exit {IIS_UNSETTLED} }} "
        f"else {{ Write-Output $s; exit {IIS_UNSETTLED} }}"
    )
    # A recycle (Restart-WebAppPool: a new worker process; the seed's "recycle the app pool")
    # from Started; a Stopped pool is started instead.
    # The worker processes that served before the recycle must be gone at its end (IIS starts
    # the new one first, then the old one finishes its requests and exits).
    old_workers = (
        f"@(Get-ChildItem ('IIS:\\AppPools\\' + {q_pool} + '\\WorkerProcesses') "
        "-ErrorAction SilentlyContinue | Where-Object { $old -contains $_.processId }).Count"
    )
    recycle = (
        head
        + deadline
        + settle
        + f"$old = @(Get-ChildItem ('IIS:\\AppPools\\' + {q_pool} + '\\WorkerProcesses') "
        + "-ErrorAction SilentlyContinue | ForEach-Object { $_.processId }); "
        + f"if ({state} -eq 'Started') {{ Restart-WebAppPool -Name {q_pool} }} "
        + f"else {{ Start-WebAppPool -Name {q_pool} }}; "
        + wait_while(
            f"({state} -ne 'Started') -or ({old_workers} -gt 0)", "Started with new worker processes"
        )
        + "exit 0"
    )
    return ServiceCommands(stop=stop, start=start, status=status, recycle=recycle)


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
        return ServiceCommands(
            stop=f"systemctl stop {unit}",
            start=f"systemctl start {unit}",
            status=f"systemctl is-active {unit}",
        )
    if svc.kind == "iis":
        if not (svc.site and svc.app_pool):
            fail(INVALID_REQUEST, "service kind 'iis' needs site and app_pool")
        scripts = iis_scripts(svc.site, svc.app_pool, svc.timeout_s, svc.shared_pool)
        return ServiceCommands(
            stop=powershell.encoded(scripts.stop),
            start=powershell.encoded(scripts.start),
            status=powershell.encoded(scripts.status),
            recycle=powershell.encoded(scripts.recycle),
        )
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
    # False while the service is between states (an IIS app pool Starting, Stopping or
    # Unknown): neither running nor stopped.
    settled: bool = True


async def status_of(node: Node) -> ServiceState:
    cmds = service_commands(node.service)
    res = await ssh.run(node.ssh, cmds.status, timeout_s=node.service.timeout_s, check=False)
    if res.exit_status in _BROKEN_STATUS:
        fail(
            SSH_COMMAND_FAILED,
            f"node {node.name} ({ssh.where(node.ssh)}): status command {cmds.status!r} exited "
            f"with status {res.exit_status}; stderr: {res.stderr.strip()[-500:] or '(empty)'}",
        )
    if node.service.kind == "iis" and res.exit_status not in (0, IIS_STOPPED, IIS_UNSETTLED):
        # The status script itself failed (no such site or pool, WebAdministration missing):
        # never take that for "stopped".
        fail(
            SSH_COMMAND_FAILED,
            f"node {node.name} ({ssh.where(node.ssh)}): the IIS status script exited with status "
            f"{res.exit_status}: "
            f"{tail(powershell.readable_stderr(res.stderr) or res.stdout, 1200) or '(no output)'}",
        )
    detail = (res.stdout.strip() or res.stderr.strip())[-500:]
    settled = not (node.service.kind == "iis" and res.exit_status == IIS_UNSETTLED)
    return ServiceState(node_name=node.name, running=res.exit_status == 0, detail=detail, settled=settled)


async def _wait_state(node: Node, running: bool, deadline: float, verb: str) -> ServiceState:
    while True:
        st = await status_of(node)
        if st.running == running and st.settled:
            return st
        left = deadline - time.monotonic()
        if left <= 0:
            fail(
                SERVICE_TIMEOUT,
                f"node {node.name}: service still {'stopped' if running else 'running'} "
                f"{node.service.timeout_s:g}s after {verb}; status: {st.detail or '(no output)'}",
            )
        heartbeat({"node": node.name, "waiting_for": "running" if running else "stopped"})
        await asyncio.sleep(min(0.5, left))


async def set_running(node: Node, running: bool) -> ServiceState:
    """Bring the service into the wanted state; a no-op when it already is."""
    current = await status_of(node)
    if current.running == running and current.settled:
        return current
    cmds = service_commands(node.service)
    deadline = time.monotonic() + node.service.timeout_s
    command = cmds.start if running else cmds.stop
    res = await ssh.run(node.ssh, command, timeout_s=node.service.timeout_s, check=False)
    if res.exit_status != 0:
        # The script's own words (IIS: on stdout, PowerShell's errors on stderr, maybe as
        # CLIXML), never the encoded command line they came from.
        said = "; ".join(
            t for t in (tail(res.stdout, 700), tail(powershell.readable_stderr(res.stderr), 1200)) if t
        )
        shown = command if node.service.kind != "iis" else f"the IIS {'start' if running else 'stop'} script"
        fail(
            SSH_COMMAND_FAILED,
            f"node {node.name} ({ssh.where(node.ssh)}): {shown} exited with status {res.exit_status}: "
            f"{said or '(no output)'}",
        )
    st = await _wait_state(node, running, deadline, "start" if running else "stop")
    return ServiceState(node_name=st.node_name, running=st.running, detail=st.detail, changed=True)


# --------------------------------------------------------------------------- storage


@dataclass(frozen=True)
class NodeStorageRequest:
    node: Node
    protected_files: tuple[str, ...] = ()
    # Bytes of the package that will be deployed (PackageInfo.size).
    package_size: int = 0


@dataclass(frozen=True)
class NodeStorage:
    app_bytes: int  # size of the application folder (what its backup tar takes)
    free_bytes: int  # available to the login user on the login directory's filesystem
    need_bytes: int
    missing_protected: tuple[str, ...]
    ok: bool  # enough space and every protected file present
    detail: str
    node_name: str = ""


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def storage_need(app_bytes: int, package_size: int) -> int:
    """What a deploy writes next to the app folder (.zerodown/ is in the login directory):
    the backup tar (~ the folder), then the package three times - uploaded zip, extracted
    release, the copy tar - plus a 10% margin (rounded up)."""
    return -(-(app_bytes + 3 * package_size) * 11 // 10)


_STORAGE_LINE = re.compile(r"^(app|free|missing) (\S+)$")


async def inspect_storage(node: Node, protected_files: tuple[str, ...], package_size: int) -> NodeStorage:
    """Read-only preflight over SSH with POSIX tools: `du -sk` of the app folder, `df -Pk`
    of the login directory, `test -f` of each protected file."""
    if isinstance(package_size, bool) or not isinstance(package_size, int) or package_size < 0:
        fail(INVALID_REQUEST, f"package_size must be an integer >= 0, got {package_size!r}")
    for p in protected_files:
        if not p or p.startswith("/") or ".." in p.split("/"):
            fail(INVALID_REQUEST, f"protected file {p!r} must be a path relative to the application folder")
    if node.os == "windows":
        app_present, app_bytes, free_bytes, missing = await _measure_windows(node, protected_files)
    else:
        app_present, app_bytes, free_bytes, missing = await _measure_posix(node, protected_files)
    return storage_verdict(node, package_size, app_present, app_bytes, free_bytes, missing)


async def _measure_windows(node: Node, protected_files: tuple[str, ...]) -> tuple[bool, int, int, list[str]]:
    """The folder's size and protected files over SFTP; the free space of the login
    directory's drive from PowerShell (Get-PSDrive's Free)."""
    from activities.nodefs import SftpFiles, split_drive

    fs = SftpFiles(node)
    async with fs.session() as sftp:
        app_present = bool(await sftp.isdir(node.app_dir))
        home = await sftp.realpath(".")
    listing = await fs.listing(node.app_dir)
    drive, _ = split_drive(str(home).lstrip("/"))
    if not drive:
        fail(SSH_COMMAND_FAILED, f"node {node.name}: the login directory {home!r} is on no drive")
    res = await powershell.run(
        node.ssh, f"(Get-PSDrive -Name {powershell.quote(drive[0])}).Free", what="reading free disk space"
    )
    try:
        free_bytes = int(res.stdout.strip())
    except ValueError:
        fail(SSH_COMMAND_FAILED, f"node {node.name}: unexpected free space {res.stdout.strip()[:100]!r}")
    missing = [p for p in protected_files if p not in listing.files]
    return app_present, sum(listing.files.values()), free_bytes, missing


async def _measure_posix(node: Node, protected_files: tuple[str, ...]) -> tuple[bool, int, int, list[str]]:
    app = shlex.quote(node.app_dir)
    checks = "\n".join(
        f"[ -f {shlex.quote(posixpath.join(node.app_dir, p))} ] || echo missing {i}"
        for i, p in enumerate(protected_files)
    )
    # df's -P keeps one line per filesystem; Available is the third field from the end, so
    # a filesystem name with spaces does not shift it. du's errors (an unreadable
    # subfolder) still leave its total, which is what counts.
    script = f"""if [ -d {app} ]; then du -sk -- {app} 2>/dev/null | awk 'NR==1 {{print "app", $1}}'
else echo "app -"; fi
df -Pk . | awk 'NR>1 {{print "free", $(NF-2)}}'
{checks}
"""
    res = await ssh.run(node.ssh, script, timeout_s=max(60.0, node.ssh.connect_timeout_s * 6), check=False)
    values: dict[str, str] = {}
    missing: list[str] = []
    for line in res.stdout.splitlines():
        m = _STORAGE_LINE.match(line.strip())
        if not m:
            continue
        if m.group(1) == "missing":
            missing.append(protected_files[int(m.group(2))])
        else:
            values.setdefault(m.group(1), m.group(2))
    try:
        app_present = values["app"] != "-"
        app_bytes = int(values["app"]) * 1024 if app_present else 0
        free_bytes = int(values["free"]) * 1024
    except (KeyError, ValueError):
        fail(
            SSH_COMMAND_FAILED,
            f"node {node.name} ({ssh.where(node.ssh)}): cannot measure storage with du / df (exit "
            f"{res.exit_status}); stdout: {res.stdout.strip()[-300:] or '(empty)'}; stderr: "
            f"{res.stderr.strip()[-500:] or '(empty)'}",
        )
    return app_present, app_bytes, free_bytes, missing


def storage_verdict(
    node: Node, package_size: int, app_present: bool, app_bytes: int, free_bytes: int, missing: list[str]
) -> NodeStorage:
    need = storage_need(app_bytes, package_size)
    problems = []
    if free_bytes < need:
        problems.append(f"only {_mib(free_bytes)} free in the login directory, {_mib(need)} needed")
    if not app_present:
        problems.append(f"application folder {node.app_dir} does not exist")
    if missing:
        problems.append(f"protected file(s) missing: {', '.join(missing)}")
    basis = (
        f"app folder {_mib(app_bytes)} (backup) + 3 x package {_mib(package_size)} + 10% = "
        f"{_mib(need)}; {_mib(free_bytes)} free"
    )
    # No folder: nothing to back up and restore to, so the deploy could not be undone.
    ok = free_bytes >= need and app_present and not missing
    detail = f"node {node.name}: " + ("; ".join(problems) + f" ({basis})" if problems else f"ok: {basis}")
    return NodeStorage(
        app_bytes=app_bytes,
        free_bytes=free_bytes,
        need_bytes=need,
        missing_protected=tuple(missing),
        ok=ok,
        detail=detail,
        node_name=node.name,
    )


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


async def recycle(node: Node) -> ServiceState:
    """Recycle the service: IIS's Restart-WebAppPool (a stopped pool is started), waited
    until Started; a service without a recycle verb is stopped, then started."""
    cmds = service_commands(node.service)
    if not cmds.recycle:
        await set_running(node, running=False)
        st = await set_running(node, running=True)
        return ServiceState(node_name=st.node_name, running=st.running, detail=st.detail, changed=True)
    deadline = time.monotonic() + node.service.timeout_s
    res = await ssh.run(node.ssh, cmds.recycle, timeout_s=node.service.timeout_s, check=False)
    if res.exit_status != 0:
        said = tail(res.stdout, 700) or tail(powershell.readable_stderr(res.stderr), 1200)
        fail(
            SSH_COMMAND_FAILED,
            f"node {node.name} ({ssh.where(node.ssh)}): the IIS recycle script exited with status "
            f"{res.exit_status}: {said or '(no output)'}",
        )
    st = await _wait_state(node, True, deadline, "recycle")
    return ServiceState(node_name=st.node_name, running=st.running, detail=st.detail, changed=True)


@activity.defn
async def recycle_service(req: ServiceRequest) -> ServiceState:
    """Recycle the node's service (seed 001's "recycle the app pool" at a DR site); its
    health is a separate check (http_checks.wait_healthy)."""
    return await recycle(req.node)


@activity.defn
async def service_status(req: ServiceRequest) -> ServiceState:
    return await status_of(req.node)


@activity.defn
async def inspect_node_storage(req: NodeStorageRequest) -> NodeStorage:
    """Preflight, read-only: is there room next to the app folder for the backup and the
    package (NodeStorage.ok), and is every protected file there? Reports, never raises
    for a shortage, so a preflight can list every node's problem at once."""
    return await inspect_storage(req.node, tuple(req.protected_files), req.package_size)


# --------------------------------------------------------------------------- health file, settings, sessions
# What the blue/green procedures (seeds 003 and 004) do to a node besides its service.

HELD_DIR = ".zerodown/held"


def _check_rel(kind: str, rel: str) -> None:
    parts = rel.split("/")
    if not rel or rel.startswith("/") or ".." in parts:
        fail(INVALID_REQUEST, f"{kind} {rel!r} must be a path below the node's login folder")


@dataclass(frozen=True)
class HealthFileRequest:
    node: Node
    # Application.health_file: relative to the node's login folder.
    path: str
    present: bool


@dataclass(frozen=True)
class HealthFileState:
    node_name: str
    present: bool
    changed: bool


def health_file_script(path: str, present: bool) -> str:
    """Removing the file moves it aside (.zerodown/held/), so putting it back restores the
    very file the site had; both directions are no-ops when already done."""
    held = f"{HELD_DIR}/{posixpath.basename(path)}"
    f, h = shlex.quote(path), shlex.quote(held)
    if present:
        return (
            f"if [ -f {f} ]; then echo unchanged; elif [ -f {h} ]; then mv {h} {f} && echo changed; "
            f'else mkdir -p "$(dirname {f})" && echo OK > {f} && echo changed; fi'
        )
    return (
        f"if [ -f {f} ]; then mkdir -p {shlex.quote(HELD_DIR)} && mv -f {f} {h} && echo changed; "
        "else echo unchanged; fi"
    )


@activity.defn
async def set_health_file(req: HealthFileRequest) -> HealthFileState:
    """Seed 003 step 12: take the health-check file away (the balancer's check then fails
    with 404 and, with `http-check disable-on-404`, the server takes no new sessions while
    its open ones finish) or put it back."""
    _check_rel("health file", req.path)
    if req.node.os == "windows":
        changed = await _health_file_sftp(req.node, req.path, req.present)
        return HealthFileState(node_name=req.node.name, present=req.present, changed=changed)
    r = await ssh.run(req.node.ssh, health_file_script(req.path, req.present), timeout_s=30)
    return HealthFileState(
        node_name=req.node.name, present=req.present, changed=r.stdout.strip().endswith("changed")
    )


async def _health_file_sftp(node: Node, path: str, present: bool) -> bool:
    """health_file_script's steps over SFTP alone (any OS): the file moved aside to
    .zerodown/held/ and back, or written when it never existed. True when something changed."""
    from activities.nodefs import SftpFiles

    held = f"{HELD_DIR}/{posixpath.basename(path)}"
    fs = SftpFiles(node)
    if present:
        if await fs.is_file(path):
            return False
        if await fs.is_file(held):
            await fs.rename(held, path)
            return True
        parent = posixpath.dirname(path)
        if parent:
            await fs.makedirs(parent)
        await ssh.put_bytes(node.ssh, b"OK\n", path)
        return True
    if not await fs.is_file(path):
        return False
    await fs.makedirs(HELD_DIR)
    await fs.remove_files("", [held])  # an older copy held there: the current file wins
    await fs.rename(path, held)
    return True


@dataclass(frozen=True)
class ConfigValuesRequest:
    node: Node
    # A key = value file relative to the node's app folder.
    file: str
    values: dict[str, str]
    # Keys whose values are secrets: the reference travels, the value is resolved here.
    secret_values: dict[str, SecretRef] = field(default_factory=dict)


@activity.defn
async def set_config_values(req: ConfigValuesRequest) -> tuple[str, ...]:
    """Set keys of a key = value file in the node's app folder (a set: running it twice
    writes the same file). Returns the keys set, never their values (they may be secrets)."""
    from activities.secrets import resolve_secret
    from activities.staging import apply_overrides

    _check_rel("config file", req.file)
    both = set(req.values) & set(req.secret_values)
    if both:
        fail(INVALID_REQUEST, f"{req.file}: {', '.join(sorted(both))} given both as a value and as a secret")
    values = dict(req.values)
    for key, ref in req.secret_values.items():
        values[key] = resolve_secret(ref, needed_by=f"{req.file}:{key} on {req.node.name}")
    path = f"{req.node.app_dir.rstrip('/')}/{req.file}"
    current = await ssh.get_file(req.node.ssh, path)
    text = current.decode("utf-8") if current is not None else ""
    new = apply_overrides(text, values)
    if new != text:
        await ssh.put_bytes(req.node.ssh, new.encode("utf-8"), path)
    return tuple(sorted(values))


@dataclass(frozen=True)
class NodeCommandRequest:
    node: Node
    command: str
    timeout_s: float = 300.0


@activity.defn
async def run_node_command(req: NodeCommandRequest) -> str:
    """One of the inventory's own commands on a node (seed 003 step 4: systems-level changes
    to a new server); fails with the exit status and stderr. Returns the output's tail."""
    r = await ssh.run(req.node.ssh, req.command, timeout_s=req.timeout_s, check=True)
    return r.stdout.strip()[-1000:]


def port_of_url(url: str) -> int:
    """The TCP port a node's url names (its scheme's default when none)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else 80)


def sessions_command(port: int) -> str:
    # Established TCP connections whose local port is the application's: what is left of
    # the sessions once the balancer no longer sends any (iproute2's ss, on every Linux).
    return f"ss -Htn state established '( sport = :{port} )' | wc -l"


@dataclass(frozen=True)
class OpenSessions:
    node_name: str
    port: int
    sessions: int


@activity.defn
async def count_open_sessions(req: ServiceRequest) -> OpenSessions:
    """Seed 003 step 18: the sessions a server still holds, counted on the server itself
    (after it left the balancer, the balancer no longer sees them)."""
    port = port_of_url(req.node.url)
    if req.node.os == "windows":
        # Get-NetTCPConnection errors when nothing matches: SilentlyContinue makes that 0.
        r = await powershell.run(
            req.node.ssh,
            f"@(Get-NetTCPConnection -LocalPort {port} -State Established "
            "-ErrorAction SilentlyContinue).Count",
            what="counting open sessions",
            timeout_s=30,
        )
    else:
        r = await ssh.run(req.node.ssh, sessions_command(port), timeout_s=30)
    try:
        n = int(r.stdout.strip() or "0")
    except ValueError:
        fail(SSH_COMMAND_FAILED, f"node {req.node.name}: unexpected session count {r.stdout.strip()[:100]!r}")
    return OpenSessions(node_name=req.node.name, port=port, sessions=n)
