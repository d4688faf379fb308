"""What the Secret Server end-to-end tests (ss-rolling, ss-load-balanced) share: the temporal
CLI, table checksums, Version Guard on or off, a gate awaited, workflow ids."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

from temporalio.client import WorkflowHandle

import activities.app_admin as app_admin
import activities.mysql as mysql
from inventory.model import Inventory
from workflows.gates import PendingGate
from workflows.timeline import Progress

TEMPORAL = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "temporal")


def wf_id(name: str) -> str:
    return f"e2e-ss-{name}-{uuid.uuid4().hex[:8]}"


async def enforce_version_match(inv: Inventory, on: bool) -> None:
    """Secret Server shows the version mismatch page: the lab app does too once enforced."""
    assert inv.application.admin is not None
    await app_admin.set_settings(
        app_admin.SettingsRequest(
            base_url=inv.nodes[0].url, admin=inv.application.admin, scope="site", enforce_version_match=on
        )
    )
    await asyncio.sleep(0.6)  # nodes cache the settings for up to half a second


async def wait_gate(handle: WorkflowHandle[Any, Any], gate: str, timeout_s: float = 180) -> PendingGate:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        try:
            for g in await handle.query("pending_gates", result_type=list[PendingGate]):
                if g.gate == gate:
                    return g
        except Exception:  # no worker answered yet
            pass
        await asyncio.sleep(0.2)
    progress = await handle.query("progress", result_type=Progress)
    raise AssertionError(
        f"gate {gate} never opened; phase {progress.phase}; last steps "
        f"{[(s.name, s.result, s.detail) for s in progress.steps[-3:]]}"
    )


async def checksums(inv: Inventory) -> dict[str, str]:
    sums = await mysql.table_checksums(inv.databases[0])
    return {t: c for t, c in sums.items() if t != "tbAudit"}
