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
from dataclasses import dataclass, field
from functools import partial

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    # Full module imports (not `from activities import x`): the sandbox must see each module
    # in its sys.modules to resolve the dataclasses' type hints when decoding results
    # (activities.deploy and activities.mysql keep theirs in submodules: imported too).
    import activities.deploy as deploy
    import activities.deploy.appfolder
    import activities.deploy.package
    import activities.deploy.secretserver
    import activities.haproxy as haproxy
    import activities.mysql as mysql
    import activities.mysql.connect
    import activities.mysql.dump
    import activities.mysql.migrations  # noqa: F401 (for the sandbox, see above)
    from inventory.model import Database, Inventory, Node, UnknownNodeError

from errors import UNKNOWN_NODE
from workflows.gates import GateSpec
from workflows.procedure import LONG, OnFailure, ProcedureOptions, require_approval
from workflows.saga import reason
from workflows.site_steps import NodeProgress, SiteProcedure, lbs_of, preflight_failed, run_key
from workflows.timeline import StepRecord

PROCEDURE = "rolling-deploy"


@dataclass(frozen=True)
class RollingDeployInput(ProcedureOptions):
    inventory: Inventory
    package_path: str
    # Deploy only these nodes (default: all, in inventory order / batches).
    only_nodes: tuple[str, ...] = ()
    # Wait at the gate `continue` after the first batch (a canary check by a person).
    continue_gate: bool = False
    # This procedure's default on a failed step: roll back at once (ProcedureOptions).
    on_failure: OnFailure = field(default="rollback", kw_only=True)


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


@workflow.defn(name="rolling-deploy")
class RollingDeployWorkflow(SiteProcedure):
    procedure = PROCEDURE

    def __init__(self) -> None:
        super().__init__()
        self.previous: dict[str, str] = {}

    @workflow.run
    async def run(self, inp: RollingDeployInput) -> RollingDeployResult:
        inv = inp.inventory
        self.begin(inp)
        try:
            batches = inv.batches(inp.only_nodes)
        except UnknownNodeError as e:
            raise ApplicationError(str(e), type=UNKNOWN_NODE, non_retryable=True) from None
        nodes = [n for b in batches for n in b]
        self.timeline.nodes_total = len(nodes)

        # ---- Preflight: read-only, every problem reported together --------------------
        self.timeline.set_phase("preflight")
        try:
            package = await self.timeline.step(
                "P1 inspect package",
                self.read(deploy.inspect_package, deploy.PackageRequest(path=inp.package_path)),
                seed_step="P1",
            )
        except ActivityError as e:
            raise preflight_failed([f"package: {reason(e)}"], [e]) from None
        self.previous = await self.preflight_nodes(
            inv, nodes, package, extra=partial(self.check_node_storage, inv, package)
        )
        await self.check_capacity(inv, batches)
        database = inv.databases[0] if inv.databases else None
        if database is not None and (problem := deploy.database_problem(package, database.kind)):
            # Migrations in another database's dialect: refused before anything is touched.
            raise preflight_failed([problem], [])
        schema = None
        if database is None and package.migrations:
            raise preflight_failed(
                [
                    f"package: {package.name} {package.version} carries migrations "
                    "but the inventory declares no database"
                ],
                [],
            )
        if database is not None:
            try:
                schema = await self.timeline.step(
                    "P4 database reachable",
                    self.read(mysql.db_schema_version, mysql.DbRequest(db=database)),
                    seed_step="P4",
                )
            except ActivityError as e:
                raise preflight_failed([f"database: {reason(e)}"], [e]) from None
        gate_after_first = inp.continue_gate and len(batches) > 1
        if gate_after_first and not inv.approvers.get("continue"):
            raise preflight_failed(
                [
                    "gate continue: the inventory lists no approvers for it "
                    "(approvers: {continue: [name, ...]})"
                ],
                [],
            )
        pending = [m for m in package.migrations if schema is not None and m.version > schema]
        if pending and database is not None:
            # D1 dumps the database before the migrations: there must be room for it.
            room = mysql.BackupSpaceRequest(db=database, directory=database.backup_dir or "")
            space: mysql.BackupSpace = await self.timeline.step(
                "P4 room for the database backup", self.read(mysql.check_backup_space, room), seed_step="P4"
            )
            if not space.ok:
                raise preflight_failed([f"database backups: {space.detail}"], [])
        plan = self._plan(inv, batches, package, pending, gate_after_first)
        if self.planned(inp, inv.approvers, plan, inv.approver_keys):
            return self._result(inv, package, nodes, plan, True)

        # ---- The change itself, undone by the saga on failure or cancellation ----------
        merge_report: list[str] = []
        app_backups: dict[str, str] = {}

        async def changes() -> str | None:
            db_backup: str | None = None
            if pending and database is not None:
                db_backup = await self._migrate(database, pending)
            for index, batch in enumerate(batches, start=1):
                self.timeline.set_phase(f"batch {index}/{len(batches)}", ", ".join(n.name for n in batch))
                outcomes = await asyncio.gather(
                    *(self._upgrade_node(inv, n, package, merge_report, app_backups) for n in batch),
                    return_exceptions=True,
                )
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
        await require_approval(
            self.gates,
            GateSpec(
                name="continue",
                guards=f"upgrade the remaining node(s): {names}",
                timeout_s=inp.gate_timeout_s,
                on_timeout="reject",
            ),
        )

    def _plan(
        self,
        inv: Inventory,
        batches: list[list[Node]],
        package: deploy.PackageInfo,
        pending: list[deploy.MigrationSpec],
        gate_after_first: bool,
    ) -> tuple[str, ...]:
        plan = [f"deploy {package.name} {package.version} ({package.sha256[:12]}) to site {inv.site}"]
        if pending:
            plan.append(f"D1 back up database {inv.databases[0].database}")
            plan += [
                f"D2 apply migration {m.version} (expand; down script "
                f"{'present' if m.down_sql else 'absent'})"
                for m in pending
            ]
        for i, batch in enumerate(batches, start=1):
            names = ", ".join(n.name for n in batch)
            lbs = sorted({lb.name for n in batch for lb in lbs_of(inv, n)})
            plan.append(
                f"batch {i}: {names}: drain on {', '.join(lbs) or 'no load balancer'}, "
                "wait for zero sessions, stop, back up app folder, deploy (protected: "
                f"{', '.join(inv.application.protected_files) or 'none'}), start, "
                "check health and version, set ready, wait UP"
            )
            if i == 1 and gate_after_first:
                plan.append(
                    f"gate continue: wait for one of {', '.join(inv.approvers['continue'])} "
                    "to approve the remaining batches (else roll back)"
                )
        return tuple(plan)

    # ------------------------------------------------------------------ database
    async def _migrate(self, db: Database, pending: list[deploy.MigrationSpec]) -> str:
        self.timeline.set_phase("database")
        backup: mysql.DbBackup = await self.step(
            "D1 back up database",
            lambda: self.change(
                mysql.db_backup,
                mysql.BackupRequest(db=db, backup_id=f"{run_key()}-db", directory=db.backup_dir or ""),
                timeout=LONG,
            ),
            seed_step="D1",
        )
        attempted: list[deploy.MigrationSpec] = []
        completed: set[int] = set()

        async def revert() -> None:
            # Old code must never run on a schema it does not know: revert only when every
            # node compensation succeeded (nodes are compensated before this, newest first).
            failed_nodes = [r.name for r in self.saga.records if not r.ok]
            for m in reversed(attempted):
                if failed_nodes:
                    self.timeline.record(
                        f"keep migration {m.version}",
                        "skipped",
                        detail=(
                            f"not reverted: {', '.join(failed_nodes)} could not be rolled back and may "
                            f"run the new code; backup kept at {backup.path}"
                        ),
                    )
                elif m.down_sql:
                    # A migration that failed half-way left changes but no record: force its down.
                    await self.timeline.step(
                        f"revert migration {m.version}",
                        self.change(
                            mysql.db_apply_migration,
                            mysql.MigrationRequest(
                                db=db,
                                version=m.version,
                                sql=m.down_sql,
                                direction="down",
                                force=m.version not in completed,
                            ),
                            timeout=LONG,
                        ),
                    )
                else:
                    self.timeline.record(
                        f"keep migration {m.version}",
                        "skipped",
                        detail=f"no down script; backup kept at {backup.path}",
                    )

        self.saga.register("database migrations", revert)
        for m in pending:
            attempted.append(m)
            await self.step(
                f"D2 apply migration {m.version}",
                partial(
                    self.change,
                    mysql.db_apply_migration,
                    mysql.MigrationRequest(db=db, version=m.version, sql=m.up_sql, direction="up"),
                    timeout=LONG,
                ),
                seed_step="D2",
            )
            completed.add(m.version)
        return backup.path

    # ------------------------------------------------------------------ one node
    async def _upgrade_node(
        self,
        inv: Inventory,
        n: Node,
        package: deploy.PackageInfo,
        merge_report: list[str],
        app_backups: dict[str, str],
    ) -> None:
        app = inv.application
        lbs = lbs_of(inv, n)
        done = NodeProgress()
        self.saga.register(f"node {n.name}", lambda: self.roll_back_node(inv, n, done, self.previous[n.name]))

        done.drain_attempted = True
        for lb in lbs:
            await self.step(
                f"N1 drain on {lb.name}", partial(self.set_state, lb, n, "drain"), node=n.name, seed_step="N1"
            )
        for lb in lbs:
            await self.step(
                f"N2 wait for zero sessions on {lb.name}",
                partial(
                    self.wait,
                    haproxy.lb_wait_drained,
                    haproxy.WaitRequest(lb=lb, node=n.name, timeout_s=lb.drain_timeout_s),
                    lb.drain_timeout_s,
                ),
                node=n.name,
                seed_step="N2",
            )
            # Drain still admits persistent (sticky) sessions: close the door before stopping.
            await self.step(
                f"N2 hold in maintenance on {lb.name}",
                partial(self.set_state, lb, n, "maint"),
                node=n.name,
                seed_step="N2",
            )
        done.stop_attempted = True
        await self.step("N3 stop service", partial(self.stop, n), node=n.name, seed_step="N3")
        backup: deploy.AppBackup = await self.step(
            "N4 back up app folder",
            lambda: self.change(
                deploy.backup_app_folder,
                deploy.AppBackupRequest(
                    node=n, backup_id=f"{run_key()}-{n.name}", protected_files=app.protected_files
                ),
                timeout=LONG,
            ),
            node=n.name,
            seed_step="N4",
        )
        done.backup = backup
        app_backups[n.name] = backup.path
        done.deploy_attempted = True
        result: deploy.DeployResult = await self.step(
            f"N5 deploy {package.version}", lambda: self.deploy(app, n, package), node=n.name, seed_step="N5"
        )
        for m in result.merged:
            if m.carried:
                merge_report.append(f"{n.name}: {m.file}: kept {', '.join(m.carried)}")
        await self.step("N6 start service", partial(self.start, n), node=n.name, seed_step="N6")
        await self.step(
            "N7 wait healthy, check version",
            lambda: self.check_running(inv, n, package.version),
            node=n.name,
            seed_step="N7",
        )
        for lb in lbs:
            await self.step(
                f"N8 set ready on {lb.name}",
                partial(self.set_state, lb, n, "ready"),
                node=n.name,
                seed_step="N8",
            )
        for lb in lbs:
            await self.step(
                f"N9 wait UP on {lb.name}",
                partial(
                    self.wait,
                    haproxy.lb_wait_up,
                    haproxy.WaitRequest(lb=lb, node=n.name, timeout_s=60.0),
                    60.0,
                ),
                node=n.name,
                seed_step="N9",
            )
        self.timeline.node_done(n.name)

    def _result(
        self,
        inv: Inventory,
        package: deploy.PackageInfo,
        nodes: list[Node],
        plan: tuple[str, ...],
        dry_run: bool,
        merge_report: list[str] | None = None,
        db_backup: str | None = None,
        app_backups: dict[str, str] | None = None,
    ) -> RollingDeployResult:
        return RollingDeployResult(
            site=inv.site,
            version=package.version,
            previous_versions=dict(self.previous),
            nodes=tuple(n.name for n in nodes),
            dry_run=dry_run,
            plan=plan,
            steps=tuple(self.timeline.steps),
            plan_hash=self.plan_hash,
            merge_report=tuple(merge_report or ()),
            db_backup=db_backup,
            app_backups=dict(app_backups or {}),
        )
