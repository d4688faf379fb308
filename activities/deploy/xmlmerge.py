"""The XML config merge: a node's `appSettings` and `connectionStrings` customisations carried,
by key, onto a release's `web.config` / `web-appSettings.config`.

.NET keeps an application's settings as `<appSettings><add key="K" value="V" /></appSettings>`
and its connection strings as `<connectionStrings><add name="N" connectionString="..."
providerName="..." /></connectionStrings>` (Microsoft Learn, "appSettings element",
"connectionStrings element"). Those entries are what sites customise; everything else in the
file is the package's and stays exactly as the package has it: the merged text is the new
defaults' text with only the carried entries' elements replaced or added (no XML
re-serialisation: comments, attribute order, quoting and line ends are the package's).

Same rules as the `key = value` merge (merge.py): customised = an entry whose attributes
differ from the recorded old defaults, or that the node added; without recorded defaults
every entry present in both keeps the node's element and node-only entries are reported, not
carried. All three texts must parse as XML, else MergeUnsupported before anything is written.
Reports name keys only (connection strings hold passwords).
"""

from __future__ import annotations

import difflib
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from activities.common import fail
from errors import MERGE_UNSUPPORTED

# (section element, the attribute that names an entry)
SECTIONS = (("appSettings", "key"), ("connectionStrings", "name"))
_ATTR_RE = re.compile(r"""([A-Za-z_:][\w:.-]*)\s*=\s*("[^"]*"|'[^']*')""")


def looks_like_xml(text: str) -> bool:
    return text.lstrip("\ufeff \t\r\n").startswith("<")


@dataclass(frozen=True)
class _Entry:
    name: str
    attrs: dict[str, str]
    text: str  # the element exactly as written
    start: int
    end: int


def _unescape(v: str) -> str:
    return (
        v[1:-1]
        .replace("&quot;", '"')
        .replace("&apos;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
    )


def _section_span(text: str, section: str) -> tuple[int, int] | None:
    """(start of the section's content, start of its closing tag), or None."""
    m = re.search(rf"<{section}(\s[^>]*)?>", text)
    if m is None or m.group(0).endswith("/>"):
        return None
    close = text.find(f"</{section}>", m.end())
    return (m.end(), close) if close >= 0 else None


def _entries(text: str, section: str, key_attr: str) -> dict[str, _Entry]:
    span = _section_span(text, section)
    out: dict[str, _Entry] = {}
    if span is None:
        return out
    body = text[span[0] : span[1]]
    for m in re.finditer(r"<add\b([^>]*?)/?>", body):
        attrs = {a: _unescape(v) for a, v in _ATTR_RE.findall(m.group(1))}
        if key_attr in attrs:
            out[attrs[key_attr]] = _Entry(
                attrs[key_attr], attrs, m.group(0), span[0] + m.start(), span[0] + m.end()
            )
    return out


def _parse_check(text: str, what: str, name: str) -> None:
    try:
        ET.fromstring(text.lstrip("\ufeff"))
    except ET.ParseError as e:
        fail(
            MERGE_UNSUPPORTED,
            f"{name} cannot be merged: {what} does not parse as XML ({e}); nothing was written",
        )


@dataclass(frozen=True)
class XmlMerge:
    text: str
    diff: tuple[str, ...]
    carried: tuple[str, ...]  # "appSettings:Key" / "connectionStrings:Name"
    notes: tuple[str, ...]
    changed_defaults: tuple[str, ...]


def merge_xml(node_text: str, old_text: str | None, new_text: str, name: str = "the merge file") -> XmlMerge:
    texts = (
        ("the node's copy", node_text),
        ("the recorded defaults", old_text),
        ("the new package's defaults", new_text),
    )
    for what, text in texts:
        if text is not None and (text.strip() or what == "the new package's defaults"):
            _parse_check(text, what, name)
    replacements: list[tuple[int, int, str]] = []  # (start, end, new text) in new_text
    carried: list[str] = []
    notes: list[str] = []
    changed_defaults: list[str] = []
    for section, key_attr in SECTIONS:
        node = _entries(node_text, section, key_attr)
        new = _entries(new_text, section, key_attr)
        old = _entries(old_text, section, key_attr) if old_text is not None else None
        if old is None:
            keep = [k for k in node if k in new]
            notes += [
                f"{section}:{k}: only on the node and no recorded defaults to tell whether it is a "
                "customisation; not carried"
                for k in node
                if k not in new
            ]
        else:
            keep = [k for k in node if k not in old or old[k].attrs != node[k].attrs]
            changed_defaults += [f"{section}:{k}" for k in new if k in old and old[k].attrs != new[k].attrs]
            notes += [
                f"{section}:{k}: removed on the node but present in the new defaults; the new default is used"
                for k in old
                if k not in node and k in new
            ]
        added: list[str] = []
        for k in keep:
            if k in new:
                if new[k].attrs != node[k].attrs:
                    replacements.append((new[k].start, new[k].end, node[k].text))
                    carried.append(f"{section}:{k}")
            else:
                added.append(node[k].text)
                carried.append(f"{section}:{k}")
        if added:
            span = _section_span(new_text, section)
            if span is None:
                notes.append(f"{section}: not in the new defaults; the node's own entries are not carried")
                carried = [
                    c for c in carried if not (c.startswith(f"{section}:") and c.split(":", 1)[1] not in new)
                ]
                continue
            replacements.append((*_insertion(new_text, span[1], added),))
    out = new_text
    for start, end, text in sorted(replacements, key=lambda r: r[0], reverse=True):
        out = out[:start] + text + out[end:]
    diff = tuple(
        difflib.unified_diff(
            new_text.splitlines(), out.splitlines(), "new defaults", "merged", n=0, lineterm=""
        )
    )
    return XmlMerge(out, diff, tuple(carried), tuple(notes), tuple(changed_defaults))


def _insertion(text: str, close: int, elements: list[str]) -> tuple[int, int, str]:
    """Where and what to insert so `elements` end the section whose closing tag is at
    `close`: on lines of their own, indented one step more than the closing tag, when that
    tag has its own line; else right before it."""
    line_start = text.rfind("\n", 0, close) + 1
    before = text[line_start:close]
    if before.strip():
        return close, close, "".join(f" {e}" for e in elements) + " "
    newline = "\r\n" if "\r\n" in text else "\n"
    return line_start, line_start, "".join(f"{before}  {e}{newline}" for e in elements)


def _escape(v: str) -> str:
    return v.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


def set_app_settings(text: str, values: dict[str, str], name: str = "the config file") -> str:
    """`text` with each appSettings entry of `values` set (its `value` attribute replaced
    where the key exists, an `<add key= value= />` appended otherwise); the rest as it was.
    What a staging copy's overrides do to an XML config (key = value files: apply_overrides)."""
    _parse_check(text, "it", name)
    if _section_span(text, "appSettings") is None:
        fail(MERGE_UNSUPPORTED, f"{name} has no <appSettings> section to set {', '.join(sorted(values))} in")
    out = text
    for key, value in values.items():
        entry = _entries(out, "appSettings", "key").get(key)
        if entry is None:
            span = _section_span(out, "appSettings")
            assert span is not None
            start, end, added = _insertion(
                out, span[1], [f'<add key="{_escape(key)}" value="{_escape(value)}" />']
            )
        else:
            start, end = entry.start, entry.end
            m = re.search(r"""\bvalue\s*=\s*("[^"]*"|'[^']*')""", entry.text)
            added = (
                entry.text[: m.start(1)] + f'"{_escape(value)}"' + entry.text[m.end(1) :]
                if m
                else entry.text.replace("<add", f'<add value="{_escape(value)}"', 1)
            )
        out = out[:start] + added + out[end:]
    return out
