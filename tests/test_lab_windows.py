"""The lab's Windows node stand-in (lab/windows): cmd.exe, the PowerShell 5.1 subset, IIS
on a real process, and SSH / SFTP the way Win32-OpenSSH serves them.

The scripts here are not zerodown's: most come from the Microsoft Learn pages of the
cmdlets and about_* topics. Everything runs in-process on a tiny node folder (no session
lab): the interpreter through `cmd.exe /c` (lab/windows/cmd.py), the endpoints through
lab/sshd.py's `serve` on free ports.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import socket
import time
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest

from lab import sshd
from lab.config import LabConfig
from lab.nodes import render_ctl
from lab.windows import APP_DIR, HOME, SFTP_HOME
from lab.windows.cmd import MAX_LINE, Session, run_cmd_line
from lab.windows.drive import WinEnv, WinNode
from lab.windows.state import (
    default_config,
    iis_config,
    prepare,
    read_config,
    reset,
    set_iis_config,
    write_config,
)

NOT_RECOGNIZED = (
    "The term '{0}' is not recognized as the name of a cmdlet, function, script file, or operable program. "
    "Check the spelling of the name, or if a path was included, verify that the path is correct and "
    "try again."
)


@dataclass
class Result:
    code: int
    out: str
    err: str
    raw_out: bytes


def make_node(tmp: Path, port: int = 1) -> WinNode:
    node_dir = tmp / "nodes" / "node1"
    (node_dir / "app").mkdir(parents=True, exist_ok=True)
    node = WinNode("node1", node_dir, tmp / "windows" / "node1", port)
    prepare(node)
    return node


def cmd(node: WinNode, line: str, stdin: bytes = b"") -> Result:
    out: list[bytes] = []
    err: list[bytes] = []
    code = run_cmd_line(Session(WinEnv(node), out.append, err.append, lambda: stdin), line)
    raw = b"".join(out)
    return Result(code, raw.decode("cp437"), b"".join(err).decode("cp437"), raw)


def ps(node: WinNode, script: str, encoded: bool = False) -> Result:
    if encoded:
        b64 = base64.b64encode(script.encode("utf-16-le")).decode()
        return cmd(node, f"powershell.exe -NoProfile -NonInteractive -EncodedCommand {b64}")
    return cmd(node, 'powershell -NoProfile -NonInteractive -Command "' + script.replace('"', '\\"') + '"')


def lines(text: str) -> list[str]:
    return text.split("\r\n")[:-1] if text else []


@pytest.fixture
def node(tmp_path: Path) -> WinNode:
    return make_node(tmp_path)


# --------------------------------------------------------------------------- the language


def test_expressions_from_the_docs(node: WinNode) -> None:
    # about_Comparison_Operators: with a collection on the left the operator filters.
    assert lines(ps(node, "1,2,3 -eq 2; 'Hello' -like 'h*'; 'Hello' -clike 'h*'; 1,2,3 -contains 2").out) == [
        "2",
        "True",
        "False",
        "True",
    ]
    # ForEach-Object Example 1 (Microsoft Learn): 30000, 56798, 12432 | ForEach-Object -Process {$_/1024}
    assert lines(ps(node, "30000, 56798, 12432 | ForEach-Object -Process {$_/1024}").out) == [
        "29.296875",
        "55.466796875",
        "12.140625",
    ]
    # about_Split / about_Join, -replace with a group, -match filling $Matches.
    r = ps(
        node,
        "'a,b,c' -split ','; (1,2,3) -join '-'; 'ab12' -replace '(\\d+)', '<$1>'; "
        "if ('v1.2.3' -match 'v(\\d+)') { $Matches[1] }",
    )
    assert lines(r.out) == ["a", "b", "c", "1-2-3", "ab<12>", "1"]
    # Typographic single quotes are single quotes (about_Quoting_Rules); backtick escapes.
    r = ps(node, "\u2018typographic\u2019; 'it''s'; \"a`tb\"; \"x$(1+2)y\"; $n = $null; $null -eq $n")
    assert lines(r.out) == ["typographic", "it's", "a\tb", "x3y", "True"]


def test_pipeline_output_unrolls_like_powershell(node: WinNode) -> None:
    r = ps(
        node,
        "$one = @(5) | Where-Object { $_ -gt 1 }; $one.GetType().FullName; "
        "$two = 1,2,3 | Where-Object { $_ -gt 1 }; $two.Count; $none = @() | ForEach-Object { $_ }; "
        "$null -eq $none; (1..5 | Measure-Object -Sum).Sum; 5,3,9 | Sort-Object | Select-Object -First 2",
    )
    assert lines(r.out) == ["System.Int32", "2", "True", "15", "3", "5"]


def test_control_flow_and_objects(node: WinNode) -> None:
    script = """
$items = @()
foreach ($i in 1..5) {
    if ($i -eq 2) { continue } elseif ($i -eq 4) { break } else { $items += $i }
}
$items -join ','
$n = 0; while ($n -lt 3) { $n++ }
$n
$o = [pscustomobject]@{ Name = 'pool'; Count = 2 }
$o.Name.ToUpper(); $o.Count + 1
$h = @{ a = 1 }; $h.b = 2; $h['A']
try { throw 'bad' } catch { "caught: $($_.Exception.Message)" } finally { 'finally' }
[int]'42' + 1; [string]7 + 1
(Get-Date).AddSeconds(60) -gt (Get-Date)
"""
    r = ps(node, script, encoded=True)
    assert lines(r.out) == ["1,3", "3", "POOL", "3", "1", "caught: bad", "finally", "43", "71", "True"], r


def test_convertto_json_is_windows_powershell_51s(node: WinNode) -> None:
    r = ps(
        node,
        "@{a=1} | ConvertTo-Json; [pscustomobject]@{n='x<y'; l=@(1,2); e=@()} | ConvertTo-Json; "
        "[pscustomobject]@{a=@{b=@{c=@{d=1}}}} | ConvertTo-Json -Compress",
    )
    assert r.out == (
        '{\r\n    "a":  1\r\n}\r\n'
        '{\r\n    "n":  "x\\u003cy",\r\n    "l":  [\r\n              1,\r\n              2\r\n       '
        "   ],\r\n"
        '    "e":  [\r\n\r\n          ]\r\n}\r\n'
        '{"a":{"b":{"c":"System.Collections.Hashtable"}}}\r\n'
    ), r


# --------------------------------------------------------------------------- errors and exit codes


def test_a_parse_error_runs_nothing(node: WinNode) -> None:
    r = ps(node, "'first'; if ($true) { 'x'")
    assert r.code == 1 and r.out == ""
    assert lines(r.err)[:3] == ["At line:1 char:21", "+ 'first'; if ($true) { 'x'", "+                     ~"]
    assert "Missing closing '}' in statement block or type definition." in r.err
    assert "    + CategoryInfo          : ParserError: (:) [], ParentContainsErrorRecordException" in r.err
    assert "    + FullyQualifiedErrorId : MissingEndCurlyBrace" in r.err
    # PowerShell 7's pipeline chains are not Windows PowerShell 5.1's.
    r = ps(node, "'a' && 'b'")
    assert (
        r.code == 1
        and r.out == ""
        and "The token '&&' is not a valid statement separator in this version." in r.err
    )
    # Outside the subset (a function) is refused the same way, never run halfway.
    r = ps(node, "'a'; function f { 1 }")
    assert r.code == 1 and r.out == "" and "Unexpected token 'function'" in r.err


def test_an_unknown_command_ends_its_statement_only(node: WinNode) -> None:
    r = ps(node, "Get-Frobnicator -Name x")
    assert r.code == 1 and r.out == ""
    assert lines(r.err) == [
        "Get-Frobnicator : " + NOT_RECOGNIZED.format("Get-Frobnicator"),
        "At line:1 char:1",
        "+ Get-Frobnicator -Name x",
        "+ ~~~~~~~~~~~~~~~",
        "    + CategoryInfo          : ObjectNotFound: (Get-Frobnicator:String) [], CommandNotFoundException",
        "    + FullyQualifiedErrorId : CommandNotFoundException",
        " ",
    ]
    # The next statement runs; the exit code follows the last statement's $?.
    r = ps(node, "Get-Frobnicator; 'after'")
    assert r.code == 0 and r.out == "after\r\n"
    # ... unless $ErrorActionPreference is Stop: then the script ends there.
    r = ps(node, "$ErrorActionPreference = 'Stop'; Get-Frobnicator; 'after'")
    assert r.code == 1 and r.out == "" and "CommandNotFoundException" in r.err


def test_error_action_per_cmdlet_and_preference(node: WinNode) -> None:
    # Default (Continue): a non-terminating error, the script goes on.
    r = ps(node, "Get-Item C:\\nope; 'after'")
    assert r.code == 0 and r.out == "after\r\n"
    assert lines(r.err)[:2] == [
        "Get-Item : Cannot find path 'C:\\nope' because it does not exist.",
        "At line:1 char:1",
    ]
    assert "    + FullyQualifiedErrorId : PathNotFound,Microsoft.PowerShell.Commands.GetItemCommand" in r.err
    # -ErrorAction Stop: terminating, the script ends with exit code 1.
    r = ps(node, "Get-Item C:\\nope -ErrorAction Stop; 'after'")
    assert r.code == 1 and r.out == "" and "Cannot find path 'C:\\nope'" in r.err
    # ... and catchable, with the original record in $_.
    r = ps(node, "try { Get-Item C:\\nope -ErrorAction Stop } catch { 'caught ' + $_.FullyQualifiedErrorId }")
    assert r.code == 0 and r.out == "caught PathNotFound,Microsoft.PowerShell.Commands.GetItemCommand\r\n"
    # A non-terminating error is not caught without Stop.
    r = ps(node, "try { Get-Item C:\\nope } catch { 'caught' }; 'end'")
    assert r.out == "end\r\n" and "Cannot find path" in r.err
    # SilentlyContinue: nothing on stderr, but $? is false and $Error has it.
    r = ps(node, "Get-Item C:\\nope -ErrorAction SilentlyContinue")
    assert r.code == 1 and r.err == ""
    r = ps(node, "Get-Item C:\\nope -ea SilentlyContinue; $?; $Error.Count; $Error[0].Exception.Message")
    assert lines(r.out) == ["False", "1", "Cannot find path 'C:\\nope' because it does not exist."]
    # $ErrorActionPreference = 'Stop' applies to every cmdlet.
    r = ps(node, "$ErrorActionPreference = 'Stop'; Get-Item C:\\nope; 'after'")
    assert r.code == 1 and r.out == ""
    # An invalid preference value is refused.
    r = ps(node, "Get-Item C:\\ -ErrorAction Sometimes")
    assert r.code == 1 and "Cannot bind parameter 'ErrorAction'" in r.err


def test_exit_codes(node: WinNode) -> None:
    assert ps(node, "'x'; exit 5").code == 5
    r = ps(node, "throw 'boom'; 'never'")
    assert r.code == 1 and r.out == ""
    assert lines(r.err) == [
        "boom",
        "At line:1 char:1",
        "+ throw 'boom'; 'never'",
        "+ ~~~~~~~~~~~~",
        "    + CategoryInfo          : OperationStopped: (boom:String) [], RuntimeException",
        "    + FullyQualifiedErrorId : boom",
        " ",
    ]
    # Write-Error at the top level: the statement is the header, no position message.
    r = ps(node, "Write-Error 'disk full'")
    assert r.code == 1 and lines(r.err) == [
        "Write-Error 'disk full' : disk full",
        "    + CategoryInfo          : NotSpecified: (:) [Write-Error], WriteErrorException",
        "    + FullyQualifiedErrorId : Microsoft.PowerShell.Commands.WriteErrorException",
        " ",
    ]
    assert ps(node, "$null.Foo()").code == 1
    assert "You cannot call a method on a null-valued expression." in ps(node, "$null.Foo()").err
    assert ps(node, "'ok'").code == 0


def test_encoded_command_writes_errors_as_clixml(node: WinNode) -> None:
    r = ps(node, "Write-Output 'out'; Write-Error 'boom'; 'tail'", encoded=True)
    assert r.code == 0 and r.out == "out\r\ntail\r\n"
    assert r.err.startswith(
        '#< CLIXML\r\n<Objs Version="1.1.0.1" xmlns="http://schemas.microsoft.com/powershell/2004/04">'
    )
    assert "<S S=\"Error\">Write-Error 'boom' : boom_x000D__x000A_</S>" in r.err
    assert r.err.endswith("</Objs>")
    # No error, no CLIXML header at all; -Command writes plain text.
    assert ps(node, "'quiet'", encoded=True).err == ""
    assert ps(node, "Write-Error 'boom'").err.startswith("Write-Error 'boom' : boom\r\n")
    # 5.1 ignores -OutputFormat Text for this (the fix came with pwsh 6, issue #5912).
    b64 = base64.b64encode("Write-Error x".encode("utf-16-le")).decode()
    assert cmd(node, f"powershell -OutputFormat Text -EncodedCommand {b64}").err.startswith("#< CLIXML")


def test_stdout_is_the_oem_code_page_until_the_script_sets_utf8(node: WinNode) -> None:
    r = ps(node, "'caf\u00e9 \u2713'", encoded=True)
    assert r.raw_out == "café ?\r\n".encode("cp437")
    r = ps(node, "[Console]::OutputEncoding = [System.Text.Encoding]::UTF8; 'caf\u00e9 \u2713'", encoded=True)
    assert r.raw_out == "café \u2713\r\n".encode()
    assert lines(ps(node, "[Console]::OutputEncoding.CodePage").out) == ["437"]


# --------------------------------------------------------------------------- the file system


def test_files_through_the_drive_mapping(node: WinNode) -> None:
    app = node.node_dir / "app"
    (app / "bin").mkdir()
    (app / "bin" / "b.dll").write_bytes(b"dll")
    (app / "web.config").write_text("<configuration/>")
    r = ps(
        node,
        "Get-ChildItem -LiteralPath 'C:\\inetpub\\wwwroot\\SecretServer' -Recurse | "
        "ForEach-Object { $_.FullName + '|' + $_.PSIsContainer }",
    )
    assert lines(r.out) == [
        "C:\\inetpub\\wwwroot\\SecretServer\\bin|True",
        "C:\\inetpub\\wwwroot\\SecretServer\\web.config|False",
        "C:\\inetpub\\wwwroot\\SecretServer\\bin\\b.dll|False",
    ], r
    r = ps(
        node,
        "Get-ChildItem C:\\inetpub\\wwwroot\\SecretServer -Recurse -File | Get-FileHash -Algorithm SHA256 | "
        "ForEach-Object { $_.Hash }",
    )
    assert lines(r.out) == [
        hashlib.sha256(b"<configuration/>").hexdigest().upper(),
        hashlib.sha256(b"dll").hexdigest().upper(),
    ]
    # Relative paths resolve in the home: C:\Users\zerodown IS the node folder.
    r = ps(
        node,
        "Test-Path app\\web.config -PathType Leaf; Test-Path 'c:/INETPUB/wwwroot/secretserver' -PathType "
        "Container; (Get-Location).Path; Test-Path C:\\..\\..\\etc\\passwd; Test-Path D:\\x",
    )
    assert lines(r.out) == ["True", "True", "C:\\Users\\zerodown", "False", "False"]
    assert lines(
        ps(
            node,
            "Split-Path -Parent 'C:\\a\\b\\c.txt'; Split-Path 'C:\\a\\b\\c.txt' -Leaf; Join-Path 'C:\\a' 'b'",
        ).out
    ) == ["C:\\a\\b", "c.txt", "C:\\a\\b"]


def test_copy_item_nests_a_folder_copied_onto_an_existing_one(node: WinNode) -> None:
    (node.node_dir / "app" / "f.txt").write_text("v1")
    r = ps(
        node,
        "New-Item -ItemType Directory -Path C:\\backup | Out-Null; "
        "Copy-Item -LiteralPath C:\\inetpub\\wwwroot\\SecretServer -Destination C:\\backup -Recurse; "
        "Copy-Item -LiteralPath C:\\inetpub\\wwwroot\\SecretServer -Destination C:\\fresh -Recurse; "
        "Test-Path C:\\backup\\SecretServer\\f.txt; Test-Path C:\\fresh\\f.txt; "
        "New-Item -ItemType Directory -Path C:\\backup",
    )
    assert lines(r.out) == ["True", "True"], r
    assert "An item with the specified name C:\\backup already exists." in r.err
    r = ps(node, "Remove-Item -LiteralPath C:\\backup; Test-Path C:\\backup")
    assert lines(r.out) == ["True"] and "NonInteractive mode" in r.err
    r = ps(node, "Remove-Item -LiteralPath C:\\backup -Recurse -Force; Test-Path C:\\backup")
    assert lines(r.out) == ["False"] and r.err == ""


def test_expand_archive_and_content(node: WinNode, tmp_path: Path) -> None:
    z = node.drive_root / "pkg.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("web.config", "<new/>")
    r = ps(
        node,
        "Expand-Archive -LiteralPath C:\\pkg.zip -DestinationPath C:\\inetpub\\wwwroot\\SecretServer; "
        "Get-Content -LiteralPath C:\\inetpub\\wwwroot\\SecretServer\\web.config -Raw -Encoding UTF8",
    )
    assert r.out == "<new/>\r\n" and (node.node_dir / "app" / "web.config").read_text() == "<new/>"
    r = ps(
        node, "Expand-Archive -LiteralPath C:\\pkg.zip -DestinationPath C:\\inetpub\\wwwroot\\SecretServer"
    )
    assert r.code == 1 and "Use the -Force parameter" in r.err
    assert ps(node, "Expand-Archive C:\\pkg.zip C:\\inetpub\\wwwroot\\SecretServer -Force").code == 0
    ps(node, "Set-Content -Path C:\\x.txt -Value 'a','b' -Encoding UTF8")
    assert (node.drive_root / "x.txt").read_bytes() == b"\xef\xbb\xbfa\r\nb\r\n"


# --------------------------------------------------------------------------- system facts


def test_system_facts_come_from_the_config(node: WinNode) -> None:
    r = ps(
        node,
        "$os = Get-CimInstance Win32_OperatingSystem; $os.Version; $os.BuildNumber; $os.Caption; "
        "(Get-ItemProperty 'HKLM:\\SOFTWARE\\Microsoft\\NET Framework Setup\\NDP\\v4\\Full').Release; "
        "(Get-PSDrive -Name C).Free -gt 0; $PSVersionTable.PSVersion.Major",
    )
    assert lines(r.out) == [
        "10.0.17763",
        "17763",
        "Microsoft Windows Server 2019 Standard",
        "528049",
        "True",
        "5",
    ]
    cfg = read_config(node)
    cfg["system"].update(
        version="6.3.9600",
        build="9600",
        caption="Microsoft Windows Server 2012 R2 Standard",
        net_release=461814,
    )
    write_config(node, cfg)
    r = ps(
        node,
        "(Get-CimInstance Win32_OperatingSystem).Caption; "
        "(Get-ItemProperty 'HKLM:\\SOFTWARE\\Microsoft\\NET Framework Setup\\NDP\\v4\\Full').Release",
    )
    assert lines(r.out) == ["Microsoft Windows Server 2012 R2 Standard", "461814"]
    assert "Microsoft Windows [Version 6.3.9600.5458]" in cmd(node, "ver").out


def test_net_tcp_connections_are_real(node: WinNode) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    try:
        r = ps(node, f"@(Get-NetTCPConnection -LocalPort {port} -State Established).Count")
        assert lines(r.out) == ["1"], r
    finally:
        for s in (cli, conn, srv):
            s.close()
    r = ps(node, f"Get-NetTCPConnection -LocalPort {port} -State Established")
    assert (
        r.code == 1
        and (
            "No matching MSFT_NetTCPConnection objects found by CIM query for instances of the "
            "ROOT/StandardCimv2/MSFT_NetTCPConnection class on the  CIM server: SELECT * FROM "
            "MSFT_NetTCPConnection  "
            f"WHERE ((LocalPort = {port})) AND ((State = 5)). Verify query parameters and retry."
        )
        in r.err
    )
    r = ps(node, "Get-NetTCPConnection -LocalPort 1")
    assert (
        "No MSFT_NetTCPConnection objects found with property 'LocalPort' equal to '1'.  Verify the value of "
        "the property and retry." in r.err
    )


def test_modules_and_the_iis_drive(node: WinNode) -> None:
    r = ps(node, "Import-Module NoSuchModule")
    assert (
        r.code == 1
        and "Import-Module : The specified module 'NoSuchModule' was not loaded because no valid "
        "module file was found in any module directory."
        in r.err
    )
    # A provider path does not load WebAdministration; a cmdlet of it or Import-Module does.
    r = ps(node, "Get-ItemProperty IIS:\\AppPools\\SecretServer -Name managedRuntimeVersion")
    assert r.code == 1 and "Cannot find drive. A drive with the name 'IIS' does not exist." in r.err
    r = ps(
        node,
        "Import-Module WebAdministration; Get-ItemProperty IIS:\\AppPools\\SecretServer -Name "
        "managedPipelineMode; Get-ItemProperty IIS:\\AppPools\\SecretServer -Name managedRuntimeVersion",
    )
    assert lines(r.out) == ["Integrated", "v4.0"]
    cfg = read_config(node)
    cfg["pools"][0]["managedPipelineMode"] = "Classic"
    cfg["applications"].append(
        {
            "site": "SecretServer",
            "path": "/api",
            "applicationPool": "SecretServer",
            "physicalPath": "C:\\inetpub\\wwwroot\\api",
        }
    )
    write_config(node, cfg)
    r = ps(
        node,
        "Import-Module WebAdministration; (Get-ItemProperty IIS:\\AppPools\\SecretServer "
        "-Name managedPipelineMode); @(Get-WebApplication | Where-Object { $_.applicationPool -eq "
        "'SecretServer' }).Count; Set-ItemProperty IIS:\\Sites\\SecretServer -Name physicalPath -Value "
        "C:\\inetpub\\wwwroot\\SecretServer.v2; (Get-Website -Name SecretServer).physicalPath",
    )
    assert lines(r.out) == ["Classic", "1", "C:\\inetpub\\wwwroot\\SecretServer.v2"], r


# --------------------------------------------------------------------------- cmd.exe


def test_cmd_exe(node: WinNode) -> None:
    r = cmd(node, "ver")
    assert r.code == 0 and r.out == "\r\nMicrosoft Windows [Version 10.0.17763.5458]\r\n"
    r = cmd(node, "uname -a")
    assert r.code == 9009 and r.err == (
        "'uname' is not recognized as an internal or external command,\r\noperable program or batch file.\r\n"
    )
    r = cmd(node, "echo one & echo two && exit /b 3 || echo never")
    assert r.code == 3 and r.out == "one \r\ntwo \r\n"
    r = cmd(node, "bogus 2>nul || echo fallback")
    assert r.code == 0 and r.out == "fallback\r\n" and r.err == ""
    r = cmd(node, "ver >nul && echo ok")
    assert r.out == "ok\r\n"
    r = cmd(node, "ver > /dev/null")
    assert r.code == 1 and r.out == "" and r.err == "The system cannot find the path specified.\r\n"
    r = cmd(node, "echo " + "x" * MAX_LINE)
    assert r.code == 1 and r.out == "" and r.err == "The command line is too long.\r\n"
    r = cmd(node, "echo %USERPROFILE%")
    assert r.out == "C:\\Users\\zerodown\r\n"
    r = cmd(node, "powershell -Command")
    assert r.code == 64


# --------------------------------------------------------------------------- IIS on a real process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served_node(tmp_path: Path) -> Iterator[WinNode]:
    """A node whose service is a tiny HTTP server behind a real ctl script."""
    port = free_port()
    node = make_node(tmp_path, port)
    cfg = LabConfig(root=tmp_path)
    launch = (
        '  cd "$HERE/app" || return 1\n'
        '  setsid nohup "$PY" -m http.server --bind 127.0.0.1 "$PORT" >> "$LOG" 2>&1 < /dev/null &'
    )
    ctl = node.node_dir / "ctl"
    ctl.write_text(render_ctl(cfg, "node1", port, launch=launch, match=r"http\.server", stop_timeout_s=5))
    ctl.chmod(0o755)
    (node.node_dir / "run").mkdir()
    config = default_config(node)
    write_config(node, config)
    try:
        yield node
    finally:
        os.system(f"cd {node.node_dir} && ./ctl stop >/dev/null 2>&1")


def wait_for(node: WinNode, script: str, want: str, timeout: float = 10) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = ps(node, script).out.strip()
        seen.append(out)
        if out == want:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"never {want!r}: {seen[-5:]}")


def test_pool_states_follow_the_real_process(served_node: WinNode) -> None:
    node = served_node
    state = "(Get-WebAppPoolState -Name SecretServer).Value"
    workers = "@(Get-ChildItem IIS:\\AppPools\\SecretServer\\WorkerProcesses).Count"
    assert ps(node, state).out == "Stopped\r\n"
    r = ps(node, f"Start-WebAppPool -Name SecretServer; {state}")
    assert r.code == 0 and r.out == "Starting\r\n", r
    wait_for(node, state, "Started")
    pid = int((node.node_dir / "run" / "app.pid").read_text())
    r = ps(
        node,
        f"Import-Module WebAdministration; {workers}; "
        "(Get-ChildItem IIS:\\AppPools\\SecretServer\\WorkerProcesses).processId",
    )
    assert lines(r.out) == ["1", str(pid)]
    # Starting a started pool: the COM error, non-terminating, exit code 1.
    r = ps(node, "Start-WebAppPool -Name SecretServer")
    assert (
        r.code == 1
        and "start-webitem : The object identifier does not represent a valid object. (Exception "
        "from HRESULT: 0x800710D8)"
        in r.err
    )
    # Stop returns at once, Stopping first, then Stopped; the worker is gone soon after.
    t0 = time.monotonic()
    r = ps(node, f"Stop-WebAppPool -Name SecretServer; {state}")
    assert r.out == "Stopping\r\n" and time.monotonic() - t0 < 2, r
    wait_for(node, state, "Stopped")
    wait_for(node, f"Import-Module WebAdministration; {workers}", "0")
    r = ps(node, "Stop-WebAppPool -Name SecretServer")
    assert r.code == 1 and "stop-webitem : The object identifier does not represent a valid object." in r.err
    r = ps(node, "Stop-WebAppPool -Name NoSuchPool")
    assert "stop-webitem : Cannot find path 'IIS:\\AppPools\\NoSuchPool' because it does not exist." in r.err
    assert (
        "    + FullyQualifiedErrorId : PathNotFound,Microsoft.IIs.PowerShell.Provider.StopItemCommand"
        in r.err
    )
    # Sites keep their state in the config.
    r = ps(node, "Stop-Website -Name SecretServer; (Get-Website -Name SecretServer).state")
    assert r.out == "Stopped\r\n"


# --------------------------------------------------------------------------- over SSH


@contextlib.contextmanager
def _port_block() -> Iterator[int]:
    """A port base whose Linux and Windows endpoint ports are free (locked like conftest's)."""
    import fcntl

    from tests.conftest import LOCK_DIR, _port_free

    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    for n in range(200):
        base = 41000 + n * 100
        ports = [base + 9, base + 31, base + 59, base + 91]
        fd = os.open(LOCK_DIR / f"{base}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        if all(_port_free(p) for p in ports):
            try:
                yield base
            finally:
                os.close(fd)
            return
        os.close(fd)
    raise RuntimeError("no free port block")


@pytest.fixture
async def endpoint(tmp_path: Path) -> AsyncIterator[LabConfig]:
    """lab/sshd.py's server, in this process, for a one-node lab: its Windows endpoints."""
    with _port_block() as base:
        cfg = LabConfig(root=tmp_path / "lab", nodes=1, port_base=base)
        (cfg.node_dir(1) / "app").mkdir(parents=True)
        sshd.ensure_keys(cfg)
        stop = asyncio.Event()
        task = asyncio.create_task(sshd.serve(cfg, stop))
        deadline = time.monotonic() + 10
        while not all(_open(p) for _, p, _ in sshd.endpoints(cfg)):
            assert time.monotonic() < deadline and not task.done(), "endpoints did not listen"
            await asyncio.sleep(0.05)
        try:
            yield cfg
        finally:
            stop.set()
            await task


def _b(data: bytes | str | None) -> bytes:
    assert isinstance(data, bytes)
    return data


def _open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        return False


async def _connect(cfg: LabConfig, port: int) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect(
        "127.0.0.1",
        port,
        username="zerodown",
        client_keys=[str(cfg.client_key)],
        known_hosts=str(cfg.known_hosts),
    )


async def test_the_windows_endpoint_over_ssh(endpoint: LabConfig) -> None:
    cfg = endpoint
    names = [n for n, _, _ in sshd.endpoints(cfg)]
    assert names == ["node1", "staging", "win:node1", "win:staging"]
    assert cfg.win_ssh_port(1) == cfg.port_base + 91 and cfg.win_staging_ssh_port == cfg.port_base + 59
    assert {cfg.win_ssh_port(1), cfg.win_staging_ssh_port} <= set(cfg.all_ports())
    async with await _connect(cfg, cfg.win_ssh_port(1)) as conn:
        r = await conn.run("ver", encoding=None)
        assert r.exit_status == 0 and r.stdout == b"\r\nMicrosoft Windows [Version 10.0.17763.5458]\r\n"
        r = await conn.run("ls -la", encoding=None)
        # 9009 goes out as a uint32; asyncssh clients keep its low byte (0x2331 -> 0x31).
        assert r.exit_status == 9009 & 0xFF and _b(r.stderr).startswith(b"'ls' is not recognized")
        script = (
            "Get-Item C:\\nope; [Console]::OutputEncoding = [System.Text.Encoding]::UTF8; 'd\u00e9j\u00e0'"
        )
        b64 = base64.b64encode(script.encode("utf-16-le")).decode()
        r = await conn.run(f"powershell.exe -NoProfile -NonInteractive -EncodedCommand {b64}", encoding=None)
        assert r.exit_status == 0 and r.stdout == "déjà\r\n".encode()
        err = _b(r.stderr)
        assert err.startswith(b"#< CLIXML\r\n") and b"Cannot find path" in err
        r = await conn.run(
            'powershell -NoProfile -Command "$input | ForEach-Object { $_.ToUpper() }"',
            input=b"a\nb\n",
            encoding=None,
        )
        assert r.stdout == b"A\r\nB\r\n", r
    # The Linux endpoint of the same node is untouched.
    async with await _connect(cfg, cfg.ssh_port(1)) as conn:
        r = await conn.run("pwd", check=True)
        assert str(r.stdout).strip() == str(cfg.node_dir(1))
    log = (cfg.node_dir(1) / "ssh.log").read_text().splitlines()
    import json

    entries = [json.loads(x) for x in log]
    win = [e for e in entries if e.get("shell") == "cmd"]
    assert [e["exit_status"] for e in win] == [0, 9009, 0, 0]
    assert win[2]["powershell"] == [script] and win[0]["command"] == "ver"


async def test_sftp_with_drive_letter_paths(endpoint: LabConfig) -> None:
    cfg = endpoint
    app = cfg.node_dir(1) / "app"
    async with await _connect(cfg, cfg.win_ssh_port(1)) as conn, conn.start_sftp_client() as sftp:
        assert await sftp.realpath(".") == SFTP_HOME == "/C:/Users/zerodown"
        assert await sftp.realpath("c:/inetpub/../Users") == "/C:/Users"
        assert await sftp.realpath("/") == "/"
        assert [n for n in await sftp.listdir("/")] == ["C:"]
        async with sftp.open(f"{APP_DIR}/new.txt", "wb") as f:
            await f.write(b"hello")
        assert (app / "new.txt").read_bytes() == b"hello"
        assert "SecretServer" in await sftp.listdir("/C:/inetpub/wwwroot")
        assert (await sftp.stat("C:\\inetpub\\wwwroot\\SecretServer\\new.txt")).size == 5
        assert (await sftp.stat("app/new.txt")).size == 5  # relative: the home is the node folder
        assert (await sftp.stat(f"/{HOME}/app/new.txt")).size == 5
        # SSH_FXP_RENAME onto an existing file fails (CreateHardLink); posix-rename replaces.
        async with sftp.open(f"{APP_DIR}/other.txt", "wb") as f:
            await f.write(b"other")
        with pytest.raises(asyncssh.SFTPFailure):
            await sftp.rename(f"{APP_DIR}/other.txt", f"{APP_DIR}/new.txt")
        await sftp.posix_rename(f"{APP_DIR}/other.txt", f"{APP_DIR}/new.txt")
        assert (app / "new.txt").read_bytes() == b"other" and not (app / "other.txt").exists()
        await sftp.mkdir("C:/inetpub/wwwroot/SecretServer/sub")
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await sftp.remove("C:/inetpub/wwwroot/SecretServer/sub")
        await sftp.rmdir("C:/inetpub/wwwroot/SecretServer/sub")
        with pytest.raises(asyncssh.SFTPNoSuchFile):
            await sftp.stat("C:/../../etc/passwd")
        with pytest.raises(asyncssh.SFTPNoSuchFile):
            await sftp.stat("D:/x")


def test_state_helpers(tmp_path: Path) -> None:
    cfg = LabConfig(root=tmp_path, nodes=2)
    conf = iis_config(cfg, 1)
    assert conf["sites"][0]["bindings"][0]["bindingInformation"] == f"*:{cfg.app_port(1)}:"
    assert conf["pools"][0]["managedRuntimeVersion"] == "v4.0" and conf["system"]["net_release"] == 528049
    conf["pools"][0]["managedPipelineMode"] = "Classic"
    set_iis_config(cfg, 1, conf)
    assert iis_config(cfg, 1)["pools"][0]["managedPipelineMode"] == "Classic"
    assert (
        iis_config(cfg, None)["sites"][0]["bindings"][0]["bindingInformation"] == f"*:{cfg.staging_app_port}:"
    )
    done = reset(cfg)
    assert "node1: IIS configuration reset" in done
    assert iis_config(cfg, 1)["pools"][0]["managedPipelineMode"] == "Integrated"
