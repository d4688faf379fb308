"""SQL Server adapter pieces that need no server: GO batches as sqlcmd splits them, the ODBC
connection string (FreeTDS and Microsoft's driver 18), native error numbers out of pyodbc's
texts, and the inventory's `odbc` block."""

from __future__ import annotations

from pathlib import Path

import pytest

from activities.mssql.connect import connection_string, parse_error
from activities.mssql.scripts import ScriptError, split_batches
from inventory.load import InventoryError, parse_inventory
from inventory.model import Database, OdbcSettings, SecretRef

# ------------------------------------------------------------------ GO batches


def texts(script: str) -> list[str]:
    return [b.text.strip() for b in split_batches(script)]


def test_go_alone_on_its_line_in_any_case_with_spaces_splits() -> None:
    script = "SELECT 1\nGO\nSELECT 2\n  go  \nSELECT 3\n\tGo\nSELECT 4"
    assert texts(script) == ["SELECT 1", "SELECT 2", "SELECT 3", "SELECT 4"]


def test_go_with_a_count_repeats_and_a_comment_may_follow() -> None:
    batches = split_batches("INSERT INTO t VALUES (1)\nGO 3\nSELECT 2\nGO -- done\n")
    assert [(b.text.strip(), b.repeat) for b in batches] == [("INSERT INTO t VALUES (1)", 3), ("SELECT 2", 1)]


def test_go_inside_a_string_or_a_block_comment_is_text() -> None:
    script = "SELECT 'a\nGO\nb'\nGO\n/* a comment\nGO\n /* nested\nGO\n */ still\nGO\n*/ SELECT 2\nGO"
    assert texts(script) == [
        "SELECT 'a\nGO\nb'",
        "/* a comment\nGO\n /* nested\nGO\n */ still\nGO\n*/ SELECT 2",
    ]


def test_go_inside_a_delimited_identifier_and_after_a_line_comment_is_text() -> None:
    script = "SELECT 1 AS [x\nGO\ny]\n-- GO\nGO"
    assert texts(script) == ["SELECT 1 AS [x\nGO\ny]\n-- GO"]


def test_words_that_start_with_go_and_go_with_statements_are_not_separators() -> None:
    assert texts("GOTO here\nSELECT 1 GO\nGOOD:\nGO") == ["GOTO here\nSELECT 1 GO\nGOOD:"]


def test_a_bad_go_line_is_refused_as_sqlcmd_does() -> None:
    for bad in ("SELECT 1\nGO;\n", "SELECT 1\nGO x\n", "SELECT 1\nGO 0\n"):
        if bad.endswith("GO;\n"):
            # "GO;" is not a GO command at all (go-sqlcmd's pattern): it stays in the batch,
            # where the server will call it a syntax error.
            assert texts(bad) == ["SELECT 1\nGO;"]
            continue
        with pytest.raises(ScriptError, match="Syntax error at line 2 near command 'GO'"):
            split_batches(bad)


def test_batch_numbers_and_script_lines() -> None:
    script = "-- header\nSELECT 1\nGO\n\nGO\nSELECT 2\nSELECT 3\nGO\n"
    batches = split_batches(script)
    assert [(b.number, b.first_line) for b in batches] == [(1, 1), (2, 6)]  # the empty batch is skipped
    assert batches[1].script_line(2) == 7  # the server's line 2 of batch 2


def test_crlf_scripts_split_the_same() -> None:
    assert texts("SELECT 1\r\nGO\r\nSELECT 2\r\n") == ["SELECT 1", "SELECT 2"]


# ------------------------------------------------------------------ connection strings


def db(**odbc: object) -> Database:
    return Database(
        name="main",
        kind="mssql",
        host="sql1.example",
        port=1433,
        database="SecretServer",
        user="zerodown",
        password=SecretRef(env="PW"),
        odbc=OdbcSettings(**odbc) if odbc else None,  # type: ignore[arg-type]
    )


def test_freetds_connection_string() -> None:
    cs = connection_string(db(), "p;w}d", None)
    assert cs.startswith("DRIVER={FreeTDS};SERVER=sql1.example;PORT=1433;TDS_Version=7.4;")
    assert "Encryption=request;" in cs and "ClientCharset=UTF-8;" in cs
    # ODBC quoting: in braces, '}' doubled, so ';' in a password cannot end the value.
    assert "PWD={p;w}}d};" in cs and "DATABASE={SecretServer};" in cs and "APP={zerodown};" in cs


def test_microsoft_driver_18_connection_string() -> None:
    cs = connection_string(
        db(driver="ODBC Driver 18 for SQL Server", encrypt="strict", host_name_in_certificate="sql.example"),
        "pw",
        "master",
    )
    assert cs.startswith("DRIVER={ODBC Driver 18 for SQL Server};SERVER=tcp:sql1.example,1433;")
    assert "PORT=" not in cs  # the Microsoft driver has no Port keyword
    assert "Encrypt=strict;" in cs and "TrustServerCertificate=no;" in cs
    assert "HostNameInCertificate=sql.example;" in cs and "DATABASE={master};" in cs
    assert "Encrypt=yes;" in connection_string(db(driver="ODBC Driver 18 for SQL Server"), "pw", None)


def test_native_numbers_are_read_from_pyodbc_texts() -> None:
    import pyodbc

    e = pyodbc.ProgrammingError(
        "42000",
        "[42000] [FreeTDS][SQL Server]Cannot perform a backup or restore operation within a transaction. "
        "(3021) (SQLExecDirectW)",
    )
    err = parse_error(e)
    assert err.numbers == (3021,) and not err.retryable
    assert err.text == "Cannot perform a backup or restore operation within a transaction. (3021)"
    # Windows builds of pyodbc join every record: both numbers of the pair are seen.
    both = parse_error(
        pyodbc.ProgrammingError(
            "42000",
            "[42000] [Microsoft][ODBC Driver 18 for SQL Server][SQL Server]Cannot perform a backup or "
            "restore operation within a transaction. (3021) (SQLExecDirectW); [42000] [Microsoft][ODBC "
            "Driver 18 for "
            "SQL Server][SQL Server]BACKUP DATABASE is terminating abnormally. (3013)",
        )
    )
    assert both.numbers == (3021, 3013)
    deadlock = parse_error(
        pyodbc.Error(
            "40001", "[40001] [FreeTDS][SQL Server]Transaction (Process ID 52) was deadlocked (1205)"
        )
    )
    assert deadlock.retryable
    lost = parse_error(
        pyodbc.OperationalError("08S01", "[08S01] [FreeTDS][SQL Server]Communication link failure")
    )
    assert lost.retryable and lost.numbers == ()


# ------------------------------------------------------------------ the inventory's odbc block


def inventory(database: dict[str, object], tmp_path: Path) -> object:
    raw = {
        "site": "s",
        "nodes": [
            {
                "name": "web1",
                "ssh": {"host": "127.0.0.1", "user": "u", "key": {"env": "KEY"}},
                "app_dir": "/srv/app",
                "service": {"kind": "systemd", "unit": "app"},
                "url": "http://127.0.0.1:1",
            }
        ],
        "databases": [database],
        "application": {"name": "app"},
    }
    return parse_inventory(raw, base_dir=tmp_path)


def test_odbc_settings_load_and_are_checked(tmp_path: Path) -> None:
    base = {
        "name": "main",
        "kind": "mssql",
        "host": "h",
        "database": "d",
        "user": "u",
        "password": {"env": "PW"},
    }
    inv = inventory(
        {**base, "odbc": {"driver": "FreeTDS", "encrypt": "require", "options": {"TextSize": 1024}}}, tmp_path
    )
    d = inv.databases[0]  # type: ignore[attr-defined]
    assert d.port == 1433 and d.odbc == OdbcSettings(
        driver="FreeTDS", encrypt="require", options={"TextSize": "1024"}
    )
    with pytest.raises(InventoryError) as info:
        inventory({**base, "odbc": {"encrypt": "yes", "options": {"PWD": "x"}}}, tmp_path)
    text = str(info.value)
    assert (
        "databases[0].odbc.encrypt: for driver FreeTDS expected one of off, request, require, strict" in text
    )
    assert "databases[0].odbc.options.PWD: set by zerodown" in text
    with pytest.raises(InventoryError, match=r"databases\[0\].odbc: only for kind mssql"):
        inventory({**base, "kind": "mysql", "odbc": {"driver": "FreeTDS"}}, tmp_path)
