"""An Open-Xchange site in memory (seed 002) and same-name stand-in activities that act on
it and log every call: the logic tests of `ox-upgradeschemata` and `ox-node-upgrade` run the
real workflows against it (no SSH, no OX tools, no balancer).

The site: middleware nodes `ox1..oxN` (a release installed, a service that runs it, three
properties files), the main balancer `www` and the secondary `wwwxyz`, the config DB's
registered servers and its schemata (server, enabled, the release their update tasks ran
for). The stand-ins refuse what the real site refuses (a node stopped while serving, a
release installed on a running node, `runupdate` on a node without the new release, a
schema moved to a server that is not registered), so an order the runbook forbids fails
the run instead of passing unseen. Failures are injected per test: a schema whose update
tasks fail (a result, as `ox_upgrade_schema` reports them), a node unhealthy on the new
release (a non-retryable HealthCheckFailed), and retryable errors raised before an
activity touches anything (`flaky`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from temporalio import activity
from temporalio.exceptions import ApplicationError

import activities.haproxy as haproxy
import activities.http_checks as http_checks
import activities.node as node
import activities.ox as ox
import activities.ssh as ssh
from errors import (
    HEALTH_CHECK_FAILED,
    NOT_UP_TIMEOUT,
    OX_TOOL_FAILED,
    OX_UPDATE_TASKS_FAILED,
    UNEXPECTED_STATE,
    VERSION_MISMATCH,
)
from inventory.load import parse_inventory
from inventory.model import Inventory
from tests.fake_balancer import steady_lb_guard
from workflows.ox_node_upgrade import HAZELCAST_GROUP_KEY, REDIRECT_KEY, SERVER_NAME_KEY

OLD = "7.10.0"
NEW = "7.10.1"
OLD_SERVER = "oxserver"
NEW_SERVER = "oxserver-xyz"
OLD_SERVER_ID = 1
APPROVER = "ops1"
MAIN = "www"
SECONDARY = "wwwxyz"
SECONDARY_URL = "http://127.0.0.1:8081"
SERVER_PROPERTIES = "/opt/open-xchange/etc/server.properties"
SYSTEM_PROPERTIES = "/opt/open-xchange/etc/system.properties"
HAZELCAST_PROPERTIES = "/opt/open-xchange/etc/hazelcast.properties"
OLD_GROUP = "open-xchange"
# The properties the procedures touch, by a short name for the call log.
SHORT = {REDIRECT_KEY: "redirect", SERVER_NAME_KEY: "SERVER_NAME", HAZELCAST_GROUP_KEY: "hazelcast"}
MUTATING = {
    "ox_set_property",
    "ox_reload_configuration",
    "lb_set_state",
    "stop_service",
    "start_service",
    "ox_install_version",
    "ox_register_server",
    "ox_upgrade_schema",
    "ox_revert_schema",
    "ox_change_server",
    "ox_enable_schema",
}
DEFAULT_APPROVERS: dict[str, list[str]] = {"failure": [APPROVER], "server-already-registered": [APPROVER]}


def schema_name(i: int) -> str:
    return f"oxdatabase_{i}"


def ox_site(n: int = 3, approvers: dict[str, list[str]] | None = None) -> Inventory:
    """An OX site of `n` nodes behind `www` (main) and `wwwxyz` (secondary); `approvers`
    None: ops1 may decide the failure gates and server-already-registered; {}: nobody."""
    members = {f"ox{i}": f"ox{i}" for i in range(1, n + 1)}
    raw: dict[str, Any] = {
        "site": "fake-ox",
        "nodes": [
            {
                "name": f"ox{i}",
                "ssh": {"host": "127.0.0.1", "port": 2300 + i, "key": {"env": "FAKE_KEY"}},
                "app_dir": "/opt/open-xchange",
                "url": f"http://127.0.0.1:{9100 + i}",
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
                "name": MAIN,
                "kind": "haproxy",
                "runtime_api": "tcp:127.0.0.1:1",
                "backend": "ox",
                "members": members,
            },
            {
                "name": SECONDARY,
                "kind": "haproxy",
                "runtime_api": "tcp:127.0.0.1:2",
                "backend": "ox",
                "members": members,
            },
        ],
        "application": {
            "name": "open-xchange",
            "health": {"path": "/health"},
            "version": {"path": "/version"},
        },
        "approvers": DEFAULT_APPROVERS if approvers is None else approvers,
        "ox": {
            "server_name": OLD_SERVER,
            "main_lb": MAIN,
            "secondary_lb": SECONDARY,
            "secondary_url": SECONDARY_URL,
            "admin_password": {"env": "FAKE_OX_PASSWORD"},
            "install_command": "install {version}",
            "version_command": "ox-version",
            "server_properties": SERVER_PROPERTIES,
            "system_properties": SYSTEM_PROPERTIES,
            "hazelcast_properties": HAZELCAST_PROPERTIES,
        },
    }
    return parse_inventory(raw)


class Call(NamedTuple):
    """One stand-in call: the activity, what it acted on (a node or a schema), and how."""

    name: str
    target: str | None
    detail: str = ""


@dataclass
class Schema:
    contexts: int
    server_id: int = OLD_SERVER_ID
    enabled: bool = True
    version: str = OLD  # the release whose update tasks ran on it
    runupdates: int = 0


def schemata(*contexts: tuple[int, int]) -> dict[str, Schema]:
    """(number, contexts) pairs, in the order listdatabaseschema lists them."""
    return {schema_name(i): Schema(contexts=c) for i, c in contexts}


def _node_of(arg: dict[str, Any], key: str = "node") -> str:
    n: Any = arg[key]
    return n if isinstance(n, str) else str(n["name"])


@dataclass
class FakeOx:
    """The world the stand-in activities act on (see the module docstring)."""

    nodes: list[str]
    schemata: dict[str, Schema] = field(default_factory=lambda: schemata((10, 5), (2, 3), (1, 4)))
    installed: dict[str, str] = field(default_factory=dict)
    running: dict[str, str | None] = field(default_factory=dict)  # node -> the release it runs
    props: dict[str, dict[tuple[str, str], str]] = field(default_factory=dict)
    lb: dict[tuple[str, str], str] = field(default_factory=dict)  # (balancer, node) -> admin state
    servers: dict[int, str] = field(default_factory=lambda: {OLD_SERVER_ID: OLD_SERVER})
    calls: list[Call] = field(default_factory=list)
    # (tool, schema) of the OX tools ox_upgrade_schema / ox_revert_schema ran, in order.
    tools: list[tuple[str, str]] = field(default_factory=list)
    # Injected: schema -> runs whose update tasks fail; nodes failing their health check on
    # the new release; activity -> error types it raises before it touches anything, one a
    # call: retryable (`flaky`) or not (`broken`).
    update_fails: dict[str, int] = field(default_factory=dict)
    unhealthy: set[str] = field(default_factory=set)
    flaky: dict[str, list[str]] = field(default_factory=dict)
    broken: dict[str, list[str]] = field(default_factory=dict)
    # The fewest nodes serving in the main balancer (ready and running) at any moment.
    main_low: int = 0

    def __post_init__(self) -> None:
        for n in self.nodes:
            self.installed.setdefault(n, OLD)
            self.running.setdefault(n, self.installed[n])
            self.props.setdefault(
                n,
                {
                    (SYSTEM_PROPERTIES, SERVER_NAME_KEY): OLD_SERVER,
                    (HAZELCAST_PROPERTIES, HAZELCAST_GROUP_KEY): OLD_GROUP,
                },
            )
            self.lb.setdefault((MAIN, n), "ready")
            self.lb.setdefault((SECONDARY, n), "maint")
        self.main_low = self.serving(MAIN)

    # ------------------------------------------------------------------ what tests read
    def mutations(self) -> list[Call]:
        return [c for c in self.calls if c.name in MUTATING]

    def of(self, target: str) -> list[tuple[str, str]]:
        """(activity, detail) of the mutating calls on one node or schema, in order."""
        return [(c.name, c.detail) for c in self.mutations() if c.target == target]

    def prop(self, n: str, key: str) -> str | None:
        path = {
            REDIRECT_KEY: SERVER_PROPERTIES,
            SERVER_NAME_KEY: SYSTEM_PROPERTIES,
            HAZELCAST_GROUP_KEY: HAZELCAST_PROPERTIES,
        }[key]
        return self.props[n].get((path, key))

    def server_id(self, name: str) -> int | None:
        return next((i for i, n in self.servers.items() if n == name), None)

    def states(self) -> dict[str, tuple[int, bool, str]]:
        """schema -> (server id, enabled, release its update tasks ran for)."""
        return {k: (v.server_id, v.enabled, v.version) for k, v in self.schemata.items()}

    def members(self, lb: str) -> dict[str, str]:
        return {n: self.lb[(lb, n)] for n in self.nodes}

    def serving(self, lb: str) -> int:
        return sum(1 for n in self.nodes if self.lb[(lb, n)] == "ready" and self.running[n] is not None)

    def _changed(self) -> None:
        self.main_low = min(self.main_low, self.serving(MAIN))

    # ------------------------------------------------------------------ the stand-ins
    def activities(self) -> list[Callable[..., Any]]:
        s = self
        by_url = {f"http://127.0.0.1:{9100 + int(n[2:])}": n for n in s.nodes}

        def log(name: str, target: str | None, detail: str = "") -> None:
            s.calls.append(Call(name, target, detail))

        def flake(name: str, target: str | None) -> None:
            for injected, retryable in ((s.flaky, True), (s.broken, False)):
                left = injected.get(name)
                if left:
                    kind = left.pop(0)
                    raise ApplicationError(
                        f"{target}: {name}: injected {kind}", type=kind, non_retryable=not retryable
                    )

        def refuse(message: str, kind: str = UNEXPECTED_STATE) -> ApplicationError:
            return ApplicationError(message, type=kind, non_retryable=True)

        def ok(url: str) -> http_checks.HttpCheckResult:
            return http_checks.HttpCheckResult(url=url, status=200, body_snippet="ok", elapsed_ms=1)

        def member(lb: str, n: str) -> haproxy.MemberState:
            return haproxy.MemberState(
                lb_name=lb,
                node_name=n,
                backend="ox",
                server=n,
                status="UP" if s.running[n] else "DOWN",
                scur=0,
                admin=s.lb[(lb, n)],
                weight=1,
                check_status="L7OK",
            )

        def lb_of(arg: dict[str, Any]) -> tuple[str, str]:
            return str(arg["lb"]["name"]), _node_of(arg)

        # ---------------------------------------------------------------- reads
        @activity.defn(name="ssh_probe")
        async def ssh_probe(arg: dict[str, Any]) -> ssh.SshProbeResult:
            log("ssh_probe", None)
            return ssh.SshProbeResult(host=arg["target"]["host"], port=arg["target"]["port"], ok=True)

        @activity.defn(name="lb_check_member")
        async def lb_check_member(arg: dict[str, Any]) -> haproxy.MemberState:
            lb, n = lb_of(arg)
            log("lb_check_member", n, lb)
            return member(lb, n)

        @activity.defn(name="check_health")
        async def check_health(arg: dict[str, Any]) -> http_checks.HttpCheckResult:
            log("check_health", by_url[arg["base_url"]])
            return ok(arg["base_url"])

        @activity.defn(name="get_version")
        async def get_version(arg: dict[str, Any]) -> str:
            n = by_url[arg["base_url"]]
            log("get_version", n)
            running = s.running[n]
            if running is None:
                raise refuse(f"{n}: no answer (stopped)", HEALTH_CHECK_FAILED)
            if arg.get("expect") and arg["expect"] != running:
                raise refuse(f"{n} runs {running}, expected {arg['expect']}", VERSION_MISMATCH)
            return running

        @activity.defn(name="wait_healthy")
        async def wait_healthy(arg: dict[str, Any]) -> http_checks.WaitHealthyResult:
            n = by_url[arg["base_url"]]
            log("wait_healthy", n)
            if s.running[n] is None or (n in s.unhealthy and s.running[n] == NEW):
                raise refuse(f"{n} /health answered 500", HEALTH_CHECK_FAILED)
            return http_checks.WaitHealthyResult(
                url=arg["base_url"], waited_s=0.1, attempts=2, last=ok(arg["base_url"])
            )

        @activity.defn(name="lb_wait_drained")
        async def lb_wait_drained(arg: dict[str, Any]) -> int:
            lb, n = lb_of(arg)
            log("lb_wait_drained", n, lb)
            return 0

        @activity.defn(name="lb_wait_up")
        async def lb_wait_up(arg: dict[str, Any]) -> haproxy.MemberState:
            lb, n = lb_of(arg)
            log("lb_wait_up", n, lb)
            if not member(lb, n).is_up:
                raise refuse(
                    f"{n} is not UP on {lb} ({s.lb[(lb, n)]}, running {s.running[n]})", NOT_UP_TIMEOUT
                )
            return member(lb, n)

        @activity.defn(name="ox_installed_version")
        async def ox_installed_version(arg: dict[str, Any]) -> str:
            log("ox_installed_version", _node_of(arg))
            return s.installed[_node_of(arg)]

        @activity.defn(name="ox_list_schemata")
        async def ox_list_schemata(arg: dict[str, Any]) -> tuple[ox.OxSchema, ...]:
            log("ox_list_schemata", _node_of(arg))
            flake("ox_list_schemata", _node_of(arg))
            return tuple(ox.OxSchema(name=k, pool_id=1, contexts=v.contexts) for k, v in s.schemata.items())

        @activity.defn(name="ox_list_databases")
        async def ox_list_databases(arg: dict[str, Any]) -> tuple[ox.OxDatabase, ...]:
            log("ox_list_databases", _node_of(arg))
            units = sum(v.contexts for v in s.schemata.values())
            return (ox.OxDatabase(id=1, name="oxdb", max_units=1000, current_units=units),)

        @activity.defn(name="ox_list_servers")
        async def ox_list_servers(arg: dict[str, Any]) -> tuple[ox.OxServer, ...]:
            log("ox_list_servers", _node_of(arg))
            return tuple(ox.OxServer(id=i, name=n) for i, n in sorted(s.servers.items()))

        @activity.defn(name="ox_get_property")
        async def ox_get_property(arg: dict[str, Any]) -> str | None:
            log("ox_get_property", _node_of(arg), SHORT.get(arg["key"], arg["key"]))
            return s.props[_node_of(arg)].get((arg["path"], arg["key"]))

        # ---------------------------------------------------------------- changes
        @activity.defn(name="ox_set_property")
        async def ox_set_property(arg: dict[str, Any]) -> ox.OxPropertyChange:
            n, where = _node_of(arg), (str(arg["path"]), str(arg["key"]))
            log("ox_set_property", n, f"{SHORT.get(where[1], where[1])}={arg['value']}")
            previous = s.props[n].get(where)
            if arg["value"] is None:
                s.props[n].pop(where, None)
            else:
                s.props[n][where] = str(arg["value"])
            return ox.OxPropertyChange(
                path=where[0], key=where[1], previous=previous, changed=previous != arg["value"]
            )

        @activity.defn(name="ox_reload_configuration")
        async def ox_reload_configuration(arg: dict[str, Any]) -> None:
            log("ox_reload_configuration", _node_of(arg))

        @activity.defn(name="lb_set_state")
        async def lb_set_state(arg: dict[str, Any]) -> haproxy.MemberState:
            lb, n = lb_of(arg)
            log("lb_set_state", n, f"{lb}={arg['state']}")
            flake("lb_set_state", n)
            s.lb[(lb, n)] = str(arg["state"])
            s._changed()
            return member(lb, n)

        @activity.defn(name="stop_service")
        async def stop_service(arg: dict[str, Any]) -> node.ServiceState:
            n = _node_of(arg)
            log("stop_service", n)
            serving = [lb for lb in (MAIN, SECONDARY) if s.lb[(lb, n)] == "ready"]
            if serving and s.running[n] is not None:
                raise refuse(f"{n}: stopped while serving in {', '.join(serving)}")
            s.running[n] = None
            s._changed()
            return node.ServiceState(node_name=n, running=False, detail="stopped", changed=True)

        @activity.defn(name="start_service")
        async def start_service(arg: dict[str, Any]) -> node.ServiceState:
            n = _node_of(arg)
            log("start_service", n)
            s.running[n] = s.installed[n]
            s._changed()
            return node.ServiceState(node_name=n, running=True, detail="started", changed=True)

        @activity.defn(name="ox_install_version")
        async def ox_install_version(arg: dict[str, Any]) -> None:
            n = _node_of(arg)
            log("ox_install_version", n, str(arg["version"]))
            flake("ox_install_version", n)
            if s.running[n] is not None:
                raise refuse(f"{n}: release installed under the running service")
            s.installed[n] = str(arg["version"])

        @activity.defn(name="ox_register_server")
        async def ox_register_server(arg: dict[str, Any]) -> int:
            log("ox_register_server", _node_of(arg), str(arg["name"]))
            existing = s.server_id(str(arg["name"]))
            if existing is not None:
                return existing
            new_id = max(s.servers) + 1
            s.servers[new_id] = str(arg["name"])
            return new_id

        @activity.defn(name="ox_upgrade_schema")
        async def ox_upgrade_schema(arg: dict[str, Any]) -> ox.OxSchemaUpgrade:
            name, update = str(arg["schema"]), _node_of(arg, "update")
            log("ox_upgrade_schema", name, update)
            flake("ox_upgrade_schema", name)
            sc = s.schemata[name]
            if s.installed[update] != NEW:
                raise refuse(f"runupdate -n {name} on {update}, which has {s.installed[update]} installed")
            if arg["server_id"] not in s.servers:
                raise refuse(f"changeserver -s {arg['server_id']}: no such server")
            steps: list[ox.OxStepTime] = []

            def ran(step: str, tool: str, ok: bool = True) -> None:
                s.tools.append((tool, name))
                now = time.time()
                steps.append(ox.OxStepTime(seed_step=step, started=now, ended=now, ok=ok))

            if sc.contexts == 0:
                ran("4", "disableschema", ok=False)
                return ox.OxSchemaUpgrade(
                    schema=name,
                    steps=tuple(steps),
                    failed_step="4",
                    error=f"{OX_TOOL_FAILED}: disableschema -m {name}: no contexts",
                )
            sc.enabled = False
            ran("4", "disableschema")
            sc.server_id = int(arg["server_id"])
            ran("5", "changeserver")
            sc.runupdates += 1
            if s.update_fails.get(name, 0) > 0:
                s.update_fails[name] -= 1
                ran("6", "runupdate", ok=False)
                return ox.OxSchemaUpgrade(
                    schema=name,
                    steps=tuple(steps),
                    failed_step="6",
                    error=f"{OX_UPDATE_TASKS_FAILED}: update task(s) failed on {name}: FakeUpdateTask",
                )
            sc.version = NEW
            ran("6", "runupdate")
            sc.enabled = True
            ran("7", "enableschema")
            return ox.OxSchemaUpgrade(schema=name, steps=tuple(steps))

        @activity.defn(name="ox_revert_schema")
        async def ox_revert_schema(arg: dict[str, Any]) -> None:
            name = str(arg["schema"])
            log("ox_revert_schema", name, f"server {arg['old_server_id']}")
            sc = s.schemata[name]
            if arg["failed_step"] != "4":
                sc.enabled = False
                s.tools.append(("disableschema", name))
                sc.server_id = int(arg["old_server_id"])
                s.tools.append(("changeserver", name))
            sc.enabled = True
            s.tools.append(("enableschema", name))

        @activity.defn(name="ox_change_server")
        async def ox_change_server(arg: dict[str, Any]) -> None:
            name = str(arg["schema"])
            log("ox_change_server", name, f"server {arg['server_id']}")
            if s.schemata[name].enabled:
                raise refuse(f"changeserver: the schema '{name}' is not disabled", OX_TOOL_FAILED)
            s.schemata[name].server_id = int(arg["server_id"])

        @activity.defn(name="ox_enable_schema")
        async def ox_enable_schema(arg: dict[str, Any]) -> None:
            log("ox_enable_schema", str(arg["schema"]))
            s.schemata[str(arg["schema"])].enabled = True

        return [
            ssh_probe,
            lb_check_member,
            check_health,
            get_version,
            wait_healthy,
            lb_wait_drained,
            lb_wait_up,
            ox_installed_version,
            ox_list_schemata,
            ox_list_databases,
            ox_list_servers,
            ox_get_property,
            ox_set_property,
            ox_reload_configuration,
            lb_set_state,
            stop_service,
            start_service,
            ox_install_version,
            ox_register_server,
            ox_upgrade_schema,
            ox_revert_schema,
            ox_change_server,
            ox_enable_schema,
            steady_lb_guard(),
        ]
