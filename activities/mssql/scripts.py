"""T-SQL scripts split into batches on `GO`, exactly as sqlcmd does.

GO is not T-SQL: sqlcmd cuts the script there and sends each batch on its own (a server that
receives `GO` answers "Incorrect syntax near 'GO'"). The rules, from Microsoft Learn
("sqlcmd utility", "GO (Transact-SQL)") and go-sqlcmd's source (microsoft/go-sqlcmd,
pkg/sqlcmd/batch.go and commands.go, whose terminator pattern is `(?im)^[\\t ]*?GO(?:[ ]+(.*$)|$)`):

- GO stands alone on its line, with optional leading spaces or tabs, in any case;
- an optional count follows after spaces (`GO 5` runs the batch five times), and a
  `-- comment` may follow; anything else after GO ("GO;", "GO x") is an error;
- a line that begins inside a string ('...'), a delimited identifier ([...]) or a block
  comment (/* ... */, which nests in T-SQL) is never a command, so a GO there is text;
- an empty batch is skipped;
- the server numbers lines from 1 at the batch's first line: a script line is the batch's
  first line + the server's line - 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_GO = re.compile(r"^[\t ]*GO(?:[ ]+(.*))?$", re.IGNORECASE)


class ScriptError(ValueError):
    """A GO line sqlcmd would refuse."""


@dataclass(frozen=True)
class Batch:
    text: str
    first_line: int  # the batch's first line in the script (1-based)
    number: int  # 1-based, in script order
    repeat: int = 1

    def script_line(self, server_line: int) -> int:
        return self.first_line + max(server_line, 1) - 1


def _go_count(argument: str | None, line_no: int) -> int:
    arg = (argument or "").strip()
    # `GO -- comment`: the comment is not an argument (go-sqlcmd removeComments).
    arg = re.split(r"(?:^|\s)--", arg, maxsplit=1)[0].strip()
    if not arg:
        return 1
    if not arg.isdigit() or int(arg) < 1:
        raise ScriptError(f"Sqlcmd: Error: Syntax error at line {line_no} near command 'GO'.")
    return int(arg)


def _scan(line: str, state: list[str]) -> None:
    """Advance the lexical state (a stack of open "'", "[", '"', "/*") over one line."""
    i, n = 0, len(line)
    while i < n:
        top = state[-1] if state else ""
        c = line[i]
        if top == "/*":
            if line.startswith("*/", i):
                state.pop()
                i += 2
            elif line.startswith("/*", i):
                state.append("/*")
                i += 2
            else:
                i += 1
        elif top in ("'", '"', "["):
            close = "]" if top == "[" else top
            if c == close:
                if line.startswith(close * 2, i):  # '' / ]] / "" inside: an escaped character
                    i += 2
                else:
                    state.pop()
                    i += 1
            else:
                i += 1
        elif line.startswith("--", i):
            return
        elif line.startswith("/*", i):
            state.append("/*")
            i += 2
        elif c in ("'", '"', "["):
            state.append(c)
            i += 1
        else:
            i += 1


def split_batches(script: str) -> list[Batch]:
    """The script's batches in order (see the module docstring); ScriptError for a bad GO."""
    batches: list[Batch] = []
    buf: list[str] = []
    first = 1
    state: list[str] = []
    lines = script.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for no, line in enumerate(lines, 1):
        m = _GO.match(line) if not state else None
        if m is not None:
            count = _go_count(m.group(1), no)
            text = "\n".join(buf)
            if text.strip():
                batches.append(Batch(text, first, len(batches) + 1, count))
            buf, first = [], no + 1
            continue
        buf.append(line)
        _scan(line, state)
    text = "\n".join(buf)
    if text.strip():
        batches.append(Batch(text, first, len(batches) + 1))
    return batches
