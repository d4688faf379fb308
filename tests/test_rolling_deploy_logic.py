"""rolling-deploy's logic on the real Temporal dev server, with same-name stand-in activities.

The stand-ins model a small site in memory (versions, services, LB states, schema) and
log every call, so the tests can assert order, what was (not) touched and the end state.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from temporalio import activity
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError

import activities.deploy as deploy
import activities.haproxy as haproxy
import activities.http_checks as http_checks
import activities.mysql as mysql
import activities.node as node
import activities.ssh as ssh
from tests.temporal_env import running_worker
from workflows.inventory import Inventory, Rollout, parse_inventory
from workflows.rolling_deploy import RollingDeployInput, RollingDeployWorkflow

MUTATING = {"lb_set_state", "stop_service", "start_service", "deploy_package", "restore_app_folder",
            "db_apply_migration", "backup_app_folder", "db_backup"}


def site(n: int = 3, with_database: bool = True) -> Inventory:
    raw: dict[str, Any] = {
        "site": "fake",
        "nodes": [{"name": f"n{i}", "ssh": {"host": "127.0.0.1", "port": 2200 + i,
                                            "key": {"env": "FAKE_KEY"}},
                   "app_dir": "app", "url": f"http://127.0.0.1:{9000 + i}",
                   "service": {"kind": "command", "stop": "./ctl stop", "start": "./ctl start",
                               "status": "./ctl status"}} for i in range(1, n + 1)],
        "load_balancers": [{"name": "main", "kind": "haproxy", "runtime_api": "tcp:127.0.0.1:1",
                            "backend": "app", "members": {f"n{i}": f"s{i}" for i in range(1, n + 1)}}],
        "databases": [{"name": "db", "kind": "mysql", "host": "127.0.0.1", "database": "app",
                       "user": "u", "password": {"env": "FAKE_DB"}}],
        "application": {"name": "app", "protected_files": ["encryption.config"],
                        "merge_files": ["web.config"]},
    }
    if not with_database:
        del raw["databases"]
    return parse_inventory(raw)


def _node(arg: dict[str, Any]) -> str:
    n: Any = arg["node"] if "node" in arg else arg["node_name"]
    return n if isinstance(n, str) else str(n["name"])


@dataclass
class FakeSite:
    """The world the stand-in activities act on."""

    nodes: list[str]
    version: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    running: dict[str, bool] = field(default_factory=dict)
    lb: dict[str, str] = field(default_factory=dict)
    schema: int = 1
    calls: list[tuple[str, str | None]] = field(default_factory=list)
    fail_health_on: tuple[str, str] | None = None  # (node, version)
    hold_drain: asyncio.Event | None = None
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    hold_deploy: asyncio.Event | None = None
    deploying: asyncio.Event = field(default_factory=asyncio.Event)
    fail_restore_on: str | None = None

    def __post_init__(self) -> None:
        for n in self.nodes:
            self.version[n] = self.files[n] = "1.0.0"
            self.running[n] = True
            self.lb[n] = "ready"

    def mutations(self) -> list[tuple[str, str | None]]:
        return [c for c in self.calls if c[0] in MUTATING]

    def activities(self) -> list[Callable[..., Any]]:
        s = self

        def member(n: str) -> haproxy.MemberState:
            return haproxy.MemberState(lb_name="main", node_name=n, backend="app", server=f"s{n[1:]}",
                                       status="UP" if s.running[n] else "DOWN", scur=0,
                                       admin=s.lb[n], weight=1, check_status="L7OK")

        def log(name: str, arg: dict[str, Any] | None) -> None:
            has_node = arg is not None and ("node" in arg or "node_name" in arg)
            s.calls.append((name, _node(arg) if arg is not None and has_node else None))

        @activity.defn(name="inspect_package")
        async def inspect_package(arg: dict[str, Any]) -> deploy.PackageInfo:
            log("inspect_package", None)
            return deploy.PackageInfo(
                path=arg["path"], sha256="ab" * 32, name="app", version="2.0.0",
                min_upgrade_from="1.0.0", schema_version=2, files=3,
                migrations=(deploy.MigrationSpec(version=2, up_sql="ALTER ...", down_sql="ALTER back"),))

        @activity.defn(name="ssh_probe")
        async def ssh_probe(arg: dict[str, Any]) -> ssh.SshProbeResult:
            log("ssh_probe", None)
            return ssh.SshProbeResult(host=arg["target"]["host"], port=arg["target"]["port"], ok=True)

        @activity.defn(name="service_status")
        async def service_status(arg: dict[str, Any]) -> node.ServiceState:
            log("service_status", arg)
            return node.ServiceState(node_name=_node(arg), running=s.running[_node(arg)], detail="")

        @activity.defn(name="lb_check_member")
        async def lb_check_member(arg: dict[str, Any]) -> haproxy.MemberState:
            log("lb_check_member", arg)
            return member(_node(arg))

        @activity.defn(name="check_health")
        async def check_health(arg: dict[str, Any]) -> http_checks.HttpCheckResult:
            log("check_health", None)
            return http_checks.HttpCheckResult(url=arg["base_url"], status=200, body_snippet="ok",
                                               elapsed_ms=1)

        @activity.defn(name="get_version")
        async def get_version(arg: dict[str, Any]) -> str:
            port = int(arg["base_url"].rsplit(":", 1)[1])
            node = f"n{port - 9000}"
            log("get_version", {"node": node})
            if arg.get("expect") and arg["expect"] != s.version[node]:
                raise ApplicationError(f"{node} runs {s.version[node]}, expected {arg['expect']}",
                                       type="VersionMismatch", non_retryable=True)
            return s.version[node]

        @activity.defn(name="lb_member_state")
        async def lb_member_state(arg: dict[str, Any]) -> haproxy.MemberState:
            log("lb_member_state", arg)
            return member(_node(arg))

        @activity.defn(name="db_schema_version")
        async def db_schema_version(arg: dict[str, Any]) -> int:
            log("db_schema_version", None)
            return s.schema

        @activity.defn(name="db_backup")
        async def db_backup(arg: dict[str, Any]) -> mysql.DbBackup:
            log("db_backup", None)
            return mysql.DbBackup(db=site().databases[0], backup_id=arg["backup_id"], path="/b/db.sql",
                                  sha256="cd" * 32, size=10, table_checksums={})

        @activity.defn(name="db_apply_migration")
        async def db_apply_migration(arg: dict[str, Any]) -> mysql.MigrationResult:
            log("db_apply_migration", None)
            before = s.schema
            s.schema = arg["version"] if arg["direction"] == "up" else arg["version"] - 1
            return mysql.MigrationResult(version=arg["version"], direction=arg["direction"], applied=True,
                                         statements=1, schema_version_before=before,
                                         schema_version_after=s.schema)

        @activity.defn(name="lb_set_state")
        async def lb_set_state(arg: dict[str, Any]) -> haproxy.MemberState:
            log("lb_set_state", arg)
            s.lb[_node(arg)] = arg["state"]
            if arg["state"] == "drain":
                s.draining.set()
            return member(_node(arg))

        @activity.defn(name="lb_wait_drained")
        async def lb_wait_drained(arg: dict[str, Any]) -> int:
            log("lb_wait_drained", arg)
            if s.hold_drain is not None:
                await s.hold_drain.wait()
            return 0

        @activity.defn(name="lb_wait_up")
        async def lb_wait_up(arg: dict[str, Any]) -> haproxy.MemberState:
            log("lb_wait_up", arg)
            assert s.running[_node(arg)], "waiting UP on a stopped node"
            return member(_node(arg))

        @activity.defn(name="stop_service")
        async def stop_service(arg: dict[str, Any]) -> node.ServiceState:
            log("stop_service", arg)
            assert s.lb[_node(arg)] in ("drain", "maint"), "stopped a node that was not drained"
            s.running[_node(arg)] = False
            return node.ServiceState(node_name=_node(arg), running=False, detail="")

        @activity.defn(name="start_service")
        async def start_service(arg: dict[str, Any]) -> node.ServiceState:
            log("start_service", arg)
            s.running[_node(arg)] = True
            s.version[_node(arg)] = s.files[_node(arg)]
            return node.ServiceState(node_name=_node(arg), running=True, detail="")

        @activity.defn(name="backup_app_folder")
        async def backup_app_folder(arg: dict[str, Any]) -> deploy.AppBackup:
            log("backup_app_folder", arg)
            assert not s.running[_node(arg)]
            return deploy.AppBackup(
                node=site().node(_node(arg)), node_name=_node(arg), backup_id=arg["backup_id"],
                path=f".zerodown/backups/{arg['backup_id']}.tar", files=3,
                manifest={"app.py": s.files[_node(arg)]}, protected={})

        @activity.defn(name="deploy_package")
        async def deploy_package(arg: dict[str, Any]) -> deploy.DeployResult:
            log("deploy_package", arg)
            if s.hold_deploy is not None:
                s.deploying.set()
                await s.hold_deploy.wait()
            s.files[_node(arg)] = arg["package"]["version"]
            s.calls.append(("deploy_package finished", _node(arg)))
            return deploy.DeployResult(
                node_name=_node(arg), version=arg["package"]["version"], files_written=3,
                merged=(deploy.MergeReport(file="web.config", carried=("http.port",),
                                           diff=(f"+http.port = {_node(arg)}",),
                                           had_recorded_defaults=True),))

        @activity.defn(name="restore_app_folder")
        async def restore_app_folder(arg: dict[str, Any]) -> deploy.AppRestoreResult:
            log("restore_app_folder", arg)
            if s.fail_restore_on == _node(arg):
                raise ApplicationError(f"{_node(arg)}: restore verification failed",
                                       type="RestoreVerificationFailed", non_retryable=True)
            s.files[_node(arg)] = arg["manifest"]["app.py"]
            return deploy.AppRestoreResult(node_name=_node(arg), backup_id=arg["backup_id"], files=3,
                                           rewritten=1, removed=())

        @activity.defn(name="wait_healthy")
        async def wait_healthy(arg: dict[str, Any]) -> http_checks.WaitHealthyResult:
            port = int(arg["base_url"].rsplit(":", 1)[1])
            node = f"n{port - 9000}"
            log("wait_healthy", {"node": node})
            if s.fail_health_on == (node, s.version[node]):
                raise ApplicationError(f"{node} /health answered 500", type="HealthCheckFailed",
                                       non_retryable=True)
            return http_checks.WaitHealthyResult(url=arg["base_url"], waited_s=0.1, attempts=2,
                                                 last=http_checks.HttpCheckResult(
                                                     url=arg["base_url"], status=200, body_snippet="ok",
                                                     elapsed_ms=1))

        @activity.defn(name="inspect_node_storage")
        async def inspect_node_storage(arg: dict[str, Any]) -> node.NodeStorage:
            log("inspect_node_storage", arg)
            return node.NodeStorage(app_bytes=1000, free_bytes=10**9, need_bytes=5000, missing_protected=(),
                                    ok=True, detail="room for the backup", node_name=_node(arg))

        @activity.defn(name="check_backup_space")
        async def check_backup_space(arg: dict[str, Any]) -> mysql.BackupSpace:
            log("check_backup_space", None)
            return mysql.BackupSpace(db_bytes=1000, free_bytes=10**9, need_bytes=2000, ok=True, detail="room")

        @activity.defn(name="check_login")
        async def check_login(arg: dict[str, Any]) -> http_checks.LoginResult:
            log("check_login", None)
            return http_checks.LoginResult(url=arg["base_url"], status=200, elapsed_ms=1)

        return [lb_member_state, inspect_package, ssh_probe, service_status, lb_check_member, check_health,
                get_version, db_schema_version, db_backup, db_apply_migration, lb_set_state,
                lb_wait_drained, lb_wait_up, stop_service, start_service, backup_app_folder,
                deploy_package, restore_app_folder, wait_healthy, check_login, inspect_node_storage,
                check_backup_space]


async def run(client: Client, task_queue: str, fake: FakeSite, inp: RollingDeployInput) -> Any:
    async with running_worker(client, task_queue, [RollingDeployWorkflow], fake.activities()):
        return await client.execute_workflow(RollingDeployWorkflow.run, inp, id=f"wf-{task_queue}",
                                             task_queue=task_queue,
                                             execution_timeout=timedelta(seconds=60))


def node_calls(fake: FakeSite, node: str) -> list[str]:
    return [name for name, n in fake.mutations() if n == node]


async def test_happy_path_upgrades_one_node_at_a_time(client: Client, task_queue: str) -> None:
    fake = FakeSite(["n1", "n2", "n3"])
    res = await run(client, task_queue, fake, RollingDeployInput(inventory=site(), package_path="/p.zip"))
    assert fake.version == {"n1": "2.0.0", "n2": "2.0.0", "n3": "2.0.0"}
    assert fake.lb == {"n1": "ready", "n2": "ready", "n3": "ready"} and fake.schema == 2
    assert node_calls(fake, "n2") == ["lb_set_state", "lb_set_state", "stop_service", "backup_app_folder",
                                      "deploy_package", "start_service", "lb_set_state"]
    # The migration comes first, and node k+1 is drained only after node k is UP again.
    order = [(name, n) for name, n in fake.calls if name in ("db_apply_migration", "lb_set_state",
                                                             "lb_wait_up")]
    assert order[0] == ("db_apply_migration", None)
    assert order[1:] == [(name, n) for n in ("n1", "n2", "n3") for name in
                         ("lb_set_state", "lb_set_state", "lb_set_state", "lb_wait_up")]
    assert res.previous_versions == {"n1": "1.0.0", "n2": "1.0.0", "n3": "1.0.0"}
    assert "n1: web.config: kept http.port" in res.merge_report
    assert [s.seed_step for s in res.steps if s.node == "n3"] == \
        ["N1", "N2", "N2", "N3", "N4", "N5", "N6", "N7", "N8", "N9"]
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
    assert n1[n1.index("restore_app_folder") - 2:] == [
        "lb_set_state", "stop_service", "restore_app_folder", "start_service", "lb_set_state"]


async def test_version_not_newer_fails_preflight_and_touches_nothing(client: Client,
                                                                      task_queue: str) -> None:
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
        await run(client, task_queue, fake, RollingDeployInput(
            inventory=site(), package_path="/p.zip", only_nodes=("n9",)))
    assert isinstance(info.value.cause, ApplicationError)
    assert info.value.cause.type == "UnknownNode" and "'n9'" in str(info.value.cause)
    assert fake.calls == []


async def test_dry_run_plans_and_changes_nothing(client: Client, task_queue: str) -> None:
    fake = FakeSite(["n1", "n2", "n3"])
    res = await run(client, task_queue, fake, RollingDeployInput(
        inventory=site(), package_path="/p.zip", only_nodes=("n2",), dry_run=True))
    assert res.dry_run and fake.mutations() == []
    assert any(line.startswith("D2 apply migration 2") for line in res.plan)
    assert [line.split(":")[0] for line in res.plan if line.startswith("batch")] == ["batch 1"]
    assert "n2" in res.plan[-1] and "n1" not in res.plan[-1]


async def test_cancel_during_drain_runs_compensations(client: Client, task_queue: str) -> None:
    fake = FakeSite(["n1", "n2"], hold_drain=asyncio.Event())
    async with running_worker(client, task_queue, [RollingDeployWorkflow], fake.activities()):
        handle = await client.start_workflow(
            RollingDeployWorkflow.run, RollingDeployInput(inventory=site(2), package_path="/p.zip"),
            id=f"wf-{task_queue}", task_queue=task_queue)
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
        await run(client, task_queue, fake, RollingDeployInput(
            inventory=site(2, with_database=False), package_path="/p.zip"))
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


async def test_cancel_during_a_deploy_lets_it_finish_before_restoring(client: Client,
                                                                      task_queue: str) -> None:
    fake = FakeSite(["n1", "n2"], hold_deploy=asyncio.Event())
    async with running_worker(client, task_queue, [RollingDeployWorkflow], fake.activities()):
        handle = await client.start_workflow(
            RollingDeployWorkflow.run, RollingDeployInput(inventory=site(2), package_path="/p.zip"),
            id=f"wf-{task_queue}", task_queue=task_queue)
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
