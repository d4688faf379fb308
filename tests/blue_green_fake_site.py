"""A blue-green site in memory and same-name stand-in activities that act on it: the logic
tests of `minor-blue-green` (seed 003) and `major-maintenance-window` (seed 004) run the real
workflows against it under Temporal's time-skipping test server.

The site has servers (old ones from the inventory, new ones made by `provision_create`),
HAProxy balancers whose members come and go at run time (with a maintenance page), a
primary database with its schema, snapshots and a warm replica, and a server array. Every
stand-in is registered under the real activity's name, takes the request as a dict and
returns the real result dataclass; every call is logged as (activity, target), the target
being a server, `<balancer>/<server>` for a balancer's member, a balancer, or None.

Faults: `fail(activity, target, error_type, retryable=..., times=...)` makes the next
call(s) on that target raise an ApplicationError of a real error type (errors/); `fix`
removes it (the operator fixed the cause). Invariants a correct procedure keeps are checked
as the stand-ins run, and every breach is appended to `problems` (tests assert it empty):
no user-facing server stopped while it serves, no server destroyed while attached or
holding sessions, new code never started on a schema older than it needs, no migration
while the warm replica still replicates, the promoted replica never released.
"""

from __future__ import annotations

import dataclasses
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
import activities.provision as provision
import activities.replication as replication
import activities.ssh as ssh
from errors import (
    DRAIN_TIMEOUT,
    HEALTH_CHECK_FAILED,
    LB_MEMBER_BUSY,
    LB_MEMBER_NOT_FOUND,
    LB_PREVIEW_CHECK_FAILED,
    NOT_UP_TIMEOUT,
    UNEXPECTED_STATE,
    VERSION_MISMATCH,
)
from inventory.load import parse_inventory
from inventory.model import Database, DatabaseEndpoint, Inventory, Node
from tests.fake_balancer import STEADY

OLD, NEW = "1.0.0", "2.0.0"
NEW_SCHEMA = 2
FRONTENDS = {"main": "http://127.0.0.1:8080", "test": "http://127.0.0.1:8081"}
WARM = DatabaseEndpoint(host="127.0.0.2", port=3307)
# The calls that change the site (the rest only read it).
MUTATING = frozenset(
    {
        "db_backup",
        "db_restore",
        "db_drop_database",
        "db_apply_migration",
        "db_init_warm_replica",
        "db_stop_replication",
        "db_promote_warm_replica",
        "db_release_warm_replica",
        "provision_create",
        "provision_start",
        "provision_destroy",
        "provision_array_disable",
        "provision_array_enable",
        "run_node_command",
        "save_settings_copy",
        "set_config_values",
        "deploy_package",
        "start_service",
        "stop_service",
        "set_health_file",
        "lb_add_server",
        "lb_del_server",
        "lb_set_state",
        "lb_set_maintenance",
    }
)

Call = tuple[str, str | None]


# ------------------------------------------------------------------ inventories
def _raw_site(n: int) -> dict[str, Any]:
    return {
        "site": "bg",
        "nodes": [
            {
                "name": f"n{i}",
                "app_dir": "app",
                "ssh": {"host": "127.0.0.1", "port": 2200 + i, "key": {"env": "FAKE_KEY"}},
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
                "members": {f"n{i}": f"n{i}" for i in range(1, n + 1)},
                "frontend_url": FRONTENDS["main"],
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
                "backup_dir": "/backups",
            }
        ],
        "application": {
            "name": "app",
            "login": {"path": "/login", "user": "demo", "password": {"env": "FAKE_LOGIN"}},
        },
        "provisioning": {
            "kind": "command",
            "create": "prov create {template} {name}",
            "start": "prov start {name}",
            "destroy": "prov destroy {name}",
        },
        "approvers": {"failure": ["ops1"]},
    }


def blue_green_site(n: int = 2, array: bool = True, gates: tuple[str, ...] = ("terminate",)) -> Inventory:
    """minor-blue-green's site: `n` old servers behind `main`, a health-check file, a database
    with a backup folder, provisioning (with a server array), approvers for `gates`."""
    raw = _raw_site(n)
    raw["application"]["health_file"] = "htdocs/health.html"
    if array:
        raw["provisioning"]["array"] = {"name": "web-array", "disable": "arr off", "enable": "arr on"}
    raw["approvers"].update({g: ["ops1"] for g in gates})
    return parse_inventory(raw)


def window_site(n: int = 2) -> Inventory:
    """major-maintenance-window's site: `main` with a maintenance switch, an empty test
    balancer, a database with a warm replica, a scratch database and the accounts, the
    application's database client config (a revert points the old servers at the replica)."""
    raw = _raw_site(n)
    raw["load_balancers"][0]["maintenance"] = {
        "map": "/etc/haproxy/maintenance.map",
        "key": "main",
        "preview_header": "X-Preview",
    }
    raw["load_balancers"].append(
        {
            "name": "test",
            "kind": "haproxy",
            "runtime_api": "tcp:127.0.0.1:2",
            "backend": "test",
            "members": {},
            "frontend_url": FRONTENDS["test"],
        }
    )
    raw["databases"][0].update(
        {
            "scratch_database": "app_scratch",
            "warm_replica": {"host": WARM.host, "port": WARM.port},
            "admin_user": "admin",
            "admin_password": {"env": "FAKE_ADMIN"},
            "replication_user": "repl",
            "replication_password": {"env": "FAKE_REPL"},
        }
    )
    raw["application"]["database_config"] = {"file": "database.config"}
    raw["approvers"].update({"go-live": ["ops1"], "terminate": ["ops1"]})
    return parse_inventory(raw)


# ------------------------------------------------------------------ the site
@dataclass
class Server:
    node: Node
    files: str  # the code's version on disk
    launched: bool = True  # a new server is launched by provision_start
    running: bool = True
    health_file: bool = True
    sessions: int = 0  # user sessions it holds
    database: str = "primary"  # primary | warm (after a revert by promotion)
    settings: dict[str, dict[str, str]] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)

    @property
    def version(self) -> str | None:
        return self.files if self.running else None


@dataclass
class Balancer:
    name: str
    members: dict[str, str]  # server -> admin state (ready | drain | maint)
    page: bool = False  # the maintenance page
    turn: int = 0  # round robin


@dataclass
class Fault:
    error_type: str
    message: str
    retryable: bool
    times: int | None  # None: until fixed


class BlueGreenSite:
    """The world the stand-ins act on (see the module docstring)."""

    def __init__(
        self, inv: Inventory, destructive: bool = False, private_lbs: tuple[str, ...] = ("test",)
    ) -> None:
        self.inv = inv
        self.db: Database = inv.databases[0]
        self.destructive = destructive
        self.private_lbs = private_lbs  # balancers no user reaches
        self.servers = {n.name: Server(node=n, files=OLD) for n in inv.nodes}
        self.lbs = {lb.name: Balancer(lb.name, {m: "ready" for m in lb.members}) for lb in inv.load_balancers}
        self.schema = 1
        self.warm = "empty"  # empty | replicating | stopped | promoted | released
        self.warm_schema: int | None = None
        self.scratch = False  # a restored copy in the scratch database
        self.snapshots: dict[str, int] = {}  # path -> the schema it holds
        self.restored: list[str] = []
        self.array_enabled = True
        self.destroyed: list[str] = []
        self.calls: list[Call] = []
        self.problems: list[str] = []
        self.faults: dict[Call, Fault] = {}

    # ------------------------------------------------------------------ for the tests
    def fail(
        self,
        name: str,
        target: str | None,
        error_type: str,
        message: str = "injected fault",
        retryable: bool = False,
        times: int | None = None,
    ) -> None:
        self.faults[(name, target)] = Fault(error_type, message, retryable, times)

    def fix(self, name: str, target: str | None) -> None:
        self.faults.pop((name, target), None)

    def mutations(self) -> list[Call]:
        return [c for c in self.calls if c[0] in MUTATING]

    def activities(self) -> list[Callable[..., Any]]:
        return [
            getattr(self, a)
            for a in dir(type(self))
            if hasattr(getattr(type(self), a), "__temporal_activity_definition")
        ]

    def serving(self, lb: str) -> list[str]:
        """The members that take users' requests (ready, running, with their health file), sorted."""
        out = []
        for name, state in self.lbs[lb].members.items():
            s = self.servers.get(name)
            if state == "ready" and s is not None and s.running and s.health_file:
                out.append(name)
        return sorted(out)

    # ------------------------------------------------------------------ internals
    def _enter(self, name: str, target: str | None) -> None:
        self.calls.append((name, target))
        fault = self.faults.get((name, target))
        if fault is None:
            return
        if fault.times is not None:
            fault.times -= 1
            if fault.times <= 0:
                del self.faults[(name, target)]
        raise ApplicationError(
            f"{target or name}: {fault.message}", type=fault.error_type, non_retryable=not fault.retryable
        )

    def _server(self, name: str) -> Server:
        s = self.servers.get(name)
        if s is None:
            self.problems.append(f"{name}: used after it was destroyed (or never made)")
            raise ApplicationError(f"no server {name}", type=UNEXPECTED_STATE, non_retryable=True)
        return s

    def _by_url(self, base_url: str) -> str:
        for lb, url in FRONTENDS.items():
            if url == base_url:
                return lb
        for s in self.servers.values():
            if s.node.url == base_url:
                return s.node.name
        raise ApplicationError(
            f"{base_url}: connection refused", type=HEALTH_CHECK_FAILED, non_retryable=True
        )

    def _answering(self, base_url: str) -> Server:
        """The server a request to `base_url` reaches (a balancer's next serving member)."""
        target = self._by_url(base_url)
        if target in self.lbs:
            b = self.lbs[target]
            members = self.serving(target)
            if b.page or not members:
                raise ApplicationError(
                    f"{base_url}: 503 " + ("maintenance page" if b.page else "no server"),
                    type=HEALTH_CHECK_FAILED,
                    non_retryable=True,
                )
            b.turn += 1
            return self.servers[members[b.turn % len(members)]]
        s = self.servers[target]
        if not s.running:
            raise ApplicationError(
                f"{base_url}: connection refused", type=HEALTH_CHECK_FAILED, non_retryable=True
            )
        return s

    def _schema_of(self, s: Server) -> int:
        return (self.warm_schema or 0) if s.database == "warm" else self.schema

    def _member(self, lb: str, n: str) -> haproxy.MemberState:
        s = self.servers.get(n)
        up = s is not None and s.running and s.health_file
        return haproxy.MemberState(
            lb_name=lb,
            node_name=n,
            backend=lb,
            server=n,
            status="UP" if up else "DOWN",
            scur=s.sessions if s else 0,
            admin=self.lbs[lb].members.get(n, "maint"),
            weight=1,
            check_status="L7OK" if up else "L7STS",
        )

    def _users_reach(self, name: str) -> bool:
        return any(
            lb not in self.private_lbs
            and not b.page
            and b.members.get(name) == "ready"
            and self.servers[name].health_file
            for lb, b in self.lbs.items()
        )

    def _replica(self, running: bool) -> mysql.ReplicaStatus:
        yes = "Yes" if running else "No"
        return mysql.ReplicaStatus(
            host=WARM.host,
            port=WARM.port,
            configured=True,
            io_running=yes,
            sql_running=yes,
            seconds_behind=0,
            read_only=True,
        )

    # ------------------------------------------------------------------ reads
    @activity.defn(name="inspect_package")
    async def inspect_package(self, arg: dict[str, Any]) -> deploy.PackageInfo:
        self._enter("inspect_package", None)
        return deploy.PackageInfo(
            path=arg["path"],
            sha256="ab" * 32,
            name="app",
            version=NEW,
            min_upgrade_from=OLD,
            schema_version=NEW_SCHEMA,
            files=3,
            size=1000,
            migrations=(
                deploy.MigrationSpec(
                    version=2,
                    up_sql="ALTER TABLE t ADD c INT",
                    down_sql="ALTER TABLE t DROP c",
                    destructive=self.destructive,
                ),
            ),
        )

    @activity.defn(name="ssh_probe")
    async def ssh_probe(self, arg: dict[str, Any]) -> ssh.SshProbeResult:
        self._enter("ssh_probe", None)
        return ssh.SshProbeResult(host=arg["target"]["host"], port=arg["target"]["port"], ok=True)

    @activity.defn(name="service_status")
    async def service_status(self, arg: dict[str, Any]) -> node.ServiceState:
        name = arg["node"]["name"]
        self._enter("service_status", name)
        return node.ServiceState(node_name=name, running=self._server(name).running, detail="")

    @activity.defn(name="lb_check_member")
    async def lb_check_member(self, arg: dict[str, Any]) -> haproxy.MemberState:
        lb, name = arg["lb"]["name"], arg["node"]
        self._enter("lb_check_member", f"{lb}/{name}")
        if name not in self.lbs[lb].members:
            raise ApplicationError(f"{lb}: no server {name}", type=LB_MEMBER_NOT_FOUND, non_retryable=True)
        return self._member(lb, name)

    @activity.defn(name="check_health")
    async def check_health(self, arg: dict[str, Any]) -> http_checks.HttpCheckResult:
        self._enter("check_health", self._by_url(arg["base_url"]))
        self._answering(arg["base_url"])
        return http_checks.HttpCheckResult(url=arg["base_url"], status=200, body_snippet="ok", elapsed_ms=1)

    @activity.defn(name="get_version")
    async def get_version(self, arg: dict[str, Any]) -> str:
        self._enter("get_version", self._by_url(arg["base_url"]))
        s = self._answering(arg["base_url"])
        version = s.version or ""
        if arg.get("expect") and arg["expect"] != version:
            raise ApplicationError(
                f"{s.node.name} runs {version}, expected {arg['expect']}",
                type=VERSION_MISMATCH,
                non_retryable=True,
            )
        return version

    @activity.defn(name="check_login")
    async def check_login(self, arg: dict[str, Any]) -> http_checks.LoginResult:
        self._enter("check_login", self._by_url(arg["base_url"]))
        s = self._answering(arg["base_url"])
        return http_checks.LoginResult(url=arg["base_url"], status=200, elapsed_ms=1, node=s.node.name)

    @activity.defn(name="wait_healthy")
    async def wait_healthy(self, arg: dict[str, Any]) -> http_checks.WaitHealthyResult:
        self._enter("wait_healthy", self._by_url(arg["base_url"]))
        self._answering(arg["base_url"])
        last = http_checks.HttpCheckResult(url=arg["base_url"], status=200, body_snippet="ok", elapsed_ms=1)
        return http_checks.WaitHealthyResult(url=arg["base_url"], waited_s=0.1, attempts=1, last=last)

    @activity.defn(name="check_serving")
    async def check_serving(self, arg: dict[str, Any]) -> http_checks.ServingResult:
        self._enter("check_serving", self._by_url(arg["base_url"]))
        s = self._answering(arg["base_url"])
        if s.version != arg["expect"]:
            raise ApplicationError(
                f"{s.node.name} runs {s.version}, expected {arg['expect']}",
                type=VERSION_MISMATCH,
                non_retryable=True,
            )
        last = http_checks.HttpCheckResult(url=arg["base_url"], status=200, body_snippet="ok", elapsed_ms=1)
        return http_checks.ServingResult(
            health=http_checks.WaitHealthyResult(url=arg["base_url"], waited_s=0.1, attempts=2, last=last),
            version=arg["expect"],
            login=http_checks.LoginResult(url=arg["base_url"], status=200, elapsed_ms=1),
        )

    @activity.defn(name="count_open_sessions")
    async def count_open_sessions(self, arg: dict[str, Any]) -> node.OpenSessions:
        name = arg["node"]["name"]
        self._enter("count_open_sessions", name)
        return node.OpenSessions(node_name=name, port=9000, sessions=self._server(name).sessions)

    @activity.defn(name="db_schema_version")
    async def db_schema_version(self, arg: dict[str, Any]) -> int:
        self._enter("db_schema_version", None)
        return self.schema

    @activity.defn(name="check_backup_space")
    async def check_backup_space(self, arg: dict[str, Any]) -> mysql.BackupSpace:
        self._enter("check_backup_space", None)
        return mysql.BackupSpace(db_bytes=1000, free_bytes=10**9, need_bytes=2000, ok=True, detail="room")

    @activity.defn(name="db_wait_writes_stopped")
    async def db_wait_writes_stopped(self, arg: dict[str, Any]) -> replication.WritesStopped:
        self._enter("db_wait_writes_stopped", None)
        if arg.get("seen_gtid") is not None:  # the second wait: every old server is stopped by now
            writers = [
                n
                for n, s in self.servers.items()
                if s.running and s.database == "primary" and n in self.inv.load_balancers[0].members
            ]
            if writers:
                self.problems.append(f"writes quiet declared while {', '.join(writers)} still run")
        return replication.WritesStopped(
            gtid="0-1-100", waited_s=0.1, quiet_s=arg["quiet_s"], user_connections=0, since=1000.0
        )

    @activity.defn(name="db_wait_replica_in_sync")
    async def db_wait_replica_in_sync(self, arg: dict[str, Any]) -> mysql.ReplicaStatus:
        self._enter("db_wait_replica_in_sync", None)
        if self.warm != "replicating":
            raise ApplicationError(f"warm replica is {self.warm}", type=UNEXPECTED_STATE, non_retryable=True)
        return self._replica(running=True)

    @activity.defn(name="lb_wait_up")
    async def lb_wait_up(self, arg: dict[str, Any]) -> haproxy.MemberState:
        lb, name = arg["lb"]["name"], arg["node"]
        self._enter("lb_wait_up", f"{lb}/{name}")
        state = self._member(lb, name)
        if not state.is_up:
            raise ApplicationError(
                f"{lb}/{name}: not UP ({state.status}, {state.admin})",
                type=NOT_UP_TIMEOUT,
                non_retryable=True,
            )
        return state

    @activity.defn(name="lb_wait_drained")
    async def lb_wait_drained(self, arg: dict[str, Any]) -> int:
        lb, name = arg["lb"]["name"], arg["node"]
        self._enter("lb_wait_drained", f"{lb}/{name}")
        left = self._server(name).sessions
        if left:
            raise ApplicationError(
                f"{lb}/{name}: {left} session(s) still open after {arg['timeout_s']:g}s",
                type=DRAIN_TIMEOUT,
                non_retryable=True,
            )
        return 0

    @activity.defn(name="lb_preview_check")
    async def lb_preview_check(self, arg: dict[str, Any]) -> haproxy.PreviewCheckResult:
        lb = arg["lb"]["name"]
        self._enter("lb_preview_check", lb)
        answering = sorted(self.serving(lb))
        problems = [] if answering == sorted(arg["expect_nodes"]) else [f"answering {answering}"]
        for n in answering:
            s = self.servers[n]
            if s.version != arg["expect_version"] or self._schema_of(s) != arg["expect_db_schema"]:
                problems.append(f"{n}: {s.version} on schema {self._schema_of(s)}")
        if problems:
            raise ApplicationError(
                f"{lb} preview: {'; '.join(problems)}", type=LB_PREVIEW_CHECK_FAILED, non_retryable=True
            )
        return haproxy.PreviewCheckResult(
            url=FRONTENDS[lb] + "/version",
            requests=4 * len(answering),
            nodes=tuple((n, 4) for n in answering),
            page_on=self.lbs[lb].page,
        )

    # ------------------------------------------------------------------ the database
    @activity.defn(name="db_backup")
    async def db_backup(self, arg: dict[str, Any]) -> mysql.DbBackup:
        self._enter("db_backup", None)
        path = f"{arg['directory']}/{arg['backup_id']}.sql"
        self.snapshots[path] = self.schema
        return mysql.DbBackup(db=self.db, backup_id=arg["backup_id"], path=path, sha256="cd" * 32, size=10)

    @activity.defn(name="db_changed_since")
    async def db_changed_since(self, arg: dict[str, Any]) -> tuple[str, ...]:
        self._enter("db_changed_since", arg["db"]["database"])
        # The migration changed the schema table; the new servers' users wrote items.
        return ("items", "schema_version") if self.schema != self.snapshots[arg["path"]] else ()

    @activity.defn(name="db_restore")
    async def db_restore(self, arg: dict[str, Any]) -> mysql.DbRestoreResult:
        database = arg["db"]["database"]
        self._enter("db_restore", database)
        if database == self.db.database:
            self.schema = self.snapshots[arg["path"]]
            self.restored.append(arg["path"])
        else:
            self.scratch = True
        return mysql.DbRestoreResult(path=arg["path"], tables=3, dropped=(), checksums={}, mismatched=())

    @activity.defn(name="db_drop_database")
    async def db_drop_database(self, arg: dict[str, Any]) -> mysql.DropDatabaseResult:
        self._enter("db_drop_database", arg["database"])
        if arg["database"] == self.db.database:
            self.problems.append("the production database was dropped")
        dropped, self.scratch = self.scratch, False
        return mysql.DropDatabaseResult(database=arg["database"], dropped=dropped)

    @activity.defn(name="db_apply_migration")
    async def db_apply_migration(self, arg: dict[str, Any]) -> mysql.MigrationResult:
        self._enter("db_apply_migration", str(arg["version"]))
        if self.warm == "replicating":
            self.problems.append(f"migration {arg['version']} ran while the warm replica replicates")
            self.warm_schema = arg["version"]
        before = self.schema
        self.schema = arg["version"] if arg["direction"] == "up" else arg["version"] - 1
        return mysql.MigrationResult(
            version=arg["version"],
            direction=arg["direction"],
            applied=True,
            statements=1,
            schema_version_before=before,
            schema_version_after=self.schema,
        )

    @activity.defn(name="db_init_warm_replica")
    async def db_init_warm_replica(self, arg: dict[str, Any]) -> mysql.ReplicaStatus:
        self._enter("db_init_warm_replica", None)
        self.warm, self.warm_schema = "replicating", self.schema
        return self._replica(running=True)

    @activity.defn(name="db_stop_replication")
    async def db_stop_replication(self, arg: dict[str, Any]) -> mysql.ReplicaStatus:
        self._enter("db_stop_replication", None)
        self.warm = "stopped"
        return self._replica(running=False)

    @activity.defn(name="db_promote_warm_replica")
    async def db_promote_warm_replica(self, arg: dict[str, Any]) -> DatabaseEndpoint:
        self._enter("db_promote_warm_replica", None)
        self.warm = "promoted"
        return WARM

    @activity.defn(name="db_release_warm_replica")
    async def db_release_warm_replica(self, arg: dict[str, Any]) -> replication.WarmReleased:
        self._enter("db_release_warm_replica", None)
        if self.warm == "promoted":
            self.problems.append("the promoted warm replica (the site's database) was released")
        was = self.warm == "replicating"
        self.warm, self.warm_schema = "released", None
        return replication.WarmReleased(host=WARM.host, port=WARM.port, dropped=("app",), was_replicating=was)

    # ------------------------------------------------------------------ provisioning
    @activity.defn(name="provision_create")
    async def provision_create(self, arg: dict[str, Any]) -> Node:
        name, template = arg["name"], arg["template"]["name"]
        self._enter("provision_create", name)
        if name in self.servers:  # created by an earlier attempt: the same server
            return self.servers[name].node
        t = self._server(template)
        k = len(self.servers) + len(self.destroyed) + 1
        n = dataclasses.replace(
            t.node,
            name=name,
            url=f"http://127.0.0.1:{9100 + k}",
            ssh=dataclasses.replace(t.node.ssh, port=2300 + k),
        )
        self.servers[name] = Server(
            node=n,
            files=t.files,
            launched=False,
            running=False,
            settings={f: dict(kv) for f, kv in t.settings.items()},
        )
        return n

    @activity.defn(name="provision_start")
    async def provision_start(self, arg: dict[str, Any]) -> None:
        self._enter("provision_start", arg["name"])
        self._server(arg["name"]).launched = True

    @activity.defn(name="provision_destroy")
    async def provision_destroy(self, arg: dict[str, Any]) -> None:
        name = arg["name"]
        self._enter("provision_destroy", name)
        s = self.servers.pop(name, None)
        if s is None:
            return
        attached = [lb for lb, b in self.lbs.items() if name in b.members]
        if attached or s.sessions:
            self.problems.append(
                f"{name} destroyed while attached to {attached} / holding {s.sessions} session(s)"
            )
        self.destroyed.append(name)

    @activity.defn(name="provision_array_disable")
    async def provision_array_disable(self, arg: dict[str, Any]) -> None:
        self._enter("provision_array_disable", arg["provisioning"]["array"]["name"])
        self.array_enabled = False

    @activity.defn(name="provision_array_enable")
    async def provision_array_enable(self, arg: dict[str, Any]) -> None:
        self._enter("provision_array_enable", arg["provisioning"]["array"]["name"])
        self.array_enabled = True

    @activity.defn(name="save_settings_copy")
    async def save_settings_copy(self, arg: dict[str, Any]) -> provision.SavedSettings:
        self._enter("save_settings_copy", arg["node"]["name"])
        current = self._server(arg["node"]["name"]).settings.get(arg["file"], {})
        missing = tuple(k for k in arg["keys"] if k not in current)
        return provision.SavedSettings(
            path=f"{arg['backup_dir']}/{arg['backup_id']}-inputs.csv",
            values_count=len(arg["keys"]) - len(missing),
            missing=missing,
        )

    # ------------------------------------------------------------------ servers
    @activity.defn(name="run_node_command")
    async def run_node_command(self, arg: dict[str, Any]) -> str:
        name = arg["node"]["name"]
        self._enter("run_node_command", name)
        self._server(name).commands.append(arg["command"])
        return "done"

    @activity.defn(name="set_config_values")
    async def set_config_values(self, arg: dict[str, Any]) -> tuple[str, ...]:
        name = arg["node"]["name"]
        self._enter("set_config_values", name)
        s = self._server(name)
        s.settings.setdefault(arg["file"], {}).update(arg["values"])
        # A secret arrives as its reference (the real activity resolves it on the worker).
        for key, ref in (arg.get("secret_values") or {}).items():
            s.settings[arg["file"]][key] = f"<secret {ref.get('env') or ref.get('file')}>"
        cfg = self.inv.application.database_config
        if cfg is not None and arg["file"] == cfg.file:
            s.database = "warm" if arg["values"].get(cfg.host_key) == WARM.host else "primary"
        return tuple(sorted({*arg["values"], *(arg.get("secret_values") or {})}))

    @activity.defn(name="deploy_package")
    async def deploy_package(self, arg: dict[str, Any]) -> deploy.DeployResult:
        name = arg["node"]["name"]
        self._enter("deploy_package", name)
        s = self._server(name)
        if s.running:
            self.problems.append(f"{name}: code deployed while it runs")
        s.files = arg["package"]["version"]
        return deploy.DeployResult(node_name=name, version=s.files, files_written=3, merged=())

    @activity.defn(name="start_service")
    async def start_service(self, arg: dict[str, Any]) -> node.ServiceState:
        name = arg["node"]["name"]
        self._enter("start_service", name)
        s = self._server(name)
        if not s.launched:
            self.problems.append(f"{name}: service started before the server was launched")
        if s.files == NEW and self._schema_of(s) < NEW_SCHEMA:
            self.problems.append(f"{name}: {NEW} started on schema {self._schema_of(s)}")
        s.running = True
        return node.ServiceState(node_name=name, running=True, detail="")

    @activity.defn(name="stop_service")
    async def stop_service(self, arg: dict[str, Any]) -> node.ServiceState:
        name = arg["node"]["name"]
        self._enter("stop_service", name)
        s = self._server(name)
        if s.running and self._users_reach(name):
            self.problems.append(f"{name}: stopped while it serves users")
        s.running = False
        return node.ServiceState(node_name=name, running=False, detail="")

    @activity.defn(name="set_health_file")
    async def set_health_file(self, arg: dict[str, Any]) -> node.HealthFileState:
        name = arg["node"]["name"]
        self._enter("set_health_file", name)
        s = self._server(name)
        changed = s.health_file != arg["present"]
        s.health_file = arg["present"]
        return node.HealthFileState(node_name=name, present=s.health_file, changed=changed)

    # ------------------------------------------------------------------ balancers
    @activity.defn(name="lb_add_server")
    async def lb_add_server(self, arg: dict[str, Any]) -> haproxy.MemberState:
        lb, name = arg["lb"]["name"], arg["node"]
        self._enter("lb_add_server", f"{lb}/{name}")
        if not self._server(name).running:
            self.problems.append(f"{lb}/{name}: a stopped server attached")
        self.lbs[lb].members[name] = "ready"
        return self._member(lb, name)

    @activity.defn(name="lb_del_server")
    async def lb_del_server(self, arg: dict[str, Any]) -> None:
        lb, name = arg["lb"]["name"], arg["node"]
        self._enter("lb_del_server", f"{lb}/{name}")
        s = self.servers.get(name)
        if s is not None and s.sessions and name in self.lbs[lb].members:
            if not arg["force"]:
                raise ApplicationError(
                    f"{lb}/{name}: {s.sessions} session(s) open", type=LB_MEMBER_BUSY, non_retryable=True
                )
            s.sessions = 0  # cut
        self.lbs[lb].members.pop(name, None)

    @activity.defn(name="lb_guard")
    async def lb_guard(self, arg: dict[str, Any]) -> haproxy.GuardResult:
        return haproxy.GuardResult(process=STEADY, reloaded=False)  # never reloaded here

    @activity.defn(name="lb_set_state")
    async def lb_set_state(self, arg: dict[str, Any]) -> haproxy.MemberState:
        lb, name = arg["lb"]["name"], arg["node"]
        self._enter("lb_set_state", f"{lb}/{name}")
        if name not in self.lbs[lb].members:
            raise ApplicationError(f"{lb}: no server {name}", type=LB_MEMBER_NOT_FOUND, non_retryable=True)
        self.lbs[lb].members[name] = arg["state"]
        return self._member(lb, name)

    @activity.defn(name="lb_set_maintenance")
    async def lb_set_maintenance(self, arg: dict[str, Any]) -> bool:
        lb = arg["lb"]["name"]
        self._enter("lb_set_maintenance", lb)
        self.lbs[lb].page = arg["on"]
        return bool(arg["on"])
