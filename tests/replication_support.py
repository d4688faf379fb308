"""What the tests of the lab's warm MariaDB server (tests/test_lab_replication.py) and those of
the product's warm-replica adapter against it (tests/test_adapter_replication.py) share: the
site's database (the warm server emptied before and after the module), an ActivityEnvironment
(recording heartbeats, or as the retry of an attempt that left a heartbeat), the warm server
as the admin account reaches it, the state of the adapter's record there, and the warm server
brought to replicating."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
from temporalio.testing import ActivityEnvironment

from activities import mysql, replication
from activities.mysql import DbRequest
from inventory.load import load_inventory
from inventory.model import Database, DatabaseEndpoint
from lab import mariadb as lab_mariadb
from lab.config import LabConfig


@pytest.fixture(scope="module")
async def db(lab: LabConfig) -> AsyncIterator[Database]:
    await asyncio.to_thread(lab_mariadb.reset_warm, lab)
    database = load_inventory(lab.site_yaml).databases[0]
    assert database.warm_replica == DatabaseEndpoint(host="127.0.0.1", port=lab.warm_db_port)
    yield database
    await asyncio.to_thread(lab_mariadb.reset_warm, lab)


def activity_env(beats: list[Any] | None = None, previous: Any = None) -> ActivityEnvironment:
    env = ActivityEnvironment()
    if beats is not None:
        env.on_heartbeat = lambda *d: beats.append(d[0] if d else None)
    if previous is not None:  # a retry: the previous attempt's last heartbeat
        env.info = dataclasses.replace(env.info, attempt=2, heartbeat_details=[previous])
    return env


def warm_admin(db: Database) -> Database:
    assert db.warm_replica is not None
    return mysql.admin_at(db, db.warm_replica)


async def record_state(db: Database) -> str | None:
    record = await replication._read_record(warm_admin(db))
    return record.state if record else None


async def replicating(lab: LabConfig, db: Database) -> None:
    """The warm server initialised and replicating (from empty when it is anything else)."""
    if await record_state(db) not in (None, replication.REPLICATING):
        await asyncio.to_thread(lab_mariadb.reset_warm, lab)
    st = await activity_env().run(replication.db_init_warm_replica, DbRequest(db))
    assert st.running
