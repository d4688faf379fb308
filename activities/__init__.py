"""Activities: every touch of the world, one small typed verb each (see ARCHITECTURE.md).

`ALL_ACTIVITIES` is what the worker registers. Workflows should import the request /
result dataclasses and the activity functions from the submodules inside
`workflow.unsafe.imports_passed_through()` (they pull in asyncssh, aiomysql, aiohttp).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from activities.app_admin import (
    app_admin_state,
    app_record_audit,
    app_set_settings,
    app_wait_settings,
)
from activities.deploy import (
    backup_app_folder,
    build_upgrade_zip,
    deploy_package,
    generate_sql_script,
    inspect_package,
    restore_app_folder,
)
from activities.f5 import lb_service_down_action
from activities.facts import read_database_version, read_node_facts
from activities.haproxy import (
    lb_add_server,
    lb_check_member,
    lb_del_server,
    lb_guard,
    lb_member_state,
    lb_preview_check,
    lb_set_maintenance,
    lb_set_state,
    lb_wait_drained,
    lb_wait_up,
)
from activities.http_checks import check_health, check_login, check_serving, get_version, wait_healthy
from activities.mysql import (
    check_backup_space,
    db_apply_migration,
    db_backup,
    db_changed_since,
    db_drop_database,
    db_restore,
    db_restore_keeping,
    db_schema_version,
)
from activities.node import (
    count_open_sessions,
    inspect_node_storage,
    recycle_service,
    run_node_command,
    service_status,
    set_config_values,
    set_health_file,
    start_service,
    stop_service,
)
from activities.ox import OX_ACTIVITIES
from activities.provision import PROVISION_ACTIVITIES
from activities.replication import REPLICATION_ACTIVITIES
from activities.ssh import ssh_probe
from activities.staging import clear_staging, stage_app_backup

ALL_ACTIVITIES: list[Callable[..., Any]] = [
    # ssh / node service
    ssh_probe,
    stop_service,
    start_service,
    service_status,
    recycle_service,
    inspect_node_storage,
    set_health_file,
    set_config_values,
    run_node_command,
    count_open_sessions,
    # prerequisite facts (Version Guard rules)
    read_node_facts,
    read_database_version,
    # load balancer
    lb_member_state,
    lb_check_member,
    lb_set_state,
    lb_wait_drained,
    lb_wait_up,
    lb_service_down_action,
    lb_add_server,
    lb_del_server,
    lb_set_maintenance,
    lb_preview_check,
    lb_guard,
    # database
    db_schema_version,
    db_apply_migration,
    db_backup,
    db_changed_since,
    db_restore,
    db_restore_keeping,
    db_drop_database,
    check_backup_space,
    # the warm replica (seed 004): init, in sync, writes stopped, stop, promote, release
    *REPLICATION_ACTIVITIES,
    # packages and app folders
    inspect_package,
    backup_app_folder,
    deploy_package,
    restore_app_folder,
    build_upgrade_zip,
    generate_sql_script,
    # staging copy
    stage_app_backup,
    clear_staging,
    # HTTP checks
    check_health,
    wait_healthy,
    get_version,
    check_login,
    check_serving,
    # the application's admin interface
    app_admin_state,
    app_set_settings,
    app_wait_settings,
    app_record_audit,
    # Open-Xchange tools and properties (over SSH)
    *OX_ACTIVITIES,
    # servers that come and go (create / start / destroy, server arrays) and saved settings
    *PROVISION_ACTIVITIES,
]

__all__ = ["ALL_ACTIVITIES"]
