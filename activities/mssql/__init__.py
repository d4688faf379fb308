"""SQL Server (`kind: mssql`): the same database verbs as MariaDB's, through aioodbc.

    connect.py     the ODBC connection string (FreeTDS or Microsoft's driver 18), running a
                   batch to its end with every message, the error policy (native numbers),
                   the writable primary (availability groups, mirroring)
    scripts.py     T-SQL scripts split on GO as sqlcmd does
    backup.py      BACKUP / RESTORE VERIFYONLY / RESTORE (a copy, over the live database,
                   keeping tables), dropping a copy, table checksums, size and room,
                   schema_version
    migrations.py  a migration's batches in one transaction with its schema_version row

The workflows call the `db_*` activities of activities/mysql, which hand a `kind: mssql`
database to these functions (one activity per verb, whatever the database: a stored history
replays whichever kind it ran on). Results are the MariaDB adapter's dataclasses.
"""

from __future__ import annotations

# The submodules are imported where they are used (`from activities.mssql import backup`):
# scripts.py alone is needed by the package checks, without the ODBC driver.
