"""The worker's OpenTelemetry wiring: a run produces spans for its workflow and activities."""

from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from temporalio.testing import WorkflowEnvironment

from tests.fake_site import FakeSite, site
from tests.temporal_env import temporal_address
from worker.main import build_worker, connect
from workflows.rolling_deploy import RollingDeployInput, RollingDeployWorkflow


async def test_a_run_emits_workflow_and_activity_spans(
    temporal_env: WorkflowEnvironment, task_queue: str
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    client = await connect(temporal_address(temporal_env), tracer=provider.get_tracer("test"))
    fake = FakeSite(["n1", "n2"])
    async with build_worker(client, task_queue, activities=fake.activities()):
        await client.execute_workflow(
            RollingDeployWorkflow.run,
            RollingDeployInput(inventory=site(2), package_path="/p.zip", dry_run=True),
            id=f"traced-{task_queue}",
            task_queue=task_queue,
        )
    names = {s.name for s in exporter.get_finished_spans()}
    assert "StartWorkflow:rolling-deploy" in names
    assert "RunActivity:inspect_package" in names and "RunActivity:ssh_probe" in names
