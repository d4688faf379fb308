"""The layers' import rules (ARCHITECTURE.md, "Layers"), on every import of every module,
those inside functions too (an AST walk, so a late `from lab import x` is seen like one at
the top), and no `assert` in workflow code (an AssertionError fails the workflow task, which
Temporal retries forever; `workflows.procedure.required` fails the run instead)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("inventory", "errors", "activities", "workflows", "worker", "starter", "lab", "bench")
# package -> the project packages it must never import
FORBIDDEN: dict[str, set[str]] = {
    "inventory": {"errors", "activities", "workflows", "worker", "starter", "lab", "bench"},
    "errors": {"inventory", "activities", "workflows", "worker", "starter", "lab", "bench"},
    "activities": {"workflows", "worker", "starter", "lab", "bench"},
    "workflows": {"worker", "starter", "lab", "bench"},
    "worker": {"starter", "lab", "bench"},
    "lab": {"activities", "workflows", "worker", "starter", "bench"},
    "starter": {"bench"},
}
# The mechanisms procedures share; every other module of workflows/ is one procedure, and
# no procedure imports another's code (what two share goes into site_steps, or ox_steps for
# the two OX procedures) - only the contract of a child workflow it starts.
SHARED = {
    "__init__",
    "procedure",
    "saga",
    "gates",
    "signatures",
    "timeline",
    "timeouts",
    "balancers",
    "site_steps",
    "ox_steps",
    "registry",
}
CHILD_CONTRACT = ("Input", "Result", "Workflow")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import in the file, at any depth."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # `from workflows import inventory` imports a module too
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_layer_imports_only_what_it_may(package: str) -> None:
    bad = []
    for path in _modules(package):
        for line, module in _imports(path):
            top = module.split(".")[0]
            if top in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert bad == [], "\n".join(bad)


def test_no_procedure_imports_another() -> None:
    procedures = {p.stem for p in _modules("workflows")} - SHARED
    bad = []
    for path in _modules("workflows"):
        if path.stem == "registry":
            continue
        for line, module in _imports(path):
            parts = module.split(".")
            other = len(parts) > 2 and parts[0] == "workflows" and parts[1] in procedures - {path.stem}
            if other and not parts[2].endswith(CHILD_CONTRACT):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert bad == [], "\n".join(bad)


def test_no_assert_in_workflow_code() -> None:
    found = [
        f"{p.relative_to(ROOT)}:{n.lineno}"
        for p in _modules("workflows")
        for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
        if isinstance(n, ast.Assert)
    ]
    assert found == []


def test_the_rules_see_imports_inside_functions(tmp_path: Path) -> None:
    # The walk itself: a function-level import is found like a top-level one.
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef f():\n    from lab import provision\n    import starter.cli\n")
    assert [m for _, m in _imports(f)] == ["os", "lab", "lab.provision", "starter.cli"]


def test_every_package_is_covered() -> None:
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert on_disk <= set(PACKAGES), f"a package without layer rules: {on_disk - set(PACKAGES)}"


def test_no_test_module_imports_another() -> None:
    # Shared test helpers live in support modules (tests/*_support.py, fake_site.py, ...),
    # never in a test module that other tests import.
    bad = [
        f"{p.relative_to(ROOT)}:{line} imports {module}"
        for p in sorted((ROOT / "tests").glob("*.py"))
        for line, module in _imports(p)
        if module.startswith("tests.test_")
    ]
    assert bad == [], "\n".join(bad)
