"""A parser for the Windows PowerShell 5.1 subset the stand-in runs (see README.md).

Derived from the PowerShell Language Specification 3.0 (Microsoft, "Windows PowerShell
Language Specification Version 3.0", chapters 2 "Lexical structure", 7 "Expressions", 8
"Statements") and about_Parsing / about_Operator_Precedence / about_Quoting_Rules
(https://learn.microsoft.com/en-us/powershell/module/microsoft.powershell.core/about/
about_parsing?view=powershell-5.1 and siblings). Error messages and their ids are
PowerShell's own (PowerShell/PowerShell src/System.Management.Automation/resources/
ParserStrings.resx). A construct outside the subset is a ParseError (nothing runs), never
something that silently does nothing.

The parser works directly on the characters because PowerShell's tokens depend on the mode
(expression mode vs argument mode, about_Parsing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# --------------------------------------------------------------------------- errors

# ParserStrings.resx (PowerShell/PowerShell), by error id.
PARSER_MESSAGES = {
    "TerminatorExpectedAtEndOfString": "The string is missing the terminator: {0}.",
    "MissingEndCurlyBrace": "Missing closing '}' in statement block or type definition.",
    "MissingEndParenthesisInExpression": "Missing closing ')' in expression.",
    "MissingOpenParenthesisInIfStatement": "Missing '(' after '{0}' in if statement.",
    "MissingEndParenthesisAfterStatement": "Missing closing ')' after expression in '{0}' statement.",
    "MissingStatementBlock": "Missing statement block after {0} ( condition ).",
    "MissingStatementBlockAfterElse": "Missing statement block after 'else' keyword.",
    "MissingExpressionAfterOperator": "Missing expression after unary operator '{0}'.",
    "ExpectedValueExpression": "You must provide a value expression following the '{0}' operator.",
    "MissingEndSquareBracket": "Missing ']' after array index expression.",
    "UnexpectedToken": "Unexpected token '{0}' in expression or statement.",
    "MissingTypename": "Missing type name after '['.",
    "EndSquareBracketExpectedAtEndOfAttribute": "Missing ] at end of attribute or type literal.",
    "MissingEndParenthesisInMethodCall": "Missing ')' in method call.",
    "MissingEqualsInHashLiteral": "Missing '=' operator after key in hash literal.",
    "MissingEndCurlyBraceInHashLiteral": "The hash literal was incomplete.",
    "MissingCatchOrFinally": "The Try statement is missing its Catch or Finally block.",
    "MissingVariableNameAfterForeach": (
        "Missing variable name after foreach.\nThe correct form is: foreach ($a in $b) {...}"
    ),
    "MissingInInForeach": "Missing 'in' after variable in foreach loop.\nThe correct form is: "
    "foreach ($a in $b) {...}",
    "MissingEndParenthesisAfterForeach": (
        "Missing closing ')' after expression part of foreach loop.\n"
        "The correct form is: foreach ($a in $b) {...}"
    ),
    "MissingFinallyStatementBlock": "The Finally block is missing its statement block.",
    "MissingCatchHandlerBlock": "The Catch block is missing its statement block.",
    "InvalidVariableReference": (
        "Variable reference is not valid. '$' was not followed by a valid variable name character. "
        "Consider using ${} to delimit the name."
    ),
    "EmptyPipeElement": "An empty pipe element is not allowed.",
    "MissingExpression": "Missing expression after '{0}' in pipeline element.",
    "ExpectedExpression": "An expression was expected after '('.",
    "MissingArgument": "Missing argument in parameter list.",
    "MissingOpenParenthesisAfterKeyword": "Missing opening '(' after keyword '{0}'.",
    "ExpressionsMustBeFirstInPipeline": "Expressions are only allowed as the first element of a pipeline.",
    "RedirectionNotSupported": "The '{0}' operator is reserved for future use.",
    "MissingFileSpecification": "Missing file specification after redirection operator.",
    # Windows PowerShell 5.1 has no pipeline chain operators (added in PowerShell 7):
    # ParserStrings.resx InvalidEndOfLine (the 5.1 text: "The token '&&' is not a valid
    # statement separator in this version.").
    "InvalidEndOfLine": "The token '{0}' is not a valid statement separator in this version.",
    "AmpersandNotAllowed": (
        "The ampersand (&) character is not allowed. The & operator is reserved for future use; "
        'wrap an ampersand in double quotation marks ("&") to pass it as part of a string.'
    ),
}


class ParseError(Exception):
    """A ParserError: nothing of the script runs (about_Parsing; ParserStrings.resx)."""

    def __init__(self, error_id: str, offset: int, end: int | None = None, *args: str) -> None:
        self.error_id = error_id
        self.offset = offset
        self.end = offset + 1 if end is None else end
        template = PARSER_MESSAGES[error_id]
        self.message = template.format(*args) if args else template
        super().__init__(self.message)


# --------------------------------------------------------------------------- AST


@dataclass
class Node:
    start: int
    end: int


@dataclass
class Const(Node):
    value: Any


@dataclass
class Var(Node):
    name: str


@dataclass
class XString(Node):
    """An expandable string: literal pieces and embedded expressions ($var, $(...))."""

    parts: list[str | Node]


@dataclass
class SubExpr(Node):
    """$( statements )."""

    body: Block


@dataclass
class ArrayExpr(Node):
    """@( statements ): always an array."""

    body: Block


@dataclass
class Paren(Node):
    statement: Node


@dataclass
class HashLit(Node):
    items: list[tuple[Node, Node]]
    ordered: bool = False


@dataclass
class ScriptBlockExpr(Node):
    body: Block
    text: str


@dataclass
class Member(Node):
    obj: Node
    name: Node  # usually Const(str)
    static: bool


@dataclass
class Invoke(Node):
    obj: Node
    name: str
    args: list[Node]
    static: bool


@dataclass
class Index(Node):
    obj: Node
    index: Node


@dataclass
class TypeLit(Node):
    name: str


@dataclass
class Cast(Node):
    type_name: str
    expr: Node


@dataclass
class Unary(Node):
    op: str
    expr: Node


@dataclass
class Binary(Node):
    op: str
    left: Node
    right: Node


@dataclass
class ArrayLit(Node):
    items: list[Node]


@dataclass
class Block(Node):
    statements: list[Node]


@dataclass
class ParamArg(Node):
    name: str
    value: Node | None  # -Name:value binds the value here; otherwise the binder decides


@dataclass
class Command(Node):
    name: Node  # Const(str) for a bare name, any expression after `&`
    args: list[Node]  # ParamArg or expressions (positional)
    call_operator: bool = False


@dataclass
class Pipeline(Node):
    elements: list[Node]  # the first may be an expression, the others are Commands
    redirects: list[tuple[str, Node]] = field(default_factory=list)


@dataclass
class Assign(Node):
    target: Node
    op: str
    value: Node


@dataclass
class If(Node):
    clauses: list[tuple[Node, Block]]
    else_block: Block | None


@dataclass
class While(Node):
    cond: Node
    body: Block


@dataclass
class Foreach(Node):
    var: str
    iterable: Node
    body: Block


@dataclass
class Catch:
    types: list[str]
    body: Block


@dataclass
class Try(Node):
    body: Block
    catches: list[Catch]
    final: Block | None


@dataclass
class FlowStmt(Node):
    """throw / exit / return / break / continue, with an optional pipeline."""

    kind: str
    value: Node | None


# --------------------------------------------------------------------------- characters

# about_Quoting_Rules / language spec 2.3.1: these count as quotes.
SINGLE_QUOTES = "'\u2018\u2019\u201a\u201b"
DOUBLE_QUOTES = '"\u201c\u201d\u201e'
DASHES = "-\u2013\u2014\u2015"
# Characters that end a generic (argument-mode) token (language spec 2.3.3).
ARG_END = " \t\r\n;|&(){},<>" + "\u00a0"
KEYWORDS = {
    "if",
    "elseif",
    "else",
    "while",
    "foreach",
    "try",
    "catch",
    "finally",
    "throw",
    "exit",
    "return",
    "break",
    "continue",
}
# Keywords the language has that this subset does not run: a script using them is refused
# with a parse error rather than run halfway.
UNSUPPORTED_KEYWORDS = {
    "function",
    "filter",
    "workflow",
    "switch",
    "for",
    "do",
    "until",
    "trap",
    "param",
    "begin",
    "process",
    "end",
    "class",
    "enum",
    "using",
    "data",
    "dynamicparam",
    "configuration",
    "inlinescript",
    "parallel",
    "sequence",
}
COMPARISON_OPS = {
    "eq",
    "ne",
    "gt",
    "ge",
    "lt",
    "le",
    "like",
    "notlike",
    "match",
    "notmatch",
    "contains",
    "notcontains",
    "in",
    "notin",
    "replace",
    "split",
    "join",
    "is",
    "isnot",
    "as",
}
LOGICAL_OPS = {"and", "or", "xor"}
ESCAPES = {"0": "\0", "a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def _comparison_name(word: str) -> str | None:
    """'-eq', '-ieq', '-ceq' -> 'eq' / 'ieq' / 'ceq' when it is a comparison operator."""
    w = word.lower()
    if w in COMPARISON_OPS:
        return w
    if w[:1] in ("i", "c") and w[1:] in COMPARISON_OPS and w[1:] not in ("is", "isnot", "as"):
        return w
    return None


class Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.n = len(text)

    # ------------------------------------------------------------------ helpers
    def peek(self, k: int = 0) -> str:
        i = self.pos + k
        return self.text[i] if i < self.n else ""

    def error(self, error_id: str, *args: str, at: int | None = None, end: int | None = None) -> ParseError:
        at = self.pos if at is None else at
        return ParseError(error_id, at, end, *args)

    def skip_ws(self, newlines: bool = False) -> None:
        """Spaces, tabs, comments, line continuations (backtick-newline); newlines too if asked."""
        while self.pos < self.n:
            c = self.text[self.pos]
            if _has(c, " \t\f\v\u00a0"):
                self.pos += 1
            elif c == "`" and self.peek(1) in ("\n", "\r"):
                self.pos += 2
                if self.peek(-1) == "\r" and self.peek() == "\n":
                    self.pos += 1
            elif c == "#":
                while self.pos < self.n and self.text[self.pos] not in "\r\n":
                    self.pos += 1
            elif c == "<" and self.peek(1) == "#":
                end = self.text.find("#>", self.pos + 2)
                if end < 0:
                    # about_Comment_Based_Help: a block comment runs to '#>'.
                    raise self.error("MissingEndCurlyBrace")
                self.pos = end + 2
            elif newlines and _has(c, "\r\n"):
                self.pos += 1
            else:
                return

    def at_word(self, word: str) -> bool:
        """Is a keyword `word` (case-insensitive) next, followed by a non-word character?"""
        end = self.pos + len(word)
        if self.text[self.pos : end].lower() != word:
            return False
        nxt = self.text[end : end + 1]
        return not (nxt.isalnum() or _has(nxt, "_-"))

    def expect_char(self, ch: str, error_id: str, *args: str) -> None:
        self.skip_ws(newlines=True)
        if self.peek() != ch:
            raise self.error(error_id, *args)
        self.pos += 1

    # ------------------------------------------------------------------ statements
    def parse_script(self) -> Block:
        start = self.pos
        stmts = self.parse_statements(end_char="")
        if self.pos < self.n:
            raise self.error("UnexpectedToken", self.text[self.pos])
        return Block(start, self.pos, stmts)

    def parse_statements(self, end_char: str) -> list[Node]:
        stmts: list[Node] = []
        while True:
            self.skip_ws(newlines=True)
            while self.peek() == ";":
                self.pos += 1
                self.skip_ws(newlines=True)
            c = self.peek()
            if c == "" or (end_char and c == end_char):
                return stmts
            if _has(c, ")}") and c != end_char:
                raise self.error("UnexpectedToken", c)
            stmts.append(self.parse_statement())
            self.skip_ws()
            c = self.peek()
            if c == "&" and self.peek(1) == "&":
                raise self.error("InvalidEndOfLine", "&&", end=self.pos + 2)
            if c == "|" and self.peek(1) == "|":
                raise self.error("InvalidEndOfLine", "||", end=self.pos + 2)
            if c not in ("", ";", "\r", "\n") and not (end_char and c == end_char):
                raise self.error("UnexpectedToken", self._token_text())

    def _token_text(self) -> str:
        """The text of the token at pos (for UnexpectedToken)."""
        c = self.peek()
        if _has(c, SINGLE_QUOTES + DOUBLE_QUOTES):
            save = self.pos
            try:
                self.parse_string()
                return self.text[save : self.pos]
            except ParseError:
                return c
            finally:
                self.pos = save
        if c == "$":
            j = self.pos + 1
            while j < self.n and (self.text[j].isalnum() or self.text[j] in "_:?"):
                j += 1
            return self.text[self.pos : j]
        if c.isalnum() or _has(c, "_-"):
            j = self.pos
            while j < self.n and self.text[j] not in ARG_END and self.text[j] not in "'\"$.[]=":
                j += 1
            return self.text[self.pos : j] or c
        return c

    def _keyword(self) -> str | None:
        for kw in KEYWORDS | UNSUPPORTED_KEYWORDS:
            if self.at_word(kw):
                return kw
        return None

    def parse_statement(self) -> Node:
        start = self.pos
        kw = self._keyword()
        if kw in UNSUPPORTED_KEYWORDS:
            raise self.error(
                "UnexpectedToken", self.text[start : start + len(kw or "")], end=start + len(kw or "")
            )
        if kw == "if":
            return self.parse_if()
        if kw == "while":
            self.pos += 5
            self.expect_char("(", "MissingOpenParenthesisAfterKeyword", "while")
            self.skip_ws(newlines=True)
            cond = self.parse_pipeline()
            self.expect_char(")", "MissingEndParenthesisAfterStatement", "while")
            body = self.parse_block("MissingStatementBlock", "while")
            return While(start, self.pos, cond, body)
        if kw == "foreach":
            return self.parse_foreach()
        if kw == "try":
            return self.parse_try()
        if kw in ("elseif", "else", "catch", "finally"):
            raise self.error("UnexpectedToken", kw, end=start + len(kw))
        if kw in ("throw", "exit", "return", "break", "continue"):
            self.pos += len(kw)
            self.skip_ws()
            value: Node | None = None
            if kw in ("throw", "exit", "return") and self.peek() not in ("", ";", "\r", "\n", "}", ")"):
                value = self.parse_pipeline()
            elif kw in ("break", "continue") and self.peek() not in ("", ";", "\r", "\n", "}", ")"):
                # Loop labels are outside the subset.
                raise self.error("UnexpectedToken", self._token_text())
            return FlowStmt(start, self.pos, kw, value)
        return self.parse_pipeline(allow_assignment=True)

    def parse_block(self, error_id: str, *args: str) -> Block:
        self.skip_ws(newlines=True)
        if self.peek() != "{":
            raise self.error(error_id, *args)
        start = self.pos
        self.pos += 1
        stmts = self.parse_statements(end_char="}")
        if self.peek() != "}":
            raise self.error("MissingEndCurlyBrace", at=start)
        self.pos += 1
        return Block(start, self.pos, stmts)

    def parse_if(self) -> If:
        start = self.pos
        clauses: list[tuple[Node, Block]] = []
        keyword = "if"
        self.pos += 2
        while True:
            self.skip_ws(newlines=True)
            if self.peek() != "(":
                raise self.error("MissingOpenParenthesisInIfStatement", keyword)
            self.pos += 1
            self.skip_ws(newlines=True)
            cond = self.parse_pipeline(allow_assignment=True)
            self.expect_char(")", "MissingEndParenthesisAfterStatement", keyword)
            body = self.parse_block("MissingStatementBlock", keyword)
            clauses.append((cond, body))
            save = self.pos
            self.skip_ws(newlines=True)
            if self.at_word("elseif"):
                self.pos += 6
                keyword = "elseif"
                continue
            if self.at_word("else"):
                self.pos += 4
                self.skip_ws(newlines=True)
                if self.at_word("if"):  # `else if` is not elseif in PowerShell
                    raise self.error("MissingStatementBlockAfterElse")
                else_block = self.parse_block("MissingStatementBlockAfterElse")
                return If(start, self.pos, clauses, else_block)
            self.pos = save
            return If(start, self.pos, clauses, None)

    def parse_foreach(self) -> Foreach:
        start = self.pos
        self.pos += 7
        self.expect_char("(", "MissingOpenParenthesisAfterKeyword", "foreach")
        self.skip_ws(newlines=True)
        if self.peek() != "$":
            raise self.error("MissingVariableNameAfterForeach")
        var = self.parse_variable()
        assert isinstance(var, Var)
        self.skip_ws(newlines=True)
        if not self.at_word("in"):
            raise self.error("MissingInInForeach")
        self.pos += 2
        self.skip_ws(newlines=True)
        iterable = self.parse_pipeline()
        self.expect_char(")", "MissingEndParenthesisAfterForeach")
        body = self.parse_block("MissingStatementBlock", "foreach")
        return Foreach(start, self.pos, var.name, iterable, body)

    def parse_try(self) -> Try:
        start = self.pos
        self.pos += 3
        body = self.parse_block("MissingStatementBlock", "try")
        catches: list[Catch] = []
        final: Block | None = None
        while True:
            save = self.pos
            self.skip_ws(newlines=True)
            if self.at_word("catch"):
                self.pos += 5
                types: list[str] = []
                while True:
                    self.skip_ws(newlines=True)
                    if self.peek() != "[":
                        break
                    t = self.parse_type_literal()
                    types.append(t.name)
                    self.skip_ws(newlines=True)
                    if self.peek() == ",":
                        self.pos += 1
                        continue
                    break
                catches.append(Catch(types, self.parse_block("MissingCatchHandlerBlock")))
                continue
            if self.at_word("finally"):
                self.pos += 7
                final = self.parse_block("MissingFinallyStatementBlock")
                break
            self.pos = save
            break
        if not catches and final is None:
            raise self.error("MissingCatchOrFinally")
        return Try(start, self.pos, body, catches, final)

    # ------------------------------------------------------------------ pipelines
    def parse_pipeline(self, allow_assignment: bool = False) -> Node:
        start = self.pos
        elements: list[Node] = []
        redirects: list[tuple[str, Node]] = []
        while True:
            self.skip_ws()
            c = self.peek()
            if c in ("", ";", "\r", "\n", ")", "}") or (c == "|" and self.peek(1) != "|"):
                raise self.error("EmptyPipeElement") if elements else self.error("ExpectedExpression")
            if self._starts_expression():
                if elements:
                    raise self.error("ExpressionsMustBeFirstInPipeline")
                expr_start = self.pos
                expr = self.parse_expression()
                self.skip_ws()
                op = self._assignment_op()
                if op:
                    if not (allow_assignment and not elements and _assignable(expr)):
                        raise ParseError("UnexpectedToken", self.pos, self.pos + len(op), op)
                    self.pos += len(op)
                    self.skip_ws(newlines=True)
                    if self.peek() in ("", ";", "\r", "\n", ")", "}"):
                        raise self.error("ExpectedValueExpression", op)
                    value = self.parse_statement()
                    return Assign(expr_start, self.pos, expr, op, value)
                if self.text.startswith(("++", "--"), self.pos):
                    # $i++ / $i-- as a statement (about_Assignment_Operators).
                    if not (allow_assignment and not elements and _assignable(expr)):
                        raise self.error(
                            "UnexpectedToken", self.text[self.pos : self.pos + 2], end=self.pos + 2
                        )
                    op = "+=" if self.text[self.pos] == "+" else "-="
                    self.pos += 2
                    return Assign(expr_start, self.pos, expr, op, Const(self.pos - 2, self.pos, 1))
                elements.append(expr)
            else:
                elements.append(self.parse_command())
            self.skip_ws()
            while self._redirection():
                redirects.append(self.parse_redirection())
                self.skip_ws()
            if self.peek() == "|" and self.peek(1) != "|":
                self.pos += 1
                self.skip_ws(newlines=True)
                continue
            return Pipeline(start, self.pos, elements, redirects)

    def _assignment_op(self) -> str | None:
        for op in ("=", "+=", "-=", "*=", "/=", "%="):
            if self.text.startswith(op, self.pos) and not self.text.startswith("==", self.pos):
                return op
        return None

    def _redirection(self) -> bool:
        c = self.peek()
        if c == ">":
            return True
        return _has(c, "123456*") and self.peek(1) == ">"

    def parse_redirection(self) -> tuple[str, Node]:
        start = self.pos
        if _has(self.peek(), "123456*"):
            self.pos += 1
        self.pos += 1
        if self.peek() == ">":
            self.pos += 1
        op = self.text[start : self.pos]
        if self.peek() == "&":
            # 2>&1 merges streams; 1>&2 is "reserved for future use" in 5.1.
            self.pos += 1
            target = self.text[self.pos : self.pos + 1]
            self.pos += 1
            if op.startswith("2") and target == "1":
                return (op + "&1", Const(start, self.pos, None))
            raise ParseError("RedirectionNotSupported", start, self.pos, self.text[start : self.pos])
        self.skip_ws()
        if self.peek() in ("", ";", "\r", "\n", "|", ")", "}"):
            raise self.error("MissingFileSpecification")
        return (op, self.parse_argument())

    def _starts_expression(self) -> bool:
        c = self.peek()
        if _has(c, "$@([") or _has(c, SINGLE_QUOTES) or _has(c, DOUBLE_QUOTES) or c == "!":
            return True
        if c.isdigit() or (c == "." and self.peek(1).isdigit()):
            return True  # a number (1, 1.5, 1..5, 1kb): an expression
        if _has(c, DASHES):
            nxt = self.peek(1)
            if nxt.isdigit() or _has(nxt, "$("):
                return True
            j = self.pos + 1
            while j < self.n and self.text[j].isalpha():
                j += 1
            return self.text[self.pos + 1 : j].lower() in ("not", "bnot", "split", "join")
        if c == "+" and (self.peek(1).isdigit() or self.peek(1) == "$"):
            return True
        return False

    def parse_command(self) -> Command:
        start = self.pos
        call_op = False
        if self.peek() == "&":
            if self.peek(1) == "&":
                raise self.error("InvalidEndOfLine", "&&", end=self.pos + 2)
            call_op = True
            self.pos += 1
            self.skip_ws()
            name: Node = self.parse_argument()
        elif self.peek() == "{":
            raise self.error("UnexpectedToken", "{")
        else:
            name_start = self.pos
            while self.pos < self.n and self.text[self.pos] not in ARG_END:
                if self.text[self.pos] in SINGLE_QUOTES + DOUBLE_QUOTES + "$":
                    break
                self.pos += 1
            word = self.text[name_start : self.pos]
            if not word:
                raise self.error("UnexpectedToken", self._token_text())
            name = Const(name_start, self.pos, word)
        args: list[Node] = []
        while True:
            self.skip_ws()
            c = self.peek()
            if c in ("", ";", "\r", "\n", "|", ")", "}") or self._redirection():
                break
            if c == "&":
                if self.peek(1) == "&":
                    raise self.error("InvalidEndOfLine", "&&", end=self.pos + 2)
                raise self.error("AmpersandNotAllowed")
            if _has(c, DASHES) and (self.peek(1).isalpha() or _has(self.peek(1), "_?")):
                args.append(self.parse_parameter())
            else:
                args.append(self.parse_argument_list())
        return Command(start, self.pos, name, args, call_op)

    def parse_parameter(self) -> ParamArg:
        start = self.pos
        self.pos += 1
        j = self.pos
        while j < self.n and self.text[j] not in ARG_END and self.text[j] != ":":
            j += 1
        name = self.text[self.pos : j]
        self.pos = j
        value: Node | None = None
        if self.peek() == ":":
            self.pos += 1
            self.skip_ws()
            value = self.parse_argument_list()
        return ParamArg(start, self.pos, name, value)

    def parse_argument_list(self) -> Node:
        start = self.pos
        first = self.parse_argument()
        self.skip_ws()
        if self.peek() != ",":
            return first
        items = [first]
        while self.peek() == ",":
            self.pos += 1
            self.skip_ws(newlines=True)
            if self.peek() in ("", ";", "\r", "\n", "|", ")", "}"):
                raise self.error("MissingArgument")
            items.append(self.parse_argument())
            self.skip_ws()
        return ArrayLit(start, self.pos, items)

    def parse_argument(self) -> Node:
        """One argument in argument mode (about_Parsing)."""
        start = self.pos
        c = self.peek()
        if (
            _has(c, SINGLE_QUOTES + DOUBLE_QUOTES + "$")
            or c == "("
            or (c == "@" and _has(self.peek(1), "({"))
        ):
            node = self.parse_postfix(self.parse_primary())
            # A quoted string or variable glued to more characters is one generic token.
            if self.pos < self.n and self.text[self.pos] not in ARG_END and self.text[self.pos] != ",":
                rest = self.parse_generic_token()
                parts: list[str | Node] = [node]
                if isinstance(rest, XString):
                    parts.extend(rest.parts)
                else:
                    assert isinstance(rest, Const)
                    parts.append(str(rest.value))
                return XString(start, self.pos, parts)
            return node
        if c == "{":
            return self.parse_scriptblock()
        return self.parse_generic_token()

    def parse_generic_token(self) -> Node:
        """A bare word: a number if it looks like one, else a string ($var expanded)."""
        start = self.pos
        parts: list[str | Node] = []
        buf: list[str] = []
        while self.pos < self.n:
            c = self.text[self.pos]
            if _has(c, ARG_END) or c == ",":
                break
            if c == "`" and self.pos + 1 < self.n:
                nxt = self.text[self.pos + 1]
                if _has(nxt, "\r\n"):
                    break
                buf.append(nxt)
                self.pos += 2
                continue
            if _has(c, SINGLE_QUOTES):
                node = self.parse_string()
                assert isinstance(node, Const)
                buf.append(str(node.value))
                continue
            if _has(c, DOUBLE_QUOTES) or (c == "$" and (self.peek(1).isalnum() or _has(self.peek(1), "_{("))):
                if buf:
                    parts.append("".join(buf))
                    buf = []
                if _has(c, DOUBLE_QUOTES):
                    node = self.parse_string()
                    if isinstance(node, XString):
                        parts.extend(node.parts)
                    else:
                        assert isinstance(node, Const)
                        parts.append(str(node.value))
                else:
                    parts.append(self.parse_variable() if self.peek(1) != "(" else self.parse_primary())
                continue
            buf.append(c)
            self.pos += 1
        if buf:
            parts.append("".join(buf))
        if all(isinstance(p, str) for p in parts):
            word = "".join(str(p) for p in parts)
            num = _parse_number(word)
            if num is not None:
                return Const(start, self.pos, num)
            return Const(start, self.pos, word)
        return XString(start, self.pos, parts)

    def parse_scriptblock(self) -> ScriptBlockExpr:
        start = self.pos
        self.pos += 1
        stmts = self.parse_statements(end_char="}")
        if self.peek() != "}":
            raise self.error("MissingEndCurlyBrace", at=start)
        self.pos += 1
        return ScriptBlockExpr(
            start, self.pos, Block(start, self.pos, stmts), self.text[start + 1 : self.pos - 1]
        )

    # ------------------------------------------------------------------ expressions
    def parse_expression(self) -> Node:
        return self.parse_logical()

    def _dash_op(self, names: set[str] | None, comparison: bool = False) -> str | None:
        """The dash operator at pos (without consuming it): its lower-case name."""
        if not _has(self.peek(), DASHES):
            return None
        j = self.pos + 1
        while j < self.n and self.text[j].isalpha():
            j += 1
        word = self.text[self.pos + 1 : j].lower()
        if not word or (j < self.n and (self.text[j].isalnum() or self.text[j] == "_")):
            return None
        if comparison:
            return _comparison_name(word)
        return word if names is not None and word in names else None

    def _binary_loop(self, sub: Any, ops: Any) -> Node:
        left: Node = sub()
        while True:
            self.skip_ws()
            op = ops()
            if op is None:
                return left
            op_start = self.pos
            self.pos += len(op)
            self.skip_ws(newlines=True)
            if self.peek() in ("", ";", "\r", "\n", ")", "}", "|"):
                raise ParseError("ExpectedValueExpression", op_start, self.pos, op)
            right = sub()
            name = op[1:].lower() if op.startswith("-") and len(op) > 1 else op
            left = Binary(left.start, right.end, name, left, right)

    def parse_logical(self) -> Node:
        def ops() -> str | None:
            w = self._dash_op(LOGICAL_OPS)
            return "-" + w if w else None

        return self._binary_loop(self.parse_comparison, ops)

    def parse_comparison(self) -> Node:
        def ops() -> str | None:
            w = self._dash_op(None, comparison=True)
            if w:
                return "-" + w
            if _has(self.peek(), DASHES):
                j = self.pos + 1
                while j < self.n and self.text[j].isalpha():
                    j += 1
                word = self.text[self.pos + 1 : j].lower()
                if word in ("band", "bor", "bxor", "shl", "shr", "f", "ieq"):
                    raise self.error("UnexpectedToken", "-" + word, end=j)
            return None

        return self._binary_loop(self.parse_additive, ops)

    def parse_additive(self) -> Node:
        def ops() -> str | None:
            c = self.peek()
            if c == "+" and not _has(self.peek(1), "+="):
                return "+"
            if _has(c, DASHES) and not _has(self.peek(1), "-=") and not self.peek(1).isalpha():
                return "-"
            return None

        return self._binary_loop(self.parse_multiplicative, ops)

    def parse_multiplicative(self) -> Node:
        def ops() -> str | None:
            c = self.peek()
            if _has(c, "*/%") and self.peek(1) != "=" and c:
                return c
            return None

        return self._binary_loop(self.parse_range, ops)

    def parse_range(self) -> Node:
        def ops() -> str | None:
            return ".." if self.peek() == "." and self.peek(1) == "." else None

        return self._binary_loop(self.parse_array_literal, ops)

    def parse_array_literal(self) -> Node:
        start = self.pos
        first = self.parse_unary()
        self.skip_ws()
        if self.peek() != ",":
            return first
        items = [first]
        while self.peek() == ",":
            self.pos += 1
            self.skip_ws(newlines=True)
            if self.peek() in ("", ";", "\r", "\n", ")", "}", "|"):
                raise self.error("MissingExpressionAfterOperator", ",")
            items.append(self.parse_unary())
            self.skip_ws()
        return ArrayLit(start, self.pos, items)

    def parse_unary(self) -> Node:
        start = self.pos
        c = self.peek()
        if c == "!":
            self.pos += 1
            self.skip_ws()
            return Unary(start, self.pos, "not", self._unary_operand("!"))
        if _has(c, DASHES):
            w = self._dash_op({"not", "split", "join", "bnot"})
            if w:
                if w == "bnot":
                    raise self.error("UnexpectedToken", "-bnot")
                self.pos += 1 + len(w)
                self.skip_ws()
                return Unary(start, self.pos, w, self._unary_operand("-" + w))
            if not self.peek(1).isalpha():
                self.pos += 1
                self.skip_ws()
                operand = self._unary_operand("-")
                return Unary(start, operand.end, "neg", operand)
        if c == "+" and not self.peek(1).isalpha():
            self.pos += 1
            self.skip_ws()
            operand = self._unary_operand("+")
            return Unary(start, operand.end, "plus", operand)
        if c == "[":
            save = self.pos
            t = self.parse_type_literal()
            # [type]::Member or [type] alone is a primary; [type]<expr> is a cast.
            if self.peek() == ":" and self.peek(1) == ":":
                self.pos = save
                return self.parse_postfix(self.parse_primary())
            if self.peek() in ("", " ", "\t", ";", "\r", "\n", ")", "}", "|", ",", "."):
                if self.peek() == " " or self.peek() == "\t":
                    # `[int] $x` casts too (whitespace allowed): look past it.
                    self.skip_ws()
                    if self.peek() in ("", ";", "\r", "\n", ")", "}", "|", ","):
                        return t
                else:
                    return self.parse_postfix(t) if self.peek() == "." else t
            operand = self.parse_unary()
            return Cast(start, operand.end, t.name, operand)
        return self.parse_postfix(self.parse_primary())

    def _unary_operand(self, op: str) -> Node:
        if self.peek() in ("", ";", "\r", "\n", ")", "}", "|"):
            raise self.error("MissingExpressionAfterOperator", op)
        return self.parse_unary()

    def parse_type_literal(self) -> TypeLit:
        start = self.pos
        self.pos += 1
        j = self.pos
        depth = 0
        while j < self.n:
            ch = self.text[j]
            if ch == "[":
                depth += 1
            elif ch == "]":
                if depth == 0:
                    break
                depth -= 1
            elif _has(ch, "\r\n"):
                break
            j += 1
        name = self.text[self.pos : j].strip()
        if not name:
            raise self.error("MissingTypename")
        if j >= self.n or self.text[j] != "]":
            raise self.error("EndSquareBracketExpectedAtEndOfAttribute", at=j)
        self.pos = j + 1
        return TypeLit(start, self.pos, name)

    def parse_postfix(self, node: Node) -> Node:
        while True:
            c = self.peek()
            if c == "." and self.peek(1) != "." and (self.peek(1).isalpha() or _has(self.peek(1), "_'\"$(")):
                self.pos += 1
                node = self._member(node, static=False)
            elif c == ":" and self.peek(1) == ":":
                self.pos += 2
                node = self._member(node, static=True)
            elif c == "[" and not isinstance(node, TypeLit):
                self.pos += 1
                self.skip_ws(newlines=True)
                if self.peek() == "]":
                    raise self.error("MissingArrayIndexExpression")
                idx = self.parse_expression()
                self.skip_ws(newlines=True)
                if self.peek() != "]":
                    raise self.error("MissingEndSquareBracket")
                self.pos += 1
                node = Index(node.start, self.pos, node, idx)
            else:
                return node

    def _member(self, obj: Node, static: bool) -> Node:
        start = self.pos
        c = self.peek()
        if c.isalpha() or c == "_":
            j = self.pos
            while j < self.n and (self.text[j].isalnum() or self.text[j] == "_"):
                j += 1
            name_node: Node = Const(start, j, self.text[start:j])
            self.pos = j
        elif _has(c, SINGLE_QUOTES + DOUBLE_QUOTES):
            name_node = self.parse_string()
        elif c == "$":
            name_node = self.parse_variable()
        elif c == "(":
            name_node = self.parse_primary()
        else:
            raise self.error("UnexpectedToken", c)
        if self.peek() == "(" and isinstance(name_node, Const):
            self.pos += 1
            args: list[Node] = []
            self.skip_ws(newlines=True)
            if self.peek() != ")":
                while True:
                    self.skip_ws(newlines=True)
                    args.append(self.parse_unary_chain())
                    self.skip_ws(newlines=True)
                    if self.peek() == ",":
                        self.pos += 1
                        continue
                    break
            if self.peek() != ")":
                raise self.error("MissingEndParenthesisInMethodCall")
            self.pos += 1
            return Invoke(obj.start, self.pos, obj, str(name_node.value), args, static)
        return Member(obj.start, self.pos, obj, name_node, static)

    def parse_unary_chain(self) -> Node:
        """A method argument: a full expression without the comma operator."""

        def ops() -> str | None:
            w = self._dash_op(LOGICAL_OPS)
            return "-" + w if w else None

        def comparison() -> Node:
            def cops() -> str | None:
                w = self._dash_op(None, comparison=True)
                return "-" + w if w else None

            def additive() -> Node:
                def aops() -> str | None:
                    c = self.peek()
                    if c == "+":
                        return "+"
                    if _has(c, DASHES) and not self.peek(1).isalpha():
                        return "-"
                    return None

                def mult() -> Node:
                    def mops() -> str | None:
                        c = self.peek()
                        return c if c and _has(c, "*/%") else None

                    return self._binary_loop(self.parse_unary, mops)

                return self._binary_loop(mult, aops)

            return self._binary_loop(additive, cops)

        return self._binary_loop(comparison, ops)

    def parse_primary(self) -> Node:
        start = self.pos
        c = self.peek()
        if c == "$":
            if self.peek(1) == "(":
                self.pos += 2
                stmts = self.parse_statements(end_char=")")
                if self.peek() != ")":
                    raise self.error("MissingEndParenthesisInExpression", at=start)
                self.pos += 1
                return SubExpr(start, self.pos, Block(start, self.pos, stmts))
            return self.parse_variable()
        if c == "@":
            nxt = self.peek(1)
            if nxt == "(":
                self.pos += 2
                stmts = self.parse_statements(end_char=")")
                if self.peek() != ")":
                    raise self.error("MissingEndParenthesisInExpression", at=start)
                self.pos += 1
                return ArrayExpr(start, self.pos, Block(start, self.pos, stmts))
            if nxt == "{":
                return self.parse_hash()
            if _has(nxt, SINGLE_QUOTES + DOUBLE_QUOTES):
                return self.parse_string()  # here-string
            raise self.error("UnexpectedToken", "@")
        if c == "(":
            self.pos += 1
            self.skip_ws(newlines=True)
            if self.peek() == ")":
                raise self.error("ExpectedExpression")
            stmt = self.parse_pipeline(allow_assignment=True)
            self.skip_ws(newlines=True)
            if self.peek() != ")":
                raise self.error("MissingEndParenthesisInExpression", at=start)
            self.pos += 1
            return Paren(start, self.pos, stmt)
        if _has(c, SINGLE_QUOTES) or _has(c, DOUBLE_QUOTES):
            return self.parse_string()
        if c == "[":
            return self.parse_type_literal()
        if c == "{":
            return self.parse_scriptblock()
        if c.isdigit() or c == ".":
            j = self.pos
            while j < self.n and (self.text[j].isalnum() or self.text[j] == "."):
                if self.text[j] == "." and j + 1 < self.n and self.text[j + 1] == ".":
                    break
                j += 1
            word = self.text[self.pos : j]
            num = _parse_number(word)
            if num is None:
                raise self.error("UnexpectedToken", word, end=j)
            self.pos = j
            return Const(start, j, num)
        if c == "":
            raise self.error("ExpectedExpression")
        # A bare word in expression mode (e.g. `$a -eq foo`) is an unexpected token.
        raise self.error("UnexpectedToken", self._token_text())

    def parse_variable(self) -> Node:
        start = self.pos
        self.pos += 1
        if self.peek() == "{":
            end = self.text.find("}", self.pos)
            if end < 0:
                raise self.error("MissingEndCurlyBrace", at=start)
            name = self.text[self.pos + 1 : end]
            self.pos = end + 1
            return Var(start, self.pos, name)
        j = self.pos
        if j < self.n and self.text[j] in "?^$":
            self.pos = j + 1
            return Var(start, self.pos, self.text[j])
        while j < self.n and (self.text[j].isalnum() or self.text[j] == "_"):
            j += 1
        # scope / drive qualifiers: $global:x, $env:PATH
        if j < self.n and self.text[j] == ":" and j + 1 < self.n and self.text[j + 1] != ":":
            k = j + 1
            while k < self.n and (self.text[k].isalnum() or self.text[k] == "_"):
                k += 1
            if k > j + 1:
                j = k
        name = self.text[self.pos : j]
        if not name:
            raise self.error("InvalidVariableReference", at=start)
        self.pos = j
        return Var(start, self.pos, name)

    def parse_hash(self) -> HashLit:
        start = self.pos
        self.pos += 2
        items: list[tuple[Node, Node]] = []
        while True:
            self.skip_ws(newlines=True)
            while self.peek() == ";":
                self.pos += 1
                self.skip_ws(newlines=True)
            if self.peek() == "}":
                self.pos += 1
                return HashLit(start, self.pos, items)
            if self.peek() == "":
                raise self.error("MissingEndCurlyBraceInHashLiteral", at=start)
            c = self.peek()
            if _has(c, SINGLE_QUOTES + DOUBLE_QUOTES):
                key: Node = self.parse_string()
            elif c == "$" or c == "(":
                key = self.parse_postfix(self.parse_primary())
            else:
                k0 = self.pos
                while self.pos < self.n and (self.text[self.pos].isalnum() or self.text[self.pos] in "_-."):
                    self.pos += 1
                if self.pos == k0:
                    raise self.error("MissingEqualsInHashLiteral")
                word = self.text[k0 : self.pos]
                num = _parse_number(word)
                key = Const(k0, self.pos, word if num is None else num)
            self.skip_ws()
            if self.peek() != "=":
                raise self.error("MissingEqualsInHashLiteral")
            self.pos += 1
            self.skip_ws(newlines=True)
            value = self.parse_statement()
            items.append((key, value))
            self.skip_ws()
            if self.peek() not in (";", "\r", "\n", "}"):
                raise self.error(
                    "MissingEndCurlyBraceInHashLiteral" if self.peek() == "" else "UnexpectedToken",
                    *([] if self.peek() == "" else [self._token_text()]),
                )

    # ------------------------------------------------------------------ strings
    def parse_string(self) -> Node:
        start = self.pos
        c = self.peek()
        here = False
        if c == "@":
            # Here-strings: @' ... '@ and @" ... "@, the opening quote last on its line.
            q = self.peek(1)
            self.pos += 2
            while _has(self.peek(), " \t"):
                self.pos += 1
            if self.peek() == "\r":
                self.pos += 1
            if self.peek() != "\n":
                raise self.error("UnexpectedToken", "@" + q)
            self.pos += 1
            here = True
            c = q
        else:
            self.pos += 1
        single = _has(c, SINGLE_QUOTES)
        quotes = SINGLE_QUOTES if single else DOUBLE_QUOTES
        buf: list[str] = []
        parts: list[str | Node] = []
        while True:
            if self.pos >= self.n:
                raise ParseError(
                    "TerminatorExpectedAtEndOfString",
                    start,
                    self.n,
                    ("'@" if single else '"@') if here else ("'" if single else '"'),
                )
            ch = self.text[self.pos]
            if here:
                if _has(ch, "\r\n"):
                    j = self.pos + (2 if self.text.startswith("\r\n", self.pos) else 1)
                    if _has(self.text[j : j + 1], quotes) and self.text[j + 1 : j + 2] == "@":
                        self.pos = j + 2
                        break
                    buf.append("\n")
                    self.pos = j
                    continue
            elif _has(ch, quotes):
                if _has(self.peek(1), quotes):  # a doubled quote is one quote
                    buf.append(ch)
                    self.pos += 2
                    continue
                self.pos += 1
                break
            if not single and ch == "`" and self.pos + 1 < self.n:
                nxt = self.text[self.pos + 1]
                buf.append(ESCAPES.get(nxt, nxt))
                self.pos += 2
                continue
            if not single and ch == "$":
                nxt = self.peek(1)
                if nxt == "(" or nxt.isalnum() or _has(nxt, "_{?"):
                    if buf:
                        parts.append("".join(buf))
                        buf = []
                    if nxt == "(":
                        parts.append(self.parse_primary())
                    else:
                        parts.append(self.parse_variable())
                    continue
            buf.append(ch)
            self.pos += 1
        if buf:
            parts.append("".join(buf))
        if single or all(isinstance(p, str) for p in parts):
            return Const(start, self.pos, "".join(str(p) for p in parts))
        return XString(start, self.pos, parts)


def _has(ch: str, chars: str) -> bool:
    """ch is one of chars (never true for "", the end of the text)."""
    return ch != "" and ch in chars


def _assignable(node: Node) -> bool:
    if isinstance(node, Cast):
        return _assignable(node.expr)
    return isinstance(node, Var | Member | Index)


def _parse_number(s: str) -> int | float | None:
    """PowerShell numeric literals: decimal, hex 0x.., real, exponent, KB/MB/GB/TB/PB and
    type suffixes l/d (language spec 2.3.5.1)."""
    if not s:
        return None
    t = s.lower()
    mult = 1
    for suffix, m in (("kb", 1 << 10), ("mb", 1 << 20), ("gb", 1 << 30), ("tb", 1 << 40), ("pb", 1 << 50)):
        if t.endswith(suffix):
            t, mult = t[: -len(suffix)], m
            break
    if t.endswith(("l", "d")) and not t.startswith("0x"):
        t = t[:-1]
    try:
        if t.startswith("0x"):
            return int(t[2:], 16) * mult
        if t.isdigit():
            return int(t) * mult
        if any(ch.isdigit() for ch in t) and all(ch.isdigit() or _has(ch, ".e+-") for ch in t):
            v = float(t) * mult
            return v
    except ValueError:
        return None
    return None


def parse(text: str) -> Block:
    """The script's AST, or ParseError (nothing of it may run)."""
    return Parser(text).parse_script()
