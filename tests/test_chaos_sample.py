"""Chaos at sampled steps of ss-rolling (bench/chaos.py on the session lab): the worker
SIGKILLed at 5 activity boundaries spread over the run (start of steps and the middle of
long ones), a new worker started each time; the run completes, leaves the site exactly as a
run without a crash did (versions, balancer, database checksums and audit events, every
app-folder file) and does no side effect twice (service stops and starts, deploys, backups,
audit events). The bench (`python -m bench.chaos`) runs every boundary."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from bench.chaos import chaos
from lab.config import LabConfig
from starter.signing import KEY_ENV
from tests.e2e_support import start_worker_process, stop_process
from tests.temporal_env import temporal_address


@dataclass
class ProcessWorkers:
    address: str
    task_queue: str
    log: Path
    proc: subprocess.Popen[bytes] | None = field(default=None)

    def start(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = start_worker_process(self.address, self.task_queue, self.log)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


async def test_ss_rolling_survives_the_worker_killed_at_sampled_boundaries(
    fresh_lab: LabConfig,
    client: Client,
    temporal_env: WorkflowEnvironment,
    task_queue: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The bench approves as alice, with her lab key (as bench_lab sets it up).
    monkeypatch.setenv(KEY_ENV, str(fresh_lab.approver_key("alice")))
    workers = ProcessWorkers(temporal_address(temporal_env), task_queue, tmp_path / "workers.log")
    try:
        verdict = await chaos(
            fresh_lab,
            client,
            workers,
            fresh_lab.site_yaml,
            "ss-rolling",
            sample=5,
            per_run=5,
            timeout_s=300.0,
        )
    finally:
        stop_process(workers.proc)
    print(verdict.line())  # shown with -s
    assert verdict.boundaries == 5 and verdict.survived == 5, "\n".join(verdict.notes)
    assert verdict.duplicated_effects == 0, "\n".join(verdict.notes)
