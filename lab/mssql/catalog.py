"""The catalog the lab's SQL Server answers: sys.* views, INFORMATION_SCHEMA, @@ variables
and the metadata functions, substituted into a statement before it goes to MariaDB.

Names and columns follow Microsoft Learn ("System catalog views", "sys.databases",
"sys.database_files", "sys.dm_exec_requests", "sys.dm_exec_sessions",
"sys.dm_hadr_availability_replica_states", "sys.availability_replicas",
"sys.availability_groups", "sys.dm_hadr_database_replica_states",
"sys.database_mirroring", "sys.dm_os_volume_stats", "OBJECT_ID", "COL_LENGTH",
"CHECKSUM_AGG", "BINARY_CHECKSUM"). A view becomes a derived table: over
information_schema for the tables of the session's database, or literal rows for what only
the stand-in knows (its databases, sessions, availability state). Only the columns listed
below exist; a script that reads another gets MariaDB's unknown column as SQL Server's 207.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lab.mssql import messages as msg
from lab.mssql.tsql import Token, TsqlError, literal, quote_ident, quote_string, rows_table, strip_name

# object_id of a table: stable for its name (SQL Server's are arbitrary ints).
OBJECT_ID_SQL = "(CRC32(LOWER({name})) & 2147483647)"

_TABLES = (
    "(SELECT TABLE_NAME AS name, "
    + OBJECT_ID_SQL.format(name="TABLE_NAME")
    + " AS object_id, 1 AS schema_id, "
    "0 AS principal_id, 0 AS parent_object_id, 'U' AS type, 'USER_TABLE' AS type_desc, "
    "CREATE_TIME AS create_date, "
    "IFNULL(UPDATE_TIME, CREATE_TIME) AS modify_date, 0 AS is_ms_shipped "
    "FROM information_schema.TABLES WHERE TABLE_SCHEMA = {db} AND TABLE_TYPE = 'BASE TABLE')"
)
_OBJECTS = (
    "(SELECT TABLE_NAME AS name, "
    + OBJECT_ID_SQL.format(name="TABLE_NAME")
    + " AS object_id, 1 AS schema_id, "
    "0 AS parent_object_id, IF(TABLE_TYPE = 'VIEW', 'V', 'U') AS type, "
    "IF(TABLE_TYPE = 'VIEW', 'VIEW', 'USER_TABLE') AS type_desc, CREATE_TIME AS create_date, "
    "0 AS is_ms_shipped "
    "FROM information_schema.TABLES WHERE TABLE_SCHEMA = {db})"
)
_COLUMNS = (
    "(SELECT " + OBJECT_ID_SQL.format(name="TABLE_NAME") + " AS object_id, COLUMN_NAME AS name, "
    "ORDINAL_POSITION AS column_id, IF(IS_NULLABLE = 'YES', 1, 0) AS is_nullable, "
    "IF(EXTRA LIKE '%auto_increment%', 1, 0) AS is_identity, 0 AS is_computed, "
    "IF(CHARACTER_MAXIMUM_LENGTH > 8000, -1, IFNULL(CHARACTER_MAXIMUM_LENGTH, 8)) AS max_length "
    "FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = {db})"
)
_INDEXES = (
    "(SELECT DISTINCT " + OBJECT_ID_SQL.format(name="TABLE_NAME") + " AS object_id, "
    "IF(INDEX_NAME = 'PRIMARY', CONCAT('PK_', TABLE_NAME), INDEX_NAME) AS name, "
    "IF(NON_UNIQUE = 0, 1, 0) AS is_unique, IF(INDEX_NAME = 'PRIMARY', 1, 0) AS is_primary_key, "
    "IF(INDEX_NAME = 'PRIMARY', 1, 2) AS type, "
    "IF(INDEX_NAME = 'PRIMARY', 'CLUSTERED', 'NONCLUSTERED') AS type_desc "
    "FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = {db})"
)
_IS_TABLES = (
    "(SELECT {db} AS TABLE_CATALOG, 'dbo' AS TABLE_SCHEMA, TABLE_NAME, "
    "IF(TABLE_TYPE = 'VIEW', 'VIEW', 'BASE TABLE') AS TABLE_TYPE "
    "FROM information_schema.TABLES WHERE TABLE_SCHEMA = {db})"
)
_IS_COLUMNS = (
    "(SELECT {db} AS TABLE_CATALOG, 'dbo' AS TABLE_SCHEMA, TABLE_NAME, COLUMN_NAME, ORDINAL_POSITION, "
    "COLUMN_DEFAULT, IS_NULLABLE, DATA_TYPE, CHARACTER_MAXIMUM_LENGTH, NUMERIC_PRECISION, NUMERIC_SCALE "
    "FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = {db})"
)
_SQL_VIEWS = {
    "TABLES": _TABLES,
    "OBJECTS": _OBJECTS,
    "ALL_OBJECTS": _OBJECTS,
    "COLUMNS": _COLUMNS,
    "INDEXES": _INDEXES,
}
_INFORMATION_SCHEMA = {"TABLES": _IS_TABLES, "COLUMNS": _IS_COLUMNS}

# Words that cannot be a table alias after a derived table.
_NOT_ALIAS = frozenset(
    {
        "WHERE",
        "JOIN",
        "INNER",
        "LEFT",
        "RIGHT",
        "FULL",
        "CROSS",
        "OUTER",
        "ON",
        "ORDER",
        "GROUP",
        "HAVING",
        "UNION",
        "EXCEPT",
        "INTERSECT",
        "WITH",
        "OPTION",
        "FOR",
    }
)


@dataclass(frozen=True)
class View:
    """A view only the stand-in can answer: its columns and a function giving its rows."""

    columns: tuple[str, ...]
    # rows(database): the view's rows; `database` is the qualifier of [db].sys.view (None:
    # the session's database).
    rows: Callable[[str | None], list[tuple[Any, ...]]]


class Catalog:
    """Substitutes catalog references in a statement's tokens (before translation)."""

    def __init__(
        self,
        views: dict[str, View],
        variables: dict[str, Any],
        functions: dict[str, Callable[[list[Any]], Any]],
    ) -> None:
        self.views = views  # lower-case view name (sys.X) -> View
        self.variables = variables  # @@NAME (upper) -> value
        self.functions = functions  # NAME (upper) -> f(literal args) -> value

    def substitute(self, tokens: list[Token]) -> list[Token]:
        out: list[Token] = []
        i = 0
        while i < len(tokens):
            tok = tokens[i]
            # [db.]sys.view / INFORMATION_SCHEMA.view
            name, j = _dotted(tokens, i)
            if name is not None:
                raw = self._view(name, tokens, j, tok.line)
                if raw is not None:
                    text, j = raw
                    out.append(Token("raw", text, tok.line))
                    if not _alias_follows(tokens, j):
                        out.append(Token("raw", "AS " + quote_ident(name[-1]), tok.line))
                    i = j
                    continue
            if tok.kind == "var" and tok.text.startswith("@@"):
                key = tok.text.upper()
                if key not in self.variables:
                    raise TsqlError(
                        msg.Template(137, 15, 'Must declare the scalar variable "{name}".')(
                            line=tok.line, name=tok.text
                        )
                    )
                out.append(Token("raw", literal(self.variables[key]), tok.line))
                i += 1
                continue
            if tok.kind == "word" and tok.upper in self.functions and _at(tokens, i + 1, "("):
                args, j = _literal_args(tokens, i + 2)
                if args is not None:
                    out.append(Token("raw", literal(self.functions[tok.upper](args)), tok.line))
                    i = j
                    continue
            if tok.is_("OBJECT_ID") and _at(tokens, i + 1, "("):
                args, j = _literal_args(tokens, i + 2)
                if args:
                    db, table = strip_name(str(args[0]))
                    out.append(Token("raw", _object_id_of(db, table), tok.line))
                    i = j
                    continue
            if tok.is_("COL_LENGTH") and _at(tokens, i + 1, "("):
                args, j = _literal_args(tokens, i + 2)
                if args is not None and len(args) == 2:
                    _, table = strip_name(str(args[0]))
                    out.append(Token("raw", _col_length(table, str(args[1])), tok.line))
                    i = j
                    continue
            if tok.is_("CHECKSUM_AGG") and _checksum_of_star(tokens, i):
                out.append(Token("raw", "\x00CHECKSUM_AGG_BINARY_CHECKSUM_STAR", tok.line))
                i += 7  # CHECKSUM_AGG ( BINARY_CHECKSUM ( * ) )
                continue
            out.append(tok)
            i += 1
        return out

    def _view(self, name: list[str], tokens: list[Token], j: int, line: int) -> tuple[str, int] | None:
        schema, view = name[-2].upper(), name[-1]
        # [db].sys.tables: that database's tables, not the session's.
        db = quote_string(name[-3]) if len(name) >= 3 and name[-3] else "DATABASE()"
        if schema == "INFORMATION_SCHEMA":
            found = _INFORMATION_SCHEMA.get(view.upper())
            return (found.format(db=db), j) if found else None
        if schema != "SYS":
            return None
        key = view.lower()
        if key.upper() in _SQL_VIEWS:
            return _SQL_VIEWS[key.upper()].format(db=db), j
        v = self.views.get(key)
        if v is None:
            raise TsqlError(msg.INVALID_OBJECT(line=line, name=f"sys.{view}"))
        if _at(tokens, j, "("):  # a table-valued function: its arguments are ignored
            depth, k = 0, j
            while k < len(tokens):
                if _at(tokens, k, "("):
                    depth += 1
                elif _at(tokens, k, ")"):
                    depth -= 1
                    if depth == 0:
                        break
                k += 1
            j = k + 1
        return rows_table(list(v.columns), v.rows(name[-3] if len(name) >= 3 and name[-3] else None)), j


def _at(tokens: list[Token], i: int, op: str) -> bool:
    return i < len(tokens) and tokens[i].kind == "op" and tokens[i].text == op


def _dotted(tokens: list[Token], i: int) -> tuple[list[str] | None, int]:
    """[db.]schema.view at i: its parts when the schema is sys or INFORMATION_SCHEMA."""
    parts: list[str] = []
    j = i
    while j < len(tokens) and tokens[j].kind in ("word", "ident"):
        parts.append(tokens[j].text)
        j += 1
        if _at(tokens, j, ".") and j + 1 < len(tokens) and tokens[j + 1].kind in ("word", "ident"):
            j += 1
            continue
        break
    if (
        len(parts) >= 2
        and parts[-2].upper() in ("SYS", "INFORMATION_SCHEMA")
        and (i == 0 or not _at(tokens, i - 1, "."))
    ):
        return parts, j
    return None, i


def _alias_follows(tokens: list[Token], j: int) -> bool:
    if j >= len(tokens):
        return False
    t = tokens[j]
    if t.is_("AS"):
        return True
    return (t.kind == "word" and t.upper not in _NOT_ALIAS) or t.kind == "ident"


def _literal_args(tokens: list[Token], i: int) -> tuple[list[Any] | None, int]:
    """Literal arguments up to the matching ')': None when one is not a literal."""
    args: list[Any] = []
    while i < len(tokens):
        t = tokens[i]
        if t.kind == "op" and t.text == ")":
            return args, i + 1
        if t.kind == "op" and t.text == ",":
            i += 1
            continue
        if t.kind == "string":
            args.append(t.text)
        elif t.kind == "number":
            args.append(int(t.text) if t.text.isdigit() else t.text)
        elif t.is_("NULL"):
            args.append(None)
        else:
            return None, i
        i += 1
    return None, i


def _object_id_of(db: str | None, table: str) -> str:
    schema = literal(db) if db else "DATABASE()"
    return (
        "(SELECT " + OBJECT_ID_SQL.format(name="TABLE_NAME") + " FROM information_schema.TABLES "
        f"WHERE TABLE_SCHEMA = {schema} AND TABLE_NAME = {literal(table)})"
    )


def _col_length(table: str, column: str) -> str:
    return (
        "(SELECT IFNULL(IF(CHARACTER_OCTET_LENGTH > 8000, -1, CHARACTER_OCTET_LENGTH), 4) "
        "FROM information_schema.COLUMNS "
        f"WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = {literal(table)} "
        f"AND COLUMN_NAME = {literal(column)})"
    )


def _checksum_of_star(tokens: list[Token], i: int) -> bool:
    want = ["(", "BINARY_CHECKSUM", "(", "*", ")", ")"]
    got = [t.upper or t.text for t in tokens[i + 1 : i + 7]]
    return [g.upper() for g in got] == want


def checksum_expression(columns: list[tuple[str, str]]) -> str:
    """CHECKSUM_AGG(BINARY_CHECKSUM(*)) over `columns` ((name, MariaDB data type)): an int,
    independent of row order, NULL-tolerant, and like SQL Server's blind to duplicates
    cancelling out (both aggregate by XOR). BINARY_CHECKSUM skips text/ntext/image/xml
    (Learn); MariaDB's TEXT/BLOB are kept here, as they stand for nvarchar(max)/varbinary(max),
    which it includes."""
    if not columns:
        raise TsqlError(
            msg.Template(
                8184,
                16,
                "Error in binarychecksum. There are no comparable columns in the binarychecksum input.",
            )()
        )
    parts = ", ".join(f"IFNULL(HEX({quote_ident(c)}), '~')" for c, _ in columns)
    x = f"BIT_XOR(CRC32(CONCAT_WS('|', {parts})))"
    return f"CAST(IF({x} >= 2147483648, CAST({x} AS SIGNED) - 4294967296, {x}) AS SIGNED)"
