"""`ss-load-balanced`: Secret Server's Load Balanced Configuration Upgrade (seed 000, steps 1-24).

Node A is upgraded out of the pool and the database script is tested on a restored copy
first; then A goes in and the others come out, and they are upgraded in turn.

  Preflight (read-only): the package and Version Guard (1) on every node; SSH, service,
    health, LB membership, free disk and protected files on every node; the admin
    interface; the database, its backup space and a scratch database; approvers for the
    gate `swap`; A alone can serve.
  2  back up the database (a logical dump: like a "copy only" backup it interrupts no log
     chain of the site's own backups);
  3  restore it into the scratch database (the "Test SQL Server");
  4, 12  the upgrade script (the package's migrations), the same for test and production;
  5  run the script there: an error stops everything before production is touched;
  6  drop the test database;
  7  node A = the first node (or the input's); B, C, ... the others;
  8, 9  A out of the pool first (drain, zero sessions, then stop): the seed stops IIS
     first, which would fail the requests A is serving;
  10, 11  back up A's folder, copy the package (protected files kept, customisations merged);
  13  maintenance mode (and ignore version mismatch) on B and C: no change can be lost while
     the database is upgraded, and they keep serving reads on the new schema;
  14  start A and wait until it loads (it may show the version mismatch page until 15);
  15  back up the database again (nothing can change it now), run the script on production;
  gate `swap`: an approver confirms before A takes the traffic;
  16, 17  the swap WITHOUT A GAP: the seed disables B and C before enabling A, which leaves
     the pool empty for a moment; here A is enabled and seen UP first, then B and C are
     drained to zero sessions;
  18  log on through the load balancer; 19 A serves alone meanwhile;
  20-22  B and C: stop, back up, copy, start, log on;  23 back in the pool;
  24  maintenance mode off on B and C.
  Rollback: the database restored (from the step-15 backup, taken while nothing could
  write), every touched node's files restored and back in the pool, maintenance off.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    # activities.deploy / activities.mysql keep their dataclasses in submodules, and the sandbox
    # resolves a dataclass's type hints through sys.modules[its module]: import those too.
    import activities.app_admin as app_admin
    import activities.deploy as deploy
    import activities.deploy.appfolder
    import activities.deploy.package
    import activities.deploy.secretserver
    import activities.f5 as f5
    import activities.http_checks as http_checks
    import activities.mysql as mysql
    import activities.mysql.connect
    import activities.mysql.dump
    import activities.mysql.migrations  # noqa: F401 (for the sandbox, see above)
    from inventory.model import AdminApi, Database, Inventory, LoadBalancer, Node, UnknownNodeError

from errors import UNKNOWN_NODE
from workflows.gates import GateSpec
from workflows.procedure import LONG, ProcedureOptions, require_approval, required
from workflows.saga import reason
from workflows.site_steps import NodeProgress, SiteProcedure, lbs_of, preflight_failed, run_key
from workflows.timeline import StepRecord

PROCEDURE = "ss-load-balanced"
# Versioned change (workflow.patched): once A serves alone (step 17) nothing is rolled
# back: the step-15 database backup would drop what users wrote through A.
PATCH_NO_RESTORE_AFTER_SWAP = "ss-load-balanced-no-restore-after-swap-v1"
# Versioned change: step 9.5, an F5 pool's Action on Service Down set to Reject before node A
# leaves it (put back by the saga).
PATCH_REJECT_ON_SERVICE_DOWN = "ss-load-balanced-reject-on-service-down-v1"


@dataclass(frozen=True)
class SsLoadBalancedInput(ProcedureOptions):
    inventory: Inventory
    package_path: str
    # Target Web Server A (default: the first node).
    node_a: str = ""
    # Step 13 (optional in the seed): maintenance mode on the other nodes during the script.
    maintenance_on_others: bool = True


@dataclass(frozen=True)
class SsLoadBalancedResult:
    site: str
    version: str
    previous_versions: dict[str, str]
    node_a: str
    others: tuple[str, ...]
    dry_run: bool
    plan: tuple[str, ...]
    plan_hash: str
    steps: tuple[StepRecord, ...]
    db_backups: tuple[str, ...] = ()
    app_backups: dict[str, str] = field(default_factory=dict)
    merge_report: tuple[str, ...] = ()

    @property
    def nodes(self) -> tuple[str, ...]:
        return (self.node_a, *self.others)


@workflow.defn(name="ss-load-balanced")
class SsLoadBalancedWorkflow(SiteProcedure):
    procedure = PROCEDURE

    def __init__(self) -> None:
        super().__init__()
        self.previous: dict[str, str] = {}
        self.merge_report: list[str] = []
        self.app_backups: dict[str, str] = {}
        self.db_backups: list[str] = []

    @workflow.run
    async def run(self, inp: SsLoadBalancedInput) -> SsLoadBalancedResult:
        inv = inp.inventory
        self.begin(inp)
        a, others = _split(inv, inp.node_a)
        self.timeline.nodes_total = 1 + len(others)

        # ---- Preflight --------------------------------------------------------------
        self.timeline.set_phase("preflight")
        try:
            package: deploy.PackageInfo = await self.timeline.step(
                "1 inspect package, Version Guard",
                self.read(deploy.inspect_package, deploy.PackageRequest(path=inp.package_path)),
                seed_step="1",
            )
        except ActivityError as e:
            raise preflight_failed([f"package: {reason(e)}"], [e]) from None
        self._check_declarations(inv, inp)
        db = inv.databases[0]
        if problem := deploy.database_problem(package, db.kind):
            # Migrations in another database's dialect: refused before anything is touched.
            raise preflight_failed([problem], [])
        admin = required(inv.application.admin, "the inventory's application.admin")
        self.previous = await self.preflight_nodes(
            inv, [a, *others], package, extra=partial(self._node_extras, inv, admin, package)
        )
        # A is alone in the pool from step 17 to 23; B, C, ... alone while A upgrades.
        await self.check_capacity(inv, [[a], others], label="step")
        schema = await self._preflight_database(db)
        pending = [m for m in package.migrations if m.version > schema]
        plan = self._plan(inv, package, a, others, pending, inp)
        if self.planned(inp, inv.approvers, plan, inv.approver_keys):
            return self._result(inv, package, a, others, plan, True)

        self.guided = inp.on_failure == "ask"
        await self.run_changes(
            partial(self._upgrade, inp, package, db, admin, a, others, pending),
            f"{PROCEDURE} to {package.version}",
        )
        self.timeline.set_phase("done")
        return self._result(inv, package, a, others, plan, False)

    # ================================================================== the runbook
    async def _upgrade(
        self,
        inp: SsLoadBalancedInput,
        package: deploy.PackageInfo,
        db: Database,
        admin: AdminApi,
        a: Node,
        others: list[Node],
        pending: list[deploy.MigrationSpec],
    ) -> None:
        inv, key = inp.inventory, run_key()
        progress = {n.name: NodeProgress() for n in (a, *others)}

        # 2-6: the script is tested on a restored copy before production is touched.
        self.timeline.set_phase("test the upgrade script on a restored copy")
        first = await self.back_up_database(
            db,
            f"{key}-db-2",
            "2 back up the database (copy-only: a logical dump)",
            "2",
            kept_as="database backup (step 2)",
        )
        self.db_backups.append(first.path)
        test_db = dataclasses.replace(db, database=db.scratch_database or "")
        await self.step(
            "3 restore it into the test database",
            partial(self.change, mysql.db_restore, dataclasses.replace(first, db=test_db), timeout=LONG),
            seed_step="3",
        )
        self.timeline.record(
            f"4 upgrade script: migrations {[m.version for m in pending] or 'none'} of "
            f"{package.name} {package.version}",
            "ok",
            seed_step="4",
        )
        try:
            await self.run_script(test_db, pending, "5 run the upgrade script on the test database", "5")
        finally:
            await self.step(
                "6 drop the test database",
                partial(
                    self.change,
                    mysql.db_drop_database,
                    mysql.DropDatabaseRequest(db=db, database=test_db.database),
                ),
                seed_step="6",
            )

        # 7-11, 14: node A out of the pool, upgraded, started.
        self.timeline.record(
            f"7 node A = {a.name}; then {', '.join(n.name for n in others)}", "ok", seed_step="7"
        )
        self.timeline.set_phase("upgrade node A out of the pool", a.name)
        if workflow.patched(PATCH_REJECT_ON_SERVICE_DOWN):
            await self._reject_on_service_down(inv, a)
        await self._take_out(inv, a, progress[a.name], "9")
        await self._upgrade_node(inv, package, a, progress[a.name], key, "10", check=False)
        self.timeline.record(
            "12 the same script for production (generated from the package)", "ok", seed_step="12"
        )

        # 13: maintenance mode on the others (no change can be lost during the script).
        if inp.maintenance_on_others:
            self.saga.register(
                "maintenance mode on the other nodes", partial(self._others_normal, admin, others)
            )
            for n in others:
                await self.step(
                    "13 maintenance mode and ignore version mismatch on",
                    partial(self._node_mode, admin, n, True),
                    node=n.name,
                    seed_step="13",
                )

        # 14: start A; it loads (the mismatch page is expected until the script ran).
        await self.step(
            "14 start, wait until the site loads",
            partial(self._start_loaded, inv, a),
            node=a.name,
            seed_step="14",
        )

        # 15: the production script, after a backup nothing can have outdated.
        self.timeline.set_phase("upgrade the production database")
        last = await self.back_up_database(
            db,
            f"{key}-db-15",
            "15 back up the database (nothing writes now)",
            "15",
            kept_as="database backup (step 15)",
        )
        self.db_backups.append(last.path)
        self.saga.register("database", partial(self._restore_database, last))
        await self.run_script(db, pending, "15 run the upgrade script on production", "15")
        await self.step(
            "14 check version and log on",
            partial(self.check_running, inv, a, package.version),
            node=a.name,
            seed_step="14",
        )
        self.timeline.node_done(a.name)

        # The swap, confirmed by a person, without a gap.
        await self.step(
            "gate swap",
            partial(
                require_approval,
                self.gates,
                GateSpec(
                    name="swap",
                    guards=f"{a.name} ({package.version}) takes the traffic; "
                    f"{', '.join(n.name for n in others)} leave the pool to be upgraded",
                    timeout_s=inp.gate_timeout_s,
                    on_timeout="reject",
                ),
            ),
            seed_step="16",
        )
        self.timeline.set_phase("swap: A in, the others out (no gap)")
        await self.put_back(inv, a, "17")
        live = workflow.patched(PATCH_NO_RESTORE_AFTER_SWAP)
        if live:
            # A serves alone, out of maintenance mode: users write to the upgraded database.
            # Restoring the step-15 backup (or old code on A) would drop what they write, so
            # from here a failure leaves the site serving on A and the others out of the pool.
            kept = self.saga.point_of_no_return()
            self.timeline.record(
                "17 point of no return: A serves the upgraded database",
                "ok",
                node=a.name,
                seed_step="17",
                detail="a failure from here is not undone (kept: " + ", ".join(kept) + ")",
            )
        for n in others:
            if live:
                progress[n.name].drain_attempted = True  # out of the pool for good: no undo
                await self.take_out(inv, n, "16")
            else:
                await self._take_out(inv, n, progress[n.name], "16")
        if inv.application.url:
            await self.step(
                "18 log on through the load balancer",
                partial(self.log_on, inv, dataclasses.replace(a, url=inv.application.url)),
                seed_step="18",
            )
        self.timeline.record(f"19 {a.name} serves alone until the others are back", "ok", seed_step="19")

        # 20-23: the others.
        self.timeline.set_phase("upgrade the other nodes", ", ".join(n.name for n in others))
        for n in others:
            await self._upgrade_node(inv, package, n, progress[n.name], key, "21", check=True)
        for n in others:
            await self.put_back(inv, n, "23")
        # 24: back to normal.
        if inp.maintenance_on_others:
            for n in others:
                await self.step(
                    "24 maintenance mode off",
                    partial(self._node_mode, admin, n, False),
                    node=n.name,
                    seed_step="24",
                )

    # ------------------------------------------------------------------ nodes
    async def _reject_on_service_down(self, inv: Inventory, a: Node) -> None:
        """9.5: "Ensure Reject is selected for Action on Service Down" on each F5 pool node A is
        in (serviceDownAction `reset`); the pool's own setting comes back on rollback. An
        HAProxy has no runtime equivalent (its `on-marked-down` is configuration)."""
        for lb in lbs_of(inv, a):
            if lb.kind != "f5":
                continue
            set_: f5.ServiceDownAction = await self.step(
                f"9.5 Action on Service Down: Reject on {lb.name}",
                partial(self.change, f5.lb_service_down_action, f5.ServiceDownRequest(lb=lb, action="reset")),
                seed_step="9.5",
            )
            if set_.before != "reset":
                self.saga.register(
                    f"Action on Service Down of {lb.name}", partial(self._service_down_back, lb, set_.before)
                )

    async def _service_down_back(self, lb: LoadBalancer, action: str) -> None:
        await self.timeline.step(
            f"rollback: Action on Service Down of {lb.name} back to {action}",
            self.change(f5.lb_service_down_action, f5.ServiceDownRequest(lb=lb, action=action)),
        )

    async def _take_out(self, inv: Inventory, n: Node, done: NodeProgress, seed_step: str) -> None:
        if not done.drain_attempted:
            self.saga.register(
                f"node {n.name}", partial(self.roll_back_node, inv, n, done, self.previous[n.name])
            )
        done.drain_attempted = True
        await self.take_out(inv, n, seed_step)

    async def _upgrade_node(
        self,
        inv: Inventory,
        package: deploy.PackageInfo,
        n: Node,
        done: NodeProgress,
        key: str,
        seed_step: str,
        check: bool,
    ) -> None:
        app = inv.application
        done.stop_attempted = True
        await self.step(
            f"{seed_step} stop the service", partial(self.stop, n), node=n.name, seed_step=seed_step
        )
        backup: deploy.AppBackup = await self.step(
            f"{seed_step} back up the application folder",
            partial(
                self.change,
                deploy.backup_app_folder,
                deploy.AppBackupRequest(
                    node=n, backup_id=f"{key}-{n.name}", protected_files=app.protected_files
                ),
                timeout=LONG,
            ),
            node=n.name,
            seed_step=seed_step,
        )
        done.backup = backup
        self.app_backups[n.name] = backup.path
        self.kept[f"app backup {n.name}"] = backup.path
        done.deploy_attempted = True
        result: deploy.DeployResult = await self.step(
            f"{seed_step} copy the package (protected files kept, customisations merged)",
            partial(self.deploy, app, n, package),
            node=n.name,
            seed_step=seed_step,
        )
        for m in result.merged:
            if m.carried:
                self.merge_report.append(f"{n.name}: {m.file}: kept {', '.join(m.carried)}")
        if check:
            await self.step(
                "22 start, log on",
                partial(self._start_checked, inv, n, package.version),
                node=n.name,
                seed_step="22",
            )
            self.timeline.node_done(n.name)

    async def _start_loaded(self, inv: Inventory, n: Node) -> None:
        await self.start(n)
        await self.wait(
            http_checks.wait_healthy,
            http_checks.WaitHealthyRequest(
                base_url=n.url, check=inv.application.health, timeout_s=inv.rollout.health_timeout_s
            ),
            inv.rollout.health_timeout_s,
        )

    async def _start_checked(self, inv: Inventory, n: Node, version: str) -> None:
        await self.start(n)
        await self.check_running(inv, n, version)

    async def _node_mode(self, admin: AdminApi, n: Node, on: bool) -> None:
        if on:
            await self.change(
                app_admin.app_set_settings,
                app_admin.SettingsRequest(
                    base_url=n.url,
                    admin=admin,
                    scope="node",
                    maintenance_mode=True,
                    ignore_version_mismatch=True,
                ),
            )
        else:
            await self.change(
                app_admin.app_set_settings,
                app_admin.SettingsRequest(
                    base_url=n.url, admin=admin, scope="node", clear_node_override=True
                ),
            )

    async def _others_normal(self, admin: AdminApi, others: list[Node]) -> None:
        for n in others:
            await self.timeline.step(
                "rollback: maintenance mode off", self._node_mode(admin, n, False), node=n.name
            )

    async def _restore_database(self, backup: mysql.DbBackup) -> None:
        await self.timeline.step(
            "rollback: restore the database",
            self.change(
                mysql.db_restore_keeping,
                mysql.RestoreKeepingRequest(backup=backup, keep_tables=("tbAudit",)),
                timeout=LONG,
            ),
        )

    # ------------------------------------------------------------------ preflight
    def _check_declarations(self, inv: Inventory, inp: SsLoadBalancedInput) -> None:
        problems: list[str] = []
        if inv.application.admin is None:
            problems.append(
                "application.admin: step 13 switches maintenance mode through the application's "
                "admin interface; declare it (token: {env|file})"
            )
        if not inv.databases:
            problems.append(
                "databases: ss-load-balanced tests and runs the upgrade script; declare the database"
            )
        else:
            if not inv.databases[0].scratch_database:
                problems.append("databases[0].scratch_database: steps 3-6 test the script on a restored copy")
            if not inv.databases[0].backup_dir:
                problems.append("databases[0].backup_dir: where the backups are kept")
        if not inv.approvers.get("swap"):
            problems.append("approvers.swap: nobody may decide gate swap")
        if len(inv.nodes) < 2:
            problems.append("nodes: the load balanced upgrade needs node A and at least one other")
        if problems:
            raise preflight_failed(problems, [])

    async def _node_extras(
        self, inv: Inventory, admin: AdminApi, package: deploy.PackageInfo, n: Node
    ) -> None:
        await self.check_node_storage(inv, package, n)
        await self.read(app_admin.app_admin_state, app_admin.AdminRequest(base_url=n.url, admin=admin))

    async def _preflight_database(self, db: Database) -> int:
        async def checks() -> int:
            try:
                schema: int = await self.read(mysql.db_schema_version, mysql.DbRequest(db=db))
                space: mysql.BackupSpace = await self.read(
                    mysql.check_backup_space, mysql.BackupSpaceRequest(db=db, directory=db.backup_dir or "")
                )
            except ActivityError as e:
                raise preflight_failed([f"database: {reason(e)}"], [e]) from None
            if not space.ok:
                raise preflight_failed([f"database backups: {space.detail}"], [])
            return schema

        return await self.timeline.step("P4 database and backup space", checks(), seed_step="P4")

    def _plan(
        self,
        inv: Inventory,
        package: deploy.PackageInfo,
        a: Node,
        others: list[Node],
        pending: list[deploy.MigrationSpec],
        inp: SsLoadBalancedInput,
    ) -> tuple[str, ...]:
        db = inv.databases[0]
        names = ", ".join(n.name for n in others)
        return (
            f"ss-load-balanced: {package.name} {package.version} ({package.sha256[:12]}) on site {inv.site}",
            f"2-6: back up {db.database}, restore into {db.scratch_database}, run migrations "
            f"{[m.version for m in pending] or 'none'} there, drop it",
            f"8-11, 14: {a.name} out of the pool (zero sessions), stop, back up, copy the package, start",
            (
                f"13: maintenance mode + ignore version mismatch on {names}"
                if inp.maintenance_on_others
                else "13: (skipped: maintenance_on_others is off)"
            ),
            f"15: back up {db.database}, run the script on production",
            f"gate swap ({', '.join(inv.approvers.get('swap', ()))}); 16-17: {a.name} in and UP first, "
            f"then {names} drained (no gap)",
            f"18: log on through {inv.application.url or '(no LB URL declared: skipped)'}",
            f"20-23: {names}: stop, back up, copy, start, log on, back in the pool",
            "24: maintenance mode off" if inp.maintenance_on_others else "24: (nothing to undo)",
            "rollback: database from the step-15 backup, files of every touched node, pool and modes "
            "as before",
        )

    def _result(
        self,
        inv: Inventory,
        package: deploy.PackageInfo,
        a: Node,
        others: list[Node],
        plan: tuple[str, ...],
        dry_run: bool,
    ) -> SsLoadBalancedResult:
        return SsLoadBalancedResult(
            site=inv.site,
            version=package.version,
            previous_versions=dict(self.previous),
            node_a=a.name,
            others=tuple(n.name for n in others),
            dry_run=dry_run,
            plan=plan,
            plan_hash=self.plan_hash,
            steps=tuple(self.timeline.steps),
            db_backups=tuple(self.db_backups),
            app_backups=dict(self.app_backups),
            merge_report=tuple(self.merge_report),
        )


def _split(inv: Inventory, node_a: str) -> tuple[Node, list[Node]]:
    try:
        a = inv.node(node_a) if node_a else inv.nodes[0]
    except UnknownNodeError as e:
        raise ApplicationError(str(e), type=UNKNOWN_NODE, non_retryable=True) from None
    return a, [n for n in inv.nodes if n.name != a.name]
