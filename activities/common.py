"""Shared plumbing for the activity modules: typed errors and heartbeating.

The helpers work both inside a Temporal activity and in plain async code (tests, the CLI's
preflight), so the real logic of every adapter can be exercised without a worker:
`heartbeat()` is a no-op outside an activity context.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

from temporalio import activity
from temporalio.exceptions import ApplicationError

T = TypeVar("T")

# Error types (ApplicationError.type) - the contract in ARCHITECTURE.md plus a few
# adapter-specific ones the workflow can match on.
SECRET_UNAVAILABLE = "SecretUnavailable"
SSH_UNREACHABLE = "SshUnreachable"
SSH_AUTH_FAILED = "SshAuthFailed"
SSH_HOST_KEY_MISMATCH = "SshHostKeyMismatch"
SSH_COMMAND_FAILED = "SshCommandFailed"
SSH_COMMAND_TIMEOUT = "SshCommandTimeout"
SERVICE_TIMEOUT = "ServiceTimeout"
LB_MEMBER_NOT_FOUND = "LbMemberNotFound"
LB_RUNTIME_API_ERROR = "LbRuntimeApiError"
LB_UNSUPPORTED = "LbUnsupported"
# A server to attach at run time exists with another address; one to detach still has sessions.
LB_MEMBER_CONFLICT = "LbMemberConflict"
LB_MEMBER_BUSY = "LbMemberBusy"
# A test through the balancer past its maintenance page (lb_preview_check): a wrong
# answer, a node that should not be behind it, or one that never answered.
LB_PREVIEW_CHECK_FAILED = "LbPreviewCheckFailed"
DB_UNSUPPORTED = "DbUnsupported"
DRAIN_TIMEOUT = "DrainTimeout"
NOT_UP_TIMEOUT = "NotUpTimeout"
PACKAGE_MISSING = "PackageMissing"
PACKAGE_CORRUPT = "PackageCorrupt"
VERSION_NOT_NEWER = "VersionNotNewer"
HEALTH_CHECK_FAILED = "HealthCheckFailed"
VERSION_MISMATCH = "VersionMismatch"
LOGIN_FAILED = "LoginFailed"
DATABASE_ERROR = "DatabaseError"
REPLICA_TIMEOUT = "ReplicaTimeout"
# The warm replica (activities/replication.py): not in sync by the deadline; replication
# stopped on an error; writes to the primary still going on at the deadline; the warm
# server holds what zerodown did not put there, was promoted, or replicates elsewhere.
DB_REPLICA_TIMEOUT = "DbReplicaTimeout"
DB_REPLICATION_BROKEN = "DbReplicationBroken"
DB_WRITES_CONTINUE = "DbWritesContinue"
WARM_REPLICA_CONFLICT = "WarmReplicaConflict"
BACKUP_CORRUPT = "BackupCorrupt"
PROTECTED_FILE_MISSING = "ProtectedFileMissing"
PROTECTED_FILE_CHANGED = "ProtectedFileChanged"
DEPLOY_VERIFICATION_FAILED = "DeployVerificationFailed"
RESTORE_VERIFICATION_FAILED = "RestoreVerificationFailed"
INVALID_REQUEST = "InvalidRequest"
# A merge_files entry that is not a plain `key = value` file (XML, duplicate keys, ...).
MERGE_UNSUPPORTED = "MergeUnsupported"
# The app folder changed while it was backed up (retryable: the next attempt re-takes it).
BACKUP_INCONSISTENT = "BackupInconsistent"
# A backup with this id exists but does not match the app folder it would stand for.
BACKUP_CONFLICT = "BackupConflict"
# Provisioning (servers created / launched / terminated): the command (or the lab) failed,
# printed no usable node entry, or did not finish in time (retryable: commands are idempotent).
PROVISIONING_FAILED = "ProvisioningFailed"
PROVISIONING_OUTPUT_INVALID = "ProvisioningOutputInvalid"
PROVISIONING_TIMEOUT = "ProvisioningTimeout"
# A settings file whose values are to be saved is not on the node.
SETTINGS_FILE_MISSING = "SettingsFileMissing"

# Ids the workflows hand to activities (backup ids, release ids): they become file names
# on nodes and on the worker, so only a safe alphabet and no path separators.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,120}")


def fail(error_type: str, message: str, *, retryable: bool = False,
         cause: BaseException | None = None) -> NoReturn:
    """Raise an ApplicationError of `error_type` (non-retryable unless `retryable`)."""
    err = ApplicationError(message, type=error_type, non_retryable=not retryable)
    if cause is not None:
        raise err from cause
    raise err


def check_id(kind: str, value: str) -> None:
    """InvalidRequest unless `value` is a safe id (letters, digits, '.', '_', '-'; <= 121)."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        fail(INVALID_REQUEST, f"{kind} {value!r}: use letters, digits, '.', '_' or '-' "
                              "(starting with a letter or digit, at most 121 characters)")


def sha256_file(path: str) -> str:
    """Hex sha256 of a local file, read in 1 MiB chunks; OSError when it cannot be read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def heartbeat(*details: Any) -> None:
    """Heartbeat when running inside an activity; do nothing elsewhere."""
    if activity.in_activity():
        activity.heartbeat(*details)


def previous_heartbeat() -> Any:
    """The first detail of the last heartbeat of a previous attempt, or None.

    Waiting activities store their progress there so that a retry on another worker keeps
    the original deadline instead of starting a fresh one.
    """
    if not activity.in_activity():
        return None
    details = activity.info().heartbeat_details
    return details[0] if details else None


async def with_heartbeat(aw: Awaitable[T], details: Callable[[], Any] | None = None,
                         every_s: float = 1.0) -> T:
    """Await `aw`, heartbeating every `every_s` seconds meanwhile.

    Cancellation of the caller (activity cancel) cancels `aw` as well, so a remote
    command's channel is closed instead of being left running.
    """
    task = asyncio.ensure_future(aw)
    started = time.monotonic()
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=every_s)
            if task in done:
                return task.result()
            heartbeat(details() if details else {"waited_s": round(time.monotonic() - started, 1)})
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def tail(text: str, limit: int = 1500) -> str:
    """The end of a (stderr) text, where the error usually is."""
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]
