"""rolling-deploy's logic on the real Temporal dev server, with same-name stand-in activities.

The stand-ins model a small site in memory (versions, services, LB states, schema) and
log every call, so the tests can assert order, what was (not) touched and the end state.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError

from inventory.model import Rollout
from tests.fake_site import FakeSite, site
from tests.temporal_env import running_worker
from workflows.rolling_deploy import RollingDeployInput, RollingDeployWorkflow


async def run(client: Client, task_queue: str, fake: FakeSite, inp: RollingDeployInput) -> Any:
    async with running_worker(client, task_queue, [RollingDeployWorkflow], fake.activities()):
        return await client.execute_workflow(
            RollingDeployWorkflow.run,
            inp,
            id=f"wf-{task_queue}",
            task_queue=task_queue,
            execution_timeout=timedelta(seconds=60),
        )


def node_calls(fake: FakeSite, node: str) -> list[str]:
    return [name for name, n in fake.mutations() if n == node]


async def test_happy_path_upgrades_one_node_at_a_time(client: Client, task_queue: str) -> None:
    fake = FakeSite(["n1", "n2", "n3"])
    res = await run(client, task_queue, fake, RollingDeployInput(inventory=site(), package_path="/p.zip"))
    assert fake.version == {"n1": "2.0.0", "n2": "2.0.0", "n3": "2.0.0"}
    assert fake.lb == {"n1": "ready", "n2": "ready", "n3": "ready"} and fake.schema == 2
    assert node_calls(fake, "n2") == [
        "lb_set_state",
        "lb_set_state",
        "stop_service",
        "backup_app_folder",
        "deploy_package",
        "start_service",
        "lb_set_state",
    ]
    # The migration comes first, and node k+1 is drained only after node k is UP again.
    order = [
        (name, n) for name, n in fake.calls if name in ("db_apply_migration", "lb_set_state", "lb_wait_up")
    ]
    assert order[0] == ("db_apply_migration", None)
    assert order[1:] == [
        (name, n)
        for n in ("n1", "n2", "n3")
        for name in ("lb_set_state", "lb_set_state", "lb_set_state", "lb_wait_up")
    ]
    assert res.previous_versions == {"n1": "1.0.0", "n2": "1.0.0", "n3": "1.0.0"}
    assert "n1: web.config: kept http.port" in res.merge_report
    assert [s.seed_step for s in res.steps if s.node == "n3"] == [
        "N1",
        "N2",
        "N2",
        "N3",
        "N4",
        "N5",
        "N6",
        "N7",
        "N8",
        "N9",
    ]
    assert all(s.result == "ok" and s.ended is not None for s in res.steps)


async def test_health_failure_on_node2_rolls_everything_back(client: Client, task_queue: str) -> None:
    fake = FakeSite(["n1", "n2", "n3"], fail_health_on=("n2", "2.0.0"))
    with pytest.raises(WorkflowFailureError) as info:
        await run(client, task_queue, fake, RollingDeployInput(inventory=site(), package_path="/p.zip"))
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "ProcedureFailed"
    assert "failed at 'N7 wait healthy, check version' on n2" in str(cause)
    assert "/health answered 500" in str(cause)
    # Everything is back as before: old version everywhere, all in the pool, schema reverted.
    assert fake.version == {"n1": "1.0.0", "n2": "1.0.0", "n3": "1.0.0"}
    assert fake.running == {"n1": True, "n2": True, "n3": True}
    assert fake.lb == {"n1": "ready", "n2": "ready", "n3": "ready"} and fake.schema == 1
    assert node_calls(fake, "n3") == []
    # n2 is restored first (newest compensation), then n1 (drained before it is stopped).
    restores = [n for name, n in fake.calls if name == "restore_app_folder"]
    assert restores == ["n2", "n1"]
    n1 = node_calls(fake, "n1")
    assert n1[n1.index("restore_app_folder") - 2 :] == [
        "lb_set_state",
        "stop_service",
        "restore_app_folder",
        "start_service",
        "lb_set_state",
    ]


async def test_version_not_newer_fails_preflight_and_touches_nothing(client: Client, task_queue: str) -> None:
    fake = FakeSite(["n1", "n2", "n3"])
    fake.version["n3"] = "2.0.0"
    with pytest.raises(WorkflowFailureError) as info:
        await run(client, task_queue, fake, RollingDeployInput(inventory=site(), package_path="/p.zip"))
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "PreflightFailed"
    assert "n3: VersionNotNewer: n3 runs 2.0.0; package 2.0.0 is not newer" in str(cause)
    assert "VersionNotNewer" in cause.details
    assert fake.mutations() == []


async def test_unknown_node_is_refused_before_anything(client: Client, task_queue: str) -> None:
    fake = FakeSite(["n1", "n2", "n3"])
    with pytest.raises(WorkflowFailureError) as info:
        await run(
            client,
            task_queue,
            fake,
            RollingDeployInput(inventory=site(), package_path="/p.zip", only_nodes=("n9",)),
        )
    assert isinstance(info.value.cause, ApplicationError)
    assert info.value.cause.type == "UnknownNode" and "'n9'" in str(info.value.cause)
    assert fake.calls == []


async def test_dry_run_plans_and_changes_nothing(client: Client, task_queue: str) -> None:
    fake = FakeSite(["n1", "n2", "n3"])
    res = await run(
        client,
        task_queue,
        fake,
        RollingDeployInput(inventory=site(), package_path="/p.zip", only_nodes=("n2",), dry_run=True),
    )
    assert res.dry_run and fake.mutations() == []
    assert any(line.startswith("D2 apply migration 2") for line in res.plan)
    assert [line.split(":")[0] for line in res.plan if line.startswith("batch")] == ["batch 1"]
    assert "n2" in res.plan[-1] and "n1" not in res.plan[-1]


async def test_cancel_during_drain_runs_compensations(client: Client, task_queue: str) -> None:
    fake = FakeSite(["n1", "n2"], hold_drain=asyncio.Event())
    async with running_worker(client, task_queue, [RollingDeployWorkflow], fake.activities()):
        handle = await client.start_workflow(
            RollingDeployWorkflow.run,
            RollingDeployInput(inventory=site(2), package_path="/p.zip"),
            id=f"wf-{task_queue}",
            task_queue=task_queue,
        )
        await asyncio.wait_for(fake.draining.wait(), 20)
        progress = await handle.query(RollingDeployWorkflow.progress)
        assert progress.phase.startswith("batch 1/2") and progress.node == "n1"
        await handle.cancel()
        fake.hold_drain.set()  # type: ignore[union-attr]
        with pytest.raises(WorkflowFailureError):
            await handle.result()
    assert fake.lb == {"n1": "ready", "n2": "ready"} and fake.schema == 1
    assert "stop_service" not in node_calls(fake, "n1")


async def test_migrations_without_a_database_are_refused(client: Client, task_queue: str) -> None:
    fake = FakeSite(["n1", "n2"])
    with pytest.raises(WorkflowFailureError) as info:
        await run(
            client,
            task_queue,
            fake,
            RollingDeployInput(inventory=site(2, with_database=False), package_path="/p.zip"),
        )
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "PreflightFailed"
    assert "carries migrations but the inventory declares no database" in str(cause)
    assert fake.mutations() == []


async def test_a_batch_that_would_empty_the_pool_is_refused(client: Client, task_queue: str) -> None:
    fake = FakeSite(["n1", "n2"])
    inv = dataclasses.replace(site(2), rollout=Rollout(batch_size=2))
    with pytest.raises(WorkflowFailureError) as info:
        await run(client, task_queue, fake, RollingDeployInput(inventory=inv, package_path="/p.zip"))
    assert "load balancer main: batch 1 (n1, n2) would leave no member serving" in str(info.value.cause)
    assert fake.mutations() == []


async def test_schema_is_kept_when_a_node_cannot_be_rolled_back(client: Client, task_queue: str) -> None:
    # n1 is upgraded, n2 fails, and n1's restore fails: n1 may still run v2, so the
    # migration v2 needs must stay.
    fake = FakeSite(["n1", "n2", "n3"], fail_health_on=("n2", "2.0.0"), fail_restore_on="n1")
    with pytest.raises(WorkflowFailureError) as info:
        await run(client, task_queue, fake, RollingDeployInput(inventory=site(), package_path="/p.zip"))
    message = str(info.value.cause)
    assert "node n1 (FAILED: RestoreVerificationFailed: n1: restore verification failed)" in message
    assert fake.schema == 2 and fake.version["n2"] == "1.0.0"
    assert [n for name, n in fake.calls if name == "db_apply_migration"] == [None]  # the up only


async def test_cancel_during_a_deploy_lets_it_finish_before_restoring(
    client: Client, task_queue: str
) -> None:
    fake = FakeSite(["n1", "n2"], hold_deploy=asyncio.Event())
    async with running_worker(client, task_queue, [RollingDeployWorkflow], fake.activities()):
        handle = await client.start_workflow(
            RollingDeployWorkflow.run,
            RollingDeployInput(inventory=site(2), package_path="/p.zip"),
            id=f"wf-{task_queue}",
            task_queue=task_queue,
        )
        await asyncio.wait_for(fake.deploying.wait(), 20)
        await handle.cancel()
        await asyncio.sleep(1.0)  # the workflow must not restore while the copy is under way
        assert not [c for c in fake.calls if c[0] == "restore_app_folder"]
        fake.hold_deploy.set()  # type: ignore[union-attr]
        with pytest.raises(WorkflowFailureError):
            await handle.result()
    names = [name for name, n in fake.calls if n == "n1"]
    assert names.index("deploy_package finished") < names.index("restore_app_folder")
    assert fake.version == {"n1": "1.0.0", "n2": "1.0.0"} and fake.lb == {"n1": "ready", "n2": "ready"}
    assert fake.schema == 1


async def test_a_balancer_reload_between_drain_and_stop_is_noticed_and_the_drain_set_again(
    client: Client, task_queue: str
) -> None:
    """Issue 17.3: HAProxy reloaded right after node n2 drained puts every member back to
    ready. Before the next step (the stop) the run looks, sees a new process and sets its
    states again: n2 is stopped drained (the fake's stop_service refuses otherwise)."""
    fake = FakeSite(["n1", "n2", "n3"], reload_after=("lb_wait_drained", "n2"))
    res = await run(client, task_queue, fake, RollingDeployInput(inventory=site(), package_path="/p.zip"))
    assert fake.version == {"n1": "2.0.0", "n2": "2.0.0", "n3": "2.0.0"}
    reloaded = [s for s in res.steps if s.name == "balancer main reloaded"]
    assert len(reloaded) == 1 and reloaded[0].detail is not None
    assert "pid 100 -> 101" in reloaded[0].detail and "n2 drain" in reloaded[0].detail
    assert "n1 ready" in reloaded[0].detail  # n1, upgraded and back, stays in rotation
    guard = fake.calls.index(("lb_guard", None))
    assert fake.calls[guard - 1] == ("lb_wait_drained", "n2")  # looked at before the next change
    assert guard < fake.calls.index(("stop_service", "n2"))
