"""Release packages and the node's application folder: inspect, back up, deploy, restore.

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
import contextlib
import difflib
import functools
import hashlib
import json
import os
import posixpath
import re
import shlex
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass, field

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities import ssh
from activities.common import (
    BACKUP_CONFLICT,
    BACKUP_CORRUPT,
    BACKUP_INCONSISTENT,
    DEPLOY_VERIFICATION_FAILED,
    INVALID_REQUEST,
    MERGE_UNSUPPORTED,
    PACKAGE_CORRUPT,
    PACKAGE_MISSING,
    PROTECTED_FILE_CHANGED,
    PROTECTED_FILE_MISSING,
    RESTORE_VERIFICATION_FAILED,
    SSH_COMMAND_FAILED,
    VERSION_NOT_NEWER,
    check_id,
    fail,
    heartbeat,
    sha256_file,
    with_heartbeat,
)
from workflows.inventory import Node

ZD = ".zerodown"
BACKUPS = f"{ZD}/backups"
RELEASES = f"{ZD}/releases"
DEFAULTS = f"{ZD}/defaults"
# Long node-side operations (tar of a big folder); run() heartbeats meanwhile.
CMD_TIMEOUT_S = 900.0
_q = shlex.quote


# =========================================================================== versions


def parse_version(v: str) -> tuple[int, ...]:
    """'2.0.1' -> (2, 0, 1); a leading 'v' is accepted. ValueError otherwise."""
    s = v.strip()
    if s[:1] in ("v", "V"):
        s = s[1:]
    if not re.fullmatch(r"\d+(\.\d+)*", s):
        raise ValueError(f"not a dotted numeric version: {v!r}")
    return tuple(int(p) for p in s.split("."))


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as a <, ==, > b; missing trailing parts count as 0 ('2.0' == '2.0.0')."""
    pa, pb = parse_version(a), parse_version(b)
    n = max(len(pa), len(pb))
    pa, pb = pa + (0,) * (n - len(pa)), pb + (0,) * (n - len(pb))
    return (pa > pb) - (pa < pb)


@dataclass(frozen=True)
class VersionGuardVerdict:
    ok: bool
    reason: str
    # The versions to install, in this order, before this package can be (ascending).
    install_first: tuple[str, ...]


def _ascending_unique(versions: list[str]) -> tuple[str, ...]:
    """Sorted ascending; '2.0' and '2.0.0' are one version (the first spelling is kept)."""
    out: list[str] = []
    for v in sorted(versions, key=functools.cmp_to_key(compare_versions)):
        if not out or compare_versions(out[-1], v) != 0:
            out.append(v)
    return tuple(out)


def version_guard(running: str, package: PackageInfo) -> VersionGuardVerdict:
    """The seed's "Version Guard": may `package` be installed over `running`?

    Pure and deterministic (workflows call it directly). Refused when the package is not
    newer than what runs, or when the upgrade path passes through versions that must be
    installed first: the package's `min_upgrade_from` (when `running` is older) and every
    `requires` version between `running` and the package. Never raises: invalid versions
    give a refusal whose reason names them.
    """
    what = f"{package.name} {package.version}"
    try:
        for v in (running, package.version, *((package.min_upgrade_from,) if package.min_upgrade_from
                                             else ()), *package.requires):
            parse_version(v)
    except (ValueError, AttributeError) as e:
        return VersionGuardVerdict(ok=False, reason=f"Version Guard: cannot check {what} against "
                                                    f"{running!r}: {e}", install_first=())
    if compare_versions(package.version, running) <= 0:
        return VersionGuardVerdict(ok=False, reason=f"Version Guard: {what} is not newer than the "
                                                    f"running version {running}", install_first=())
    first: list[str] = []
    why: list[str] = []
    if package.min_upgrade_from and compare_versions(running, package.min_upgrade_from) < 0:
        first.append(package.min_upgrade_from)
        why.append(f"it upgrades from {package.min_upgrade_from} or later")
    needed = [v for v in package.requires
              if compare_versions(running, v) < 0 and compare_versions(v, package.version) < 0]
    if needed:
        first.extend(needed)
        why.append(f"it requires {', '.join(_ascending_unique(needed))} installed before it")
    if not first:
        return VersionGuardVerdict(ok=True, reason=f"Version Guard: {what} can upgrade {running}",
                                   install_first=())
    steps = _ascending_unique(first)
    order = ", then ".join((f"{steps[0]} first", *steps[1:], package.version))
    return VersionGuardVerdict(
        ok=False, install_first=steps,
        reason=f"Version Guard: {what} cannot upgrade {running}; install {order} ({'; '.join(why)})")


# =========================================================================== packages


@dataclass(frozen=True)
class MigrationSpec:
    version: int
    up_sql: str
    down_sql: str
    destructive: bool = False


@dataclass(frozen=True)
class PackageInfo:
    path: str
    sha256: str
    name: str
    version: str
    min_upgrade_from: str
    schema_version: int
    migrations: tuple[MigrationSpec, ...]
    files: int
    size: int = 0
    # Versions that must be installed before this one (release.json `requires`), ascending.
    requires: tuple[str, ...] = ()


def _corrupt(path: str, why: str) -> None:
    fail(PACKAGE_CORRUPT, f"package {path}: {why}")


def _safe_member(name: str) -> bool:
    if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or "\\" in name:
        return False
    return ".." not in name.split("/")


def inspect_package_file(path: str) -> PackageInfo:
    """Validate a release zip (ARCHITECTURE.md "Release packages") and describe it."""
    if not os.path.isfile(path):
        fail(PACKAGE_MISSING, f"package {path} does not exist")
    try:
        digest = sha256_file(path)
    except OSError as e:
        fail(PACKAGE_MISSING, f"package {path} is not readable: {e.strerror or e}")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        _corrupt(path, f"not a zip file ({e})")
    with zf:
        infos = zf.infolist()
        for info in infos:
            if not _safe_member(info.filename):
                _corrupt(path, f"unsafe member name {info.filename!r} (absolute or '..')")
            if stat.S_ISLNK(info.external_attr >> 16):
                _corrupt(path, f"member {info.filename!r} is a symbolic link")
        try:
            bad = zf.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            _corrupt(path, f"unreadable ({e})")
        if bad is not None:
            _corrupt(path, f"CRC check failed for member {bad!r}")
        names = {i.filename for i in infos}
        if "release.json" not in names:
            _corrupt(path, "no release.json at the root")
        try:
            release = json.loads(zf.read("release.json").decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            _corrupt(path, f"release.json is not valid JSON ({e})")
        if not isinstance(release, dict):
            _corrupt(path, "release.json must be a JSON object")

        def text(member: str, what: str) -> str:
            if member not in names:
                _corrupt(path, f"{what} names {member!r}, which is not in the package")
            try:
                return zf.read(member).decode("utf-8")
            except UnicodeDecodeError:
                _corrupt(path, f"{member} is not UTF-8 text")
            raise AssertionError("unreachable")

        name, version = release.get("name"), release.get("version")
        if not isinstance(name, str) or not name:
            _corrupt(path, "release.json: 'name' must be a non-empty string")
        if not isinstance(version, str):
            _corrupt(path, "release.json: 'version' must be a string like \"2.0.0\"")
        min_from = release.get("min_upgrade_from") or ""
        for key, v in (("version", version), ("min_upgrade_from", min_from)):
            if v:
                try:
                    parse_version(v)
                except (ValueError, AttributeError):
                    _corrupt(path, f"release.json: {key} {v!r} is not a dotted numeric version")
        if min_from and version and compare_versions(min_from, version) > 0:
            _corrupt(path, f"release.json: min_upgrade_from {min_from} is newer than version {version}")
        raw_requires = release.get("requires", [])
        if not isinstance(raw_requires, list):
            _corrupt(path, "release.json: requires must be a list of versions like [\"2.0.0\"]")
        for i, r in enumerate(raw_requires):
            try:
                parse_version(r)
            except (ValueError, AttributeError):
                _corrupt(path, f"release.json: requires[{i}] {r!r} is not a dotted numeric version")
            if version and compare_versions(r, version) >= 0:
                _corrupt(path, f"release.json: requires[{i}] {r} is not older than version {version}")
        schema = release.get("schema_version", 0)
        if isinstance(schema, bool) or not isinstance(schema, int) or schema < 0:
            _corrupt(path, f"release.json: schema_version must be an integer >= 0, got {schema!r}")
        raw_migrations = release.get("migrations", [])
        if not isinstance(raw_migrations, list):
            _corrupt(path, "release.json: migrations must be a list")
        migrations: list[MigrationSpec] = []
        for i, m in enumerate(raw_migrations):
            where = f"release.json: migrations[{i}]"
            if not isinstance(m, dict):
                _corrupt(path, f"{where} must be an object")
            mv = m.get("version")
            if isinstance(mv, bool) or not isinstance(mv, int):
                _corrupt(path, f"{where}.version must be an integer")
            if not isinstance(m.get("up"), str):
                _corrupt(path, f"{where}.up must name the up script")
            down = m.get("down")
            if down is not None and not isinstance(down, str):
                _corrupt(path, f"{where}.down must name the down script")
            migrations.append(MigrationSpec(
                version=mv, up_sql=text(m["up"], f"{where}.up"),
                down_sql=text(down, f"{where}.down") if down else "",
                destructive=bool(m.get("destructive", False))))
        versions = [m.version for m in migrations]
        if len(set(versions)) != len(versions):
            _corrupt(path, f"release.json: duplicate migration versions {versions}")
        files = sum(1 for i in infos if not i.is_dir())
    return PackageInfo(path=os.path.abspath(path), sha256=digest, name=name, version=version,
                       min_upgrade_from=min_from, schema_version=schema,
                       migrations=tuple(sorted(migrations, key=lambda m: m.version)), files=files,
                       size=os.path.getsize(path), requires=_ascending_unique(raw_requires))


# =========================================================================== config merge

_SECTION_RE = re.compile(r"^\s*\[([^\]]*)\]\s*$")
# A plain key (letters, digits, `_ . - :`), `=`, the value (may itself hold `=`).
_KV_RE = re.compile(r"^\s*([A-Za-z0-9_.:-]+)\s*=\s*(.*?)\s*$")
_BOM = "\ufeff"


class NotKeyValueError(ValueError):
    """A merge input is not a plain `key = value` file (the reason names a line, no value)."""


def _body(index: int, line: str) -> str:
    """The line without a UTF-8 byte order mark (only the first line can carry one)."""
    return line[1:] if index == 0 and line.startswith(_BOM) else line


@dataclass
class _Parsed:
    lines: list[str]
    # (section, key) -> (value, raw line)
    values: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    # (section, key) -> comment lines directly above the key
    comments: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    order: list[tuple[str, str]] = field(default_factory=list)


def _parse_kv(text: str) -> _Parsed:
    """Parse a `key = value` file (optional `[section]` lines, `#` / `;` comments).

    NotKeyValueError for any other line (XML such as `<add key="A" value="1" />`, a key
    with spaces or quotes, text without `=`) and for a key given twice in one section:
    merging such a file line by line would silently corrupt it.
    """
    p = _Parsed(lines=text.splitlines())
    section = ""
    pending: list[str] = []
    seen_at: dict[tuple[str, str], int] = {}
    for i, raw in enumerate(p.lines):
        line = _body(i, raw)
        s = line.strip()
        m = _SECTION_RE.match(line)
        if m:
            section, pending = m.group(1).strip(), []
            continue
        if not s:
            pending = []
            continue
        if s.startswith(("#", ";")):
            pending = [*pending, line]
            continue
        kv = _KV_RE.match(line)
        if not kv:
            hint = " (it looks like XML)" if s.startswith("<") else ""
            raise NotKeyValueError(f"line {i + 1} is not `key = value` with a plain key (letters, "
                                   f"digits, _ . - :){hint}")
        k = (section, kv.group(1))
        if k in seen_at:
            where = f"section [{section}]" if section else "the top of the file"
            raise NotKeyValueError(f"key {kv.group(1)!r} appears twice in {where} (lines "
                                   f"{seen_at[k]} and {i + 1})")
        seen_at[k] = i + 1
        p.order.append(k)
        p.values[k] = (kv.group(2), line)
        p.comments[k] = pending
        pending = []
    return p


@dataclass(frozen=True)
class MergeOutcome:
    text: str
    # unified diff new defaults -> merged (the carried-over lines, values included: it
    # stays on the node and never goes into an activity result)
    diff: tuple[str, ...]
    carried: tuple[str, ...]  # keys carried from the node ("section.key" inside sections)
    notes: tuple[str, ...]
    # keys whose default value differs between the recorded and the new defaults
    changed_defaults: tuple[str, ...] = ()


def _key_name(k: tuple[str, str]) -> str:
    return f"{k[0]}.{k[1]}" if k[0] else k[1]


def merge_config_detailed(node_text: str, old_defaults_text: str | None,
                          new_defaults_text: str, name: str = "the merge file") -> MergeOutcome:
    """Carry a node's customisations of a `key = value` file onto new defaults.

    Customised = keys whose value differs from the recorded old defaults, or that the node
    added. Without recorded defaults every key of the node that also exists in the new
    defaults keeps the node's value (we cannot tell defaults from customisations), keys
    only the node has are dropped and reported. Layout and comments of the new defaults
    are kept; a customised line keeps the node's spelling; keys the node added are
    appended to their section (with the comment lines above them on the node).

    MergeUnsupported (non-retryable) when any of the three texts is not a plain
    `key = value` file (see `_parse_kv`); the message names `name`, which text and the
    line, never a value.
    """
    parsed: list[_Parsed] = []
    for what, text in (("the node's copy", node_text), ("the recorded defaults", old_defaults_text),
                       ("the new package's defaults", new_defaults_text)):
        if text is None:
            continue
        try:
            parsed.append(_parse_kv(text))
        except NotKeyValueError as e:
            fail(MERGE_UNSUPPORTED,
                 f"{name} cannot be merged: merge_files must be `key = value` files, and in {what} "
                 f"{e}. Make it a `key = value` file, or list it under protected_files (kept as "
                 "it is on the node) instead of merge_files")
    node, new = parsed[0], parsed[-1]
    notes: list[str] = []
    changed_defaults: list[tuple[str, str]] = []
    if old_defaults_text is None:
        carried = [k for k in node.order if k in new.values]
        for k in node.order:
            if k not in new.values:
                notes.append(f"{_key_name(k)}: only on the node and no recorded defaults to tell "
                             "whether it is a customisation; not carried")
    else:
        old = parsed[1]
        carried = [k for k in node.order
                   if k not in old.values or old.values[k][0] != node.values[k][0]]
        for k in old.order:
            if k not in node.values and k in new.values:
                notes.append(f"{_key_name(k)}: removed on the node but present in the new defaults; "
                             "the new default is used")
        changed_defaults = [k for k in new.order if k in old.values and old.values[k][0] != new.values[k][0]]
        carried_here = set(carried)
        for k in changed_defaults:
            if k in carried_here:
                notes.append(f"{_key_name(k)}: customised on the node and its default changed in the "
                             "new release; the node's value is kept")
    carried_set = set(carried)

    out: list[str] = []
    section = ""
    first_section_at: int | None = None
    section_end: dict[str, int] = {"": 0}  # index in `out` after the section's last line
    for i, raw in enumerate(new.lines):
        line = _body(i, raw)
        bom = raw[: len(raw) - len(line)]
        m = _SECTION_RE.match(line)
        if m:
            section = m.group(1).strip()
            if first_section_at is None:
                first_section_at = len(out)
            out.append(raw)
            section_end[section] = len(out)
            continue
        kv = _KV_RE.match(line)
        key = (section, kv.group(1)) if kv else None
        out.append(bom + node.values[key][1] if key is not None and key in carried_set else raw)
        if line.strip():
            section_end[section] = len(out)
    if first_section_at is not None and section_end[""] > first_section_at:
        section_end[""] = first_section_at

    added = [k for k in carried if k not in new.values]
    # Insert per section, last insertion point first so earlier indexes stay valid.
    by_section: dict[str, list[tuple[str, str]]] = {}
    for k in added:
        by_section.setdefault(k[0], []).append(k)
    inserts: list[tuple[int, list[str]]] = []
    tail: list[str] = []
    for sec, keys in by_section.items():
        block: list[str] = []
        for k in keys:
            block.extend(c for c in node.comments.get(k, []) if c not in block)
            block.append(node.values[k][1])
        if sec in section_end:
            inserts.append((section_end[sec], block))
        else:
            tail.extend(["", f"[{sec}]", *block])
    for at, block in sorted(inserts, key=lambda x: x[0], reverse=True):
        out[at:at] = block
    out.extend(tail)

    newline = "\r\n" if "\r\n" in new_defaults_text else "\n"
    text = newline.join(out)
    if new_defaults_text.endswith(("\n", "\r")) or (not new_defaults_text and out):
        text += newline
    diff = tuple(difflib.unified_diff(new.lines, out, "new defaults", "merged", n=0, lineterm=""))
    changed = [k for k in carried if k not in new.values or new.values[k][0] != node.values[k][0]]
    return MergeOutcome(text=text, diff=diff, carried=tuple(_key_name(k) for k in changed),
                        notes=tuple(notes),
                        changed_defaults=tuple(_key_name(k) for k in changed_defaults))


def merge_config(node_text: str, old_defaults_text: str | None,
                 new_defaults_text: str) -> tuple[str, list[str]]:
    """(merged text, report lines): the report is the line diff new defaults -> merged."""
    m = merge_config_detailed(node_text, old_defaults_text, new_defaults_text)
    return m.text, list(m.diff)


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
            name = re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r", "\\": "\\"}.get(m.group(1),
                                                                                   m.group(1)), name)
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
        fail(BACKUP_INCONSISTENT, f"node {node.name}: {res.stderr.strip()}; retrying the backup",
             retryable=True)
    if res.exit_status != 0:
        fail(SSH_COMMAND_FAILED, f"node {node.name}: backup of {app} as {b}.tar exited with status "
                                 f"{res.exit_status}; stderr: {res.stderr.strip()[-1500:] or '(empty)'}")
    head, _, rest = res.stdout.partition("\n")
    manifest_text, _, rest = rest.partition(_CURRENT + "\n")
    current_text, _, tar_list = rest.partition(_TARLIST + "\n")
    manifest = parse_sha256sum(manifest_text)
    reused = head.strip() == "reused"
    if reused:
        differ = _manifest_difference(manifest, parse_sha256sum(current_text))
        if differ:
            fail(BACKUP_CONFLICT,
                 f"node {node.name}: backup {backup_id} already exists ({b}.tar) but differs from the "
                 f"application folder {app} as it is now ({len(differ)} file(s): "
                 f"{', '.join(differ[:10])}{', ...' if len(differ) > 10 else ''}); refusing to reuse "
                 "it as this folder's backup. Back up under a new id, or remove the old backup if it "
                 "is no longer needed")
    members = {m[2:] if m.startswith("./") else m for m in tar_list.split("\n") if m}
    protected: dict[str, str] = {}
    for p in protected_files:
        if p not in manifest:
            fail(PROTECTED_FILE_MISSING,
                 f"node {node.name}: protected file {p} is not in the application folder {app}; "
                 "refusing to continue without it")
        if p not in members:
            fail(PROTECTED_FILE_MISSING, f"node {node.name}: protected file {p} is missing from {b}.tar")
        protected[p] = manifest[p]
    return AppBackup(node=node, node_name=node.name, backup_id=backup_id, path=f"{b}.tar",
                     files=len(manifest), manifest=manifest, protected=protected,
                     defaults_path=f"{b}.defaults.tar", reused=reused)


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


def _zip_member(path: str, member: str) -> bytes | None:
    """A file of the (already inspected) package, or None when it has no such file."""
    want = posixpath.normpath(member)
    found: zipfile.ZipInfo | None = None
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():  # the last entry of a name wins, as when extracting
                if not info.is_dir() and posixpath.normpath(info.filename) == want:
                    found = info
            return zf.read(found) if found is not None else None
    except (zipfile.BadZipFile, OSError, KeyError, ValueError) as e:
        fail(PACKAGE_CORRUPT, f"package {path}: cannot read {member}: {e}")


def diff_path_for(release_id: str, merge_file: str) -> str:
    """Where the merge diff of `merge_file` for a release lives on the node."""
    return f"{RELEASES}/{release_id}.{merge_file.replace('/', '__')}.merge.diff"


@dataclass(frozen=True)
class _MergePlan:
    file: str
    new_defaults: bytes | None  # None: not in the package
    outcome: MergeOutcome | None  # None: nothing to merge
    report: MergeReport


async def _plan_merges(node: Node, package: PackageInfo, merge_files: tuple[str, ...],
                       release_id: str) -> list[_MergePlan]:
    """Read (only read) what each merge needs and merge in memory.

    Runs before anything is written to the node, so a file that cannot be merged
    (MergeUnsupported: not `key = value`, duplicate keys) stops the deploy with the node
    untouched.
    """
    plans: list[_MergePlan] = []
    for f in merge_files:
        new_bytes = await asyncio.to_thread(_zip_member, package.path, f)
        if new_bytes is None:
            plans.append(_MergePlan(f, None, None, MergeReport(
                file=f, carried=(), diff=(), had_recorded_defaults=False,
                notes=("not in the package: the node's file is left as it is",))))
            continue
        current = await ssh.get_file(node.ssh, posixpath.join(node.app_dir, f))
        old = await ssh.get_file(node.ssh, f"{DEFAULTS}/{f}") if current is not None else None
        label = f"node {node.name}: {f}"
        try:
            if current is None:
                # Nothing to carry, but a file that could never be merged is refused now
                # rather than on the next release.
                merge_config_detailed("", None, _decode(new_bytes), name=label)
                plans.append(_MergePlan(f, new_bytes, None, MergeReport(
                    file=f, carried=(), diff=(), had_recorded_defaults=False,
                    notes=("not on the node: the new defaults are installed",))))
                continue
            outcome = merge_config_detailed(_decode(current), _decode(old) if old is not None else None,
                                            _decode(new_bytes), name=label)
        except ApplicationError as e:
            if e.type == MERGE_UNSUPPORTED:
                fail(MERGE_UNSUPPORTED, f"{e.message}. Nothing was changed on the node "
                                        f"(release {release_id} not deployed)", cause=e)
            raise
        plans.append(_MergePlan(f, new_bytes, outcome, MergeReport(
            file=f, carried=outcome.carried, diff=(), had_recorded_defaults=old is not None,
            notes=outcome.notes, diff_path=diff_path_for(release_id, f) if outcome.diff else "",
            changed_defaults=outcome.changed_defaults)))
    return plans


async def deploy(node: Node, package: PackageInfo, protected_files: tuple[str, ...],
                 merge_files: tuple[str, ...], release_id: str) -> DeployResult:
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
    await _sh(node, f"umask 077 && mkdir -p {_q(RELEASES)} {_q(DEFAULTS)} && chmod 700 {_q(ZD)}",
              f"creating {ZD}")
    if await _remote_sha256(node, zip_remote) != package.sha256:
        await ssh.put_file(node.ssh, package.path, zip_remote)
        remote = await _remote_sha256(node, zip_remote)
        if remote != package.sha256:
            fail(DEPLOY_VERIFICATION_FAILED,
                 f"node {node.name}: uploaded {zip_remote} has sha256 {remote or '(none)'}, expected "
                 f"{package.sha256}", retryable=True)

    # 4. Stage: a fresh extraction every attempt (cheap, and the merge below edits it).
    #    The node's default umask on purpose: the modes land in the app folder.
    heartbeat({"node": node.name, "step": "extract"})
    await _sh(node, f"""set -e
R={_q(rel)}
rm -rf "$R.tmp"; mkdir -p "$R.tmp"
if command -v unzip >/dev/null 2>&1; then unzip -q -o "$R.zip" -d "$R.tmp"
else python3 -m zipfile -e "$R.zip" "$R.tmp"; fi
rm -rf "$R"; mv "$R.tmp" "$R"
""", f"extracting {zip_remote}")

    # 5. Merged configs into the staged tree; the diff (values!) into a private file next
    #    to it. The pristine defaults are recorded after success (step 9).
    pristine: dict[str, bytes] = {}
    for plan in plans:
        if plan.new_defaults is not None:
            pristine[plan.file] = plan.new_defaults
        if plan.outcome is None:
            continue
        await ssh.put_bytes(node.ssh, _encode(plan.outcome.text), f"{rel}/{plan.file}")
        diff_remote = diff_path_for(release_id, plan.file)
        if plan.outcome.diff:
            await ssh.put_bytes(node.ssh, _encode("\n".join(plan.outcome.diff) + "\n"), diff_remote,
                                mode=0o600)
        else:
            await _sh(node, f"rm -f {_q(diff_remote)}", f"removing a stale {diff_remote}")
    reports = [plan.report for plan in plans]

    # 6. Protected files never leave the stage: removed from it and excluded from the copy.
    if protected_files:
        await _sh(node, "rm -f -- " + " ".join(_q(f"{rel}/{p}") for p in protected_files),
                  "removing protected files from the staged release")
    staged = await folder_manifest(node, rel)
    before = await folder_manifest(node, app)
    protected_before = {p: before.get(p) for p in protected_files}

    # 7. Idempotence: the app folder already holds exactly the staged release.
    already = all(before.get(path) == digest for path, digest in staged.items())
    if not already:
        heartbeat({"node": node.name, "step": "copy", "files": len(staged)})
        excludes = " ".join(f"--exclude={_q('./' + p)}" for p in protected_files)
        await _sh(node, f"""set -e
R={_q(rel)}; APP={_q(app)}
mkdir -p "$APP"
tar -C "$R" --anchored --no-wildcards {excludes} -cf "$R.copy.tar" .
tar -C "$APP" --no-same-owner -xf "$R.copy.tar"
rm -f "$R.copy.tar"
""", f"copying the staged release into {app}")

    # 8. Verify: every staged file landed, no protected file changed.
    after = await folder_manifest(node, app)
    wrong = sorted(p for p, d in staged.items() if after.get(p) != d)
    if wrong:
        fail(DEPLOY_VERIFICATION_FAILED,
             f"node {node.name}: after copying, {len(wrong)} file(s) in {app} differ from release "
             f"{release_id}: {', '.join(wrong[:10])}")
    changed = sorted(p for p, d in protected_before.items() if after.get(p) != d)
    if changed:
        fail(PROTECTED_FILE_CHANGED,
             f"node {node.name}: protected file(s) changed by the deploy: {', '.join(changed)}")

    # 9. Record the new pristine defaults (after success only: the next merge compares
    #    against what this node now runs on).
    for f, data in pristine.items():
        await ssh.put_bytes(node.ssh, data, f"{DEFAULTS}/{f}")
    await ssh.put_bytes(node.ssh, _encode(json.dumps(
        {"release_id": release_id, "name": package.name, "version": package.version,
         "sha256": package.sha256}, indent=2) + "\n"), f"{ZD}/installed.json")
    return DeployResult(node_name=node.name, version=package.version,
                        files_written=0 if already else len(staged), merged=tuple(reports),
                        already_deployed=already, release_id=release_id)


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
    node, app = bk.node, bk.node.app_dir
    base = bk.path[:-4] if bk.path.endswith(".tar") else bk.path
    res = await ssh.run(node.ssh, f"test -f {_q(bk.path)} && echo ok || echo missing",
                        timeout_s=CMD_TIMEOUT_S)
    if res.stdout.strip() != "ok":
        fail(BACKUP_CORRUPT, f"node {node.name}: backup {bk.path} is gone; cannot restore {app}")
    current = await folder_manifest(node, app)
    protected = set(bk.protected)
    remove = sorted(p for p in current if p not in bk.manifest and p not in protected)
    extract = sorted(p for p, d in bk.manifest.items() if current.get(p) != d)
    if remove:
        await _put_list(node, remove, f"{base}.remove")
        await _sh(node, f"( cd {_q(app)} && xargs -0 -r rm -f -- ) < {_q(base + '.remove')}",
                  f"removing {len(remove)} file(s) that are not in backup {bk.backup_id}")
    if extract:
        await _put_list(node, [f"./{p}" for p in extract], f"{base}.extract")
        await _sh(node, f"tar -C {_q(app)} --no-same-owner -xf {_q(bk.path)} --null -T "
                        f"{_q(base + '.extract')}",
                  f"extracting {len(extract)} file(s) from {bk.path}")
    # Folders created after the backup (now empty) go too; tar lists the backup's folders.
    listing = await ssh.run(node.ssh, f"tar -tf {_q(bk.path)}; echo {_TARLIST}; cd {_q(app)} && "
                                      "find . -mindepth 1 -type d", timeout_s=CMD_TIMEOUT_S)
    in_tar, _, dirs_now = listing.stdout.partition(_TARLIST + "\n")
    tar_dirs = {m.rstrip("/") for m in in_tar.split("\n") if m.endswith("/")}
    extra_dirs = sorted((d for d in dirs_now.split("\n") if d and d not in tar_dirs),
                        key=lambda d: d.count("/"), reverse=True)
    if extra_dirs:
        await _put_list(node, extra_dirs, f"{base}.rmdir")
        await ssh.run(node.ssh, f"( cd {_q(app)} && xargs -0 -r rmdir -- ) < {_q(base + '.rmdir')} "
                                "2>/dev/null || true", timeout_s=CMD_TIMEOUT_S)
    if bk.defaults_path:
        await _sh(node, f"""set -e
if [ -f {_q(bk.defaults_path)} ]; then
  rm -rf {_q(DEFAULTS)} {_q(ZD)}/installed.json; mkdir -p {_q(ZD)}
  tar -C {_q(ZD)} --no-same-owner -xf {_q(bk.defaults_path)}
fi
rm -f {_q(base + '.remove')} {_q(base + '.extract')} {_q(base + '.rmdir')}
""", "restoring the recorded config defaults")
    after = await folder_manifest(node, app)
    if after != bk.manifest:
        diff = sorted(set(after) ^ set(bk.manifest) | {p for p in after if bk.manifest.get(p) != after[p]})
        fail(RESTORE_VERIFICATION_FAILED,
             f"node {node.name}: {app} differs from backup {bk.backup_id} after restore in "
             f"{len(diff)} file(s): {', '.join(diff[:10])}")
    return AppRestoreResult(node_name=node.name, backup_id=bk.backup_id, files=len(after),
                            rewritten=len(extract), removed=tuple(remove))


# =========================================================================== upgrade zip, SQL script

# 1980-01-01, the earliest date a zip entry can carry: fixed, so equal content gives equal bytes.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_SYSTEM_MEMBER = "release.json"


@dataclass(frozen=True)
class UpgradeZip:
    path: str  # on the worker: <out_dir>/<zip_id>.zip (mode 600)
    sha256: str
    size: int
    files: tuple[str, ...]  # the zip's members, sorted (release.json always among them)
    unchanged: int  # package files left out: the node already holds them byte for byte
    base_node: str  # the node whose application folder the difference was taken against
    reused: bool = False  # an identical zip was already at `path` (left as it was)


@dataclass(frozen=True)
class SqlScript:
    path: str  # on the worker: <out_dir>/<script_id>.sql (mode 600)
    sha256: str
    migrations: tuple[int, ...]  # the migration versions it runs, in order
    reused: bool = False


def _private_out_dir(directory: str) -> None:
    """Create `directory` mode 700, or tighten an existing one: zips hold the application's
    files and scripts its schema, neither is for other local users."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if stat.S_IMODE(os.stat(directory).st_mode) & 0o077:
            os.chmod(directory, 0o700)
    except OSError as e:
        fail(INVALID_REQUEST, f"output directory {directory} cannot be created or made private "
                              f"(mode 700): {e.strerror or e}")


def _publish(tmp: str, path: str) -> tuple[str, int, bool]:
    """Put the finished temporary file `tmp` at `path` atomically: (sha256, size, reused).

    When `path` already holds the same bytes (a retry, or the same inputs again) it is kept,
    mtime and all, and `tmp` is removed; other content is replaced, never appended to.
    """
    digest = sha256_file(tmp)
    try:
        same = os.path.isfile(path) and sha256_file(path) == digest
    except OSError:
        same = False
    if same:
        os.unlink(tmp)
        if stat.S_IMODE(os.stat(path).st_mode) & 0o077:
            os.chmod(path, 0o600)
        return digest, os.path.getsize(path), True
    os.replace(tmp, path)
    return digest, os.path.getsize(path), False


def _prepare_out(directory: str, name: str) -> tuple[str, str]:
    """(final path, an empty private temporary file beside it) in the private `directory`.
    mkstemp: mode 600 and a fresh name, so a concurrent or crashed attempt never shares it."""
    _private_out_dir(directory)
    path = os.path.join(os.path.abspath(directory), name)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    return path, tmp


async def _verify_package(package: PackageInfo) -> None:
    """The package file must still be the one inspected (its sha256 travels in PackageInfo)."""
    try:
        local_sha = await asyncio.to_thread(sha256_file, package.path)
    except OSError:
        fail(PACKAGE_MISSING, f"package {package.path} does not exist (or is unreadable)")
    if local_sha != package.sha256:
        fail(PACKAGE_CORRUPT, f"package {package.path} changed since it was inspected "
                              f"(sha256 {local_sha}, inspected {package.sha256})")


def _member_sha256(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> str:
    h = hashlib.sha256()
    with zf.open(info) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _member_mode(info: zipfile.ZipInfo) -> int:
    """The permission bits the package gives a member (0644 when it gives none), so an
    executable script stays executable when the upgrade zip is extracted."""
    mode = (info.external_attr >> 16) & 0o777 if info.create_system == 3 else 0
    return mode or 0o644


def _write_upgrade_zip(package_path: str, node_manifest: dict[str, str], protected: set[str],
                       merge: set[str], out: str) -> tuple[tuple[str, ...], int]:
    """Write the upgrade zip into `out`: (members, unchanged count). Deterministic: sorted
    entries, fixed dates, modes from the package, one compression setting."""
    with zipfile.ZipFile(package_path) as src:
        members: dict[str, zipfile.ZipInfo] = {}
        for info in src.infolist():  # the last entry of a name wins, as when extracting
            if not info.is_dir():
                members[posixpath.normpath(info.filename)] = info
        release = json.loads(src.read(members[_SYSTEM_MEMBER]).decode("utf-8"))
        referenced = {posixpath.normpath(m[k]) for m in release.get("migrations", []) or []
                      if isinstance(m, dict) for k in ("up", "down") if isinstance(m.get(k), str)}
        # Merge files are merged per node at deploy (their node copy never equals the
        # package's), migration scripts are read from the package by inspect_package.
        always = {_SYSTEM_MEMBER, *merge, *referenced}
        chosen: list[str] = []
        unchanged = 0
        for name in sorted(members):
            if name in protected:
                continue
            if name not in always and node_manifest.get(name) == _member_sha256(src, members[name]):
                unchanged += 1
                continue
            chosen.append(name)
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as dst:
            for name in chosen:
                info = members[name]
                entry = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
                entry.compress_type = zipfile.ZIP_DEFLATED
                entry.create_system = 3  # unix, so the permission bits are honoured
                entry.external_attr = (stat.S_IFREG | _member_mode(info)) << 16
                # Known up front, so zipfile decides on zip64 the same way every time.
                entry.file_size = info.file_size
                with src.open(info) as r, dst.open(entry, "w") as w:
                    shutil.copyfileobj(r, w, 1 << 20)
    return tuple(chosen), unchanged


async def build_zip(node: Node, package: PackageInfo, out_dir: str, zip_id: str,
                    protected_files: tuple[str, ...], merge_files: tuple[str, ...]) -> UpgradeZip:
    check_id("zip id", zip_id)
    for p in (*protected_files, *merge_files):
        _check_relpath("file", p)
    protected = {posixpath.normpath(p) for p in protected_files}
    if _SYSTEM_MEMBER in protected:
        fail(INVALID_REQUEST, f"{_SYSTEM_MEMBER} cannot be a protected file: every package needs it")
    await _verify_package(package)
    heartbeat({"node": node.name, "step": "manifest"})
    manifest = await folder_manifest(node, node.app_dir)
    path, tmp = await asyncio.to_thread(_prepare_out, out_dir, f"{zip_id}.zip")
    try:
        files, unchanged = await with_heartbeat(
            asyncio.to_thread(_write_upgrade_zip, package.path, manifest, protected,
                              {posixpath.normpath(m) for m in merge_files}, tmp),
            lambda: {"node": node.name, "step": "zip", "zip_id": zip_id})
        # The zip must itself be a valid package (deploy_package inspects nothing, the
        # workflow does): e.g. a migration script that is also a protected file is not.
        try:
            await asyncio.to_thread(inspect_package_file, tmp)
        except ApplicationError as e:
            fail(PACKAGE_CORRUPT, f"the upgrade zip {zip_id} built from {package.path} against node "
                                  f"{node.name} would not be a valid package: {e.message}", cause=e)
        digest, size, reused = await asyncio.to_thread(_publish, tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return UpgradeZip(path=path, sha256=digest, size=size, files=files, unchanged=unchanged,
                      base_node=node.name, reused=reused)


def _terminated(sql: str) -> str:
    """`sql` with its last statement ending in ';' and a final newline, so concatenated
    scripts never run into each other (the `mariadb` client would join the statements)."""
    lines = sql.rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        s = lines[i].strip()
        if s and not s.startswith(("--", "#")):
            if not s.endswith(";"):
                lines[i] = lines[i].rstrip() + ";"
            break
    return "\n".join(lines) + "\n" if lines else ""


def sql_script_text(package: PackageInfo, from_schema: int) -> tuple[str, tuple[int, ...]]:
    """The upgrade script from schema `from_schema`: (text, migration versions).

    The `up` scripts of the package's migrations above `from_schema`, ascending, each under
    a comment header. It does not record schema_version (db_apply_migration does that when
    zerodown runs the migrations itself): it is the reviewable, runnable form of them.
    """
    todo = [m for m in sorted(package.migrations, key=lambda m: m.version) if m.version > from_schema]
    versions = tuple(m.version for m in todo)
    out = [f"-- zerodown upgrade script: {package.name} {package.version}, schema {from_schema} -> "
           f"{versions[-1] if versions else from_schema}",
           f"-- package {os.path.basename(package.path)} sha256 {package.sha256}",
           f"-- migrations: {', '.join(map(str, versions)) if versions else 'none'}"]
    if not versions:
        out.append(f"-- Nothing to run: the package has no migration above schema {from_schema}.")
    text = "\n".join(out) + "\n"
    for m in todo:
        text += (f"\n-- ---------------------------------------------------------------- migration "
                 f"{m.version} (up){' DESTRUCTIVE' if m.destructive else ''}\n")
        text += _terminated(m.up_sql) or "-- (empty)\n"
    return text, versions


def _write_text_private(directory: str, name: str, text: str) -> tuple[str, str, int, bool]:
    path, tmp = _prepare_out(directory, name)
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        return (path, *_publish(tmp, path))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


async def generate_script(package: PackageInfo, from_schema: int, out_dir: str, script_id: str) -> SqlScript:
    check_id("script id", script_id)
    if isinstance(from_schema, bool) or not isinstance(from_schema, int) or from_schema < 0:
        fail(INVALID_REQUEST, f"from_schema must be an integer >= 0, got {from_schema!r}")
    text, versions = sql_script_text(package, from_schema)
    path, digest, _size, reused = await asyncio.to_thread(_write_text_private, out_dir,
                                                          f"{script_id}.sql", text)
    return SqlScript(path=path, sha256=digest, migrations=versions, reused=reused)


# =========================================================================== activities


@dataclass(frozen=True)
class PackageRequest:
    path: str


@dataclass(frozen=True)
class UpgradeCheckRequest:
    package: PackageInfo
    running_version: str
    # Allow installing the same version again (re-deploy); never an older one.
    allow_same: bool = False


@dataclass(frozen=True)
class UpgradeCheck:
    running_version: str
    package_version: str
    comparison: int  # compare_versions(package, running)


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


def check_upgrade_versions(package: PackageInfo, running_version: str, allow_same: bool = False) -> int:
    """compare_versions(package, running) once version_guard() allows the upgrade (or the
    same version is re-installed with allow_same); VersionNotNewer with its reason else."""
    try:
        cmp = compare_versions(package.version, running_version)
    except ValueError as e:
        fail(INVALID_REQUEST, f"cannot compare versions: {e}")
    if cmp == 0 and allow_same:
        return cmp
    verdict = version_guard(running_version, package)
    if not verdict.ok:
        fail(VERSION_NOT_NEWER, verdict.reason)
    return cmp


@activity.defn
async def inspect_package(req: PackageRequest) -> PackageInfo:
    return await asyncio.to_thread(inspect_package_file, req.path)


@activity.defn
async def check_upgrade(req: UpgradeCheckRequest) -> UpgradeCheck:
    """VersionNotNewer unless the package is newer than the running version and the running
    version is at least the package's min_upgrade_from."""
    cmp = check_upgrade_versions(req.package, req.running_version, req.allow_same)
    return UpgradeCheck(running_version=req.running_version, package_version=req.package.version,
                        comparison=cmp)


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
    return await deploy(req.node, req.package, tuple(req.protected_files), tuple(req.merge_files),
                        req.release_id)


@activity.defn
async def restore_app_folder(req: AppBackup) -> AppRestoreResult:
    return await restore_app(req)


@activity.defn
async def app_folder_manifest(req: NodeRequest) -> dict[str, str]:
    return await folder_manifest(req.node, req.node.app_dir)


@dataclass(frozen=True)
class UpgradeZipRequest:
    node: Node  # the node whose application folder the package is compared with
    package: PackageInfo
    out_dir: str  # on the worker; created mode 700
    zip_id: str  # the zip is <out_dir>/<zip_id>.zip
    protected_files: tuple[str, ...] = ()
    merge_files: tuple[str, ...] = ()


@dataclass(frozen=True)
class SqlScriptRequest:
    package: PackageInfo
    from_schema: int
    out_dir: str  # on the worker; created mode 700
    script_id: str  # the script is <out_dir>/<script_id>.sql


@activity.defn
async def build_upgrade_zip(req: UpgradeZipRequest) -> UpgradeZip:
    """The seed's "Download Application Zip File": a package holding only what differs from
    the node's application folder (plus release.json, the merge files and the migration
    scripts; never a protected file). A valid package for inspect_package / deploy_package.
    Deterministic and idempotent: same package and folder -> same bytes (an identical zip
    already there is reused)."""
    return await build_zip(req.node, req.package, req.out_dir, req.zip_id, tuple(req.protected_files),
                           tuple(req.merge_files))


@activity.defn
async def generate_sql_script(req: SqlScriptRequest) -> SqlScript:
    """The seed's "Generate SQL Script": the package's `up` migrations above from_schema in
    one file (mode 600), each under a comment header; idempotent."""
    return await generate_script(req.package, req.from_schema, req.out_dir, req.script_id)
