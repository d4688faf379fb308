"""`minor-blue-green`: RightScale's minor upgrade (seed 003), new servers beside the old.

The runbook, with the seed's step numbers:

  Preflight (read-only; any problem stops the run before anything is touched)
    the package is a valid release; the old servers (the balancer's members) answer, run,
    are healthy and may upgrade to it (Version Guard); provisioning and the health-check file
    are declared; the database answers and the package's migrations are all additive (a
    destructive one needs downtime: `major-maintenance-window`); the new names are free.
  1  snapshot (logical backup) of the database
  2  pre-upgrade migrations (additive only: old code keeps working on them)
  3  clone a server from a current one (the template)
  4  systems-level changes to each new server (the input's commands, if any)
  5  save a copy of the settings about to change (a CSV of the template's values)
  6  application-level changes: the new code (the package) and the new settings (each
     new server gets the settings; the later ones are clones of the first, with its code)
  7  launch the new server and test it: healthy (its database answers), new version, a log-on
  8-9  clone the tested new server until there are as many new servers as old, each tested
  10 disable the server array (if the inventory declares one, else "not applicable")
  11 attach the new servers to the load balancer, each checked UP
  12 drain the old servers by taking their health-check file away: HAProxy's
     `http-check disable-on-404` stops new sessions, the open ones finish untouched
  13 wait until the old servers hold zero sessions; past `drain_deadline_s` the gate
     `drain-deadline` offers wait (longer) / force (detach, closing what is left) / rollback
  14 detach the old servers from the load balancer
  15-16 the server array (if declared): enabled again
  17 test the site through the balancer: only the new version answers, a user can log on
  18 gate `terminate`: terminate / keep / rollback; then each old server, checked again to
     hold no session, is terminated

Rollback (a failure, a rejection, `rollback` at a gate, a cancel) before step 18: the old
servers get their health file back and are re-attached, the new ones are detached and
destroyed, the saved settings and the snapshot are kept; the snapshot is restored only if
an operator chooses so at the gate `restore-snapshot` (the migrations were additive, so the
old code runs on the new schema: keeping it is the default).
"""

from __future__ import annotations

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
    from inventory.model import Database, Inventory, LoadBalancer, Node, SecretRef, secret_keys_of

from errors import DRAIN_TIMEOUT, GATE_REJECTED, INVALID_INPUT, SESSIONS_OPEN
from workflows.gates import GateSpec
from workflows.procedure import LONG, OnFailure, ProcedureOptions, required
from workflows.saga import reason
from workflows.site_steps import (
    SiteProcedure,
    default_names,
    error_type,
    inventory_dir,
    preflight_failed,
    run_key,
    server_address,
    with_member,
)
from workflows.timeline import StepRecord

PROCEDURE = "minor-blue-green"
DRAIN_CHOICES = ("wait", "force", "rollback")
TERMINATE_CHOICES = ("terminate", "keep", "rollback")
SNAPSHOT_CHOICES = ("keep", "restore")
# The gate restore-snapshot names the tables written since the snapshot: a restore undoes
# those writes, acknowledged by the new servers while they served (issue 17.7).
PATCH_SNAPSHOT_LOSS = "minor-blue-green-snapshot-loss-named-v1"


@dataclass(frozen=True)
class MinorBlueGreenInput(ProcedureOptions):
    inventory: Inventory
    # The new release (seed step 6's "latest application code").
    package_path: str
    # The load balancer whose members are the old servers (default: the first one).
    lb: str = ""
    # The server cloned first (default: the balancer's first member).
    template: str = ""
    # Names of the new servers, one per old server (default: <old>-v<version>).
    new_names: tuple[str, ...] = ()
    # Seed step 6's inputs: file (key = value, in the app folder) -> key -> value, set on the
    # new servers only; step 5 saves the template's current values first.
    settings: dict[str, dict[str, str]] = field(default_factory=dict)
    # Step 6's secret inputs: file -> key -> a reference (env / file) resolved on the worker,
    # so the value never enters the history; a key the inventory marks secret
    # (application.secret_keys) is set only this way.
    secret_settings: dict[str, dict[str, SecretRef]] = field(default_factory=dict)
    # Seed step 4: commands run on each new server before it is launched.
    system_commands: tuple[str, ...] = ()
    # Step 13: how long the old servers' sessions may take before the gate asks.
    drain_deadline_s: float = 300.0
    # This procedure's default on a failed step: roll back at once (ProcedureOptions).
    on_failure: OnFailure = field(default="rollback", kw_only=True)


@dataclass(frozen=True)
class MinorBlueGreenResult:
    site: str
    version: str
    old_servers: tuple[str, ...]
    # The new servers' inventory entries (what the site's inventory should list from now on).
    new_servers: tuple[Node, ...]
    terminated: tuple[str, ...]
    dry_run: bool
    plan: tuple[str, ...]
    steps: tuple[StepRecord, ...]
    plan_hash: str = ""
    db_snapshot: str | None = None
    settings_copy: tuple[str, ...] = ()
    drain_s: float = 0.0
    forced_detach: bool = False


def settings_keys(inp: MinorBlueGreenInput) -> dict[str, tuple[str, ...]]:
    """Step 6's files (sorted) -> the keys set in each (sorted), values and secrets alike."""
    files = sorted(set(inp.settings) | set(inp.secret_settings))
    return {
        f: tuple(sorted(set(inp.settings.get(f, {})) | set(inp.secret_settings.get(f, {})))) for f in files
    }


@dataclass
class BlueGreenState:
    """What exists so far: the compensations undo exactly this."""

    created: list[str] = field(default_factory=list)
    new_nodes: dict[str, Node] = field(default_factory=dict)
    attached: list[str] = field(default_factory=list)
    drained: list[str] = field(default_factory=list)
    detached: list[str] = field(default_factory=list)


@workflow.defn(name="minor-blue-green")
class MinorBlueGreenWorkflow(SiteProcedure):
    procedure = PROCEDURE

    def __init__(self) -> None:
        super().__init__()
        self.state = BlueGreenState()
        self.drain_s = 0.0
        self.forced = False
        self.terminate = False

    @workflow.run
    async def run(self, inp: MinorBlueGreenInput) -> MinorBlueGreenResult:
        inv = inp.inventory
        self.begin(inp)
        self.timeline.set_phase("preflight")
        lb, old, package, db, pending, names = await self._preflight(inp)
        self.timeline.nodes_total = len(old)
        plan = self._plan(inp, lb, old, package, db, pending, names)
        if self.planned(inp, inv.approvers, plan, inv.approver_keys):
            return self._result(inp, package, old, plan, True, None, ())

        snapshot: list[mysql.DbBackup] = []
        saved: list[str] = []

        async def changes() -> None:
            if db is not None:
                # 1 snapshot, before anything touches the database.
                self.timeline.set_phase("database")
                snapshot.append(
                    await self.back_up_database(
                        db, f"{run_key()}-db", "1 snapshot the database", "1", "database snapshot"
                    )
                )
                self.saga.register(
                    "database snapshot (restored only if chosen)",
                    partial(self._maybe_restore_snapshot, inp, db, snapshot[0]),
                )
                # 2 pre-upgrade migrations: additive (preflight refused any other).
                await self.run_script(db, pending, "2 pre-upgrade migration", "2")
            # 3 to 7: the first new server, cloned from a current one.
            self.timeline.set_phase("new servers", names[0])
            template = inv.node(inp.template) if inp.template else old[0]
            first = await self._new_server(inp, template, names[0], package, saved, first=True)
            # 8, 9: clone the tested new server until there are as many new as old.
            for name in names[1:]:
                self.timeline.set_phase("new servers", name)
                await self._new_server(inp, first, name, package, saved, first=False)
            # 10 the server array may no longer launch old servers.
            await self._array(inv, "disable", "10")
            # 11 attach the new servers.
            self.timeline.set_phase("attach the new servers")
            for name in names:
                await self._attach(lb, self.state.new_nodes[name], "11")
            # 12 drain the old ones: their health-check file goes away.
            self.timeline.set_phase("drain the old servers")
            for n in old:
                self.saga.register(
                    f"old server {n.name} back in {lb.name}", partial(self._reattach_old, inv, lb, n)
                )
                await self.step(
                    "12 take the health-check file away",
                    partial(
                        self.change,
                        node.set_health_file,
                        node.HealthFileRequest(node=n, path=inv.application.health_file or "", present=False),
                    ),
                    node=n.name,
                    seed_step="12",
                )
                self.state.drained.append(n.name)
            # 13 wait for zero sessions (a gate when the deadline passes).
            await self._wait_sessions_end(inp, lb, old)
            # 14 detach the old servers.
            self.timeline.set_phase("detach the old servers")
            for n in old:
                await self.step(
                    f"14 detach from {lb.name}",
                    partial(
                        self.change,
                        haproxy.lb_del_server,
                        haproxy.DelServerRequest(lb=lb, node=n.name, force=self.forced),
                    ),
                    node=n.name,
                    seed_step="14",
                )
                self.state.detached.append(n.name)
            # 15, 16 the server array launches (new) servers again.
            await self._array(inv, "enable", "16")
            # 17 test the site through the balancer.
            self.timeline.set_phase("test the site")
            await self.step(
                "17 test the site through the load balancer",
                partial(self._test_site, inv, lb, package.version, len(names)),
                seed_step="17",
            )
            # 18 the gate before terminating; a rollback from here still has every old server.
            decision = await self.gates.wait(
                GateSpec(
                    name="terminate",
                    guards=f"terminate the old servers {', '.join(n.name for n in old)} "
                    "(keep: leave them detached, stopped later by hand)",
                    timeout_s=inp.gate_timeout_s,
                    on_timeout="keep",
                    choices=TERMINATE_CHOICES,
                )
            )
            if decision.choice == "rollback":
                raise ApplicationError(
                    f"rollback chosen at gate terminate by {decision.by}",
                    type=GATE_REJECTED,
                    non_retryable=True,
                )
            self.terminate = decision.choice == "terminate"

        self.guided = inp.on_failure == "ask"
        await self.run_changes(changes, f"{PROCEDURE} to {package.version}")
        # Past the gate the upgrade stands: terminating is cleanup, it never rolls back.
        self.guided = inp.on_failure == "ask"
        terminated: list[str] = []
        if self.terminate:
            self.timeline.set_phase("terminate the old servers")
            for n in old:
                await self.step(
                    "18 terminate (no session left)",
                    partial(self._terminate, inp, n),
                    node=n.name,
                    seed_step="18",
                )
                terminated.append(n.name)
                self.timeline.node_done(n.name)
        else:
            self.timeline.record(
                "18 terminate the old servers",
                "skipped",
                seed_step="18",
                detail="kept at the gate terminate: detached, still running",
            )
        self.timeline.set_phase("done")
        return self._result(
            inp,
            package,
            old,
            plan,
            False,
            snapshot[0].path if snapshot else None,
            tuple(saved),
            tuple(terminated),
        )

    # ------------------------------------------------------------------ preflight
    async def _preflight(
        self, inp: MinorBlueGreenInput
    ) -> tuple[
        LoadBalancer,
        list[Node],
        deploy.PackageInfo,
        Database | None,
        list[deploy.MigrationSpec],
        tuple[str, ...],
    ]:
        inv = inp.inventory
        problems: list[str] = []
        try:
            package: deploy.PackageInfo = await self.timeline.step(
                "P1 inspect package",
                self.read(deploy.inspect_package, deploy.PackageRequest(path=inp.package_path)),
                seed_step="P1",
            )
        except ActivityError as e:
            raise preflight_failed([f"package: {reason(e)}"], [e]) from None
        lbs = {lb.name: lb for lb in inv.load_balancers}
        lb = lbs.get(inp.lb) if inp.lb else (inv.load_balancers[0] if inv.load_balancers else None)
        if lb is None:
            raise preflight_failed(
                [f"load balancer {inp.lb!r}: not in the inventory (known: {', '.join(lbs) or 'none'})"], []
            )
        if lb.kind != "haproxy":
            raise preflight_failed(
                [
                    f"load balancer {lb.name}: kind {lb.kind} cannot attach servers at "
                    "run time yet (haproxy can)"
                ],
                [],
            )
        old = [n for n in inv.nodes if n.name in lb.members]
        if not old:
            raise preflight_failed([f"load balancer {lb.name} has no members: no old server to replace"], [])
        if inp.template and inp.template not in {n.name for n in old}:
            problems.append(
                f"template {inp.template!r}: not a member of {lb.name} ({', '.join(n.name for n in old)})"
            )
        if inv.provisioning is None:
            problems.append("provisioning: the inventory declares none (how new servers are created)")
        if not inv.application.health_file:
            problems.append("application.health_file: not declared (step 12 drains by removing it)")
        names = inp.new_names or default_names(old, package.version)
        if len(names) != len(old):
            problems.append(f"new_names: {len(names)} name(s) for {len(old)} old server(s)")
        taken = {n.name for n in inv.nodes} | set(lb.members.values())
        for nm in names:
            if nm in taken:
                problems.append(f"new server name {nm!r} is already a node or a server of {lb.name}")
        if len(set(names)) != len(names):
            problems.append("new_names: a name appears twice")
        db = inv.databases[0] if inv.databases else None
        if db is not None and (problem := deploy.database_problem(package, db.kind)):
            # Migrations in another database's dialect: refused before anything is touched.
            problems.append(problem)
        for file, values in sorted(inp.settings.items()):
            for key in sorted(set(values) & set(secret_keys_of(inv.application, file))):
                # The value is not repeated: it is a secret.
                problems.append(
                    f"settings: {file}:{key} is a secret (application.secret_keys); give it as "
                    f"--secret-setting {file}:{key}=env:NAME (or file:PATH), never as a value"
                )
            for key in sorted(set(values) & set(inp.secret_settings.get(file, {}))):
                problems.append(f"settings: {file}:{key} is given both as a value and as a secret")
        if (inp.settings or inp.secret_settings) and (db is None or not db.backup_dir):
            problems.append(
                "settings: step 5 saves a copy of them into the database's backup_dir, "
                "which the inventory does not declare"
            )
        if not inv.approvers.get("terminate"):
            problems.append(
                "gate terminate: the inventory lists no approvers for it "
                "(approvers: {terminate: [name, ...]})"
            )
        if problems:
            raise preflight_failed(problems, [])
        await self.preflight_nodes(inv, old, package)
        pending: list[deploy.MigrationSpec] = []
        if db is None and package.migrations:
            raise preflight_failed(
                [
                    f"package: {package.name} {package.version} carries migrations "
                    "but the inventory declares no database"
                ],
                [],
            )
        if db is not None:
            try:
                schema: int = await self.timeline.step(
                    "P4 database reachable",
                    self.read(mysql.db_schema_version, mysql.DbRequest(db=db)),
                    seed_step="P4",
                )
            except ActivityError as e:
                raise preflight_failed([f"database: {reason(e)}"], [e]) from None
            pending = [m for m in package.migrations if m.version > schema]
            destructive = [m.version for m in pending if m.destructive]
            if destructive:
                raise preflight_failed(
                    [
                        f"package: migration(s) {', '.join(map(str, destructive))} are marked destructive: "
                        "old servers could not run beside the new ones on that schema; upgrade with "
                        "major-maintenance-window (site downtime) instead"
                    ],
                    [],
                )
            space: mysql.BackupSpace = await self.timeline.step(
                "P4 room for the database snapshot",
                self.read(
                    mysql.check_backup_space, mysql.BackupSpaceRequest(db=db, directory=db.backup_dir or "")
                ),
                seed_step="P4",
            )
            if not space.ok:
                raise preflight_failed([f"database snapshot: {space.detail}"], [])
        return lb, old, package, db, pending, tuple(names)

    def _plan(
        self,
        inp: MinorBlueGreenInput,
        lb: LoadBalancer,
        old: list[Node],
        package: deploy.PackageInfo,
        db: Database | None,
        pending: list[deploy.MigrationSpec],
        names: tuple[str, ...],
    ) -> tuple[str, ...]:
        inv = inp.inventory
        template = inp.template or old[0].name
        prov = inv.provisioning
        array = prov.array.name if prov is not None and prov.array is not None else None
        plan = [
            f"minor upgrade of site {inv.site} to {package.name} {package.version} "
            f"({package.sha256[:12]}): "
            f"{len(old)} new server(s) beside {', '.join(n.name for n in old)} on {lb.name}"
        ]
        if db is not None:
            plan.append(f"1 snapshot database {db.database}")
            plan += [f"2 migration {m.version} (additive)" for m in pending] or ["2 no pre-upgrade migration"]
        plan.append(f"3 clone {names[0]} from {template} ({prov.kind if prov else '?'} provisioning)")
        plan.append(
            "4 " + ("; ".join(inp.system_commands) if inp.system_commands else "no systems-level change")
        )
        keys = [f"{f}: {', '.join(kv)}" for f, kv in settings_keys(inp).items()]
        plan.append("5 save the template's " + ("; ".join(keys) if keys else "(no settings change)"))
        plan.append(f"6 deploy {package.version} and the settings on {names[0]}")
        plan.append(f"7 launch {names[0]}, test health, version {package.version}, log-on")
        plan += [f"8-9 clone {nm} from {names[0]}, launch, test" for nm in names[1:]]
        plan.append(f"10 disable server array {array}" if array else "10 no server array: not applicable")
        plan.append(f"11 attach {', '.join(names)} to {lb.name}")
        olds = ", ".join(n.name for n in old)
        plan.append(f"12 take the health file ({inv.application.health_file}) from {olds}")
        plan.append(
            f"13 wait for zero sessions (deadline {inp.drain_deadline_s:g}s, then gate drain-deadline)"
        )
        plan.append(f"14 detach {', '.join(n.name for n in old)} from {lb.name}")
        plan.append(
            f"15-16 enable server array {array}" if array else "15-16 no server array: not applicable"
        )
        plan.append("17 test the site through the load balancer")
        plan.append("18 gate terminate, then terminate the old servers (each checked to hold no session)")
        return tuple(plan)

    # ------------------------------------------------------------------ new servers
    async def _new_server(
        self,
        inp: MinorBlueGreenInput,
        template: Node,
        name: str,
        package: deploy.PackageInfo,
        saved: list[str],
        first: bool,
    ) -> Node:
        inv = inp.inventory
        prov = required(inv.provisioning, "the inventory's provisioning")
        where = inventory_dir(inv)
        self.saga.register(f"new server {name}", partial(self._destroy_new, inp, name))
        self.state.created.append(name)
        seed = "3" if first else "8"
        n: Node = await self.step(
            f"{seed} clone from {template.name}",
            partial(
                self.change,
                provision.provision_create,
                provision.CreateServerRequest(
                    provisioning=prov, template=template, name=name, inventory_dir=where
                ),
                timeout=LONG,
            ),
            node=name,
            seed_step=seed,
        )
        self.state.new_nodes[name] = n
        # 4 systems-level changes: on every new server (a clone may not carry what lies
        # outside the app folder).
        for i, command in enumerate(inp.system_commands, start=1):
            await self.step(
                f"4 systems-level change {i}",
                partial(
                    self.change,
                    node.run_node_command,
                    node.NodeCommandRequest(node=n, command=command),
                    timeout=LONG,
                ),
                node=name,
                seed_step="4",
            )
        if first and not inp.system_commands:
            self.timeline.record(
                "4 systems-level changes", "skipped", node=name, seed_step="4", detail="none requested"
            )
        if first:
            # 5 a copy of the settings about to change, taken from the server cloned.
            db = inv.databases[0] if inv.databases else None
            for i, (file, keys) in enumerate(settings_keys(inp).items()):
                copy: provision.SavedSettings = await self.step(
                    f"5 save {file}'s settings",
                    partial(
                        self.change,
                        provision.save_settings_copy,
                        provision.SaveSettingsRequest(
                            node=template,
                            file=file,
                            keys=keys,
                            backup_dir=db.backup_dir if db is not None and db.backup_dir else "",
                            backup_id=f"{run_key()}-{i}",
                            secret_keys=tuple(
                                sorted(
                                    set(inp.secret_settings.get(file, {}))
                                    | set(secret_keys_of(inv.application, file))
                                )
                            ),
                        ),
                    ),
                    node=template.name,
                    seed_step="5",
                )
                saved.append(copy.path)
                self.kept[f"settings copy {file}"] = copy.path
            # 6 the new code (the later servers are clones of this one: they carry it, and
            # their test checks the version they run).
            app = inv.application
            await self.step(
                f"6 deploy {package.version}", partial(self.deploy, app, n, package), node=name, seed_step="6"
            )
        # 6 the new settings, on every new server (a clone's own keys are rewritten by its
        # provisioning: setting them again is what keeps them).
        for file, keys in settings_keys(inp).items():
            await self.step(
                f"6 set {file}: {', '.join(keys)}",
                partial(
                    self.change,
                    node.set_config_values,
                    node.ConfigValuesRequest(
                        node=n,
                        file=file,
                        values=dict(inp.settings.get(file, {})),
                        secret_values=dict(inp.secret_settings.get(file, {})),
                    ),
                ),
                node=name,
                seed_step="6",
            )
        # 7 (9) launch and test: healthy (its database answers), new version, log-on.
        seed = "7" if first else "9"
        await self.step(
            "launch",
            partial(
                self.change,
                provision.provision_start,
                provision.ServerRequest(provisioning=prov, name=name, inventory_dir=where),
                timeout=LONG,
            ),
            node=name,
            seed_step=seed,
        )
        await self.step("start service", partial(self.start, n), node=name, seed_step=seed)
        await self.step(
            f"test: healthy, version {package.version}, log-on",
            partial(self.check_running, inv, n, package.version),
            node=name,
            seed_step=seed,
        )
        return n

    async def _attach(self, lb: LoadBalancer, n: Node, seed_step: str) -> None:
        self.state.attached.append(n.name)
        await self.attach(lb, n, seed_step)

    async def _array(self, inv: Inventory, verb: str, seed_step: str) -> None:
        prov = inv.provisioning
        if prov is None or prov.array is None:
            self.timeline.record(
                f"{seed_step} {verb} the server array",
                "skipped",
                seed_step=seed_step,
                detail="not applicable: the inventory declares no server array",
            )
            return
        fn = provision.provision_array_disable if verb == "disable" else provision.provision_array_enable
        await self.step(
            f"{seed_step} {verb} server array {prov.array.name}",
            partial(
                self.change, fn, provision.ArrayRequest(provisioning=prov, inventory_dir=inventory_dir(inv))
            ),
            seed_step=seed_step,
        )
        if verb == "disable":
            self.saga.register(
                f"server array {prov.array.name} enabled again", partial(self._enable_array, inv)
            )

    async def _enable_array(self, inv: Inventory) -> None:
        prov = required(inv.provisioning, "the inventory's provisioning")
        array = required(prov.array, "provisioning.array")
        await self.timeline.step(
            f"rollback: enable server array {array.name}",
            self.change(
                provision.provision_array_enable,
                provision.ArrayRequest(provisioning=prov, inventory_dir=inventory_dir(inv)),
            ),
        )

    # ------------------------------------------------------------------ the drain
    async def _wait_sessions_end(self, inp: MinorBlueGreenInput, lb: LoadBalancer, old: list[Node]) -> None:
        self.timeline.set_phase("wait for the old servers' sessions to end")
        started = workflow.now()
        for n in old:
            while True:
                try:
                    await self.timeline.step(
                        "13 wait for zero sessions",
                        self.wait(
                            haproxy.lb_wait_drained,
                            haproxy.WaitRequest(lb=lb, node=n.name, timeout_s=inp.drain_deadline_s),
                            inp.drain_deadline_s,
                        ),
                        node=n.name,
                        seed_step="13",
                    )
                    break
                except ActivityError as e:
                    if error_type(e) != DRAIN_TIMEOUT:
                        raise
                    choice = await self._drain_gate(inp, n, e)
                    if choice == "wait":
                        continue
                    if choice == "force":
                        self.forced = True
                        break
                    raise ApplicationError(
                        f"rollback chosen at gate drain-deadline ({reason(e)})",
                        type=GATE_REJECTED,
                        non_retryable=True,
                    ) from None
            if self.forced:
                break
        self.drain_s = (workflow.now() - started).total_seconds()

    async def _drain_gate(self, inp: MinorBlueGreenInput, n: Node, e: BaseException) -> str:
        if not self.gates.approvers_of("drain-deadline"):
            self.timeline.record(
                "gate drain-deadline: nobody may decide it",
                "skipped",
                node=n.name,
                detail="the inventory lists no approvers for drain-deadline: rolling back",
            )
            return "rollback"
        record = await self.gates.wait(
            GateSpec(
                name="drain-deadline",
                guards=f"{reason(e)}: wait {inp.drain_deadline_s:g}s more, force the "
                "detach (open sessions are closed) or roll back",
                timeout_s=inp.gate_timeout_s,
                on_timeout="rollback",
                choices=DRAIN_CHOICES,
            )
        )
        return record.choice or "rollback"

    async def _test_site(self, inv: Inventory, lb: LoadBalancer, version: str, servers: int) -> None:
        base = lb.frontend_url or inv.application.url
        if not base:
            raise ApplicationError(
                f"load balancer {lb.name}: no frontend_url nor application.url to test the site through",
                type=INVALID_INPUT,
                non_retryable=True,
            )
        # Round robin: twice as many requests as servers reach each at least once.
        for _ in range(2 * servers):
            await self.read(
                http_checks.get_version,
                http_checks.VersionRequest(base_url=base, check=inv.application.version, expect=version),
            )
        if inv.application.login is not None:
            await self.read(
                http_checks.check_login, http_checks.LoginRequest(base_url=base, check=inv.application.login)
            )

    async def _terminate(self, inp: MinorBlueGreenInput, n: Node) -> None:
        inv = inp.inventory
        prov = required(inv.provisioning, "the inventory's provisioning")
        left: node.OpenSessions = await self.read(node.count_open_sessions, node.ServiceRequest(node=n))
        if left.sessions:
            raise ApplicationError(
                f"{n.name} still holds {left.sessions} session(s) on port {left.port}: not terminated",
                type=SESSIONS_OPEN,
                non_retryable=True,
            )
        await self.change(
            provision.provision_destroy,
            provision.ServerRequest(provisioning=prov, name=n.name, inventory_dir=inventory_dir(inv)),
            timeout=LONG,
        )

    # ------------------------------------------------------------------ compensations
    async def _destroy_new(self, inp: MinorBlueGreenInput, name: str) -> None:
        inv = inp.inventory
        prov = required(inv.provisioning, "the inventory's provisioning")
        lb = self._lb(inp)
        n = self.state.new_nodes.get(name)
        if name in self.state.attached and n is not None:
            member = with_member(lb, name)
            await self.timeline.step(
                f"rollback: drain on {lb.name}",
                self.change(
                    haproxy.lb_set_state, haproxy.SetStateRequest(lb=member, node=name, state="drain")
                ),
                node=name,
            )
            await self.timeline.step(
                f"rollback: wait for zero sessions on {lb.name}",
                self.wait(
                    haproxy.lb_wait_drained,
                    haproxy.WaitRequest(lb=member, node=name, timeout_s=lb.drain_timeout_s),
                    lb.drain_timeout_s,
                ),
                node=name,
            )
            await self.timeline.step(
                f"rollback: detach from {lb.name}",
                self.change(haproxy.lb_del_server, haproxy.DelServerRequest(lb=member, node=name)),
                node=name,
            )
        await self.timeline.step(
            "rollback: destroy",
            self.change(
                provision.provision_destroy,
                provision.ServerRequest(provisioning=prov, name=name, inventory_dir=inventory_dir(inv)),
                timeout=LONG,
            ),
            node=name,
        )

    async def _reattach_old(self, inv: Inventory, lb: LoadBalancer, n: Node) -> None:
        if n.name in self.state.detached:
            await self.timeline.step(
                f"rollback: attach to {lb.name}",
                self.change(
                    haproxy.lb_add_server,
                    haproxy.AddServerRequest(lb=lb, node=n.name, address=server_address(n)),
                ),
                node=n.name,
            )
        await self.timeline.step(
            "rollback: put the health-check file back",
            self.change(
                node.set_health_file,
                node.HealthFileRequest(node=n, path=inv.application.health_file or "", present=True),
            ),
            node=n.name,
        )
        await self.rollback_ready(lb, n)

    async def _maybe_restore_snapshot(
        self, inp: MinorBlueGreenInput, db: Database, snapshot: mysql.DbBackup
    ) -> None:
        if not self.gates.approvers_of("restore-snapshot"):
            self.timeline.record(
                "keep the database as migrated",
                "skipped",
                detail=(
                    f"the migrations were additive; nobody may decide restore-snapshot; snapshot kept at "
                    f"{snapshot.path}"
                ),
            )
            return
        loss = ""
        if workflow.patched(PATCH_SNAPSHOT_LOSS):
            changed: tuple[str, ...] = await self.timeline.step(
                "tables written since the snapshot", self.read(mysql.db_changed_since, snapshot)
            )
            loss = (
                f"; a restore undoes every write since the snapshot to: {', '.join(changed)}"
                if changed
                else "; nothing was written since the snapshot"
            )
        record = await self.gates.wait(
            GateSpec(
                name="restore-snapshot",
                guards=f"restore database {db.database} from the snapshot "
                f"{snapshot.path} (the migrations were additive: keep is safe){loss}",
                timeout_s=inp.gate_timeout_s,
                on_timeout="keep",
                choices=SNAPSHOT_CHOICES,
            )
        )
        if record.choice != "restore":
            self.timeline.record(
                "keep the database as migrated",
                "skipped",
                detail=f"{record.choice} at the gate; snapshot kept at {snapshot.path}",
            )
            return
        await self.timeline.step(
            "rollback: restore the database snapshot", self.change(mysql.db_restore, snapshot, timeout=LONG)
        )

    # ------------------------------------------------------------------ helpers
    def _lb(self, inp: MinorBlueGreenInput) -> LoadBalancer:
        inv = inp.inventory
        return next(lb for lb in inv.load_balancers if lb.name == inp.lb) if inp.lb else inv.load_balancers[0]

    def _result(
        self,
        inp: MinorBlueGreenInput,
        package: deploy.PackageInfo,
        old: list[Node],
        plan: tuple[str, ...],
        dry_run: bool,
        snapshot: str | None,
        saved: tuple[str, ...],
        terminated: tuple[str, ...] = (),
    ) -> MinorBlueGreenResult:
        return MinorBlueGreenResult(
            site=inp.inventory.site,
            version=package.version,
            old_servers=tuple(n.name for n in old),
            new_servers=tuple(self.state.new_nodes.values()),
            terminated=terminated,
            dry_run=dry_run,
            plan=plan,
            steps=tuple(self.timeline.steps),
            plan_hash=self.plan_hash,
            db_snapshot=snapshot,
            settings_copy=saved,
            drain_s=self.drain_s,
            forced_detach=self.forced,
        )
