"""SQL Server (`kind: mssql`) on the default profile's Linux nodes end to end: the lab's TDS
stand-in (lab/mssql) in front of the lab's MariaDB, reached through aioodbc and the real
FreeTDS driver, under the probe with writes. Secret Server's own procedures on SQL Server
run on its whole stack (Windows nodes, the F5): tests/test_e2e_secret_server.py."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError

from inventory.load import load_inventory
from lab import mariadb as lab_mariadb
from lab.config import LabConfig
from tests.e2e_support import assert_no_write_lost, probe, served_versions, snapshot
from tests.ss_support import wf_id
from workflows.major_maintenance_window import MajorMaintenanceInput, MajorMaintenanceWindowWorkflow
from workflows.rolling_deploy import RollingDeployInput, RollingDeployResult, RollingDeployWorkflow


def mssql_lab(lab: LabConfig) -> LabConfig:
    return dataclasses.replace(lab, db="mssql")


async def test_rolling_deploy_on_sql_server_and_a_package_for_the_other_database_refused(
    fresh_lab: LabConfig, client: Client, lab_worker: str, tmp_path: Path
) -> None:
    lab = fresh_lab
    inv = load_inventory(mssql_lab(lab).site_yaml)
    # The MariaDB release (its migration is MariaDB SQL): refused before anything is touched.
    before = await snapshot(lab)
    with pytest.raises(WorkflowFailureError) as info:
        await client.execute_workflow(
            RollingDeployWorkflow.run,
            RollingDeployInput(inventory=inv, package_path=str(lab.package(2, "mariadb"))),
            id=wf_id("mssql-wrong-sql"),
            task_queue=lab_worker,
            execution_timeout=timedelta(minutes=2),
        )
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "PreflightFailed"
    assert "written for MariaDB / MySQL, the inventory's database is SQL Server" in str(cause)
    assert (await snapshot(lab)).servers == before.servers and lab_mariadb.schema_version(lab) == 1
    # The SQL Server release: backup over TDS, the T-SQL migration, node by node.
    with probe(lab, tmp_path) as run:
        result: RollingDeployResult = await client.execute_workflow(
            RollingDeployWorkflow.run,
            RollingDeployInput(inventory=inv, package_path=str(lab.package(2, "mssql"))),
            id=wf_id("mssql-rolling"),
            task_queue=lab_worker,
            execution_timeout=timedelta(minutes=5),
        )
    assert run.summary["failed"] == 0, run.failures()[:5]
    assert_no_write_lost(lab, run)
    assert await served_versions(lab) == {lab.node_name(i): "2.0.0" for i in lab.node_indexes}
    assert lab_mariadb.schema_version(lab) == 2
    assert result.db_backup is not None and result.db_backup.endswith(".bak")


async def test_major_maintenance_window_refuses_sql_server_in_preflight(
    fresh_lab: LabConfig, client: Client, lab_worker: str
) -> None:
    lab = fresh_lab
    inv = load_inventory(mssql_lab(lab).site_yaml)
    with pytest.raises(WorkflowFailureError) as info:
        await client.execute_workflow(
            MajorMaintenanceWindowWorkflow.run,
            MajorMaintenanceInput(inventory=inv, package_path=str(lab.package(2, "mssql"))),
            id=wf_id("mssql-mmw"),
            task_queue=lab_worker,
            execution_timeout=timedelta(minutes=2),
        )
    cause = info.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "PreflightFailed"
    assert "databases[0] main is mssql: the warm replica (steps 5-6, 20-22, 30) is MariaDB / MySQL" in str(
        cause
    )
