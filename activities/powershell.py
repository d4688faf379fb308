"""PowerShell on a Windows node, over Win32-OpenSSH.

Win32-OpenSSH runs an exec request's command line with the default shell (cmd.exe unless
the server's DefaultShell says otherwise), so every script goes as
`powershell -NoProfile -NonInteractive -EncodedCommand <base64 of UTF-16LE>`: no quoting has
to survive two shells, and cmd.exe's 8191-character line limit is the only limit (scripts
here are small and generic; lists travel in files written over SFTP).

Every script starts with `PRELUDE`:
  * `$ErrorActionPreference = 'Stop'`: a failing cmdlet ends the script with exit 1 and its
    message instead of printing it and going on to report success;
  * `$ProgressPreference = 'SilentlyContinue'`: cmdlets such as Expand-Archive write
    progress records, which a non-interactive powershell.exe serializes onto stderr;
  * `[Console]::OutputEncoding = UTF8`: stdout is otherwise the console's OEM code page, and a
    file name outside it would come back as '?'.

Windows PowerShell started with -EncodedCommand and a redirected stdin writes its error
stream as serialized objects ("#< CLIXML" then <Objs>...</Objs>, the form pywinrm and
Ansible unwrap); `readable_stderr` turns that into the plain lines an operator reads.
"""

from __future__ import annotations

import base64
import html
import re

from activities import ssh
from activities.common import fail, tail
from errors import SSH_COMMAND_FAILED
from inventory.model import SshTarget

PRELUDE = (
    "$ErrorActionPreference = 'Stop'; $ProgressPreference = 'SilentlyContinue'; "
    "[Console]::OutputEncoding = [System.Text.Encoding]::UTF8; "
)

# What PowerShell's tokenizer takes for a single quote (CharExtensions.IsSingleQuote in the
# PowerShell source; the language specification's "single-quote-character"): the ASCII
# apostrophe and U+2018-U+201B. Any of them ends a single-quoted string unless doubled.
_PS_SINGLE_QUOTES = ("'", "\u2018", "\u2019", "\u201a", "\u201b")


def quote(text: str) -> str:
    """A PowerShell single-quoted string literal: every kind of single quote inside doubled."""
    for q in _PS_SINGLE_QUOTES:
        text = text.replace(q, q + q)
    return "'" + text + "'"


def encoded(script: str) -> str:
    """The command line that runs `script` through Windows PowerShell."""
    b64 = base64.b64encode(script.encode("utf-16-le")).decode("ascii")
    return f"powershell -NoProfile -NonInteractive -EncodedCommand {b64}"


_CLIXML_STRING = re.compile(r'<S S="Error">(.*?)</S>', re.DOTALL)
_CLIXML_ESCAPE = re.compile(r"_x([0-9A-Fa-f]{4})_")


def readable_stderr(stderr: str) -> str:
    """stderr as text: a "#< CLIXML" error stream reduced to its error lines (the XML's
    `_xHHHH_` escapes undone), anything else as it came."""
    head, sep, rest = stderr.partition("#< CLIXML")
    if not sep:
        return stderr
    parts = [
        _CLIXML_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), html.unescape(s))
        for s in _CLIXML_STRING.findall(rest)
    ]
    return (head + "".join(parts)).replace("\r\n", "\n")


async def run(
    target: SshTarget, script: str, *, what: str, timeout_s: float = 300.0, check: bool = True
) -> ssh.CommandResult:
    """Run `script` (PRELUDE added) on a Windows node; stdout and stderr come back as text
    with Windows line ends made plain. check=True: a non-zero exit is SshCommandFailed
    naming `what`, the exit status and PowerShell's message."""
    res = await ssh.run(target, encoded(PRELUDE + script), timeout_s=timeout_s, check=False)
    out = ssh.CommandResult(
        exit_status=res.exit_status,
        stdout=res.stdout.replace("\r\n", "\n"),
        stderr=readable_stderr(res.stderr),
    )
    if check and out.exit_status != 0:
        fail(
            SSH_COMMAND_FAILED,
            f"ssh {ssh.where(target)}: {what} (PowerShell) exited with status {out.exit_status}; "
            f"{tail(out.stderr) or tail(out.stdout) or '(no output)'}",
        )
    return out
