"""The lab's SSH endpoints: one asyncssh server per node, all in ONE background process.

Each node i listens on 127.0.0.1:cfg.ssh_port(i), the staging system on
cfg.staging_ssh_port (rooted at cfg.staging_dir), each OX node i on cfg.ox_ssh_port(i)
(rooted at cfg.ox_node_dir(i)), and behaves like a locked-down customer
server: user `zerodown`, public-key auth only (cfg.client_key.pub), host key cfg.host_key.

* exec requests run ``sh -c <command>`` in the node's folder (cfg.node_dir(i)); stdin,
  stdout and stderr are piped through, the real exit status is returned, and one JSON line
  per command is appended to ``<node dir>/ssh.log`` (time, command, exit status, duration).
* SFTP (and scp) is chrooted at the node's folder.
* Interactive shells / PTYs are refused: zerodown only ever runs commands.

A client that vanishes mid-command does not kill the command (as with OpenSSH without a
PTY): it runs to completion, its output is discarded. Processes a command starts with
setsid live on after the session, e.g. the app started by ``./ctl start``.

Endpoints come and go at run time: nodes the lab provisioned (lab/provision.py, its
registry `provisioned.json`) get one, original nodes it destroyed lose theirs. On SIGHUP the
process re-reads the registry, listens on the new endpoints and closes the ones that went
(their open sessions too); `reload_sshd(cfg, opened=, closed=)` sends it and waits.

Windows endpoints (lab/windows): every node i <= 9 also gets one on cfg.win_ssh_port(i), the
staging system one on cfg.win_staging_ssh_port, named "win:<node>" in `endpoints(cfg)`: same
user, keys and host key, but Win32-OpenSSH's personality (cmd.exe, drive-letter SFTP; see
lab/windows/README.md).

Control: `start_sshd(cfg)`, `stop_sshd(cfg)`, `sshd_running(cfg)`, `reload_sshd(cfg)`; keys:
`ensure_keys(cfg)`.
Process: ``python -m lab.sshd --root ROOT --nodes N --port-base P --ox-nodes K``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import asyncssh

from lab.config import STAGING_NAME, LabConfig
from lab.procs import (
    ProcessStartError,
    log_tail,
    pid_alive,
    port_open,
    read_pid,
    start_background,
    stop_pidfile,
    wait_port,
)

SSH_USER = "zerodown"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("lab.sshd")
_tasks: set[asyncio.Task[None]] = set()  # running commands (strong refs for the loop)


# --------------------------------------------------------------------------- endpoints


def endpoints(cfg: LabConfig) -> list[tuple[str, int, Path]]:
    """(name, SSH port, folder) of every endpoint: the nodes (but those the lab destroyed),
    the staging system, the OX nodes, the nodes the lab provisioned, then the Windows
    endpoints ("win:<node>", lab/windows) of nodes 1..9 (but destroyed ones) and staging."""
    from lab.provision import endpoint_changes  # lab.provision uses this module
    from lab.windows.endpoint import endpoint_name

    extra, destroyed = endpoint_changes(cfg)
    return [
        *(
            (cfg.node_name(i), cfg.ssh_port(i), cfg.node_dir(i))
            for i in cfg.node_indexes
            if cfg.node_name(i) not in destroyed
        ),
        (STAGING_NAME, cfg.staging_ssh_port, cfg.staging_dir),
        *((cfg.ox_node_name(i), cfg.ox_ssh_port(i), cfg.ox_node_dir(i)) for i in cfg.ox_node_indexes),
        *extra,
        *(
            (endpoint_name(cfg.node_name(i)), cfg.win_ssh_port(i), cfg.node_dir(i))
            for i in cfg.win_node_indexes
            if cfg.node_name(i) not in destroyed
        ),
        (endpoint_name(STAGING_NAME), cfg.win_staging_ssh_port, cfg.staging_dir),
    ]


# --------------------------------------------------------------------------- keys


def _write_key(path: Path, key: asyncssh.SSHKey) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    key.write_private_key(str(path))
    path.chmod(0o600)


def approver_public_keys(cfg: LabConfig) -> dict[str, list[str]]:
    """Each lab approver's public key line, its key pair generated the first time."""
    from lab.config import LAB_APPROVERS

    keys: dict[str, list[str]] = {}
    for name in LAB_APPROVERS:
        path = cfg.approver_key(name)
        if not path.exists():
            _write_key(path, asyncssh.generate_private_key("ssh-ed25519", comment=f"{name}@zerodown-lab"))
            path.with_name(name + ".pub").unlink(missing_ok=True)
        pub = path.with_name(name + ".pub")
        if not pub.exists():
            asyncssh.read_private_key(str(path)).write_public_key(str(pub))
        keys[name] = [pub.read_text(encoding="utf-8").strip()]
    return keys


def ensure_keys(cfg: LabConfig) -> None:
    """Create the client key (+ .pub), the host key and known_hosts entries where missing.

    known_hosts gets one ``[127.0.0.1]:<port> <host key>`` line per node; lines for these
    ports that name another key (host key regenerated) are replaced, other lines kept.
    """
    pub = cfg.client_key.with_name(cfg.client_key.name + ".pub")
    if not cfg.client_key.exists():
        _write_key(cfg.client_key, asyncssh.generate_private_key("ssh-ed25519", comment="zerodown-lab"))
        pub.unlink(missing_ok=True)
    if not pub.exists():
        asyncssh.read_private_key(str(cfg.client_key)).write_public_key(str(pub))
    if not cfg.host_key.exists():
        _write_key(cfg.host_key, asyncssh.generate_private_key("ssh-ed25519", comment="zerodown-lab-host"))
    host_pub = asyncssh.read_private_key(str(cfg.host_key)).export_public_key("openssh").decode().split()
    host_entry = f"{host_pub[0]} {host_pub[1]}"
    wanted = {f"[127.0.0.1]:{port}": f"[127.0.0.1]:{port} {host_entry}" for _, port, _ in endpoints(cfg)}
    try:
        old = cfg.known_hosts.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        old = []
    kept = [ln for ln in old if ln.split(" ", 1)[0] not in wanted or ln in wanted.values()]
    present = set(kept)
    new = kept + [ln for ln in wanted.values() if ln not in present]
    if new != old:
        cfg.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        # Replaced atomically: SSH clients read it while nodes are provisioned at run time.
        tmp = cfg.known_hosts.with_name(cfg.known_hosts.name + ".new")
        tmp.write_text("\n".join(new) + "\n", encoding="utf-8")
        tmp.replace(cfg.known_hosts)


# --------------------------------------------------------------------------- server side


class _NodeServer(asyncssh.SSHServer):
    """Public-key auth for user `zerodown` with the lab's client key; nothing else."""

    def __init__(
        self, name: str, authorized: set[bytes], conns: set[asyncssh.SSHServerConnection] | None = None
    ) -> None:
        self._name = name
        self._authorized = authorized
        self._peer = "?"
        self._authed = False
        # The endpoint's open connections, closed when the endpoint goes (a terminated node).
        self._conns = conns if conns is not None else set()
        self._conn: asyncssh.SSHServerConnection | None = None

    def auth_completed(self) -> None:
        self._authed = True

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        peer = conn.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self._conn = conn
        self._conns.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._conns.discard(self._conn)
        # Port probes (connect, close) are not worth a line; a session that dies is.
        if exc is not None and self._authed:
            log.info("%s: connection from %s lost: %s", self._name, self._peer, exc)

    def begin_auth(self, username: str) -> bool:
        return True  # authentication is always required

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        ok = username == SSH_USER and key.public_data in self._authorized
        if not ok:
            log.info(
                "%s: refused key %s for user %r from %s",
                self._name,
                key.get_fingerprint(),
                username,
                self._peer,
            )
        return ok


def _append_log(path: Path, entry: dict[str, object]) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
    except OSError as e:  # the audit line must never break the command
        log.warning("cannot write %s: %s", path, e)


async def _pump_out(src: asyncio.StreamReader, dst: asyncssh.SSHWriter[bytes]) -> None:
    """Copy a command's output to the channel; after the client is gone keep reading (and
    discarding) so the command never blocks on a full pipe."""
    connected = True
    while data := await src.read(65536):
        if not connected:
            continue
        try:
            dst.write(data)
            await dst.drain()
        except (OSError, asyncssh.Error, asyncssh.BreakReceived):
            connected = False


async def _pump_in(src: asyncssh.SSHReader[bytes], dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    except (OSError, asyncssh.Error, asyncssh.BreakReceived, asyncssh.TerminalSizeChanged):
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.close()


async def _run_command(process: asyncssh.SSHServerProcess[bytes], node_dir: Path, name: str) -> None:
    command = process.command
    if not command:
        process.stderr.write(b"this endpoint runs commands only (no interactive shell)\n")
        process.exit(1)
        return
    started, t0 = dt.datetime.now(dt.UTC), time.monotonic()
    peer = process.get_extra_info("peername")
    env = dict(
        os.environ,
        HOME=str(node_dir),
        PWD=str(node_dir),
        USER=SSH_USER,
        LOGNAME=SSH_USER,
        SSH_CONNECTION=f"{peer[0]} {peer[1]}" if peer else "",
    )
    status: int
    try:
        proc = await asyncio.create_subprocess_exec(
            "sh",
            "-c",
            command,
            cwd=node_dir,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as e:
        process.stderr.write(f"cannot run command: {e}\n".encode())
        status = 127
    else:
        assert proc.stdin and proc.stdout and proc.stderr
        feeder = asyncio.create_task(_pump_in(process.stdin, proc.stdin))
        await asyncio.gather(_pump_out(proc.stdout, process.stdout), _pump_out(proc.stderr, process.stderr))
        rc = await proc.wait()
        feeder.cancel()
        # A command killed by a signal reports 128+N, as a shell would.
        status = rc if rc >= 0 else 128 - rc
    _append_log(
        node_dir / "ssh.log",
        {
            "time": started.isoformat(timespec="milliseconds"),
            "node": name,
            "command": command,
            "exit_status": status,
            "duration_s": round(time.monotonic() - t0, 3),
        },
    )
    with contextlib.suppress(OSError, asyncssh.Error):
        process.exit(status)


class _Endpoints:
    """The endpoints this process serves, kept equal to `endpoints(cfg)` by `sync`."""

    def __init__(self, cfg: LabConfig) -> None:
        self._cfg = cfg
        self._host_key = asyncssh.read_private_key(str(cfg.host_key))
        pub = cfg.client_key.with_name(cfg.client_key.name + ".pub")
        self._authorized = {asyncssh.read_public_key(str(pub)).public_data}
        # name -> (port, folder, acceptor, open connections)
        self._active: dict[
            str, tuple[int, Path, asyncssh.SSHAcceptor, set[asyncssh.SSHServerConnection]]
        ] = {}

    async def _listen(self, name: str, port: int, node_dir: Path) -> None:
        from lab.windows import endpoint as win_endpoint
        from lab.windows.sftp import WinSFTPServer

        os.makedirs(node_dir, exist_ok=True)
        conns: set[asyncssh.SSHServerConnection] = set()
        authorized = self._authorized
        # A Windows endpoint (lab/windows): its fake drive and IIS config exist before it listens.
        win_node = win_endpoint.prepare_endpoint(self._cfg, name) if win_endpoint.is_windows(name) else None

        def make_server() -> _NodeServer:
            return _NodeServer(name, authorized, conns)

        async def handle(process: asyncssh.SSHServerProcess[bytes]) -> None:
            # Shielded: if asyncssh cancels the handler when the client vanishes, the command
            # still runs to completion and gets reaped and logged.
            if win_node is not None:
                task = asyncio.create_task(win_endpoint.run_command(process, win_node, name))
            else:
                task = asyncio.create_task(_run_command(process, node_dir, name))
            _tasks.add(task)
            task.add_done_callback(_tasks.discard)
            await asyncio.shield(task)

        def make_sftp(chan: asyncssh.SSHServerChannel[bytes]) -> asyncssh.SFTPServer:
            if win_node is not None:
                return WinSFTPServer(chan, win_node)
            return asyncssh.SFTPServer(chan, chroot=os.fsencode(node_dir))

        acceptor = await asyncssh.listen(
            "127.0.0.1",
            port,
            server_host_keys=[self._host_key],
            server_factory=make_server,
            process_factory=handle,
            sftp_factory=make_sftp,
            allow_scp=True,
            encoding=None,
            login_timeout=30,
            keepalive_interval=15,
        )
        self._active[name] = (port, node_dir, acceptor, conns)
        log.info("%s: listening on 127.0.0.1:%d, root %s", name, port, node_dir)

    async def _close(self, name: str) -> None:
        port, _, acceptor, conns = self._active.pop(name)
        acceptor.close()
        for conn in list(conns):  # a terminated server's sessions end with it
            conn.close()
        await acceptor.wait_closed()
        log.info("%s: endpoint on 127.0.0.1:%d closed", name, port)

    async def sync(self, strict: bool) -> None:
        """Serve exactly `endpoints(cfg)`. strict=False (a reload): an endpoint that cannot
        listen is logged and skipped, the others are still served."""
        wanted = {name: (port, d) for name, port, d in endpoints(self._cfg)}
        for name, (port, d, _, _) in list(self._active.items()):
            if wanted.get(name) != (port, d):
                await self._close(name)
        for name, (port, d) in wanted.items():
            if name in self._active:
                continue
            try:
                await self._listen(name, port, d)
            except OSError as e:
                if strict:
                    raise
                log.error("%s: cannot listen on 127.0.0.1:%d: %s", name, port, e)

    async def close_all(self) -> None:
        for name in list(self._active):
            await self._close(name)


async def serve(cfg: LabConfig, stop: asyncio.Event, reload: asyncio.Event | None = None) -> None:
    """Serve every endpoint until `stop` is set; each time `reload` is set, serve what
    `endpoints(cfg)` says then (nodes provisioned or destroyed meanwhile)."""
    eps = _Endpoints(cfg)
    await eps.sync(strict=True)
    reload = reload or asyncio.Event()
    while not stop.is_set():
        stopping = asyncio.ensure_future(stop.wait())
        reloading = asyncio.ensure_future(reload.wait())
        await asyncio.wait({stopping, reloading}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        reloading.cancel()
        if reload.is_set() and not stop.is_set():
            reload.clear()  # a SIGHUP during the sync below runs another one after it
            try:
                await eps.sync(strict=False)
            except Exception:
                log.exception("reload failed")
    await eps.close_all()
    log.info("stopped")


# --------------------------------------------------------------------------- control


def _pidfile(cfg: LabConfig) -> Path:
    return cfg.abs_root / "sshd.pid"


def _logfile(cfg: LabConfig) -> Path:
    return cfg.abs_root / "sshd.log"


def sshd_running(cfg: LabConfig) -> bool:
    return pid_alive(_pidfile(cfg))


def start_sshd(cfg: LabConfig, timeout: float = 20.0) -> None:
    """Start the SSH endpoints (idempotent); returns once every endpoint's port accepts."""
    if sshd_running(cfg) and not all(port_open("127.0.0.1", port) for _, port, _ in endpoints(cfg)):
        # Started by an older lab without the staging endpoint (or another node / OX node count):
        # restart it rather than wait for a port it will never open.
        stop_sshd(cfg)
    if not sshd_running(cfg):
        ensure_keys(cfg)
        # `-m` from the project root finds the `lab` package without touching PYTHONPATH,
        # which the commands (and the apps they start) would otherwise inherit.
        start_background(
            [
                cfg.python,
                "-m",
                "lab.sshd",
                "--root",
                str(cfg.abs_root),
                "--nodes",
                str(cfg.nodes),
                "--port-base",
                str(cfg.port_base),
                "--ox-nodes",
                str(cfg.ox_nodes),
            ],
            _pidfile(cfg),
            _logfile(cfg),
            cwd=PROJECT_ROOT,
        )
    for name, port, _ in endpoints(cfg):
        wait_port(
            "127.0.0.1",
            port,
            timeout,
            pidfile=_pidfile(cfg),
            logfile=_logfile(cfg),
            what=f"lab sshd ({name})",
        )


def reload_sshd(
    cfg: LabConfig, opened: Sequence[int] = (), closed: Sequence[int] = (), timeout: float = 20.0
) -> None:
    """Make the running endpoint process serve `endpoints(cfg)` now (SIGHUP); returns once
    every port of `opened` accepts connections and every port of `closed` refuses them."""
    pidfile = _pidfile(cfg)
    # The staging endpoint is always served: once it listens, the SIGHUP handler is in place
    # (before it, SIGHUP is ignored and would be lost).
    wait_port(
        "127.0.0.1",
        cfg.staging_ssh_port,
        timeout,
        pidfile=pidfile,
        logfile=_logfile(cfg),
        what="lab sshd (staging)",
    )
    pid = read_pid(pidfile)
    if pid is None:
        raise ProcessStartError(f"lab sshd: no pid in {pidfile}")
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while True:
        waiting = [p for p in opened if not port_open("127.0.0.1", p)] + [
            p for p in closed if port_open("127.0.0.1", p)
        ]
        if not waiting:
            return
        if time.monotonic() > deadline or not sshd_running(cfg):
            raise ProcessStartError(
                f"lab sshd: after a reload, ports {waiting} are not as expected "
                f"(opened {list(opened)}, closed {list(closed)}); log "
                f"{_logfile(cfg)}:\n{log_tail(_logfile(cfg))}"
            )
        time.sleep(0.05)


def stop_sshd(cfg: LabConfig) -> bool:
    """Stop the SSH endpoints; True when one was running. Apps started through it live on."""
    return stop_pidfile(_pidfile(cfg), timeout=10)


def main(argv: list[str] | None = None) -> None:
    # Until the loop's handler is installed a SIGHUP (a reload) must not kill the process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    p = argparse.ArgumentParser(prog="python -m lab.sshd", description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--port-base", type=int, required=True)
    p.add_argument("--ox-nodes", type=int, default=0)
    a = p.parse_args(argv)
    logging.basicConfig(
        stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    cfg = LabConfig(root=a.root, nodes=a.nodes, port_base=a.port_base, ox_nodes=a.ox_nodes)
    # A node's sshd is C on a real site: keep the collector's full passes out of the relay
    # (what is loaded now lives as long as the process).
    gc.freeze()

    async def run() -> None:
        stop, reload = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload.set)
        await serve(cfg, stop, reload)

    asyncio.run(run())


if __name__ == "__main__":
    main()
