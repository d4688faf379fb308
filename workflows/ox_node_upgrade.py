"""`ox-node-upgrade`: upgrade an Open-Xchange cluster from 7.10.0 node by node without
downtime (seed 002: steps 0 to 9, the post process and the Q & A).

  Preflight (read-only; bad input is refused before anything is touched)
    the inventory's `ox:` section and its two load balancers; every node answers over SSH,
    its service runs, it is healthy, UP in the main balancer and not serving in the
    secondary one; every node runs the same release, at least 7.10.0 (the seed: no
    upgrade from 7.8.x this way) and older than the target; the schemata and their share
    per node; no schema may be left on the old server when the last old node would leave
    the main balancer (the last node gets no share).
  0  every old node: `migrationRedirectURL` = the secondary balancer, configuration reloaded.
  3? before any change: is the new server registered already? Then the gate
     `server-already-registered` (continue: use it; abort: stop, nothing changed).
  For each node, one at a time:
    1  drain it from the main balancer (zero sessions, then held in maintenance);
    2  upgrade it: stop, install the release; its Hazelcast group name checked (the new
       release's differs from the old one's) or set (`<old group>-<version>`): "configure
       both versions to form different Hazelcast clusters"; `SERVER_NAME` = the new name;
    8  remove `migrationRedirectURL` (before the node is active again: the seed's step 8);
    3  register the new server (first node only): before the node starts under its new
       SERVER_NAME - real OX cannot resolve an unregistered server (the seed's order);
    2  start it, check it is healthy on the new release;
    9  add it to the secondary balancer (UP). Done before its schemata move, not after
       (the seed's order): a context enabled on the new server in step 7 is redirected to
       the secondary balancer at once, which must then hold a node to serve it - the seed's
       own condition (only after the node is upgraded and up) holds either way;
    4-7  `ox-upgradeschemata` as a child workflow for the node's share of the schemata
       (those with contexts, in OX's order), runupdate on this node, the other tools on a
       working old node. A child that stops at its registered-server gate stops this run.
  Post process: all upgraded nodes into the main balancer - before the last old node
  leaves it (by then every schema is on the new server, so no user of an old context can
  land on a new node, and the main balancer is never empty) - then the last node, and the
  secondary balancer emptied.
  Rollback (saga, newest first): a node is put back as it was (release, SERVER_NAME,
  migrationRedirectURL, main balancer in, secondary out) as long as no schema has moved
  to the new server; once one has, its users can only be served by the new release, so
  the upgraded nodes stay (the timeline says so) and only what came after is undone. A
  schema that failed half-way is reverted by the child (see ox-upgradeschemata).
Deterministic: only workflow APIs inside.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from functools import partial

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    # activities.deploy / activities.mysql keep their dataclasses in submodules, and the sandbox
    # resolves a dataclass's type hints through sys.modules[its module]: import those too.
    import activities.deploy as deploy
    import activities.deploy.appfolder
    import activities.deploy.package
    import activities.deploy.secretserver  # noqa: F401 (for the sandbox, see above)
    import activities.haproxy as haproxy
    import activities.http_checks as http_checks
    import activities.ox as ox
    import activities.ssh as ssh
    from inventory.model import Inventory, LoadBalancer, Node, OxSettings, UnknownNodeError

from errors import (
    INVALID_INPUT,
    NOT_IN_POOL,
    PROCEDURE_ABORTED,
    REGISTRATION_ABORTED,
    SCHEMATA_NOT_MOVED,
    SSH_UNREACHABLE,
    UNEXPECTED_STATE,
    UNKNOWN_NODE,
)
from workflows import timeouts
from workflows.ox_steps import PATCH_ORDER_AND_EMPTY, SchemaFailure, registered_gate, schema_order
from workflows.ox_upgradeschemata import OxUpgradeSchemataInput
from workflows.procedure import ProcedureOptions
from workflows.saga import reason
from workflows.site_steps import SiteProcedure, preflight_failed
from workflows.timeline import StepRecord

PROCEDURE = "ox-node-upgrade"
REDIRECT_KEY = "com.openexchange.server.migrationRedirectURL"
SERVER_NAME_KEY = "SERVER_NAME"
# The seed: "it is only possible to upgrade from 7.10.0 to any successor version".
MIN_FROM = "7.10.0"
# Versioned changes (workflow.patched): runs started before them replay as they ran.
# Step 3 before the first new node starts with its new SERVER_NAME (real OX cannot resolve
# an unregistered server); an existing server's gate asked before anything changes.
PATCH_REGISTER_FIRST = "ox-register-before-start-v1"
# A child that stopped at its server-already-registered gate (abort) stops this run.
PATCH_CHILD_ABORT = "ox-child-abort-stops-parent-v1"
# Pools with maxUnits 0 hold schemata listdatabaseschema never lists (its SQL: max_units <> 0):
# refused in preflight, and checked again before the last old node leaves.
PATCH_CLOSED_POOLS = "ox-closed-pools-v1"
# Seed step 2: the new release must not join the old release's Hazelcast cluster.
PATCH_HAZELCAST = "ox-hazelcast-group-v1"
# A rollback with schemata already moved keeps the redirect on the old nodes (their users reach
# the new server only through it).
PATCH_KEEP_REDIRECT_WHILE_MOVED = "ox-keep-redirect-while-moved-v1"
# OX's hazelcast.properties: only nodes with the same group name form one cluster
# (documentation/administration/running_a_cluster.md).
HAZELCAST_GROUP_KEY = "com.openexchange.hazelcast.group.name"


@dataclass(frozen=True)
class OxNodeUpgradeInput(ProcedureOptions):
    inventory: Inventory
    # The release to install on every node (x.y.z).
    version: str
    # The new server's name: registered in step 3, SERVER_NAME of every upgraded node.
    server_name: str
    # Upgrade order (default: the inventory's).
    nodes: tuple[str, ...] = ()
    # Passed to every ox-upgradeschemata child. (No skip list: a schema left on the old
    # server would have no node to serve it once the last old node is upgraded.)
    force: bool = False
    concurrency: int = 1
    schemata_per_run: int = 100


@dataclass(frozen=True)
class NodeShare:
    node: str
    schemata: tuple[str, ...]


@dataclass(frozen=True)
class OxNodeUpgradeResult:
    site: str
    version: str
    previous_version: str
    server_name: str
    nodes: tuple[str, ...]
    shares: tuple[NodeShare, ...]
    dry_run: bool
    plan: tuple[str, ...]
    plan_hash: str
    steps: tuple[StepRecord, ...]
    upgraded_schemata: tuple[str, ...] = ()
    failed_schemata: tuple[str, ...] = ()
    children: tuple[str, ...] = ()


@dataclass(frozen=True)
class SchemataOutcome:
    """What this workflow reads of an ox-upgradeschemata child's result."""

    upgraded: tuple[str, ...] = ()
    failed: tuple[SchemaFailure, ...] = ()
    server_id: int | None = None
    aborted_at_registration: bool = False


@dataclass
class _NodeState:
    """What was done to a node, so its compensation undoes exactly that."""

    drained: bool = False
    stopped: bool = False
    properties: dict[tuple[str, str], str | None] = field(default_factory=dict)  # (path, key) -> previous
    installed: bool = False
    in_secondary: bool = False


@workflow.defn(name="ox-node-upgrade")
class OxNodeUpgradeWorkflow(SiteProcedure):
    procedure = PROCEDURE

    def __init__(self) -> None:
        super().__init__()
        self.moved: list[str] = []
        self.failed: list[str] = []
        self.children: list[str] = []
        # Step 3 done by this workflow (PATCH_REGISTER_FIRST): the server's id once known.
        self.register_first = False
        self.server_id: int | None = None

    @workflow.run
    async def run(self, inp: OxNodeUpgradeInput) -> OxNodeUpgradeResult:
        inv = inp.inventory
        self.begin(inp)
        settings, main, secondary, nodes = _targets(inp)
        self.timeline.nodes_total = len(nodes)

        self.timeline.set_phase("preflight")
        previous = await self._preflight(inp, settings, main, secondary, nodes)
        schemata: tuple[ox.OxSchema, ...] = await self.timeline.step(
            "P3 list the schemata (listdatabaseschema)",
            self.read(ox.ox_list_schemata, ox.OxNodeRequest(node=nodes[-1], ox=settings)),
            seed_step="4",
        )
        if workflow.patched(PATCH_CLOSED_POOLS):
            closed = await self.timeline.step(
                "P4 every pool's schemata are listed (listdatabase)",
                self._closed_pools(settings, nodes[-1]),
                seed_step="4",
            )
            if closed:
                raise preflight_failed(closed, [])
        listed = list(schemata)
        if workflow.patched(PATCH_ORDER_AND_EMPTY):
            # A schema without contexts has nothing to move (disableschema refuses it); the rest
            # in OX's order.
            empty = [s.name for s in listed if s.contexts == 0]
            if empty:
                self.timeline.record(
                    f"P3 {len(empty)} schemata without contexts: not moved",
                    "skipped",
                    seed_step="4",
                    detail="listdatabaseschema shows currentunits 0: " + ", ".join(empty[:10]),
                )
            listed = sorted((s for s in listed if s.contexts > 0), key=lambda s: schema_order(s.name))
        shares = _shares(settings, nodes, [s.name for s in listed])
        plan = _plan(inp, previous, nodes, shares)
        if self.planned(inp, inv.approvers, plan, inv.approver_keys):
            return self._result(inp, previous, nodes, shares, plan, True)

        if workflow.patched(PATCH_REGISTER_FIRST):
            await self._registration(inp, settings, nodes[-1])
        self.guided = inp.on_failure == "ask"
        await self.run_changes(
            partial(self._upgrade, inp, settings, main, secondary, nodes, shares, previous),
            f"{PROCEDURE} to {inp.version}",
        )
        self.timeline.set_phase("done")
        return self._result(inp, previous, nodes, shares, plan, False)

    # ================================================================== preflight
    async def _preflight(
        self,
        inp: OxNodeUpgradeInput,
        settings: OxSettings,
        main: LoadBalancer,
        secondary: LoadBalancer,
        nodes: list[Node],
    ) -> str:
        inv = inp.inventory

        async def check_node(n: Node) -> str:
            probe: ssh.SshProbeResult = await self.read(ssh.ssh_probe, ssh.SshProbeRequest(target=n.ssh))
            if not probe.ok:
                raise ApplicationError(
                    probe.error or f"ssh {n.ssh.host}:{n.ssh.port}: unreachable",
                    type=probe.error_type or SSH_UNREACHABLE,
                    non_retryable=True,
                )
            st: haproxy.MemberState = await self.read(
                haproxy.lb_check_member, haproxy.MemberRequest(lb=main, node=n.name)
            )
            if not st.is_up:
                raise ApplicationError(
                    f"not UP in the main balancer {main.name} ({st.status}, {st.admin})",
                    type=NOT_IN_POOL,
                    non_retryable=True,
                )
            sec: haproxy.MemberState = await self.read(
                haproxy.lb_check_member, haproxy.MemberRequest(lb=secondary, node=n.name)
            )
            if sec.admin == "ready" and sec.is_up:
                raise ApplicationError(
                    f"already serving in the secondary balancer {secondary.name}",
                    type=UNEXPECTED_STATE,
                    non_retryable=True,
                )
            await self.read(
                http_checks.check_health,
                http_checks.HttpCheckRequest(base_url=n.url, check=inv.application.health, timeout_s=10.0),
            )
            running: str = await self.read(
                http_checks.get_version,
                http_checks.VersionRequest(base_url=n.url, check=inv.application.version),
            )
            installed: str = await self.read(ox.ox_installed_version, ox.OxNodeRequest(node=n, ox=settings))
            if installed != running:
                raise ApplicationError(
                    f"runs {running} but {installed} is installed: restart it or finish "
                    "its last upgrade first",
                    type=UNEXPECTED_STATE,
                    non_retryable=True,
                )
            return running

        async def checks() -> str:
            results = await asyncio.gather(*(check_node(n) for n in nodes), return_exceptions=True)
            problems = [
                f"{n.name}: {reason(r)}"
                for n, r in zip(nodes, results, strict=True)
                if isinstance(r, BaseException)
            ]
            versions = {n.name: r for n, r in zip(nodes, results, strict=True) if isinstance(r, str)}
            if not problems:
                problems += _version_problems(versions, inp.version)
            if problems:
                raise preflight_failed(problems, [r for r in results if isinstance(r, BaseException)])
            return next(iter(versions.values()))

        previous: str = await self.timeline.step(
            "P1 nodes reachable, running, healthy, in the main balancer, on one upgradable release",
            checks(),
            seed_step="P1",
        )
        return previous

    # ================================================================== the runbook
    async def _upgrade(
        self,
        inp: OxNodeUpgradeInput,
        settings: OxSettings,
        main: LoadBalancer,
        secondary: LoadBalancer,
        nodes: list[Node],
        shares: list[NodeShare],
        previous: str,
    ) -> None:
        inv = inp.inventory
        state = {n.name: _NodeState() for n in nodes}

        # 0: the old nodes redirect users of moved contexts to the secondary balancer.
        self.timeline.set_phase("0 migrationRedirectURL on every old node")
        for n in nodes:
            change: ox.OxPropertyChange = await self.step(
                f"0 set {REDIRECT_KEY}",
                partial(
                    self._set_property,
                    settings,
                    n,
                    settings.server_properties,
                    REDIRECT_KEY,
                    settings.secondary_url,
                    "0",
                ),
                node=n.name,
                seed_step="0",
            )
            state[n.name].properties[(settings.server_properties, REDIRECT_KEY)] = change.previous
            self.saga.register(
                f"{n.name}: {REDIRECT_KEY} as before",
                partial(self._restore_redirect, settings, n, change.previous, state[n.name]),
            )
            await self.step(
                "0 reload the configuration",
                partial(self.change, ox.ox_reload_configuration, ox.OxNodeRequest(node=n, ox=settings)),
                node=n.name,
                seed_step="0",
            )

        upgraded: list[Node] = []
        admin = nodes[-1]  # old until the very end: the "working 7.10.0 node" of steps 3-7
        for i, n in enumerate(nodes):
            last = i == len(nodes) - 1
            st = state[n.name]
            if last and upgraded:
                # Post process, pulled forward: every schema is on the new server now, so the
                # new nodes may take the main balancer's traffic before the last old one leaves.
                await self.step(
                    "post every schema is on the new server",
                    partial(self._check_all_moved, shares, settings, admin),
                    seed_step="post",
                )
                self.timeline.set_phase("post process: upgraded nodes into the main balancer")
                for m in upgraded:
                    await self.put_back(inv, m, "post", lbs=[main])
            self.timeline.set_phase(f"upgrade {n.name}", n.name)
            self.saga.register(
                f"{n.name}: back to {previous}",
                partial(self._roll_back_node, inp, settings, main, secondary, n, st, previous),
            )
            # 1
            st.drained = True
            await self.take_out(inv, n, "1", lbs=[main])
            # 2, 8
            st.stopped = True
            hazelcast = workflow.patched(PATCH_HAZELCAST)
            old_group: str | None = None
            if hazelcast:
                old_group = await self.step(
                    "2 Hazelcast group of the old release",
                    partial(
                        self.read,
                        ox.ox_get_property,
                        ox.OxGetPropertyRequest(
                            node=n, path=settings.hazelcast_properties, key=HAZELCAST_GROUP_KEY
                        ),
                    ),
                    node=n.name,
                    seed_step="2",
                )
            await self.step("2 stop the service", partial(self.stop, n), node=n.name, seed_step="2")
            st.installed = True
            await self.step(
                f"2 install {inp.version}",
                partial(
                    self.change,
                    ox.ox_install_version,
                    ox.OxInstallRequest(node=n, ox=settings, version=inp.version),
                ),
                node=n.name,
                seed_step="2",
            )
            if hazelcast:
                await self._separate_cluster(inp, settings, n, st, old_group)
            await self._remember(
                st,
                settings.system_properties,
                SERVER_NAME_KEY,
                await self.step(
                    f"2 {SERVER_NAME_KEY}={inp.server_name}",
                    partial(
                        self._set_property,
                        settings,
                        n,
                        settings.system_properties,
                        SERVER_NAME_KEY,
                        inp.server_name,
                        "2",
                    ),
                    node=n.name,
                    seed_step="2",
                ),
            )
            await self._remember(
                st,
                settings.server_properties,
                REDIRECT_KEY,
                await self.step(
                    f"8 remove {REDIRECT_KEY}",
                    partial(
                        self._set_property, settings, n, settings.server_properties, REDIRECT_KEY, None, "8"
                    ),
                    node=n.name,
                    seed_step="8",
                ),
            )
            if self.register_first and i == 0:
                await self._register(inp, settings, admin, n)
            await self.step("2 start the service", partial(self.start, n), node=n.name, seed_step="2")
            await self.step(
                f"2 healthy on {inp.version}",
                partial(self.check_running, inv, n, inp.version),
                node=n.name,
                seed_step="2",
            )
            # 9
            st.in_secondary = True
            await self.put_back(inv, n, "9", lbs=[secondary])
            # 3-7
            share = shares[i].schemata
            if share:
                await self._schemata(inp, n, admin, share, first=not self.children)
            elif not upgraded:
                self.timeline.record("3-7 no schema for this node", "skipped", node=n.name, seed_step="3")
            upgraded.append(n)
            self.timeline.node_done(n.name)

        # Post process: the last node joins the main balancer; the secondary is emptied.
        self.timeline.set_phase("post process: main balancer only")
        await self.put_back(inv, nodes[-1], "post", lbs=[main])
        for n in nodes:
            await self.take_out(inv, n, "post", lbs=[secondary])

    async def _schemata(
        self, inp: OxNodeUpgradeInput, n: Node, admin: Node, share: tuple[str, ...], first: bool
    ) -> None:
        child_id = f"{workflow.info().workflow_id}-schemata-{n.name}"
        self.children.append(child_id)
        arg = OxUpgradeSchemataInput(
            inventory=inp.inventory,
            server_name=inp.server_name,
            update_node=n.name,
            admin_node=admin.name,
            schemata=share,
            force=inp.force,
            concurrency=inp.concurrency,
            expect_registered=not first or self.register_first,
            started_by=inp.started_by,
            gate_timeout_s=inp.gate_timeout_s,
            on_failure=inp.on_failure,
            failure_gate_timeout_s=inp.failure_gate_timeout_s,
            schemata_per_run=inp.schemata_per_run,
        )

        async def child() -> SchemataOutcome:
            # Decoded into the few fields this workflow uses: the child's full result holds
            # its timeline, whose datetimes the sandbox cannot decode (and does not need).
            outcome: SchemataOutcome = await workflow.execute_child_workflow(
                "ox-upgradeschemata",
                arg,
                id=child_id,
                result_type=SchemataOutcome,
                task_timeout=timeouts.WORKFLOW_TASK,
            )
            return outcome

        self.timeline.set_phase(f"3-7 {len(share)} schemata to {inp.server_name} (child {child_id})", n.name)
        result: SchemataOutcome = await self.step(
            f"{'3-7' if first and not self.register_first else '4-7'} upgrade {len(share)} schemata "
            f"(child workflow {child_id})",
            child,
            node=n.name,
            seed_step="3" if first and not self.register_first else "4",
        )
        self.moved.extend(result.upgraded)
        self.failed.extend(f.schema for f in result.failed)
        if result.aborted_at_registration and workflow.patched(PATCH_CHILD_ABORT):
            raise ApplicationError(
                f"child {child_id} stopped at its gate server-already-registered (abort): the new server "
                f"{inp.server_name} is not to be used, so no node goes on",
                type=REGISTRATION_ABORTED,
                non_retryable=True,
            )

    async def _separate_cluster(
        self, inp: OxNodeUpgradeInput, settings: OxSettings, n: Node, st: _NodeState, old_group: str | None
    ) -> None:
        """2: "make sure that you have configured both versions ... to form different Hazelcast
        clusters". Checked: the installed release's group name already differs from the old
        one; else set: `<old group>-<version>` (every new node gets the same, so the new nodes
        form one cluster of their own). The node's rollback puts the old name back."""
        group: str | None = await self.read(
            ox.ox_get_property,
            ox.OxGetPropertyRequest(node=n, path=settings.hazelcast_properties, key=HAZELCAST_GROUP_KEY),
        )
        if group is not None and group != old_group:
            self.timeline.record(
                f"2 Hazelcast group {group}: checked",
                "ok",
                node=n.name,
                seed_step="2",
                detail=f"differs from the old release's {old_group!r}: a cluster of its own",
            )
            return
        new_group = f"{old_group or 'open-xchange'}-{inp.version}"
        await self._remember(
            st,
            settings.hazelcast_properties,
            HAZELCAST_GROUP_KEY,
            await self.step(
                f"2 Hazelcast group {new_group}: set",
                partial(
                    self._set_property,
                    settings,
                    n,
                    settings.hazelcast_properties,
                    HAZELCAST_GROUP_KEY,
                    new_group,
                    "2",
                ),
                node=n.name,
                seed_step="2",
            ),
        )

    async def _registration(self, inp: OxNodeUpgradeInput, settings: OxSettings, admin: Node) -> None:
        """Before anything changes: is the new server registered already? Then the gate
        server-already-registered asks what OX's tool asks (continue: use it; abort: stop)."""
        self.register_first = True
        servers: tuple[ox.OxServer, ...] = await self.timeline.step(
            "P4 is the new server registered (listserver)",
            self.read(ox.ox_list_servers, ox.OxNodeRequest(node=admin, ox=settings)),
            node=admin.name,
            seed_step="3",
        )
        existing = next((s.id for s in servers if s.name == inp.server_name), None)
        if existing is None:
            return
        choice = await registered_gate(self, inp.server_name, existing, inp.gate_timeout_s)
        if choice != "continue":
            self.timeline.set_phase("aborted at the registered-server gate: nothing was changed")
            raise ApplicationError(
                f"{PROCEDURE}: server {inp.server_name} is already registered "
                f"(id {existing}) and abort was chosen: nothing was changed",
                type=PROCEDURE_ABORTED,
                non_retryable=True,
            )
        self.server_id = existing

    async def _register(self, inp: OxNodeUpgradeInput, settings: OxSettings, admin: Node, n: Node) -> None:
        """3, before the first new node starts under its new SERVER_NAME: real OX resolves a
        node's server by that name, so it must be registered first (the seed's order)."""
        if self.server_id is not None:
            self.timeline.record(
                f"3 server {inp.server_name} already registered (id {self.server_id}): used",
                "ok",
                node=admin.name,
                seed_step="3",
                detail="continue chosen at the gate",
            )
            return
        self.server_id = await self.step(
            f"3 register server {inp.server_name}",
            partial(
                self.change,
                ox.ox_register_server,
                ox.OxServerRequest(node=admin, ox=settings, name=inp.server_name),
            ),
            node=admin.name,
            seed_step="3",
        )

    async def _closed_pools(self, settings: OxSettings, admin: Node) -> list[str]:
        """What listdatabaseschema cannot show: contexts in pools whose maxUnits is 0."""
        pools: tuple[ox.OxDatabase, ...] = await self.read(
            ox.ox_list_databases, ox.OxNodeRequest(node=admin, ox=settings)
        )
        return [
            f"database pool {p.name} (id {p.id}) has maxUnits 0 and holds {p.current_units} contexts: "
            "listdatabaseschema leaves closed pools out (OXUtilMySQLStorage: max_units <> 0), so its "
            "schemata would never move and the last old node could not leave; open it for the upgrade "
            "(changedatabase --maxunit) or move its contexts first"
            for p in pools
            if p.max_units == 0 and p.current_units > 0
        ]

    async def _check_all_moved(self, shares: list[NodeShare], settings: OxSettings, admin: Node) -> None:
        if workflow.patched(PATCH_CLOSED_POOLS):
            closed = await self._closed_pools(settings, admin)
            if closed:
                raise ApplicationError("; ".join(closed), type=SCHEMATA_NOT_MOVED, non_retryable=True)
        moved = set(self.moved)
        left = [s for share in shares for s in share.schemata if s not in moved]
        if left:
            raise ApplicationError(
                f"{len(left)} schemata are not on the new server ({', '.join(left[:10])}"
                f"{', ...' if len(left) > 10 else ''}): the last old node cannot leave the main balancer; "
                "fix them (ox-upgradeschemata with resume_from / the failure gates), then retry",
                type=SCHEMATA_NOT_MOVED,
                non_retryable=True,
            )

    # ================================================================== changes
    async def _set_property(
        self, settings: OxSettings, n: Node, path: str, key: str, value: str | None, record: str = ""
    ) -> ox.OxPropertyChange:
        """`record` names the change (seed step): the node keeps the value it replaced under
        a run-unique id, so a retried change still reports the original for the rollback."""
        record_id = ""
        if record:
            info = workflow.info()
            record_id = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{info.run_id[:12]}-{n.name}-{record}-{key}")[:120]
        change: ox.OxPropertyChange = await self.change(
            ox.ox_set_property,
            ox.OxSetPropertyRequest(node=n, path=path, key=key, value=value, record_id=record_id),
        )
        return change

    async def _remember(self, st: _NodeState, path: str, key: str, change: ox.OxPropertyChange) -> None:
        st.properties.setdefault((path, key), change.previous)

    async def _restore_redirect(
        self, settings: OxSettings, n: Node, previous: str | None, st: _NodeState
    ) -> None:
        if st.installed:
            return  # the node's own rollback puts its properties back
        if self.moved and workflow.patched(PATCH_KEEP_REDIRECT_WHILE_MOVED):
            # Schemata live on the new server: an old node must keep sending their users to
            # the secondary balancer (seed: the redirect works only while the property is set).
            self.timeline.record(
                f"rollback: {REDIRECT_KEY} kept",
                "skipped",
                node=n.name,
                detail=f"{len(self.moved)} schemata live on the new server; their users "
                "reach it only through this redirect",
            )
            return
        await self.timeline.step(
            f"rollback: {REDIRECT_KEY} as before",
            self._set_property(settings, n, settings.server_properties, REDIRECT_KEY, previous),
            node=n.name,
        )
        await self.timeline.step(
            "rollback: reload the configuration",
            self.change(ox.ox_reload_configuration, ox.OxNodeRequest(node=n, ox=settings)),
            node=n.name,
        )

    async def _roll_back_node(
        self,
        inp: OxNodeUpgradeInput,
        settings: OxSettings,
        main: LoadBalancer,
        secondary: LoadBalancer,
        n: Node,
        st: _NodeState,
        previous: str,
    ) -> None:
        inv = inp.inventory
        if self.moved and st.installed:
            self.timeline.record(
                f"rollback: {n.name} stays on {inp.version}",
                "skipped",
                node=n.name,
                detail=f"{len(self.moved)} schemata live on the new server; only this "
                "release can serve their users",
            )
            return
        if st.in_secondary:
            await self.take_out(inv, n, "rollback", lbs=[secondary])
        if st.stopped:
            await self.timeline.step("rollback: stop the service", self.stop(n), node=n.name)
            if st.installed:
                await self.timeline.step(
                    f"rollback: install {previous}",
                    self.change(
                        ox.ox_install_version, ox.OxInstallRequest(node=n, ox=settings, version=previous)
                    ),
                    node=n.name,
                )
            for (path, key), value in st.properties.items():
                await self.timeline.step(
                    f"rollback: {key} as before",
                    self._set_property(settings, n, path, key, value),
                    node=n.name,
                )
            await self.timeline.step("rollback: start the service", self.start(n), node=n.name)
            await self.timeline.step(
                f"rollback: healthy on {previous}", self.check_running(inv, n, previous), node=n.name
            )
        if st.drained:
            await self.put_back(inv, n, "rollback", lbs=[main])
        st.installed = False  # the step-0 compensation may now restore the redirect URL
        st.properties.clear()

    # ================================================================== result
    def _result(
        self,
        inp: OxNodeUpgradeInput,
        previous: str,
        nodes: list[Node],
        shares: list[NodeShare],
        plan: list[str],
        dry_run: bool,
    ) -> OxNodeUpgradeResult:
        return OxNodeUpgradeResult(
            site=inp.inventory.site,
            version=inp.version,
            previous_version=previous,
            server_name=inp.server_name,
            nodes=tuple(n.name for n in nodes),
            shares=tuple(shares),
            dry_run=dry_run,
            plan=tuple(plan),
            plan_hash=self.plan_hash,
            steps=tuple(self.timeline.steps),
            upgraded_schemata=tuple(self.moved),
            failed_schemata=tuple(self.failed),
            children=tuple(self.children),
        )


# ====================================================================== helpers
def _targets(inp: OxNodeUpgradeInput) -> tuple[OxSettings, LoadBalancer, LoadBalancer, list[Node]]:
    inv = inp.inventory
    if inv.ox is None:
        raise ApplicationError(
            f"inventory {inv.site}: no `ox:` section (an Open-Xchange site needs one)",
            type=INVALID_INPUT,
            non_retryable=True,
        )
    lbs = {lb.name: lb for lb in inv.load_balancers}
    try:
        nodes = [inv.node(name) for name in inp.nodes] if inp.nodes else list(inv.nodes)
    except UnknownNodeError as e:
        raise ApplicationError(str(e), type=UNKNOWN_NODE, non_retryable=True) from None
    if len(nodes) < 2:
        raise ApplicationError(
            "ox-node-upgrade needs at least two nodes: one keeps serving the old "
            "release while another is upgraded",
            type=INVALID_INPUT,
            non_retryable=True,
        )
    return inv.ox, lbs[inv.ox.main_lb], lbs[inv.ox.secondary_lb], nodes


def _version_problems(versions: dict[str, str], target: str) -> list[str]:
    problems: list[str] = []
    distinct = sorted(set(versions.values()))
    if len(distinct) > 1:
        listing = ", ".join(f"{k} {v}" for k, v in versions.items())
        problems.append(f"the nodes run different releases ({listing}): finish the earlier upgrade first")
        return problems
    running = distinct[0]
    try:
        if deploy.compare_versions(running, MIN_FROM) < 0:
            problems.append(
                f"the nodes run {running}: only 7.10.0 and later can be upgraded node by node "
                "(seed 002, Q & A); upgrade to 7.10.0 first with a maintenance window"
            )
        elif deploy.compare_versions(target, running) <= 0:
            problems.append(f"{target} is not newer than the running {running}")
    except ValueError as e:
        problems.append(f"cannot compare versions {running!r} and {target!r}: {e}")
    return problems


def _shares(settings: OxSettings, nodes: list[Node], schemata: list[str]) -> list[NodeShare]:
    """Each node's schemata: `schema_shares` from the inventory (the node after the listed
    shares takes the rest); by default the first node one (a pilot) and the second all the
    others - two nodes: the first all of them. The last node must get none: when it leaves
    the main balancer, no context may still point to the old server."""
    counts = list(settings.schema_shares) or ([1] if len(nodes) > 2 else [])
    out: list[list[str]] = [[] for _ in nodes]
    rest = list(schemata)
    for i in range(len(nodes)):
        if i < len(counts):
            out[i], rest = rest[: counts[i]], rest[counts[i] :]
        elif i == len(counts):
            out[i], rest = rest, []
    if out[-1] or rest:
        left = len(out[-1]) + len(rest)
        raise preflight_failed(
            [
                f"{left} schemata would still be on the old server when the last node "
                f"({nodes[-1].name}) leaves the main balancer: give them to an earlier "
                f"node (ox.schema_shares {list(settings.schema_shares)})"
            ],
            [],
        )
    return [NodeShare(node=n.name, schemata=tuple(s)) for n, s in zip(nodes, out, strict=True)]


def _plan(inp: OxNodeUpgradeInput, previous: str, nodes: list[Node], shares: list[NodeShare]) -> list[str]:
    lines = [
        f"{PROCEDURE} on {inp.inventory.site}: {previous} -> {inp.version}, new server {inp.server_name}",
        f"0 migrationRedirectURL on {', '.join(n.name for n in nodes)}",
    ]
    for i, (n, share) in enumerate(zip(nodes, shares, strict=True)):
        what = (
            f"{len(share.schemata)} schemata ({share.schemata[0]} .. {share.schemata[-1]})"
            if share.schemata
            else "no schema"
        )
        lines.append(
            f"{n.name}: 1 out of main, 2 upgrade, 8 no redirect URL, 9 into secondary, "
            + ("3 register, " if i == 0 else "")
            + f"4-7 {what}"
        )
    lines.append("post: every node into main (before the last leaves it), secondary emptied")
    lines.append(f"options: force={inp.force} concurrency={inp.concurrency}")
    return lines
