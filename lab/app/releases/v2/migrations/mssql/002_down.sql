-- Undo 002_up.sql for SQL Server (drops the notes written by 2.0.0).
IF EXISTS (SELECT 1 FROM sys.columns WHERE object_id = OBJECT_ID(N'dbo.items') AND name = N'notes')
    ALTER TABLE dbo.items DROP COLUMN notes;
GO
