"""Helpers for end-to-end tests on the lab: the probe as a real client process, file
manifests, SSH command counts, versions as served."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pymysql
from temporalio.client import Client, WorkflowHandle

from activities.haproxy import parse_servers_state
from lab import haproxy as lab_haproxy
from lab import mariadb as lab_mariadb
from lab import nodes as lab_nodes
from lab.config import BACKEND, LabConfig
from lab.probe import start_probe_process, stop_probe_process


@dataclass
class ProbeRun:
    summary_file: Path
    failures_file: Path
    summary: dict[str, Any] = field(default_factory=dict)

    def failures(self) -> list[dict[str, Any]]:
        if not self.failures_file.exists():
            return []
        return [json.loads(line) for line in self.failures_file.read_text().splitlines() if line.strip()]


@contextmanager
def probe(
    lab: LabConfig, out_dir: Path, rate: float = 100.0, slow_every: int = 50, slow_ms: int = 1500
) -> Iterator[ProbeRun]:
    """The traffic probe in its own process for the duration of the block."""
    run = ProbeRun(summary_file=out_dir / "probe-summary.json", failures_file=out_dir / "probe.jsonl")
    proc = start_probe_process(
        lab.main_url, rate, run.failures_file, run.summary_file, slow_every=slow_every, slow_ms=slow_ms
    )
    time.sleep(0.5)  # let it warm up so the procedure starts under load
    try:
        yield run
    finally:
        run.summary = stop_probe_process(proc, run.summary_file)


def manifest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below `folder`."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def app_manifests(lab: LabConfig) -> dict[str, dict[str, str]]:
    return {lab.node_name(i): manifest(lab.node_dir(i) / "app") for i in lab.node_indexes}


def ssh_commands(lab: LabConfig, i: int) -> list[str]:
    log = lab.node_dir(i) / "ssh.log"
    if not log.exists():
        return []
    return [json.loads(line)["command"] for line in log.read_text().splitlines() if line.strip()]


async def served_versions(lab: LabConfig) -> dict[str, str]:
    out: dict[str, str] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        for i in lab.node_indexes:
            async with s.get(f"http://127.0.0.1:{lab.app_port(i)}/version") as r:
                out[lab.node_name(i)] = (await r.json())["version"]
    return out


# ---------------------------------------------------------------- the lab's state, before and after


@dataclass(frozen=True)
class World:
    """What a run could have changed on the lab."""

    # "backend/server" -> "<show stat status> admin=<ready|drain|maint>"
    servers: dict[str, str]
    # node name -> number of lines in its ssh.log
    ssh_log_lines: dict[str, int]
    # node name -> {relative path -> sha256} of app/ and .zerodown/
    files: dict[str, dict[str, str]]
    schema_version: int


def _tree_hashes(node_dir: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for top in ("app", ".zerodown"):
        root = node_dir / top
        if not root.exists():
            continue
        for p in sorted(root.rglob("*")):
            rel = str(p.relative_to(node_dir))
            if p.is_symlink():
                out[rel] = "symlink:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                out[rel] = "dir"
    return out


def _ssh_log(lab: LabConfig, i: int) -> list[str]:
    log = lab.node_dir(i) / "ssh.log"
    return log.read_text(encoding="utf-8").splitlines() if log.exists() else []


def _snapshot_sync(lab: LabConfig) -> World:
    stats = lab_haproxy.server_states(lab)
    admin: dict[str, str] = {}
    for backend in sorted({b for b, _ in stats}):
        text = lab_haproxy.runtime_command(lab, f"show servers state {backend}")
        admin.update({f"{s.be_name}/{s.srv_name}": s.admin for s in parse_servers_state(text)})
    return World(
        servers={f"{b}/{s}": f"{st} admin={admin.get(f'{b}/{s}', '?')}" for (b, s), st in stats.items()},
        ssh_log_lines={lab.node_name(i): len(_ssh_log(lab, i)) for i in lab.node_indexes},
        files={lab.node_name(i): _tree_hashes(lab.node_dir(i)) for i in lab.node_indexes},
        schema_version=lab_mariadb.schema_version(lab),
    )


async def snapshot(lab: LabConfig) -> World:
    return await asyncio.to_thread(_snapshot_sync, lab)


async def assert_untouched(lab: LabConfig, before: World) -> None:
    """Nothing a deploy changes has changed since `before`; every app server ready and UP."""
    after = await snapshot(lab)
    assert after.servers == before.servers
    for i in lab.node_indexes:
        assert after.servers[f"{BACKEND}/{lab.node_name(i)}"] == "UP admin=ready"
    for i in lab.node_indexes:
        new = _ssh_log(lab, i)[before.ssh_log_lines[lab.node_name(i)] :]
        commands = [json.loads(line)["command"] for line in new]
        assert not [c for c in commands if re.search(r"ctl (stop|start)", c)], commands
    assert after.files == before.files
    assert after.schema_version == before.schema_version


def secret_values(lab: LabConfig) -> list[str]:
    """Every secret of the lab (DB, admin, admin interface token and SSH private key), as
    text that must never leak."""
    values = [lab.db_password_file.read_text().strip(), lab.admin_password_file.read_text().strip()]
    if lab.admin_token_file.exists():
        values.append(lab.admin_token_file.read_text().strip())
    key_lines = lab.client_key.read_text().strip().splitlines()
    values += [ln for ln in key_lines if ln and not ln.startswith("-----")]
    assert all(len(v) >= 8 for v in values)
    return values


async def history_text(client: Client, workflow_id: str) -> str:
    """The workflow's whole history as text, with every payload's data decoded."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    raw = history.to_json()
    decoded = [
        base64.b64decode(m).decode("utf-8", "replace")
        for m in re.findall(r'"data":\s*"([A-Za-z0-9+/=]*)"', raw)
    ]
    return "\n".join([raw, *decoded])


def staging_problems(lab: LabConfig) -> list[str]:
    """How the staging folder differs from just after `lab up` (app stopped, folder empty)."""
    from lab import nodes as lab_nodes

    d = lab.staging_dir
    if not d.is_dir():
        return ["no staging folder"]
    kept = ("ctl", "run", "app", "inject", "ssh.log", lab_nodes.HEALTH_FILE)
    out = [f"staging holds {p.name}" for p in sorted(d.iterdir()) if p.name not in kept]
    out += [f"staging app/{p.name}" for p in sorted((d / "app").glob("*"))]
    out += [f"staging inject/{p.name}" for p in sorted((d / "inject").glob("*"))]
    if lab_nodes.staging_running(lab):
        out.append("staging app running")
    return out


async def ensure_site_defaults(lab: LabConfig) -> list[str]:
    """Put the Secret Server side back to its defaults if a test left it otherwise (settings,
    audit rows, staging / scratch databases, faults, the staging folder) without the full
    reset; returns what was done."""
    from lab import nodes as lab_nodes

    done: list[str] = []
    if await asyncio.to_thread(lab_mariadb.site_state_problems, lab):
        done += await asyncio.to_thread(lab_mariadb.reset_site_state, lab)
        # Nodes cache the settings for up to half a second.
        await asyncio.sleep(0.6)
    if await asyncio.to_thread(staging_problems, lab):
        await asyncio.to_thread(lab_nodes.wipe_staging, lab)
        done.append("staging emptied")
    return done


async def ensure_v1(lab: LabConfig) -> None:
    """Reset the lab unless it already is as just after `lab up`: v1 on every node, schema 1,
    every app server ready and UP (none attached at run time, no maintenance page nor preview
    key, every health-check file present), the warm MariaDB server empty, no fault injected, upgrade
    settings at their defaults, no audit rows, staging stopped and empty, no staging / scratch database."""

    async def version(i: int) -> str:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s,
            s.get(f"http://127.0.0.1:{lab.app_port(i)}/version") as r,
        ):
            return str((await r.json())["version"]) if r.status == 200 else f"status {r.status}"

    try:
        world = await snapshot(lab)
        versions = await asyncio.gather(*(version(i) for i in lab.node_indexes))
        fresh = (
            world.schema_version == 1
            and set(versions) == {"1.0.0"}
            and all(
                world.servers.get(f"{BACKEND}/{lab.node_name(i)}") == "UP admin=ready"
                for i in lab.node_indexes
            )
            and not any(any((lab.node_dir(i) / "inject").glob("*")) for i in lab.node_indexes)
            # No server attached at run time, no maintenance page (nor preview key left
            # by an interrupted step 30), every health file there.
            and not lab_haproxy.runtime_servers(lab)
            and not lab_haproxy.maintenance_on(lab)
            and not lab_haproxy.preview_keys(lab)
            and all((lab.node_dir(i) / "health_check.html").is_file() for i in lab.node_indexes)
            # Installed for this profile (the secret-server profile's nodes have XML configs).
            and all(lab_nodes.installed_profile(lab, i) == lab.profile for i in lab.node_indexes)
            # The warm server empty, no node pointed at it (seed 004's revert).
            and not lab_mariadb.warm_problems(lab)
            and not lab_mariadb.nodes_on_warm(lab)
        )
    except (OSError, aiohttp.ClientError, ValueError, KeyError, lab_haproxy.HAProxyError, pymysql.MySQLError):
        fresh = False
    if not fresh:
        from lab.manager import lab_reset

        await lab_reset(lab)
    else:
        await ensure_site_defaults(lab)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def run_command(*args: str, timeout_s: float = 120) -> tuple[int, str]:
    """A command in a subprocess without blocking the loop (an in-process worker may have to
    answer it); stdout and stderr together, wide enough that rich does not wrap lines."""
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    return proc.returncode or 0, out.decode()


async def zerodown(*args: str) -> tuple[int, str]:
    """The `zerodown` CLI as a user runs it."""
    return await run_command(sys.executable, "-m", "starter", *args)


def start_worker_process(address: str, task_queue: str, log: Path) -> subprocess.Popen[bytes]:
    """A worker as its own process (`python -m worker`), so a test can SIGKILL it."""
    return subprocess.Popen(
        [sys.executable, "-m", "worker", "--address", address, "--task-queue", task_queue],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@contextmanager
def worker_processes(address: str, task_queue: str, log: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Worker processes for a kill test: one started now; the test appends the ones it
    starts after a kill; every one still running is stopped at the end."""
    workers = [start_worker_process(address, task_queue, log)]
    try:
        yield workers
    finally:
        for proc in workers:
            stop_process(proc)


def stop_process(proc: subprocess.Popen[bytes] | None, timeout_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after `timeout_s`; nothing when it is gone already."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def kill_worker_during(
    handle: WorkflowHandle[Any, Any],
    worker: subprocess.Popen[bytes],
    step_prefix: str,
    timeout_s: float = 120,
) -> str:
    """SIGKILL `worker` as soon as the run's latest running step starts with `step_prefix`;
    returns "<step> on <node>"."""
    from workflows.timeline import Progress

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    seen: list[str] = []
    while loop.time() < deadline:
        try:
            progress = await handle.query("progress", result_type=Progress)
        except Exception:  # the worker may not have answered yet
            await asyncio.sleep(0.05)
            continue
        running = [s for s in progress.steps if s.result == "running"]
        seen = [f"{s.name}/{s.node}" for s in running]
        if running and running[-1].name.startswith(step_prefix):
            worker.send_signal(signal.SIGKILL)
            worker.wait()
            return f"{running[-1].name} on {running[-1].node}"
        await asyncio.sleep(0.05)
    raise AssertionError(f"never saw a step {step_prefix!r}… running (last running: {seen})")


HISTORIES_DIR = Path(__file__).parent / "histories"
RECORD_ENV = "ZERODOWN_RECORD_HISTORIES"


async def keep_history(handle: WorkflowHandle[Any, Any]) -> Path | None:
    """With ZERODOWN_RECORD_HISTORIES=1, store this run's history as
    tests/histories/<workflow id>.json for test_replay (which replays it under that id: child
    workflow ids derive from it) - never over an existing file (the directory is append-only: a
    history re-recorded after a change hides the very failure it is there to catch)."""
    if os.environ.get(RECORD_ENV) != "1":
        return None
    path = HISTORIES_DIR / f"{handle.id}.json"
    if path.exists():
        return None
    history = await handle.fetch_history()
    path.write_text(history.to_json(), encoding="utf-8")
    return path


def assert_no_write_lost(lab: LabConfig, run: ProbeRun, role: str = "primary") -> int:
    """Every write the site acknowledged during the probe (201, its row id) is in `items`
    on the database the site uses now (`role`), and the table holds no other row of this
    probe: the rows of its window equal its acknowledged writes. Returns their number."""
    from lab import mariadb as lab_mariadb

    acked = set(run.summary["acked_ids"])
    assert acked, "the probe acknowledged no write: nothing was proven"
    rows = lab_mariadb.query(
        lab,
        role,  # type: ignore[arg-type]
        "SELECT id FROM items WHERE body LIKE %s",
        (f"probe {run.summary['write_token']} %",),
        database=lab_mariadb.DB_NAME,
    )
    present = {int(r[0]) for r in rows}
    lost = sorted(acked - present)
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged writes lost: ids {lost[:20]}"
    assert present == acked, f"rows of the probe not acknowledged: {sorted(present - acked)[:20]}"
    return len(acked)
