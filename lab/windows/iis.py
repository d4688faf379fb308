"""IIS (the WebAdministration module) on the Windows stand-in, mapped onto the lab node.

Cmdlets: Microsoft Learn, WebAdministration module
(https://learn.microsoft.com/en-us/powershell/module/webadministration/), each below.

The mapping (README.md): the node's application pool IS the node's service (`./ctl` in the
node folder):
* Stop-WebAppPool returns at once; the pool is `Stopping` for STOPPING_S, then `Stopped`,
  while `./ctl stop` runs in the background: the worker process (run/app.pid, while alive)
  may still be finishing its requests - as IIS's w3wp.exe does within shutdownTimeLimit after
  WAS reports the pool Stopped. Hence a careful script waits for
  IIS:\\AppPools\\<pool>\\WorkerProcesses to be empty.
* Start-WebAppPool: `Starting` until `./ctl start` returns (the port accepts), then `Started`.
* Restart-WebAppPool (a recycle): `./ctl restart` in the background; the pool stays
  `Started`. IIS's overlapped recycle (the new worker starts before the old one stops) is not
  modelled: the node does not serve between the stop and the start.
* Otherwise the pool's state is `./ctl status` (0: Started, else Stopped).
* Errors: an unknown pool / site is the provider's "Cannot find path 'IIS:\\AppPools\\<name>'
  because it does not exist." reported as the underlying *-WebItem command (a public capture:
  "restart-webitem : Cannot find path 'IIS:\\AppPools\\OABAppPool' because it does not exist.
  ... [Restart-WebItem], ItemNotFoundException ... PathNotFound,Microsoft.IIs.PowerShell.
  Provider.RecycleItemCommand", Microsoft Q&A). Stopping a stopped pool or starting a started
  one: Microsoft.Web.Administration's COMException "The object identifier does not represent
  a valid object. (Exception from HRESULT: 0x800710D8)" (ApplicationPool.Stop/Start; seen in
  many public scripts that catch it around Start/Stop-WebAppPool).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lab.procs import read_pid
from lab.windows.drive import WinNode
from lab.windows.powershell import Call, Interp, Param, cmdlet
from lab.windows.psvalues import ErrorRecord, PSObject, as_list, to_str
from lab.windows.state import read_config, write_config

STOPPING_S = 0.3
HRESULT_INVALID_OBJECT = (
    "The object identifier does not represent a valid object. (Exception from HRESULT: 0x800710D8)"
)
PROVIDER = "Microsoft.IIs.PowerShell.Provider"


@dataclass
class Transition:
    kind: str  # stop | start | recycle
    since: float
    proc: subprocess.Popen[bytes]


_transitions: dict[tuple[str, str], Transition] = {}
_tlock = threading.Lock()


def forget_transitions() -> None:
    with _tlock:
        _transitions.clear()


def _ctl(node: WinNode, action: str, wait: bool) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["sh", "-c", f"./ctl {action}"],
        cwd=node.node_dir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    if wait:
        proc.wait(timeout=60)
    else:
        threading.Thread(target=proc.wait, daemon=True).start()  # reap it
    return proc


def service_running(node: WinNode) -> bool:
    if not (node.node_dir / "ctl").exists():
        return False
    try:
        r = subprocess.run(
            ["sh", "-c", "./ctl status"],
            cwd=node.node_dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=15,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def pool_state(node: WinNode, pool: dict[str, Any]) -> str:
    if not pool.get("service"):
        return str(pool.get("state", "Started"))
    key = (str(node.node_dir), str(pool["name"]).casefold())
    with _tlock:
        t = _transitions.get(key)
        if t is not None:
            done = t.proc.poll() is not None
            if t.kind == "stop":
                if time.monotonic() - t.since < STOPPING_S:
                    return "Stopping"
                if not done:
                    return "Stopped"
            elif not done:
                return "Starting" if t.kind == "start" else "Started"
            del _transitions[key]
    return "Started" if service_running(node) else "Stopped"


def worker_pids(node: WinNode, pool: dict[str, Any]) -> list[int]:
    """The pool's live worker processes: the node app's pid while it is alive."""
    if not pool.get("service"):
        return []
    pid = read_pid(node.node_dir / "run" / "app.pid")
    if pid is None:
        return []
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return []
    return [] if state in ("Z", "X") else [pid]


def _start_transition(node: WinNode, pool: dict[str, Any], kind: str) -> None:
    action = {"stop": "stop", "start": "start", "recycle": "restart"}[kind]
    key = (str(node.node_dir), str(pool["name"]).casefold())
    proc = _ctl(node, action, wait=False)
    with _tlock:
        _transitions[key] = Transition(kind, time.monotonic(), proc)


# --------------------------------------------------------------------------- lookups


def _find(items: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    for it in items:
        if str(it.get("name", "")).casefold() == name.casefold():
            return it
    return None


def _record(
    c: Call, message: str, head: str, category: str, reason: str, item_cmd: str, cls: str, **kw: Any
) -> ErrorRecord:
    rec = c.record(message, head, category, reason, activity=item_cmd, command_name=item_cmd.lower(), **kw)
    rec.fqid = f"{head},{PROVIDER}.{cls}"
    return rec


def _item_not_found(c: Call, path: str, item_cmd: str, cls: str) -> ErrorRecord:
    """The provider's "Cannot find path" as the *-WebItem command behind a cmdlet reports it."""
    return _record(
        c,
        f"Cannot find path '{path}' because it does not exist.",
        "PathNotFound",
        "ObjectNotFound",
        "ItemNotFoundException",
        item_cmd,
        cls,
        target_name=path,
        target_type="String",
        exception_type="System.Management.Automation.ItemNotFoundException",
    )


def _names(c: Call) -> list[str]:
    return [to_str(n) for n in as_list(c.get("Name"))]


def _pool_call(rt: Interp, c: Call, kind: str) -> Iterable[Any]:
    node = rt.env.node
    cfg = read_config(node)
    item_cmd, cls = {
        "start": ("Start-WebItem", "StartItemCommand"),
        "stop": ("Stop-WebItem", "StopItemCommand"),
        "recycle": ("Restart-WebItem", "RecycleItemCommand"),
    }[kind]
    names = _names(c) or [to_str(x.get("Name") if isinstance(x, PSObject) else x) for x in (c.input or [])]
    for name in names:
        pool = _find(cfg["pools"], name)
        path = f"IIS:\\AppPools\\{name}"
        if pool is None:
            c.write_error(_item_not_found(c, path, item_cmd, cls))
            continue
        state = pool_state(node, pool)
        invalid = (
            (kind == "stop" and state in ("Stopped", "Stopping"))
            or (kind == "start" and state in ("Started", "Starting"))
            or (kind == "recycle" and state != "Started")
        )
        if invalid:
            c.write_error(
                _record(
                    c,
                    HRESULT_INVALID_OBJECT,
                    "InvalidOperation",
                    "InvalidOperation",
                    "COMException",
                    item_cmd,
                    cls,
                    exception_type="System.Runtime.InteropServices.COMException",
                )
            )
            continue
        if pool.get("service"):
            _start_transition(node, pool, kind)
        else:
            pool["state"] = {"start": "Started", "stop": "Stopped", "recycle": "Started"}[kind]
            write_config(node, cfg)
    return []


NAME = Param("Name", position=0, type_text="System.String[]")


# https://learn.microsoft.com/en-us/powershell/module/webadministration/start-webapppool
@cmdlet("Start-WebAppPool", [NAME, Param("Passthru", switch=True)], pipeline=True, webadmin=True)
def start_web_app_pool(rt: Interp, c: Call) -> Iterable[Any]:
    return _pool_call(rt, c, "start")


# https://learn.microsoft.com/en-us/powershell/module/webadministration/stop-webapppool
@cmdlet("Stop-WebAppPool", [NAME, Param("Passthru", switch=True)], pipeline=True, webadmin=True)
def stop_web_app_pool(rt: Interp, c: Call) -> Iterable[Any]:
    return _pool_call(rt, c, "stop")


# https://learn.microsoft.com/en-us/powershell/module/webadministration/restart-webapppool
@cmdlet("Restart-WebAppPool", [NAME, Param("Passthru", switch=True)], pipeline=True, webadmin=True)
def restart_web_app_pool(rt: Interp, c: Call) -> Iterable[Any]:
    return _pool_call(rt, c, "recycle")


def _state_object(state: str) -> PSObject:
    return PSObject({"Value": state}, "Microsoft.IIs.PowerShell.Framework.ConfigurationAttribute")


# https://learn.microsoft.com/en-us/powershell/module/webadministration/get-webapppoolstate
@cmdlet("Get-WebAppPoolState", [NAME], pipeline=True, webadmin=True)
def get_web_app_pool_state(rt: Interp, c: Call) -> Iterable[Any]:
    node = rt.env.node
    cfg = read_config(node)
    names = _names(c) or [str(p["name"]) for p in cfg["pools"]]
    for name in names:
        pool = _find(cfg["pools"], name)
        if pool is None:
            path = f"IIS:\\AppPools\\{name}"
            c.write_error(
                _record(
                    c,
                    f"Cannot find path '{path}' because it does not exist.",
                    "PathNotFound",
                    "ObjectNotFound",
                    "ItemNotFoundException",
                    "Get-WebItemState",
                    "GetItemStateCommand",
                    target_name=path,
                    target_type="String",
                    exception_type="System.Management.Automation.ItemNotFoundException",
                )
            )
            continue
        yield _state_object(pool_state(node, pool))


def _site_object(node: WinNode, site: dict[str, Any]) -> PSObject:
    bindings = [
        PSObject(
            {"protocol": b["protocol"], "bindingInformation": b["bindingInformation"]},
            "Microsoft.IIs.PowerShell.Framework.ConfigurationElement",
            f"{b['protocol']} {b['bindingInformation']}",
        )
        for b in site.get("bindings", [])
    ]
    return PSObject(
        {
            "name": site["name"],
            "id": site["id"],
            "state": site.get("state", "Started"),
            "physicalPath": site["physicalPath"],
            "applicationPool": site.get("applicationPool", ""),
            "bindings": PSObject(
                {"Collection": bindings},
                "Microsoft.IIs.PowerShell.Framework.ConfigurationElement",
                " ".join(to_str(b) for b in bindings),
            ),
            "serverAutoStart": True,
            "enabledProtocols": "http",
            "ItemXPath": f"/system.applicationHost/sites/site[@name='{site['name']}' and @id='{site['id']}']",
        },
        "Microsoft.IIs.PowerShell.Framework.ConfigurationElement#site",
    )


# https://learn.microsoft.com/en-us/powershell/module/webadministration/get-website
@cmdlet("Get-Website", [Param("Name", position=0)], webadmin=True)
def get_website(rt: Interp, c: Call) -> Iterable[Any]:
    node = rt.env.node
    name = c.get("Name")
    for site in read_config(node)["sites"]:
        if name is None or str(site["name"]).casefold() == to_str(name).casefold():
            yield _site_object(node, site)


def _site_call(rt: Interp, c: Call, state: str) -> Iterable[Any]:
    node = rt.env.node
    cfg = read_config(node)
    item_cmd, cls = (
        ("Start-WebItem", "StartItemCommand") if state == "Started" else ("Stop-WebItem", "StopItemCommand")
    )
    for name in _names(c):
        site = _find(cfg["sites"], name)
        if site is None:
            path = f"IIS:\\Sites\\{name}"
            c.write_error(_item_not_found(c, path, item_cmd, cls))
            continue
        site["state"] = state
    write_config(node, cfg)
    return []


# https://learn.microsoft.com/en-us/powershell/module/webadministration/start-website
@cmdlet("Start-Website", [NAME, Param("Passthru", switch=True)], webadmin=True)
def start_website(rt: Interp, c: Call) -> Iterable[Any]:
    return _site_call(rt, c, "Started")


# https://learn.microsoft.com/en-us/powershell/module/webadministration/stop-website
@cmdlet("Stop-Website", [NAME, Param("Passthru", switch=True)], webadmin=True)
def stop_website(rt: Interp, c: Call) -> Iterable[Any]:
    return _site_call(rt, c, "Stopped")


# https://learn.microsoft.com/en-us/powershell/module/webadministration/get-websitestate
@cmdlet("Get-WebsiteState", [NAME], webadmin=True)
def get_website_state(rt: Interp, c: Call) -> Iterable[Any]:
    cfg = read_config(rt.env.node)
    for name in _names(c) or [str(s["name"]) for s in cfg["sites"]]:
        site = _find(cfg["sites"], name)
        if site is not None:
            yield _state_object(str(site.get("state", "Started")))


# https://learn.microsoft.com/en-us/powershell/module/webadministration/get-webapplication
# Lists the applications below the sites' roots (a site's "/" application is not one).
@cmdlet("Get-WebApplication", [Param("Name", position=0), Param("Site")], webadmin=True)
def get_web_application(rt: Interp, c: Call) -> Iterable[Any]:
    cfg = read_config(rt.env.node)
    name, site = c.get("Name"), c.get("Site")
    for app in cfg.get("applications", []):
        path = str(app["path"])
        if name is not None and path.strip("/").casefold() != to_str(name).strip("/").casefold():
            continue
        if site is not None and str(app.get("site", "")).casefold() != to_str(site).casefold():
            continue
        yield PSObject(
            {
                "path": path,
                "applicationPool": app.get("applicationPool", ""),
                "physicalPath": app.get("physicalPath", ""),
                "enabledProtocols": "http",
                "ItemXPath": f"/system.applicationHost/sites/site[@name='{app.get('site', '')}' and @id='1']"
                f"/application[@path='{path}']",
            },
            "Microsoft.IIs.PowerShell.Framework.ConfigurationElement#site#application",
        )


# --------------------------------------------------------------------------- the IIS: drive


def iis_path_parts(path: str) -> list[str]:
    rest = path.split(":", 1)[1] if ":" in path else path
    return [p for p in rest.replace("/", "\\").split("\\") if p]


def iis_get_item_property(rt: Interp, c: Call, path: str, names: list[str]) -> list[Any]:
    """Get-ItemProperty IIS:\\AppPools\\<pool> -Name x / IIS:\\Sites\\<site> -Name x: the
    IIS provider returns the attribute's value itself for a simple attribute (not an object
    with a property named like it, as the FileSystem provider does)."""
    node = rt.env.node
    cfg = read_config(node)
    parts = iis_path_parts(path)
    item = _iis_item(cfg, parts)
    if item is None:
        raise c.terminate(_path_not_found(c, path))
    out: list[Any] = []
    for n in names:
        low = n.casefold()
        if parts[0].casefold() == "apppools" and low == "state":
            out.append(pool_state(node, item))
            continue
        for k, v in item.items():
            if k.casefold() == low:
                out.append(v)
                break
        else:
            if names:
                rec = c.record(
                    f"Property {n} is not found on {path}.",
                    "PropertyNotFound",
                    "InvalidArgument",
                    "PSArgumentException",
                    target_name=n,
                    target_type="String",
                )
                c.write_error(rec)
    if not names:
        out.append(PSObject({k: v for k, v in item.items() if k not in ("service",)}))
    return out


def iis_set_item_property(rt: Interp, c: Call, path: str, name: str, value: Any) -> None:
    node = rt.env.node
    cfg = read_config(node)
    parts = iis_path_parts(path)
    item = _iis_item(cfg, parts)
    if item is None:
        raise c.terminate(_path_not_found(c, path))
    for k in list(item):
        if k.casefold() == name.casefold():
            item[k] = to_str(value) if not isinstance(value, int | bool) else value
            break
    else:
        item[name] = to_str(value)
    write_config(node, cfg)


def iis_children(rt: Interp, c: Call, path: str) -> list[Any]:
    node = rt.env.node
    cfg = read_config(node)
    parts = iis_path_parts(path)
    low = [p.casefold() for p in parts]
    if low == ["apppools"]:
        return [
            PSObject(
                {
                    "name": p["name"],
                    "state": pool_state(node, p),
                    "managedPipelineMode": p.get("managedPipelineMode", "Integrated"),
                    "managedRuntimeVersion": p.get("managedRuntimeVersion", "v4.0"),
                }
            )
            for p in cfg["pools"]
        ]
    if low == ["sites"]:
        return [_site_object(node, s) for s in cfg["sites"]]
    if len(low) == 3 and low[0] == "apppools" and low[2] == "workerprocesses":
        pool = _find(cfg["pools"], parts[1])
        if pool is None:
            raise c.terminate(_path_not_found(c, path))
        return [
            PSObject(
                {
                    "processId": pid,
                    "Handles": 0,
                    "state": "Running",
                    "StartTime": None,
                    "appPoolName": pool["name"],
                },
                "Microsoft.IIs.PowerShell.Framework.ConfigurationElement#WorkerProcess",
            )
            for pid in worker_pids(node, pool)
        ]
    item = _iis_item(cfg, parts)
    if item is None:
        raise c.terminate(_path_not_found(c, path))
    if low[0] == "apppools" and len(low) == 2:
        return [PSObject({"Name": "WorkerProcesses"})]
    return []


def iis_exists(rt: Interp, path: str) -> bool:
    cfg = read_config(rt.env.node)
    parts = iis_path_parts(path)
    low = [p.casefold() for p in parts]
    if low in ([], ["apppools"], ["sites"]):
        return True
    if len(low) == 3 and low[0] == "apppools" and low[2] == "workerprocesses":
        return _find(cfg["pools"], parts[1]) is not None
    return _iis_item(cfg, parts) is not None


def _iis_item(cfg: dict[str, Any], parts: list[str]) -> dict[str, Any] | None:
    if len(parts) != 2:
        return None
    kind = parts[0].casefold()
    if kind == "apppools":
        return _find(cfg["pools"], parts[1])
    if kind == "sites":
        return _find(cfg["sites"], parts[1])
    return None


def _path_not_found(c: Call, path: str) -> ErrorRecord:
    return c.record(
        f"Cannot find path '{path}' because it does not exist.",
        "PathNotFound",
        "ObjectNotFound",
        "ItemNotFoundException",
        target_name=path,
        target_type="String",
        exception_type="System.Management.Automation.ItemNotFoundException",
    )


# --------------------------------------------------------------------------- the W3SVC service


SERVICES = {
    "w3svc": ("W3SVC", "World Wide Web Publishing Service"),
    "was": ("WAS", "Windows Process Activation Service"),
    "sshd": ("sshd", "OpenSSH SSH Server"),
}


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.management/get-service
@cmdlet("Get-Service", [Param("Name", position=0, type_text="System.String[]")], aliases=("gsv",))
def get_service(rt: Interp, c: Call) -> Iterable[Any]:
    names = _names(c) or [v[0] for v in SERVICES.values()]
    for name in names:
        svc = SERVICES.get(name.casefold())
        if svc is None:
            c.write_error(
                c.record(
                    f"Cannot find any service with service name '{name}'.",
                    "NoServiceFoundForGivenName",
                    "ObjectNotFound",
                    "ServiceCommandException",
                    target_name=name,
                    target_type="String",
                    exception_type="Microsoft.PowerShell.Commands.ServiceCommandException",
                )
            )
            continue
        yield PSObject(
            {"Status": "Running", "Name": svc[0], "DisplayName": svc[1]},
            "System.ServiceProcess.ServiceController",
            svc[0],
        )


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.management/restart-service
# Restarting W3SVC restarts IIS's worker processes: in the stand-in `./ctl restart` (waited for).
@cmdlet(
    "Restart-Service", [Param("Name", position=0, type_text="System.String[]"), Param("Force", switch=True)]
)
def restart_service(rt: Interp, c: Call) -> Iterable[Any]:
    for name in _names(c):
        if name.casefold() not in SERVICES:
            c.write_error(
                c.record(
                    f"Cannot find any service with service name '{name}'.",
                    "NoServiceFoundForGivenName",
                    "ObjectNotFound",
                    "ServiceCommandException",
                    target_name=name,
                    target_type="String",
                    exception_type="Microsoft.PowerShell.Commands.ServiceCommandException",
                )
            )
            continue
        if name.casefold() in ("w3svc", "was") and (rt.env.node.node_dir / "ctl").exists():
            forget_transitions()
            _ctl(rt.env.node, "restart", wait=True)
    return []


def pid_exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")
