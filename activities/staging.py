"""The staging copy of a site (Secret Server task five): a node's backed-up application
folder restored into the staging location, with the staging instance's own settings.

`stage_app_backup` copies a backup tar (taken by `deploy.backup_app_folder` on a production
node) to the staging host, replaces the staging app folder with its contents, restores the
zerodown defaults that came with it (so a later deploy merges the configs the same way it
would on the node) and writes the inventory's per-file `key = value` overrides (staging's
port, node name, database). Idempotent: every attempt rebuilds the folder from the tar.
`clear_staging` empties the staging folder (the seed's optional "delete the restored
staging location").
"""

from __future__ import annotations

import os
import re
import shlex
import tempfile
from dataclasses import dataclass

from temporalio import activity

import activities.ssh as ssh
from activities.common import check_id, fail, heartbeat
from activities.deploy import ZD, AppBackup, folder_manifest
from activities.deploy.xmlmerge import looks_like_xml, set_app_settings
from activities.nodefs import SftpFiles, split_drive
from errors import INVALID_REQUEST, SSH_COMMAND_FAILED
from inventory.model import Node, Staging

STAGING = f"{ZD}/staging"
_q = shlex.quote
_KEY_RE = re.compile(r"^\s*([A-Za-z0-9_.:-]+)\s*=")


def staging_node(st: Staging) -> Node:
    """The staging instance seen as a node (service control, checks, deploys)."""
    return Node(name="staging", ssh=st.ssh, app_dir=st.app_dir, service=st.service, url=st.url, os=st.os)


def apply_overrides(text: str, overrides: dict[str, str]) -> str:
    """Set each `key = value` of `overrides` in a key=value file: replaced in place where the
    key exists (first occurrence; later duplicates dropped), appended otherwise."""
    seen: set[str] = set()
    out: list[str] = []
    for line in text.splitlines():
        m = _KEY_RE.match(line)
        key = m.group(1) if m else None
        if key is not None and key in overrides:
            if key not in seen:
                out.append(f"{key} = {overrides[key]}")
                seen.add(key)
            continue
        out.append(line)
    out += [f"{k} = {v}" for k, v in overrides.items() if k not in seen]
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class StageRequest:
    backup: AppBackup
    staging: Staging


@dataclass(frozen=True)
class StagedApp:
    source_node: str
    backup_id: str
    app_dir: str
    files: int
    overridden: tuple[str, ...]  # "web.config: http.port" (keys only: values may be secrets)


@dataclass(frozen=True)
class ClearStagingRequest:
    staging: Staging


async def _staging_sh(st: Staging, script: str, what: str) -> ssh.CommandResult:
    try:
        return await ssh.run(st.ssh, script, timeout_s=900.0)
    except Exception as e:
        from temporalio.exceptions import ApplicationError

        if isinstance(e, ApplicationError) and e.type == SSH_COMMAND_FAILED:
            fail(SSH_COMMAND_FAILED, f"staging: {what} failed: {e.message}", cause=e)
        raise


def _check_app_dir(app_dir: str) -> None:
    # The staging folder is emptied and rebuilt: never let a bad inventory point it at "."
    # (the login directory) or outside it.
    drive, rest = split_drive(app_dir)
    parts = rest.strip("/").split("/")
    if drive == "/" or not rest.strip("/") or ".." in parts or parts == ["."]:
        fail(
            INVALID_REQUEST,
            f"staging app_dir {app_dir!r} must be a folder below the login directory (on Windows: "
            "a folder below a drive's root)",
        )


@activity.defn
async def stage_app_backup(req: StageRequest) -> StagedApp:
    bk, st = req.backup, req.staging
    check_id("backup id", bk.backup_id)
    _check_app_dir(st.app_dir)
    for f in st.config:
        if f.startswith("/") or ".." in f.split("/"):
            fail(INVALID_REQUEST, f"staging config file {f!r} must be relative to the app folder")
    if (bk.node.os == "windows") != (st.os == "windows"):
        fail(
            INVALID_REQUEST,
            f"the staging system is {st.os} but node {bk.node_name} is {bk.node.os}: a backup is "
            "restored into staging on the same OS only",
        )
    if st.os == "windows":
        await _stage_windows(bk, st)
    else:
        await _stage_posix(bk, st)
    overridden: list[str] = []
    for rel, values in sorted(st.config.items()):
        path = f"{st.app_dir}/{rel}"
        current = await ssh.get_file(st.ssh, path)
        text = current.decode("utf-8") if current is not None else ""
        new = (
            set_app_settings(text, values, name=f"staging {rel}")
            if looks_like_xml(text)
            else apply_overrides(text, values)
        )
        await ssh.put_bytes(st.ssh, new.encode("utf-8"), path)
        overridden += [f"{rel}: {k}" for k in values]
    files = len(await folder_manifest(staging_node(st), st.app_dir))
    return StagedApp(
        source_node=bk.node_name,
        backup_id=bk.backup_id,
        app_dir=st.app_dir,
        files=files,
        overridden=tuple(overridden),
    )


async def _stage_windows(bk: AppBackup, st: Staging) -> None:
    """The backup's folder copy, read from the node and written to staging over SFTP."""
    source, target = SftpFiles(bk.node), SftpFiles(staging_node(st))
    heartbeat({"step": "fetch backup", "node": bk.node_name})
    if not await source.exists(bk.path):
        fail(INVALID_REQUEST, f"backup {bk.path} is missing on {bk.node_name}")
    files = await source.download_tree(bk.path)
    defaults = await source.download_tree(bk.defaults_path) if bk.defaults_path else {}
    heartbeat({"step": "upload backup"})
    await target.remove_tree(f"{st.app_dir}.tmp")
    await target.upload_tree(files, f"{st.app_dir}.tmp")
    await target.remove_tree(st.app_dir)
    await target.rename(f"{st.app_dir}.tmp", st.app_dir)
    if defaults:
        await target.remove_tree(f"{ZD}/defaults")
        await target.upload_tree(defaults, ZD)


async def _stage_posix(bk: AppBackup, st: Staging) -> None:
    heartbeat({"step": "fetch backup", "node": bk.node_name})
    tar = await ssh.get_file(bk.node.ssh, bk.path)
    if tar is None:
        fail(INVALID_REQUEST, f"backup {bk.path} is missing on {bk.node_name}")
    defaults = await ssh.get_file(bk.node.ssh, bk.defaults_path) if bk.defaults_path else None
    remote = f"{STAGING}/{bk.backup_id}"
    heartbeat({"step": "upload backup"})
    with tempfile.TemporaryDirectory(prefix="zerodown-staging-") as tmp:
        local = os.path.join(tmp, "app.tar")
        with open(local, "wb") as fh:
            fh.write(tar)
        await _staging_sh(st, f"umask 077 && mkdir -p {_q(STAGING)}", "creating the staging folder")
        await ssh.put_file(st.ssh, local, f"{remote}.tar")
    if defaults is not None:
        await ssh.put_bytes(st.ssh, defaults, f"{remote}.defaults.tar", mode=0o600)
    heartbeat({"step": "extract"})
    await _staging_sh(
        st,
        f"""set -e
APP={_q(st.app_dir)}
rm -rf "$APP.tmp"; mkdir -p "$APP.tmp"
tar -C "$APP.tmp" --no-same-owner -xf {_q(remote + ".tar")}
rm -rf "$APP"; mv "$APP.tmp" "$APP"
"""
        + (
            f"""mkdir -p {_q(ZD)} && tar -C {_q(ZD)} --no-same-owner -xf {_q(remote + ".defaults.tar")}
"""
            if defaults is not None
            else ""
        ),
        "restoring the backup into the staging folder",
    )


@activity.defn
async def clear_staging(req: ClearStagingRequest) -> None:
    st = req.staging
    _check_app_dir(st.app_dir)
    if st.os == "windows":
        fs = SftpFiles(staging_node(st))
        await fs.remove_tree(st.app_dir)
        await fs.remove_tree(STAGING)
        await fs.makedirs(st.app_dir)
        return
    await _staging_sh(
        st,
        f"rm -rf {_q(st.app_dir)} {_q(STAGING)} && mkdir -p {_q(st.app_dir)}",
        "clearing the staging folder",
    )
