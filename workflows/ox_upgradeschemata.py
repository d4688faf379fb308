"""`ox-upgradeschemata`: Open-Xchange's per-schema upgrade (seed 002, steps 3 to 7, and the
`upgradeschemata` tool's semantics), driving OX's command line tools over SSH.

  Preflight (read-only; bad input is refused before anything is touched)
    the inventory's `ox:` section; the update node (runs the new release) and the admin
    node (a working old node) exist, answer over SSH and their tools work; the update node
    runs a different release than the admin node; the schema list (`listdatabaseschema`),
    the names given to `resume_from` / `skip` / `schemata` exist; concurrency 1 to 32.
  3  register the new server (`registerserver`); when a server with that name exists, the
     gate `server-already-registered` asks what the tool asks on its prompt: `continue`
     (use it) or `abort` (stop, nothing changed; also the default when nobody decides).
  For every schema, in OX's order (the number after the last '_', as the tool sorts for -m;
  listdatabaseschema promises no order), after `resume_from` (the tool's `-m`: skipping it;
  a name not listed is refused - the tool would silently start from the first) and leaving
  out `skip` (`-k`) and the schemata without contexts (currentunits 0: disableschema refuses
  them; recorded as skipped), at most `concurrency` at a time (1: the tool's behaviour):
    4  disable the schema (its contexts are refused as "disabled" from now on);
    5  point its contexts to the new server (`changeserver -s <id> -m <schema>`);
    6  run its update tasks on the update node (`runupdate -A -P -n <schema>`: 7.10.1+ requires
       the credentials; detached, so a retry attaches to the run under way, never doubles it);
    7  enable the schema: its users are served by the new server from now on (on the update
       node, the moment runupdate ended with every task run, as OX's own tool does there).
  Steps 4 to 7 of a schema are one activity (`ox_upgrade_schema`), recorded as four steps
  with the times they took: a schema is disabled only while its own tools run, not for
  three more workflow round trips. When its update fails:
    * `force` (`-f`): go on with the others; the failed schema is left disabled (its update
      tasks did not all run; the tool re-enables it, which serves half-updated data) and is
      reported with the error;
    * otherwise no new schema starts and the gate `failure:6@<schema>` offers `retry`
      (run its update again), `skip` (leave it disabled, go on), `revert` (disable, point it
      back to the old server and enable it, go on: changeserver refuses an enabled schema)
      and `abort` (stop here, leave it disabled, as the tool does); nobody deciding in time,
      or nobody listed for `failure`, means `abort` - the safe default: a revert would have
      old nodes serve a half-updated schema. `on_failure="rollback"` reverts and stops.
  Progress: the `schemata` query (done / failed / skipped / remaining / current). History:
  after `schemata_per_run` schemata the run continues as new, carrying its progress, so
  10,000 schemata never make one history of more than a few thousand events. A stopped
  run (cancel, abort) reports where to resume (`resume_from`). `drive_tool` runs OX's own
  `upgradeschemata` on the update node instead (the tool runs the update tasks itself),
  answering its prompt from the gate and reading its per-schema output.
Deterministic: only workflow APIs inside.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    import activities.ox as ox
    from inventory.model import Inventory, Node, OxSettings, UnknownNodeError

from errors import INVALID_INPUT, PROCEDURE_ABORTED, SCHEMA_UPGRADE_STOPPED, UNKNOWN_NODE
from workflows import timeouts
from workflows.gates import GateSpec
from workflows.ox_steps import (
    PATCH_ORDER_AND_EMPTY,
    REGISTERED_GATE,
    SchemaFailure,
    registered_gate,
    schema_order,
)
from workflows.procedure import HEARTBEAT, LONG, Procedure, ProcedureOptions
from workflows.saga import reason
from workflows.site_steps import preflight_failed
from workflows.timeline import StepRecord

PROCEDURE = "ox-upgradeschemata"
# Versioned changes (workflow.patched): runs started before them replay as they ran.
# A revert by the real tools' rules (disable, changeserver, enable: changeserver refuses an
# enabled schema) in one activity.
PATCH_REVERT = "ox-revert-by-tool-rules-v1"
# The failure gate's default (timeout, nobody listed to decide): stop and leave the schema
# disabled, as OX's tool does; reverting would serve a half-updated schema from old nodes.
PATCH_SAFE_DEFAULT = "ox-failure-default-leave-disabled-v1"
# runupdate detached under a per-try key, its activity timed by ox.runupdate_timeout_s.
PATCH_DETACHED_RUNUPDATE = "ox-detached-runupdate-v1"
# Step 7 on the update node, as runupdate's follow-up there (no trip through the worker while
# the schema is disabled); runs started before enable on the admin node.
PATCH_ENABLE_ON_UPDATE = "ox-enable-after-runupdate-on-update-node-v1"
# A continued run counts its gates' openings on from its predecessor's (OxCarried.
# gate_openings): a signed decision names the opening it decides (workflows/signatures.py),
# and the workflow id stays the same across continue-as-new.
PATCH_CARRY_GATE_OPENINGS = "ox-carry-gate-openings-v1"
SCHEMA_FAILURE_CHOICES = ("retry", "skip", "revert", "abort")
MAX_CONCURRENCY = 32


@dataclass(frozen=True)
class OxCarried:
    """What one run hands to the next when it continues as new (never set by a caller)."""

    server_id: int
    old_server_id: int
    registered: bool
    total: int
    # Every schema to upgrade, in OX's order; `remaining` is its tail not started yet.
    order: tuple[str, ...]
    remaining: tuple[str, ...]
    plan: tuple[str, ...]
    plan_hash: str
    upgraded_count: int = 0
    # Gate name -> how many times it opened in the runs before (PATCH_CARRY_GATE_OPENINGS).
    gate_openings: dict[str, int] = field(default_factory=dict)
    failed: tuple[SchemaFailure, ...] = ()
    left_disabled: tuple[str, ...] = ()
    reverted: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    passed_over: tuple[str, ...] = ()
    # Steps of a schema stopped half-way (cancelled at its failure gate): left as they are.
    interrupted: tuple[str, ...] = ()
    run: int = 1
    max_events_per_run: int = 0
    # Listed with no contexts (currentunits 0): nothing to upgrade, and disableschema refuses them.
    empty: tuple[str, ...] = ()


@dataclass(frozen=True)
class OxUpgradeSchemataInput(ProcedureOptions):
    inventory: Inventory
    # -n: the new (x.y.z) server's name, registered in step 3; its SERVER_NAME.
    server_name: str
    # The node running the new release: step 6 (runupdate) runs there.
    update_node: str
    # A working old node for steps 3, 4, 5 and 7 (default: the first other node).
    admin_node: str = ""
    # Only these schemata (e.g. ox-node-upgrade's share for one node); empty: all of them.
    schemata: tuple[str, ...] = ()
    force: bool = False  # -f
    resume_from: str = ""  # -m: continue after this schema (it is skipped)
    skip: tuple[str, ...] = ()  # -k
    concurrency: int = 1
    drive_tool: bool = False
    # ox-node-upgrade's later nodes: the first node registered the server (post process:
    # step 3 is done once), so it is used without asking.
    expect_registered: bool = False
    schemata_per_run: int = 100
    carried: OxCarried | None = None


@dataclass(frozen=True)
class OxSchemataProgress:
    total: int
    upgraded: int
    failed: int
    left_disabled: int
    reverted: int
    skipped: int
    remaining: int
    current: tuple[str, ...]
    run: int
    server_id: int | None
    stopped: str = ""


@dataclass(frozen=True)
class OxUpgradeSchemataResult:
    site: str
    server_name: str
    server_id: int | None
    # True: this run registered the server; False: it existed and `continue` was chosen.
    server_registered: bool
    # The gate (or the tool's prompt) said abort: nothing was changed.
    aborted_at_registration: bool
    upgraded: tuple[str, ...]
    failed: tuple[SchemaFailure, ...]
    left_disabled: tuple[str, ...]
    reverted: tuple[str, ...]
    skipped: tuple[str, ...]
    passed_over: tuple[str, ...]
    runs: int
    max_events_per_run: int
    dry_run: bool
    plan: tuple[str, ...]
    plan_hash: str
    steps: tuple[StepRecord, ...] = ()
    drove_tool: bool = False
    # Schemata without contexts: skipped (recorded in the timeline).
    skipped_empty: tuple[str, ...] = ()


class _Stop(Exception):
    """The walk stops at a schema (abort chosen, or reverted without guidance)."""

    def __init__(self, schema: str, how: str, by: str | None, error: str) -> None:
        super().__init__(schema)
        self.schema, self.how, self.by, self.error = schema, how, by, error


@dataclass
class _Walk:
    """The mutable state of one run's walk through the schemata."""

    carried: OxCarried
    upgraded: list[str] = field(default_factory=list)
    failed: list[SchemaFailure] = field(default_factory=list)
    left_disabled: list[str] = field(default_factory=list)
    reverted: list[str] = field(default_factory=list)
    current: dict[str, str] = field(default_factory=dict)  # schema -> what it is doing
    holds: int = 0  # schemata waiting at a failure gate: no new schema starts meanwhile
    stopped: str = ""


@workflow.defn(name="ox-upgradeschemata")
class OxUpgradeSchemataWorkflow(Procedure):
    procedure = PROCEDURE

    def __init__(self) -> None:
        super().__init__()
        self.walk: _Walk | None = None
        self.pending: list[str] = []

    @workflow.query(name="schemata")
    def schemata_progress(self) -> OxSchemataProgress | None:
        w = self.walk
        if w is None:
            return None
        c = w.carried
        return OxSchemataProgress(
            total=c.total,
            upgraded=c.upgraded_count + len(w.upgraded),
            failed=len(c.failed) + len(w.failed),
            left_disabled=len(c.left_disabled) + len(w.left_disabled),
            reverted=len(c.reverted) + len(w.reverted),
            skipped=len(c.skipped) + len(c.passed_over),
            remaining=len(self.pending) + len(w.current),
            current=tuple(sorted(w.current)),
            run=c.run,
            server_id=c.server_id,
            stopped=w.stopped,
        )

    @workflow.run
    async def run(self, inp: OxUpgradeSchemataInput) -> OxUpgradeSchemataResult:
        inv = inp.inventory
        self.begin(inp)
        settings, update, admin = _targets(inp)
        if inp.carried is not None:  # a continued run: preflight and step 3 are done
            self.gates.configure(
                inv.approvers,
                inp.started_by,
                inp.carried.plan_hash,
                inv.approver_keys,
                inp.carried.gate_openings,
            )
            self.guided = inp.on_failure == "ask"
            return await self._walk_schemata(inp, settings, update, admin, inp.carried)

        # ---- Preflight --------------------------------------------------------------
        self.timeline.set_phase("preflight")
        schemata, existing, old_id, empty = await self._preflight(inp, settings, update, admin)
        passed_over, skipped, todo = _select(inp, schemata)
        skipped_empty = [n for n in todo if n in empty]
        if skipped_empty:
            todo = [n for n in todo if n not in empty]
            self.timeline.record(
                f"4 {len(skipped_empty)} schemata without contexts: skipped",
                "skipped",
                node=admin.name,
                seed_step="4",
                detail="listdatabaseschema shows currentunits 0 (disableschema refuses them, "
                "OX's upgradeschemata skips them): " + _sample(skipped_empty),
            )
        plan = _plan(inp, update, admin, existing, todo, skipped, passed_over)
        dry_run = self.planned(inp, inv.approvers, [*plan, *todo], inv.approver_keys)
        carried = OxCarried(
            server_id=existing or 0,
            old_server_id=old_id,
            registered=False,
            total=len(todo),
            order=tuple(todo),
            remaining=tuple(todo),
            plan=tuple(plan),
            plan_hash=self.plan_hash,
            skipped=tuple(skipped),
            passed_over=tuple(passed_over),
            empty=tuple(skipped_empty),
        )
        if dry_run:
            return self._result(inp, carried, dry_run=True)

        # ---- 3 register the new server --------------------------------------------------
        self.guided = inp.on_failure == "ask"
        self.timeline.set_phase("3 register the new server")
        answer = ""
        if existing is not None and inp.expect_registered:
            answer = "continue"
        elif existing is not None:
            answer = await self._registered_gate(inp, existing)
            if answer == "abort" and not inp.drive_tool:
                self.timeline.set_phase("aborted at the registered-server prompt: nothing was changed")
                return self._result(inp, carried, aborted=True)
        if inp.drive_tool:
            return await self._drive_tool(inp, settings, update, carried, answer)
        if existing is None:
            server_id: int = await self.step(
                f"3 register server {inp.server_name}",
                partial(
                    self.change,
                    ox.ox_register_server,
                    ox.OxServerRequest(node=admin, ox=settings, name=inp.server_name),
                ),
                node=admin.name,
                seed_step="3",
            )
            carried = dataclasses.replace(carried, server_id=server_id, registered=True)
        else:
            why = "registered by the first node (post process)" if inp.expect_registered else "continue"
            self.timeline.record(
                f"3 server {inp.server_name} already registered (id {existing}): used",
                "ok",
                node=admin.name,
                seed_step="3",
                detail=why,
            )
        return await self._walk_schemata(inp, settings, update, admin, carried)

    # ================================================================== preflight
    async def _preflight(
        self, inp: OxUpgradeSchemataInput, settings: OxSettings, update: Node, admin: Node
    ) -> tuple[list[str], int | None, int, set[str]]:
        problems: list[str] = []
        errors: list[BaseException] = []
        if not 1 <= inp.concurrency <= MAX_CONCURRENCY:
            problems.append(f"concurrency must be 1 to {MAX_CONCURRENCY}, got {inp.concurrency}")
        if inp.schemata_per_run < 1:
            problems.append(f"schemata_per_run must be at least 1, got {inp.schemata_per_run}")
        if not inp.server_name.strip():
            problems.append("the new server's name (-n) is empty")
        if update.name == admin.name:
            problems.append(
                f"the update node and the admin node are both {update.name}: runupdate runs on "
                "the upgraded node, the other tools on a working old one"
            )

        async def version(n: Node) -> str:
            v: str = await self.read(ox.ox_installed_version, ox.OxNodeRequest(node=n, ox=settings))
            return v

        try:
            schemata: tuple[ox.OxSchema, ...] = await self.timeline.step(
                "P1 list the schemata (listdatabaseschema)",
                self.read(ox.ox_list_schemata, ox.OxNodeRequest(node=admin, ox=settings)),
                node=admin.name,
                seed_step="4",
            )
            servers: tuple[ox.OxServer, ...] = await self.timeline.step(
                "P2 list the registered servers (listserver)",
                self.read(ox.ox_list_servers, ox.OxNodeRequest(node=admin, ox=settings)),
                node=admin.name,
                seed_step="3",
            )
            new_v, old_v = await self.timeline.step(
                "P3 releases of the update and admin nodes",
                asyncio.gather(version(update), version(admin)),
                seed_step="2",
            )
        except ActivityError as e:
            raise preflight_failed([*problems, reason(e)], [*errors, e]) from None
        if new_v == old_v:
            problems.append(
                f"{update.name} runs {new_v} like {admin.name}: upgrade it first (runupdate must "
                "run on the node with the new release)"
            )
        names = [s.name for s in schemata]
        empty: set[str] = set()
        if workflow.patched(PATCH_ORDER_AND_EMPTY):
            # listdatabaseschema promises no order (its SQL has no ORDER BY): walk in the order
            # OX's upgradeschemata uses for -m, so resume_from means what it means to the tool.
            names.sort(key=schema_order)
            empty = {s.name for s in schemata if s.contexts == 0}
            if inp.drive_tool and inp.skip:
                problems.append(
                    f"skip (-k) with drive_tool: {ox.SKIP_IGNORED}; leave drive_tool off "
                    "(zerodown then walks the schemata itself and skips them)"
                )
        known = set(names)
        for what, given in (
            ("resume_from (-m)", [inp.resume_from] if inp.resume_from else []),
            ("skip (-k)", list(inp.skip)),
            ("schemata", list(inp.schemata)),
        ):
            unknown = [g for g in given if g not in known]
            if unknown:
                differs = (
                    " (OX's upgradeschemata would silently start from the first schema; zerodown "
                    "refuses instead)"
                    if what.startswith("resume")
                    else ""
                )
                problems.append(
                    f"{what}: no such schema {', '.join(unknown)}{differs} (known: {_sample(names)})"
                )
        old = [s.id for s in servers if s.name == settings.server_name]
        if not old:
            problems.append(
                f"the old cluster's server {settings.server_name!r} (ox.server_name) is not "
                f"registered (listserver: {', '.join(s.name for s in servers) or 'none'})"
            )
        existing = next((s.id for s in servers if s.name == inp.server_name), None)
        if inp.server_name == settings.server_name:
            problems.append(f"-n {inp.server_name} is the old cluster's own server name")
        if problems:
            raise preflight_failed(problems, errors)
        return names, existing, old[0], empty

    async def _registered_gate(self, inp: OxUpgradeSchemataInput, existing: int) -> str:
        return await registered_gate(self, inp.server_name, existing, inp.gate_timeout_s)

    # ================================================================== 4 to 7
    async def _walk_schemata(
        self, inp: OxUpgradeSchemataInput, settings: OxSettings, update: Node, admin: Node, carried: OxCarried
    ) -> OxUpgradeSchemataResult:
        w = self.walk = _Walk(carried)
        self.pending = list(carried.remaining)
        started = 0
        running: dict[str, asyncio.Task[None]] = {}
        self.timeline.set_phase(f"4-7 upgrading schemata (run {carried.run}, concurrency {inp.concurrency})")
        stop: _Stop | None = None
        cancelled = False
        while self.pending or running:
            while (
                self.pending
                and stop is None
                and not cancelled
                and w.holds == 0
                and len(running) < inp.concurrency
                and started < inp.schemata_per_run
            ):
                schema = self.pending.pop(0)
                running[schema] = asyncio.ensure_future(self._schema(inp, settings, update, admin, w, schema))
                started += 1
            if not running:
                break
            try:
                await workflow.wait_condition(lambda: any(t.done() for t in running.values()))
            except asyncio.CancelledError:
                # Stop: no new schema starts; the ones under way finish (their steps are
                # changes, never abandoned half-way); one waiting at a gate stays as it is.
                cancelled = True
                w.stopped = "cancelled"
                for schema, t in running.items():
                    if w.current.get(schema) == "at gate":
                        t.cancel()
                continue
            for schema, t in list(running.items()):
                if not t.done():
                    continue
                del running[schema]
                if t.cancelled():
                    continue
                e = t.exception()
                if isinstance(e, _Stop):
                    stop = stop or e
                    w.stopped = f"stopped at {e.schema}"
                elif e is not None:
                    raise e
        if cancelled or stop is not None:
            raise self._stopped(w, stop, inp.resume_from)
        if self.pending:
            # Keep each history short: the next run carries the progress on.
            nxt = self._carry(w)
            self.timeline.set_phase(f"continuing as new: {len(self.pending)} schemata to go")
            workflow.continue_as_new(dataclasses.replace(inp, carried=nxt))
        self.timeline.set_phase("done")
        return self._result(inp, self._merge(w))

    async def _schema(
        self,
        inp: OxUpgradeSchemataInput,
        settings: OxSettings,
        update: Node,
        admin: Node,
        w: _Walk,
        schema: str,
    ) -> None:
        """Steps 4 to 7 for one schema, and what its failure leads to."""
        c = w.carried
        reruns = 0
        while True:
            w.current[schema] = "upgrading"
            failure = await self._upgrade_one(settings, update, admin, c.server_id, schema, reruns)
            if failure is None:
                w.upgraded.append(schema)
                w.current.pop(schema, None)
                return
            if inp.force:
                w.failed.append(failure)
                w.left_disabled.append(schema)
                w.current.pop(schema, None)
                self.timeline.record(
                    f"{schema}: left disabled (force: going on)",
                    "skipped",
                    seed_step=failure.seed_step,
                    detail=failure.error,
                )
                return
            choice, by = await self._schema_gate(inp, w, schema, failure)
            if choice == "retry":
                reruns += 1
                continue
            w.failed.append(failure)
            if choice == "skip":
                w.left_disabled.append(schema)
                self.timeline.record(
                    f"{schema}: left disabled, going on",
                    "skipped",
                    seed_step=failure.seed_step,
                    detail=f"skip chosen by {by}: {failure.error}",
                )
            elif choice in ("revert", "rollback"):
                await self._revert(settings, admin, c.old_server_id, schema, failure.seed_step)
                w.reverted.append(schema)
            w.current.pop(schema, None)
            if choice == "abort":
                w.left_disabled.append(schema)
                raise _Stop(schema, "aborted", by, failure.error)
            if choice == "rollback":  # unguided: reverted, and the run stops here
                raise _Stop(schema, "reverted", by, failure.error)
            return

    async def _upgrade_one(
        self, settings: OxSettings, update: Node, admin: Node, server_id: int, schema: str, reruns: int
    ) -> SchemaFailure | None:
        """Steps 4-7 as one activity (its users are refused only for the tools' own time),
        recorded as the four steps it ran, with their times."""
        req = ox.OxUpgradeSchemaRequest(
            admin=admin, update=update, ox=settings, schema=schema, server_id=server_id
        )
        timeout = LONG
        if workflow.patched(PATCH_DETACHED_RUNUPDATE):
            # Each operator's retry is a new runupdate; every attempt of one try attaches to it.
            req = dataclasses.replace(req, attempt_key=str(reruns))
            timeout = timeouts.tool(settings.runupdate_timeout_s)
        if workflow.patched(PATCH_ENABLE_ON_UPDATE):
            req = dataclasses.replace(req, enable_on_update=True)
        try:
            result: ox.OxSchemaUpgrade = await self.timeline.step(
                f"4-7 upgrade schema {schema}",
                self.change(ox.ox_upgrade_schema, req, timeout=timeout, heartbeat=HEARTBEAT),
                node=update.name,
                seed_step="4-7",
                retries=reruns,
            )
        except (ActivityError, ApplicationError) as e:
            return SchemaFailure(schema=schema, seed_step="4-7", error=reason(e))
        names = {
            "4": (f"4 disable schema {schema}", admin),
            "5": (f"5 point schema {schema} to server {server_id}", admin),
            "6": (f"6 run the update tasks of {schema}", update),
            "7": (f"7 enable schema {schema}", update if req.enable_on_update else admin),
        }
        for st in result.steps:
            name, node = names[st.seed_step]
            self.timeline.record_span(
                name,
                _at(st.started),
                _at(st.ended),
                "ok" if st.ok else "failed",
                node=node.name,
                seed_step=st.seed_step,
                detail=None if st.ok else result.error,
                retries=reruns,
            )
        if result.failed_step is not None:
            return SchemaFailure(schema=schema, seed_step=result.failed_step, error=result.error or "failed")
        return None

    async def _schema_gate(
        self, inp: OxUpgradeSchemataInput, w: _Walk, schema: str, failure: SchemaFailure
    ) -> tuple[str, str | None]:
        gate = f"failure:{failure.seed_step}@{schema}"
        safe = workflow.patched(PATCH_SAFE_DEFAULT)
        if not self.guided:
            self.timeline.record(
                f"gate {gate}: not asked", "skipped", detail="on_failure is rollback: revert it and stop"
            )
            return "rollback", None
        if not self.gates.approvers_of(gate):
            if safe:
                self.timeline.record(
                    f"gate {gate}: not asked",
                    "skipped",
                    detail="the inventory lists no approvers for failure gates: stop here "
                    "and leave it disabled (its update tasks did not all run)",
                )
                return "abort", None
            self.timeline.record(
                f"gate {gate}: not asked",
                "skipped",
                detail="the inventory lists no approvers for failure gates: revert it and stop",
            )
            return "rollback", None
        default = "abort" if safe else "revert"
        w.holds += 1
        w.current[schema] = "at gate"
        try:
            record = await self.gates.wait(
                GateSpec(
                    name=gate,
                    guards=f"schema {schema} failed at step {failure.seed_step}: {failure.error}. "
                    "retry: run it again; skip: leave it disabled and go on; revert: point it "
                    "back to the old server, enable it and go on (old nodes then serve a "
                    "schema whose update may have half run; OX does not support mixed "
                    "versions); abort: stop here, leave it disabled (what OX's tool does). "
                    f"Nobody deciding in time: {default}",
                    timeout_s=self.failure_gate_timeout_s,
                    on_timeout=default,
                    choices=SCHEMA_FAILURE_CHOICES,
                )
            )
        finally:
            w.holds -= 1
            w.current[schema] = "upgrading"
        return record.choice or default, record.by

    async def _revert(
        self, settings: OxSettings, admin: Node, old_server_id: int, schema: str, failed_step: str = "4-7"
    ) -> None:
        """Back to the old server and enabled: its users are served again as before."""
        w_name = f"revert {schema}"
        if workflow.patched(PATCH_REVERT):
            await self.timeline.step(
                f"{w_name}: 4 disable, 5 point it back to server {old_server_id}, 7 enable it"
                if failed_step != "4"
                else f"{w_name}: 7 enable what the failed disable left",
                self.change(
                    ox.ox_revert_schema,
                    ox.OxRevertSchemaRequest(
                        node=admin,
                        ox=settings,
                        schema=schema,
                        old_server_id=old_server_id,
                        failed_step=failed_step,
                    ),
                ),
                node=admin.name,
                seed_step="5",
            )
            return
        await self.timeline.step(
            f"{w_name}: 5 point it back to server {old_server_id}",
            self.change(
                ox.ox_change_server,
                ox.OxChangeServerRequest(node=admin, ox=settings, schema=schema, server_id=old_server_id),
            ),
            node=admin.name,
            seed_step="5",
        )
        await self.timeline.step(
            f"{w_name}: 7 enable it",
            self.change(ox.ox_enable_schema, ox.OxSchemaRequest(node=admin, ox=settings, schema=schema)),
            node=admin.name,
            seed_step="7",
        )

    # ================================================================== the tool itself
    async def _drive_tool(
        self, inp: OxUpgradeSchemataInput, settings: OxSettings, update: Node, carried: OxCarried, answer: str
    ) -> OxUpgradeSchemataResult:
        self.timeline.set_phase("3-7 upgradeschemata (OX's tool) on " + update.name)
        timeout = LONG
        if workflow.patched(PATCH_DETACHED_RUNUPDATE):
            timeout = timeouts.tool(settings.upgradeschemata_timeout_s)
        run: ox.OxToolRun = await self.step(
            "3-7 run upgradeschemata",
            partial(
                self.change,
                ox.ox_run_upgradeschemata,
                ox.OxUpgradeToolRequest(
                    node=update,
                    ox=settings,
                    server_name=inp.server_name,
                    force=inp.force,
                    resume_from=inp.resume_from or None,
                    skip=tuple(inp.skip),
                    answer=answer or None,
                ),
                timeout=timeout,
                heartbeat=HEARTBEAT,
            ),
            node=update.name,
            seed_step="3",
        )
        w = _Walk(carried)
        self.walk = w
        empty = [s.schema for s in run.schemata if s.skipped_empty]
        if empty:
            self.timeline.record(
                f"4 {len(empty)} schemata without contexts: skipped by the tool",
                "skipped",
                node=update.name,
                seed_step="4",
                detail="upgradeschemata: Schema <s> not found. Skipping: " + _sample(empty),
            )
        for s in run.schemata:
            if s.skipped_empty:
                continue
            if s.error is None and s.enabled:
                w.upgraded.append(s.schema)
            elif s.error is not None:
                w.failed.append(SchemaFailure(schema=s.schema, seed_step="6", error=s.error))
                if not s.enabled:
                    w.left_disabled.append(s.schema)
        server_id = run.registered_id if run.registered_id is not None else carried.server_id
        # What the tool did not reach is still to do (a resume starts after the last one done).
        reached = {s.schema for s in run.schemata}
        w.carried = dataclasses.replace(
            carried,
            server_id=server_id,
            registered=not bool(answer),
            remaining=tuple(s for s in carried.order if s not in reached),
        )
        self.pending = list(w.carried.remaining)
        if run.aborted:
            return self._result(inp, self._merge(w), aborted=True, tool=True)
        if run.exit_status != 0:
            last = w.failed[-1] if w.failed else None
            raise self._stopped(
                w,
                _Stop(last.schema, f"stopped by the tool (exit {run.exit_status})", None, last.error)
                if last
                else None,
                inp.resume_from,
            )
        return self._result(inp, self._merge(w), tool=True)

    # ================================================================== results
    def _merge(self, w: _Walk) -> OxCarried:
        """The carried progress with this run's outcomes added (remaining: what is pending)."""
        c = w.carried
        return dataclasses.replace(
            c,
            remaining=c.remaining if self.walk is not w else tuple(self.pending),
            upgraded_count=c.upgraded_count + len(w.upgraded),
            failed=(*c.failed, *w.failed),
            left_disabled=(*c.left_disabled, *w.left_disabled),
            reverted=(*c.reverted, *w.reverted),
            interrupted=(*c.interrupted, *w.current),
            max_events_per_run=max(c.max_events_per_run, workflow.info().get_current_history_length()),
        )

    def _carry(self, w: _Walk) -> OxCarried:
        merged = self._merge(w)
        if workflow.patched(PATCH_CARRY_GATE_OPENINGS):
            return dataclasses.replace(merged, run=merged.run + 1, gate_openings=dict(self.gates.opened))
        return dataclasses.replace(merged, run=merged.run + 1)

    def _result(
        self,
        inp: OxUpgradeSchemataInput,
        c: OxCarried,
        *,
        dry_run: bool = False,
        aborted: bool = False,
        tool: bool = False,
    ) -> OxUpgradeSchemataResult:
        return OxUpgradeSchemataResult(
            site=inp.inventory.site,
            server_name=inp.server_name,
            server_id=c.server_id or None,
            server_registered=c.registered,
            aborted_at_registration=aborted,
            upgraded=_upgraded(c),
            failed=c.failed,
            left_disabled=c.left_disabled,
            reverted=c.reverted,
            skipped=c.skipped,
            passed_over=c.passed_over,
            runs=c.run,
            max_events_per_run=c.max_events_per_run,
            dry_run=dry_run,
            plan=c.plan,
            plan_hash=c.plan_hash,
            steps=tuple(self.timeline.steps),
            drove_tool=tool,
            skipped_empty=c.empty,
        )

    def _stopped(self, w: _Walk, stop: _Stop | None, resume_base: str) -> ApplicationError:
        c = self._merge(w)
        upgraded = set(_upgraded(c))
        open_ = [s for s in c.order if s not in upgraded]
        if stop is not None:
            head = (
                f"{PROCEDURE} {stop.how} at schema {stop.schema}"
                + (f" by {stop.by}" if stop.by else "")
                + f" ({stop.error})"
            )
        else:
            head = f"{PROCEDURE} stopped (cancelled)"
        lines = [
            head + ". State:",
            f"  upgraded: {len(upgraded)} of {c.total}",
            f"  failed: {', '.join(f.schema for f in c.failed) or 'none'}",
            f"  left disabled: {', '.join(c.left_disabled) or 'none'}",
            f"  reverted to the old server: {', '.join(c.reverted) or 'none'}",
            f"  interrupted at a gate (as they were): {', '.join(c.interrupted) or 'none'}",
            f"  not started: {len(c.remaining)}",
        ]
        if open_:
            i = c.order.index(open_[0])
            prev = c.order[i - 1] if i > 0 else resume_base
            lines.append(
                "  to resume, start again with the same options and "
                + (f"resume_from={prev} (-m {prev})" if prev else "no resume_from")
            )
        self.timeline.set_phase("stopped: " + head)
        return ApplicationError(
            "\n".join(lines),
            non_retryable=True,
            type=PROCEDURE_ABORTED if stop is not None and stop.how == "aborted" else SCHEMA_UPGRADE_STOPPED,
        )


# ====================================================================== helpers
def _targets(inp: OxUpgradeSchemataInput) -> tuple[OxSettings, Node, Node]:
    inv = inp.inventory
    if inv.ox is None:
        raise ApplicationError(
            f"inventory {inv.site}: no `ox:` section (an Open-Xchange site needs one)",
            type=INVALID_INPUT,
            non_retryable=True,
        )
    try:
        update = inv.node(inp.update_node)
        if inp.admin_node:
            admin = inv.node(inp.admin_node)
        else:
            others = [n for n in inv.nodes if n.name != update.name]
            if not others:
                raise ApplicationError(
                    "no other node to run the admin tools on", type=INVALID_INPUT, non_retryable=True
                )
            admin = others[0]
    except UnknownNodeError as e:
        raise ApplicationError(str(e), type=UNKNOWN_NODE, non_retryable=True) from None
    return inv.ox, update, admin


def _select(inp: OxUpgradeSchemataInput, names: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(passed over by -m, skipped by -k, to do), in OX's order - as the tool filters."""
    chosen = set(inp.schemata)
    names = [n for n in names if not chosen or n in chosen]
    passed_over: list[str] = []
    if inp.resume_from and inp.resume_from in names:
        cut = names.index(inp.resume_from) + 1
        passed_over, names = names[:cut], names[cut:]
    skip = set(inp.skip)
    return passed_over, [n for n in names if n in skip], [n for n in names if n not in skip]


def _plan(
    inp: OxUpgradeSchemataInput,
    update: Node,
    admin: Node,
    existing: int | None,
    todo: list[str],
    skipped: list[str],
    passed_over: list[str],
) -> list[str]:
    first = f"{todo[0]} .. {todo[-1]}" if todo else "none"
    lines = [
        f"{PROCEDURE} on {inp.inventory.site}: new server {inp.server_name}",
        (
            "3 register it"
            if existing is None
            else f"3 already registered (id {existing}): used"
            if inp.expect_registered
            else f"3 already registered (id {existing}): gate {REGISTERED_GATE} (continue / abort)"
        ),
        f"4-7 per schema: disable, changeserver, runupdate on {update.name}, enable "
        f"(tools on {admin.name}); at most {inp.concurrency} at a time",
        f"schemata to upgrade: {len(todo)} ({first})",
        f"skipped (-k): {', '.join(skipped) or 'none'}",
        (
            f"passed over (-m {inp.resume_from}): {len(passed_over)}"
            if inp.resume_from
            else "from the first schema"
        ),
        (
            "on a failed update: go on, leave it disabled (force, -f)"
            if inp.force
            else "on a failed update: gate failure:<step>@<schema> (retry / skip / revert / abort)"
        ),
    ]
    if inp.drive_tool:
        # The tool runs the update tasks itself: on the node with the new release.
        lines.append(f"driven by OX's upgradeschemata on {update.name}")
    return lines


def _upgraded(c: OxCarried) -> tuple[str, ...]:
    """Upgraded = started and neither failed nor interrupted (derived: 10,000 names are not
    carried from run to run)."""
    not_done = {f.schema for f in c.failed} | set(c.remaining) | set(c.interrupted)
    return tuple(s for s in c.order if s not in not_done)


def _at(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


def _sample(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
