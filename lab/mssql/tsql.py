"""T-SQL for the lab's SQL Server: tokens, statements, and their MariaDB translation.

The stand-in understands the subset of T-SQL that upgrade scripts and zerodown's adapter use
(lab/mssql/README.md lists it) and forwards data statements to MariaDB. T-SQL needs no ';'
between statements, so a batch is split by its grammar: a statement ends at ';' or where the
next statement's first keyword stands at parenthesis depth 0 (with the exceptions the grammar
makes: UPDATE ... SET, INSERT ... SELECT, UNION SELECT, ALTER DATABASE ... SET). IF / ELSE and
BEGIN ... END nest. Lexical rules (Microsoft Learn, "Transact-SQL syntax conventions",
"Delimited identifiers", "Slash Star (Block Comment)"): '' inside a string is a quote,
block comments nest, [ ] and " " delimit identifiers, N'' is a Unicode literal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lab.mssql import messages as msg
from lab.mssql.results import Message


class TsqlError(Exception):
    """A statement the stand-in refuses, with SQL Server's message for it."""

    def __init__(self, message: Message, *more: Message, raiserror: bool = False) -> None:
        super().__init__(message.text)
        self.message = message
        self.more = more  # what follows it (e.g. 3013 after a failed BACKUP / RESTORE)
        self.raiserror = raiserror  # RAISERROR: not subject to XACT_ABORT


@dataclass(frozen=True)
class Token:
    kind: str  # word, string, ident (delimited), number, op, var (@x / @@x), raw (MariaDB text)
    text: str
    line: int
    unicode: bool = False  # N'...'

    @property
    def upper(self) -> str:
        return self.text.upper() if self.kind == "word" else ""

    def is_(self, *words: str) -> bool:
        return self.kind == "word" and self.text.upper() in words


_WORD = re.compile(r"[A-Za-z_#][A-Za-z0-9_#$]*")
_NUMBER = re.compile(r"0x[0-9A-Fa-f]*|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+")
_VAR = re.compile(r"@@?[A-Za-z0-9_#$]*")
_OPS = ("<>", "!=", ">=", "<=", "!<", "!>", "+=", "-=", "*=", "/=", "::")


def tokenize(sql: str) -> list[Token]:
    tokens: list[Token] = []
    i, line, n = 0, 1, len(sql)
    while i < n:
        c = sql[i]
        if c == "\n":
            line += 1
            i += 1
        elif c.isspace():
            i += 1
        elif sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j
        elif sql.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if sql.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif sql.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            if depth:
                raise TsqlError(msg.Template(113, 15, "Missing end comment mark '*/'.")(line=line))
            line += sql.count("\n", i, j)
            i = j
        elif c == "'" or (c in "Nn" and sql.startswith("'", i + 1)):
            unicode = c != "'"
            j = i + (2 if unicode else 1)
            buf: list[str] = []
            while True:
                k = sql.find("'", j)
                if k < 0:
                    raise TsqlError(
                        msg.Template(105, 15, "Unclosed quotation mark after the character string '{s}'.")(
                            line=line, s=sql[j:]
                        )
                    )
                buf.append(sql[j:k])
                if sql.startswith("''", k):
                    buf.append("'")
                    j = k + 2
                    continue
                j = k + 1
                break
            text = "".join(buf)
            tokens.append(Token("string", text, line, unicode))
            line += sql.count("\n", i, j)
            i = j
        elif c in '["':
            close = "]" if c == "[" else '"'
            j, buf = i + 1, []
            while True:
                k = sql.find(close, j)
                if k < 0:
                    raise TsqlError(msg.SYNTAX_NEAR(line=line, near=sql[i : i + 20]))
                buf.append(sql[j:k])
                if sql.startswith(close * 2, k):
                    buf.append(close)
                    j = k + 2
                    continue
                j = k + 1
                break
            tokens.append(Token("ident", "".join(buf), line))
            i = j
        elif m := _VAR.match(sql, i):
            tokens.append(Token("var", m.group(), line))
            i = m.end()
        elif (m := _NUMBER.match(sql, i)) and m.group():
            tokens.append(Token("number", m.group(), line))
            i = m.end()
        elif m := _WORD.match(sql, i):
            tokens.append(Token("word", m.group(), line))
            i = m.end()
        else:
            op = next((o for o in _OPS if sql.startswith(o, i)), c)
            tokens.append(Token("op", op, line))
            i += len(op)
    return tokens


# --------------------------------------------------------------------------- statements

# Words that begin a statement: at depth 0 they end the statement before them.
STATEMENT_WORDS = frozenset(
    {
        "ALTER",
        "BACKUP",
        "BEGIN",
        "BREAK",
        "CHECKPOINT",
        "COMMIT",
        "CONTINUE",
        "CREATE",
        "DBCC",
        "DECLARE",
        "DELETE",
        "DENY",
        "DROP",
        "ELSE",
        "END",
        "EXEC",
        "EXECUTE",
        "GOTO",
        "GRANT",
        "IF",
        "INSERT",
        "KILL",
        "MERGE",
        "PRINT",
        "RAISERROR",
        "RESTORE",
        "RETURN",
        "REVOKE",
        "ROLLBACK",
        "SAVE",
        "SELECT",
        "SET",
        "THROW",
        "TRUNCATE",
        "UPDATE",
        "USE",
        "WAITFOR",
        "WHILE",
        "WITH",
    }
)


@dataclass
class Statement:
    """A simple statement: its tokens (no trailing ';')."""

    tokens: list[Token]

    @property
    def line(self) -> int:
        return self.tokens[0].line if self.tokens else 1

    @property
    def verb(self) -> str:
        return self.tokens[0].upper if self.tokens else ""

    def words(self, n: int) -> tuple[str, ...]:
        return tuple(t.upper for t in self.tokens[:n])


@dataclass
class If:
    condition: list[Token]
    then: Node
    otherwise: Node | None
    line: int


@dataclass
class Block:
    body: list[Node] = field(default_factory=list)
    line: int = 1


Node = Statement | If | Block


class _Parser:
    def __init__(self, tokens: list[Token]) -> None:
        self.t = tokens
        self.i = 0

    def peek(self, k: int = 0) -> Token | None:
        j = self.i + k
        return self.t[j] if j < len(self.t) else None

    def statements(self, until_end: bool = False) -> list[Node]:
        out: list[Node] = []
        while (tok := self.peek()) is not None:
            if tok.kind == "op" and tok.text == ";":
                self.i += 1
                continue
            if until_end and tok.is_("END"):
                return out
            out.append(self.statement())
        if until_end:
            raise TsqlError(
                msg.SYNTAX_NEAR(line=self.t[-1].line if self.t else 1, near=self.t[-1].text if self.t else "")
            )
        return out

    def statement(self) -> Node:
        tok = self.peek()
        assert tok is not None
        if tok.is_("IF"):
            self.i += 1
            cond = self._until_statement_word(first_free=True)
            if not cond:
                raise TsqlError(msg.SYNTAX_NEAR_KEYWORD(line=tok.line, near="IF"))
            if self.peek() is None:
                raise TsqlError(msg.SYNTAX_NEAR(line=cond[-1].line, near=cond[-1].text))
            then = self.statement()
            self._skip_semicolons()
            otherwise = None
            nxt = self.peek()
            if nxt is not None and nxt.is_("ELSE"):
                self.i += 1
                otherwise = self.statement()
            return If(cond, then, otherwise, tok.line)
        if tok.is_("BEGIN"):
            nxt = self.peek(1)
            if nxt is None or not nxt.is_("TRAN", "TRANSACTION", "DISTRIBUTED", "TRY", "CATCH"):
                self.i += 1
                body = self.statements(until_end=True)
                self.i += 1  # END
                return Block(body, tok.line)
            if nxt.is_("TRY", "CATCH"):
                raise TsqlError(msg.NOT_SUPPORTED(line=tok.line, keyword=f"BEGIN {nxt.text.upper()}"))
        if tok.is_("ELSE", "END"):
            raise TsqlError(msg.SYNTAX_NEAR_KEYWORD(line=tok.line, near=tok.text.upper()))
        self.i += 1
        rest = self._until_statement_word(verb=tok.upper)
        return Statement([tok, *rest])

    def _skip_semicolons(self) -> None:
        while (tok := self.peek()) is not None and tok.kind == "op" and tok.text == ";":
            self.i += 1

    def _until_statement_word(self, verb: str = "", first_free: bool = False) -> list[Token]:
        """Tokens up to ';' or the next statement's first word at depth 0."""
        out: list[Token] = []
        depth = 0
        seen_set = False
        while (tok := self.peek()) is not None:
            if tok.kind == "op":
                if tok.text == "(":
                    depth += 1
                elif tok.text == ")":
                    depth -= 1
                elif tok.text == ";" and depth == 0:
                    break
            elif (
                depth == 0
                and tok.kind == "word"
                and tok.upper in STATEMENT_WORDS
                and not (first_free and not out)
            ):
                w = tok.upper
                prev = out[-1] if out else None
                continues = (
                    (w == "SET" and verb in ("UPDATE", "ALTER") and not seen_set)
                    or (w == "SELECT" and verb == "INSERT")
                    or (
                        w == "SELECT" and prev is not None and prev.is_("UNION", "ALL", "EXCEPT", "INTERSECT")
                    )
                    or (w in ("WITH",) and verb in ("BACKUP", "RESTORE", "ALTER", "CREATE"))
                    or (w == "DELETE" and prev is not None and prev.is_("ON"))
                    or (w == "UPDATE" and prev is not None and prev.is_("ON", "FOR"))
                    or (w == "ROLLBACK" and prev is not None and prev.is_("WITH"))
                    or (w == "EXEC" and prev is not None and prev.is_("WITH"))
                    or (
                        w == "IF"
                        and verb in ("DROP", "ALTER")
                        and (nxt := self.peek(1)) is not None
                        and nxt.is_("EXISTS")
                    )
                )
                if w == "SET":
                    seen_set = True
                if not continues:
                    break
            out.append(tok)
            self.i += 1
        return out


def parse(sql: str) -> list[Node]:
    return _Parser(tokenize(sql)).statements()


# --------------------------------------------------------------------------- translation

# T-SQL type -> MariaDB type (lengths kept where both have them).
_TYPES = {
    "NVARCHAR": "VARCHAR",
    "NCHAR": "CHAR",
    "VARCHAR": "VARCHAR",
    "CHAR": "CHAR",
    "NTEXT": "LONGTEXT",
    "TEXT": "LONGTEXT",
    "DATETIME2": "DATETIME(6)",
    "DATETIME": "DATETIME(3)",
    "SMALLDATETIME": "DATETIME",
    "DATETIMEOFFSET": "DATETIME(6)",
    "BIT": "TINYINT(1)",
    "UNIQUEIDENTIFIER": "CHAR(36)",
    "MONEY": "DECIMAL(19,4)",
    "IMAGE": "LONGBLOB",
    "REAL": "FLOAT",
    "FLOAT": "DOUBLE",
}
_FUNCTIONS = {
    "GETDATE": "NOW(3)",
    "SYSDATETIME": "NOW(6)",
    "GETUTCDATE": "UTC_TIMESTAMP(3)",
    "SYSUTCDATETIME": "UTC_TIMESTAMP(6)",
    "NEWID": "UUID()",
}
_CAST_TYPES = {
    "INT": "SIGNED",
    "BIGINT": "SIGNED",
    "SMALLINT": "SIGNED",
    "TINYINT": "UNSIGNED",
    "BIT": "UNSIGNED",
    "NVARCHAR": "CHAR",
    "VARCHAR": "CHAR",
    "NCHAR": "CHAR",
    "CHAR": "CHAR",
    "FLOAT": "DOUBLE",
    "REAL": "DOUBLE",
    "DATETIME2": "DATETIME(6)",
    "DATETIME": "DATETIME(3)",
    "DATE": "DATE",
    "DECIMAL": "DECIMAL",
    "NUMERIC": "DECIMAL",
    "VARBINARY": "BINARY",
}
_RENAMED_FUNCTIONS = {"ISNULL": "IFNULL", "LEN": "CHAR_LENGTH", "COUNT_BIG": "COUNT"}


def quote_ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def quote_string(value: str) -> str:
    """A MariaDB string literal; the stand-in's sessions run with NO_BACKSLASH_ESCAPES."""
    return "'" + value.replace("'", "''") + "'"


def object_name(tokens: list[Token], start: int) -> tuple[list[str], int]:
    """A multi-part name ([db].[schema].[object], db..object) at `start`: (parts, next index)."""
    parts: list[str] = []
    i = start
    while i < len(tokens):
        tok = tokens[i]
        if tok.kind in ("word", "ident"):
            parts.append(tok.text)
            i += 1
        elif tok.kind == "op" and tok.text == "." and parts == []:
            parts.append("")
        else:
            break
        if i < len(tokens) and tokens[i].kind == "op" and tokens[i].text == ".":
            i += 1
            while i < len(tokens) and tokens[i].kind == "op" and tokens[i].text == ".":
                parts.append("")
                i += 1
            continue
        break
    return parts, i


def table_of(parts: list[str]) -> tuple[str | None, str]:
    """(database or None, table) of [db].[schema].[table]; the schema (dbo) is dropped: the
    stand-in keeps one schema per database."""
    if not parts:
        return None, ""
    table = parts[-1]
    db = parts[-3] if len(parts) >= 3 and parts[-3] else None
    return db, table


def strip_name(name: str) -> tuple[str | None, str]:
    """'dbo.items' / '[dbo].[items]' / 'db.dbo.items' (a string argument) -> (db, table)."""
    toks = tokenize(name)
    parts, _ = object_name(toks, 0)
    return table_of(parts)


def translate(tokens: list[Token]) -> str:
    """MariaDB text for T-SQL tokens: names, literals, types and the functions both have.
    Tokens of kind "raw" (the catalog's answers, lab/mssql/catalog.py) pass unchanged."""
    out: list[str] = []
    i = 0
    top: str | None = None
    while i < len(tokens):
        tok = tokens[i]
        if tok.kind == "raw":
            out.append(tok.text)
            i += 1
            continue
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if tok.kind == "string":
            out.append(quote_string(tok.text))
        elif tok.kind == "ident":
            if nxt is not None and nxt.kind == "op" and nxt.text == "." and tok.text.lower() == "dbo":
                i += 2
                continue
            out.append(quote_ident(tok.text))
        elif tok.kind == "word":
            u = tok.upper
            if u == "DBO" and nxt is not None and nxt.kind == "op" and nxt.text == ".":
                i += 2
                continue
            if (
                out
                and out[-1] == "."
                and nxt is not None
                and nxt.kind == "op"
                and nxt.text == "."
                and u == "DBO"
            ):
                i += 2
                continue
            if u == "TOP" and nxt is not None:
                # TOP (n) / TOP n -> LIMIT n at the end of the statement.
                if nxt.kind == "op" and nxt.text == "(" and i + 3 < len(tokens):
                    top, i = tokens[i + 2].text, i + 4
                else:
                    top, i = nxt.text, i + 2
                continue
            if i > 0 and tokens[i - 1].is_("AS") and u in _CAST_TYPES:
                # CAST(x AS BIGINT) / CONVERT: MariaDB casts to SIGNED, CHAR, DOUBLE, ...
                out.append(_CAST_TYPES[u])
                if (
                    nxt is not None
                    and nxt.kind == "op"
                    and nxt.text == "("
                    and u in ("INT", "BIGINT", "SMALLINT", "TINYINT", "BIT", "FLOAT", "REAL")
                ):
                    i += 4 if i + 3 < len(tokens) else 1
                    continue
                if (
                    u in ("NVARCHAR", "VARCHAR")
                    and nxt is not None
                    and i + 2 < len(tokens)
                    and tokens[i + 2].is_("MAX")
                ):
                    i += 4
                    continue
                i += 1
                continue
            if u in _FUNCTIONS and nxt is not None and nxt.kind == "op" and nxt.text == "(":
                out.append(_FUNCTIONS[u])
                i += 3
                continue
            if u in _RENAMED_FUNCTIONS and nxt is not None and nxt.kind == "op" and nxt.text == "(":
                out.append(_RENAMED_FUNCTIONS[u])
            elif u in _TYPES and _is_type_position(tokens, i):
                mapped = _TYPES[u]
                if nxt is not None and nxt.kind == "op" and nxt.text == "(" and i + 3 < len(tokens):
                    arg = tokens[i + 2]
                    if arg.is_("MAX"):
                        out.append("LONGTEXT" if u in ("NVARCHAR", "VARCHAR") else "LONGBLOB")
                        i += 4
                        continue
                    if "(" in mapped:  # DATETIME2(7) -> DATETIME(6): the precision is MariaDB's
                        out.append(mapped)
                        i += 4
                        continue
                out.append(mapped)
            elif u == "VARBINARY" and nxt is not None and i + 2 < len(tokens) and tokens[i + 2].is_("MAX"):
                out.append("LONGBLOB")
                i += 4
                continue
            elif u == "IDENTITY":
                out.append("AUTO_INCREMENT")
                if nxt is not None and nxt.kind == "op" and nxt.text == "(":
                    j = i + 1
                    while j < len(tokens) and not (tokens[j].kind == "op" and tokens[j].text == ")"):
                        j += 1
                    i = j + 1
                    continue
            elif u in ("NONCLUSTERED", "CLUSTERED"):
                pass
            else:
                out.append(tok.text)
        elif tok.kind == "var":
            out.append(tok.text)
        else:
            out.append(tok.text)
        i += 1
    text = _join(out)
    if top is not None:
        text += f" LIMIT {int(top)}"
    return text


def _is_type_position(tokens: list[Token], i: int) -> bool:
    """A type name follows a column name (in CREATE / ALTER TABLE), CAST(... AS, or a comma
    list of such; a column named like a type (rare) would follow a keyword instead."""
    if i == 0:
        return False
    prev = tokens[i - 1]
    return (
        prev.kind in ("word", "ident")
        and not prev.is_(
            "SELECT", "FROM", "WHERE", "AND", "OR", "ON", "BY", "SET", "INTO", "TABLE", "VALUES", "NOT"
        )
    ) or prev.is_("AS")


def _join(parts: list[str]) -> str:
    text = ""
    for p in parts:
        if (
            not text
            or p in (",", ")", ".", ";")
            or text.endswith(("(", "."))
            or (p == "(" and text[-1:].isalnum())
        ):
            text += p
        else:
            text += " " + p
    return text


def literal(value: object) -> str:
    """A Python value as a MariaDB literal (the engine's catalog answers)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | float):
        return repr(value)
    return quote_string(str(value))


def rows_table(columns: list[str], rows: list[tuple[object, ...]]) -> str:
    """A derived table of literal rows (a catalog view the engine answers itself)."""
    if not rows:
        nulls = ", ".join(f"NULL AS {quote_ident(c)}" for c in columns)
        return f"(SELECT {nulls} FROM DUAL WHERE 1 = 0)"
    selects = [
        "SELECT " + ", ".join(f"{literal(v)} AS {quote_ident(c)}" for c, v in zip(columns, row, strict=True))
        for row in rows
    ]
    return "(" + " UNION ALL ".join(selects) + ")"
