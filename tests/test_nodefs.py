"""A node's file steps by every path zerodown has, held to the same results on the real lab:
the Linux shell path (tar, find, sha256sum: appfolder.py) and the OS-neutral SFTP path
(nodefs.SftpFiles, winfolder.py) on a Linux node; on the Windows node stand-in, the SFTP path
and the PowerShell-assisted one (Get-FileHash, Copy-Item, Expand-Archive)."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from activities import ssh
from activities.deploy import appfolder, winfolder
from activities.deploy.package import inspect_package_file
from activities.nodefs import PowerShellFiles, SftpFiles
from inventory.load import load_inventory
from inventory.model import Inventory, Node
from lab.config import LabConfig


@pytest.fixture(scope="module")
async def inv(lab: LabConfig) -> AsyncIterator[Inventory]:
    yield load_inventory(lab.site_yaml)
    await ssh.POOL.close_all()


def _zerodown_state(lab: LabConfig, i: int) -> dict[str, bytes]:
    """The node's recorded defaults and installed.json (what a restore puts back too)."""
    zd = lab.node_dir(i) / ".zerodown"
    out = {p.relative_to(zd).as_posix(): p.read_bytes() for p in (zd / "defaults").rglob("*") if p.is_file()}
    if (zd / "installed.json").is_file():
        out["installed.json"] = (zd / "installed.json").read_bytes()
    return out


async def test_sftp_path_gives_the_shell_paths_results_on_a_linux_node(
    inv: Inventory, fresh_lab: LabConfig
) -> None:
    lab = fresh_lab  # the default profile's nodes (key = value web.config)
    n: Node = inv.node("node3")
    app = inv.application
    protected, merge = tuple(app.protected_files), tuple(app.merge_files)
    rid = uuid.uuid4().hex[:8]
    original = await appfolder.folder_manifest(n, n.app_dir)
    state = _zerodown_state(lab, 3)
    assert await SftpFiles(n).manifest(n.app_dir) == original
    listing = await SftpFiles(n).listing(n.app_dir)
    assert set(listing.files) == set(original)
    assert {k: (lab.node_dir(3) / "app" / k).stat().st_size for k in listing.files} == listing.files

    pkg = inspect_package_file(str(lab.package(2)))
    # The SFTP path: backup (a folder copy), deploy, restore.
    bk = await winfolder.backup_app(n, f"bk-sftp-{rid}", protected, fast=False)
    assert bk.manifest == original and bk.path.endswith(f"bk-sftp-{rid}") and not bk.reused
    assert (lab.node_dir(3) / bk.path / "encryption.config").read_bytes() == (
        lab.node_dir(3) / "app" / "encryption.config"
    ).read_bytes()
    again = await winfolder.backup_app(n, f"bk-sftp-{rid}", protected, fast=False)
    assert again.reused and again.manifest == original
    by_sftp = await winfolder.deploy(n, pkg, protected, merge, f"rel-sftp-{rid}", fast=False)
    deployed_by_sftp = await appfolder.folder_manifest(n, n.app_dir)
    assert deployed_by_sftp != original
    restored = await winfolder.restore_app(bk, fast=False)
    assert await appfolder.folder_manifest(n, n.app_dir) == original
    assert _zerodown_state(lab, 3) == state and restored.rewritten > 0

    # The shell path on the same folder gives the same folder, report and restore.
    bk_sh = await appfolder.backup_app(n, f"bk-sh-{rid}", protected)
    assert bk_sh.manifest == original
    by_shell = await appfolder.deploy(n, pkg, protected, merge, f"rel-sh-{rid}")
    assert await appfolder.folder_manifest(n, n.app_dir) == deployed_by_sftp
    assert by_shell.files_written == by_sftp.files_written and by_shell.version == by_sftp.version
    assert [(m.file, m.carried, m.changed_defaults) for m in by_shell.merged] == [
        (m.file, m.carried, m.changed_defaults) for m in by_sftp.merged
    ]
    restored_sh = await appfolder.restore_app(bk_sh)
    assert await appfolder.folder_manifest(n, n.app_dir) == original
    assert (restored_sh.rewritten, restored_sh.removed) == (restored.rewritten, restored.removed)
    assert _zerodown_state(lab, 3) == state
    await ssh.run(n.ssh, f"rm -rf .zerodown/backups/bk-*-{rid}* .zerodown/releases/rel-*-{rid}*")


async def test_sftp_health_file_matches_the_shell_script(inv: Inventory, lab: LabConfig) -> None:
    """set_health_file's SFTP steps (Windows nodes) do what its sh script does (Linux)."""
    from activities import node as node_acts

    n = inv.node("node3")
    win = dataclasses.replace(n, os="windows")
    path = Path(lab.node_dir(3)) / "health_check.html"
    original = path.read_bytes()
    try:
        assert not await node_acts._health_file_sftp(n, "health_check.html", True)
        assert await node_acts._health_file_sftp(n, "health_check.html", False)
        assert (
            not path.exists()
            and (lab.node_dir(3) / ".zerodown/held/health_check.html").read_bytes() == original
        )
        assert not await node_acts._health_file_sftp(n, "health_check.html", False)
        assert await node_acts._health_file_sftp(n, "health_check.html", True)
        assert path.read_bytes() == original
        del win
    finally:
        if not path.exists():
            path.write_bytes(original)


async def test_powershell_and_sftp_paths_agree_on_the_windows_stand_in(lab: LabConfig) -> None:
    inv = load_inventory(dataclasses.replace(lab, profile="secret-server").site_yaml)
    n = inv.nodes[-1]
    assert n.os == "windows" and n.app_dir.startswith("C:/")
    ps, plain = PowerShellFiles(n), SftpFiles(n)
    by_ps = await ps.manifest(n.app_dir)
    assert by_ps and by_ps == await plain.manifest(n.app_dir)
    i = int(n.name.removeprefix("node"))
    assert by_ps == await appfolder.folder_manifest(
        Node(
            name=n.name,
            ssh=dataclasses.replace(n.ssh, port=lab.ssh_port(i)),
            app_dir="app",
            service=n.service,
            url=n.url,
        ),
        "app",
    )
