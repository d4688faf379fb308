"""`zerodown schema`: the inventory's JSON Schema, generated from the model, checks what
load_inventory accepts (the examples, the lab's own inventory) and refuses what it refuses
(an unknown key, a kind that does not exist, a missing required field)."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from inventory import model
from inventory.load import parse_inventory
from inventory.schema import inventory_schema
from lab.config import LabConfig
from lab.manager import site_inventory

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _errors(raw: Any) -> list[str]:
    validator = jsonschema.Draft202012Validator(inventory_schema())
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(raw)]


def test_the_cli_prints_a_valid_json_schema() -> None:
    zerodown = str(Path(sys.executable).parent / "zerodown")
    out = subprocess.run([zerodown, "schema"], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    schema = json.loads(out)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema == json.loads(json.dumps(inventory_schema()))


def test_generated_from_the_model_not_by_hand() -> None:
    # Every field of every dataclass of the model is in the schema (but the loader's own).
    schema = inventory_schema()
    defs = {"Inventory": schema, **schema["$defs"]}
    for cls in (c for c in vars(model).values() if isinstance(c, type) and dataclasses.is_dataclass(c)):
        if cls.__name__ not in defs:
            continue
        fields = {f.name for f in dataclasses.fields(cls)} - {"source"}
        assert set(defs[cls.__name__]["properties"]) == fields, cls.__name__
    assert defs["Node"]["properties"]["url"]["description"].startswith("Base URL reaching this node")
    assert defs["ServiceControl"]["properties"]["kind"]["enum"] == list(model.SERVICE_KINDS)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_examples_validate(path: Path) -> None:
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    parse_inventory(raw, base_dir=path.parent)  # the loader accepts it...
    assert _errors(raw) == []  # ...and so does the schema


def test_the_labs_inventory_validates(tmp_path: Path) -> None:
    raw = json.loads(json.dumps(site_inventory(LabConfig(root=tmp_path, nodes=4, ox_nodes=3))))
    assert _errors(raw) == []


def test_what_the_loader_refuses_the_schema_refuses() -> None:
    base = yaml.safe_load(EXAMPLES[0].read_text(encoding="utf-8"))
    unknown = copy.deepcopy(base)
    unknown["nodes"][0]["ssh"]["prot"] = 22
    bad_kind = copy.deepcopy(base)
    bad_kind["nodes"][0]["service"]["kind"] = "upstart"
    missing = copy.deepcopy(base)
    del missing["nodes"][0]["url"]
    assert any("prot" in e for e in _errors(unknown))
    assert any("upstart" in e for e in _errors(bad_kind))
    assert any("'url' is a required property" in e for e in _errors(missing))
