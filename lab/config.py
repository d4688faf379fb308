"""Where everything of the lab lives: ports and paths, all derived from one config."""

from __future__ import annotations

import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

# The lab's approvers: each has an SSH key (secrets/approvers/<name>) that the inventories
# list (approver_keys), so every gate decision on the lab is signed (issue 17.6).
LAB_APPROVERS = ("alice", "bob", "carol", "ops1")

# Every secret the lab generates starts with this, so a test can search any text zerodown
# produced (histories, logs, reports) for a leaked secret without knowing the values.
SECRET_MARKER = "zdsecret"


def new_secret(nbytes: int = 24) -> str:
    """A random secret value, marked (SECRET_MARKER + URL-safe characters)."""
    return SECRET_MARKER + secrets.token_urlsafe(nbytes)


DB_NAME = "labapp"
DB_USER = "zerodown"
BACKEND = "app"
SECONDARY_BACKEND = "app_secondary"
# The temporary test balancer's backend (seed 004 steps 7 to 11, frontend `test1`): no
# servers in the configuration, they are attached at run time (`add server`).
TEST_BACKEND = "app_test"
# The staging copy of the site (seed "Task Five"): its own node folder and database, and
# the scratch database where a restored backup is tested, then dropped. The lab DB user
# may do everything on these two and nothing more (lab/mariadb.py ensure_lab_extras).
STAGING_NAME = "staging"
STAGING_DB_NAME = "labapp_staging"
SCRATCH_DB_NAME = "labapp_test"
# The lab's fault-injection database (never part of the application's data).
FAULTS_DB_NAME = "zdlab"
# The Open-Xchange part (lab/ox): its two HAProxy backends and how many OX nodes fit the
# port block (+60+i HTTP, +70+i SSH, +80+i the admin endpoint its command line tools use).
OX_BACKEND = "ox"
OX_SECONDARY_BACKEND = "ox_secondary"
OX_MAX_NODES = 9
# The lab site's database profiles (LabConfig.db).
DB_PROFILES = ("mariadb", "mssql")
# The sites the lab's inventory can describe (LabConfig.profile): "default", Linux nodes
# behind HAProxy on the database `db` names; "secret-server", Secret Server's own stack: the
# same node processes seen as Windows/IIS nodes (lab/windows) behind the BIG-IP stand-in
# (lab/f5) on the SQL Server stand-in (lab/mssql), with XML configs.
PROFILES = ("default", "secret-server")


@dataclass(frozen=True)
class LabConfig:
    root: Path = Path(".lab")
    nodes: int = 3
    port_base: int = 18000
    temporal_port: int = 7233
    temporal_ui_port: int = 8233
    # The Open-Xchange cluster next to the site (0: none) and its config DB's schema count.
    ox_nodes: int = 0
    ox_schemata: int = 20
    # The site's database as its inventory describes it: MariaDB itself ("mariadb") or the
    # SQL Server stand-in in front of it ("mssql", lab/mssql). Both run in every lab; this
    # picks `site_yaml` (site.yaml / site-mssql.yaml, both written by lab up).
    db: str = "mariadb"
    # PROFILES: which site `site_yaml` describes and which packages the nodes get at reset
    # (secret-server: XML web.config, T-SQL migrations).
    profile: str = "default"

    def __post_init__(self) -> None:
        if not 0 <= self.ox_nodes <= OX_MAX_NODES:
            raise ValueError(f"ox_nodes must be between 0 and {OX_MAX_NODES}, got {self.ox_nodes}")
        if self.ox_schemata < 1:
            raise ValueError(f"ox_schemata must be at least 1, got {self.ox_schemata}")
        if self.db not in DB_PROFILES:
            raise ValueError(f"db must be one of {', '.join(DB_PROFILES)}, got {self.db!r}")
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {self.profile!r}")

    # ---------------------------------------------------------------- ports
    @property
    def main_port(self) -> int:
        return self.port_base

    @property
    def secondary_port(self) -> int:
        return self.port_base + 1

    @property
    def primary_db_port(self) -> int:
        return self.port_base + 2

    @property
    def replica_db_port(self) -> int:
        return self.port_base + 3

    @property
    def warm_db_port(self) -> int:
        """The empty MariaDB server a procedure initialises as a "warm" replica (seed 004
        steps 5-6; lab/mariadb.py role `warm`)."""
        return self.port_base + 7

    def app_port(self, i: int) -> int:
        """HTTP port of node i (1-based)."""
        return self.port_base + 10 + i

    def ssh_port(self, i: int) -> int:
        """SSH port of node i (1-based)."""
        return self.port_base + 30 + i

    # The temporary test frontend `test1` (seed 004 step 7): its own port in the gap below
    # the node ports (+7 belongs to the MariaDB "warm" replica).
    @property
    def test_port(self) -> int:
        return self.port_base + 6

    @property
    def test_url(self) -> str:
        return f"http://127.0.0.1:{self.test_port}"

    # The staging node sits in the gap below the node ports (+8/+9), so it never
    # collides with the app (+11..+29) or SSH (+31..+49) ports of up to 19 nodes, with a
    # spare test node at nodes + 1, nor with a test dev server at +50/+51.
    @property
    def staging_app_port(self) -> int:
        return self.port_base + 8

    @property
    def staging_ssh_port(self) -> int:
        return self.port_base + 9

    # The OX part: its frontends use +4/+5 of the gap below the node ports, its nodes
    # +61..+69 (HTTP) and +71..+79 (SSH), above the test dev server's +50/+51.
    @property
    def ox_main_port(self) -> int:
        return self.port_base + 4

    @property
    def ox_secondary_port(self) -> int:
        return self.port_base + 5

    def ox_app_port(self, i: int) -> int:
        """HTTP port of OX node i (1-based)."""
        return self.port_base + 60 + i

    def ox_ssh_port(self, i: int) -> int:
        """SSH port of OX node i (1-based)."""
        return self.port_base + 70 + i

    def ox_admin_port(self, i: int) -> int:
        """OX node i's admin endpoint on 127.0.0.1, where its command line tools run
        (lab/ox/admin.py; OX's tools talk to the middleware's RMI port on localhost)."""
        return self.port_base + 80 + i

    # The Windows stand-ins (lab/windows): Win32-OpenSSH-like endpoints for nodes 1..9 at
    # +91..+99 (above the OX admin ports +81..+89) and one for the staging system at +59.
    def win_ssh_port(self, i: int) -> int:
        """SSH port of node i's Windows endpoint (1 <= i <= 9)."""
        if not 1 <= i <= 9:
            raise ValueError(f"Windows endpoints exist for nodes 1..9, not {i}")
        return self.port_base + 90 + i

    @property
    def win_staging_ssh_port(self) -> int:
        return self.port_base + 59

    @property
    def win_node_indexes(self) -> range:
        return range(1, min(self.nodes, 9) + 1)

    def all_ports(self) -> list[int]:
        ox = (
            [
                self.ox_main_port,
                self.ox_secondary_port,
                *(self.ox_app_port(i) for i in self.ox_node_indexes),
                *(self.ox_ssh_port(i) for i in self.ox_node_indexes),
                *(self.ox_admin_port(i) for i in self.ox_node_indexes),
            ]
            if self.ox_nodes
            else []
        )
        return [
            self.main_port,
            self.secondary_port,
            self.primary_db_port,
            self.replica_db_port,
            self.warm_db_port,
            self.test_port,
            self.staging_app_port,
            self.staging_ssh_port,
            self.port_base + 10,  # the SQL Server stand-in (lab/mssql)
            self.port_base + 52,  # the F5 stand-in (lab/f5)
            *(self.app_port(i) for i in self.node_indexes),
            *(self.ssh_port(i) for i in self.node_indexes),
            self.win_staging_ssh_port,
            *(self.win_ssh_port(i) for i in self.win_node_indexes),
            *ox,
        ]

    # ---------------------------------------------------------------- names and paths
    @property
    def node_indexes(self) -> range:
        return range(1, self.nodes + 1)

    @staticmethod
    def node_name(i: int) -> str:
        return f"node{i}"

    @property
    def ox_node_indexes(self) -> range:
        return range(1, self.ox_nodes + 1)

    @staticmethod
    def ox_node_name(i: int) -> str:
        return f"ox{i}"

    @property
    def abs_root(self) -> Path:
        return self.root.resolve()

    @property
    def site_yaml(self) -> Path:
        if self.profile != "default":
            return self.abs_root / f"site-{self.profile}.yaml"
        return self.abs_root / ("site.yaml" if self.db == "mariadb" else f"site-{self.db}.yaml")

    @property
    def secrets_dir(self) -> Path:
        return self.abs_root / "secrets"

    @property
    def client_key(self) -> Path:
        return self.secrets_dir / "id_ed25519"

    def approver_key(self, name: str) -> Path:
        """The private key the lab's approver `name` signs gate decisions with (+ .pub)."""
        return self.secrets_dir / "approvers" / name

    @property
    def host_key(self) -> Path:
        return self.secrets_dir / "ssh_host_key"

    @property
    def known_hosts(self) -> Path:
        return self.secrets_dir / "known_hosts"

    @property
    def db_password_file(self) -> Path:
        return self.secrets_dir / "db_password"

    @property
    def admin_password_file(self) -> Path:
        return self.secrets_dir / "admin_password"

    @property
    def admin_token_file(self) -> Path:
        """The token of the application's admin interface (hashed into each admin.config)."""
        return self.secrets_dir / "admin_token"

    @property
    def mysql_dir(self) -> Path:
        return self.abs_root / "mysql"

    @property
    def haproxy_dir(self) -> Path:
        return self.abs_root / "haproxy"

    @property
    def haproxy_socket(self) -> Path:
        return self.haproxy_dir / "admin.sock"

    @property
    def nodes_dir(self) -> Path:
        return self.abs_root / "nodes"

    def node_dir(self, i: int) -> Path:
        return self.nodes_dir / self.node_name(i)

    def ox_node_dir(self, i: int) -> Path:
        """OX node i's folder (its SSH root; see lab/ox/nodes.py)."""
        return self.nodes_dir / self.ox_node_name(i)

    @property
    def ox_site_yaml(self) -> Path:
        """The OX cluster's inventory (site `lab-ox`), next to site.yaml."""
        return self.abs_root / "ox-site.yaml"

    @property
    def ox_main_url(self) -> str:
        return f"http://127.0.0.1:{self.ox_main_port}"

    @property
    def ox_secondary_url(self) -> str:
        return f"http://127.0.0.1:{self.ox_secondary_port}"

    @property
    def staging_dir(self) -> Path:
        """Laid out like a node folder; its app folder stays empty until a procedure restores
        a backup into it. Not behind any load balancer."""
        return self.nodes_dir / STAGING_NAME

    @property
    def staging_url(self) -> str:
        return f"http://127.0.0.1:{self.staging_app_port}"

    @property
    def packages_dir(self) -> Path:
        return self.abs_root / "packages"

    def package(self, major: int, db: str | None = None) -> Path:
        """Release `major`'s zip for a site on `db` (default: this lab's database), or on the
        secret-server profile (db "secret-server": XML configs, T-SQL)."""
        db = db or (self.profile if self.profile != "default" else self.db)
        return self.packages_dir / (f"app-{major}.zip" if db == "mariadb" else f"app-{major}-{db}.zip")

    @property
    def backups_dir(self) -> Path:
        return self.abs_root / "backups"

    @property
    def probe_log(self) -> Path:
        return self.abs_root / "probe.jsonl"

    @property
    def probe_summary(self) -> Path:
        return self.abs_root / "probe-summary.json"

    @property
    def worker_pidfile(self) -> Path:
        """The background worker of `make demo` / the bench."""
        return self.abs_root / "worker.pid"

    @property
    def worker_log(self) -> Path:
        return self.abs_root / "worker.log"

    @property
    def ox_dir(self) -> Path:
        """The Open-Xchange stand-in's files (lab/ox): bin/ holds its command line tools and
        their env file."""
        return self.abs_root / "ox"

    @property
    def python(self) -> str:
        """The interpreter that runs lab processes (the project's venv)."""
        return sys.executable

    @property
    def main_url(self) -> str:
        return f"http://127.0.0.1:{self.main_port}"

    @property
    def temporal_address(self) -> str:
        return f"127.0.0.1:{self.temporal_port}"
