"""Inventory loading and validation: every problem reported with its path, before anything runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from inventory.load import load_inventory, parse_inventory
from inventory.model import AdminApi, InventoryError, MaintenanceSwitch, SecretRef, UnknownNodeError
from tests.inventory_support import EXAMPLE, example, problems_of


def test_full_example_loads_into_frozen_dataclasses() -> None:
    inv = load_inventory(EXAMPLE)
    assert inv.site == "acme-prod"
    assert [n.name for n in inv.nodes] == ["web-a", "web-b", "web-c"]
    web_a = inv.node("web-a")
    assert web_a.service.kind == "iis" and web_a.service.app_pool == "SecretServer"
    # Relative secret files are made absolute against the inventory's folder.
    assert web_a.ssh.key == SecretRef(file=str(EXAMPLE.parent / "keys/deploy_ed25519"))
    assert inv.node("web-c").ssh.password == SecretRef(env="WEB_C_SSH_PASSWORD")
    assert inv.load_balancers[0].credential == SecretRef(env="F5_PASSWORD")
    assert inv.databases[0].kind == "mssql"
    assert inv.application.protected_files == ("encryption.config", "database.config")
    assert inv.approvers["go-live"] == ("carol",)
    assert [[n.name for n in b] for b in inv.batches()] == [["web-a"], ["web-b", "web-c"]]
    with pytest.raises(AttributeError):
        inv.site = "other"  # type: ignore[misc]


def test_batches_by_size_and_subset() -> None:
    raw = example()
    del raw["rollout"]["batches"]
    raw["rollout"]["batch_size"] = 2
    inv = parse_inventory(raw)
    assert [[n.name for n in b] for b in inv.batches()] == [["web-a", "web-b"], ["web-c"]]
    assert [[n.name for n in b] for b in inv.batches(["web-c"])] == [["web-c"]]
    with pytest.raises(UnknownNodeError, match=r"unknown node 'web-z'.*known: web-a, web-b, web-c"):
        inv.batches(["web-z"])


def test_bad_port_is_reported_with_its_path() -> None:
    raw = example()
    raw["nodes"][2]["ssh"]["port"] = "22a"
    assert 'nodes[2].ssh.port: expected an integer 1-65535, got "22a"' in problems_of(raw)


def test_every_problem_is_reported_at_once() -> None:
    raw = example()
    raw["nodes"][0]["ssh"]["port"] = 70000
    del raw["nodes"][1]["app_dir"]
    raw["nodes"][1]["colour"] = "blue"
    raw["nodes"][2]["service"] = {"kind": "iis", "site": "SecretServer"}
    raw["load_balancers"][1]["members"]["web-x"] = "ss-x"
    raw["databases"][0]["kind"] = "oracle"
    problems = problems_of(raw)
    assert "nodes[0].ssh.port: expected an integer 1-65535, got 70000" in problems
    assert "nodes[1].app_dir: required field is missing" in problems
    assert any(p.startswith("nodes[1].colour: unknown key") for p in problems)
    assert "nodes[2].service.app_pool: required field is missing" in problems
    assert "load_balancers[1].members.web-x: unknown node" in problems
    assert 'databases[0].kind: expected one of mysql, mssql, got "oracle"' in problems
    # An IIS node is a Windows node: its app_dir a drive path.
    assert any(p.startswith("nodes[2].app_dir: a Windows node's app_dir is a drive path") for p in problems)
    assert len(problems) == 7, problems


def test_secret_values_are_refused() -> None:
    raw = example()
    raw["databases"][0]["password"] = "hunter2"
    raw["load_balancers"][0]["credential"] = {"env": "F5", "file": "x"}
    problems = problems_of(raw)
    assert any(p.startswith("databases[0].password: secrets must be references") for p in problems)
    assert "load_balancers[0].credential: expected exactly one of env or file" in problems
    # And the refused value is never echoed back.
    assert not any("hunter2" in p for p in problems)


def test_missing_sections_and_wrong_shapes() -> None:
    assert problems_of({"site": "x"}) == ["nodes: required field is missing"]
    assert problems_of({"site": "x", "nodes": []}) == ["nodes: needs at least one node"]
    assert problems_of(["not", "a", "mapping"]) == ["(top): expected a mapping, got a list"]
    raw = example()
    raw["nodes"][0]["ssh"] = {"host": "h"}
    assert "nodes[0].ssh: needs a key or a password (as a secret reference)" in problems_of(raw)


def test_duplicates_and_batches_cross_checked() -> None:
    raw = example()
    raw["nodes"][1]["name"] = "web-a"
    raw["rollout"]["batches"] = [["web-a"], ["web-q"]]
    problems = problems_of(raw)
    assert "nodes[1].name: duplicate node name 'web-a' (first at nodes[0].name)" in problems
    assert "rollout.batches[1]: unknown node 'web-q'" in problems


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="cannot read inventory"):
        load_inventory(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("site: x\nnodes: [\n  - {name: a\n")
    with pytest.raises(InventoryError, match=r"line \d+, column \d+: invalid YAML"):
        load_inventory(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    with pytest.raises(InventoryError, match="the inventory is empty"):
        load_inventory(empty)


def test_admin_scratch_and_staging_load() -> None:
    inv = load_inventory(EXAMPLE)
    assert inv.application.admin == AdminApi(token=SecretRef(env="SS_ADMIN_TOKEN"), path_prefix="/admin")
    assert inv.databases[0].scratch_database == "SecretServer_RestoreTest"
    st = inv.staging
    assert st is not None
    assert (st.ssh.host, st.app_dir, st.service.kind, st.url, st.database) == (
        "10.0.2.21",
        "C:/inetpub/wwwroot/SecretServer",
        "iis",
        "https://10.0.2.21",
        "SecretServer_Staging",
    )
    assert st.ssh.key == SecretRef(file=str(EXAMPLE.parent / "keys/deploy_ed25519"))
    assert st.config == {"settings.ini": {"node.name": "staging"}}
    # All optional: an inventory without them loads with the defaults.
    raw = example()
    del raw["staging"], raw["application"]["admin"], raw["databases"][0]["scratch_database"]
    inv = parse_inventory(raw)
    assert (inv.staging, inv.application.admin, inv.databases[0].scratch_database) == (None, None, None)
    raw = example()
    raw["application"]["admin"] = {"token": {"file": "keys/admin_token"}, "path_prefix": "/api/admin/"}
    raw["staging"]["config"] = {"web.config": {"http.port": 8443, "node.name": "staging"}}
    inv = parse_inventory(raw, base_dir=EXAMPLE.parent)
    assert inv.application.admin == AdminApi(
        token=SecretRef(file=str(EXAMPLE.parent / "keys/admin_token")), path_prefix="/api/admin"
    )
    assert inv.staging is not None and inv.staging.config == {
        "web.config": {"http.port": "8443", "node.name": "staging"}
    }


def test_admin_scratch_and_staging_problems_have_paths() -> None:
    raw = example()
    raw["application"]["admin"] = {"token": "plain-token", "path_prefix": "admin", "user": "x"}
    raw["databases"][0]["scratch_database"] = raw["databases"][0]["database"]
    raw["staging"]["database"] = raw["databases"][0]["database"]
    del raw["staging"]["url"]
    raw["staging"]["ssh"]["port"] = "22a"
    raw["staging"]["config"] = {
        "/etc/passwd": {"a": "b"},
        "web.config": {"feature.x": True, "k": ["l"]},
        "empty.ini": {},
    }
    problems = problems_of(raw)
    assert any(p.startswith("application.admin.token: secrets must be references") for p in problems)
    assert "application.admin.path_prefix: expected a path starting with '/', got \"admin\"" in problems
    assert any(p.startswith("application.admin.user: unknown key") for p in problems)
    assert any(
        p.startswith("databases[0].scratch_database: must differ from database 'SecretServer'")
        for p in problems
    )
    assert any(
        p.startswith("staging.database: must differ from the production database databases[0].database")
        for p in problems
    )
    assert "staging.url: required field is missing" in problems
    assert 'staging.ssh.port: expected an integer 1-65535, got "22a"' in problems
    assert "staging.config./etc/passwd: expected a file name relative to the application folder" in problems
    for key in ("feature.x", "k"):
        assert any(
            p.startswith(f"staging.config.web.config.{key}: expected a string or number") for p in problems
        )
    assert any(p.startswith("staging.config.empty.ini: expected a non-empty mapping") for p in problems)
    assert not any("plain-token" in p for p in problems)
    assert len(problems) == 11, problems
    raw = example()
    raw["staging"]["database"] = raw["databases"][0]["scratch_database"]
    assert any(
        p.startswith("staging.database: must differ from databases[0].scratch_database")
        for p in problems_of(raw)
    )
    raw = example()
    raw["staging"] = {"app_dir": "x"}
    assert {
        "staging.ssh: required field is missing",
        "staging.service: required field is missing",
        "staging.url: required field is missing",
        "staging.database: required field is missing",
    } <= set(problems_of(raw))


OX_EXAMPLE = EXAMPLE.parent / "ox-site.example.yaml"


def test_ox_section_loads() -> None:
    inv = load_inventory(OX_EXAMPLE)
    assert inv.ox is not None
    assert inv.ox.server_name == "oxserver-7100"
    assert (inv.ox.main_lb, inv.ox.secondary_lb) == ("www", "wwwxyz")
    assert inv.ox.secondary_url == "https://wwwxyz.mysite.example"
    assert inv.ox.admin_password == SecretRef(env="OX_MASTER_PASSWORD")
    assert inv.ox.install_command == "sudo apt-get install -y open-xchange={version}*"
    assert inv.ox.schema_shares == (1, 1000)
    assert load_inventory(EXAMPLE).ox is None


def test_ox_section_problems_have_paths() -> None:
    raw: dict[str, Any] = yaml.safe_load(OX_EXAMPLE.read_text())
    raw["ox"].update(
        main_lb="nope",
        secondary_url="wwwxyz",
        admin_password="secret",
        install_command="apt-get install open-xchange",
        schema_shares=[1, -2],
    )
    del raw["ox"]["version_command"]
    raw["load_balancers"][1]["members"].pop("ox3")
    with pytest.raises(InventoryError) as info:
        parse_inventory(raw, base_dir=OX_EXAMPLE.parent)
    problems = info.value.problems
    assert "ox.main_lb: unknown load balancer 'nope' (known: www, wwwxyz)" in problems
    assert 'ox.secondary_url: expected an http(s):// URL, got "wwwxyz"' in problems
    assert any(p.startswith("ox.admin_password: secrets must be references") for p in problems)
    assert any(p.startswith("ox.install_command: must contain {version}") for p in problems)
    assert any(p.startswith("ox.schema_shares: expected a list of schema counts") for p in problems)
    assert "ox.version_command: required field is missing" in problems
    assert (
        "ox.secondary_lb: node 'ox3' is not a member of load balancer 'wwwxyz' "
        "(every OX node moves between both)" in problems
    )
    assert not any("secret" in p and "references" not in p for p in problems)
    assert len(problems) == 7, problems
    raw = yaml.safe_load(OX_EXAMPLE.read_text())
    raw["ox"]["secondary_lb"] = "www"
    with pytest.raises(InventoryError) as info:
        parse_inventory(raw, base_dir=OX_EXAMPLE.parent)
    assert (
        "ox.secondary_lb: must differ from ox.main_lb (the upgraded nodes wait there)" in info.value.problems
    )


def test_maintenance_switch_and_its_preview_header() -> None:
    raw = example()
    edge = raw["load_balancers"][1]
    edge["maintenance"] = {
        "map": "haproxy/maintenance.map",
        "key": "main",
        "preview_header": "X-Zerodown-Preview",
    }
    sw = parse_inventory(raw, base_dir=EXAMPLE.parent).load_balancers[1].maintenance
    assert sw == MaintenanceSwitch(
        map=str(EXAMPLE.parent / "haproxy/maintenance.map"), key="main", preview_header="X-Zerodown-Preview"
    )
    # Optional: without it the page has no bypass.
    del edge["maintenance"]["preview_header"]
    sw = parse_inventory(raw, base_dir=EXAMPLE.parent).load_balancers[1].maintenance
    assert sw is not None and sw.preview_header == ""
    for bad in ("X Preview", "X-Preview:", "", "Ünicode", "a/b"):
        edge["maintenance"]["preview_header"] = bad
        problems = problems_of(raw)
        path = "load_balancers[1].maintenance.preview_header"
        expected = f"{path}: must not be empty" if not bad else f"{path}: expected an HTTP header name"
        assert len(problems) == 1 and problems[0].startswith(expected), (bad, problems)
    edge["maintenance"] = {"map": "m.map", "key": "main", "preview": "X-P"}
    assert any(p.startswith("load_balancers[1].maintenance.preview: unknown key") for p in problems_of(raw))
