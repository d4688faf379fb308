"""The example inventory (examples/site.example.yaml) as tests load and bend it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from inventory.load import parse_inventory
from inventory.model import InventoryError

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "site.example.yaml"


def example() -> dict[str, Any]:
    """The example as plain data, to change before parsing."""
    raw: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return raw


def problems_of(raw: Any) -> list[str]:
    """What `parse_inventory` refuses in `raw` (it must refuse)."""
    with pytest.raises(InventoryError) as info:
        parse_inventory(raw, base_dir=EXAMPLE.parent)
    return info.value.problems
