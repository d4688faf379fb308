"""A node's files, the same on every OS: SFTP, with PowerShell where it is much faster.

Win32-OpenSSH serves SFTP with drive paths (`C:/inetpub/wwwroot/SecretServer`) and resolves
relative paths against the login user's home, as OpenSSH does on Linux; so one SFTP
implementation (`SftpFiles`) lists, hashes, copies, renames and removes on any node.
`PowerShellFiles` keeps it and replaces the steps that move every byte through the worker
with work done on the node itself: hashing (Get-FileHash), copying within the node
(Copy-Item) and unpacking a zip (Expand-Archive). Both give the same results, and
tests/test_nodefs.py holds them to it (and to the Linux shell path of
activities/deploy/appfolder.py, which Linux nodes keep).

Paths are the node's: absolute drive paths or relative to the login directory; relative
file names inside a folder always use '/'.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import posixpath
import stat
import zipfile
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

import asyncssh

from activities import powershell, ssh
from activities.common import fail, heartbeat
from errors import SSH_COMMAND_FAILED, SSH_UNREACHABLE
from inventory.model import Node

_CHUNK = 1 << 20
# Files hashed or copied at once over one SFTP session (its requests are pipelined).
_PARALLEL = 8


@dataclass(frozen=True)
class Listing:
    """A folder's content: relative file name -> size, and its sub-folders."""

    files: dict[str, int] = field(default_factory=dict)
    dirs: frozenset[str] = frozenset()


def _sftp_error(node: Node, what: str, e: Exception) -> None:
    if isinstance(e, asyncssh.SFTPError):
        fail(SSH_COMMAND_FAILED, f"node {node.name}: sftp {what}: {e.reason}", cause=e)
    fail(SSH_UNREACHABLE, f"node {node.name}: sftp {what}: {e}", retryable=True, cause=e)


def split_drive(path: str) -> tuple[str, str]:
    """('C:/', 'inetpub/wwwroot') for a drive path, ('', path) for anything else."""
    if len(path) >= 3 and path[1] == ":" and path[2] in "/\\" and path[0].isalpha():
        return path[:2] + "/", path[3:]
    if path.startswith("/"):
        return "/", path[1:]
    return "", path


class SftpFiles:
    """Every file step over one SFTP session per call (open with `session()`)."""

    def __init__(self, node: Node) -> None:
        self.node = node

    # ------------------------------------------------------------------ plumbing

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[asyncssh.SFTPClient]:
        sftp = await ssh._sftp(self.node.ssh)
        try:
            yield sftp
        except (asyncssh.SFTPError, *ssh._STALE) as e:
            _sftp_error(self.node, "session", e)
        finally:
            sftp.exit()

    async def _makedirs(self, sftp: asyncssh.SFTPClient, path: str) -> None:
        """mkdir -p that never stats a bare drive (`C:`), which Windows servers refuse."""
        root, rest = split_drive(path)
        current = root
        for part in (p for p in rest.split("/") if p and p != "."):
            current = current + part if current.endswith("/") or not current else f"{current}/{part}"
            try:
                attrs = await sftp.stat(current)
            except asyncssh.SFTPNoSuchFile:
                try:
                    await sftp.mkdir(current)
                except asyncssh.SFTPFailure:
                    # Another attempt created it meanwhile.
                    if not await sftp.isdir(current):
                        raise
                continue
            if attrs.type != asyncssh.FILEXFER_TYPE_DIRECTORY:
                fail(SSH_COMMAND_FAILED, f"node {self.node.name}: {current} exists and is not a folder")

    async def makedirs(self, path: str) -> None:
        async with self.session() as sftp:
            await self._makedirs(sftp, path)

    # ------------------------------------------------------------------ reading

    async def listing(self, folder: str) -> Listing:
        """Every file (with its size) and folder below `folder`; empty when it is missing."""
        files: dict[str, int] = {}
        dirs: set[str] = set()
        async with self.session() as sftp:
            if not await sftp.isdir(folder):
                return Listing()
            pending = [""]
            while pending:
                rel = pending.pop()
                for entry in await sftp.readdir(posixpath.join(folder, rel) if rel else folder):
                    name = entry.filename if isinstance(entry.filename, str) else entry.filename.decode()
                    if name in (".", ".."):
                        continue
                    child = f"{rel}/{name}" if rel else name
                    kind = entry.attrs.type
                    if kind == asyncssh.FILEXFER_TYPE_UNKNOWN and entry.attrs.permissions is not None:
                        kind = (
                            asyncssh.FILEXFER_TYPE_DIRECTORY
                            if stat.S_ISDIR(entry.attrs.permissions)
                            else asyncssh.FILEXFER_TYPE_REGULAR
                        )
                    if kind == asyncssh.FILEXFER_TYPE_DIRECTORY:
                        dirs.add(child)
                        pending.append(child)
                    elif kind == asyncssh.FILEXFER_TYPE_REGULAR:
                        files[child] = entry.attrs.size or 0
        return Listing(files=files, dirs=frozenset(dirs))

    async def _hash(self, sftp: asyncssh.SFTPClient, path: str) -> str:
        digest = hashlib.sha256()
        async with sftp.open(path, "rb") as f:
            while chunk := await f.read(_CHUNK):
                digest.update(chunk if isinstance(chunk, bytes) else chunk.encode())
        return digest.hexdigest()

    async def manifest(self, folder: str) -> dict[str, str]:
        """sha256 of every file below `folder` (relative name -> hex digest)."""
        listing = await self.listing(folder)
        out: dict[str, str] = {}
        names = sorted(listing.files)
        async with self.session() as sftp:
            for start in range(0, len(names), _PARALLEL):
                batch = names[start : start + _PARALLEL]
                digests = await asyncio.gather(*(self._hash(sftp, f"{folder}/{n}") for n in batch))
                out.update(zip(batch, digests, strict=True))
                heartbeat({"node": self.node.name, "hashed": len(out), "of": len(names)})
        return out

    async def download_tree(self, folder: str) -> dict[str, bytes]:
        """Every file below `folder` with its content (relative name -> bytes)."""
        listing = await self.listing(folder)
        out: dict[str, bytes] = {}
        async with self.session() as sftp:
            for name in sorted(listing.files):
                async with sftp.open(f"{folder}/{name}", "rb") as f:
                    data = await f.read()
                out[name] = data if isinstance(data, bytes) else data.encode()
        return out

    async def sha256(self, path: str) -> str:
        """The file's sha256, "" when there is no such file."""
        async with self.session() as sftp:
            try:
                return await self._hash(sftp, path)
            except asyncssh.SFTPNoSuchFile:
                return ""

    async def exists(self, path: str) -> bool:
        async with self.session() as sftp:
            return bool(await sftp.exists(path))

    async def is_file(self, path: str) -> bool:
        async with self.session() as sftp:
            return bool(await sftp.isfile(path))

    # ------------------------------------------------------------------ writing

    async def _copy(self, sftp: asyncssh.SFTPClient, src: str, dst: str) -> None:
        async with sftp.open(src, "rb") as r, sftp.open(dst, "wb") as w:
            while chunk := await r.read(_CHUNK):
                await w.write(chunk)

    async def copy_files(self, src: str, dst: str, names: Iterable[str], dirs: Iterable[str] = ()) -> None:
        """Copy `names` (relative files) from folder `src` into folder `dst`, overwriting, and
        create the folders `dirs` (relative) there, parents included."""
        names = sorted(names)
        async with self.session() as sftp:
            wanted = {posixpath.dirname(n) for n in names} | set(dirs)
            for d in sorted(wanted, key=lambda d: d.count("/")):
                await self._makedirs(sftp, f"{dst}/{d}" if d else dst)
            for start in range(0, len(names), _PARALLEL):
                batch = names[start : start + _PARALLEL]
                await asyncio.gather(*(self._copy(sftp, f"{src}/{n}", f"{dst}/{n}") for n in batch))
                heartbeat({"node": self.node.name, "copied": start + len(batch), "of": len(names)})

    async def upload_tree(self, files: dict[str, bytes], dst: str) -> None:
        """Write `files` (relative name -> content) into folder `dst`."""
        async with self.session() as sftp:
            for d in sorted({posixpath.dirname(n) for n in files} | {""}, key=lambda d: d.count("/")):
                await self._makedirs(sftp, f"{dst}/{d}" if d else dst)
            for name, data in sorted(files.items()):
                async with sftp.open(f"{dst}/{name}", "wb") as w:
                    await w.write(data)

    async def extract_zip(self, local_zip: str, remote_zip: str, dst: str) -> None:
        """Unpack the package (`local_zip` on the worker, its uploaded copy `remote_zip` on the
        node) into the empty folder `dst`: here from the worker's copy, member by member."""
        del remote_zip  # the SFTP path never needs the node's copy

        def read() -> dict[str, bytes]:
            with zipfile.ZipFile(local_zip) as z:
                return {i.filename: z.read(i) for i in z.infolist() if not i.is_dir()}

        await self.upload_tree(await asyncio.to_thread(read), dst)

    async def remove_files(self, folder: str, names: Iterable[str]) -> None:
        """Remove files below `folder`; a file already gone is fine."""
        async with self.session() as sftp:
            for n in names:
                with contextlib.suppress(asyncssh.SFTPNoSuchFile):
                    await sftp.remove(f"{folder}/{n}" if folder else n)

    async def remove_dirs(self, folder: str, names: Iterable[str]) -> None:
        """Remove empty folders below `folder`, deepest first; one that is not empty stays."""
        async with self.session() as sftp:
            for n in sorted(names, key=lambda d: d.count("/"), reverse=True):
                with contextlib.suppress(asyncssh.SFTPNoSuchFile, asyncssh.SFTPFailure):
                    await sftp.rmdir(f"{folder}/{n}")

    async def remove_tree(self, path: str) -> None:
        """Remove a folder and everything in it (or a file); nothing there is fine."""
        async with self.session() as sftp:
            if await sftp.isfile(path):
                await sftp.remove(path)
                return
        listing = await self.listing(path)
        await self.remove_files(path, listing.files)
        await self.remove_dirs(path, listing.dirs)
        async with self.session() as sftp:
            with contextlib.suppress(asyncssh.SFTPNoSuchFile):
                await sftp.rmdir(path)

    async def rename(self, src: str, dst: str) -> None:
        """Rename within the node; `dst` must not exist (Windows' MoveFile semantics)."""
        async with self.session() as sftp:
            await sftp.rename(src, dst)


class PowerShellFiles(SftpFiles):
    """SftpFiles with hashing, copying and unpacking done by PowerShell on the node."""

    async def manifest(self, folder: str) -> dict[str, str]:
        # Get-Item gives the folder's full name as Get-ChildItem spells its children's
        # (C:\...), so the relative name is what follows it; '|' cannot be in a file name.
        res = await powershell.run(
            self.node.ssh,
            f"$root = (Get-Item -LiteralPath {powershell.quote(folder)}).FullName.TrimEnd('\\'); "
            "Get-ChildItem -LiteralPath $root -Recurse -File -Force | ForEach-Object { "
            "(Get-FileHash -LiteralPath $_.FullName -Algorithm SHA256).Hash + '|' + "
            "$_.FullName.Substring($root.Length + 1) }",
            what=f"hashing {folder}",
            timeout_s=900.0,
        )
        out: dict[str, str] = {}
        for line in res.stdout.splitlines():
            digest, sep, name = line.partition("|")
            if sep:
                out[name.replace("\\", "/")] = digest.lower()
        return out

    async def sha256(self, path: str) -> str:
        res = await powershell.run(
            self.node.ssh,
            f"$p = {powershell.quote(path)}; "
            "if (Test-Path -LiteralPath $p -PathType Leaf) { "
            "(Get-FileHash -LiteralPath $p -Algorithm SHA256).Hash }",
            what=f"hashing {path}",
            timeout_s=900.0,
        )
        return res.stdout.strip().lower()

    async def copy_files(self, src: str, dst: str, names: Iterable[str], dirs: Iterable[str] = ()) -> None:
        # The list goes in a file (UTF-8, one name per line, folders ending in '/'): cmd.exe
        # limits the command line to 8191 characters.
        entries = [f"{d}/" for d in sorted(set(dirs)) if d] + sorted(names)
        if not entries:
            await self.makedirs(dst)
            return
        listfile = f"{dst.rstrip('/')}.zerodown-copy-list"
        async with self.session() as sftp:
            await self._makedirs(sftp, posixpath.dirname(listfile) or ".")
            async with sftp.open(listfile, "wb") as w:
                await w.write(("\n".join(entries) + "\n").encode("utf-8"))
        await powershell.run(
            self.node.ssh,
            f"$s = {powershell.quote(src)}; $d = {powershell.quote(dst)}; "
            f"$list = {powershell.quote(listfile)}; "
            "New-Item -ItemType Directory -Force -Path $d | Out-Null; "
            "Get-Content -LiteralPath $list -Encoding UTF8 | Where-Object { $_ } | ForEach-Object { "
            "$t = Join-Path $d $_; "
            "if ($_.EndsWith('/')) { New-Item -ItemType Directory -Force -Path $t | Out-Null } "
            "else { $parent = Split-Path -Parent $t; "
            "if (-not (Test-Path -LiteralPath $parent)) { "
            "New-Item -ItemType Directory -Force -Path $parent | Out-Null }; "
            "Copy-Item -LiteralPath (Join-Path $s $_) -Destination $t -Force } }; "
            "Remove-Item -LiteralPath $list -Force",
            what=f"copying {len(entries)} entries from {src} to {dst}",
            timeout_s=900.0,
        )

    async def extract_zip(self, local_zip: str, remote_zip: str, dst: str) -> None:
        del local_zip
        await powershell.run(
            self.node.ssh,
            f"Expand-Archive -LiteralPath {powershell.quote(remote_zip)} "
            f"-DestinationPath {powershell.quote(dst)} -Force",
            what=f"unpacking {remote_zip}",
            timeout_s=900.0,
        )


def files_of(node: Node, fast: bool = True) -> SftpFiles:
    """How zerodown touches this node's files: PowerShell-assisted on Windows (fast=False:
    plain SFTP, the path kept for servers without PowerShell and for tests), SFTP elsewhere."""
    return PowerShellFiles(node) if node.os == "windows" and fast else SftpFiles(node)
