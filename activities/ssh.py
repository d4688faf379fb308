"""SSH to the nodes: a connection pool, command execution and SFTP transfers.

One asyncssh connection per (host, port, user, credentials, known_hosts) is opened lazily
and reused by every activity running on this worker; a connection found closed is replaced.
Errors are translated into the contract's ApplicationError types so the workflow can
tell "retry later" (SshUnreachable, SshCommandTimeout) from "an operator must act"
(SshAuthFailed, SshHostKeyMismatch, SshCommandFailed).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import posixpath
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncssh
from temporalio import activity

from activities.common import fail, tail, with_heartbeat
from activities.secrets import redact, register_secret, resolve_secret
from errors import (
    SECRET_UNAVAILABLE,
    SSH_AUTH_FAILED,
    SSH_COMMAND_FAILED,
    SSH_COMMAND_TIMEOUT,
    SSH_HOST_KEY_MISMATCH,
    SSH_UNREACHABLE,
)
from inventory.model import SshTarget


@dataclass(frozen=True)
class CommandResult:
    exit_status: int
    stdout: str
    stderr: str


def where(target: SshTarget) -> str:
    return f"{target.user}@{target.host}:{target.port}"


_PoolKey = tuple[str, int, str, str, str, str, int]


class SshPool:
    """Reusable connections, keyed by endpoint *and* credentials.

    Credentials are part of the key so that a request with another key (or a wrong one)
    never rides on a connection authenticated with different credentials. The event loop
    is part of the key too: asyncssh connections are bound to the loop that opened them.
    """

    def __init__(self) -> None:
        self._conns: dict[_PoolKey, asyncssh.SSHClientConnection] = {}
        self._locks: dict[_PoolKey, asyncio.Lock] = {}

    @staticmethod
    def _key(target: SshTarget) -> _PoolKey:
        return (
            target.host,
            target.port,
            target.user,
            target.key.describe() if target.key else "",
            target.password.describe() if target.password else "",
            target.known_hosts or "",
            id(asyncio.get_running_loop()),
        )

    async def connection(self, target: SshTarget) -> tuple[asyncssh.SSHClientConnection, bool]:
        """Return (connection, reused): reused=True when it came from the pool."""
        key = self._key(target)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            conn = self._conns.get(key)
            if conn is not None and not conn.is_closed():
                return conn, True
            conn = await connect(target)
            self._conns[key] = conn
            return conn, False

    def discard(self, target: SshTarget, conn: asyncssh.SSHClientConnection) -> None:
        key = self._key(target)
        if self._conns.get(key) is conn:
            del self._conns[key]
        conn.close()

    async def close_all(self) -> None:
        conns, self._conns = list(self._conns.values()), {}
        for c in conns:
            c.close()
        for c in conns:
            with contextlib.suppress(Exception):
                await c.wait_closed()


POOL = SshPool()


async def connect(target: SshTarget) -> asyncssh.SSHClientConnection:
    """Open a new authenticated connection, translating failures into typed errors."""
    options: dict[str, object] = {
        "username": target.user,
        "connect_timeout": target.connect_timeout_s,
        "agent_path": None,  # only the inventory's credentials, never the worker's agent
        "keepalive_interval": 15,
    }
    if target.known_hosts is not None:
        options["known_hosts"] = target.known_hosts
    if target.key is not None:
        key_text = resolve_secret(target.key, needed_by=f"ssh {where(target)}")
        for line in key_text.splitlines():
            if len(line) >= 16 and not line.startswith("-----"):
                register_secret(line)  # a line of the key's body, should one ever be quoted
        try:
            options["client_keys"] = [asyncssh.import_private_key(key_text)]
        except (asyncssh.KeyImportError, ValueError) as e:
            fail(
                SECRET_UNAVAILABLE,
                f"secret {target.key.describe()} is not a usable private key for ssh {where(target)}: {e}",
            )
    else:
        options["client_keys"] = []
    if target.password is not None:
        options["password"] = resolve_secret(target.password, needed_by=f"ssh {where(target)}")
    try:
        return await asyncssh.connect(target.host, target.port, **options)
    except asyncssh.PermissionDenied as e:
        fail(SSH_AUTH_FAILED, f"ssh {where(target)}: authentication refused ({e.reason})", cause=e)
    except asyncssh.HostKeyNotVerifiable as e:
        fail(
            SSH_HOST_KEY_MISMATCH,
            f"ssh {where(target)}: host key not trusted by known_hosts "
            f"{target.known_hosts or '(default)'}: {e.reason}",
            cause=e,
        )
    except (TimeoutError, OSError, asyncssh.DisconnectError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e) or type(e).__name__
        fail(SSH_UNREACHABLE, f"ssh {where(target)}: cannot connect: {reason}", retryable=True, cause=e)


# Errors meaning "the pooled connection went away under us": reconnect once and retry.
_STALE = (
    asyncssh.ChannelOpenError,
    asyncssh.ConnectionLost,
    asyncssh.DisconnectError,
    BrokenPipeError,
    ConnectionResetError,
)


def _after_channel_error(
    target: SshTarget, conn: asyncssh.SSHClientConnection, may_retry: bool, e: Exception
) -> None:
    """A channel could not be opened. On a connection that died (server restarted, idle
    timeout) reconnect once; on a live one the server refused the channel (e.g. OpenSSH
    MaxSessions): keep the connection, which other activities are using, and let the
    activity retry later."""
    if conn.is_closed():
        POOL.discard(target, conn)
        if may_retry:
            return
        fail(SSH_UNREACHABLE, f"ssh {where(target)}: connection lost: {e}", retryable=True, cause=e)
    fail(
        SSH_UNREACHABLE,
        f"ssh {where(target)}: the server refused a new channel: {e}",
        retryable=True,
        cause=e,
    )


async def run(
    target: SshTarget, command: str, timeout_s: float = 60.0, check: bool = True, input: str | None = None
) -> CommandResult:
    """Run `command` (a shell command line) on the target; heartbeat while it runs.

    check=True turns a non-zero exit into SshCommandFailed (non-retryable) naming host,
    command, exit status and the end of stderr.
    """
    # No input: stdin is /dev/null so a command reading stdin cannot hang the step.
    stdin: dict[str, object] = {"input": input} if input is not None else {"stdin": asyncssh.DEVNULL}
    proc: asyncssh.SSHClientProcess[str] | None = None
    for attempt in (1, 2):
        conn, reused = await POOL.connection(target)
        try:
            proc = await conn.create_process(command, encoding="utf-8", errors="replace", **stdin)
            break
        except _STALE as e:
            _after_channel_error(target, conn, reused and attempt == 1, e)
    assert proc is not None
    return await _finish(target, command, proc, conn, timeout_s, check)


class Staged:
    """A command started ahead of time, waiting on its standard input (see `staged`)."""

    def __init__(
        self,
        target: SshTarget,
        command: str,
        proc: asyncssh.SSHClientProcess[str],
        conn: asyncssh.SSHClientConnection,
    ) -> None:
        self.target, self.command, self._proc, self._conn = target, command, proc, conn
        self._sent = False

    def go(self, text: str) -> None:
        """Hand the command the rest of its input and close it: it runs now."""
        self._proc.stdin.write(text)
        self._proc.stdin.write_eof()
        self._sent = True

    async def result(self, timeout_s: float, check: bool = False) -> CommandResult:
        return await _finish(self.target, self.command, self._proc, self._conn, timeout_s, check)


@contextlib.asynccontextmanager
async def staged(target: SshTarget, command: str, first_input: str = "") -> AsyncIterator[Staged]:
    """Open the channel and start `command` now, to run it later without the channel's set-up:
    the command must wait for its input (e.g. `read -r go`). `first_input` is written at once
    (a secret the command reads first). Left without `go`, it gets an empty input (EOF) and
    must then do nothing."""
    proc: asyncssh.SSHClientProcess[str] | None = None
    for attempt in (1, 2):
        conn, reused = await POOL.connection(target)
        try:
            proc = await conn.create_process(command, encoding="utf-8", errors="replace")
            break
        except _STALE as e:
            _after_channel_error(target, conn, reused and attempt == 1, e)
    assert proc is not None
    if first_input:
        proc.stdin.write(first_input)
    handle = Staged(target, command, proc, conn)
    try:
        yield handle
    finally:
        if not handle._sent:
            with contextlib.suppress(Exception):
                proc.stdin.write_eof()
        proc.close()


async def _finish(
    target: SshTarget,
    command: str,
    proc: asyncssh.SSHClientProcess[str],
    conn: asyncssh.SSHClientConnection,
    timeout_s: float,
    check: bool,
) -> CommandResult:
    # The command line as heartbeats and errors show it: masked first (a tool given its
    # password as an argument), cut after, so a cut never leaves half a secret in the clear.
    shown = redact(command)
    try:
        started = time.monotonic()
        done = await with_heartbeat(
            proc.wait(check=False, timeout=timeout_s),
            lambda: {
                "host": where(target),
                "command": shown[:200],
                "running_s": round(time.monotonic() - started, 1),
            },
        )
    except asyncssh.TimeoutError as e:
        fail(
            SSH_COMMAND_TIMEOUT,
            f"ssh {where(target)}: command {shown!r} did not finish within {timeout_s:g}s; "
            f"stderr: {tail(redact(str(e.stderr or '')))}",
            retryable=True,
            cause=e,
        )
    except _STALE as e:
        POOL.discard(target, conn)
        fail(
            SSH_UNREACHABLE,
            f"ssh {where(target)}: connection lost while running {shown!r}: {redact(str(e))}",
            retryable=True,
            cause=e,
        )
    finally:
        proc.close()
    if done.exit_status is None and done.exit_signal is None and conn.is_closed():
        POOL.discard(target, conn)
        fail(SSH_UNREACHABLE, f"ssh {where(target)}: connection lost while running {shown!r}", retryable=True)
    exit_status = done.exit_status if done.exit_status is not None else 255
    result = CommandResult(
        exit_status=exit_status, stdout=str(done.stdout or ""), stderr=str(done.stderr or "")
    )
    if check and result.exit_status != 0:
        signal = f" (signal {done.exit_signal[0]})" if done.exit_signal else ""
        fail(
            SSH_COMMAND_FAILED,
            f"ssh {where(target)}: command {shown!r} exited with status {result.exit_status}"
            f"{signal}; stderr: {tail(redact(result.stderr)) or '(empty)'}",
        )
    return result


async def _sftp(target: SshTarget) -> asyncssh.SFTPClient:
    for attempt in (1, 2):
        conn, reused = await POOL.connection(target)
        try:
            return await conn.start_sftp_client()
        except _STALE as e:
            _after_channel_error(target, conn, reused and attempt == 1, e)
    raise AssertionError("unreachable")


def _sftp_fail(target: SshTarget, what: str, e: Exception) -> None:
    if isinstance(e, asyncssh.SFTPError):
        fail(SSH_COMMAND_FAILED, f"sftp {where(target)}: {what}: {e.reason}", cause=e)
    fail(SSH_UNREACHABLE, f"sftp {where(target)}: {what}: {e}", retryable=True, cause=e)


async def _ensure_parent(sftp: asyncssh.SFTPClient, remote_path: str) -> None:
    parent = posixpath.dirname(remote_path)
    if parent and parent not in (".", "/"):
        await sftp.makedirs(parent, exist_ok=True)


async def put_file(target: SshTarget, local_path: str, remote_path: str) -> None:
    """Upload a local file (parent folders are created)."""
    sftp = await _sftp(target)
    try:
        await _ensure_parent(sftp, remote_path)
        await with_heartbeat(
            sftp.put(local_path, remote_path), lambda: {"host": where(target), "upload": remote_path}
        )
    except (asyncssh.SFTPError, *_STALE) as e:
        _sftp_fail(target, f"upload {local_path} -> {remote_path}", e)
    finally:
        sftp.exit()


async def put_bytes(target: SshTarget, data: bytes, remote_path: str, mode: int | None = None) -> None:
    """Write `data` into a remote file (created or truncated, parents created).

    `mode` (e.g. 0o600): the file is created with it, and an existing file gets it before
    the new content is written.
    """
    sftp = await _sftp(target)
    try:
        await _ensure_parent(sftp, remote_path)
        attrs = asyncssh.SFTPAttrs(permissions=mode) if mode is not None else asyncssh.SFTPAttrs()
        async with sftp.open(remote_path, "wb", attrs) as f:
            if mode is not None:
                await f.chmod(mode)
            await f.write(data)
    except (asyncssh.SFTPError, *_STALE) as e:
        _sftp_fail(target, f"write {remote_path}", e)
    finally:
        sftp.exit()


async def get_file(target: SshTarget, remote_path: str) -> bytes | None:
    """The remote file's content, or None when it does not exist."""
    sftp = await _sftp(target)
    try:
        async with sftp.open(remote_path, "rb") as f:
            data: bytes = await f.read()
            return data
    except asyncssh.SFTPNoSuchFile:
        return None
    except (asyncssh.SFTPError, *_STALE) as e:
        _sftp_fail(target, f"read {remote_path}", e)
        raise
    finally:
        sftp.exit()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- activity


@dataclass(frozen=True)
class SshProbeRequest:
    target: SshTarget


@dataclass(frozen=True)
class SshProbeResult:
    host: str
    port: int
    ok: bool
    uname: str = ""
    elapsed_ms: int = 0
    # When ok is False: the error type (SshUnreachable, SshAuthFailed, ...) and message.
    error_type: str = ""
    error: str = ""


async def probe(target: SshTarget) -> SshProbeResult:
    from temporalio.exceptions import ApplicationError

    started = time.monotonic()
    try:
        res = await run(
            target, "uname -sr 2>/dev/null || ver", timeout_s=max(5.0, target.connect_timeout_s), check=False
        )
    except ApplicationError as e:
        return SshProbeResult(
            host=target.host,
            port=target.port,
            ok=False,
            elapsed_ms=int((time.monotonic() - started) * 1000),
            error_type=e.type or "",
            error=e.message,
        )
    return SshProbeResult(
        host=target.host,
        port=target.port,
        ok=True,
        uname=res.stdout.strip(),
        elapsed_ms=int((time.monotonic() - started) * 1000),
    )


@activity.defn
async def ssh_probe(req: SshProbeRequest) -> SshProbeResult:
    """Preflight: can we log in? Never raises for SSH problems - it reports them (ok=False,
    error_type, error) so a preflight can list every unreachable node at once."""
    return await probe(req.target)
