-- 2.0.0: items get an optional notes column. Additive, so 1.0.0 code keeps working.
-- schema_version is recorded by the deployer, not here.
ALTER TABLE items ADD COLUMN IF NOT EXISTS notes VARCHAR(200) NULL;
