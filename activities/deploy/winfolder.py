"""The application folder of a Windows node: back up, deploy, restore (over SFTP, with
PowerShell doing the copying and hashing on the node; activities/nodefs.py).

The same steps and guarantees as appfolder.py's Linux path, which keeps its tar backups;
only the storage differs, since Windows has no tar to count on:

    .zerodown/backups/<backup_id>/            the app folder as it was (a copy)
    .zerodown/backups/<backup_id>.manifest    sha256 of every file (sha256sum's format),
                                              written last: a backup is complete with it
    .zerodown/backups/<backup_id>.defaults/   .zerodown/defaults + installed.json as they were
    .zerodown/releases/<release_id>.zip       the uploaded package
    .zerodown/releases/<release_id>/          the staged release (merged, no protected files)

`.zerodown` lives in the login user's profile folder (C:/Users/<user>), whose ACL lets only
that user, the administrators and SYSTEM in: the backups hold the protected files.
"""

from __future__ import annotations

from activities.common import check_id, fail, heartbeat
from activities.deploy.appfolder import (
    BACKUPS,
    DEFAULTS,
    RELEASES,
    ZD,
    AppBackup,
    AppRestoreResult,
    DeployResult,
    _check_relpath,
    _manifest_difference,
    _plan_merges,
    check_deployed,
    parse_sha256sum,
    record_installed,
    restored,
    upload_verified,
    write_merged,
)
from activities.deploy.package import PackageInfo, _verify_package
from activities.nodefs import SftpFiles, files_of
from errors import (
    BACKUP_CONFLICT,
    BACKUP_CORRUPT,
    BACKUP_INCONSISTENT,
    PROTECTED_FILE_MISSING,
)
from inventory.model import Node


def _manifest_text(manifest: dict[str, str]) -> bytes:
    return "".join(f"{d}  ./{n}\n" for n, d in sorted(manifest.items())).encode("utf-8")


async def _read(fs: SftpFiles, path: str) -> bytes | None:
    from activities import ssh

    return await ssh.get_file(fs.node.ssh, path)


async def _copy_defaults(fs: SftpFiles, dst: str) -> None:
    """.zerodown/defaults and installed.json into the folder `dst` (as they are now)."""
    listing = await fs.listing(DEFAULTS)
    await fs.copy_files(DEFAULTS, f"{dst}/defaults", listing.files, (*listing.dirs, ""))
    if await fs.is_file(f"{ZD}/installed.json"):
        await fs.copy_files(ZD, dst, ["installed.json"])


async def backup_app(
    node: Node, backup_id: str, protected_files: tuple[str, ...], fast: bool = True
) -> AppBackup:
    check_id("backup id", backup_id)
    for p in protected_files:
        _check_relpath("protected file", p)
    fs = files_of(node, fast)
    b, app = f"{BACKUPS}/{backup_id}", node.app_dir
    current = await fs.manifest(app)
    old = await _read(fs, f"{b}.manifest")
    reused = old is not None and await fs.exists(b)
    if reused:
        assert old is not None
        manifest = parse_sha256sum(old.decode("utf-8"))
        differ = _manifest_difference(manifest, current)
        if differ:
            fail(
                BACKUP_CONFLICT,
                f"node {node.name}: backup {backup_id} already exists ({b}) but differs from the "
                f"application folder {app} as it is now ({len(differ)} file(s): "
                f"{', '.join(differ[:10])}{', ...' if len(differ) > 10 else ''}); refusing to reuse "
                "it as this folder's backup. Back up under a new id, or remove the old backup if it "
                "is no longer needed",
            )
    else:
        # A half-made backup of an earlier attempt goes first; the manifest is written last.
        for leftover in (f"{b}.tmp", f"{b}.defaults.tmp", b, f"{b}.defaults"):
            await fs.remove_tree(leftover)
        heartbeat({"node": node.name, "step": "backup copy", "files": len(current)})
        listing = await fs.listing(app)
        await fs.copy_files(app, f"{b}.tmp", listing.files, (*listing.dirs, ""))
        after = await fs.manifest(app)
        copied = await fs.manifest(f"{b}.tmp")
        if after != current:
            await fs.remove_tree(f"{b}.tmp")
            fail(
                BACKUP_INCONSISTENT,
                f"node {node.name}: the application folder {app} changed while it was backed up; "
                "retrying the backup",
                retryable=True,
            )
        if copied != current:
            wrong = _manifest_difference(copied, current)
            await fs.remove_tree(f"{b}.tmp")
            fail(
                BACKUP_INCONSISTENT,
                f"node {node.name}: the copy of {app} in {b}.tmp differs from the folder in "
                f"{len(wrong)} file(s): {', '.join(wrong[:10])}; retrying the backup",
                retryable=True,
            )
        await _copy_defaults(fs, f"{b}.defaults.tmp")
        await fs.rename(f"{b}.tmp", b)
        await fs.rename(f"{b}.defaults.tmp", f"{b}.defaults")
        from activities import ssh

        await ssh.put_bytes(node.ssh, _manifest_text(current), f"{b}.manifest")
        manifest = current
    protected: dict[str, str] = {}
    for p in protected_files:
        if p not in manifest:
            fail(
                PROTECTED_FILE_MISSING,
                f"node {node.name}: protected file {p} is not in the application folder {app}; "
                "refusing to continue without it",
            )
        protected[p] = manifest[p]
    return AppBackup(
        node=node,
        node_name=node.name,
        backup_id=backup_id,
        path=b,
        files=len(manifest),
        manifest=manifest,
        protected=protected,
        defaults_path=f"{b}.defaults",
        reused=reused,
    )


async def deploy(
    node: Node,
    package: PackageInfo,
    protected_files: tuple[str, ...],
    merge_files: tuple[str, ...],
    release_id: str,
    fast: bool = True,
) -> DeployResult:

    check_id("release id", release_id)
    for p in (*protected_files, *merge_files):
        _check_relpath("file", p)
    fs = files_of(node, fast)
    app, rel = node.app_dir, f"{RELEASES}/{release_id}"
    zip_remote = f"{rel}.zip"

    # 1. The package must still be the one inspected; 2. merges planned in memory (reads only).
    await _verify_package(package)
    heartbeat({"node": node.name, "step": "plan merges"})
    plans = await _plan_merges(node, package, merge_files, release_id)

    # 3. Upload unless the node already holds the same bytes, then verify there.
    heartbeat({"node": node.name, "step": "upload"})
    await fs.makedirs(RELEASES)
    await fs.makedirs(DEFAULTS)
    await upload_verified(node, package, zip_remote, fs.sha256)

    # 4. Stage: a fresh extraction every attempt.
    heartbeat({"node": node.name, "step": "extract"})
    await fs.remove_tree(f"{rel}.tmp")
    await fs.makedirs(f"{rel}.tmp")
    await fs.extract_zip(package.path, zip_remote, f"{rel}.tmp")
    await fs.remove_tree(rel)
    await fs.rename(f"{rel}.tmp", rel)

    # 5. Merged configs into the stage; the diff (values!) next to it, never in the history.
    async def remove_stale(path: str) -> None:
        await fs.remove_files("", [path])

    pristine = await write_merged(node, plans, rel, release_id, remove_stale)
    reports = [plan.report for plan in plans]

    # 6. Protected files never leave the stage.
    await fs.remove_files(rel, protected_files)
    staged = await fs.manifest(rel)
    before = await fs.manifest(app)
    protected_before = {p: before.get(p) for p in protected_files}

    # 7. Idempotence: the app folder already holds exactly the staged release.
    already = all(before.get(path) == digest for path, digest in staged.items())
    if not already:
        heartbeat({"node": node.name, "step": "copy", "files": len(staged)})
        listing = await fs.listing(rel)
        await fs.copy_files(rel, app, [p for p in listing.files if p not in protected_files], listing.dirs)

    # 8. Verify: every staged file landed, no protected file changed; 9. record the defaults.
    check_deployed(node, release_id, staged, await fs.manifest(app), protected_before)
    await record_installed(node, package, release_id, pristine)
    return DeployResult(
        node_name=node.name,
        version=package.version,
        files_written=0 if already else len(staged),
        merged=tuple(reports),
        already_deployed=already,
        release_id=release_id,
    )


async def restore_app(bk: AppBackup, fast: bool = True) -> AppRestoreResult:
    """Make the application folder equal to the backup again (and the recorded defaults)."""
    node, app = bk.node, bk.node.app_dir
    fs = files_of(node, fast)
    if not await fs.exists(bk.path) or bk.path.endswith(".tar"):
        fail(BACKUP_CORRUPT, f"node {node.name}: backup {bk.path} is gone; cannot restore {app}")
    current = await fs.manifest(app)
    protected = set(bk.protected)
    remove = sorted(p for p in current if p not in bk.manifest and p not in protected)
    extract = sorted(p for p, d in bk.manifest.items() if current.get(p) != d)
    await fs.remove_files(app, remove)
    saved, now = await fs.listing(bk.path), await fs.listing(app)
    await fs.copy_files(bk.path, app, extract, saved.dirs - now.dirs)
    # Folders created after the backup (now empty) go too.
    await fs.remove_dirs(app, now.dirs - saved.dirs)
    if bk.defaults_path and await fs.exists(bk.defaults_path):
        await fs.remove_tree(DEFAULTS)
        await fs.remove_files(ZD, ["installed.json"])
        kept = await fs.listing(bk.defaults_path)
        await fs.copy_files(bk.defaults_path, ZD, kept.files, kept.dirs)
    return restored(bk, await fs.manifest(app), extract, remove)
