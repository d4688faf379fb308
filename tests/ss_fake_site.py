"""A Secret Server site in memory (seed 000), and same-name stand-in activities that act on it
and log every call: the logic tests of ss-rolling and ss-load-balanced run the real workflows
against it, under Temporal's time-skipping test server.

What it models: each web node's files, running version, service and load-balancer state; the
databases by name (production, the scratch copy, staging), each with its schema and the
upgrade settings it holds (Secret Server keeps maintenance mode and "ignore version
mismatch" in its database: a backup carries them, a restore brings them back); each node's
own settings override; the staging instance; the ManualUpgrade audit; the backups taken.
Faults are injected per activity and target (`fail_on`); what no real site may see (a node
stopped while in the pool, an empty pool, production dropped or restored over) is recorded
in `violations` and fails the call; a production restore from a backup that users' writes
have overtaken since (a node served, not in maintenance mode) is recorded in `lost_writes`.
Every call is logged as (activity, target), the target naming what it touched ("n2",
"n2 drain", "site: maintenance on", "ss 3", "staging", ...).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import pytest
from temporalio import activity
from temporalio.client import WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError

import activities.app_admin as app_admin
import activities.deploy as deploy
import activities.haproxy as haproxy
import activities.http_checks as http_checks
import activities.mysql as mysql
import activities.node as node
import activities.ssh as ssh
import activities.staging as staging
from errors import HEALTH_CHECK_FAILED, LOGIN_FAILED, SETTINGS_TIMEOUT, UNEXPECTED_STATE, VERSION_MISMATCH
from inventory.load import parse_inventory
from inventory.model import Database, Inventory
from tests.fake_balancer import steady_lb_guard
from tests.signing_support import signed
from workflows.gates import Decision, GateRecord, PendingGate

PROD, SCRATCH, STAGING_DB = "ss", "ss_scratch", "ss_staging"
STAGING = "staging"  # the staging instance, as a call's target
LB = "lb"  # the site's URL through the load balancer, as a call's target
OLD, NEW = "1.0.0", "2.0.0"
MIGRATIONS = (2, 3)  # the package's, over schema 1
STARTER = "carol"  # starts the runs: may decide none of their gates
APPROVER = "alice"
FAILURE_APPROVER = "ops1"
APPROVERS = {
    "staging-test": (APPROVER, "bob"),
    "upgrade-successful": (APPROVER, "bob"),
    "swap": (APPROVER, "bob"),
    "failure": (FAILURE_APPROVER,),
}
# The calls that change the site (the others only read it).
MUTATING = {
    "backup_app_folder",
    "db_backup",
    "db_restore",
    "db_apply_migration",
    "db_drop_database",
    "app_record_audit",
    "build_upgrade_zip",
    "generate_sql_script",
    "app_set_settings",
    "stop_service",
    "start_service",
    "stage_app_backup",
    "deploy_package",
    "clear_staging",
    "lb_set_state",
    "restore_app_folder",
    "db_restore_keeping",
}
RESULT_TIMEOUT_S = 60.0  # real seconds: a run that hangs fails its test instead
POLL_S = 0.02


def node_url(i: int) -> str:
    return f"http://127.0.0.1:{9000 + i}"


STAGING_URL = "http://127.0.0.1:9100"
LB_URL = "http://127.0.0.1:9200"


def ss_site(n: int = 2, approvers: dict[str, tuple[str, ...]] | None = None) -> Inventory:
    """A Secret Server site of `n` web nodes n1..n<n> behind one HAProxy, a database with its
    scratch copy and backup folder, a staging instance, the admin interface and a login check."""
    ctl = {"kind": "command", "stop": "./ctl stop", "start": "./ctl start", "status": "./ctl status"}
    key = {"env": "FAKE_KEY"}
    raw: dict[str, Any] = {
        "site": "ss-fake",
        "nodes": [
            {
                "name": f"n{i}",
                "ssh": {"host": "127.0.0.1", "port": 2200 + i, "key": key},
                "app_dir": "app",
                "url": node_url(i),
                "service": ctl,
            }
            for i in range(1, n + 1)
        ],
        "load_balancers": [
            {
                "name": "main",
                "kind": "haproxy",
                "runtime_api": "tcp:127.0.0.1:1",
                "backend": "ss",
                "members": {f"n{i}": f"s{i}" for i in range(1, n + 1)},
            }
        ],
        "databases": [
            {
                "name": "db",
                "kind": "mysql",
                "host": "127.0.0.1",
                "database": PROD,
                "user": "u",
                "password": {"env": "FAKE_DB"},
                "backup_dir": "/backups",
                "scratch_database": SCRATCH,
            }
        ],
        "application": {
            "name": "secretserver",
            "protected_files": ["encryption.config"],
            "merge_files": ["web.config"],
            "login": {"path": "/login", "user": "probe", "password": {"env": "FAKE_LOGIN"}},
            "url": LB_URL,
            "admin": {"token": {"env": "FAKE_TOKEN"}},
        },
        "staging": {
            "ssh": {"host": "127.0.0.1", "port": 2300, "key": key},
            "app_dir": "staging-app",
            "service": ctl,
            "url": STAGING_URL,
            "database": STAGING_DB,
        },
        "approvers": {
            gate: list(names) for gate, names in (APPROVERS if approvers is None else approvers).items()
        },
    }
    return parse_inventory(raw)


@dataclass
class Db:
    """A database: its schema and the upgrade settings it holds (the site's, for production)."""

    schema: int
    maintenance: bool = False
    ignore: bool = False


@dataclass
class Fault:
    """`activity` on `target` (None: any) raises `error_type`, `times` times (None: until
    `fix()`, the operator having fixed the cause)."""

    activity: str
    target: str | None
    error_type: str
    retryable: bool = False
    times: int | None = None


@dataclass
class SsFakeSite:
    """The world the stand-in activities act on (see the module docstring)."""

    inventory: Inventory
    files: dict[str, str] = field(default_factory=dict)
    version: dict[str, str] = field(default_factory=dict)
    running: dict[str, bool] = field(default_factory=dict)
    lb: dict[str, str] = field(default_factory=dict)
    override: dict[str, dict[str, bool]] = field(default_factory=dict)
    databases: dict[str, Db] = field(default_factory=lambda: {PROD: Db(schema=1)})
    backups: dict[str, Db] = field(default_factory=dict)
    staging_files: str | None = None  # the release in the staging folder (None: empty)
    staging_version: str = ""
    staging_running: bool = False
    audit: list[str] = field(default_factory=list)
    calls: list[tuple[str, str]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    # Production restored from a backup after users could write to it (a node serving, not
    # in maintenance mode): their changes are lost.
    lost_writes: list[str] = field(default_factory=list)
    # Nodes cache the settings (the real product does; the lab app for 0.5 s): a node keeps
    # enforcing what it had until something confirms the new values on it (app_wait_settings
    # on that node), so writes still land meanwhile.
    settings_cache: bool = False

    def __post_init__(self) -> None:
        for n in self.inventory.nodes:
            self.files[n.name] = self.version[n.name] = OLD
            self.running[n.name] = True
            self.lb[n.name] = "ready"
        self._urls = {n.url: n.name for n in self.inventory.nodes} | {STAGING_URL: STAGING, LB_URL: LB}
        self._audit_refs: set[str] = set()
        self._prod_backups: set[str] = set()
        self._outdated: set[str] = set()  # production backups that writes have overtaken
        self._cached: dict[str, tuple[bool, bool]] = {}  # node -> settings it still enforces

    # ------------------------------------------------------------------ for the tests
    def fail_on(
        self,
        activity_name: str,
        target: str | None,
        error_type: str,
        retryable: bool = False,
        times: int | None = None,
    ) -> None:
        self.faults.append(Fault(activity_name, target, error_type, retryable, times))

    def fix(self) -> None:
        self.faults.clear()

    def mutations(self) -> list[tuple[str, str]]:
        return [c for c in self.calls if c[0] in MUTATING]

    def targets(self, activity_name: str) -> list[str]:
        return [t for name, t in self.calls if name == activity_name]

    def site_settings(self) -> tuple[bool, bool]:
        db = self.databases[PROD]
        return db.maintenance, db.ignore

    def node_names(self) -> list[str]:
        return [n.name for n in self.inventory.nodes]

    def all_on(self, release: str) -> bool:
        """Every node runs `release` from its files, in the pool, serving."""
        return all(
            self.version[n] == self.files[n] == release and self.running[n] and self.lb[n] == "ready"
            for n in self.node_names()
        )

    # ------------------------------------------------------------------ the model
    def _fault(self, activity_name: str, target: str) -> None:
        for f in self.faults:
            if f.activity == activity_name and f.target in (None, target) and f.times != 0:
                if f.times is not None:
                    f.times -= 1
                raise ApplicationError(
                    f"injected: {activity_name} on {target} failed",
                    type=f.error_type,
                    non_retryable=not f.retryable,
                )

    def _violate(self, what: str) -> NoReturn:
        self.violations.append(what)
        raise ApplicationError(f"fake site: {what}", type=UNEXPECTED_STATE, non_retryable=True)

    def _target(self, url: str) -> str:
        return self._urls[url]

    def _serving(self, n: str) -> bool:
        return self.running[n] and self.lb[n] == "ready"

    def _db(self, name: str) -> Db:
        if name not in self.databases:
            self._violate(f"database {name} does not exist")
        return self.databases[name]

    def _effective(self, target: str) -> tuple[bool, bool]:
        if target in self._cached:
            return self._cached[target]
        return self._live(target)

    def _live(self, target: str) -> tuple[bool, bool]:
        if target == STAGING:
            db = self.databases.get(STAGING_DB, Db(schema=0))
            return db.maintenance, db.ignore
        site = self.databases[PROD]
        own = self.override.get(target, {})
        return own.get("maintenance", site.maintenance), own.get("ignore", site.ignore)

    def _running_version(self, target: str) -> str:
        if target == STAGING:
            return self.staging_version if self.staging_running else ""
        return self.version[target]

    def _is_running(self, target: str) -> bool:
        if target == LB:
            return any(self._serving(n) for n in self.node_names())
        return self.staging_running if target == STAGING else self.running[target]

    def _state(self, target: str) -> app_admin.AdminState:
        maintenance, ignore = self._effective(target)
        site = self.databases.get(STAGING_DB if target == STAGING else PROD, Db(schema=0))
        own = self.override.get(target)
        code = MIGRATIONS[-1] if self._running_version(target) == NEW else 1
        return app_admin.AdminState(
            node=target,
            version=self._running_version(target),
            code_schema=code,
            db_schema=site.schema,
            maintenance_mode=maintenance,
            ignore_version_mismatch=ignore,
            enforce_version_match=True,
            mismatch=code != site.schema,
            mismatch_page=code != site.schema and not ignore,
            site=app_admin.UpgradeSettings(
                maintenance_mode=site.maintenance,
                ignore_version_mismatch=site.ignore,
                enforce_version_match=True,
            ),
            node_override=app_admin.NodeOverride(
                maintenance_mode=own.get("maintenance"), ignore_version_mismatch=own.get("ignore")
            )
            if own is not None
            else None,
        )

    def _member(self, n: str) -> haproxy.MemberState:
        return haproxy.MemberState(
            lb_name="main",
            node_name=n,
            backend="ss",
            server=f"s{n[1:]}",
            status="UP" if self.running[n] else "DOWN",
            scur=0,
            admin=self.lb[n],
            weight=1,
            check_status="L7OK",
        )

    def _package(self, path: str) -> deploy.PackageInfo:
        return deploy.PackageInfo(
            path=path,
            sha256="ab" * 32,
            name="secretserver",
            version=NEW,
            min_upgrade_from=OLD,
            schema_version=MIGRATIONS[-1],
            files=8,
            size=1000,
            migrations=tuple(
                deploy.MigrationSpec(version=v, up_sql=f"-- migration {v}", down_sql="") for v in MIGRATIONS
            ),
        )

    def _database(self, name: str) -> Database:
        return dataclasses.replace(self.inventory.databases[0], database=name)

    def _restored(self, backup: dict[str, Any]) -> Db:
        if backup["path"] not in self.backups:
            self._violate(f"no backup at {backup['path']}")
        return dataclasses.replace(self.backups[backup["path"]])

    # ------------------------------------------------------------------ the stand-ins
    def activities(self) -> list[Callable[..., Any]]:
        return [
            *self._reads(),
            *self._database_changes(),
            *self._node_changes(),
            *self._admin_changes(),
            steady_lb_guard(),
        ]

    def _call(self, name: str, target: str) -> None:
        # The site as the previous calls left it: may users change secrets now?
        if any(self._serving(n) and not self._effective(n)[0] for n in self.node_names()):
            self._outdated |= self._prod_backups
        self.calls.append((name, target))
        self._fault(name, target)

    def _reads(self) -> list[Callable[..., Any]]:
        s = self

        @activity.defn(name="inspect_package")
        async def inspect_package(arg: dict[str, Any]) -> deploy.PackageInfo:
            s._call("inspect_package", arg["path"])
            return s._package(arg["path"])

        @activity.defn(name="ssh_probe")
        async def ssh_probe(arg: dict[str, Any]) -> ssh.SshProbeResult:
            s._call("ssh_probe", str(arg["target"]["port"]))
            return ssh.SshProbeResult(host=arg["target"]["host"], port=arg["target"]["port"], ok=True)

        @activity.defn(name="service_status")
        async def service_status(arg: dict[str, Any]) -> node.ServiceState:
            n = _node(arg)
            s._call("service_status", n)
            return node.ServiceState(node_name=n, running=s.running[n], detail="")

        @activity.defn(name="lb_check_member")
        async def lb_check_member(arg: dict[str, Any]) -> haproxy.MemberState:
            s._call("lb_check_member", _node(arg))
            return s._member(_node(arg))

        @activity.defn(name="lb_member_state")
        async def lb_member_state(arg: dict[str, Any]) -> haproxy.MemberState:
            s._call("lb_member_state", _node(arg))
            return s._member(_node(arg))

        @activity.defn(name="check_health")
        async def check_health(arg: dict[str, Any]) -> http_checks.HttpCheckResult:
            s._call("check_health", s._target(arg["base_url"]))
            return _answer(arg["base_url"])

        @activity.defn(name="get_version")
        async def get_version(arg: dict[str, Any]) -> str:
            target = s._target(arg["base_url"])
            s._call("get_version", target)
            running = s._running_version(target)
            if arg.get("expect") and arg["expect"] != running:
                raise ApplicationError(
                    f"{target} runs {running or 'nothing'}, expected {arg['expect']}",
                    type=VERSION_MISMATCH,
                    non_retryable=True,
                )
            return running

        @activity.defn(name="wait_healthy")
        async def wait_healthy(arg: dict[str, Any]) -> http_checks.WaitHealthyResult:
            target = s._target(arg["base_url"])
            s._call("wait_healthy", target)
            if not s._is_running(target):
                raise ApplicationError(f"{target}: no answer", type=HEALTH_CHECK_FAILED, non_retryable=True)
            return http_checks.WaitHealthyResult(
                url=arg["base_url"], waited_s=0.1, attempts=1, last=_answer(arg["base_url"])
            )

        @activity.defn(name="check_login")
        async def check_login(arg: dict[str, Any]) -> http_checks.LoginResult:
            target = s._target(arg["base_url"])
            s._call("check_login", target)
            if not s._is_running(target):
                raise ApplicationError(f"{target}: log on failed", type=LOGIN_FAILED, non_retryable=True)
            return http_checks.LoginResult(url=arg["base_url"], status=200, elapsed_ms=1)

        @activity.defn(name="inspect_node_storage")
        async def inspect_node_storage(arg: dict[str, Any]) -> node.NodeStorage:
            s._call("inspect_node_storage", _node(arg))
            return node.NodeStorage(
                app_bytes=1000,
                free_bytes=10**9,
                need_bytes=5000,
                missing_protected=(),
                ok=True,
                detail="room for the backup",
                node_name=_node(arg),
            )

        @activity.defn(name="db_schema_version")
        async def db_schema_version(arg: dict[str, Any]) -> int:
            s._call("db_schema_version", arg["db"]["database"])
            return s._db(arg["db"]["database"]).schema

        @activity.defn(name="check_backup_space")
        async def check_backup_space(arg: dict[str, Any]) -> mysql.BackupSpace:
            s._call("check_backup_space", arg["db"]["database"])
            return mysql.BackupSpace(db_bytes=1000, free_bytes=10**9, need_bytes=2000, ok=True, detail="room")

        @activity.defn(name="app_admin_state")
        async def app_admin_state(arg: dict[str, Any]) -> app_admin.AdminState:
            target = s._target(arg["base_url"])
            s._call("app_admin_state", target)
            return s._state(target)

        @activity.defn(name="app_wait_settings")
        async def app_wait_settings(arg: dict[str, Any]) -> app_admin.AdminState:
            target = s._target(arg["base_url"])
            s._call("app_wait_settings", target)
            s._cached.pop(target, None)  # waited until the node enforces the new values
            want = (arg["maintenance_mode"], arg["ignore_version_mismatch"])
            if s._effective(target) != want:
                raise ApplicationError(
                    f"{target}: settings {s._effective(target)}, wanted {want}",
                    type=SETTINGS_TIMEOUT,
                    non_retryable=True,
                )
            return s._state(target)

        @activity.defn(name="lb_wait_drained")
        async def lb_wait_drained(arg: dict[str, Any]) -> int:
            s._call("lb_wait_drained", _node(arg))
            return 0

        @activity.defn(name="lb_wait_up")
        async def lb_wait_up(arg: dict[str, Any]) -> haproxy.MemberState:
            n = _node(arg)
            s._call("lb_wait_up", n)
            if not s.running[n]:
                s._violate(f"waited for {n} UP while it is stopped")
            return s._member(n)

        return [
            inspect_package,
            ssh_probe,
            service_status,
            lb_check_member,
            lb_member_state,
            check_health,
            get_version,
            wait_healthy,
            check_login,
            inspect_node_storage,
            db_schema_version,
            check_backup_space,
            app_admin_state,
            app_wait_settings,
            lb_wait_drained,
            lb_wait_up,
        ]

    def _database_changes(self) -> list[Callable[..., Any]]:
        s = self

        @activity.defn(name="db_backup")
        async def db_backup(arg: dict[str, Any]) -> mysql.DbBackup:
            name = arg["db"]["database"]
            s._call("db_backup", name)
            path = f"{arg['directory']}/{arg['backup_id']}.sql"
            s.backups[path] = dataclasses.replace(s._db(name))
            if name == PROD:
                s._prod_backups.add(path)
            return mysql.DbBackup(
                db=s._database(name), backup_id=arg["backup_id"], path=path, sha256="cd" * 32, size=10
            )

        @activity.defn(name="db_restore")
        async def db_restore(arg: dict[str, Any]) -> mysql.DbRestoreResult:
            target = arg["db"]["database"]
            s._call("db_restore", target)
            if target == PROD:
                s._violate("db_restore over production (a rollback restores keeping the audit)")
            s.databases[target] = s._restored(arg)
            return mysql.DbRestoreResult(
                path=arg["path"], tables=5, dropped=(), checksums={}, mismatched=(), created_database=True
            )

        @activity.defn(name="db_restore_keeping")
        async def db_restore_keeping(arg: dict[str, Any]) -> mysql.DbRestoreResult:
            target = arg["backup"]["db"]["database"]
            s._call("db_restore_keeping", target)
            s.databases[target] = s._restored(arg["backup"])
            if target == PROD and arg["backup"]["path"] in s._outdated:
                s.lost_writes.append(arg["backup"]["path"])
            return mysql.DbRestoreResult(
                path=arg["backup"]["path"],
                tables=5,
                dropped=(),
                checksums={},
                mismatched=(),
                kept=tuple(arg["keep_tables"]),
            )

        @activity.defn(name="db_apply_migration")
        async def db_apply_migration(arg: dict[str, Any]) -> mysql.MigrationResult:
            name, version = arg["db"]["database"], arg["version"]
            s._call("db_apply_migration", f"{name} {version}")
            db = s._db(name)
            before = db.schema
            db.schema = version if arg["direction"] == "up" else version - 1
            return mysql.MigrationResult(
                version=version,
                direction=arg["direction"],
                applied=True,
                statements=1,
                schema_version_before=before,
                schema_version_after=db.schema,
            )

        @activity.defn(name="db_drop_database")
        async def db_drop_database(arg: dict[str, Any]) -> mysql.DropDatabaseResult:
            name = arg["database"]
            s._call("db_drop_database", name)
            if name == PROD:
                s._violate("production database dropped")
            return mysql.DropDatabaseResult(database=name, dropped=s.databases.pop(name, None) is not None)

        return [db_backup, db_restore, db_restore_keeping, db_apply_migration, db_drop_database]

    def _node_changes(self) -> list[Callable[..., Any]]:
        s = self

        @activity.defn(name="stop_service")
        async def stop_service(arg: dict[str, Any]) -> node.ServiceState:
            n = _node(arg)
            s._call("stop_service", n)
            if n == STAGING:
                s.staging_running = False
            else:
                if s.lb[n] not in ("drain", "maint"):
                    s._violate(f"{n} stopped while in the pool")
                s.running[n] = False
            return node.ServiceState(node_name=n, running=False, detail="")

        @activity.defn(name="start_service")
        async def start_service(arg: dict[str, Any]) -> node.ServiceState:
            n = _node(arg)
            s._call("start_service", n)
            if n == STAGING:
                s.staging_running, s.staging_version = True, s.staging_files or ""
            else:
                s.running[n], s.version[n] = True, s.files[n]
            return node.ServiceState(node_name=n, running=True, detail="")

        @activity.defn(name="lb_set_state")
        async def lb_set_state(arg: dict[str, Any]) -> haproxy.MemberState:
            n = _node(arg)
            s._call("lb_set_state", f"{n} {arg['state']}")
            s.lb[n] = arg["state"]
            if arg["state"] != "ready" and not any(s._serving(m) for m in s.node_names()):
                s._violate(f"{n} {arg['state']}: no node left serving")
            return s._member(n)

        @activity.defn(name="backup_app_folder")
        async def backup_app_folder(arg: dict[str, Any]) -> deploy.AppBackup:
            n = _node(arg)
            s._call("backup_app_folder", n)
            return deploy.AppBackup(
                node=s.inventory.node(n),
                node_name=n,
                backup_id=arg["backup_id"],
                path=f".zerodown/backups/{arg['backup_id']}.tar",
                files=8,
                manifest={"release": s.files[n]},
                protected={"encryption.config": "ee" * 32},
            )

        @activity.defn(name="deploy_package")
        async def deploy_package(arg: dict[str, Any]) -> deploy.DeployResult:
            n = _node(arg)
            s._call("deploy_package", n)
            if s._is_running(n):
                s._violate(f"deployed onto {n} while it runs")
            if n == STAGING:
                s.staging_files = arg["package"]["version"]
            else:
                s.files[n] = arg["package"]["version"]
            merged = deploy.MergeReport(
                file="web.config",
                carried=("node.name",),
                diff=(f"+node.name = {n}",),
                had_recorded_defaults=True,
            )
            return deploy.DeployResult(
                node_name=n,
                version=arg["package"]["version"],
                files_written=2,
                merged=(merged,),
                release_id=arg["release_id"],
            )

        @activity.defn(name="restore_app_folder")
        async def restore_app_folder(arg: dict[str, Any]) -> deploy.AppRestoreResult:
            n = arg["node_name"]
            s._call("restore_app_folder", n)
            if s.running[n]:
                s._violate(f"{n} restored while it runs")
            s.files[n] = arg["manifest"]["release"]
            return deploy.AppRestoreResult(
                node_name=n, backup_id=arg["backup_id"], files=8, rewritten=2, removed=()
            )

        @activity.defn(name="stage_app_backup")
        async def stage_app_backup(arg: dict[str, Any]) -> staging.StagedApp:
            s._call("stage_app_backup", STAGING)
            if s.staging_running:
                s._violate("staging folder replaced while staging runs")
            s.staging_files = arg["backup"]["manifest"]["release"]
            bk = arg["backup"]
            return staging.StagedApp(
                source_node=bk["node_name"],
                backup_id=bk["backup_id"],
                app_dir=arg["staging"]["app_dir"],
                files=8,
                overridden=(),
            )

        @activity.defn(name="clear_staging")
        async def clear_staging(arg: dict[str, Any]) -> None:
            s._call("clear_staging", STAGING)
            s.staging_files = None

        @activity.defn(name="build_upgrade_zip")
        async def build_upgrade_zip(arg: dict[str, Any]) -> deploy.UpgradeZip:
            s._call("build_upgrade_zip", _node(arg))
            return deploy.UpgradeZip(
                path=f"{arg['out_dir']}/{arg['zip_id']}.zip",
                sha256="ef" * 32,
                size=100,
                files=("release.json", "web.config"),
                unchanged=6,
                base_node=_node(arg),
            )

        @activity.defn(name="generate_sql_script")
        async def generate_sql_script(arg: dict[str, Any]) -> deploy.SqlScript:
            s._call("generate_sql_script", f"from {arg['from_schema']}")
            return deploy.SqlScript(
                path=f"{arg['out_dir']}/{arg['script_id']}.sql",
                sha256="12" * 32,
                migrations=tuple(v for v in MIGRATIONS if v > arg["from_schema"]),
            )

        return [
            stop_service,
            start_service,
            lb_set_state,
            backup_app_folder,
            deploy_package,
            restore_app_folder,
            stage_app_backup,
            clear_staging,
            build_upgrade_zip,
            generate_sql_script,
        ]

    def _admin_changes(self) -> list[Callable[..., Any]]:
        s = self

        @activity.defn(name="app_set_settings")
        async def app_set_settings(arg: dict[str, Any]) -> app_admin.AdminState:
            target = "site" if arg["scope"] == "site" else s._target(arg["base_url"])
            values = {
                "maintenance": arg.get("maintenance_mode"),
                "ignore": arg.get("ignore_version_mismatch"),
            }
            said = [f"{k} {'on' if v else 'off'}" for k, v in values.items() if v is not None]
            s._call(
                "app_set_settings",
                f"{target}: " + ", ".join(said + (["cleared"] if arg.get("clear_node_override") else [])),
            )
            if s.settings_cache:
                for n in s.node_names():
                    s._cached.setdefault(n, s._effective(n))
            if target == "site":
                site = s.databases[PROD]
                if values["maintenance"] is not None:
                    site.maintenance = values["maintenance"]
                if values["ignore"] is not None:
                    site.ignore = values["ignore"]
            elif arg.get("clear_node_override"):
                s.override.pop(target, None)
            else:
                s.override.setdefault(target, {}).update({k: v for k, v in values.items() if v is not None})
            return s._state(s._target(arg["base_url"]))

        @activity.defn(name="app_record_audit")
        async def app_record_audit(arg: dict[str, Any]) -> app_admin.AuditEvent:
            s._call("app_record_audit", arg["action"])
            created = arg["reference"] not in s._audit_refs
            if created:
                s._audit_refs.add(arg["reference"])
                s.audit.append(arg["action"])
            return app_admin.AuditEvent(
                audit_id=len(s.audit),
                audit_type="ManualUpgrade",
                action=arg["action"],
                notes=arg["notes"],
                user=arg["user"],
                reference=arg["reference"],
                date_recorded="2024-01-01T00:00:00Z",
                created=created,
            )

        return [app_set_settings, app_record_audit]


def _answer(url: str) -> http_checks.HttpCheckResult:
    return http_checks.HttpCheckResult(url=url, status=200, body_snippet="ok", elapsed_ms=1)


def _node(arg: dict[str, Any]) -> str:
    n: Any = arg["node"]
    return n if isinstance(n, str) else str(n["name"])


# ---------------------------------------------------------------------- driving a run
async def finish(handle: WorkflowHandle[Any, Any]) -> Any:
    """The run's result; time skips while this waits (gate and failure-gate timeouts pass at
    once), bounded in real time."""
    return await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)


async def failed(handle: WorkflowHandle[Any, Any]) -> ApplicationError:
    """The error a run failed with (it must fail)."""
    with pytest.raises(WorkflowFailureError) as info:
        await finish(handle)
    cause = info.value.cause
    assert isinstance(cause, ApplicationError), cause
    return cause


async def pending(handle: WorkflowHandle[Any, Any], gate: str) -> PendingGate:
    """`gate` once it waits (the `pending_gates` query, polled often: these runs are quick)."""
    for _ in range(int(RESULT_TIMEOUT_S / POLL_S)):
        for g in await handle.query("pending_gates", result_type=list[PendingGate]):
            if g.gate == gate:
                return g
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"gate {gate} never opened")


async def approve(handle: WorkflowHandle[Any, Any], gate: str, by: str = APPROVER) -> GateRecord:
    """Approve `gate` once it waits (the `approve` update, as `zerodown approve` sends it)."""
    waiting = await pending(handle, gate)
    decision = Decision(gate=gate, by=by, plan_hash=waiting.plan_hash, comment="t")
    record: GateRecord = await handle.execute_update(
        "approve", signed(handle.id, waiting, decision), result_type=GateRecord
    )
    return record


def dedup(items: list[str]) -> list[str]:
    """`items` without consecutive repeats (a timeline's seed steps, step by step)."""
    return [x for i, x in enumerate(items) if i == 0 or items[i - 1] != x]
