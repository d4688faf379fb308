"""The site inventory: one YAML file per site, loaded into frozen dataclasses.

The same format describes a customer's site and the embedded lab (`.lab/site.yaml`).
Secrets are never values here: a `SecretRef` names an environment variable or a file,
and only activities resolve it (see `activities/secrets.py`), so no secret ever enters a
workflow input or history.

`load_inventory(path)` validates everything before anything runs and raises
`InventoryError` listing *every* problem with its path, e.g.
``nodes[2].ssh.port: expected an integer 1-65535, got "22a"``.

This module is imported by workflows, so it must stay deterministic and free of I/O at
import time; only `load_inventory` / `parse_inventory` (called outside workflows) read files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

SERVICE_KINDS = ("command", "systemd", "iis")
LB_KINDS = ("haproxy", "f5")
DB_KINDS = ("mysql", "mssql")
PROVISIONING_KINDS = ("command", "lab")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# An HTTP header name: a token of RFC 9110 (section 5.6.2).
_HEADER_TOKEN_RE = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}")


@dataclass(frozen=True)
class SecretRef:
    """A reference to a secret: exactly one of `env` (variable name) or `file` (path)."""

    env: str | None = None
    file: str | None = None

    def describe(self) -> str:
        return f"env:{self.env}" if self.env else f"file:{self.file}"


@dataclass(frozen=True)
class SshTarget:
    host: str
    port: int = 22
    user: str = "root"
    key: SecretRef | None = None
    password: SecretRef | None = None
    # Path of a known_hosts file; None means the user's default (~/.ssh/known_hosts).
    known_hosts: str | None = None
    connect_timeout_s: float = 10.0


@dataclass(frozen=True)
class ServiceControl:
    """How a node's application service is stopped, started and inspected.

    kind=command: shell commands run in the node's login directory (`stop`, `start`,
    `status`; `status` exits 0 when running). kind=systemd: `unit`. kind=iis: `site` and
    `app_pool`, driven through PowerShell.
    """

    kind: str
    stop: str | None = None
    start: str | None = None
    status: str | None = None
    unit: str | None = None
    site: str | None = None
    app_pool: str | None = None
    timeout_s: float = 60.0


@dataclass(frozen=True)
class Node:
    name: str
    ssh: SshTarget
    app_dir: str
    service: ServiceControl
    # Base URL reaching this node directly (bypassing the load balancer), for checks.
    url: str
    zone: str = "default"
    group: str | None = None


@dataclass(frozen=True)
class LoadBalancer:
    """A load balancer in front of the nodes.

    kind=haproxy: `runtime_api` is `unix:/path/to.sock` or `tcp:host:port`; `backend` is
    the backend holding the nodes; `members` maps node name -> server name.
    kind=f5: `url` (iControl REST base), `pool`, `members` maps node name -> pool member
    (`address:port`), `user` and `credential`.
    """

    name: str
    kind: str
    members: dict[str, str]
    runtime_api: str | None = None
    backend: str | None = None
    url: str | None = None
    pool: str | None = None
    user: str | None = None
    credential: SecretRef | None = None
    # How long a drain may take before the step fails (sessions still open).
    drain_timeout_s: float = 120.0
    # This balancer's own public URL (its frontend), where a procedure tests the servers
    # behind it (seed 004's temporary test balancer: `https://test1.mysite.com`).
    frontend_url: str | None = None
    # HAProxy: the options of a server attached at run time (`add server <backend>/<name>
    # <address> <options>`): dynamic servers take no `default-server` line, so the checks
    # are spelled out here.
    add_server_options: str = "check"
    # HAProxy: the maintenance page's switch (seed 004 step 18), a runtime map entry.
    maintenance: MaintenanceSwitch | None = None


@dataclass(frozen=True)
class MaintenanceSwitch:
    """A maintenance page served by HAProxy itself (503 with Retry-After) while the map
    entry `key` in the map file `map` (its path as HAProxy names it) is `on`; `set map`
    through the runtime API switches it, never a reload. The frontend's configuration holds
    the rule, e.g. `http-request return status 503 ... if { str(main),map(<map>) -m str on }`.

    `preview_header` (optional): a request carrying this header, whose value is a key the
    same map holds with the value `preview`, passes the page (the rule also has `!{
    req.hdr(<header>),map(<map>,none) -m str preview }`): a procedure tests the new servers
    through the balancer while the page is up for everyone else (seed 004 step 30), with a
    one-time key it adds (`add map`) and deletes again (lb_preview_check)."""

    map: str
    key: str
    preview_header: str = ""


@dataclass(frozen=True)
class DatabaseEndpoint:
    host: str
    port: int


@dataclass(frozen=True)
class Database:
    name: str
    kind: str
    host: str
    port: int
    database: str
    user: str
    password: SecretRef
    replica: DatabaseEndpoint | None = None
    # Where logical backups are written (on the worker's machine).
    backup_dir: str | None = None
    # A database on the same server where a restored copy of `database` is tested (a
    # backup's restore check, a migration's dry run) and then dropped; never `database`.
    scratch_database: str | None = None
    # An administrative account (replication control, promotion, initialising a replica):
    # on the primary and on `warm_replica`.
    admin_user: str | None = None
    admin_password: SecretRef | None = None
    # The account a replica replicates with (REPLICATION SLAVE on the primary).
    replication_user: str | None = None
    replication_password: SecretRef | None = None
    # An empty server that a procedure initialises as a replica of the primary (seed 004
    # steps 5 and 6, the "warm" backup), stops replicating before the migrations and
    # promotes if the upgrade is reverted.
    warm_replica: DatabaseEndpoint | None = None


@dataclass(frozen=True)
class HttpCheck:
    path: str
    expect_status: int = 200
    # For a login check: the user name and a reference to the password.
    user: str | None = None
    password: SecretRef | None = None


@dataclass(frozen=True)
class AdminApi:
    """The application's admin interface (maintenance mode, upgrade settings, audit):
    `Authorization: Bearer <token>` on every request under `path_prefix`."""

    token: SecretRef
    path_prefix: str = "/admin"


@dataclass(frozen=True)
class DatabaseClientConfig:
    """Where a node's application reads its database server from: a `key = value` file
    relative to the app folder (a procedure that moves the nodes to another server, e.g.
    the promoted warm replica, rewrites these two keys and restarts the service)."""

    file: str
    host_key: str = "host"
    port_key: str = "port"


@dataclass(frozen=True)
class Application:
    name: str
    # Files that are never overwritten nor copied between nodes (e.g. encryption.config).
    protected_files: tuple[str, ...] = ()
    # key=value config files whose per-node customisations are carried onto new defaults.
    merge_files: tuple[str, ...] = ()
    health: HttpCheck = field(default_factory=lambda: HttpCheck(path="/health"))
    version: HttpCheck = field(default_factory=lambda: HttpCheck(path="/version"))
    login: HttpCheck | None = None
    # The public URL through the load balancer.
    url: str | None = None
    admin: AdminApi | None = None
    # The health-check file on a node (relative to its login folder): while it is absent
    # the health check answers 404, which HAProxy's `http-check disable-on-404` turns into a
    # drain (no new sessions, the open ones finish; seed 003 step 12).
    health_file: str | None = None
    database_config: DatabaseClientConfig | None = None
    # Whether a server of this application must be restarted to see a migrated schema
    # (seed 004 steps 26, 29). false: it reads the schema as it goes, so a server started
    # with the new code before the migration serves it afterwards without a restart (and
    # major-maintenance-window checks that it does).
    restart_after_migration: bool = True


@dataclass(frozen=True)
class Rollout:
    batch_size: int = 1
    # Explicit batches of node names; overrides batch_size when given.
    batches: tuple[tuple[str, ...], ...] = ()
    # How long a node may take to become healthy after start.
    health_timeout_s: float = 60.0


@dataclass(frozen=True)
class Staging:
    """A staging copy of the site (seed "Task Five"): one server, outside every load
    balancer, whose app folder receives a production backup and whose database a restored
    copy of the production database, to test an upgrade before production gets it.

    `config`: file -> key -> value, written into the restored files (key = value files),
    e.g. {"web.config": {"http.port": "18008", "node.name": "staging"},
    "database.config": {"database": "app_staging"}}, so the copy talks to its own port
    and database and never to production's."""

    ssh: SshTarget
    app_dir: str
    service: ServiceControl
    url: str
    database: str
    config: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class OxSettings:
    """An Open-Xchange cluster (seed 002): how zerodown drives OX's command line tools over
    SSH and which balancers take part in the node-by-node upgrade.

    `server_name`: the old cluster's registered server (its nodes' SERVER_NAME).
    `main_lb` / `secondary_lb`: names in `load_balancers`; the secondary is reached by
    `secondary_url`, the value of `com.openexchange.server.migrationRedirectURL`.
    `tools_dir`: where registerserver, changeserver, runupdate, ... live on a node.
    `admin_password`: the master admin's password (a reference; handed to the tools on
    standard input, never on a command line). Paths and commands run in the node's login
    directory: `install_command` takes `{version}`; `version_command` prints the installed
    release; `reload_command` makes the running service re-read its properties.
    `schema_shares`: how many schemata each node's turn moves (in upgrade order); the node
    after the listed shares takes the rest. Empty: the first node a pilot schema, the
    second all the others.
    `runupdate_timeout_s` / `upgradeschemata_timeout_s`: the time budget of one runupdate of
    a schema and of one whole run of OX's upgradeschemata tool; a run over it is left
    running and the step fails (a second run is never started beside it).
    `hazelcast_properties`: where a node's Hazelcast cluster settings are (seed 002 step 2:
    the old and the new release must form different clusters)."""

    server_name: str
    main_lb: str
    secondary_lb: str
    secondary_url: str
    admin_password: SecretRef
    install_command: str
    version_command: str
    admin_user: str = "oxadminmaster"
    tools_dir: str = "/opt/open-xchange/sbin"
    server_properties: str = "/opt/open-xchange/etc/server.properties"
    system_properties: str = "/opt/open-xchange/etc/system.properties"
    reload_command: str = "/opt/open-xchange/sbin/reloadconfiguration"
    schema_shares: tuple[int, ...] = ()
    runupdate_timeout_s: float = 3600.0
    upgradeschemata_timeout_s: float = 86400.0
    hazelcast_properties: str = "/opt/open-xchange/etc/hazelcast.properties"


@dataclass(frozen=True)
class ServerArray:
    """A server array (seeds 003/004): the commands that stop it from launching servers and
    let it launch again, run on the worker's machine."""

    name: str
    disable: str
    enable: str


@dataclass(frozen=True)
class Provisioning:
    """How servers come and go (seeds 003 and 004: clone, launch, terminate).

    kind=command: commands run on the worker's machine, in the inventory's folder, with
    `{template}` (the node cloned), `{name}` (the new server's name) substituted (shell
    quoted). `create` clones the template and prints the new server's node entry as JSON
    (the fields of a `nodes` entry), `start` launches it, `destroy` terminates it; each must
    be safe to run twice (a retried step runs it again).
    kind=lab: the lab (`lab_root`, its folder) creates a node from an existing one (folder,
    service, SSH endpoint, ports) and destroys it."""

    kind: str
    create: str | None = None
    start: str | None = None
    destroy: str | None = None
    lab_root: str | None = None
    timeout_s: float = 300.0
    array: ServerArray | None = None


@dataclass(frozen=True)
class Inventory:
    site: str
    nodes: tuple[Node, ...]
    load_balancers: tuple[LoadBalancer, ...] = ()
    databases: tuple[Database, ...] = ()
    application: Application = field(default_factory=lambda: Application(name="app"))
    approvers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    rollout: Rollout = field(default_factory=Rollout)
    # Where the inventory was loaded from (informational).
    source: str | None = None
    staging: Staging | None = None
    ox: OxSettings | None = None
    provisioning: Provisioning | None = None

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        known = ", ".join(n.name for n in self.nodes)
        raise UnknownNodeError(f"unknown node {name!r} in site {self.site!r} (known: {known})")

    def batches(self, only: Iterable[str] = ()) -> list[list[Node]]:
        """Nodes in deployment order, grouped in batches (unknown names raise)."""
        wanted = list(only)
        for name in wanted:
            self.node(name)
        if self.rollout.batches:
            groups = [[self.node(n) for n in b] for b in self.rollout.batches]
        else:
            size = max(1, self.rollout.batch_size)
            ns = list(self.nodes)
            groups = [ns[i : i + size] for i in range(0, len(ns), size)]
        if wanted:
            groups = [[n for n in g if n.name in wanted] for g in groups]
        return [g for g in groups if g]


class InventoryError(ValueError):
    """Raised with every problem found; `problems` holds one line per problem."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = problems
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{len(problems)} problem(s) in inventory:\n  " + "\n  ".join(problems))


class UnknownNodeError(ValueError):
    pass


# --------------------------------------------------------------------------- parsing


class _Reader:
    """Collects problems while walking the raw YAML tree, so all are reported at once."""

    def __init__(self, base_dir: Path | None) -> None:
        self.problems: list[str] = []
        self.base_dir = base_dir

    def problem(self, path: str, msg: str) -> None:
        self.problems.append(f"{path or '(top)'}: {msg}")

    # -- primitive getters; they return a fallback after recording a problem
    def mapping(self, raw: Any, path: str, allowed: Iterable[str]) -> dict[str, Any]:
        if not isinstance(raw, dict):
            self.problem(path, f"expected a mapping, got {_show(raw)}")
            return {}
        allowed_set = set(allowed)
        for key in raw:
            if key not in allowed_set:
                self.problem(
                    _join(path, str(key)),
                    f"unknown key (allowed: {', '.join(sorted(allowed_set))})",
                )
        return raw

    def string(self, m: dict[str, Any], key: str, path: str, default: str | None = None,
               required: bool = True) -> str | None:
        p = _join(path, key)
        if key not in m or m[key] is None:
            if required and default is None:
                self.problem(p, "required field is missing")
            return default
        v = m[key]
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            self.problem(p, f"expected a string, got {_show(v)}")
            return default
        s = str(v)
        if not s.strip():
            self.problem(p, "must not be empty")
        return s

    def name(self, m: dict[str, Any], key: str, path: str) -> str:
        s = self.string(m, key, path) or ""
        if s and not _NAME_RE.match(s):
            self.problem(_join(path, key),
                         f"expected a name of letters, digits, '-', '_' or '.', got {_show(s)}")
        return s

    def integer(self, m: dict[str, Any], key: str, path: str, default: int | None,
                lo: int, hi: int) -> int:
        p = _join(path, key)
        if key not in m or m[key] is None:
            if default is None:
                self.problem(p, "required field is missing")
                return lo
            return default
        v = m[key]
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            self.problem(p, f"expected an integer {lo}-{hi}, got {_show(v)}")
            return default if default is not None else lo
        return v

    def boolean(self, m: dict[str, Any], key: str, path: str, default: bool) -> bool:
        if key not in m or m[key] is None:
            return default
        v = m[key]
        if not isinstance(v, bool):
            self.problem(_join(path, key), f"expected true or false, got {_show(v)}")
            return default
        return v

    def number(self, m: dict[str, Any], key: str, path: str, default: float) -> float:
        if key not in m or m[key] is None:
            return default
        v = m[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            self.problem(_join(path, key), f"expected a positive number, got {_show(v)}")
            return default
        return float(v)

    def choice(self, m: dict[str, Any], key: str, path: str, choices: tuple[str, ...]) -> str:
        s = self.string(m, key, path) or ""
        if s and s not in choices:
            self.problem(_join(path, key), f"expected one of {', '.join(choices)}, got {_show(s)}")
        return s

    def str_list(self, m: dict[str, Any], key: str, path: str) -> tuple[str, ...]:
        v = m.get(key)
        if v is None:
            return ()
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            self.problem(_join(path, key), f"expected a list of strings, got {_show(v)}")
            return ()
        return tuple(v)

    def items(self, m: dict[str, Any], key: str, path: str, required: bool = False) -> list[Any]:
        v = m.get(key)
        if v is None:
            if required:
                self.problem(_join(path, key), "required field is missing")
            return []
        if not isinstance(v, list):
            self.problem(_join(path, key), f"expected a list, got {_show(v)}")
            return []
        return v

    def path_value(self, raw: str) -> str:
        """Relative paths are taken from the inventory file's folder."""
        p = Path(os.path.expanduser(raw))
        if not p.is_absolute() and self.base_dir is not None:
            p = self.base_dir / p
        return str(p)

    def secret(self, m: dict[str, Any], key: str, path: str, required: bool = True) -> SecretRef | None:
        p = _join(path, key)
        if key not in m or m[key] is None:
            if required:
                self.problem(p, "required field is missing")
            return None
        v = m[key]
        if isinstance(v, str):
            self.problem(p, "secrets must be references ({env: NAME} or {file: PATH}), "
                            "never values in the inventory")
            return None
        r = self.mapping(v, p, ("env", "file"))
        if not r:
            if isinstance(v, dict):
                self.problem(p, "expected {env: NAME} or {file: PATH}")
            return None
        if len(r) != 1:
            self.problem(p, "expected exactly one of env or file")
            return None
        if "env" in r:
            name = r["env"]
            if not isinstance(name, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
                self.problem(_join(p, "env"), f"expected an environment variable name, got {_show(name)}")
                return None
            return SecretRef(env=name)
        f = r["file"]
        if not isinstance(f, str) or not f:
            self.problem(_join(p, "file"), f"expected a file path, got {_show(f)}")
            return None
        return SecretRef(file=self.path_value(f))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _show(v: Any) -> str:
    if isinstance(v, str):
        return f'"{v}"'
    if v is None:
        return "nothing"
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    return repr(v)


def _unique(r: _Reader, items: list[tuple[str, str]], what: str) -> None:
    seen: dict[str, str] = {}
    for path, name in items:
        if name and name in seen:
            r.problem(path, f"duplicate {what} {name!r} (first at {seen[name]})")
        seen.setdefault(name, path)


def _each(r: _Reader, raws: list[Any], path: str, parse: Callable[[_Reader, Any, str], T]) -> list[T]:
    return [parse(r, raw, f"{path}[{i}]") for i, raw in enumerate(raws)]


def _parse_ssh(r: _Reader, raw: Any, path: str) -> SshTarget:
    m = r.mapping(raw, path, ("host", "port", "user", "key", "password", "known_hosts",
                              "connect_timeout_s"))
    key = r.secret(m, "key", path, required=False)
    password = r.secret(m, "password", path, required=False)
    if m and key is None and password is None and "key" not in m and "password" not in m:
        r.problem(path, "needs a key or a password (as a secret reference)")
    kh = r.string(m, "known_hosts", path, required=False)
    return SshTarget(
        host=r.string(m, "host", path) or "",
        port=r.integer(m, "port", path, 22, 1, 65535),
        user=r.string(m, "user", path, default="root") or "root",
        key=key,
        password=password,
        known_hosts=r.path_value(kh) if kh else None,
        connect_timeout_s=r.number(m, "connect_timeout_s", path, 10.0),
    )


def _parse_service(r: _Reader, raw: Any, path: str) -> ServiceControl:
    m = r.mapping(raw, path, ("kind", "stop", "start", "status", "unit", "site", "app_pool",
                              "timeout_s"))
    kind = r.choice(m, "kind", path, SERVICE_KINDS)
    needs = {"command": ("stop", "start", "status"), "systemd": ("unit",),
             "iis": ("site", "app_pool")}.get(kind, ())
    for k in needs:
        r.string(m, k, path)
    return ServiceControl(
        kind=kind,
        stop=r.string(m, "stop", path, required=False),
        start=r.string(m, "start", path, required=False),
        status=r.string(m, "status", path, required=False),
        unit=r.string(m, "unit", path, required=False),
        site=r.string(m, "site", path, required=False),
        app_pool=r.string(m, "app_pool", path, required=False),
        timeout_s=r.number(m, "timeout_s", path, 60.0),
    )


def _parse_url(r: _Reader, m: dict[str, Any], key: str, path: str, required: bool) -> str | None:
    s = r.string(m, key, path, required=required)
    if s and not re.match(r"^https?://[^/\s]+", s):
        r.problem(_join(path, key), f"expected an http(s):// URL, got {_show(s)}")
    return s.rstrip("/") if s else s


def _parse_node(r: _Reader, raw: Any, path: str) -> Node:
    m = r.mapping(raw, path, ("name", "ssh", "app_dir", "service", "url", "zone", "group"))
    return Node(
        name=r.name(m, "name", path),
        ssh=_parse_ssh(r, m.get("ssh"), _join(path, "ssh")) if m.get("ssh") is not None
        else _missing(r, path, "ssh", SshTarget(host="")),
        app_dir=r.string(m, "app_dir", path) or "",
        service=_parse_service(r, m.get("service"), _join(path, "service"))
        if m.get("service") is not None else _missing(r, path, "service", ServiceControl(kind="")),
        url=_parse_url(r, m, "url", path, required=True) or "",
        zone=r.string(m, "zone", path, default="default") or "default",
        group=r.string(m, "group", path, required=False),
    )


def parse_node_entry(raw: Any, base_dir: Path | None = None, source: str | None = None) -> Node:
    """One `nodes` entry outside an inventory file (e.g. what a provisioning command printed
    for the server it created), validated like an inventory's own entries: relative paths
    are taken from `base_dir`; InventoryError lists every problem."""
    r = _Reader(base_dir)
    node = _parse_node(r, raw, "node")
    if r.problems:
        raise InventoryError(r.problems, source)
    return node


def _missing(r: _Reader, path: str, key: str, fallback: T) -> T:
    r.problem(_join(path, key), "required field is missing")
    return fallback


def _parse_lb(r: _Reader, raw: Any, path: str) -> LoadBalancer:
    m = r.mapping(raw, path, ("name", "kind", "members", "runtime_api", "backend", "url",
                              "pool", "user", "credential", "drain_timeout_s", "frontend_url",
                              "add_server_options", "maintenance"))
    kind = r.choice(m, "kind", path, LB_KINDS)
    members_raw = m.get("members")
    members: dict[str, str] = {}
    if members_raw is None:
        r.problem(_join(path, "members"), "required field is missing (node name: server name)")
    elif not isinstance(members_raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in members_raw.items()
    ):
        r.problem(_join(path, "members"), "expected a mapping of node name to server name")
    else:
        members = dict(members_raw)
    haproxy, f5 = kind == "haproxy", kind == "f5"
    runtime_api = r.string(m, "runtime_api", path, required=haproxy)
    if runtime_api and not re.match(r"^(unix:.+|tcp:[^:]+:\d+)$", runtime_api):
        r.problem(_join(path, "runtime_api"),
                  f"expected unix:/path/to.sock or tcp:host:port, got {_show(runtime_api)}")
    elif runtime_api and runtime_api.startswith("unix:"):
        runtime_api = "unix:" + r.path_value(runtime_api[5:])
    return LoadBalancer(
        name=r.name(m, "name", path),
        kind=kind,
        members=members,
        runtime_api=runtime_api,
        backend=r.string(m, "backend", path, required=haproxy),
        url=_parse_url(r, m, "url", path, required=f5),
        pool=r.string(m, "pool", path, required=f5),
        user=r.string(m, "user", path, required=f5),
        credential=r.secret(m, "credential", path, required=f5),
        drain_timeout_s=r.number(m, "drain_timeout_s", path, 120.0),
        frontend_url=_parse_url(r, m, "frontend_url", path, required=False),
        add_server_options=r.string(m, "add_server_options", path, default="check") or "check",
        maintenance=_parse_maintenance(r, m["maintenance"], _join(path, "maintenance"))
        if m.get("maintenance") is not None else None,
    )


def _parse_maintenance(r: _Reader, raw: Any, path: str) -> MaintenanceSwitch:
    m = r.mapping(raw, path, ("map", "key", "preview_header"))
    mp = r.string(m, "map", path) or ""
    key = r.string(m, "key", path) or ""
    if key and any(c.isspace() for c in key):
        r.problem(_join(path, "key"), f"expected a map key without spaces, got {_show(key)}")
    header = r.string(m, "preview_header", path, required=False) or ""
    if header and not _HEADER_TOKEN_RE.fullmatch(header):
        r.problem(_join(path, "preview_header"),
                  f"expected an HTTP header name (letters, digits and !#$%&'*+-.^_`|~), got {_show(header)}")
    return MaintenanceSwitch(map=r.path_value(mp) if mp else "", key=key, preview_header=header)


def _parse_endpoint(r: _Reader, raw: Any, path: str, default_port: int) -> DatabaseEndpoint:
    m = r.mapping(raw, path, ("host", "port"))
    return DatabaseEndpoint(host=r.string(m, "host", path) or "",
                            port=r.integer(m, "port", path, default_port, 1, 65535))


def _parse_db(r: _Reader, raw: Any, path: str) -> Database:
    m = r.mapping(raw, path, ("name", "kind", "host", "port", "database", "user", "password",
                              "replica", "backup_dir", "scratch_database", "admin_user",
                              "admin_password", "replication_user", "replication_password",
                              "warm_replica"))
    kind = r.choice(m, "kind", path, DB_KINDS)
    default_port = 1433 if kind == "mssql" else 3306
    replica = _parse_endpoint(r, m["replica"], _join(path, "replica"), default_port) \
        if m.get("replica") is not None else None
    warm = _parse_endpoint(r, m["warm_replica"], _join(path, "warm_replica"), default_port) \
        if m.get("warm_replica") is not None else None
    admin_user = r.string(m, "admin_user", path, required=False)
    repl_user = r.string(m, "replication_user", path, required=False)
    if warm is not None:
        for key in ("admin_user", "admin_password", "replication_user", "replication_password"):
            if m.get(key) is None:
                r.problem(_join(path, key), "required with warm_replica (it is initialised, "
                                            "stopped and promoted with these accounts)")
    bd = r.string(m, "backup_dir", path, required=False)
    database = r.string(m, "database", path) or ""
    scratch = r.string(m, "scratch_database", path, required=False)
    if scratch and scratch == database:
        r.problem(_join(path, "scratch_database"),
                  f"must differ from database {database!r} (the scratch copy is dropped after its test)")
    return Database(
        name=r.name(m, "name", path),
        kind=kind,
        host=r.string(m, "host", path) or "",
        port=r.integer(m, "port", path, default_port, 1, 65535),
        database=database,
        user=r.string(m, "user", path) or "",
        password=r.secret(m, "password", path) or SecretRef(env="UNSET"),
        replica=replica,
        backup_dir=r.path_value(bd) if bd else None,
        scratch_database=scratch,
        admin_user=admin_user,
        admin_password=r.secret(m, "admin_password", path, required=False),
        replication_user=repl_user,
        replication_password=r.secret(m, "replication_password", path, required=False),
        warm_replica=warm,
    )


def _parse_check(r: _Reader, raw: Any, path: str, login: bool = False) -> HttpCheck:
    keys = ("path", "expect_status", "user", "password") if login else ("path", "expect_status")
    m = r.mapping(raw, path, keys)
    p = r.string(m, "path", path) or "/"
    if not p.startswith("/"):
        r.problem(_join(path, "path"), f"expected a path starting with '/', got {_show(p)}")
    return HttpCheck(
        path=p,
        expect_status=r.integer(m, "expect_status", path, 200, 100, 599),
        user=r.string(m, "user", path) if login else None,
        password=r.secret(m, "password", path) if login else None,
    )


def _parse_admin(r: _Reader, raw: Any, path: str) -> AdminApi:
    m = r.mapping(raw, path, ("token", "path_prefix"))
    token = r.secret(m, "token", path)
    prefix = r.string(m, "path_prefix", path, default="/admin") or "/admin"
    if not prefix.startswith("/") or any(c.isspace() for c in prefix):
        r.problem(_join(path, "path_prefix"), f"expected a path starting with '/', got {_show(prefix)}")
    prefix = prefix.rstrip("/") or "/"
    return AdminApi(token=token or SecretRef(env="UNSET"), path_prefix=prefix)


def _parse_app(r: _Reader, raw: Any, path: str) -> Application:
    m = r.mapping(raw, path, ("name", "protected_files", "merge_files", "health", "version",
                              "login", "url", "admin", "health_file", "database_config",
                              "restart_after_migration"))
    health_file = r.string(m, "health_file", path, required=False)
    if health_file and (health_file.startswith("/") or ".." in Path(health_file).parts):
        r.problem(_join(path, "health_file"), "must be relative to the node's login folder")
    protected = r.str_list(m, "protected_files", path)
    merge = r.str_list(m, "merge_files", path)
    for f in (*protected, *merge):
        if f.startswith("/") or ".." in Path(f).parts:
            r.problem(path, f"file {f!r} must be relative to the application folder")
    for f in set(protected) & set(merge):
        r.problem(_join(path, "merge_files"), f"{f!r} is protected and cannot also be merged")
    return Application(
        name=r.string(m, "name", path) or "app",
        protected_files=protected,
        merge_files=merge,
        health=_parse_check(r, m["health"], _join(path, "health")) if m.get("health") is not None
        else HttpCheck(path="/health"),
        version=_parse_check(r, m["version"], _join(path, "version"))
        if m.get("version") is not None else HttpCheck(path="/version"),
        login=_parse_check(r, m["login"], _join(path, "login"), login=True)
        if m.get("login") is not None else None,
        url=_parse_url(r, m, "url", path, required=False),
        admin=_parse_admin(r, m["admin"], _join(path, "admin")) if m.get("admin") is not None else None,
        health_file=health_file,
        database_config=_parse_db_client(r, m["database_config"], _join(path, "database_config"))
        if m.get("database_config") is not None else None,
        restart_after_migration=r.boolean(m, "restart_after_migration", path, default=True),
    )


def _parse_db_client(r: _Reader, raw: Any, path: str) -> DatabaseClientConfig:
    m = r.mapping(raw, path, ("file", "host_key", "port_key"))
    f = r.string(m, "file", path) or ""
    if f and (f.startswith("/") or ".." in Path(f).parts):
        r.problem(_join(path, "file"), "must be relative to the application folder")
    return DatabaseClientConfig(file=f, host_key=r.string(m, "host_key", path, default="host") or "host",
                                port_key=r.string(m, "port_key", path, default="port") or "port")


def _parse_provisioning(r: _Reader, raw: Any, path: str) -> Provisioning:
    m = r.mapping(raw, path, ("kind", "create", "start", "destroy", "lab_root", "timeout_s", "array"))
    kind = r.choice(m, "kind", path, PROVISIONING_KINDS)
    command = kind == "command"
    create = r.string(m, "create", path, required=command)
    destroy = r.string(m, "destroy", path, required=command)
    if create and "{name}" not in create:
        r.problem(_join(path, "create"), f"must contain {{name}} (the new server), got {_show(create)}")
    if destroy and "{name}" not in destroy:
        r.problem(_join(path, "destroy"), f"must contain {{name}}, got {_show(destroy)}")
    root = r.string(m, "lab_root", path, required=kind == "lab")
    array = None
    if m.get("array") is not None:
        ap = _join(path, "array")
        am = r.mapping(m["array"], ap, ("name", "disable", "enable"))
        array = ServerArray(name=r.name(am, "name", ap), disable=r.string(am, "disable", ap) or "",
                            enable=r.string(am, "enable", ap) or "")
    return Provisioning(kind=kind, create=create, start=r.string(m, "start", path, required=False),
                        destroy=destroy, lab_root=r.path_value(root) if root else None,
                        timeout_s=r.number(m, "timeout_s", path, 300.0), array=array)


def _parse_staging_config(r: _Reader, raw: Any, path: str) -> dict[str, dict[str, str]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        r.problem(path, f"expected a mapping of file to {{key: value}}, got {_show(raw)}")
        return {}
    out: dict[str, dict[str, str]] = {}
    for f, kv in raw.items():
        fp = _join(path, str(f))
        if not isinstance(f, str) or not f or f.startswith("/") or ".." in Path(f).parts:
            r.problem(fp, "expected a file name relative to the application folder")
            continue
        if not isinstance(kv, dict) or not kv:
            r.problem(fp, f"expected a non-empty mapping of key to value, got {_show(kv)}")
            continue
        values: dict[str, str] = {}
        for k, v in kv.items():
            kp = _join(fp, str(k))
            if not isinstance(k, str) or not k.strip() or "=" in k or "\n" in k:
                r.problem(kp, "expected a key name without '=' or line breaks")
            elif isinstance(v, bool) or not isinstance(v, (str, int, float)) or "\n" in str(v):
                # A YAML `on` / `yes` is a boolean: asking for quotes keeps the file's text exact.
                r.problem(kp, f"expected a string or number on one line (quote it), got {_show(v)}")
            else:
                values[k] = str(v)
        out[f] = values
    return out


def _parse_staging(r: _Reader, raw: Any, path: str) -> Staging:
    m = r.mapping(raw, path, ("ssh", "app_dir", "service", "url", "database", "config"))
    return Staging(
        ssh=_parse_ssh(r, m.get("ssh"), _join(path, "ssh")) if m.get("ssh") is not None
        else _missing(r, path, "ssh", SshTarget(host="")),
        app_dir=r.string(m, "app_dir", path) or "",
        service=_parse_service(r, m.get("service"), _join(path, "service"))
        if m.get("service") is not None else _missing(r, path, "service", ServiceControl(kind="")),
        url=_parse_url(r, m, "url", path, required=True) or "",
        database=r.string(m, "database", path) or "",
        config=_parse_staging_config(r, m.get("config"), _join(path, "config")),
    )


_OX_DEFAULTS = OxSettings(server_name="", main_lb="", secondary_lb="", secondary_url="",
                           admin_password=SecretRef(env="UNSET"), install_command="", version_command="")


def _parse_ox(r: _Reader, raw: Any, path: str) -> OxSettings:
    m = r.mapping(raw, path, ("server_name", "main_lb", "secondary_lb", "secondary_url", "admin_user",
                              "admin_password", "tools_dir", "server_properties", "system_properties",
                              "reload_command", "install_command", "version_command", "schema_shares",
                              "runupdate_timeout_s", "upgradeschemata_timeout_s", "hazelcast_properties"))
    d = _OX_DEFAULTS
    install = r.string(m, "install_command", path) or ""
    if install and "{version}" not in install:
        r.problem(_join(path, "install_command"), f"must contain {{version}}, got {_show(install)}")
    shares: list[int] = []
    raw_shares = m.get("schema_shares")
    if raw_shares is not None:
        if not isinstance(raw_shares, list) or not all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in raw_shares):
            r.problem(_join(path, "schema_shares"),
                      f"expected a list of schema counts (integers >= 0), got {_show(raw_shares)}")
        else:
            shares = list(raw_shares)
    return OxSettings(
        server_name=r.name(m, "server_name", path),
        main_lb=r.name(m, "main_lb", path),
        secondary_lb=r.name(m, "secondary_lb", path),
        secondary_url=_parse_url(r, m, "secondary_url", path, required=True) or "",
        admin_user=r.string(m, "admin_user", path, default=d.admin_user) or d.admin_user,
        admin_password=r.secret(m, "admin_password", path) or d.admin_password,
        tools_dir=r.string(m, "tools_dir", path, default=d.tools_dir) or d.tools_dir,
        server_properties=r.string(m, "server_properties", path, default=d.server_properties)
        or d.server_properties,
        system_properties=r.string(m, "system_properties", path, default=d.system_properties)
        or d.system_properties,
        reload_command=r.string(m, "reload_command", path, default=d.reload_command) or d.reload_command,
        install_command=install,
        version_command=r.string(m, "version_command", path) or "",
        schema_shares=tuple(shares),
        runupdate_timeout_s=r.number(m, "runupdate_timeout_s", path, d.runupdate_timeout_s),
        upgradeschemata_timeout_s=r.number(m, "upgradeschemata_timeout_s", path, d.upgradeschemata_timeout_s),
        hazelcast_properties=r.string(m, "hazelcast_properties", path, default=d.hazelcast_properties)
        or d.hazelcast_properties,
    )


def _parse_rollout(r: _Reader, raw: Any, path: str) -> Rollout:
    m = r.mapping(raw, path, ("batch_size", "batches", "health_timeout_s"))
    batches: list[tuple[str, ...]] = []
    for i, b in enumerate(r.items(m, "batches", path)):
        if not isinstance(b, list) or not b or not all(isinstance(x, str) for x in b):
            r.problem(f"{path}.batches[{i}]", f"expected a list of node names, got {_show(b)}")
        else:
            batches.append(tuple(b))
    return Rollout(batch_size=r.integer(m, "batch_size", path, 1, 1, 1000),
                   batches=tuple(batches),
                   health_timeout_s=r.number(m, "health_timeout_s", path, 60.0))


def parse_inventory(raw: Any, source: str | None = None, base_dir: Path | None = None) -> Inventory:
    """Validate a raw (already YAML-decoded) inventory; raise InventoryError with all problems."""
    r = _Reader(base_dir)
    top = r.mapping(raw, "", ("site", "nodes", "load_balancers", "databases", "application",
                              "approvers", "rollout", "staging", "ox", "provisioning"))
    if not isinstance(raw, dict):
        raise InventoryError(r.problems, source)
    site = r.name(top, "site", "")
    nodes = _each(r, r.items(top, "nodes", "", required=True), "nodes", _parse_node)
    if "nodes" in top and isinstance(top["nodes"], list) and not top["nodes"]:
        r.problem("nodes", "needs at least one node")
    lbs = _each(r, r.items(top, "load_balancers", ""), "load_balancers", _parse_lb)
    dbs = _each(r, r.items(top, "databases", ""), "databases", _parse_db)
    app = _parse_app(r, top["application"], "application") if top.get("application") is not None \
        else Application(name="app")
    rollout = _parse_rollout(r, top["rollout"], "rollout") if top.get("rollout") is not None \
        else Rollout()
    staging = _parse_staging(r, top["staging"], "staging") if top.get("staging") is not None else None
    ox = _parse_ox(r, top["ox"], "ox") if top.get("ox") is not None else None
    provisioning = _parse_provisioning(r, top["provisioning"], "provisioning") \
        if top.get("provisioning") is not None else None

    approvers: dict[str, tuple[str, ...]] = {}
    raw_appr = top.get("approvers")
    if raw_appr is not None:
        gates = [str(k) for k in raw_appr] if isinstance(raw_appr, dict) else []
        am = r.mapping(raw_appr, "approvers", gates)
        for gate, names in am.items():
            if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
                r.problem(f"approvers.{gate}", f"expected a non-empty list of names, got {_show(names)}")
            else:
                approvers[str(gate)] = tuple(names)

    # Cross-references: names are unique and every reference points at something real.
    _unique(r, [(f"nodes[{i}].name", n.name) for i, n in enumerate(nodes)], "node name")
    _unique(r, [(f"load_balancers[{i}].name", lb.name) for i, lb in enumerate(lbs)], "load balancer")
    _unique(r, [(f"databases[{i}].name", d.name) for i, d in enumerate(dbs)], "database")
    _unique(r, [(f"nodes[{i}].ssh", f"{n.ssh.host}:{n.ssh.port}") for i, n in enumerate(nodes)
                if n.ssh.host], "SSH endpoint")
    node_names = {n.name for n in nodes}
    for i, lb in enumerate(lbs):
        for node_name in lb.members:
            if node_name not in node_names:
                r.problem(f"load_balancers[{i}].members.{node_name}", "unknown node")
        servers = list(lb.members.values())
        if len(set(servers)) != len(servers):
            r.problem(f"load_balancers[{i}].members", "two nodes map to the same server")
    for i, b in enumerate(rollout.batches):
        for n in b:
            if n not in node_names:
                r.problem(f"rollout.batches[{i}]", f"unknown node {n!r}")
    if staging is not None and staging.database:
        # The staging copy is restored over and dropped: never one of production's databases.
        for i, d in enumerate(dbs):
            if staging.database == d.database:
                r.problem("staging.database", f"must differ from the production database "
                                              f"databases[{i}].database ({d.database!r})")
            elif staging.database == d.scratch_database:
                r.problem("staging.database", f"must differ from databases[{i}].scratch_database "
                                              f"({d.scratch_database!r}), which is dropped after each test")
    if ox is not None:
        lb_by_name = {lb.name: lb for lb in lbs}
        for key in ("main_lb", "secondary_lb"):
            name = getattr(ox, key)
            if name and name not in lb_by_name:
                r.problem(f"ox.{key}", f"unknown load balancer {name!r} "
                                       f"(known: {', '.join(lb_by_name) or 'none'})")
        if ox.main_lb and ox.main_lb == ox.secondary_lb:
            r.problem("ox.secondary_lb", "must differ from ox.main_lb (the upgraded nodes wait there)")
        for key in ("main_lb", "secondary_lb"):
            ox_lb = lb_by_name.get(getattr(ox, key))
            missing = sorted(node_names - set(ox_lb.members)) if ox_lb is not None else []
            for n in missing:
                r.problem(f"ox.{key}", f"node {n!r} is not a member of load balancer {getattr(ox, key)!r} "
                                       "(every OX node moves between both)")
    if rollout.batches:
        listed = [n for b in rollout.batches for n in b]
        if len(listed) != len(set(listed)):
            r.problem("rollout.batches", "a node appears in more than one batch")
        for n in sorted(node_names - set(listed)):
            r.problem("rollout.batches", f"node {n!r} is in no batch")

    if r.problems:
        raise InventoryError(r.problems, source)
    return Inventory(site=site, nodes=tuple(nodes), load_balancers=tuple(lbs),
                     databases=tuple(dbs), application=app, approvers=approvers,
                     rollout=rollout, source=source, staging=staging, ox=ox,
                     provisioning=provisioning)


def load_inventory(path: str | os.PathLike[str]) -> Inventory:
    """Read and validate an inventory file. Raises InventoryError (never a raw YAML error)."""
    import yaml  # local import: workflows import this module inside the sandbox

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise InventoryError([f"(file): cannot read inventory: {e.strerror or e}"], str(p)) from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        problem = getattr(e, "problem", None) or str(e)
        raise InventoryError([f"{where}: invalid YAML: {problem}"], str(p)) from e
    if raw is None:
        raise InventoryError(["(file): the inventory is empty"], str(p))
    return parse_inventory(raw, source=str(p.resolve()), base_dir=p.resolve().parent)
