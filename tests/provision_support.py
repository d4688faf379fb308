"""What the tests of the lab's provisioning (tests/test_lab_provision.py) and those of the
product's provisioning adapter against it (tests/test_adapter_provision.py) share: the lab's
inventory (the module's pooled SSH connections closed after it), the names a test provisions
(destroyed afterwards), an ActivityEnvironment, an inventory of the command kind written next
to the lab's and a command template running the lab's provisioning CLI."""

from __future__ import annotations

import shlex
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import yaml
from temporalio.testing import ActivityEnvironment

from activities import ssh
from inventory.load import load_inventory
from inventory.model import Inventory
from lab import provision as lab_provision
from lab.config import LabConfig


@pytest.fixture(scope="module")
async def inv(lab: LabConfig) -> AsyncIterator[Inventory]:
    yield load_inventory(lab.site_yaml)
    await ssh.POOL.close_all()


@pytest.fixture
def created(lab: LabConfig) -> Iterator[list[str]]:
    """Names a test provisions; whatever is left of them is destroyed afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        lab_provision.destroy_node(lab, name)


def activity_env() -> ActivityEnvironment:
    return ActivityEnvironment()


def command_inventory(lab: LabConfig, **provisioning: Any) -> Inventory:
    """The lab's site.yaml with `provisioning` replaced, written next to it (so its relative
    paths still hold) and loaded."""
    raw = yaml.safe_load(lab.site_yaml.read_text(encoding="utf-8"))
    raw["provisioning"] = provisioning
    path = lab.abs_root / "provision-test-site.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return load_inventory(path)


def lab_cli(action: str) -> str:
    """A command template running the lab's provisioning CLI on the lab in the command's
    folder (the inventory's: the lab root)."""
    template = " --template {template}" if action == "create" else ""
    return f"{shlex.quote(sys.executable)} -m lab.provision {action} --root .{template} --name {{name}}"
