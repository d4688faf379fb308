"""Open-Xchange: OX's command line tools and a node's properties, over SSH (seed 002).

Every verb runs one of OX's tools on a node (`ox.tools_dir`) and parses its output in the
formats OX prints (see lab/ox/tools.py, whose stand-in follows OX's sources):
  registerserver      "server <id> registered"
  listserver --csv    id,name
  listdatabaseschema --csv   id,display_name,schema_name,url,currentunits
  changeserver        "Successfully changed to server '<id>' for schema '<schema>'."
  runupdate           nothing, or "The following update task(s) failed:" and a table -
                      with exit 0 either way, so the output is what tells
  upgradeschemata     per schema "Disabling schema '<s>'...OK" ... "Enabling schema '<s>'...OK"
                      on stdout, "Errors while running updates for schema '<s>'" on stderr

The master admin's password is resolved here, never in the workflow (so never in a
history), and handed over on standard input. The admin tools take it from ADMIN_PASSWORD
(read from stdin into the variable; OX's BasicCommandlineOptions.credentialsparsing uses it
when -P is absent), so it is on no command line. runupdate (7.10.1+, AbstractUpdateTasksCLT)
takes it ONLY from -P: the command line refers to "$ZD_SECRET", so the value is in neither
the command text we send nor an error, but the running runupdate process shows it in the
node's process list for as long as it runs (README, "Open-Xchange procedures"). It is
masked in every message.

Exit codes (OX's BasicCommandlineOptions SYSEXIT_*): 105 (an RMI ConnectException: the
middleware did not answer) and 107 (another RemoteException) are usually transient and
raised as retryable OxToolUnavailable; 101 credentials, 104 missing option, 109 illegal
option value, 111 unknown option and the rest are permanent (OxToolFailed).

Long tool runs (runupdate, upgradeschemata) run detached on the node (activities/detached.py)
under a key the workflow makes: a retried attempt attaches to the run under way or reads
its outcome, and never starts a second one beside it. Their time budgets are settings
(`ox.runupdate_timeout_s`, `ox.upgradeschemata_timeout_s`).

Idempotent: disable/enable/changeserver set a state; runupdate has nothing left to do on an
updated schema; registerserver returns the id of a server of that name that a previous
attempt registered; a property change keeps the value it replaced in a node-side record
keyed by the workflow's id, so a retry reports the original value, not its own.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from temporalio import activity
from temporalio.exceptions import ApplicationError

import activities.detached as detached
import activities.ssh as ssh
from activities.common import check_id, fail, heartbeat, tail
from activities.secrets import resolve_secret
from errors import (
    INVALID_REQUEST,
    OX_OUTPUT_UNEXPECTED,
    OX_TOOL_FAILED,
    OX_TOOL_UNAVAILABLE,
    OX_UPDATE_TASKS_FAILED,
    SSH_COMMAND_FAILED,
)
from inventory.model import Node, OxSettings

# A tool that exited 105 / 107: the middleware or its RMI call failed; worth another attempt.
# OX's SYSEXIT_COMMUNICATION_ERROR (java.rmi.ConnectException) and SYSEXIT_REMOTE_ERROR
# (another RemoteException): ObjectNamingAbstraction.printErrors.
TRANSIENT_EXITS = frozenset({105, 107})
# runupdate (AbstractRmiCLI.getAuthFailedExitCode: System.exit(-1)) when -A/-P are missing or
# empty while the site authenticates its master admin.
RUNUPDATE_NO_CREDENTIALS = 255
# Where a property change remembers the value it replaced (relative to the login folder).
PROPERTY_RECORDS = ".zerodown/properties"


# --------------------------------------------------------------------------- requests / results


@dataclass(frozen=True)
class OxNodeRequest:
    node: Node
    ox: OxSettings


@dataclass(frozen=True)
class OxSchemaRequest:
    node: Node
    ox: OxSettings
    schema: str


@dataclass(frozen=True)
class OxChangeServerRequest:
    node: Node
    ox: OxSettings
    schema: str
    server_id: int


@dataclass(frozen=True)
class OxServerRequest:
    node: Node
    ox: OxSettings
    name: str


@dataclass(frozen=True)
class OxInstallRequest:
    node: Node
    ox: OxSettings
    version: str


@dataclass(frozen=True)
class OxSetPropertyRequest:
    node: Node
    path: str
    key: str
    # None: remove the key.
    value: str | None
    # Remembers the replaced value under this id (workflow-made, unique per change), so a
    # retried change still reports the original; empty: nothing remembered.
    record_id: str = ""


@dataclass(frozen=True)
class OxPropertyChange:
    path: str
    key: str
    previous: str | None
    changed: bool


@dataclass(frozen=True)
class OxSchema:
    name: str
    pool_id: int
    contexts: int


@dataclass(frozen=True)
class OxServer:
    id: int
    name: str


@dataclass(frozen=True)
class OxDatabase:
    """One database pool as `listdatabase --csv` shows it (ListDatabase.java, 7.10)."""

    id: int
    name: str
    max_units: int  # maxUnits: 0 closes the pool - and listdatabaseschema then leaves it out
    current_units: int  # currentunits: the contexts in it


@dataclass(frozen=True)
class OxUpgradeSchemaRequest:
    """Steps 4 to 7 for one schema: the tools on `admin` (a working old node), runupdate on
    `update` (the node with the new release)."""

    admin: Node
    update: Node
    ox: OxSettings
    schema: str
    server_id: int
    # The operator's retry count of this schema (the failure gate's `retry`): a new runupdate
    # per retry; the same one for every attempt of one try.
    attempt_key: str = ""
    # Step 7 on `update`, as runupdate's follow-up on the node (no trip through the worker
    # between the update's end and the enable); False: on `admin`, as runs started before.
    enable_on_update: bool = False


@dataclass(frozen=True)
class OxStepTime:
    """One step of a schema's upgrade as it ran (wall-clock seconds since the epoch: plain
    floats travel into the workflow sandbox, datetimes do not decode there)."""

    seed_step: str
    started: float
    ended: float
    ok: bool = True


@dataclass(frozen=True)
class OxSchemaUpgrade:
    schema: str
    steps: tuple[OxStepTime, ...]  # the steps that ran, in order (the failed one last)
    failed_step: str | None = None  # "4" .. "7"; None: upgraded
    error: str | None = None


@dataclass(frozen=True)
class OxUpgradeToolRequest:
    node: Node
    ox: OxSettings
    server_name: str
    force: bool = False
    resume_from: str | None = None
    skip: tuple[str, ...] = ()
    # The answer to the "already registered" prompt (continue / abort), when it is asked.
    answer: str | None = None


@dataclass(frozen=True)
class OxToolSchema:
    """One schema as upgradeschemata reported it."""

    schema: str
    disabled: bool
    server_changed: bool
    updated: bool
    enabled: bool
    error: str | None = None
    # "Schema <s> not found. Skipping": a schema without contexts (disableschema finds none).
    skipped_empty: bool = False


@dataclass(frozen=True)
class OxToolRun:
    exit_status: int
    # The id of the server the schemata now point to (registered or existing), if known.
    registered_id: int | None
    already_registered: bool
    registered_now: bool
    aborted: bool
    schemata: tuple[OxToolSchema, ...]
    stdout_tail: str = ""
    stderr_tail: str = ""


# --------------------------------------------------------------------------- running a tool


def tool_path(settings: OxSettings, tool: str) -> str:
    """The tool on the node, shell-quoted."""
    return shlex.quote(f"{settings.tools_dir.rstrip('/')}/{tool}")


def tool_command(settings: OxSettings, tool: str, args: list[str], admin: bool = True) -> str:
    """The shell command line: the password read from stdin into ADMIN_PASSWORD (never on the
    command line), then the tool with -A <admin> and its arguments."""
    path = tool_path(settings, tool)
    argv = " ".join(shlex.quote(a) for a in (["-A", settings.admin_user] if admin else []) + args)
    if not admin:
        return f"{path} {argv}".strip()
    return f"IFS= read -r ADMIN_PASSWORD && export ADMIN_PASSWORD && exec {path} {argv}"


# Printed before each tool of one `run_admin_tools` command: the node's clock when the next
# tool starts, so each tool's span is measured without a clock shared with the worker.
TOOL_MARK = "@@zerodown-next-tool"


def admin_tools_command(settings: OxSettings, calls: list[tuple[str, list[str]]]) -> str:
    """One shell command line running admin tools one after another, stopping at the first
    that fails; the password read once from stdin, a TOOL_MARK line (tool index, the node's
    epoch time) printed before each tool."""
    parts = ["IFS= read -r ADMIN_PASSWORD", "export ADMIN_PASSWORD"]
    for i, (tool, args) in enumerate(calls):
        parts.append(f'echo "{TOOL_MARK} {i} $(date +%s.%N)"')
        path = tool_path(settings, tool)
        parts.append(" ".join([path, *(shlex.quote(a) for a in ["-A", settings.admin_user, *args])]))
    return " && ".join(parts)


@dataclass(frozen=True)
class ToolsRun:
    """What `run_admin_tools` saw: each tool's stdout and, for the tools that started, when
    (seconds after the first started, on the node's clock); the exit status of the last."""

    outputs: tuple[str, ...]
    offsets_s: tuple[float, ...]
    exit_status: int
    stderr: str


def split_tools_output(stdout: str) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """stdout of an `admin_tools_command` cut at its TOOL_MARK lines: per started tool, its
    output and its start (seconds after the first tool's)."""
    outputs: list[list[str]] = []
    starts: list[float] = []
    for line in stdout.splitlines(keepends=True):
        if line.startswith(TOOL_MARK):
            fields = line.split()
            starts.append(float(fields[2]) if len(fields) > 2 else starts[-1] if starts else 0.0)
            outputs.append([])
        elif outputs:
            outputs[-1].append(line)
    first = starts[0] if starts else 0.0
    return tuple("".join(o) for o in outputs), tuple(t - first for t in starts)


async def run_admin_tools(
    node: Node, settings: OxSettings, calls: list[tuple[str, list[str]]], timeout_s: float = 120.0
) -> ToolsRun:
    """Admin tools back to back in one SSH command (one channel, no round trip between
    them): what a schema's users wait for between its disable and its enable."""
    password = resolve_secret(
        settings.admin_password, needed_by=f"OX tools {', '.join(t for t, _ in calls)} on {node.name}"
    )
    r = await ssh.run(
        node.ssh,
        admin_tools_command(settings, calls),
        timeout_s=timeout_s,
        check=False,
        input=password + "\n",
    )
    outputs, offsets = split_tools_output(r.stdout)
    stderr = r.stderr.replace(password, "***") if password else r.stderr
    return ToolsRun(outputs=outputs, offsets_s=offsets, exit_status=r.exit_status, stderr=stderr)


async def run_tool(
    node: Node,
    settings: OxSettings,
    tool: str,
    args: list[str],
    *,
    admin: bool = True,
    extra_input: str = "",
    timeout_s: float = 120.0,
    check: bool = True,
) -> ssh.CommandResult:
    """Run an OX tool on `node`; a non-zero exit fails with OxToolFailed (stdout and stderr's
    end in the message, the password masked)."""
    password = (
        resolve_secret(settings.admin_password, needed_by=f"OX tool {tool} on {node.name}") if admin else ""
    )
    stdin = (password + "\n" if admin else "") + extra_input
    command = tool_command(settings, tool, args, admin)
    result = await ssh.run(node.ssh, command, timeout_s=timeout_s, check=False, input=stdin or None)
    if check and result.exit_status != 0:
        text = f"{result.stdout.strip()} {result.stderr.strip()}".strip()
        if password:
            text = text.replace(password, "***")
        tool_failed(node, tool, args, result.exit_status, text)
    return result


def tool_failed(node: Node, tool: str, args: list[str], exit_status: int, text: str) -> NoReturn:
    """OxToolUnavailable (retryable) for OX's transient exit codes, else OxToolFailed."""
    transient = exit_status in TRANSIENT_EXITS
    fail(
        OX_TOOL_UNAVAILABLE if transient else OX_TOOL_FAILED,
        f"{node.name}: {tool} {' '.join(args)} exited with status {exit_status}"
        f"{' (transient: the middleware did not answer or its call failed)' if transient else ''}: "
        f"{tail(text, 600) or '(no output)'}",
        retryable=transient,
    )


def parse_csv(text: str, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """OX's --csv output: a header line, then one quoted row per object."""
    rows = list(csv.reader(io.StringIO(text.strip())))
    if not rows:
        return []
    header = [h.strip() for h in rows[0]]
    missing = [c for c in columns if c not in header]
    if missing:
        fail(OX_OUTPUT_UNEXPECTED, f"CSV output without column(s) {', '.join(missing)}: {tail(text, 300)}")
    return [dict(zip(header, r, strict=False)) for r in rows[1:] if r]


def parse_schemata(text: str) -> tuple[OxSchema, ...]:
    out = []
    for row in parse_csv(text, ("id", "schema_name", "currentunits")):
        try:
            out.append(
                OxSchema(
                    name=row["schema_name"], pool_id=int(row["id"]), contexts=int(row["currentunits"] or 0)
                )
            )
        except ValueError:
            fail(OX_OUTPUT_UNEXPECTED, f"listdatabaseschema row not understood: {row}")
    return tuple(out)


def parse_servers(text: str) -> tuple[OxServer, ...]:
    out = []
    for row in parse_csv(text, ("id", "name")):
        try:
            out.append(OxServer(id=int(row["id"]), name=row["name"]))
        except ValueError:
            fail(OX_OUTPUT_UNEXPECTED, f"listserver row not understood: {row}")
    return tuple(out)


def parse_databases(text: str) -> tuple[OxDatabase, ...]:
    out = []
    for row in parse_csv(text, ("id", "display_name", "maxUnits", "currentunits")):
        try:
            out.append(
                OxDatabase(
                    id=int(row["id"]),
                    name=row["display_name"],
                    max_units=int(row["maxUnits"] or 0),
                    current_units=int(row["currentunits"] or 0),
                )
            )
        except ValueError:
            fail(OX_OUTPUT_UNEXPECTED, f"listdatabase row not understood: {row}")
    return tuple(out)


_REGISTERED = re.compile(r"^server (\d+) registered\s*$", re.M)
_FAILED_HEAD = "The following update task(s) failed:"


def parse_registered(text: str) -> int:
    m = _REGISTERED.search(text)
    if m is None:
        fail(OX_OUTPUT_UNEXPECTED, f"registerserver printed no 'server <id> registered': {tail(text, 300)}")
    return int(m.group(1))


def parse_failed_tasks(text: str) -> tuple[str, ...]:
    """runupdate's "The following update task(s) failed:" table: the task names (first column)."""
    if _FAILED_HEAD not in text:
        return ()
    lines = text.split(_FAILED_HEAD, 1)[1].strip().splitlines()
    tasks = [ln.split()[0] for ln in lines[1:] if ln.strip() and not set(ln.strip()) <= {"-", "+", "|", " "}]
    return tuple(tasks) or ("(unnamed update task)",)


_ERR_RE = re.compile(r"Errors while running updates for schema '([^']+)':\s*\n(?:.*\n)?((?: .*\n?)*)")
# The registered-server texts: without -m the WARNING, with -m "The server '<n>' with id '<id>'
# will be used ..." (UpgradeSchemata.registerServer).
_EXISTING_RE = re.compile(
    r"already registered with id '(\d+)'"
    r"|The server '[^']*' with id '(\d+)' will be used"
)
_REGISTERING_RE = re.compile(r"Registering the server with name '[^']*'\.\.\.OK")


def parse_upgradeschemata(stdout: str, stderr: str) -> tuple[list[OxToolSchema], int | None, bool, bool]:
    """(schemata in the order the tool reached them, the existing server's id or None,
    registered by this run, aborted at the prompt). stdout holds one block per schema, from
    its "Disabling schema '<s>'..." on; a failed update leaves "Running updates..." without
    its OK and puts the failed tasks on stderr."""
    errors: dict[str, str] = {}
    for m in _ERR_RE.finditer(stderr):
        tasks = [t.strip().split(" (schema=")[0] for t in m.group(2).splitlines() if t.strip()]
        errors[m.group(1)] = "update task(s) failed: " + (", ".join(tasks) or "(unnamed)")
    schemata: list[OxToolSchema] = []
    for block in re.split(r"(?=Disabling schema ')", stdout)[1:]:
        head = re.match(r"Disabling schema '([^']+)'\.\.\.(OK)?", block)
        if head is None:
            continue
        schema = head.group(1)
        if re.match(r"Disabling schema '[^']+'\.\.\.Schema \S+ not found\. Skipping", block):
            schemata.append(
                OxToolSchema(
                    schema=schema,
                    disabled=False,
                    server_changed=False,
                    updated=False,
                    enabled=False,
                    skipped_empty=True,
                )
            )
            continue
        schemata.append(
            OxToolSchema(
                schema=schema,
                disabled=head.group(2) is not None,
                server_changed=re.search(r"Changing server for schema '[^']+' to '[^']*'\.\.\.OK", block)
                is not None,
                updated="Running updates...OK" in block,
                enabled=f"Enabling schema '{schema}'...OK" in block,
                error=errors.get(schema),
            )
        )
    existing = _EXISTING_RE.search(stdout)
    return (
        schemata,
        int(existing.group(1) or existing.group(2)) if existing else None,
        _REGISTERING_RE.search(stdout) is not None,
        "OK, aborting upgrade" in stdout,
    )


# --------------------------------------------------------------------------- properties


_KEY_LINE = r"^[ \t]*{key}[ \t]*[=:][ \t]*(.*?)[ \t]*$"


def property_value(text: str, key: str) -> str | None:
    m = re.search(_KEY_LINE.format(key=re.escape(key)), text, re.M)
    return None if m is None else m.group(1)


def set_property_text(text: str, key: str, value: str | None) -> str:
    """`key=value` in place of the key's first line (later duplicates removed), appended when
    absent; value None removes every line of the key. Other lines and comments untouched."""
    pattern = re.compile(_KEY_LINE.format(key=re.escape(key)))
    lines = text.splitlines()
    out: list[str] = []
    placed = False
    for line in lines:
        if pattern.match(line):
            if value is not None and not placed:
                out.append(f"{key}={value}")
                placed = True
            continue
        out.append(line)
    if value is not None and not placed:
        out.append(f"{key}={value}")
    return "\n".join(out) + ("\n" if out else "")


async def set_property(req: OxSetPropertyRequest) -> OxPropertyChange:
    bad_value = req.value is not None and "\n" in req.value
    if "\n" in req.key or "=" in req.key or not req.key.strip() or bad_value:
        fail(INVALID_REQUEST, f"property {req.key!r}={req.value!r}: one line, a key without '='")
    target = req.node.ssh
    record_path = ""
    if req.record_id:
        check_id("property record id", req.record_id)
        record_path = f"{PROPERTY_RECORDS}/{req.record_id}.json"
    data = await ssh.get_file(target, req.path)
    if data is None:
        fail(SSH_COMMAND_FAILED, f"{req.node.name}: {req.path} does not exist")
    text = data.decode("utf-8")
    current = property_value(text, req.key)
    previous = current
    if record_path:
        recorded = await ssh.get_file(target, record_path)
        if recorded is not None:
            previous = json.loads(recorded.decode("utf-8"))["previous"]
        else:
            await ssh.put_bytes(
                target,
                json.dumps({"path": req.path, "key": req.key, "previous": current}).encode(),
                record_path,
                mode=0o600,
            )
    new_text = set_property_text(text, req.key, req.value)
    changed = new_text != text
    if changed:
        # Written next to the file, then renamed over it: a reader never sees half a file.
        tmp = f"{req.path}.zerodown-new"
        await ssh.put_bytes(target, new_text.encode("utf-8"), tmp)
        await ssh.run(target, f"mv -f {shlex.quote(tmp)} {shlex.quote(req.path)}")
    return OxPropertyChange(path=req.path, key=req.key, previous=previous, changed=changed)


# --------------------------------------------------------------------------- activities


@activity.defn
async def ox_list_schemata(req: OxNodeRequest) -> tuple[OxSchema, ...]:
    """listdatabaseschema: every schema of the installation, in OX's order."""
    r = await run_tool(req.node, req.ox, "listdatabaseschema", ["--csv"])
    return parse_schemata(r.stdout)


@activity.defn
async def ox_list_databases(req: OxNodeRequest) -> tuple[OxDatabase, ...]:
    """listdatabase: every database pool with its maxUnits and contexts (closed pools too)."""
    r = await run_tool(req.node, req.ox, "listdatabase", ["--csv"])
    return parse_databases(r.stdout)


@activity.defn
async def ox_list_servers(req: OxNodeRequest) -> tuple[OxServer, ...]:
    r = await run_tool(req.node, req.ox, "listserver", ["--csv"])
    return parse_servers(r.stdout)


@activity.defn
async def ox_register_server(req: OxServerRequest) -> int:
    """Step 3: registerserver -n <name>; the server's id. A server of that name registered by
    an earlier attempt of this step is returned as it is (idempotent)."""
    r = await run_tool(req.node, req.ox, "registerserver", ["-n", req.name], check=False)
    if r.exit_status == 0:
        return parse_registered(r.stdout)
    servers = parse_servers((await run_tool(req.node, req.ox, "listserver", ["--csv"])).stdout)
    for s in servers:
        if s.name == req.name:
            return s.id
    fail(
        OX_TOOL_FAILED,
        f"{req.node.name}: registerserver -n {req.name} exited with status "
        f"{r.exit_status}: {tail(r.stdout + ' ' + r.stderr, 600)}",
    )


def check_changed(node: Node, schema: str, server_id: int, stdout: str) -> None:
    if f"server '{server_id}' for schema '{schema}'" not in stdout:
        fail(
            OX_OUTPUT_UNEXPECTED, f"{node.name}: changeserver did not confirm the change: {tail(stdout, 300)}"
        )


async def change_server(node: Node, settings: OxSettings, schema: str, server_id: int) -> None:
    r = await run_tool(node, settings, "changeserver", ["-s", str(server_id), "-m", schema])
    check_changed(node, schema, server_id, r.stdout)


@activity.defn
async def ox_change_server(req: OxChangeServerRequest) -> None:
    """Step 5: changeserver -s <id> -m <schema>: its contexts point to that server."""
    await change_server(req.node, req.ox, req.schema, req.server_id)


def runupdate_command(settings: OxSettings, schema: str) -> str:
    """runupdate with the master admin's credentials, which 7.10.1+ requires (-A and -P; its
    only source for the password is -P): "$ZD_SECRET" stands for the password."""
    path = tool_path(settings, "runupdate")
    return f'{path} -A {shlex.quote(settings.admin_user)} -P "$ZD_SECRET" -n {shlex.quote(schema)}'


def _step_key(*parts: str) -> tuple[str, ...]:
    """What makes a tool run unique: the workflow run, plus the caller's parts."""
    if activity.in_activity():
        info = activity.info()
        return (info.workflow_id or "", info.workflow_run_id or "", *parts)
    return ("", "", *parts)


def runupdate_job(node: Node, settings: OxSettings, schema: str, attempt_key: str) -> tuple[str, str, str]:
    """(job key, family, command) of a schema's runupdate: detached under a key of this workflow
    run, schema and operator's attempt, so a retried activity attaches to the runupdate under
    way (or reads how it ended), and one still running for this schema under another key is
    followed rather than doubled. A run lost with its node (no exit status) is run again:
    nothing runs on the schema then."""
    family = f"runupdate-{schema}"
    key = detached.job_key(family, *_step_key(schema, attempt_key))
    return key, family, runupdate_command(settings, schema)


def runupdate_outcome(
    node: Node, settings: OxSettings, schema: str, job: detached.JobOutcome
) -> tuple[str, ...]:
    """The names of the failed update tasks (none: done); a refusal or error raised."""
    text = f"{job.stdout}\n{job.stderr}".strip()
    status = job.exit_status if job.exit_status is not None else 255
    if status == 0:
        return parse_failed_tasks(job.stdout)
    if status == RUNUPDATE_NO_CREDENTIALS:
        fail(
            OX_TOOL_FAILED,
            f"{node.name}: runupdate -n {schema} refused the master admin's credentials "
            f"(exit 255; -A {settings.admin_user} -P ***): {tail(text, 400)}",
        )
    tool_failed(node, "runupdate", ["-n", schema], status, text)


def gated_tool_command(settings: OxSettings, tool: str, args: list[str]) -> str:
    """tool_command that, after the password, waits for a line "go" (ssh.staged)."""
    path = tool_path(settings, tool)
    argv = " ".join(shlex.quote(a) for a in ["-A", settings.admin_user, *args])
    return (
        f'IFS= read -r ADMIN_PASSWORD && export ADMIN_PASSWORD && IFS= read -r go && [ "$go" = go ] '
        f"&& exec {path} {argv}"
    )


def enable_command(settings: OxSettings, schema: str) -> str:
    """enableschema as a job's follow-up: the password from the job's "$ZD_SECRET"."""
    path = tool_path(settings, "enableschema")
    argv = " ".join(shlex.quote(a) for a in ["-A", settings.admin_user, "-m", schema])
    return f'ADMIN_PASSWORD="$ZD_SECRET" {path} {argv}'


async def upgrade_schema(req: OxUpgradeSchemaRequest) -> OxSchemaUpgrade:
    """Steps 4 to 7 for one schema, back to back. Its users are refused from the disable to
    the enable, so that window holds the tools' own work and nothing else: four activities
    would add three workflow round trips to it (seconds on a loaded worker), and the SSH
    channels of steps 6 and 7 are opened, and their commands started waiting, before step 4
    (`ssh.staged`). With `enable_on_update`, step 7 is runupdate's follow-up on the update
    node (`detached` `then`: enableschema runs the moment runupdate ended with nothing to
    report), so the window holds one trip through the worker (after changeserver), not two.
    Every step is idempotent, so a retry of the whole runs through what is done already:
    disable and changeserver set states, runupdate attaches to its run (or has nothing to do
    on an updated schema), enable sets. A failed step is a result (the workflow decides:
    force, gate), its schema left as it is; an error a retry may cure (unreachable node, lost
    connection, OX's 105/107) is raised."""
    steps: list[OxStepTime] = []
    password = resolve_secret(req.ox.admin_password, needed_by=f"OX tools for {req.schema}")
    key, family, command = runupdate_job(req.update, req.ox, req.schema, req.attempt_key)

    def failed(seed_step: str, started: float, e: ApplicationError) -> OxSchemaUpgrade:
        steps.append(OxStepTime(seed_step=seed_step, started=started, ended=time.time(), ok=False))
        return OxSchemaUpgrade(schema=req.schema, steps=tuple(steps), failed_step=seed_step, error=str(e))

    def enable_failed(started: float, done: ssh.CommandResult) -> OxSchemaUpgrade:
        text = f"{done.stdout.strip()} {done.stderr.strip()}".replace(password, "***").strip()
        try:
            tool_failed(
                req.update if req.enable_on_update else req.admin,
                "enableschema",
                ["-m", req.schema],
                done.exit_status,
                text,
            )
        except ApplicationError as e:
            if not e.non_retryable:
                raise
            return failed("7", started, e)

    async with contextlib.AsyncExitStack() as stack:
        update = await stack.enter_async_context(
            detached.staged_job(
                req.update.ssh,
                key,
                family,
                command,
                secret=password,
                budget_s=req.ox.runupdate_timeout_s,
                rerun_lost=True,
                what=f"{req.update.name}: runupdate -n {req.schema}",
                then=enable_command(req.ox, req.schema) if req.enable_on_update else "",
            )
        )
        enable = (
            None
            if req.enable_on_update
            else await stack.enter_async_context(
                ssh.staged(
                    req.admin.ssh,
                    gated_tool_command(req.ox, "enableschema", ["-m", req.schema]),
                    first_input=password + "\n",
                )
            )
        )
        # 4 disable (the schema's contexts are refused from now on), then 5 point its contexts
        # to the new server: one command, so no round trip between the two while its users wait.
        heartbeat({"schema": req.schema, "step": "4"})
        started = time.time()
        r = await run_admin_tools(
            req.admin,
            req.ox,
            [
                ("disableschema", ["-m", req.schema]),
                ("changeserver", ["-s", str(req.server_id), "-m", req.schema]),
            ],
        )
        # Where 5 started, from the node's own clock (the SSH set-up before 4 counts in 4).
        split = min(started + r.offsets_s[1], time.time()) if len(r.offsets_s) > 1 else time.time()
        if r.exit_status != 0 or len(r.outputs) < 2:
            tool, at = ("disableschema", started) if len(r.outputs) < 2 else ("changeserver", split)
            text = f"{(r.outputs[-1] if r.outputs else '').strip()} {r.stderr.strip()}".strip()
            if r.exit_status in TRANSIENT_EXITS:
                # Retried as a whole: disable and changeserver set states.
                tool_failed(req.admin, tool, ["-m", req.schema], r.exit_status, text)
            error = ApplicationError(
                f"{req.admin.name}: {tool} -m {req.schema} exited with status "
                f"{r.exit_status}: {tail(text, 600) or '(no output)'}",
                type=OX_TOOL_FAILED,
                non_retryable=True,
            )
            if tool == "changeserver":
                steps.append(OxStepTime(seed_step="4", started=started, ended=split))
            return failed("4" if tool == "disableschema" else "5", at, error)
        steps.append(OxStepTime(seed_step="4", started=started, ended=split))
        try:
            check_changed(req.admin, req.schema, req.server_id, r.outputs[1])
        except ApplicationError as e:
            return failed("5", split, e)
        steps.append(OxStepTime(seed_step="5", started=split, ended=time.time()))

        # 6 its update tasks, on the node with the new release (and, with enable_on_update,
        # 7 right after them when they all ran).
        heartbeat({"schema": req.schema, "step": "6"})
        started = time.time()
        update.go()
        job = await update.outcome()
        arrived = time.time()
        # The follow-up counts only when this attempt started the job: a job an earlier attempt
        # started may have enabled the schema before this attempt's step 4 disabled it again.
        then = job.then if job.state == "started" else None
        # 7 ran on the node: it started its own duration before its outcome arrived.
        then_started = arrived - max(0.0, then.ended - then.started) if then else arrived
        try:
            tasks = runupdate_outcome(req.update, req.ox, req.schema, job)
            if tasks:
                fail(OX_UPDATE_TASKS_FAILED, f"update task(s) failed on {req.schema}: {', '.join(tasks)}")
        except ApplicationError as e:
            if not e.non_retryable:
                raise
            return failed("6", started, e)
        steps.append(OxStepTime(seed_step="6", started=started, ended=then_started))

        # 7 enable: its users are served by the new server from now on.
        heartbeat({"schema": req.schema, "step": "7"})
        if enable is not None:
            started = time.time()
            enable.go("go\n")
            done = await enable.result(120.0)
            if done.exit_status != 0:
                return enable_failed(started, done)
        elif then is None or then.exit_status != 0:
            # Not run on the node for this attempt (runupdate printed something that lists no
            # failed task; the job was an earlier attempt's, or an older worker's without a
            # follow-up), or it failed there: run here, enable is idempotent.
            started = time.time()
            done = await run_tool(req.update, req.ox, "enableschema", ["-m", req.schema], check=False)
            if done.exit_status != 0:
                return enable_failed(started, done)
        else:
            started = then_started
        steps.append(OxStepTime(seed_step="7", started=started, ended=time.time()))
    return OxSchemaUpgrade(schema=req.schema, steps=tuple(steps))


@activity.defn
async def ox_upgrade_schema(req: OxUpgradeSchemaRequest) -> OxSchemaUpgrade:
    """Steps 4-7 for one schema (disable, changeserver, runupdate on the new node, enable)."""
    return await upgrade_schema(req)


@activity.defn
async def ox_enable_schema(req: OxSchemaRequest) -> None:
    """Step 7: enableschema -m <schema>."""
    await run_tool(req.node, req.ox, "enableschema", ["-m", req.schema])


# OX's UpgradeSchemata splits the literal "," instead of -k's value (UpgradeSchemata.java,
# filterSchemata's caller, 7.10.x), so the tool upgrades the schemata -k names.
SKIP_IGNORED = (
    "OX's upgradeschemata ignores -k (its source splits a literal ',' instead of the "
    "option's value), so it would upgrade the schemata you want skipped"
)


@activity.defn
async def ox_run_upgradeschemata(req: OxUpgradeToolRequest) -> OxToolRun:
    """Steps 3-7 by OX's own tool: upgradeschemata -n <name> [-f] [-m s]; the "already
    registered" prompt is answered with `answer` (none: the tool fails on it). Detached under
    this workflow run's key: a retried attempt attaches to the tool's run (or reads its
    outcome) and never starts it again - a second run would disable and enable every schema
    again. A run lost with its node is reported, not repeated. -k is refused (SKIP_IGNORED)."""
    if req.skip:
        fail(INVALID_REQUEST, f"skip {', '.join(req.skip)}: {SKIP_IGNORED}")
    args = ["-n", req.server_name]
    if req.force:
        args.append("-f")
    if req.resume_from:
        args += ["-m", req.resume_from]
    password = resolve_secret(req.ox.admin_password, needed_by=f"upgradeschemata on {req.node.name}")
    path = tool_path(req.ox, "upgradeschemata")
    argv = " ".join(shlex.quote(a) for a in ["-A", req.ox.admin_user, *args])
    command = f'ADMIN_PASSWORD="$ZD_SECRET" {path} {argv}'
    key = detached.job_key("upgradeschemata", *_step_key(req.server_name))
    job = await detached.run_detached(
        req.node.ssh,
        key,
        "upgradeschemata",
        command,
        secret=password,
        stdin_text=req.answer + "\n" if req.answer else "",
        budget_s=req.ox.upgradeschemata_timeout_s,
        rerun_lost=False,
        what=f"{req.node.name}: upgradeschemata -n {req.server_name}",
    )
    if job.exit_status is None:
        fail(
            OX_TOOL_FAILED,
            f"{req.node.name}: the run of upgradeschemata (job {job.key}) ended without an "
            "exit status (node restarted?); it is not started again - check the schemata "
            f"and resume with resume_from. Its output so far: {tail(job.stdout, 600)}",
        )
    if job.exit_status in TRANSIENT_EXITS and "Disabling schema" not in job.stdout:
        # Nothing was touched (the middleware did not answer): a new job may start.
        tool_failed(req.node, "upgradeschemata", args, job.exit_status, job.stderr)
    schemata, existing, registered, aborted = parse_upgradeschemata(job.stdout, job.stderr)
    server_id = existing
    if server_id is None and not aborted:
        servers = parse_servers((await run_tool(req.node, req.ox, "listserver", ["--csv"])).stdout)
        server_id = next((s.id for s in servers if s.name == req.server_name), None)
    return OxToolRun(
        exit_status=job.exit_status,
        registered_id=server_id,
        already_registered=existing is not None,
        registered_now=registered,
        aborted=aborted,
        schemata=tuple(schemata),
        stdout_tail=tail(job.stdout, 1500),
        stderr_tail=tail(job.stderr, 1500),
    )


@dataclass(frozen=True)
class OxRevertSchemaRequest:
    node: Node
    ox: OxSettings
    schema: str
    old_server_id: int
    # The step its upgrade failed at ("4" .. "7", or "4-7": unknown).
    failed_step: str


@activity.defn
async def ox_revert_schema(req: OxRevertSchemaRequest) -> None:
    """A schema back on the old server and enabled, by the real tools' rules: changeserver
    refuses a schema with an enabled context (OXUtilMySQLStorage.changeServer: "The schema
    '<s>' is not disabled", exit 106), so disable first. A failed disable (step 4) moved
    nothing: only enable what it may have disabled. Idempotent: every tool sets a state."""
    if req.failed_step == "4":
        await run_tool(req.node, req.ox, "enableschema", ["-m", req.schema])
        return
    calls = [
        ("disableschema", ["-m", req.schema]),
        ("changeserver", ["-s", str(req.old_server_id), "-m", req.schema]),
        ("enableschema", ["-m", req.schema]),
    ]
    r = await run_admin_tools(req.node, req.ox, calls)
    if r.exit_status != 0 or len(r.outputs) < len(calls):
        tool, args = calls[max(0, len(r.outputs) - 1)]
        tool_failed(
            req.node,
            tool,
            args,
            r.exit_status,
            f"{(r.outputs[-1] if r.outputs else '').strip()} {r.stderr.strip()}",
        )
    check_changed(req.node, req.schema, req.old_server_id, r.outputs[1])


@dataclass(frozen=True)
class OxGetPropertyRequest:
    node: Node
    path: str
    key: str


@activity.defn
async def ox_get_property(req: OxGetPropertyRequest) -> str | None:
    """The value of one key of a properties file on the node (None: no such key or file)."""
    data = await ssh.get_file(req.node.ssh, req.path)
    return None if data is None else property_value(data.decode("utf-8"), req.key)


@activity.defn
async def ox_installed_version(req: OxNodeRequest) -> str:
    """The OX release installed on the node (`ox.version_command`)."""
    r = await ssh.run(req.node.ssh, req.ox.version_command)
    version = r.stdout.strip()
    if not re.fullmatch(r"\d+(\.\d+)+", version):
        fail(
            OX_OUTPUT_UNEXPECTED,
            f"{req.node.name}: {req.ox.version_command!r} printed {version!r}, not a release number",
        )
    return version


@activity.defn
async def ox_install_version(req: OxInstallRequest) -> None:
    """Step 2: install the release (`ox.install_command`; installing what is installed is a
    no-op for a package manager, so this is idempotent)."""
    if not re.fullmatch(r"\d+(\.\d+)+", req.version):
        fail(INVALID_REQUEST, f"release {req.version!r}: expected numbers separated by dots")
    await ssh.run(req.node.ssh, req.ox.install_command.format(version=req.version), timeout_s=900.0)


@activity.defn
async def ox_reload_configuration(req: OxNodeRequest) -> None:
    """Step 0: the running service re-reads its properties (`ox.reload_command`)."""
    await ssh.run(req.node.ssh, req.ox.reload_command, timeout_s=120.0)


@activity.defn
async def ox_set_property(req: OxSetPropertyRequest) -> OxPropertyChange:
    """Set (or remove) one key of a properties file on the node; reports the value it replaced."""
    return await set_property(req)


OX_ACTIVITIES: list[Callable[..., Any]] = [
    ox_list_schemata,
    ox_list_servers,
    ox_register_server,
    ox_change_server,
    ox_enable_schema,
    ox_upgrade_schema,
    ox_run_upgradeschemata,
    ox_installed_version,
    ox_install_version,
    ox_reload_configuration,
    ox_set_property,
    ox_revert_schema,
    ox_get_property,
    ox_list_databases,
]
