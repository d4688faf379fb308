"""Facts a procedure's prerequisites are judged on, read from the site itself (read-only).

Secret Server's upgrade prerequisites (seed 001's "Important" boxes, issue 20) name facts of
the web nodes and the database server: the Windows version, the .NET Framework 4.x release,
the app pool's pipeline mode, the SQL Server version. `read_node_facts` reads a node's in one
PowerShell script (a Linux node has none of them: its facts say so and a rule records "not
applicable"); `read_database_version` asks the database server.

Where each fact comes from (Microsoft Learn):
  * Win32_OperatingSystem's `Version` ("10.0.17763") and `Caption`, through Get-CimInstance;
  * the .NET Framework 4.5+ `Release` DWORD under
    HKLM:\\SOFTWARE\\Microsoft\\NET Framework Setup\\NDP\\v4\\Full ("How to: Determine which
    .NET Framework versions are installed"; 378675 and above is 4.5.1);
  * the app pool's `managedPipelineMode` (Integrated | Classic) through the IIS: drive;
  * SERVERPROPERTY('ProductVersion') on SQL Server ("11.0..." is SQL Server 2012), VERSION()
    on MariaDB / MySQL.
"""

from __future__ import annotations

from dataclasses import dataclass

from temporalio import activity

from activities import powershell
from activities.common import fail
from errors import SSH_COMMAND_FAILED
from inventory.model import Database, Node


@dataclass(frozen=True)
class NodeFacts:
    node_name: str
    os: str  # linux | windows
    # Windows only ("" / 0 where the node has no such fact).
    os_version: str = ""
    os_caption: str = ""
    dotnet_release: int = 0
    pipeline_mode: str = ""  # the app pool's managedPipelineMode (IIS service only)


@dataclass(frozen=True)
class NodeFactsRequest:
    node: Node


def node_facts_script(app_pool: str | None) -> str:
    """`key=value` lines: os_version, os_caption, dotnet_release (when 4.5+ is there),
    pipeline_mode (when the node's service is an IIS app pool)."""
    script = (
        "$os = Get-CimInstance -ClassName Win32_OperatingSystem; "
        "Write-Output ('os_version=' + $os.Version); Write-Output ('os_caption=' + $os.Caption); "
        "$net = Get-ItemProperty 'HKLM:\\SOFTWARE\\Microsoft\\NET Framework Setup\\NDP\\v4\\Full' "
        "-ErrorAction SilentlyContinue; "
        "if ($net) { Write-Output ('dotnet_release=' + $net.Release) }; "
    )
    if app_pool:
        script += (
            "Import-Module WebAdministration; "
            f"Write-Output ('pipeline_mode=' + (Get-ItemProperty ('IIS:\\AppPools\\' + "
            f"{powershell.quote(app_pool)}) -Name managedPipelineMode))"
        )
    return script


def parse_facts(node: Node, text: str) -> NodeFacts:
    values = dict(line.partition("=")[::2] for line in text.splitlines() if "=" in line)
    try:
        release = int(values.get("dotnet_release", "0") or "0")
    except ValueError:
        fail(
            SSH_COMMAND_FAILED, f"node {node.name}: unexpected .NET release {values['dotnet_release'][:50]!r}"
        )
    return NodeFacts(
        node_name=node.name,
        os="windows",
        os_version=values.get("os_version", "").strip(),
        os_caption=values.get("os_caption", "").strip(),
        dotnet_release=release,
        pipeline_mode=values.get("pipeline_mode", "").strip(),
    )


@activity.defn
async def read_node_facts(req: NodeFactsRequest) -> NodeFacts:
    """The node's prerequisite facts; a Linux node's are just its OS."""
    node = req.node
    if node.os != "windows":
        return NodeFacts(node_name=node.name, os=node.os)
    pool = node.service.app_pool if node.service.kind == "iis" else None
    res = await powershell.run(
        node.ssh, node_facts_script(pool), what=f"reading {node.name}'s facts", timeout_s=60
    )
    return parse_facts(node, res.stdout)


@dataclass(frozen=True)
class DatabaseFacts:
    kind: str  # mysql | mssql
    version: str  # the server's own version string: "16.0.1000.6", "10.11.6-MariaDB-0+deb12u1"


@dataclass(frozen=True)
class DatabaseFactsRequest:
    db: Database


@activity.defn
async def read_database_version(req: DatabaseFactsRequest) -> DatabaseFacts:
    """The database server's version (SQL Server's ProductVersion, MariaDB's VERSION())."""
    db = req.db
    if db.kind == "mssql":
        from activities.mssql import connect as mssql

        rows = await mssql.query(db, "SELECT CAST(SERVERPROPERTY('ProductVersion') AS nvarchar(128))")
    else:
        from activities.mysql import connect as mysql

        rows = await mysql.query(db, "SELECT VERSION()")
    return DatabaseFacts(kind=db.kind, version=str(rows[0][0]) if rows and rows[0] else "")
