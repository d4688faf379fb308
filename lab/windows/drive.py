"""The Windows node's fake drive C: and what a session on it sees (WinEnv).

Layout (created idempotently by `ensure_layout`), rooted at `.lab/windows/<node>/C/`:

```
C:\\                                 .lab/windows/<node>/C/
C:\\inetpub\\wwwroot\\SecretServer   IS the node's app/ folder (a mount: node_dir/app)
C:\\Users\\zerodown                  IS the node's folder (a mount: node_dir), the home
C:\\Windows\\Temp, C:\\ProgramData    plain folders
```

The fake drive lives outside the node folder, so walking C:\\ never loops. Paths are
resolved lexically first (".." stops at the drive root, as Windows' GetFullPathName does),
then each component is looked up case-insensitively (NTFS is case-preserving but
case-insensitive), so nothing resolves outside the drive or its two mounts.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lab.windows import APP_DIR, HOME

if TYPE_CHECKING:
    from lab.windows.powershell import Interp


class DriveError(Exception):
    """A path that is not on this machine's drives (another letter, a UNC path, ...)."""


@dataclass(frozen=True)
class WinNode:
    """One Windows endpoint: a lab node (or the staging system) seen as a Windows server."""

    name: str  # the lab node's name (node1, staging)
    node_dir: Path  # the lab node folder: C:\Users\zerodown, ssh.log is written there
    root: Path  # .lab/windows/<name>
    app_port: int

    @property
    def drive_root(self) -> Path:
        return self.root / "C"

    @property
    def config_file(self) -> Path:
        return self.root / "iis.json"


def win(path: str) -> str:
    return path.replace("/", "\\")


class Drive:
    def __init__(self, node: WinNode) -> None:
        self.node = node
        self.root = node.drive_root
        # Longest first; keys are case-folded component tuples.
        self.mounts: list[tuple[tuple[str, ...], Path]] = sorted(
            [
                (_parts(win(APP_DIR)), node.node_dir / "app"),
                (_parts(win(HOME)), node.node_dir),
            ],
            key=lambda m: -len(m[0]),
        )

    # ------------------------------------------------------------------ names
    def normalize(self, path: str, cwd: str) -> str:
        """An absolute, canonical Windows path 'C:\\a\\b' for `path` (relative to `cwd`).

        Accepts C:\\x, C:/x, c:x (drive-relative), \\x (root of the current drive), and the
        Win32-OpenSSH SFTP form /C:/x (contrib/win32/win32compat/misc.c realpath: "/c:/x"
        loses its first '/')."""
        p = path.replace("/", "\\")
        if re.match(r"^\\[A-Za-z]:", p):
            p = p[1:]
        if p.startswith("\\\\"):
            raise DriveError(path)
        m = re.match(r"^([A-Za-z]):(.*)$", p)
        if m:
            if m.group(1).upper() != "C":
                raise DriveError(path)
            rest = m.group(2)
            if not rest.startswith("\\"):
                rest = _strip_drive(cwd) + "\\" + rest
        elif p.startswith("\\"):
            rest = p
        else:
            rest = _strip_drive(cwd) + "\\" + p
        out: list[str] = []
        for comp in rest.split("\\"):
            if comp in ("", "."):
                continue
            if comp == "..":
                if out:
                    out.pop()
                continue
            # Win32 drops trailing dots and spaces of a component (GetFullPathName).
            comp = comp.rstrip(". ") or comp
            out.append(comp)
        return "C:\\" + "\\".join(out)

    def local(self, winpath: str) -> Path:
        """The real path behind a canonical Windows path (see normalize)."""
        comps = [c for c in _strip_drive(winpath).split("\\") if c]
        folded = tuple(c.casefold() for c in comps)
        base, rest_from = self.root, 0
        for key, target in self.mounts:
            if folded[: len(key)] == key:
                base, rest_from = target, len(key)
                break
        cur = base
        for comp in comps[rest_from:]:
            cur = _child(cur, comp)
        return cur

    def to_win(self, parent_win: str, name: str) -> str:
        return parent_win.rstrip("\\") + "\\" + name

    # ------------------------------------------------------------------ queries
    def exists(self, winpath: str) -> bool:
        return self.local(winpath).exists()

    def is_dir(self, winpath: str) -> bool:
        return self.local(winpath).is_dir()

    def is_file(self, winpath: str) -> bool:
        return self.local(winpath).is_file()

    def listdir(self, winpath: str) -> list[str]:
        """A folder's entries (mount points included), in NTFS's order: by name, ignoring
        case (NTFS keeps directory entries in a B-tree of upcased names)."""
        local = self.local(winpath)
        names = {n.casefold(): n for n in os.listdir(local)}
        folded = tuple(c.casefold() for c in _strip_drive(winpath).split("\\") if c)
        for key, target in self.mounts:
            if len(key) == len(folded) + 1 and key[:-1] == folded:
                mount_name = _mount_name(key)
                names.pop(mount_name.casefold(), None)
                if target.exists():
                    names[mount_name.casefold()] = mount_name
        return [names[k] for k in sorted(names, key=lambda k: k.upper())]

    def is_mount(self, winpath: str) -> bool:
        folded = tuple(c.casefold() for c in _strip_drive(winpath).split("\\") if c)
        return any(folded == key for key, _ in self.mounts)


def _mount_name(key: tuple[str, ...]) -> str:
    for full in (APP_DIR, HOME):
        parts = win(full).split("\\")[1:]
        if tuple(p.casefold() for p in parts) == key:
            return parts[-1]
    return key[-1]


def _parts(path: str) -> tuple[str, ...]:
    return tuple(c.casefold() for c in _strip_drive(path).split("\\") if c)


def _strip_drive(path: str) -> str:
    p = path.replace("/", "\\")
    if re.match(r"^[A-Za-z]:", p):
        p = p[2:]
    return p.rstrip("\\")


def _child(folder: Path, name: str) -> Path:
    exact = folder / name
    if exact.exists() or exact.is_symlink():
        return exact
    try:
        for entry in os.listdir(folder):
            if entry.casefold() == name.casefold():
                return folder / entry
    except OSError:
        pass
    return exact


def ensure_layout(node: WinNode) -> None:
    """The fake drive's folders (idempotent): the mount points' parents and a few system
    folders; the mounts themselves are the node's folders."""
    for sub in ("inetpub/wwwroot", "Users", "Windows/Temp", "ProgramData", "Program Files"):
        (node.drive_root / sub).mkdir(parents=True, exist_ok=True)
    node.node_dir.mkdir(parents=True, exist_ok=True)


class WinEnv:
    """What a PowerShell / cmd session on a Windows node sees."""

    home = "C:\\Users\\zerodown"

    def __init__(self, node: WinNode) -> None:
        self.node = node
        self.drive = Drive(node)

    @property
    def computer_name(self) -> str:
        return self.node.name.upper()

    def config(self) -> dict[str, Any]:
        from lab.windows.state import read_config

        return read_config(self.node)

    @property
    def os_version_full(self) -> str:
        return str(self.config()["system"]["version"]) + ".0"

    def environment(self) -> dict[str, str]:
        """$env: (case-insensitive names, folded)."""
        env = {
            "COMPUTERNAME": self.computer_name,
            "USERNAME": "zerodown",
            "USERDOMAIN": self.computer_name,
            "USERPROFILE": self.home,
            "HOMEDRIVE": "C:",
            "HOMEPATH": "\\Users\\zerodown",
            "SystemRoot": "C:\\Windows",
            "windir": "C:\\Windows",
            "SystemDrive": "C:",
            "TEMP": self.home + "\\AppData\\Local\\Temp",
            "TMP": self.home + "\\AppData\\Local\\Temp",
            "ProgramData": "C:\\ProgramData",
            "ProgramFiles": "C:\\Program Files",
            "OS": "Windows_NT",
            "PROCESSOR_ARCHITECTURE": "AMD64",
            "PATHEXT": ".COM;.EXE;.BAT;.CMD;.VBS;.VBE;.JS;.JSE;.WSF;.WSH;.MSC;.CPL",
            "Path": "C:\\Windows\\system32;C:\\Windows;C:\\Windows\\System32\\Wbem;"
            "C:\\Windows\\System32\\WindowsPowerShell\\v1.0\\;C:\\Windows\\System32\\OpenSSH\\",
            "PSModulePath": "C:\\Users\\zerodown\\Documents\\WindowsPowerShell\\Modules;C:\\Program Files\\"
            "WindowsPowerShell\\Modules;C:\\Windows\\system32\\WindowsPowerShell\\v1.0\\Modules",
        }
        return {k.casefold(): v for k, v in env.items()}

    def out_file(self, rt: Interp, path: str, lines: list[str], append: bool) -> None:
        """`> file` / `>> file`: Out-File, which in Windows PowerShell 5.1 writes UTF-16LE
        with a BOM (about_Redirection 5.1: "the redirection operators ... use the Out-File
        cmdlet"; Out-File -Encoding default "Unicode")."""
        target = self.drive.local(self.drive.normalize(path, rt.cwd))
        data = "".join(line + "\r\n" for line in lines)
        if append and target.exists():
            with open(target, "ab") as f:
                f.write(data.encode("utf-16-le"))
        else:
            target.write_bytes(b"\xff\xfe" + data.encode("utf-16-le"))

    def free_used(self) -> tuple[int, int]:
        st = shutil.disk_usage(self.node.drive_root)
        return st.free, st.used
