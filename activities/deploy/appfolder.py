"""The node's application folder: back up, deploy a package into it, restore it.

Everything on a node happens over SSH in its login directory; zerodown's own state lives
next to the application folder, never inside it:

    .zerodown/backups/<backup_id>.tar            app folder as it was (tar of `app_dir/.`)
    .zerodown/backups/<backup_id>.manifest       sha256sum of every file of it
    .zerodown/backups/<backup_id>.defaults.tar   the recorded config defaults at that time
    .zerodown/releases/<release_id>.zip          the uploaded package
    .zerodown/releases/<release_id>/             the staged release (merged configs, no
                                                 protected files)
    .zerodown/releases/<release_id>.<file>.merge.diff   what the merge carried over (mode 600)
    .zerodown/defaults/<merge file>              the pristine defaults the node runs on

`.zerodown` and `.zerodown/backups` are mode 700 and backups are written under umask 077:
they hold protected files (encryption keys) and configs with passwords. The app folder
itself keeps the modes the package and the application expect (no umask change there).
Config values never leave the node: merge reports name keys only, the line diff stays in
the `.merge.diff` file (activity results are stored in Temporal's history).

Node-side commands are POSIX sh + tar + find + xargs + sha256sum (+ unzip or python3).
"""

from __future__ import annotations

import asyncio
import json
import posixpath
import re
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities import ssh
from activities.common import check_id, fail, heartbeat
from activities.deploy.merge import MergeOutcome, merge_config_detailed
from activities.deploy.package import PackageInfo, _verify_package, _zip_member
from errors import (
    BACKUP_CONFLICT,
    BACKUP_CORRUPT,
    BACKUP_INCONSISTENT,
    DEPLOY_VERIFICATION_FAILED,
    INVALID_REQUEST,
    MERGE_UNSUPPORTED,
    PROTECTED_FILE_CHANGED,
    PROTECTED_FILE_MISSING,
    RESTORE_VERIFICATION_FAILED,
    SSH_COMMAND_FAILED,
)
from inventory.model import Node

ZD = ".zerodown"
BACKUPS = f"{ZD}/backups"
RELEASES = f"{ZD}/releases"
DEFAULTS = f"{ZD}/defaults"
# Long node-side operations (tar of a big folder); run() heartbeats meanwhile.
CMD_TIMEOUT_S = 900.0
_q = shlex.quote


# =========================================================================== node helpers


def parse_sha256sum(text: str) -> dict[str, str]:
    """`sha256sum` output (run on `./...` paths) -> {relative path: hex digest}.

    GNU sha256sum escapes names holding a backslash or newline: the line then starts with
    a backslash and the name uses \\\\ and \\n.
    """
    out: dict[str, str] = {}
    for line in text.split("\n"):
        if not line:
            continue
        escaped = line.startswith("\\")
        if escaped:
            line = line[1:]
        digest, name = line[:64], line[66:]
        if escaped:
            name = re.sub(
                r"\\(.)", lambda m: {"n": "\n", "r": "\r", "\\": "\\"}.get(m.group(1), m.group(1)), name
            )
        if name.startswith("./"):
            name = name[2:]
        out[name] = digest.lower()
    return out


def _manifest_cmd(folder: str) -> str:
    return f"cd {_q(folder)} && find . -type f -print0 | xargs -0 -r sha256sum"


def _check_relpath(kind: str, rel: str) -> None:
    if not rel or rel.startswith("/") or ".." in rel.split("/"):
        fail(INVALID_REQUEST, f"{kind} {rel!r} must be a path relative to the application folder")


async def folder_manifest(node: Node, folder: str) -> dict[str, str]:
    if node.os == "windows":
        from activities.nodefs import files_of

        return await files_of(node).manifest(folder)
    res = await ssh.run(node.ssh, _manifest_cmd(folder), timeout_s=CMD_TIMEOUT_S)
    return parse_sha256sum(res.stdout)


async def _sh(node: Node, script: str, what: str) -> ssh.CommandResult:
    """Run a multi-line sh script; a failure names the node and the step."""
    try:
        return await ssh.run(node.ssh, script, timeout_s=CMD_TIMEOUT_S)
    except ApplicationError as e:
        if e.type == SSH_COMMAND_FAILED:
            fail(SSH_COMMAND_FAILED, f"node {node.name}: {what} failed: {e.message}", cause=e)
        raise


# =========================================================================== backup


@dataclass(frozen=True)
class AppBackup:
    node: Node
    node_name: str
    backup_id: str
    path: str  # the tar on the node, relative to the login directory
    files: int
    manifest: dict[str, str]  # relative path -> sha256 of every file
    protected: dict[str, str]  # protected file -> sha256
    # tar of .zerodown/defaults (+ installed.json) as they were: restored with the folder so
    # the next merge compares against the defaults the restored configs came from.
    defaults_path: str = ""
    reused: bool = False


_TARLIST = "--zerodown-tar-list--"
_CURRENT = "--zerodown-current-manifest--"


def _manifest_difference(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return sorted(set(a) ^ set(b) | {p for p in a if p in b and a[p] != b[p]})


async def backup_app(node: Node, backup_id: str, protected_files: tuple[str, ...]) -> AppBackup:
    """tar of the app folder into .zerodown/backups/<backup_id>.tar (+ manifest, defaults).

    Written under umask 077 into mode-700 folders: the tar holds the protected files.
    An existing complete backup with this id is reused only when its manifest equals the
    folder as it is now (BackupConflict otherwise: the id stands for another state).
    """
    if node.os == "windows":
        from activities.deploy import winfolder

        return await winfolder.backup_app(node, backup_id, protected_files)
    check_id("backup id", backup_id)
    for p in protected_files:
        _check_relpath("protected file", p)
    b = f"{BACKUPS}/{backup_id}"
    app = node.app_dir
    manifest_of_app = '( cd "$APP" && find . -type f -print0 | xargs -0 -r sha256sum )'
    # The manifest is taken before and after the tar: if they differ something wrote into
    # the folder meanwhile and the backup would not match its manifest (exit 75: retry).
    # umask 077 only affects this script (the backup files), never the app folder.
    script = f"""set -e
umask 077
B={_q(b)}; APP={_q(app)}
mkdir -p {_q(BACKUPS)}
chmod 700 {_q(ZD)} {_q(BACKUPS)}
if [ -f "$B.manifest" ] && [ -f "$B.tar" ]; then
  echo reused
  for f in "$B.tar" "$B.manifest" "$B.defaults.tar"; do if [ -f "$f" ]; then chmod 600 "$f"; fi; done
  cat "$B.manifest"
  echo {_CURRENT}
  {manifest_of_app}
else
  echo created
  {manifest_of_app} > "$B.manifest.1"
  tar -cf "$B.tar.tmp" -C "$APP" .
  {manifest_of_app} > "$B.manifest.2"
  if ! cmp -s "$B.manifest.1" "$B.manifest.2"; then
    rm -f "$B.manifest.1" "$B.manifest.2" "$B.tar.tmp"
    echo "the application folder $APP changed while it was backed up" >&2; exit 75
  fi
  set --
  if [ -d {_q(DEFAULTS)} ]; then set -- "$@" defaults; fi
  if [ -f {_q(ZD)}/installed.json ]; then set -- "$@" installed.json; fi
  if [ $# -gt 0 ]; then tar -cf "$B.defaults.tar.tmp" -C {_q(ZD)} "$@"
  else tar -cf "$B.defaults.tar.tmp" -T /dev/null; fi
  mv "$B.tar.tmp" "$B.tar"; mv "$B.defaults.tar.tmp" "$B.defaults.tar"; rm -f "$B.manifest.2"
  mv "$B.manifest.1" "$B.manifest"
  cat "$B.manifest"
  echo {_CURRENT}
fi
echo {_TARLIST}
tar -tf "$B.tar"
"""
    res = await ssh.run(node.ssh, script, timeout_s=CMD_TIMEOUT_S, check=False)
    if res.exit_status == 75:
        fail(
            BACKUP_INCONSISTENT,
            f"node {node.name}: {res.stderr.strip()}; retrying the backup",
            retryable=True,
        )
    if res.exit_status != 0:
        fail(
            SSH_COMMAND_FAILED,
            f"node {node.name}: backup of {app} as {b}.tar exited with status "
            f"{res.exit_status}; stderr: {res.stderr.strip()[-1500:] or '(empty)'}",
        )
    head, _, rest = res.stdout.partition("\n")
    manifest_text, _, rest = rest.partition(_CURRENT + "\n")
    current_text, _, tar_list = rest.partition(_TARLIST + "\n")
    manifest = parse_sha256sum(manifest_text)
    reused = head.strip() == "reused"
    if reused:
        differ = _manifest_difference(manifest, parse_sha256sum(current_text))
        if differ:
            fail(
                BACKUP_CONFLICT,
                f"node {node.name}: backup {backup_id} already exists ({b}.tar) but differs from the "
                f"application folder {app} as it is now ({len(differ)} file(s): "
                f"{', '.join(differ[:10])}{', ...' if len(differ) > 10 else ''}); refusing to reuse "
                "it as this folder's backup. Back up under a new id, or remove the old backup if it "
                "is no longer needed",
            )
    members = {m[2:] if m.startswith("./") else m for m in tar_list.split("\n") if m}
    protected: dict[str, str] = {}
    for p in protected_files:
        if p not in manifest:
            fail(
                PROTECTED_FILE_MISSING,
                f"node {node.name}: protected file {p} is not in the application folder {app}; "
                "refusing to continue without it",
            )
        if p not in members:
            fail(PROTECTED_FILE_MISSING, f"node {node.name}: protected file {p} is missing from {b}.tar")
        protected[p] = manifest[p]
    return AppBackup(
        node=node,
        node_name=node.name,
        backup_id=backup_id,
        path=f"{b}.tar",
        files=len(manifest),
        manifest=manifest,
        protected=protected,
        defaults_path=f"{b}.defaults.tar",
        reused=reused,
    )


# =========================================================================== deploy


@dataclass(frozen=True)
class MergeReport:
    file: str
    carried: tuple[str, ...]  # keys whose node value was carried over (names only)
    # Always empty: the diff holds config values (passwords...) and this report goes into
    # Temporal's history. Kept for compatibility; the diff is in `diff_path` on the node.
    diff: tuple[str, ...]
    had_recorded_defaults: bool
    notes: tuple[str, ...] = ()
    # The unified diff new defaults -> installed, on the node (relative to the login
    # directory, mode 600); "" when the merge changed nothing or did not run.
    diff_path: str = ""
    # Keys whose default value changed between the recorded and the new defaults (names).
    changed_defaults: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeployResult:
    node_name: str
    version: str
    files_written: int
    merged: tuple[MergeReport, ...]
    already_deployed: bool = False
    release_id: str = ""


def _decode(data: bytes) -> str:
    # surrogateescape: whatever the bytes are, encoding back gives the same bytes
    return data.decode("utf-8", errors="surrogateescape")


def _encode(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogateescape")


async def _remote_sha256(node: Node, path: str) -> str:
    res = await ssh.run(node.ssh, f"sha256sum {_q(path)} 2>/dev/null || true", timeout_s=CMD_TIMEOUT_S)
    return res.stdout.split()[0].lower() if res.stdout.strip() else ""


def diff_path_for(release_id: str, merge_file: str) -> str:
    """Where the merge diff of `merge_file` for a release lives on the node."""
    return f"{RELEASES}/{release_id}.{merge_file.replace('/', '__')}.merge.diff"


@dataclass(frozen=True)
class _MergePlan:
    file: str
    new_defaults: bytes | None  # None: not in the package
    outcome: MergeOutcome | None  # None: nothing to merge
    report: MergeReport


async def _plan_merges(
    node: Node, package: PackageInfo, merge_files: tuple[str, ...], release_id: str
) -> list[_MergePlan]:
    """Read (only read) what each merge needs and merge in memory.

    Runs before anything is written to the node, so a file that cannot be merged
    (MergeUnsupported: not `key = value`, duplicate keys) stops the deploy with the node
    untouched.
    """
    plans: list[_MergePlan] = []
    for f in merge_files:
        new_bytes = await asyncio.to_thread(_zip_member, package.path, f)
        if new_bytes is None:
            plans.append(
                _MergePlan(
                    f,
                    None,
                    None,
                    MergeReport(
                        file=f,
                        carried=(),
                        diff=(),
                        had_recorded_defaults=False,
                        notes=("not in the package: the node's file is left as it is",),
                    ),
                )
            )
            continue
        current = await ssh.get_file(node.ssh, posixpath.join(node.app_dir, f))
        old = await ssh.get_file(node.ssh, f"{DEFAULTS}/{f}") if current is not None else None
        label = f"node {node.name}: {f}"
        try:
            if current is None:
                # Nothing to carry, but a file that could never be merged is refused now
                # rather than on the next release.
                merge_config_detailed("", None, _decode(new_bytes), name=label)
                plans.append(
                    _MergePlan(
                        f,
                        new_bytes,
                        None,
                        MergeReport(
                            file=f,
                            carried=(),
                            diff=(),
                            had_recorded_defaults=False,
                            notes=("not on the node: the new defaults are installed",),
                        ),
                    )
                )
                continue
            outcome = merge_config_detailed(
                _decode(current), _decode(old) if old is not None else None, _decode(new_bytes), name=label
            )
        except ApplicationError as e:
            if e.type == MERGE_UNSUPPORTED:
                fail(
                    MERGE_UNSUPPORTED,
                    f"{e.message}. Nothing was changed on the node (release {release_id} not deployed)",
                    cause=e,
                )
            raise
        plans.append(
            _MergePlan(
                f,
                new_bytes,
                outcome,
                MergeReport(
                    file=f,
                    carried=outcome.carried,
                    diff=(),
                    had_recorded_defaults=old is not None,
                    notes=outcome.notes,
                    diff_path=diff_path_for(release_id, f) if outcome.diff else "",
                    changed_defaults=outcome.changed_defaults,
                ),
            )
        )
    return plans


async def deploy(
    node: Node,
    package: PackageInfo,
    protected_files: tuple[str, ...],
    merge_files: tuple[str, ...],
    release_id: str,
) -> DeployResult:
    if node.os == "windows":
        from activities.deploy import winfolder

        return await winfolder.deploy(node, package, protected_files, merge_files, release_id)
    check_id("release id", release_id)
    for p in (*protected_files, *merge_files):
        _check_relpath("file", p)
    app = node.app_dir
    rel = f"{RELEASES}/{release_id}"
    zip_remote = f"{rel}.zip"

    # 1. The package must still be the one inspected (its sha256 travels in PackageInfo).
    await _verify_package(package)

    # 2. Merge the configs in memory first (reads only): MergeUnsupported leaves the node as
    #    it was, before any upload or write.
    heartbeat({"node": node.name, "step": "plan merges"})
    plans = await _plan_merges(node, package, merge_files, release_id)

    # 3. Upload (skipped when the node already holds the same bytes), then verify there.
    #    zerodown's folder is private (configs with passwords, protected files in backups).
    heartbeat({"node": node.name, "step": "upload"})
    await _sh(
        node, f"umask 077 && mkdir -p {_q(RELEASES)} {_q(DEFAULTS)} && chmod 700 {_q(ZD)}", f"creating {ZD}"
    )
    await upload_verified(node, package, zip_remote, partial(_remote_sha256, node))

    # 4. Stage: a fresh extraction every attempt (cheap, and the merge below edits it).
    #    The node's default umask on purpose: the modes land in the app folder.
    heartbeat({"node": node.name, "step": "extract"})
    await _sh(
        node,
        f"""set -e
R={_q(rel)}
rm -rf "$R.tmp"; mkdir -p "$R.tmp"
if command -v unzip >/dev/null 2>&1; then unzip -q -o "$R.zip" -d "$R.tmp"
else python3 -m zipfile -e "$R.zip" "$R.tmp"; fi
rm -rf "$R"; mv "$R.tmp" "$R"
""",
        f"extracting {zip_remote}",
    )

    # 5. Merged configs into the staged tree; the diff (values!) into a private file next
    #    to it. The pristine defaults are recorded after success (step 9).
    async def remove_stale(path: str) -> None:
        await _sh(node, f"rm -f {_q(path)}", f"removing a stale {path}")

    pristine = await write_merged(node, plans, rel, release_id, remove_stale)
    reports = [plan.report for plan in plans]

    # 6. Protected files never leave the stage: removed from it and excluded from the copy.
    if protected_files:
        await _sh(
            node,
            "rm -f -- " + " ".join(_q(f"{rel}/{p}") for p in protected_files),
            "removing protected files from the staged release",
        )
    staged = await folder_manifest(node, rel)
    before = await folder_manifest(node, app)
    protected_before = {p: before.get(p) for p in protected_files}

    # 7. Idempotence: the app folder already holds exactly the staged release.
    already = all(before.get(path) == digest for path, digest in staged.items())
    if not already:
        heartbeat({"node": node.name, "step": "copy", "files": len(staged)})
        excludes = " ".join(f"--exclude={_q('./' + p)}" for p in protected_files)
        await _sh(
            node,
            f"""set -e
R={_q(rel)}; APP={_q(app)}
mkdir -p "$APP"
tar -C "$R" --anchored --no-wildcards {excludes} -cf "$R.copy.tar" .
tar -C "$APP" --no-same-owner -xf "$R.copy.tar"
rm -f "$R.copy.tar"
""",
            f"copying the staged release into {app}",
        )

    # 8. Verify: every staged file landed, no protected file changed.
    check_deployed(node, release_id, staged, await folder_manifest(node, app), protected_before)

    # 9. Record the new pristine defaults (after success only: the next merge compares
    #    against what this node now runs on).
    await record_installed(node, package, release_id, pristine)
    return DeployResult(
        node_name=node.name,
        version=package.version,
        files_written=0 if already else len(staged),
        merged=tuple(reports),
        already_deployed=already,
        release_id=release_id,
    )


# ----------------------------------------------------------------- steps both OS paths share


async def upload_verified(
    node: Node, package: PackageInfo, zip_remote: str, remote_sha256: Callable[[str], Awaitable[str]]
) -> None:
    """Step 3: upload the package unless the node already holds the same bytes, then check the
    node's copy (`remote_sha256`: the OS path's way to hash a file there, "" when missing)."""
    if await remote_sha256(zip_remote) == package.sha256:
        return
    await ssh.put_file(node.ssh, package.path, zip_remote)
    remote = await remote_sha256(zip_remote)
    if remote != package.sha256:
        fail(
            DEPLOY_VERIFICATION_FAILED,
            f"node {node.name}: uploaded {zip_remote} has sha256 {remote or '(none)'}, expected "
            f"{package.sha256}",
            retryable=True,
        )


async def write_merged(
    node: Node,
    plans: list[_MergePlan],
    rel: str,
    release_id: str,
    remove_stale: Callable[[str], Awaitable[None]],
) -> dict[str, bytes]:
    """Step 5: the merged configs into the staged release `rel`, each diff (values!) into a
    private file next to it (a stale one removed); returns the pristine new defaults, which
    are recorded once the deploy succeeded (record_installed)."""
    pristine: dict[str, bytes] = {}
    for plan in plans:
        if plan.new_defaults is not None:
            pristine[plan.file] = plan.new_defaults
        if plan.outcome is None:
            continue
        await ssh.put_bytes(node.ssh, _encode(plan.outcome.text), f"{rel}/{plan.file}")
        diff_remote = diff_path_for(release_id, plan.file)
        if plan.outcome.diff:
            await ssh.put_bytes(
                node.ssh, _encode("\n".join(plan.outcome.diff) + "\n"), diff_remote, mode=0o600
            )
        else:
            await remove_stale(diff_remote)
    return pristine


def check_deployed(
    node: Node,
    release_id: str,
    staged: dict[str, str],
    after: dict[str, str],
    protected_before: dict[str, str | None],
) -> None:
    """Step 8: every staged file landed in the app folder, no protected file changed."""
    wrong = sorted(p for p, d in staged.items() if after.get(p) != d)
    if wrong:
        fail(
            DEPLOY_VERIFICATION_FAILED,
            f"node {node.name}: after copying, {len(wrong)} file(s) in {node.app_dir} differ from "
            f"release {release_id}: {', '.join(wrong[:10])}",
        )
    changed = sorted(p for p, d in protected_before.items() if after.get(p) != d)
    if changed:
        fail(
            PROTECTED_FILE_CHANGED,
            f"node {node.name}: protected file(s) changed by the deploy: {', '.join(changed)}",
        )


async def record_installed(
    node: Node, package: PackageInfo, release_id: str, pristine: dict[str, bytes]
) -> None:
    """Step 9: the new pristine defaults and installed.json, after success only."""
    for f, data in pristine.items():
        await ssh.put_bytes(node.ssh, data, f"{DEFAULTS}/{f}")
    installed = {
        "release_id": release_id,
        "name": package.name,
        "version": package.version,
        "sha256": package.sha256,
    }
    await ssh.put_bytes(node.ssh, _encode(json.dumps(installed, indent=2) + "\n"), f"{ZD}/installed.json")


# =========================================================================== restore


@dataclass(frozen=True)
class AppRestoreResult:
    node_name: str
    backup_id: str
    files: int  # files in the restored folder
    rewritten: int  # files extracted from the backup (missing or different)
    removed: tuple[str, ...]  # files that were not in the backup


async def _put_list(node: Node, names: list[str], remote: str) -> None:
    await ssh.put_bytes(node.ssh, b"".join(_encode(n) + b"\0" for n in names), remote)


async def restore_app(bk: AppBackup) -> AppRestoreResult:
    """Make the application folder equal to the backup again (and the recorded defaults)."""
    if bk.node.os == "windows":
        from activities.deploy import winfolder

        return await winfolder.restore_app(bk)
    node, app = bk.node, bk.node.app_dir
    base = bk.path[:-4] if bk.path.endswith(".tar") else bk.path
    res = await ssh.run(
        node.ssh, f"test -f {_q(bk.path)} && echo ok || echo missing", timeout_s=CMD_TIMEOUT_S
    )
    if res.stdout.strip() != "ok":
        fail(BACKUP_CORRUPT, f"node {node.name}: backup {bk.path} is gone; cannot restore {app}")
    current = await folder_manifest(node, app)
    protected = set(bk.protected)
    remove = sorted(p for p in current if p not in bk.manifest and p not in protected)
    extract = sorted(p for p, d in bk.manifest.items() if current.get(p) != d)
    if remove:
        await _put_list(node, remove, f"{base}.remove")
        await _sh(
            node,
            f"( cd {_q(app)} && xargs -0 -r rm -f -- ) < {_q(base + '.remove')}",
            f"removing {len(remove)} file(s) that are not in backup {bk.backup_id}",
        )
    if extract:
        await _put_list(node, [f"./{p}" for p in extract], f"{base}.extract")
        await _sh(
            node,
            f"tar -C {_q(app)} --no-same-owner -xf {_q(bk.path)} --null -T {_q(base + '.extract')}",
            f"extracting {len(extract)} file(s) from {bk.path}",
        )
    # Folders created after the backup (now empty) go too; tar lists the backup's folders.
    listing = await ssh.run(
        node.ssh,
        f"tar -tf {_q(bk.path)}; echo {_TARLIST}; cd {_q(app)} && find . -mindepth 1 -type d",
        timeout_s=CMD_TIMEOUT_S,
    )
    in_tar, _, dirs_now = listing.stdout.partition(_TARLIST + "\n")
    tar_dirs = {m.rstrip("/") for m in in_tar.split("\n") if m.endswith("/")}
    extra_dirs = sorted(
        (d for d in dirs_now.split("\n") if d and d not in tar_dirs), key=lambda d: d.count("/"), reverse=True
    )
    if extra_dirs:
        await _put_list(node, extra_dirs, f"{base}.rmdir")
        await ssh.run(
            node.ssh,
            f"( cd {_q(app)} && xargs -0 -r rmdir -- ) < {_q(base + '.rmdir')} 2>/dev/null || true",
            timeout_s=CMD_TIMEOUT_S,
        )
    if bk.defaults_path:
        await _sh(
            node,
            f"""set -e
if [ -f {_q(bk.defaults_path)} ]; then
  rm -rf {_q(DEFAULTS)} {_q(ZD)}/installed.json; mkdir -p {_q(ZD)}
  tar -C {_q(ZD)} --no-same-owner -xf {_q(bk.defaults_path)}
fi
rm -f {_q(base + ".remove")} {_q(base + ".extract")} {_q(base + ".rmdir")}
""",
            "restoring the recorded config defaults",
        )
    return restored(bk, await folder_manifest(node, app), extract, remove)


def restored(bk: AppBackup, after: dict[str, str], extract: list[str], remove: list[str]) -> AppRestoreResult:
    """A restore's last step on either OS path: the folder must now equal the backup."""
    if after != bk.manifest:
        diff = _manifest_difference(after, bk.manifest)
        fail(
            RESTORE_VERIFICATION_FAILED,
            f"node {bk.node.name}: {bk.node.app_dir} differs from backup {bk.backup_id} after restore in "
            f"{len(diff)} file(s): {', '.join(diff[:10])}",
        )
    return AppRestoreResult(
        node_name=bk.node.name,
        backup_id=bk.backup_id,
        files=len(after),
        rewritten=len(extract),
        removed=tuple(remove),
    )


# =========================================================================== activities


@dataclass(frozen=True)
class AppBackupRequest:
    node: Node
    backup_id: str
    protected_files: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeployRequest:
    node: Node
    package: PackageInfo
    protected_files: tuple[str, ...]
    merge_files: tuple[str, ...]
    release_id: str


@dataclass(frozen=True)
class NodeRequest:
    node: Node


@activity.defn
async def backup_app_folder(req: AppBackupRequest) -> AppBackup:
    """tar of the app folder into .zerodown/backups/<backup_id>.tar + manifest; idempotent
    on backup_id; ProtectedFileMissing when a protected file is absent."""
    return await backup_app(req.node, req.backup_id, tuple(req.protected_files))


@activity.defn
async def deploy_package(req: DeployRequest) -> DeployResult:
    """Install the package into the node's app folder (protected files untouched, merge
    files merged); idempotent. MergeUnsupported, before anything is written to the node,
    when a merge file is not a plain `key = value` file. The merge reports name keys only;
    each diff is left on the node at `MergeReport.diff_path` (mode 600)."""
    return await deploy(
        req.node, req.package, tuple(req.protected_files), tuple(req.merge_files), req.release_id
    )


@activity.defn
async def restore_app_folder(req: AppBackup) -> AppRestoreResult:
    return await restore_app(req)
