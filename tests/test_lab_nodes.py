"""The lab's node side against the running lab (`lab` fixture from tests/conftest.py):
release packages, the node service script (`ctl`) and app, the SSH endpoints, the probe.

Tests that stop or break an app use a *spare* node (index cfg.nodes + 1: its own folder
and port, not behind HAProxy, not served by the SSH endpoints) so the shared lab's nodes
keep serving for every other test.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
import pytest

from lab import nodes, packages
from lab.config import LabConfig
from lab.probe import run_probe

CTL_START_BUDGET_S = 10.0


# --------------------------------------------------------------------------- helpers


async def http(url: str, timeout: float = 5.0) -> tuple[int, str, dict[str, str]]:
    async with aiohttp.ClientSession() as s, s.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        return r.status, await r.text(), dict(r.headers)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
    except OSError:
        return True
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def spare(lab: LabConfig) -> Iterator[int]:
    """A throwaway node next to the lab's nodes, installed from package 1."""
    i = lab.nodes + 1
    if not refused(lab.app_port(i)):
        pytest.fail(f"port {lab.app_port(i)} of the spare node is already in use")
    nodes.install_node(lab, i, lab.package(1))
    try:
        yield i
    finally:
        nodes.stop_node(lab, i)
        shutil.rmtree(lab.node_dir(i), ignore_errors=True)


def ctl(lab: LabConfig, i: int, action: str) -> tuple[int, str]:
    r = nodes.ctl(lab, i, action)
    return r.returncode, (r.stdout + r.stderr).strip()


# --------------------------------------------------------------------------- packages


def test_packages_are_valid_and_reproducible(tmp_path: Path) -> None:
    a = packages.build_packages(LabConfig(root=tmp_path / "a"))
    b = packages.build_packages(LabConfig(root=tmp_path / "b"))
    assert sorted(a) == [1, 2, 3]  # 3: Version Guard (tests/test_lab_secret_server.py)
    for major in (1, 2):
        assert a[major].read_bytes() == b[major].read_bytes(), f"package {major} is not reproducible"
        with zipfile.ZipFile(a[major]) as z:
            assert z.testzip() is None
            names = set(z.namelist())
            release = json.loads(z.read("release.json"))
            web_config = z.read("web.config").decode()
            index = z.read("static/index.html").decode()
        assert {"release.json", "app.py", "web.config", "static/index.html"} <= names
        assert not names & {"encryption.config", "database.config"}, "per-node files in a package"
        assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
        assert release["name"] == "labapp"
        assert release["version"] == f"{major}.0.0"
        assert release["schema_version"] == major
        assert f"release {major}" in index
        for m in release["migrations"]:
            assert m["up"] in names and m["down"] in names
        if major == 1:
            assert release["min_upgrade_from"] == "0.0.0" and release["migrations"] == []
            assert "feature.notes" not in web_config
        else:
            assert release["min_upgrade_from"] == "1.0.0"
            assert [m["version"] for m in release["migrations"]] == [2]
            assert "feature.notes = on" in web_config
    v1 = packages.release_of(a[1])
    assert v1["version"] == "1.0.0"
    # Rebuilding in place keeps the bytes (and does not rewrite the file).
    mtime = a[2].stat().st_mtime_ns
    packages.build_packages(LabConfig(root=tmp_path / "a"))
    assert a[2].stat().st_mtime_ns == mtime


def test_lab_packages_match_the_sources(lab: LabConfig, tmp_path: Path) -> None:
    fresh = packages.build_packages(LabConfig(root=tmp_path))
    for major in (1, 2):
        assert lab.package(major).read_bytes() == fresh[major].read_bytes()


# --------------------------------------------------------------------------- nodes and app


async def test_lab_nodes_run_and_report_their_version(lab: LabConfig) -> None:
    for i in lab.node_indexes:
        code, out = await asyncio.to_thread(ctl, lab, i, "status")
        assert code == 0 and out.startswith("running "), (i, out)
        want = json.loads((lab.node_dir(i) / "app" / "release.json").read_text())["version"]
        status, body, headers = await http(f"http://127.0.0.1:{lab.app_port(i)}/version")
        assert status == 200
        info = json.loads(body)
        assert info["version"] == want
        assert info["node"] == lab.node_name(i) == headers["X-Node"]
        assert info["config"]["custom.banner"] == f"Welcome to {lab.node_name(i)}"


async def test_install_layout(lab: LabConfig, spare: int) -> None:
    node = lab.node_dir(spare)
    assert (node / "ctl").stat().st_mode & 0o111
    assert (node / "run").is_dir() and (node / "inject").is_dir()
    defaults = (node / ".zerodown" / "defaults" / "web.config").read_text()
    with zipfile.ZipFile(lab.package(1)) as z:
        assert defaults == z.read("web.config").decode()
    cfg = (node / "app" / "web.config").read_text()
    assert f"http.port = {lab.app_port(spare)}" in cfg
    assert f"node.name = {lab.node_name(spare)}" in cfg
    assert f"custom.banner = Welcome to {lab.node_name(spare)}" in cfg
    # The spare shares the site's secrets key with the lab's nodes.
    assert (node / "app" / "encryption.config").read_text() == (
        lab.node_dir(1) / "app" / "encryption.config"
    ).read_text()
    assert f"port = {lab.primary_db_port}" in (node / "app" / "database.config").read_text()


async def test_ctl_cycle_and_graceful_stop(lab: LabConfig, spare: int) -> None:
    port = lab.app_port(spare)
    base = f"http://127.0.0.1:{port}"
    assert await asyncio.to_thread(ctl, lab, spare, "status") == (3, "stopped")

    t0 = time.monotonic()
    code, out = await asyncio.to_thread(ctl, lab, spare, "start")
    started_in = time.monotonic() - t0
    assert code == 0, out
    assert out.startswith("running "), out
    assert started_in < CTL_START_BUDGET_S
    pid = int((lab.node_dir(spare) / "run" / "app.pid").read_text())
    assert await asyncio.to_thread(ctl, lab, spare, "status") == (0, f"running {pid}")
    # A second start is a no-op that still reports the running app.
    assert await asyncio.to_thread(ctl, lab, spare, "start") == (0, f"running {pid}")

    status, body, headers = await http(f"{base}/version")
    assert status == 200 and headers["X-Node"] == lab.node_name(spare)
    assert json.loads(body)["version"] == "1.0.0"
    assert json.loads(body)["node"] == lab.node_name(spare)
    assert (await http(f"{base}/health"))[:2] == (200, "ok")

    # A request in flight when SIGTERM arrives completes; the stop waits for it.
    slow = asyncio.create_task(http(f"{base}/slow?ms=1500"))
    await asyncio.sleep(0.3)
    t0 = time.monotonic()
    code, out = await asyncio.to_thread(ctl, lab, spare, "stop")
    stopped_in = time.monotonic() - t0
    assert (code, out) == (0, "stopped")
    assert (await slow)[:2] == (200, "slept 1500 ms\n")
    assert 0.8 < stopped_in < 10, stopped_in
    assert refused(port), "app still accepts connections after ctl stop"
    assert await asyncio.to_thread(ctl, lab, spare, "status") == (3, "stopped")
    assert await asyncio.to_thread(ctl, lab, spare, "stop") == (0, "stopped")

    assert await asyncio.to_thread(nodes.node_running, lab, spare) is False
    await asyncio.to_thread(nodes.start_node, lab, spare)
    assert await asyncio.to_thread(nodes.node_running, lab, spare) is True
    assert (await http(f"{base}/health"))[0] == 200
    await asyncio.to_thread(nodes.stop_node, lab, spare)
    assert refused(port)


async def test_ctl_start_reports_failures(lab: LabConfig, spare: int) -> None:
    port = lab.app_port(spare)
    # Port taken by someone else: refuse rather than report a foreign listener as our app.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
        code, out = await asyncio.to_thread(ctl, lab, spare, "start")
    assert code != 0 and "already in use" in out
    # An app that dies while starting: non-zero at once, with the log's last lines.
    release = lab.node_dir(spare) / "app" / "release.json"
    good = release.read_text()
    release.write_text("{broken")
    try:
        t0 = time.monotonic()
        code, out = await asyncio.to_thread(ctl, lab, spare, "start")
        assert code != 0 and "exited during start" in out and "JSONDecodeError" in out, out
        assert time.monotonic() - t0 < CTL_START_BUDGET_S
        assert await asyncio.to_thread(ctl, lab, spare, "status") == (3, "stopped")
    finally:
        release.write_text(good)


async def test_fault_injection_targets_one_version(lab: LabConfig, spare: int) -> None:
    inject = lab.node_dir(spare) / "inject" / "fail_health_version"
    base = f"http://127.0.0.1:{lab.app_port(spare)}"
    try:
        for package, version, other in ((1, "1.0.0", "2.0.0"), (2, "2.0.0", "1.0.0")):
            # Reinstalling replaces the app folder entirely: a stray file does not survive.
            (lab.node_dir(spare) / "app" / "stray.txt").write_text("x")
            await asyncio.to_thread(nodes.install_node, lab, spare, lab.package(package))
            assert not (lab.node_dir(spare) / "app" / "stray.txt").exists()
            await asyncio.to_thread(nodes.start_node, lab, spare)
            assert json.loads((await http(f"{base}/version"))[1])["version"] == version
            inject.write_text(other + "\n")
            assert (await http(f"{base}/health"))[:2] == (200, "ok")
            inject.write_text(version + "\n")
            assert (await http(f"{base}/health"))[:2] == (500, "injected failure")
            inject.unlink()
            assert (await http(f"{base}/health"))[0] == 200
            await asyncio.to_thread(nodes.stop_node, lab, spare)
    finally:
        inject.unlink(missing_ok=True)
        await asyncio.to_thread(nodes.stop_node, lab, spare)
        await asyncio.to_thread(nodes.install_node, lab, spare, lab.package(1))


async def test_app_endpoints(lab: LabConfig) -> None:
    base = f"http://127.0.0.1:{lab.app_port(1)}"
    password = lab.admin_password_file.read_text().strip()
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/items", json={"body": "from test_lab_nodes"}) as r:
            assert r.status == 201 and r.headers["X-Node"] == lab.node_name(1)
            item_id = (await r.json())["id"]
        async with s.get(f"{base}/items") as r:
            rows = await r.json()
            assert any(row["id"] == item_id and row["node"] == lab.node_name(1) for row in rows)
            assert len(rows) <= 10
        async with s.post(f"{base}/login", json={"user": "probe", "password": password}) as r:
            assert r.status == 200
        async with s.post(f"{base}/login", data={"user": "probe", "password": password + "x"}) as r:
            assert r.status == 401
        async with s.get(f"{base}/no-such-page") as r:
            assert r.status == 404 and r.headers["X-Node"] == lab.node_name(1)
        # Secrets written by one node are readable by another (same encryption.config).
        async with s.post(f"{base}/secrets", json={"name": "test.secret", "value": "s3cr3t"}) as r:
            assert r.status == 201
        other = f"http://127.0.0.1:{lab.app_port(lab.nodes)}"
        async with s.get(f"{other}/secrets/test.secret") as r:
            assert r.status == 200 and (await r.json())["value"] == "s3cr3t"


# --------------------------------------------------------------------------- SSH endpoints


async def ssh(lab: LabConfig, i: int = 1, **kw: Any) -> asyncssh.SSHClientConnection:
    opts: dict[str, Any] = {
        "username": "zerodown",
        "client_keys": [str(lab.client_key)],
        "known_hosts": str(lab.known_hosts),
        "connect_timeout": 10,
    }
    opts.update(kw)
    return await asyncssh.connect("127.0.0.1", lab.ssh_port(i), **opts)


async def test_ssh_exec_runs_in_node_dir_with_exit_status(lab: LabConfig) -> None:
    i = lab.nodes
    command = "pwd; echo to-stderr >&2; exit 7"
    async with await ssh(lab, i) as conn:
        r = await conn.run(command, timeout=20)
        assert r.exit_status == 7
        assert r.stdout == f"{lab.node_dir(i)}\n" and r.stderr == "to-stderr\n"
        r = await conn.run("tr a-z A-Z", input="piped through\n", timeout=20)
        assert (r.exit_status, r.stdout) == (0, "PIPED THROUGH\n")
        r = await conn.run("./ctl status", timeout=20)
        assert r.exit_status == 0 and str(r.stdout).startswith("running ")
    entries = [json.loads(ln) for ln in (lab.node_dir(i) / "ssh.log").read_text().splitlines()[-5:]]
    assert [e["exit_status"] for e in entries if e["command"] == command][-1] == 7
    assert all({"time", "command", "exit_status", "duration_s"} <= e.keys() for e in entries)


async def test_ssh_refuses_wrong_key_and_user(lab: LabConfig) -> None:
    with pytest.raises(asyncssh.PermissionDenied):
        await ssh(lab, 1, client_keys=[asyncssh.generate_private_key("ssh-ed25519")])
    with pytest.raises(asyncssh.PermissionDenied):
        await ssh(lab, 1, username="root")
    with pytest.raises(asyncssh.PermissionDenied):
        await ssh(lab, 1, client_keys=None, password="guess")


async def test_ssh_survives_abrupt_disconnect(lab: LabConfig) -> None:
    marker = lab.node_dir(1) / "run" / "abrupt-test.txt"
    marker.unlink(missing_ok=True)
    conn = await ssh(lab, 1)
    await conn.create_process("sleep 0.5; echo finished > run/abrupt-test.txt; seq 1 200000")
    await asyncio.sleep(0.1)
    conn.abort()  # no channel close, no disconnect message
    # The command still runs to completion (as with OpenSSH without a PTY)...
    # (The shell creates the file before it writes to it: wait for the text, not the file.)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (marker.exists() and marker.read_text()):
        await asyncio.sleep(0.1)
    assert marker.read_text() == "finished\n"
    marker.unlink()
    # ...and the endpoint keeps serving.
    async with await ssh(lab, 1) as conn2:
        assert (await conn2.run("exit 0", timeout=20)).exit_status == 0


async def test_sftp_is_rooted_at_the_node_dir(lab: LabConfig, tmp_path: Path) -> None:
    async with await ssh(lab, 1) as conn, conn.start_sftp_client() as sftp:
        assert "ctl" in await sftp.listdir(".")
        assert await sftp.realpath("../../..") == "/"
        assert sorted(await sftp.listdir("../..")) == sorted(await sftp.listdir("/"))
        with pytest.raises(asyncssh.SFTPError):
            await sftp.get("../../secrets/db_password", str(tmp_path / "stolen"))
        assert not (tmp_path / "stolen").exists()
        (tmp_path / "up.txt").write_text("uploaded")
        await sftp.put(str(tmp_path / "up.txt"), "../../inject/sftp-test.txt")
    landed = lab.node_dir(1) / "inject" / "sftp-test.txt"
    try:
        assert landed.read_text() == "uploaded"  # "../.." was clamped to the node dir
        assert not (lab.abs_root / "inject" / "sftp-test.txt").exists()
    finally:
        landed.unlink(missing_ok=True)


# --------------------------------------------------------------------------- probe


async def test_probe_sees_no_failures_through_the_frontend(lab: LabConfig, tmp_path: Path) -> None:
    stop = asyncio.Event()
    out = tmp_path / "probe.jsonl"
    asyncio.get_running_loop().call_later(3.0, stop.set)
    summary = await asyncio.wait_for(run_probe(lab.main_url, 50, stop, out, slow_every=25, slow_ms=500), 30)
    assert summary.failed == 0, out.read_text()[:2000]
    assert 140 <= summary.total <= 152, summary  # 50/s for 3 s, scheduled without drift
    assert sum(summary.by_status.values()) == summary.total
    assert set(summary.by_status) <= {"200", "201"}
    assert summary.by_status.get("201", 0) >= 30  # ~30% writes
    assert len(summary.by_node) >= 2, summary.by_node  # HAProxy spreads the load
    assert summary.latency_max_ms >= 500  # the slow requests are in
    assert not out.exists() or out.read_text() == ""
    assert json.loads(summary.to_json())["total"] == summary.total


async def test_probe_counts_failures_on_a_closed_port(tmp_path: Path) -> None:
    stop = asyncio.Event()
    out = tmp_path / "probe.jsonl"
    asyncio.get_running_loop().call_later(1.0, stop.set)
    summary = await asyncio.wait_for(run_probe(f"http://127.0.0.1:{free_port()}", 20, stop, out), 30)
    assert summary.total >= 15
    assert summary.failed == summary.total == summary.by_status["error"]
    lines = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(lines) == summary.failed
    assert all(ln["status"] is None and ln["error"] and ln["method"] in ("GET", "POST") for ln in lines)
