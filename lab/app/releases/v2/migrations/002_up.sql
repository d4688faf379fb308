-- 2.0.0: items get an optional notes column. Additive, so 1.0.0 code keeps working.
-- schema_version is recorded by the deployer, not here.
-- The lab's fault-injection hook (lab.mariadb.inject_migration_failure, `zerodown lab inject
-- migration-fail`): with a row (this database, 'migration-2') in zdlab.faults the subquery
-- returns two rows and the statement fails (error 1242) before anything is changed; without
-- one it only sets a session variable. (Not DO: DO turns the error into a warning.) A
-- customer's migration has no such line.
SET @zerodown_lab_fault = (SELECT 1 FROM zdlab.faults WHERE target = DATABASE() AND point = 'migration-2' UNION ALL SELECT 1 FROM zdlab.faults WHERE target = DATABASE() AND point = 'migration-2');
ALTER TABLE items ADD COLUMN IF NOT EXISTS notes VARCHAR(200) NULL;
