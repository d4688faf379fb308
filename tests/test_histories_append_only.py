"""tests/histories/ is append-only (ARCHITECTURE.md, "Versioning"): a history that a commit holds
- from the commit that brought this test on - is never changed or deleted afterwards, in a
later commit or in the working tree. A changed workflow that no longer replays a stored
history must be fixed with `workflow.patched()`, never by re-recording the history: that
would hide the very failure (a run in flight dying when zerodown is upgraded) it catches.
A new behaviour gets a new history file next to the old ones.

Uses git (a checkout with its history, as CI has); without one the test fails, it does not
skip: the rule it guards would go unchecked.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HISTORIES = "tests/histories"
THIS = "tests/test_histories_append_only.py"


def git(*args: str, root: Path = ROOT) -> str:
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, text=True).stdout


def first_versions(root: Path = ROOT) -> dict[str, tuple[str, str]]:
    """path -> (blob id, commit) of each history as the first commit from the base on - the
    one that added this test; HEAD while it is not committed - held it."""
    added = git("log", "--diff-filter=A", "--format=%H", "--", THIS, root=root).split()
    base = added[-1] if added else git("rev-parse", "HEAD", root=root).strip()
    commits = [base, *git("rev-list", "--reverse", f"{base}..HEAD", root=root).split()]
    first: dict[str, tuple[str, str]] = {}
    for commit in commits:
        for line in git("ls-tree", "-r", commit, "--", HISTORIES, root=root).splitlines():
            meta, path = line.split("\t", 1)
            first.setdefault(path, (meta.split()[2], commit))
    return first


def violations(root: Path = ROOT) -> list[str]:
    problems = []
    for path, (blob, commit) in sorted(first_versions(root).items()):
        file = root / path
        if not file.exists():
            problems.append(f"{path}: deleted (stored since {commit[:12]})")
        elif git("hash-object", str(file), root=root).strip() != blob:
            problems.append(
                f"{path}: changed since {commit[:12]} (re-recorded? add a new history "
                "instead and guard the workflow change with workflow.patched())"
            )
    return problems


def test_this_checkout_has_its_git_history() -> None:
    assert (ROOT / ".git").exists(), "no git repository: the append-only rule cannot be checked"
    assert git("rev-list", "--count", "HEAD").strip() != "0"


def test_no_stored_history_was_changed_or_deleted() -> None:
    problems = violations()
    assert not problems, "\n".join(problems)


def test_the_rule_catches_a_changed_and_a_deleted_history(tmp_path: Path) -> None:
    """The check itself, on a scratch repository: a history changed or deleted after the
    commit that brought the rule is found, a new one next to it is fine; one changed before
    that commit is not the rule's business."""

    def run(*args: str) -> None:
        git(*args, root=tmp_path)

    def write(name: str, text: str) -> None:
        (tmp_path / HISTORIES / name).write_text(text)

    run("init", "-q")
    run("config", "user.email", "t@example.com")
    run("config", "user.name", "t")
    (tmp_path / HISTORIES).mkdir(parents=True)
    write("old.json", "{}")
    run("add", "-A")
    run("commit", "-qm", "a history before the rule")
    write("old.json", '{"re": "recorded before the rule"}')
    write("a.json", "{}")
    write("b.json", "{}")
    (tmp_path / THIS).write_text("# the rule\n")
    run("add", "-A")
    run("commit", "-qm", "the rule")
    assert violations(tmp_path) == []
    write("a.json", '{"re": "recorded"}')
    (tmp_path / HISTORIES / "b.json").unlink()
    write("c.json", "{}")
    run("add", "-A")
    run("commit", "-qm", "re-recorded a, deleted b, added c")
    found = violations(tmp_path)
    assert [p.split(":")[0] for p in found] == [f"{HISTORIES}/a.json", f"{HISTORIES}/b.json"]
    assert "changed since" in found[0] and "deleted" in found[1]
    # Uncommitted changes count too.
    write("c.json", '{"edited": true}')
    assert f"{HISTORIES}/c.json: changed" in "\n".join(violations(tmp_path))
