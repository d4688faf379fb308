"""Windows PowerShell 5.1 stand-in: the interpreter (parser in psparse.py, values in
psvalues.py, cmdlets in cmdlets.py / iis.py).

What it follows (each from the source named):

* Errors: parse errors stop everything before anything runs (about_Parsing); a cmdlet's
  error is non-terminating unless -ErrorAction / $ErrorActionPreference say Stop
  (about_CommonParameters, about_Preference_Variables); statement-terminating errors
  (unknown command, parameter binding, method call on $null, ...) end only their statement
  unless inside try or with $ErrorActionPreference = 'Stop'; `throw` and escalated Stop
  errors end the script (about_Throw, about_Try_Catch_Finally).
* Exit code of `powershell -Command/-EncodedCommand`: `exit N` gives N; a script ended by a
  terminating error gives 1; otherwise 0 when the last statement succeeded ($? true) and 1
  when it failed (about_PowerShell_exe, 5.1: "The process exit code is determined by status
  of the last (executed) command within the script block. The exit code is 0 when $? is
  $true or 1 when $? is $false"; PowerShell/PowerShell issue #13501).
* The error stream: with -EncodedCommand, not interactive and stderr redirected (always so
  over SSH without a PTY) Windows PowerShell writes it as CLIXML: '#< CLIXML' then one
  <S S="Error">line_x000D__x000A_</S> per line (PowerShell/PowerShell src/
  Microsoft.PowerShell.ConsoleHost/host/msh/ConsoleHost.cs, ErrorFormat: "If this shell is
  invoked in minishell interop mode and error is redirected, always write data in error
  stream in xml format" - 5.1 has no -OutputFormat escape, that came with pwsh 6, issue
  #5912; the stderr of `ssh -T host powershell -EncodedCommand ...` in issue #16678).
  With -Command the errors are plain text on stderr.
* Output: objects formatted for the console, lines ending in CRLF, encoded with
  [Console]::OutputEncoding: the OEM code page (437) unless the script sets it (see README).
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lab.windows import psparse as ast
from lab.windows.psparse import ParseError, parse
from lab.windows.psvalues import (
    ANSI,
    ASCII,
    OEM,
    UNICODE,
    UTF8,
    UTF8_NO_BOM,
    ConversionError,
    Encoding,
    ErrorRecord,
    FileItem,
    Hashtable,
    PathInfo,
    PSObject,
    ScriptBlock,
    TypeRef,
    as_list,
    compare_scalar,
    convert,
    dotnet_regex,
    dotnet_replacement,
    file_item_props,
    format_error,
    format_items,
    resolve_type,
    to_bool,
    to_datetime,
    to_int,
    to_number,
    to_str,
    type_name,
    unroll,
)

if TYPE_CHECKING:
    from lab.windows.drive import WinEnv

PS_VERSION = "5.1.17763.5458"
NOT_RECOGNIZED = (
    # Windows PowerShell 5.1's text (DiscoveryExceptions.resx CommandNotFoundException before
    # PowerShell/PowerShell commit 8626937 "Change "operable" to "executable"", 2020).
    "The term '{0}' is not recognized as the name of a cmdlet, function, script file, or operable "
    "program. Check the spelling of the name, or if a path was included, verify that the path is "
    "correct and try again."
)
OP_METHODS = {
    "+": "op_Addition",
    "-": "op_Subtraction",
    "*": "op_Multiply",
    "/": "op_Division",
    "%": "op_Modulus",
}
ACTION_PREFERENCES = ("stop", "continue", "silentlycontinue", "ignore", "inquire", "suspend")


# --------------------------------------------------------------------------- control flow


class PSError(Exception):
    """A terminating error; script_level: it ends the script unless caught (throw, Stop)."""

    def __init__(self, record: ErrorRecord, script_level: bool = False) -> None:
        super().__init__(record.message)
        self.record = record
        self.script_level = script_level


class PSExit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class PSBreak(Exception):
    pass


class PSContinue(Exception):
    pass


class PSReturn(Exception):
    def __init__(self, output: list[Any]) -> None:
        super().__init__()
        self.output = output


def runtime_error(message: str, fqid: str, category: str = "InvalidOperation", **kw: Any) -> ErrorRecord:
    return ErrorRecord(message=message, fqid=fqid, category=category, **kw)


# --------------------------------------------------------------------------- host


class Host:
    """The console host's two streams over pipes (what an SSH exec session sees)."""

    def __init__(
        self,
        write_stdout: Callable[[bytes], None],
        write_stderr: Callable[[bytes], None],
        clixml_errors: bool = False,
    ) -> None:
        self._out = write_stdout
        self._err = write_stderr
        self.clixml = clixml_errors
        self._clixml_open = False
        self.output_encoding: Encoding = OEM
        self._lock = threading.Lock()

    def _encode(self, text: str) -> bytes:
        return text.encode(self.output_encoding.python, errors="replace")

    def write(self, text: str) -> None:
        with self._lock:
            self._out(self._encode(text))

    def write_line(self, text: str = "") -> None:
        self.write(text + "\r\n")

    def error_lines(self, lines: list[str], stream: str = "Error") -> None:
        with self._lock:
            if not self.clixml:
                self._err(self._encode("".join(line + "\r\n" for line in lines)))
                return
            chunks: list[str] = []
            if not self._clixml_open:
                chunks.append(
                    '#< CLIXML\r\n<Objs Version="1.1.0.1" xmlns="http://schemas.microsoft.com/powershell/2004/04">'
                )
                self._clixml_open = True
            for line in lines:
                chunks.append(f'<S S="{stream}">{clixml_escape(line + chr(13) + chr(10))}</S>')
            self._err(self._encode("".join(chunks)))

    def close(self) -> None:
        with self._lock:
            if self._clixml_open:
                self._err(self._encode("</Objs>"))
                self._clixml_open = False


def clixml_escape(s: str) -> str:
    """CLIXML string encoding: XML entities, and control characters (and '_x' sequences) as
    _xHHHH_ ([MS-PSRP] 2.2.5.3.2 "Encoding strings")."""
    out: list[str] = []
    i = 0
    while i < len(s):
        ch = s[i]
        o = ord(ch)
        if ch == "_" and s[i + 1 : i + 2] == "x":
            out.append("_x005F_")
        elif ch == "&":
            out.append("&amp;")
        elif ch == "<":
            out.append("&lt;")
        elif ch == ">":
            out.append("&gt;")
        elif o < 0x20 or 0x7F <= o < 0xA0:
            out.append(f"_x{o:04X}_")
        else:
            out.append(ch)
        i += 1
    return "".join(out)


# --------------------------------------------------------------------------- commands


@dataclass
class Param:
    name: str
    switch: bool = False
    position: int | None = None
    aliases: tuple[str, ...] = ()
    type_text: str = "System.String"  # for "Missing an argument for parameter" messages
    remaining: bool = False  # takes all remaining positional arguments


@dataclass
class CmdletSpec:
    name: str  # canonical, e.g. Get-ChildItem
    func: Callable[[Interp, Call], Iterable[Any] | None]
    params: list[Param]
    noun_class: str = ""  # e.g. Microsoft.PowerShell.Commands.GetChildItemCommand
    pipeline: bool = False  # takes pipeline input (func is called once with all of it)
    webadmin: bool = False  # part of the WebAdministration module


COMMANDS: dict[str, CmdletSpec] = {}
ALIASES: dict[str, str] = {}
# Common parameters every cmdlet accepts (about_CommonParameters) and -Confirm.
COMMON = [
    Param("ErrorAction", aliases=("ea",), type_text="System.Management.Automation.ActionPreference"),
    Param("WarningAction", aliases=("wa",), type_text="System.Management.Automation.ActionPreference"),
    Param("InformationAction", aliases=("infa",), type_text="System.Management.Automation.ActionPreference"),
    Param("ErrorVariable", aliases=("ev",)),
    Param("OutVariable", aliases=("ov",)),
    Param("Verbose", switch=True, aliases=("vb",)),
    Param("Debug", switch=True, aliases=("db",)),
    Param("Confirm", switch=True, aliases=("cf",)),
]


def cmdlet(
    name: str,
    params: list[Param],
    noun_class: str = "",
    pipeline: bool = False,
    aliases: tuple[str, ...] = (),
    webadmin: bool = False,
) -> Callable[
    [Callable[[Interp, Call], Iterable[Any] | None]], Callable[[Interp, Call], Iterable[Any] | None]
]:
    def register(
        func: Callable[[Interp, Call], Iterable[Any] | None],
    ) -> Callable[[Interp, Call], Iterable[Any] | None]:
        COMMANDS[name.lower()] = CmdletSpec(
            name,
            func,
            params,
            noun_class or "Microsoft.PowerShell.Commands." + name.replace("-", "") + "Command",
            pipeline,
            webadmin,
        )
        for a in aliases:
            ALIASES[a.lower()] = name
        return func

    return register


@dataclass
class Call:
    """One invocation of a cmdlet: its bound parameters, pipeline input, and where it is."""

    rt: Interp
    spec: CmdletSpec
    invoked_as: str
    node: ast.Command
    bound: dict[str, Any] = field(default_factory=dict)  # canonical lower-case name -> value
    input: list[Any] | None = None
    failed: bool = False

    def has(self, name: str) -> bool:
        return name.lower() in self.bound

    def get(self, name: str, default: Any = None) -> Any:
        return self.bound.get(name.lower(), default)

    def switch(self, name: str) -> bool:
        return to_bool(self.bound.get(name.lower(), False))

    @property
    def error_action(self) -> str | None:
        v = self.bound.get("erroraction")
        return to_str(v).lower() if v is not None else None

    def record(self, message: str, fqid_head: str, category: str, reason: str, **kw: Any) -> ErrorRecord:
        return ErrorRecord(
            message=message,
            fqid=f"{fqid_head},{self.spec.noun_class}",
            category=category,
            reason=reason,
            activity=kw.pop("activity", self.spec.name),
            command_name=kw.pop("command_name", self.invoked_as),
            **kw,
        )

    def write_error(self, rec: ErrorRecord) -> None:
        """A non-terminating error (WriteError)."""
        self.failed = True
        self.rt.non_terminating(rec, self)

    def terminate(self, rec: ErrorRecord) -> PSError:
        """A statement-terminating error (ThrowTerminatingError): raise the result."""
        self.rt.locate(rec, self.node)
        return PSError(rec)


# --------------------------------------------------------------------------- interpreter


class Interp:
    def __init__(
        self,
        env: WinEnv,
        host: Host,
        read_stdin: Callable[[], list[str]] | None = None,
    ) -> None:
        import lab.windows.cmdlets
        import lab.windows.iis  # noqa: F401

        self.env = env
        self.host = host
        self.read_stdin = read_stdin or (lambda: [])
        self.script = ""
        self.vars: dict[str, Any] = {}
        self.errors: list[ErrorRecord] = []
        self.last_ok = True
        self.try_depth = 0
        self.err_redirect: list[list[Any] | None] = []  # per redirection: a sink or None ($null)
        self.webadmin_loaded = False
        self.cwd = env.home
        self.started = time.monotonic()
        self._input_cache: list[str] | None = None
        self.set_var("ErrorActionPreference", "Continue")
        self.set_var("ProgressPreference", "Continue")
        self.set_var("WarningPreference", "Continue")
        self.set_var("VerbosePreference", "SilentlyContinue")
        self.set_var("ConfirmPreference", "High")
        self.set_var("LASTEXITCODE", None)
        self.set_var("OutputEncoding", ASCII)  # 5.1's $OutputEncoding default (about_Character_Encoding)
        ver = PSObject(
            {"Major": 5, "Minor": 1, "Build": 17763, "Revision": 5458}, "System.Version", PS_VERSION
        )
        table = Hashtable()
        for k, v in (
            ("PSVersion", ver),
            ("PSEdition", "Desktop"),
            ("BuildVersion", "10.0.17763.5458"),
            ("CLRVersion", "4.0.30319.42000"),
            ("PSCompatibleVersions", ["1.0", "2.0", "3.0", "4.0", "5.0", "5.1.17763.5458"]),
            ("SerializationVersion", "1.1.0.1"),
            ("PSRemotingProtocolVersion", "2.3"),
            ("WSManStackVersion", "3.0"),
        ):
            table[k] = v
        self.set_var("PSVersionTable", table)
        self.set_var("HOME", env.home)
        self.set_var("PSHOME", "C:\\Windows\\System32\\WindowsPowerShell\\v1.0")
        self.set_var("PID", os.getpid())
        self.set_var("args", [])

    # ------------------------------------------------------------------ variables
    def set_var(self, name: str, value: Any) -> None:
        self.vars[name.casefold()] = value

    def get_var(self, name: str) -> Any:
        key = name.casefold()
        if key in ("true",):
            return True
        if key == "false":
            return False
        if key == "null":
            return None
        if key == "?":
            return self.last_ok
        if key == "error":
            return self.errors
        if key == "pwd":
            return PathInfo(self.cwd)
        if key == "input":
            if self._input_cache is None:
                self._input_cache = self.read_stdin()
            return list(self._input_cache)
        if key == "psitem":
            key = "_"
        if key.startswith("env:"):
            return self.env.environment().get(key[4:].casefold())
        if key.startswith(("global:", "script:", "local:")):
            return self.get_var(key.split(":", 1)[1])
        return self.vars.get(key)

    def assign_var(self, name: str, value: Any) -> None:
        key = name.casefold()
        if key.startswith(("global:", "script:", "local:")):
            key = key.split(":", 1)[1]
        if key == "null":
            # Assigning to $null discards the value: the documented way to suppress output
            # (learn.microsoft.com/powershell/scripting/learn/deep-dives/everything-about-null,
            # "Suppressing output": `$null = New-Item ...`).
            return
        if key in ("true", "false", "?", "error", "pwd", "home", "pshome", "pid", "input"):
            raise PSError(
                runtime_error(
                    f"Cannot overwrite variable {name} because it is read-only or constant.",
                    "VariableNotWritable",
                    "WriteError",
                    target_name=name,
                    target_type="String",
                    reason="SessionStateUnauthorizedAccessException",
                )
            )
        if key == "psitem":
            key = "_"
        if key == "erroractionpreference":
            text = to_str(value).lower()
            if text not in ACTION_PREFERENCES:
                raise PSError(
                    runtime_error(
                        f'Cannot convert value "{to_str(value)}" to type "System.Management.Automation.'
                        'ActionPreference". Error: "Unable to match the identifier name '
                        f"{to_str(value)} to a valid enumerator name. Specify one of the following "
                        "enumerator names and try again:\nSilentlyContinue, Stop, Continue, Inquire, "
                        'Ignore, Suspend"',
                        "RuntimeException",
                        "MetadataError",
                        reason="ArgumentTransformationMetadataException",
                    )
                )
        self.vars[key] = value

    def eap(self) -> str:
        return to_str(self.vars.get("erroractionpreference", "Continue")).lower()

    # ------------------------------------------------------------------ running
    def run(self, script: str) -> int:
        """Run a whole script (-Command / -EncodedCommand); returns the process exit code."""
        self.script = script
        try:
            tree = parse(script)
        except ParseError as e:
            rec = ErrorRecord(
                message=e.message,
                fqid=e.error_id,
                category="ParserError",
                reason="ParentContainsErrorRecordException",
                exception_type="System.Management.Automation.ParseException",
                script=script,
                start=e.offset,
                end=e.end,
                parse_error=True,
            )
            self.report_error(rec)
            return 1
        try:
            self.exec_block(tree, top=True)
        except PSExit as e:
            return e.code
        except PSError as e:
            self.report_error(e.record)
            return 1
        except (PSBreak, PSContinue, PSReturn):
            pass
        finally:
            self.host.close()
        return 0 if self.last_ok else 1

    def emit(self, items: list[Any]) -> None:
        """Out-Default: write objects to the console."""
        for line in format_items(items):
            self.host.write_line(line)

    def exec_block(self, block: ast.Block, top: bool = False) -> list[Any]:
        out: list[Any] = []
        for stmt in block.statements:
            res = self.run_statement(stmt, top)
            if top:
                self.emit(res)
            else:
                out.extend(res)
        return out

    def run_statement(self, stmt: ast.Node, top: bool = False) -> list[Any]:
        try:
            return self.exec_statement(stmt, top)
        except PSError as e:
            if e.script_level or self.try_depth > 0:
                raise
            if self.eap() == "stop":
                e.script_level = True
                raise
            self.add_error(e.record)
            if self.eap() not in ("silentlycontinue", "ignore"):
                self.report_error(e.record)
            self.last_ok = False
            return []

    def exec_statement(self, stmt: ast.Node, top: bool = False) -> list[Any]:
        if isinstance(stmt, ast.Pipeline):
            return self.exec_pipeline(stmt)
        if isinstance(stmt, ast.Assign):
            self.exec_assign(stmt)
            return []
        if isinstance(stmt, ast.If):
            for cond, body in stmt.clauses:
                if to_bool(self.statement_value(cond)):
                    return self.exec_block(body, top)
            if stmt.else_block is not None:
                return self.exec_block(stmt.else_block, top)
            return []
        if isinstance(stmt, ast.While):
            out: list[Any] = []
            while to_bool(self.statement_value(stmt.cond)):
                try:
                    out.extend(self.exec_block(stmt.body, top))
                except PSBreak:
                    break
                except PSContinue:
                    continue
            return out
        if isinstance(stmt, ast.Foreach):
            out = []
            for item in as_list(self.statement_value(stmt.iterable)):
                self.assign_var(stmt.var, item)
                try:
                    out.extend(self.exec_block(stmt.body, top))
                except PSBreak:
                    break
                except PSContinue:
                    continue
            return out
        if isinstance(stmt, ast.Try):
            return self.exec_try(stmt, top)
        if isinstance(stmt, ast.FlowStmt):
            return self.exec_flow(stmt)
        # An expression statement (no pipeline wrapper).
        v = self.eval(stmt)
        return [None] if v is None else as_list(v)

    def statement_value(self, stmt: ast.Node) -> Any:
        """A statement used as a value (a condition, an assignment's right side)."""
        if isinstance(stmt, ast.Pipeline) and len(stmt.elements) == 1 and not stmt.redirects:
            el = stmt.elements[0]
            if not isinstance(el, ast.Command):
                self.last_ok = True
                return self.eval(el)
        if isinstance(stmt, ast.Assign):
            self.exec_assign(stmt)
            return self.eval(stmt.target)
        return unroll([x for x in self.exec_statement(stmt)])

    def exec_try(self, stmt: ast.Try, top: bool) -> list[Any]:
        out: list[Any] = []
        try:
            self.try_depth += 1
            try:
                out.extend(self.exec_block(stmt.body, top))
            finally:
                self.try_depth -= 1
        except PSError as e:
            rec = e.record
            self.add_error(rec)
            handler = self._matching_catch(stmt, rec)
            if handler is None:
                raise
            saved = self.vars.get("_")
            self.set_var("_", rec)
            try:
                out.extend(self.exec_block(handler.body, top))
            finally:
                self.set_var("_", saved)
        finally:
            if stmt.final is not None:
                out.extend(self.exec_block(stmt.final, top))
        return out

    @staticmethod
    def _matching_catch(stmt: ast.Try, rec: ErrorRecord) -> ast.Catch | None:
        for c in stmt.catches:
            if not c.types:
                return c
            for t in c.types:
                full = (resolve_type(t) or t).lower()
                if full in ("system.exception", "system.management.automation.runtimeexception") or (
                    full == rec.exception_type.lower()
                ):
                    return c
        return None

    def exec_flow(self, stmt: ast.FlowStmt) -> list[Any]:
        if stmt.kind == "break":
            raise PSBreak()
        if stmt.kind == "continue":
            raise PSContinue()
        value = self.statement_value(stmt.value) if stmt.value is not None else None
        if stmt.kind == "exit":
            code = 0
            if value is not None:
                try:
                    code = to_int(value)
                except ConversionError:
                    code = 0
            raise PSExit(code & 0xFFFFFFFF if code < 0 else code)
        if stmt.kind == "return":
            raise PSReturn(as_list(value))
        # throw (about_Throw): an ErrorRecord is rethrown as it is; anything else becomes
        # a RuntimeException whose FullyQualifiedErrorId is its text.
        if isinstance(value, ErrorRecord):
            raise PSError(value, script_level=True)
        text = to_str(value) if value is not None else "ScriptHalted"
        rec = ErrorRecord(
            message=text,
            fqid=text,
            category="OperationStopped",
            target_name=text if value is not None else "",
            target_type="String" if value is not None else "",
            reason="RuntimeException",
            header="",
            target_object=value,
        )
        self.locate(rec, stmt, name="")
        raise PSError(rec, script_level=True)

    # ------------------------------------------------------------------ errors
    def locate(self, rec: ErrorRecord, node: ast.Node, name: str | None = None) -> ErrorRecord:
        if rec.start < 0:
            rec.script = self.script
            rec.start, rec.end = node.start, node.end
        if name is not None and not rec.command_name:
            rec.command_name = name
        return rec

    def add_error(self, rec: ErrorRecord) -> None:
        if not self.errors or self.errors[0] is not rec:
            self.errors.insert(0, rec)

    def report_error(self, rec: ErrorRecord) -> None:
        if self.err_redirect:
            sink = self.err_redirect[-1]
            if sink is not None:
                sink.append(rec)
            return
        self.host.error_lines(format_error(rec))

    def non_terminating(self, rec: ErrorRecord, call: Call) -> None:
        self.locate(rec, call.node, call.invoked_as)
        pref = call.error_action or self.eap()
        if pref == "ignore":
            return
        self.add_error(rec)
        if pref == "stop":
            # ActionPreferenceStopException: the error terminates the script.
            raise PSError(rec, script_level=True)
        if pref in ("continue", "inquire"):
            self.report_error(rec)

    # ------------------------------------------------------------------ pipelines
    def exec_pipeline(self, p: ast.Pipeline) -> list[Any]:
        out_sink: str | None = None
        err_pushed = 0
        merged: list[Any] = []
        for op, target in p.redirects:
            tgt = self.eval(target) if not isinstance(target, ast.Const) or target.value is not None else None
            is_null = tgt is None
            if op.startswith("2") and op.endswith("&1"):
                self.err_redirect.append(merged)
                err_pushed += 1
            elif op.startswith(("2", "*")):
                if not is_null:
                    self.err_redirect.append(merged)
                else:
                    self.err_redirect.append(None)
                err_pushed += 1
                if op.startswith("*"):
                    out_sink = "null" if is_null else to_str(tgt) + ("\0append" if ">>" in op else "")
            else:
                out_sink = "null" if is_null else to_str(tgt) + ("\0append" if ">>" in op else "")
        try:
            items: list[Any] = []
            ok = True
            for idx, el in enumerate(p.elements):
                if isinstance(el, ast.Command):
                    items, good = self.invoke_command(el, items if idx > 0 else None)
                    ok = ok and good
                else:
                    v = self.eval(el)
                    items = [None] if v is None else as_list(v)
                    if isinstance(v, list) and not v:
                        items = []
            self.last_ok = ok
        finally:
            for _ in range(err_pushed):
                self.err_redirect.pop()
        items = items + merged if merged else items
        if out_sink == "null":
            return []
        if out_sink is not None:
            path, _, append = out_sink.partition("\0")
            self.env.out_file(self, path, format_items(items), append=bool(append))
            return []
        return items

    def resolve_command(self, name: str) -> CmdletSpec | None:
        key = name.lower()
        key = ALIASES.get(key, key).lower()
        # Module-qualified names: WebAdministration\Get-Website
        if "\\" in key:
            module, _, key = key.rpartition("\\")
            spec = COMMANDS.get(key)
            if spec is None:
                return None
            if module not in (
                "webadministration",
                "microsoft.powershell.management",
                "microsoft.powershell.utility",
                "microsoft.powershell.core",
            ):
                return None
            return spec
        return COMMANDS.get(key)

    def invoke_command(self, cmd: ast.Command, input_items: list[Any] | None) -> tuple[list[Any], bool]:
        name_value = self.eval(cmd.name) if not isinstance(cmd.name, ast.Const) else cmd.name.value
        if isinstance(name_value, ScriptBlock):
            saved = self.vars.get("_")
            try:
                return self.run_scriptblock(name_value, None), True
            finally:
                self.set_var("_", saved)
        name = to_str(name_value)
        spec = self.resolve_command(name)
        if spec is None:
            rec = ErrorRecord(
                message=NOT_RECOGNIZED.format(name),
                fqid="CommandNotFoundException",
                category="ObjectNotFound",
                target_name=name,
                target_type="String",
                reason="CommandNotFoundException",
                exception_type="System.Management.Automation.CommandNotFoundException",
                command_name=name,
                target_object=name,
            )
            self.locate(rec, cmd.name)
            raise PSError(rec)
        if spec.webadmin:
            self.webadmin_loaded = True  # module auto-loading (about_Modules)
        call = Call(self, spec, name, cmd)
        self.bind(call, cmd)
        call.input = input_items
        result = spec.func(self, call)
        out = list(result) if result is not None else []
        return out, not call.failed

    def run_scriptblock(self, sb: ScriptBlock, dollar_under: Any, set_under: bool = False) -> list[Any]:
        if set_under:
            self.set_var("_", dollar_under)
        try:
            return self.exec_block(sb.body)
        except PSReturn as r:
            return r.output

    # ------------------------------------------------------------------ parameter binding
    def bind(self, call: Call, cmd: ast.Command) -> None:
        spec = call.spec
        params = spec.params + COMMON
        positional = sorted((p for p in spec.params if p.position is not None), key=lambda p: p.position or 0)
        pos_values: list[Any] = []
        args = cmd.args
        i = 0

        def binding_error(message: str, fqid: str, category: str = "InvalidArgument") -> PSError:
            rec = call.record(message, fqid, category, "ParameterBindingException")
            return call.terminate(rec)

        while i < len(args):
            a = args[i]
            if isinstance(a, ast.ParamArg):
                pname = a.name
                matches = [
                    p
                    for p in params
                    if p.name.lower() == pname.lower() or pname.lower() in (x.lower() for x in p.aliases)
                ]
                if not matches:
                    matches = [p for p in params if p.name.lower().startswith(pname.lower())]
                if not matches:
                    raise binding_error(
                        f"A parameter cannot be found that matches parameter name '{pname}'.",
                        "NamedParameterNotFound",
                    )
                if len(matches) > 1:
                    raise binding_error(
                        f"Parameter cannot be processed because the parameter name '{pname}' is ambiguous. "
                        f"Possible matches include: {' '.join('-' + p.name for p in matches)}.",
                        "AmbiguousParameter",
                    )
                p = matches[0]
                if p.name.lower() in call.bound:
                    raise binding_error(
                        f"Cannot bind parameter because parameter '{p.name}' is specified more than once. To "
                        "provide multiple values to parameters that can accept multiple values, use "
                        "the array "
                        'syntax. For example, "-parameter value1,value2,value3".',
                        "ParameterAlreadyBound",
                    )
                if p.switch:
                    call.bound[p.name.lower()] = True if a.value is None else to_bool(self.eval(a.value))
                    i += 1
                    continue
                if a.value is not None:
                    value = self.eval_arg(a.value)
                    i += 1
                else:
                    if i + 1 >= len(args) or isinstance(args[i + 1], ast.ParamArg):
                        raise binding_error(
                            f"Missing an argument for parameter '{p.name}'. Specify a parameter of type "
                            f"'{p.type_text}' and try again.",
                            "MissingArgument",
                        )
                    value = self.eval_arg(args[i + 1])
                    i += 2
                if p.name == "ErrorAction" and to_str(value).lower() not in ACTION_PREFERENCES:
                    raise binding_error(
                        f"Cannot bind parameter 'ErrorAction'. Cannot convert value "
                        f'"{to_str(value)}" to type '
                        '"System.Management.Automation.ActionPreference". Error: "Unable to match '
                        "the identifier "
                        f"name {to_str(value)} to a valid enumerator name. Specify one of the "
                        "following enumerator "
                        'names and try again:\nSilentlyContinue, Stop, Continue, Inquire, Ignore, Suspend"',
                        "CannotConvertArgumentNoMessage",
                    )
                call.bound[p.name.lower()] = value
            else:
                pos_values.append(self.eval_arg(a))
                i += 1
        free = [p for p in positional if p.name.lower() not in call.bound]
        for p in free:
            if not pos_values:
                break
            if p.remaining:
                call.bound[p.name.lower()] = list(pos_values)
                pos_values = []
                break
            call.bound[p.name.lower()] = pos_values.pop(0)
        if pos_values:
            raise binding_error(
                f"A positional parameter cannot be found that accepts argument '{to_str(pos_values[0])}'.",
                "PositionalParameterNotFound",
            )

    def eval_arg(self, node: ast.Node) -> Any:
        if isinstance(node, ast.ScriptBlockExpr):
            return ScriptBlock(node.body, node.text)
        return self.eval(node)

    # ------------------------------------------------------------------ assignment
    def exec_assign(self, stmt: ast.Assign) -> None:
        value = self.statement_value(stmt.value)
        target = stmt.target
        cast_to: str | None = None
        if isinstance(target, ast.Cast):
            cast_to = resolve_type(target.type_name)
            target = target.expr
        if stmt.op != "=":
            current = self.eval(target)
            value = self.binary(stmt.op[0], current, value, stmt)
        if cast_to:
            value = self.convert_or_raise(value, cast_to, stmt)
        if isinstance(target, ast.Var):
            self.assign_var(target.name, value)
        elif isinstance(target, ast.Member):
            obj = self.eval(target.obj)
            name = to_str(self.eval(target.name))
            if target.static:
                assert isinstance(obj, TypeRef)
                self.set_static(obj, name, value, stmt)
            else:
                self.set_member(obj, name, value, stmt)
        elif isinstance(target, ast.Index):
            obj = self.eval(target.obj)
            idx = self.eval(target.index)
            if isinstance(obj, Hashtable):
                obj[idx] = value
            elif isinstance(obj, list):
                try:
                    obj[to_int(idx)] = value
                except IndexError:
                    raise self.rt_error(
                        "Index was outside the bounds of the array.", "IndexOutOfRange", stmt
                    ) from None
            elif isinstance(obj, PSObject):
                obj.set(to_str(idx), value)
            else:
                raise self.rt_error(
                    f"Unable to index into an object of type {type_name(obj)}.", "CannotIndex", stmt
                )
        self.last_ok = True

    # ------------------------------------------------------------------ expressions
    def rt_error(
        self,
        message: str,
        fqid: str,
        node: ast.Node,
        category: str = "InvalidOperation",
        reason: str = "RuntimeException",
        **kw: Any,
    ) -> PSError:
        rec = ErrorRecord(message=message, fqid=fqid, category=category, reason=reason, header="", **kw)
        self.locate(rec, node)
        return PSError(rec)

    def convert_or_raise(self, value: Any, type_full: str, node: ast.Node) -> Any:
        try:
            return convert(value, type_full)
        except ConversionError as e:
            raise self.rt_error(
                str(e), e.fqid, node, category="InvalidArgument", reason="RuntimeException"
            ) from None

    def eval(self, node: ast.Node) -> Any:
        if isinstance(node, ast.Const):
            return node.value
        if isinstance(node, ast.Var):
            return self.get_var(node.name)
        if isinstance(node, ast.XString):
            return "".join(p if isinstance(p, str) else to_str(self.eval(p)) for p in node.parts)
        if isinstance(node, ast.SubExpr):
            return unroll(self.exec_block(node.body))
        if isinstance(node, ast.ArrayExpr):
            return list(self.exec_block(node.body))
        if isinstance(node, ast.Paren):
            return self.statement_value(node.statement)
        if isinstance(node, ast.HashLit):
            h = Hashtable(ordered=node.ordered)
            for k, v in node.items:
                key = self.eval(k)
                if key in h:
                    raise self.rt_error(
                        f"Duplicate keys '{to_str(key)}' are not allowed in hash literals.",
                        "DuplicateKeyInHashLiteral",
                        k,
                    )
                h[key] = self.statement_value(v)
            return h
        if isinstance(node, ast.ScriptBlockExpr):
            return ScriptBlock(node.body, node.text)
        if isinstance(node, ast.ArrayLit):
            return [self.eval(x) for x in node.items]
        if isinstance(node, ast.TypeLit):
            full = resolve_type(node.name)
            if full is None:
                raise self.type_not_found(node.name, node)
            return TypeRef(full)
        if isinstance(node, ast.Cast):
            tname = node.type_name
            if tname.lower() == "ordered" and isinstance(node.expr, ast.HashLit):
                node.expr.ordered = True
                return self.eval(node.expr)
            full = resolve_type(tname)
            if full is None:
                raise self.type_not_found(tname, node)
            if full == "System.Management.Automation.PSObject" and isinstance(node.expr, ast.HashLit):
                h = self.eval(node.expr)
                return PSObject({to_str(k): v for k, v in h.items()})
            return self.convert_or_raise(self.eval(node.expr), full, node)
        if isinstance(node, ast.Unary):
            return self.unary(node)
        if isinstance(node, ast.Binary):
            if node.op == "and":
                return to_bool(self.eval(node.left)) and to_bool(self.eval(node.right))
            if node.op == "or":
                return to_bool(self.eval(node.left)) or to_bool(self.eval(node.right))
            return self.binary(node.op, self.eval(node.left), self.eval(node.right), node)
        if isinstance(node, ast.Member):
            obj = self.eval(node.obj)
            name = to_str(self.eval(node.name))
            if node.static:
                if not isinstance(obj, TypeRef):
                    raise self.rt_error("Unable to find type", "TypeNotFound", node)
                return self.get_static(obj, name, node)
            return self.get_member(obj, name)
        if isinstance(node, ast.Invoke):
            obj = self.eval(node.obj)
            args = [self.eval(a) for a in node.args]
            if node.static:
                assert isinstance(obj, TypeRef)
                return self.invoke_static(obj, node.name, args, node)
            return self.invoke_method(obj, node.name, args, node)
        if isinstance(node, ast.Index):
            return self.index(self.eval(node.obj), self.eval(node.index), node)
        if isinstance(node, ast.Pipeline | ast.Assign | ast.If | ast.FlowStmt):
            return self.statement_value(node)
        raise self.rt_error(f"Unsupported expression {type(node).__name__}", "NotSupported", node)

    def type_not_found(self, name: str, node: ast.Node) -> PSError:
        return self.rt_error(
            f"Unable to find type [{name}].",
            "TypeNotFound",
            node,
            category="InvalidOperation",
            target_name=name,
            target_type="TypeName",
        )

    def unary(self, node: ast.Unary) -> Any:
        v = self.eval(node.expr)
        if node.op == "not":
            return not to_bool(v)
        if node.op == "neg":
            try:
                n = to_number(v)
            except ConversionError as e:
                raise self.rt_error(str(e), e.fqid, node) from None
            return -n
        if node.op == "plus":
            return to_number(v)
        if node.op == "join":
            return "".join(to_str(x) for x in as_list(v))
        if node.op == "split":
            return [x for x in re.split(r"\s+", to_str(v).strip()) if x != ""] if to_str(v).strip() else [""]
        raise self.rt_error(f"Unsupported operator {node.op}", "NotSupported", node)

    def binary(self, op: str, a: Any, b: Any, node: ast.Node) -> Any:
        try:
            return self._binary(op, a, b, node)
        except ConversionError as e:
            raise self.rt_error(str(e), e.fqid, node, category="InvalidArgument") from None
        except re.error as e:
            raise self.rt_error(
                f"The regular expression pattern {to_str(b)} is not valid.",
                "InvalidRegularExpression",
                node,
                category="InvalidOperation",
                target_name=to_str(b),
                target_type="String",
            ) from e

    def _binary(self, op: str, a: Any, b: Any, node: ast.Node) -> Any:
        if op in ("+", "-", "*", "/", "%"):
            return self.arith(op, a, b, node)
        if op == "..":
            lo, hi = to_int(a), to_int(b)
            step = 1 if hi >= lo else -1
            return list(range(lo, hi + step, step))
        cs = False
        name = op
        if name[:1] in ("c", "i") and name[1:] in psparse_comparisons():
            cs = name[0] == "c"
            name = name[1:]
        if name in ("eq", "ne", "gt", "ge", "lt", "le", "like", "notlike"):
            if isinstance(a, list):
                return [x for x in a if compare_scalar(name, x, b, cs)]
            return compare_scalar(name, a, b, cs)
        if name in ("match", "notmatch"):
            rx = dotnet_regex(to_str(b), cs)
            if isinstance(a, list):
                hits = [x for x in a if (rx.search(to_str(x)) is not None) == (name == "match")]
                return hits
            m = rx.search(to_str(a))
            if m and name == "match":
                matches = Hashtable()
                matches[0] = m.group(0)
                for i, g in enumerate(m.groups(), start=1):
                    if g is not None:
                        matches[i] = g
                for k, g in m.groupdict().items():
                    if g is not None:
                        matches[k] = g
                self.set_var("Matches", matches)
            return (m is not None) == (name == "match")
        if name in ("contains", "notcontains"):
            hit = any(compare_scalar("eq", x, b, cs) for x in as_list(a))
            return hit if name == "contains" else not hit
        if name in ("in", "notin"):
            hit = any(compare_scalar("eq", x, a, cs) for x in as_list(b))
            return hit if name == "in" else not hit
        if name == "replace":
            pattern, rep = (b[0], b[1] if len(b) > 1 else "") if isinstance(b, list) else (b, "")
            rx = dotnet_regex(to_str(pattern), cs)
            repl = dotnet_replacement(to_str(rep))
            if isinstance(a, list):
                return [rx.sub(repl, to_str(x)) for x in a]
            return rx.sub(repl, to_str(a))
        if name == "split":
            rx = dotnet_regex(to_str(b[0] if isinstance(b, list) else b), cs)
            out: list[Any] = []
            for x in as_list(a):
                out.extend(rx.split(to_str(x)))
            return out
        if name == "join":
            return to_str(b).join(to_str(x) for x in as_list(a))
        if name in ("is", "isnot"):
            t = b.name if isinstance(b, TypeRef) else resolve_type(to_str(b)) or to_str(b)
            hit = (
                type_name(a) == t
                or (t == "System.Object" and a is not None)
                or (t == "System.Array" and isinstance(a, list))
                or (t == "System.Management.Automation.PSObject" and isinstance(a, PSObject))
            )
            return hit if name == "is" else not hit
        if name == "as":
            target = b.name if isinstance(b, TypeRef) else resolve_type(to_str(b))
            if target is None:
                return None
            t = target
            try:
                return convert(a, t)
            except ConversionError:
                return None
        if name == "xor":
            return to_bool(a) != to_bool(b)
        raise self.rt_error(f"Unsupported operator -{op}", "NotSupported", node)

    def arith(self, op: str, a: Any, b: Any, node: ast.Node) -> Any:
        if op == "+":
            if a is None:
                return b if not isinstance(b, list) else list(b)
            if isinstance(a, list):
                return a + (b if isinstance(b, list) else [b])
            if isinstance(a, Hashtable):
                if not isinstance(b, Hashtable):
                    raise self.rt_error(
                        "A hash table can only be added to another hash table.",
                        "AddHashTableToNonHashTable",
                        node,
                    )
                h = Hashtable()
                for k, v in a.items():
                    h[k] = v
                for k, v in b.items():
                    if k in h:
                        raise self.rt_error(
                            f"Item has already been added. Key in dictionary: '{to_str(k)}'  Key "
                            "being added: "
                            f"'{to_str(k)}'",
                            "System.ArgumentException",
                            node,
                        )
                    h[k] = v
                return h
            if isinstance(a, str):
                return a + to_str(b)
            if isinstance(a, dt.datetime):
                if isinstance(b, dt.timedelta):
                    return a + b
                return a + dt.timedelta(microseconds=to_number(b) / 10)
            if isinstance(a, dt.timedelta) and isinstance(b, dt.timedelta):
                return a + b
        if op == "-":
            if isinstance(a, dt.datetime):
                if isinstance(b, dt.datetime):
                    return a - b
                if isinstance(b, dt.timedelta):
                    return a - b
            if isinstance(a, dt.timedelta) and isinstance(b, dt.timedelta):
                return a - b
        if op == "*":
            if isinstance(a, str):
                return a * to_int(b)
            if isinstance(a, list):
                return a * to_int(b)
        if isinstance(a, list | Hashtable | PSObject) or (
            a is not None and not isinstance(a, int | float | str | bool)
        ):
            raise self.rt_error(
                f"Method invocation failed because [{type_name(a)}] does not contain a method named "
                f"'{OP_METHODS[op]}'.",
                "MethodNotFound",
                node,
            )
        x, y = to_number(a), to_number(b)
        if op == "+":
            return x + y
        if op == "-":
            return x - y
        if op == "*":
            return x * y
        if op in ("/", "%") and y == 0:
            raise self.rt_error(
                "Attempted to divide by zero.", "RuntimeException", node, category="NotSpecified"
            )
        if op == "/":
            r = x / y
            if isinstance(x, int) and isinstance(y, int) and x % y == 0:
                return x // y
            return r
        r = math.fmod(x, y)
        return int(r) if isinstance(x, int) and isinstance(y, int) else r

    def index(self, obj: Any, idx: Any, node: ast.Node) -> Any:
        if obj is None:
            raise self.rt_error("Cannot index into a null array.", "NullArray", node)
        if isinstance(idx, list):
            return [self.index(obj, i, node) for i in idx]
        if isinstance(obj, Hashtable):
            return obj[idx]
        if isinstance(obj, PSObject):
            return obj.get(to_str(idx))
        if isinstance(obj, list | str):
            i = to_int(idx)
            try:
                return obj[i]
            except IndexError:
                return None
        raise self.rt_error(f"Unable to index into an object of type {type_name(obj)}.", "CannotIndex", node)

    # ------------------------------------------------------------------ members
    def get_member(self, obj: Any, name: str) -> Any:
        low = name.lower()
        if obj is None:
            return None
        if isinstance(obj, list):
            if low in ("count", "length"):
                return len(obj)
            if low == "rank":
                return 1
            # Member enumeration (PowerShell 3+): the property of each item.
            vals = [self.get_member(x, name) for x in obj]
            vals = [v for v in vals if v is not None]
            flat: list[Any] = []
            for v in vals:
                flat.extend(v if isinstance(v, list) else [v])
            return unroll(flat)
        if isinstance(obj, str):
            if low == "length":
                return len(obj)
            return None
        if isinstance(obj, Hashtable):
            if low == "count":
                return len(obj)
            if low == "keys":
                return obj.keys()
            if low == "values":
                return obj.values()
            return obj[name]
        if isinstance(obj, PSObject):
            if obj.has(name):
                return obj.get(name)
            if low == "count" and obj.type_name == "System.Management.Automation.PSCustomObject":
                return 1
            return None
        if isinstance(obj, FileItem):
            for k, v in file_item_props(obj):
                if k.lower() == low:
                    return v
            if low == "basename":
                return obj.name.rsplit(".", 1)[0] if not obj.is_dir and "." in obj.name else obj.name
            return None
        if isinstance(obj, dt.datetime):
            return {
                "year": obj.year,
                "month": obj.month,
                "day": obj.day,
                "hour": obj.hour,
                "minute": obj.minute,
                "second": obj.second,
                "millisecond": obj.microsecond // 1000,
                "dayofweek": obj.strftime("%A"),
                "date": obj.replace(hour=0, minute=0, second=0, microsecond=0),
                "ticks": int((obj - dt.datetime(1, 1, 1)).total_seconds() * 10_000_000),
                "kind": "Local",
            }.get(low)
        if isinstance(obj, dt.timedelta):
            secs = obj.total_seconds()
            return {
                "totalseconds": secs,
                "totalmilliseconds": secs * 1000,
                "totalminutes": secs / 60,
                "totalhours": secs / 3600,
                "totaldays": secs / 86400,
                "days": obj.days,
                "hours": obj.seconds // 3600,
                "minutes": (obj.seconds // 60) % 60,
                "seconds": obj.seconds % 60,
                "milliseconds": obj.microseconds // 1000,
                "ticks": int(secs * 10_000_000),
            }.get(low)
        if isinstance(obj, ErrorRecord):
            if low == "exception":
                return PSObject(
                    {"Message": obj.message, "ErrorRecord": obj},
                    obj.exception_type,
                    obj.message,
                )
            return {
                "fullyqualifiederrorid": obj.fqid,
                "targetobject": obj.target_object,
                "categoryinfo": PSObject(
                    {
                        "Category": obj.category,
                        "Activity": obj.activity,
                        "Reason": obj.reason,
                        "TargetName": obj.target_name,
                        "TargetType": obj.target_type,
                    },
                    "System.Management.Automation.ErrorCategoryInfo",
                    obj.category_info(),
                ),
                "invocationinfo": PSObject(
                    {"MyCommand": obj.command_name, "Line": self.script},
                    "System.Management.Automation.InvocationInfo",
                ),
                "errordetails": None,
                "scriptstacktrace": "at <ScriptBlock>, <No file>: line 1",
            }.get(low)
        if isinstance(obj, Encoding):
            return {
                "codepage": obj.code_page,
                "webname": obj.web_name,
                "encodingname": obj.encoding_name,
                "bodyname": obj.web_name,
                "headername": obj.web_name,
            }.get(low)
        if isinstance(obj, PathInfo):
            return {
                "path": obj.path,
                "providerpath": obj.path,
                "drive": "C",
                "provider": "Microsoft.PowerShell.Core\\FileSystem",
            }.get(low)
        if isinstance(obj, TypeRef):
            return {"fullname": obj.name, "name": obj.name.rsplit(".", 1)[-1]}.get(low)
        if isinstance(obj, int | float | bool):
            return None
        return None

    def set_member(self, obj: Any, name: str, value: Any, node: ast.Node) -> None:
        if isinstance(obj, PSObject):
            if obj.has(name) or obj.type_name == "System.Management.Automation.PSCustomObject":
                if not obj.has(name):
                    raise self.rt_error(
                        f"The property '{name}' cannot be found on this object. Verify that the "
                        "property exists "
                        "and can be set.",
                        "PropertyNotFound",
                        node,
                    )
                obj.set(name, value)
                return
        if isinstance(obj, Hashtable):
            obj[name] = value
            return
        if obj is None:
            raise self.rt_error(
                f"The property '{name}' cannot be found on this object. Verify that the property "
                "exists and can be "
                "set.",
                "PropertyNotFound",
                node,
            )
        raise self.rt_error(f"'{name}' is a ReadOnly property.", "PropertyAssignmentException", node)

    def invoke_method(self, obj: Any, name: str, args: list[Any], node: ast.Node) -> Any:
        low = name.lower()
        if obj is None:
            raise self.rt_error(
                "You cannot call a method on a null-valued expression.", "InvokeMethodOnNull", node
            )

        def missing() -> PSError:
            return self.rt_error(
                f"Method invocation failed because [{type_name(obj)}] does not contain a method "
                f"named '{name}'.",
                "MethodNotFound",
                node,
            )

        def arity(*ns: int) -> None:
            if len(args) not in ns:
                raise self.rt_error(
                    f'Cannot find an overload for "{name}" and the argument count: "{len(args)}".',
                    "MethodCountCouldNotFindBest",
                    node,
                )

        try:
            if low == "tostring" and not isinstance(obj, dt.datetime):
                return to_str(obj)
            if low == "gettype":
                return TypeRef(type_name(obj))
            if low == "equals":
                arity(1)
                return compare_scalar("eq", obj, args[0], True)
            if isinstance(obj, str):
                return self._string_method(obj, low, args, arity, missing)
            if isinstance(obj, dt.datetime):
                return self._date_method(obj, low, args, arity, missing)
            if isinstance(obj, list):
                if low == "contains":
                    arity(1)
                    return any(compare_scalar("eq", x, args[0], True) for x in obj)
                if low == "indexof":
                    arity(1)
                    for i, x in enumerate(obj):
                        if compare_scalar("eq", x, args[0], True):
                            return i
                    return -1
                if low == "where":
                    sb = args[0]
                    return [x for x in obj if to_bool(unroll(self.run_scriptblock(sb, x, set_under=True)))]
                if low == "foreach":
                    out: list[Any] = []
                    for x in obj:
                        out.extend(self.run_scriptblock(args[0], x, set_under=True))
                    return out
                # Method enumeration over the items.
                return unroll([self.invoke_method(x, name, args, node) for x in obj])
            if isinstance(obj, Hashtable):
                if low == "containskey" or low == "contains":
                    arity(1)
                    return args[0] in obj
                if low == "add":
                    arity(2)
                    if args[0] in obj:
                        raise self.rt_error(
                            f'Exception calling "Add" with "2" argument(s): "Item has already been '
                            "added. Key in "
                            f"dictionary: '{to_str(args[0])}'  Key being added: '{to_str(args[0])}'\"",
                            "ArgumentException",
                            node,
                            category="NotSpecified",
                            reason="MethodInvocationException",
                        )
                    obj[args[0]] = args[1]
                    return None
                if low == "remove":
                    arity(1)
                    obj.remove(args[0])
                    return None
                raise missing()
            if isinstance(obj, dt.timedelta):
                raise missing()
            if isinstance(obj, ErrorRecord | PSObject) and low == "tostring":
                return to_str(obj)
        except ConversionError as e:
            raise self.rt_error(
                f'Cannot convert argument "{name}", with value: "{e}"',
                "MethodArgumentConversionInvalidCastArgument",
                node,
                category="NotSpecified",
                reason="MethodException",
            ) from None
        raise missing()

    def _string_method(
        self, s: str, low: str, args: list[Any], arity: Callable[..., None], missing: Callable[[], PSError]
    ) -> Any:
        a = [to_str(x) if not isinstance(x, int | float) else x for x in args]
        if low == "tolower" or low == "tolowerinvariant":
            return s.lower()
        if low == "toupper" or low == "toupperinvariant":
            return s.upper()
        if low in ("trim", "trimstart", "trimend"):
            chars = "".join(to_str(x) for x in args) or None
            return {"trim": s.strip, "trimstart": s.lstrip, "trimend": s.rstrip}[low](chars)
        if low == "substring":
            arity(1, 2)
            start = to_int(args[0])
            if start < 0 or start > len(s):
                raise self._method_exception(
                    "Substring",
                    len(args),
                    "startIndex cannot be larger than length of string.\r\nParameter name: startIndex",
                )
            if len(args) == 1:
                return s[start:]
            length = to_int(args[1])
            if length < 0 or start + length > len(s):
                raise self._method_exception(
                    "Substring",
                    2,
                    "Index and length must refer to a location within the string.\r\nParameter name: length",
                )
            return s[start : start + length]
        if low == "replace":
            arity(2)
            return s.replace(to_str(args[0]), to_str(args[1]))  # String.Replace: ordinal, case-sensitive
        if low in ("startswith", "endswith", "contains"):
            arity(1, 2)
            ignore = len(args) == 2 and "ignorecase" in to_str(args[1]).lower()
            x, y = (s.lower(), to_str(args[0]).lower()) if ignore else (s, to_str(args[0]))
            return {"startswith": x.startswith, "endswith": x.endswith, "contains": x.__contains__}[low](y)
        if low == "indexof":
            return s.find(to_str(a[0]))
        if low == "lastindexof":
            return s.rfind(to_str(a[0]))
        if low == "split":
            seps = "".join(to_str(x) for x in args) if args else " "
            if not args:
                return s.split(" ")
            return re.split("[" + re.escape(seps) + "]", s)
        if low == "padleft":
            return s.rjust(to_int(args[0]), to_str(args[1]) if len(args) > 1 else " ")
        if low == "padright":
            return s.ljust(to_int(args[0]), to_str(args[1]) if len(args) > 1 else " ")
        if low == "remove":
            start = to_int(args[0])
            return s[:start] if len(args) == 1 else s[:start] + s[start + to_int(args[1]) :]
        if low == "insert":
            i = to_int(args[0])
            return s[:i] + to_str(args[1]) + s[i:]
        raise missing()

    def _method_exception(self, name: str, n: int, detail: str) -> PSError:
        rec = ErrorRecord(
            message=f'Exception calling "{name}" with "{n}" argument(s): "{detail}"',
            fqid="ArgumentOutOfRangeException",
            category="NotSpecified",
            reason="MethodInvocationException",
            header="",
        )
        return PSError(rec)

    def _date_method(
        self,
        d: dt.datetime,
        low: str,
        args: list[Any],
        arity: Callable[..., None],
        missing: Callable[[], PSError],
    ) -> Any:
        units = {
            "addseconds": "seconds",
            "addminutes": "minutes",
            "addhours": "hours",
            "adddays": "days",
            "addmilliseconds": "milliseconds",
        }
        if low in units:
            arity(1)
            return d + dt.timedelta(**{units[low]: float(to_number(args[0]))})
        if low == "touniversaltime":
            return d.astimezone(dt.UTC).replace(tzinfo=None)
        if low == "tolocaltime":
            return d
        if low == "subtract":
            arity(1)
            other = args[0]
            return d - other if isinstance(other, dt.timedelta | dt.datetime) else d - to_datetime(other)
        if low == "tostring":
            if not args:
                ampm = "AM" if d.hour < 12 else "PM"
                return f"{d.month}/{d.day}/{d.year} {d.hour % 12 or 12}:{d:%M:%S} {ampm}"
            return dotnet_date_format(d, to_str(args[0]))
        if low == "compareto":
            other = to_datetime(args[0])
            return (d > other) - (d < other)
        raise missing()

    # ------------------------------------------------------------------ static members
    def get_static(self, t: TypeRef, name: str, node: ast.Node) -> Any:
        key = (t.name, name.lower())
        env = self.env
        table: dict[tuple[str, str], Callable[[], Any]] = {
            ("System.Console", "outputencoding"): lambda: self.host.output_encoding,
            ("System.Console", "inputencoding"): lambda: OEM,
            ("System.Text.Encoding", "utf8"): lambda: UTF8,
            ("System.Text.Encoding", "ascii"): lambda: ASCII,
            ("System.Text.Encoding", "unicode"): lambda: UNICODE,
            ("System.Text.Encoding", "default"): lambda: ANSI,
            ("System.DateTime", "now"): lambda: dt.datetime.now(),
            ("System.DateTime", "utcnow"): lambda: dt.datetime.now(dt.UTC).replace(tzinfo=None),
            ("System.DateTime", "today"): lambda: dt.datetime.now().replace(
                hour=0, minute=0, second=0, microsecond=0
            ),
            ("System.Int32", "maxvalue"): lambda: 2**31 - 1,
            ("System.Int32", "minvalue"): lambda: -(2**31),
            ("System.Int64", "maxvalue"): lambda: 2**63 - 1,
            ("System.String", "empty"): lambda: "",
            ("System.Environment", "machinename"): lambda: env.computer_name,
            ("System.Environment", "newline"): lambda: "\r\n",
            ("System.Environment", "username"): lambda: "zerodown",
            ("System.Environment", "currentdirectory"): lambda: self.cwd,
            ("System.Environment", "osversion"): lambda: PSObject(
                {
                    "Platform": "Win32NT",
                    "ServicePack": "",
                    "Version": env.os_version_full,
                    "VersionString": f"Microsoft Windows NT {env.os_version_full}",
                },
                "System.OperatingSystem",
                f"Microsoft Windows NT {env.os_version_full}",
            ),
            ("System.Environment", "processorcount"): lambda: os.cpu_count() or 1,
            ("System.IO.Path", "directoryseparatorchar"): lambda: "\\",
            ("System.Math", "pi"): lambda: math.pi,
        }
        fn = table.get(key)
        if fn is None:
            raise self.rt_error(
                f"Unable to find static property '{name}' on [{t.name}].", "PropertyNotFound", node
            )
        return fn()

    def set_static(self, t: TypeRef, name: str, value: Any, node: ast.Node) -> None:
        if t.name == "System.Console" and name.lower() == "outputencoding":
            if not isinstance(value, Encoding):
                raise self.rt_error(
                    f'Exception setting "OutputEncoding": "Cannot convert the "{to_str(value)}" '
                    "value of type "
                    f'"{type_name(value)}" to type "System.Text.Encoding"."',
                    "ExceptionWhenSetting",
                    node,
                    category="NotSpecified",
                    reason="SetValueInvocationException",
                )
            self.host.output_encoding = value
            return
        if t.name == "System.Console" and name.lower() == "inputencoding":
            return
        raise self.rt_error(f"'{name}' is a ReadOnly property.", "PropertyAssignmentException", node)

    def invoke_static(self, t: TypeRef, name: str, args: list[Any], node: ast.Node) -> Any:
        low = name.lower()
        key = (t.name, low)
        n = len(args)
        try:
            if key == ("System.String", "isnullorempty"):
                return args[0] is None or to_str(args[0]) == ""
            if key == ("System.String", "isnullorwhitespace"):
                return args[0] is None or to_str(args[0]).strip() == ""
            if key == ("System.String", "join"):
                items = args[1] if n == 2 and isinstance(args[1], list) else args[1:]
                return to_str(args[0]).join(to_str(x) for x in items)
            if key == ("System.String", "format") or key == ("System.String", "concat"):
                if low == "concat":
                    return "".join(to_str(x) for x in args)
                fmt = to_str(args[0])
                vals = args[1] if n == 2 and isinstance(args[1], list) else args[1:]
                return re.sub(r"\{(\d+)\}", lambda m: to_str(vals[int(m.group(1))]), fmt)
            if t.name == "System.Math":
                fns: dict[str, Callable[..., Any]] = {
                    "round": lambda x, d=0: (
                        round(float(to_number(x)), to_int(d)) if d else round(float(to_number(x)))
                    ),
                    "floor": lambda x: math.floor(to_number(x)),
                    "ceiling": lambda x: math.ceil(to_number(x)),
                    "abs": lambda x: abs(to_number(x)),
                    "max": lambda x, y: max(to_number(x), to_number(y)),
                    "min": lambda x, y: min(to_number(x), to_number(y)),
                    "sqrt": lambda x: math.sqrt(to_number(x)),
                    "truncate": lambda x: math.trunc(to_number(x)),
                    "pow": lambda x, y: float(to_number(x)) ** float(to_number(y)),
                }
                if low in fns:
                    r = fns[low](*args)
                    return (
                        float(r)
                        if low in ("floor", "ceiling", "round", "truncate") and isinstance(args[0], float)
                        else r
                    )
            if t.name == "System.IO.Path":
                p = [to_str(a) for a in args]
                if low == "combine":
                    out = p[0]
                    for part in p[1:]:
                        if re.match(r"^([A-Za-z]:|[\\/])", part):
                            out = part
                        elif out and not out.endswith(("\\", "/", ":")):
                            out += "\\" + part
                        else:
                            out += part
                    return out
                if low == "getfilename":
                    return re.split(r"[\\/]", p[0])[-1]
                if low == "getdirectoryname":
                    parts = re.split(r"[\\/]", p[0])
                    return "\\".join(parts[:-1]) if len(parts) > 1 else None
                if low == "getextension":
                    base = re.split(r"[\\/]", p[0])[-1]
                    return "." + base.rsplit(".", 1)[1] if "." in base else ""
                if low == "getfilenamewithoutextension":
                    base = re.split(r"[\\/]", p[0])[-1]
                    return base.rsplit(".", 1)[0] if "." in base else base
                if low == "gettemppath":
                    return env_temp(self)
            if t.name == "System.DateTime" and low in ("parse", "parseexact"):
                return to_datetime(args[0])
            if t.name == "System.Text.UTF8Encoding" and low == "new":
                return UTF8 if (n >= 1 and to_bool(args[0])) else UTF8_NO_BOM
            if t.name == "System.Convert":
                import base64

                if low == "tobase64string":
                    data = args[0]
                    return base64.b64encode(bytes(to_int(x) for x in as_list(data))).decode()
                if low == "frombase64string":
                    return list(base64.b64decode(to_str(args[0])))
                if low == "toint32":
                    return to_int(args[0]) if n == 1 else int(to_str(args[0]), to_int(args[1]))
            if t.name == "System.Guid" and low == "newguid":
                import uuid

                return PSObject({"Guid": str(uuid.uuid4())}, "System.Guid", str(uuid.uuid4()))
            if t.name == "System.IO.File" and low in ("exists",):
                return self.env.drive.is_file(self.env.drive.normalize(to_str(args[0]), self.cwd))
            if t.name == "System.Text.RegularExpressions.Regex" and low == "escape":
                return re.escape(to_str(args[0]))
        except (IndexError, TypeError):
            raise self.rt_error(
                f'Cannot find an overload for "{name}" and the argument count: "{n}".',
                "MethodCountCouldNotFindBest",
                node,
            ) from None
        except ConversionError as e:
            raise self.rt_error(
                str(e), e.fqid, node, category="NotSpecified", reason="MethodException"
            ) from None
        raise self.rt_error(
            f"Method invocation failed because [{t.name}] does not contain a method named '{name}'.",
            "MethodNotFound",
            node,
        )


def env_temp(rt: Interp) -> str:
    return rt.env.home + "\\AppData\\Local\\Temp\\"


def psparse_comparisons() -> set[str]:
    return ast.COMPARISON_OPS


def dotnet_date_format(d: dt.datetime, fmt: str) -> str:
    """Custom DateTime format strings (Microsoft Learn "Custom date and time format
    strings"): the common specifiers; 'o' / 's' / 'u' standard formats."""
    if fmt == "o":
        return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond * 10:07d}"
    if fmt == "s":
        return d.strftime("%Y-%m-%dT%H:%M:%S")
    if fmt == "u":
        return d.strftime("%Y-%m-%d %H:%M:%SZ")
    tokens = [
        ("yyyy", f"{d.year:04d}"),
        ("yy", f"{d.year % 100:02d}"),
        ("MMMM", d.strftime("%B")),
        ("MMM", d.strftime("%b")),
        ("MM", f"{d.month:02d}"),
        ("M", str(d.month)),
        ("dddd", d.strftime("%A")),
        ("ddd", d.strftime("%a")),
        ("dd", f"{d.day:02d}"),
        ("d", str(d.day)),
        ("HH", f"{d.hour:02d}"),
        ("H", str(d.hour)),
        ("hh", f"{d.hour % 12 or 12:02d}"),
        ("h", str(d.hour % 12 or 12)),
        ("mm", f"{d.minute:02d}"),
        ("m", str(d.minute)),
        ("ss", f"{d.second:02d}"),
        ("s", str(d.second)),
        ("fff", f"{d.microsecond // 1000:03d}"),
        ("ff", f"{d.microsecond // 10000:02d}"),
        ("f", str(d.microsecond // 100000)),
        ("tt", "AM" if d.hour < 12 else "PM"),
    ]
    out: list[str] = []
    i = 0
    while i < len(fmt):
        if fmt[i] in "'\"":
            j = fmt.find(fmt[i], i + 1)
            j = len(fmt) if j < 0 else j
            out.append(fmt[i + 1 : j])
            i = j + 1
            continue
        if fmt[i] == "\\" and i + 1 < len(fmt):
            out.append(fmt[i + 1])
            i += 2
            continue
        for tok, val in tokens:
            if fmt.startswith(tok, i):
                out.append(val)
                i += len(tok)
                break
        else:
            out.append(fmt[i])
            i += 1
    return "".join(out)
