"""MariaDB / MySQL: versions, migrations, logical backup and restore, replication.

One module per job:

    connect.py     connecting (aiomysql), the query helpers, the error policy (what is
                   retryable), schema_version / db_schema_version, table checksums,
                   admin_at, replica_status
    migrations.py  migrations: split_sql, apply_migration and the db_apply_migration
                   activity, MigrationRequest / MigrationResult
    dump.py        logical backup and restore (mariadb-dump / mariadb) and dump parsing:
                   db_backup, db_restore, db_restore_keeping, db_drop_database,
                   check_backup_space

(`connect.py`, not `connection.py`: `connection` is the connection context manager, which
`mysql.connection(db)` must keep naming; a submodule of that name would be shadowed by it.)
migrations and dump use connect, never each other. Every name the workflows,
activities/replication.py and the tests use is re-exported here, so `import activities.mysql
as mysql; mysql.X` and `from activities.mysql import X` work as they did for the single
module. Workflows also import the submodules (the sandbox resolves a dataclass's type hints
through sys.modules[its module]).
"""

from __future__ import annotations

from activities.mysql.connect import (
    POLL_S,
    DbRequest,
    ReplicaStatus,
    admin_at,
    base_tables,
    connection,
    db_schema_version,
    query,
    query_dicts,
    replica_status,
    schema_version,
    table_checksums,
)
from activities.mysql.dump import (
    BACKUP_SPACE_SLACK,
    BackupRequest,
    BackupSpace,
    BackupSpaceRequest,
    DbBackup,
    DbRestoreResult,
    DropDatabaseRequest,
    DropDatabaseResult,
    RestoreKeepingRequest,
    backup,
    backup_space,
    check_backup_space,
    db_backup,
    db_changed_since,
    db_drop_database,
    db_restore,
    db_restore_keeping,
    db_size_bytes,
    drop_database,
    restore,
    restore_keeping,
)

# Private names the tests reach as `mysql._x`.
from activities.mysql.dump import _keep_paths as _keep_paths
from activities.mysql.dump import _load_backup as _load_backup
from activities.mysql.dump import _option_file as _option_file
from activities.mysql.dump import _private_dir as _private_dir
from activities.mysql.dump import _run_client as _run_client
from activities.mysql.dump import _save_kept as _save_kept
from activities.mysql.migrations import (
    MigrationDirection,
    MigrationRequest,
    MigrationResult,
    apply_migration,
    db_apply_migration,
    split_sql,
)

__all__ = [
    "BACKUP_SPACE_SLACK",
    "POLL_S",
    "BackupRequest",
    "BackupSpace",
    "BackupSpaceRequest",
    "DbBackup",
    "DbRequest",
    "DbRestoreResult",
    "DropDatabaseRequest",
    "DropDatabaseResult",
    "MigrationDirection",
    "MigrationRequest",
    "MigrationResult",
    "ReplicaStatus",
    "RestoreKeepingRequest",
    "admin_at",
    "apply_migration",
    "backup",
    "backup_space",
    "base_tables",
    "check_backup_space",
    "connection",
    "db_apply_migration",
    "db_backup",
    "db_changed_since",
    "db_drop_database",
    "db_restore",
    "db_restore_keeping",
    "db_schema_version",
    "db_size_bytes",
    "drop_database",
    "query",
    "query_dicts",
    "replica_status",
    "restore",
    "restore_keeping",
    "schema_version",
    "split_sql",
    "table_checksums",
]
