"""The inventory's JSON Schema, generated from the model (`inventory.model`), for editors.

YAML editors that speak JSON Schema (VS Code's YAML extension, IntelliJ) complete and check
an inventory with it: `zerodown schema > inventory.schema.json`, then
`# yaml-language-server: $schema=inventory.schema.json` at the top of the file. The YAML
format mirrors the dataclasses field for field, so the schema is the model's (pydantic's
generator), with what the dataclasses cannot say added from the model itself:

  * no key beyond the model's (`additionalProperties: false`), as `load_inventory` refuses;
  * the kinds (`SERVICE_KINDS`, `LB_KINDS`, `DB_KINDS`, `PROVISIONING_KINDS`) as enums;
  * each field's comment in model.py as its description;
  * fields the loader fills in itself (`Inventory.source`) left out.

`load_inventory` stays the judge (it checks more: cross references, ranges, secrets given as
values); the schema is what an editor can check while typing. tests/test_inventory_schema.py
validates the examples and the lab's inventory against it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from inventory import model

# Filled in by the loader, never written in a file.
INTERNAL = {("Inventory", "source")}
KINDS: dict[str, tuple[str, ...]] = {
    "ServiceControl": model.SERVICE_KINDS,
    "LoadBalancer": model.LB_KINDS,
    "Database": model.DB_KINDS,
    "Provisioning": model.PROVISIONING_KINDS,
}
SCHEMA_ID = "https://zerodown.invalid/inventory.schema.json"


def field_comments() -> dict[tuple[str, str], str]:
    """(class, field) -> the comment lines right above the field in model.py."""
    source = Path(model.__file__).read_text(encoding="utf-8")
    out: dict[tuple[str, str], str] = {}
    cls = ""
    pending: list[str] = []
    for line in source.splitlines():
        stripped = line.strip()
        if line.startswith("class "):
            cls, pending = line[6:].split("(")[0].split(":")[0].strip(), []
        elif line.startswith("    #") and not line.startswith("     "):
            pending.append(stripped.lstrip("#").strip())
        elif (
            cls
            and line.startswith("    ")
            and not line.startswith("     ")
            and ":" in stripped
            and stripped.split(":")[0].isidentifier()
        ):
            if pending:
                out[(cls, stripped.split(":")[0])] = " ".join(pending)
            pending = []
        elif stripped and not stripped.startswith("#"):
            pending = []
    return out


def inventory_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of an inventory file."""
    from pydantic import TypeAdapter  # the CLI's `schema` only: workflows never need it

    schema: dict[str, Any] = TypeAdapter(model.Inventory).json_schema(mode="validation")
    comments = field_comments()
    classes = {
        c.__name__: c for c in vars(model).values() if isinstance(c, type) and dataclasses.is_dataclass(c)
    }
    defs: dict[str, dict[str, Any]] = schema.get("$defs", {})
    for name, d in [("Inventory", schema), *defs.items()]:
        if d.get("type") != "object" or "properties" not in d:
            continue
        d["additionalProperties"] = False
        for cls_name, fld in INTERNAL:
            if cls_name == name:
                d["properties"].pop(fld, None)
                if fld in d.get("required", []):
                    d["required"].remove(fld)
        if name in KINDS and "kind" in d["properties"]:
            d["properties"]["kind"] = {"enum": list(KINDS[name]), "title": "Kind"}
        for fld, prop in d["properties"].items():
            text = comments.get((name, fld))
            if text:
                prop["description"] = text
        doc = (classes[name].__doc__ or "").strip() if name in classes else ""
        if doc.startswith(f"{name}("):  # the signature dataclasses make up without a docstring
            d.pop("description", None)
        elif doc:
            d["description"] = doc
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = SCHEMA_ID
    schema["title"] = "zerodown site inventory"
    return schema
