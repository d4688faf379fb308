"""SQL Server's own messages, as the lab stand-in sends them: number, severity, text.

Source: Microsoft Learn, "Database engine events and errors"
(https://learn.microsoft.com/sql/relational-databases/errors-events/database-engine-events-and-errors-0-to-999
and the pages for 1000-1999 ... 40000-49999), which give each message's number, severity
and text with its printf-style placeholders (%ls, %.*ls, %d, %I64d). Only facts carry over:
the numbers, severities and texts below. Where SQL Server reports a failed BACKUP/RESTORE it
sends the specific message first and 3013 "... is terminating abnormally." after it (the
"pair"), both severity 16; the stand-in does the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from lab.mssql.results import Message


@dataclass(frozen=True)
class Template:
    number: int
    severity: int
    text: str  # placeholders already in Python's {} form, named after the documented ones

    def __call__(self, line: int = 1, state: int = 1, **values: object) -> Message:
        return Message(self.number, self.severity, self.text.format(**values), state=state, line=line)


# 0-999
SYNTAX_NEAR = Template(102, 15, "Incorrect syntax near '{near}'.")
SYNTAX_NEAR_KEYWORD = Template(156, 15, "Incorrect syntax near the keyword '{near}'.")
INVALID_COLUMN = Template(207, 16, "Invalid column name '{column}'.")
INVALID_OBJECT = Template(208, 16, "Invalid object name '{name}'.")
SUBQUERY_ROWS = Template(
    512,
    16,
    "Subquery returned more than 1 value. This is not permitted when the subquery follows =, !=, <, "
    "<= , >, >= or when the subquery is used as an expression.",
)
NO_SUCH_DATABASE = Template(
    911, 16, "Database '{name}' does not exist. Make sure that the name is entered correctly."
)
SINGLE_USER_OPEN = Template(
    924, 14, "Database '{name}' is already open and can only have one user at a time."
)
# 1000-1999
DEADLOCK = Template(
    1205,
    13,
    "Transaction (Process ID {spid}) was deadlocked on lock resources with another process and has "
    "been chosen as the deadlock victim. Rerun the transaction.",
)
LOCK_TIMEOUT = Template(1222, 16, "Lock request time out period exceeded.")
DATABASE_EXISTS = Template(1801, 16, "Database '{name}' already exists. Choose a different database name.")
FILE_IN_USE = Template(
    1834, 16, "The file '{path}' cannot be overwritten.  It is being used by database '{name}'."
)
INDEX_EXISTS = Template(
    1913,
    16,
    "The operation failed because an index or statistics with name '{index}' already exists "
    "on table '{table}'.",
)
# 2000-2999
COLUMN_TWICE = Template(
    2705,
    16,
    "Column names in each table must be unique. Column name '{column}' in table '{table}' is specified "
    "more than once.",
)
OBJECT_EXISTS = Template(2714, 16, "There is already an object named '{name}' in the database.")
DUPLICATE_KEY = Template(
    2627,
    14,
    "Violation of PRIMARY KEY constraint '{constraint}'. Cannot insert duplicate key in object '{table}'. "
    "The duplicate key value is {value}.",
)
NO_SUCH_PROCEDURE = Template(2812, 16, "Could not find stored procedure '{name}'.")
# 3000-3999: BACKUP and RESTORE
BACKUP_DONE = Template(
    3014, 0, "{verb} successfully processed {pages} pages in {seconds} seconds ({rate} MB/sec)."
)
TERMINATING = Template(3013, 16, "{verb} is terminating abnormally.")
IN_TRANSACTION = Template(3021, 16, "Cannot perform a backup or restore operation within a transaction.")
IN_USE = Template(3101, 16, "Exclusive access could not be obtained because the database is in use.")
OTHER_DATABASE = Template(
    3154, 16, "The backup set holds a backup of a database other than the existing '{name}' database."
)
MOVE_NEEDED = Template(
    3156,
    16,
    "File '{logical}' cannot be restored to '{path}'. "
    "Use WITH MOVE to identify a valid location for the file.",
)
TAIL_OF_LOG = Template(
    3159,
    16,
    'The tail of the log for the database "{name}" has not been backed up. Use BACKUP LOG WITH NORECOVERY '
    "to backup the log if it contains work you do not want to lose. Use the WITH REPLACE or WITH STOPAT "
    "clause of the RESTORE statement to just overwrite the contents of the log.",
)
PLANNING_FAILED = Template(
    3119,
    16,
    "Problems were identified while planning for the RESTORE statement. Previous messages provide details.",
)
DAMAGED = Template(3189, 16, "Damage to the backup set was detected.")
CANNOT_OPEN_DEVICE = Template(3201, 16, "Cannot open backup device '{path}'. Operating system error {error}.")
NOT_PART_OF = Template(
    3234,
    16,
    "Logical file '{logical}' is not part of database '{name}'. Use RESTORE FILELISTONLY to list the "
    "logical file names.",
)
SET_VALID = Template(3262, 0, "The backup set on file {file} is valid.")
CANNOT_DROP = Template(
    3701, 11, "Cannot drop the {what} '{name}', because it does not exist or you do not have permission."
)
DROP_IN_USE = Template(3702, 16, 'Cannot drop database "{name}" because it is currently in use.')
# 4000-5999
PROCESSED = Template(
    4035, 0, "Processed {pages} pages for database '{name}', file '{logical}' on file {file}."
)
NO_SUCH_COLUMN_TO_DROP = Template(
    4924, 16, "ALTER TABLE DROP COLUMN failed because column '{column}' does not exist in table '{table}'."
)
CANNOT_OPEN_AT_LOGIN = Template(
    4060, 11, 'Cannot open database "{name}" requested by the login. The login failed.'
)
CHANGED_DATABASE = Template(5701, 0, "Changed database context to '{name}'.")
CHANGED_LANGUAGE = Template(5703, 0, "Changed language setting to {language}.")
# 6000-6999: KILL
KILL_SELF = Template(6104, 16, "Cannot use KILL to kill your own process.")
KILL_NOT_ACTIVE = Template(6106, 16, "Process ID {spid} is not an active process ID.")
# 18000-18999
LOGIN_FAILED = Template(18456, 14, "Login failed for user '{user}'.")
# 40000-49999: what SQL Server answers for a statement it does not support. The stand-in uses
# it for T-SQL outside the subset it translates (lab/mssql/README.md lists the subset).
NOT_SUPPORTED = Template(
    40517, 16, "Keyword or statement option '{keyword}' is not supported in this version of SQL Server."
)
# RAISERROR / THROW with a message text: number 50000 (RAISERROR) or the given one (THROW).
USER_ERROR = Template(50000, 16, "{text}")
