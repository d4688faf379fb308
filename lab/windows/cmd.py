"""cmd.exe, Win32-OpenSSH's default shell, as far as zerodown's commands need it.

Win32-OpenSSH runs an exec request as `<DefaultShell> /c <command>` with cmd.exe when no
DefaultShell is configured (PowerShell/openssh-portable contrib/win32/win32compat/
w32-doexec.c: shell_command_option "/c" for SH_CMD; Microsoft Learn "OpenSSH Server
configuration for Windows": "The initial default Windows is the Windows Command shell
(cmd.exe)").

Modelled (Microsoft Learn "Windows commands" pages, "cmd", "Command shell overview"):
* the operators `&`, `&&`, `||`, `|`, `^` escapes, double quotes, %VAR% expansion;
* redirections `>nul`, `2>nul`, `1>`, `>>`, `2>&1`, `<`; a target that cannot be opened
  (e.g. `/dev/null`: \\dev on drive C: does not exist) fails with "The system cannot find
  the path specified." and the command does not run (errorlevel 1);
* commands `ver`, `echo`, `exit [/b] [n]`, `powershell[.exe]` (with its documented
  switches, about_PowerShell_exe 5.1); anything else is cmd's "'X' is not recognized as an
  internal or external command, operable program or batch file." with errorlevel 9009;
* the 8191-character command-line limit (Microsoft Learn "Command prompt (Cmd.exe)
  command-line string limitation"): longer lines print "The command line is too long."
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lab.windows.drive import DriveError, WinEnv
from lab.windows.powershell import Host, Interp

MAX_LINE = 8191
NOT_RECOGNIZED = (
    "'{0}' is not recognized as an internal or external command,\r\noperable program or batch file.\r\n"
)
PATH_NOT_FOUND = "The system cannot find the path specified.\r\n"
TOO_LONG = "The command line is too long.\r\n"
VERSION_LINE = "Microsoft Windows [Version {0}]"
POWERSHELL_NAMES = (
    "powershell",
    "powershell.exe",
    "c:\\windows\\system32\\windowspowershell\\v1.0\\powershell.exe",
    "%systemroot%\\system32\\windowspowershell\\v1.0\\powershell.exe",
)


@dataclass
class Session:
    env: WinEnv
    write_out: Callable[[bytes], None]
    write_err: Callable[[bytes], None]
    read_stdin: Callable[[], bytes]
    scripts: list[str] = field(default_factory=list)  # decoded PowerShell scripts (for the log)


@dataclass
class Piece:
    text: str
    op: str  # the operator after it: "", "&", "&&", "||", "|"


def expand_vars(line: str, env: WinEnv) -> str:
    """%NAME% -> its value; unknown names stay as they are (cmd /c semantics)."""
    values = env.environment()

    def sub(m: re.Match[str]) -> str:
        v = values.get(m.group(1).casefold())
        return v if v is not None else m.group(0)

    return re.sub(r"%([^%\s=]+)%", sub, line)


def split_operators(line: str) -> list[Piece]:
    pieces: list[Piece] = []
    buf: list[str] = []
    quoted = False
    i = 0
    while i < len(line):
        c = line[i]
        if c == '"':
            quoted = not quoted
            buf.append(c)
        elif not quoted and c == "^" and i + 1 < len(line):
            buf.append("\x00" + line[i + 1])  # escaped: never an operator
            i += 1
        elif not quoted and c in "&|":
            op = c
            if line[i + 1 : i + 2] == c:
                op = c * 2
                i += 1
            # `2>&1` is a redirection, not an operator.
            if c == "&" and op == "&" and "".join(buf).endswith(">"):
                buf.append(c)
            else:
                pieces.append(Piece("".join(buf), op))
                buf = []
        else:
            buf.append(c)
        i += 1
    pieces.append(Piece("".join(buf), ""))
    return pieces


def _unescape(s: str) -> str:
    return s.replace("\x00", "")


@dataclass
class Redirect:
    stream: int  # 0 stdin, 1 stdout, 2 stderr
    target: str  # "nul", "&1", "&2" or a path
    append: bool


def split_redirects(text: str) -> tuple[str, list[Redirect]]:
    """The command text without its redirections, and the redirections."""
    out: list[str] = []
    redirects: list[Redirect] = []
    quoted = False
    i = 0
    while i < len(text):
        c = text[i]
        if c == '"':
            quoted = not quoted
            out.append(c)
            i += 1
            continue
        if not quoted and c in "<>":
            stream = 0 if c == "<" else 1
            if c == ">" and out and out[-1] in "12" and (len(out) == 1 or out[-2] in " \t"):
                stream = int(out.pop())
            append = text[i : i + 2] == ">>"
            i += 2 if append else 1
            while i < len(text) and text[i] in " \t":
                i += 1
            j = i
            if text[j : j + 1] == "&":
                j += 2
            elif text[j : j + 1] == '"':
                j = text.find('"', j + 1)
                j = len(text) if j < 0 else j + 1
            else:
                while j < len(text) and text[j] not in " \t<>":
                    j += 1
            redirects.append(Redirect(stream, text[i:j].strip('"'), append))
            i = j
            continue
        out.append(c)
        i += 1
    return "".join(out), redirects


def windows_argv(s: str) -> list[str]:
    """CommandLineToArgvW's rules (Microsoft Learn "Parsing C++ command-line arguments"):
    whitespace separates, double quotes group, 2n backslashes + quote -> n backslashes."""
    args: list[str] = []
    buf: list[str] = []
    in_arg = False
    quoted = False
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            j = i
            while j < len(s) and s[j] == "\\":
                j += 1
            n = j - i
            if j < len(s) and s[j] == '"':
                buf.append("\\" * (n // 2))
                if n % 2:
                    buf.append('"')
                    i = j + 1
                else:
                    i = j
                in_arg = True
                continue
            buf.append("\\" * n)
            in_arg = True
            i = j
            continue
        if c == '"':
            if quoted and s[i + 1 : i + 2] == '"':
                buf.append('"')
                i += 2
                continue
            quoted = not quoted
            in_arg = True
        elif c in " \t" and not quoted:
            if in_arg:
                args.append("".join(buf))
                buf = []
                in_arg = False
        else:
            buf.append(c)
            in_arg = True
        i += 1
    if in_arg:
        args.append("".join(buf))
    return args


class _Streams:
    def __init__(self, session: Session, stdin: bytes | None) -> None:
        self.session = session
        self.out: Callable[[bytes], None] = session.write_out
        self.err: Callable[[bytes], None] = session.write_err
        self.stdin = stdin


def run_cmd_line(session: Session, line: str) -> int:
    """`cmd.exe /c <line>`: the process exit code."""
    if len(line) > MAX_LINE:
        session.write_err(TOO_LONG.encode())
        return 1
    errorlevel = 0
    pieces = split_operators(expand_vars(line, session.env))
    skip = False
    pipe_input: bytes | None = None
    for idx, piece in enumerate(pieces):
        prev_op = pieces[idx - 1].op if idx else ""
        if idx:
            if prev_op == "&&":
                skip = errorlevel != 0
            elif prev_op == "||":
                skip = errorlevel == 0
            elif prev_op in ("&", "|"):
                skip = False
        if skip:
            continue
        captured: list[bytes] = []
        streams = _Streams(session, pipe_input)
        if piece.op == "|":
            streams.out = captured.append
        try:
            errorlevel = run_one(streams, piece.text)
        except _Exit as e:
            return e.code
        pipe_input = b"".join(captured) if piece.op == "|" else None
    return errorlevel


class _Exit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def run_one(st: _Streams, text: str) -> int:
    session = st.session
    body, redirects = split_redirects(text)
    body = body.lstrip()  # trailing blanks stay: `echo a & echo b` prints "a " (cmd does)
    out, err = st.out, st.err
    env = session.env
    stdin_data = st.stdin
    files: list[Any] = []
    for r in redirects:
        target = r.target
        if target.lower() == "nul":
            sink: Callable[[bytes], None] | None = lambda _b: None  # noqa: E731
        elif target in ("&1", "&2"):
            sink = None
        else:
            try:
                win = env.drive.normalize(_unescape(target), env.home)
                local = env.drive.local(win)
                if r.stream == 0:
                    stdin_data = local.read_bytes()
                    continue
                if not local.parent.is_dir():
                    raise FileNotFoundError(win)
                f = open(local, "ab" if r.append else "wb")
            except (DriveError, OSError):
                session.write_err(PATH_NOT_FOUND.encode())
                for f in files:
                    f.close()
                return 1
            files.append(f)

            def sink_to(data: bytes, f: Any = f) -> None:
                f.write(data)

            sink = sink_to
        if r.stream == 1 and sink is not None:
            out = sink
        elif r.stream == 2:
            if target == "&1":
                err = out
            elif sink is not None:
                err = sink
        elif r.stream == 1 and target == "&2":
            out = err
    try:
        return _dispatch(session, body, out, err, stdin_data)
    finally:
        for f in files:
            f.close()


def _dispatch(
    session: Session,
    body: str,
    out: Callable[[bytes], None],
    err: Callable[[bytes], None],
    stdin_data: bytes | None,
) -> int:
    if not body:
        return 0
    m = re.match(r'^("[^"]*"|[^\s/"]+)', body)
    name = _unescape(m.group(1) if m else body.split()[0]).strip('"')
    rest = body[m.end() if m else len(name) :]
    low = name.lower()
    if low in ("echo", "echo.") or low.startswith("echo."):
        if low == "echo" and not rest.strip():
            out(b"ECHO is on.\r\n")
        else:
            text = rest[1:] if rest[:1] in (" ", "\t", ".") or low != "echo" else rest
            if low.startswith("echo.") and low != "echo.":
                text = name[5:] + rest
            out((_unescape(text) + "\r\n").encode("cp437", errors="replace"))
        return 0
    if low == "ver":
        system = session.env.config()["system"]
        version = f"{system['version']}.{system['ubr']}"
        out(("\r\n" + VERSION_LINE.format(version) + "\r\n").encode())
        return 0
    if low == "exit":
        args = rest.split()
        if args and args[0].lower() == "/b":
            args = args[1:]
        code = 0
        if args:
            try:
                code = int(args[0])
            except ValueError:
                code = 0
        raise _Exit(code)
    if low in POWERSHELL_NAMES:
        return run_powershell(session, windows_argv(rest), out, err, stdin_data)
    err(NOT_RECOGNIZED.format(name).encode())
    return 9009


# --------------------------------------------------------------------------- powershell.exe

# powershell.exe's switches and their shortest accepted prefixes (PowerShell/PowerShell
# src/Microsoft.PowerShell.ConsoleHost/host/msh/CommandLineParameterParser.cs, MatchSwitch
# calls; about_PowerShell_exe 5.1).
SWITCHES = [
    ("command", "c"),
    ("encodedcommand", "e"),
    ("ec", "ec"),
    ("executionpolicy", "ex"),
    ("ep", "ep"),
    ("noprofile", "nop"),
    ("noninteractive", "noni"),
    ("nologo", "nol"),
    ("noexit", "noe"),
    ("outputformat", "o"),
    ("of", "of"),
    ("inputformat", "i"),
    ("if", "if"),
    ("windowstyle", "w"),
    ("file", "f"),
    ("sta", "s"),
    ("mta", "mta"),
    ("version", "v"),
]
TAKES_VALUE = {"executionpolicy", "outputformat", "inputformat", "windowstyle", "version"}
# ConsoleHost's exit code for a bad command line (ExitCodeBadCommandLineParameter).
EXIT_BAD_COMMAND_LINE = 64


def _switch(arg: str) -> str | None:
    if not arg or arg[0] not in "-/":
        return None
    key = arg[1:].lower()
    for full, shortest in SWITCHES:
        if full.startswith(key) and key.startswith(shortest):
            return {
                "ec": "encodedcommand",
                "ep": "executionpolicy",
                "of": "outputformat",
                "if": "inputformat",
            }.get(full, full)
    return None


def run_powershell(
    session: Session,
    args: list[str],
    out: Callable[[bytes], None],
    err: Callable[[bytes], None],
    stdin_data: bytes | None,
) -> int:
    script: str | None = None
    encoded = False
    i = 0
    while i < len(args):
        a = args[i]
        sw = _switch(a)
        if sw is None:
            # The first argument that is not a switch starts the command (about_PowerShell_exe:
            # "If the value of Command is a string, Command must be the last parameter").
            script = " ".join(args[i:])
            break
        if sw == "command":
            if i + 1 >= len(args):
                err(
                    b"Cannot process the command because of a missing parameter. A command must "
                    b"follow -Command.\r\n"
                )
                return EXIT_BAD_COMMAND_LINE
            script = " ".join(args[i + 1 :])
            break
        if sw == "encodedcommand":
            if i + 1 >= len(args):
                err(
                    b"Cannot process the command because of a missing parameter. A command must follow "
                    b"-EncodedCommand.\r\n"
                )
                return EXIT_BAD_COMMAND_LINE
            try:
                script = base64.b64decode(args[i + 1], validate=True).decode("utf-16-le")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                err(
                    b"Cannot process the command because the value specified with -EncodedCommand is "
                    b"not properly encoded. The value must be Base64 encoded.\r\n"
                )
                return EXIT_BAD_COMMAND_LINE
            encoded = True
            i += 2
            continue
        if sw in TAKES_VALUE:
            if i + 1 >= len(args):
                err(f"Missing argument for parameter -{sw}.\r\n".encode())
                return EXIT_BAD_COMMAND_LINE
            if sw == "outputformat" and args[i + 1].lower() not in ("text",):
                err(b"The lab's powershell stand-in writes text output only (-OutputFormat Text).\r\n")
                return 1
            i += 2
            continue
        if sw in ("file", "noexit"):
            err(f"The lab's powershell stand-in does not support -{sw}.\r\n".encode())
            return 1
        i += 1
    if script is None:
        err(b"The lab's powershell stand-in does not run an interactive session.\r\n")
        return 1
    if script.strip() == "-":
        script = (stdin_data or session.read_stdin()).decode("utf-8", errors="replace")
        stdin_data = b""
    session.scripts.append(script)

    def read_lines() -> list[str]:
        data = stdin_data if stdin_data is not None else session.read_stdin()
        text = data.decode("cp437", errors="replace")
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return [ln.rstrip("\r") for ln in lines]

    host = Host(out, err, clixml_errors=encoded)
    rt = Interp(session.env, host, read_lines)
    return rt.run(script)
