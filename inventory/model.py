"""The site inventory's model: frozen dataclasses, one per part of a site.

The same model describes a customer's site and the embedded lab (`.lab/site.yaml`); every
layer imports it (workflows in their inputs, activities in their requests, the CLI and the
lab), and it imports nothing of theirs. Secrets are never values here: a `SecretRef` names
an environment variable or a file, and only activities resolve it (`activities/secrets.py`),
so no secret ever enters a workflow input or history.

Workflows import this module, so it stays deterministic and free of I/O; reading and
validating a YAML file is `inventory.load`'s.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

SERVICE_KINDS = ("command", "systemd", "iis")
# A node's operating system: how zerodown touches its files and services (POSIX shell and
# SFTP on linux; SFTP and PowerShell over Win32-OpenSSH on windows).
OS_KINDS = ("linux", "windows")
LB_KINDS = ("haproxy", "f5")
DB_KINDS = ("mysql", "mssql")
PROVISIONING_KINDS = ("command",)


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
    # kind=iis: the app pool also serves other sites or applications, and stopping it for
    # this one is intended (otherwise a stop is refused).
    shared_pool: bool = False


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
    # OS_KINDS. windows: app_dir is a drive path (`C:/inetpub/wwwroot/SecretServer`), file
    # steps go over SFTP with PowerShell where it is faster, the shell is Win32-OpenSSH's.
    os: str = "linux"


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
    # F5: the CA bundle (PEM) its iControl REST certificate is verified against (None: the
    # system's CAs).
    ca_bundle: str | None = None
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
    # The entry's value while the page is up, as the frontend's rule tests it (`-m str on`).
    on_value: str = "on"
    # Its value while the page is down; empty: the entry is deleted (`del map`), for a rule
    # that tests whether the key is there at all.
    off_value: str = "off"


@dataclass(frozen=True)
class DatabaseEndpoint:
    host: str
    port: int


@dataclass(frozen=True)
class OdbcSettings:
    """How zerodown reaches a SQL Server (`kind: mssql`): the ODBC driver unixODBC knows by
    this name, and its TLS keywords (README "SQL Server")."""

    # "FreeTDS" (Debian tdsodbc, installed by the Makefile) or "ODBC Driver 18 for SQL Server".
    driver: str = "FreeTDS"
    # FreeTDS `Encryption`: off | request | require | strict (default request); Microsoft's
    # driver `Encrypt`: yes | no | strict (default yes).
    encrypt: str = ""
    trust_server_certificate: bool = False
    host_name_in_certificate: str = ""
    # Further connection-string keywords, passed as given (no secrets: the password is
    # `password`, a reference).
    options: dict[str, str] = field(default_factory=dict)


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
    # How long a migration's statement, or a backup's LOCK TABLES, may wait for a table lock
    # (MariaDB's lock_wait_timeout, whole seconds). Its default is a day: an ALTER queued
    # behind one open transaction would hold every later query on that table for that long.
    lock_wait_timeout_s: int = 10
    # kind mssql: the ODBC driver and TLS settings (None: FreeTDS, encryption if offered).
    odbc: OdbcSettings | None = None


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
    # Config values that are secrets, as FILE:KEY (e.g. database.config:password): a
    # procedure sets them only from a secret reference (--secret-setting), never from a value
    # in its input, and masks any value of theirs it reads (a settings copy, a merge).
    secret_keys: tuple[str, ...] = ()
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


def secret_keys_of(app: Application, file: str) -> tuple[str, ...]:
    """The keys of `file` the inventory marks secret (`application.secret_keys`)."""
    return tuple(k for f, _, k in (e.partition(":") for e in app.secret_keys) if f == file)


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
    os: str = "linux"


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
    be safe to run twice (a retried step runs it again). The embedded lab is one such
    provisioner: its inventory names `python -m lab.provision` commands.
    `lab_root`: only in runs started before v0.3.0, whose inventories said kind=lab; the
    activities run the lab's commands for them (`activities/provision.py`)."""

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
    # Approver name -> their SSH public keys (OpenSSH lines, `ssh-ed25519 AAAA... comment`):
    # when given, every approver has one and every gate decision must be signed by one of
    # the decider's keys (workflows/signatures.py). Public keys are not secrets.
    approver_keys: dict[str, tuple[str, ...]] = field(default_factory=dict)
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
