"""The lab's warm MariaDB server (lab/mariadb.py) against the session lab: it starts empty,
its admin account works there and on the primary, `lab status` reports it; and the lab's reset
empties it again (the copied accounts too, the admin account kept) and points a node moved to
it back at the primary. The product's warm-replica adapter (activities/replication.py) against
it is tested in tests/test_adapter_replication.py.

Each test brings the warm server into the state it needs itself (`_replicating`, or the lab's
reset_warm), so any one of them runs alone; the module leaves the warm server empty.
"""

# ruff: noqa: F811  (the fixtures imported from tests.replication_support are named as test parameters)
from __future__ import annotations

import asyncio

from activities import mysql, replication
from activities.mysql import DbRequest
from inventory.model import Database
from lab import mariadb as lab_mariadb
from lab.config import LabConfig
from tests.replication_support import activity_env as _env
from tests.replication_support import db  # noqa: F401  (fixture)
from tests.replication_support import replicating as _replicating

# =========================================================================== the empty server


async def test_warm_server_starts_empty_and_the_admin_account_works(lab: LabConfig, db: Database) -> None:
    assert await asyncio.to_thread(lab_mariadb.warm_problems, lab) == []
    st = await mysql.replica_status(db, db.warm_replica)
    assert (st.configured, st.read_only, st.host, st.port) == (False, False, "127.0.0.1", lab.warm_db_port)
    # The admin account also works on the primary (it dumps every database from there).
    assert db.admin_user == lab_mariadb.ADMIN_USER
    rows = await mysql.query(mysql.admin_at(db), "SELECT CURRENT_USER()", use_database=False)
    assert rows[0][0] == f"{lab_mariadb.ADMIN_USER}@127.0.0.1"
    from lab.manager import lab_status

    row = next(r for r in await asyncio.to_thread(lab_status, lab, False) if r[0] == "mariadb warm")
    assert row[1] and "not replicating" in row[2] and "databases=none" in row[2], row


# =========================================================================== lab reset


async def test_lab_reset_empties_the_warm_server_and_points_nodes_back(lab: LabConfig, db: Database) -> None:
    from lab.manager import lab_reset

    await _replicating(lab, db)
    await _env().run(replication.db_promote_warm_replica, DbRequest(db))
    # The revert path moved node1 to the promoted server.
    conf = lab.node_dir(1) / "app" / "database.config"
    conf.write_text(conf.read_text().replace(f"port = {lab.primary_db_port}", f"port = {lab.warm_db_port}"))
    assert [p.name for p in lab_mariadb.nodes_on_warm(lab)] == [lab.node_name(1)]
    done = await lab_reset(lab)
    assert f"{lab.node_name(1)} pointed back at the primary" in done
    assert lab_mariadb.nodes_on_warm(lab) == []
    assert f"port = {lab.primary_db_port}" in conf.read_text()
    assert await asyncio.to_thread(lab_mariadb.warm_problems, lab) == []
    # The copied accounts went too; the admin account stayed.
    users = {u for u, _ in lab_mariadb.query(lab, "warm", "SELECT User, Host FROM mysql.user")}
    assert lab_mariadb.ADMIN_USER in users and "zerodown" not in users
