"""Site operations every procedure composes: preflight checks, taking a node out of its
pools and putting it back, checking that it runs a version, and Version Guard.

`SiteProcedure` adds them to `Procedure` (activity calls, guided steps, the saga). They are
workflow code: deterministic, only activities touch the site.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ApplicationError

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
    import activities.ssh as ssh
    from inventory.model import Application, Database, Inventory, LoadBalancer, Node

from errors import (
    INSUFFICIENT_DISK_SPACE,
    INVALID_INPUT,
    INVALID_VERSION,
    PREFLIGHT_FAILED,
    PROTECTED_FILE_MISSING,
    SERVICE_NOT_RUNNING,
    SSH_UNREACHABLE,
    UPGRADE_PATH_IMPOSSIBLE,
    VERSION_NOT_NEWER,
)
from workflows import timeouts
from workflows.procedure import ACTION_RETRY, LONG, Procedure
from workflows.saga import reason

UP_TIMEOUT_S = 60.0


# ------------------------------------------------------------------ servers that come and go
def server_address(n: Node) -> str:
    """host:port where the balancer reaches a node (haproxy.server_address: its url's, an
    IPv6 host in brackets); a url without a host is bad input, said as such."""
    try:
        return haproxy.server_address(n.url)
    except ValueError as e:
        raise ApplicationError(f"{n.name}: {e}", type=INVALID_INPUT, non_retryable=True) from None


def default_names(old: list[Node], version: str) -> tuple[str, ...]:
    """The new servers' names: each old one's, with the release (node1-v2-0-0)."""
    return tuple(f"{n.name}-v{version.replace('.', '-')}"[:63] for n in old)


def with_member(lb: LoadBalancer, name: str) -> LoadBalancer:
    """`lb` with `name` among its members (a server attached at run time)."""
    return dataclasses.replace(lb, members={**lb.members, name: lb.members.get(name, name)})


def inventory_dir(inv: Inventory) -> str:
    """The inventory file's folder: where the provisioning commands run."""
    src = inv.source or ""
    return src.rsplit("/", 1)[0] if "/" in src else "."


@dataclass
class NodeProgress:
    """What has been attempted on a node, so its compensation undoes exactly that."""

    drain_attempted: bool = False
    stop_attempted: bool = False
    deploy_attempted: bool = False
    backup: deploy.AppBackup | None = None


class SiteProcedure(Procedure):
    # ------------------------------------------------------------------ preflight
    async def preflight_nodes(
        self,
        inv: Inventory,
        nodes: list[Node],
        package: deploy.PackageInfo,
        extra: Callable[[Node], Awaitable[None]] | None = None,
        name: str = "P2 nodes reachable, running, healthy, upgradable",
        seed_step: str = "P2",
    ) -> dict[str, str]:
        """Every node: SSH, service running, known to its load balancers, healthy, on a
        version the package may upgrade (Version Guard), plus `extra`. Returns the running
        versions; raises PreflightFailed listing every problem of every node."""

        async def check_node(n: Node) -> str:
            probe: ssh.SshProbeResult = await self.read(ssh.ssh_probe, ssh.SshProbeRequest(target=n.ssh))
            if not probe.ok:
                raise ApplicationError(
                    probe.error or f"ssh {n.ssh.host}:{n.ssh.port}: unreachable",
                    type=probe.error_type or SSH_UNREACHABLE,
                    non_retryable=True,
                )
            service: node.ServiceState = await self.read(node.service_status, node.ServiceRequest(node=n))
            if not service.running:
                raise ApplicationError(
                    f"{n.name}: its service is not running ({service.detail}); "
                    "start it (or fix it) before upgrading",
                    type=SERVICE_NOT_RUNNING,
                    non_retryable=True,
                )
            for lb in lbs_of(inv, n):
                await self.read(haproxy.lb_check_member, haproxy.MemberRequest(lb=lb, node=n.name))
            await self.read(
                http_checks.check_health,
                http_checks.HttpCheckRequest(base_url=n.url, check=inv.application.health, timeout_s=10.0),
            )
            running: str = await self.read(
                http_checks.get_version,
                http_checks.VersionRequest(base_url=n.url, check=inv.application.version),
            )
            check_upgrade_path(n.name, running, package)
            if extra is not None:
                await extra(n)
            return running

        async def checks() -> dict[str, str]:
            results = await asyncio.gather(*(check_node(n) for n in nodes), return_exceptions=True)
            problems = [
                f"{n.name}: {reason(r)}"
                for n, r in zip(nodes, results, strict=True)
                if isinstance(r, BaseException)
            ]
            if problems:
                raise preflight_failed(problems, [r for r in results if isinstance(r, BaseException)])
            return {n.name: str(r) for n, r in zip(nodes, results, strict=True)}

        return await self.timeline.step(name, checks(), seed_step=seed_step)

    async def check_capacity(
        self, inv: Inventory, batches: list[list[Node]], label: str = "batch", seed_step: str = "P3"
    ) -> None:
        """No batch (group) may empty a pool. Every other member's state is read, not assumed."""

        async def check() -> None:
            problems: list[str] = []
            for lb in inv.load_balancers:
                members = sorted(lb.members)
                states = await asyncio.gather(
                    *(
                        self.read(haproxy.lb_member_state, haproxy.MemberRequest(lb=lb, node=m))
                        for m in members
                    ),
                    return_exceptions=True,
                )
                serving = {
                    m
                    for m, s in zip(members, states, strict=True)
                    if isinstance(s, haproxy.MemberState) and s.admin == "ready" and s.status.startswith("UP")
                }
                for i, batch in enumerate(batches, start=1):
                    in_batch = {n.name for n in batch}
                    if in_batch & set(members) and not serving - in_batch:
                        names = ", ".join(sorted(in_batch))
                        now = ", ".join(sorted(serving)) or "none"
                        problems.append(
                            f"load balancer {lb.name}: {label} {i} ({names}) would leave no "
                            f"member serving (serving now: {now})"
                        )
            if problems:
                raise preflight_failed(problems, [])

        await self.timeline.step(
            f"{seed_step} every pool keeps a serving member", check(), seed_step=seed_step
        )

    async def check_node_storage(self, inv: Inventory, package: deploy.PackageInfo, n: Node) -> None:
        """Free disk for the backup and the deploy, and every protected file present (the
        backup must hold it). A preflight check: raises a typed error, changes nothing."""
        storage: node.NodeStorage = await self.read(
            node.inspect_node_storage,
            node.NodeStorageRequest(
                node=n, protected_files=inv.application.protected_files, package_size=package.size
            ),
        )
        if storage.missing_protected:
            raise ApplicationError(
                f"protected file(s) missing: {', '.join(storage.missing_protected)} "
                "(the backup must hold them)",
                type=PROTECTED_FILE_MISSING,
                non_retryable=True,
            )
        if not storage.ok:
            raise ApplicationError(storage.detail, type=INSUFFICIENT_DISK_SPACE, non_retryable=True)

    # ------------------------------------------------------------------ database
    async def back_up_database(
        self, db: Database, backup_id: str, name: str, seed_step: str, kept_as: str
    ) -> mysql.DbBackup:
        """A logical dump of `db` into its backup_dir, listed in the abort report as kept."""
        backup: mysql.DbBackup = await self.step(
            name,
            partial(
                self.change,
                mysql.db_backup,
                mysql.BackupRequest(db=db, backup_id=backup_id, directory=db.backup_dir or ""),
                timeout=LONG,
            ),
            seed_step=seed_step,
        )
        self.kept[kept_as] = backup.path
        return backup

    async def run_script(
        self, db: Database, pending: list[deploy.MigrationSpec], name: str, seed_step: str
    ) -> None:
        """The upgrade script (the package's pending migrations, in order) on `db`: one step
        per migration, each recorded in the schema's version table."""
        for m in pending:
            await self.step(
                f"{name} (migration {m.version})",
                partial(
                    self.change,
                    mysql.db_apply_migration,
                    mysql.MigrationRequest(db=db, version=m.version, sql=m.up_sql, direction="up"),
                    timeout=LONG,
                ),
                seed_step=seed_step,
            )

    # ------------------------------------------------------------------ load balancers
    def set_state(self, lb: LoadBalancer, n: Node, state: haproxy.LbState) -> Any:
        return self.change(haproxy.lb_set_state, haproxy.SetStateRequest(lb=lb, node=n.name, state=state))

    async def attach(self, lb: LoadBalancer, n: Node, seed_step: str, local: bool = False) -> None:
        """`seed_step` a new server into `lb` at run time, then wait until it is UP (two steps;
        `local`: the add as a local activity, for a maintenance window's every millisecond)."""
        member = with_member(lb, n.name)
        await self.step(
            f"{seed_step} attach to {lb.name}",
            partial(
                self.change,
                haproxy.lb_add_server,
                haproxy.AddServerRequest(lb=member, node=n.name, address=server_address(n)),
                local=local,
            ),
            node=n.name,
            seed_step=seed_step,
        )
        await self.step(
            f"{seed_step} wait UP on {lb.name}",
            partial(self.wait_up, member, n),
            node=n.name,
            seed_step=seed_step,
        )

    async def take_out(
        self, inv: Inventory, n: Node, seed_step: str, lbs: list[LoadBalancer] | None = None
    ) -> None:
        """Drain `n` on each of its load balancers (or `lbs`), wait for zero sessions, then
        hold it in maintenance (drain still admits sticky sessions: close the door before
        touching it)."""
        for lb in lbs_of(inv, n) if lbs is None else lbs:
            await self.step(
                f"{seed_step} drain on {lb.name}",
                partial(self.set_state, lb, n, "drain"),
                node=n.name,
                seed_step=seed_step,
            )
            await self.step(
                f"{seed_step} wait for zero sessions on {lb.name}",
                partial(
                    self.wait,
                    haproxy.lb_wait_drained,
                    haproxy.WaitRequest(lb=lb, node=n.name, timeout_s=lb.drain_timeout_s),
                    lb.drain_timeout_s,
                ),
                node=n.name,
                seed_step=seed_step,
            )
            await self.step(
                f"{seed_step} hold in maintenance on {lb.name}",
                partial(self.set_state, lb, n, "maint"),
                node=n.name,
                seed_step=seed_step,
            )

    async def put_back(
        self, inv: Inventory, n: Node, seed_step: str, lbs: list[LoadBalancer] | None = None
    ) -> None:
        """Ready on each of its load balancers (or `lbs`), then wait until the LB sees it UP."""
        for lb in lbs_of(inv, n) if lbs is None else lbs:
            await self.step(
                f"{seed_step} set ready on {lb.name}",
                partial(self.set_state, lb, n, "ready"),
                node=n.name,
                seed_step=seed_step,
            )
            await self.step(
                f"{seed_step} wait UP on {lb.name}",
                partial(self.wait_up, lb, n),
                node=n.name,
                seed_step=seed_step,
            )

    # ------------------------------------------------------------------ nodes
    async def check_running(self, inv: Inventory, n: Node, expected: str) -> None:
        """Healthy, on the expected version, and (when configured) a user can log on."""
        await self.wait(
            http_checks.wait_healthy,
            http_checks.WaitHealthyRequest(
                base_url=n.url, check=inv.application.health, timeout_s=inv.rollout.health_timeout_s
            ),
            inv.rollout.health_timeout_s,
        )
        await self.read(
            http_checks.get_version,
            http_checks.VersionRequest(base_url=n.url, check=inv.application.version, expect=expected),
            retry=ACTION_RETRY,
        )
        await self.log_on(inv, n)

    async def log_on(self, inv: Inventory, n: Node) -> None:
        if inv.application.login is not None:
            await self.read(
                http_checks.check_login,
                http_checks.LoginRequest(base_url=n.url, check=inv.application.login),
                retry=ACTION_RETRY,
            )

    async def roll_back_node(self, inv: Inventory, n: Node, done: NodeProgress, version: str) -> None:
        """Put a node back as it was: old files, `version` running and checked, in its pools."""
        if not done.drain_attempted:
            return
        lbs = lbs_of(inv, n)
        if done.stop_attempted:
            # The node may be serving (it finished, then a later node failed): drain it first.
            for lb in lbs:
                await self.rollback_drain(lb, n)
            await self.timeline.step("rollback: stop service", self.stop(n), node=n.name)
            if done.deploy_attempted and done.backup is not None:
                await self.timeline.step(
                    "rollback: restore app folder",
                    self.change(deploy.restore_app_folder, done.backup, timeout=LONG),
                    node=n.name,
                )
            await self.timeline.step("rollback: start service", self.start(n), node=n.name)
            await self.timeline.step(
                "rollback: wait healthy, check previous version",
                self.check_running(inv, n, version),
                node=n.name,
            )
        for lb in lbs:
            await self.rollback_ready(lb, n)

    async def rollback_drain(self, lb: LoadBalancer, n: Node, what: str = "rollback: drain") -> None:
        """In a rollback: `n` drained on `lb`, then its sessions waited out."""
        await self.timeline.step(f"{what} on {lb.name}", self.set_state(lb, n, "drain"), node=n.name)
        await self.timeline.step(
            f"rollback: wait for zero sessions on {lb.name}",
            self.wait(
                haproxy.lb_wait_drained,
                haproxy.WaitRequest(lb=lb, node=n.name, timeout_s=lb.drain_timeout_s),
                lb.drain_timeout_s,
            ),
            node=n.name,
        )

    async def rollback_ready(self, lb: LoadBalancer, n: Node, what: str = "rollback: set ready") -> None:
        """In a rollback: `n` ready on `lb`, then UP there."""
        await self.timeline.step(f"{what} on {lb.name}", self.set_state(lb, n, "ready"), node=n.name)
        await self.timeline.step(f"rollback: wait UP on {lb.name}", self.wait_up(lb, n), node=n.name)

    async def wait_up(self, lb: LoadBalancer, n: Node) -> None:
        """Until `n` is UP on `lb` (its health checks pass), within UP_TIMEOUT_S."""
        await self.wait(
            haproxy.lb_wait_up, haproxy.WaitRequest(lb=lb, node=n.name, timeout_s=UP_TIMEOUT_S), UP_TIMEOUT_S
        )

    def deploy(self, app: Application, n: Node, package: deploy.PackageInfo) -> Any:
        """The package onto the node: its protected files kept, its customisations merged."""
        return self.change(
            deploy.deploy_package,
            deploy.DeployRequest(
                node=n,
                package=package,
                protected_files=app.protected_files,
                merge_files=app.merge_files,
                release_id=f"{package.name}-{package.version}",
            ),
            timeout=LONG,
        )

    def stop(self, n: Node) -> Any:
        return self.change(node.stop_service, node.ServiceRequest(node=n), timeout=svc_timeout(n))

    def start(self, n: Node) -> Any:
        return self.change(node.start_service, node.ServiceRequest(node=n), timeout=svc_timeout(n))


def lbs_of(inv: Inventory, n: Node) -> list[LoadBalancer]:
    return [lb for lb in inv.load_balancers if n.name in lb.members]


def run_key() -> str:
    """Backup ids unique to this run: a workflow id may be reused by a later run, whose
    backups must never be mistaken for this one's."""
    info = workflow.info()
    return f"{info.workflow_id}-{info.run_id}"


def check_upgrade_path(node_name: str, running: str, package: deploy.PackageInfo) -> None:
    """Version Guard: newer than what runs, and reachable from it without skipping a version
    that must be installed first (the error lists them, in order)."""
    verdict = deploy.version_guard(running, package)
    if verdict.ok:
        return
    if not verdict.install_first:
        try:
            newer = deploy.compare_versions(package.version, running) > 0
        except ValueError:
            raise ApplicationError(
                f"{node_name}: {verdict.reason}", type=INVALID_VERSION, non_retryable=True
            ) from None
        if not newer:
            raise ApplicationError(
                f"{node_name} runs {running}; package {package.version} is not newer",
                type=VERSION_NOT_NEWER,
                non_retryable=True,
            )
        raise ApplicationError(f"{node_name}: {verdict.reason}", type=INVALID_VERSION, non_retryable=True)
    raise ApplicationError(
        f"{node_name} runs {running}; {verdict.reason}",
        "install first: " + ", ".join(verdict.install_first),
        type=UPGRADE_PATH_IMPOSSIBLE,
        non_retryable=True,
    )


def svc_timeout(n: Node) -> timedelta:
    return timeouts.service(n.service.timeout_s)


def preflight_failed(problems: list[str], errors: list[BaseException]) -> ApplicationError:
    """One error listing every problem; its details name the error types (for tests, tools)."""
    kinds = sorted({k for k in (error_type(e) for e in errors) if k})
    return ApplicationError(
        "preflight failed, nothing was changed:\n  " + "\n  ".join(problems),
        *kinds,
        type=PREFLIGHT_FAILED,
        non_retryable=True,
    )


def error_type(e: BaseException) -> str | None:
    cause: BaseException | None = e
    while cause is not None:
        if isinstance(cause, ApplicationError) and cause.type:
            return cause.type
        cause = cause.__cause__
    return None
