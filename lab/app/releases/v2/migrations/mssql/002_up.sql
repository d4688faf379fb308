-- 2.0.0 for SQL Server (the lab's `--db mssql` profile; 002_up.sql beside this one is the
-- MariaDB version): items get an optional notes column. Additive, so 1.0.0 code keeps
-- working. schema_version is recorded by the deployer, not here.
--
-- The lab's fault-injection hook (lab.mariadb.inject_migration_failure, `zerodown lab inject
-- migration-fail`): with a row (this database, 'migration-2') in zdlab.faults the batch
-- fails before anything is changed. A customer's script has no such lines.
IF EXISTS (SELECT 1 FROM zdlab.dbo.faults WHERE target = DB_NAME() AND point = N'migration-2')
    THROW 50001, N'lab fault injected: migration-2 fails on this database', 1;
GO

IF NOT EXISTS (SELECT 1 FROM sys.columns WHERE object_id = OBJECT_ID(N'dbo.items') AND name = N'notes')
BEGIN
    ALTER TABLE dbo.items ADD notes NVARCHAR(200) NULL;
END
GO
