"""`zerodown`: the command line.

zerodown validate site.yaml
zerodown plan rolling-deploy --inventory site.yaml --package app-2.zip
zerodown start rolling-deploy --inventory site.yaml --package app-2.zip [--wait]
zerodown start ox-upgradeschemata -i ox-site.yaml --server-name oxserver-xyz --update-node ox1
zerodown start ox-node-upgrade -i ox-site.yaml --version 7.10.1 --server-name oxserver-xyz
zerodown start minor-blue-green -i site.yaml -p app-2.zip [--setting web.config:key=value]
zerodown status <workflow-id> | watch <workflow-id> | replay <workflow-id>
zerodown server [--stop|--status]       zerodown worker
zerodown lab up|down|status|reset|probe [--ox]|inject  zerodown demo
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from inventory.load import load_inventory
from inventory.model import Inventory, InventoryError, SecretRef, secret_keys_of
from starter import client as zc
from starter.report import (
    blue_green_summary,
    gate_line,
    kv_table,
    maintenance_window_summary,
    ox_nodes_summary,
    ox_schemata_summary,
    recent_steps_table,
    schemata_line,
    status_notes,
    status_view,
)
from worker.main import ADDRESS, TASK_QUEUE

if TYPE_CHECKING:
    from lab.config import LabConfig

console = Console()
err = Console(stderr=True)

app = typer.Typer(
    help="zerodown: upgrade runbooks as durable Temporal workflows.",
    no_args_is_help=True,
    add_completion=False,
)
lab_app = typer.Typer(
    help="The embedded lab site (local HAProxy, MariaDB, app nodes over SSH).", no_args_is_help=True
)
app.add_typer(lab_app, name="lab")

Address = Annotated[
    str, typer.Option("--address", envvar="ZERODOWN_TEMPORAL_ADDRESS", help="Temporal frontend host:port")
]
Namespace = Annotated[str, typer.Option("--namespace", envvar="ZERODOWN_NAMESPACE")]
TaskQueue = Annotated[str, typer.Option("--task-queue", envvar="ZERODOWN_TASK_QUEUE")]
InventoryOpt = Annotated[Path, typer.Option("--inventory", "-i", help="site inventory (YAML)")]
PackageOpt = Annotated[
    Path | None,
    typer.Option(
        "--package",
        "-p",
        help="release package (zip): rolling-deploy, ss-*, minor-blue-green (required there)",
    ),
]
NodesOpt = Annotated[
    str,
    typer.Option(
        "--nodes",
        help=("comma-separated; rolling-deploy: only these nodes; ox-node-upgrade: the upgrade order"),
    ),
]
# The Open-Xchange procedures' options (seed 002); each refused by a procedure without it.
VersionOpt = Annotated[
    str | None, typer.Option("--version", help="ox-node-upgrade: the release to install (x.y.z)")
]
ServerNameOpt = Annotated[
    str | None,
    typer.Option(
        "--server-name",
        help=("ox-*: the new server's name (upgradeschemata -n; the upgraded nodes' SERVER_NAME)"),
    ),
]
UpdateNodeOpt = Annotated[
    str | None,
    typer.Option(
        "--update-node", help=("ox-upgradeschemata: the node running the new release (runupdate runs there)")
    ),
]
AdminNodeOpt = Annotated[
    str | None,
    typer.Option(
        "--admin-node",
        help=("ox-upgradeschemata: a working old node for the other tools (default: the first other node)"),
    ),
]
SchemataOpt = Annotated[
    str,
    typer.Option(
        "--schemata", help=("ox-upgradeschemata: only these schemata, comma-separated (default: all)")
    ),
]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        help=(
            "ox-*: a failed schema update does not stop the run: it is left disabled and reported "
            "(upgradeschemata -f)"
        ),
    ),
]
ResumeFromOpt = Annotated[
    str | None,
    typer.Option(
        "--resume-from",
        help=("ox-upgradeschemata: continue after this schema, which is passed over (upgradeschemata -m)"),
    ),
]
SkipOpt = Annotated[
    str,
    typer.Option(
        "--skip", help=("ox-upgradeschemata: schemata to leave alone, comma-separated (upgradeschemata -k)")
    ),
]
ConcurrencyOpt = Annotated[
    int | None,
    typer.Option("--concurrency", help=("ox-*: schemata upgraded at once, 1-32 (default 1, as the tool)")),
]
DriveToolOpt = Annotated[
    bool,
    typer.Option(
        "--drive-tool",
        help=("ox-upgradeschemata: run OX's own upgradeschemata on the update node for steps 3-7"),
    ),
]
SchemataPerRunOpt = Annotated[
    int | None,
    typer.Option(
        "--schemata-per-run",
        help=("ox-*: schemata per workflow run before it continues as new (default 100)"),
    ),
]
# The minor upgrade's options (seed 003, minor-blue-green); each refused by a procedure without it.
LbOpt = Annotated[
    str | None,
    typer.Option(
        "--lb",
        help=("minor-blue-green: the load balancer whose members are the old servers (default: the first)"),
    ),
]
TemplateOpt = Annotated[
    str | None,
    typer.Option(
        "--template",
        help=("minor-blue-green: the old server cloned first (default: the balancer's first member)"),
    ),
]
NewNamesOpt = Annotated[
    str,
    typer.Option(
        "--new-names",
        help=(
            "minor-blue-green: the new servers' names, comma-separated, one per old server "
            "(default: <old>-v<version>)"
        ),
    ),
]
SettingOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--setting",
        metavar="FILE:KEY=VALUE",
        help=(
            "minor-blue-green: a setting of the new servers (repeatable); FILE is a key = value file in the "
            "app folder; the template's current values are saved first. Values enter the workflow input: "
            "no secrets (see --secret-setting)"
        ),
    ),
]
SecretSettingOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--secret-setting",
        metavar="FILE:KEY=env:NAME|file:PATH",
        help=(
            "minor-blue-green: a secret setting of the new servers (repeatable), given as a reference the "
            "worker resolves: the value never enters the workflow's input or history. Required for a key "
            "the inventory lists in application.secret_keys"
        ),
    ),
]
SystemCommandOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--system-command",
        metavar="CMD",
        help=(
            "minor-blue-green: a systems-level change, run on every new server before it is launched "
            "(repeatable, in order)"
        ),
    ),
]
DrainDeadlineOpt = Annotated[
    float | None,
    typer.Option(
        "--drain-deadline",
        metavar="SECONDS",
        min=1.0,
        help=(
            "minor-blue-green: how long the old servers' sessions may take before gate drain-deadline asks "
            "(default 300)"
        ),
    ),
]
LabRoot = Annotated[Path, typer.Option("--root", help="where the lab lives")]
DEFAULT_ADDRESS = ADDRESS


def _load(path: Path) -> Inventory:
    try:
        return load_inventory(path)
    except InventoryError as e:
        err.print(f"[bold red]invalid inventory[/] {path}:")
        for p in e.problems:
            err.print(f"  {p}")
        raise typer.Exit(2) from None


def _names(value: str) -> tuple[str, ...]:
    """A comma-separated option as names (blanks dropped)."""
    return tuple(n.strip() for n in value.split(",") if n.strip())


def _check_nodes(inv: Inventory, names: tuple[str, ...], option: str) -> None:
    known = {n.name for n in inv.nodes}
    unknown = [n for n in names if n not in known]
    if unknown:
        err.print(
            f"[bold red]unknown node(s)[/] {', '.join(unknown)} in site {inv.site} "
            f"(known: {', '.join(sorted(known))}), given as {option}"
        )
        raise typer.Exit(2)


def _package(path: Path) -> str:
    if not path.is_file():
        err.print(f"[bold red]package not found:[/] {path}")
        raise typer.Exit(2)
    return str(path.resolve())


def _procedure_input(procedure: str, inv: Inventory, package: Path | None, nodes: str, **fields: Any) -> Any:
    """The workflow input from the options, refused (exit 2, nothing started) when an option
    is one the procedure does not take, a required one is missing, the package is missing
    or a node is not in the inventory. Schema names are the workflow's preflight's to check
    (only OX's config database knows them)."""
    try:
        arg = zc.procedure_input(
            procedure,
            inventory=inv,
            package_path=str(package) if package is not None else None,
            nodes=_names(nodes),
            **fields,
        )
    except zc.ProcedureInputError as e:
        err.print(f"[bold red]{escape(str(e))}[/]")
        raise typer.Exit(2) from None
    if getattr(arg, "package_path", ""):
        arg = dataclasses.replace(arg, package_path=_package(Path(arg.package_path)))
    for field, option in (
        ("only_nodes", "--nodes"),
        ("nodes", "--nodes"),
        ("update_node", "--update-node"),
        ("admin_node", "--admin-node"),
        ("template", "--template"),
    ):
        value = getattr(arg, field, None)
        if value:
            _check_nodes(inv, tuple(value) if isinstance(value, tuple) else (value,), option)
    lb = getattr(arg, "lb", "")
    if lb and lb not in {b.name for b in inv.load_balancers}:
        err.print(
            f"[bold red]unknown load balancer[/] {escape(lb)} in site {inv.site} "
            f"(known: {', '.join(b.name for b in inv.load_balancers) or 'none'}), given as --lb"
        )
        raise typer.Exit(2)
    for file, values in sorted((getattr(arg, "settings", None) or {}).items()):
        for key in sorted(set(values) & set(secret_keys_of(inv.application, file))):
            # The value is not printed: it is a secret.
            err.print(
                f"[bold red]{escape(file)}:{escape(key)} is a secret[/] (application.secret_keys): give it "
                f"as --secret-setting {escape(file)}:{escape(key)}=env:NAME or =file:PATH, never as a value"
            )
            raise typer.Exit(2)
    return arg


def _ox_fields(
    version: str | None,
    server_name: str | None,
    update_node: str | None,
    admin_node: str | None,
    schemata: str,
    force: bool,
    resume_from: str | None,
    skip: str,
    concurrency: int | None,
    drive_tool: bool,
    schemata_per_run: int | None,
) -> dict[str, Any]:
    """The OX options as input fields; None / empty means not given (zc.procedure_input)."""
    return {
        "version": version,
        "server_name": server_name,
        "update_node": update_node,
        "admin_node": admin_node,
        "schemata": _names(schemata),
        "force": force,
        "resume_from": resume_from,
        "skip": _names(skip),
        "concurrency": concurrency,
        "drive_tool": drive_tool,
        "schemata_per_run": schemata_per_run,
    }


def _secret_settings(options: list[str] | None) -> dict[str, dict[str, SecretRef]]:
    """`--secret-setting FILE:KEY=env:NAME` (or `=file:PATH`) options as file -> {key:
    reference}: the worker resolves the reference, the value never enters the input."""
    out: dict[str, dict[str, SecretRef]] = {}
    for file, values in _settings(options, "--secret-setting").items():
        for key, ref in values.items():
            kind, colon, name = ref.partition(":")
            if not (colon and name.strip() and kind in ("env", "file")):
                err.print(
                    f"[bold red]bad --secret-setting {escape(file)}:{escape(key)}[/]: expected "
                    "FILE:KEY=env:NAME or FILE:KEY=file:PATH (a reference, not the value)"
                )
                raise typer.Exit(2)
            name = name.strip()
            out.setdefault(file, {})[key] = SecretRef(env=name) if kind == "env" else SecretRef(file=name)
    return out


def _settings(options: list[str] | None, option: str = "--setting") -> dict[str, dict[str, str]]:
    """`--setting FILE:KEY=VALUE` options as file -> {key: value}; a bad one stops the CLI
    (exit 2). The first `:` ends the file, the first `=` the key: a value may hold both."""
    out: dict[str, dict[str, str]] = {}
    for raw in options or ():
        file, colon, rest = raw.partition(":")
        key, equals, value = rest.partition("=")
        file, key = file.strip(), key.strip()
        if not (colon and equals and file and key):
            problem = "expected FILE:KEY=VALUE, e.g. web.config:custom.banner=Hello"
        elif file.startswith("/") or ".." in file.split("/"):
            problem = "FILE must be a path relative to the application folder"
        elif key in out.get(file, {}):
            problem = f"{file}:{key} is given twice"
        else:
            out.setdefault(file, {})[key] = value.strip()
            continue
        shown = repr(raw) if option == "--setting" else repr(raw.partition("=")[0] + "=...")
        err.print(f"[bold red]bad {option} {escape(shown)}[/]: {escape(problem)}")
        raise typer.Exit(2)
    return out


def _blue_green_fields(
    lb: str | None,
    template: str | None,
    new_names: str,
    setting: list[str] | None,
    system_command: list[str] | None,
    drain_deadline: float | None,
    secret_setting: list[str] | None = None,
) -> dict[str, Any]:
    """The minor upgrade's options as input fields; None / empty means not given."""
    return {
        "lb": lb,
        "template": template,
        "new_names": _names(new_names),
        "settings": _settings(setting),
        "secret_settings": _secret_settings(secret_setting),
        "system_commands": tuple(system_command or ()),
        "drain_deadline_s": drain_deadline,
    }


def _check_procedure(procedure: str) -> None:
    try:
        zc.input_fields(procedure)
    except zc.ProcedureInputError as e:
        err.print(f"[bold red]{escape(str(e))}[/]")
        raise typer.Exit(2) from None


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except RuntimeError as e:
        if "Failed client connect" in str(e) or "connect" in str(e).lower():
            err.print(
                f"[bold red]cannot reach Temporal:[/] {e}\n"
                "start it with `zerodown server` (or `zerodown lab up`)."
            )
            raise typer.Exit(3) from None
        raise


# ---------------------------------------------------------------- inventory and procedures
@app.command()
def validate(inventory: Annotated[Path, typer.Argument(help="site inventory (YAML)")]) -> None:
    """Validate an inventory; print every problem with its path."""
    inv = _load(inventory)
    console.print(
        f"[green]ok[/] {inventory}: site {inv.site}, {len(inv.nodes)} node(s), "
        f"{len(inv.load_balancers)} load balancer(s), {len(inv.databases)} database(s)"
    )


@app.command()
def schema() -> None:
    """Print the inventory's JSON Schema (generated from the model) for YAML editors:
    `zerodown schema > inventory.schema.json`, then `# yaml-language-server:
    $schema=inventory.schema.json` atop an inventory."""
    import json

    from inventory.schema import inventory_schema

    print(json.dumps(inventory_schema(), indent=2))


async def _start(
    procedure: str,
    inv: Inventory,
    arg: Any,
    address: str,
    namespace: str,
    task_queue: str,
    wait: bool,
    workflow_id: str | None,
) -> int:
    from worker.main import connect

    client = await connect(address, namespace, tracing=False)
    try:
        handle = await zc.start_procedure(client, procedure, inv, arg, task_queue, workflow_id)
    except WorkflowAlreadyStartedError:
        err.print(
            f"[bold red]a workflow with id {workflow_id} is already running[/]: "
            f"follow it with `zerodown watch {workflow_id}` or choose another --id"
        )
        return 2
    console.print(f"started [bold]{procedure}[/] as workflow [cyan]{handle.id}[/]")
    console.print(f"  web UI: http://127.0.0.1:8233/namespaces/{namespace}/workflows/{handle.id}")
    if not wait:
        console.print(f"  follow it: zerodown watch {handle.id}")
        return 0
    result_type = _result_type(procedure) or object
    with Live(console=console, refresh_per_second=4, transient=True) as live:
        outcome = await zc.wait_with_status(
            client, handle, result_type, procedure, lambda st: live.update(status_view(st))
        )
    return _print_outcome(outcome)


def _result_type(procedure: str) -> type | None:
    from workflows.registry import RESULTS

    return RESULTS.get(procedure)


def _print_outcome(outcome: zc.Outcome) -> int:
    """Print how a run ended; the exit code: 0 done, 1 failed (or, for the OX procedures,
    done but with schemata not upgraded, or aborted at the registered-server gate)."""
    from workflows.major_maintenance_window import MajorMaintenanceResult
    from workflows.minor_blue_green import MinorBlueGreenResult
    from workflows.ox_node_upgrade import OxNodeUpgradeResult
    from workflows.ox_upgradeschemata import OxUpgradeSchemataResult

    if not outcome.ok:
        # The error is the workflow's own report (a preflight's problems, a stop's state):
        # printed as is, never read as markup.
        err.print(f"[bold red]failed:[/] {escape(outcome.error or '')}")
        return 1
    res = outcome.result
    if getattr(res, "dry_run", False):
        console.print("[bold]plan[/] (dry run, nothing was changed):")
        for line in res.plan:
            console.print(f"  - {escape(line)}")
        console.print(f"plan hash: {res.plan_hash}", soft_wrap=True)
        return 0
    console.print(recent_steps_table(res.steps))
    if isinstance(res, OxUpgradeSchemataResult):
        for line in ox_schemata_summary(res):
            console.print(line, soft_wrap=True)
        return 1 if res.failed or res.aborted_at_registration else 0
    if isinstance(res, OxNodeUpgradeResult):
        for line in ox_nodes_summary(res):
            console.print(line, soft_wrap=True)
        return 1 if res.failed_schemata else 0
    if isinstance(res, MajorMaintenanceResult):
        for line in maintenance_window_summary(res):
            console.print(line, soft_wrap=True)
        return 0
    if isinstance(res, MinorBlueGreenResult):
        for line in blue_green_summary(res):
            console.print(line, soft_wrap=True)
        return 0
    if getattr(res, "merge_report", ()):
        console.print("[bold]config merge[/]:")
        for line in res.merge_report:
            console.print(f"  {line}")
    console.print(f"[green]done[/]: {', '.join(res.nodes)} now at {res.version}")
    return 0


ContinueGate = Annotated[
    bool,
    typer.Option(
        "--continue-gate",
        help=("after the first batch, wait for an approver of gate `continue` (a canary check)"),
    ),
]


OnFailure = Annotated[
    str,
    typer.Option(
        "--on-failure",
        help=(
            "a failed step: `ask` (gate failure:<step>: retry / skip / rollback / abort; "
            "ox-upgradeschemata: failure:<step>@<schema>: retry / skip / revert / abort) or `rollback` "
            "at once (ox-upgradeschemata: revert the schema and stop); default: the procedure's "
            "(rolling-deploy, minor-blue-green: rollback; "
            "ss-*, ox-*: ask)"
        ),
    ),
]
FailureTimeout = Annotated[
    float,
    typer.Option(
        "--failure-gate-timeout", help=("seconds a failure gate waits before its default, rollback")
    ),
]


def _failure_options(on_failure: str, failure_timeout: float) -> dict[str, Any]:
    if on_failure and on_failure not in ("ask", "rollback"):
        err.print(f"[bold red]--on-failure must be ask or rollback[/], not {on_failure!r}")
        raise typer.Exit(2)
    out: dict[str, Any] = {"failure_gate_timeout_s": failure_timeout}
    if on_failure:
        out["on_failure"] = on_failure
    return out


def _starter() -> str:
    """Who starts a run: ZERODOWN_USER, else the login name (may not approve its own gates)."""
    import getpass

    return os.environ.get("ZERODOWN_USER") or getpass.getuser()


@app.command()
def plan(
    procedure: str,
    inventory: InventoryOpt,
    package: PackageOpt = None,
    nodes: NodesOpt = "",
    continue_gate: ContinueGate = False,
    version: VersionOpt = None,
    server_name: ServerNameOpt = None,
    update_node: UpdateNodeOpt = None,
    admin_node: AdminNodeOpt = None,
    schemata: SchemataOpt = "",
    force: ForceOpt = False,
    resume_from: ResumeFromOpt = None,
    skip: SkipOpt = "",
    concurrency: ConcurrencyOpt = None,
    drive_tool: DriveToolOpt = False,
    schemata_per_run: SchemataPerRunOpt = None,
    lb: LbOpt = None,
    template: TemplateOpt = None,
    new_names: NewNamesOpt = "",
    setting: SettingOpt = None,
    secret_setting: SecretSettingOpt = None,
    system_command: SystemCommandOpt = None,
    drain_deadline: DrainDeadlineOpt = None,
    address: Address = DEFAULT_ADDRESS,
    namespace: Namespace = "default",
    task_queue: TaskQueue = TASK_QUEUE,
) -> None:
    """Validate, run the read-only preflight on every target and print the plan and its hash.
    Changes nothing."""
    _check_procedure(procedure)
    inv = _load(inventory)
    arg = _procedure_input(
        procedure,
        inv,
        package,
        nodes,
        dry_run=True,
        continue_gate=continue_gate,
        **_ox_fields(
            version,
            server_name,
            update_node,
            admin_node,
            schemata,
            force,
            resume_from,
            skip,
            concurrency,
            drive_tool,
            schemata_per_run,
        ),
        **_blue_green_fields(
            lb, template, new_names, setting, system_command, drain_deadline, secret_setting
        ),
    )
    raise typer.Exit(_run(_start(procedure, inv, arg, address, namespace, task_queue, True, None)))


@app.command()
def start(
    procedure: str,
    inventory: InventoryOpt,
    package: PackageOpt = None,
    nodes: NodesOpt = "",
    continue_gate: ContinueGate = False,
    gate_timeout: Annotated[float, typer.Option("--gate-timeout", help="seconds")] = 3600.0,
    on_failure: OnFailure = "",
    failure_gate_timeout: FailureTimeout = 3600.0,
    version: VersionOpt = None,
    server_name: ServerNameOpt = None,
    update_node: UpdateNodeOpt = None,
    admin_node: AdminNodeOpt = None,
    schemata: SchemataOpt = "",
    force: ForceOpt = False,
    resume_from: ResumeFromOpt = None,
    skip: SkipOpt = "",
    concurrency: ConcurrencyOpt = None,
    drive_tool: DriveToolOpt = False,
    schemata_per_run: SchemataPerRunOpt = None,
    lb: LbOpt = None,
    template: TemplateOpt = None,
    new_names: NewNamesOpt = "",
    setting: SettingOpt = None,
    secret_setting: SecretSettingOpt = None,
    system_command: SystemCommandOpt = None,
    drain_deadline: DrainDeadlineOpt = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait")] = True,
    workflow_id: Annotated[str | None, typer.Option("--id")] = None,
    address: Address = DEFAULT_ADDRESS,
    namespace: Namespace = "default",
    task_queue: TaskQueue = TASK_QUEUE,
) -> None:
    """Start a procedure (after validating its inputs) and follow it."""
    _check_procedure(procedure)
    inv = _load(inventory)
    arg = _procedure_input(
        procedure,
        inv,
        package,
        nodes,
        continue_gate=continue_gate,
        gate_timeout_s=gate_timeout,
        started_by=_starter(),
        **_failure_options(on_failure, failure_gate_timeout),
        **_ox_fields(
            version,
            server_name,
            update_node,
            admin_node,
            schemata,
            force,
            resume_from,
            skip,
            concurrency,
            drive_tool,
            schemata_per_run,
        ),
        **_blue_green_fields(
            lb, template, new_names, setting, system_command, drain_deadline, secret_setting
        ),
    )
    raise typer.Exit(_run(_start(procedure, inv, arg, address, namespace, task_queue, wait, workflow_id)))


@app.command("input")
def input_json(
    procedure: str,
    inventory: InventoryOpt,
    package: PackageOpt = None,
    nodes: NodesOpt = "",
    dry_run: Annotated[bool, typer.Option("--dry-run")] = False,
    continue_gate: ContinueGate = False,
    gate_timeout: Annotated[
        float | None, typer.Option("--gate-timeout", help="seconds (default: the procedure's)")
    ] = None,
    on_failure: OnFailure = "",
    failure_gate_timeout: FailureTimeout = 3600.0,
    version: VersionOpt = None,
    server_name: ServerNameOpt = None,
    update_node: UpdateNodeOpt = None,
    admin_node: AdminNodeOpt = None,
    schemata: SchemataOpt = "",
    force: ForceOpt = False,
    resume_from: ResumeFromOpt = None,
    skip: SkipOpt = "",
    concurrency: ConcurrencyOpt = None,
    drive_tool: DriveToolOpt = False,
    schemata_per_run: SchemataPerRunOpt = None,
    lb: LbOpt = None,
    template: TemplateOpt = None,
    new_names: NewNamesOpt = "",
    setting: SettingOpt = None,
    secret_setting: SecretSettingOpt = None,
    system_command: SystemCommandOpt = None,
    drain_deadline: DrainDeadlineOpt = None,
) -> None:
    """Print a procedure's workflow input as JSON, for `temporal workflow start --input`."""
    import json

    _check_procedure(procedure)
    inv = _load(inventory)
    arg = _procedure_input(
        procedure,
        inv,
        package,
        nodes,
        dry_run=dry_run,
        continue_gate=continue_gate,
        gate_timeout_s=gate_timeout,
        started_by=_starter(),
        **_failure_options(on_failure, failure_gate_timeout),
        **_ox_fields(
            version,
            server_name,
            update_node,
            admin_node,
            schemata,
            force,
            resume_from,
            skip,
            concurrency,
            drive_tool,
            schemata_per_run,
        ),
        **_blue_green_fields(
            lb, template, new_names, setting, system_command, drain_deadline, secret_setting
        ),
    )
    print(json.dumps(dataclasses.asdict(arg)))


async def _status(workflow_id: str, address: str, namespace: str, follow: bool) -> int:
    from worker.main import connect

    client = await connect(address, namespace, tracing=False)
    handle = client.get_workflow_handle(workflow_id)
    try:
        status, wf_type = await zc.describe(handle)
    except RPCError as e:
        if e.status != RPCStatusCode.NOT_FOUND:
            raise
        err.print(f"[bold red]no workflow {workflow_id!r}[/] in namespace {namespace}")
        return 2
    if _result_type(wf_type) is None:
        err.print(f"[bold red]{workflow_id} is a {wf_type!r} workflow, not a zerodown procedure[/]")
        return 2
    if not follow:
        st = await zc.run_status(client, handle, wf_type)
        p = st.progress
        rows: dict[str, object] = {
            "procedure": wf_type,
            "status": status.name if status else "?",
            "phase": p.phase,
        }
        if p.nodes_total:
            rows["nodes done"] = f"{len(p.nodes_done)}/{p.nodes_total}"
        if st.schemata is not None:
            rows["schemata"] = schemata_line(st.schemata)
        running = st.running_child
        if running is not None:
            rows["running child"] = running.workflow_id + (f" ({running.node})" if running.node else "")
        console.print(kv_table(workflow_id, rows))
        for note in status_notes(st):
            if not note.startswith("schemata: "):  # already a row of the table
                console.print(escape(note), soft_wrap=True)
        console.print(recent_steps_table(p.steps))
        for g in await zc.pending_gates(handle):
            console.print(gate_line(g), soft_wrap=True)
        return 0
    # Transient: the outcome below prints the steps again, and the last live frame may show a
    # phase the run had already left when it ended.
    with Live(console=console, refresh_per_second=4, transient=True) as live:
        outcome = await zc.wait_with_status(
            client,
            handle,
            _result_type(wf_type) or object,
            wf_type,
            lambda st: live.update(status_view(st, last=30)),
        )
    return _print_outcome(outcome)


@app.command()
def status(workflow_id: str, address: Address = DEFAULT_ADDRESS, namespace: Namespace = "default") -> None:
    """Print a procedure's phase and every step so far."""
    raise typer.Exit(_run(_status(workflow_id, address, namespace, follow=False)))


@app.command()
def watch(workflow_id: str, address: Address = DEFAULT_ADDRESS, namespace: Namespace = "default") -> None:
    """Follow a running procedure live until it ends."""
    raise typer.Exit(_run(_status(workflow_id, address, namespace, follow=True)))


@app.command()
def replay(workflow_id: str, address: Address = DEFAULT_ADDRESS, namespace: Namespace = "default") -> None:
    """Replay a workflow's history through the current code (determinism check)."""
    from worker.main import connect

    async def go() -> str:
        return await zc.replay(await connect(address, namespace, tracing=False), workflow_id)

    try:
        console.print(f"[green]ok[/] {_run(go())}")
    except RPCError as e:
        err.print(f"[bold red]cannot fetch the history of {workflow_id}:[/] {e.message}")
        raise typer.Exit(2) from None
    except zc.ReplayFailed as e:
        err.print(f"[bold red]replay failed: the current code no longer matches this history:[/] {e}")
        raise typer.Exit(1) from None


async def _decide(
    workflow_id: str,
    approve: bool,
    gate: str,
    by: str,
    plan_hash: str,
    comment: str,
    address: str,
    namespace: str,
    choice: str = "",
    key: str | None = None,
) -> int:
    from starter.signing import SigningFailed, approval_key, env_key
    from worker.main import connect
    from workflows.gates import Decision

    client = await connect(address, namespace, tracing=False)
    handle = client.get_workflow_handle(workflow_id)
    try:
        # A gate of a site whose inventory lists approver keys takes signed decisions only.
        waiting = next((g for g in await zc.pending_gates(handle) if g.gate == gate), None)
        needs_key = waiting is not None and waiting.signed
        key_path = approval_key(key) if needs_key or key or env_key() else None
        record = await zc.decide(
            handle,
            approve,
            Decision(gate=gate, by=by, plan_hash=plan_hash, comment=comment, choice=choice),
            key=key_path,
            waiting=waiting,
        )
    except SigningFailed as e:
        err.print(f"[bold red]cannot sign:[/] {escape(str(e))}")
        return 2
    except RPCError as e:
        err.print(f"[bold red]cannot reach workflow {escape(workflow_id)}:[/] {escape(e.message)}")
        return 2
    except zc.DecisionRefused as e:
        err.print(f"[bold red]refused:[/] {e}")
        return 2
    what = f"{record.choice} chosen" if record.choice else record.outcome
    signed = f", signed by key {record.key}" if record.key else ""
    console.print(f"gate {record.gate}: {what} by {record.by} at {record.at:%H:%M:%S}{signed}")
    return 0


GateOpt = Annotated[str, typer.Option("--gate", help="the gate's name (see `zerodown status`)")]
ByOpt = Annotated[str, typer.Option("--by", help="who decides (must be listed for the gate)")]
PlanHashOpt = Annotated[str, typer.Option("--plan-hash", help="the plan you reviewed (`zerodown plan`)")]
CommentOpt = Annotated[str, typer.Option("--comment")]
KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--key",
        help="your SSH key that signs the decision: a private key file, or the .pub of a key in "
        "ssh-agent (default: $ZERODOWN_APPROVAL_KEY); the inventory's approver_keys must list it",
    ),
]


@app.command()
def approve(
    workflow_id: str,
    gate: GateOpt,
    by: ByOpt,
    plan_hash: PlanHashOpt,
    comment: CommentOpt = "",
    key: KeyOpt = None,
    address: Address = DEFAULT_ADDRESS,
    namespace: Namespace = "default",
) -> None:
    """Approve a gate a procedure waits at, signed with your key (refused at once if you may not)."""
    raise typer.Exit(
        _run(_decide(workflow_id, True, gate, by, plan_hash, comment, address, namespace, "", key))
    )


@app.command()
def reject(
    workflow_id: str,
    gate: GateOpt,
    by: ByOpt,
    plan_hash: PlanHashOpt,
    comment: CommentOpt = "",
    key: KeyOpt = None,
    address: Address = DEFAULT_ADDRESS,
    namespace: Namespace = "default",
) -> None:
    """Reject a gate, signed with your key (the procedure rolls back)."""
    raise typer.Exit(
        _run(_decide(workflow_id, False, gate, by, plan_hash, comment, address, namespace, "", key))
    )


ChoiceOpt = Annotated[
    str,
    typer.Option(
        "--choice",
        help="one of the gate's choices, e.g. for a failure "
        "gate: retry, skip (skippable steps), rollback, abort",
    ),
]


@app.command()
def resolve(
    workflow_id: str,
    gate: GateOpt,
    choice: ChoiceOpt,
    by: ByOpt,
    plan_hash: PlanHashOpt,
    comment: CommentOpt = "",
    key: KeyOpt = None,
    address: Address = DEFAULT_ADDRESS,
    namespace: Namespace = "default",
) -> None:
    """Decide a choice gate, e.g. `failure:N5@node2` (retry / skip / rollback / abort), signed."""
    raise typer.Exit(
        _run(_decide(workflow_id, False, gate, by, plan_hash, comment, address, namespace, choice, key))
    )


# ---------------------------------------------------------------- servers
@app.command()
def server(
    root: LabRoot = Path(".lab"),
    port: int = 7233,
    ui_port: int = 8233,
    stop: Annotated[bool, typer.Option("--stop")] = False,
    show: Annotated[bool, typer.Option("--status")] = False,
) -> None:
    """Start (or --stop) the Temporal dev server in the background, persistent in ROOT/temporal.db."""
    from lab import devserver

    if stop:
        devserver.stop_dev_server(root)
        console.print("temporal dev server stopped")
        return
    if show:
        console.print(kv_table("temporal dev server", devserver.server_status(root)))
        return
    devserver.start_dev_server(root, port=port, ui_port=ui_port)
    console.print(f"temporal dev server on 127.0.0.1:{port}, web UI http://127.0.0.1:{ui_port}")


@app.command()
def worker(
    address: Address = DEFAULT_ADDRESS, namespace: Namespace = "default", task_queue: TaskQueue = TASK_QUEUE
) -> None:
    """Run a worker (every workflow and activity) in the foreground."""
    import logging

    from worker.main import run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run_worker(address, namespace, task_queue))


# ---------------------------------------------------------------- the lab
def _lab_cfg(
    root: Path,
    nodes: int | None = None,
    ox_nodes: int | None = None,
    ox_schemata: int | None = None,
    db: str | None = None,
    profile: str | None = None,
) -> Any:
    """The lab's config; for an existing lab, the node counts and ports it was built with."""
    import json

    from lab.config import LabConfig

    try:
        state = json.loads((root / "lab.json").read_text())
    except (OSError, ValueError):
        state = {}
    return LabConfig(
        root=root,
        nodes=nodes or int(state.get("nodes", 3)),
        port_base=int(state.get("port_base", 18000)),
        temporal_port=int(state.get("temporal_port", 7233)),
        temporal_ui_port=int(state.get("temporal_ui_port", 8233)),
        ox_nodes=int(state.get("ox_nodes", 0)) if ox_nodes is None else ox_nodes,
        ox_schemata=ox_schemata or int(state.get("ox_schemata", 20)),
        db=db or str(state.get("db", "mariadb")),
        profile=profile or str(state.get("profile", "default")),
    )


@lab_app.command("up")
def lab_up(
    nodes: int = 3,
    root: LabRoot = Path(".lab"),
    temporal: Annotated[bool, typer.Option("--temporal/--no-temporal")] = True,
    ox: Annotated[
        bool | None,
        typer.Option("--ox/--no-ox", help="with the Open-Xchange cluster (default: as last started)"),
    ] = None,
    ox_nodes: Annotated[
        int | None,
        typer.Option("--ox-nodes", min=1, max=9, help="OX middleware nodes (implies --ox; default 3)"),
    ] = None,
    ox_schemata: Annotated[
        int | None, typer.Option("--ox-schemata", min=1, help="schemata of a new OX config DB (default 20)")
    ] = None,
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            help="the site's database: mariadb, or mssql (the SQL Server stand-in in front of it; "
            "inventory ROOT/site-mssql.yaml). Default: as last started",
        ),
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option(
            "--profile",
            help="the site the lab stands for: default, or secret-server (Windows/IIS nodes behind "
            "the lab's F5, SQL Server; inventory ROOT/site-secret-server.yaml). Default: as last started",
        ),
    ] = None,
) -> None:
    """Build and start the lab; writes ROOT/site.yaml, ROOT/site-mssql.yaml and
    ROOT/site-secret-server.yaml (and ROOT/ox-site.yaml with --ox), and prints the one the
    chosen --db / --profile uses."""
    from lab import manager
    from lab.config import DB_PROFILES, PROFILES

    if db is not None and db not in DB_PROFILES:
        err.print(f"[bold red]--db {db}[/]: expected one of {', '.join(DB_PROFILES)}")
        raise typer.Exit(2)
    if profile is not None and profile not in PROFILES:
        err.print(f"[bold red]--profile {profile}[/]: expected one of {', '.join(PROFILES)}")
        raise typer.Exit(2)
    count = 0 if ox is False else ox_nodes or (3 if ox else None)
    cfg = _lab_cfg(root, nodes, ox_nodes=count, ox_schemata=ox_schemata, db=db, profile=profile)
    site = asyncio.run(manager.lab_up(cfg, with_temporal=temporal))
    console.print(
        f"[green]lab up[/]: inventory {site}"
        + (f", OX cluster inventory {cfg.ox_site_yaml}" if cfg.ox_nodes else "")
    )


@lab_app.command("down")
def lab_down(root: LabRoot = Path(".lab")) -> None:
    """Stop every lab process (by PID)."""
    from lab import manager

    manager.lab_down(_lab_cfg(root))
    console.print("lab down: nothing left running")


@lab_app.command("status")
def lab_status(root: LabRoot = Path(".lab")) -> None:
    """Show each part of the lab, up or down."""
    from lab import manager

    rows = manager.lab_status(_lab_cfg(root))
    for part, up, detail in rows:
        console.print(f"{'[green]up  [/]' if up else '[red]down[/]'} {part:<22} {detail}")
    raise typer.Exit(0 if all(up for _, up, _ in rows) else 1)


@lab_app.command("reset")
def lab_reset(root: LabRoot = Path(".lab")) -> None:
    """Put the lab back at v1 (nodes, schema, load balancer; the OX part as after lab up)."""
    from lab import manager

    asyncio.run(manager.lab_reset(_lab_cfg(root)))
    console.print("lab reset to v1")


OxProbeOpt = Annotated[
    bool,
    typer.Option(
        "--ox", help=("OX logins through the OX main frontend instead (the lab's OX part: lab up --ox)")
    ),
]
PerSchemaOpt = Annotated[
    int, typer.Option("--contexts-per-schema", min=1, help=("--ox: contexts of each schema to log in to"))
]


@lab_app.command("probe")
def lab_probe(
    rate: float = 100.0,
    duration: float = 0.0,
    root: LabRoot = Path(".lab"),
    ox: OxProbeOpt = False,
    per_schema: PerSchemaOpt = 1,
) -> None:
    """Send traffic through the main frontend (or, with --ox, OX logins through the OX main
    frontend), recording every failure (Ctrl-C to stop)."""
    import subprocess

    cfg = _lab_cfg(root)
    if not ox:
        cmd = [
            sys.executable,
            "-m",
            "lab.probe",
            "--url",
            cfg.main_url,
            "--rate",
            str(rate),
            "--out",
            str(cfg.probe_log),
            "--summary",
            str(cfg.probe_summary),
        ]
    else:
        cmd = _ox_probe_command(cfg, rate, per_schema)
    if duration:
        cmd += ["--duration", str(duration)]
    raise typer.Exit(subprocess.call(cmd))


def _ox_probe_command(cfg: LabConfig, rate: float, per_schema: int) -> list[str]:
    """`python -m lab.ox.probe` on contexts of every schema, read from the lab's OX config DB
    now (so the probe follows the schemata as they are), with its files next to the lab's."""
    from lab.ox.probe import lab_targets, write_targets

    if not cfg.ox_nodes:
        err.print(f"[bold red]the lab in {cfg.root} has no OX part[/]: start it with `zerodown lab up --ox`")
        raise typer.Exit(2)
    try:
        targets = lab_targets(cfg, per_schema)
    except Exception as e:  # the DB down, or not an OX config DB: say so, not a traceback
        err.print(
            f"[bold red]cannot read the OX contexts from the lab's config DB:[/] {escape(str(e))}\n"
            "is the lab up (`zerodown lab status`)?"
        )
        raise typer.Exit(2) from None
    root = cfg.abs_root
    path = write_targets(root / "ox-probe.targets.json", targets)
    out, summary = root / "ox-probe.jsonl", root / "ox-probe-summary.json"
    console.print(
        f"OX probe: {len(targets)} contexts of {len({t.schema for t in targets})} schemata via "
        f"{cfg.ox_main_url}; events {out}, summary {summary}"
    )
    return [
        sys.executable,
        "-m",
        "lab.ox.probe",
        "--url",
        cfg.ox_main_url,
        "--rate",
        str(rate),
        "--targets",
        str(path),
        "--out",
        str(out),
        "--summary",
        str(summary),
    ]


lab_inject_app = typer.Typer(
    help="Inject faults into the lab (undone by `zerodown lab reset`).", no_args_is_help=True
)
lab_app.add_typer(lab_inject_app, name="inject")


@lab_inject_app.command("migration-fail")
def lab_inject_migration_fail(
    database: Annotated[str, typer.Option("--database", help="the database the migration must fail in")],
    off: Annotated[bool, typer.Option("--off", help="remove the fault instead")] = False,
    root: LabRoot = Path(".lab"),
) -> None:
    """Make the lab's migration 2 (002_up.sql) fail in DATABASE (or work again with --off)."""
    from lab import mariadb

    changed = mariadb.inject_migration_failure(_lab_cfg(root), database, on=not off)
    state = "off" if off else "on"
    console.print(f"migration-fail on {database}: {state}" + ("" if changed else " (already)"))


@app.command()
def demo(root: LabRoot = Path(".lab"), nodes: int = 3, rate: float = 100.0) -> None:
    """Lab + worker + probe, then rolling-deploy v1 -> v2, then a report."""
    from starter.demo import run_demo

    raise typer.Exit(asyncio.run(run_demo(_lab_cfg(root, nodes), rate, console)))


def main() -> None:
    try:
        app()
        code = 0
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    # The Temporal SDK's core runtime threads can abort the interpreter's finalization
    # (SIGABRT after a command that succeeded): flush, then leave without finalizing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
