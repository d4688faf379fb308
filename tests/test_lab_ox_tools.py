"""The Open-Xchange stand-in's config database and command line tools (lab/ox) against the
session lab's MariaDB primary.

The config DB is created once for this module (6 schemata of 2 contexts with 3 users each) and
dropped after it (re-created as lab up makes it when the lab has an OX cluster, which runs on
it); every test starts from `configdb.reset`. The tools run as the installed shell wrappers
(a subprocess each, as a procedure runs them over SSH), with runupdate's work set to 0 s.
Expected output is written out literally (the formats are what a procedure parses) or read
from tests/fixtures/ox/, the real tools' texts derived from OX's source (its README names the
source of each file); stack-frame lines ("\tat ...", lab-made) are dropped before comparing.

Measured once on the lab's instance (not asserted): create() of 10,000 schemata (20,000
contexts, 60,000 users) takes ~3.5 s, reset() ~0.1 s, upgradeschemata over all of them ~2 min
with OX_RUNUPDATE_SECONDS=0.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab import manager, mariadb
from lab.config import LabConfig
from lab.ox import configdb, tools
from lab.ox.configdb import FAILING_TASK, SCHEMA_MOVE_REASON_ID

SCHEMATA = 6
NEW = "oxserver-xyz"
FIXTURES = Path(__file__).parent / "fixtures" / "ox"
BANNER = "An error occurred during schema upgrade. Manual intervention is advised.\n"
TARGET = configdb.DEFAULT_TARGET_VERSION
OLD = configdb.DEFAULT_VERSION


@dataclass(frozen=True)
class Ox:
    cfg: LabConfig
    site: configdb.OxSite
    bin: Path
    password: str

    @property
    def auth(self) -> list[str]:
        return ["-A", "oxadminmaster", "-P", self.password]


@dataclass(frozen=True)
class Run:
    rc: int
    out: str
    err: str


@pytest.fixture(scope="module")
def ox_site(lab: LabConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ox]:
    site = configdb.create(lab, schemata=SCHEMATA, contexts_per_schema=2, users_per_context=3)
    bin_dir = tmp_path_factory.mktemp("oxbin")
    tools.install_tools(
        bin_dir, str(Path(lab.python).absolute()), configdb.tools_env(lab, OX_RUNUPDATE_SECONDS="0")
    )
    password = configdb.master_password_file(lab).read_text(encoding="utf-8").strip()
    try:
        yield Ox(lab, site, bin_dir, password)
    finally:
        if lab.ox_nodes:
            # The session lab's OX cluster runs on this config DB: back as lab up made it.
            manager.recreate_ox_configdb(lab)
        else:
            configdb.drop(lab)


@pytest.fixture
def ox(ox_site: Ox) -> Ox:
    configdb.reset(ox_site.cfg)
    return ox_site


def run(
    ox: Ox, tool: str, *args: str, stdin: str = "", env: dict[str, str] | None = None, auth: bool = True
) -> Run:
    argv = [str(ox.bin / tool), *(ox.auth if auth else []), *args]
    p = subprocess.run(
        argv,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )
    return Run(p.returncode, p.stdout, p.stderr)


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


def no_frames(text: str) -> str:
    """The stand-in's output without its (lab-made) stack-frame lines."""
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("\tat "))


def port_3306(ox: Ox, text: str) -> str:
    """The lab primary's port in JDBC URLs as the fixtures have it."""
    return text.replace(f"127.0.0.1:{ox.cfg.primary_db_port}", "127.0.0.1:3306")


def summary(ox: Ox) -> dict[str, tuple[str, bool, int, str]]:
    """schema -> (update_state, enabled, server_id, version); also checks that the contexts
    agree with the schema's state (all enabled or all disabled, all on its server). create()'s
    schemata only."""
    out = {}
    for name, s in configdb.schema_states(ox.cfg).items():
        if name not in ox.site.schemata:  # added by a lab helper (empty schema, closed pool)
            continue
        assert s.contexts == 2, name
        assert s.contexts_enabled == (2 if s.enabled else 0), (name, s)
        assert s.context_servers == (s.server_id,), (name, s)
        out[name] = (s.update_state, s.enabled, s.server_id, s.version)
    return out


def summary_all(ox: Ox) -> dict[str, tuple[str, bool, int, str]]:
    """schema -> (update_state, enabled, server_id, version) of every schema (empty ones too)."""
    return {
        n: (st.update_state, st.enabled, st.server_id, st.version)
        for n, st in configdb.schema_states(ox.cfg).items()
    }


def s(i: int) -> str:
    return configdb.schema_name(i)


def untouched(ox: Ox) -> tuple[str, bool, int, str]:
    return ("none", True, ox.site.server_id, OLD)


def upgraded(server_id: int) -> tuple[str, bool, int, str]:
    return ("done", True, server_id, TARGET)


def failed(server_id: int, enabled: bool) -> tuple[str, bool, int, str]:
    return ("failed", enabled, server_id, OLD)


def done_lines(i: int, server: str = NEW) -> list[str]:
    return [
        f"Disabling schema '{s(i)}'...OK",
        f"Changing server for schema '{s(i)}' to '{server}'...OK",
        "Running updates...OK",
        f"Enabling schema '{s(i)}'...OK",
    ]


def failed_forced_lines(i: int, server: str = NEW) -> list[str]:
    # "Running updates..." stays unterminated on stdout; the error goes to stderr.
    return [
        f"Disabling schema '{s(i)}'...OK",
        f"Changing server for schema '{s(i)}' to '{server}'...OK",
        f"Running updates...Enabling schema '{s(i)}'...OK",
    ]


def update_error(i: int) -> str:
    return (
        f"\nErrors while running updates for schema '{s(i)}': \n"
        f"The following update task(s) failed: \n {FAILING_TASK} (schema={s(i)})\n"
    )


def warning(server_id: int) -> str:
    # UpgradeSchemata.registerServer without -m (L399-L400 and the prompt).
    return (
        f"WARNING: The specified server is already registered with id '{server_id}'.\n"
        "         If you continue the already existing server will be used to point the updated "
        "schemata after the update tasks complete.\n"
        f"         {tools.PROMPT}\n"
    )


def continue_with(server_id: int, name: str = NEW) -> str:
    # UpgradeSchemata.registerServer with -m (L391 and the prompt).
    return (
        f"The server '{name}' with id '{server_id}' will be used to point the updated schemata after "
        f"the update tasks complete.\n{tools.PROMPT}\n"
    )


def register(ox: Ox, name: str = NEW) -> int:
    r = run(ox, "registerserver", "-n", name)
    assert r.rc == 0, r
    return int(r.out.split()[1])


# --------------------------------------------------------------------------- config DB


def test_create_and_reset(ox: Ox) -> None:
    assert ox.site.schemata == tuple(s(i) for i in range(1, SCHEMATA + 1))
    assert configdb.servers(ox.cfg) == [(ox.site.server_id, "oxserver")]
    assert summary(ox) == {s(i): untouched(ox) for i in range(1, SCHEMATA + 1)}
    counts = mariadb.query(
        ox.cfg,
        "primary",
        "SELECT COUNT(*), COUNT(DISTINCT schema_name) FROM users",
        database=configdb.SCHEMATA_DB,
    )[0]
    assert tuple(counts) == (SCHEMATA * 2 * 3, SCHEMATA)
    assert configdb.reset(ox.cfg) == []

    assert run(ox, "disableschema", "-m", s(2)).rc == 0
    new_id = register(ox)
    assert run(ox, "changeserver", "-s", str(new_id), "-m", s(2)).rc == 0
    assert run(ox, "runupdate", "-n", s(2)).rc == 0
    configdb.inject_update_failure(ox.cfg, s(3))
    configdb.add_empty_schema(ox.cfg, "oxdatabase_10")
    assert configdb.add_closed_pool(ox.cfg, schemata=2) == ("oxclosed_1", "oxclosed_2")
    configdb.inject_tool_fault(ox.cfg, "listserver", "connect", times=3)
    assert configdb.reset(ox.cfg) == [
        "removed 3 lab-added schema(s) (4 context(s))",
        "removed 1 lab-added database pool(s)",
        "deleted 1 registered server(s)",
        "re-enabled 2 context(s)",
        "pointed 2 context(s) back to the initial server",
        "reset 1 schema state(s)",
        "cleared 1 injected update failure(s)",
        "cleared 1 injected tool fault(s)",
    ]
    assert run(ox, "listdatabase", "--csv").out.count("\n") == 2  # header + the initial pool
    assert summary(ox) == {s(i): untouched(ox) for i in range(1, SCHEMATA + 1)}
    assert register(ox) == new_id  # the id sequence was reset too


def test_install_tools_writes_wrappers_and_an_env_file_without_secrets(ox: Ox) -> None:
    for tool in tools.TOOLS:
        path = ox.bin / tool
        assert path.stat().st_mode & stat.S_IXUSR, tool
        assert f"-m lab.ox.tools {tool} " in path.read_text(encoding="utf-8")
    env_file = ox.bin / tools.ENV_FILE_NAME
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    text = env_file.read_text(encoding="utf-8")
    assert f"OX_CONFIGDB_PORT={ox.cfg.primary_db_port}\n" in text
    assert ox.password not in text
    assert configdb.ox_db_password_file(ox.cfg).read_text(encoding="utf-8").strip() not in text
    p = subprocess.run([sys.executable, "-m", "lab.ox.tools"], capture_output=True, text=True, check=False)
    assert p.returncode == 2 and "tools: registerserver" in p.stderr


# --------------------------------------------------------------------------- single tools


def test_registerserver_and_listserver(ox: Ox) -> None:
    first = ox.site.server_id
    r = run(ox, "registerserver", "-n", NEW)
    assert (r.rc, r.out, r.err) == (0, f"server {first + 1} registered\n", "")
    r = run(ox, "registerserver", "-n", NEW)
    assert (r.rc, r.out) == (103, "")
    assert no_frames(r.err) == (
        f"server could not be registered: \nServer response:\n Server {NEW} already exists!\n\n"
    )
    assert "\tat com.openexchange.admin.rmi.impl.OXUtil.registerServer(OXUtil.java)\n" in r.err
    assert configdb.servers(ox.cfg) == [(first, "oxserver"), (first + 1, NEW)]

    r = run(ox, "listserver")
    assert (r.rc, r.err) == (0, "")
    assert r.out == f"Id Name        \n {first} oxserver    \n {first + 1} oxserver-xyz\n"
    assert run(ox, "listserver", "--csv").out == (
        f'id,name\n"{first}","oxserver"\n"{first + 1}","oxserver-xyz"\n'
    )
    # OX's search: "name LIKE ? OR server_id = ?" with * as %.
    assert run(ox, "listserver", "-s", "*-xyz", "--csv").out == f'id,name\n"{first + 1}","oxserver-xyz"\n'
    assert run(ox, "listserver", "-s", str(first), "--csv").out == f'id,name\n"{first}","oxserver"\n'
    assert run(ox, "listserver", "-s", "oxserver_xyz", "--csv").out == (
        f'id,name\n"{first + 1}","oxserver-xyz"\n'
    )
    r = run(ox, "listserver", "-s", "")
    assert (r.rc, no_frames(r.err)) == (
        103,
        "servers could not be listed: \nServer response:\n Invalid search pattern\n\n",
    )


def test_admin_tools_credentials(ox: Ox) -> None:
    r = run(ox, "registerserver")
    assert r.rc == 104
    assert r.err == 'server could not be registered: \nError: Option(s) "name" missing\n'
    assert r.out.startswith("Usage: registerserver \n") and " -n,--name <name>" in r.out
    r = run(ox, "registerserver", "-n", "x", "--bogus")
    assert r.rc == 111 and "Error: Unrecognized options on the command line: --bogus" in r.err
    r = run(ox, "registerserver", "-n")
    assert r.rc == 109 and "Failed parsing command line" in r.err
    r = run(ox, "registerserver", "--help", auth=False)
    assert (r.rc, r.err) == (0, "") and r.out.startswith("Usage: registerserver")
    # -A and -P both absent: ObjectNamingAbstraction.printErrors' 104, even with ADMIN_PASSWORD.
    for env in ({}, {"ADMIN_PASSWORD": ox.password}):
        r = run(ox, "registerserver", "-n", "x", auth=False, env=env)
        assert (r.rc, r.err) == (104, fixture("admin-missing-credentials.err"))
        assert r.out.startswith("Usage: registerserver")
    # Wrong (or empty) credentials: the server's InvalidCredentialsException, 101.
    for creds in (["-A", "oxadminmaster", "-P", "wrong"], ["-A", "", "-P", ox.password], ["-P", ox.password]):
        r = run(ox, "registerserver", *creds, "-n", "x", auth=False)
        assert (r.rc, no_frames(r.err)) == (101, fixture("admin-wrong-credentials.err")), creds
        assert "\tat com.openexchange.admin.daemons.BasicAuthenticator.doAuthentication(" in r.err
    # OX takes the password from ADMIN_PASSWORD when -P is not given (the admin tools only).
    r = run(
        ox,
        "registerserver",
        "-A",
        "oxadminmaster",
        "-n",
        "from-env",
        auth=False,
        env={"ADMIN_PASSWORD": ox.password},
    )
    assert r.rc == 0 and r.out.endswith(" registered\n")
    assert [n for _, n in configdb.servers(ox.cfg)] == ["oxserver", "from-env"]
    for tool in (
        "upgradeschemata",
        "changeserver",
        "disableschema",
        "enableschema",
        "listdatabaseschema",
        "listdatabase",
    ):
        r = run(ox, tool, "--help", auth=False)
        assert (r.rc, r.out.startswith(f"Usage: {tool} ")) == (0, True), tool


def test_listdatabaseschema_leaves_closed_pools_out_and_lists_in_string_order(ox: Ox) -> None:
    r = run(ox, "listdatabaseschema")
    assert (r.rc, r.err) == (0, "")
    assert r.out == "id name       schemaname   hostname  curctx\n" + "".join(
        f" 1 oxdatabase {s(i)} 127.0.0.1      2\n" for i in range(1, SCHEMATA + 1)
    )
    assert run(ox, "listdatabaseschema", "-s", "oxdatabase_1").out == (
        "id name       schemaname   hostname  curctx\n 1 oxdatabase oxdatabase_1 127.0.0.1      2\n"
    )
    assert run(ox, "listdatabaseschema", "-s", "nothing*").out == "No such database schemas found\n"
    assert run(ox, "listdatabaseschema", "--only-empty-schemas").out == "No such database schemas found\n"
    assert run(ox, "listdatabaseschema", "--only-empty-schemas", "--csv").out == (
        "id,display_name,schema_name,url,currentunits\n"
    )

    configdb.add_empty_schema(ox.cfg, "oxdatabase_10")
    closed = configdb.add_closed_pool(ox.cfg, schemata=2)
    r = run(ox, "listdatabaseschema")
    assert (r.rc, r.out) == (0, fixture("listdatabaseschema.out"))  # oxdatabase_10 before oxdatabase_2
    assert port_3306(ox, run(ox, "listdatabaseschema", "--csv").out) == fixture("listdatabaseschema.csv")
    assert not any(c in r.out for c in closed)  # db_cluster.max_units 0
    assert run(ox, "listdatabaseschema", "--only-empty-schemas", "--csv").out.splitlines()[1:] == [
        f'"1","oxdatabase","oxdatabase_10","jdbc:mysql://127.0.0.1:{ox.cfg.primary_db_port}","0"'
    ]
    # The pattern also matches the pool's name (d.name LIKE ?): every schema of the pool.
    assert len(run(ox, "listdatabaseschema", "-s", "oxdatabase", "--csv").out.splitlines()) == SCHEMATA + 2

    assert run(ox, "disableschema", "-m", s(2)).rc == 0
    r = run(ox, "listdatabaseschema", "--lab-state", "-s", "oxdatabase_2")
    sid = ox.site.server_id
    assert r.out == (
        "id name       schemaname   hostname  curctx enabled server_id update_state version\n"
        f" 1 oxdatabase oxdatabase_2 127.0.0.1      2 false           {sid} none         {OLD} \n"
    )


def test_listdatabase(ox: Ox) -> None:
    configdb.add_closed_pool(ox.cfg, schemata=2)
    r = run(ox, "listdatabase")
    assert (r.rc, r.out, r.err) == (0, fixture("listdatabase.out"), "")
    r = run(ox, "listdatabase", "--csv")
    assert (r.rc, port_3306(ox, r.out)) == (0, fixture("listdatabase.csv"))
    assert (
        run(ox, "listdatabase", "-s", "oxclosed", "--csv").out.splitlines()[1].startswith('"1000","oxclosed"')
    )
    header = fixture("listdatabase.csv").splitlines()[0]
    assert run(ox, "listdatabase", "-s", "none", "--csv").out == header + "\n"
    r = run(ox, "listdatabase", "-A", "oxadminmaster", "-P", "wrong", auth=False)
    assert r.rc == 101
    assert r.err.startswith("databases could not be listed: \nServer response:\n Authentication")


def test_disableschema_and_enableschema(ox: Ox) -> None:
    r = run(ox, "disableschema", "-m", s(1))
    assert (r.rc, r.out, r.err) == (0, "", "")
    assert [(e, reason) for _, e, reason, _ in configdb.contexts(ox.cfg, s(1))] == [
        (False, SCHEMA_MOVE_REASON_ID)
    ] * 2
    assert run(ox, "disableschema", "-m", s(1)).rc == 0  # idempotent
    assert summary(ox)[s(1)] == ("none", False, ox.site.server_id, OLD)
    assert summary(ox)[s(2)] == untouched(ox)

    r = run(ox, "enableschema", "-m", s(1))
    assert (r.rc, r.out, r.err) == (0, "", "")
    assert run(ox, "enableschema", "-m", s(1)).rc == 0
    assert summary(ox)[s(1)] == untouched(ox)

    # A context disabled for another reason stays disabled across disable + enable.
    cid = configdb.contexts(ox.cfg, s(3))[0][0]
    mariadb.query(
        ox.cfg,
        "primary",
        "UPDATE context SET enabled = 0, reason_id = 7 WHERE cid = %s",
        (cid,),
        database=configdb.CONFIGDB,
    )
    assert run(ox, "disableschema", "-m", s(3)).rc == 0
    assert run(ox, "enableschema", "-m", s(3)).rc == 0
    assert [(c, e, reason) for c, e, reason, _ in configdb.contexts(ox.cfg, s(3))] == [
        (cid, False, 7),
        (cid + 1, True, None),
    ]

    r = run(ox, "enableschema")
    assert r.rc == 104 and 'Error: Option(s) "target-schema" missing' in r.err


def test_disableschema_refuses_an_empty_schema_enableschema_does_not(ox: Ox) -> None:
    configdb.add_empty_schema(ox.cfg, "oxdatabase_10")
    r = run(ox, "disableschema", "-m", "oxdatabase_10")
    # NoSuchObjectException "No such schema <s>": printErrors' final else, exit 1, no prefix.
    assert (r.rc, r.out, no_frames(r.err)) == (1, "", fixture("disableschema-empty-schema.err"))
    assert (
        "\tat com.openexchange.admin.storage.mysqlStorage.OXToolMySQLStorage.isDistinctWritePoolIDForSchema("
    ) in r.err
    r = run(ox, "disableschema", "-m", "oxdatabase_99")  # unknown: the same
    assert (r.rc, no_frames(r.err)) == (1, "Server response:\n No such schema oxdatabase_99\n\n")
    for schema in ("oxdatabase_10", "oxdatabase_99"):  # SchemaMoveImpl.enableSchema checks nothing
        assert run(ox, "enableschema", "-m", schema) == Run(0, "", "")


def test_changeserver(ox: Ox) -> None:
    new_id = register(ox)
    # The schema must be disabled (OXUtilMySQLStorage.isSchemaDisabled): 106.
    r = run(ox, "changeserver", "-s", str(new_id), "-m", s(4))
    assert (r.rc, r.out, no_frames(r.err)) == (106, "", fixture("changeserver-not-disabled.err"))
    assert summary(ox)[s(4)] == untouched(ox)
    assert run(ox, "disableschema", "-m", s(4)).rc == 0
    r = run(ox, "changeserver", "-s", str(new_id), "-m", s(4))
    assert (r.rc, r.err) == (0, "")
    assert r.out == f"Successfully changed to server '{new_id}' for schema '{s(4)}'.\n"
    # Again onto the same server: Connector/J counts found rows, so OX does not call it empty.
    assert run(ox, "changeserver", "-s", str(new_id), "-m", s(4)).rc == 0
    states = summary(ox)
    assert states[s(4)] == ("none", False, new_id, OLD)
    assert all(states[s(i)] == untouched(ox) for i in (1, 2, 3, 5, 6))

    configdb.add_empty_schema(ox.cfg, "oxdatabase_10")
    r = run(ox, "changeserver", "-s", str(new_id), "-m", "oxdatabase_10")
    assert (r.rc, no_frames(r.err)) == (106, fixture("changeserver-empty-schema.err"))
    r = run(ox, "changeserver", "-s", "99", "-m", s(4))  # Server.toString() in the message
    assert (r.rc, no_frames(r.err)) == (103, fixture("changeserver-no-such-server.err"))
    # The client's own checks: BasicCommandlineOptions.printError (no prefix line), exit 1.
    for args, name in (
        (["-s", "abc", "-m", s(4)], "changeserver-invalid-server-id.err"),
        (["-s", str(new_id), "-m", ""], "changeserver-empty-schema-name.err"),
        (["-s", " ", "-m", s(4)], "changeserver-empty-server-id.err"),
    ):
        r = run(ox, "changeserver", *args)
        assert (r.rc, r.out, r.err) == (1, "", fixture(name)), args
    r = run(ox, "changeserver", "-m", s(4))
    assert r.rc == 104 and 'Option(s) "server-id" missing' in r.err
    assert summary(ox)[s(4)] == ("none", False, new_id, OLD)


def test_runupdate(ox: Ox) -> None:
    r = run(ox, "runupdate", "-n", s(1))
    assert (r.rc, r.out, r.err) == (0, "", "")
    first = configdb.schema_states(ox.cfg)[s(1)]
    assert (first.update_state, first.version) == ("done", TARGET)
    assert run(ox, "runupdate", "-n", s(1)).rc == 0  # nothing pending: no-op
    assert configdb.schema_states(ox.cfg)[s(1)].updated_at == first.updated_at

    configdb.inject_update_failure(ox.cfg, s(2))
    for _ in range(2):  # an injected failure stays until cleared
        r = run(ox, "runupdate", "-n", s(2))
        # OX's runupdate reports failed tasks on stdout and still exits 0.
        assert (r.rc, r.out, r.err) == (0, fixture("runupdate-failed.out"), "")
    state = configdb.schema_states(ox.cfg)[s(2)]
    assert (state.update_state, state.version, state.last_error) == (
        "failed",
        OLD,
        f"update task(s) failed: {FAILING_TASK}",
    )

    configdb.inject_update_failure(ox.cfg, s(3), times=1)
    assert "failed" in run(ox, "runupdate", "-n", s(3)).out
    assert run(ox, "runupdate", "-n", s(3)).out == ""
    assert run(ox, "runupdate", "-n", s(4), env={"OX_UPDATE_FAULTS": f"{s(4)},{s(6)}"}).out.startswith(
        "The following update task(s) failed:\n"
    )
    cid = configdb.contexts(ox.cfg, s(5))[1][0]
    assert run(ox, "runupdate", "-c", str(cid)).rc == 0
    assert {n: st[0] for n, st in summary(ox).items()} == {
        s(1): "done",
        s(2): "failed",
        s(3): "done",
        s(4): "failed",
        s(5): "done",
        s(6): "none",
    }

    # A slow update is visibly running while it works; a second one meanwhile: OX's schema lock
    # (ALREADY_LOCKED) is only logged by the server - no output, exit 0 - and nothing runs twice.
    p = subprocess.Popen(
        [str(ox.bin / "runupdate"), *ox.auth, "-n", s(6)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OX_RUNUPDATE_SECONDS": "3"},
    )
    seen = set()
    conflict: Run | None = None
    while p.poll() is None:
        now = configdb.schema_states(ox.cfg)[s(6)].update_state
        seen.add(now)
        if now == "running" and conflict is None:
            conflict = run(ox, "runupdate", "-n", s(6))
            assert configdb.schema_states(ox.cfg)[s(6)].update_state == "running"  # returned before the end
        time.sleep(0.05)
    out, err = p.communicate()
    assert (p.returncode, out, err) == (0, "", "") and "running" in seen
    assert conflict == Run(0, "", "")
    states = configdb.schema_states(ox.cfg)
    assert states[s(6)].update_state == "done"
    # Every update run that started is counted (s(2): two failed runs; s(3): failed, then done).
    assert {n: st.update_runs for n, st in states.items()} == {
        s(1): 1,
        s(2): 2,
        s(3): 2,
        s(4): 1,
        s(5): 1,
        s(6): 1,
    }
    assert run(ox, "runupdate", "-n", s(6)).rc == 0  # nothing pending: no new run
    assert configdb.schema_states(ox.cfg)[s(6)].update_runs == 1

    r = run(ox, "runupdate")
    assert (r.rc, r.err) == (1, "Missing context/schema identifier.\n")
    assert r.out.startswith("usage: runUpdate")
    r = run(ox, "runupdate", "-c", "abc")
    assert (r.rc, r.err) == (1, "Context parameter is not a number: abc\n")
    r = run(ox, "runupdate", "-n", "oxdatabase_99")
    assert r.rc == 1 and r.err.startswith("Unknown schema name: oxdatabase_99.; nested exception is: \n")
    assert run(ox, "runupdate", "-c", "424242") == Run(0, "", "")  # UpdateProcess.run() only logs


def test_runupdate_credentials(ox: Ox) -> None:
    # Master authentication on: -A and -P are required commons-cli options.
    r = run(ox, "runupdate", "-n", s(1), auth=False)
    assert (r.rc, r.err) == (1, fixture("runupdate-missing-credentials.err"))
    assert r.out.startswith("usage: runUpdate")
    r = run(
        ox, "runupdate", "-n", s(1), "-A", "oxadminmaster", auth=False, env={"ADMIN_PASSWORD": ox.password}
    )
    assert (r.rc, r.err) == (1, fixture("runupdate-missing-password.err"))  # no ADMIN_PASSWORD for runupdate
    for creds in (["-A", "oxadminmaster", "-P", ""], ["-A", "", "-P", ox.password]):
        r = run(ox, "runupdate", "-n", s(1), *creds, auth=False)
        assert (r.rc, r.err) == (255, ""), creds  # System.exit(-1)
        assert r.out.startswith(fixture("runupdate-no-credentials.out") + "usage: runUpdate")
    r = run(ox, "runupdate", "-n", s(1), "-A", "oxadminmaster", "-P", "wrong", auth=False)
    assert (r.rc, r.out, r.err) == (1, "", fixture("runupdate-wrong-credentials.err"))
    r = run(ox, "runupdate", "-n", s(1), "--bogus")
    assert (r.rc, r.err) == (1, "Unable to parse command line: Unrecognized option: --bogus\n")
    assert configdb.schema_states(ox.cfg)[s(1)].update_runs == 0
    assert run(ox, "runupdate", "--help", auth=False).rc == 0


def test_tool_faults(ox: Ox) -> None:
    configdb.inject_tool_fault(ox.cfg, "registerserver", "connect", times=2)
    for _ in range(2):
        r = run(ox, "registerserver", "-n", NEW)
        assert (r.rc, r.out, r.err) == (105, "", fixture("tool-fault-connect.err"))
    configdb.inject_tool_fault(ox.cfg, "registerserver", "remote")
    r = run(ox, "registerserver", "-n", NEW)
    assert (r.rc, r.out, no_frames(r.err)) == (107, "", fixture("tool-fault-remote.err"))
    assert configdb.servers(ox.cfg) == [(ox.site.server_id, "oxserver")]
    assert run(ox, "registerserver", "-n", NEW).rc == 0  # used up

    configdb.inject_tool_fault(ox.cfg, "runupdate", "connect")
    assert run(ox, "runupdate", "-n", s(1)) == Run(1, "", "Unable to connect to server\n")
    configdb.inject_tool_fault(ox.cfg, "runupdate", "remote")
    assert run(ox, "runupdate", "-n", s(1)) == Run(1, "", "An error occurred.\n")
    configdb.inject_tool_fault(ox.cfg, "upgradeschemata", "connect")
    r = run(ox, "upgradeschemata", "-n", NEW)
    assert (r.rc, r.err) == (105, BANNER + fixture("tool-fault-connect.err").split("\n", 1)[1])
    assert configdb.schema_states(ox.cfg)[s(1)].update_runs == 0
    configdb.inject_tool_fault(ox.cfg, "listserver", "remote", times=5)
    configdb.reset(ox.cfg)
    assert run(ox, "listserver").rc == 0


# --------------------------------------------------------------------------- upgradeschemata


def test_upgradeschemata_stops_at_the_first_failure_then_force_continues_after_it(ox: Ox) -> None:
    configdb.inject_update_failure(ox.cfg, s(3))
    r = run(ox, "upgradeschemata", "-n", NEW)
    new_id = ox.site.server_id + 1
    assert r.rc == 1
    assert r.out == "\n".join(
        [
            f"Registering the server with name '{NEW}'...OK",
            *done_lines(1),
            *done_lines(2),
            f"Disabling schema '{s(3)}'...OK",
            f"Changing server for schema '{s(3)}' to '{NEW}'...OK",
            "Running updates...",
        ]
    )
    assert r.err == fixture("upgradeschemata-aborted.err")
    assert configdb.servers(ox.cfg) == [(ox.site.server_id, "oxserver"), (new_id, NEW)]
    first_run = configdb.schema_states(ox.cfg)
    assert summary(ox) == {
        s(1): upgraded(new_id),
        s(2): upgraded(new_id),
        s(3): failed(new_id, enabled=False),  # stays disabled
        s(4): untouched(ox),
        s(5): untouched(ox),
        s(6): untouched(ox),
    }

    # -f -m oxdatabase_3: on from after the failed schema, past another failure.
    configdb.inject_update_failure(ox.cfg, s(5))
    r = run(ox, "upgradeschemata", "-n", NEW, "-f", "-m", s(3), stdin="continue\n")
    assert r.rc == 0
    assert (
        r.out
        == continue_with(new_id)
        + "\n".join(
            [
                "OK, proceeding with the upgrade",
                f"Skipping to schema '{s(3)}'",
                "Filtering out skipped schemata: ",
                *done_lines(4),
                *failed_forced_lines(5),
                *done_lines(6),
            ]
        )
        + "\n"
    )
    assert r.err == update_error(5)
    assert len(configdb.servers(ox.cfg)) == 2
    states = configdb.schema_states(ox.cfg)
    assert [states[s(i)].updated_at for i in (1, 2, 3)] == [first_run[s(i)].updated_at for i in (1, 2, 3)]
    assert summary(ox) == {
        s(1): upgraded(new_id),
        s(2): upgraded(new_id),
        s(3): failed(new_id, enabled=False),
        s(4): upgraded(new_id),
        s(5): failed(new_id, enabled=True),  # with -f OX enables it again
        s(6): upgraded(new_id),
    }


def test_upgradeschemata_force_goes_past_every_failure(ox: Ox) -> None:
    configdb.inject_update_failure(ox.cfg, s(2))
    configdb.inject_update_failure(ox.cfg, s(5))
    r = run(ox, "upgradeschemata", "-n", NEW, "-f")
    new_id = ox.site.server_id + 1
    assert (r.rc, r.out, r.err) == (
        0,
        fixture("upgradeschemata-force.out"),
        fixture("upgradeschemata-force.err"),
    )
    assert summary(ox) == {
        s(1): upgraded(new_id),
        s(2): failed(new_id, enabled=True),
        s(3): upgraded(new_id),
        s(4): upgraded(new_id),
        s(5): failed(new_id, enabled=True),
        s(6): upgraded(new_id),
    }


def test_upgradeschemata_ignores_k(ox: Ox) -> None:
    # -k is parsed, but OX splits the literal "," (UpgradeSchemata L495): nothing is skipped,
    # and without -m there is no "Filtering" line at all.
    r = run(ox, "upgradeschemata", "-n", NEW, "-k", f"{s(2)},{s(4)}")
    new_id = ox.site.server_id + 1
    assert (r.rc, r.err) == (0, "")
    assert (
        r.out
        == "\n".join(
            [
                f"Registering the server with name '{NEW}'...OK",
                *(line for i in range(1, SCHEMATA + 1) for line in done_lines(i)),
            ]
        )
        + "\n"
    )
    assert summary(ox) == {s(i): upgraded(new_id) for i in range(1, SCHEMATA + 1)}


def test_upgradeschemata_empty_schema_and_closed_pool(ox: Ox) -> None:
    configdb.add_empty_schema(ox.cfg, "oxdatabase_10")
    closed = configdb.add_closed_pool(ox.cfg, schemata=1)
    # Listing order (string order: oxdatabase_10 after _1); the empty schema's disable fails
    # with NoSuchObjectException: "Schema <s> not found. Skipping"; the closed pool is not listed.
    r = run(ox, "upgradeschemata", "-n", NEW)
    assert (r.rc, r.out, r.err) == (0, fixture("upgradeschemata-empty-schema.out"), "")
    states = configdb.schema_states(ox.cfg)
    assert states[closed[0]].server_id == ox.site.server_id and states[closed[0]].update_state == "none"
    assert states["oxdatabase_10"].update_runs == 0


def test_upgradeschemata_m_sorts_by_number(ox: Ox) -> None:
    configdb.add_empty_schema(ox.cfg, "oxdatabase_10")
    new_id = ox.site.server_id + 1
    r = run(ox, "upgradeschemata", "-n", NEW, "-m", s(3))  # no such server yet: it registers
    assert (r.rc, r.out, r.err) == (0, fixture("upgradeschemata-skip-to.out"), "")
    assert {n: st[0] for n, st in summary_all(ox).items()} == {
        s(1): "none",
        s(2): "none",
        s(3): "none",
        s(4): "done",
        s(5): "done",
        s(6): "done",
        "oxdatabase_10": "none",
    }
    # -m whose number no schema has: from the beginning, without a message.
    r = run(ox, "upgradeschemata", "-n", NEW, "-m", "oxdatabase_77", stdin="continue\n")
    assert r.rc == 0 and r.out.startswith(
        continue_with(new_id) + "OK, proceeding with the upgrade\n"
        "Filtering out skipped schemata: \n" + "\n".join(done_lines(1))
    )
    assert "Skipping to" not in r.out
    # A suffix that is not a number: NumberFormatException in the comparator.
    r = run(ox, "upgradeschemata", "-n", NEW, "-m", "oxdatabase_x", stdin="continue\n")
    assert (r.rc, r.err) == (1, BANNER + "Invalid input detected: Ids must be numbers!\n")


def test_upgradeschemata_without_schemata(ox: Ox) -> None:
    # The only pool closed (max_units 0): listDatabaseSchema lists nothing. Without -m
    # UpgradeSchemata reads databases[0] of the empty array.
    mariadb.query(ox.cfg, "primary", "UPDATE db_cluster SET max_units = 0", database=configdb.CONFIGDB)
    r = run(ox, "upgradeschemata", "-n", NEW)
    assert (r.rc, r.out) == (1, f"Registering the server with name '{NEW}'...OK\n")
    assert no_frames(r.err) == fixture("upgradeschemata-no-schemata.err")
    r = run(ox, "upgradeschemata", "-n", NEW, "-m", s(1), stdin="continue\n")
    assert (r.rc, r.err) == (0, "") and r.out.endswith(
        "OK, proceeding with the upgrade\nFiltering out skipped schemata: \n"
    )


def test_upgradeschemata_with_a_registered_server_continue(ox: Ox) -> None:
    new_id = register(ox)
    r = run(ox, "upgradeschemata", "-n", NEW, stdin="maybe\ncontinue\n")
    assert (r.rc, r.err) == (0, "Unrecognized command: 'maybe'\n")
    assert (
        r.out
        == warning(new_id)
        + "\n".join(
            [
                tools.PROMPT,
                "OK, proceeding with the upgrade",
                *(line for i in range(1, SCHEMATA + 1) for line in done_lines(i)),
            ]
        )
        + "\n"
    )
    assert configdb.servers(ox.cfg) == [(ox.site.server_id, "oxserver"), (new_id, NEW)]
    assert summary(ox) == {s(i): upgraded(new_id) for i in range(1, SCHEMATA + 1)}


def test_upgradeschemata_with_a_registered_server_abort(ox: Ox) -> None:
    assert register(ox) == 3  # the fixtures' id
    r = run(ox, "upgradeschemata", "-n", NEW, "-f", stdin="abort\n")
    assert (r.rc, r.out, r.err) == (0, fixture("upgradeschemata-registered-server.out"), "")
    r = run(ox, "upgradeschemata", "-n", NEW, "-m", s(2), stdin="abort\n")
    assert (r.rc, r.out, r.err) == (0, fixture("upgradeschemata-registered-server-m.out"), "")
    assert summary(ox) == {s(i): untouched(ox) for i in range(1, SCHEMATA + 1)}

    r = run(ox, "upgradeschemata", "-n", NEW)  # no answer at all: Scanner.next() at the end
    assert (r.rc, no_frames(r.err)) == (1, fixture("upgradeschemata-no-answer.err"))
    assert "\tat java.util.Scanner.next(Scanner.java)\n" in r.err
    assert summary(ox) == {s(i): untouched(ox) for i in range(1, SCHEMATA + 1)}
    # Two servers match the name (listServer: LIKE, '_' any character): no prompt but a
    # registration, which the server refuses (InvalidDataException, 103).
    register(ox, "ox_a")
    register(ox, "oxba")
    r = run(ox, "upgradeschemata", "-n", "ox_a")
    assert (r.rc, r.out) == (103, "Registering the server with name 'ox_a'...")
    assert no_frames(r.err) == BANNER + "Server response:\n Server ox_a already exists!\n\n"


def test_upgradeschemata_argument_errors(ox: Ox) -> None:
    r = run(ox, "upgradeschemata", "-n", NEW, "-m", "nounderscore")
    assert (r.rc, r.err) == (1, "Invalid/Malformed schema name: 'nounderscore'\n")
    r = run(ox, "upgradeschemata", "-f")
    assert r.rc == 104 and r.err == 'Error: Option(s) "server-name" missing\n'
    r = run(ox, "upgradeschemata", "-n", NEW, "--bogus")  # the catch-all banner first
    assert r.rc == 111
    assert r.err.startswith(BANNER + "Error: Unrecognized options on the command line: --bogus")
    r = run(ox, "upgradeschemata", "-n", NEW, "-A", "oxadminmaster", "-P", "wrong", auth=False)
    assert (r.rc, no_frames(r.err)) == (101, BANNER + "Server response:\n Authentication failed\n\n")
    r = run(ox, "upgradeschemata", "-n", NEW, auth=False)
    assert (r.rc, r.err) == (104, BANNER + 'Error: Options "adminuser, adminpass" missing\n')
    assert configdb.servers(ox.cfg) == [(ox.site.server_id, "oxserver")]
    assert summary(ox) == {s(i): untouched(ox) for i in range(1, SCHEMATA + 1)}
