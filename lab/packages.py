"""The lab's release packages, built from lab/app/.

`build_packages(cfg)` writes cfg.package(1), (2) and (3): zips with `release.json` at the
root (ARCHITECTURE.md "Release packages"), the shared `app.py` and `static/`, and each
release's overlay from `lab/app/releases/v<major>/` (default web.config, index.html, v2's
migrations). Per-site / per-node files (encryption.config, database.config, admin.config)
are never in a package: lab/nodes.py writes them at install time.

`requires` lists the versions that must have been installed before (Secret Server's
Version Guard): 3.0.0 (same code and schema as 2.0.0) cannot be installed over 1.0.0.

The zips are deterministic (sorted entries, fixed timestamps and permissions), so
rebuilding gives identical bytes and a package's sha256 identifies its content.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

from lab.config import DB_PROFILES, LabConfig

APP_SRC = Path(__file__).resolve().parent / "app"
# 1980-01-01 is the earliest date a zip entry can carry.
_EPOCH = (1980, 1, 1, 0, 0, 0)

RELEASES: dict[int, dict[str, Any]] = {
    1: {
        "name": "labapp",
        "version": "1.0.0",
        "min_upgrade_from": "0.0.0",
        "requires": [],
        "schema_version": 1,
        "migrations": [],
    },
    2: {
        "name": "labapp",
        "version": "2.0.0",
        "min_upgrade_from": "1.0.0",
        "requires": [],
        "schema_version": 2,
        "migrations": [
            {
                "version": 2,
                "up": "migrations/002_up.sql",
                "down": "migrations/002_down.sql",
                "destructive": False,
            }
        ],
    },
    3: {
        "name": "labapp",
        "version": "3.0.0",
        "min_upgrade_from": "2.0.0",
        "requires": ["2.0.0"],
        "schema_version": 2,
        "migrations": [],
    },
}


def _skip(p: Path) -> bool:
    return "__pycache__" in p.parts or p.suffix in (".pyc", ".pyo") or p.name.startswith(".")


# The package variants: one per database profile, and Secret Server's stack (SQL Server, and
# the .NET-style XML web.config: `web_config_xml`).
VARIANTS = (*DB_PROFILES, "secret-server")


def release(major: int, db: str = "mariadb") -> dict[str, Any]:
    """release.json of `major` for a site on `db`: the SQL Server profile's packages carry
    the T-SQL scripts (migrations/mssql/) and say so (`"database": "mssql"`)."""
    data = json.loads(json.dumps(RELEASES[major]))
    if db in ("mssql", "secret-server"):
        data["database"] = "mssql"
        for m in data["migrations"]:
            for key in ("up", "down"):
                if m.get(key):
                    m[key] = m[key].replace("migrations/", "migrations/mssql/", 1)
    return data


def package_files(major: int, db: str = "mariadb") -> dict[str, bytes]:
    """Archive name -> content of release `major` (a key of RELEASES) for a site on `db`."""
    if major not in RELEASES:
        raise ValueError(f"no lab release {major} (known: {sorted(RELEASES)})")
    files: dict[str, bytes] = {}
    overlay = APP_SRC / "releases" / f"v{major}"
    for base in (APP_SRC, overlay):  # the overlay wins where both have a file
        for p in sorted(base.rglob("*")):
            rel = p.relative_to(base)
            if p.is_file() and not _skip(rel) and (base != APP_SRC or rel.parts[0] != "releases"):
                if rel.parts[0] == "migrations" and (rel.parts[1] == "mssql") != (db != "mariadb"):
                    continue  # each package carries its own database's scripts only
                files[rel.as_posix()] = p.read_bytes()
    if db == "secret-server":
        files["web.config"] = web_config_xml(files["web.config"].decode("utf-8")).encode("utf-8")
    files["release.json"] = (json.dumps(release(major, db), indent=2) + "\n").encode()
    return files


def _xml_attr(v: str) -> str:
    return v.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


# The package's connection strings (a .NET config's <connectionStrings>): nodes point the
# audit log elsewhere (lab/nodes.py), a customisation the XML merge must carry by name.
DEFAULT_CONNECTION_STRINGS = {"AuditLog": "Data Source=logs\\audit.log;Mode=Append"}


def web_config_xml(kv_text: str, connection_strings: dict[str, str] | None = None) -> str:
    """A `key = value` web.config as the XML a .NET application keeps (Microsoft Learn,
    "appSettings element", "connectionStrings element"): every key an <add key= value= /> of
    <appSettings>, comments kept as an XML comment, the connection strings after them, and a
    <system.webServer> section the merge must leave exactly as the package has it."""
    comments = [ln.lstrip("# ").rstrip() for ln in kv_text.splitlines() if ln.startswith("#")]
    settings = [
        (k.strip(), v.strip())
        for k, _, v in (ln.partition("=") for ln in kv_text.splitlines())
        if _ and k.strip() and not k.lstrip().startswith("#")
    ]
    conns = DEFAULT_CONNECTION_STRINGS if connection_strings is None else connection_strings
    lines = ['<?xml version="1.0" encoding="utf-8"?>', "<!--", *(f"  {c}" for c in comments), "-->"]
    lines += ["<configuration>", "  <appSettings>"]
    lines += [f'    <add key="{_xml_attr(k)}" value="{_xml_attr(v)}" />' for k, v in settings]
    lines += ["  </appSettings>", "  <connectionStrings>"]
    lines += [
        f'    <add name="{_xml_attr(n)}" connectionString="{_xml_attr(c)}" providerName="labapp.FileLog" />'
        for n, c in conns.items()
    ]
    lines += [
        "  </connectionStrings>",
        "  <system.webServer>",
        '    <handlers><add name="labapp" path="*" verb="*" modules="httpPlatformHandler" /></handlers>',
        '    <httpPlatform processPath="python" arguments="app.py" stdoutLogEnabled="false" />',
        "  </system.webServer>",
        "</configuration>",
    ]
    return "\r\n".join(lines) + "\r\n"


def read_web_config_xml(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """(appSettings key -> value, connectionStrings name -> connectionString) of an XML config."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(text.lstrip("\ufeff"))
    settings = {e.get("key", ""): e.get("value", "") for e in root.findall("./appSettings/add")}
    conns = {
        e.get("name", ""): e.get("connectionString", "") for e in root.findall("./connectionStrings/add")
    }
    return settings, conns


def zip_bytes(files: dict[str, bytes]) -> bytes:
    """Deterministic zip of `files` (sorted, fixed dates, 0644)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.external_attr = 0o100644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # unix, so the permission bits are honoured
            z.writestr(info, files[name], compresslevel=9)
    return buf.getvalue()


def build_packages(cfg: LabConfig) -> dict[int, Path]:
    """Write cfg.package(major, db) for every release and database profile; files already
    holding the same bytes are left untouched (their mtime too). Returns {major: path} of the
    MariaDB profile's (what nodes are installed from: the app files are the same)."""
    cfg.packages_dir.mkdir(parents=True, exist_ok=True)
    out: dict[int, Path] = {}
    for major in sorted(RELEASES):
        for db in VARIANTS:
            _write_if_changed(cfg.package(major, db), zip_bytes(package_files(major, db)))
        out[major] = cfg.package(major, "mariadb")
    return out


def _write_if_changed(path: Path, data: bytes) -> None:
    if not path.exists() or path.read_bytes() != data:
        tmp = path.with_suffix(".zip.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)  # atomic: a reader never sees half a zip


def release_of(package: Path) -> dict[str, Any]:
    """The parsed release.json of a package zip."""
    with zipfile.ZipFile(package) as z:
        data: dict[str, Any] = json.loads(z.read("release.json"))
    return data
