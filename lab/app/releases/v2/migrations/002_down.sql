-- Undo 002_up.sql (drops the notes written by 2.0.0).
ALTER TABLE items DROP COLUMN IF EXISTS notes;
