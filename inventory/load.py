"""Reading and validating an inventory (YAML) into the model (`inventory.model`).

`load_inventory(path)` validates everything before anything runs and raises
`InventoryError` listing *every* problem with its path, e.g.
``nodes[2].ssh.port: expected an integer 1-65535, got "22a"``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from inventory.keys import PublicKeyError, fingerprint, key_blob
from inventory.model import (
    DB_KINDS,
    LB_KINDS,
    OS_KINDS,
    PROVISIONING_KINDS,
    SERVICE_KINDS,
    AdminApi,
    Application,
    Database,
    DatabaseClientConfig,
    DatabaseEndpoint,
    HttpCheck,
    Inventory,
    InventoryError,
    LoadBalancer,
    MaintenanceSwitch,
    Node,
    OdbcSettings,
    OxSettings,
    Provisioning,
    Rollout,
    SecretRef,
    ServerArray,
    ServiceControl,
    SshTarget,
    Staging,
)

T = TypeVar("T")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# An HTTP header name: a token of RFC 9110 (section 5.6.2).
_HEADER_TOKEN_RE = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}")


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

    def string(
        self, m: dict[str, Any], key: str, path: str, default: str | None = None, required: bool = True
    ) -> str | None:
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
            self.problem(
                _join(path, key), f"expected a name of letters, digits, '-', '_' or '.', got {_show(s)}"
            )
        return s

    def integer(self, m: dict[str, Any], key: str, path: str, default: int | None, lo: int, hi: int) -> int:
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
            self.problem(
                p, "secrets must be references ({env: NAME} or {file: PATH}), never values in the inventory"
            )
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
    m = r.mapping(raw, path, ("host", "port", "user", "key", "password", "known_hosts", "connect_timeout_s"))
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
    m = r.mapping(
        raw, path, ("kind", "stop", "start", "status", "unit", "site", "app_pool", "timeout_s", "shared_pool")
    )
    kind = r.choice(m, "kind", path, SERVICE_KINDS)
    needs = {"command": ("stop", "start", "status"), "systemd": ("unit",), "iis": ("site", "app_pool")}.get(
        kind, ()
    )
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
        shared_pool=r.boolean(m, "shared_pool", path, default=False),
    )


def _parse_url(r: _Reader, m: dict[str, Any], key: str, path: str, required: bool) -> str | None:
    s = r.string(m, key, path, required=required)
    if s and not re.match(r"^https?://[^/\s]+", s):
        r.problem(_join(path, key), f"expected an http(s):// URL, got {_show(s)}")
    return s.rstrip("/") if s else s


_DRIVE_PATH = re.compile(r"^[A-Za-z]:[/\\]")


def _parse_os(r: _Reader, m: dict[str, Any], path: str, service: ServiceControl) -> tuple[str, str]:
    """(os, app_dir): `os` defaults to windows for an IIS service, linux otherwise. A Windows
    app_dir is a drive path; its backslashes become slashes (SFTP and PowerShell take both)."""
    os_kind = r.string(m, "os", path, default="windows" if service.kind == "iis" else "linux") or ""
    app_dir = r.string(m, "app_dir", path) or ""
    if os_kind not in OS_KINDS:
        r.problem(_join(path, "os"), f"expected one of {', '.join(OS_KINDS)}, got {_show(os_kind)}")
        return os_kind, app_dir
    if os_kind == "windows":
        if app_dir and not _DRIVE_PATH.match(app_dir):
            r.problem(
                _join(path, "app_dir"),
                "a Windows node's app_dir is a drive path such as C:/inetpub/wwwroot/App, got "
                + _show(app_dir),
            )
        app_dir = app_dir.replace("\\", "/")
        if service.kind == "systemd":
            r.problem(_join(path, "service.kind"), "systemd does not run on a Windows node (os: windows)")
    elif service.kind == "iis":
        r.problem(
            _join(path, "os"), "an IIS service (service.kind: iis) runs on a Windows node: os must be windows"
        )
    return os_kind, app_dir


def _parse_node(r: _Reader, raw: Any, path: str) -> Node:
    m = r.mapping(raw, path, ("name", "ssh", "app_dir", "service", "url", "zone", "group", "os"))
    service = (
        _parse_service(r, m.get("service"), _join(path, "service"))
        if m.get("service") is not None
        else _missing(r, path, "service", ServiceControl(kind=""))
    )
    os_kind, app_dir = _parse_os(r, m, path, service)
    return Node(
        name=r.name(m, "name", path),
        ssh=_parse_ssh(r, m.get("ssh"), _join(path, "ssh"))
        if m.get("ssh") is not None
        else _missing(r, path, "ssh", SshTarget(host="")),
        app_dir=app_dir,
        service=service,
        url=_parse_url(r, m, "url", path, required=True) or "",
        zone=r.string(m, "zone", path, default="default") or "default",
        group=r.string(m, "group", path, required=False),
        os=os_kind,
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
    m = r.mapping(
        raw,
        path,
        (
            "name",
            "kind",
            "members",
            "runtime_api",
            "backend",
            "url",
            "pool",
            "user",
            "credential",
            "ca_bundle",
            "drain_timeout_s",
            "frontend_url",
            "add_server_options",
            "maintenance",
        ),
    )
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
        r.problem(
            _join(path, "runtime_api"),
            f"expected unix:/path/to.sock or tcp:host:port, got {_show(runtime_api)}",
        )
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
        ca_bundle=r.path_value(ca) if (ca := r.string(m, "ca_bundle", path, required=False)) else None,
        drain_timeout_s=r.number(m, "drain_timeout_s", path, 120.0),
        frontend_url=_parse_url(r, m, "frontend_url", path, required=False),
        add_server_options=r.string(m, "add_server_options", path, default="check") or "check",
        maintenance=_parse_maintenance(r, m["maintenance"], _join(path, "maintenance"))
        if m.get("maintenance") is not None
        else None,
    )


def _parse_maintenance(r: _Reader, raw: Any, path: str) -> MaintenanceSwitch:
    m = r.mapping(raw, path, ("map", "key", "preview_header", "on_value", "off_value"))
    mp = r.string(m, "map", path) or ""
    key = r.string(m, "key", path) or ""
    if key and any(c.isspace() for c in key):
        r.problem(_join(path, "key"), f"expected a map key without spaces, got {_show(key)}")
    on_value = r.string(m, "on_value", path, default="on") or "on"
    # "" (allowed here, unlike other strings): switching off deletes the entry.
    off_value = "" if m.get("off_value") == "" else r.string(m, "off_value", path, default="off") or "off"
    for field_name, value in (("on_value", on_value), ("off_value", off_value)):
        if any(c.isspace() for c in value):
            r.problem(_join(path, field_name), f"expected a map value without spaces, got {_show(value)}")
    if on_value == off_value:
        r.problem(_join(path, "off_value"), f"must differ from on_value ({on_value!r})")
    if on_value == "preview" or off_value == "preview":
        r.problem(path, "'preview' is the value of the preview keys, not of the maintenance switch")
    header = r.string(m, "preview_header", path, required=False) or ""
    if header and not _HEADER_TOKEN_RE.fullmatch(header):
        r.problem(
            _join(path, "preview_header"),
            f"expected an HTTP header name (letters, digits and !#$%&'*+-.^_`|~), got {_show(header)}",
        )
    return MaintenanceSwitch(
        map=r.path_value(mp) if mp else "",
        key=key,
        preview_header=header,
        on_value=on_value,
        off_value=off_value,
    )


def _parse_endpoint(r: _Reader, raw: Any, path: str, default_port: int) -> DatabaseEndpoint:
    m = r.mapping(raw, path, ("host", "port"))
    return DatabaseEndpoint(
        host=r.string(m, "host", path) or "", port=r.integer(m, "port", path, default_port, 1, 65535)
    )


# Replication settings a SQL Server entry cannot use.
_MYSQL_ONLY = (
    "replica",
    "warm_replica",
    "replication_user",
    "replication_password",
    "admin_user",
    "admin_password",
)
# FreeTDS's `Encryption` values and Microsoft's driver's `Encrypt` values (README "SQL Server").
_FREETDS_ENCRYPTION = ("off", "request", "require", "strict")
_MS_ENCRYPT = ("yes", "no", "strict", "mandatory", "optional")
_SECRET_KEYWORDS = frozenset({"pwd", "password", "uid", "user", "server", "port", "database", "driver"})


def _parse_odbc(r: _Reader, raw: Any, path: str, kind: str) -> OdbcSettings:
    m = r.mapping(
        raw, path, ("driver", "encrypt", "trust_server_certificate", "host_name_in_certificate", "options")
    )
    if kind == "mysql":  # (an unknown kind is reported once, as such)
        r.problem(path, "only for kind mssql (SQL Server through ODBC)")
    driver = r.string(m, "driver", path, default="FreeTDS", required=False) or "FreeTDS"
    encrypt = r.string(m, "encrypt", path, default="", required=False) or ""
    allowed = _FREETDS_ENCRYPTION if driver == "FreeTDS" else _MS_ENCRYPT
    if encrypt and encrypt not in allowed:
        r.problem(
            _join(path, "encrypt"),
            f"for driver {driver} expected one of {', '.join(allowed)}, got {_show(encrypt)}",
        )
    options_raw = m.get("options") or {}
    options: dict[str, str] = {}
    if not isinstance(options_raw, dict):
        r.problem(
            _join(path, "options"),
            f"expected a mapping of connection-string keywords, got {_show(options_raw)}",
        )
    else:
        for key, value in options_raw.items():
            if str(key).lower() in _SECRET_KEYWORDS:
                r.problem(
                    _join(_join(path, "options"), str(key)),
                    "set by zerodown from the database entry (the password only ever as a reference)",
                )
            elif not isinstance(value, str | int | bool):
                r.problem(
                    _join(_join(path, "options"), str(key)), f"expected a plain value, got {_show(value)}"
                )
            else:
                options[str(key)] = str(value)
    return OdbcSettings(
        driver=driver,
        encrypt=encrypt,
        trust_server_certificate=r.boolean(m, "trust_server_certificate", path, False),
        host_name_in_certificate=r.string(m, "host_name_in_certificate", path, default="", required=False)
        or "",
        options=options,
    )


def _parse_db(r: _Reader, raw: Any, path: str) -> Database:
    m = r.mapping(
        raw,
        path,
        (
            "name",
            "kind",
            "host",
            "port",
            "database",
            "user",
            "password",
            "replica",
            "backup_dir",
            "scratch_database",
            "admin_user",
            "admin_password",
            "replication_user",
            "replication_password",
            "warm_replica",
            "lock_wait_timeout_s",
            "odbc",
        ),
    )
    kind = r.choice(m, "kind", path, DB_KINDS)
    default_port = 1433 if kind == "mssql" else 3306
    if kind == "mssql":
        for key in _MYSQL_ONLY:
            if m.get(key) is not None:
                r.problem(
                    _join(path, key),
                    "MariaDB / MySQL replication only; for SQL Server zerodown finds the writable "
                    "primary itself (availability group or mirroring)",
                )
    replica = (
        _parse_endpoint(r, m["replica"], _join(path, "replica"), default_port)
        if m.get("replica") is not None
        else None
    )
    warm = (
        _parse_endpoint(r, m["warm_replica"], _join(path, "warm_replica"), default_port)
        if m.get("warm_replica") is not None
        else None
    )
    admin_user = r.string(m, "admin_user", path, required=False)
    repl_user = r.string(m, "replication_user", path, required=False)
    if warm is not None:
        for key in ("admin_user", "admin_password", "replication_user", "replication_password"):
            if m.get(key) is None:
                r.problem(
                    _join(path, key),
                    "required with warm_replica (it is initialised, "
                    "stopped and promoted with these accounts)",
                )
    bd = r.string(m, "backup_dir", path, required=False)
    database = r.string(m, "database", path) or ""
    scratch = r.string(m, "scratch_database", path, required=False)
    if scratch and scratch == database:
        r.problem(
            _join(path, "scratch_database"),
            f"must differ from database {database!r} (the scratch copy is dropped after its test)",
        )
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
        lock_wait_timeout_s=r.integer(m, "lock_wait_timeout_s", path, 10, 1, 3600),
        odbc=_parse_odbc(r, m["odbc"], _join(path, "odbc"), kind) if m.get("odbc") is not None else None,
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
    m = r.mapping(
        raw,
        path,
        (
            "name",
            "protected_files",
            "merge_files",
            "secret_keys",
            "health",
            "version",
            "login",
            "url",
            "admin",
            "health_file",
            "database_config",
            "restart_after_migration",
        ),
    )
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
    secret_keys = r.str_list(m, "secret_keys", path)
    for entry in secret_keys:
        file, colon, key = entry.partition(":")
        if not (colon and file.strip() and key.strip()) or file.startswith("/") or ".." in Path(file).parts:
            r.problem(
                _join(path, "secret_keys"),
                f"{entry!r}: expected FILE:KEY with FILE relative to the application folder "
                "(e.g. database.config:password)",
            )
    return Application(
        name=r.string(m, "name", path) or "app",
        protected_files=protected,
        merge_files=merge,
        secret_keys=secret_keys,
        health=_parse_check(r, m["health"], _join(path, "health"))
        if m.get("health") is not None
        else HttpCheck(path="/health"),
        version=_parse_check(r, m["version"], _join(path, "version"))
        if m.get("version") is not None
        else HttpCheck(path="/version"),
        login=_parse_check(r, m["login"], _join(path, "login"), login=True)
        if m.get("login") is not None
        else None,
        url=_parse_url(r, m, "url", path, required=False),
        admin=_parse_admin(r, m["admin"], _join(path, "admin")) if m.get("admin") is not None else None,
        health_file=health_file,
        database_config=_parse_db_client(r, m["database_config"], _join(path, "database_config"))
        if m.get("database_config") is not None
        else None,
        restart_after_migration=r.boolean(m, "restart_after_migration", path, default=True),
    )


def _parse_db_client(r: _Reader, raw: Any, path: str) -> DatabaseClientConfig:
    m = r.mapping(raw, path, ("file", "host_key", "port_key"))
    f = r.string(m, "file", path) or ""
    if f and (f.startswith("/") or ".." in Path(f).parts):
        r.problem(_join(path, "file"), "must be relative to the application folder")
    return DatabaseClientConfig(
        file=f,
        host_key=r.string(m, "host_key", path, default="host") or "host",
        port_key=r.string(m, "port_key", path, default="port") or "port",
    )


def _parse_provisioning(r: _Reader, raw: Any, path: str) -> Provisioning:
    m = r.mapping(raw, path, ("kind", "create", "start", "destroy", "timeout_s", "array"))
    if m.get("kind") == "lab":  # before v0.3.0
        r.problem(
            _join(path, "kind"),
            "kind lab is gone: the lab is a command provisioner now (create: python -m lab.provision "
            "create --root <lab> --template {template} --name {name}; `lab up` writes it)",
        )
        kind = "lab"
    else:
        kind = r.choice(m, "kind", path, PROVISIONING_KINDS)
    command = kind == "command"
    create = r.string(m, "create", path, required=command)
    destroy = r.string(m, "destroy", path, required=command)
    if create and "{name}" not in create:
        r.problem(_join(path, "create"), f"must contain {{name}} (the new server), got {_show(create)}")
    if destroy and "{name}" not in destroy:
        r.problem(_join(path, "destroy"), f"must contain {{name}}, got {_show(destroy)}")
    array = None
    if m.get("array") is not None:
        ap = _join(path, "array")
        am = r.mapping(m["array"], ap, ("name", "disable", "enable"))
        array = ServerArray(
            name=r.name(am, "name", ap),
            disable=r.string(am, "disable", ap) or "",
            enable=r.string(am, "enable", ap) or "",
        )
    return Provisioning(
        kind=kind,
        create=create,
        start=r.string(m, "start", path, required=False),
        destroy=destroy,
        timeout_s=r.number(m, "timeout_s", path, 300.0),
        array=array,
    )


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
    m = r.mapping(raw, path, ("ssh", "app_dir", "service", "url", "database", "config", "os"))
    service = (
        _parse_service(r, m.get("service"), _join(path, "service"))
        if m.get("service") is not None
        else _missing(r, path, "service", ServiceControl(kind=""))
    )
    os_kind, app_dir = _parse_os(r, m, path, service)
    return Staging(
        ssh=_parse_ssh(r, m.get("ssh"), _join(path, "ssh"))
        if m.get("ssh") is not None
        else _missing(r, path, "ssh", SshTarget(host="")),
        app_dir=app_dir,
        service=service,
        url=_parse_url(r, m, "url", path, required=True) or "",
        database=r.string(m, "database", path) or "",
        config=_parse_staging_config(r, m.get("config"), _join(path, "config")),
        os=os_kind,
    )


_OX_DEFAULTS = OxSettings(
    server_name="",
    main_lb="",
    secondary_lb="",
    secondary_url="",
    admin_password=SecretRef(env="UNSET"),
    install_command="",
    version_command="",
)


def _parse_ox(r: _Reader, raw: Any, path: str) -> OxSettings:
    m = r.mapping(
        raw,
        path,
        (
            "server_name",
            "main_lb",
            "secondary_lb",
            "secondary_url",
            "admin_user",
            "admin_password",
            "tools_dir",
            "server_properties",
            "system_properties",
            "reload_command",
            "install_command",
            "version_command",
            "schema_shares",
            "runupdate_timeout_s",
            "upgradeschemata_timeout_s",
            "hazelcast_properties",
        ),
    )
    d = _OX_DEFAULTS
    install = r.string(m, "install_command", path) or ""
    if install and "{version}" not in install:
        r.problem(_join(path, "install_command"), f"must contain {{version}}, got {_show(install)}")
    shares: list[int] = []
    raw_shares = m.get("schema_shares")
    if raw_shares is not None:
        if not isinstance(raw_shares, list) or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in raw_shares
        ):
            r.problem(
                _join(path, "schema_shares"),
                f"expected a list of schema counts (integers >= 0), got {_show(raw_shares)}",
            )
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
    return Rollout(
        batch_size=r.integer(m, "batch_size", path, 1, 1, 1000),
        batches=tuple(batches),
        health_timeout_s=r.number(m, "health_timeout_s", path, 60.0),
    )


def parse_inventory(raw: Any, source: str | None = None, base_dir: Path | None = None) -> Inventory:
    """Validate a raw (already YAML-decoded) inventory; raise InventoryError with all problems."""
    r = _Reader(base_dir)
    top = r.mapping(
        raw,
        "",
        (
            "site",
            "nodes",
            "load_balancers",
            "databases",
            "application",
            "approvers",
            "approver_keys",
            "rollout",
            "staging",
            "ox",
            "provisioning",
        ),
    )
    if not isinstance(raw, dict):
        raise InventoryError(r.problems, source)
    site = r.name(top, "site", "")
    nodes = _each(r, r.items(top, "nodes", "", required=True), "nodes", _parse_node)
    if "nodes" in top and isinstance(top["nodes"], list) and not top["nodes"]:
        r.problem("nodes", "needs at least one node")
    lbs = _each(r, r.items(top, "load_balancers", ""), "load_balancers", _parse_lb)
    dbs = _each(r, r.items(top, "databases", ""), "databases", _parse_db)
    app = (
        _parse_app(r, top["application"], "application")
        if top.get("application") is not None
        else Application(name="app")
    )
    rollout = _parse_rollout(r, top["rollout"], "rollout") if top.get("rollout") is not None else Rollout()
    staging = _parse_staging(r, top["staging"], "staging") if top.get("staging") is not None else None
    ox = _parse_ox(r, top["ox"], "ox") if top.get("ox") is not None else None
    provisioning = (
        _parse_provisioning(r, top["provisioning"], "provisioning")
        if top.get("provisioning") is not None
        else None
    )

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

    approver_keys = _parse_approver_keys(r, top.get("approver_keys"), approvers)

    # Cross-references: names are unique and every reference points at something real.
    _unique(r, [(f"nodes[{i}].name", n.name) for i, n in enumerate(nodes)], "node name")
    _unique(r, [(f"load_balancers[{i}].name", lb.name) for i, lb in enumerate(lbs)], "load balancer")
    _unique(r, [(f"databases[{i}].name", d.name) for i, d in enumerate(dbs)], "database")
    _unique(
        r,
        [(f"nodes[{i}].ssh", f"{n.ssh.host}:{n.ssh.port}") for i, n in enumerate(nodes) if n.ssh.host],
        "SSH endpoint",
    )
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
                r.problem(
                    "staging.database",
                    f"must differ from the production database databases[{i}].database ({d.database!r})",
                )
            elif staging.database == d.scratch_database:
                r.problem(
                    "staging.database",
                    f"must differ from databases[{i}].scratch_database "
                    f"({d.scratch_database!r}), which is dropped after each test",
                )
    if ox is not None:
        lb_by_name = {lb.name: lb for lb in lbs}
        for key in ("main_lb", "secondary_lb"):
            name = getattr(ox, key)
            if name and name not in lb_by_name:
                r.problem(
                    f"ox.{key}", f"unknown load balancer {name!r} (known: {', '.join(lb_by_name) or 'none'})"
                )
        if ox.main_lb and ox.main_lb == ox.secondary_lb:
            r.problem("ox.secondary_lb", "must differ from ox.main_lb (the upgraded nodes wait there)")
        for key in ("main_lb", "secondary_lb"):
            ox_lb = lb_by_name.get(getattr(ox, key))
            missing = sorted(node_names - set(ox_lb.members)) if ox_lb is not None else []
            for n in missing:
                r.problem(
                    f"ox.{key}",
                    f"node {n!r} is not a member of load balancer {getattr(ox, key)!r} "
                    "(every OX node moves between both)",
                )
    if rollout.batches:
        listed = [n for b in rollout.batches for n in b]
        if len(listed) != len(set(listed)):
            r.problem("rollout.batches", "a node appears in more than one batch")
        for n in sorted(node_names - set(listed)):
            r.problem("rollout.batches", f"node {n!r} is in no batch")

    if r.problems:
        raise InventoryError(r.problems, source)
    return Inventory(
        site=site,
        nodes=tuple(nodes),
        load_balancers=tuple(lbs),
        databases=tuple(dbs),
        application=app,
        approvers=approvers,
        approver_keys=approver_keys,
        rollout=rollout,
        source=source,
        staging=staging,
        ox=ox,
        provisioning=provisioning,
    )


def _parse_approver_keys(
    r: _Reader, raw: Any, approvers: dict[str, tuple[str, ...]]
) -> dict[str, tuple[str, ...]]:
    """approver name -> OpenSSH public key lines; once given, every approver needs one (a
    decision is signed by the decider's key: workflows/signatures.py verifies)."""
    if raw is None:
        return {}
    names = [str(k) for k in raw] if isinstance(raw, dict) else []
    m = r.mapping(raw, "approver_keys", names)
    keys: dict[str, tuple[str, ...]] = {}
    seen: dict[str, str] = {}
    for name, lines in m.items():
        path = f"approver_keys.{name}"
        if isinstance(lines, str):
            lines = [lines]
        if not isinstance(lines, list) or not lines or not all(isinstance(x, str) for x in lines):
            r.problem(path, f"expected an OpenSSH public key line or a list of them, got {_show(lines)}")
            continue
        for line in lines:
            try:
                fp = fingerprint(key_blob(line.strip()))
            except PublicKeyError as e:
                r.problem(path, str(e))
                continue
            if fp in seen and seen[fp] != name:
                r.problem(path, f"key {fp} is also {seen[fp]}'s: one key, one person")
            seen[fp] = str(name)
        keys[str(name)] = tuple(x.strip() for x in lines)
    if keys:
        for gate, people in approvers.items():
            for person in people:
                if person not in keys:
                    r.problem(
                        f"approvers.{gate}",
                        f"{person} has no key in approver_keys: every approver signs decisions with one",
                    )
    return keys


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
