"""Open-Xchange's command line tools, as the lab's OX stand-in runs them.

One entry point for all nine tools, dispatching on the program name (argv[0]) or, with
`python -m lab.ox.tools <tool> [flags]`, on the first argument. `install_tools` writes small
shell wrappers named like OX's (registerserver, listserver, listdatabase, listdatabaseschema,
disableschema, enableschema, changeserver, runupdate, upgradeschemata) next to an env file.

Fidelity. Flags, messages, their order and stream, exit codes and refusals are re-derived from
OX's public source (open-xchange/appsuite-middleware, 7.10.x: AdminParser,
BasicCommandlineOptions, ObjectNamingAbstraction, ListServer, ListDatabase, ListDatabaseSchema,
RegisterServer, ChangeServer, DisableSchema, EnableSchema, UpgradeSchemata, the 7.10.1+
UpdateTaskRunUpdateCLT on AbstractRmiCLI, and the server side: OXUtil, OXUtilMySQLStorage,
SchemaMoveImpl, UpdateTaskServiceImpl, UpdateProcess, SchemaExceptionCodes). Each behaviour
names its source next to it; lab/ox/README.md lists every difference to the earlier stand-in
and tests/fixtures/ox/ holds the derived output texts. The remaining deliberate deviations:
  * JMX/RMI connection flags (-H, -p, -l, -s of upgradeschemata; -s, -p of runupdate; -r of
    disable/enableschema; --responsetimeout) are accepted and ignored; --nonl too (the output
    keeps its newlines).
  * Stack frames after "Server response:" are made up from OX's class and method names,
    without line numbers; a real server's frames depend on its build.
  * runupdate's help text is an approximation of commons-cli's HelpFormatter layout.
  * runupdate's message for an unknown schema nests a simplified OXException text.
  * listdatabaseschema --lab-state (not in OX) appends the lab's schema state columns.
  * Orders OX's SQL leaves open: listdatabaseschema lists in the string order of the schema
    name (deliberately not numerically), listserver and listdatabase by id.
  * Transient faults (configdb.inject_tool_fault) are lab-made: they fail a tool as a dead RMI
    registry (105) or a broken remote call (107) would.

Output formats (stdout unless noted; tables are OX's: every column padded to its widest cell,
columns separated by one space, right-aligned where marked r; CSV: header unquoted, every
non-null cell double-quoted, a null cell empty):
  registerserver     "server <id> registered"
  listserver         table Id(r) Name;  --csv: id,name
  listdatabase       table id(r) name hostname master mid(r) maxctx(r) curctx(r) hlimit max(r)
                     inital(r); --csv: id,display_name,url,master,masterid,maxUnits,currentunits,
                     poolHardLimit,poolMax,poolInitial,login,password,driver,read_id,scheme
  listdatabaseschema table id(r) name schemaname hostname curctx(r) (pools with max_units 0
                     left out); --csv: id,display_name,schema_name,url,currentunits;
                     no match (table): "No such database schemas found"
  disableschema / enableschema   nothing (exit 0)
  changeserver       "Successfully changed to server '<id>' for schema '<schema>'."
  runupdate          nothing when all update tasks ran (or another update of the schema is
                     running: the conflict is only logged server-side); otherwise
                     "The following update task(s) failed:" and a table taskName className
                     schema - and exit 0 either way: a caller must read the output.
  upgradeschemata    per schema (print + "OK"):
                       Disabling schema '<s>'...OK
                       Changing server for schema '<s>' to '<server name>'...OK
                       Running updates...OK
                       Enabling schema '<s>'...OK
                     an empty schema: "Disabling schema '<s>'...Schema <s> not found. Skipping";
                     before them "Registering the server with name '<n>'...OK" or, when exactly
                     one server matches the name, the WARNING (without -m) or "The server ...
                     will be used ..." (with -m) and the abort/continue prompt (stdin); with -m
                     the schemata sorted by number, "Skipping to schema '<m>'" when that number
                     is found, and "Filtering out skipped schemata: " (-k has no effect). A
                     failed update leaves "Running updates..." unterminated on stdout and writes
                     to stderr "\nErrors while running updates for schema '<s>': \n" and the
                     failures; without -f then "Schema upgrade for schema '<s>' was aborted.
                     Manual intervention might be required." and exit 1 (the schema stays
                     disabled, already pointing at the new server); with -f the schema is
                     enabled again and the run goes on (exit 0).

Exit codes: the admin tools use OX's BasicCommandlineOptions codes: 0 success; 1 other errors
(NoSuchObjectException, TargetDatabaseException, client-side checks); 101 invalid credentials;
103 invalid data; 104 missing option (also -A and -P both absent with authentication on); 105
RMI registry unreachable; 106 storage error; 107 other remote error; 109 illegal option value;
111 unknown option. runupdate (commons-cli): 0, 1 for every error, 255 for empty credentials.
-h/--help prints the usage and exits 0.

Environment (real environment variables win over the env file named by OX_TOOLS_ENV):
  OX_CONFIGDB_HOST / _PORT / _USER, OX_CONFIGDB_PASSWORD_FILE (or OX_CONFIGDB_PASSWORD),
  OX_CONFIGDB_SOCKET (instead of host/port)      the config DB connection
  OX_MASTER_ADMIN, OX_MASTER_PASSWORD_FILE        master authentication (unset: none); the
                                                  admin tools take ADMIN_PASSWORD for a missing
                                                  -P, as OX's do; runupdate does not
  OX_RUNUPDATE_SECONDS (default 0.2)              runupdate's work per schema
  OX_VERSION_FILE                                 the version runupdate brings a schema to:
                                                  this file's content (an OX node's
                                                  installed/version) when readable, else
  OX_VERSION                                      this one
  OX_UPDATE_FAULTS (a,b,c)                        runupdate fails on these schemata (besides
                                                  the config DB's update_faults table)
"""

from __future__ import annotations

import logging
import os
import re
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

TOOLS = (
    "registerserver",
    "listserver",
    "listdatabase",
    "listdatabaseschema",
    "disableschema",
    "enableschema",
    "changeserver",
    "runupdate",
    "upgradeschemata",
)
ENV_FILE_NAME = "ox-tools.env"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("lab.ox.tools")
# What OX only logs on the server (e.g. a schema lock conflict) goes to the middleware's log
# (lab/ox/middleware.py configures the root logger); a tool run directly stays silent.
log.addHandler(logging.NullHandler())

# BasicCommandlineOptions (com.openexchange.admin.console/src/com/openexchange/admin/console/
# BasicCommandlineOptions.java L76-L126): the admin tools' exit codes.
EXIT_INVALID_CREDENTIALS = 101
EXIT_INVALID_DATA = 103
EXIT_MISSING_OPTION = 104
EXIT_COMMUNICATION_ERROR = 105
EXIT_SERVERSTORAGE_ERROR = 106
EXIT_REMOTE_ERROR = 107
EXIT_ILLEGAL_OPTION_VALUE = 109
EXIT_UNKNOWN_OPTION = 111
# ObjectNamingAbstraction.printErrors (…/console/ObjectNamingAbstraction.java L183-L292): which
# server exception gives which exit code (NoSuchObjectException and TargetDatabaseException
# fall through to the final else: 1).
_KIND_EXIT = {
    "invalid_data": EXIT_INVALID_DATA,
    "storage": EXIT_SERVERSTORAGE_ERROR,
    "no_such_object": 1,
    "target_database": 1,
}
# runupdate (AbstractRmiCLI.getAuthFailedExitCode: -1, i.e. 255 for the shell).
EXIT_AUTH_FAILED_CLI = 255

# UpgradeSchemata (…/console/util/database/UpgradeSchemata.java @377c4e4a): the catch-all
# line (L154), the prompt (PROMPT, L100) and the texts around it (registerServer, L391-L400).
UPGRADE_FAILED = "An error occurred during schema upgrade. Manual intervention is advised.\n"
PROMPT = "Type 'abort' to abort the upgrade process, or 'continue' to proceed ['abort'/'continue']:"
ALREADY_REGISTERED = (
    "WARNING: The specified server is already registered with id '{id}'.\n"
    "         If you continue the already existing server will be used to point the "
    "updated schemata after the update tasks complete.\n"
    "         " + PROMPT + "\n"
)
CONTINUE_WITH_SERVER = (
    "The server '{name}' with id '{id}' will be used to point the updated schemata after "
    "the update tasks complete.\n" + PROMPT + "\n"
)
# AbstractAdministrativeCLI.optAuthenticate (runupdate, 7.10.1+): -A or -P empty.
NO_CREDENTIALS = "You must provide administrative credentials to proceed.\n"
# BasicAuthenticator.doAuthentication(Credentials) (com.openexchange.admin .../daemons/
# BasicAuthenticator.java): InvalidCredentialsException("Authentication failed").
AUTH_FAILED = "Authentication failed"
# What a java.rmi.ConnectException (RMI registry not answering) and a broken remote call
# (java.rmi.UnmarshalException around an EOFException) say; RemoteException.getMessage() is
# "<message>; nested exception is: \n\t<cause>". Used by the injected tool faults.
RMI_CONNECT_REFUSED = (
    "Connection refused to host: localhost; nested exception is: \n"
    "\tjava.net.ConnectException: Connection refused (Connection refused)"
)
RMI_CALL_BROKEN = "Error unmarshaling return header; nested exception is: \n\tjava.io.EOFException"
# Stack frames after a server exception's message (BasicCommandlineOptions.printServerException
# prints one "\tat <frame>" line per frame). Which frames a real server sends depends on its
# build; the lab's are made up from OX's class and method names, without line numbers (Java
# prints "(File.java)" then), followed by the RMI client frames every remote call has.
_RMI_CLIENT_FRAMES = (
    "sun.rmi.transport.StreamRemoteCall.exceptionReceivedFromServer(StreamRemoteCall.java)",
    "sun.rmi.transport.StreamRemoteCall.executeCall(StreamRemoteCall.java)",
    "sun.rmi.server.UnicastRef.invoke(UnicastRef.java)",
)


def frames(*methods: str) -> tuple[str, ...]:
    """`pkg.Class.method` -> Java's frame text `pkg.Class.method(Class.java)`, then the RMI frames."""
    out = []
    for m in methods:
        cls = m.rsplit(".", 2)[-2]
        out.append(f"{m}({cls.split('$')[0]}.java)")
    return (*out, *_RMI_CLIENT_FRAMES)


_OXUTIL = "com.openexchange.admin.rmi.impl.OXUtil"
_STORAGE = "com.openexchange.admin.storage.mysqlStorage.OXUtilMySQLStorage"
_SCHEMA_MOVE = "com.openexchange.admin.plugin.hosting.schemamove.internal"
_AUTH_FRAME = "com.openexchange.admin.daemons.BasicAuthenticator.doAuthentication"


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
    remote: str = ""  # the server-side method (for the stack frames of its exceptions)


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
        return configdb.connect(
            host=env.get("OX_CONFIGDB_HOST", "127.0.0.1"),
            port=int(env.get("OX_CONFIGDB_PORT", "3306")),
            user=env.get("OX_CONFIGDB_USER", configdb.OX_DB_USER),
            password=_secret(env, "OX_CONFIGDB_PASSWORD", "OX_CONFIGDB_PASSWORD_FILE") or "",
            unix_socket=env.get("OX_CONFIGDB_SOCKET") or None,
        )
    except (pymysql.MySQLError, OSError, ValueError) as e:
        _print_error(ctx, f"cannot reach the configuration database: {e}")
        raise Exit(EXIT_COMMUNICATION_ERROR) from e


# --------------------------------------------------------------------------- AdminParser


_COMMON = [
    Opt("help", "h", None, "Prints a help text"),
    Opt("environment", None, None, "Show info about commandline environment"),
    Opt("nonl", None, None, "Remove all newlines (\\n) from output"),
    Opt(
        "responsetimeout",
        None,
        "responsetimeout",
        "response timeout in seconds for reading response from the backend (default 0s; infinite)",
    ),
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
    lines += [
        "",
        "Entries marked with an asterisk (*) are mandatory.",
        "Entries marked with an question mark (?) are mandatory depending on your",
        "configuration.",
        "Entries marked with a pipe (|) are mandatory for one another which means that",
        "at least one of them must be set.",
        "",
        "",
    ]
    return "\n".join(lines)


def _first_part(ctx: Ctx, spec: Spec | None) -> None:
    """ObjectNamingAbstraction.printFirstPartOfErrorText (L165-L177): "<object> could not be
    <verb>ed: " on its own line, chosen by the tool's class name (none for upgradeschemata,
    disableschema, enableschema)."""
    if spec is not None and spec.error_prefix:
        ctx.err(spec.error_prefix + "\n")


def _print_error(ctx: Ctx, msg: str, spec: Spec | None = None) -> None:
    """BasicCommandlineOptions.printError: stderr "Error: <msg>" (println)."""
    _first_part(ctx, spec)
    ctx.err(f"Error: {msg}\n")


def server_response(msg: str | None, stack: Sequence[str] = (), exception: str = "") -> str:
    """BasicCommandlineOptions.printServerException (without --nonl): "Server response:\\n <msg>\\n"
    (or the exception's toString() when it has no message), one "\\tat <frame>" line per stack
    frame, and println's own newline."""
    head = f"Server response:\n {msg}\n" if msg is not None else exception + "\n"
    return head + "".join(f"\tat {f}\n" for f in stack) + "\n"


def _server_exception(
    ctx: Ctx, msg: str | None, spec: Spec | None = None, stack: Sequence[str] = (), exception: str = ""
) -> None:
    _first_part(ctx, spec)
    ctx.err(server_response(msg, stack, exception))


def admin_parse(ctx: Ctx, spec: Spec, args: Sequence[str], banner: str = "") -> dict[str, Any]:
    """OX's AdminParser.ownparse + printErrors: unknown option 111, bad value 109, --help 0,
    --environment 0, missing mandatory options 104 (each with the usage on stdout).
    `banner`: what the tool prints before an error other than a missing option
    (upgradeschemata's catch-all line, UpgradeSchemata L152-L154)."""
    try:
        values = parse_args(spec.opts, args)
    except CliError as e:
        ctx.err(banner)
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
        ctx.err(banner)
        _print_error(ctx, f"Illegal option value : {timeout}", spec)
        ctx.out(_usage(spec))
        raise Exit(EXIT_ILLEGAL_OPTION_VALUE)
    if values.get("environment"):
        ctx.out(
            "\nThe following environment variables and their current value are known\n"
            "and can be modified to change behaviour:\n\n"
        )
        for key in sorted(k for k in ctx.env if k.startswith("OX_")):
            ctx.out(f"\t{key}={ctx.env[key]}\n")
        raise Exit(0)
    missing = [o.long for o in spec.opts if o.need == "*" and values.get(o.long) is None]
    if missing:
        # MissingOptionException("Option(s) \"a,b\" missing"); UpgradeSchemata catches it
        # before its catch-all, so no banner (L152-L153).
        _print_error(ctx, 'Option(s) "{}" missing'.format(",".join(missing)), spec)
        ctx.out(_usage(spec))
        raise Exit(EXIT_MISSING_OPTION)
    return values


def master_password(ctx: Ctx) -> str | None:
    """The master admin's password when the site has master authentication (the lab's
    OX_MASTER_PASSWORD_FILE; lab nodes always have it), else None (no check at all)."""
    return _secret(ctx.env, "OX_MASTER_PASSWORD", "OX_MASTER_PASSWORD_FILE")


def check_credentials(ctx: Ctx, spec: Spec, values: Mapping[str, Any], banner: str = "") -> None:
    """The admin tools' credentials, checked server-side as OX does (OXUtil & co. call
    BasicAuthenticator.doAuthentication first). ObjectNamingAbstraction.printErrors L204-L214:
    InvalidCredentialsException with -A and -P both absent from the command line -> 'Error:
    Options "adminuser, adminpass" missing' + usage, 104 (ADMIN_PASSWORD does not count there);
    otherwise the server's message, 101. The password: -P, else ADMIN_PASSWORD
    (BasicCommandlineOptions.credentialsparsing); an empty -A/-P is sent as given (and fails)."""
    expected = master_password(ctx)
    if expected is None:
        return
    user, password = values.get("adminuser"), values.get("adminpass")
    if password is None:
        password = ctx.env.get("ADMIN_PASSWORD")
    if user == ctx.env.get("OX_MASTER_ADMIN", configdb.MASTER_ADMIN) and password == expected:
        return
    ctx.err(banner)
    if values.get("adminuser") is None and values.get("adminpass") is None:
        _print_error(ctx, 'Options "adminuser, adminpass" missing', spec)
        ctx.out(_usage(spec))
        raise Exit(EXIT_MISSING_OPTION)
    _server_exception(ctx, AUTH_FAILED, spec, frames(_AUTH_FRAME, spec.remote))
    raise Exit(EXIT_INVALID_CREDENTIALS)


def tool_fault(ctx: Ctx, conn: Any, spec: Spec | None, banner: str = "") -> None:
    """Lab only (configdb.inject_tool_fault): this call fails as an OX admin tool does when the
    RMI registry does not answer - printErrors' ConnectException branch (L183-L186): the
    prefix line, "Error: <message>", 105 - or when the remote call breaks - its
    RemoteException branch (L194-L197): the server print-out, 107."""
    kind = configdb.take_tool_fault(conn, ctx.tool)
    if kind is None:
        return
    ctx.err(banner)
    if kind == "connect":
        _print_error(ctx, RMI_CONNECT_REFUSED, spec)
        raise Exit(EXIT_COMMUNICATION_ERROR)
    _server_exception(ctx, RMI_CALL_BROKEN, spec, _RMI_CLIENT_FRAMES)
    raise Exit(EXIT_REMOTE_ERROR)


def _run_admin(
    ctx: Ctx,
    spec: Spec,
    args: Sequence[str],
    body: Callable[[Any, dict[str, Any]], int],
    check: Callable[[dict[str, Any]], int | None] | None = None,
) -> int:
    """An admin tool: parse, the tool's own checks (`check`: an exit code stops it), then the
    "remote" part: connection (fault injection), credentials, the operation."""
    values = admin_parse(ctx, spec, args)
    if check is not None and (code := check(values)) is not None:
        return code
    conn = _connect(ctx)
    try:
        tool_fault(ctx, conn, spec)
        check_credentials(ctx, spec, values)
        return body(conn, values)
    except OxError as e:
        _server_exception(ctx, str(e), spec, frames(_origin(e), spec.remote))
        return _KIND_EXIT.get(e.kind, 1)
    except pymysql.MySQLError as e:
        _server_exception(ctx, str(e), spec, frames(_STORAGE + ".sql", spec.remote))
        return EXIT_SERVERSTORAGE_ERROR
    finally:
        conn.close()


def _origin(e: OxError) -> str:
    """Where OX throws the exception (for the first stack frame)."""
    text = str(e)
    if text.startswith("No such schema"):
        return "com.openexchange.admin.storage.mysqlStorage.OXToolMySQLStorage.isDistinctWritePoolIDForSchema"
    if text.startswith("The schema '"):
        return _STORAGE + ".isSchemaDisabled"
    if text.startswith("Unable to change"):
        return _STORAGE + ".changeServer"
    if e.kind == "target_database":
        return _SCHEMA_MOVE + ".SchemaMoveImpl.disableSchema"
    return _OXUTIL + ".validate"


def _search_pattern(ctx: Ctx, spec: Spec, values: Mapping[str, Any]) -> str:
    """OXUtil.listServer / listDatabase / listDatabaseSchema: an empty pattern is
    InvalidDataException "Invalid search pattern" (103)."""
    pattern = str(values.get("searchpattern") if values.get("searchpattern") is not None else "*")
    if not pattern:
        raise OxError("invalid_data", "Invalid search pattern")
    return pattern


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


def csv(header: Sequence[str], rows: Sequence[Sequence[str | None]]) -> str:
    """OX's doCSVOutput (BasicCommandlineOptions): the header plain, every non-null cell quoted
    (quotes doubled), a null cell empty."""
    lines = [",".join(header)]
    lines += [",".join("" if c is None else '"' + c.replace('"', '""') + '"' for c in row) for row in rows]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the tools


def registerserver(ctx: Ctx, args: Sequence[str]) -> int:
    """RegisterServer (…/console/util/server/RegisterServer.java): "server <id> registered"."""
    spec = Spec(
        "registerserver",
        [*_COMMON, *_CREDENTIALS, Opt("name", "n", "name", "The name of the server", "*")],
        error_prefix="server could not be registered: ",
        remote=_OXUTIL + ".registerServer",
    )

    def body(conn: Any, v: dict[str, Any]) -> int:
        server_id = configdb.register_server(conn, str(v["name"]))
        ctx.out(f"server {server_id} registered\n")
        return 0

    return _run_admin(ctx, spec, args, body)


# The listing tools' own options (UtilAbstraction / DatabaseAbstraction): a search pattern, CSV.
_LISTING = [
    Opt("searchpattern", "s", "searchpattern", "Search/List pattern!"),
    Opt("csv", None, None, "Format output to csv"),
]


def listserver(ctx: Ctx, args: Sequence[str]) -> int:
    """ListServer (…/console/util/server/ListServer.java): table Id Name; --csv id,name."""
    spec = Spec(
        "listserver",
        [*_COMMON, *_CREDENTIALS, *_LISTING],
        error_prefix="servers could not be listed: ",
        remote=_OXUTIL + ".listServer",
    )

    def body(conn: Any, v: dict[str, Any]) -> int:
        pattern = _search_pattern(ctx, spec, v)
        rows = [[str(i), n] for i, n in configdb.list_servers(conn, pattern)]
        ctx.out(csv(["id", "name"], rows) if v.get("csv") else table("rl", ["Id", "Name"], rows))
        return 0

    return _run_admin(ctx, spec, args, body)


# ListDatabase (…/console/util/database/ListDatabase.java @15c7a165, the 7.10 layout without
# the cluster weight): sysoutOutput's doOutput and precsvinfos' columns.
LISTDATABASE_ALIGNS = "rlllrrrlrr"
LISTDATABASE_HEADER = [
    "id",
    "name",
    "hostname",
    "master",
    "mid",
    "maxctx",
    "curctx",
    "hlimit",
    "max",
    "inital",
]
LISTDATABASE_CSV_HEADER = [
    "id",
    "display_name",
    "url",
    "master",
    "masterid",
    "maxUnits",
    "currentunits",
    "poolHardLimit",
    "poolMax",
    "poolInitial",
    "login",
    "password",
    "driver",
    "read_id",
    "scheme",
]


def _jdbc_host(url: str) -> str:
    """new URI(url.substring("jdbc:".length())).getHost()."""
    return (urlparse(url[len("jdbc:") :]).hostname or "") if url.startswith("jdbc:") else url


def listdatabase(ctx: Ctx, args: Sequence[str]) -> int:
    """ListDatabase: every registered database pool (also those whose max_units is 0)."""
    spec = Spec(
        "listdatabase",
        [*_COMMON, *_CREDENTIALS, *_LISTING],
        error_prefix="databases could not be listed: ",
        remote=_OXUTIL + ".listDatabase",
    )

    def body(conn: Any, v: dict[str, Any]) -> int:
        found = configdb.list_databases(conn, _search_pattern(ctx, spec, v))
        if v.get("csv"):
            # makeCSVData: the full URL, the hard limit as a number, then login, password,
            # driver; read_id and scheme are never set by searchForDatabase (null: empty cell).
            crows: list[list[str | None]] = [
                [
                    str(d.pool_id),
                    d.name,
                    d.url,
                    "true" if d.master else "false",
                    str(d.master_id),
                    str(d.max_units),
                    str(d.current_units),
                    str(d.hardlimit),
                    str(d.pool_max),
                    str(d.pool_initial),
                    d.login,
                    d.password,
                    d.driver,
                    None,
                    None,
                ]
                for d in found
            ]
            ctx.out(csv(LISTDATABASE_CSV_HEADER, crows))
        else:
            rows = [
                [
                    str(d.pool_id),
                    d.name,
                    _jdbc_host(d.url),
                    "true" if d.master else "false",
                    str(d.master_id),
                    str(d.max_units),
                    str(d.current_units),
                    "true" if d.hardlimit > 0 else "false",
                    str(d.pool_max),
                    str(d.pool_initial),
                ]
                for d in found
            ]
            ctx.out(table(LISTDATABASE_ALIGNS, LISTDATABASE_HEADER, rows))
        return 0

    return _run_admin(ctx, spec, args, body)


def listdatabaseschema(ctx: Ctx, args: Sequence[str]) -> int:
    """ListDatabaseSchema (…/console/util/database/ListDatabaseSchema.java @adf77ad7 L88-L125)."""
    spec = Spec(
        "listdatabaseschema",
        [
            *_COMMON,
            *_CREDENTIALS,
            *_LISTING,
            Opt("only-empty-schemas", None, None, "(Optionally) Specifies to list only empty schemas"),
            Opt(
                "lab-state",
                None,
                None,
                "Lab only (not in OX): append enabled, server_id, update_state, version",
            ),
        ],
        error_prefix="database schemas could not be listed: ",
        remote=_OXUTIL + ".listDatabaseSchema",
    )

    def body(conn: Any, v: dict[str, Any]) -> int:
        found = configdb.list_schemata(conn, _search_pattern(ctx, spec, v), bool(v.get("only-empty-schemas")))
        lab_state = bool(v.get("lab-state"))
        rows: list[list[str]] = []
        for r in found:
            row = [
                str(r.pool_id),
                r.pool_name,
                r.schema,
                r.url if v.get("csv") else _jdbc_host(r.url),
                str(r.contexts),
            ]
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
            ctx.out(table("rlllr" + "lrll"[: len(extra)], header, rows))
        return 0

    return _run_admin(ctx, spec, args, body)


_RMI_HOSTS = Opt(
    "rmi-hosts",
    "r",
    "rmi_hosts",
    "A list of RMI hosts e.g. 192.168.1.25:1099,192.168.1.26. "
    "If no port is given the default RMI port 1099 is taken.",
)


def disableschema(ctx: Ctx, args: Sequence[str]) -> int:
    """DisableSchema (…/console/schemamove/DisableSchema.java @970610ca): -m/--schema; nothing
    printed on success; an empty or unknown schema: NoSuchObjectException "No such schema <s>"
    from OXToolMySQLStorage.isDistinctWritePoolIDForSchema -> printErrors' else branch: 1."""
    spec = Spec(
        "disableschema",
        [
            *_COMMON,
            *_CREDENTIALS,
            Opt("schema", "m", "schema_name", "The name of the schema to disable", "*"),
            _RMI_HOSTS,
        ],
        remote=_SCHEMA_MOVE + ".SchemaMoveRemoteImpl.disableSchema",
    )

    def body(conn: Any, v: dict[str, Any]) -> int:
        configdb.disable_schema(conn, str(v["schema"]))
        return 0

    return _run_admin(ctx, spec, args, body)


def enableschema(ctx: Ctx, args: Sequence[str]) -> int:
    """EnableSchema (…/console/schemamove/EnableSchema.java @970610ca): -m/--target-schema;
    nothing printed; SchemaMoveImpl.enableSchema checks nothing, so an empty schema is no error."""
    spec = Spec(
        "enableschema",
        [
            *_COMMON,
            *_CREDENTIALS,
            Opt("target-schema", "m", "schema_name", "The name of the schema to enable.", "*"),
            _RMI_HOSTS,
        ],
        remote=_SCHEMA_MOVE + ".SchemaMoveRemoteImpl.enableSchema",
    )

    def body(conn: Any, v: dict[str, Any]) -> int:
        configdb.enable_schema(conn, str(v["target-schema"]))
        return 0

    return _run_admin(ctx, spec, args, body)


def _is_empty(s: str | None) -> bool:
    """com.openexchange.java.Strings.isEmpty: null or only whitespace."""
    return s is None or not s.strip()


_INT_RE = re.compile(r"[+-]?[0-9]+")


def java_int(text: str) -> int:
    """Integer.valueOf / Integer.parseInt: an optional sign and decimal digits, within int."""
    if not _INT_RE.fullmatch(text) or not -(2**31) <= int(text) < 2**31:
        raise ValueError(text)
    return int(text)


def changeserver(ctx: Ctx, args: Sequence[str]) -> int:
    """ChangeServer (…/console/util/server/ChangeServer.java @66a206ef): the client's checks of
    -m and -s go through BasicCommandlineOptions.printError (no prefix line) and exit 1; the
    server (OXUtil.changeServer, OXUtilMySQLStorage.changeServer) refuses an unknown server id
    (103), a schema with enabled contexts and an empty or unknown schema (106)."""
    spec = Spec(
        "changeserver",
        [
            *_COMMON,
            Opt(
                "schema-name",
                "m",
                "schema_name",
                "The name of the schema for which to change the server id",
                "*",
            ),
            Opt("server-id", "s", "server_id", "The identifier of the new server", "*"),
            *_CREDENTIALS,
        ],
        error_prefix="server could not be changed: ",
        remote=_OXUTIL + ".changeServer",
    )

    def check(v: dict[str, Any]) -> int | None:
        if _is_empty(v["schema-name"]):
            _print_error(ctx, "Please specify the schema name\n")  # ChangeServer: message ends in "\n"
            return 1
        sid = str(v["server-id"])
        if _is_empty(sid):
            _print_error(ctx, "Please specify the server identifier\n")
            return 1
        try:
            java_int(sid)  # Integer.valueOf(sid): no trimming
        except ValueError:
            _print_error(ctx, f"Invalid server id: {sid}")
            return 1
        return None

    def body(conn: Any, v: dict[str, Any]) -> int:
        schema, sid = str(v["schema-name"]), java_int(str(v["server-id"]))
        configdb.change_server(conn, sid, schema, refuse_enabled=True)
        ctx.out(f"Successfully changed to server '{sid}' for schema '{schema}'.\n")
        return 0

    return _run_admin(ctx, spec, args, body, check)


# ---- runupdate: a commons-cli tool (AbstractRmiCLI), not an AdminParser one
# UpdateTaskRunUpdateCLT (7.10.1+, com.openexchange.groupware.update.tools.console; options
# L98-L99, checkOptions L125-L143, invoke L108-L118) on AbstractUpdateTasksCLT and
# com.openexchange.cli.AbstractRmiCLI / AbstractAdministrativeCLI.

_RUNUPDATE_OPTS = [
    Opt("help", "h", None, "Prints this help text"),
    Opt("server", "s", "rmiHost", "The optional RMI server (default: localhost)"),
    Opt("port", "p", "rmiPort", "The optional RMI port (default:1099)"),
    Opt(
        "responsetimeout",
        None,
        "timeout",
        "The optional response timeout in seconds when reading data from server (default: 0s; infinite)",
    ),
    Opt("adminuser", "A", "adminUser", "Admin username"),
    Opt("adminpass", "P", "adminPassword", "Admin password"),
    Opt("context", "c", "arg", "A valid context identifier contained in target schema"),
    Opt(
        "name",
        "n",
        "arg",
        "A valid schema name. This option is a substitute for '-c/--context' option. "
        "If both are present '-c/--context' is preferred.",
    ),
]


def _runupdate_help() -> str:
    # commons-cli's HelpFormatter.printHelp(width, "runUpdate", header, options, footer): the
    # layout here is an approximation (not derived); the footer is AbstractUpdateTasksCLT's
    # ("Runs the schema's update.").
    lines = ["usage: runUpdate"]
    for o in sorted(_RUNUPDATE_OPTS, key=lambda o: (o.short or o.long).lower()):
        flag = (f"-{o.short}," if o.short else "   ") + f"--{o.long}" + (f" <{o.arg}>" if o.arg else "")
        lines.append(f" {flag:<28} {o.desc}")
    lines.append("Runs the schema's update.")
    return "\n".join(lines) + "\n"


def _runupdate_parse(ctx: Ctx, args: Sequence[str], auth_on: bool) -> dict[str, Any]:
    """AbstractRmiCLI.execute: --help first (helpRequested, exit 0); DefaultParser.parse
    (ParseException -> "Unable to parse command line: <message>" + help, exit 1); -A/-P are
    required options when the tool requires administrative permission and master
    authentication is on (AbstractAdministrativeCLI.optAdministrativeOptions: mandatory =
    requires != null && isAuthEnabled), so without them commons-cli's MissingOptionException
    ("Missing required option: P" / "Missing required options: A, P") goes to stderr with the
    help, exit 1 (AbstractRmiCLI: catch MissingOptionException; finally System.exit(1))."""
    if any(a in ("-h", "--help") for a in args):
        ctx.out(_runupdate_help())
        raise Exit(0)
    try:
        v = parse_args(_RUNUPDATE_OPTS, args)
    except CliError as e:
        what = f"Unrecognized option: {e}" if e.kind == "unknown" else f"Missing argument for option: {e}"
        ctx.err(f"Unable to parse command line: {what}\n")
        ctx.out(_runupdate_help())
        raise Exit(1) from e
    missing = [k for k, long in (("A", "adminuser"), ("P", "adminpass")) if auth_on and v.get(long) is None]
    if missing:
        ctx.err(f"Missing required option{'s' if len(missing) > 1 else ''}: {', '.join(missing)}\n")
        ctx.out(_runupdate_help())
        raise Exit(1)
    return v


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
    """runupdate 7.10.1+ (RMI). Exit codes: 0 (also when update tasks failed, or when another
    update of the schema runs: see below), 1 (every error), 255 (empty credentials).
    The password comes only from -P (AbstractRmiCLI reads no ADMIN_PASSWORD)."""
    expected = master_password(ctx)
    v = _runupdate_parse(ctx, args, expected is not None)
    cid: int | None = None
    if v.get("context") is not None:
        try:
            cid = java_int(str(v["context"]).strip())
        except ValueError:
            ctx.err(f"Context parameter is not a number: {v['context']}\n")
            ctx.out(_runupdate_help())
            return 1
    elif v.get("name") is None:
        ctx.err("Missing context/schema identifier.\n")
        ctx.out(_runupdate_help())
        return 1
    seconds, target, faults = _update_settings(ctx)
    conn = _connect(ctx)
    try:
        # Lab fault injection: the RemoteAuthenticator look-up fails. AbstractRmiCLI: a
        # ConnectException -> "Unable to connect to server"; any other exception -> its cause's
        # message (an UnmarshalException's cause, EOFException, has none: "An error occurred.").
        kind = configdb.take_tool_fault(conn, ctx.tool)
        if kind is not None:
            ctx.err("Unable to connect to server\n" if kind == "connect" else "An error occurred.\n")
            return 1
        if expected is not None:
            user, password = v.get("adminuser"), v.get("adminpass")
            if _is_empty(user) or _is_empty(password):  # optAuthenticate: Strings.isEmpty
                ctx.out(NO_CREDENTIALS)
                ctx.out(_runupdate_help())
                return EXIT_AUTH_FAILED_CLI
            if user != ctx.env.get("OX_MASTER_ADMIN", configdb.MASTER_ADMIN) or password != expected:
                # RemoteAuthenticator.doAuthentication throws RemoteException(msg, new Exception(msg));
                # the client gets it as cause of a java.rmi.ServerException; AbstractRmiCLI prints
                # the cause's message: RemoteException.getMessage() with its nested exception.
                ctx.err(f"{AUTH_FAILED}; nested exception is: \n\tjava.lang.Exception: {AUTH_FAILED}\n")
                return 1
        if cid is not None:
            try:
                schema = configdb.schema_of_context(conn, cid)
            except OxError as e:
                # UpdateTaskServiceImpl.runUpdate(int): UpdateProcess(contextId).run() catches and
                # only logs every error (server side): the tool prints nothing, exit 0.
                log.error("runupdate -c %s: %s", cid, e)
                return 0
        else:
            schema = str(v["name"])
        failed = configdb.run_update(
            conn, schema, seconds=seconds, target_version=target, fail_schemata=faults
        )
    except OxError as e:
        if e.kind == "update_running":
            # Real OX: the schema lock's ALREADY_LOCKED (UPD-0003, the text of e) is thrown in
            # UpdateExecutor and caught by UpdateProcess.run(), which only logs it on the server;
            # runUpdate returns no failures: nothing printed, exit 0 - while the other update
            # still runs. The update does not run twice.
            log.error("runupdate -n %s: %s", schema, e)
            return 0
        # UpdateTaskServiceImpl.runUpdate(String): OXException -> RemoteException(plainLogMessage,
        # e); AbstractRmiCLI prints the message of the ServerException's cause. The nested
        # exception's text (OXException.toString) is a lab approximation.
        ctx.err(f"{e}; nested exception is: \n\tcom.openexchange.exception.OXException: {e}\n")
        return 1
    except pymysql.MySQLError as e:
        ctx.err(f"{e}\n")
        return 1
    finally:
        conn.close()
    if failed:
        ctx.out("The following update task(s) failed:\n")
        ctx.out(table("lll", ["taskName", "className", "schema"], [[t, t, schema] for t in failed]))
    return 0


# ---- upgradeschemata


def _prompt(ctx: Ctx) -> bool:
    """UpgradeSchemata.prompt (L416-L433): a Scanner reading words; True on 'continue'; 'abort'
    exits 0; at the end of the input Scanner.next() throws NoSuchElementException."""
    while True:
        line = ctx.inp.readline()
        if not line:
            raise _JavaException(
                "java.util.NoSuchElementException",
                None,
                (
                    "java.util.Scanner.throwFor(Scanner.java)",
                    "java.util.Scanner.next(Scanner.java)",
                    _UPGRADE + ".prompt(UpgradeSchemata.java)",
                ),
            )
        for word in line.split():
            if word == "abort":
                ctx.out("OK, aborting upgrade\n")
                raise Exit(0)
            if word == "continue":
                ctx.out("OK, proceeding with the upgrade\n")
                return True
            ctx.err(f"Unrecognized command: '{word}'\n")
            ctx.out(PROMPT + "\n")


_UPGRADE = "com.openexchange.admin.console.util.database.UpgradeSchemata"


class _JavaException(Exception):
    """A client-side exception of UpgradeSchemata, printed by printErrors' RuntimeException
    branch (printServerException, exit 1)."""

    def __init__(self, name: str, message: str | None, stack: Sequence[str]) -> None:
        super().__init__(message)
        self.name, self.message, self.stack = name, message, tuple(stack)


def upgradeschemata(ctx: Ctx, args: Sequence[str]) -> int:
    """UpgradeSchemata (…/console/util/database/UpgradeSchemata.java @377c4e4a1fae, 7.10.0)."""
    spec = Spec(
        "upgradeschemata",
        [
            *_COMMON,
            Opt(
                "server-name",
                "n",
                "server-name",
                "The name of the server to register and point all upgraded schemata to",
                "*",
            ),
            Opt("host", "H", "host", "The optional JMX host (default:localhost)", "?"),
            Opt("port", "p", "port", "The optional JMX port (default:9999)", "?"),
            Opt("login", "l", "login", "The optional JMX login (if JMX has authentication enabled)", "?"),
            Opt(
                "password",
                "s",
                "password",
                "The optional JMX password (if JMX has authentication enabled)",
                "?",
            ),
            Opt("schema-name", "m", "schema-name", "The optional schema name to continue from", "?"),
            Opt("force", "f", None, "Forces the upgrade even if the updates fail in some schemata"),
            Opt(
                "skip-schemata",
                "k",
                "skip-schemata",
                "Defines the names of the schemata as a comma separated "
                "list that should be skipped during the upgrade phase",
                "?",
            ),
            *_CREDENTIALS,
        ],
        remote=_OXUTIL + ".listServer",
    )
    values = admin_parse(ctx, spec, args, banner=UPGRADE_FAILED)
    server_name = str(values["server-name"])
    start = values.get("schema-name")
    # checkAndSetArguments: Strings.isNotEmpty(m) && m.lastIndexOf('_') < 0 -> usage, exit 1.
    if not _is_empty(start) and "_" not in str(start):
        ctx.err(f"Invalid/Malformed schema name: '{start}'\n")
        ctx.out(_usage(spec))
        return 1
    force = bool(values.get("force"))
    # -k is parsed but has no effect: checkAndSetArguments splits the literal "," (L495:
    # Strings.splitByComma(",")), which yields no names, so the skip list stays empty.
    conn = _connect(ctx)
    try:
        tool_fault(ctx, conn, None, banner=UPGRADE_FAILED)
        check_credentials(ctx, spec, values, banner=UPGRADE_FAILED)
        return _upgrade(ctx, conn, server_name, None if _is_empty(start) else str(start), force)
    except _JavaException as e:
        ctx.err(UPGRADE_FAILED)
        if e.name == "java.lang.NumberFormatException":  # printErrors' NumberFormatException branch
            ctx.err("Invalid input detected: Ids must be numbers!\n")
        else:  # RuntimeException branch: printServerException
            ctx.err(server_response(e.message, e.stack, e.name))
        return 1
    except OxError as e:
        ctx.err(UPGRADE_FAILED)
        ctx.err(server_response(str(e), frames(_origin(e), _OXUTIL + ".changeServer")))
        return _KIND_EXIT.get(e.kind, 1)
    except pymysql.MySQLError as e:
        ctx.err(UPGRADE_FAILED)
        ctx.err(server_response(str(e), frames(_STORAGE + ".sql")))
        return EXIT_SERVERSTORAGE_ERROR
    finally:
        conn.close()


def _schema_number(name: str) -> int:
    """UpgradeSchemata's comparator: Integer.parseInt of what follows the last '_'."""
    try:
        return java_int(name[name.rfind("_") + 1 :])
    except ValueError:
        raise _JavaException(
            "java.lang.NumberFormatException",
            f'For input string: "{name}"',
            (_UPGRADE + ".listSchemata(UpgradeSchemata.java)",),
        ) from None


def _java_binary_search(keys: Sequence[int], key: int) -> int:
    """java.util.Arrays.binarySearch: the index of some element equal to `key`, else < 0."""
    low, high = 0, len(keys) - 1
    while low <= high:
        mid = (low + high) >> 1
        if keys[mid] < key:
            low = mid + 1
        elif keys[mid] > key:
            high = mid - 1
        else:
            return mid
    return -(low + 1)


def _list_for_upgrade(ctx: Ctx, conn: Any, start: str | None) -> list[str]:
    """UpgradeSchemata.listSchemata (L238-L257) and filterSchemata (L266-L288)."""
    names = [r.schema for r in configdb.list_schemata(conn)]  # listDatabaseSchema("*", false)
    if start is None or len(names) == 1:
        if not names:  # databases[0] on an empty array
            raise _JavaException(
                "java.lang.ArrayIndexOutOfBoundsException",
                "0",
                (
                    _UPGRADE + ".listSchemata(UpgradeSchemata.java)",
                    _UPGRADE + ".execute(UpgradeSchemata.java)",
                ),
            )
        return [] if names[0] == start else names  # as the server lists them: no sorting
    # With -m: sorted by the number after the last '_' (Arrays.sort: stable), then a binary
    # search for -m's number - any schema with that number matches.
    names.sort(key=_schema_number)
    position = _java_binary_search([_schema_number(n) for n in names], _schema_number(start))
    if position >= 0:
        ctx.out(f"Skipping to schema '{start}'\n")
        names = names[position + 1 :]
    # filterSchemata: print("Filtering out skipped schemata: ") then the (always empty) list.
    ctx.out("Filtering out skipped schemata: \n")
    return names


def _upgrade(ctx: Ctx, conn: Any, server_name: str, start: str | None, force: bool) -> int:
    # registerServer (L384-L411): listServer(name) is a LIKE search; exactly one hit is used
    # after the prompt; otherwise the server is registered (a duplicate name: 103).
    hits = configdb.list_servers(conn, server_name)
    if len(hits) == 1:
        server_id, registered_name = hits[0]
        if start is not None:
            ctx.out(CONTINUE_WITH_SERVER.format(name=registered_name, id=server_id))
        else:
            ctx.out(ALREADY_REGISTERED.format(id=server_id))
        _prompt(ctx)
        server_name = registered_name
    else:
        ctx.out(f"Registering the server with name '{server_name}'...")
        server_id = configdb.register_server(conn, server_name)
        ctx.out("OK\n")
    names = _list_for_upgrade(ctx, conn, start)
    seconds, target, faults = _update_settings(ctx)
    # execute (L196-L227): disable -> change server -> run updates (JMX) -> enable per schema.
    for schema in names:
        try:
            ctx.out(f"Disabling schema '{schema}'...")
            configdb.disable_schema(conn, schema)
            ctx.out("OK\n")
            ctx.out(f"Changing server for schema '{schema}' to '{server_name}'...")
            configdb.change_server(conn, server_id, schema, refuse_enabled=True)
            ctx.out("OK\n")
            ctx.out("Running updates...")
            try:
                failed = configdb.run_update(
                    conn, schema, seconds=seconds, target_version=target, fail_schemata=faults
                )
            except OxError as e:
                if e.kind != "update_running":
                    raise
                # The JMX runUpdate of an already locked schema (lab assumption: as runupdate, the
                # lock conflict is only logged server-side and no failure is returned).
                log.error("upgradeschemata: %s", e)
                failed = []
            if not failed:
                ctx.out("OK\n")
            else:
                ctx.err(f"\nErrors while running updates for schema '{schema}': \n")
                ctx.err(
                    "The following update task(s) failed: \n"
                    + "\n".join(f" {t} (schema={schema})" for t in failed)
                    + "\n"
                )
                if not force:
                    ctx.err(
                        f"Schema upgrade for schema '{schema}' was aborted. Manual intervention might be "
                        "required.\n"
                    )
                    return 1
            ctx.out(f"Enabling schema '{schema}'...")
            configdb.enable_schema(conn, schema)
            ctx.out("OK\n")
        except OxError as e:
            if e.kind == "target_database":
                ctx.err(f"An error occurred while trying to disable schema '{schema}': {e}\n")
                stack = frames(_origin(e), _SCHEMA_MOVE + ".SchemaMoveRemoteImpl.disableSchema")
                ctx.err(server_response(str(e), stack))
                if not force:
                    return 1
            elif e.kind == "storage" and "The schema is empty" in str(e):
                ctx.out(f"The schema '{schema}' is empty. Skipping.\n")
            elif e.kind == "no_such_object":
                ctx.out(f"Schema {schema} not found. Skipping\n")
            else:
                raise
    return 0


# --------------------------------------------------------------------------- entry point and install


_TOOL_FUNCS: dict[str, Callable[[Ctx, Sequence[str]], int]] = {
    "registerserver": registerserver,
    "listserver": listserver,
    "listdatabase": listdatabase,
    "listdatabaseschema": listdatabaseschema,
    "disableschema": disableschema,
    "enableschema": enableschema,
    "changeserver": changeserver,
    "runupdate": runupdate,
    "upgradeschemata": upgradeschemata,
}


def main(
    argv: Sequence[str] | None = None,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Run the tool named by argv[0]'s basename, else by argv[1]; returns the exit code."""
    argv = list(sys.argv if argv is None else argv)
    prog = os.path.basename(argv[0]) if argv else ""
    if prog in _TOOL_FUNCS:
        tool, args = prog, argv[1:]
    elif len(argv) > 1 and argv[1] in _TOOL_FUNCS:
        tool, args = argv[1], argv[2:]
    else:
        (stderr or sys.stderr).write(
            f"usage: python -m lab.ox.tools <tool> [options]\ntools: {', '.join(TOOLS)}\n"
        )
        return 2
    ctx = Ctx(
        tool=tool,
        env=load_env(os.environ if environ is None else environ),
        inp=stdin or sys.stdin,
        stdout=stdout or sys.stdout,
        stderr=stderr or sys.stderr,
    )
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


def install_tools(
    bin_dir: Path, python: str, env: Mapping[str, str], admin_port: int | None = None
) -> list[Path]:
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
            text = _WRAPPER.format(
                tool=tool,
                env_name=ENV_FILE_NAME,
                env_file=shlex.quote(str(env_file)),
                root=shlex.quote(str(PROJECT_ROOT)),
                python=shlex.quote(python),
            )
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
