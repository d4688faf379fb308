"""The `key = value` config merge: carry a node's customisations onto a release's defaults.

Pure text in, text out (no I/O): `_parse_kv` parses a settings file (optional `[section]`
lines, `#` / `;` comments), `merge_config_detailed` merges the node's copy, the recorded
old defaults and the new defaults into the text to write, with the line diff and the
names of the carried keys. An XML file (.NET's web.config: its appSettings and
connectionStrings) goes to xmlmerge.py; any other file that is not plain `key = value`
(duplicate keys, XML that does not parse) is refused (MergeUnsupported), never merged line
by line. The deploy (appfolder.py) keeps
config values on the node: its reports name keys only.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from activities.common import fail
from activities.deploy.xmlmerge import looks_like_xml, merge_xml
from errors import MERGE_UNSUPPORTED

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
            raise NotKeyValueError(
                f"line {i + 1} is not `key = value` with a plain key (letters, digits, _ . - :){hint}"
            )
        k = (section, kv.group(1))
        if k in seen_at:
            where = f"section [{section}]" if section else "the top of the file"
            raise NotKeyValueError(
                f"key {kv.group(1)!r} appears twice in {where} (lines {seen_at[k]} and {i + 1})"
            )
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


def merge_config_detailed(
    node_text: str, old_defaults_text: str | None, new_defaults_text: str, name: str = "the merge file"
) -> MergeOutcome:
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
    if looks_like_xml(new_defaults_text):
        # .NET's web.config and friends: appSettings / connectionStrings by key (xmlmerge.py).
        x = merge_xml(node_text, old_defaults_text, new_defaults_text, name)
        return MergeOutcome(
            text=x.text, diff=x.diff, carried=x.carried, notes=x.notes, changed_defaults=x.changed_defaults
        )
    parsed: list[_Parsed] = []
    for what, text in (
        ("the node's copy", node_text),
        ("the recorded defaults", old_defaults_text),
        ("the new package's defaults", new_defaults_text),
    ):
        if text is None:
            continue
        try:
            parsed.append(_parse_kv(text))
        except NotKeyValueError as e:
            fail(
                MERGE_UNSUPPORTED,
                f"{name} cannot be merged: merge_files must be `key = value` files, and in {what} "
                f"{e}. Make it a `key = value` file, or list it under protected_files (kept as "
                "it is on the node) instead of merge_files",
            )
    node, new = parsed[0], parsed[-1]
    notes: list[str] = []
    changed_defaults: list[tuple[str, str]] = []
    if old_defaults_text is None:
        carried = [k for k in node.order if k in new.values]
        for k in node.order:
            if k not in new.values:
                notes.append(
                    f"{_key_name(k)}: only on the node and no recorded defaults to tell "
                    "whether it is a customisation; not carried"
                )
    else:
        old = parsed[1]
        carried = [k for k in node.order if k not in old.values or old.values[k][0] != node.values[k][0]]
        for k in old.order:
            if k not in node.values and k in new.values:
                notes.append(
                    f"{_key_name(k)}: removed on the node but present in the new defaults; "
                    "the new default is used"
                )
        changed_defaults = [k for k in new.order if k in old.values and old.values[k][0] != new.values[k][0]]
        carried_here = set(carried)
        for k in changed_defaults:
            if k in carried_here:
                notes.append(
                    f"{_key_name(k)}: customised on the node and its default changed in the "
                    "new release; the node's value is kept"
                )
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
    return MergeOutcome(
        text=text,
        diff=diff,
        carried=tuple(_key_name(k) for k in changed),
        notes=tuple(notes),
        changed_defaults=tuple(_key_name(k) for k in changed_defaults),
    )


def merge_config(
    node_text: str, old_defaults_text: str | None, new_defaults_text: str
) -> tuple[str, list[str]]:
    """(merged text, report lines): the report is the line diff new defaults -> merged."""
    m = merge_config_detailed(node_text, old_defaults_text, new_defaults_text)
    return m.text, list(m.diff)
