"""The cmdlets of the PowerShell stand-in (IIS ones in iis.py). Each follows its Microsoft
Learn page (URL above it, Windows PowerShell 5.1 view); messages are PowerShell's resource
strings (PowerShell/PowerShell src/*/resources/*.resx) unless a comment names another source.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import socket
import stat
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lab.windows.drive import DriveError
from lab.windows.iis import (
    iis_children,
    iis_exists,
    iis_get_item_property,
    iis_set_item_property,
)
from lab.windows.powershell import COMMANDS, Call, Interp, Param, PSError, cmdlet
from lab.windows.psvalues import (
    ANSI,
    UTF8,
    ErrorRecord,
    FileItem,
    Hashtable,
    PathInfo,
    PSObject,
    ScriptBlock,
    as_list,
    compare_scalar,
    file_item_props,
    has_wildcard,
    json_compress,
    json_pretty,
    to_bool,
    to_int,
    to_json_tree,
    to_number,
    to_str,
    unroll,
    wildcard_regex,
)
from lab.windows.state import read_config

FS = "Microsoft.PowerShell.Commands"

# --------------------------------------------------------------------------- output


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.utility/write-output?view=powershell-5.1
@cmdlet(
    "Write-Output",
    [
        Param("InputObject", position=0, remaining=True, type_text="System.Management.Automation.PSObject[]"),
        Param("NoEnumerate", switch=True),
    ],
    pipeline=True,
    aliases=("echo", "write"),
)
def write_output(rt: Interp, c: Call) -> Iterable[Any]:
    if c.input is not None and not c.has("InputObject"):
        return list(c.input)
    values = c.get("InputObject")
    if values is None:
        return []
    out: list[Any] = []
    for v in values if isinstance(values, list) else [values]:
        out.extend([None] if v is None else as_list(v) if not c.switch("NoEnumerate") else [v])
    return out


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.utility/write-host?view=powershell-5.1
@cmdlet(
    "Write-Host",
    [
        Param("Object", position=0, remaining=True),
        Param("NoNewline", switch=True),
        Param("Separator"),
        Param("ForegroundColor"),
        Param("BackgroundColor"),
    ],
    pipeline=True,
)
def write_host(rt: Interp, c: Call) -> Iterable[Any]:
    values = c.get("Object")
    if values is None and c.input:
        values = c.input
    sep = to_str(c.get("Separator")) if c.has("Separator") else " "
    text = sep.join(to_str(v) for v in as_list(values)) if isinstance(values, list) else to_str(values)
    rt.host.write(text if c.switch("NoNewline") else text + "\r\n")
    return []


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.utility/write-error?view=powershell-5.1
# At the top level the record's header is the Write-Error statement itself and there is no
# position message (the 5.1 view; e.g. "write-error -message $PSItem : Error: out of disk
# space" in about_Switch, Microsoft Learn).
@cmdlet(
    "Write-Error",
    [
        Param("Message", position=0),
        Param("Category"),
        Param("ErrorId"),
        Param("TargetObject"),
        Param("Exception"),
        Param("ErrorRecord"),
    ],
    pipeline=True,
)
def write_error(rt: Interp, c: Call) -> Iterable[Any]:
    given = c.get("ErrorRecord")
    if isinstance(given, ErrorRecord):
        c.write_error(given)
        return []
    msg = to_str(c.get("Message") if c.has("Message") else c.get("Exception"))
    if c.input and not c.has("Message"):
        msg = to_str(unroll(c.input))
    fqid = (
        to_str(c.get("ErrorId")) if c.has("ErrorId") else "Microsoft.PowerShell.Commands.WriteErrorException"
    )
    rec = ErrorRecord(
        message=msg,
        fqid=fqid,
        category=to_str(c.get("Category")) if c.has("Category") else "NotSpecified",
        reason="WriteErrorException",
        activity="Write-Error",
        exception_type="Microsoft.PowerShell.Commands.WriteErrorException",
        header=rt.script[c.node.start : c.node.end],
        position=False,
        target_object=c.get("TargetObject"),
    )
    rt.locate(rec, c.node, c.invoked_as)
    c.write_error(rec)
    return []


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.utility/write-warning?view=powershell-5.1
# The console host shows "WARNING: <text>"; with CLIXML errors the host serializes it as a
# "warning" string (ConsoleHostUserInterface.WriteWarningLine) - see README.
@cmdlet("Write-Warning", [Param("Message", position=0)], pipeline=True)
def write_warning(rt: Interp, c: Call) -> Iterable[Any]:
    msg = to_str(c.get("Message") if c.has("Message") else unroll(c.input or []))
    if to_str(rt.get_var("WarningPreference")).lower() in ("silentlycontinue", "ignore"):
        return []
    if rt.host.clixml:
        rt.host.error_lines(["WARNING: " + msg], stream="warning")
    else:
        rt.host.write_line("WARNING: " + msg)
    return []


@cmdlet("Write-Verbose", [Param("Message", position=0)], pipeline=True)
def write_verbose(rt: Interp, c: Call) -> Iterable[Any]:
    if c.switch("Verbose") or to_str(rt.get_var("VerbosePreference")).lower() == "continue":
        rt.host.write_line("VERBOSE: " + to_str(c.get("Message")))
    return []


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.core/out-null?view=powershell-5.1
@cmdlet("Out-Null", [Param("InputObject")], pipeline=True)
def out_null(rt: Interp, c: Call) -> Iterable[Any]:
    return []


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.utility/out-string?view=powershell-5.1
@cmdlet("Out-String", [Param("InputObject"), Param("Stream", switch=True), Param("Width")], pipeline=True)
def out_string(rt: Interp, c: Call) -> Iterable[Any]:
    from lab.windows.psvalues import format_items

    items = c.input if c.input is not None else as_list(c.get("InputObject"))
    lines = format_items(items)
    if c.switch("Stream"):
        return lines
    return ["".join(line + "\r\n" for line in lines)]


# --------------------------------------------------------------------------- pipeline helpers


def _items(c: Call) -> list[Any]:
    if c.input is not None:
        return c.input
    v = c.get("InputObject")
    return as_list(v)


def _prop(rt: Interp, obj: Any, name: str) -> Any:
    return rt.get_member(obj, name)


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.core/where-object?view=powershell-5.1
@cmdlet(
    "Where-Object",
    [
        Param("FilterScript", position=0),
        Param("Property", position=0),
        Param("Value", position=1),
        Param("InputObject"),
        Param("EQ", switch=True),
        Param("NE", switch=True),
        Param("Like", switch=True),
        Param("Match", switch=True),
        Param("GT", switch=True),
        Param("LT", switch=True),
    ],
    pipeline=True,
    aliases=("where", "?"),
)
def where_object(rt: Interp, c: Call) -> Iterable[Any]:
    script = c.get("FilterScript")
    saved = rt.get_var("_")
    out: list[Any] = []
    try:
        for item in _items(c):
            if isinstance(script, ScriptBlock):
                if to_bool(unroll(rt.run_scriptblock(script, item, set_under=True))):
                    out.append(item)
            else:
                prop = to_str(script)
                v = _prop(rt, item, prop)
                ops = [op for op in ("eq", "ne", "like", "match", "gt", "lt") if c.switch(op)]
                if not ops:
                    if to_bool(v):
                        out.append(item)
                elif ops[0] == "match":
                    if rt.binary("match", v, c.get("Value"), c.node):
                        out.append(item)
                elif compare_scalar(ops[0], v, c.get("Value"), False):
                    out.append(item)
    finally:
        rt.set_var("_", saved)
    return out


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.core/foreach-object?view=powershell-5.1
@cmdlet(
    "ForEach-Object",
    [
        Param("Process", position=0, remaining=True),
        Param("Begin"),
        Param("End"),
        Param("MemberName", position=0),
        Param("InputObject"),
    ],
    pipeline=True,
    aliases=("foreach", "%"),
)
def foreach_object(rt: Interp, c: Call) -> Iterable[Any]:
    blocks = as_list(c.get("Process"))
    saved = rt.get_var("_")
    out: list[Any] = []
    try:
        if isinstance(c.get("Begin"), ScriptBlock):
            out.extend(rt.run_scriptblock(c.get("Begin"), None))
        for item in _items(c):
            for b in blocks:
                if isinstance(b, ScriptBlock):
                    out.extend(rt.run_scriptblock(b, item, set_under=True))
                else:
                    out.extend(as_list(_prop(rt, item, to_str(b))))
        if isinstance(c.get("End"), ScriptBlock):
            out.extend(rt.run_scriptblock(c.get("End"), None))
    finally:
        rt.set_var("_", saved)
    return out


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.utility/select-object?view=powershell-5.1
@cmdlet(
    "Select-Object",
    [
        Param("Property", position=0, type_text="System.Object[]"),
        Param("ExpandProperty"),
        Param("First", type_text="System.Int32"),
        Param("Last", type_text="System.Int32"),
        Param("Skip", type_text="System.Int32"),
        Param("Unique", switch=True),
        Param("InputObject"),
    ],
    pipeline=True,
    aliases=("select",),
)
def select_object(rt: Interp, c: Call) -> Iterable[Any]:
    items = _items(c)
    if c.has("Skip"):
        items = items[to_int(c.get("Skip")) :]
    if c.has("First"):
        items = items[: to_int(c.get("First"))]
    if c.has("Last"):
        n = to_int(c.get("Last"))
        items = items[-n:] if n else []
    if c.switch("Unique"):
        uniq: list[Any] = []
        for x in items:
            if not any(compare_scalar("eq", y, x, True) for y in uniq):
                uniq.append(x)
        items = uniq
    if c.has("ExpandProperty"):
        name = to_str(c.get("ExpandProperty"))
        out: list[Any] = []
        for x in items:
            has = isinstance(x, PSObject | Hashtable | FileItem) and _prop_exists(x, name)
            if not has and not (isinstance(x, Any) and _prop(rt, x, name) is not None):
                c.write_error(
                    c.record(
                        f'Property "{name}" cannot be found.',
                        "ExpandPropertyNotFound",
                        "InvalidArgument",
                        "PSArgumentException",
                        target_name=to_str(x),
                        target_type=type(x).__name__,
                    )
                )
                continue
            out.extend(as_list(_prop(rt, x, name)))
        return out
    if c.has("Property"):
        props = as_list(c.get("Property"))
        out = []
        for x in items:
            o = PSObject({}, "Selected." + ("System.Management.Automation.PSCustomObject"))
            for p in props:
                if isinstance(p, Hashtable):
                    name = to_str(p["Name"] if "Name" in p else p["Label"] if "Label" in p else p["n"])
                    expr = p["Expression"] if "Expression" in p else p["e"]
                    if isinstance(expr, ScriptBlock):
                        saved = rt.get_var("_")
                        try:
                            o.set(name, unroll(rt.run_scriptblock(expr, x, set_under=True)))
                        finally:
                            rt.set_var("_", saved)
                    else:
                        o.set(name, _prop(rt, x, to_str(expr)))
                else:
                    o.set(to_str(p), _prop(rt, x, to_str(p)))
            out.append(o)
        return out
    return items


def _prop_exists(x: Any, name: str) -> bool:
    if isinstance(x, PSObject):
        return x.has(name)
    if isinstance(x, Hashtable):
        return name in x
    if isinstance(x, FileItem):
        return any(k.lower() == name.lower() for k, _ in file_item_props(x))
    return False


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.utility/sort-object?view=powershell-5.1
@cmdlet(
    "Sort-Object",
    [
        Param("Property", position=0),
        Param("Descending", switch=True),
        Param("Unique", switch=True),
        Param("InputObject"),
    ],
    pipeline=True,
    aliases=("sort",),
)
def sort_object(rt: Interp, c: Call) -> Iterable[Any]:
    import functools

    items = list(_items(c))
    props = as_list(c.get("Property"))

    def key_of(x: Any) -> list[Any]:
        if not props:
            return [x]
        keys = []
        for p in props:
            if isinstance(p, ScriptBlock):
                saved = rt.get_var("_")
                try:
                    keys.append(unroll(rt.run_scriptblock(p, x, set_under=True)))
                finally:
                    rt.set_var("_", saved)
            else:
                keys.append(_prop(rt, x, to_str(p)))
        return keys

    def cmp(a: Any, b: Any) -> int:
        for ka, kb in zip(key_of(a), key_of(b), strict=True):
            if ka is None and kb is None:
                continue
            if ka is None:
                return -1
            if kb is None:
                return 1
            try:
                if compare_scalar("lt", ka, kb, False):
                    return -1
                if compare_scalar("gt", ka, kb, False):
                    return 1
            except Exception:
                sa, sb = to_str(ka).lower(), to_str(kb).lower()
                if sa != sb:
                    return -1 if sa < sb else 1
        return 0

    items.sort(key=functools.cmp_to_key(cmp), reverse=c.switch("Descending"))
    if c.switch("Unique"):
        out: list[Any] = []
        for x in items:
            if not out or cmp(out[-1], x) != 0:
                out.append(x)
        return out
    return items


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.utility/measure-object?view=powershell-5.1
@cmdlet(
    "Measure-Object",
    [
        Param("Property", position=0),
        Param("Sum", switch=True),
        Param("Average", switch=True),
        Param("Maximum", switch=True),
        Param("Minimum", switch=True),
        Param("InputObject"),
    ],
    pipeline=True,
    aliases=("measure",),
)
def measure_object(rt: Interp, c: Call) -> Iterable[Any]:
    items = _items(c)
    prop = c.get("Property")
    values = [(_prop(rt, x, to_str(prop)) if prop is not None else x) for x in items]
    if prop is not None:
        values = [v for v in values if v is not None]
    nums = (
        [to_number(v) for v in values]
        if any(c.switch(s) for s in ("Sum", "Average", "Maximum", "Minimum"))
        else []
    )
    res: dict[str, Any] = {"Count": len(values)}
    res["Average"] = (sum(nums) / len(nums) if nums else None) if c.switch("Average") else None
    res["Sum"] = (sum(nums) if nums else 0) if c.switch("Sum") else None
    res["Maximum"] = (max(nums) if nums else None) if c.switch("Maximum") else None
    res["Minimum"] = (min(nums) if nums else None) if c.switch("Minimum") else None
    res["Property"] = to_str(prop) if prop is not None else None
    return [PSObject(res, "Microsoft.PowerShell.Commands.GenericMeasureInfo")]


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.utility/convertto-json?view=powershell-5.1
@cmdlet(
    "ConvertTo-Json",
    [
        Param("InputObject", position=0),
        Param("Depth", type_text="System.Int32"),
        Param("Compress", switch=True),
    ],
    pipeline=True,
)
def convertto_json(rt: Interp, c: Call) -> Iterable[Any]:
    depth = to_int(c.get("Depth")) if c.has("Depth") else 2
    if c.input is not None:
        value = c.input[0] if len(c.input) == 1 else list(c.input)
    else:
        value = c.get("InputObject")
    tree = to_json_tree(value, depth)
    return [json_compress(tree) if c.switch("Compress") else json_pretty(tree)]


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.utility/convertfrom-json?view=powershell-5.1
@cmdlet("ConvertFrom-Json", [Param("InputObject", position=0)], pipeline=True)
def convertfrom_json(rt: Interp, c: Call) -> Iterable[Any]:
    import json

    text = "\n".join(to_str(x) for x in (c.input if c.input is not None else as_list(c.get("InputObject"))))

    def conv(v: Any) -> Any:
        if isinstance(v, dict):
            return PSObject({k: conv(x) for k, x in v.items()})
        if isinstance(v, list):
            return [conv(x) for x in v]
        return v

    try:
        data = json.loads(text)
    except ValueError as e:
        raise c.terminate(
            c.record(
                f"Invalid JSON primitive: {text[:20]}.",
                "System.ArgumentException",
                "NotSpecified",
                "ArgumentException",
            )
        ) from e
    return [conv(data)]


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.utility/get-date?view=powershell-5.1
@cmdlet("Get-Date", [Param("Date", position=0), Param("Format"), Param("UFormat")])
def get_date(rt: Interp, c: Call) -> Iterable[Any]:
    from lab.windows.powershell import dotnet_date_format
    from lab.windows.psvalues import to_datetime

    d = to_datetime(c.get("Date")) if c.has("Date") else dt.datetime.now()
    if c.has("Format"):
        return [dotnet_date_format(d, to_str(c.get("Format")))]
    if c.has("UFormat"):
        fmt = to_str(c.get("UFormat"))
        return [str(int(d.timestamp())) if fmt == "%s" else d.strftime(fmt)]
    return [d]


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.utility/start-sleep?view=powershell-5.1
@cmdlet(
    "Start-Sleep",
    [
        Param("Seconds", position=0, type_text="System.Int32"),
        Param("Milliseconds", aliases=("ms",), type_text="System.Int32"),
    ],
    aliases=("sleep",),
)
def start_sleep(rt: Interp, c: Call) -> Iterable[Any]:
    # 5.1: -Seconds is an Int32 (a fraction is rounded, as the parameter binder converts).
    secs = to_int(c.get("Seconds")) if c.has("Seconds") else 0
    ms = to_int(c.get("Milliseconds")) if c.has("Milliseconds") else 0
    time.sleep(max(0, secs) + max(0, ms) / 1000)
    return []


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.core/import-module?view=powershell-5.1
@cmdlet(
    "Import-Module",
    [
        Param("Name", position=0, type_text="System.String[]"),
        Param("Force", switch=True),
        Param("DisableNameChecking", switch=True),
    ],
    aliases=("ipmo",),
)
def import_module(rt: Interp, c: Call) -> Iterable[Any]:
    known = {
        "webadministration",
        "microsoft.powershell.management",
        "microsoft.powershell.utility",
        "microsoft.powershell.archive",
        "nettcpip",
        "cimcmdlets",
    }
    for name in as_list(c.get("Name")):
        n = to_str(name)
        if n.lower() == "webadministration":
            rt.webadmin_loaded = True
        elif n.lower() not in known:
            c.write_error(_module_not_found(c, n))
    return []


def _module_not_found(c: Call, n: str) -> ErrorRecord:
    rec = c.record(
        f"The specified module '{n}' was not loaded because no valid module file was found in any "
        "module directory.",
        "Modules_ModuleNotFound",
        "ResourceUnavailable",
        "FileNotFoundException",
        target_name=n,
        target_type="String",
        exception_type="System.IO.FileNotFoundException",
    )
    rec.fqid = "Modules_ModuleNotFound,Microsoft.PowerShell.Commands.ImportModuleCommand"
    return rec


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.management/get-location?view=powershell-5.1
@cmdlet("Get-Location", [], aliases=("pwd", "gl"))
def get_location(rt: Interp, c: Call) -> Iterable[Any]:
    return [PathInfo(rt.cwd)]


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.management/set-location?view=powershell-5.1
@cmdlet(
    "Set-Location",
    [Param("Path", position=0), Param("LiteralPath", aliases=("PSPath", "LP"))],
    aliases=("cd", "sl", "chdir"),
)
def set_location(rt: Interp, c: Call) -> Iterable[Any]:
    raw = to_str(c.get("LiteralPath") if c.has("LiteralPath") else c.get("Path") or rt.env.home)
    path = _norm(rt, c, raw)
    if not rt.env.drive.is_dir(path):
        raise c.terminate(_path_not_found(c, path))
    rt.cwd = path
    return []


# --------------------------------------------------------------------------- paths


def _drive_not_found(c: Call, drive: str) -> ErrorRecord:
    return c.record(
        f"Cannot find drive. A drive with the name '{drive}' does not exist.",
        "DriveNotFound",
        "ObjectNotFound",
        "DriveNotFoundException",
        target_name=drive,
        target_type="String",
        exception_type="System.Management.Automation.DriveNotFoundException",
    )


def _path_not_found(c: Call, path: str, head: str = "PathNotFound") -> ErrorRecord:
    return c.record(
        f"Cannot find path '{path}' because it does not exist.",
        head,
        "ObjectNotFound",
        "ItemNotFoundException",
        target_name=path,
        target_type="String",
        exception_type="System.Management.Automation.ItemNotFoundException",
        target_object=path,
    )


def _provider(path: str) -> str:
    """'fs', 'iis', 'hklm' or the drive name for an unknown drive."""
    p = path.strip()
    if p.lower().startswith("microsoft.powershell.core\\filesystem::"):
        return "fs"
    if ":" in p:
        drive = p.split(":", 1)[0]
        if len(drive) == 1 and drive.isalpha():
            return "fs" if drive.upper() == "C" else drive
        if drive.lower() == "iis":
            return "iis"
        if drive.lower() in ("hklm", "registry::hkey_local_machine", "microsoft.powershell.core\\registry"):
            return "hklm"
        return drive
    return "fs"


def _check_drive(rt: Interp, c: Call, path: str) -> str:
    prov = _provider(path)
    if prov == "iis" and not rt.webadmin_loaded:
        # The IIS: drive exists once WebAdministration is loaded: a provider path does not
        # auto-load a module (about_Modules: only commands do).
        raise c.terminate(_drive_not_found(c, "IIS"))
    if prov not in ("fs", "iis", "hklm"):
        raise c.terminate(_drive_not_found(c, prov))
    return prov


def _norm(rt: Interp, c: Call, path: str) -> str:
    p = path
    if p.lower().startswith("microsoft.powershell.core\\filesystem::"):
        p = p[len("microsoft.powershell.core\\filesystem::") :]
    try:
        return rt.env.drive.normalize(p, rt.cwd)
    except DriveError:
        raise c.terminate(_drive_not_found(c, p.split(":", 1)[0] if ":" in p else p)) from None


def _resolve(
    rt: Interp, c: Call, path: str, literal: bool, must_exist: bool = True, head: str = "PathNotFound"
) -> list[str]:
    """Canonical paths for a -Path (wildcards expanded) or -LiteralPath. A missing path is a
    non-terminating error (returns [])."""
    full = _norm(rt, c, path)
    drive = rt.env.drive
    if not literal and has_wildcard(full):
        parts = full[3:].split("\\")
        matches = ["C:\\"]
        for comp in parts:
            nxt: list[str] = []
            for m in matches:
                if has_wildcard(comp):
                    if not drive.is_dir(m):
                        continue
                    rx = wildcard_regex(comp)
                    nxt.extend(drive.to_win(m, n) for n in drive.listdir(m) if rx.match(n))
                else:
                    cand = drive.to_win(m, comp)
                    if drive.exists(cand):
                        nxt.append(cand)
            matches = nxt
        if not matches and must_exist:
            c.write_error(_path_not_found(c, full, head))
        return matches
    if must_exist and not drive.exists(full):
        c.write_error(_path_not_found(c, full, head))
        return []
    return [full]


def _paths(rt: Interp, c: Call, must_exist: bool = True, head: str = "PathNotFound") -> list[str]:
    literal = c.has("LiteralPath")
    raw = c.get("LiteralPath") if literal else c.get("Path")
    values = as_list(raw)
    if raw is None and c.input is not None:
        values = []
        for x in c.input:
            if isinstance(x, FileItem):
                values.append(x.full_name)
                literal = True
            elif isinstance(x, PSObject) and x.has("Path"):
                values.append(to_str(x.get("Path")))
            else:
                values.append(to_str(x))
    out: list[str] = []
    for v in values:
        text = to_str(v.path if isinstance(v, PathInfo) else v.full_name if isinstance(v, FileItem) else v)
        _check_drive(rt, c, text)
        out.extend(_resolve(rt, c, text, literal, must_exist, head))
    return out


def file_item(rt: Interp, path: str, text: str | None = None) -> FileItem:
    local = rt.env.drive.local(path)
    st = local.stat()
    is_dir = stat.S_ISDIR(st.st_mode)
    return FileItem(path, is_dir, 0 if is_dir else st.st_size, st.st_mtime, text=text or path)


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.management/join-path?view=powershell-5.1
@cmdlet(
    "Join-Path",
    [
        Param("Path", position=0, type_text="System.String[]"),
        Param("ChildPath", position=1),
        Param("Resolve", switch=True),
    ],
    pipeline=True,
)
def join_path(rt: Interp, c: Call) -> Iterable[Any]:
    out = []
    child = to_str(c.get("ChildPath")).replace("/", "\\")
    for p in as_list(c.get("Path")) or as_list(c.input):
        base = to_str(p).replace("/", "\\")
        if not child:
            out.append(base)
        elif base.endswith("\\") and child.startswith("\\"):
            out.append(base + child[1:])
        elif base.endswith("\\") or child.startswith("\\"):
            out.append(base + child)
        else:
            out.append(base + "\\" + child)
    return out


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.management/split-path?view=powershell-5.1
@cmdlet(
    "Split-Path",
    [
        Param("Path", position=0),
        Param("LiteralPath"),
        Param("Parent", switch=True),
        Param("Leaf", switch=True),
        Param("Qualifier", switch=True),
        Param("NoQualifier", switch=True),
    ],
    pipeline=True,
)
def split_path(rt: Interp, c: Call) -> Iterable[Any]:
    out = []
    for p in as_list(c.get("LiteralPath") if c.has("LiteralPath") else c.get("Path")) or as_list(c.input):
        s = to_str(p).replace("/", "\\").rstrip("\\") or to_str(p)
        if c.switch("Leaf"):
            out.append(s.rsplit("\\", 1)[-1])
        elif c.switch("Qualifier"):
            out.append(s.split(":", 1)[0] + ":" if ":" in s else "")
        elif c.switch("NoQualifier"):
            out.append(s.split(":", 1)[1] if ":" in s else s)
        else:
            if "\\" not in s:
                out.append("")
                continue
            parent = s.rsplit("\\", 1)[0]
            out.append(parent + "\\" if parent.endswith(":") else parent)
    return out


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.management/test-path?view=powershell-5.1
@cmdlet(
    "Test-Path",
    [
        Param("Path", position=0, type_text="System.String[]"),
        Param("LiteralPath", aliases=("PSPath", "LP"), type_text="System.String[]"),
        Param("PathType", type_text="Microsoft.PowerShell.Commands.TestPathType"),
        Param("IsValid", switch=True),
    ],
    pipeline=True,
)
def test_path(rt: Interp, c: Call) -> Iterable[Any]:
    literal = c.has("LiteralPath")
    values = as_list(c.get("LiteralPath") if literal else c.get("Path")) or as_list(c.input)
    if not values:
        raise c.terminate(
            c.record(
                "Cannot bind argument to parameter 'Path' because it is null.",
                "ParameterArgumentValidationErrorNullNotAllowed",
                "InvalidData",
                "ParameterBindingValidationException",
            )
        )
    ptype = to_str(c.get("PathType") or "Any").lower()
    out = []
    for v in values:
        text = to_str(v)
        prov = _provider(text)
        if prov == "iis":
            out.append(rt.webadmin_loaded and iis_exists(rt, text))
            continue
        if prov == "hklm":
            out.append(_registry_key(text) is not None)
            continue
        if prov != "fs":
            out.append(False)  # Test-Path: a missing drive is just False
            continue
        try:
            full = rt.env.drive.normalize(text, rt.cwd)
        except DriveError:
            out.append(False)
            continue
        drive = rt.env.drive
        hits = (
            _resolve(rt, c, text, literal, must_exist=False)
            if not literal and has_wildcard(full)
            else ([full] if drive.exists(full) else [])
        )
        if ptype == "leaf":
            out.append(any(drive.is_file(h) for h in hits))
        elif ptype == "container":
            out.append(any(drive.is_dir(h) for h in hits))
        else:
            out.append(bool(hits))
    return out


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.management/resolve-path?view=powershell-5.1
@cmdlet(
    "Resolve-Path",
    [Param("Path", position=0), Param("LiteralPath", aliases=("PSPath",)), Param("Relative", switch=True)],
    pipeline=True,
    aliases=("rvpa",),
)
def resolve_path(rt: Interp, c: Call) -> Iterable[Any]:
    return [PathInfo(p) for p in _paths(rt, c)]


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.management/get-item?view=powershell-5.1
@cmdlet(
    "Get-Item",
    [
        Param("Path", position=0, type_text="System.String[]"),
        Param("LiteralPath", aliases=("PSPath", "LP"), type_text="System.String[]"),
        Param("Force", switch=True),
    ],
    pipeline=True,
    aliases=("gi",),
)
def get_item(rt: Interp, c: Call) -> Iterable[Any]:
    raw = as_list(c.get("LiteralPath") if c.has("LiteralPath") else c.get("Path"))
    if raw and _provider(to_str(raw[0])) == "iis":
        _check_drive(rt, c, to_str(raw[0]))
        return iis_get_item_property(rt, c, to_str(raw[0]), [])
    return [file_item(rt, p) for p in _paths(rt, c)]


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.management/get-childitem?view=powershell-5.1
# Order (Windows PowerShell 5.1's FileSystemProvider.Dir): a folder's subfolders, then its
# files, each by name; with -Recurse, after a folder's entries come its subfolders' listings.
@cmdlet(
    "Get-ChildItem",
    [
        Param("Path", position=0, type_text="System.String[]"),
        Param("LiteralPath", aliases=("PSPath", "LP"), type_text="System.String[]"),
        Param("Filter", position=1),
        Param("Include", type_text="System.String[]"),
        Param("Exclude", type_text="System.String[]"),
        Param("Recurse", switch=True, aliases=("s",)),
        Param("Depth", type_text="System.UInt32"),
        Param("Force", switch=True),
        Param("Name", switch=True),
        Param("File", switch=True),
        Param("Directory", switch=True, aliases=("ad", "d")),
        Param("Attributes"),
    ],
    pipeline=True,
    aliases=("ls", "dir", "gci"),
)
def get_child_item(rt: Interp, c: Call) -> Iterable[Any]:
    raw = as_list(c.get("LiteralPath") if c.has("LiteralPath") else c.get("Path"))
    if raw and _provider(to_str(raw[0])) in ("iis", "hklm"):
        _check_drive(rt, c, to_str(raw[0]))
        if _provider(to_str(raw[0])) == "iis":
            return iis_children(rt, c, to_str(raw[0]))
        return []
    if not raw and c.input is None:
        c.bound["path"] = rt.cwd
    drive = rt.env.drive
    filt = wildcard_regex(to_str(c.get("Filter"))) if c.has("Filter") else None
    include = [wildcard_regex(to_str(x)) for x in as_list(c.get("Include"))]
    exclude = [wildcard_regex(to_str(x)) for x in as_list(c.get("Exclude"))]
    max_depth = to_int(c.get("Depth")) if c.has("Depth") else None
    recurse = c.switch("Recurse") or max_depth is not None
    out: list[Any] = []

    def wanted(name: str, is_dir: bool) -> bool:
        if c.switch("File") and is_dir:
            return False
        if c.switch("Directory") and not is_dir:
            return False
        if filt and not filt.match(name):
            return False
        if include and not any(r.match(name) for r in include):
            return False
        return not any(r.match(name) for r in exclude)

    def listing(folder: str, rel: str, depth: int) -> None:
        try:
            names = drive.listdir(folder)
        except OSError as e:
            c.write_error(
                c.record(
                    f"Access to the path '{folder}' is denied.",
                    "DirUnauthorizedAccessError",
                    "PermissionDenied",
                    "UnauthorizedAccessException",
                    target_name=folder,
                    target_type="String",
                )
                if isinstance(e, PermissionError)
                else _path_not_found(c, folder)
            )
            return
        entries = [(n, drive.is_dir(drive.to_win(folder, n))) for n in names]
        ordered = [e for e in entries if e[1]] + [e for e in entries if not e[1]]
        for n, is_dir in ordered:
            full = drive.to_win(folder, n)
            if wanted(n, is_dir):
                if c.switch("Name"):
                    out.append(rel + n)
                else:
                    try:
                        out.append(file_item(rt, full, text=n if depth == 0 else full))
                    except OSError:
                        continue
        if recurse and (max_depth is None or depth < max_depth):
            for n, is_dir in ordered:
                if is_dir and not drive.local(drive.to_win(folder, n)).is_symlink():
                    listing(drive.to_win(folder, n), rel + n + "\\", depth + 1)

    for p in _paths(rt, c):
        if drive.is_dir(p):
            listing(p, "", 0)
        elif wanted(p.rsplit("\\", 1)[-1], False):
            out.append(p.rsplit("\\", 1)[-1] if c.switch("Name") else file_item(rt, p))
    return out


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.utility/get-filehash?view=powershell-5.1
# In 5.1 Get-FileHash is a function (Microsoft.PowerShell.Utility.psm1) that skips folders,
# so `Get-ChildItem -Recurse | Get-FileHash` hashes the files only. Hash: upper-case hex.
@cmdlet(
    "Get-FileHash",
    [
        Param("Path", position=0, type_text="System.String[]"),
        Param("LiteralPath", aliases=("PSPath", "LP"), type_text="System.String[]"),
        Param("Algorithm", type_text="System.String"),
    ],
    pipeline=True,
)
def get_file_hash(rt: Interp, c: Call) -> Iterable[Any]:
    algo = to_str(c.get("Algorithm") or "SHA256").upper()
    if algo not in ("SHA1", "SHA256", "SHA384", "SHA512", "MD5", "MACTRIPLEDES", "RIPEMD160"):
        raise c.terminate(
            c.record(
                f"Cannot validate argument on parameter 'Algorithm'. The argument "
                f'"{to_str(c.get("Algorithm"))}" does '
                'not belong to the set "SHA1,SHA256,SHA384,SHA512,MACTripleDES,MD5,RIPEMD160" '
                "specified by the ValidateSet "
                "attribute. Supply an argument that is in the set and then try the command again.",
                "ParameterArgumentValidationError",
                "InvalidData",
                "ParameterBindingValidationException",
            )
        )
    if algo in ("MACTRIPLEDES", "RIPEMD160"):
        raise c.terminate(
            c.record(
                f"{algo} is not available in the lab.",
                "AlgorithmNotSupported",
                "NotImplemented",
                "NotSupportedException",
            )
        )
    out = []
    for p in _paths(rt, c, head="FileNotFound"):
        local = rt.env.drive.local(p)
        if local.is_dir():
            continue
        h = hashlib.new(algo.lower().replace("sha", "sha") if algo != "MD5" else "md5")
        with open(local, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out.append(
            PSObject(
                {"Algorithm": algo, "Hash": h.hexdigest().upper(), "Path": p},
                "Microsoft.Powershell.Utility.FileHash",
            )
        )
    return out


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.management/new-item?view=powershell-5.1
@cmdlet(
    "New-Item",
    [
        Param("Path", position=0, type_text="System.String[]"),
        Param("Name"),
        Param("ItemType", aliases=("Type",)),
        Param("Value", position=1),
        Param("Force", switch=True),
    ],
    pipeline=True,
    aliases=("ni",),
)
def new_item(rt: Interp, c: Call) -> Iterable[Any]:
    kind = to_str(c.get("ItemType") or "File").lower()
    if kind not in ("file", "directory"):
        raise c.terminate(
            c.record(
                'The type is not a known type for the file system. Only "file" and "directory" can '
                "be created.",
                "NewItemTypeUnknown",
                "InvalidArgument",
                "ArgumentException",
            )
        )
    paths = as_list(c.get("Path")) or [rt.cwd]
    out = []
    for raw in paths:
        text = to_str(raw)
        if c.has("Name"):
            text = text.rstrip("\\/") + "\\" + to_str(c.get("Name"))
        _check_drive(rt, c, text)
        full = _norm(rt, c, text)
        drive = rt.env.drive
        local = drive.local(full)
        parent_local = drive.local(full.rsplit("\\", 1)[0] if full.count("\\") > 1 else "C:\\")
        if kind == "directory":
            if local.exists():
                if not c.switch("Force") or not local.is_dir():
                    c.write_error(
                        c.record(
                            f"An item with the specified name {full} already exists.",
                            "DirectoryExist",
                            "ResourceExists",
                            "IOException",
                            target_name=full,
                            target_type="String",
                            exception_type="System.IO.IOException",
                        )
                    )
                    continue
            else:
                local.mkdir(parents=True, exist_ok=True)
            out.append(file_item(rt, full))
        else:
            if local.exists() and not c.switch("Force"):
                c.write_error(
                    c.record(
                        f"The file '{full}' already exists.",
                        "NewItemIOError",
                        "WriteError",
                        "IOException",
                        target_name=full,
                        target_type="String",
                        exception_type="System.IO.IOException",
                    )
                )
                continue
            if not parent_local.is_dir():
                if not c.switch("Force"):
                    c.write_error(
                        c.record(
                            f"Could not find a part of the path '{full}'.",
                            "NewItemIOError",
                            "WriteError",
                            "DirectoryNotFoundException",
                            target_name=full,
                            target_type="String",
                        )
                    )
                    continue
                parent_local.mkdir(parents=True, exist_ok=True)
            value = c.get("Value")
            local.write_bytes(_encode_text(to_str(value) if value is not None else "", ANSI.python, False))
            out.append(file_item(rt, full))
    return out


def _encode_text(text: str, codec: str, bom: bool) -> bytes:
    data = text.encode(codec, errors="replace")
    if bom and codec == "utf-8":
        return b"\xef\xbb\xbf" + data
    if bom and codec == "utf-16-le":
        return b"\xff\xfe" + data
    return data


def _is_within(inner: str, outer: str) -> bool:
    a, b = inner.casefold().rstrip("\\"), outer.casefold().rstrip("\\")
    return a == b or a.startswith(b + "\\")


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.management/remove-item?view=powershell-5.1
@cmdlet(
    "Remove-Item",
    [
        Param("Path", position=0, type_text="System.String[]"),
        Param("LiteralPath", aliases=("PSPath", "LP"), type_text="System.String[]"),
        Param("Recurse", switch=True),
        Param("Force", switch=True),
        Param("Filter"),
        Param("Include"),
        Param("Exclude"),
    ],
    pipeline=True,
    aliases=("rm", "del", "ri", "rmdir", "rd", "erase"),
)
def remove_item(rt: Interp, c: Call) -> Iterable[Any]:
    drive = rt.env.drive
    for p in _paths(rt, c):
        local = drive.local(p)
        if _is_within(rt.cwd, p):
            # Windows refuses to delete the process's current directory (sharing violation).
            c.write_error(
                c.record(
                    f"Cannot remove item {p}: The process cannot access the file '{p}' because it is "
                    "being used by "
                    "another process.",
                    "RemoveFileSystemItemIOError",
                    "WriteError",
                    "IOException",
                    target_name=p,
                    target_type="DirectoryInfo",
                )
            )
            continue
        if local.is_dir() and not local.is_symlink():
            if any(local.iterdir()) and not c.switch("Recurse"):
                # Removing a non-empty folder without -Recurse asks for confirmation; a
                # non-interactive host cannot (ConsoleHost: "...in NonInteractive mode...").
                c.write_error(
                    c.record(
                        "Windows PowerShell is in NonInteractive mode. Read and Prompt functionality "
                        "is not available.",
                        "System.Management.Automation.PSInvalidOperationException",
                        "InvalidOperation",
                        "PSInvalidOperationException",
                        target_name=p,
                        target_type="String",
                    )
                )
                continue
            shutil.rmtree(local)
        else:
            if not c.switch("Force") and not os.access(local, os.W_OK):
                c.write_error(
                    c.record(
                        f"Cannot remove item {p}: You do not have sufficient access rights to "
                        "perform this operation.",
                        "RemoveFileSystemItemUnAuthorizedAccess",
                        "PermissionDenied",
                        "IOException",
                        target_name=p,
                        target_type="FileInfo",
                    )
                )
                continue
            local.unlink()
    return []


def _copy_tree(rt: Interp, c: Call, src: Path, dst: Path, dst_win: str) -> None:
    if dst.exists():
        if not c.switch("Force"):
            c.write_error(
                c.record(
                    f"An item with the specified name {dst_win} already exists.",
                    "DirectoryExist",
                    "ResourceExists",
                    "IOException",
                    target_name=dst_win,
                    target_type="String",
                )
            )
    else:
        dst.mkdir()
    for entry in sorted(src.iterdir(), key=lambda e: e.name.upper()):
        target = dst / entry.name
        if entry.is_dir():
            _copy_tree(rt, c, entry, target, dst_win + "\\" + entry.name)
        else:
            shutil.copy2(entry, target)


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.management/copy-item?view=powershell-5.1
# A folder copied onto an existing folder lands INSIDE it (Example 2/3 on that page:
# "If the destination folder exists, the source folder is copied into it"); without -Recurse
# only the (empty) folder is copied.
@cmdlet(
    "Copy-Item",
    [
        Param("Path", position=0, type_text="System.String[]"),
        Param("LiteralPath", aliases=("PSPath", "LP"), type_text="System.String[]"),
        Param("Destination", position=1),
        Param("Recurse", switch=True),
        Param("Force", switch=True),
        Param("Container", switch=True),
        Param("PassThru", switch=True),
        Param("Filter"),
        Param("Include"),
        Param("Exclude"),
    ],
    pipeline=True,
    aliases=("cp", "copy", "cpi"),
)
def copy_item(rt: Interp, c: Call) -> Iterable[Any]:
    drive = rt.env.drive
    dest_raw = to_str(c.get("Destination") or rt.cwd)
    _check_drive(rt, c, dest_raw)
    dest = _norm(rt, c, dest_raw)
    out = []
    for p in _paths(rt, c):
        src = drive.local(p)
        dst_local = drive.local(dest)
        if src.is_dir():
            if dst_local.is_dir():
                target_win = drive.to_win(dest, p.rsplit("\\", 1)[-1])
            else:
                target_win = dest
            if _is_within(target_win, p):
                c.write_error(
                    c.record(
                        f"Cannot copy item {p} onto itself.",
                        "CopyError",
                        "WriteError",
                        "IOException",
                        target_name=p,
                        target_type="String",
                    )
                )
                continue
            target = drive.local(target_win)
            if not target.parent.is_dir():
                c.write_error(
                    c.record(
                        f"Could not find a part of the path '{target_win}'.",
                        "CopyDirectoryInfoItemIOError",
                        "WriteError",
                        "DirectoryNotFoundException",
                        target_name=target_win,
                        target_type="String",
                    )
                )
                continue
            if c.switch("Recurse"):
                _copy_tree(rt, c, src, target, target_win)
            else:
                target.mkdir(exist_ok=True)
            if c.switch("PassThru"):
                out.append(file_item(rt, target_win))
        else:
            target_win = drive.to_win(dest, p.rsplit("\\", 1)[-1]) if dst_local.is_dir() else dest
            target = drive.local(target_win)
            if not target.parent.is_dir():
                c.write_error(
                    c.record(
                        f"Could not find a part of the path '{target_win}'.",
                        "CopyFileInfoItemIOError",
                        "WriteError",
                        "DirectoryNotFoundException",
                        target_name=p,
                        target_type="String",
                    )
                )
                continue
            if target.exists() and not os.access(target, os.W_OK) and not c.switch("Force"):
                c.write_error(
                    c.record(
                        f"Access to the path '{target_win}' is denied.",
                        "CopyFileInfoItemUnauthorizedAccessError",
                        "PermissionDenied",
                        "UnauthorizedAccessException",
                        target_name=p,
                        target_type="String",
                    )
                )
                continue
            shutil.copy2(src, target)
            if c.switch("PassThru"):
                out.append(file_item(rt, target_win))
    return out


def _exists_error(c: Call, p: str) -> ErrorRecord:
    return c.record(
        "Cannot create a file when that file already exists.",
        "MoveFileInfoItemIOError",
        "WriteError",
        "IOException",
        target_name=p,
        target_type="String",
        exception_type="System.IO.IOException",
    )


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.management/move-item?view=powershell-5.1
@cmdlet(
    "Move-Item",
    [
        Param("Path", position=0, type_text="System.String[]"),
        Param("LiteralPath", aliases=("PSPath", "LP"), type_text="System.String[]"),
        Param("Destination", position=1),
        Param("Force", switch=True),
        Param("PassThru", switch=True),
    ],
    pipeline=True,
    aliases=("mv", "move", "mi"),
)
def move_item(rt: Interp, c: Call) -> Iterable[Any]:
    drive = rt.env.drive
    dest_raw = to_str(c.get("Destination") or rt.cwd)
    _check_drive(rt, c, dest_raw)
    dest = _norm(rt, c, dest_raw)
    out = []
    for p in _paths(rt, c):
        src = drive.local(p)
        dst_local = drive.local(dest)
        target_win = drive.to_win(dest, p.rsplit("\\", 1)[-1]) if dst_local.is_dir() else dest
        target = drive.local(target_win)
        if _is_within(target_win, p) and target_win.casefold() != p.casefold():
            c.write_error(
                c.record(
                    "The destination is a subdirectory of the source.",
                    "MoveItemArgumentError",
                    "InvalidArgument",
                    "ArgumentException",
                    target_name=p,
                    target_type="String",
                )
            )
            continue
        if target.exists() and target_win.casefold() != p.casefold():
            if c.switch("Force") and target.is_file() and src.is_file():
                target.unlink()
            else:
                c.write_error(_exists_error(c, p))
                continue
        if not target.parent.is_dir():
            c.write_error(
                c.record(
                    "Could not find a part of the path.",
                    "MoveFileInfoItemIOError",
                    "WriteError",
                    "DirectoryNotFoundException",
                    target_name=p,
                    target_type="String",
                )
            )
            continue
        os.rename(src, target)
        if c.switch("PassThru"):
            out.append(file_item(rt, target_win))
    return out


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.management/rename-item?view=powershell-5.1
@cmdlet(
    "Rename-Item",
    [
        Param("Path", position=0),
        Param("LiteralPath", aliases=("PSPath", "LP")),
        Param("NewName", position=1),
        Param("Force", switch=True),
        Param("PassThru", switch=True),
    ],
    pipeline=True,
    aliases=("ren", "rni"),
)
def rename_item(rt: Interp, c: Call) -> Iterable[Any]:
    drive = rt.env.drive
    new = to_str(c.get("NewName")).replace("/", "\\")
    out = []
    for p in _paths(rt, c):
        parent = p.rsplit("\\", 1)[0] or "C:\\"
        if "\\" in new:
            target_win = _norm(rt, c, new)
            if target_win.rsplit("\\", 1)[0].casefold() != parent.casefold():
                raise c.terminate(
                    c.record(
                        "Cannot rename the specified target, because it represents a path or device name.",
                        "Argument",
                        "InvalidArgument",
                        "PSArgumentException",
                    )
                )
        else:
            target_win = drive.to_win(
                parent if parent.endswith("\\") or len(parent) > 2 else parent + "\\", new
            )
            target_win = _norm(rt, c, target_win)
        target = drive.local(target_win)
        if target.exists() and target_win.casefold() != p.casefold():
            c.write_error(
                c.record(
                    "Cannot create a file when that file already exists.",
                    "RenameItemIOError",
                    "WriteError",
                    "IOException",
                    target_name=p,
                    target_type="String",
                )
            )
            continue
        os.rename(drive.local(p), target)
        if c.switch("PassThru"):
            out.append(file_item(rt, target_win))
    return out


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.archive/expand-archive?view=powershell-5.1
@cmdlet(
    "Expand-Archive",
    [
        Param("Path", position=0),
        Param("LiteralPath", aliases=("PSPath",)),
        Param("DestinationPath", position=1),
        Param("Force", switch=True),
    ],
    pipeline=True,
)
def expand_archive(rt: Interp, c: Call) -> Iterable[Any]:
    drive = rt.env.drive
    dest = _norm(rt, c, to_str(c.get("DestinationPath") or rt.cwd))
    for p in _paths(rt, c):
        if not p.lower().endswith(".zip"):
            c.write_error(
                c.record(
                    f"{p.rsplit(chr(92), 1)[-1][p.rfind('.') - len(p) :] if '.' in p else ''} is not "
                    "a supported archive "
                    "file format. .zip is the only supported archive file format.",
                    "NotSupportedArchiveFileExtension",
                    "InvalidArgument",
                    "IOException",
                    activity="Expand-Archive",
                )
            )
            continue
        dest_local = drive.local(dest)
        try:
            with zipfile.ZipFile(drive.local(p)) as z:
                names = z.namelist()
                for name in names:
                    if name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/"):
                        raise zipfile.BadZipFile(f"unsafe member {name}")
                clashes = [n for n in names if not n.endswith("/") and (dest_local / n).exists()]
                if clashes and not c.switch("Force"):
                    for n in clashes:
                        target = dest + "\\" + n.replace("/", "\\")
                        c.write_error(
                            c.record(
                                f"Failed to create file '{target}' while expanding the archive file "
                                f"'{p}' contents as "
                                f"the file '{target}' already exists. Use the -Force parameter if "
                                "you want to overwrite "
                                f"the existing directory '{dest}' contents when expanding the archive file.",
                                "ExpandArchiveFileExists",
                                "WriteError",
                                "IOException",
                                target_name=target,
                                target_type="String",
                                activity="Expand-Archive",
                            )
                        )
                    continue
                dest_local.mkdir(parents=True, exist_ok=True)
                z.extractall(dest_local)
        except (zipfile.BadZipFile, OSError) as e:
            c.write_error(
                c.record(
                    f"The archive file '{p}' could not be expanded: {e}",
                    "ArchiveFileIsNotValid",
                    "InvalidArgument",
                    "InvalidDataException",
                    activity="Expand-Archive",
                )
            )
    return []


def _read_text(data: bytes, encoding: str | None) -> str:
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", errors="replace")
    if data.startswith(b"\xff\xfe"):
        return data[2:].decode("utf-16-le", errors="replace")
    enc = (encoding or "default").lower()
    codec = {
        "utf8": "utf-8",
        "ascii": "ascii",
        "unicode": "utf-16-le",
        "utf32": "utf-32-le",
        "bigendianunicode": "utf-16-be",
        "oem": "cp437",
    }.get(enc, "cp1252")
    return data.decode(codec, errors="replace")


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.management/get-content?view=powershell-5.1
# Without a BOM and without -Encoding, 5.1 reads the system's ANSI code page (1252).
@cmdlet(
    "Get-Content",
    [
        Param("Path", position=0, type_text="System.String[]"),
        Param("LiteralPath", aliases=("PSPath", "LP"), type_text="System.String[]"),
        Param("Raw", switch=True),
        Param("Encoding"),
        Param("TotalCount", aliases=("First", "Head")),
        Param("Tail", aliases=("Last",)),
    ],
    pipeline=True,
    aliases=("cat", "gc", "type"),
)
def get_content(rt: Interp, c: Call) -> Iterable[Any]:
    out: list[Any] = []
    for p in _paths(rt, c):
        local = rt.env.drive.local(p)
        if local.is_dir():
            c.write_error(
                c.record(
                    f"Unable to get content because it is a directory: '{p}'. Please use "
                    "'Get-ChildItem' instead.",
                    "GetContainerContentException",
                    "InvalidOperation",
                    "InvalidOperationException",
                    target_name=p,
                    target_type="String",
                )
            )
            continue
        text = _read_text(local.read_bytes(), to_str(c.get("Encoding")) if c.has("Encoding") else None)
        if c.switch("Raw"):
            out.append(text)
            continue
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
        if c.has("TotalCount"):
            lines = lines[: to_int(c.get("TotalCount"))]
        if c.has("Tail"):
            n = to_int(c.get("Tail"))
            lines = lines[-n:] if n else []
        out.extend(lines)
    return out


def _write_content(rt: Interp, c: Call, append: bool) -> Iterable[Any]:
    enc = to_str(c.get("Encoding") or "Default").lower()
    codec, bom = {
        "utf8": ("utf-8", True),
        "ascii": ("ascii", False),
        "unicode": ("utf-16-le", True),
        "oem": ("cp437", False),
        "default": ("cp1252", False),
        "string": ("utf-16-le", True),
    }.get(enc, ("cp1252", False))
    values = c.get("Value") if c.has("Value") else (c.input or [])
    lines = [to_str(v) for v in as_list(values)]
    text = "".join(line + ("" if c.switch("NoNewline") else "\r\n") for line in lines)
    raw = as_list(c.get("LiteralPath") if c.has("LiteralPath") else c.get("Path"))
    literal = c.has("LiteralPath")
    for r in raw:
        _check_drive(rt, c, to_str(r))
        targets = _resolve(rt, c, to_str(r), literal, must_exist=False)
        for p in targets:
            local = rt.env.drive.local(p)
            if not local.parent.is_dir():
                c.write_error(
                    c.record(
                        f"Could not find a part of the path '{p}'.",
                        "GetContentWriterDirectoryNotFoundError",
                        "ObjectNotFound",
                        "DirectoryNotFoundException",
                        target_name=p,
                        target_type="String",
                    )
                )
                continue
            if append and local.exists():
                with open(local, "ab") as f:
                    f.write(text.encode(codec, errors="replace"))
            else:
                local.write_bytes(_encode_text(text, codec, bom))
    return []


# Set-Content's and Add-Content's parameters (the same on both Microsoft Learn pages).
_CONTENT_PARAMS = [
    Param("Path", position=0, type_text="System.String[]"),
    Param("LiteralPath", aliases=("PSPath", "LP"), type_text="System.String[]"),
    Param("Value", position=1, type_text="System.Object[]"),
    Param("Encoding"),
    Param("NoNewline", switch=True),
    Param("Force", switch=True),
]


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.management/set-content?view=powershell-5.1
# 5.1's default encoding is "Default" (ANSI); -Encoding UTF8 writes a BOM.
@cmdlet(
    "Set-Content",
    _CONTENT_PARAMS,
    pipeline=True,
    aliases=("sc",),
)
def set_content(rt: Interp, c: Call) -> Iterable[Any]:
    return _write_content(rt, c, append=False)


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.management/add-content?view=powershell-5.1
@cmdlet(
    "Add-Content",
    _CONTENT_PARAMS,
    pipeline=True,
    aliases=("ac",),
)
def add_content(rt: Interp, c: Call) -> Iterable[Any]:
    return _write_content(rt, c, append=True)


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.utility/out-file?view=powershell-5.1
@cmdlet(
    "Out-File",
    [
        Param("FilePath", position=0, aliases=("Path",)),
        Param("LiteralPath"),
        Param("Encoding"),
        Param("Append", switch=True),
        Param("Force", switch=True),
        Param("NoNewline", switch=True),
        Param("InputObject"),
    ],
    pipeline=True,
)
def out_file(rt: Interp, c: Call) -> Iterable[Any]:
    from lab.windows.psvalues import format_items

    path = to_str(c.get("LiteralPath") if c.has("LiteralPath") else c.get("FilePath"))
    _check_drive(rt, c, path)
    lines = format_items(_items(c))
    enc = to_str(c.get("Encoding") or "Unicode").lower()
    if enc == "unicode":
        rt.env.out_file(rt, path, lines, append=c.switch("Append"))
    else:
        codec, bom = {
            "utf8": ("utf-8", True),
            "ascii": ("ascii", False),
            "default": ("cp1252", False),
            "oem": ("cp437", False),
        }.get(enc, ("cp1252", False))
        local = rt.env.drive.local(_norm(rt, c, path))
        text = "".join(line + "\r\n" for line in lines)
        if c.switch("Append") and local.exists():
            with open(local, "ab") as f:
                f.write(text.encode(codec, errors="replace"))
        else:
            local.write_bytes(_encode_text(text, codec, bom))
    return []


# --------------------------------------------------------------------------- registry


def _registry_key(path: str) -> dict[str, Any] | None:
    key = path.replace("/", "\\").rstrip("\\").casefold()
    if key.startswith("registry::hkey_local_machine"):
        key = "hklm:" + key[len("registry::hkey_local_machine") :]
    return REGISTRY.get(key)


REGISTRY: dict[str, dict[str, Any]] = {}


def _registry(rt: Interp) -> None:
    system = read_config(rt.env.node)["system"]
    # Microsoft Learn, "How to: Determine which .NET Framework versions are installed":
    # HKLM\SOFTWARE\Microsoft\NET Framework Setup\NDP\v4\Full, values Release and Version.
    REGISTRY["hklm:\\software\\microsoft\\net framework setup\\ndp\\v4\\full"] = {
        "Release": int(system["net_release"]),
        "Version": str(system["net_version"]),
        "Install": 1,
        "InstallPath": "C:\\Windows\\Microsoft.NET\\Framework64\\v4.0.30319\\",
        "TargetVersion": "4.0.0",
    }
    REGISTRY["hklm:\\software\\microsoft\\windows nt\\currentversion"] = {
        "CurrentBuild": str(system["build"]),
        "CurrentBuildNumber": str(system["build"]),
        "UBR": int(system["ubr"]),
        "ProductName": str(system["caption"]).replace("Microsoft ", ""),
        "ReleaseId": "1809",
        "EditionID": "ServerStandard",
    }


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.management/get-itemproperty?view=powershell-5.1
@cmdlet(
    "Get-ItemProperty",
    [
        Param("Path", position=0, type_text="System.String[]"),
        Param("LiteralPath", aliases=("PSPath",)),
        Param("Name", position=1, type_text="System.String[]"),
    ],
    pipeline=True,
    aliases=("gp",),
)
def get_item_property(rt: Interp, c: Call) -> Iterable[Any]:
    raw = to_str(c.get("LiteralPath") if c.has("LiteralPath") else c.get("Path"))
    prov = _check_drive(rt, c, raw)
    names = [to_str(n) for n in as_list(c.get("Name"))]
    if prov == "iis":
        return iis_get_item_property(rt, c, raw, names)
    if prov == "hklm":
        _registry(rt)
        values = _registry_key(raw)
        if values is None:
            shown = raw.replace("/", "\\")
            raise c.terminate(
                _path_not_found(
                    c, shown.replace("HKLM:", "HKEY_LOCAL_MACHINE").replace("hklm:", "HKEY_LOCAL_MACHINE")
                )
            )
        obj = PSObject({}, "System.Management.Automation.PSCustomObject")
        for k, v in values.items():
            if not names or any(k.casefold() == n.casefold() for n in names):
                obj.set(k, v)
        for n in names:
            if not obj.has(n):
                c.write_error(
                    c.record(
                        f"Property {n} does not exist at path {raw.replace('HKLM:', 'HKEY_LOCAL_MACHINE')}.",
                        "System.Management.Automation.PSArgumentException",
                        "InvalidArgument",
                        "PSArgumentException",
                        target_name=n,
                        target_type="String",
                    )
                )
        obj.set(
            "PSPath", "Microsoft.PowerShell.Core\\Registry::" + raw.replace("HKLM:", "HKEY_LOCAL_MACHINE")
        )
        obj.set("PSProvider", "Microsoft.PowerShell.Core\\Registry")
        return [obj] if not names or len(obj.names()) > 2 else []
    out = []
    for p in _paths(rt, c):
        item = file_item(rt, p)
        obj = PSObject({k: v for k, v in file_item_props(item) if not names or k in names})
        out.append(obj)
    return out


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.management/set-itemproperty?view=powershell-5.1
@cmdlet(
    "Set-ItemProperty",
    [
        Param("Path", position=0),
        Param("LiteralPath", aliases=("PSPath",)),
        Param("Name", position=1),
        Param("Value", position=2),
    ],
    pipeline=True,
    aliases=("sp",),
)
def set_item_property(rt: Interp, c: Call) -> Iterable[Any]:
    raw = to_str(c.get("LiteralPath") if c.has("LiteralPath") else c.get("Path"))
    prov = _check_drive(rt, c, raw)
    if prov == "iis":
        iis_set_item_property(rt, c, raw, to_str(c.get("Name")), c.get("Value"))
        return []
    raise c.terminate(
        c.record(
            "Set-ItemProperty is not supported on this provider in the lab.",
            "NotSupported",
            "NotImplemented",
            "PSNotSupportedException",
        )
    )


# --------------------------------------------------------------------------- system


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.management/get-psdrive?view=powershell-5.1
@cmdlet("Get-PSDrive", [Param("Name", position=0, type_text="System.String[]"), Param("PSProvider")])
def get_psdrive(rt: Interp, c: Call) -> Iterable[Any]:
    names = [to_str(n) for n in as_list(c.get("Name"))] or ["C"]
    out = []
    for n in names:
        if n.upper().rstrip(":") != "C":
            c.write_error(
                c.record(
                    f"Cannot find drive. A drive with the name '{n}' does not exist.",
                    "GetLocationNoMatchingDrive",
                    "ObjectNotFound",
                    "DriveNotFoundException",
                    target_name=n,
                    target_type="String",
                )
            )
            continue
        free, used = rt.env.free_used()
        out.append(
            PSObject(
                {
                    "Name": "C",
                    "Used": used,
                    "Free": free,
                    "Provider": "FileSystem",
                    "Root": "C:\\",
                    "CurrentLocation": rt.cwd[3:],
                },
                "System.Management.Automation.PSDriveInfo",
                "C",
            )
        )
    return out


# https://learn.microsoft.com/en-us/powershell/module/cimcmdlets/get-ciminstance?view=powershell-5.1
@cmdlet(
    "Get-CimInstance",
    [
        Param("ClassName", position=0, aliases=("Class",)),
        Param("Namespace"),
        Param("Filter"),
        Param("Property"),
    ],
    aliases=("gcim",),
)
def get_ciminstance(rt: Interp, c: Call) -> Iterable[Any]:
    cls = to_str(c.get("ClassName"))
    system = read_config(rt.env.node)["system"]
    if cls.lower() == "win32_operatingsystem":
        # Win32_OperatingSystem class (Microsoft Learn): Version, BuildNumber, Caption, ...
        return [
            PSObject(
                {
                    "SystemDirectory": "C:\\Windows\\system32",
                    "Organization": "",
                    "BuildNumber": str(system["build"]),
                    "RegisteredUser": "Windows User",
                    "SerialNumber": "00429-70000-00000-AA000",
                    "Version": str(system["version"]),
                    "Caption": str(system["caption"]),
                    "CSName": rt.env.computer_name,
                    "OSArchitecture": "64-bit",
                    "LastBootUpTime": dt.datetime.fromtimestamp(time.time() - _uptime()),
                    "FreePhysicalMemory": 4 << 20,
                },
                "Microsoft.Management.Infrastructure.CimInstance#root/cimv2/Win32_OperatingSystem",
            )
        ]
    if cls.lower() == "win32_computersystem":
        return [
            PSObject(
                {"Name": rt.env.computer_name, "Domain": "WORKGROUP", "Model": "Virtual Machine"},
                "Microsoft.Management.Infrastructure.CimInstance#root/cimv2/Win32_ComputerSystem",
            )
        ]
    raise c.terminate(
        c.record(
            "Invalid class ",
            "HRESULT 0x80041010",
            "MetadataError",
            "CimException",
            target_name=cls,
            target_type="String",
            exception_type="Microsoft.Management.Infrastructure.CimException",
        )
    )


def _uptime() -> float:
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


# MSFT_NetTCPConnection State values (Microsoft Learn, "MSFT_NetTCPConnection class").
TCP_STATES = {
    "closed": 1,
    "listen": 2,
    "synsent": 3,
    "synreceived": 4,
    "established": 5,
    "finwait1": 6,
    "finwait2": 7,
    "closewait": 8,
    "closing": 9,
    "lastack": 10,
    "timewait": 11,
    "deletetcb": 12,
    "bound": 100,
}
# /proc/net/tcp's st field (include/net/tcp_states.h) -> the state name.
LINUX_TCP = {
    1: "Established",
    2: "SynSent",
    3: "SynReceived",
    4: "FinWait1",
    5: "FinWait2",
    6: "TimeWait",
    7: "Closed",
    8: "CloseWait",
    9: "LastAck",
    10: "Listen",
    11: "Closing",
}


def _tcp_connections() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            f = ln.split()
            if len(f) < 10:
                continue
            local, remote, st = f[1], f[2], int(f[3], 16)
            lport = int(local.rsplit(":", 1)[1], 16)
            rport = int(remote.rsplit(":", 1)[1], 16)
            rows.append(
                {
                    "LocalPort": lport,
                    "RemotePort": rport,
                    "State": LINUX_TCP.get(st, "Closed"),
                    "LocalAddress": _addr(local.rsplit(":", 1)[0]),
                    "RemoteAddress": _addr(remote.rsplit(":", 1)[0]),
                    "OwningProcess": 0,
                }
            )
    return rows


def _addr(hexaddr: str) -> str:
    try:
        if len(hexaddr) == 8:
            return socket.inet_ntop(socket.AF_INET, bytes.fromhex(hexaddr)[::-1])
        raw = bytes.fromhex(hexaddr)
        words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
        return socket.inet_ntop(socket.AF_INET6, words)
    except (ValueError, OSError):
        return hexaddr


# https://learn.microsoft.com/en-us/powershell/module/nettcpip/get-nettcpconnection?view=windowsserver2019-ps
# No match: the CIM cmdletization's NotFound errors (PowerShell/PowerShell src/
# Microsoft.PowerShell.Commands.Management/cimSupport/cmdletization/cim/clientSideQuery.cs
# GenerateNotFoundErrors; CmdletizationResources.resx): one filter -> "No MSFT_NetTCPConnection
# objects found with property 'LocalPort' equal to 'N'.  Verify the value of the property and
# retry." (two spaces), several -> "No matching ... objects found by CIM query ...".
@cmdlet(
    "Get-NetTCPConnection",
    [
        Param("LocalAddress", position=0),
        Param("LocalPort", position=1),
        Param("RemoteAddress"),
        Param("RemotePort"),
        Param("State"),
        Param("OwningProcess"),
    ],
    noun_class="Get-NetTCPConnection",
)
def get_net_tcp_connection(rt: Interp, c: Call) -> Iterable[Any]:
    filters: list[tuple[str, Any]] = []
    for name in ("LocalAddress", "LocalPort", "RemoteAddress", "RemotePort", "State", "OwningProcess"):
        if c.has(name):
            filters.append((name, c.get(name)))
    rows = _tcp_connections()
    out = []
    for r in rows:
        ok = True
        for name, value in filters:
            vals = as_list(value)
            if name == "State":
                ok = ok and any(to_str(v).casefold() == str(r["State"]).casefold() for v in vals)
            elif name in ("LocalPort", "RemotePort", "OwningProcess"):
                ok = ok and any(to_int(v) == r[name] for v in vals)
            else:
                ok = ok and any(to_str(v) == r[name] for v in vals)
        if ok:
            out.append(
                PSObject(
                    {
                        "LocalAddress": r["LocalAddress"],
                        "LocalPort": r["LocalPort"],
                        "RemoteAddress": r["RemoteAddress"],
                        "RemotePort": r["RemotePort"],
                        "State": r["State"],
                        "AppliedSetting": None,
                        "OwningProcess": r["OwningProcess"],
                    },
                    "Microsoft.Management.Infrastructure.CimInstance#ROOT/StandardCimv2/MSFT_NetTCPConnection",
                )
            )
    if out or not filters:
        return out
    if len(filters) == 1:
        name, value = filters[0]
        rec = c.record(
            f"No MSFT_NetTCPConnection objects found with property '{name}' equal to "
            f"'{to_str(value)}'.  Verify the "
            "value of the property and retry.",
            f"CmdletizationQuery_NotFound_{name}",
            "ObjectNotFound",
            "CimJobException",
            target_name=to_str(value),
            target_type="UInt16" if name in ("LocalPort", "RemotePort") else type_name_of(value),
            exception_type="Microsoft.PowerShell.Cmdletization.Cim.CimJobException",
            target_object=value,
        )
    else:
        conds = []
        for name, value in filters:
            v = TCP_STATES.get(to_str(value).casefold(), to_str(value)) if name == "State" else value
            lit = f"'{to_str(v)}'" if isinstance(v, str) and not to_str(v).isdigit() else to_str(v)
            conds.append(f"(({name} = {lit}))")
        query = "SELECT * FROM MSFT_NetTCPConnection  WHERE " + " AND ".join(conds)
        rec = c.record(
            "No matching MSFT_NetTCPConnection objects found by CIM query for instances of the "
            f"ROOT/StandardCimv2/MSFT_NetTCPConnection class on the  CIM server: {query}. Verify "
            "query parameters "
            "and retry.",
            "CmdletizationQuery_NotFound",
            "ObjectNotFound",
            "CimJobException",
            target_name="MSFT_NetTCPConnection",
            target_type="String",
            exception_type="Microsoft.PowerShell.Cmdletization.Cim.CimJobException",
        )
    rec.fqid = rec.fqid.split(",")[0] + ",Get-NetTCPConnection"
    c.write_error(rec)
    return []


def type_name_of(v: Any) -> str:
    from lab.windows.psvalues import type_name

    return type_name(v).rsplit(".", 1)[-1]


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.utility/get-member?view=powershell-5.1
@cmdlet("Get-Command", [Param("Name", position=0)], aliases=("gcm",))
def get_command(rt: Interp, c: Call) -> Iterable[Any]:
    name = to_str(c.get("Name"))
    spec = rt.resolve_command(name)
    if spec is None:
        c.write_error(
            c.record(
                f"The term '{name}' is not recognized as the name of a cmdlet, function, script "
                "file, or operable "
                "program. Check the spelling of the name, or if a path was included, verify that the "
                "path is correct "
                "and try again.",
                "CommandNotFoundException",
                "ObjectNotFound",
                "CommandNotFoundException",
                target_name=name,
                target_type="String",
            )
        )
        return []
    return [
        PSObject(
            {
                "CommandType": "Cmdlet",
                "Name": spec.name,
                "Version": "3.1.0.0",
                "Source": "WebAdministration" if spec.webadmin else "Microsoft.PowerShell.Management",
            },
            "System.Management.Automation.CmdletInfo",
            spec.name,
        )
    ]


# https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.utility/new-object?view=powershell-5.1
@cmdlet("New-Object", [Param("TypeName", position=0), Param("ArgumentList", position=1), Param("Property")])
def new_object(rt: Interp, c: Call) -> Iterable[Any]:
    from lab.windows.psvalues import UTF8_NO_BOM, resolve_type

    tn = to_str(c.get("TypeName"))
    full = resolve_type(tn) or tn
    if full.lower() in ("psobject", "system.management.automation.psobject", "pscustomobject"):
        props = c.get("Property")
        return [PSObject({to_str(k): v for k, v in props.items()} if isinstance(props, Hashtable) else {})]
    if full == "System.Text.UTF8Encoding":
        args = as_list(c.get("ArgumentList"))
        return [UTF8 if args and to_bool(args[0]) else UTF8_NO_BOM]
    if full == "System.Collections.Hashtable":
        return [Hashtable()]
    raise c.terminate(
        c.record(
            f"Cannot find type [{tn}]: verify that the assembly containing this type is loaded.",
            "TypeNotFound",
            "InvalidType",
            "PSArgumentException",
            target_name=tn,
            target_type="String",
        )
    )


__all__ = ["COMMANDS", "PSError", "time"]
