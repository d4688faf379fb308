"""Version rules: dotted numeric versions, their order, and the seed's "Version Guard".

Pure and deterministic: workflows call these directly (no activity), and package.py uses
them to validate a release's `version`, `min_upgrade_from` and `requires`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # Only an annotation here; package.py imports this module at run time.
    from activities.deploy.package import PackageInfo


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
        for v in (
            running,
            package.version,
            *((package.min_upgrade_from,) if package.min_upgrade_from else ()),
            *package.requires,
        ):
            parse_version(v)
    except (ValueError, AttributeError) as e:
        return VersionGuardVerdict(
            ok=False, reason=f"Version Guard: cannot check {what} against {running!r}: {e}", install_first=()
        )
    if compare_versions(package.version, running) <= 0:
        return VersionGuardVerdict(
            ok=False,
            reason=f"Version Guard: {what} is not newer than the running version {running}",
            install_first=(),
        )
    first: list[str] = []
    why: list[str] = []
    if package.min_upgrade_from and compare_versions(running, package.min_upgrade_from) < 0:
        first.append(package.min_upgrade_from)
        why.append(f"it upgrades from {package.min_upgrade_from} or later")
    needed = [
        v
        for v in package.requires
        if compare_versions(running, v) < 0 and compare_versions(v, package.version) < 0
    ]
    if needed:
        first.extend(needed)
        why.append(f"it requires {', '.join(_ascending_unique(needed))} installed before it")
    if not first:
        return VersionGuardVerdict(
            ok=True, reason=f"Version Guard: {what} can upgrade {running}", install_first=()
        )
    steps = _ascending_unique(first)
    order = ", then ".join((f"{steps[0]} first", *steps[1:], package.version))
    return VersionGuardVerdict(
        ok=False,
        install_first=steps,
        reason=f"Version Guard: {what} cannot upgrade {running}; install {order} ({'; '.join(why)})",
    )
