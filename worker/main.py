"""The zerodown worker: one process that runs every workflow and activity on a task queue.

Run one per network zone (its task queue named after the zone) when nodes are only
reachable from inside that zone.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from opentelemetry.trace import Tracer
from temporalio.client import Client
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.worker import Worker

from worker.chaos import hold_from_env
from worker.heartbeat import HeartbeatInterceptor
from worker.redaction import RedactionInterceptor, install_log_redaction

# The defaults everywhere (CLI, demo, worker); the environment variables override them.
ADDRESS = "127.0.0.1:7233"
TASK_QUEUE = "zerodown"
DEFAULT_ADDRESS = os.environ.get("ZERODOWN_TEMPORAL_ADDRESS", ADDRESS)
DEFAULT_NAMESPACE = os.environ.get("ZERODOWN_NAMESPACE", "default")
DEFAULT_TASK_QUEUE = os.environ.get("ZERODOWN_TASK_QUEUE", TASK_QUEUE)

log = logging.getLogger("zerodown.worker")


def _setup_tracing() -> None:
    """OpenTelemetry: spans for every workflow/activity; printed when ZERODOWN_OTEL_CONSOLE=1."""
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": "zerodown-worker"}))
    if os.environ.get("ZERODOWN_OTEL_CONSOLE") == "1":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)


async def connect(
    address: str = DEFAULT_ADDRESS,
    namespace: str = DEFAULT_NAMESPACE,
    tracing: bool = True,
    tracer: Tracer | None = None,
) -> Client:
    """A client whose workflows and activities emit OpenTelemetry spans (when `tracing`)."""
    interceptors = [TracingInterceptor(tracer)] if tracing else []
    return await Client.connect(address, namespace=namespace, interceptors=interceptors)


def build_worker(
    client: Client,
    task_queue: str = DEFAULT_TASK_QUEUE,
    activities: Sequence[Callable[..., Any]] | None = None,
) -> Worker:
    from activities import ALL_ACTIVITIES
    from workflows.registry import ALL_WORKFLOWS

    install_log_redaction()

    return Worker(
        client,
        task_queue=task_queue,
        workflows=ALL_WORKFLOWS,
        activities=list(activities if activities is not None else ALL_ACTIVITIES),
        max_concurrent_activities=32,
        **{**RESUME_OPTIONS, "interceptors": [*RESUME_OPTIONS["interceptors"], *hold_from_env()]},
    )


# How soon work resumes after a worker is lost (workflows/timeouts.py): every activity
# heartbeats (the interceptor), each beat reaches the server within a second (no throttling
# to 80% of the heartbeat timeout), and a workflow task left on the lost worker's sticky
# queue moves to the shared queue after 1 s instead of 10.
RESUME_OPTIONS: dict[str, Any] = {
    # Redaction innermost: it sees the activity's own errors, results and heartbeats.
    "interceptors": [HeartbeatInterceptor(), RedactionInterceptor()],
    "max_heartbeat_throttle_interval": timedelta(seconds=1),
    "default_heartbeat_throttle_interval": timedelta(seconds=1),
    "sticky_queue_schedule_to_start_timeout": timedelta(seconds=1),
}


async def run_worker(
    address: str = DEFAULT_ADDRESS, namespace: str = DEFAULT_NAMESPACE, task_queue: str = DEFAULT_TASK_QUEUE
) -> None:
    _setup_tracing()
    client = await connect(address, namespace)
    worker = build_worker(client, task_queue)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("zerodown worker on %s (namespace %s), task queue %s", address, namespace, task_queue)
    async with worker:
        await stop.wait()
    log.info("worker stopped")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--address", default=DEFAULT_ADDRESS)
    parser.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    parser.add_argument("--task-queue", default=DEFAULT_TASK_QUEUE)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # What is loaded by now (modules, the activities, the workflow definitions) lives as long
    # as the process: frozen, the collector's full passes skip it, and such a pause - inside
    # every step in flight, e.g. a schema's disabled window - stays short.
    gc.freeze()
    asyncio.run(run_worker(args.address, args.namespace, args.task_queue))
