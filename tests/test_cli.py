"""The `zerodown` CLI: bad input stops it with exit 2 and a clear message before Temporal is
contacted; `zerodown input` prints a workflow input, with secret references only, that the
plain `temporal` CLI accepts (run for real against the session dev server and lab worker).
"""

# ruff: noqa: F811  (the fixtures imported from tests.cli_support are named as test parameters)
from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from temporalio.testing import WorkflowEnvironment
from typer.testing import CliRunner

import starter.cli as cli
from activities import ssh
from lab.config import LabConfig
from tests.cli_support import no_temporal, wide_consoles  # noqa: F401  (fixtures: no Temporal, wide consoles)
from tests.e2e_support import assert_untouched, closed_port, ensure_v1, secret_values, snapshot
from tests.temporal_env import TEMPORAL_BIN, temporal_address

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "site.example.yaml"
runner = CliRunner()

KNOWN = (
    "unknown procedure 'rolling-upgrade' (known: major-maintenance-window, minor-blue-green, "
    "ox-node-upgrade, ox-upgradeschemata, rolling-deploy, "
    "ss-load-balanced, ss-rolling)"
)


def zd(*args: str) -> tuple[int, str, str]:
    """Run `zerodown ARGS` in-process: (exit code, stdout, stderr)."""
    res = runner.invoke(cli.app, list(args))
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.stdout, res.stderr


# ============================================================================ validate


def test_validate_accepts_the_example() -> None:
    code, out, err = zd("validate", str(EXAMPLE))
    assert code == 0, err
    assert "ok" in out and "site acme-prod, 3 node(s), 2 load balancer(s), 1 database(s)" in out


def test_validate_reports_the_problem_with_its_path(tmp_path: Path) -> None:
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["nodes"][2]["ssh"]["port"] = "22a"
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump(raw))
    code, out, err = zd("validate", str(site))
    assert code == 2 and out == ""
    assert f"invalid inventory {site}:" in err
    assert 'nodes[2].ssh.port: expected an integer 1-65535, got "22a"' in err.splitlines()[1]


# ============================================================================ start: refused locally


def test_start_unknown_node(lab: LabConfig, no_temporal: list[Any]) -> None:
    code, out, err = zd(
        "start",
        "rolling-deploy",
        "--inventory",
        str(lab.site_yaml),
        "--package",
        str(lab.package(2)),
        "--nodes",
        "node9",
        "--address",
        f"127.0.0.1:{closed_port()}",
    )
    assert code == 2, (out, err)
    known = ", ".join(lab.node_name(i) for i in lab.node_indexes)
    assert f"unknown node(s) node9 in site lab (known: {known})" in err
    assert no_temporal == [] and "started" not in out


def test_start_missing_package(lab: LabConfig, no_temporal: list[Any], tmp_path: Path) -> None:
    missing = tmp_path / "app-9.zip"
    code, _, err = zd(
        "start",
        "rolling-deploy",
        "-i",
        str(lab.site_yaml),
        "-p",
        str(missing),
        "--address",
        f"127.0.0.1:{closed_port()}",
    )
    assert code == 2 and f"package not found: {missing}" in err
    assert no_temporal == []


def test_start_unknown_procedure(lab: LabConfig, no_temporal: list[Any]) -> None:
    code, _, err = zd(
        "start",
        "rolling-upgrade",
        "-i",
        str(lab.site_yaml),
        "-p",
        str(lab.package(2)),
        "--address",
        f"127.0.0.1:{closed_port()}",
    )
    assert code == 2 and KNOWN in err
    assert no_temporal == []


@pytest.mark.parametrize("command", ["plan", "input"])
def test_plan_and_input_unknown_procedure(lab: LabConfig, no_temporal: list[Any], command: str) -> None:
    code, _, err = zd(command, "rolling-upgrade", "-i", str(lab.site_yaml), "-p", str(lab.package(2)))
    assert code == 2 and KNOWN in err


# ============================================================================ input -> temporal CLI


@pytest.fixture(scope="module")
async def v1_lab(lab: LabConfig) -> AsyncIterator[LabConfig]:
    await ensure_v1(lab)
    yield lab
    await ssh.POOL.close_all()


async def test_input_dry_run_runs_with_the_plain_temporal_cli(
    v1_lab: LabConfig, temporal_env: WorkflowEnvironment, lab_worker: str
) -> None:
    lab = v1_lab
    code, text, err = zd(
        "input", "rolling-deploy", "-i", str(lab.site_yaml), "-p", str(lab.package(2)), "--dry-run"
    )
    assert code == 0, err
    arg = json.loads(text)
    assert arg["dry_run"] is True and arg["package_path"] == str(lab.package(2))
    # Secrets are references only, never values.
    inv = arg["inventory"]
    assert inv["databases"][0]["password"] == {"env": None, "file": str(lab.db_password_file)}
    assert {n["ssh"]["key"]["file"] for n in inv["nodes"]} == {str(lab.client_key)}
    for secret in secret_values(lab):
        assert secret not in text

    before = await snapshot(lab)
    wf_id = f"cli-dry-run-{uuid.uuid4().hex[:12]}"
    proc = await asyncio.create_subprocess_exec(
        str(TEMPORAL_BIN),
        "workflow",
        "execute",
        "--type",
        "rolling-deploy",
        "--task-queue",
        lab_worker,
        "--workflow-id",
        wf_id,
        "--address",
        temporal_address(temporal_env),
        "--input",
        text,
        "-o",
        "json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, errb = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, (out.decode(), errb.decode())
    answer = json.loads(out)
    result = answer["result"]
    assert result["dry_run"] is True and result["version"] == "2.0.0"
    assert result["nodes"] == [lab.node_name(i) for i in lab.node_indexes]
    assert result["previous_versions"] == {f"node{i}": "1.0.0" for i in lab.node_indexes}
    plan = result["plan"]
    assert plan[0].startswith("deploy labapp 2.0.0 (") and plan[0].endswith(") to site lab")
    assert any(line.startswith("D2 apply migration 2") for line in plan)
    assert [line.split(":")[0] for line in plan if line.startswith("batch ")] == [
        f"batch {b}" for b in lab.node_indexes
    ]
    await assert_untouched(lab, before)
