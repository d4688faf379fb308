"""`ss-rolling`: Secret Server's Manual Rolling Upgrade (seed 000, tasks one to eight).

Users keep secret access throughout: half the nodes serve while the other half upgrades,
and the site runs in "upgrade mode" (maintenance mode: reads served, changes refused, plus
"ignore version mismatch", so new code runs on the old schema and old code on the new).

  Preflight (read-only): the package and Version Guard on every node; SSH, service,
    health, LB membership, free disk for backups and the protected files present on every
    node; the admin interface answers; the database, its free backup space, a scratch
    database and a staging site declared; approvers listed for both gates; groups A and B
    each leave the other serving.
  Task one    1.4 back up every node's application folder (encryption.config included and
              verified), 1.5 back up the database.
  Task two    2.2 verify the SQL deltas: the backup restored into the scratch database, the
              script run there, the copy dropped (audit VERIFY DELTAS).
  Task three  3.2 the upgrade zip: only the files that differ from the installed release
              (audit GENERATE UPGRADE ZIP).
  Task four   4.2 the SQL script (audit GENERATE DB SCRIPT).
  Task five   5.1 maintenance on, 5.2 back up, 5.3 maintenance off; 5.4 the files and 5.5
              the database restored to staging; 5.6 staging confirmed in maintenance mode;
              5.7 the zip and 5.8 the script applied to staging; 5.9 log on to staging;
              5.10 staging deleted (the backups are kept); 5.11 gate `staging-test`
              ("Staging Test Successful", audit STAGING TEST).
  Task six    6.2 maintenance mode and 6.4 ignore version mismatch on (audit STARTED);
              then the database is backed up again: nothing can change it from here, so a
              restore loses nothing.
  Task seven  7.1 groups A and B; 7.2 both settings confirmed on each node; 7.3 group B
              taken out of the pool (zero sessions); 7.4 each B node upgraded (stop, zip
              extracted and copied with protected files kept and per-node customisations
              merged, start, log on); 7.5 group B back; 7.6 group A out; 7.7 the script on
              the production database (an error: guided failure, default rollback); 7.8 log
              on to each B node again; 7.9 each A node upgraded; 7.10 group A back;
              7.11 gate `upgrade-successful`.
  Task eight  8.1 upgrade mode off (maintenance and ignore version mismatch), audit COMPLETED.
  Rollback (seed "Rolling Back to the Previous Version"): the database restored from the
    backup (the audit trail kept), every node's application files restored, the original
    load balancer configuration and settings put back, audit CANCEL.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from typing import Any

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
    import activities.mysql as mysql
    import activities.mysql.connect
    import activities.mysql.dump
    import activities.mysql.migrations  # noqa: F401 (for the sandbox, see above)
    import activities.staging as staging
    from inventory.model import AdminApi, Database, Inventory, Node, Staging, UnknownNodeError

from errors import INVALID_GROUPS, PREFLIGHT_FAILED, UNKNOWN_NODE
from workflows.gates import GateSpec
from workflows.procedure import LONG, ProcedureOptions, require_approval, required
from workflows.saga import reason
from workflows.site_steps import NodeProgress, SiteProcedure, lbs_of, preflight_failed, run_key
from workflows.timeline import StepRecord

PROCEDURE = "ss-rolling"
# Versioned change (workflow.patched): past 8.1 (upgrade mode off, users writing again) a
# failed COMPLETED audit is reported, not rolled back.
PATCH_LIVE_AFTER_8_1 = "ss-rolling-live-after-8-1-v1"
# Versioned change: the 6.6 backup waits until every node enforces maintenance mode (6.3), so
# no write a node still took lands after it (a node caches its settings: the seed's "can take
# several minutes to start").
PATCH_CONFIRMED_BEFORE_BACKUP = "ss-rolling-maintenance-confirmed-before-backup-v1"
# Versioned change: the rollback's database restore comes after the nodes running the new code
# left the pool (and group A, still on the old code, came back to serve), never under them.
PATCH_NEW_CODE_OUT_BEFORE_RESTORE = "ss-rolling-new-code-out-before-restore-v1"
GATES = ("staging-test", "upgrade-successful")
# The audit trail survives a rollback's database restore.
AUDIT_TABLES = ("tbAudit",)


@dataclass(frozen=True)
class SsRollingInput(ProcedureOptions):
    inventory: Inventory
    package_path: str
    # Groups A and B (node names); default: the nodes' `group` (A / B) in the inventory,
    # else the first half is A and the rest B. B is upgraded first.
    group_a: tuple[str, ...] = ()
    group_b: tuple[str, ...] = ()
    # A failed step: ask at a gate `failure:<step>` (default), or roll back at once.
    # Keep the staging copy after the staging test (seed 5.10 is optional).
    keep_staging: bool = False


@dataclass(frozen=True)
class SsRollingResult:
    site: str
    version: str
    previous_versions: dict[str, str]
    group_a: tuple[str, ...]
    group_b: tuple[str, ...]
    dry_run: bool
    plan: tuple[str, ...]
    plan_hash: str
    steps: tuple[StepRecord, ...]
    app_backups: dict[str, str] = field(default_factory=dict)
    db_backups: tuple[str, ...] = ()
    upgrade_zip: str = ""
    upgrade_zip_files: tuple[str, ...] = ()
    sql_script: str = ""
    merge_report: tuple[str, ...] = ()

    @property
    def nodes(self) -> tuple[str, ...]:
        return self.group_a + self.group_b


@workflow.defn(name="ss-rolling")
class SsRollingWorkflow(SiteProcedure):
    procedure = PROCEDURE

    def __init__(self) -> None:
        super().__init__()
        self.previous: dict[str, str] = {}
        self.merge_report: list[str] = []

    @workflow.run
    async def run(self, inp: SsRollingInput) -> SsRollingResult:
        inv = inp.inventory
        self.begin(inp)
        group_a, group_b = _groups(inv, inp)
        nodes = group_a + group_b
        self.timeline.nodes_total = len(nodes)

        # ---- Preflight: read-only, every problem reported together --------------------
        self.timeline.set_phase("preflight")
        try:
            package: deploy.PackageInfo = await self.timeline.step(
                "P1 inspect package, Version Guard",
                self.read(deploy.inspect_package, deploy.PackageRequest(path=inp.package_path)),
                seed_step="P1",
            )
        except ActivityError as e:
            raise preflight_failed([f"package: {reason(e)}"], [e]) from None
        self._check_declarations(inv)
        admin, db, stage = _need(inv.application.admin), inv.databases[0], _need(inv.staging)
        if problem := deploy.database_problem(package, db.kind):
            # Migrations in another database's dialect: refused before anything is touched.
            raise preflight_failed([problem], [])
        self.previous = await self.preflight_nodes(
            inv, nodes, package, extra=partial(self._node_extras, inv, admin, package)
        )
        await self.check_capacity(inv, [group_b, group_a], label="group")
        schema, site_settings = await self._preflight_site(db, admin, nodes[0])
        pending = [m for m in package.migrations if m.version > schema]
        plan = self._plan(inv, package, group_a, group_b, pending, inp.keep_staging)
        if self.planned(inp, inv.approvers, plan, inv.approver_keys):
            return self._result(inv, package, group_a, group_b, plan, True)

        # ---- The change itself, undone by the saga on failure or cancellation ----------
        ctx = _Run(
            inv=inv,
            inp=inp,
            package=package,
            admin=admin,
            db=db,
            stage=stage,
            group_a=group_a,
            group_b=group_b,
            pending=pending,
            schema_before=schema,
            site_settings=site_settings,
            audit_at=nodes[0].url,
            key=run_key(),
        )
        self.guided = inp.on_failure == "ask"
        await self.run_changes(partial(self._upgrade, ctx), f"{PROCEDURE} to {package.version}")
        self.timeline.set_phase("done")
        return self._result(inv, package, group_a, group_b, plan, False, ctx)

    # ================================================================== the runbook
    async def _upgrade(self, r: _Run) -> None:
        inv, package, db = r.inv, r.package, r.db
        # Rollback ends with the audit CANCEL: registered first, so it runs last.
        self.saga.register("audit CANCEL", partial(self._audit, r, "CANCEL", "rolled back"))

        # Task one: backups (the seed's Important box: encryption.config must be in it).
        self.timeline.set_phase("task one: back up")
        for n in r.nodes:
            bk: deploy.AppBackup = await self.step(
                "1.4 back up the application folder",
                partial(
                    self.change,
                    deploy.backup_app_folder,
                    deploy.AppBackupRequest(
                        node=n, backup_id=f"{r.key}-{n.name}", protected_files=inv.application.protected_files
                    ),
                    timeout=LONG,
                ),
                node=n.name,
                seed_step="1.4",
            )
            held = ", ".join(sorted(bk.protected)) or "none"
            self.timeline.record(
                f"1.4 protected files in the backup: {held}", "ok", node=n.name, seed_step="1.4"
            )
            r.app_backups[n.name] = bk
            self.kept[f"app backup {n.name}"] = bk.path
        first = await self.back_up_database(
            db, f"{r.key}-db-1", "1.5 back up the database", "1.5", kept_as="database backup (task one)"
        )
        r.db_backups.append(first.path)

        # Task two: verify the SQL deltas against a restored copy.
        self.timeline.set_phase("task two: verify SQL deltas")
        await self.step(
            "2.2 verify SQL deltas on a restored copy",
            partial(self._verify_deltas, r, first),
            seed_step="2.2",
        )
        await self._audit(r, "VERIFY DELTAS", f"{len(r.pending)} migration(s) ran on a restored copy")

        # Task three: the upgrade zip (only the changed files).
        self.timeline.set_phase("task three: generate the upgrade zip")
        out_dir = f"{db.backup_dir}/{r.key}"
        upgrade_zip: deploy.UpgradeZip = await self.step(
            "3.2 generate the upgrade zip (changed files only)",
            partial(
                self.change,
                deploy.build_upgrade_zip,
                deploy.UpgradeZipRequest(
                    node=r.nodes[0],
                    package=package,
                    out_dir=out_dir,
                    zip_id=f"{r.key}-upgrade",
                    protected_files=inv.application.protected_files,
                    merge_files=inv.application.merge_files,
                ),
            ),
            seed_step="3.2",
        )
        r.zip = upgrade_zip
        r.upgrade = await self.read(deploy.inspect_package, deploy.PackageRequest(path=upgrade_zip.path))
        self.kept["upgrade zip"] = upgrade_zip.path
        await self._audit(
            r,
            "GENERATE UPGRADE ZIP",
            f"{len(upgrade_zip.files)} changed file(s), {upgrade_zip.unchanged} unchanged",
        )

        # Task four: the SQL script.
        self.timeline.set_phase("task four: generate the SQL script")
        script: deploy.SqlScript = await self.step(
            "4.2 generate the SQL script",
            partial(
                self.change,
                deploy.generate_sql_script,
                deploy.SqlScriptRequest(
                    package=package,
                    from_schema=r.schema_before,
                    out_dir=out_dir,
                    script_id=f"{r.key}-upgrade",
                ),
            ),
            seed_step="4.2",
        )
        r.script = script
        self.kept["SQL script"] = script.path
        await self._audit(r, "GENERATE DB SCRIPT", f"migrations {list(script.migrations)}")

        # Task five: back up in maintenance mode, then test the upgrade on a staging copy.
        self.timeline.set_phase("task five: backup and staging")
        self.saga.register("upgrade settings", partial(self._restore_settings, r))
        await self.step(
            "5.1 enable maintenance mode", partial(self._site_settings, r, True, None), seed_step="5.1"
        )
        staged_db = await self.back_up_database(
            db,
            f"{r.key}-db-5",
            "5.2 back up (in maintenance mode)",
            "5.2",
            kept_as="database backup (task five)",
        )
        r.db_backups.append(staged_db.path)
        await self.step(
            "5.3 disable maintenance mode", partial(self._site_settings, r, False, None), seed_step="5.3"
        )
        await self._staging_test(r, staged_db)

        # Task six: upgrade mode.
        self.timeline.set_phase("task six: upgrade mode")
        await self.step(
            "6.2 enable maintenance mode", partial(self._site_settings, r, True, None), seed_step="6.2"
        )
        await self.step(
            "6.4 enable ignore version mismatch", partial(self._site_settings, r, None, True), seed_step="6.4"
        )
        await self._audit(
            r,
            "STARTED",
            f"upgrade to {package.version}; groups A: {_names(r.group_a)}, B: {_names(r.group_b)}",
        )
        if workflow.patched(PATCH_CONFIRMED_BEFORE_BACKUP):
            # 6.3: the mode has started on every node (each caches its settings): from here
            # no node takes a change, so the backup below holds every acknowledged write.
            await self._settings_in_force_everywhere(r, "6.3 maintenance mode confirmed on the node", "6.3")
        # Nothing can change the database from here (maintenance mode): restoring this backup
        # on rollback loses no one's work.
        last = await self.back_up_database(
            db,
            f"{r.key}-db-6",
            "6.6 back up the database (upgrade mode on)",
            "6.6",
            kept_as="database backup (upgrade mode)",
        )
        r.db_backups.append(last.path)

        # Task seven: upgrade the web nodes, group B first.
        self.timeline.set_phase("task seven: upgrade web nodes")
        self.timeline.record(
            f"7.1 groups: A = {_names(r.group_a)}, B = {_names(r.group_b)}", "ok", seed_step="7.1"
        )
        await self._settings_in_force_everywhere(
            r, "7.2 maintenance mode and ignore version mismatch on", "7.2"
        )
        self.timeline.set_phase("task seven: group B out of the pool", _names(r.group_b))
        for n in r.group_b:
            await self._take_out(r, n, "7.3")
        for n in r.group_b:
            await self._upgrade_node(r, n, "7.4")
        for n in r.group_b:
            await self.put_back(inv, n, "7.5")
        self.timeline.set_phase("task seven: group A out of the pool", _names(r.group_a))
        for n in r.group_a:
            await self._take_out(r, n, "7.6")
        await self._run_script(r, last)
        for n in r.group_b:
            await self.step("7.8 log on again", partial(self.log_on, inv, n), node=n.name, seed_step="7.8")
        for n in r.group_a:
            await self._upgrade_node(r, n, "7.9")
        for n in r.group_a:
            await self.put_back(inv, n, "7.10")
        await self.step(
            "7.11 gate upgrade-successful",
            partial(
                require_approval,
                self.gates,
                GateSpec(
                    name="upgrade-successful",
                    guards=f"finish the upgrade to {package.version} (else roll back: "
                    "database, application files, load balancer)",
                    timeout_s=r.inp.gate_timeout_s,
                    on_timeout="reject",
                ),
            ),
            seed_step="7.11",
        )

        # Task eight: finish.
        self.timeline.set_phase("task eight: finish")
        await self.step(
            "8.1 disable upgrade mode", partial(self._site_settings, r, False, False), seed_step="8.1"
        )
        if not workflow.patched(PATCH_LIVE_AFTER_8_1):
            await self._audit(r, "COMPLETED", f"all nodes on {package.version}")
            return
        # Past 8.1 users change secrets again on the new release: nothing may roll back now
        # (the 6.6 backup restored would drop what they wrote). A COMPLETED audit row that
        # cannot be written is reported, not undone.
        try:
            await self._audit(r, "COMPLETED", f"all nodes on {package.version}")
        except ActivityError as e:
            self.timeline.record(
                "audit ManualUpgrade COMPLETED: not written",
                "failed",
                seed_step="8.1",
                detail=f"the upgrade to {package.version} is complete and serving; the "
                f"audit row could not be written ({reason(e)}): record it by hand",
            )

    # ------------------------------------------------------------------ task two
    async def _verify_deltas(self, r: _Run, backup: mysql.DbBackup) -> None:
        scratch = dataclasses.replace(r.db, database=r.db.scratch_database or "")
        try:
            await self.change(mysql.db_restore, dataclasses.replace(backup, db=scratch), timeout=LONG)
            for m in r.pending:
                await self.change(
                    mysql.db_apply_migration,
                    mysql.MigrationRequest(db=scratch, version=m.version, sql=m.up_sql, direction="up"),
                    timeout=LONG,
                )
        finally:
            await self.change(
                mysql.db_drop_database, mysql.DropDatabaseRequest(db=r.db, database=scratch.database)
            )

    # ------------------------------------------------------------------ task five
    async def _staging_test(self, r: _Run, backup: mysql.DbBackup) -> None:
        st = r.stage
        sn = staging.staging_node(st)
        staging_db = dataclasses.replace(r.db, database=st.database)
        source = r.app_backups[r.nodes[0].name]
        self.saga.register("staging copy", partial(self._clear_staging, r))
        await self.step(
            "5.4 restore the application files to staging",
            partial(self._restore_staging_files, sn, st, source),
            seed_step="5.4",
        )
        await self.step(
            "5.5 restore the database to the staging database",
            partial(self.change, mysql.db_restore, dataclasses.replace(backup, db=staging_db), timeout=LONG),
            seed_step="5.5",
        )
        await self.step(
            "5.6 staging is in maintenance mode",
            partial(self._staging_in_maintenance, r, sn),
            seed_step="5.6",
        )
        await self.step(
            "5.7 apply the upgrade zip to staging", partial(self._stop_and_deploy, r, sn), seed_step="5.7"
        )
        await self.run_script(staging_db, r.pending, "5.8 run the SQL script on staging", "5.8")
        await self.step("5.9 log on to staging", partial(self._start_and_check, r, sn), seed_step="5.9")
        if not r.inp.keep_staging:
            await self.skippable_step(
                "5.10 delete the staging copy (backups kept)",
                partial(self._clear_staging, r),
                seed_step="5.10",
            )
        await self.step(
            "5.11 gate staging-test",
            partial(
                require_approval,
                self.gates,
                GateSpec(
                    name="staging-test",
                    guards=f"'Staging Test Successful': {r.package.version} ran on staging "
                    "(files, database, log on); go on to upgrade mode",
                    timeout_s=r.inp.gate_timeout_s,
                    on_timeout="reject",
                ),
            ),
            seed_step="5.11",
        )
        decided = self.gates.records[-1]
        await self._audit(r, "STAGING TEST", f"staging test successful, confirmed by {decided.by}")

    async def _restore_staging_files(self, sn: Node, st: Staging, source: deploy.AppBackup) -> None:
        await self.stop(sn)
        await self.change(
            staging.stage_app_backup, staging.StageRequest(backup=source, staging=st), timeout=LONG
        )
        await self.start(sn)

    async def _staging_in_maintenance(self, r: _Run, sn: Node) -> None:
        await self.wait(
            app_admin.app_wait_settings,
            app_admin.WaitSettingsRequest(
                base_url=sn.url,
                admin=r.admin,
                maintenance_mode=True,
                ignore_version_mismatch=r.site_settings.ignore_version_mismatch,
                timeout_s=60.0,
            ),
            60.0,
        )

    async def _stop_and_deploy(self, r: _Run, n: Node) -> None:
        await self.stop(n)
        await self._deploy(r, n)

    async def _start_and_check(self, r: _Run, n: Node) -> None:
        await self.start(n)
        await self.check_running(r.inv, n, r.package.version)

    async def _clear_staging(self, r: _Run) -> None:
        sn = staging.staging_node(r.stage)
        await self.stop(sn)
        await self.change(staging.clear_staging, staging.ClearStagingRequest(staging=r.stage))
        await self.change(
            mysql.db_drop_database, mysql.DropDatabaseRequest(db=r.db, database=r.stage.database)
        )

    # ------------------------------------------------------------------ task seven
    async def _take_out(self, r: _Run, n: Node, seed_step: str) -> None:
        done = r.progress.setdefault(n.name, NodeProgress())
        if not done.drain_attempted:
            done.backup = r.app_backups[n.name]
            self.saga.register(
                f"node {n.name}", partial(self.roll_back_node, r.inv, n, done, self.previous[n.name])
            )
        done.drain_attempted = True
        await self.take_out(r.inv, n, seed_step)

    async def _upgrade_node(self, r: _Run, n: Node, seed_step: str) -> None:
        done = r.progress[n.name]
        done.stop_attempted = True
        await self.step(
            f"{seed_step} stop the service", partial(self.stop, n), node=n.name, seed_step=seed_step
        )
        done.deploy_attempted = True
        await self.step(
            f"{seed_step} extract and copy the upgrade zip",
            partial(self._deploy, r, n),
            node=n.name,
            seed_step=seed_step,
        )
        await self.step(
            f"{seed_step} start, log on",
            partial(self._start_and_check, r, n),
            node=n.name,
            seed_step=seed_step,
        )
        self.timeline.node_done(n.name)

    async def _deploy(self, r: _Run, n: Node) -> None:
        upgrade = required(r.upgrade, "task three's upgrade package (task three comes first)")
        result: deploy.DeployResult = await self.change(
            deploy.deploy_package,
            deploy.DeployRequest(
                node=n,
                package=upgrade,
                protected_files=r.inv.application.protected_files,
                merge_files=r.inv.application.merge_files,
                release_id=f"{r.package.name}-{r.package.version}-{r.key}",
            ),
            timeout=LONG,
        )
        for m in result.merged:
            if m.carried:
                self.merge_report.append(f"{n.name}: {m.file}: kept {', '.join(m.carried)}")

    async def _settings_in_force_everywhere(self, r: _Run, name: str, seed_step: str) -> None:
        """One step per node, in order: until each enforces the upgrade settings."""
        for n in r.nodes:
            await self.step(name, partial(self._settings_in_force, r, n), node=n.name, seed_step=seed_step)

    async def _settings_in_force(self, r: _Run, n: Node) -> Any:
        """Until the node itself enforces maintenance mode and ignores the version mismatch."""
        return await self.wait(
            app_admin.app_wait_settings,
            app_admin.WaitSettingsRequest(
                base_url=n.url,
                admin=r.admin,
                maintenance_mode=True,
                ignore_version_mismatch=True,
                timeout_s=60.0,
            ),
            60.0,
        )

    async def _run_script(self, r: _Run, backup: mysql.DbBackup) -> None:
        # Registered before the first statement runs: a half-applied script is undone too.
        if workflow.patched(PATCH_NEW_CODE_OUT_BEFORE_RESTORE):
            self.saga.register("database", partial(self._restore_database_under_old_code, r, backup))
        else:
            self.saga.register("database", partial(self._restore_database, r, backup))
        await self.run_script(r.db, r.pending, "7.7 run the SQL script on the production database", "7.7")

    async def _restore_database_under_old_code(self, r: _Run, backup: mysql.DbBackup) -> None:
        """The database goes back only under the old code: first the nodes still on it and
        out of the pool (group A, taken out at 7.6, not yet stopped) serve again, then every
        node that ran the new code leaves the pool (its own compensation later restores its
        files and puts it back), then the restore. New code never answers on the old schema,
        and the pool is never empty while old-code nodes are there to serve. When every node
        may run the new code (a failure from 7.9 on), none leaves: an empty pool would fail
        every request; their own compensations roll them back after the restore, as before."""
        old_code = [
            n
            for n in r.nodes
            if (done := r.progress.get(n.name)) is not None
            and done.drain_attempted
            and not done.stop_attempted
        ]
        if not old_code:
            await self._restore_database(r, backup)
            return
        for n in old_code:
            for lb in lbs_of(r.inv, n):
                await self.rollback_ready(lb, n, "rollback: old code back in the pool")
        for n in r.nodes:
            done = r.progress.get(n.name)
            if done is not None and done.stop_attempted:
                for lb in lbs_of(r.inv, n):
                    await self.rollback_drain(lb, n, "rollback: new code out of the pool")
                    await self.timeline.step(
                        f"rollback: hold in maintenance on {lb.name}",
                        self.set_state(lb, n, "maint"),
                        node=n.name,
                    )
        await self._restore_database(r, backup)

    async def _restore_database(self, r: _Run, backup: mysql.DbBackup) -> None:
        await self.timeline.step(
            "rollback: restore the database (audit trail kept)",
            self.change(
                mysql.db_restore_keeping,
                mysql.RestoreKeepingRequest(backup=backup, keep_tables=AUDIT_TABLES),
                timeout=LONG,
            ),
        )

    # ------------------------------------------------------------------ settings and audit
    async def _site_settings(self, r: _Run, maintenance: bool | None, ignore: bool | None) -> None:
        await self.change(
            app_admin.app_set_settings,
            app_admin.SettingsRequest(
                base_url=r.audit_at,
                admin=r.admin,
                scope="site",
                maintenance_mode=maintenance,
                ignore_version_mismatch=ignore,
            ),
        )

    async def _restore_settings(self, r: _Run) -> None:
        s = r.site_settings
        await self.timeline.step(
            "rollback: upgrade settings as before",
            self.change(
                app_admin.app_set_settings,
                app_admin.SettingsRequest(
                    base_url=r.audit_at,
                    admin=r.admin,
                    scope="site",
                    maintenance_mode=s.maintenance_mode,
                    ignore_version_mismatch=s.ignore_version_mismatch,
                ),
            ),
        )

    async def _audit(self, r: _Run, action: str, notes: str) -> None:
        by = r.inp.started_by or "zerodown"
        await self.timeline.step(
            f"audit ManualUpgrade {action}",
            self.change(
                app_admin.app_record_audit,
                app_admin.AuditRequest(
                    base_url=r.audit_at,
                    admin=r.admin,
                    action=action,
                    notes=f"{PROCEDURE}: {notes}",
                    user=by,
                    reference=f"{r.key}:{action}",
                ),
            ),
        )

    # ------------------------------------------------------------------ preflight
    def _check_declarations(self, inv: Inventory) -> None:
        """What this procedure needs the inventory to declare (before touching anything)."""
        problems: list[str] = []
        if inv.application.admin is None:
            problems.append(
                "application.admin: ss-rolling switches maintenance mode through the "
                "application's admin interface; declare it (token: {env|file})"
            )
        if inv.application.login is None:
            problems.append(
                "application.login: the runbook logs on to every upgraded node; declare a login check"
            )
        if not inv.databases:
            problems.append("databases: ss-rolling backs up and upgrades the database; declare it")
        else:
            db = inv.databases[0]
            if not db.scratch_database:
                problems.append(
                    f"databases[0].scratch_database: task two verifies the SQL deltas on a "
                    f"restored copy of {db.database}; name a database for it"
                )
            if not db.backup_dir:
                problems.append(
                    "databases[0].backup_dir: where the backups, the upgrade zip and the SQL script are kept"
                )
        if inv.staging is None:
            problems.append("staging: task five tests the upgrade on a staging copy; declare it")
        for gate in GATES:
            if not inv.approvers.get(gate):
                problems.append(f"approvers.{gate}: nobody may decide gate {gate}")
        if problems:
            raise preflight_failed(problems, [])

    async def _node_extras(
        self, inv: Inventory, admin: AdminApi, package: deploy.PackageInfo, n: Node
    ) -> None:
        await self.check_node_storage(inv, package, n)
        await self.read(app_admin.app_admin_state, app_admin.AdminRequest(base_url=n.url, admin=admin))

    async def _preflight_site(
        self, db: Database, admin: AdminApi, first: Node
    ) -> tuple[int, app_admin.UpgradeSettings]:
        async def checks() -> tuple[int, app_admin.UpgradeSettings]:
            problems: list[str] = []
            errors: list[BaseException] = []
            schema = 0
            try:
                schema = await self.read(mysql.db_schema_version, mysql.DbRequest(db=db))
                space: mysql.BackupSpace = await self.read(
                    mysql.check_backup_space, mysql.BackupSpaceRequest(db=db, directory=db.backup_dir or "")
                )
                if not space.ok:
                    problems.append(f"database backups: {space.detail}")
            except ActivityError as e:
                problems.append(f"database: {reason(e)}")
                errors.append(e)
            state: app_admin.AdminState | None = None
            try:
                state = await self.read(
                    app_admin.app_admin_state, app_admin.AdminRequest(base_url=first.url, admin=admin)
                )
            except ActivityError as e:
                problems.append(f"admin interface: {reason(e)}")
                errors.append(e)
            if problems or state is None:
                raise preflight_failed(problems, errors)
            return schema, state.site

        return await self.timeline.step(
            "P4 database, backup space, upgrade settings", checks(), seed_step="P4"
        )

    def _plan(
        self,
        inv: Inventory,
        package: deploy.PackageInfo,
        group_a: list[Node],
        group_b: list[Node],
        pending: list[deploy.MigrationSpec],
        keep_staging: bool,
    ) -> tuple[str, ...]:
        db, st = inv.databases[0], _need(inv.staging)
        migrations = ", ".join(str(m.version) for m in pending) or "none"
        return (
            f"ss-rolling: {package.name} {package.version} ({package.sha256[:12]}) on site {inv.site}",
            f"task one: back up the application folder of {_names(group_a + group_b)} (protected: "
            f"{', '.join(inv.application.protected_files) or 'none'}) and database {db.database}",
            f"task two: verify migrations {migrations} on a copy in {db.scratch_database}, then drop it",
            "task three: generate the upgrade zip (files that differ from the installed release)",
            "task four: generate the SQL script",
            f"task five: maintenance on, back up, maintenance off; staging at {st.url} with database "
            f"{st.database}: restore, apply zip and script, log on"
            + ("" if keep_staging else ", delete")
            + "; gate staging-test ("
            + ", ".join(inv.approvers.get("staging-test", ()))
            + ")",
            "task six: upgrade mode (maintenance mode + ignore version mismatch); back up the database",
            f"task seven: group B ({_names(group_b)}) out, upgrade, back; group A ({_names(group_a)}) out; "
            f"SQL script on {db.database}; log on to B; upgrade A; A back; gate upgrade-successful ("
            + ", ".join(inv.approvers.get("upgrade-successful", ()))
            + ")",
            "task eight: upgrade mode off; audit COMPLETED",
            "rollback: database from the upgrade-mode backup (audit kept), application files of every node, "
            "load balancer and settings as before; audit CANCEL",
        )

    def _result(
        self,
        inv: Inventory,
        package: deploy.PackageInfo,
        group_a: list[Node],
        group_b: list[Node],
        plan: tuple[str, ...],
        dry_run: bool,
        r: _Run | None = None,
    ) -> SsRollingResult:
        return SsRollingResult(
            site=inv.site,
            version=package.version,
            previous_versions=dict(self.previous),
            group_a=tuple(n.name for n in group_a),
            group_b=tuple(n.name for n in group_b),
            dry_run=dry_run,
            plan=plan,
            plan_hash=self.plan_hash,
            steps=tuple(self.timeline.steps),
            app_backups={k: v.path for k, v in r.app_backups.items()} if r else {},
            db_backups=tuple(r.db_backups) if r else (),
            upgrade_zip=r.zip.path if r and r.zip else "",
            upgrade_zip_files=r.zip.files if r and r.zip else (),
            sql_script=r.script.path if r and r.script else "",
            merge_report=tuple(self.merge_report),
        )


@dataclass
class _Run:
    """What the steps of one run share (workflow state, not an input)."""

    inv: Inventory
    inp: SsRollingInput
    package: deploy.PackageInfo
    admin: AdminApi
    db: Database
    stage: Staging
    group_a: list[Node]
    group_b: list[Node]
    pending: list[deploy.MigrationSpec]
    schema_before: int
    site_settings: app_admin.UpgradeSettings
    audit_at: str
    key: str
    app_backups: dict[str, deploy.AppBackup] = field(default_factory=dict)
    db_backups: list[str] = field(default_factory=list)
    progress: dict[str, NodeProgress] = field(default_factory=dict)
    zip: deploy.UpgradeZip | None = None
    upgrade: deploy.PackageInfo | None = None
    script: deploy.SqlScript | None = None

    @property
    def nodes(self) -> list[Node]:
        return self.group_a + self.group_b


def _groups(inv: Inventory, inp: SsRollingInput) -> tuple[list[Node], list[Node]]:
    """Groups A and B: from the input, else the inventory's node groups, else halves."""
    try:
        if inp.group_a or inp.group_b:
            a, b = [inv.node(x) for x in inp.group_a], [inv.node(x) for x in inp.group_b]
        elif all(n.group in ("A", "B") for n in inv.nodes):
            a, b = [n for n in inv.nodes if n.group == "A"], [n for n in inv.nodes if n.group == "B"]
        else:
            half = (len(inv.nodes) + 1) // 2
            a, b = list(inv.nodes[:half]), list(inv.nodes[half:])
    except UnknownNodeError as e:
        raise ApplicationError(str(e), type=UNKNOWN_NODE, non_retryable=True) from None
    names = [n.name for n in a + b]
    if not a or not b or len(set(names)) != len(names):
        raise ApplicationError(
            f"groups A ({_names(a)}) and B ({_names(b)}) must both be non-empty and must not share a node",
            type=INVALID_GROUPS,
            non_retryable=True,
        )
    return a, b


def _names(nodes: list[Node]) -> str:
    return ", ".join(n.name for n in nodes) or "none"


def _need(value: AdminApi | Staging | None) -> Any:
    if value is None:  # _check_declarations reported it first
        raise ApplicationError("missing declaration", type=PREFLIGHT_FAILED, non_retryable=True)
    return value
