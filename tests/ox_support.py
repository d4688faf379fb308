"""Helpers for the Open-Xchange procedures' tests on the session lab's OX part."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta
from typing import Any

from temporalio.client import Client, WorkflowHandle

from inventory.load import load_inventory
from inventory.model import Inventory
from lab.config import LabConfig
from lab.manager import reset_ox
from lab.ox import configdb
from lab.ox import nodes as ox_nodes
from workflows.ox_upgradeschemata import OxUpgradeSchemataInput, OxUpgradeSchemataWorkflow

NEW_SERVER = "oxserver-xyz"
NEW_VERSION = "7.10.1"
APPROVER = "ops1"


def s(i: int) -> str:
    return configdb.schema_name(i)


def names(*idx: int) -> set[str]:
    return {s(i) for i in idx}


def ox_inventory(cfg: LabConfig, **approvers: tuple[str, ...]) -> Inventory:
    """ox-site.yaml, with the given approvers (gate name with '-' as '_') or ops1 for every gate."""
    inv = load_inventory(cfg.ox_site_yaml)
    gates = {k.replace("_", "-"): v for k, v in approvers.items()} or {
        "failure": (APPROVER,),
        "server-already-registered": (APPROVER,),
        "continue": (APPROVER,),
    }
    return dataclasses.replace(inv, approvers=gates)


async def ox_fresh(cfg: LabConfig, upgraded: tuple[int, ...] = (1,), runupdate_s: float = 0.0) -> None:
    """The OX part as after lab up (config DB, nodes at 7.10.0), then the packages of
    NEW_VERSION installed (not restarted) on the `upgraded` nodes, so ox-upgradeschemata
    finds an update node; runupdate takes `runupdate_s` per schema."""
    await reset_ox(cfg)
    await asyncio.to_thread(ox_nodes.set_runupdate_seconds, cfg, runupdate_s)
    for i in upgraded:
        await asyncio.to_thread(ox_nodes.oxpkg, cfg, i, "install", NEW_VERSION)


def states(cfg: LabConfig) -> dict[str, configdb.SchemaState]:
    return configdb.schema_states(cfg)


def old_server_id(cfg: LabConfig) -> int:
    return next(i for i, n in configdb.servers(cfg) if n == "oxserver")


def new_server_id(cfg: LabConfig) -> int | None:
    return next((i for i, n in configdb.servers(cfg) if n == NEW_SERVER), None)


def classify(cfg: LabConfig) -> dict[str, set[str]]:
    """What the config DB says of every schema: upgraded (done, enabled, on the new server),
    untouched (as created), failed_disabled / failed_enabled (update failed), reverted-like
    (failed, enabled, back on the old server) - checking that its contexts agree."""
    new_id, old_id = new_server_id(cfg), old_server_id(cfg)
    out: dict[str, set[str]] = {
        k: set()
        for k in (
            "upgraded",
            "untouched",
            "failed_disabled",
            "failed_enabled_old",
            "failed_enabled_new",
            "other",
        )
    }
    for name, st in states(cfg).items():
        assert st.contexts_enabled == (st.contexts if st.enabled else 0), (name, st)
        assert st.context_servers == (st.server_id,), (name, st)
        if (st.update_state, st.enabled, st.server_id, st.version) == ("done", True, new_id, NEW_VERSION):
            out["upgraded"].add(name)
        elif (st.update_state, st.enabled, st.server_id, st.version) == (
            "none",
            True,
            old_id,
            configdb.DEFAULT_VERSION,
        ):
            out["untouched"].add(name)
        elif st.update_state == "failed" and not st.enabled:
            out["failed_disabled"].add(name)
        elif st.update_state == "failed" and st.server_id == old_id:
            out["failed_enabled_old"].add(name)
        elif st.update_state == "failed":
            out["failed_enabled_new"].add(name)
        else:
            out["other"].add(name)
    return {k: v for k, v in out.items() if v}


def schemata_input(cfg: LabConfig, inv: Inventory | None = None, **kw: Any) -> OxUpgradeSchemataInput:
    fields: dict[str, Any] = {
        "inventory": inv or ox_inventory(cfg),
        "server_name": NEW_SERVER,
        "update_node": "ox1",
        "admin_node": "ox2",
        "started_by": "starter",
        "failure_gate_timeout_s": 120.0,
        "gate_timeout_s": 120.0,
    }
    fields.update(kw)
    return OxUpgradeSchemataInput(**fields)


async def start_schemata(
    client: Client, task_queue: str, inp: OxUpgradeSchemataInput, wf_id: str
) -> WorkflowHandle[Any, Any]:
    return await client.start_workflow(
        OxUpgradeSchemataWorkflow.run,
        inp,
        id=wf_id,
        task_queue=task_queue,
        execution_timeout=timedelta(minutes=10),
    )
