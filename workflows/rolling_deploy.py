"""`rolling-deploy`: deploy a release to every node, one batch at a time, with no failed request.

The runbook (each numbered step is a timeline entry):

  Preflight (read-only; any problem stops the run before anything is touched)
    P1 the package is a valid release; P2 every node answers over SSH, its service runs,
    it is healthy and runs an older version the package may upgrade from; P3 every load
    balancer knows the node as a member, and every batch leaves at least one other member
    UP in each pool; P4 the database answers.
  Database (only when the release carries migrations the database lacks)
    D1 logical backup of the database; D2 apply the expand migrations (old code survives
    them, which is what makes rolling possible).
  For each node (batches from the inventory, one node at a time by default)
    N1 drain it on every load balancer; N2 wait until it holds zero sessions, then hold it
    in maintenance (a sticky client cannot open a new session on a drained server);
    N3 stop the service; N4 back up the app folder; N5 deploy the package (protected files
    untouched, per-node config customisations merged); N6 start the service; N7 wait until
    healthy and check it reports the new version; N8 set it ready; N9 wait until UP.
  Optionally (`continue_gate`), after the first batch the run waits at the gate `continue`
  for an approver listed in the inventory to check the canary and approve the rest; a
  rejection (or no decision before the gate's timeout) rolls everything back.
  On failure or cancellation the saga runs the compensations in reverse: nodes are
  restored from their backups, checked back on their previous version and put back in the
  pool; then, only if every node is back, migrations are reverted with their `down`
  scripts; the workflow fails with the reason.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    # Full module imports (not `from activities import x`): the sandbox must see each module
    # in its sys.modules to resolve the dataclasses' type hints when decoding results.
    import activities.deploy as deploy
    import activities.haproxy as haproxy
    import activities.http_checks as http_checks
    import activities.mysql as mysql
    import activities.node as node
    import activities.ssh as ssh
    from workflows.inventory import Database, Inventory, LoadBalancer, Node, UnknownNodeError

from workflows.gates import GateSpec
from workflows.procedure import ACTION_RETRY, LONG, Procedure, check_on_failure, require_approval
from workflows.saga import reason
from workflows.timeline import StepRecord

PROCEDURE = "rolling-deploy"


@dataclass(frozen=True)
class RollingDeployInput:
    inventory: Inventory
    package_path: str
    # Deploy only these nodes (default: all, in inventory order / batches).
    only_nodes: tuple[str, ...] = ()
    # Check everything and return the plan; change nothing.
    dry_run: bool = False
    # Wait at the gate `continue` after the first batch (a canary check by a person).
    continue_gate: bool = False
    gate_timeout_s: float = 3600.0
    # Who started the run (the CLI fills it in): may not approve its own gates.
    started_by: str | None = None
    # A failed step: roll back at once, or ask at a gate `failure:<step>` (retry / rollback
    # / abort; rollback when nobody decides within failure_gate_timeout_s).
    on_failure: str = "rollback"
    failure_gate_timeout_s: float = 3600.0


@dataclass(frozen=True)
class RollingDeployResult:
    site: str
    version: str
    previous_versions: dict[str, str]
    nodes: tuple[str, ...]
    dry_run: bool
    plan: tuple[str, ...]
    steps: tuple[StepRecord, ...]
    plan_hash: str = ""
    merge_report: tuple[str, ...] = ()
    db_backup: str | None = None
    app_backups: dict[str, str] = field(default_factory=dict)


@dataclass
class _NodeProgress:
    """What has been attempted on a node, so its compensation undoes exactly that."""

    drain_attempted: bool = False
    stop_attempted: bool = False
    deploy_attempted: bool = False
    backup: deploy.AppBackup | None = None


@workflow.defn(name="rolling-deploy")
class RollingDeployWorkflow(Procedure):
    procedure = PROCEDURE

    def __init__(self) -> None:
        super().__init__()
        self.previous: dict[str, str] = {}

    @workflow.run
    async def run(self, inp: RollingDeployInput) -> RollingDeployResult:
        inv = inp.inventory
        check_on_failure(inp.on_failure)
        self.failure_gate_timeout_s = inp.failure_gate_timeout_s
        try:
            batches = inv.batches(inp.only_nodes)
        except UnknownNodeError as e:
            raise ApplicationError(str(e), type="UnknownNode", non_retryable=True) from None
        nodes = [n for b in batches for n in b]
        self.timeline.nodes_total = len(nodes)

        # ---- Preflight: read-only, every problem reported together --------------------
        self.timeline.set_phase("preflight")
        try:
            package = await self.timeline.step("P1 inspect package", self.read(
                deploy.inspect_package, deploy.PackageRequest(path=inp.package_path)), seed_step="P1")
        except ActivityError as e:
            raise _preflight_failed([f"package: {reason(e)}"], [e]) from None
        self.previous = await self._preflight(inv, nodes, package)
        await self._check_capacity(inv, batches)
        database = inv.databases[0] if inv.databases else None
        schema = None
        if database is None and package.migrations:
            raise _preflight_failed([f"package: {package.name} {package.version} carries migrations "
                                     "but the inventory declares no database"], [])
        if database is not None:
            try:
                schema = await self.timeline.step("P4 database reachable", self.read(
                    mysql.db_schema_version, mysql.DbRequest(db=database)), seed_step="P4")
            except ActivityError as e:
                raise _preflight_failed([f"database: {reason(e)}"], [e]) from None
        gate_after_first = inp.continue_gate and len(batches) > 1
        if gate_after_first and not inv.approvers.get("continue"):
            raise _preflight_failed(["gate continue: the inventory lists no approvers for it "
                                     "(approvers: {continue: [name, ...]})"], [])
        pending = [m for m in package.migrations if schema is not None and m.version > schema]
        plan = self._plan(inv, batches, package, pending, gate_after_first)
        self.plan_hash = hashlib.sha256("\n".join(plan).encode()).hexdigest()
        self.gates.configure(inv.approvers, inp.started_by, self.plan_hash)
        if inp.dry_run:
            self.timeline.set_phase("planned (dry run): nothing was changed")
            return self._result(inv, package, nodes, plan, True)

        # ---- The change itself, undone by the saga on failure or cancellation ----------
        merge_report: list[str] = []
        app_backups: dict[str, str] = {}

        async def changes() -> str | None:
            db_backup: str | None = None
            if pending and database is not None:
                db_backup = await self._migrate(database, pending)
            for index, batch in enumerate(batches, start=1):
                self.timeline.set_phase(f"batch {index}/{len(batches)}",
                                        ", ".join(n.name for n in batch))
                outcomes = await asyncio.gather(
                    *(self._upgrade_node(inv, n, package, merge_report, app_backups) for n in batch),
                    return_exceptions=True)
                failures = [o for o in outcomes if isinstance(o, BaseException)]
                if failures:
                    raise failures[0]
                if index == 1 and gate_after_first:
                    await self._continue_gate(inp, batches[1:])
            return db_backup

        self.guided = inp.on_failure == "ask"
        db_backup = await self.run_changes(changes, f"{PROCEDURE} of {package.version}")
        self.timeline.set_phase("done")
        return self._result(inv, package, nodes, plan, False, merge_report, db_backup, app_backups)

    async def _continue_gate(self, inp: RollingDeployInput, rest: list[list[Node]]) -> None:
        names = ", ".join(n.name for b in rest for n in b)
        await require_approval(self.gates, GateSpec(
            name="continue", guards=f"upgrade the remaining node(s): {names}",
            timeout_s=inp.gate_timeout_s, on_timeout="reject"))

    # ------------------------------------------------------------------ preflight
    async def _preflight(self, inv: Inventory, nodes: list[Node],
                         package: deploy.PackageInfo) -> dict[str, str]:
        async def check_node(n: Node) -> str:
            probe: ssh.SshProbeResult = await self.read(ssh.ssh_probe, ssh.SshProbeRequest(target=n.ssh))
            if not probe.ok:
                raise ApplicationError(probe.error or f"ssh {n.ssh.host}:{n.ssh.port}: unreachable",
                                       type=probe.error_type or "SshUnreachable", non_retryable=True)
            service: node.ServiceState = await self.read(node.service_status, node.ServiceRequest(node=n))
            if not service.running:
                raise ApplicationError(f"{n.name}: its service is not running ({service.detail}); "
                                       "start it (or fix it) before upgrading",
                                       type="ServiceNotRunning", non_retryable=True)
            for lb in self._lbs_of(inv, n):
                await self.read(haproxy.lb_check_member, haproxy.MemberRequest(lb=lb, node=n.name))
            await self.read(http_checks.check_health, http_checks.HttpCheckRequest(
                base_url=n.url, check=inv.application.health, timeout_s=10.0))
            running: str = await self.read(http_checks.get_version, http_checks.VersionRequest(
                base_url=n.url, check=inv.application.version))
            _check_upgrade_path(n.name, running, package)
            return running

        async def checks() -> dict[str, str]:
            results = await asyncio.gather(*(check_node(n) for n in nodes), return_exceptions=True)
            problems = [f"{n.name}: {reason(r)}" for n, r in zip(nodes, results, strict=True)
                        if isinstance(r, BaseException)]
            if problems:
                raise _preflight_failed(problems, [r for r in results if isinstance(r, BaseException)])
            return {n.name: str(r) for n, r in zip(nodes, results, strict=True)}

        return await self.timeline.step("P2 nodes reachable, running, healthy, upgradable",
                                        checks(), seed_step="P2")

    async def _check_capacity(self, inv: Inventory, batches: list[list[Node]]) -> None:
        """P3: no batch may empty a pool. Every other member's state is read, not assumed."""
        async def check() -> None:
            problems: list[str] = []
            for lb in inv.load_balancers:
                members = sorted(lb.members)
                states = await asyncio.gather(*(self.read(haproxy.lb_member_state, haproxy.MemberRequest(
                    lb=lb, node=m)) for m in members), return_exceptions=True)
                serving = {m for m, s in zip(members, states, strict=True)
                           if isinstance(s, haproxy.MemberState) and s.admin == "ready"
                           and s.status.startswith("UP")}
                for i, batch in enumerate(batches, start=1):
                    in_batch = {n.name for n in batch}
                    if in_batch & set(members) and not serving - in_batch:
                        problems.append(f"load balancer {lb.name}: batch {i} ({', '.join(sorted(in_batch))}) "
                                        f"would leave no member serving (serving now: "
                                        f"{', '.join(sorted(serving)) or 'none'})")
            if problems:
                raise _preflight_failed(problems, [])

        await self.timeline.step("P3 every pool keeps a serving member", check(), seed_step="P3")

    def _plan(self, inv: Inventory, batches: list[list[Node]], package: deploy.PackageInfo,
              pending: list[deploy.MigrationSpec], gate_after_first: bool) -> tuple[str, ...]:
        plan = [f"deploy {package.name} {package.version} ({package.sha256[:12]}) to site {inv.site}"]
        if pending:
            plan.append(f"D1 back up database {inv.databases[0].database}")
            plan += [f"D2 apply migration {m.version} (expand; down script "
                     f"{'present' if m.down_sql else 'absent'})" for m in pending]
        for i, batch in enumerate(batches, start=1):
            names = ", ".join(n.name for n in batch)
            lbs = sorted({lb.name for n in batch for lb in self._lbs_of(inv, n)})
            plan.append(f"batch {i}: {names}: drain on {', '.join(lbs) or 'no load balancer'}, "
                        "wait for zero sessions, stop, back up app folder, deploy (protected: "
                        f"{', '.join(inv.application.protected_files) or 'none'}), start, "
                        "check health and version, set ready, wait UP")
            if i == 1 and gate_after_first:
                plan.append(f"gate continue: wait for one of {', '.join(inv.approvers['continue'])} "
                            "to approve the remaining batches (else roll back)")
        return tuple(plan)

    # ------------------------------------------------------------------ database
    async def _migrate(self, db: Database, pending: list[deploy.MigrationSpec]) -> str:
        self.timeline.set_phase("database")
        backup: mysql.DbBackup = await self.step("D1 back up database", lambda: self.change(
            mysql.db_backup, mysql.BackupRequest(db=db, backup_id=f"{_run_key()}-db",
                                                 directory=db.backup_dir or ""), timeout=LONG),
            seed_step="D1")
        attempted: list[deploy.MigrationSpec] = []
        completed: set[int] = set()

        async def revert() -> None:
            # Old code must never run on a schema it does not know: revert only when every
            # node compensation succeeded (nodes are compensated before this, newest first).
            failed_nodes = [r.name for r in self.saga.records if not r.ok]
            for m in reversed(attempted):
                if failed_nodes:
                    self.timeline.record(f"keep migration {m.version}", "skipped", detail=(
                        f"not reverted: {', '.join(failed_nodes)} could not be rolled back and may "
                        f"run the new code; backup kept at {backup.path}"))
                elif m.down_sql:
                    # A migration that failed half-way left changes but no record: force its down.
                    await self.timeline.step(f"revert migration {m.version}", self.change(
                        mysql.db_apply_migration, mysql.MigrationRequest(
                            db=db, version=m.version, sql=m.down_sql, direction="down",
                            force=m.version not in completed), timeout=LONG))
                else:
                    self.timeline.record(f"keep migration {m.version}", "skipped",
                                         detail=f"no down script; backup kept at {backup.path}")

        self.saga.register("database migrations", revert)
        for m in pending:
            attempted.append(m)
            await self.step(f"D2 apply migration {m.version}", partial(
                self.change, mysql.db_apply_migration, mysql.MigrationRequest(
                    db=db, version=m.version, sql=m.up_sql, direction="up"), timeout=LONG),
                seed_step="D2")
            completed.add(m.version)
        return backup.path

    # ------------------------------------------------------------------ one node
    async def _upgrade_node(self, inv: Inventory, n: Node, package: deploy.PackageInfo,
                            merge_report: list[str], app_backups: dict[str, str]) -> None:
        app = inv.application
        lbs = self._lbs_of(inv, n)
        done = _NodeProgress()
        self.saga.register(f"node {n.name}", lambda: self._rollback_node(inv, n, done))

        done.drain_attempted = True
        for lb in lbs:
            await self.step(f"N1 drain on {lb.name}", partial(self._set_state, lb, n, "drain"),
                            node=n.name, seed_step="N1")
        for lb in lbs:
            await self.step(f"N2 wait for zero sessions on {lb.name}", partial(
                self.wait, haproxy.lb_wait_drained, haproxy.WaitRequest(
                    lb=lb, node=n.name, timeout_s=lb.drain_timeout_s), lb.drain_timeout_s),
                node=n.name, seed_step="N2")
            # Drain still admits persistent (sticky) sessions: close the door before stopping.
            await self.step(f"N2 hold in maintenance on {lb.name}", partial(self._set_state, lb, n, "maint"),
                            node=n.name, seed_step="N2")
        done.stop_attempted = True
        await self.step("N3 stop service", lambda: self.change(
            node.stop_service, node.ServiceRequest(node=n), timeout=_svc_timeout(n)),
            node=n.name, seed_step="N3")
        backup: deploy.AppBackup = await self.step("N4 back up app folder", lambda: self.change(
            deploy.backup_app_folder, deploy.AppBackupRequest(
                node=n, backup_id=f"{_run_key()}-{n.name}", protected_files=app.protected_files),
            timeout=LONG), node=n.name, seed_step="N4")
        done.backup = backup
        app_backups[n.name] = backup.path
        done.deploy_attempted = True
        result: deploy.DeployResult = await self.step(f"N5 deploy {package.version}", lambda: self.change(
            deploy.deploy_package, deploy.DeployRequest(
                node=n, package=package, protected_files=app.protected_files,
                merge_files=app.merge_files, release_id=f"{package.name}-{package.version}"),
            timeout=LONG), node=n.name, seed_step="N5")
        for m in result.merged:
            if m.carried:
                merge_report.append(f"{n.name}: {m.file}: kept {', '.join(m.carried)}")
        await self.step("N6 start service", lambda: self.change(
            node.start_service, node.ServiceRequest(node=n), timeout=_svc_timeout(n)),
            node=n.name, seed_step="N6")
        await self.step("N7 wait healthy, check version", lambda: self._check_running(
            inv, n, package.version), node=n.name, seed_step="N7")
        for lb in lbs:
            await self.step(f"N8 set ready on {lb.name}", partial(self._set_state, lb, n, "ready"),
                            node=n.name, seed_step="N8")
        for lb in lbs:
            await self.step(f"N9 wait UP on {lb.name}", partial(
                self.wait, haproxy.lb_wait_up, haproxy.WaitRequest(lb=lb, node=n.name, timeout_s=60.0), 60.0),
                node=n.name, seed_step="N9")
        self.timeline.node_done(n.name)

    async def _check_running(self, inv: Inventory, n: Node, expected: str) -> None:
        """Healthy, on the expected version, and (when configured) a user can log on."""
        await self.wait(http_checks.wait_healthy, http_checks.WaitHealthyRequest(
            base_url=n.url, check=inv.application.health, timeout_s=inv.rollout.health_timeout_s),
            inv.rollout.health_timeout_s)
        await self.read(http_checks.get_version, http_checks.VersionRequest(
            base_url=n.url, check=inv.application.version, expect=expected), retry=ACTION_RETRY)
        if inv.application.login is not None:
            await self.read(http_checks.check_login, http_checks.LoginRequest(
                base_url=n.url, check=inv.application.login), retry=ACTION_RETRY)

    async def _rollback_node(self, inv: Inventory, n: Node, done: _NodeProgress) -> None:
        """Put a node back as it was: old files, old version running and checked, in the pool."""
        if not done.drain_attempted:
            return
        lbs = self._lbs_of(inv, n)
        if done.stop_attempted:
            # The node may be serving (it finished, then a later node failed): drain it first.
            for lb in lbs:
                await self.timeline.step(f"rollback: drain on {lb.name}", self._set_state(lb, n, "drain"),
                                         node=n.name)
                await self.timeline.step(f"rollback: wait for zero sessions on {lb.name}", self.wait(
                    haproxy.lb_wait_drained, haproxy.WaitRequest(lb=lb, node=n.name,
                                                                 timeout_s=lb.drain_timeout_s),
                    lb.drain_timeout_s), node=n.name)
            await self.timeline.step("rollback: stop service", self.change(
                node.stop_service, node.ServiceRequest(node=n), timeout=_svc_timeout(n)), node=n.name)
            if done.deploy_attempted and done.backup is not None:
                await self.timeline.step("rollback: restore app folder", self.change(
                    deploy.restore_app_folder, done.backup, timeout=LONG), node=n.name)
            await self.timeline.step("rollback: start service", self.change(
                node.start_service, node.ServiceRequest(node=n), timeout=_svc_timeout(n)), node=n.name)
            await self.timeline.step("rollback: wait healthy, check previous version",
                                     self._check_running(inv, n, self.previous[n.name]), node=n.name)
        for lb in lbs:
            await self.timeline.step(f"rollback: set ready on {lb.name}", self._set_state(lb, n, "ready"),
                                     node=n.name)
            await self.timeline.step(f"rollback: wait UP on {lb.name}", self.wait(
                haproxy.lb_wait_up, haproxy.WaitRequest(lb=lb, node=n.name, timeout_s=60.0), 60.0),
                node=n.name)

    # ------------------------------------------------------------------ activity helpers
    @staticmethod
    def _lbs_of(inv: Inventory, n: Node) -> list[LoadBalancer]:
        return [lb for lb in inv.load_balancers if n.name in lb.members]

    def _set_state(self, lb: LoadBalancer, n: Node, state: str) -> Any:
        return self.change(haproxy.lb_set_state, haproxy.SetStateRequest(lb=lb, node=n.name, state=state))

    def _result(self, inv: Inventory, package: deploy.PackageInfo, nodes: list[Node],
                plan: tuple[str, ...], dry_run: bool, merge_report: list[str] | None = None,
                db_backup: str | None = None,
                app_backups: dict[str, str] | None = None) -> RollingDeployResult:
        return RollingDeployResult(
            site=inv.site, version=package.version, previous_versions=dict(self.previous),
            nodes=tuple(n.name for n in nodes), dry_run=dry_run, plan=plan,
            steps=tuple(self.timeline.steps), plan_hash=self.plan_hash,
            merge_report=tuple(merge_report or ()),
            db_backup=db_backup, app_backups=dict(app_backups or {}))


def _run_key() -> str:
    """Backup ids unique to this run: a workflow id may be reused by a later run, whose
    backups must never be mistaken for this one's."""
    info = workflow.info()
    return f"{info.workflow_id}-{info.run_id}"


def _check_upgrade_path(node_name: str, running: str, package: deploy.PackageInfo) -> None:
    """Version Guard: newer than what runs, and upgradable from it."""
    try:
        newer = deploy.compare_versions(package.version, running) > 0
        too_old = bool(package.min_upgrade_from) and \
            deploy.compare_versions(running, package.min_upgrade_from) < 0
    except ValueError as e:
        raise ApplicationError(f"{node_name}: cannot compare versions: {e}", type="InvalidVersion",
                               non_retryable=True) from None
    if not newer:
        raise ApplicationError(f"{node_name} runs {running}; package {package.version} is not newer",
                               type="VersionNotNewer", non_retryable=True)
    if too_old:
        raise ApplicationError(
            f"{node_name} runs {running}; {package.name} {package.version} upgrades only from "
            f"{package.min_upgrade_from} or later: install {package.min_upgrade_from} first",
            type="UpgradePathImpossible", non_retryable=True)


def _svc_timeout(n: Node) -> timedelta:
    return timedelta(seconds=n.service.timeout_s + 30)


def _preflight_failed(problems: list[str], errors: list[BaseException]) -> ApplicationError:
    """One error listing every problem; its details name the error types (for tests, tools)."""
    kinds = sorted({k for k in (_error_type(e) for e in errors) if k})
    return ApplicationError("preflight failed, nothing was changed:\n  " + "\n  ".join(problems),
                            *kinds, type="PreflightFailed", non_retryable=True)


def _error_type(e: BaseException) -> str | None:
    cause: BaseException | None = e
    while cause is not None:
        if isinstance(cause, ApplicationError) and cause.type:
            return cause.type
        cause = cause.__cause__
    return None
