"""Bring the whole lab up, down, back to v1, and report on it.

`lab_up` starts, in dependency order and in parallel where possible: the Temporal dev
server, MariaDB primary + replica, the nodes (packages, install, SSH endpoints, apps), then
HAProxy, and writes `site.yaml` - the same inventory format a customer writes. With
cfg.ox_nodes > 0 it adds the Open-Xchange cluster: its config DB (lab/ox/configdb.py), the
OX node folders and services (lab/ox/nodes.py), HAProxy's `ox` / `ox_secondary` backends,
and `ox-site.yaml`. Every step
is idempotent, so `lab_up` on a running lab only fills in what is missing (it never
reinstalls a node, which could undo a deployment being tested).

`lab_down` stops every process by pid file (never by name: the machine's own MariaDB and
other labs stay untouched). `lab_reset` puts the site back to the state just after
`lab_up` between tests, far faster than down + up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from lab import haproxy, mariadb, provision, sshd
from lab.config import (
    BACKEND,
    DB_NAME,
    DB_PROFILES,
    DB_USER,
    OX_BACKEND,
    OX_SECONDARY_BACKEND,
    PROFILES,
    SCRATCH_DB_NAME,
    STAGING_DB_NAME,
    STAGING_NAME,
    TEST_BACKEND,
    LabConfig,
)
from lab.f5 import lab as f5_lab
from lab.mssql import lab as mssql_lab
from lab.nodes import HEALTH_FILE
from lab.procs import pid_alive, stop_pidfile
from lab.windows import state as windows_state

log = logging.getLogger("lab.manager")

SSH_USER = "zerodown"
APP_DIR = "app"
# Servers attached at run time take no `default-server` line (HAProxy 2.6): the lab's check
# timing (lab/haproxy.py defaults) spelled out, but checked every 50 ms while DOWN or
# changing state (a server comes out of `add server` DOWN): it is UP ~0.15 s after it is
# attached instead of ~0.8 s, which counts inside a maintenance window (seed 004 step 25).
LAB_ADD_SERVER_OPTIONS = "check inter 500ms fastinter 50ms downinter 50ms fall 2 rise 2"


class LabError(RuntimeError):
    """A lab operation failed; the message lists each part that failed."""


# --------------------------------------------------------------------------- helpers


def _state_file(cfg: LabConfig) -> Path:
    return cfg.abs_root / "lab.json"


def _read_state(cfg: LabConfig) -> dict[str, Any]:
    try:
        data = json.loads(_state_file(cfg).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_state(cfg: LabConfig, with_temporal: bool) -> None:
    # Remembered so `lab status` knows whether a missing dev server is a problem, and so
    # someone looking at the folder sees which ports it uses.
    state = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    state.update(
        root=str(cfg.abs_root), with_temporal=with_temporal, started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z")
    )
    _state_file(cfg).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")


def config_from_state(root: Path) -> LabConfig | None:
    """The LabConfig of the lab at `root` as lab_up recorded it in lab.json (its ports and
    node counts), for tools that only know the folder (lab/provision.py); None without one."""
    state = _read_state(LabConfig(root=Path(root)))
    fields = {
        k: state[k]
        for k in ("nodes", "port_base", "temporal_port", "temporal_ui_port", "ox_nodes", "ox_schemata")
        if isinstance(state.get(k), int)
    }
    if state.get("db") in DB_PROFILES:
        fields["db"] = state["db"]
    if state.get("profile") in PROFILES:
        fields["profile"] = state["profile"]
    if "nodes" not in fields or "port_base" not in fields:
        return None
    try:
        return LabConfig(root=Path(root), **fields)
    except (TypeError, ValueError):
        return None


async def _gather_all(steps: dict[str, Any]) -> None:
    """Run awaitables concurrently; wait for *all* of them (so nothing is still starting
    in a thread when the caller cleans up), then raise one error naming every failure."""
    names = list(steps)
    results = await asyncio.gather(*steps.values(), return_exceptions=True)
    failures = [(n, r) for n, r in zip(names, results, strict=True) if isinstance(r, BaseException)]
    if failures:
        if len(failures) == 1 and not isinstance(failures[0][1], Exception):
            raise failures[0][1]  # e.g. CancelledError / KeyboardInterrupt: do not wrap
        raise LabError("lab: " + "; ".join(f"{n} failed: {e}" for n, e in failures)) from failures[0][1]


def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return asyncio.to_thread(fn, *args)


def _installed(cfg: LabConfig, i: int) -> bool:
    node = cfg.node_dir(i)
    return (node / "ctl").exists() and (node / APP_DIR / "release.json").exists()


# --------------------------------------------------------------------------- node side


def _nodes_up(cfg: LabConfig) -> None:
    """Packages, node folders (first time only), SSH endpoints, then every app."""
    from lab import nodes, packages, sshd

    packages.build_packages(cfg)
    for i in cfg.node_indexes:
        if not _installed(cfg, i) or nodes.installed_profile(cfg, i) != cfg.profile:
            # First time, or the lab now stands for the other profile (XML configs or not).
            nodes.stop_node(cfg, i)
            nodes.install_node(cfg, i, cfg.package(1))
        else:
            # A node installed before the admin interface existed gets its admin.config
            # (a protected file: deploys refuse a node without it).
            nodes.ensure_admin_config(cfg, cfg.node_dir(i) / APP_DIR)
            # ... and one installed before the health-check file its file (/health: 404).
            nodes.write_health_file(cfg.node_dir(i), only_if_missing=True)
    nodes.install_staging(cfg)
    if cfg.ox_nodes:
        _ox_nodes_installed(cfg)  # before the SSH endpoints, which are rooted in them
    # Original nodes a procedure destroyed (lab/provision.py) are installed again above:
    # their SSH endpoints come back with start_sshd.
    provision.forget_destroyed(cfg, sync=False)
    sshd.start_sshd(cfg)


async def _start_apps(cfg: LabConfig) -> None:
    from lab import nodes

    await _gather_all({cfg.node_name(i): _in_thread(nodes.start_node, cfg, i) for i in cfg.node_indexes})


# --------------------------------------------------------------------------- the OX part

# The config DB lab_up creates: cfg.ox_schemata schemata of this many contexts and users.
OX_CONTEXTS_PER_SCHEMA = 2
OX_USERS_PER_CONTEXT = 3
OX_APP_DIR = "opt"


def _ox_nodes_installed(cfg: LabConfig) -> None:
    """The OX node folders, first time only (like the app nodes: lab_up never undoes an
    upgrade being tested)."""
    from lab.ox import nodes as ox_nodes

    for i in cfg.ox_node_indexes:
        if not ox_nodes.installed(cfg, i):
            ox_nodes.install_ox_node(cfg, i)


def _ensure_configdb(cfg: LabConfig, reset: bool) -> list[str]:
    """The OX config DB: created when missing; with reset=True put back as created."""
    from lab.ox import configdb

    if not configdb.exists(cfg):
        configdb.create(
            cfg,
            schemata=cfg.ox_schemata,
            contexts_per_schema=OX_CONTEXTS_PER_SCHEMA,
            users_per_context=OX_USERS_PER_CONTEXT,
        )
        return [f"created the OX config DB ({cfg.ox_schemata} schemata)"]
    return configdb.reset(cfg) if reset else []


def recreate_ox_configdb(cfg: LabConfig) -> None:
    """The OX config DB created afresh as lab_up creates it (whatever was there is dropped),
    then every OX node UP in `ox` again (their /health needs the config DB)."""
    from lab.ox import configdb

    configdb.create(
        cfg,
        schemata=cfg.ox_schemata,
        contexts_per_schema=OX_CONTEXTS_PER_SCHEMA,
        users_per_context=OX_USERS_PER_CONTEXT,
    )
    haproxy.wait_all_up(cfg, OX_BACKEND)


async def _start_ox(cfg: LabConfig) -> None:
    from lab.ox import nodes as ox_nodes

    await _gather_all(
        {cfg.ox_node_name(i): _in_thread(ox_nodes.start_ox_node, cfg, i) for i in cfg.ox_node_indexes}
    )


def _wait_all_up(cfg: LabConfig) -> None:
    haproxy.wait_all_up(cfg)
    if cfg.ox_nodes:
        haproxy.wait_all_up(cfg, OX_BACKEND)


async def _reset_ox_services(cfg: LabConfig) -> list[str]:
    """Config DB reset (created if missing), then every OX node at 7.10.0 with its shipped
    properties and tools settings, its service running them (restarted only where needed)."""
    from lab.ox import nodes as ox_nodes

    if not cfg.ox_nodes:
        return []
    done = await asyncio.to_thread(_ensure_configdb, cfg, True)
    results: dict[str, str | None] = {}

    async def node(i: int) -> None:
        results[cfg.ox_node_name(i)] = await asyncio.to_thread(ox_nodes.reset_ox_node, cfg, i)

    await _gather_all({cfg.ox_node_name(i): node(i) for i in cfg.ox_node_indexes})
    return done + [d for _, d in sorted(results.items()) if d]


async def reset_ox(cfg: LabConfig) -> list[str]:
    """Only the OX part back to the state just after lab_up (what lab_reset does for it):
    config DB, OX nodes, HAProxy's `ox` all ready and `ox_secondary` all in maintenance, all
    UP; ox-site.yaml rewritten. Returns what was done; cheap when nothing changed."""
    if not cfg.ox_nodes:
        return []
    done = await _reset_ox_services(cfg)
    await asyncio.to_thread(haproxy.start, cfg)
    await asyncio.to_thread(haproxy.reset_servers, cfg)
    await asyncio.to_thread(haproxy.wait_all_up, cfg, OX_BACKEND)
    write_ox_site_yaml(cfg)
    return done


# --------------------------------------------------------------------------- site.yaml


def _ssh_entry(port: int) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": port,
        "user": SSH_USER,
        "key": {"file": "secrets/id_ed25519"},
        "known_hosts": "secrets/known_hosts",
    }


CTL_SERVICE = {"kind": "command", "stop": "./ctl stop", "start": "./ctl start", "status": "./ctl status"}


def _database_entry(cfg: LabConfig) -> dict[str, Any]:
    """The site's database: the primary MariaDB (replica, warm replica for seed 004) or, for
    cfg.db == "mssql", the SQL Server stand-in in front of it (lab/mssql): same data, T-SQL
    over TDS, backups written "on the SQL Server host" (.lab/mssql/backups)."""
    if cfg.db == "mssql":
        return {
            "name": "main",
            "kind": "mssql",
            "host": "127.0.0.1",
            "port": mssql_lab.port(cfg),
            "database": DB_NAME,
            "user": mssql_lab.LOGIN,
            "password": {"file": f"secrets/{mssql_lab.password_file(cfg).name}"},
            "backup_dir": str(mssql_lab.backups_dir(cfg).relative_to(cfg.abs_root)),
            "scratch_database": SCRATCH_DB_NAME,
            # The lab's stand-in has no TLS (its pre-login says so): FreeTDS must not insist.
            "odbc": {"driver": "FreeTDS", "encrypt": "off"},
        }
    return {
        "name": "main",
        "kind": "mysql",
        "host": "127.0.0.1",
        "port": cfg.primary_db_port,
        "database": DB_NAME,
        "user": DB_USER,
        "password": {"file": "secrets/db_password"},
        "replica": {"host": "127.0.0.1", "port": cfg.replica_db_port},
        "backup_dir": "backups",
        "scratch_database": SCRATCH_DB_NAME,
        # Seed 004's "warm" backup: an empty server zerodown initialises as a replica.
        "admin_user": mariadb.ADMIN_USER,
        "admin_password": {"file": f"secrets/{mariadb.admin_password_file(cfg).name}"},
        "replication_user": mariadb.REPL_USER,
        "replication_password": {"file": f"secrets/{mariadb.repl_password_file(cfg).name}"},
        "warm_replica": {"host": "127.0.0.1", "port": cfg.warm_db_port},
    }


def site_inventory(cfg: LabConfig) -> dict[str, Any]:
    """The lab's inventory as plain data (paths relative to the site.yaml folder)."""
    if cfg.profile == "secret-server":
        return secret_server_site_inventory(cfg)
    node_entries = [
        {
            "name": cfg.node_name(i),
            "ssh": _ssh_entry(cfg.ssh_port(i)),
            "app_dir": APP_DIR,
            "service": dict(CTL_SERVICE),
            "url": f"http://127.0.0.1:{cfg.app_port(i)}",
            # Secret Server's groups A and B: two about even halves (ss-rolling upgrades B first).
            "group": "A" if i <= (cfg.nodes + 1) // 2 else "B",
        }
        for i in cfg.node_indexes
    ]
    return {
        "site": "lab",
        "nodes": node_entries,
        "load_balancers": [
            {
                "name": "main",
                "kind": "haproxy",
                "runtime_api": "unix:haproxy/admin.sock",
                "backend": BACKEND,
                "members": {cfg.node_name(i): cfg.node_name(i) for i in cfg.node_indexes},
                "drain_timeout_s": 60,
                "frontend_url": cfg.main_url,
                "add_server_options": LAB_ADD_SERVER_OPTIONS,
                # The maintenance page (lab/haproxy.py): `set map <map> main on|off`; requests
                # with a one-time preview key in this header pass it (seed 004 step 30).
                "maintenance": {
                    "map": f"haproxy/{haproxy.maintenance_map(cfg).name}",
                    "key": haproxy.MAINTENANCE_KEY,
                    "preview_header": haproxy.PREVIEW_HEADER,
                },
            },
            {
                # Seed 004's temporary test balancer (frontend `test1`): no members until a
                # procedure attaches servers at run time.
                "name": "test",
                "kind": "haproxy",
                "runtime_api": "unix:haproxy/admin.sock",
                "backend": TEST_BACKEND,
                "members": {},
                "drain_timeout_s": 60,
                "frontend_url": cfg.test_url,
                "add_server_options": LAB_ADD_SERVER_OPTIONS,
            },
        ],
        "databases": [_database_entry(cfg)],
        "application": {
            "name": "labapp",
            "health_file": HEALTH_FILE,
            "protected_files": ["encryption.config", "database.config", "admin.config"],
            "merge_files": ["web.config"],
            # The database password every node's database.config holds (written from
            # secrets/db_password at install).
            "secret_keys": ["database.config:password"],
            "health": {"path": "/health"},
            "version": {"path": "/version"},
            "login": {
                "path": "/login",
                "user": mariadb.PROBE_USER,
                "password": {"file": "secrets/admin_password"},
            },
            "url": cfg.main_url,
            "admin": {"token": {"file": "secrets/admin_token"}, "path_prefix": "/admin"},
            # Where a node's app finds its database server (lab/nodes.py install_node).
            "database_config": {"file": "database.config", "host_key": "host", "port_key": "port"},
            # The lab app reads the schema as it goes (/health always afresh): a server
            # started on the new code before a migration needs no restart after it.
            "restart_after_migration": False,
        },
        # Servers come and go (seeds 003/004): the lab clones a node into a new one and
        # destroys nodes (lab/provision.py), plugged in as any site's commands would be.
        "provisioning": provision.inventory_commands(cfg),
        # Who may decide each gate (the demo and the bench decide as alice; tests pick their own).
        "approvers": {
            gate: ["alice", "bob"]
            for gate in (
                "go-live",
                "continue",
                "staging-test",
                "upgrade-successful",
                "swap",
                "failure",
                "terminate",
                "drain-deadline",
                "restore-snapshot",
                "revert",
            )
        },
        # Every decision on the lab is signed with the approver's key (issue 17.6).
        "approver_keys": sshd.approver_public_keys(cfg),
        "rollout": {"batch_size": 1, "health_timeout_s": 30},
        # Laid out like a node, not behind the load balancer; a procedure restores a node's
        # backup into its (empty) app folder, then these overrides point the copy at its
        # own port and database.
        "staging": {
            "ssh": _ssh_entry(cfg.staging_ssh_port),
            "app_dir": APP_DIR,
            "service": dict(CTL_SERVICE),
            "url": cfg.staging_url,
            "database": STAGING_DB_NAME,
            "config": {
                "web.config": {
                    "http.port": str(cfg.staging_app_port),
                    "node.name": STAGING_NAME,
                    "custom.banner": "Welcome to staging",
                },
                "database.config": {"database": STAGING_DB_NAME},
            },
        },
    }


def secret_server_site_inventory(cfg: LabConfig) -> dict[str, Any]:
    """The secret-server profile's inventory: the lab's nodes seen as Windows/IIS nodes
    through their Win32-OpenSSH stand-ins (lab/windows: drive paths, PowerShell, IIS app
    pools over ./ctl), behind the BIG-IP stand-in (lab/f5, over the real HAProxy), on the SQL
    Server stand-in (lab/mssql). The same node processes as the default profile's."""
    from lab import windows

    base = site_inventory(dataclasses.replace(cfg, profile="default", db="mssql"))

    def iis_node(i: int) -> dict[str, Any]:
        return {
            "name": cfg.node_name(i),
            "os": "windows",
            "ssh": _ssh_entry(cfg.win_ssh_port(i)),
            "app_dir": windows.APP_DIR,
            "service": {"kind": "iis", "site": windows.SITE, "app_pool": windows.APP_POOL, "timeout_s": 60},
            "url": f"http://127.0.0.1:{cfg.app_port(i)}",
            "group": "A" if i <= (cfg.nodes + 1) // 2 else "B",
        }

    indexes = [i for i in cfg.node_indexes if i <= windows.MAX_NODES]
    base["site"] = "lab-secret-server"
    base["nodes"] = [iis_node(i) for i in indexes]
    base["load_balancers"] = [
        {
            "name": "main",
            "kind": "f5",
            "url": f5_lab.base_url(cfg),
            "pool": f"/Common/{f5_lab.POOL}",
            "members": {cfg.node_name(i): f5_lab.member_name(cfg, i) for i in indexes},
            "user": "zerodown",
            "credential": {"file": f"secrets/{f5_lab.password_file(cfg).name}"},
            "ca_bundle": str(f5_lab.ca_bundle(cfg).relative_to(cfg.abs_root)),
            "drain_timeout_s": 60,
            "frontend_url": cfg.main_url,
        }
    ]
    base.pop("provisioning", None)  # the lab clones Linux nodes only
    staging = base["staging"]
    staging.update(
        {
            "os": "windows",
            "ssh": _ssh_entry(cfg.win_staging_ssh_port),
            "app_dir": windows.APP_DIR,
            "service": {"kind": "iis", "site": windows.SITE, "app_pool": windows.APP_POOL, "timeout_s": 60},
        }
    )
    return base


def ox_site_inventory(cfg: LabConfig) -> dict[str, Any]:
    """The OX cluster's inventory (site `lab-ox`) as plain data: the OX nodes behind the
    `ox` (main) and `ox_secondary` load balancers, and the seed's OX settings."""
    names = [cfg.ox_node_name(i) for i in cfg.ox_node_indexes]
    members = {n: n for n in names}

    def lb(name: str, backend: str) -> dict[str, Any]:
        return {
            "name": name,
            "kind": "haproxy",
            "runtime_api": "unix:haproxy/admin.sock",
            "backend": backend,
            "members": dict(members),
            "drain_timeout_s": 60,
        }

    return {
        "site": "lab-ox",
        "nodes": [
            {
                "name": cfg.ox_node_name(i),
                "ssh": _ssh_entry(cfg.ox_ssh_port(i)),
                "app_dir": OX_APP_DIR,
                "service": dict(CTL_SERVICE),
                "url": f"http://127.0.0.1:{cfg.ox_app_port(i)}",
            }
            for i in cfg.ox_node_indexes
        ],
        "load_balancers": [lb("main", OX_BACKEND), lb("secondary", OX_SECONDARY_BACKEND)],
        "application": {
            "name": "open-xchange",
            "health": {"path": "/health"},
            "version": {"path": "/version"},
            "url": cfg.ox_main_url,
        },
        "approvers": {
            gate: ["alice", "bob"] for gate in ("failure", "server-already-registered", "continue")
        },
        "approver_keys": sshd.approver_public_keys(cfg),
        "rollout": {"batch_size": 1, "health_timeout_s": 30},
        "ox": {
            "server_name": "oxserver",
            "main_lb": "main",
            "secondary_lb": "secondary",
            "secondary_url": cfg.ox_secondary_url,
            "tools_dir": "bin",
            "admin_user": "oxadminmaster",
            "admin_password": {"file": "secrets/ox_master_password"},
            "server_properties": "etc/server.properties",
            "system_properties": "etc/system.properties",
            "hazelcast_properties": "etc/hazelcast.properties",
            "reload_command": "./ctl reload",
            "install_command": "./oxpkg install {version}",
            "version_command": "./oxpkg version",
        },
    }


def _write_yaml(path: Path, header: str, data: dict[str, Any]) -> None:
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(header + body, encoding="utf-8")
    tmp.replace(path)


def write_ox_site_yaml(cfg: LabConfig) -> Path:
    """Write ox-site.yaml and check that `load_inventory` accepts it."""
    from inventory.load import load_inventory

    header = (
        "# zerodown inventory of the lab's Open-Xchange cluster (generated by `zerodown lab up --ox`;\n"
        "# lab/manager.py rewrites it on every lab up / reset, so edit a copy instead).\n"
        "# Relative paths: node paths are relative to the node's folder (its SSH root), the others\n"
        "# to this file's folder.\n"
        f"# Ports: ox_main {cfg.ox_main_port}, ox_secondary {cfg.ox_secondary_port}, OX nodes HTTP "
        f"{cfg.ox_app_port(1)}+, SSH {cfg.ox_ssh_port(1)}+.\n"
    )
    _write_yaml(cfg.ox_site_yaml, header, ox_site_inventory(cfg))
    load_inventory(cfg.ox_site_yaml)
    return cfg.ox_site_yaml


def write_site_yaml(cfg: LabConfig) -> Path:
    """Write site.yaml and check that `load_inventory` accepts it (a format drift between
    the lab and the inventory model must fail here, not in the middle of a procedure)."""
    from inventory.load import load_inventory

    header = (
        "# zerodown inventory of the local lab site (generated by `zerodown lab up`;\n"
        "# lab/manager.py rewrites it on every lab up / reset, so edit a copy instead).\n"
        "# Relative paths are relative to this file's folder. Secrets are references to\n"
        "# files under secrets/, never values.\n"
        f"# Ports: main {cfg.main_port}, secondary {cfg.secondary_port}, MariaDB primary "
        f"{cfg.primary_db_port} / replica {cfg.replica_db_port}, apps {cfg.app_port(1)}+, SSH "
        f"{cfg.ssh_port(1)}+, staging app {cfg.staging_app_port} / SSH {cfg.staging_ssh_port}.\n"
    )
    for db in DB_PROFILES:  # both: the stand-in runs in every lab
        other = dataclasses.replace(cfg, db=db, profile="default")
        _write_yaml(
            other.site_yaml,
            header + f"# Database profile: {db} (`zerodown lab up --db {db}`).\n",
            site_inventory(other),
        )
        load_inventory(other.site_yaml)
    ss = dataclasses.replace(cfg, profile="secret-server")
    _write_yaml(
        ss.site_yaml,
        header
        + "# Profile secret-server (`zerodown lab up --profile secret-server`): Windows/IIS nodes\n"
        + f"# (Win32-OpenSSH stand-ins on SSH {cfg.win_ssh_port(1)}+), the BIG-IP stand-in at "
        + f"{f5_lab.base_url(cfg)}, SQL Server.\n",
        site_inventory(ss),
    )
    load_inventory(ss.site_yaml)
    return cfg.site_yaml


# --------------------------------------------------------------------------- up / down


async def lab_up(cfg: LabConfig, with_temporal: bool = True) -> Path:
    """Start the whole lab (idempotent) and return the path of its site.yaml."""
    t0 = time.monotonic()
    root = cfg.abs_root
    for d in (root, cfg.backups_dir):
        d.mkdir(parents=True, exist_ok=True)
    # Secrets first: node installs write database.config from db_password.
    mariadb.ensure_db_secrets(cfg)

    steps: dict[str, Any] = {
        "MariaDB": _in_thread(mariadb.start_mariadb, cfg),
        "nodes": _in_thread(_nodes_up, cfg),
    }
    if with_temporal:
        from lab.devserver import start_dev_server

        steps["Temporal dev server"] = _in_thread(
            start_dev_server, root, cfg.temporal_port, cfg.temporal_ui_port
        )
    await _gather_all(steps)
    # The SQL Server stand-in speaks TDS in front of the primary MariaDB (lab/mssql).
    await asyncio.to_thread(mssql_lab.start, cfg)
    if cfg.ox_nodes:
        await asyncio.to_thread(_ensure_configdb, cfg, False)
    # Apps (and OX nodes) after the database: their /health needs it, and HAProxy must see
    # them healthy.
    await _gather_all({"apps": _start_apps(cfg), **({"OX nodes": _start_ox(cfg)} if cfg.ox_nodes else {})})
    await asyncio.to_thread(haproxy.start, cfg)
    # The F5 stand-in (iControl REST) drives the real HAProxy (lab/f5).
    await asyncio.to_thread(f5_lab.start, cfg)
    await asyncio.to_thread(_wait_all_up, cfg)
    _write_state(cfg, with_temporal)
    site = write_site_yaml(cfg)
    if cfg.ox_nodes:
        write_ox_site_yaml(cfg)
    log.info("lab up in %.1fs: %s", time.monotonic() - t0, site)
    return site


def _node_dirs(cfg: LabConfig) -> list[Path]:
    """Every node folder present (not just cfg.nodes of them: the lab may have been started
    with more nodes than the caller's config says)."""
    if not cfg.nodes_dir.is_dir():
        return []
    return sorted(p for p in cfg.nodes_dir.iterdir() if p.is_dir())


def _ox_index(name: str) -> int | None:
    return int(name[2:]) if name.startswith("ox") and name[2:].isdigit() else None


def _stop_node_dir(cfg: LabConfig, node: Path) -> None:
    from lab import nodes

    name = node.name
    if (ox := _ox_index(name)) is not None:
        from lab.ox import nodes as ox_nodes

        if (node / "ctl").exists():
            try:
                # The folder's index, not cfg's: the lab may have more OX nodes than cfg says.
                ox_nodes.stop_ox_node(cfg, ox)
            except Exception as e:  # fall back to the pid file below
                log.warning("%s: ctl stop failed (%s); stopping by pid file", name, e)
        stop_pidfile(node / "run" / "ox.pid", timeout=20, expect="lab.ox.middleware")
        return
    i = int(name[4:]) if name.startswith("node") and name[4:].isdigit() else None
    if (node / "ctl").exists() and (i is not None or name == STAGING_NAME):
        try:
            if i is not None:
                nodes.stop_node(cfg, i)
            else:
                nodes.stop_staging(cfg)
        except Exception as e:  # fall back to the pid file below
            log.warning("%s: ctl stop failed (%s); stopping by pid file", name, e)
    stop_pidfile(node / "run" / "app.pid", timeout=10, expect="app.py")


def lab_down(cfg: LabConfig) -> None:
    """Stop every lab process (HAProxy, apps, SSH endpoints, MariaDB, dev server) by pid file.

    Safe on a lab that is partly or not at all running. Raises LabError when something
    could not be stopped (after trying everything else)."""
    from lab import sshd
    from lab.devserver import stop_dev_server

    errors: list[str] = []

    def attempt(what: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as e:
            errors.append(f"{what}: {e}")

    attempt("worker", lambda: stop_pidfile(cfg.worker_pidfile, expect="worker"))
    # Front to back: the load balancer first so no request reaches an app being stopped.
    attempt("HAProxy", lambda: haproxy.stop(cfg))
    # Nodes a procedure provisioned go (archived, lab/provision.py); original nodes it
    # destroyed are installed again by the next lab_up.
    attempt("provisioned nodes", lambda: provision.destroy_provisioned(cfg))
    attempt("destroyed nodes", lambda: provision.forget_destroyed(cfg, sync=False))
    node_dirs = _node_dirs(cfg)
    if node_dirs:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=len(node_dirs)) as ex:
            for node, fut in [(n, ex.submit(_stop_node_dir, cfg, n)) for n in node_dirs]:
                attempt(node.name, fut.result)
    attempt("sshd", lambda: sshd.stop_sshd(cfg))
    attempt("SQL Server stand-in", lambda: mssql_lab.stop(cfg))
    attempt("F5 stand-in", lambda: f5_lab.stop(cfg))
    attempt("MariaDB", lambda: mariadb.stop_mariadb(cfg))
    attempt("Temporal dev server", lambda: stop_dev_server(cfg.abs_root))
    left = [part for part, up, _ in lab_status(cfg, with_temporal=True, shallow=True) if up]
    if left:
        errors.append(f"still running: {', '.join(left)}")
    if errors:
        raise LabError("lab down incomplete: " + "; ".join(errors))


# --------------------------------------------------------------------------- status


def lab_status(
    cfg: LabConfig, with_temporal: bool | None = None, shallow: bool = False
) -> list[tuple[str, bool, str]]:
    """(part, up, detail) for each part of the lab.

    with_temporal=None includes the dev server when the lab was started with it (recorded
    in lab.json by lab_up). shallow=True only checks the processes (no SQL, no runtime API).
    """
    from lab import nodes, sshd
    from lab.devserver import server_status

    if with_temporal is None:
        with_temporal = bool(_read_state(cfg).get("with_temporal", True))
    rows: list[tuple[str, bool, str]] = []
    if with_temporal:
        ts = (
            server_status(cfg.abs_root)
            if not shallow
            else {"running": pid_alive(cfg.abs_root / "temporal.pid", expect="start-dev"), "serving": None}
        )
        up = bool(ts["running"] and (shallow or ts["serving"]))
        rows.append(
            (
                "temporal",
                up,
                f"{ts.get('address') or cfg.temporal_address} pid {ts.get('pid')}"
                if ts["running"]
                else f"not running (log {cfg.abs_root / 'temporal.log'})",
            )
        )
    for role in mariadb.ROLES:
        if shallow:
            running = mariadb.instance_running(cfg, role)
            rows.append((f"mariadb {role}", running, f"port {mariadb.port_of(cfg, role)}"))
            continue
        st = mariadb.instance_status(cfg, role)
        detail = f"127.0.0.1:{st['port']}"
        up = bool(st.get("answering"))
        if not st["running"]:
            detail += f" not running (log {st['log']})"
        elif not up:
            detail += f" not answering: {st.get('error', '')}"
        elif role == "replica":
            replicating = st.get("io_running") == "Yes" and st.get("sql_running") == "Yes"
            up = up and replicating and bool(st.get("read_only"))
            detail += (
                f" gtid {st.get('gtid')} io={st.get('io_running')} sql={st.get('sql_running')}"
                f" behind={st.get('seconds_behind')}s read_only={st.get('read_only')}"
            )
            if st.get("last_error"):
                detail += f" error: {st['last_error']}"
        elif role == "warm":
            # Up when answering: empty (as lab_up leaves it) or initialised by a procedure.
            source = st.get("replicating_from")
            detail += (
                f" replica of {source} io={st.get('io_running')} sql={st.get('sql_running')}"
                if source
                else " not replicating"
            )
            dbs = ",".join(st.get("databases") or []) or "none"
            detail += f" databases={dbs} read_only={st.get('read_only')}"
        else:
            detail += f" gtid {st.get('gtid')}"
        rows.append((f"mariadb {role}", up, detail))
    rows.append(("mssql", *mssql_lab.status(cfg)))
    rows.append(("f5", *f5_lab.status(cfg)))
    ssh_ports = f"ports {cfg.ssh_port(1)}-{cfg.ssh_port(cfg.nodes)}, staging {cfg.staging_ssh_port}"
    if cfg.ox_nodes:
        ssh_ports += f", OX {cfg.ox_ssh_port(1)}-{cfg.ox_ssh_port(cfg.ox_nodes)}"
    rows.append(("sshd", sshd.sshd_running(cfg), ssh_ports))
    for node in _node_dirs(cfg) if shallow else []:
        pid_file, expect = (
            ("ox.pid", "lab.ox.middleware") if _ox_index(node.name) is not None else ("app.pid", "app.py")
        )
        rows.append((node.name, pid_alive(node / "run" / pid_file, expect=expect), str(node)))
    if not shallow:
        from lab.ox import nodes as ox_nodes

        for i in cfg.node_indexes:
            rows.append((cfg.node_name(i), nodes.node_running(cfg, i), f"http://127.0.0.1:{cfg.app_port(i)}"))
        for i in cfg.ox_node_indexes:
            rows.append(
                (
                    cfg.ox_node_name(i),
                    ox_nodes.ox_node_running(cfg, i),
                    f"http://127.0.0.1:{cfg.ox_app_port(i)}",
                )
            )
        for name, slot in provision.provisioned(cfg).items():
            rows.append(
                (
                    name,
                    pid_alive(cfg.nodes_dir / name / "run" / "app.pid", expect="app.py"),
                    f"http://127.0.0.1:{cfg.app_port(slot)} (provisioned)",
                )
            )
    hs = haproxy.status(cfg)
    detail = f"main :{cfg.main_port} secondary :{cfg.secondary_port}"
    if cfg.ox_nodes:
        detail += f" ox_main :{cfg.ox_main_port} ox_secondary :{cfg.ox_secondary_port}"
    rows.append(("haproxy", bool(hs["running"]), f"{detail} runtime API {cfg.haproxy_socket}"))
    if not shallow and hs["running"]:
        servers = hs.get("servers")
        states: dict[str, str] = servers if isinstance(servers, dict) else {}
        keys = [f"{BACKEND}/{cfg.node_name(i)}" for i in cfg.node_indexes]
        keys += [f"{OX_BACKEND}/{cfg.ox_node_name(i)}" for i in cfg.ox_node_indexes]
        for key in keys:
            state = states.get(key, "missing")
            rows.append((f"haproxy {key}", state == "UP", state))
    return rows


# --------------------------------------------------------------------------- reset


def _wipe_node_state(cfg: LabConfig, i: int) -> None:
    """What zerodown or a test left on the node besides the app folder: deploy bookkeeping
    (.zerodown, staging folders) and injected faults. Logs (run/, ssh.log) are kept."""
    node = cfg.node_dir(i)
    for d in (node / APP_DIR, node / ".zerodown", node / ".app.new"):
        shutil.rmtree(d, ignore_errors=True)
    inject = node / "inject"
    if inject.is_dir():
        for p in inject.iterdir():
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _reset_database(cfg: LabConfig) -> list[str]:
    done: list[str] = []
    for role in mariadb.ROLES:
        if not mariadb.instance_running(cfg, role):
            done.append(f"started MariaDB {role}")
        mariadb.start_instance(cfg, role)
    done += mariadb.ensure_primary_role(cfg)
    # After the primary's role: it may have been re-attached to a promoted warm server.
    done += mariadb.reset_warm(cfg)
    done += mariadb.reset_schema(cfg)
    done += mariadb.reset_site_state(cfg)
    if not mariadb.replica_in_sync(cfg):
        # Broken, promoted or diverged (written to directly): re-seed it from the primary.
        mariadb.rebuild_replica(cfg)
        done.append("rebuilt the replica from the primary")
    mariadb.wait_replica_caught_up(cfg)
    return done


async def lab_reset(cfg: LabConfig) -> list[str]:
    """Put the lab back to the state just after lab_up; returns what was done.

    Database: schema version 1 (v2's down migration if needed), replica replicating; upgrade
    settings at their defaults, no audit rows, no staging / scratch database, no fault.
    Nodes: stopped, app folder wiped, v1 installed with the node installer, started; nodes a
    procedure provisioned destroyed, original nodes it destroyed re-created (lab/provision.py).
    Staging: app stopped, folder emptied.
    OX part (cfg.ox_nodes > 0): see reset_ox.
    HAProxy: every server ready (and at its initial weight) in `app` (and `ox`), in
    maintenance in `app_secondary` (and `ox_secondary`), all UP. Processes that are not
    running are started."""
    from lab import nodes, packages, sshd

    t0 = time.monotonic()
    mariadb.ensure_db_secrets(cfg)
    # Nodes a procedure provisioned go first (lab/provision.py: archived); original nodes it
    # destroyed are installed again below.
    gone = await asyncio.to_thread(provision.destroy_provisioned, cfg)
    # Nodes a revert moved to the promoted warm server are pointed back at the primary
    # before the warm server is emptied (no restart: every node left is reinstalled and
    # restarted, or wiped, below).
    moved = await asyncio.to_thread(mariadb.point_nodes_at_primary, cfg, False)
    await asyncio.to_thread(packages.build_packages, cfg)

    async def reinstall(i: int) -> None:
        await asyncio.to_thread(nodes.stop_node, cfg, i)
        await asyncio.to_thread(_wipe_node_state, cfg, i)
        # The profile's v1: the secret-server profile's nodes run on XML configs.
        await asyncio.to_thread(nodes.install_node, cfg, i, cfg.package(1))

    db_done: list[str] = []

    async def database() -> None:
        db_done.extend(await asyncio.to_thread(_reset_database, cfg))

    # Nodes are stopped while the schema goes back, so no v2 code runs against schema 1.
    await _gather_all(
        {
            "database": database(),
            STAGING_NAME: _in_thread(nodes.wipe_staging, cfg),
            **{cfg.node_name(i): reinstall(i) for i in cfg.node_indexes},
        }
    )
    db_done.extend(await asyncio.to_thread(mssql_lab.reset, cfg))
    db_done.extend(await asyncio.to_thread(windows_state.reset, cfg))  # IIS configs as installed
    back = await asyncio.to_thread(provision.forget_destroyed, cfg)  # their SSH endpoints again
    await asyncio.to_thread(sshd.start_sshd, cfg)
    ox_done: list[str] = []

    async def ox() -> None:
        ox_done.extend(await _reset_ox_services(cfg))

    # The OX part after the database step: its config DB lives on the primary.
    await _gather_all({"apps": _start_apps(cfg), **({"OX": ox()} if cfg.ox_nodes else {})})
    await asyncio.to_thread(haproxy.start, cfg)
    await asyncio.to_thread(haproxy.reset_servers, cfg)
    if not f5_lab.running(cfg):
        await asyncio.to_thread(f5_lab.start, cfg)
    await asyncio.to_thread(f5_lab.reset, cfg)
    await asyncio.to_thread(_wait_all_up, cfg)
    write_site_yaml(cfg)
    if cfg.ox_nodes:
        write_ox_site_yaml(cfg)
    done = [
        *moved,
        *db_done,
        f"reinstalled v1 on {cfg.nodes} nodes",
        "staging emptied",
        *ox_done,
        "HAProxy servers ready",
    ]
    done += [f"destroyed provisioned node {n}" for n in gone] + [f"re-created {n}" for n in back]
    log.info("lab reset in %.1fs: %s", time.monotonic() - t0, "; ".join(done))
    return done
