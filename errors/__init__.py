"""Every error type zerodown raises (`ApplicationError.type`), once, for every layer.

Activities raise them (`activities.common.fail`), workflows raise and match them, the CLI
and the reports show them. Whether a step is tried again is the raised error's own
`non_retryable` flag, never its type: one type may be either (a deadlock is worth another
attempt, a refused login is not - both are `DatabaseError`). `retryable` below says which
flags a type is raised with, for readers and for the test that checks every raise against
this registry (tests/test_errors.py): "never", "always" or "either".

Adding a type: a constant here and its entry in REGISTRY; the test fails on a type raised
anywhere that is not registered, and on a registered type that nothing raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Retry = Literal["never", "always", "either"]


@dataclass(frozen=True)
class ErrorType:
    name: str
    retryable: Retry
    meaning: str


# Secrets and SSH
SECRET_UNAVAILABLE = "SecretUnavailable"
SSH_UNREACHABLE = "SshUnreachable"
SSH_AUTH_FAILED = "SshAuthFailed"
SSH_HOST_KEY_MISMATCH = "SshHostKeyMismatch"
SSH_COMMAND_FAILED = "SshCommandFailed"
SSH_COMMAND_TIMEOUT = "SshCommandTimeout"
DETACHED_TIMEOUT = "DetachedCommandTimeout"
DETACHED_OUTPUT_UNEXPECTED = "DetachedOutputUnexpected"
# Nodes and services
SERVICE_TIMEOUT = "ServiceTimeout"
SERVICE_NOT_RUNNING = "ServiceNotRunning"
INSUFFICIENT_DISK_SPACE = "InsufficientDiskSpace"
# Load balancers
LB_MEMBER_NOT_FOUND = "LbMemberNotFound"
LB_RUNTIME_API_ERROR = "LbRuntimeApiError"
LB_UNSUPPORTED = "LbUnsupported"
LB_MEMBER_CONFLICT = "LbMemberConflict"
LB_MEMBER_BUSY = "LbMemberBusy"
LB_PREVIEW_CHECK_FAILED = "LbPreviewCheckFailed"
DRAIN_TIMEOUT = "DrainTimeout"
NOT_UP_TIMEOUT = "NotUpTimeout"
NOT_IN_POOL = "NotInPool"
SESSIONS_OPEN = "SessionsOpen"
# Packages, versions, deploys
PACKAGE_MISSING = "PackageMissing"
PACKAGE_CORRUPT = "PackageCorrupt"
VERSION_NOT_NEWER = "VersionNotNewer"
INVALID_VERSION = "InvalidVersion"
UPGRADE_PATH_IMPOSSIBLE = "UpgradePathImpossible"
VERSION_MISMATCH = "VersionMismatch"
HEALTH_CHECK_FAILED = "HealthCheckFailed"
LOGIN_FAILED = "LoginFailed"
BACKUP_CORRUPT = "BackupCorrupt"
BACKUP_INCONSISTENT = "BackupInconsistent"
BACKUP_CONFLICT = "BackupConflict"
PROTECTED_FILE_MISSING = "ProtectedFileMissing"
PROTECTED_FILE_CHANGED = "ProtectedFileChanged"
DEPLOY_VERIFICATION_FAILED = "DeployVerificationFailed"
RESTORE_VERIFICATION_FAILED = "RestoreVerificationFailed"
MERGE_UNSUPPORTED = "MergeUnsupported"
SETTINGS_FILE_MISSING = "SettingsFileMissing"
# Databases
DB_UNSUPPORTED = "DbUnsupported"
DATABASE_ERROR = "DatabaseError"
DB_REPLICA_TIMEOUT = "DbReplicaTimeout"
DB_REPLICATION_BROKEN = "DbReplicationBroken"
DB_WRITES_CONTINUE = "DbWritesContinue"
WARM_REPLICA_CONFLICT = "WarmReplicaConflict"
# The application's admin API
ADMIN_AUTH_FAILED = "AdminAuthFailed"
ADMIN_UNAVAILABLE = "AdminUnavailable"
SETTINGS_TIMEOUT = "SettingsTimeout"
# Provisioning
PROVISIONING_FAILED = "ProvisioningFailed"
PROVISIONING_OUTPUT_INVALID = "ProvisioningOutputInvalid"
PROVISIONING_TIMEOUT = "ProvisioningTimeout"
# Open-Xchange
OX_TOOL_FAILED = "OxToolFailed"
OX_TOOL_UNAVAILABLE = "OxToolUnavailable"
OX_OUTPUT_UNEXPECTED = "OxOutputUnexpected"
OX_UPDATE_TASKS_FAILED = "UpdateTasksFailed"
SCHEMATA_NOT_MOVED = "SchemataNotMoved"
REGISTRATION_ABORTED = "RegistrationAborted"
SCHEMA_UPGRADE_STOPPED = "SchemaUpgradeStopped"
# Input and procedure
INVALID_REQUEST = "InvalidRequest"
INVALID_INPUT = "InvalidInput"
INVALID_GROUPS = "InvalidGroups"
UNKNOWN_NODE = "UnknownNode"
UNEXPECTED_STATE = "UnexpectedState"
PREFLIGHT_FAILED = "PreflightFailed"
GATE_REFUSED = "GateRefused"
GATE_REJECTED = "GateRejected"
PROCEDURE_ABORTED = "ProcedureAborted"
PROCEDURE_FAILED = "ProcedureFailed"

_ENTRIES: tuple[tuple[str, Retry, str], ...] = (
    (SECRET_UNAVAILABLE, "never", "a secret reference (env var, file) cannot be resolved"),
    (SSH_UNREACHABLE, "either", "no SSH connection, or it was lost (preflight reports it as final)"),
    (SSH_AUTH_FAILED, "never", "the node refused the key"),
    (SSH_HOST_KEY_MISMATCH, "never", "the node's host key is not the known one"),
    (SSH_COMMAND_FAILED, "never", "a command on a node exited non-zero"),
    (SSH_COMMAND_TIMEOUT, "always", "a command on a node did not finish in time"),
    (DETACHED_TIMEOUT, "never", "a detached job ran past its budget; left running"),
    (DETACHED_OUTPUT_UNEXPECTED, "never", "a detached job's script printed no markers"),
    (SERVICE_TIMEOUT, "never", "a service did not stop or start in time"),
    (SERVICE_NOT_RUNNING, "never", "preflight: a node's service is not running"),
    (INSUFFICIENT_DISK_SPACE, "never", "preflight: not enough room for the backup"),
    (LB_MEMBER_NOT_FOUND, "never", "the balancer has no such member"),
    (LB_RUNTIME_API_ERROR, "either", "the balancer's API refused or failed a call"),
    (LB_UNSUPPORTED, "never", "the balancer kind cannot do what was asked"),
    (LB_MEMBER_CONFLICT, "never", "a member to attach exists with another address"),
    (LB_MEMBER_BUSY, "never", "a member to detach still has sessions"),
    (LB_PREVIEW_CHECK_FAILED, "either", "a test through the maintenance page failed"),
    (DRAIN_TIMEOUT, "never", "a node's sessions did not drain by the deadline"),
    (NOT_UP_TIMEOUT, "never", "a member did not come up by the deadline"),
    (NOT_IN_POOL, "never", "a node that should serve is not in the pool"),
    (SESSIONS_OPEN, "never", "old servers still hold sessions: not terminated"),
    (PACKAGE_MISSING, "never", "the release package is not where the inventory says"),
    (PACKAGE_CORRUPT, "never", "the package does not match its checksum"),
    (VERSION_NOT_NEWER, "never", "the target version is not newer than the running one"),
    (INVALID_VERSION, "never", "a version string the rules cannot read"),
    (UPGRADE_PATH_IMPOSSIBLE, "never", "the target needs an intermediate release first"),
    (VERSION_MISMATCH, "never", "a node reports another version than expected"),
    (HEALTH_CHECK_FAILED, "never", "a node failed its health check"),
    (LOGIN_FAILED, "never", "the login check failed"),
    (BACKUP_CORRUPT, "never", "a backup does not match what it stands for"),
    (BACKUP_INCONSISTENT, "either", "the app folder changed while it was backed up"),
    (BACKUP_CONFLICT, "never", "a backup with this id holds another folder"),
    (PROTECTED_FILE_MISSING, "never", "a protected file (encryption.config) is missing"),
    (PROTECTED_FILE_CHANGED, "never", "a protected file changed during a deploy"),
    (DEPLOY_VERIFICATION_FAILED, "either", "the deployed folder is not the package's"),
    (RESTORE_VERIFICATION_FAILED, "never", "the restored folder is not the backup's"),
    (MERGE_UNSUPPORTED, "never", "a merge_files entry is not a `key = value` file"),
    (SETTINGS_FILE_MISSING, "never", "a settings file to save is not on the node"),
    (DB_UNSUPPORTED, "never", "the database kind cannot do what was asked"),
    (DATABASE_ERROR, "either", "a database call failed (lost connection, deadlock: retryable)"),
    (DB_REPLICA_TIMEOUT, "never", "the warm replica was not in sync by the deadline"),
    (DB_REPLICATION_BROKEN, "either", "replication stopped on an error"),
    (DB_WRITES_CONTINUE, "never", "writes to the primary still going on at the deadline"),
    (WARM_REPLICA_CONFLICT, "never", "the warm server is not zerodown's to use"),
    (ADMIN_AUTH_FAILED, "never", "the admin API refused the credentials"),
    (ADMIN_UNAVAILABLE, "either", "the admin API did not answer as expected"),
    (SETTINGS_TIMEOUT, "never", "a setting did not take effect in time"),
    (PROVISIONING_FAILED, "never", "a provisioning command failed"),
    (PROVISIONING_OUTPUT_INVALID, "never", "a provisioning command printed no usable node"),
    (PROVISIONING_TIMEOUT, "always", "a provisioning command did not finish in time"),
    (OX_TOOL_FAILED, "either", "an OX tool failed for good (one `fail` picks it or the next by exit code)"),
    (OX_TOOL_UNAVAILABLE, "either", "an OX tool could not reach its middleware (105/107)"),
    (OX_OUTPUT_UNEXPECTED, "never", "an OX tool printed what its source never prints"),
    (OX_UPDATE_TASKS_FAILED, "never", "runupdate listed failed update tasks"),
    (SCHEMATA_NOT_MOVED, "never", "schemata still on the old server"),
    (REGISTRATION_ABORTED, "never", "the operator chose abort at the registration gate"),
    (SCHEMA_UPGRADE_STOPPED, "never", "ox-upgradeschemata stopped (reverted, failed); says where to resume"),
    (INVALID_REQUEST, "never", "an activity's request is malformed"),
    (INVALID_INPUT, "never", "a procedure's input is malformed"),
    (INVALID_GROUPS, "never", "ss-rolling's groups overlap or miss nodes"),
    (UNKNOWN_NODE, "never", "a node name the inventory does not list"),
    (UNEXPECTED_STATE, "never", "the site is not in the state the procedure needs"),
    (PREFLIGHT_FAILED, "never", "preflight found problems; nothing was touched"),
    (GATE_REFUSED, "never", "a gate's decision came from someone not listed"),
    (GATE_REJECTED, "never", "a gate was rejected (or timed out to reject)"),
    (PROCEDURE_ABORTED, "never", "the operator chose abort"),
    (PROCEDURE_FAILED, "never", "a step failed and the procedure rolled back"),
)

REGISTRY: dict[str, ErrorType] = {name: ErrorType(name, retry, meaning) for name, retry, meaning in _ENTRIES}
