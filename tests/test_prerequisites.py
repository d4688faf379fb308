"""Secret Server's upgrade prerequisites (seed 001) as Version Guard rules: each rule fails on
the fact it names, passes on a good one, and is not applicable below its version or where
the site has no such fact."""

from __future__ import annotations

from workflows.prerequisites import (
    FAILED,
    NOT_APPLICABLE,
    OK,
    NodeFact,
    Verdict,
    check,
    failures,
    version_tuple,
)

GOOD = NodeFact(
    node="web-a",
    os="windows",
    os_version="10.0.17763",
    dotnet_release=528049,
    pipeline_mode="Integrated",
    installed_version="10.6.000026",
)


def _by_rule(verdicts: list[Verdict]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for v in verdicts:
        out.setdefault(v.rule.split()[0], []).append(v.status)
    return out


def test_version_numbers_compare_as_secret_server_numbers_them() -> None:
    assert version_tuple("10.7.000000") == (10, 7, 0) and version_tuple("9.1.000001") > version_tuple(
        "9.1.000000"
    )
    assert version_tuple("16.0.1000.6") >= (11,) and version_tuple("") == ()


def test_a_good_site_passes_every_rule() -> None:
    verdicts = check("11.0.000005", "mssql", "16.0.1000.6", [GOOD])
    assert {v.status for v in verdicts} == {OK} and len(verdicts) == 5
    assert failures(verdicts) == []


def test_each_rule_fails_on_its_own_fact() -> None:
    old_sql = check("10.7.000000", "mssql", "10.50.6000.34", [GOOD])
    assert failures(old_sql) == [
        "10.7 and later need SQL Server 2012 or later: the database server is SQL Server 10.50.6000.34: "
        "11.0 (2012) or later is needed"
    ]
    classic = NodeFact(**{**GOOD.__dict__, "pipeline_mode": "Classic"})
    assert failures(check("10.0.000000", "mssql", "16.0", [classic])) == [
        "10.0 and later need the integrated pipeline mode: web-a: the app pool runs in Classic pipeline "
        "mode: set it to Integrated"
    ]
    from_9_1 = NodeFact(**{**GOOD.__dict__, "installed_version": "9.1.000000"})
    assert failures(check("10.0.000000", "mssql", "16.0", [from_9_1])) == [
        "9.1.000000 and below go to 9.1.000001 first: web-a runs 9.1.000000: upgrade it to 9.1.000001 "
        "first, then to 10.0.000000"
    ]
    assert not failures(
        check(
            "10.0.000000", "mssql", "16.0", [NodeFact(**{**GOOD.__dict__, "installed_version": "9.1.000001"})]
        )
    )
    win2008 = NodeFact(**{**GOOD.__dict__, "os_version": "6.0.6002"})
    assert failures(check("8.9.000000", "mssql", "16.0", [win2008])) == [
        "8.9 and later need Windows Server 2008 R2 or later: web-a: Windows 6.0.6002: 6.1 (2008 R2) or "
        "later is needed"
    ]
    no_net = NodeFact(**{**GOOD.__dict__, "dotnet_release": 0})
    assert failures(check("8.5.000000", "mssql", "16.0", [no_net])) == [
        "8.5 and later need .NET Framework 4.5.1: web-a: no .NET Framework 4.5 or later: .NET Framework "
        "4.5.1 (release 378675) or later is needed"
    ]
    net45 = NodeFact(**{**GOOD.__dict__, "dotnet_release": 378389})
    assert "release 378389" in failures(check("8.5.000000", "mssql", "16.0", [net45]))[0]


def test_rules_below_their_version_or_without_the_fact_are_not_applicable() -> None:
    # An 8.4 target: every rule is below its version.
    assert {v.status for v in check("8.4.000000", "mssql", "9.0", [GOOD])} == {NOT_APPLICABLE}
    # A Linux node on MariaDB: no Windows, .NET, pipeline or SQL Server fact.
    linux = NodeFact(node="app1", os="linux", installed_version="10.6.000000")
    by_rule = _by_rule(check("11.0.000000", "mysql", "10.11.6-MariaDB", [linux]))
    assert by_rule == {
        "10.7": [NOT_APPLICABLE],
        "10.0": [NOT_APPLICABLE],
        "9.1.000000": [OK],
        "8.9": [NOT_APPLICABLE],
        "8.5": [NOT_APPLICABLE],
    }
    detail = [v.detail for v in check("11.0.000000", "mysql", "10.11", [linux]) if v.rule.startswith("8.9")]
    assert detail == ["app1: not a Windows node (linux)"]
    assert FAILED not in {v.status for v in check("11.0.000000", "mysql", "10.11", [linux])}
