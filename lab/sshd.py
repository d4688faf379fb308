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

Control: `start_sshd(cfg)`, `stop_sshd(cfg)`, `sshd_running(cfg)`; keys: `ensure_keys(cfg)`.
Process: ``python -m lab.sshd --root ROOT --nodes N --port-base P --ox-nodes K``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import asyncssh

from lab.config import STAGING_NAME, LabConfig
from lab.procs import pid_alive, port_open, start_background, stop_pidfile, wait_port

SSH_USER = "zerodown"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("lab.sshd")
_tasks: set[asyncio.Task[None]] = set()  # running commands (strong refs for the loop)


# --------------------------------------------------------------------------- endpoints


def endpoints(cfg: LabConfig) -> list[tuple[str, int, Path]]:
    """(name, SSH port, folder) of every endpoint: the nodes, the staging system, then the
    OX nodes."""
    return [*((cfg.node_name(i), cfg.ssh_port(i), cfg.node_dir(i)) for i in cfg.node_indexes),
            (STAGING_NAME, cfg.staging_ssh_port, cfg.staging_dir),
            *((cfg.ox_node_name(i), cfg.ox_ssh_port(i), cfg.ox_node_dir(i)) for i in cfg.ox_node_indexes)]


# --------------------------------------------------------------------------- keys


def _write_key(path: Path, key: asyncssh.SSHKey) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    key.write_private_key(str(path))
    path.chmod(0o600)


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
        cfg.known_hosts.write_text("\n".join(new) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- server side


class _NodeServer(asyncssh.SSHServer):
    """Public-key auth for user `zerodown` with the lab's client key; nothing else."""

    def __init__(self, name: str, authorized: set[bytes]) -> None:
        self._name = name
        self._authorized = authorized
        self._peer = "?"
        self._authed = False

    def auth_completed(self) -> None:
        self._authed = True

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        peer = conn.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if peer else "?"

    def connection_lost(self, exc: Exception | None) -> None:
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
            log.info("%s: refused key %s for user %r from %s", self._name,
                     key.get_fingerprint(), username, self._peer)
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
    env = dict(os.environ, HOME=str(node_dir), PWD=str(node_dir), USER=SSH_USER, LOGNAME=SSH_USER,
               SSH_CONNECTION=f"{peer[0]} {peer[1]}" if peer else "")
    status: int
    try:
        proc = await asyncio.create_subprocess_exec(
            "sh", "-c", command, cwd=node_dir, env=env, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
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
    _append_log(node_dir / "ssh.log", {
        "time": started.isoformat(timespec="milliseconds"), "node": name, "command": command,
        "exit_status": status, "duration_s": round(time.monotonic() - t0, 3)})
    with contextlib.suppress(OSError, asyncssh.Error):
        process.exit(status)


async def serve(cfg: LabConfig, stop: asyncio.Event) -> None:
    """Serve every node's endpoint until `stop` is set."""
    host_key = asyncssh.read_private_key(str(cfg.host_key))
    pub = cfg.client_key.with_name(cfg.client_key.name + ".pub")
    authorized = {asyncssh.read_public_key(str(pub)).public_data}
    servers: list[asyncssh.SSHAcceptor] = []
    for name, port, node_dir in endpoints(cfg):
        node_dir.mkdir(parents=True, exist_ok=True)

        def make_server(name: str = name) -> _NodeServer:
            return _NodeServer(name, authorized)

        async def handle(process: asyncssh.SSHServerProcess[bytes], node_dir: Path = node_dir,
                         name: str = name) -> None:
            # Shielded: if asyncssh cancels the handler when the client vanishes, the command
            # still runs to completion and gets reaped and logged.
            task = asyncio.create_task(_run_command(process, node_dir, name))
            _tasks.add(task)
            task.add_done_callback(_tasks.discard)
            await asyncio.shield(task)

        def make_sftp(chan: asyncssh.SSHServerChannel[bytes],
                      node_dir: Path = node_dir) -> asyncssh.SFTPServer:
            return asyncssh.SFTPServer(chan, chroot=os.fsencode(node_dir))

        servers.append(await asyncssh.listen(
            "127.0.0.1", port, server_host_keys=[host_key], server_factory=make_server,
            process_factory=handle, sftp_factory=make_sftp, allow_scp=True, encoding=None,
            login_timeout=30, keepalive_interval=15))
        log.info("%s: listening on 127.0.0.1:%d, root %s", name, port, node_dir)
    await stop.wait()
    for s in servers:
        s.close()
    for s in servers:
        await s.wait_closed()
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
        start_background([cfg.python, "-m", "lab.sshd", "--root", str(cfg.abs_root), "--nodes",
                          str(cfg.nodes), "--port-base", str(cfg.port_base), "--ox-nodes", str(cfg.ox_nodes)],
                         _pidfile(cfg), _logfile(cfg), cwd=PROJECT_ROOT)
    for name, port, _ in endpoints(cfg):
        wait_port("127.0.0.1", port, timeout, pidfile=_pidfile(cfg), logfile=_logfile(cfg),
                  what=f"lab sshd ({name})")


def stop_sshd(cfg: LabConfig) -> bool:
    """Stop the SSH endpoints; True when one was running. Apps started through it live on."""
    return stop_pidfile(_pidfile(cfg), timeout=10)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lab.sshd", description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--port-base", type=int, required=True)
    p.add_argument("--ox-nodes", type=int, default=0)
    a = p.parse_args(argv)
    logging.basicConfig(stream=sys.stdout, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    cfg = LabConfig(root=a.root, nodes=a.nodes, port_base=a.port_base, ox_nodes=a.ox_nodes)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(cfg, stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()
