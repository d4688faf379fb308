"""A small site in memory and same-name stand-in activities that act on it and log every
call: rolling-deploy's logic tests and the mechanisms they exercise (gates, guided failure,
tracing) run the real workflow against it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

import activities.deploy as deploy
import activities.haproxy as haproxy
import activities.http_checks as http_checks
import activities.mysql as mysql
import activities.node as node
import activities.ssh as ssh
from inventory.load import parse_inventory
from inventory.model import Inventory

MUTATING = {
    "lb_set_state",
    "stop_service",
    "start_service",
    "deploy_package",
    "restore_app_folder",
    "db_apply_migration",
    "backup_app_folder",
    "db_backup",
}


def site(n: int = 3, with_database: bool = True) -> Inventory:
    raw: dict[str, Any] = {
        "site": "fake",
        "nodes": [
            {
                "name": f"n{i}",
                "ssh": {"host": "127.0.0.1", "port": 2200 + i, "key": {"env": "FAKE_KEY"}},
                "app_dir": "app",
                "url": f"http://127.0.0.1:{9000 + i}",
                "service": {
                    "kind": "command",
                    "stop": "./ctl stop",
                    "start": "./ctl start",
                    "status": "./ctl status",
                },
            }
            for i in range(1, n + 1)
        ],
        "load_balancers": [
            {
                "name": "main",
                "kind": "haproxy",
                "runtime_api": "tcp:127.0.0.1:1",
                "backend": "app",
                "members": {f"n{i}": f"s{i}" for i in range(1, n + 1)},
            }
        ],
        "databases": [
            {
                "name": "db",
                "kind": "mysql",
                "host": "127.0.0.1",
                "database": "app",
                "user": "u",
                "password": {"env": "FAKE_DB"},
            }
        ],
        "application": {
            "name": "app",
            "protected_files": ["encryption.config"],
            "merge_files": ["web.config"],
        },
    }
    if not with_database:
        del raw["databases"]
    return parse_inventory(raw)


def _node(arg: dict[str, Any]) -> str:
    n: Any = arg["node"] if "node" in arg else arg["node_name"]
    return n if isinstance(n, str) else str(n["name"])


@dataclass
class FakeSite:
    """The world the stand-in activities act on."""

    nodes: list[str]
    version: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    running: dict[str, bool] = field(default_factory=dict)
    lb: dict[str, str] = field(default_factory=dict)
    schema: int = 1
    calls: list[tuple[str, str | None]] = field(default_factory=list)
    fail_health_on: tuple[str, str] | None = None  # (node, version)
    hold_drain: asyncio.Event | None = None
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    hold_deploy: asyncio.Event | None = None
    deploying: asyncio.Event = field(default_factory=asyncio.Event)
    fail_restore_on: str | None = None
    # Reload the balancer (a new process: every member back to ready, as HAProxy without
    # a server-state-file) right after this call on this node, e.g. ("lb_wait_drained", "n2").
    reload_after: tuple[str, str] | None = None
    lb_pid: int = 100

    def __post_init__(self) -> None:
        for n in self.nodes:
            self.version[n] = self.files[n] = "1.0.0"
            self.running[n] = True
            self.lb[n] = "ready"

    def mutations(self) -> list[tuple[str, str | None]]:
        return [c for c in self.calls if c[0] in MUTATING]

    def activities(self) -> list[Callable[..., Any]]:
        s = self

        def member(n: str) -> haproxy.MemberState:
            return haproxy.MemberState(
                lb_name="main",
                node_name=n,
                backend="app",
                server=f"s{n[1:]}",
                status="UP" if s.running[n] else "DOWN",
                scur=0,
                admin=s.lb[n],
                weight=1,
                check_status="L7OK",
            )

        def log(name: str, arg: dict[str, Any] | None) -> None:
            has_node = arg is not None and ("node" in arg or "node_name" in arg)
            s.calls.append((name, _node(arg) if arg is not None and has_node else None))

        @activity.defn(name="inspect_package")
        async def inspect_package(arg: dict[str, Any]) -> deploy.PackageInfo:
            log("inspect_package", None)
            return deploy.PackageInfo(
                path=arg["path"],
                sha256="ab" * 32,
                name="app",
                version="2.0.0",
                min_upgrade_from="1.0.0",
                schema_version=2,
                files=3,
                migrations=(deploy.MigrationSpec(version=2, up_sql="ALTER ...", down_sql="ALTER back"),),
            )

        @activity.defn(name="ssh_probe")
        async def ssh_probe(arg: dict[str, Any]) -> ssh.SshProbeResult:
            log("ssh_probe", None)
            return ssh.SshProbeResult(host=arg["target"]["host"], port=arg["target"]["port"], ok=True)

        @activity.defn(name="service_status")
        async def service_status(arg: dict[str, Any]) -> node.ServiceState:
            log("service_status", arg)
            return node.ServiceState(node_name=_node(arg), running=s.running[_node(arg)], detail="")

        @activity.defn(name="lb_check_member")
        async def lb_check_member(arg: dict[str, Any]) -> haproxy.MemberState:
            log("lb_check_member", arg)
            return member(_node(arg))

        @activity.defn(name="check_health")
        async def check_health(arg: dict[str, Any]) -> http_checks.HttpCheckResult:
            log("check_health", None)
            return http_checks.HttpCheckResult(
                url=arg["base_url"], status=200, body_snippet="ok", elapsed_ms=1
            )

        @activity.defn(name="get_version")
        async def get_version(arg: dict[str, Any]) -> str:
            port = int(arg["base_url"].rsplit(":", 1)[1])
            node = f"n{port - 9000}"
            log("get_version", {"node": node})
            if arg.get("expect") and arg["expect"] != s.version[node]:
                raise ApplicationError(
                    f"{node} runs {s.version[node]}, expected {arg['expect']}",
                    type="VersionMismatch",
                    non_retryable=True,
                )
            return s.version[node]

        @activity.defn(name="lb_member_state")
        async def lb_member_state(arg: dict[str, Any]) -> haproxy.MemberState:
            log("lb_member_state", arg)
            return member(_node(arg))

        @activity.defn(name="db_schema_version")
        async def db_schema_version(arg: dict[str, Any]) -> int:
            log("db_schema_version", None)
            return s.schema

        @activity.defn(name="db_backup")
        async def db_backup(arg: dict[str, Any]) -> mysql.DbBackup:
            log("db_backup", None)
            return mysql.DbBackup(
                db=site().databases[0],
                backup_id=arg["backup_id"],
                path="/b/db.sql",
                sha256="cd" * 32,
                size=10,
                table_checksums={},
            )

        @activity.defn(name="db_apply_migration")
        async def db_apply_migration(arg: dict[str, Any]) -> mysql.MigrationResult:
            log("db_apply_migration", None)
            before = s.schema
            s.schema = arg["version"] if arg["direction"] == "up" else arg["version"] - 1
            return mysql.MigrationResult(
                version=arg["version"],
                direction=arg["direction"],
                applied=True,
                statements=1,
                schema_version_before=before,
                schema_version_after=s.schema,
            )

        @activity.defn(name="lb_set_state")
        async def lb_set_state(arg: dict[str, Any]) -> haproxy.MemberState:
            log("lb_set_state", arg)
            s.lb[_node(arg)] = arg["state"]
            if arg["state"] == "drain":
                s.draining.set()
            return member(_node(arg))

        @activity.defn(name="lb_wait_drained")
        async def lb_wait_drained(arg: dict[str, Any]) -> int:
            log("lb_wait_drained", arg)
            if s.hold_drain is not None:
                await s.hold_drain.wait()
            if s.reload_after == ("lb_wait_drained", _node(arg)):
                s.reload_after = None
                s.lb_pid += 1
                s.lb = {n: "ready" for n in s.lb}
            return 0

        @activity.defn(name="lb_guard")
        async def lb_guard(arg: dict[str, Any]) -> haproxy.GuardResult:
            process = haproxy.LbProcess(pid=s.lb_pid, started=s.lb_pid)
            expected = arg["expected"]
            if expected is None or expected["pid"] == s.lb_pid:
                return haproxy.GuardResult(process=process, reloaded=False)
            log("lb_guard", None)
            done = []
            for n, state in arg["state"]["members"]:
                s.lb[n] = state
                done.append(f"{n} {state}")
            return haproxy.GuardResult(process=process, reloaded=True, reapplied=tuple(done))

        @activity.defn(name="lb_wait_up")
        async def lb_wait_up(arg: dict[str, Any]) -> haproxy.MemberState:
            log("lb_wait_up", arg)
            assert s.running[_node(arg)], "waiting UP on a stopped node"
            return member(_node(arg))

        @activity.defn(name="stop_service")
        async def stop_service(arg: dict[str, Any]) -> node.ServiceState:
            log("stop_service", arg)
            assert s.lb[_node(arg)] in ("drain", "maint"), "stopped a node that was not drained"
            s.running[_node(arg)] = False
            return node.ServiceState(node_name=_node(arg), running=False, detail="")

        @activity.defn(name="start_service")
        async def start_service(arg: dict[str, Any]) -> node.ServiceState:
            log("start_service", arg)
            s.running[_node(arg)] = True
            s.version[_node(arg)] = s.files[_node(arg)]
            return node.ServiceState(node_name=_node(arg), running=True, detail="")

        @activity.defn(name="backup_app_folder")
        async def backup_app_folder(arg: dict[str, Any]) -> deploy.AppBackup:
            log("backup_app_folder", arg)
            assert not s.running[_node(arg)]
            return deploy.AppBackup(
                node=site().node(_node(arg)),
                node_name=_node(arg),
                backup_id=arg["backup_id"],
                path=f".zerodown/backups/{arg['backup_id']}.tar",
                files=3,
                manifest={"app.py": s.files[_node(arg)]},
                protected={},
            )

        @activity.defn(name="deploy_package")
        async def deploy_package(arg: dict[str, Any]) -> deploy.DeployResult:
            log("deploy_package", arg)
            if s.hold_deploy is not None:
                s.deploying.set()
                await s.hold_deploy.wait()
            s.files[_node(arg)] = arg["package"]["version"]
            s.calls.append(("deploy_package finished", _node(arg)))
            return deploy.DeployResult(
                node_name=_node(arg),
                version=arg["package"]["version"],
                files_written=3,
                merged=(
                    deploy.MergeReport(
                        file="web.config",
                        carried=("http.port",),
                        diff=(f"+http.port = {_node(arg)}",),
                        had_recorded_defaults=True,
                    ),
                ),
            )

        @activity.defn(name="restore_app_folder")
        async def restore_app_folder(arg: dict[str, Any]) -> deploy.AppRestoreResult:
            log("restore_app_folder", arg)
            if s.fail_restore_on == _node(arg):
                raise ApplicationError(
                    f"{_node(arg)}: restore verification failed",
                    type="RestoreVerificationFailed",
                    non_retryable=True,
                )
            s.files[_node(arg)] = arg["manifest"]["app.py"]
            return deploy.AppRestoreResult(
                node_name=_node(arg), backup_id=arg["backup_id"], files=3, rewritten=1, removed=()
            )

        @activity.defn(name="wait_healthy")
        async def wait_healthy(arg: dict[str, Any]) -> http_checks.WaitHealthyResult:
            port = int(arg["base_url"].rsplit(":", 1)[1])
            node = f"n{port - 9000}"
            log("wait_healthy", {"node": node})
            if s.fail_health_on == (node, s.version[node]):
                raise ApplicationError(
                    f"{node} /health answered 500", type="HealthCheckFailed", non_retryable=True
                )
            return http_checks.WaitHealthyResult(
                url=arg["base_url"],
                waited_s=0.1,
                attempts=2,
                last=http_checks.HttpCheckResult(
                    url=arg["base_url"], status=200, body_snippet="ok", elapsed_ms=1
                ),
            )

        @activity.defn(name="inspect_node_storage")
        async def inspect_node_storage(arg: dict[str, Any]) -> node.NodeStorage:
            log("inspect_node_storage", arg)
            return node.NodeStorage(
                app_bytes=1000,
                free_bytes=10**9,
                need_bytes=5000,
                missing_protected=(),
                ok=True,
                detail="room for the backup",
                node_name=_node(arg),
            )

        @activity.defn(name="check_backup_space")
        async def check_backup_space(arg: dict[str, Any]) -> mysql.BackupSpace:
            log("check_backup_space", None)
            return mysql.BackupSpace(db_bytes=1000, free_bytes=10**9, need_bytes=2000, ok=True, detail="room")

        @activity.defn(name="check_login")
        async def check_login(arg: dict[str, Any]) -> http_checks.LoginResult:
            log("check_login", None)
            return http_checks.LoginResult(url=arg["base_url"], status=200, elapsed_ms=1)

        return [
            lb_member_state,
            inspect_package,
            ssh_probe,
            service_status,
            lb_check_member,
            check_health,
            get_version,
            db_schema_version,
            db_backup,
            db_apply_migration,
            lb_set_state,
            lb_wait_drained,
            lb_guard,
            lb_wait_up,
            stop_service,
            start_service,
            backup_app_folder,
            deploy_package,
            restore_app_folder,
            wait_healthy,
            check_login,
            inspect_node_storage,
            check_backup_space,
        ]
