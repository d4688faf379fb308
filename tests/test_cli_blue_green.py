"""minor-blue-green (seed 003) from the `zerodown` CLI: its options mapped onto the workflow
input (`zerodown input`), bad ones refused with exit 2 before Temporal is contacted, its
outcome summary with the new servers' inventory entries, and (on the session lab, against
the real dev server and a worker) `zerodown plan`, `status` and `watch` of a run.
"""

# ruff: noqa: F811  (the fixtures imported from tests.test_cli are named as test parameters)
from __future__ import annotations

import asyncio
import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from temporalio.testing import WorkflowEnvironment
from typer.testing import CliRunner

import starter.cli as cli
from inventory.load import parse_node_entry
from inventory.model import Node, SecretRef, ServiceControl, SshTarget
from lab import provision as lab_provision
from lab.config import LabConfig
from starter import client as zc
from tests.cli_support import no_temporal, wide_consoles  # noqa: F401  (fixtures: no Temporal, wide consoles)
from tests.e2e_support import assert_untouched, closed_port, snapshot, zerodown
from tests.temporal_env import TEMPORAL_BIN, temporal_address
from workflows.major_maintenance_window import MajorMaintenanceResult
from workflows.minor_blue_green import MinorBlueGreenResult

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "site.example.yaml"
runner = CliRunner()


@pytest.fixture
def site(tmp_path: Path) -> tuple[Path, Path]:
    """The example site with what a minor upgrade needs (provisioning by the site's own
    commands, a health-check file), and a package file: (inventory, package)."""
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["provisioning"] = {
        "kind": "command",
        "create": "./cloud clone {template} {name}",
        "start": "./cloud start {name}",
        "destroy": "./cloud terminate {name}",
    }
    raw["application"]["health_file"] = "app/health_check.html"
    raw["approvers"]["terminate"] = ["alice", "bob"]
    inventory = tmp_path / "site.yaml"
    inventory.write_text(yaml.safe_dump(raw))
    package = tmp_path / "app-2.zip"
    package.write_bytes(b"PK")  # only its existence is checked locally; the preflight reads it
    return inventory, package


def zd(*args: str) -> tuple[int, str, str]:
    """Run `zerodown ARGS` in-process: (exit code, stdout, stderr)."""
    res = runner.invoke(cli.app, list(args))
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.stdout, res.stderr


# ============================================================================ zerodown input


def test_input_maps_the_options(site: tuple[Path, Path], no_temporal: list[Any]) -> None:
    inventory, package = site
    code, out, err = zd(
        "input",
        "minor-blue-green",
        "-i",
        str(inventory),
        "-p",
        str(package),
        "--lb",
        "edge",
        "--template",
        "web-b",
        "--new-names",
        "web-a2, web-b2,web-c2",
        "--setting",
        "settings.ini:custom.banner=Hello = world",
        "--setting",
        "settings.ini:db.url=mysql://db:3306/app",
        "--setting",
        "web.config:http.port=8080",
        "--system-command",
        "apt-get -y upgrade",
        "--system-command",
        "echo done",
        "--drain-deadline",
        "90",
        "--gate-timeout",
        "600",
        "--on-failure",
        "ask",
        "--failure-gate-timeout",
        "120",
    )
    assert code == 0, err
    arg = json.loads(out)
    assert arg["package_path"] == str(package.resolve())
    assert arg["lb"] == "edge" and arg["template"] == "web-b"
    assert arg["new_names"] == ["web-a2", "web-b2", "web-c2"]
    # The first ":" ends the file, the first "=" the key: the values keep theirs.
    assert arg["settings"] == {
        "settings.ini": {"custom.banner": "Hello = world", "db.url": "mysql://db:3306/app"},
        "web.config": {"http.port": "8080"},
    }
    assert arg["system_commands"] == ["apt-get -y upgrade", "echo done"]
    assert arg["drain_deadline_s"] == 90.0 and arg["gate_timeout_s"] == 600.0
    assert arg["on_failure"] == "ask" and arg["failure_gate_timeout_s"] == 120.0
    assert arg["dry_run"] is False
    inv = arg["inventory"]
    assert inv["provisioning"]["create"] == "./cloud clone {template} {name}"
    assert inv["application"]["health_file"] == "app/health_check.html"
    # Secrets stay references.
    assert inv["databases"][0]["password"] == {"env": "SS_DB_PASSWORD", "file": None}
    assert no_temporal == []

    # Nothing given: the input's own defaults.
    code, out, err = zd("input", "minor-blue-green", "-i", str(inventory), "-p", str(package), "--dry-run")
    assert code == 0, err
    arg = json.loads(out)
    assert (arg["lb"], arg["template"], arg["new_names"], arg["settings"], arg["system_commands"]) == (
        "",
        "",
        [],
        {},
        [],
    )
    assert arg["drain_deadline_s"] == 300.0 and arg["on_failure"] == "rollback" and arg["dry_run"] is True


@pytest.mark.parametrize(
    ("setting", "problem"),
    [
        ("web.config", "expected FILE:KEY=VALUE, e.g. web.config:custom.banner=Hello"),
        ("web.config:custom.banner", "expected FILE:KEY=VALUE"),
        (":custom.banner=x", "expected FILE:KEY=VALUE"),
        ("web.config:=x", "expected FILE:KEY=VALUE"),
        ("/etc/app.conf:key=x", "FILE must be a path relative to the application folder"),
        ("../app.conf:key=x", "FILE must be a path relative to the application folder"),
    ],
)
@pytest.mark.parametrize("command", ["input", "plan", "start"])
def test_a_bad_setting_is_refused(
    site: tuple[Path, Path], no_temporal: list[Any], command: str, setting: str, problem: str
) -> None:
    inventory, package = site
    code, out, err = zd(
        command,
        "minor-blue-green",
        "-i",
        str(inventory),
        "-p",
        str(package),
        "--setting",
        "web.config:ok=1",
        "--setting",
        setting,
        *(("--address", f"127.0.0.1:{closed_port()}") if command != "input" else ()),
    )
    assert code == 2, (out, err)
    assert f"bad --setting {setting!r}: {problem}" in err
    assert out == "" and no_temporal == []


def test_a_setting_given_twice_is_refused(site: tuple[Path, Path], no_temporal: list[Any]) -> None:
    inventory, package = site
    code, _, err = zd(
        "input",
        "minor-blue-green",
        "-i",
        str(inventory),
        "-p",
        str(package),
        "--setting",
        "web.config:a=1",
        "--setting",
        "web.config:a=2",
    )
    assert code == 2 and "bad --setting 'web.config:a=2': web.config:a is given twice" in err


def test_a_secret_setting_enters_the_input_as_its_reference(
    site: tuple[Path, Path], no_temporal: list[Any]
) -> None:
    inventory, package = site
    code, out, err = zd(
        "input",
        "minor-blue-green",
        "-i",
        str(inventory),
        "-p",
        str(package),
        "--secret-setting",
        "settings.ini:smtp.password=env:SMTP_PASSWORD",
        "--secret-setting",
        "settings.ini:api.key=file:/etc/zerodown/api.key",
    )
    assert code == 0, err
    secret = json.loads(out)["secret_settings"]["settings.ini"]
    assert secret["smtp.password"]["env"] == "SMTP_PASSWORD"
    assert secret["api.key"]["file"] == "/etc/zerodown/api.key"


@pytest.mark.parametrize("command", ["input", "plan", "start"])
def test_a_secret_given_as_a_value_is_refused_without_repeating_it(
    site: tuple[Path, Path], no_temporal: list[Any], command: str
) -> None:
    """Issue 17.5: a key the inventory marks secret only from a reference, and a
    --secret-setting that holds a value instead of a reference: exit 2, value not shown."""
    inventory, package = site
    raw = yaml.safe_load(inventory.read_text())
    raw["application"]["secret_keys"] = ["settings.ini:db.password"]
    inventory.write_text(yaml.safe_dump(raw))
    address = ("--address", f"127.0.0.1:{closed_port()}") if command != "input" else ()
    base = (command, "minor-blue-green", "-i", str(inventory), "-p", str(package), *address)
    code, out, err = zd(*base, "--setting", "settings.ini:db.password=hunter2-in-the-clear")
    assert code == 2 and out == "" and no_temporal == []
    assert "settings.ini:db.password is a secret" in err and "--secret-setting" in err
    assert "hunter2" not in err
    code, out, err = zd(*base, "--secret-setting", "settings.ini:smtp.password=hunter2-in-the-clear")
    assert code == 2 and "bad --secret-setting settings.ini:smtp.password" in err and "hunter2" not in err


@pytest.mark.parametrize("command", ["input", "plan", "start"])
def test_unknown_template_and_balancer_are_refused(
    site: tuple[Path, Path], no_temporal: list[Any], command: str
) -> None:
    inventory, package = site
    nowhere = ("--address", f"127.0.0.1:{closed_port()}") if command != "input" else ()
    args = (command, "minor-blue-green", "-i", str(inventory), "-p", str(package), *nowhere)
    code, out, err = zd(*args, "--template", "web-x")
    assert code == 2, (out, err)
    assert "unknown node(s) web-x in site acme-prod (known: web-a, web-b, web-c), given as --template" in err
    code, out, err = zd(*args, "--lb", "haproxy9")
    assert code == 2, (out, err)
    assert "unknown load balancer haproxy9 in site acme-prod (known: f5, edge), given as --lb" in err
    code, _, err = zd(*args, "--drain-deadline", "0")
    assert code == 2 and "--drain-deadline" in err
    assert no_temporal == []


@pytest.mark.parametrize(
    ("procedure", "options", "message"),
    [
        (
            "minor-blue-green",
            ("--server-name", "oxserver-xyz"),
            "minor-blue-green does not take --server-name",
        ),
        (
            "minor-blue-green",
            ("--schemata", "a,b", "--force"),
            "minor-blue-green does not take --force, --schemata",
        ),
        ("minor-blue-green", ("--nodes", "web-a"), "minor-blue-green does not take --nodes"),
        ("minor-blue-green", ("--continue-gate",), "minor-blue-green does not take --continue-gate"),
        (
            "rolling-deploy",
            ("--lb", "edge", "--setting", "web.config:a=1"),
            "rolling-deploy does not take --lb, --setting",
        ),
        (
            "ss-rolling",
            ("--system-command", "true", "--drain-deadline", "5", "--new-names", "x"),
            "ss-rolling does not take --drain-deadline, --new-names, --system-command",
        ),
    ],
)
def test_options_another_procedure_takes_are_refused(
    site: tuple[Path, Path], no_temporal: list[Any], procedure: str, options: tuple[str, ...], message: str
) -> None:
    inventory, package = site
    code, out, err = zd(
        "start",
        procedure,
        "-i",
        str(inventory),
        "-p",
        str(package),
        *options,
        "--address",
        f"127.0.0.1:{closed_port()}",
    )
    assert code == 2 and message in err, (out, err)
    assert "started" not in out and no_temporal == []


def test_the_package_is_required(site: tuple[Path, Path], no_temporal: list[Any]) -> None:
    inventory, _ = site
    code, _, err = zd(
        "plan", "minor-blue-green", "-i", str(inventory), "--address", f"127.0.0.1:{closed_port()}"
    )
    assert code == 2 and "minor-blue-green needs --package (the release package, a zip)" in err
    assert no_temporal == []


# ============================================================================ the outcome


def new_server(name: str, ssh_port: int, app_port: int) -> Node:
    return Node(
        name=name,
        ssh=SshTarget(
            host="10.0.2.7",
            port=ssh_port,
            user="deploy",
            key=SecretRef(file="/srv/zerodown/keys/id_ed25519"),
            password=SecretRef(env="NEW_SERVER_SSH_PASSWORD"),
            known_hosts="/srv/zerodown/keys/known_hosts",
        ),
        app_dir="/opt/app",
        service=ServiceControl(kind="systemd", unit="app.service"),
        url=f"http://10.0.2.7:{app_port}",
        group="B",
    )


def test_the_outcome_summary_lists_the_new_servers_and_their_inventory_entries(
    capsys: pytest.CaptureFixture[str],
) -> None:
    new = (new_server("web-a-v2-0-0", 2201, 8081), new_server("web-b-v2-0-0", 2202, 8082))
    res = MinorBlueGreenResult(
        site="acme-prod",
        version="2.0.0",
        old_servers=("web-a", "web-b"),
        new_servers=new,
        terminated=("web-a",),
        dry_run=False,
        plan=(),
        steps=(),
        plan_hash="h",
        db_snapshot="/var/backups/zerodown/run-1-db.sql",
        settings_copy=("/var/backups/zerodown/run-1-0-inputs.csv",),
        drain_s=12.34,
        forced_detach=True,
    )
    assert cli._print_outcome(zc.Outcome(ok=True, result=res, error=None)) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert (
        "minor-blue-green on acme-prod: web-a, web-b replaced by web-a-v2-0-0, web-b-v2-0-0 at 2.0.0" in lines
    )
    assert "new servers: web-a-v2-0-0 (http://10.0.2.7:8081), web-b-v2-0-0 (http://10.0.2.7:8082)" in lines
    assert "old servers terminated: web-a" in lines
    assert (
        "old servers kept (detached from the load balancer, still running; terminate them by hand "
        "when done): web-b"
    ) in lines
    assert "settings copy: /var/backups/zerodown/run-1-0-inputs.csv" in lines
    assert "database snapshot: /var/backups/zerodown/run-1-db.sql" in lines
    assert "drain: 12.3s, detach forced at gate drain-deadline (open sessions were closed)" in lines
    assert lines[-1] == "done: web-a-v2-0-0, web-b-v2-0-0 now at 2.0.0"
    # The entries, as YAML an inventory takes: read back, they are the new servers; secrets
    # are the references (a file, a variable name), never a value.
    hint = next(i for i, line in enumerate(lines) if line.startswith("update the site's inventory: "))
    assert lines[hint].endswith("in place of web-a, web-b (and remove the terminated ones)")
    entries = yaml.safe_load("\n".join(lines[hint + 1 : -1]))["nodes"]
    assert tuple(parse_node_entry(e) for e in entries) == new
    assert entries[0]["ssh"]["key"] == {"file": "/srv/zerodown/keys/id_ed25519"}
    assert entries[0]["ssh"]["password"] == {"env": "NEW_SERVER_SSH_PASSWORD"}

    # Kept at the gate, nothing forced, no settings, no database.
    res = MinorBlueGreenResult(
        site="acme-prod",
        version="2.0.0",
        old_servers=("web-a",),
        new_servers=new[:1],
        terminated=(),
        dry_run=False,
        plan=(),
        steps=(),
    )
    assert cli._print_outcome(zc.Outcome(ok=True, result=res, error=None)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (
        "old servers kept (detached from the load balancer, still running; terminate them by hand "
        "when done): web-a"
    ) in lines
    assert not any(line.startswith("old servers terminated") for line in lines)
    assert "settings copy: none (no --setting)" in lines
    assert "database snapshot: none (no database)" in lines
    assert "drain: 0.0s, detach not forced (no session was cut)" in lines


# ============================================================================ on the lab


async def test_plan_status_watch_and_the_plain_temporal_cli(
    fresh_lab: LabConfig, temporal_env: WorkflowEnvironment, lab_worker: str, tmp_path: Path
) -> None:
    lab = fresh_lab
    before = await snapshot(lab)
    temporal = ("--address", temporal_address(temporal_env), "--task-queue", lab_worker)
    options = (
        "-i",
        str(lab.site_yaml),
        "-p",
        str(lab.package(2)),
        "--template",
        "node2",
        "--setting",
        "web.config:db.pool_size=8",
        "--system-command",
        "true",
        "--drain-deadline",
        "42",
    )
    code, out = await zerodown("plan", "minor-blue-green", *options, *temporal)
    assert code == 0, out
    assert "plan (dry run, nothing was changed)" in out and "plan hash: " in out
    olds = ", ".join(lab.node_name(i) for i in lab.node_indexes)
    assert f"{lab.nodes} new server(s) beside {olds} on main" in out
    assert "3 clone node1-v2-0-0 from node2 (command provisioning)" in out
    assert "4 true" in out and "5 save the template's web.config: db.pool_size" in out
    assert "13 wait for zero sessions (deadline 42s, then gate drain-deadline)" in out
    assert "18 gate terminate, then terminate the old servers" in out
    m = re.search(r"started minor-blue-green as workflow (\S+)", out)
    assert m, out
    wf_id = m.group(1)
    plan_hash = re.search(r"plan hash: ([0-9a-f]{64})", out)
    assert plan_hash, out

    # status and watch: the generic progress of the run (here a finished dry run).
    code, out = await zerodown("status", wf_id, "--address", temporal_address(temporal_env))
    assert code == 0, out
    assert re.search(r"procedure\s*│\s*minor-blue-green", out), out
    assert re.search(r"status\s*│\s*COMPLETED", out), out
    assert "P1 inspect package" in out and "P2 nodes reachable, running, healthy, upgradable" in out
    code, out = await zerodown("watch", wf_id, "--address", temporal_address(temporal_env))
    assert code == 0, out
    assert "plan (dry run, nothing was changed)" in out
    assert "3 clone node1-v2-0-0 from node2 (command provisioning)" in out

    # The same plan with the plain temporal CLI, its input from `zerodown input` in a file.
    code, text, err = zd("input", "minor-blue-green", *options, "--dry-run")
    assert code == 0, err
    (tmp_path / "in.json").write_text(text)
    proc = await asyncio.create_subprocess_exec(
        str(TEMPORAL_BIN),
        "workflow",
        "execute",
        "--type",
        "minor-blue-green",
        "--task-queue",
        lab_worker,
        "--workflow-id",
        f"cli-mbg-{uuid.uuid4().hex[:12]}",
        "--address",
        temporal_address(temporal_env),
        "--input-file",
        str(tmp_path / "in.json"),
        "-o",
        "json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, (stdout.decode(), stderr.decode())
    result = json.loads(stdout)["result"]
    assert result["dry_run"] is True and result["plan_hash"] == plan_hash.group(1)
    assert result["old_servers"] == [lab.node_name(i) for i in lab.node_indexes]

    await assert_untouched(lab, before)
    assert lab_provision.provisioned(lab) == {}


def test_the_maintenance_window_summary_gives_the_downtime_and_the_entries(
    capsys: pytest.CaptureFixture[str],
) -> None:
    new = (new_server("web-a-v2-0-0", 2201, 8081),)
    res = MajorMaintenanceResult(
        site="acme-prod",
        version="2.0.0",
        old_servers=("web-a",),
        new_servers=new,
        terminated=("web-a",),
        dry_run=False,
        plan=(),
        steps=(),
        snapshots=("/b/run-db-20.sql", "/b/run-db-32.sql"),
        migration_s=1.25,
        downtime_s=9.5,
    )
    assert cli._print_outcome(zc.Outcome(ok=True, result=res, error=None)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "major-maintenance-window on acme-prod: web-a replaced by web-a-v2-0-0 at 2.0.0" in lines
    assert "downtime (steps 17-33): 9.50s, of which the migrations (step 23) 1.25s" in lines
    assert "database snapshots: /b/run-db-20.sql, /b/run-db-32.sql" in lines
    assert "terminated: web-a and the warm replica released" in lines
    hint = next(i for i, line in enumerate(lines) if line.startswith("update the site's inventory: "))
    entries = yaml.safe_load("\n".join(lines[hint + 1 : -1]))["nodes"]
    assert tuple(parse_node_entry(e) for e in entries) == new
