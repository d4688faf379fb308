"""SFTP as Win32-OpenSSH's sftp-server serves it (PowerShell/openssh-portable sftp-server.c
with contrib/win32/win32compat/misc.c, fileio.c, win32_dirent.c):

* paths: `C:/x`, `C:\\x`, `/C:/x` (realpath drops the '/' before a drive letter), `/x`
  (the current drive's root: _wfullpath), relative paths against the home; drive letters in
  any case. realpath answers "/" + the full path with forward slashes, so "." is
  "/C:/Users/zerodown"; it does not check that the path exists (_wfullpath does not);
  "/" and "/x:/.." are "/" (the drive list).
* listing "/" lists the drives (opendir("/") -> openrootdir: GetLogicalDriveStrings): "C:".
* SSH_FXP_RENAME (process_rename): a regular file is renamed by CreateHardLink + unlink, so an
  existing target fails (SSH_FX_FAILURE); a folder is renamed only when the target does not
  exist (else SSH_FX_FAILURE).
* posix-rename@openssh.com (w32_rename): an empty target folder is removed first, then
  MoveFileEx(MOVEFILE_REPLACE_EXISTING | MOVEFILE_COPY_ALLOWED): a file replaces a file; a
  folder onto a non-empty folder (or a file onto a folder) is ERROR_ACCESS_DENIED ->
  SSH_FX_PERMISSION_DENIED.
* remove of a folder: _wunlink -> EACCES -> SSH_FX_PERMISSION_DENIED; rmdir of a non-empty
  folder: SSH_FX_FAILURE; symlink: creating symbolic links needs a privilege a normal user
  lacks (ERROR_PRIVILEGE_NOT_HELD -> EACCES).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import AsyncIterator

import asyncssh
from asyncssh import SFTPAttrs, SFTPName

from lab.windows import HOME
from lab.windows.drive import Drive, DriveError, WinNode


class WinSFTPServer(asyncssh.SFTPServer):
    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], node: WinNode) -> None:
        super().__init__(chan)
        self._drive = Drive(node)
        self._home = HOME.replace("/", "\\")

    # ------------------------------------------------------------------ paths
    def _win(self, path: bytes) -> str:
        text = path.decode("utf-8", errors="surrogateescape")
        try:
            return self._drive.normalize(text or ".", self._home)
        except DriveError:
            raise asyncssh.SFTPNoSuchFile("No such file") from None

    @staticmethod
    def _is_root(path: bytes) -> bool:
        text = path.decode("utf-8", errors="replace")
        return text in ("/", "\\") or re.fullmatch(r"[/\\][A-Za-z]:[/\\]\.\.", text) is not None

    def map_path(self, path: bytes) -> bytes:
        if self._is_root(path):
            raise asyncssh.SFTPNoSuchFile("No such file")
        return os.fsencode(self._drive.local(self._win(path)))

    def reverse_map_path(self, path: bytes) -> bytes:  # only used by asyncssh's defaults
        raise asyncssh.SFTPNoSuchFile("No such file")

    def realpath(self, path: bytes) -> bytes:
        if self._is_root(path):
            return b"/"
        return ("/" + self._win(path).replace("\\", "/")).encode("utf-8")

    # ------------------------------------------------------------------ listing
    async def scandir(self, path: bytes) -> AsyncIterator[SFTPName]:
        if self._is_root(path):
            attrs = SFTPAttrs.from_local(os.stat(self._drive.root))
            yield SFTPName(b"C:", attrs=attrs)
            return
        win = self._win(path)
        local = self._drive.local(win)
        if not local.is_dir():
            raise (
                asyncssh.SFTPNoSuchFile("No such file")
                if not local.exists()
                else asyncssh.SFTPFailure("Not a directory")
            )
        for dots in (b".", b".."):
            yield SFTPName(dots, attrs=SFTPAttrs.from_local(os.stat(local)))
        for name in self._drive.listdir(win):
            try:
                st = os.lstat(self._drive.local(self._drive.to_win(win, name)))
            except OSError:
                continue
            yield SFTPName(name.encode("utf-8"), attrs=SFTPAttrs.from_local(st))

    def stat(self, path: bytes) -> os.stat_result:
        if self._is_root(path):
            raise asyncssh.SFTPNoSuchFile("No such file")
        return os.stat(self.map_path(path))

    def lstat(self, path: bytes) -> os.stat_result:
        if self._is_root(path):
            raise asyncssh.SFTPNoSuchFile("No such file")
        return os.lstat(self.map_path(path))

    # ------------------------------------------------------------------ changes
    def remove(self, path: bytes) -> None:
        local = self.map_path(path)
        if os.path.isdir(local) and not os.path.islink(local):
            raise asyncssh.SFTPPermissionDenied("Permission denied")
        os.unlink(local)

    def rmdir(self, path: bytes) -> None:
        local = self.map_path(path)
        try:
            os.rmdir(local)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise asyncssh.SFTPFailure("Failure") from None
            raise

    def rename(self, oldpath: bytes, newpath: bytes) -> None:
        old, new = self.map_path(oldpath), self.map_path(newpath)
        st = os.lstat(old)  # ENOENT -> no such file
        if os.path.isfile(old) and not os.path.islink(old):
            if os.path.lexists(new):
                raise asyncssh.SFTPFailure("Failure")  # CreateHardLink: ERROR_ALREADY_EXISTS
            os.link(old, new)
            os.unlink(old)
            return
        del st
        if os.path.lexists(new):
            raise asyncssh.SFTPFailure("Failure")
        os.rename(old, new)

    def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        old, new = self.map_path(oldpath), self.map_path(newpath)
        if not os.path.lexists(old):
            raise asyncssh.SFTPNoSuchFile("No such file")
        if os.path.isdir(old) and os.path.isdir(new) and not os.listdir(new):
            os.rmdir(new)
        if os.path.isdir(new):
            raise asyncssh.SFTPPermissionDenied("Permission denied")  # MoveFileEx: ERROR_ACCESS_DENIED
        if os.path.isdir(old) and os.path.exists(new):
            raise asyncssh.SFTPPermissionDenied("Permission denied")
        os.replace(old, new)

    def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        raise asyncssh.SFTPPermissionDenied("Permission denied")

    def link(self, oldpath: bytes, newpath: bytes) -> None:
        old, new = self.map_path(oldpath), self.map_path(newpath)
        if os.path.lexists(new):
            raise asyncssh.SFTPFailure("Failure")
        os.link(old, new)

    def readlink(self, path: bytes) -> bytes:
        raise asyncssh.SFTPNoSuchFile("No such file")
