"""activities/ox.py without a site: command lines and the parsing of OX's outputs (the formats
OX's tools print, as the lab's stand-in reproduces them from OX's sources), and the
properties editor. The same verbs run against the lab's OX nodes in test_ox_upgradeschemata."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
from temporalio.exceptions import ApplicationError

from activities import ox
from inventory.model import Node, OxSettings, SecretRef, ServiceControl, SshTarget

SETTINGS = OxSettings(
    server_name="oxserver",
    main_lb="main",
    secondary_lb="secondary",
    secondary_url="http://lb2",
    admin_password=SecretRef(env="OX_PW"),
    install_command="./oxpkg install {version}",
    version_command="./oxpkg version",
    tools_dir="/opt/open-xchange/sbin",
)
TASK = "com.openexchange.groupware.update.tasks.LabInjectedFailureTask"


def test_the_password_goes_to_stdin_never_on_the_command_line() -> None:
    cmd = ox.tool_command(SETTINGS, "changeserver", ["-s", "8", "-m", "oxdatabase_5"])
    assert cmd == (
        "IFS= read -r ADMIN_PASSWORD && export ADMIN_PASSWORD && exec "
        "/opt/open-xchange/sbin/changeserver -A oxadminmaster -s 8 -m oxdatabase_5"
    )
    assert (
        ox.tool_command(SETTINGS, "runupdate", ["-n", "x; rm -rf /"], admin=False)
        == "/opt/open-xchange/sbin/runupdate -n 'x; rm -rf /'"
    )


def _fake_tools(tmp_path: Path, fail: str = "") -> OxSettings:
    """Two stand-in tools that print their name, arguments and password, and exit 1 if named."""
    for tool in ("disableschema", "changeserver"):
        script = tmp_path / tool
        script.write_text(
            f'#!/bin/sh\necho "{tool} $* pw=$ADMIN_PASSWORD"\n'
            + ("echo boom >&2; exit 1\n" if tool == fail else "")
        )
        script.chmod(0o755)
    return dataclasses.replace(SETTINGS, tools_dir=str(tmp_path))


@pytest.mark.parametrize("fail", ["", "disableschema", "changeserver"])
def test_admin_tools_run_back_to_back_in_one_command(tmp_path: Path, fail: str) -> None:
    settings = _fake_tools(tmp_path, fail)
    cmd = ox.admin_tools_command(
        settings, [("disableschema", ["-m", "s 1"]), ("changeserver", ["-s", "8", "-m", "s 1"])]
    )
    assert "secret" not in cmd and "'s 1'" in cmd
    r = subprocess.run(["sh", "-c", cmd], input="secret\n", capture_output=True, text=True, check=False)
    outputs, offsets = ox.split_tools_output(r.stdout)
    assert outputs[0] == "disableschema -A oxadminmaster -m s 1 pw=secret\n"
    if fail == "disableschema":
        # The chain stops at the first failure: changeserver never ran.
        assert r.returncode == 1 and len(outputs) == 1 and "boom" in r.stderr
        return
    assert outputs[1] == "changeserver -A oxadminmaster -s 8 -m s 1 pw=secret\n"
    assert len(offsets) == 2 and offsets[0] == 0.0 and 0.0 <= offsets[1] < 5.0
    assert r.returncode == (1 if fail else 0)


def test_listdatabaseschema_and_listserver_csv() -> None:
    text = (
        'id,display_name,schema_name,url,currentunits\n"1","oxdatabase","oxdatabase_1",'
        '"jdbc:mysql://127.0.0.1:3306","2"\n"1","oxdatabase","oxdatabase_10","jdbc:mysql://x","0"\n'
    )
    assert ox.parse_schemata(text) == (ox.OxSchema("oxdatabase_1", 1, 2), ox.OxSchema("oxdatabase_10", 1, 0))
    assert ox.parse_schemata("id,display_name,schema_name,url,currentunits\n") == ()
    assert ox.parse_servers('id,name\n"2","oxserver"\n"3","oxserver-xyz"\n') == (
        ox.OxServer(2, "oxserver"),
        ox.OxServer(3, "oxserver-xyz"),
    )
    with pytest.raises(ApplicationError, match="without column"):
        ox.parse_servers("Id Name\n 2 oxserver\n")  # the table form, not --csv


def test_registerserver_and_runupdate_outputs() -> None:
    assert ox.parse_registered("server 8 registered\n") == 8
    with pytest.raises(ApplicationError) as info:
        ox.parse_registered("Server oxserver-xyz already exists!\n")
    assert info.value.type == ox.OX_OUTPUT_UNEXPECTED
    assert ox.parse_failed_tasks("") == ()
    table = (
        "The following update task(s) failed:\n"
        f"taskName{' ' * 50} className{' ' * 50} schema\n"
        f"{TASK} {TASK} oxdatabase_5\n"
    )
    assert ox.parse_failed_tasks(table) == (TASK,)


def test_upgradeschemata_output_per_schema() -> None:
    def done(s: str) -> str:
        return (
            f"Disabling schema '{s}'...OK\nChanging server for schema '{s}' to 'oxserver-xyz'...OK\n"
            f"Running updates...OK\nEnabling schema '{s}'...OK\n"
        )

    stdout = (
        "Registering the server with name 'oxserver-xyz'...OK\n"
        + done("oxdatabase_1")
        + "Disabling schema 'oxdatabase_2'...OK\nChanging server for schema 'oxdatabase_2' to "
        "'oxserver-xyz'...OK\nRunning updates...Enabling schema 'oxdatabase_2'...OK\n"
        + done("oxdatabase_3")
        + "Disabling schema 'oxdatabase_4'...OK\nChanging server for schema "
        "'oxdatabase_4' to 'oxserver-xyz'...OK\nRunning updates..."
    )
    stderr = (
        f"\nErrors while running updates for schema 'oxdatabase_2': \nThe following update task(s) "
        f"failed: \n {TASK} (schema=oxdatabase_2)\n"
        f"\nErrors while running updates for schema 'oxdatabase_4': \nThe following update task(s) "
        f"failed: \n {TASK} (schema=oxdatabase_4)\n"
        "Schema upgrade for schema 'oxdatabase_4' was aborted. Manual intervention might be "
        "required.\n"
    )
    schemata, existing, registered, aborted = ox.parse_upgradeschemata(stdout, stderr)
    assert (existing, registered, aborted) == (None, True, False)
    err = f"update task(s) failed: {TASK}"
    assert schemata == [
        ox.OxToolSchema("oxdatabase_1", True, True, True, True),
        ox.OxToolSchema("oxdatabase_2", True, True, False, True, err),  # -f: enabled again by the tool
        ox.OxToolSchema("oxdatabase_3", True, True, True, True),
        ox.OxToolSchema("oxdatabase_4", True, True, False, False, err),  # no -f: stopped, left disabled
    ]
    warning = (
        "WARNING: The specified server is already registered with id '6'.\n         If that shouldn't "
        "be the case, type 'abort' to abort the upgrade process, otherwise, type 'continue' to "
        "proceed.\n"
    )
    assert ox.parse_upgradeschemata(warning + "OK, aborting upgrade\n", "") == ([], 6, False, True)
    assert ox.parse_upgradeschemata(warning + "OK, proceeding with the upgrade\n" + done("oxdatabase_7"), "")[
        1:
    ] == (6, False, False)


def test_properties_are_edited_line_by_line() -> None:
    key = "com.openexchange.server.migrationRedirectURL"
    text = "# server.properties\ncom.openexchange.foo=1\n"
    assert ox.property_value(text, key) is None
    added = ox.set_property_text(text, key, "http://lb2")
    assert added == text + f"{key}=http://lb2\n"
    assert ox.property_value(added, key) == "http://lb2"
    # Java properties also allow "key : value" and spaces; duplicates collapse onto the first.
    messy = f"a=1\n  {key} : http://old \nb=2\n{key}=http://older\n"
    assert ox.property_value(messy, key) == "http://old"
    assert ox.set_property_text(messy, key, "http://new") == f"a=1\n{key}=http://new\nb=2\n"
    assert ox.set_property_text(messy, key, None) == "a=1\nb=2\n"
    # A key that only starts like another is a different key.
    assert ox.property_value("SERVER_NAME_X=a\n", "SERVER_NAME") is None


# ------------------------------------------------------------------ against the real tools' outputs
# tests/fixtures/ox/ holds what OX's tools print, derived from OX's source (its README names
# the file and lines of each); the same files check the lab's stand-in (test_lab_ox_tools).
FIXTURES = Path(__file__).parent / "fixtures" / "ox"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


def test_parsers_read_the_real_listings() -> None:
    schemata = ox.parse_schemata(fixture("listdatabaseschema.csv"))
    assert ox.OxSchema("oxdatabase_10", 1, 0) in schemata  # no contexts: currentunits 0
    assert [s.name for s in schemata][:3] == ["oxdatabase_1", "oxdatabase_10", "oxdatabase_2"]  # no order
    dbs = ox.parse_databases(fixture("listdatabase.csv"))
    assert dbs == (ox.OxDatabase(1, "oxdatabase", 1000, 12), ox.OxDatabase(1000, "oxclosed", 0, 4))
    assert ox.parse_failed_tasks(fixture("runupdate-failed.out")) == (TASK,)


def test_parsers_read_the_real_upgradeschemata_runs() -> None:
    schemata, existing, registered, aborted = ox.parse_upgradeschemata(
        fixture("upgradeschemata-force.out"), fixture("upgradeschemata-force.err")
    )
    assert (existing, registered, aborted) == (None, True, False)
    failed = {s.schema for s in schemata if s.error}
    assert failed == {"oxdatabase_2", "oxdatabase_5"}
    assert all(s.enabled for s in schemata)  # -f: the tool enables a failed schema again
    empty, _, _, _ = ox.parse_upgradeschemata(fixture("upgradeschemata-empty-schema.out"), "")
    skipped = [s for s in empty if s.skipped_empty]
    assert [s.schema for s in skipped] == ["oxdatabase_10"] and not skipped[0].disabled
    for name in ("upgradeschemata-registered-server.out", "upgradeschemata-registered-server-m.out"):
        _, existing, registered, aborted = ox.parse_upgradeschemata(fixture(name), "")
        assert (existing, registered, aborted) == (3, False, True), name


@pytest.mark.parametrize(
    ("exit_status", "err", "transient"),
    [
        (105, "tool-fault-connect.err", True),
        (107, "tool-fault-remote.err", True),
        (106, "changeserver-not-disabled.err", False),
        (101, "admin-wrong-credentials.err", False),
        (104, "admin-missing-credentials.err", False),
        (1, "disableschema-empty-schema.err", False),
    ],
)
def test_transient_exit_codes_are_retryable_the_others_are_not(
    exit_status: int, err: str, transient: bool
) -> None:
    node = _node()
    with pytest.raises(ApplicationError) as info:
        ox.tool_failed(node, "changeserver", ["-m", "oxdatabase_5"], exit_status, fixture(err))
    assert info.value.non_retryable is not transient
    assert info.value.type == (ox.OX_TOOL_UNAVAILABLE if transient else ox.OX_TOOL_FAILED)


def test_runupdate_gets_the_credentials_by_reference_only() -> None:
    cmd = ox.runupdate_command(SETTINGS, "x; rm -rf /")
    assert cmd == ("/opt/open-xchange/sbin/runupdate -A oxadminmaster -P \"$ZD_SECRET\" -n 'x; rm -rf /'")


def _node() -> Node:
    return Node(
        name="ox1",
        ssh=SshTarget(host="127.0.0.1"),
        app_dir="/opt",
        service=ServiceControl(kind="systemd"),
        url="http://127.0.0.1",
    )
