"""Unit tests of the activity adapters' pure logic (no lab needed).

Command strings, parsers, config merge, versions, secrets and package inspection are
tested directly; waiting activities run in temporalio's ActivityEnvironment against small
stand-ins (a fake HAProxy runtime API on a unix socket, an aiohttp app) so heartbeats,
deadlines and cancellation are exercised for real.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import inspect
import json
import socket
import typing
import zipfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from temporalio import activity
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities import ALL_ACTIVITIES, deploy, haproxy, http_checks, mysql, node, ssh
from activities.deploy import (
    PackageRequest,
    compare_versions,
    inspect_package,
    inspect_package_file,
    merge_config,
    merge_config_detailed,
    parse_sha256sum,
)
from activities.haproxy import (
    AddServerRequest,
    MemberRequest,
    SetStateRequest,
    WaitRequest,
    parse_servers_state,
    parse_show_stat,
)
from activities.http_checks import HttpCheckRequest, LoginRequest, VersionRequest, WaitHealthyRequest
from activities.node import iis_scripts, service_commands
from activities.secrets import resolve_secret
from inventory.model import HttpCheck, LoadBalancer, Node, SecretRef, ServiceControl, SshTarget

FIXTURES = Path(__file__).parent / "fixtures"


def _error(exc_info: pytest.ExceptionInfo[ApplicationError]) -> ApplicationError:
    return exc_info.value


# =========================================================================== registry


def test_all_activities_are_registered_once_and_take_one_frozen_dataclass() -> None:
    names = [activity._Definition.must_from_callable(fn).name for fn in ALL_ACTIVITIES]
    assert len(names) == len(set(names)), names
    assert {"lb_wait_drained", "deploy_package", "db_backup", "wait_healthy", "ssh_probe"} <= set(names)
    for fn in ALL_ACTIVITIES:
        assert inspect.iscoroutinefunction(fn), fn
        params = list(inspect.signature(fn).parameters.values())
        assert len(params) == 1, fn
        hints = typing.get_type_hints(fn)
        arg = hints[params[0].name]
        assert dataclasses.is_dataclass(arg) and _frozen(arg), (fn, arg)
        ret = hints["return"]
        if dataclasses.is_dataclass(ret):
            assert _frozen(ret), (fn, ret)


def _frozen(cls: Any) -> bool:
    return bool(cls.__dataclass_params__.frozen)


def test_complex_inputs_and_results_survive_the_payload_converter() -> None:
    """Workflows receive these through Temporal's JSON converter: nested dataclasses, tuples
    and dicts must come back equal."""
    from temporalio.converter import DataConverter

    target = SshTarget(host="h", port=2222, user="u", key=SecretRef(file="/k"), known_hosts="/kh")
    n = Node(
        name="n1",
        ssh=target,
        app_dir="app",
        url="http://h:1",
        service=ServiceControl(kind="iis", site="s", app_pool="p", timeout_s=30),
    )
    pkg = deploy.PackageInfo(
        path="/p.zip",
        sha256="ab",
        name="x",
        version="2.0.0",
        min_upgrade_from="1.0",
        schema_version=2,
        migrations=(deploy.MigrationSpec(2, "up;", "down;", True),),
        files=3,
        size=10,
    )
    samples: list[Any] = [
        pkg,
        deploy.DeployRequest(n, pkg, ("a.config",), ("web.config",), "r1"),
        deploy.AppBackup(
            node=n,
            node_name="n1",
            backup_id="b",
            path=".zerodown/backups/b.tar",
            files=1,
            manifest={"a b/c": "00"},
            protected={"a.config": "11"},
        ),
        deploy.DeployResult(
            "n1", "2.0.0", 3, (deploy.MergeReport("web.config", ("k",), ("-a", "+b"), True, ("note",)),)
        ),
        haproxy.MemberState("lb", "n1", "app", "s1", "UP 1/2", 0, "ready", 1, "L7OK"),
        mysql.ReplicaStatus("h", 1, True, "Yes", "Yes", None, "0-1-2", "0-1-2", "", "", True),
        http_checks.WaitHealthyResult("u", 1.5, 3, http_checks.HttpCheckResult("u", 200, "ok", 3)),
    ]
    conv = DataConverter.default.payload_converter
    for obj in samples:
        back = conv.from_payloads(conv.to_payloads([obj]), [type(obj)])[0]
        assert back == obj, type(obj)


# =========================================================================== service commands


def test_command_kind_is_passed_through() -> None:
    svc = ServiceControl(kind="command", stop="./ctl stop", start="./ctl start", status="./ctl status")
    assert service_commands(svc) == node.ServiceCommands("./ctl stop", "./ctl start", "./ctl status")


def test_systemd_commands() -> None:
    c = service_commands(ServiceControl(kind="systemd", unit="labapp.service"))
    assert (c.stop, c.start, c.status) == (
        "systemctl stop labapp.service",
        "systemctl start labapp.service",
        "systemctl is-active labapp.service",
    )
    odd = service_commands(ServiceControl(kind="systemd", unit="app; rm -rf /"))
    assert odd.stop == "systemctl stop 'app; rm -rf /'"


def _decode_ps(command: str) -> str:
    prefix = "powershell -NoProfile -NonInteractive -EncodedCommand "
    assert command.startswith(prefix)
    return base64.b64decode(command[len(prefix) :]).decode("utf-16-le")


def test_iis_scripts_exact() -> None:
    c = service_commands(
        ServiceControl(kind="iis", site="Default Web Site", app_pool="LabPool", timeout_s=90)
    )
    head = (
        "$ErrorActionPreference = 'Stop'; Import-Module WebAdministration; "
        "$null = Get-Item ('IIS:\\Sites\\' + 'Default Web Site'); "
        "$null = Get-Item ('IIS:\\AppPools\\' + 'LabPool'); "
    )
    state = "(Get-WebAppPoolState -Name 'LabPool').Value"
    workers = (
        "@(Get-ChildItem ('IIS:\\AppPools\\' + 'LabPool' + '\\WorkerProcesses') "
        "-ErrorAction SilentlyContinue).Count"
    )
    sharing = (
        "$others = @(Get-WebApplication | Where-Object { $_.applicationPool -eq 'LabPool' }) + "
        "@(Get-Website | Where-Object { $_.applicationPool -eq 'LabPool' "
        "-and $_.name -ne 'Default Web Site' }); "
        "if ($others.Count -gt 0) { Write-Output ('app pool ' + 'LabPool' + ' also serves ' + "
        "(($others | ForEach-Object { if ($_.name) { $_.name } else { $_.path } }) -join ', ') + "
        "': stopping it stops them too (service.shared_pool: true if intended)'); exit 5 }; "
    )
    deadline = "$deadline = (Get-Date).AddSeconds(90); "

    def wait(condition: str, wanted: str, extra: str = "") -> str:
        return (
            f"while ({condition}) {{ if ((Get-Date) -gt $deadline) {{ "
            f"Write-Output ('app pool ' + 'LabPool' + ' did not reach {wanted}, state: ' + {state}{extra}); "
            "exit 1 }; Start-Sleep -Milliseconds 250 }; "
        )

    # Starting / Stopping waited out first: Stop-WebAppPool only from Started (0x800710D8 else).
    settle = wait(f"@('Starting', 'Stopping') -contains {state}", "a settled state")
    assert _decode_ps(c.stop) == (
        head
        + sharing
        + deadline
        + "Stop-Website -Name 'Default Web Site'; "
        + settle
        + f"if ({state} -eq 'Started') {{ Stop-WebAppPool -Name 'LabPool' }}; "
        + wait(
            f"({state} -ne 'Stopped') -or ({workers} -gt 0)",
            "Stopped",
            f" + ', worker processes: ' + {workers}",
        )
        + "exit 0"
    )
    assert _decode_ps(c.start) == (
        head
        + deadline
        + settle
        + f"if ({state} -eq 'Stopped') {{ Start-WebAppPool -Name 'LabPool' }}; "
        + wait(f"{state} -ne 'Started'", "Started")
        + "Start-Website -Name 'Default Web Site'; exit 0"
    )
    # Stopped with a worker process still finishing requests is not stopped yet (exit 4).
    assert _decode_ps(c.status) == (
        head + f"$s = {state}; $w = {workers}; "
        "if ($s -eq 'Started') { Write-Output $s; exit 0 } "
        "elseif ($s -eq 'Stopped' -and $w -eq 0) { Write-Output $s; exit 3 } "
        "elseif ($s -eq 'Stopped') { "
        "Write-Output ('Stopped, worker processes still running: ' + $w); exit 4 } "
        "else { Write-Output $s; exit 4 }"
    )
    # A pool the inventory says is shared on purpose: no refusal.
    shared = service_commands(
        ServiceControl(
            kind="iis", site="Default Web Site", app_pool="LabPool", timeout_s=90, shared_pool=True
        )
    )
    assert "$others" not in _decode_ps(shared.stop) and "Stop-WebAppPool" in _decode_ps(shared.stop)


@pytest.mark.parametrize("going", ["Stopping", "Unknown"])
async def test_an_iis_pool_between_states_is_not_stopped(monkeypatch: pytest.MonkeyPatch, going: str) -> None:
    """Issue 17.4: Stopping / Unknown (exit 4) is neither running nor stopped: a stop runs
    its script and waits for Stopped instead of reporting a pool still stopping as done."""
    from activities import node as node_mod
    from activities import ssh

    states = iter([going, going, "Stopped"])
    sent: list[str] = []

    async def run(target: Any, command: str, timeout_s: float = 60.0, check: bool = True, **_: Any) -> Any:
        script = _decode_ps(command)
        if "exit 4" in script:  # the status script
            st = next(states)
            code = {"Started": 0, "Stopped": 3}.get(st, 4)
            return ssh.CommandResult(exit_status=code, stdout=st, stderr="")
        sent.append(script)
        return ssh.CommandResult(exit_status=0, stdout="", stderr="")

    monkeypatch.setattr(ssh, "run", run)
    n = Node(
        name="win1",
        ssh=SshTarget(host="h"),
        app_dir="C:/app",
        service=ServiceControl(kind="iis", site="S", app_pool="P", timeout_s=5),
        url="http://win1",
    )
    st = await node_mod.set_running(n, False)
    assert (st.running, st.settled, st.detail, st.changed) == (False, True, "Stopped", True)
    assert len(sent) == 1 and "Stop-WebAppPool" in sent[0]


@pytest.mark.parametrize("quote", ["'", "\u2018", "\u2019", "\u201a", "\u201b"])
def test_every_quote_powershell_honours_is_doubled(quote: str) -> None:
    # PowerShell ends a single-quoted string at any of these (issue 17.4): a typographic
    # quote in a site name must not close the literal and let the rest run as code.
    s = iis_scripts(f"site{quote}; Remove-Item C:\\ -Recurse; {quote}", "p", 60)
    assert f"Stop-Website -Name 'site{quote}{quote}; Remove-Item C:\\ -Recurse; {quote}{quote}';" in s.stop


def test_iis_names_are_quoted_safely() -> None:
    s = iis_scripts("Bob's site", "pool'; Remove-Item C:\\ -Recurse; '", 60)
    assert "Stop-Website -Name 'Bob''s site';" in s.stop
    assert "Stop-WebAppPool -Name 'pool''; Remove-Item C:\\ -Recurse; ''' }" in s.stop
    c = service_commands(ServiceControl(kind="iis", site="Bob's site", app_pool="p", timeout_s=60))
    assert _decode_ps(c.stop) == iis_scripts("Bob's site", "p", 60).stop
    # -EncodedCommand carries only base64: nothing for an outer shell to interpret
    assert c.stop.split()[-1].isascii() and "'" not in c.stop


@pytest.mark.parametrize(
    "svc",
    [
        ServiceControl(kind="iis", site="x"),
        ServiceControl(kind="systemd"),
        ServiceControl(kind="command", stop="x"),
        ServiceControl(kind="nope"),
    ],
)
def test_incomplete_service_control_is_rejected(svc: ServiceControl) -> None:
    with pytest.raises(ApplicationError) as e:
        service_commands(svc)
    assert e.value.type == "InvalidRequest" and e.value.non_retryable


# =========================================================================== haproxy parsing


def test_parse_show_stat_recorded_fixture() -> None:
    rows = parse_show_stat((FIXTURES / "haproxy_show_stat.csv").read_text())
    by = {(r.pxname, r.svname): r for r in rows}
    assert by[("app", "node1")].status == "UP" and by[("app", "node1")].admin == "ready"
    assert by[("app", "node1")].check_status == "L7OK" and by[("app", "node1")].weight == 1
    assert by[("app", "node2")].status == "DRAIN" and by[("app", "node2")].admin == "drain"
    assert by[("app", "node3")].status == "MAINT" and by[("app", "node3")].admin == "maint"
    assert by[("app_secondary", "BACKEND")].status == "DOWN"
    assert by[("main", "FRONTEND")].status == "OPEN"
    assert all(r.scur == 0 for r in rows)
    assert len(rows) == 10


def test_parse_show_stat_statuses_and_counts() -> None:
    text = (
        "# pxname,svname,qcur,scur,status,weight,check_status\n"
        "be,s1,0,7,UP 1/2,10,L7OK\n"
        "be,s2,0,,no check,1,\n"
        "be,s3,0,3,MAINT (via be/s1),1,\n"
        "be,s4,0,0,DOWN,1,L4CON\n"
    )
    rows = {r.svname: r for r in parse_show_stat(text)}
    assert (rows["s1"].status, rows["s1"].scur, rows["s1"].weight) == ("UP 1/2", 7, 10)
    assert rows["s2"].status == "no check" and rows["s2"].scur == 0
    assert rows["s3"].admin == "maint" and rows["s4"].check_status == "L4CON"
    with pytest.raises(ValueError):
        parse_show_stat("Unknown command\n")


def test_parse_servers_state_recorded_fixture() -> None:
    states = {
        (s.be_name, s.srv_name): s
        for s in parse_servers_state((FIXTURES / "haproxy_servers_state.txt").read_text())
    }
    assert states[("app", "node1")].admin == "ready" and states[("app", "node1")].op_state == "running"
    assert states[("app", "node2")].admin == "drain" and states[("app", "node2")].admin_bits == 8
    assert states[("app", "node3")].admin == "maint" and states[("app", "node3")].op_state == "stopped"
    assert states[("app_secondary", "node1")].admin == "maint"


def test_judge_version_answer_through_the_page() -> None:
    """lb_preview_check's verdict on one answer of the version check (pure)."""

    def judge(status: int, body: object, header_node: str = "", db: int | None = 2) -> haproxy.VersionAnswer:
        text = body if isinstance(body, str) else json.dumps(body)
        return haproxy.judge_version_answer(status, text, header_node, 200, "2.0.0", db)

    ok = judge(200, {"version": "2.0.0", "node": "web-a", "db_schema": 2, "schema": 2})
    assert ok == haproxy.VersionAnswer("web-a", "2.0.0", "")
    # The node from X-Node when the JSON names none; no db_schema in the answer: not checked.
    assert judge(200, {"version": "2.0.0"}, "web-b") == haproxy.VersionAnswer("web-b", "2.0.0", "")
    assert judge(200, {"version": "2.0.0", "node": "web-a", "db_schema": 1}, db=None).problem == ""
    assert judge(200, {"version": "1.0.0", "node": "web-a"}).problem == "version '1.0.0', expected '2.0.0'"
    assert judge(200, {"version": "1.0.0", "node": "web-a"}).node == "web-a"
    assert judge(200, {"version": "2.0.0", "node": "a", "db_schema": 1}).problem == "db_schema 1, expected 2"
    # null: the node could not read its database.
    assert (
        judge(200, {"version": "2.0.0", "node": "a", "db_schema": None}).problem
        == "db_schema None, expected 2"
    )
    assert (
        judge(200, {"version": "2.0.0", "node": "a", "db_schema": True}, db=1).problem
        == "db_schema True, expected 1"
    )
    page = judge(503, "<h1>Down for maintenance</h1>")
    assert page.problem.startswith("status 503, expected 200 (503 with the page on: ") and page.node == ""
    assert judge(404, "nope", "web-c") == haproxy.VersionAnswer("web-c", "", "status 404, expected 200")
    assert judge(200, "2.0.0").problem == "not a JSON object: '2.0.0'"
    assert judge(200, ["2.0.0"]).problem.startswith("not a JSON object")
    assert judge(200, {"node": "a"}).problem == 'no "version" in the answer'
    assert judge(200, {"version": "2.0.0"}).problem.startswith("names no node")
    assert judge(200, {"version": 2, "node": "a"}, db=None).problem == "version '2', expected '2.0.0'"


# =========================================================================== fake runtime API


class FakeHaproxy:
    """A unix-socket stand-in for HAProxy's runtime API: `show stat`, `show servers state`
    and `set server` on one backend `app` with servers node1..2."""

    def __init__(self) -> None:
        self.scur = {"node1": 0, "node2": 0}
        self.admin = {"node1": 0, "node2": 0}
        self.status = {"node1": "UP", "node2": "UP"}
        self.commands: list[str] = []
        # called before answering `show stat`, to script changes over time
        self.on_show_stat: Callable[[FakeHaproxy], None] = lambda f: None

    def _status(self, s: str) -> str:
        if self.admin[s] & 0x01:
            return "MAINT"
        if self.admin[s] & 0x08 and self.status[s].startswith("UP"):
            return "DRAIN"
        return self.status[s]

    def answer(self, cmd: str) -> str:
        self.commands.append(cmd)
        if cmd == "show stat":
            self.on_show_stat(self)
            lines = ["# pxname,svname,scur,status,weight,check_status"]
            lines += [f"app,{s},{self.scur[s]},{self._status(s)},1,L7OK" for s in self.scur]
            lines.append(f"app,BACKEND,{sum(self.scur.values())},UP,2,")
            return "\n".join(lines) + "\n\n"
        if cmd.startswith("show servers state"):
            rows = [f"3 app {i} {s} 127.0.0.1 2 {self.admin[s]} 1 1" for i, s in enumerate(self.scur, 1)]
            return (
                "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state "
                "srv_uweight srv_iweight\n" + "\n".join(rows) + "\n\n"
            )
        if cmd.startswith("set server "):
            target, _, state = cmd[len("set server ") :].partition(" state ")
            be, _, srv = target.partition("/")
            if be != "app":
                return "No such backend.\n\n"
            if srv not in self.scur:
                return "No such server.\n\n"
            self.admin[srv] = {"ready": 0, "drain": 0x08, "maint": 0x01}[state]
            return "\n"
        return "Unknown command.\n\n"


@pytest.fixture
async def fake_haproxy(tmp_path: Path) -> AsyncIterator[tuple[FakeHaproxy, str]]:
    fake = FakeHaproxy()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = (await reader.readline()).decode().strip()
        writer.write(fake.answer(line).encode())
        await writer.drain()
        writer.close()

    sock = str(tmp_path / "admin.sock")
    server = await asyncio.start_unix_server(handle, path=sock)
    try:
        yield fake, f"unix:{sock}"
    finally:
        server.close()
        await server.wait_closed()


def _lb(api: str, **kw: Any) -> LoadBalancer:
    return LoadBalancer(
        name="main",
        kind="haproxy",
        runtime_api=api,
        backend="app",
        members={"n1": "node1", "n2": "node2", "ghost": "node9"},
        **kw,
    )


async def test_set_state_and_member_state(fake_haproxy: tuple[FakeHaproxy, str]) -> None:
    fake, api = fake_haproxy
    env = ActivityEnvironment()
    st = await env.run(haproxy.lb_set_state, SetStateRequest(_lb(api), "n1", "drain"))
    assert (st.server, st.status, st.admin) == ("node1", "DRAIN", "drain")
    assert "set server app/node1 state drain" in fake.commands
    st = await env.run(haproxy.lb_member_state, MemberRequest(_lb(api), "n1"))
    assert st.admin == "drain"
    st = await env.run(haproxy.lb_set_state, SetStateRequest(_lb(api), "n1", "ready"))
    assert st.is_up


async def test_unknown_member_backend_and_state(fake_haproxy: tuple[FakeHaproxy, str]) -> None:
    _, api = fake_haproxy
    env = ActivityEnvironment()
    with pytest.raises(ApplicationError) as e:
        await env.run(haproxy.lb_set_state, SetStateRequest(_lb(api), "ghost", "drain"))
    assert e.value.type == "LbMemberNotFound" and e.value.non_retryable
    assert "No such server" in e.value.message and "app/node9" in e.value.message
    with pytest.raises(ApplicationError) as e:
        await env.run(haproxy.lb_check_member, MemberRequest(_lb(api), "ghost"))
    assert e.value.type == "LbMemberNotFound"
    with pytest.raises(ApplicationError) as e:
        await env.run(
            haproxy.lb_check_member, MemberRequest(dataclasses.replace(_lb(api), backend="nope"), "n1")
        )
    assert e.value.type == "LbMemberNotFound" and "no such backend 'nope'" in e.value.message
    with pytest.raises(ApplicationError) as e:
        # A state the type forbids (a hand-made request): the activity refuses it all the same.
        await env.run(haproxy.lb_set_state, SetStateRequest(_lb(api), "n1", "off"))  # type: ignore[arg-type]
    assert e.value.type == "InvalidRequest"
    with pytest.raises(ApplicationError) as e:
        await env.run(haproxy.lb_member_state, MemberRequest(_lb(api), "not-a-member"))
    assert e.value.type == "LbMemberNotFound"


async def test_f5_takes_the_member_verbs_but_not_haproxys_runtime_servers() -> None:
    f5 = LoadBalancer(
        name="big",
        kind="f5",
        members={"n1": "10.0.0.1:80"},
        url="https://f5",
        pool="p",
        user="u",
        credential=SecretRef(env="F5"),
    )
    # Attaching servers at run time is HAProxy's runtime API alone (seeds 003 / 004).
    with pytest.raises(ApplicationError) as e:
        await ActivityEnvironment().run(haproxy.lb_add_server, AddServerRequest(f5, "n1", "10.0.0.1:80"))
    assert e.value.type == "LbUnsupported" and e.value.non_retryable and "kind haproxy" in e.value.message
    # The member verbs go to iControl REST (activities/f5.py): a member it does not know is
    # refused before any request.
    with pytest.raises(ApplicationError) as e:
        await ActivityEnvironment().run(haproxy.lb_set_state, SetStateRequest(f5, "n9", "drain"))
    assert e.value.type == "LbMemberNotFound" and "'n9' is not a member" in e.value.message


async def test_runtime_api_unreachable(tmp_path: Path) -> None:
    with pytest.raises(ApplicationError) as e:
        await haproxy.runtime_command(f"unix:{tmp_path}/missing.sock", "show stat")
    assert e.value.type == "LbRuntimeApiError" and not e.value.non_retryable
    port = _free_port()
    with pytest.raises(ApplicationError) as e:
        await haproxy.runtime_command(f"tcp:127.0.0.1:{port}", "show stat")
    assert e.value.type == "LbRuntimeApiError"


async def test_wait_drained_heartbeats_until_sessions_reach_zero(
    fake_haproxy: tuple[FakeHaproxy, str],
) -> None:
    fake, api = fake_haproxy
    fake.scur["node1"] = 3

    def drain(f: FakeHaproxy) -> None:
        f.scur["node1"] = max(0, f.scur["node1"] - 1) if f.admin["node1"] else f.scur["node1"]

    fake.on_show_stat = drain
    env = ActivityEnvironment()
    beats: list[Any] = []
    env.on_heartbeat = lambda *d: beats.append(d[0])
    await env.run(haproxy.lb_set_state, SetStateRequest(_lb(api), "n1", "drain"))
    waited = await env.run(haproxy.lb_wait_drained, WaitRequest(_lb(api), "n1", timeout_s=10))
    assert waited >= 0 and fake.scur["node1"] == 0
    assert beats and all("scur" in b for b in beats)
    assert [b["scur"] for b in beats] == sorted((b["scur"] for b in beats), reverse=True)


async def test_wait_drained_times_out_with_open_sessions(fake_haproxy: tuple[FakeHaproxy, str]) -> None:
    fake, api = fake_haproxy
    fake.scur["node2"] = 4
    with pytest.raises(ApplicationError) as e:
        await ActivityEnvironment().run(haproxy.lb_wait_drained, WaitRequest(_lb(api), "n2", timeout_s=0.6))
    assert e.value.type == "DrainTimeout" and e.value.non_retryable
    assert "4 open session(s)" in e.value.message and "app/node2" in e.value.message


async def test_wait_drained_keeps_the_deadline_across_retries(fake_haproxy: tuple[FakeHaproxy, str]) -> None:
    fake, api = fake_haproxy
    fake.scur["node2"] = 1
    env = ActivityEnvironment()
    # A previous attempt already waited 9.9 of the 10 s.
    env.info = dataclasses.replace(env.info, attempt=2, heartbeat_details=[{"waited_s": 9.9, "scur": 1}])
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(ApplicationError) as e:
        await env.run(haproxy.lb_wait_drained, WaitRequest(_lb(api), "n2", timeout_s=10))
    assert e.value.type == "DrainTimeout" and loop.time() - t0 < 2


async def test_wait_drained_honours_cancellation(fake_haproxy: tuple[FakeHaproxy, str]) -> None:
    fake, api = fake_haproxy
    fake.scur["node1"] = 5
    env = ActivityEnvironment()
    task = asyncio.ensure_future(env.run(haproxy.lb_wait_drained, WaitRequest(_lb(api), "n1", timeout_s=60)))
    await asyncio.sleep(0.6)
    env.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_wait_up(fake_haproxy: tuple[FakeHaproxy, str]) -> None:
    fake, api = fake_haproxy
    fake.status["node2"] = "DOWN"
    polls = {"n": 0}

    def come_up(f: FakeHaproxy) -> None:
        polls["n"] += 1
        if polls["n"] >= 3:
            f.status["node2"] = "UP 1/2"

    fake.on_show_stat = come_up
    st = await ActivityEnvironment().run(haproxy.lb_wait_up, WaitRequest(_lb(api), "n2", timeout_s=10))
    assert st.status == "UP 1/2" and st.is_up
    fake.admin["node1"] = 0x08  # drain: UP but not taking new traffic
    with pytest.raises(ApplicationError) as e:
        await ActivityEnvironment().run(haproxy.lb_wait_up, WaitRequest(_lb(api), "n1", timeout_s=0.5))
    assert e.value.type == "NotUpTimeout" and "admin drain" in e.value.message


async def test_wait_loops_use_short_calls_and_heartbeat_between_them(
    fake_haproxy: tuple[FakeHaproxy, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A poll makes two runtime API calls; with the workflows' 10 s heartbeat timeout a
    call may take at most 4 s and a heartbeat must come between the two."""
    fake, api = fake_haproxy
    events: list[Any] = []
    real = haproxy.runtime_command

    async def recording(api_: str, command: str, timeout_s: float = haproxy.CMD_TIMEOUT_S) -> str:
        events.append(("call", command, timeout_s))
        return await real(api_, command, timeout_s)

    monkeypatch.setattr(haproxy, "runtime_command", recording)
    fake.scur["node1"] = 2
    fake.admin["node1"] = 0x08
    fake.on_show_stat = lambda f: f.scur.update(node1=max(0, f.scur["node1"] - 1))
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *d: events.append(("beat", d[0]))
    await env.run(haproxy.lb_wait_drained, WaitRequest(_lb(api), "n1", timeout_s=10))
    fake.admin["node1"] = 0
    await env.run(haproxy.lb_wait_up, WaitRequest(_lb(api), "n1", timeout_s=10))
    calls = [e for e in events if e[0] == "call"]
    assert calls and all(timeout == haproxy.WAIT_CMD_TIMEOUT_S == 4.0 for _, _, timeout in calls)
    for i, e in enumerate(events):
        if e[0] == "call" and e[1].startswith("show servers state"):
            assert events[i - 1][0] == "beat" and "waited_s" in events[i - 1][1], events[: i + 1]
    # outside the waits the default timeout stays
    events.clear()
    await env.run(haproxy.lb_member_state, MemberRequest(_lb(api), "n1"))
    assert [e[2] for e in events if e[0] == "call"] == [10.0, 10.0]


# =========================================================================== config merge

V1 = """# defaults 1.0
http.port = 8080
node.name = unnamed
greeting = Hello
log.access = on
"""
V2 = """# defaults 2.0
http.port = 8080
node.name = unnamed
greeting = Welcome 2
log.access = on
# new in 2
feature.notes = on
"""


def test_merge_carries_changed_and_added_keys_onto_new_defaults() -> None:
    node_text = (
        V1.replace("http.port = 8080", "http.port = 18011").replace(
            "node.name = unnamed", "node.name = node1"
        )
        + "# customised on this node\ncustom.banner = Hi\n"
    )
    merged, report = merge_config(node_text, V1, V2)
    assert merged == (
        "# defaults 2.0\nhttp.port = 18011\nnode.name = node1\ngreeting = Welcome 2\n"
        "log.access = on\n# new in 2\nfeature.notes = on\n"
        "# customised on this node\ncustom.banner = Hi\n"
    )
    assert report == [
        "--- new defaults",
        "+++ merged",
        "@@ -2,2 +2,2 @@",
        "-http.port = 8080",
        "-node.name = unnamed",
        "+http.port = 18011",
        "+node.name = node1",
        "@@ -7,0 +8,2 @@",
        "+# customised on this node",
        "+custom.banner = Hi",
    ]
    detail = merge_config_detailed(node_text, V1, V2)
    assert detail.carried == ("http.port", "node.name", "custom.banner")


def test_merge_takes_new_default_values_for_keys_the_node_did_not_change() -> None:
    merged, report = merge_config(V1, V1, V2)
    assert merged == V2 and report == []


def test_merge_is_idempotent_once_new_defaults_are_recorded() -> None:
    node_text = V1.replace("greeting = Hello", "greeting = Howdy")
    first, _ = merge_config(node_text, V1, V2)
    again, _ = merge_config(first, V2, V2)
    assert again == first and "greeting = Howdy" in first


def test_merge_without_recorded_defaults_keeps_node_values_of_known_keys() -> None:
    node_text = V1.replace("http.port = 8080", "http.port = 9000") + "only.on.node = 1\n"
    outcome = merge_config_detailed(node_text, None, V2)
    # every key the node has that also exists in the new defaults keeps the node's value
    assert "greeting = Hello" in outcome.text and "http.port = 9000" in outcome.text
    assert "feature.notes = on" in outcome.text and "only.on.node" not in outcome.text
    assert any("only.on.node" in n for n in outcome.notes)
    assert outcome.carried == ("http.port", "greeting")


def test_merge_reports_a_key_removed_on_the_node() -> None:
    node_text = V1.replace("log.access = on\n", "")
    outcome = merge_config_detailed(node_text, V1, V2)
    assert "log.access = on" in outcome.text
    assert any(n.startswith("log.access: removed on the node") for n in outcome.notes)


def test_merge_keeps_customisation_of_a_key_dropped_from_the_new_defaults() -> None:
    node_text = V1.replace("log.access = on", "log.access = off")
    new = V2.replace("log.access = on\n", "")
    merged, _ = merge_config(node_text, V1, new)
    assert merged.endswith("feature.notes = on\nlog.access = off\n")


def test_merge_with_sections_and_crlf() -> None:
    old = "top = 1\r\n[db]\r\npool = 4\r\n[web]\r\nport = 80\r\n"
    new = "top = 1\r\n[db]\r\npool = 4\r\ntimeout = 5\r\n[web]\r\nport = 80\r\n"
    node_text = "top = 2\nextra = x\n[db]\npool = 16\n[web]\nport = 80\nssl = on\n[cache]\nsize = 9\n"
    merged, _ = merge_config(node_text, old, new)
    assert merged == (
        "top = 2\r\nextra = x\r\n[db]\r\npool = 16\r\ntimeout = 5\r\n[web]\r\nport = 80\r\n"
        "ssl = on\r\n\r\n[cache]\r\nsize = 9\r\n"
    )
    assert merge_config_detailed(node_text, old, new).carried == (
        "top",
        "extra",
        "db.pool",
        "web.ssl",
        "cache.size",
    )


def test_merge_spacing_variants_are_the_same_key() -> None:
    merged, _ = merge_config("a=2\n", "a = 1\n", "a = 1\nb = 2\n")
    assert merged == "a=2\nb = 2\n"


WEB_CONFIG_XML = """<?xml version="1.0" encoding="utf-8"?>
<configuration>
  <appSettings>
    <add key="DbServer" value="sql01" />
    <add key="DbPassword" value="s3cret-value" />
    <add key="Theme" value="dark" />
  </appSettings>
</configuration>
"""


@pytest.mark.parametrize("which", ["node", "old", "new"])
def test_merge_refuses_to_mix_xml_and_key_value_files(which: str) -> None:
    """An XML web.config merges by appSettings / connectionStrings key (test_xml_merge.py);
    one text XML and another `key = value` cannot be merged either way. (Every `<add key`
    line parsed as the same key `<add key` once corrupted the file.)"""
    texts = {"node": "a = 1\n", "old": "a = 1\n", "new": "a = 1\n", which: WEB_CONFIG_XML}
    with pytest.raises(ApplicationError) as e:
        merge_config_detailed(texts["node"], texts["old"], texts["new"], name="node n1: web.config")
    err = e.value
    assert err.type == "MergeUnsupported" and err.non_retryable
    assert "node n1: web.config" in err.message and "XML" in err.message
    if which == "new":  # the release's file is XML: the node's `key = value` copy does not parse
        assert "the node's copy does not parse as XML" in err.message
    else:
        assert "key = value" in err.message and "line 1" in err.message
        assert {"node": "node's copy", "old": "recorded defaults"}[which] in err.message
    # the message goes into Temporal's history: never a value from the file
    assert "s3cret" not in err.message and "sql01" not in err.message


def test_merge_refuses_an_xml_fragment_without_declaration() -> None:
    node_text = "a = 1\n" + WEB_CONFIG_XML.split("\n", 1)[1]
    with pytest.raises(ApplicationError) as e:
        merge_config(node_text, None, "a = 1\n")
    assert e.value.type == "MergeUnsupported" and "line 2" in e.value.message


@pytest.mark.parametrize("line", ['"quoted key" = 1', "two words = 1", "just text", "= value", "[open"])
def test_merge_refuses_lines_that_are_not_plain_key_value(line: str) -> None:
    with pytest.raises(ApplicationError) as e:
        merge_config("a = 1\n", "a = 1\n", f"# ok\na = 1\n{line}\n")
    assert e.value.type == "MergeUnsupported" and "line 3" in e.value.message


def test_merge_refuses_a_key_given_twice_in_one_section() -> None:
    with pytest.raises(ApplicationError) as e:
        merge_config("a = 1\n[db]\npool = 4\n[web]\nx = 1\n[db]\npool = 8\n", None, "a = 1\n")
    err = e.value
    assert err.type == "MergeUnsupported" and err.non_retryable
    assert "'pool' appears twice in section [db] (lines 3 and 7)" in err.message
    with pytest.raises(ApplicationError) as e:
        merge_config("a = 1\n", None, "a = 1\nb = 2\na=3\n")
    assert "'a' appears twice in the top of the file (lines 1 and 3)" in e.value.message
    # the same key in two sections is two keys
    merged, _ = merge_config(
        "[x]\nk = 2\n[y]\nk = 1\n", "[x]\nk = 1\n[y]\nk = 1\n", "[x]\nk = 1\n[y]\nk = 1\n"
    )
    assert merged == "[x]\nk = 2\n[y]\nk = 1\n"


def test_merge_accepts_plain_keys_comments_and_a_bom() -> None:
    new = "\ufeff# settings\nlog-level = info\nurl:base = http://a/?x=1\n; comment\n[s]\nk.v_2 = \n"
    node_text = "\ufeff# settings\nlog-level = debug\nurl:base = http://a/?x=1\n[s]\nk.v_2 = x\n"
    outcome = merge_config_detailed(node_text, new, new)
    assert outcome.text == new.replace("info", "debug").replace("k.v_2 = ", "k.v_2 = x")
    assert outcome.carried == ("log-level", "s.k.v_2")
    # a BOM on a carried first line stays in front of it
    merged, _ = merge_config("\ufeffa = 2\n", "\ufeffa = 1\n", "\ufeffa = 1\nb = 1\n")
    assert merged == "\ufeffa = 2\nb = 1\n"


def test_merge_names_the_defaults_the_new_release_changed() -> None:
    node_text = V1.replace("greeting = Hello", "greeting = Howdy")
    outcome = merge_config_detailed(node_text, V1, V2)
    assert outcome.changed_defaults == ("greeting",)
    assert any(
        n.startswith("greeting: customised on the node and its default changed") for n in outcome.notes
    )
    assert merge_config_detailed(node_text, None, V2).changed_defaults == ()


def _node(tmp_path: Path) -> Node:
    target = SshTarget(host="127.0.0.1", port=1, user="u", password=SecretRef(env="HOME"))
    return Node(
        name="n1",
        ssh=target,
        app_dir="app",
        url="http://127.0.0.1:1",
        service=ServiceControl(kind="command", stop="./ctl stop", start="./ctl start", status="./ctl status"),
    )


class _RecordingNode:
    """Stand-in for activities.ssh: reads come from `files`, every write is recorded."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.reads: list[str] = []
        self.writes: list[str] = []
        self.run_results: list[ssh.CommandResult] = []
        # answers `sha256sum <file>` (the upload check) with this digest
        self.sha256 = ""

    async def get_file(self, target: SshTarget, remote_path: str) -> bytes | None:
        self.reads.append(remote_path)
        return self.files.get(remote_path)

    async def run(self, target: SshTarget, command: str, **kw: Any) -> ssh.CommandResult:
        self.writes.append(f"run {command}")
        if self.run_results:
            return self.run_results.pop(0)
        if command.startswith("sha256sum ") and self.sha256:
            return ssh.CommandResult(0, f"{self.sha256}  {command.split()[1]}\n", "")
        return ssh.CommandResult(0, "", "")

    async def put_file(self, target: SshTarget, local: str, remote: str) -> None:
        self.writes.append(f"put_file {remote}")

    async def put_bytes(self, target: SshTarget, data: bytes, remote: str, mode: int | None = None) -> None:
        self.writes.append(f"put_bytes {remote}")

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in ("get_file", "run", "put_file", "put_bytes"):
            monkeypatch.setattr(ssh, name, getattr(self, name))


async def test_deploy_refuses_an_xml_merge_file_before_touching_the_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = inspect_package_file(str(_zip(tmp_path / "app-2.zip", _good_files())))
    fake = _RecordingNode({"app/web.config": WEB_CONFIG_XML.encode()})
    fake.install(monkeypatch)
    with pytest.raises(ApplicationError) as e:
        await ActivityEnvironment().run(
            deploy.deploy_package,
            deploy.DeployRequest(
                _node(tmp_path), pkg, ("encryption.config",), ("web.config",), "labapp-2.0.0"
            ),
        )
    err = e.value
    assert err.type == "MergeUnsupported" and err.non_retryable
    assert "node n1: web.config" in err.message and "Nothing was changed on the node" in err.message
    assert "s3cret" not in err.message
    assert fake.writes == [] and "app/web.config" in fake.reads  # read, then refused: no upload, no write


async def test_deploy_refuses_an_xml_file_in_the_package_that_does_not_parse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {**_good_files(), "web.config": WEB_CONFIG_XML.replace("</appSettings>", "</appSetings>")}
    pkg = inspect_package_file(str(_zip(tmp_path / "app-2.zip", files)))
    fake = _RecordingNode({})  # not on the node yet: the new defaults alone are refused
    fake.install(monkeypatch)
    with pytest.raises(ApplicationError) as e:
        await deploy.deploy(_node(tmp_path), pkg, (), ("web.config",), "labapp-2.0.0")
    assert e.value.type == "MergeUnsupported" and "new package's defaults" in e.value.message
    assert fake.writes == []


def test_merge_report_carries_no_values_and_names_the_diff_file() -> None:
    fields = {f.name: f.default for f in dataclasses.fields(deploy.MergeReport)}
    assert fields["diff_path"] == "" and fields["changed_defaults"] == ()
    assert (
        deploy.diff_path_for("labapp-2.0.0", "conf/settings.ini")
        == ".zerodown/releases/labapp-2.0.0.conf__settings.ini.merge.diff"
    )


# =========================================================================== backup (no lab)


def _backup_output(stored: dict[str, str], current: dict[str, str] | None) -> str:
    def lines(m: dict[str, str]) -> str:
        return "".join(f"{d}  ./{p}\n" for p, d in m.items())

    head = "reused" if current is not None else "created"
    return f"{head}\n{lines(stored)}{deploy._CURRENT}\n{lines(current or {})}{deploy._TARLIST}\n" + "".join(
        f"./{p}\n" for p in stored
    )


async def test_backup_of_a_folder_changing_meanwhile_is_retryable_backup_inconsistent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _RecordingNode({})
    fake.run_results = [
        ssh.CommandResult(75, "created\n", "the application folder app changed while it was backed up\n")
    ]
    fake.install(monkeypatch)
    with pytest.raises(ApplicationError) as e:
        await ActivityEnvironment().run(
            deploy.backup_app_folder, deploy.AppBackupRequest(_node(tmp_path), "wf-n1")
        )
    # not SshCommandFailed: the workflows list that one as non-retryable
    assert e.value.type == "BackupInconsistent" and not e.value.non_retryable
    assert "changed while it was backed up" in e.value.message


async def test_backup_is_reused_only_when_it_matches_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = "a" * 64, "b" * 64
    stored = {"web.config": a, "encryption.config": b}
    fake = _RecordingNode({})
    fake.install(monkeypatch)
    n = _node(tmp_path)
    fake.run_results = [ssh.CommandResult(0, _backup_output(stored, dict(reversed(stored.items()))), "")]
    ok = await deploy.backup_app(n, "wf-n1", ("encryption.config",))
    assert ok.reused and ok.manifest == stored and ok.protected == {"encryption.config": b}
    fake.run_results = [
        ssh.CommandResult(0, _backup_output(stored, {**stored, "web.config": b, "new.txt": a}), "")
    ]
    with pytest.raises(ApplicationError) as e:
        await deploy.backup_app(n, "wf-n1", ("encryption.config",))
    err = e.value
    assert err.type == "BackupConflict" and err.non_retryable
    assert "backup wf-n1 already exists" in err.message
    assert "differs from the application folder" in err.message
    assert "2 file(s): new.txt, web.config" in err.message
    fake.run_results = [ssh.CommandResult(0, _backup_output(stored, None), "")]
    assert not (await deploy.backup_app(n, "wf-n1", ())).reused


async def test_backup_script_is_private_but_deploy_keeps_the_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _RecordingNode({})
    fake.run_results = [ssh.CommandResult(0, _backup_output({}, None), "")]
    fake.install(monkeypatch)
    await deploy.backup_app(_node(tmp_path), "wf-n1", ())
    script = fake.writes[0]
    assert "umask 077" in script and "chmod 700 .zerodown .zerodown/backups" in script
    pkg = inspect_package_file(str(_zip(tmp_path / "app-2.zip", _good_files())))
    fake.writes.clear()
    fake.sha256 = pkg.sha256
    await deploy.deploy(_node(tmp_path), pkg, (), (), "labapp-2.0.0")
    extract = [w for w in fake.writes if "unzip" in w or "--no-same-owner" in w]
    assert extract and not any("umask" in w for w in extract)


# =========================================================================== mysql files (no server)


def _db(tmp_path: Path, **kw: Any) -> Any:
    from inventory.model import Database

    return Database(
        name="main",
        kind="mysql",
        host="127.0.0.1",
        port=_free_port(),
        database="app",
        user="zd",
        password=SecretRef(env="ZD_TEST_DB_PASSWORD"),
        **kw,
    )


def test_mysql_option_file_is_private_and_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stat

    monkeypatch.setenv("ZD_TEST_DB_PASSWORD", 'pa"ss')
    with mysql._option_file(_db(tmp_path)) as path:
        folder = Path(path).parent
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_IMODE(Path(path).stat().st_mode) == 0o600
        assert Path(path).read_text() == '[client]\npassword="pa\\"ss"\n'
    assert not folder.exists()
    with pytest.raises(RuntimeError), mysql._option_file(_db(tmp_path)) as path:
        folder = Path(path).parent
        raise RuntimeError("boom")
    assert not folder.exists()


async def test_mysql_client_failure_removes_the_option_file_and_dump_is_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stat
    import tempfile

    monkeypatch.setenv("ZD_TEST_DB_PASSWORD", "pw")
    made: list[str] = []
    real = tempfile.mkdtemp

    def mkdtemp(*a: Any, **kw: Any) -> str:
        made.append(real(*a, **kw))
        return made[-1]

    monkeypatch.setattr(mysql.dump.tempfile, "mkdtemp", mkdtemp)
    out = tmp_path / "dump.sql"
    out.write_text("old")
    out.chmod(0o644)
    with pytest.raises(ApplicationError) as e:
        await mysql._run_client(_db(tmp_path), [], None, str(out), "backup", "sh")  # sh: bad option
    assert e.value.type == "DatabaseError"
    assert made and not Path(made[0]).exists()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and out.read_text() == ""


def test_mysql_backup_dir_is_created_or_tightened_to_0700(tmp_path: Path) -> None:
    import stat

    new = tmp_path / "a" / "backups"
    mysql._private_dir(_db(tmp_path), str(new))
    assert stat.S_IMODE(new.stat().st_mode) == 0o700
    old = tmp_path / "old"
    old.mkdir(mode=0o755)
    old.chmod(0o755)
    mysql._private_dir(_db(tmp_path), str(old))
    assert stat.S_IMODE(old.stat().st_mode) == 0o700


def test_migration_request_has_force() -> None:
    fields = {f.name: f.default for f in dataclasses.fields(mysql.MigrationRequest)}
    assert fields["force"] is False
    assert "force" in inspect.signature(mysql.apply_migration).parameters


# =========================================================================== shared helpers


def test_one_sha256_file_and_one_check_id(tmp_path: Path) -> None:
    import hashlib

    from activities import common

    assert deploy.package.sha256_file is common.sha256_file
    assert deploy.secretserver.sha256_file is common.sha256_file
    assert mysql.dump.sha256_file is common.sha256_file
    assert deploy.appfolder.check_id is common.check_id and mysql.dump.check_id is common.check_id
    assert not hasattr(deploy, "_ID_RE") and not hasattr(mysql, "_ID_RE")
    assert not hasattr(deploy, "_sha256_local")
    f = tmp_path / "f.bin"
    f.write_bytes(b"x" * (3 << 20))
    assert common.sha256_file(str(f)) == hashlib.sha256(f.read_bytes()).hexdigest()
    with pytest.raises(OSError):
        common.sha256_file(str(tmp_path / "missing"))
    common.check_id("backup id", "wf-1_node.a")
    for bad in ("", "-x", "a/b", "../a", "a b", "a\n", "x" * 122):
        with pytest.raises(ApplicationError) as e:
            common.check_id("backup id", bad)
        assert e.value.type == "InvalidRequest" and e.value.non_retryable


# =========================================================================== versions


@pytest.mark.parametrize(
    ("a", "b", "want"),
    [
        ("1.0.0", "1.0.0", 0),
        ("2.0", "2.0.0", 0),
        ("2.0.1", "2.0.0", 1),
        ("1.10.0", "1.9.9", 1),
        ("v3", "2.99", 1),
        ("0.9", "1", -1),
        ("1.0.0.1", "1.0", 1),
    ],
)
def test_compare_versions(a: str, b: str, want: int) -> None:
    assert compare_versions(a, b) == want
    assert compare_versions(b, a) == -want


@pytest.mark.parametrize("bad", ["", "1.x", "1..2", "latest", "1.0-rc1"])
def test_compare_versions_rejects_non_numeric(bad: str) -> None:
    with pytest.raises(ValueError):
        compare_versions(bad, "1.0")


# =========================================================================== secrets


def test_secret_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZD_TEST_SECRET", "s3cret")
    assert resolve_secret(SecretRef(env="ZD_TEST_SECRET")) == "s3cret"


@pytest.mark.parametrize("value", [None, ""])
def test_secret_env_unset_or_empty(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("ZD_TEST_SECRET", raising=False)
    else:
        monkeypatch.setenv("ZD_TEST_SECRET", value)
    with pytest.raises(ApplicationError) as e:
        resolve_secret(SecretRef(env="ZD_TEST_SECRET"), needed_by="database main")
    assert e.value.type == "SecretUnavailable" and e.value.non_retryable
    assert e.value.message == "environment variable ZD_TEST_SECRET is not set (needed by database main)"


def test_secret_from_file_strips_one_newline(tmp_path: Path) -> None:
    p = tmp_path / "pw"
    p.write_text("pa ss\n\n")
    assert resolve_secret(SecretRef(file=str(p))) == "pa ss\n"
    p.write_text("key-text\n")
    assert resolve_secret(SecretRef(file=str(p))) == "key-text"


def test_secret_file_missing_or_unreadable(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ApplicationError) as e:
        resolve_secret(SecretRef(file=str(missing)), needed_by="ssh node1")
    assert e.value.type == "SecretUnavailable" and str(missing) in e.value.message
    assert "ssh node1" in e.value.message
    with pytest.raises(ApplicationError) as e:
        resolve_secret(SecretRef(file=str(tmp_path)))  # a directory: unreadable as a file
    assert e.value.type == "SecretUnavailable" and str(tmp_path) in e.value.message


def test_secret_value_never_in_messages(tmp_path: Path) -> None:
    p = tmp_path / "pw"
    p.write_text("\n")
    with pytest.raises(ApplicationError) as e:
        resolve_secret(SecretRef(file=str(p)))
    assert "empty" in e.value.message


# =========================================================================== packages


RELEASE = {
    "name": "labapp",
    "version": "2.0.0",
    "min_upgrade_from": "1.0.0",
    "schema_version": 2,
    "migrations": [
        {"version": 2, "up": "migrations/002_up.sql", "down": "migrations/002_down.sql", "destructive": False}
    ],
}


def _zip(path: Path, files: dict[str, bytes | str]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def _good_files() -> dict[str, bytes | str]:
    return {
        "release.json": json.dumps(RELEASE),
        "app.py": "print('hi')\n",
        "web.config": "a = 1\n",
        "migrations/002_up.sql": "ALTER TABLE t ADD COLUMN IF NOT EXISTS c INT;\n",
        "migrations/002_down.sql": "ALTER TABLE t DROP COLUMN IF EXISTS c;\n",
    }


async def test_inspect_good_package(tmp_path: Path) -> None:
    p = _zip(tmp_path / "app-2.zip", _good_files())
    info = await ActivityEnvironment().run(inspect_package, PackageRequest(str(p)))
    assert (info.name, info.version, info.min_upgrade_from, info.schema_version, info.files) == (
        "labapp",
        "2.0.0",
        "1.0.0",
        2,
        5,
    )
    assert info.migrations == (
        deploy.MigrationSpec(
            2,
            "ALTER TABLE t ADD COLUMN IF NOT EXISTS c INT;\n",
            "ALTER TABLE t DROP COLUMN IF EXISTS c;\n",
            False,
        ),
    )
    import hashlib

    assert info.sha256 == hashlib.sha256(p.read_bytes()).hexdigest() and info.size == p.stat().st_size


def test_inspect_the_lab_packages(tmp_path: Path) -> None:
    from lab.packages import package_files, zip_bytes

    for major in (1, 2):
        p = tmp_path / f"app-{major}.zip"
        p.write_bytes(zip_bytes(package_files(major)))
        info = inspect_package_file(str(p))
        assert info.version == f"{major}.0.0" and info.schema_version == major
        assert len(info.migrations) == major - 1


def test_inspect_missing_package(tmp_path: Path) -> None:
    with pytest.raises(ApplicationError) as e:
        inspect_package_file(str(tmp_path / "nope.zip"))
    assert e.value.type == "PackageMissing" and e.value.non_retryable and "nope.zip" in e.value.message


def _corrupt_reason(path: Path) -> str:
    with pytest.raises(ApplicationError) as e:
        inspect_package_file(str(path))
    assert e.value.type == "PackageCorrupt" and e.value.non_retryable
    assert str(path) in e.value.message
    return e.value.message


def test_inspect_not_a_zip(tmp_path: Path) -> None:
    p = tmp_path / "x.zip"
    p.write_bytes(b"this is not a zip file at all")
    assert "not a zip" in _corrupt_reason(p)


def test_inspect_bad_crc(tmp_path: Path) -> None:
    p = _zip(tmp_path / "x.zip", {**_good_files(), "big.txt": "A" * 4000})
    data = bytearray(p.read_bytes())
    at = data.find(b"A" * 100)
    data[at + 50] = ord("B")  # stored (uncompressed), so this flips content, not structure
    p.write_bytes(bytes(data))
    assert "CRC" in _corrupt_reason(p) and "big.txt" in _corrupt_reason(p)


def test_inspect_no_release_json(tmp_path: Path) -> None:
    files = _good_files()
    del files["release.json"]
    assert "no release.json" in _corrupt_reason(_zip(tmp_path / "x.zip", files))


@pytest.mark.parametrize(
    ("release", "why"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        (json.dumps({**RELEASE, "version": "two"}), "not a dotted numeric version"),
        (json.dumps({**RELEASE, "name": ""}), "'name'"),
        (json.dumps({**RELEASE, "schema_version": "2"}), "schema_version"),
        (
            json.dumps({**RELEASE, "migrations": [{"version": 2, "up": "migrations/missing.sql"}]}),
            "not in the package",
        ),
    ],
)
def test_inspect_invalid_release_json(tmp_path: Path, release: str, why: str) -> None:
    assert why in _corrupt_reason(_zip(tmp_path / "x.zip", {**_good_files(), "release.json": release}))


@pytest.mark.parametrize("name", ["../evil.sh", "/etc/passwd", "a/../../b", "C:/win.ini"])
def test_inspect_unsafe_member_names(tmp_path: Path, name: str) -> None:
    p = tmp_path / "x.zip"
    with zipfile.ZipFile(p, "w") as z:
        for n, data in _good_files().items():
            z.writestr(n, data)
        z.writestr(zipfile.ZipInfo(name), b"x")
    assert "unsafe member name" in _corrupt_reason(p)


# =========================================================================== node-side parsing


def test_parse_sha256sum_handles_escaped_names() -> None:
    d = "a" * 64
    text = (
        f"{d}  ./web.config\n{d}  ./static/index.html\n"
        f"\\{d}  ./odd\\nname\n\\{d}  ./back\\\\slash\n{d}  ./with space\n"
    )
    assert parse_sha256sum(text) == {
        "web.config": d,
        "static/index.html": d,
        "odd\nname": d,
        "back\\slash": d,
        "with space": d,
    }
    assert parse_sha256sum("") == {}


def test_split_sql() -> None:
    sql = """-- a comment
ALTER TABLE items ADD COLUMN IF NOT EXISTS notes VARCHAR(200) NULL;

# other comment
CREATE TABLE t (
  id INT, -- inline
  v VARCHAR(10) DEFAULT 'a;b'
);
UPDATE t SET v = 'x'"""
    assert mysql.split_sql(sql) == [
        "ALTER TABLE items ADD COLUMN IF NOT EXISTS notes VARCHAR(200) NULL",
        "CREATE TABLE t (\n  id INT, -- inline\n  v VARCHAR(10) DEFAULT 'a;b'\n)",
        "UPDATE t SET v = 'x'",
    ]
    assert mysql.split_sql("-- only a comment\n\n") == []


# =========================================================================== ssh (no lab)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_ssh_connection_refused_is_retryable_unreachable(tmp_path: Path) -> None:
    target = SshTarget(
        host="127.0.0.1", port=_free_port(), user="x", password=SecretRef(env="HOME"), connect_timeout_s=2
    )
    with pytest.raises(ApplicationError) as e:
        await ssh.run(target, "true", timeout_s=5)
    assert e.value.type == "SshUnreachable" and not e.value.non_retryable
    assert f"127.0.0.1:{target.port}" in e.value.message
    probe = await ActivityEnvironment().run(ssh.ssh_probe, ssh.SshProbeRequest(target))
    assert not probe.ok and probe.error_type == "SshUnreachable"


async def test_ssh_key_secret_missing(tmp_path: Path) -> None:
    target = SshTarget(host="127.0.0.1", port=_free_port(), key=SecretRef(file=str(tmp_path / "nokey")))
    with pytest.raises(ApplicationError) as e:
        await ssh.run(target, "true")
    assert e.value.type == "SecretUnavailable"


# =========================================================================== http checks


@pytest.fixture
async def http_app(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    state: dict[str, Any] = {"health": [500, 200, 200, 200], "hits": 0, "version": "2.0.0"}

    async def health(request: web.Request) -> web.Response:
        seq = state["health"]
        status = seq[min(state["hits"], len(seq) - 1)]
        state["hits"] += 1
        return web.Response(status=status, text="ok" if status == 200 else "database down")

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": state["version"], "node": "n1", "greeting": "x" * 500})

    async def plain(request: web.Request) -> web.Response:
        return web.Response(text="1.2.3\n")

    async def login(request: web.Request) -> web.Response:
        body = await request.json()
        if body == {"user": "probe", "password": "right"}:
            return web.json_response({"ok": True})
        return web.Response(status=401, text=f"bad password {body.get('password')}")

    app = web.Application()
    app.add_routes(
        [
            web.get("/health", health),
            web.get("/version", version),
            web.get("/plain", plain),
            web.post("/login", login),
        ]
    )
    runner = web.AppRunner(app)
    await runner.setup()
    port = _free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        await runner.cleanup()


async def test_check_health(http_app: tuple[str, dict[str, Any]]) -> None:
    url, _ = http_app
    env = ActivityEnvironment()
    with pytest.raises(ApplicationError) as e:
        await env.run(http_checks.check_health, HttpCheckRequest(url, HttpCheck(path="/health")))
    assert e.value.type == "HealthCheckFailed" and "status 500" in e.value.message
    assert "database down" in e.value.message
    r = await env.run(http_checks.check_health, HttpCheckRequest(url, HttpCheck(path="/health")))
    assert r.status == 200 and r.body_snippet == "ok"


async def test_check_health_connection_refused() -> None:
    with pytest.raises(ApplicationError) as e:
        await ActivityEnvironment().run(
            http_checks.check_health,
            HttpCheckRequest(f"http://127.0.0.1:{_free_port()}", HttpCheck(path="/health"), timeout_s=2),
        )
    assert e.value.type == "HealthCheckFailed" and "no HTTP answer" in e.value.message


async def test_wait_healthy_needs_consecutive_successes(http_app: tuple[str, dict[str, Any]]) -> None:
    url, state = http_app
    state["health"] = [200, 500, 200, 200, 200]
    env = ActivityEnvironment()
    beats: list[Any] = []
    env.on_heartbeat = lambda *d: beats.append(d[0])
    r = await env.run(
        http_checks.wait_healthy,
        WaitHealthyRequest(url, HttpCheck(path="/health"), timeout_s=10, consecutive=2, interval_s=0.05),
    )
    assert r.attempts == 4 and r.last.status == 200 and len(beats) == 3


async def test_wait_healthy_deadline(http_app: tuple[str, dict[str, Any]]) -> None:
    url, state = http_app
    state["health"] = [503]
    with pytest.raises(ApplicationError) as e:
        await ActivityEnvironment().run(
            http_checks.wait_healthy,
            WaitHealthyRequest(url, HttpCheck(path="/health"), timeout_s=0.5, interval_s=0.1),
        )
    assert e.value.type == "HealthCheckFailed" and "last: status 503" in e.value.message


async def test_get_version(http_app: tuple[str, dict[str, Any]]) -> None:
    url, _ = http_app
    env = ActivityEnvironment()
    assert await env.run(http_checks.get_version, VersionRequest(url, HttpCheck(path="/version"))) == "2.0.0"
    assert await env.run(http_checks.get_version, VersionRequest(url, HttpCheck(path="/plain"))) == "1.2.3"
    with pytest.raises(ApplicationError) as e:
        await env.run(
            http_checks.get_version, VersionRequest(url, HttpCheck(path="/version"), expect="1.0.0")
        )
    assert e.value.type == "VersionMismatch" and "'2.0.0'" in e.value.message


async def test_check_login(http_app: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = http_app
    env = ActivityEnvironment()
    monkeypatch.setenv("ZD_LOGIN_PW", "right")
    chk = HttpCheck(path="/login", user="probe", password=SecretRef(env="ZD_LOGIN_PW"))
    r = await env.run(http_checks.check_login, LoginRequest(url, chk))
    assert r.status == 200
    monkeypatch.setenv("ZD_LOGIN_PW", "wrong-pw")
    with pytest.raises(ApplicationError) as e:
        await env.run(http_checks.check_login, LoginRequest(url, chk))
    assert e.value.type == "LoginFailed" and "401" in e.value.message
    assert "wrong-pw" not in e.value.message  # even when the application echoes it
    monkeypatch.delenv("ZD_LOGIN_PW")
    with pytest.raises(ApplicationError) as e:
        await env.run(http_checks.check_login, LoginRequest(url, chk))
    assert e.value.type == "SecretUnavailable"


# =========================================================================== common


async def test_with_heartbeat_cancels_the_inner_work() -> None:
    from activities.common import with_heartbeat

    finished = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
            finished.set()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    env = ActivityEnvironment()
    beats: list[Any] = []
    env.on_heartbeat = lambda *d: beats.append(d)

    async def act() -> None:
        await with_heartbeat(slow(), every_s=0.1)

    task = asyncio.ensure_future(env.run(act))
    await asyncio.sleep(0.35)
    env.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert cancelled.is_set() and not finished.is_set() and len(beats) >= 2


# =========================================================================== Version Guard


def _pkg(version: str = "3.0.0", min_from: str = "", requires: tuple[str, ...] = ()) -> deploy.PackageInfo:
    return deploy.PackageInfo(
        path="/p.zip",
        sha256="ab",
        name="labapp",
        version=version,
        min_upgrade_from=min_from,
        schema_version=3,
        migrations=(),
        files=1,
        requires=requires,
    )


@pytest.mark.parametrize(
    ("running", "pkg", "ok", "first"),
    [
        ("2.0.0", _pkg(min_from="2.0.0", requires=("2.0.0",)), True, ()),
        ("2.5", _pkg(min_from="2.0.0", requires=("2.0.0",)), True, ()),
        ("1.0.0", _pkg(requires=("2.0.0",)), False, ("2.0.0",)),
        ("1.0.0", _pkg(min_from="2.0.0"), False, ("2.0.0",)),
        # min_upgrade_from and requires naming one version: installed once
        ("1.0.0", _pkg(min_from="2.0", requires=("2.0.0",)), False, ("2.0",)),
        # ascending, whatever the order given; versions already passed are not asked for again
        (
            "1.0.0",
            _pkg(min_from="1.5.0", requires=("2.5.0", "2.0.0", "0.9.0")),
            False,
            ("1.5.0", "2.0.0", "2.5.0"),
        ),
        ("2.0.0", _pkg(requires=("1.0.0", "2.0.0", "2.5.0")), False, ("2.5.0",)),
    ],
)
def test_version_guard_install_first(
    running: str, pkg: deploy.PackageInfo, ok: bool, first: tuple[str, ...]
) -> None:
    v = deploy.version_guard(running, pkg)
    assert (v.ok, v.install_first) == (ok, first)
    assert v.reason.startswith("Version Guard: labapp 3.0.0 ")
    assert v == deploy.version_guard(running, pkg)  # deterministic


def test_version_guard_reason_reads_like_the_runbook() -> None:
    v = deploy.version_guard("1.0.0", _pkg(requires=("2.0.0",)))
    assert v.reason.startswith(
        "Version Guard: labapp 3.0.0 cannot upgrade 1.0.0; install 2.0.0 first, then 3.0.0"
    )
    v = deploy.version_guard("1.0.0", _pkg(min_from="1.5.0", requires=("2.0.0",)))
    assert "install 1.5.0 first, then 2.0.0, then 3.0.0" in v.reason
    assert "upgrades from 1.5.0 or later" in v.reason and "requires 2.0.0" in v.reason


@pytest.mark.parametrize(
    ("running", "pkg", "why"),
    [
        ("3.0.0", _pkg(), "is not newer than the running version 3.0.0"),
        ("3.1", _pkg(), "is not newer"),
        ("three", _pkg(), "cannot check"),
        ("1.0.0", _pkg(version="3.x"), "cannot check"),
        ("1.0.0", _pkg(requires=("2.0.0-beta",)), "cannot check"),
    ],
)
def test_version_guard_refusals(running: str, pkg: deploy.PackageInfo, why: str) -> None:
    v = deploy.version_guard(running, pkg)
    assert not v.ok and v.install_first == () and why in v.reason


@pytest.mark.parametrize(
    ("requires", "why"),
    [
        ("2.0.0", "requires must be a list"),
        (["two"], "requires[0] 'two' is not a dotted numeric version"),
        ([2], "requires[0] 2 is not a dotted numeric version"),
        (["1.0.0", "2.0.0"], "requires[1] 2.0.0 is not older than version 2.0.0"),
    ],
)
def test_inspect_invalid_requires(tmp_path: Path, requires: Any, why: str) -> None:
    release = json.dumps({**RELEASE, "requires": requires})
    assert why in _corrupt_reason(_zip(tmp_path / "x.zip", {**_good_files(), "release.json": release}))


def test_inspect_requires_sorted_and_min_upgrade_from_not_newer(tmp_path: Path) -> None:
    release = json.dumps({**RELEASE, "requires": ["1.5", "0.9.0", "1.5.0"]})
    info = inspect_package_file(str(_zip(tmp_path / "x.zip", {**_good_files(), "release.json": release})))
    assert info.requires == ("0.9.0", "1.5")
    assert inspect_package_file(str(_zip(tmp_path / "y.zip", _good_files()))).requires == ()
    release = json.dumps({**RELEASE, "min_upgrade_from": "2.1.0"})
    assert "min_upgrade_from 2.1.0 is newer than version 2.0.0" in _corrupt_reason(
        _zip(tmp_path / "z.zip", {**_good_files(), "release.json": release})
    )


# =========================================================================== upgrade zip (no lab)


def _sha(data: bytes | str) -> str:
    import hashlib

    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


async def test_upgrade_zip_is_deterministic_and_holds_only_what_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stat

    files = {
        **_good_files(),
        "static/style.css": "body {}\n",
        "encryption.config": "key = k\n",
        "bin/run.sh": "#!/bin/sh\n",
    }
    src = tmp_path / "app-2.zip"
    with zipfile.ZipFile(src, "w") as z:  # in another order, with today's dates
        for name in reversed(list(files)):
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o100755 if name.endswith(".sh") else 0o100644) << 16
            info.create_system = 3
            z.writestr(info, files[name])
    pkg = inspect_package_file(str(src))
    node_files = {
        "app.py": _sha("print('hi')\n"),
        "static/style.css": _sha("body {}\n"),
        "web.config": _sha("a = 1\n"),
        "release.json": _sha("{}"),
        "bin/run.sh": _sha("old"),
    }
    calls: list[str] = []

    async def manifest(node: Node, folder: str) -> dict[str, str]:
        calls.append(folder)
        return node_files

    monkeypatch.setattr(deploy.secretserver, "folder_manifest", manifest)
    out = tmp_path / "out"
    req = deploy.UpgradeZipRequest(
        _node(tmp_path), pkg, str(out), "up-n1", ("encryption.config",), ("web.config",)
    )
    env = ActivityEnvironment()
    first = await env.run(deploy.build_upgrade_zip, req)
    assert calls == ["app"] and first.base_node == "n1" and not first.reused
    # web.config is merged per node, the migrations are what release.json names: always in
    assert first.files == (
        "bin/run.sh",
        "migrations/002_down.sql",
        "migrations/002_up.sql",
        "release.json",
        "web.config",
    )
    assert first.unchanged == 2  # app.py, static/style.css
    path = Path(first.path)
    assert path == out / "up-n1.zip" and first.sha256 == _sha(path.read_bytes())
    assert first.size == path.stat().st_size
    assert stat.S_IMODE(out.stat().st_mode) == 0o700 and stat.S_IMODE(path.stat().st_mode) == 0o600
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        assert [i.filename for i in infos] == list(first.files)
        assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
        assert {i.filename: (i.external_attr >> 16) & 0o777 for i in infos}["bin/run.sh"] == 0o755
        assert z.read("release.json") == json.dumps(RELEASE).encode()
    part = inspect_package_file(str(path))
    assert (part.version, part.files, len(part.migrations)) == ("2.0.0", 5, 1)
    assert not list(out.glob(".*.tmp"))

    mtime = path.stat().st_mtime_ns
    again = await env.run(deploy.build_upgrade_zip, req)
    assert again.reused and again.sha256 == first.sha256 and path.stat().st_mtime_ns == mtime
    # another id, same inputs: the same bytes
    other = await env.run(deploy.build_upgrade_zip, dataclasses.replace(req, zip_id="up-n2"))
    assert Path(other.path).read_bytes() == path.read_bytes()
    # the node changed: the same id now stands for another difference (replaced atomically)
    node_files["app.py"] = _sha("older")
    changed = await env.run(deploy.build_upgrade_zip, req)
    assert not changed.reused and "app.py" in changed.files and changed.sha256 != first.sha256


async def test_upgrade_zip_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = inspect_package_file(str(_zip(tmp_path / "app-2.zip", _good_files())))

    async def manifest(node: Node, folder: str) -> dict[str, str]:
        return {}

    monkeypatch.setattr(deploy.secretserver, "folder_manifest", manifest)
    env = ActivityEnvironment()
    base = deploy.UpgradeZipRequest(_node(tmp_path), pkg, str(tmp_path / "out"), "z1")
    for req, kind, text in [
        (dataclasses.replace(base, zip_id="../evil"), "InvalidRequest", "zip id"),
        (dataclasses.replace(base, protected_files=("release.json",)), "InvalidRequest", "release.json"),
        (dataclasses.replace(base, protected_files=("/etc/passwd",)), "InvalidRequest", "relative"),
        # a migration script that is protected: the zip would not be a package
        (
            dataclasses.replace(base, protected_files=("migrations/002_up.sql",)),
            "PackageCorrupt",
            "would not be a valid package",
        ),
    ]:
        with pytest.raises(ApplicationError) as e:
            await env.run(deploy.build_upgrade_zip, req)
        assert e.value.type == kind and e.value.non_retryable and text in e.value.message, req
    Path(pkg.path).write_bytes(Path(pkg.path).read_bytes() + b"x")
    with pytest.raises(ApplicationError) as e:
        await env.run(deploy.build_upgrade_zip, base)
    assert e.value.type == "PackageCorrupt" and "changed since it was inspected" in e.value.message
    assert not list((tmp_path / "out").glob("*.tmp"))


# =========================================================================== SQL script (no lab)


def _pkg_with_migrations() -> deploy.PackageInfo:
    return dataclasses.replace(
        _pkg(),
        migrations=(
            deploy.MigrationSpec(3, "-- three\nALTER TABLE t ADD COLUMN IF NOT EXISTS c3 INT\n", "", True),
            deploy.MigrationSpec(2, "ALTER TABLE t ADD COLUMN IF NOT EXISTS c2 INT;\n", ""),
        ),
    )


def test_sql_script_text() -> None:
    text, versions = deploy.sql_script_text(_pkg_with_migrations(), 1)
    assert versions == (2, 3)
    assert text.startswith("-- zerodown upgrade script: labapp 3.0.0, schema 1 -> 3\n")
    assert text.index("migration 2 (up)") < text.index("c2 INT;") < text.index("migration 3 (up) DESTRUCTIVE")
    # the last statement of a script is terminated, so the next one never joins it
    assert "ADD COLUMN IF NOT EXISTS c3 INT;\n" in text and text.endswith(";\n")
    assert mysql.split_sql(text) == [
        "ALTER TABLE t ADD COLUMN IF NOT EXISTS c2 INT",
        "ALTER TABLE t ADD COLUMN IF NOT EXISTS c3 INT",
    ]
    assert deploy.sql_script_text(_pkg_with_migrations(), 2)[1] == (3,)
    empty, none = deploy.sql_script_text(_pkg_with_migrations(), 3)
    assert none == () and mysql.split_sql(empty) == [] and "migrations: none" in empty


def test_storage_need() -> None:
    assert node.storage_need(1000, 100) == 1430  # (1000 + 300) * 1.1
    assert node.storage_need(1, 0) == 2  # rounded up
    assert node.storage_need(0, 0) == 0
