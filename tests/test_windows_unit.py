"""Windows nodes without a lab: the inventory's `os`, PowerShell's quoting and CLIXML error
stream, the XML configs the secret-server profile installs and how the merge and a staging
override treat them."""

from __future__ import annotations

import base64

import pytest
from temporalio.exceptions import ApplicationError

from activities import powershell
from activities.deploy.xmlmerge import merge_xml, set_app_settings
from activities.nodefs import split_drive
from inventory.load import parse_inventory
from lab.config import LabConfig
from lab.nodes import customise_xml, node_connection_strings, node_customisations
from lab.packages import package_files, read_web_config_xml, web_config_xml
from tests.inventory_support import EXAMPLE, example, problems_of


def test_an_iis_node_is_a_windows_node_with_a_drive_path() -> None:
    raw = example()
    raw["nodes"][0]["app_dir"] = "C:\\inetpub\\wwwroot\\SecretServer"
    inv = parse_inventory(raw, base_dir=EXAMPLE.parent)
    web_a, web_c = inv.node("web-a"), inv.node("web-c")
    assert (web_a.os, web_a.app_dir) == ("windows", "C:/inetpub/wwwroot/SecretServer")
    assert web_c.os == "linux" and web_c.service.kind == "systemd"
    assert inv.staging is not None and inv.staging.os == "windows"


def test_os_and_app_dir_that_do_not_fit_are_refused_with_their_paths() -> None:
    raw = example()
    raw["nodes"][0]["app_dir"] = "/opt/secretserver"  # an IIS node: Windows, a drive path
    raw["nodes"][1]["os"] = "linux"  # but its service is IIS
    raw["nodes"][2]["os"] = "windows"  # but systemd, and a POSIX path
    raw["staging"]["os"] = "solaris"
    problems = problems_of(raw)
    assert any(p.startswith("nodes[0].app_dir: a Windows node's app_dir is a drive path") for p in problems)
    iis_on_linux = "nodes[1].os: an IIS service (service.kind: iis) runs on a Windows node: os must be "
    iis_on_linux += "windows"
    assert iis_on_linux in problems
    assert "nodes[2].service.kind: systemd does not run on a Windows node (os: windows)" in problems
    assert any(p.startswith("nodes[2].app_dir: a Windows node's app_dir") for p in problems)
    assert 'staging.os: expected one of linux, windows, got "solaris"' in problems
    assert len(problems) == 5, problems


def test_powershell_quoting_and_encoding() -> None:
    assert powershell.quote("it's") == "'it''s'"
    assert powershell.quote("a\u2019b") == "'a\u2019\u2019b'"
    line = powershell.encoded("Write-Output 'é'")
    head, _, b64 = line.rpartition(" ")
    assert head == "powershell -NoProfile -NonInteractive -EncodedCommand"
    assert base64.b64decode(b64).decode("utf-16-le") == "Write-Output 'é'"


def test_a_clixml_error_stream_reads_as_text() -> None:
    stderr = (
        "#< CLIXML\r\n"
        '<Objs Version="1.1.0.1" xmlns="http://schemas.microsoft.com/powershell/2004/04">'
        '<S S="Error">Stop-WebAppPool : The object identifier does not represent a valid object. '
        "(Exception from HRESULT: 0x800710D8)_x000D__x000A_</S>"
        '<S S="Error">At line:1 char:1_x000D__x000A_</S></Objs>'
    )
    text = powershell.readable_stderr(stderr)
    assert text == (
        "Stop-WebAppPool : The object identifier does not represent a valid object. "
        "(Exception from HRESULT: 0x800710D8)\nAt line:1 char:1\n"
    )
    assert powershell.readable_stderr("plain error\n") == "plain error\n"


def test_split_drive() -> None:
    assert split_drive("C:/inetpub/wwwroot") == ("C:/", "inetpub/wwwroot")
    assert split_drive("d:\\x") == ("d:/", "x")
    assert split_drive("/srv/app") == ("/", "srv/app")
    assert split_drive(".zerodown/backups") == ("", ".zerodown/backups")


def test_the_profiles_xml_web_config_merges_a_nodes_customisations_onto_the_new_release() -> None:
    lab = LabConfig()
    v1 = package_files(1, "secret-server")["web.config"].decode()
    v2 = package_files(2, "secret-server")["web.config"].decode()
    node = customise_xml(v1, node_customisations(lab, 2), node_connection_strings(lab, 2))
    merged = merge_xml(node, v1, v2, name="web.config")
    settings, conns = read_web_config_xml(merged.text)
    assert {k: settings[k] for k in node_customisations(lab, 2)} == node_customisations(lab, 2)
    assert conns == node_connection_strings(lab, 2)
    assert settings["greeting"] == "Welcome to labapp 2" and settings["feature.notes"] == "on"
    assert merged.text.split("</connectionStrings>")[1] == v2.split("</connectionStrings>")[1]
    assert set(merged.carried) == {
        "appSettings:http.port",
        "appSettings:node.name",
        "appSettings:custom.banner",
        "connectionStrings:AuditLog",
    }
    # Values never reach the report: names only.
    assert not any("18012" in c or "node2-audit" in c for c in merged.carried)


def test_staging_overrides_set_app_settings_in_an_xml_config() -> None:
    text = web_config_xml("http.port = 8080\nnode.name = unnamed\n")
    out = set_app_settings(text, {"http.port": "18008", "node.name": "staging", "extra.key": 'a"b'})
    settings, _ = read_web_config_xml(out)
    assert settings == {"http.port": "18008", "node.name": "staging", "extra.key": 'a"b'}
    assert out.split("</appSettings>")[1] == text.split("</appSettings>")[1]
    with pytest.raises(ApplicationError) as info:
        set_app_settings("<configuration><appSettings>", {"k": "v"}, name="web.config")
    assert info.value.type == "MergeUnsupported" and "does not parse as XML" in info.value.message
    with pytest.raises(ApplicationError) as info:
        set_app_settings("<configuration/>", {"k": "v"}, name="web.config")
    assert "no <appSettings> section" in info.value.message
