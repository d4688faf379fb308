"""Open-Xchange's command line tools, as the lab's OX stand-in runs them.

One entry point for all eight tools, dispatching on the program name (argv[0]) or, with
`python -m lab.ox.tools <tool> [flags]`, on the first argument. `install_tools` writes small
shell wrappers named like OX's (registerserver, listserver, listdatabaseschema, disableschema,
enableschema, changeserver, runupdate, upgradeschemata) next to an env file.

Fidelity. Flags, messages, output formats and exit codes follow OX's own sources (the public
open-xchange/appsuite-middleware repository: AdminParser, BasicCommandlineOptions,
ObjectNamingAbstraction, ListServer, ListDatabaseSchema, RegisterServer, ChangeServer,
DisableSchema, EnableSchema, UpdateTaskRunUpdateCLT, UpgradeSchemata) and the seed's text.
Where they were not available the choice is marked "guess" below. The deliberate deviations:
  * upgradeschemata prints the seed's WARNING text for an already registered server (OX 7.10.0's
    source words it slightly differently; both carry "already registered with id '<id>'").
  * upgradeschemata -k works as the seed documents, with or without -m (in the 7.10.0 source it
    is only applied together with -m and its comma list is mis-parsed).
  * JMX/RMI flags (-H, -p, -l, -s, -r, --responsetimeout) are accepted and ignored; --nonl too.
  * listdatabaseschema --lab-state (not in OX) appends the lab's schema state columns.

Output formats (stdout unless noted; tables are OX's: every column padded to its widest cell,
columns separated by one space, right-aligned where marked r; CSV: header unquoted, every
cell double-quoted):
  registerserver     "server <id> registered"
  listserver         table Id(r) Name;  --csv: id,name
  listdatabaseschema table id(r) name schemaname hostname curctx(r);
                     --csv: id,display_name,schema_name,url,currentunits;
                     no match (table): "No such database schemas found"
  disableschema / enableschema   nothing (exit 0)
  changeserver       "Successfully changed to server '<id>' for schema '<schema>'."
  runupdate          nothing when all update tasks ran; otherwise
                     "The following update task(s) failed:" and a table taskName className schema
                     - and exit 0, as OX's runupdate does (UpdateTaskRunUpdateCLT returns
                     normally): a caller must read the output, not the exit code.
  upgradeschemata    per schema, as OX 7.10's UpgradeSchemata prints them:
                       Disabling schema '<s>'...OK
                       Changing server for schema '<s>' to '<server name>'...OK
                       Running updates...OK
                       Enabling schema '<s>'...OK
                     before them "Registering the server with name '<n>'...OK" or, when the
                     server exists, the WARNING and the abort/continue prompt (stdin); with -m
                     "Skipping to schema '<m>'"; with -m or -k "Filtering out skipped schemata:
                     '<a>', '<b>'". A failed runupdate leaves "Running updates..." unterminated on
                     stdout and writes to stderr:
                       (empty line)
                       Errors while running updates for schema '<s>':<space>
                       The following update task(s) failed:<space>
                        <task> (schema=<s>)
                     without -f then "Schema upgrade for schema '<s>' was aborted. Manual
                     intervention might be required." and exit 1 (the schema stays disabled,
                     already pointing at the new server). With -f the run goes on - and, as in
                     OX's source, the failed schema is enabled again like the others - and exits 0.
                     abort at the prompt: "OK, aborting upgrade", exit 0 (OX's choice); no answer
                     (stdin closed): "An error occurred during schema upgrade. ..." on stderr, exit 1.
                     Without -m a rerun walks every schema again; runupdate is a no-op on a schema
                     already at OX_VERSION, so upgraded schemata just get disabled and enabled.

Exit codes (OX's BasicCommandlineOptions): 0 success; 1 other errors (also every error of
runupdate, whose parser is commons-cli's - guess for unknown options); 101 invalid credentials;
103 invalid data (e.g. a server name that exists); 104 missing option; 105 config DB unreachable;
106 storage error; 109 illegal option value; 111 unknown option. -h/--help prints the usage
and exits 0.

Environment (real environment variables win over the env file named by OX_TOOLS_ENV):
  OX_CONFIGDB_HOST / _PORT / _USER, OX_CONFIGDB_PASSWORD_FILE (or OX_CONFIGDB_PASSWORD),
  OX_CONFIGDB_SOCKET (instead of host/port)      the config DB connection
  OX_MASTER_ADMIN, OX_MASTER_PASSWORD_FILE        master admin check (-A/-P; unset: no check);
                                                  ADMIN_PASSWORD stands in for -P, as in OX
  OX_RUNUPDATE_SECONDS (default 0.2)              runupdate's work per schema
  OX_VERSION_FILE                                 the version runupdate brings a schema to:
                                                  this file's content (an OX node's
                                                  installed/version) when readable, else
  OX_VERSION                                      this one
  OX_UPDATE_FAULTS (a,b,c)                        runupdate fails on these schemata (besides
                                                  the config DB's update_faults table)
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlparse

import pymysql

from lab.ox import configdb
from lab.ox.configdb import OxError

TOOLS = ("registerserver", "listserver", "listdatabaseschema", "disableschema", "enableschema",
         "changeserver", "runupdate", "upgradeschemata")
ENV_FILE_NAME = "ox-tools.env"
PROJECT_ROOT = Path(__file__).resolve().parents[2]

EXIT_INVALID_CREDENTIALS = 101
EXIT_INVALID_DATA = 103
EXIT_MISSING_OPTION = 104
EXIT_COMMUNICATION_ERROR = 105
EXIT_SERVERSTORAGE_ERROR = 106
EXIT_ILLEGAL_OPTION_VALUE = 109
EXIT_UNKNOWN_OPTION = 111
_KIND_EXIT = {"invalid_data": EXIT_INVALID_DATA, "storage": EXIT_SERVERSTORAGE_ERROR, "no_such_object": 1}

# The seed's wording of upgradeschemata's warning, and OX's prompt after an unknown answer.
ALREADY_REGISTERED = (
    "WARNING: The specified server is already registered with id '{id}'.\n"
    "         If that shouldn't be the case, type 'abort' to abort the upgrade process, otherwise, "
    "type 'continue' to proceed.\n"
    "         If you continue the already existing server will be used to point the updated schemata "
    "after the update tasks complete.\n")
UPGRADE_FAILED = "An error occurred during schema upgrade. Manual intervention is advised.\n"
PROMPT = "Type 'abort' to abort the upgrade process, or 'continue' to proceed ['abort'/'continue']:"


class Exit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class Ctx:
    tool: str
    env: dict[str, str]
    inp: TextIO
    stdout: TextIO
    stderr: TextIO

    def out(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    def err(self, text: str) -> None:
        self.stdout.flush()
        self.stderr.write(text)
        self.stderr.flush()


@dataclass(frozen=True)
class Opt:
    long: str
    short: str | None = None
    arg: str | None = None  # the argument's name; None: a flag
    desc: str = ""
    need: str = " "  # '*' mandatory, '?' mandatory depending on the configuration


@dataclass
class Spec:
    tool: str
    opts: list[Opt] = field(default_factory=list)
    error_prefix: str = ""  # OX's "<object> could not be <verb>ed: " line before an error


class CliError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# --------------------------------------------------------------------------- env and connection


def load_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The env file named by OX_TOOLS_ENV (KEY=VALUE lines), overridden by `environ`."""
    env: dict[str, str] = {}
    path = environ.get("OX_TOOLS_ENV")
    if path:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, _, value = line.partition("=")
                env[key.strip()] = value.strip()
    env.update(environ)
    return env


def _secret(env: Mapping[str, str], value_key: str, file_key: str) -> str | None:
    if env.get(value_key):
        return env[value_key]
    path = env.get(file_key)
    if path:
        return Path(path).read_text(encoding="utf-8").strip()
    return None


def _connect(ctx: Ctx) -> Any:
    env = ctx.env
    try:
        return configdb.connect(host=env.get("OX_CONFIGDB_HOST", "127.0.0.1"),
                                port=int(env.get("OX_CONFIGDB_PORT", "3306")),
                                user=env.get("OX_CONFIGDB_USER", configdb.OX_DB_USER),
                                password=_secret(env, "OX_CONFIGDB_PASSWORD",
                                                 "OX_CONFIGDB_PASSWORD_FILE") or "",
                                unix_socket=env.get("OX_CONFIGDB_SOCKET") or None)
    except (pymysql.MySQLError, OSError, ValueError) as e:
        _print_error(ctx, f"cannot reach the configuration database: {e}")
        raise Exit(EXIT_COMMUNICATION_ERROR) from e


# --------------------------------------------------------------------------- AdminParser


_COMMON = [
    Opt("help", "h", None, "Prints a help text"),
    Opt("environment", None, None, "Show info about commandline environment"),
    Opt("nonl", None, None, "Remove all newlines (\\n) from output"),
    Opt("responsetimeout", None, "responsetimeout",
        "response timeout in seconds for reading response from the backend (default 0s; infinite)"),
]
_CREDENTIALS = [
    Opt("adminuser", "A", "adminuser", "Admin username", "?"),
    Opt("adminpass", "P", "adminpass", "Admin password", "?"),
]


def parse_args(opts: Sequence[Opt], args: Sequence[str]) -> dict[str, Any]:
    """`-x value`, `--long value`, `--long=value`, flags; anything else is unknown."""
    by_long = {o.long: o for o in opts}
    by_short = {o.short: o for o in opts if o.short}
    values: dict[str, Any] = {}
    i = 0
    while i < len(args):
        a = args[i]
        inline: str | None = None
        opt: Opt | None = None
        if a.startswith("--") and len(a) > 2:
            name, eq, rest = a[2:].partition("=")
            opt = by_long.get(name)
            inline = rest if eq else None
        elif len(a) == 2 and a[0] == "-":
            opt = by_short.get(a[1])
        if opt is None:
            raise CliError("unknown", a)
        if opt.arg is None:
            if inline is not None:
                raise CliError("illegal", f"option '{a}' takes no value")
            values[opt.long] = True
        elif inline is not None:
            values[opt.long] = inline
        elif i + 1 < len(args):
            i += 1
            values[opt.long] = args[i]
        else:
            raise CliError("parse", f"option '{a}' needs a value")
        i += 1
    return values


def _usage(spec: Spec) -> str:
    lines = [f"Usage: {spec.tool} "]
    for o in spec.opts:
        long = f"--{o.long}" + (f" <{o.arg}>" if o.arg else "")
        if o.short:
            lines.append(" {},{:<45}{:<2}{:<28}".format(f"-{o.short}", long, o.need, o.desc))
        else:
            lines.append(" {} {:<45}{:<2}{:<28}".format("  ", long, o.need, o.desc))
    lines += ["", "Entries marked with an asterisk (*) are mandatory.",
              "Entries marked with an question mark (?) are mandatory depending on your",
              "configuration.",
              "Entries marked with a pipe (|) are mandatory for one another which means that",
              "at least one of them must be set.", "", ""]
    return "\n".join(lines)


def _first_part(ctx: Ctx, spec: Spec) -> None:
    if spec.error_prefix:
        ctx.err(spec.error_prefix + "\n")


def _print_error(ctx: Ctx, msg: str, spec: Spec | None = None) -> None:
    if spec:
        _first_part(ctx, spec)
    ctx.err(f"Error: {msg}\n")


def _server_exception(ctx: Ctx, msg: str, spec: Spec | None = None) -> None:
    if spec:
        _first_part(ctx, spec)
    ctx.err(f"Server response:\n {msg}\n\n")


def admin_parse(ctx: Ctx, spec: Spec, args: Sequence[str]) -> dict[str, Any]:
    """OX's AdminParser.ownparse + printErrors: unknown option 111, bad value 109, --help 0,
    --environment 0, missing mandatory options 104 (each with the usage)."""
    try:
        values = parse_args(spec.opts, args)
    except CliError as e:
        if e.kind == "unknown":
            _print_error(ctx, f"Unrecognized options on the command line: {e}", spec)
            ctx.out(_usage(spec))
            raise Exit(EXIT_UNKNOWN_OPTION) from e
        _print_error(ctx, f"Failed parsing command line: {e}", spec)
        ctx.out(_usage(spec))
        raise Exit(EXIT_ILLEGAL_OPTION_VALUE) from e
    if values.get("help"):
        ctx.out(_usage(spec))
        raise Exit(0)
    timeout = values.get("responsetimeout")
    if timeout is not None and not str(timeout).lstrip("-").isdigit():
        _print_error(ctx, f"Illegal option value : {timeout}", spec)
        ctx.out(_usage(spec))
        raise Exit(EXIT_ILLEGAL_OPTION_VALUE)
    if values.get("environment"):
        ctx.out("\nThe following environment variables and their current value are known\n"
                "and can be modified to change behaviour:\n\n")
        for key in sorted(k for k in ctx.env if k.startswith("OX_")):
            ctx.out(f"\t{key}={ctx.env[key]}\n")
        raise Exit(0)
    missing = [o.long for o in spec.opts if o.need == "*" and values.get(o.long) is None]
    if missing:
        _print_error(ctx, 'Option(s) "{}" missing'.format(",".join(missing)), spec)
        ctx.out(_usage(spec))
        raise Exit(EXIT_MISSING_OPTION)
    return values


def check_credentials(ctx: Ctx, spec: Spec | None, values: Mapping[str, Any], preamble: str = "") -> None:
    """OX's master admin authentication, when the site has it (OX_MASTER_PASSWORD_FILE).
    `preamble`: what the tool prints before any error (upgradeschemata's catch-all line)."""
    expected = _secret(ctx.env, "OX_MASTER_PASSWORD", "OX_MASTER_PASSWORD_FILE")
    if expected is None:
        return
    user, password = values.get("adminuser"), values.get("adminpass")
    if user is None and password is None and spec is not None:
        ctx.err(preamble)
        _print_error(ctx, 'Options "adminuser, adminpass" missing', spec)
        ctx.out(_usage(spec))
        raise Exit(EXIT_MISSING_OPTION)
    if password is None:
        password = ctx.env.get("ADMIN_PASSWORD")
    if user != ctx.env.get("OX_MASTER_ADMIN", configdb.MASTER_ADMIN) or password != expected:
        ctx.err(preamble)
        _server_exception(ctx, "Authentication failed", spec)  # message: guess
        raise Exit(EXIT_INVALID_CREDENTIALS if spec is not None else 1)


def _run_admin(ctx: Ctx, spec: Spec, args: Sequence[str],
               body: Callable[[Any, dict[str, Any]], int]) -> int:
    values = admin_parse(ctx, spec, args)
    check_credentials(ctx, spec, values)
    conn = _connect(ctx)
    try:
        return body(conn, values)
    except OxError as e:
        _server_exception(ctx, str(e), spec)
        return _KIND_EXIT.get(e.kind, 1)
    except pymysql.MySQLError as e:
        _server_exception(ctx, str(e), spec)
        return EXIT_SERVERSTORAGE_ERROR
    finally:
        conn.close()


# --------------------------------------------------------------------------- output helpers


def table(aligns: Sequence[str], header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """OX's doOutput / TableWriter: columns padded to their widest cell (the last one too),
    one space between columns, 'r' columns right-aligned."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    lines = []
    for row in [list(header), *rows]:
        cells = [c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(row, widths, aligns, strict=True)]
        lines.append(" ".join(cells))
    return "\n".join(lines) + "\n"


def csv(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """OX's doCSVOutput: the header plain, every cell quoted (quotes doubled)."""
    lines = [",".join(header)]
    lines += [",".join('"' + c.replace('"', '""') + '"' for c in row) for row in rows]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the tools


def registerserver(ctx: Ctx, args: Sequence[str]) -> int:
    spec = Spec("registerserver", [*_COMMON, *_CREDENTIALS,
                                   Opt("name", "n", "name", "The name of the server", "*")],
                error_prefix="server could not be registered: ")

    def body(conn: Any, v: dict[str, Any]) -> int:
        server_id = configdb.register_server(conn, str(v["name"]))
        ctx.out(f"server {server_id} registered\n")
        return 0
    return _run_admin(ctx, spec, args, body)


def listserver(ctx: Ctx, args: Sequence[str]) -> int:
    spec = Spec("listserver", [*_COMMON, *_CREDENTIALS,
                               Opt("searchpattern", "s", "searchpattern", "Search/List pattern!"),
                               Opt("csv", None, None, "Format output to csv")],
                error_prefix="servers could not be listed: ")

    def body(conn: Any, v: dict[str, Any]) -> int:
        rows = [[str(i), n] for i, n in configdb.list_servers(conn, str(v.get("searchpattern") or "*"))]
        ctx.out(csv(["id", "name"], rows) if v.get("csv") else table("rl", ["Id", "Name"], rows))
        return 0
    return _run_admin(ctx, spec, args, body)


def listdatabaseschema(ctx: Ctx, args: Sequence[str]) -> int:
    spec = Spec("listdatabaseschema", [
        *_COMMON, *_CREDENTIALS,
        Opt("searchpattern", "s", "searchpattern", "Search/List pattern!"),
        Opt("csv", None, None, "Format output to csv"),
        Opt("only-empty-schemas", None, None, "(Optionally) Specifies to list only empty schemas"),
        Opt("lab-state", None, None,
            "Lab only (not in OX): append enabled, server_id, update_state, version")],
        error_prefix="database schemas could not be listed: ")

    def body(conn: Any, v: dict[str, Any]) -> int:
        found = configdb.list_schemata(conn, str(v.get("searchpattern") or "*"),
                                       bool(v.get("only-empty-schemas")))
        lab_state = bool(v.get("lab-state"))
        rows: list[list[str]] = []
        for r in found:
            host = (urlparse(r.url[len("jdbc:"):]).hostname or "") if r.url.startswith("jdbc:") else r.url
            row = [str(r.pool_id), r.pool_name, r.schema, r.url if v.get("csv") else host, str(r.contexts)]
            if lab_state:
                row += ["true" if r.enabled else "false", str(r.server_id), r.update_state, r.version]
            rows.append(row)
        extra = ["enabled", "server_id", "update_state", "version"] if lab_state else []
        if v.get("csv"):
            ctx.out(csv(["id", "display_name", "schema_name", "url", "currentunits", *extra], rows))
        elif not rows:
            ctx.out("No such database schemas found\n")
        else:
            header = ["id", "name", "schemaname", "hostname", "curctx", *extra]
            ctx.out(table("rlllr" + "lrll"[:len(extra)], header, rows))
        return 0
    return _run_admin(ctx, spec, args, body)


_RMI_HOSTS = Opt("rmi-hosts", "r", "rmi_hosts", "A list of RMI hosts e.g. 192.168.1.25:1099,192.168.1.26. "
                 "If no port is given the default RMI port 1099 is taken.")


def disableschema(ctx: Ctx, args: Sequence[str]) -> int:
    spec = Spec("disableschema", [*_COMMON, *_CREDENTIALS,
                                  Opt("schema", "m", "schema_name", "The name of the schema to disable", "*"),
                                  _RMI_HOSTS])

    def body(conn: Any, v: dict[str, Any]) -> int:
        configdb.disable_schema(conn, str(v["schema"]))
        return 0
    return _run_admin(ctx, spec, args, body)


def enableschema(ctx: Ctx, args: Sequence[str]) -> int:
    spec = Spec("enableschema", [*_COMMON, *_CREDENTIALS,
                                 Opt("target-schema", "m", "schema_name", "The name of the schema to enable.",
                                     "*"),
                                 _RMI_HOSTS])

    def body(conn: Any, v: dict[str, Any]) -> int:
        configdb.enable_schema(conn, str(v["target-schema"]))
        return 0
    return _run_admin(ctx, spec, args, body)


def changeserver(ctx: Ctx, args: Sequence[str]) -> int:
    spec = Spec("changeserver", [
        *_COMMON,
        Opt("schema-name", "m", "schema_name", "The name of the schema for which to change the server id",
            "*"),
        Opt("server-id", "s", "server_id", "The identifier of the new server", "*"),
        *_CREDENTIALS], error_prefix="server could not be changed: ")

    def body(conn: Any, v: dict[str, Any]) -> int:
        schema, sid = str(v["schema-name"]).strip(), str(v["server-id"]).strip()
        if not schema:
            _print_error(ctx, "Please specify the schema name\n", spec)
            return 1
        if not sid.lstrip("-").isdigit():
            _print_error(ctx, f"Invalid server id: {sid}", spec)
            return 1
        configdb.change_server(conn, int(sid), schema)
        ctx.out(f"Successfully changed to server '{int(sid)}' for schema '{schema}'.\n")
        return 0
    return _run_admin(ctx, spec, args, body)


# ---- runupdate: a commons-cli tool (AbstractRmiCLI), not an AdminParser one

_RUNUPDATE_OPTS = [
    Opt("context", "c", "arg", "A valid context identifier contained in target schema"),
    Opt("name", "n", "arg", "A valid schema name. This option is a substitute for '-c/--context' option. "
        "If both are present '-c/--context' is preferred."),
    Opt("adminuser", "A", "arg", "Admin username"),
    Opt("adminpass", "P", "arg", "Admin password"),
    Opt("server", "s", "arg", "The optional RMI server (default: localhost)"),
    Opt("port", "p", "arg", "The optional RMI port (default:1099)"),
    Opt("responsetimeout", None, "arg", "The optional response timeout in seconds when reading data from "
        "server (default: 0s; infinite)"),
    Opt("help", "h", None, "Prints a help text"),
]


def _runupdate_help() -> str:
    # Approximation of commons-cli's HelpFormatter output (guess: exact layout unknown).
    lines = ["usage: runUpdate", "Runs the schema's update."]
    for o in _RUNUPDATE_OPTS:
        flag = (f"-{o.short}," if o.short else "   ") + f"--{o.long}" + (f" <{o.arg}>" if o.arg else "")
        lines.append(f" {flag:<28} {o.desc}")
    return "\n".join(lines) + "\n"


def _update_settings(ctx: Ctx) -> tuple[float, str, set[str]]:
    """runupdate's work per schema (s), target version and injected failures, from the env."""
    try:
        seconds = max(0.0, float(ctx.env.get("OX_RUNUPDATE_SECONDS", "0.2")))
    except ValueError:
        seconds = 0.2
    # On an OX node runupdate brings a schema to the release installed *there* (the node's
    # installed/version, which `oxpkg install` writes); OX_VERSION is the fallback.
    target = ""
    version_file = ctx.env.get("OX_VERSION_FILE")
    if version_file:
        try:
            target = Path(version_file).read_text(encoding="utf-8").strip()
        except OSError:
            target = ""
    target = target or ctx.env.get("OX_VERSION") or configdb.DEFAULT_TARGET_VERSION
    faults = {s.strip() for s in ctx.env.get("OX_UPDATE_FAULTS", "").split(",") if s.strip()}
    return seconds, target, faults


def runupdate(ctx: Ctx, args: Sequence[str]) -> int:
    try:
        v = parse_args(_RUNUPDATE_OPTS, args)
    except CliError as e:
        ctx.err(f"Unrecognized option: {e}\n" if e.kind == "unknown" else f"{e}\n")
        ctx.out(_runupdate_help())
        return 1
    if v.get("help"):
        ctx.out(_runupdate_help())
        return 0
    cid: int | None = None
    if v.get("context") is not None:
        try:
            cid = int(str(v["context"]).strip())
        except ValueError:
            ctx.err(f"Context parameter is not a number: {v['context']}\n")
            ctx.out(_runupdate_help())
            return 1
    elif v.get("name") is None:
        ctx.err("Missing context/schema identifier.\n")
        ctx.out(_runupdate_help())
        return 1
    # The seed runs it without -A/-P: checked only when given (guess: depends on the site).
    if v.get("adminuser") is not None or v.get("adminpass") is not None:
        check_credentials(ctx, None, v)
    seconds, target, faults = _update_settings(ctx)
    conn = _connect(ctx)
    try:
        schema = configdb.schema_of_context(conn, cid) if cid is not None else str(v["name"])
        failed = configdb.run_update(conn, schema, seconds=seconds, target_version=target,
                                     fail_schemata=faults)
    except (OxError, pymysql.MySQLError) as e:
        _server_exception(ctx, str(e))  # guess: how the RMI error surfaces
        return 1
    finally:
        conn.close()
    if failed:
        ctx.out("The following update task(s) failed:\n")
        ctx.out(table("lll", ["taskName", "className", "schema"], [[t, t, schema] for t in failed]))
    return 0


# ---- upgradeschemata


def _prompt(ctx: Ctx) -> bool:
    """OX's prompt loop (a Scanner reading words): True on 'continue', False on 'abort'."""
    while True:
        line = ctx.inp.readline()
        if not line:
            raise OxError("stdin", "no answer ('abort' or 'continue') on standard input")
        for word in line.split():
            if word == "abort":
                ctx.out("OK, aborting upgrade\n")
                return False
            if word == "continue":
                ctx.out("OK, proceeding with the upgrade\n")
                return True
            ctx.err(f"Unrecognized command: '{word}'\n")
            ctx.out(PROMPT + "\n")


def upgradeschemata(ctx: Ctx, args: Sequence[str]) -> int:
    spec = Spec("upgradeschemata", [
        *_COMMON,
        Opt("server-name", "n", "server-name", "The name of the server to register and point all upgraded "
            "schemata to", "*"),
        Opt("host", "H", "host", "The optional JMX host (default:localhost)", "?"),
        Opt("port", "p", "port", "The optional JMX port (default:9999)", "?"),
        Opt("login", "l", "login", "The optional JMX login (if JMX has authentication enabled)", "?"),
        Opt("password", "s", "password", "The optional JMX password (if JMX has authentication enabled)",
            "?"),
        Opt("schema-name", "m", "schema-name", "The optional schema name to continue from", "?"),
        Opt("force", "f", None, "Forces the upgrade even if the updates fail in some schemata"),
        Opt("skip-schemata", "k", "skip-schemata", "Defines the names of the schemata as a comma separated "
            "list that should be skipped during the upgrade phase", "?"),
        *_CREDENTIALS])
    values = admin_parse(ctx, spec, args)
    server_name = str(values["server-name"])
    start = values.get("schema-name")
    if start is not None and "_" not in str(start):
        ctx.err(f"Invalid/Malformed schema name: '{start}'\n")
        ctx.out(_usage(spec))
        return 1
    force = bool(values.get("force"))
    skipped = [s.strip() for s in str(values.get("skip-schemata") or "").split(",") if s.strip()]
    check_credentials(ctx, spec, values, preamble=UPGRADE_FAILED)
    conn = _connect(ctx)
    try:
        return _upgrade(ctx, conn, server_name, None if start is None else str(start), skipped, force)
    except (OxError, pymysql.MySQLError) as e:
        ctx.err(UPGRADE_FAILED)
        _server_exception(ctx, str(e))
        return _KIND_EXIT.get(e.kind, 1) if isinstance(e, OxError) else EXIT_SERVERSTORAGE_ERROR
    finally:
        conn.close()


def _upgrade(ctx: Ctx, conn: Any, server_name: str, start: str | None, skipped: list[str],
             force: bool) -> int:
    # Step 3: register the server (or use the registered one, if the operator says so).
    server_id = configdb.find_server(conn, server_name)
    if server_id is not None:
        ctx.out(ALREADY_REGISTERED.format(id=server_id))
        if not _prompt(ctx):
            return 0
    else:
        ctx.out(f"Registering the server with name '{server_name}'...")
        server_id = configdb.register_server(conn, server_name)
        ctx.out("OK\n")
    # The schemata in natural order; -m continues after the named schema, -k leaves some out.
    names = [r.schema for r in configdb.list_schemata(conn)]
    if start is not None and start in names:
        ctx.out(f"Skipping to schema '{start}'\n")
        names = names[names.index(start) + 1:]
    if start is not None or skipped:
        ctx.out("Filtering out skipped schemata: " + ", ".join(f"'{s}'" for s in skipped) + "\n")
        names = [n for n in names if n not in skipped]
    seconds, target, faults = _update_settings(ctx)
    # Steps 4 to 7 per schema.
    for schema in names:
        try:
            ctx.out(f"Disabling schema '{schema}'...")
            configdb.disable_schema(conn, schema)
            ctx.out("OK\n")
            ctx.out(f"Changing server for schema '{schema}' to '{server_name}'...")
            configdb.change_server(conn, server_id, schema)
            ctx.out("OK\n")
            ctx.out("Running updates...")
            failed = configdb.run_update(conn, schema, seconds=seconds, target_version=target,
                                         fail_schemata=faults)
            if not failed:
                ctx.out("OK\n")
            else:
                ctx.err(f"\nErrors while running updates for schema '{schema}': \n")
                ctx.err("The following update task(s) failed: \n"
                        + "\n".join(f" {t} (schema={schema})" for t in failed) + "\n")
                if not force:
                    ctx.err(f"Schema upgrade for schema '{schema}' was aborted. Manual intervention might be "
                            "required.\n")
                    return 1
            ctx.out(f"Enabling schema '{schema}'...")
            configdb.enable_schema(conn, schema)
            ctx.out("OK\n")
        except OxError as e:
            if e.kind == "storage" and "The schema is empty" in str(e):
                ctx.out(f"The schema '{schema}' is empty. Skipping.\n")
            elif e.kind == "no_such_object":
                ctx.out(f"Schema {schema} not found. Skipping\n")
            else:
                raise
    return 0


# --------------------------------------------------------------------------- entry point and install


_TOOL_FUNCS: dict[str, Callable[[Ctx, Sequence[str]], int]] = {
    "registerserver": registerserver, "listserver": listserver, "listdatabaseschema": listdatabaseschema,
    "disableschema": disableschema, "enableschema": enableschema, "changeserver": changeserver,
    "runupdate": runupdate, "upgradeschemata": upgradeschemata,
}


def main(argv: Sequence[str] | None = None, *, stdin: TextIO | None = None, stdout: TextIO | None = None,
         stderr: TextIO | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the tool named by argv[0]'s basename, else by argv[1]; returns the exit code."""
    argv = list(sys.argv if argv is None else argv)
    prog = os.path.basename(argv[0]) if argv else ""
    if prog in _TOOL_FUNCS:
        tool, args = prog, argv[1:]
    elif len(argv) > 1 and argv[1] in _TOOL_FUNCS:
        tool, args = argv[1], argv[2:]
    else:
        (stderr or sys.stderr).write("usage: python -m lab.ox.tools <tool> [options]\n"
                                     f"tools: {', '.join(TOOLS)}\n")
        return 2
    ctx = Ctx(tool=tool, env=load_env(os.environ if environ is None else environ), inp=stdin or sys.stdin,
              stdout=stdout or sys.stdout, stderr=stderr or sys.stderr)
    try:
        return _TOOL_FUNCS[tool](ctx, args)
    except Exit as e:
        return e.code


_WRAPPER = """#!/bin/sh
# Open-Xchange command line tool `{tool}`: the lab's stand-in (lab/ox/tools.py),
# written by lab.ox.tools.install_tools. Its settings are in {env_name}.
OX_TOOLS_ENV={env_file}
export OX_TOOLS_ENV
PYTHONPATH={root}${{PYTHONPATH:+:$PYTHONPATH}}
export PYTHONPATH
exec {python} -m lab.ox.tools {tool} "$@"
"""


def install_tools(bin_dir: Path, python: str, env: Mapping[str, str],
                  admin_port: int | None = None) -> list[Path]:
    """Write `bin_dir/ox-tools.env` (mode 0600; paths of secret files, never their values)
    and one executable wrapper per tool; returns the wrappers' paths.

    Without `admin_port` (direct mode: no middleware, e.g. tests/test_lab_ox_tools.py) each
    wrapper runs the tool in a fresh interpreter. With it (an OX node, lab/ox/nodes.py) each
    wrapper is a thin client (bash) of the node's middleware listening on 127.0.0.1:admin_port
    (lab/ox/admin.py), which runs the tool in-process - and the tools fail while it is down."""
    bin_dir = bin_dir.resolve()
    bin_dir.mkdir(parents=True, exist_ok=True)
    env_file = bin_dir / ENV_FILE_NAME
    lines = ["# Settings of the lab's Open-Xchange tools (lab/ox/tools.py); KEY=VALUE, no quoting."]
    for key, value in env.items():
        if "\n" in key or "\n" in value or "=" in key:
            raise ValueError(f"env entry {key!r} cannot be written to {env_file}")
        lines.append(f"{key}={value}")
    fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(env_file, 0o600)
    paths = []
    for tool in TOOLS:
        path = bin_dir / tool
        if admin_port is not None:
            from lab.ox import admin  # the endpoint's module imports this one

            text = admin.client_script(tool, admin_port)
        else:
            text = _WRAPPER.format(tool=tool, env_name=ENV_FILE_NAME, env_file=shlex.quote(str(env_file)),
                                   root=shlex.quote(str(PROJECT_ROOT)), python=shlex.quote(python))
        path.write_text(text, encoding="utf-8")
        path.chmod(0o755)
        paths.append(path)
    return paths


def install_lab_tools(cfg: Any, **overrides: str) -> Path:
    """The tools for the lab `cfg` in cfg.ox_dir/bin, talking to its config DB; returns bin/."""
    bin_dir = Path(cfg.ox_dir) / "bin"
    install_tools(bin_dir, str(Path(cfg.python).absolute()), configdb.tools_env(cfg, **overrides))
    return bin_dir


if __name__ == "__main__":
    sys.exit(main())
