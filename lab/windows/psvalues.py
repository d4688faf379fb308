"""Values of the PowerShell stand-in: objects, conversions, operators, output formatting.

Semantics from the PowerShell Language Specification 3.0 ch. 6 "Conversions" and 7
"Expressions", about_Comparison_Operators, about_Arithmetic_Operators, about_Join,
about_Split, about_Wildcards, about_Booleans (learn.microsoft.com/en-us/powershell/module/
microsoft.powershell.core/about/<topic>?view=powershell-5.1). Messages: PowerShell/PowerShell
src/System.Management.Automation/resources/*.resx.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lab.windows.psparse import Block

# --------------------------------------------------------------------------- objects


class PSObject:
    """A PSCustomObject (or another object shown by its properties): ordered properties,
    case-insensitive names (about_Properties)."""

    def __init__(
        self,
        props: dict[str, Any] | None = None,
        type_name: str = "System.Management.Automation.PSCustomObject",
        text: str | None = None,
    ) -> None:
        self._props: dict[str, tuple[str, Any]] = {}
        for k, v in (props or {}).items():
            self.set(k, v)
        self.type_name = type_name
        self.text = text  # ToString(); None: "@{a=1; b=2}" as a PSCustomObject shows

    def set(self, name: str, value: Any) -> None:
        key = name.casefold()
        old = self._props.get(key)
        self._props[key] = (old[0] if old else name, value)

    def has(self, name: str) -> bool:
        return name.casefold() in self._props

    def get(self, name: str) -> Any:
        item = self._props.get(name.casefold())
        return item[1] if item else None

    def items(self) -> list[tuple[str, Any]]:
        return list(self._props.values())

    def names(self) -> list[str]:
        return [n for n, _ in self._props.values()]

    def __repr__(self) -> str:
        return f"PSObject({self.type_name}, {self.items()!r})"


class Hashtable:
    """@{...}: case-insensitive string keys (System.Collections.Hashtable). Insertion order
    is kept (the real one's order is the hash order: a known difference, see README)."""

    def __init__(self, ordered: bool = False) -> None:
        self._d: dict[Any, tuple[Any, Any]] = {}
        self.ordered = ordered

    @staticmethod
    def _k(key: Any) -> Any:
        return key.casefold() if isinstance(key, str) else key

    def __setitem__(self, key: Any, value: Any) -> None:
        k = self._k(key)
        old = self._d.get(k)
        self._d[k] = (old[0] if old else key, value)

    def __getitem__(self, key: Any) -> Any:
        item = self._d.get(self._k(key))
        return item[1] if item else None

    def __contains__(self, key: Any) -> bool:
        return self._k(key) in self._d

    def __len__(self) -> int:
        return len(self._d)

    def remove(self, key: Any) -> None:
        self._d.pop(self._k(key), None)

    def items(self) -> list[tuple[Any, Any]]:
        return list(self._d.values())

    def keys(self) -> list[Any]:
        return [k for k, _ in self._d.values()]

    def values(self) -> list[Any]:
        return [v for _, v in self._d.values()]


@dataclass
class ScriptBlock:
    body: Block
    text: str


@dataclass
class TypeRef:
    """A type literal's value: [int], [System.IO.Path], ..."""

    name: str  # the resolved full name, e.g. System.Int32

    def __str__(self) -> str:
        return self.name


@dataclass
class Encoding:
    """A System.Text.Encoding (only what scripts read of it)."""

    python: str  # the codec
    code_page: int
    web_name: str
    encoding_name: str
    bom: bool = False


# The console's OEM code page of an en-US Windows Server (437, "OEM United States"):
# [Console]::OutputEncoding's default (about_Character_Encoding, 5.1; Microsoft Learn
# "Code Page Identifiers": 437 IBM437 "OEM United States").
OEM = Encoding("cp437", 437, "IBM437", "OEM United States")
UTF8 = Encoding("utf-8", 65001, "utf-8", "Unicode (UTF-8)", bom=True)
UTF8_NO_BOM = Encoding("utf-8", 65001, "utf-8", "Unicode (UTF-8)")
ASCII = Encoding("ascii", 20127, "us-ascii", "US-ASCII")
UNICODE = Encoding("utf-16-le", 1200, "utf-16", "Unicode", bom=True)
ANSI = Encoding("cp1252", 1252, "Windows-1252", "Western European (Windows)")


@dataclass
class ErrorRecord:
    """System.Management.Automation.ErrorRecord, as the console shows it (see format_error)."""

    message: str
    fqid: str  # FullyQualifiedErrorId, e.g. "PathNotFound,Microsoft.PowerShell.Commands.GetItemCommand"
    category: str = "NotSpecified"
    reason: str = "RuntimeException"  # the exception's type name
    target_name: str = ""
    target_type: str = ""
    activity: str = ""  # the command name in [...] of CategoryInfo
    exception_type: str = "System.Management.Automation.RuntimeException"
    target_object: Any = None
    # Where it happened (set by the runtime): the command as typed, the script, offsets.
    command_name: str = ""
    script: str = ""
    start: int = -1
    end: int = -1
    header: str | None = None  # the "<x> : " prefix (None: the command name)
    position: bool = True  # print "At line:.. char:.." (Write-Error at top level: no)
    parse_error: bool = False

    def category_info(self) -> str:
        return (
            f"{self.category}: ({self.target_name}:{self.target_type}) [{self.activity}], {self.reason}"
            if self.target_name or self.target_type
            else f"{self.category}: (:) [{self.activity}], {self.reason}"
        )

    def __str__(self) -> str:
        return self.message


@dataclass
class PathInfo:
    """System.Management.Automation.PathInfo ($pwd, Resolve-Path)."""

    path: str

    def __str__(self) -> str:
        return self.path


@dataclass
class FileItem:
    """System.IO.FileInfo / DirectoryInfo as the FileSystem provider returns them."""

    full_name: str  # C:\...
    is_dir: bool
    length: int
    mtime: float
    # FileInfo.ToString() in .NET Framework is the path it was created from: the bare name
    # for Get-ChildItem's children, the full path for Get-Item (PowerShell/PowerShell
    # issue #6057, "Get-ChildItem output stringifies as the file name ... in Windows
    # PowerShell").
    text: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        tail = self.full_name.rstrip("\\").rsplit("\\", 1)[-1]
        return tail if tail else self.full_name

    def __str__(self) -> str:
        return self.text or self.full_name


# --------------------------------------------------------------------------- type names


TYPE_ALIASES = {
    # about_Type_Accelerators (5.1)
    "int": "System.Int32",
    "int32": "System.Int32",
    "long": "System.Int64",
    "int64": "System.Int64",
    "double": "System.Double",
    "float": "System.Single",
    "single": "System.Single",
    "decimal": "System.Decimal",
    "string": "System.String",
    "bool": "System.Boolean",
    "boolean": "System.Boolean",
    "char": "System.Char",
    "byte": "System.Byte",
    "datetime": "System.DateTime",
    "timespan": "System.TimeSpan",
    "array": "System.Array",
    "object": "System.Object",
    "hashtable": "System.Collections.Hashtable",
    "pscustomobject": "System.Management.Automation.PSObject",
    "psobject": "System.Management.Automation.PSObject",
    "ordered": "ordered",
    "version": "System.Version",
    "math": "System.Math",
    "console": "System.Console",
    "convert": "System.Convert",
    "environment": "System.Environment",
    "regex": "System.Text.RegularExpressions.Regex",
    "void": "System.Void",
    "scriptblock": "System.Management.Automation.ScriptBlock",
    "guid": "System.Guid",
    "uri": "System.Uri",
    "io.path": "System.IO.Path",
    "system.io.path": "System.IO.Path",
    "text.encoding": "System.Text.Encoding",
    "system.text.encoding": "System.Text.Encoding",
    "io.file": "System.IO.File",
    "system.io.file": "System.IO.File",
    "text.utf8encoding": "System.Text.UTF8Encoding",
    "system.text.utf8encoding": "System.Text.UTF8Encoding",
    "system.management.automation.errorrecord": "System.Management.Automation.ErrorRecord",
    "management.automation.errorrecord": "System.Management.Automation.ErrorRecord",
    "exception": "System.Exception",
    "system.exception": "System.Exception",
    "system.management.automation.itemnotfoundexception": (
        "System.Management.Automation.ItemNotFoundException"
    ),
    "management.automation.itemnotfoundexception": "System.Management.Automation.ItemNotFoundException",
    "system.management.automation.commandnotfoundexception": (
        "System.Management.Automation.CommandNotFoundException"
    ),
    "management.automation.commandnotfoundexception": "System.Management.Automation.CommandNotFoundException",
    "system.management.automation.runtimeexception": "System.Management.Automation.RuntimeException",
    "management.automation.runtimeexception": "System.Management.Automation.RuntimeException",
    "system.io.ioexception": "System.IO.IOException",
    "io.ioexception": "System.IO.IOException",
    "system.unauthorizedaccessexception": "System.UnauthorizedAccessException",
    "unauthorizedaccessexception": "System.UnauthorizedAccessException",
}
for _full in set(TYPE_ALIASES.values()):
    TYPE_ALIASES.setdefault(_full.lower(), _full)
for _short in ("int32", "int64", "double", "string", "boolean", "datetime", "timespan", "array", "object"):
    TYPE_ALIASES.setdefault("system." + _short, TYPE_ALIASES[_short])


def resolve_type(name: str) -> str | None:
    base = name.strip()
    array = base.endswith("[]")
    if array:
        base = base[:-2]
    full = TYPE_ALIASES.get(base.lower())
    if full is None:
        return None
    return full + "[]" if array else full


def type_name(v: Any) -> str:
    """The .NET type name PowerShell shows for a value."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "System.Boolean"
    if isinstance(v, int):
        return "System.Int32" if -(2**31) <= v < 2**31 else "System.Int64"
    if isinstance(v, float):
        return "System.Double"
    if isinstance(v, str):
        return "System.String"
    if isinstance(v, list):
        return "System.Object[]"
    if isinstance(v, Hashtable):
        return (
            "System.Collections.Specialized.OrderedDictionary"
            if v.ordered
            else "System.Collections.Hashtable"
        )
    if isinstance(v, dt.datetime):
        return "System.DateTime"
    if isinstance(v, dt.timedelta):
        return "System.TimeSpan"
    if isinstance(v, PSObject):
        return v.type_name
    if isinstance(v, FileItem):
        return "System.IO.DirectoryInfo" if v.is_dir else "System.IO.FileInfo"
    if isinstance(v, ScriptBlock):
        return "System.Management.Automation.ScriptBlock"
    if isinstance(v, ErrorRecord):
        return "System.Management.Automation.ErrorRecord"
    if isinstance(v, Encoding):
        return "System.Text.Encoding"
    if isinstance(v, TypeRef):
        return "System.RuntimeType"
    if isinstance(v, PathInfo):
        return "System.Management.Automation.PathInfo"
    return "System.Object"


# --------------------------------------------------------------------------- conversions


class ConversionError(Exception):
    """A failed conversion; the runtime turns it into a RuntimeException record."""

    def __init__(self, message: str, fqid: str = "InvalidCastFromStringToInteger") -> None:
        super().__init__(message)
        self.fqid = fqid


def is_collection(v: Any) -> bool:
    return isinstance(v, list)


def as_list(v: Any) -> list[Any]:
    """A value as the items a pipeline would carry ($null: none)."""
    if v is None:
        return []
    if isinstance(v, list):
        return v
    return [v]


def unroll(items: list[Any]) -> Any:
    """Pipeline output as a value: nothing -> $null, one item -> it, more -> an array."""
    if not items:
        return None
    if len(items) == 1:
        return items[0]
    return list(items)


def format_double(v: float) -> str:
    """Double.ToString() of .NET Framework: 15 significant digits, 'E+XX' exponents."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    s = f"{v:.15g}"
    if "e" in s:
        mant, exp = s.split("e")
        sign = "-" if exp.startswith("-") else "+"
        s = f"{mant}E{sign}{exp.lstrip('+-').zfill(2)}"
    return s


def format_date_invariant(d: dt.datetime) -> str:
    """A DateTime in a string ("$date", [string]$date): InvariantCulture, MM/dd/yyyy HH:mm:ss
    (about_Quoting_Rules: variables in strings are converted with the invariant culture)."""
    return d.strftime("%m/%d/%Y %H:%M:%S")


def format_date_long(d: dt.datetime) -> str:
    """A DateTime on the console (en-US, F format: dddd, MMMM d, yyyy h:mm:ss tt)."""
    hour = d.hour % 12 or 12
    return f"{d:%A}, {d:%B} {d.day}, {d.year} {hour}:{d:%M:%S} {'AM' if d.hour < 12 else 'PM'}"


def format_timespan(t: dt.timedelta) -> str:
    total = t.total_seconds()
    sign = "-" if total < 0 else ""
    total = abs(total)
    days, rem = divmod(total, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, seconds = divmod(rem, 60)
    whole = int(seconds)
    frac = round((seconds - whole) * 10_000_000)
    s = f"{sign}{int(days)}." if days else sign
    s += f"{int(hours):02d}:{int(minutes):02d}:{whole:02d}"
    return s + (f".{frac:07d}" if frac else "")


def to_str(v: Any) -> str:
    """[string]$v / "$v" (language spec 6.8; arrays joined with $OFS, a space)."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return format_double(v)
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        return " ".join(to_str(x) for x in v)
    if isinstance(v, dt.datetime):
        return format_date_invariant(v)
    if isinstance(v, dt.timedelta):
        return format_timespan(v)
    if isinstance(v, Hashtable):
        return type_name(v)
    if isinstance(v, PSObject):
        if v.text is not None:
            return v.text
        return "@{" + "; ".join(f"{k}={to_str(x)}" for k, x in v.items()) + "}"
    if isinstance(v, ScriptBlock):
        return v.text
    if isinstance(v, Encoding):
        return "System.Text." + ("UTF8Encoding" if v.code_page == 65001 else "SBCSCodePageEncoding")
    return str(v)


def to_bool(v: Any) -> bool:
    """about_Booleans: $null, 0, '', empty arrays are false; a one-item array is its item."""
    if v is None:
        return False
    if isinstance(v, bool):
        return v
    if isinstance(v, int | float):
        return v != 0
    if isinstance(v, str):
        return v != ""
    if isinstance(v, list):
        if not v:
            return False
        if len(v) == 1:
            return to_bool(v[0])
        return True
    return True


def _number_from_str(s: str) -> int | float | None:
    t = s.strip()
    if t == "":
        return 0
    try:
        if t.lower().startswith("0x"):
            return int(t, 16)
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        return None


def to_number(v: Any, target: str = "System.Int32") -> int | float:
    if v is None:
        return 0
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int | float):
        return v
    if isinstance(v, str):
        n = _number_from_str(v)
        if n is None:
            raise ConversionError(
                f'Cannot convert value "{v}" to type "{target}". Error: "Input string was not in a '
                'correct format."'
            )
        return n
    if isinstance(v, list) and len(v) == 1:
        return to_number(v[0], target)
    raise ConversionError(
        f'Cannot convert the "{to_str(v)}" value of type "{type_name(v)}" to type "{target}".',
        "InvalidCastException" if not isinstance(v, list) else "ConvertToFinalInvalidCastException",
    )


def to_int(v: Any) -> int:
    n = to_number(v)
    if isinstance(n, float):
        return round(n)  # banker's rounding, as [int] does (Math.Round to even)
    return n


def to_datetime(v: Any) -> dt.datetime:
    if isinstance(v, dt.datetime):
        return v
    if isinstance(v, str):
        for fmt in ("%m/%d/%Y %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d", "%m/%d/%Y"):
            try:
                return dt.datetime.strptime(v.strip(), fmt)
            except ValueError:
                continue
        try:
            return dt.datetime.fromisoformat(v.strip()).replace(tzinfo=None)
        except ValueError:
            pass
    raise ConversionError(
        f'Cannot convert value "{to_str(v)}" to type "System.DateTime". Error: "String was not '
        "recognized as a "
        'valid DateTime."',
        "InvalidCastParseTargetInvocationWithFormatProvider",
    )


def convert(v: Any, type_full: str) -> Any:
    """A cast [type]$v."""
    t = type_full
    if t.endswith("[]"):
        elem = t[:-2]
        return [convert(x, elem) if elem != "System.Object" else x for x in as_list(v)]
    if t in ("System.Int32", "System.Int64", "System.Byte"):
        return to_int(v)
    if t in ("System.Double", "System.Single", "System.Decimal"):
        return float(to_number(v, t))
    if t == "System.String":
        return None if v is None and False else to_str(v)
    if t == "System.Boolean":
        return to_bool(v)
    if t == "System.DateTime":
        return to_datetime(v)
    if t == "System.Array":
        return as_list(v) if isinstance(v, list) else [v]
    if t == "System.Object":
        return v
    if t == "System.Collections.Hashtable":
        if isinstance(v, Hashtable):
            return v
    if t == "System.Management.Automation.PSObject":
        if isinstance(v, Hashtable):
            return PSObject({to_str(k): x for k, x in v.items()})
        return v
    if t == "System.Version":
        return PSObject(
            dict(
                zip(
                    ("Major", "Minor", "Build", "Revision"),
                    [int(x) for x in to_str(v).split(".")],
                    strict=False,
                )
            ),
            "System.Version",
            to_str(v),
        )
    if t == "System.Void":
        return None
    raise ConversionError(
        f'Cannot convert the "{to_str(v)}" value of type "{type_name(v)}" to type "{t}".',
        "ConvertToFinalInvalidCastException",
    )


# --------------------------------------------------------------------------- operators


def wildcard_regex(pattern: str) -> re.Pattern[str]:
    """about_Wildcards: * ? [abc] [a-z]; ` escapes; the whole string must match."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "`" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                out.append("[" + pattern[i + 1 : j].replace("\\", "\\\\") + "]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z", re.IGNORECASE | re.DOTALL)


def has_wildcard(s: str) -> bool:
    return any(c in s for c in "*?[")


def dotnet_regex(pattern: str, case_sensitive: bool) -> re.Pattern[str]:
    # .NET named groups (?<name>...) are Python's (?P<name>...).
    py = re.sub(r"\(\?<([A-Za-z_]\w*)>", r"(?P<\1>", pattern)
    return re.compile(py, 0 if case_sensitive else re.IGNORECASE)


def dotnet_replacement(rep: str) -> str:
    """A .NET replacement string ($1, ${name}, $0, $&, $$) in Python's re syntax."""
    out: list[str] = []
    i = 0
    while i < len(rep):
        c = rep[i]
        if c == "\\":
            out.append("\\\\")
        elif c == "$" and i + 1 < len(rep):
            m = re.match(r"\$(\d+)|\$\{(\w+)\}|\$(&)|\$(\$)", rep[i:])
            if m:
                if m.group(1) is not None:
                    out.append(f"\\g<{m.group(1)}>")
                elif m.group(2) is not None:
                    out.append(f"\\g<{m.group(2)}>")
                elif m.group(3):
                    out.append("\\g<0>")
                else:
                    out.append("$")
                i += len(m.group(0))
                continue
            out.append(c)
        else:
            out.append(c)
        i += 1
    return "".join(out)


def _eq(a: Any, b: Any, cs: bool) -> bool:
    if a is None:
        return b is None
    if isinstance(a, str):
        if b is None:
            return False
        sb = to_str(b)
        return a == sb if cs else a.casefold() == sb.casefold()
    if isinstance(a, bool):
        return a == to_bool(b)
    if isinstance(a, int | float):
        if b is None:
            return False
        try:
            return a == to_number(b)
        except ConversionError:
            return False
    if isinstance(a, dt.datetime):
        try:
            return a == to_datetime(b)
        except ConversionError:
            return False
    if isinstance(a, Encoding) and isinstance(b, Encoding):
        return a.code_page == b.code_page
    return a is b or a == b


def _order(a: Any, b: Any, cs: bool) -> int:
    if isinstance(a, str):
        sa, sb = (a, to_str(b)) if cs else (a.casefold(), to_str(b).casefold())
        return (sa > sb) - (sa < sb)
    if a is None:
        return -1 if b is not None else 0
    if isinstance(a, int | float):
        if b is None:
            return 1
        nb = to_number(b)
        return (a > nb) - (a < nb)
    if isinstance(a, dt.datetime):
        db = to_datetime(b)
        return (a > db) - (a < db)
    if isinstance(a, dt.timedelta) and isinstance(b, dt.timedelta):
        return (a > b) - (a < b)
    raise ConversionError(f'Cannot compare "{to_str(a)}" because it is not IComparable.', "NotIcomparable")


def compare_scalar(op: str, a: Any, b: Any, cs: bool) -> bool:
    if op == "eq":
        return _eq(a, b, cs)
    if op == "ne":
        return not _eq(a, b, cs)
    if op in ("gt", "ge", "lt", "le"):
        r = _order(a, b, cs)
        return {"gt": r > 0, "ge": r >= 0, "lt": r < 0, "le": r <= 0}[op]
    if op in ("like", "notlike"):
        pat = wildcard_regex(to_str(b))
        if cs:
            pat = re.compile(pat.pattern, re.DOTALL)
        hit = pat.match(to_str(a)) is not None
        return hit if op == "like" else not hit
    raise ValueError(op)


# --------------------------------------------------------------------------- JSON


def _json_string(s: str) -> str:
    """JavaScriptSerializer's escaping (Windows PowerShell 5.1's ConvertTo-Json): also <, >,
    ', & as \\u003c etc. (PowerShell issue #7694 shows 5.1's "\\u0027")."""
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\b":
            out.append("\\b")
        elif ch == "\f":
            out.append("\\f")
        elif o < 0x20 or ch in "<>'&":
            out.append(f"\\u{o:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def to_json_tree(v: Any, depth: int, level: int = 0) -> Any:
    """The value as JSON-able data: ('obj', [(k, v)]) / ('arr', [...]) / scalars as text."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return format_double(v) if not math.isnan(v) else '"NaN"'
    if isinstance(v, str):
        return _json_string(v)
    if isinstance(v, dt.datetime):
        epoch = dt.datetime(1970, 1, 1)
        return _json_string(f"\\/Date({int((v - epoch).total_seconds() * 1000)})\\/").replace("\\\\/", "\\/")
    if isinstance(v, Encoding | ScriptBlock | TypeRef | dt.timedelta | PathInfo):
        return _json_string(to_str(v))
    # Containers nested deeper than -Depth are converted to strings (ConvertTo-Json docs).
    if level > depth:
        return _json_string(to_str(v))
    if isinstance(v, list):
        return ("arr", [to_json_tree(x, depth, level + 1) for x in v])
    if isinstance(v, Hashtable):
        return ("obj", [(to_str(k), to_json_tree(x, depth, level + 1)) for k, x in v.items()])
    if isinstance(v, PSObject):
        return ("obj", [(k, to_json_tree(x, depth, level + 1)) for k, x in v.items()])
    if isinstance(v, FileItem):
        return ("obj", [(k, to_json_tree(x, depth, level + 1)) for k, x in file_item_props(v)])
    if isinstance(v, ErrorRecord):
        return (
            "obj",
            [("Exception", _json_string(v.message)), ("FullyQualifiedErrorId", _json_string(v.fqid))],
        )
    return _json_string(to_str(v))


def json_compress(tree: Any) -> str:
    if isinstance(tree, tuple):
        kind, items = tree
        if kind == "arr":
            return "[" + ",".join(json_compress(x) for x in items) + "]"
        return "{" + ",".join(f"{_json_string(k)}:{json_compress(x)}" for k, x in items) + "}"
    return str(tree)


def json_pretty(tree: Any, pad: int = 0) -> str:
    """Windows PowerShell 5.1's own pretty printer (ConvertTo-Json without -Compress):
    4-space steps measured from where the value starts, two spaces after the colon, an empty
    array as '[\\r\\n\\r\\n]' (ConvertToJsonCommand.ConvertToPrettyJsonString in the 5.1
    sources; the layout is visible in any 5.1 output, e.g. PowerShell issue #2736)."""
    nl = "\r\n"
    if not isinstance(tree, tuple):
        return str(tree)
    kind, items = tree
    if kind == "arr":
        if not items:
            return "[" + nl + nl + " " * pad + "]"
        body = ("," + nl).join(" " * (pad + 4) + json_pretty(x, pad + 4) for x in items)
        return "[" + nl + body + nl + " " * pad + "]"
    if not items:
        return "{" + nl + nl + " " * pad + "}"
    lines = []
    for k, x in items:
        key = _json_string(k) + ":  "
        lines.append(" " * (pad + 4) + key + json_pretty(x, pad + 4 + len(key)))
    return "{" + nl + ("," + nl).join(lines) + nl + " " * pad + "}"


# --------------------------------------------------------------------------- output


def file_mode(item: FileItem) -> str:
    return "d-----" if item.is_dir else "-a----"


def file_item_props(item: FileItem) -> list[tuple[str, Any]]:
    parent = item.full_name.rsplit("\\", 1)[0] if "\\" in item.full_name.rstrip("\\") else ""
    if parent.endswith(":"):
        parent += "\\"
    props: list[tuple[str, Any]] = [
        ("Name", item.name),
        ("FullName", item.full_name),
        ("PSPath", "Microsoft.PowerShell.Core\\FileSystem::" + item.full_name),
        ("PSParentPath", "Microsoft.PowerShell.Core\\FileSystem::" + parent),
        ("PSChildName", item.name),
        ("PSIsContainer", item.is_dir),
        ("Mode", file_mode(item)),
        ("LastWriteTime", dt.datetime.fromtimestamp(item.mtime)),
        ("Extension", ("." + item.name.rsplit(".", 1)[1]) if "." in item.name else ""),
    ]
    if item.is_dir:
        props.append(("Parent", parent.rsplit("\\", 1)[-1] if parent else None))
    else:
        props += [("Length", item.length), ("DirectoryName", parent), ("Directory", parent)]
    return props + list(item.extra.items())


def _short_date(d: dt.datetime) -> str:
    hour = d.hour % 12 or 12
    return f"{d.month}/{d.day}/{d.year} {hour:>2}:{d:%M} {'AM' if d.hour < 12 else 'PM'}"


def _cell(v: Any) -> str:
    if isinstance(v, list):
        return "{" + ", ".join(_cell(x) for x in v) + "}"
    if isinstance(v, dt.datetime):
        return f"{v.month}/{v.day}/{v.year} {v.hour % 12 or 12}:{v:%M:%S} {'AM' if v.hour < 12 else 'PM'}"
    return to_str(v)


def _table(names: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(n), *(len(r[i]) for r in rows)) for i, n in enumerate(names)]
    line = " ".join(n.ljust(w) for n, w in zip(names, widths, strict=True)).rstrip()
    dashes = " ".join(("-" * len(n)).ljust(w) for n, w in zip(names, widths, strict=True)).rstrip()
    out = [line, dashes]
    for r in rows:
        out.append(" ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return out


def format_items(items: Iterable[Any]) -> list[str]:
    """Out-Default, minimally (about_Format.ps1xml): scalars one per line, objects with at
    most 4 properties as a table, others as 'Name : Value' lists, FileSystem items grouped
    by folder as the FileSystem view does, hashtables as Name/Value tables."""
    out: list[str] = []
    pending: list[Any] = []

    def flush() -> None:
        if not pending:
            return
        first = pending[0]
        if isinstance(first, FileItem):
            groups: dict[str, list[FileItem]] = {}
            for it in pending:
                parent = it.full_name.rstrip("\\").rsplit("\\", 1)[0]
                groups.setdefault(parent + ("\\" if parent.endswith(":") else ""), []).append(it)
            for parent, its in groups.items():
                out.extend(["", "", f"    Directory: {parent}", "", ""])
                out.append("Mode                LastWriteTime         Length Name")
                out.append("----                -------------         ------ ----")
                for it in its:
                    when = _short_date(dt.datetime.fromtimestamp(it.mtime))
                    length = "" if it.is_dir else str(it.length)
                    out.append(f"{file_mode(it):<6}       {when:>20} {length:>14} {it.name}")
            out.append("")
        elif isinstance(first, Hashtable):
            rows = [[to_str(k), _cell(v)] for h in pending for k, v in h.items()]
            out.append("")
            out.extend(_table(["Name", "Value"], rows) if rows else [])
            out.append("")
        else:
            names = first.names()
            rows = [[_cell(o.get(n)) for n in names] for o in pending]
            out.append("")
            out.extend(_table(names, rows))
            out.append("")
        pending.clear()

    def same_shape(a: Any, b: Any) -> bool:
        if isinstance(a, FileItem) and isinstance(b, FileItem):
            return True
        if isinstance(a, Hashtable) and isinstance(b, Hashtable):
            return True
        return isinstance(a, PSObject) and isinstance(b, PSObject) and a.names() == b.names()

    for v in items:
        tabular = (
            isinstance(v, FileItem)
            or isinstance(v, Hashtable)
            or (isinstance(v, PSObject) and v.text is None and 0 < len(v.names()) <= 4)
        )
        if tabular:
            if pending and not same_shape(pending[0], v):
                flush()
            pending.append(v)
            continue
        flush()
        if v is None:
            continue
        if isinstance(v, PSObject) and v.text is None:
            names = v.names()
            width = max((len(n) for n in names), default=0)
            out.append("")
            out.extend(f"{n.ljust(width)} : {_cell(x)}" for n, x in v.items())
            out.append("")
        elif isinstance(v, dt.datetime):
            out.extend(["", format_date_long(v), ""])
        elif isinstance(v, dt.timedelta):
            secs = v.total_seconds()
            out.append("")
            for name, value in (
                ("Days", int(secs // 86400)),
                ("Hours", v.seconds // 3600),
                ("Minutes", (v.seconds // 60) % 60),
                ("Seconds", v.seconds % 60),
                ("Milliseconds", v.microseconds // 1000),
                ("TotalSeconds", secs),
                ("TotalMilliseconds", secs * 1000),
            ):
                out.append(f"{name:<17} : {to_str(value)}")
            out.append("")
        elif isinstance(v, ErrorRecord):
            out.extend(format_error(v))
        else:
            out.extend(re.split(r"\r?\n", to_str(v)))
    flush()
    return out


# --------------------------------------------------------------------------- errors


def line_col(script: str, offset: int) -> tuple[int, int, str]:
    """1-based line and column of `offset`, and that line's text."""
    before = script[:offset]
    line = before.count("\n") + 1
    start = before.rfind("\n") + 1
    end = script.find("\n", offset)
    text = script[start : end if end >= 0 else len(script)].rstrip("\r")
    return line, offset - start + 1, text


def position_message(script: str, start: int, end: int) -> list[str]:
    """InvocationInfo.PositionMessage: 'At line:L char:C', the line, the squiggle."""
    line, col, text = line_col(script, start)
    seg_end = min(end, start + len(text) - col + 1) if end > start else start + 1
    width = max(1, seg_end - start)
    return [f"At line:{line} char:{col}", f"+ {text}", "+ " + " " * (col - 1) + "~" * width]


def format_error(rec: ErrorRecord) -> list[str]:
    """An error record as Windows PowerShell 5.1's console shows it (ErrorView NormalView:
    the ErrorRecord view of PowerShellCore_format_ps1xml, 4-space indented CategoryInfo and
    FullyQualifiedErrorId, then a line with one space)."""
    lines: list[str] = []
    if rec.parse_error:
        if rec.start >= 0:
            lines += position_message(rec.script, rec.start, rec.end)
        lines += rec.message.split("\n")
    else:
        header = rec.header if rec.header is not None else rec.command_name
        first = f"{header} : {rec.message}" if header else rec.message
        lines += first.split("\n")
        if rec.position and rec.start >= 0:
            lines += position_message(rec.script, rec.start, rec.end)
    lines.append("    + CategoryInfo          : " + rec.category_info())
    lines.append("    + FullyQualifiedErrorId : " + rec.fqid)
    lines.append(" ")
    return lines


def iter_input(v: Any) -> Iterator[Any]:
    yield from as_list(v)
