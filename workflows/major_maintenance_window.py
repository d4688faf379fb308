"""`major-maintenance-window`: RightScale's major upgrade (seed 004), with site downtime.

The runbook, with the seed's step numbers:

  Preflight (read-only): the package; the old servers (members of `lb`) healthy and
    upgradable; `lb` has a maintenance switch; the test balancer (`test_lb`) has a
    frontend_url; provisioning; the database has a warm replica, admin / replication
    accounts, a backup_dir and a scratch database; approvers for `go-live` and `terminate`.
  1  the backups restore: a backup restored into the scratch database, checksums compared
  5, 6  the warm replica initialised from the primary (replicating, read-only)
  7-9  the temporary test balancer (the inventory's `test_lb`, empty)
  10, 11  a new server cloned from a current one, with the old code, attached to the test
     balancer and tested through it
  12 the new code on it: stopped until 26-29 (it may not run on the old schema), or, when
     the application reads the schema as it goes (application.restart_after_migration
     false), started and tested now
  13 cloned until there are as many new servers as old (launched and tested now in the
     second case)
  16 detached from the test balancer
  17 BEGIN SITE DOWNTIME: from here every step is downtime, so servers are handled side by
     side and reads of a primary that no longer changes run together
  18 the maintenance page on (HAProxy answers 503 with Retry-After)
  19 the old servers stopped; the primary shows no more writes (none committed for
     writes_quiet_s, none uncommitted)
  20, 21 snapshot of the database; the warm replica in sync (Seconds_Behind_Master 0, the
     primary's GTID applied)
  22 replication stopped, the warm replica kept
  23 the migrations: the POINT OF NO RETURN (from here a rollback reverts by promotion)
  24 the old servers detached; 26-29 the new servers started (when they were not), no
     restart when they read the schema as they go (arrays: not applicable unless declared)
  25 the new ones attached
  30 tested while the page is up: each one healthy and on the new version, then through
     the balancer with a one-time preview entry (every new server answers, on the migrated
     schema); gate `go-live` (go-live / revert)
  31 the maintenance page lifted
  32 snapshot of the database
  33 END SITE DOWNTIME
  34-36 backups, alerts, inputs: recorded for the operator
  37, 38 gate `terminate`; the old servers, the warm replica and the test balancer's
     servers terminated

Rollback before 23: the new servers destroyed, the old ones started, the page lifted, the
warm replica released. After 23 (a failure, or `revert` at the gate): the new servers
detached, the warm replica promoted, the old servers pointed at it, started and
re-attached, then the page lifted: the site runs the old code on the data as it was at 19.
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
    import activities.deploy as deploy
    import activities.deploy.appfolder
    import activities.deploy.package
    import activities.deploy.secretserver
    import activities.haproxy as haproxy
    import activities.http_checks as http_checks
    import activities.mysql as mysql
    import activities.mysql.connect
    import activities.mysql.dump
    import activities.mysql.migrations  # noqa: F401 (for the sandbox, see above)
    import activities.node as node
    import activities.provision as provision
    import activities.replication as replication
    from inventory.model import Database, DatabaseEndpoint, Inventory, LoadBalancer, Node

from errors import BACKUP_INCONSISTENT, GATE_REJECTED, UNEXPECTED_STATE
from workflows.gates import GateSpec
from workflows.procedure import LONG, OnFailure, ProcedureOptions, required
from workflows.saga import reason
from workflows.site_steps import (
    SiteProcedure,
    default_names,
    inventory_dir,
    preflight_failed,
    run_key,
    server_address,
    with_member,
)
from workflows.timeline import StepRecord

PROCEDURE = "major-maintenance-window"
GO_LIVE_CHOICES = ("go-live", "revert")
TERMINATE_CHOICES = ("terminate", "keep")
# Inside the window every poll is downtime: the new servers' health is asked this often.
WINDOW_POLL_S = 0.05


@dataclass(frozen=True)
class MajorMaintenanceInput(ProcedureOptions):
    inventory: Inventory
    package_path: str
    lb: str = ""
    test_lb: str = "test"
    template: str = ""
    new_names: tuple[str, ...] = ()
    # Step 19: how long the primary must show no committed write (and none uncommitted)
    # once the old servers are stopped.
    writes_quiet_s: float = 0.5
    replica_timeout_s: float = 300.0
    # This procedure's default on a failed step: roll back at once (ProcedureOptions).
    on_failure: OnFailure = field(default="rollback", kw_only=True)


@dataclass(frozen=True)
class MajorMaintenanceResult:
    site: str
    version: str
    old_servers: tuple[str, ...]
    new_servers: tuple[Node, ...]
    terminated: tuple[str, ...]
    dry_run: bool
    plan: tuple[str, ...]
    steps: tuple[StepRecord, ...]
    plan_hash: str = ""
    snapshots: tuple[str, ...] = ()
    # Step 23's duration, and the downtime from 17 to 33 (workflow clock).
    migration_s: float = 0.0
    downtime_s: float = 0.0


@dataclass
class WindowState:
    new_nodes: dict[str, Node] = field(default_factory=dict)
    on_test: list[str] = field(default_factory=list)
    on_main: list[str] = field(default_factory=list)
    old_stopped: bool = False
    old_detached: list[str] = field(default_factory=list)
    migrating: bool = False
    reverted: bool = False


@workflow.defn(name="major-maintenance-window")
class MajorMaintenanceWindowWorkflow(SiteProcedure):
    procedure = PROCEDURE

    def __init__(self) -> None:
        super().__init__()
        self.state = WindowState()
        self.terminate = False
        self.migration_s = 0.0
        self.downtime_s = 0.0
        self.previous: dict[str, str] = {}
        self.main_lb = ""

    @workflow.run
    async def run(self, inp: MajorMaintenanceInput) -> MajorMaintenanceResult:
        inv = inp.inventory
        self.begin(inp)
        self.timeline.set_phase("preflight")
        lb, test_lb, old, package, db, pending, names = await self._preflight(inp)
        self.main_lb = lb.name
        self.timeline.nodes_total = len(old)
        plan = self._plan(inp, lb, test_lb, old, package, db, pending, names)
        if self.planned(inp, inv.approvers, plan, inv.approver_keys):
            return self._result(inp, package, old, plan, True, ())
        snapshots: list[str] = []
        key = run_key()

        async def changes() -> None:
            # 1 the backups restore.
            self.timeline.set_phase("prepare the database")
            await self._verify_backup(db, key)
            # 5, 6 the warm replica.
            self.saga.register("warm replica released", partial(self._release_warm, db))
            await self.step(
                "5-6 initialise the warm replica from the primary",
                partial(self.change, replication.db_init_warm_replica, mysql.DbRequest(db=db), timeout=LONG),
                seed_step="5",
            )
            # 7-9 the temporary test balancer.
            self.timeline.record(
                f"7-9 temporary test balancer {test_lb.name}",
                "ok",
                seed_step="7",
                detail=f"{test_lb.frontend_url} (backend {test_lb.backend}, empty)",
            )
            # 10, 11 a new server with the old code, tested through it.
            self.timeline.set_phase("new servers", names[0])
            template = inv.node(inp.template) if inp.template else old[0]
            first = await self._clone(inp, template, names[0], "10")
            await self.step(
                "11 launch",
                partial(self._launch, inp, first, old_version(self.previous)),
                node=first.name,
                seed_step="11",
            )
            await self._attach(test_lb, first, "11")
            await self.step(
                f"11 test through {test_lb.name} (old code)",
                partial(self._test_through, inv, test_lb, old_version(self.previous), 2),
                seed_step="11",
            )
            # 12 the new code on it: stopped for the deploy; started again at once when the
            # application runs across a migration, else only after it (26-29).
            app = inv.application
            prestart = not app.restart_after_migration
            await self.step(
                "12 stop it for the new code", partial(self.stop, first), node=first.name, seed_step="12"
            )
            await self.step(
                f"12 deploy {package.version}",
                partial(self.deploy, app, first, package),
                node=first.name,
                seed_step="12",
            )
            if prestart:
                await self.step(
                    f"12 start it on {package.version} (ready for the migrated schema)",
                    partial(self._start_checked, inv, first, package.version),
                    node=first.name,
                    seed_step="12",
                )
            # 13 clones of it up to the old count, launched and tested when they may run now.
            for name in names[1:]:
                self.timeline.set_phase("new servers", name)
                clone = await self._clone(inp, first, name, "13")
                if prestart:
                    await self.step(
                        f"13 launch and test ({package.version})",
                        partial(self._launch, inp, clone, package.version),
                        node=name,
                        seed_step="13",
                    )
            # 16 off the test balancer.
            await self._detach(test_lb, first.name, "16")
            # 17 BEGIN SITE DOWNTIME; 18 the maintenance page.
            began = workflow.now()
            self.timeline.record("17 BEGIN SITE DOWNTIME", "ok", seed_step="17")
            self.timeline.set_phase("SITE DOWNTIME: maintenance page up")
            self.saga.register("maintenance page lifted", partial(self._page, lb, False))
            await self.step("18 maintenance page on", partial(self._page, lb, True), seed_step="18")
            # 19 old processes stopped (all at once: the page holds every new request, each
            # stop lets its requests in flight finish), the primary watched for writes
            # meanwhile (its quiet time counts from the last write, as a monitoring graph
            # shows it); then, the old servers all stopped, still no write (one since the
            # watch starts the quiet time again).
            self.saga.register("old servers started again", partial(self._start_old, inv, old))
            self.state.old_stopped = True
            writes = replication.WritesStoppedRequest(
                db=db, quiet_s=inp.writes_quiet_s, timeout_s=inp.replica_timeout_s
            )
            watched, *_ = await self.all_of(
                self.step(
                    "19 no more writes on the primary (watched while the old servers stop)",
                    partial(self.wait, replication.db_wait_writes_stopped, writes, inp.replica_timeout_s),
                    seed_step="19",
                ),
                *(
                    self.step("19 stop the old server", partial(self.stop, n), node=n.name, seed_step="19")
                    for n in old
                ),
            )
            await self.step(
                "19 still no write, the old servers stopped",
                partial(
                    self.wait,
                    replication.db_wait_writes_stopped,
                    dataclasses.replace(writes, seen_gtid=watched.gtid, seen_since=watched.since),
                    inp.replica_timeout_s,
                ),
                seed_step="19",
            )
            # 20 snapshot, and 21 replica in sync then 22 replication stopped (the replica
            # kept), side by side: the primary no longer changes.
            snapshot, _ = await self.all_of(
                self.back_up_database(
                    db, f"{key}-db-20", "20 snapshot the database", "20", "database snapshot (step 20)"
                ),
                self._replica_in_sync_then_stopped(inp, db),
            )
            if not isinstance(snapshot, mysql.DbBackup):
                raise ApplicationError(
                    f"internal: the snapshot step returned {type(snapshot).__name__}",
                    type=UNEXPECTED_STATE,
                    non_retryable=True,
                )
            snapshots.append(snapshot.path)
            # 23 the migrations: the point of no return.
            self.saga.register(
                "revert by promoting the warm replica", partial(self._revert, inp, lb, test_lb, db, old)
            )
            self.state.migrating = True
            self.timeline.record(
                "23 POINT OF NO RETURN: migrations start; a rollback now promotes the warm replica",
                "ok",
                seed_step="23",
            )
            started = workflow.now()
            await self.run_script(db, pending, "23 migration", "23")
            self.migration_s = (workflow.now() - started).total_seconds()
            if not pending:
                self.timeline.record("23 migrations", "skipped", seed_step="23", detail="none pending")
            # 24 the old servers detached, side by side with 26-29: the new ones started
            # (when they were not already); then 25 the new ones attached.
            new = [self.state.new_nodes[name] for name in names]
            await self.all_of(
                *(self._detach(lb, n.name, "24", old_server=True) for n in old),
                *(self._start_new(inp, n, first.name) for n in new if not prestart),
            )
            if prestart:
                self.timeline.record(
                    "26-29 restart the new servers",
                    "skipped",
                    seed_step="26",
                    detail="not needed: the application reads the migrated schema as it goes "
                    "(application.restart_after_migration: false); step 30 checks it does",
                )
            self.timeline.record(
                "27-28 server arrays",
                "skipped",
                seed_step="27",
                detail="not applicable: the inventory declares no server array",
            )
            # 25 attached, and 30 each one tested directly while its balancer's checks come
            # up (both only read the server); then 30 through the balancer, behind the page.
            await self.all_of(
                *(
                    self.all_of(
                        self._attach(lb, n, "25"),
                        self.step(
                            f"30 test: healthy, version {package.version}",
                            partial(self._serving, inv, n, package.version),
                            node=n.name,
                            seed_step="30",
                        ),
                    )
                    for n in new
                )
            )
            await self.step(
                f"30 test through {lb.name} behind the page",
                partial(self._preview, lb, inv, names, package),
                seed_step="30",
            )
            decision = await self.gates.wait(
                GateSpec(
                    name="go-live",
                    guards=f"lift the maintenance page: {', '.join(names)} serve {package.version} "
                    "(revert: promote the warm replica, back to the old servers)",
                    timeout_s=inp.gate_timeout_s,
                    on_timeout="revert",
                    choices=GO_LIVE_CHOICES,
                )
            )
            if decision.choice != "go-live":
                raise ApplicationError(
                    f"revert chosen at gate go-live ({decision.by or 'timeout'})",
                    type=GATE_REJECTED,
                    non_retryable=True,
                )
            # 31 the page lifted; 32 snapshot; 33 END SITE DOWNTIME.
            await self.step("31 maintenance page off", partial(self._page, lb, False), seed_step="31")
            snap = await self.back_up_database(
                db, f"{key}-db-32", "32 snapshot the database", "32", "database snapshot (step 32)"
            )
            snapshots.append(snap.path)
            self.downtime_s = (workflow.now() - began).total_seconds()
            self.timeline.record(
                "33 END SITE DOWNTIME", "ok", seed_step="33", detail=f"{self.downtime_s:.1f} s of downtime"
            )
            for seed, what in (
                ("34", "enable database backups on master and slave (not on the warm one)"),
                ("35", "check alerts and server arrays"),
                ("36", "clean up server-level inputs"),
            ):
                self.timeline.record(
                    f"{seed} {what}", "skipped", seed_step=seed, detail="the operator's, outside zerodown"
                )
            decision = await self.gates.wait(
                GateSpec(
                    name="terminate",
                    guards="terminate the old servers, release the warm replica and empty the "
                    "test balancer (keep: leave them for later)",
                    timeout_s=inp.gate_timeout_s,
                    on_timeout="keep",
                    choices=TERMINATE_CHOICES,
                )
            )
            self.terminate = decision.choice == "terminate"

        self.guided = inp.on_failure == "ask"
        await self.run_changes(changes, f"{PROCEDURE} to {package.version}")
        terminated: list[str] = []
        if self.terminate:
            self.timeline.set_phase("terminate")
            prov = required(inv.provisioning, "the inventory's provisioning")
            for n in old:
                await self.step(
                    "37 terminate the old server",
                    partial(
                        self.change,
                        provision.provision_destroy,
                        provision.ServerRequest(
                            provisioning=prov, name=n.name, inventory_dir=inventory_dir(inv)
                        ),
                        timeout=LONG,
                    ),
                    node=n.name,
                    seed_step="37",
                )
                terminated.append(n.name)
            await self.step(
                "37 release the warm replica",
                partial(self.change, replication.db_release_warm_replica, mysql.DbRequest(db=db)),
                seed_step="37",
            )
            self.timeline.record(f"38 test balancer {test_lb.name} empty", "ok", seed_step="38")
        else:
            self.timeline.record("37-38 terminate", "skipped", seed_step="37", detail="kept at the gate")
        self.timeline.set_phase("done")
        return self._result(inp, package, old, plan, False, tuple(snapshots), tuple(terminated))

    # ------------------------------------------------------------------ preflight
    async def _preflight(
        self, inp: MajorMaintenanceInput
    ) -> tuple[
        LoadBalancer,
        LoadBalancer,
        list[Node],
        deploy.PackageInfo,
        Database,
        list[deploy.MigrationSpec],
        tuple[str, ...],
    ]:
        inv = inp.inventory
        try:
            package: deploy.PackageInfo = await self.timeline.step(
                "P1 inspect package",
                self.read(deploy.inspect_package, deploy.PackageRequest(path=inp.package_path)),
                seed_step="P1",
            )
        except ActivityError as e:
            raise preflight_failed([f"package: {reason(e)}"], [e]) from None
        problems: list[str] = []
        lbs = {x.name: x for x in inv.load_balancers}
        lb = lbs.get(inp.lb) if inp.lb else (inv.load_balancers[0] if inv.load_balancers else None)
        test_lb = lbs.get(inp.test_lb)
        if lb is None or lb.kind != "haproxy":
            raise preflight_failed(
                [f"load balancer {inp.lb or '(first)'}: an haproxy balancer is needed"], []
            )
        if lb.maintenance is None:
            problems.append(f"load balancer {lb.name}: no maintenance switch (step 18's page)")
        if test_lb is None or test_lb.kind != "haproxy" or not test_lb.frontend_url:
            problems.append(
                f"test balancer {inp.test_lb!r}: an haproxy balancer with a frontend_url is needed "
                "(steps 7-11)"
            )
        old = [n for n in inv.nodes if n.name in lb.members]
        if not old:
            problems.append(f"load balancer {lb.name} has no members: no old server to replace")
        if inv.provisioning is None:
            problems.append("provisioning: the inventory declares none (how new servers are created)")
        db = inv.databases[0] if inv.databases else None
        if db is None:
            problems.append("databases: the procedure needs the site's database")
        elif db.kind != "mysql":
            problems.append(
                f"databases[0] {db.name} is {db.kind}: the warm replica (steps 5-6, 20-22, 30) is "
                "MariaDB / MySQL replication, which this database cannot do"
            )
        else:
            for what, ok in (
                ("warm_replica", db.warm_replica is not None),
                ("backup_dir", bool(db.backup_dir)),
                ("scratch_database", bool(db.scratch_database)),
            ):
                if not ok:
                    problems.append(f"databases[0].{what}: required (steps 1, 5-6, 20-22, 30)")
        names = inp.new_names or default_names(old, package.version)
        if len(names) != len(old):
            problems.append(f"new_names: {len(names)} name(s) for {len(old)} old server(s)")
        taken = {n.name for n in inv.nodes}
        problems += [f"new server name {nm!r} is already a node" for nm in names if nm in taken]
        for gate in ("go-live", "terminate"):
            if not inv.approvers.get(gate):
                problems.append(f"gate {gate}: the inventory lists no approvers for it")
        if problems:
            raise preflight_failed(problems, [])
        db, test_lb = required(db, "the database"), required(test_lb, "the test load balancer")
        self.previous = await self.preflight_nodes(inv, old, package)
        try:
            schema: int = await self.timeline.step(
                "P4 database reachable",
                self.read(mysql.db_schema_version, mysql.DbRequest(db=db)),
                seed_step="P4",
            )
        except ActivityError as e:
            raise preflight_failed([f"database: {reason(e)}"], [e]) from None
        pending = [m for m in package.migrations if m.version > schema]
        return lb, test_lb, old, package, db, pending, tuple(names)

    def _plan(
        self,
        inp: MajorMaintenanceInput,
        lb: LoadBalancer,
        test_lb: LoadBalancer,
        old: list[Node],
        package: deploy.PackageInfo,
        db: Database,
        pending: list[deploy.MigrationSpec],
        names: tuple[str, ...],
    ) -> tuple[str, ...]:
        olds = ", ".join(n.name for n in old)
        warm = db.warm_replica
        return (
            f"major upgrade of site {inp.inventory.site} to {package.name} {package.version} "
            f"({package.sha256[:12]}) with downtime: {len(old)} new server(s) for {olds} on {lb.name}",
            f"1 back up {db.database}, restore into {db.scratch_database}, compare checksums",
            f"5-6 warm replica {warm.host}:{warm.port} from the primary" if warm else "5-6 (no warm replica)",
            f"7-11 clone {names[0]} (old code), test through {test_lb.name} {test_lb.frontend_url}",
            f"12-13 {package.version} on {names[0]}, clones {', '.join(names[1:]) or 'none'}"
            + (
                " (stopped until the migration)"
                if inp.inventory.application.restart_after_migration
                else " (started and tested now: no restart after the migration)"
            ),
            "17-18 BEGIN DOWNTIME: maintenance page on",
            f"19 stop {olds}; writes quiet {inp.writes_quiet_s:g}s; 20 snapshot; 21 replica in sync; "
            "22 replication stopped",
            "23 migrations "
            + (", ".join(str(m.version) for m in pending) or "(none)")
            + ": POINT OF NO RETURN",
            f"24-29 detach {olds}, "
            + ("start and " if inp.inventory.application.restart_after_migration else "")
            + f"attach {', '.join(names)}",
            f"30 test each new server and through {lb.name} behind the page, gate go-live (or revert "
            "by promotion); 31 page off; 32 snapshot; 33 END DOWNTIME",
            "37-38 gate terminate: old servers, warm replica, test balancer",
        )

    # ------------------------------------------------------------------ steps
    async def _verify_backup(self, db: Database, key: str) -> None:
        backup = await self.back_up_database(
            db, f"{key}-db-1", "1 back up the database", "1", "database backup (step 1)"
        )
        scratch = dataclasses.replace(db, database=db.scratch_database or "")
        try:
            restored: mysql.DbRestoreResult = await self.step(
                "1 the backup restores (checksums)",
                partial(self.change, mysql.db_restore, dataclasses.replace(backup, db=scratch), timeout=LONG),
                seed_step="1",
            )
            if restored.mismatched:
                raise ApplicationError(
                    f"the backup did not restore: {', '.join(restored.mismatched)} differ",
                    type=BACKUP_INCONSISTENT,
                    non_retryable=True,
                )
        finally:
            await self.step(
                "1 drop the restored copy",
                partial(
                    self.change,
                    mysql.db_drop_database,
                    mysql.DropDatabaseRequest(db=db, database=scratch.database),
                ),
                seed_step="1",
            )

    async def _clone(self, inp: MajorMaintenanceInput, template: Node, name: str, seed: str) -> Node:
        inv = inp.inventory
        prov = required(inv.provisioning, "the inventory's provisioning")
        self.saga.register(f"new server {name}", partial(self._destroy_new, inp, name))
        n: Node = await self.step(
            f"{seed} clone from {template.name}",
            partial(
                self.change,
                provision.provision_create,
                provision.CreateServerRequest(
                    provisioning=prov, template=template, name=name, inventory_dir=inventory_dir(inv)
                ),
                timeout=LONG,
            ),
            node=name,
            seed_step=seed,
        )
        self.state.new_nodes[name] = n
        return n

    async def _launch(self, inp: MajorMaintenanceInput, n: Node, version: str) -> None:
        inv = inp.inventory
        prov = required(inv.provisioning, "the inventory's provisioning")
        await self.change(
            provision.provision_start,
            provision.ServerRequest(provisioning=prov, name=n.name, inventory_dir=inventory_dir(inv)),
            timeout=LONG,
        )
        await self._start_checked(inv, n, version)

    async def _start_checked(self, inv: Inventory, n: Node, version: str) -> None:
        await self.start(n)
        await self.check_running(inv, n, version)

    async def _serving(self, inv: Inventory, n: Node, version: str) -> None:
        """check_running in one activity (health, version, login): inside the window."""
        app = inv.application
        timeout_s = inv.rollout.health_timeout_s
        await self.wait(
            http_checks.check_serving,
            http_checks.ServingRequest(
                base_url=n.url,
                health=app.health,
                version=app.version,
                expect=version,
                login=app.login,
                timeout_s=timeout_s,
                interval_s=WINDOW_POLL_S,
            ),
            timeout_s,
        )

    async def _replica_in_sync_then_stopped(self, inp: MajorMaintenanceInput, db: Database) -> None:
        await self.step(
            "21 warm replica in sync",
            partial(
                self.wait,
                replication.db_wait_replica_in_sync,
                replication.WaitSyncRequest(db=db, timeout_s=inp.replica_timeout_s),
                inp.replica_timeout_s,
            ),
            seed_step="21",
        )
        await self.step(
            "22 stop replication, keep the replica",
            partial(self.change, replication.db_stop_replication, mysql.DbRequest(db=db), local=True),
            seed_step="22",
        )

    async def _start_new(self, inp: MajorMaintenanceInput, n: Node, first: str) -> None:
        """26-29 for a new server that could not run before the migration."""
        inv = inp.inventory
        prov = required(inv.provisioning, "the inventory's provisioning")
        if n.name != first:  # the clones were never launched
            await self.step(
                "26-29 launch the new server",
                partial(
                    self.change,
                    provision.provision_start,
                    provision.ServerRequest(provisioning=prov, name=n.name, inventory_dir=inventory_dir(inv)),
                    timeout=LONG,
                ),
                node=n.name,
                seed_step="26",
            )
        await self.step("26-29 start the new server", partial(self.start, n), node=n.name, seed_step="26")

    async def _preview(
        self, lb: LoadBalancer, inv: Inventory, names: tuple[str, ...], package: deploy.PackageInfo
    ) -> None:
        """Every new server answers through the balancer on the new version and the migrated
        schema, while everyone else still gets the page (a one-time preview entry)."""
        await self.read(
            haproxy.lb_preview_check,
            haproxy.PreviewCheckRequest(
                lb=lb,
                check=inv.application.version,
                expect_version=package.version,
                expect_nodes=names,
                expect_db_schema=package.schema_version,
            ),
            local=True,
        )

    async def _attach(self, lb: LoadBalancer, n: Node, seed: str) -> None:
        (self.state.on_test if lb.name != self.main_lb else self.state.on_main).append(n.name)
        await self.attach(lb, n, seed, local=True)

    async def _detach(self, lb: LoadBalancer, name: str, seed: str, old_server: bool = False) -> None:
        await self.step(
            f"{seed} detach from {lb.name}",
            partial(
                self.change,
                haproxy.lb_del_server,
                haproxy.DelServerRequest(lb=with_member(lb, name), node=name),
                local=True,
            ),
            node=name,
            seed_step=seed,
        )
        for attached in (self.state.on_test, self.state.on_main):
            if name in attached:
                attached.remove(name)
        if old_server:
            self.state.old_detached.append(name)

    async def _test_through(self, inv: Inventory, lb: LoadBalancer, version: str, times: int) -> None:
        for _ in range(times):
            await self.read(
                http_checks.get_version,
                http_checks.VersionRequest(
                    base_url=lb.frontend_url or "", check=inv.application.version, expect=version
                ),
            )

    async def _page(self, lb: LoadBalancer, on: bool) -> None:
        # Local (no server round trip): it opens and closes the downtime.
        await self.change(haproxy.lb_set_maintenance, haproxy.MaintenanceRequest(lb=lb, on=on), local=True)

    async def _start_old(self, inv: Inventory, old: list[Node]) -> None:
        for n in old:
            await self.timeline.step("rollback: start the old server", self.start(n), node=n.name)
            await self.timeline.step(
                "rollback: healthy, previous version",
                self.check_running(inv, n, self.previous[n.name]),
                node=n.name,
            )

    async def _release_warm(self, db: Database) -> None:
        if self.state.reverted:
            self.timeline.record(
                "rollback: keep the warm replica", "skipped", detail="promoted: it is the site's database now"
            )
            return
        await self.timeline.step(
            "rollback: release the warm replica",
            self.change(replication.db_release_warm_replica, mysql.DbRequest(db=db)),
        )

    async def _destroy_new(self, inp: MajorMaintenanceInput, name: str) -> None:
        inv = inp.inventory
        prov = required(inv.provisioning, "the inventory's provisioning")
        lbs = {x.name: x for x in inv.load_balancers}
        for attached, lb_name in ((self.state.on_main, self.main_lb), (self.state.on_test, inp.test_lb)):
            if name in attached:
                lb = with_member(lbs[lb_name], name)
                await self.timeline.step(
                    f"rollback: detach from {lb.name}",
                    self.change(
                        haproxy.lb_del_server, haproxy.DelServerRequest(lb=lb, node=name, force=True)
                    ),
                    node=name,
                )
                attached.remove(name)
        await self.timeline.step(
            "rollback: destroy",
            self.change(
                provision.provision_destroy,
                provision.ServerRequest(provisioning=prov, name=name, inventory_dir=inventory_dir(inv)),
                timeout=LONG,
            ),
            node=name,
        )

    async def _revert(
        self,
        inp: MajorMaintenanceInput,
        lb: LoadBalancer,
        test_lb: LoadBalancer,
        db: Database,
        old: list[Node],
    ) -> None:
        """Past the point of no return: the old code on the data as it was at step 19."""
        inv = inp.inventory
        # The new servers out first: no user may reach the new code once the page is lifted.
        for name in list(self.state.on_main):
            await self.timeline.step(
                f"revert: detach from {lb.name}",
                self.change(
                    haproxy.lb_del_server,
                    haproxy.DelServerRequest(lb=with_member(lb, name), node=name, force=True),
                ),
                node=name,
            )
            self.state.on_main.remove(name)
        for name in self.state.new_nodes:
            await self.timeline.step(
                "revert: stop the new server", self.stop(self.state.new_nodes[name]), node=name
            )
        warm: DatabaseEndpoint = await self.timeline.step(
            "revert: promote the warm replica",
            self.change(replication.db_promote_warm_replica, mysql.DbRequest(db=db)),
        )
        self.state.reverted = True
        cfg = inv.application.database_config
        for n in old:
            if cfg is not None:
                await self.timeline.step(
                    "revert: point it at the promoted replica",
                    self.change(
                        node.set_config_values,
                        node.ConfigValuesRequest(
                            node=n,
                            file=cfg.file,
                            values={cfg.host_key: warm.host, cfg.port_key: str(warm.port)},
                        ),
                    ),
                    node=n.name,
                )
            await self.timeline.step("revert: start the old server", self.start(n), node=n.name)
            await self.timeline.step(
                "revert: healthy, previous version",
                self.check_running(inv, n, self.previous[n.name]),
                node=n.name,
            )
            if n.name in self.state.old_detached:
                await self.timeline.step(
                    f"revert: attach to {lb.name}",
                    self.change(
                        haproxy.lb_add_server,
                        haproxy.AddServerRequest(lb=lb, node=n.name, address=server_address(n)),
                    ),
                    node=n.name,
                )
            await self.timeline.step(f"revert: wait UP on {lb.name}", self.wait_up(lb, n), node=n.name)
        await self.timeline.step("revert: maintenance page off", self._page(lb, False))
        self.timeline.record(
            "revert: the site runs the old code on the promoted warm replica",
            "ok",
            detail=f"{warm.host}:{warm.port}; the migrated primary is left as it is",
        )

    # ------------------------------------------------------------------ helpers
    def _result(
        self,
        inp: MajorMaintenanceInput,
        package: deploy.PackageInfo,
        old: list[Node],
        plan: tuple[str, ...],
        dry_run: bool,
        snapshots: tuple[str, ...],
        terminated: tuple[str, ...] = (),
    ) -> MajorMaintenanceResult:
        return MajorMaintenanceResult(
            site=inp.inventory.site,
            version=package.version,
            old_servers=tuple(n.name for n in old),
            new_servers=tuple(self.state.new_nodes.values()),
            terminated=terminated,
            dry_run=dry_run,
            plan=plan,
            steps=tuple(self.timeline.steps),
            plan_hash=self.plan_hash,
            snapshots=snapshots,
            migration_s=self.migration_s,
            downtime_s=self.downtime_s,
        )


def old_version(previous: dict[str, str]) -> str:
    """The version the old servers run (preflight checked them all)."""
    return sorted(previous.values())[0] if previous else ""
