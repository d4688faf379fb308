"""Secret Server's upgrade prerequisites as Version Guard rules (seed 001, its "Important"
boxes), judged in preflight on facts read from the site (activities/facts.py).

  * 10.7.000000 and later need SQL Server 2012 (11.0) or later;
  * 10.0.000000 and later need the integrated pipeline mode on the app pool;
  * from 9.1.000000 and below, 9.1.000001 comes first (then 10.0 and later);
  * 8.9.000000 and later need Windows Server 2008 R2 (6.1) or later;
  * 8.5.000000 and later need .NET Framework 4.5.1 (release 378675).

Each rule gives one verdict per fact it reads: ok, failed (naming the fact and where it
came from), or "not applicable" (the target is below the rule's version, or the site has no
such fact: a Linux node's Windows version, a MariaDB server's SQL Server version). Pure and
deterministic: workflows call it on the facts their activities returned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

OK, FAILED, NOT_APPLICABLE = "ok", "failed", "not applicable"
DOTNET_451_RELEASE = 378675  # Microsoft Learn: "378675 and above: .NET Framework 4.5.1"


@dataclass(frozen=True)
class NodeFact:
    """What a rule needs of a node (activities.facts.NodeFacts, as the workflow has it)."""

    node: str
    os: str
    os_version: str = ""
    dotnet_release: int = 0
    pipeline_mode: str = ""
    installed_version: str = ""


@dataclass(frozen=True)
class Verdict:
    rule: str
    status: str  # OK | FAILED | NOT_APPLICABLE
    detail: str


def version_tuple(text: str) -> tuple[int, ...]:
    """'10.7.000000' -> (10, 7, 0); '9.1.000001' -> (9, 1, 1); '' -> ()."""
    return tuple(int(p) for p in re.findall(r"\d+", text))


def _at_least(version: str, floor: tuple[int, ...]) -> bool:
    v = version_tuple(version)
    return bool(v) and v >= floor


def check(target: str, db_kind: str, db_version: str, nodes: list[NodeFact]) -> list[Verdict]:
    """Every rule's verdicts for an upgrade to `target`."""
    out: list[Verdict] = []
    t = version_tuple(target)

    def applies(rule: str, since: tuple[int, ...], label: str) -> bool:
        if t >= since:
            return True
        out.append(Verdict(rule, NOT_APPLICABLE, f"the target {target} is below {label}"))
        return False

    rule = "10.7 and later need SQL Server 2012 or later"
    if applies(rule, (10, 7), "10.7.000000"):
        if db_kind != "mssql":
            out.append(Verdict(rule, NOT_APPLICABLE, f"the database is {db_kind}, not SQL Server"))
        elif _at_least(db_version, (11,)):
            out.append(Verdict(rule, OK, f"SQL Server {db_version}"))
        else:
            out.append(
                Verdict(
                    rule,
                    FAILED,
                    f"the database server is SQL Server {db_version or '(unknown)'}: "
                    "11.0 (2012) or later is needed",
                )
            )

    rule = "10.0 and later need the integrated pipeline mode"
    if applies(rule, (10, 0), "10.0.000000"):
        for n in nodes:
            if not n.pipeline_mode:
                out.append(Verdict(rule, NOT_APPLICABLE, f"{n.node}: no IIS app pool ({n.os})"))
            elif n.pipeline_mode.lower() == "integrated":
                out.append(Verdict(rule, OK, f"{n.node}: app pool in Integrated mode"))
            else:
                out.append(
                    Verdict(
                        rule,
                        FAILED,
                        f"{n.node}: the app pool runs in {n.pipeline_mode} pipeline mode: "
                        "set it to Integrated",
                    )
                )

    rule = "9.1.000000 and below go to 9.1.000001 first"
    if applies(rule, (10, 0), "10.0.000000"):
        for n in nodes:
            v = version_tuple(n.installed_version)
            if v and v <= (9, 1, 0):
                out.append(
                    Verdict(
                        rule,
                        FAILED,
                        f"{n.node} runs {n.installed_version}: upgrade it to 9.1.000001 first, "
                        f"then to {target}",
                    )
                )
            else:
                out.append(Verdict(rule, OK, f"{n.node} runs {n.installed_version or '(unknown)'}"))

    rule = "8.9 and later need Windows Server 2008 R2 or later"
    if applies(rule, (8, 9), "8.9.000000"):
        for n in nodes:
            if n.os != "windows":
                out.append(Verdict(rule, NOT_APPLICABLE, f"{n.node}: not a Windows node ({n.os})"))
            elif _at_least(n.os_version, (6, 1)):
                out.append(Verdict(rule, OK, f"{n.node}: Windows {n.os_version}"))
            else:
                out.append(
                    Verdict(
                        rule,
                        FAILED,
                        f"{n.node}: Windows {n.os_version or '(unknown)'}: 6.1 (2008 R2) or later is needed",
                    )
                )

    rule = "8.5 and later need .NET Framework 4.5.1"
    if applies(rule, (8, 5), "8.5.000000"):
        for n in nodes:
            if n.os != "windows":
                out.append(Verdict(rule, NOT_APPLICABLE, f"{n.node}: not a Windows node ({n.os})"))
            elif n.dotnet_release >= DOTNET_451_RELEASE:
                out.append(Verdict(rule, OK, f"{n.node}: .NET Framework 4 release {n.dotnet_release}"))
            else:
                found = (
                    f"release {n.dotnet_release}" if n.dotnet_release else "no .NET Framework 4.5 or later"
                )
                out.append(
                    Verdict(
                        rule,
                        FAILED,
                        f"{n.node}: {found}: .NET Framework 4.5.1 (release {DOTNET_451_RELEASE}) "
                        "or later is needed",
                    )
                )
    return out


def failures(verdicts: list[Verdict]) -> list[str]:
    """The failed verdicts as preflight problems ("<rule>: <detail>")."""
    return [f"{v.rule}: {v.detail}" for v in verdicts if v.status == FAILED]
