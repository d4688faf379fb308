"""The traffic probe's OX mode (lab/ox/probe.py) against fake OX nodes.

The fake nodes are small aiohttp servers in the test that follow the OX middleware's HTTP
contract (GET /ox/login?context=&user=, X-Node on every answer, 403 X-OX-Refused: disabled,
302 X-OX-Redirect: migration to the secondary LB, 409 CTX-0012); the test sets each
context's behaviour. The real middleware is not needed. Only `lab_targets` uses the session
lab (its MariaDB primary and the OX config DB).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from lab import mariadb
from lab.config import LabConfig
from lab.ox import configdb
from lab.ox.probe import (
    OxProbeSummary,
    OxTarget,
    disabled_outside,
    failures,
    lab_targets,
    read_events,
    read_targets,
    run_ox_probe,
    start_ox_probe_process,
    stop_ox_probe_process,
    unavailability,
    write_targets,
)

# Behaviours of a fake node per context (default: serve).
SERVE, DISABLED, REDIRECT, CHAIN, CTX0012, E500, CLOSE, HANG, WRONG, PLAIN302 = (
    "serve",
    "disabled",
    "redirect",
    "chain",
    "ctx0012",
    "500",
    "close",
    "hang",
    "wrong",
    "plain302",
)


@dataclass
class FakeOx:
    """A fake OX node (or the LB in front of a cluster): answers per context as `behaviour`
    says; unknown contexts get 404. REDIRECT sends to `peer` (the secondary LB); CHAIN does
    the same with a growing `hop` parameter, so every hop's URL is new."""

    node: str
    known: set[int]
    version: str = "7.10.0"
    behaviour: dict[int, str] = field(default_factory=dict)
    peer: FakeOx | None = None
    seen: Counter[int] = field(default_factory=Counter)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def login(self, request: web.Request) -> web.StreamResponse:
        cid, user = int(request.query["context"]), int(request.query["user"])
        self.seen[cid] += 1
        h = {"X-Node": self.node}
        if cid not in self.known:
            return web.json_response({"error": f"Context {cid} does not exist"}, status=404, headers=h)
        b = self.behaviour.get(cid, SERVE)
        if b == SERVE:
            return web.json_response(
                {
                    "context": cid,
                    "user": user,
                    "schema": f"s{cid}",
                    "server": 2,
                    "node": self.node,
                    "version": self.version,
                },
                headers=h,
            )
        if b == DISABLED:
            return web.Response(
                status=403, text="context disabled", headers={**h, "X-OX-Refused": "disabled"}
            )
        if b in (REDIRECT, CHAIN):
            assert self.peer is not None
            hop = int(request.query.get("hop", "0")) + 1
            extra = f"&hop={hop}" if b == CHAIN else ""
            return web.Response(
                status=302,
                headers={
                    **h,
                    "X-OX-Redirect": "migration",
                    "Location": f"{self.peer.url}/ox/login?context={cid}&user={user}{extra}",
                },
            )
        if b == PLAIN302:
            return web.Response(status=302, headers={**h, "Location": f"{self.url}/elsewhere"})
        if b == CTX0012:
            return web.json_response(
                {"code": "CTX-0012", "error": f"The context {cid} is located in server with id 8"},
                status=409,
                headers=h,
            )
        if b == E500:
            return web.Response(status=500, text="boom", headers=h)
        if b == WRONG:
            return web.json_response({"context": cid + 1000, "user": user, "node": self.node}, headers=h)
        if b == CLOSE:
            assert request.transport is not None
            request.transport.close()
            raise ConnectionResetError("closed by the fake node")
        if b == HANG:
            await self.release.wait()
            return web.Response(status=200, text="too late", headers=h)
        raise AssertionError(f"unknown behaviour {b}")


@pytest.fixture
async def fake_nodes() -> AsyncIterator[tuple[FakeOx, FakeOx]]:
    """Two fake nodes: `a` (the main LB's old cluster) and `b` (the secondary LB's
    upgraded one), each other's peer."""
    known = set(range(1, 100))
    a, b = FakeOx("ox-a", known), FakeOx("ox-b", known, version="7.10.1")
    a.peer, b.peer = b, a
    runners = []
    try:
        for fake in (a, b):
            app = web.Application()
            app.router.add_get("/ox/login", fake.login)
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            runners.append(runner)
            port = runner.addresses[0][1]
            fake.url = f"http://127.0.0.1:{port}"
        yield a, b
    finally:
        for fake in (a, b):
            fake.release.set()
        for runner in runners:
            await runner.cleanup()


async def _probe(
    url: str, rate: float, targets: list[OxTarget], seconds: float, out: Path, timeout_s: float = 5.0
) -> OxProbeSummary:
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(seconds, stop.set)
    return await asyncio.wait_for(run_ox_probe(url, rate, targets, stop, out, timeout_s=timeout_s), 30)


def _targets(spec: dict[str, list[int]]) -> list[OxTarget]:
    return [OxTarget(cid=c, schema=s, user=1) for s, cids in spec.items() for c in cids]


# --------------------------------------------------------------------------- counting


async def test_every_answer_of_the_contract_is_counted_as_it_should(
    fake_nodes: tuple[FakeOx, FakeOx], tmp_path: Path
) -> None:
    a, b = fake_nodes
    # schema -> its contexts; each context's behaviour on node a (b serves unless told).
    spec = {
        "s1": [1, 2],
        "s2": [3, 4],
        "s3": [5],
        "s4": [6],
        "s5": [7],
        "s6": [8],
        "s7": [9],
        "s8": [10],
        "s9": [11],
        "s10": [12],
        "s11": [13],
        "s12": [14],
        "s13": [15],
    }
    a.behaviour.update(
        {
            3: DISABLED,
            4: DISABLED,
            5: REDIRECT,
            6: CTX0012,
            7: E500,
            8: CLOSE,
            9: HANG,
            10: REDIRECT,
            11: CHAIN,
            13: WRONG,
            14: REDIRECT,
            15: PLAIN302,
        }
    )
    b.behaviour.update({10: REDIRECT, 11: CHAIN, 14: DISABLED})  # 10: a -> b -> a, a loop
    a.known.discard(12)  # unknown context: 404
    out = tmp_path / "ox.jsonl"
    targets = _targets(spec)
    s = await _probe(a.url, 75, targets, 1.0, out, timeout_s=0.5)

    # 75/s for 1 s on an absolute schedule: never more; a starved 2-core machine may still be
    # sending the last few when the second is up (the bench measures rates, not this test).
    assert 60 <= s.total <= 78, s.line()
    assert s.total == s.ok + s.failed + s.disabled == sum(v["total"] for v in s.by_schema.values())
    assert s.contexts == len(targets) and s.rate == 75 and s.url == a.url
    bs = s.by_schema
    assert set(bs) == set(spec)
    assert list(bs) == sorted(spec, key=lambda n: int(n[1:]))  # natural order
    # s1 is served plainly; s2 (both contexts) refused as disabled - apart, not failed.
    assert bs["s1"]["ok"] == bs["s1"]["total"] >= 8 and bs["s1"]["failed"] == bs["s1"]["redirected"] == 0
    assert bs["s2"]["disabled"] == bs["s2"]["total"] >= 8 and bs["s2"]["failed"] == bs["s2"]["ok"] == 0
    # s3 is redirected to b and served there: ok and redirected.
    assert bs["s3"]["ok"] == bs["s3"]["redirected"] == bs["s3"]["total"] >= 4
    assert b.seen[5] == bs["s3"]["total"]
    # s12's context is refused by b after the redirect: disabled, not failed.
    assert bs["s13"]["disabled"] == 0 and bs["s12"]["disabled"] == bs["s12"]["total"] >= 4
    for sch in ("s4", "s5", "s6", "s7", "s8", "s9", "s10", "s11", "s13"):
        assert bs[sch]["failed"] == bs[sch]["total"] >= 4, (sch, bs[sch])
    assert s.redirected == bs["s3"]["total"]
    assert s.disabled == bs["s2"]["total"] + bs["s12"]["total"]
    assert s.failed == sum(bs[x]["total"] for x in ("s4", "s5", "s6", "s7", "s8", "s9", "s10", "s11", "s13"))
    assert s.ok == bs["s1"]["total"] + bs["s3"]["total"]
    assert s.by_status["409"] == bs["s4"]["total"] and s.by_status["500"] == bs["s5"]["total"]
    assert s.by_status["404"] == bs["s10"]["total"] and s.by_status["403"] == s.disabled
    assert s.by_status["error"] == bs["s6"]["total"] + bs["s7"]["total"]
    assert s.by_version == {"7.10.0": bs["s1"]["total"], "7.10.1": bs["s3"]["total"]}
    assert s.by_node["ox-b"] >= bs["s3"]["total"] + bs["s12"]["total"]
    assert s.by_node["ox-a"] >= bs["s1"]["total"] + bs["s2"]["total"]
    assert s.latency_max_ms > 0 and s.latency_p50_ms <= s.latency_max_ms
    assert json.loads(s.to_json())["by_schema"]["s2"]["disabled"] == bs["s2"]["disabled"]
    assert s.line().startswith(
        f"requests={s.total} ok={s.ok} failed={s.failed} disabled={s.disabled} redirected={s.redirected} "
    )

    # One line per non-plain success, none for a plain one.
    events = read_events(out)
    assert len(events) == s.failed + s.disabled + s.redirected
    by_cid: dict[int, list[dict[str, object]]] = {}
    for e in events:
        assert set(e) >= {"t", "mono", "cid", "schema", "outcome", "status", "error", "node", "hops"}
        assert str(e["t"]).endswith("+00:00") and isinstance(e["mono"], float)
        by_cid.setdefault(int(e["cid"]), []).append(e)
    assert 1 not in by_cid and 2 not in by_cid

    def only(cid: int, **want: object) -> list[dict[str, object]]:
        lines = by_cid[cid]
        for e in lines:
            for k, v in want.items():
                assert e[k] == v, (cid, k, e)
        return lines

    only(3, outcome="disabled", status=403, node="ox-a", hops=0, error=None, schema="s2")
    only(5, outcome="redirected", status=200, node="ox-b", hops=1, error=None)
    only(14, outcome="disabled", status=403, node="ox-b", hops=1)
    assert all(
        "CTX-0012" in str(e["error"]) and "located in server with id 8" in str(e["error"])
        for e in only(6, outcome="failed", status=409, node="ox-a")
    )
    only(7, outcome="failed", status=500)
    assert all(e["error"] for e in only(8, outcome="failed", status=None))
    assert all("timeout" in str(e["error"]) for e in only(9, outcome="failed", status=None))
    assert all("redirect loop" in str(e["error"]) for e in only(10, outcome="failed", hops=1))
    assert all("too many redirects" in str(e["error"]) for e in only(11, outcome="failed", hops=2))
    assert b.seen[11] >= 1 and a.seen[11] == 2 * b.seen[11]  # a -> b -> a -> (b: not followed)
    only(12, outcome="failed", status=404)
    assert all("not context 13" in str(e["error"]) for e in only(13, outcome="failed", status=200))
    assert all("not a migration" in str(e["error"]) for e in only(15, outcome="failed", status=302))
    timed_out = only(9)[0]
    assert 450 <= float(timed_out["ms"]) <= 2000  # type: ignore[arg-type]

    # The analysis helpers read the same file.
    assert {int(e["cid"]) for e in failures(out)} == {6, 7, 8, 9, 10, 11, 12, 13, 15}
    assert len(failures(out)) == s.failed
    assert set(unavailability(out)) == {"s2", "s12"}
    # Per-context windows of unavailability: the disabled contexts only, with their counts.
    assert set(s.disabled_windows) == {"3", "4", "14"}
    for cid in (3, 4, 14):
        first, last, count = s.disabled_windows[str(cid)]
        assert count == len(by_cid[cid]) and first <= last
        assert first == min(str(e["t"]) for e in by_cid[cid])


async def test_round_robin_at_a_fixed_rate_over_all_contexts(
    fake_nodes: tuple[FakeOx, FakeOx], tmp_path: Path
) -> None:
    a, _ = fake_nodes
    targets = _targets({f"oxdatabase_{i}": [i] for i in range(1, 6)})
    s = await _probe(a.url, 50, targets, 1.2, tmp_path / "ox.jsonl")
    assert 57 <= s.total <= 62, s.line()
    assert s.ok == s.total and s.failed == s.disabled == s.redirected == 0
    hits = [a.seen[t.cid] for t in targets]
    assert max(hits) - min(hits) <= 1, hits  # round-robin: every context equally often
    assert sum(hits) == s.total
    assert read_events(tmp_path / "ox.jsonl") == []  # plain successes are not logged
    assert s.disabled_windows == {} and s.by_node == {"ox-a": s.total}


async def test_a_schema_is_unavailable_exactly_while_it_is_disabled(
    fake_nodes: tuple[FakeOx, FakeOx], tmp_path: Path
) -> None:
    a, _ = fake_nodes
    spec = {"oxdatabase_1": [1, 2], "oxdatabase_2": [3, 4]}
    out = tmp_path / "ox.jsonl"
    stop = asyncio.Event()
    task = asyncio.create_task(run_ox_probe(a.url, 100, _targets(spec), stop, out, timeout_s=2.0))
    await asyncio.sleep(0.3)
    t_disable = time.monotonic()
    a.behaviour.update({3: DISABLED, 4: DISABLED})
    await asyncio.sleep(0.5)
    a.behaviour.clear()
    t_enable = time.monotonic()
    await asyncio.sleep(0.3)
    stop.set()
    s = await asyncio.wait_for(task, 10)

    assert s.failed == 0 and s.by_schema["oxdatabase_1"]["disabled"] == 0
    assert 15 <= s.by_schema["oxdatabase_2"]["disabled"] <= 27, s.by_schema  # ~50/s for 0.5 s
    assert s.by_schema["oxdatabase_2"]["ok"] >= 20  # served before and after
    span = unavailability(out)
    assert set(span) == {"oxdatabase_2"}
    first, last = span["oxdatabase_2"]
    assert t_disable - 0.1 <= first < t_disable + 0.1 and t_enable - 0.1 < last <= t_enable, (span, t_disable)
    windows = {"oxdatabase_2": (t_disable, t_enable)}
    assert disabled_outside(out, windows, slack_s=0.1) == []
    # The check can fail: the other schema's window, or a window that ends too early.
    assert len(disabled_outside(out, {"oxdatabase_1": (t_disable, t_enable)})) == s.disabled
    assert disabled_outside(out, {"oxdatabase_2": (t_disable, t_enable - 0.25)}, slack_s=0.1)
    assert set(s.disabled_windows) == {"3", "4"}
    assert sum(w[2] for w in s.disabled_windows.values()) == s.disabled


# --------------------------------------------------------------------------- process mode


async def test_process_mode_runs_until_sigterm_and_writes_its_summary(
    fake_nodes: tuple[FakeOx, FakeOx], tmp_path: Path
) -> None:
    a, _ = fake_nodes
    a.behaviour[2] = DISABLED
    targets = _targets({"oxdatabase_1": [1], "oxdatabase_2": [2], "oxdatabase_3": [3]})
    out, summary = tmp_path / "ox.jsonl", tmp_path / "ox-summary.json"
    proc = start_ox_probe_process(a.url, 40, targets, out, summary)
    try:
        deadline = time.monotonic() + 15
        while sum(a.seen.values()) < 15:  # running: its requests arrive
            assert proc.poll() is None, "the probe process ended early"
            assert time.monotonic() < deadline, "no requests from the probe process"
            await asyncio.sleep(0.05)
        assert proc.poll() is None  # still running: only SIGTERM stops it
    finally:
        data = await asyncio.to_thread(stop_ox_probe_process, proc, summary)
    assert proc.returncode == 0
    assert read_targets(tmp_path / "ox-summary.targets.json") == targets
    assert data["total"] >= 15 and data["failed"] == 0
    assert data["total"] == data["ok"] + data["disabled"] == sum(a.seen.values())
    assert data["disabled"] == data["by_schema"]["oxdatabase_2"]["total"] == a.seen[2]
    assert data["disabled_windows"]["2"][2] == data["disabled"]
    assert data["url"] == a.url and data["rate"] == 40 and data["contexts"] == 3
    events = read_events(out)
    assert len(events) == data["disabled"] and {e["cid"] for e in events} == {2}


async def test_cli_with_a_duration_prints_its_line(fake_nodes: tuple[FakeOx, FakeOx], tmp_path: Path) -> None:
    a, _ = fake_nodes
    a.behaviour[1] = CTX0012
    targets = write_targets(tmp_path / "t.json", _targets({"oxdatabase_1": [1], "oxdatabase_2": [2]}))
    summary = tmp_path / "s.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lab.ox.probe",
        "--url",
        a.url,
        "--rate",
        "20",
        "--targets",
        str(targets),
        "--duration",
        "1",
        "--summary",
        str(summary),
        "--out",
        str(tmp_path / "o.jsonl"),
        stdout=asyncio.subprocess.PIPE,
    )
    stdout, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0
    data = json.loads(summary.read_text())
    assert 18 <= data["total"] <= 22
    assert data["failed"] == a.seen[1] == data["by_schema"]["oxdatabase_1"]["total"] >= 9
    assert (
        stdout.decode()
        .strip()
        .startswith(
            f"requests={data['total']} ok={data['ok']} failed={data['failed']} disabled=0 redirected=0 "
        )
    )
    assert len(failures(tmp_path / "o.jsonl")) == data["failed"]


# --------------------------------------------------------------------------- targets from the lab


@pytest.fixture(scope="module")
def ox_db(lab: LabConfig) -> Iterator[LabConfig]:
    """The OX config DB on the session lab: the one lab_up made, or 5 schemata of 2
    contexts created (and dropped) here."""
    existed = configdb.exists(lab)
    if not existed:
        configdb.create(lab, schemata=5, contexts_per_schema=2)
    try:
        yield lab
    finally:
        if not existed:
            configdb.drop(lab)


def test_lab_targets_spread_over_all_schemata(ox_db: LabConfig, tmp_path: Path) -> None:
    states = configdb.schema_states(ox_db)
    schemata = [name for name, st in states.items() if st.contexts > 0]
    assert len(schemata) >= 5
    users = {
        (int(c), int(u))
        for c, u in mariadb.query(
            ox_db, "primary", "SELECT cid, id FROM users", database=configdb.SCHEMATA_DB
        )
    }
    cids = {sch: [c for c, *_ in configdb.contexts(ox_db, sch)] for sch in schemata}

    one = lab_targets(ox_db)
    assert [t.schema for t in one] == schemata  # every schema once, in natural order
    for t in one:
        assert t.cid == min(cids[t.schema])
        assert (t.cid, t.user) in users and t.user == min(u for c, u in users if c == t.cid)

    two = lab_targets(ox_db, per_schema=2)
    n = len(schemata)
    assert two[:n] == one  # first contexts of all schemata, then the second ones
    assert [t.schema for t in two[n:]] == [s for s in schemata if len(cids[s]) >= 2]
    assert all(t.cid == sorted(cids[t.schema])[1] for t in two[n:])
    assert len({t.cid for t in two}) == len(two)
    with pytest.raises(ValueError):
        lab_targets(ox_db, per_schema=0)

    assert read_targets(write_targets(tmp_path / "targets.json", two)) == two
