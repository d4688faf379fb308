"""bench/ox_upgradeschemata.py: its figures from synthetic schema states (pure), and its
code path at a tiny scale on the session lab (12 schemata, c1 vs c4; counts and ratios only,
no durations asserted: the machine may be loaded)."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
from collections.abc import AsyncIterator

import pytest
from temporalio.client import Client

from bench import ox_upgradeschemata as ox_bench
from inventory.load import load_inventory
from lab.config import LabConfig
from lab.manager import reset_ox
from lab.ox import configdb

T0 = dt.datetime(2024, 1, 1, 12, 0, 0)


def _state(
    name: str, disabled: float | None, started: float | None, ended: float | None, enabled: float | None
) -> configdb.SchemaState:
    def at(s: float | None) -> dt.datetime | None:
        return None if s is None else T0 + dt.timedelta(seconds=s)

    return configdb.SchemaState(
        name=name,
        enabled=True,
        server_id=3,
        update_state="done",
        version="7.10.1",
        updated_at=None,
        last_error=None,
        contexts=1,
        contexts_enabled=1,
        context_servers=(3,),
        update_runs=1,
        disabled_at=at(disabled),
        update_started_at=at(started),
        update_ended_at=at(ended),
        enabled_at=at(enabled),
    )


def test_unavailability_from_the_sites_record() -> None:
    states = [
        _state("a", 0.0, 0.1, 0.6, 0.75),  # 750 ms down, 500 ms update: 250 beyond
        _state("b", 1.0, 1.05, 1.55, 1.6),  # 600 down, 100 beyond
        _state("c", 2.0, 2.2, 2.7, 2.9),  # 900 down, 400 beyond
        _state("d", None, None, None, None),
    ]  # never touched: no record
    u = ox_bench.unavailability(states)
    assert (u.schemata, u.missing) == (3, 1)
    assert u.max_ms == pytest.approx(900) and u.p50_ms == pytest.approx(750)
    assert u.beyond_max_ms == pytest.approx(400) and u.beyond_p50_ms == pytest.approx(250)
    assert states[0].unavailable_s == pytest.approx(0.75) and states[0].update_s == pytest.approx(0.5)
    # Enabled before it was (last) disabled: not a completed window.
    assert _state("e", 5.0, 5.1, 5.2, 4.0).unavailable_s is None
    assert ox_bench.unavailability([]).schemata == 0


def _measured(label: str, c: int, n: int, wall: float, events: int, beyond: float) -> ox_bench.Measured:
    u = ox_bench.Unavailability(
        schemata=n,
        max_ms=beyond + 500,
        p50_ms=beyond + 400,
        beyond_max_ms=beyond,
        beyond_p50_ms=beyond / 2,
        missing=0,
    )
    return ox_bench.Measured(
        label=label,
        concurrency=c,
        schemata=n,
        wall_s=wall,
        runs=math.ceil(n / 100),
        max_events_per_run=events,
        max_history_listed=events + 2,
        upgraded=n,
        ok=True,
        error=None,
        unavailable=u,
        cpu=ox_bench.Cpu(per_process={"worker": 1.0}, machine_s=2.0),
    )


def test_summary_and_its_line() -> None:
    c1 = _measured("c1 sample", 1, 300, 240.0, 2400, 150.0)  # 0.8 s per schema
    c8 = _measured("c8 sample", 8, 300, 30.0, 2500, 120.0)  # 0.1 s per schema
    full = _measured("c8 full", 8, 10_000, 1250.0, 2600, 180.0)
    s = ox_bench.summarize(10_000, c1, c8, full)
    assert (s.c1_s, s.c8_s, s.speedup) == (pytest.approx(8000.0), 1250.0, pytest.approx(8.0))
    assert s.full_ratio == pytest.approx(6.4) and not s.c8_extrapolated
    assert (s.max_events_per_run, s.max_beyond_ms, s.max_history_listed) == (2600, 180.0, 2602)
    line = ox_bench.result_line(s)
    assert line == (
        "schemata=10000 c1_s=8000.0 c8_s=1250.0 speedup=8.00 max_events_per_run=2600 "
        "max_unavailable_ms_beyond_runupdate=180"
    )
    assert ox_bench.parse_result_line(line)["speedup"] == 8.0
    # Without the full run, c8_s is extrapolated from the sample like c1_s.
    s = ox_bench.summarize(10_000, c1, c8, None)
    assert (s.c8_s, s.full_ratio, s.c8_extrapolated) == (pytest.approx(1000.0), None, True)
    assert any("c8_s too" in x for x in ox_bench.summary_lines(s, 300, 8, 0.5))
    with pytest.raises(ValueError):
        ox_bench.parse_result_line("schemata 12")
    lines = ox_bench.describe(c1)
    assert len(lines) == 3 and lines[0].startswith("c1 sample: 300 schemata at concurrency 1: 240.0 s")


def test_bounds_and_options() -> None:
    assert ox_bench.run_timeout_s(300, 1, 0.5) > ox_bench.run_timeout_s(300, 8, 0.5) > 120
    assert ox_bench.proc_cpu_s(2**22 + 12345) is None  # no such process
    assert ox_bench.machine_cpu_s() > 0
    for argv in (
        ["--sample", "0"],
        ["--sample", "20", "--schemata", "10"],
        ["--concurrency", "1"],
        ["--runupdate-s", "-1"],
        ["--timeout", "0"],
    ):
        with pytest.raises(SystemExit) as e:
            ox_bench.main(argv)
        assert e.value.code == 2


@pytest.fixture
async def ox(lab: LabConfig) -> AsyncIterator[LabConfig]:
    await reset_ox(lab)
    yield lab
    await reset_ox(lab)


async def test_the_bench_at_a_tiny_scale(ox: LabConfig, client: Client, lab_worker: str) -> None:
    total, sample, per_run = 12, 8, 5
    await asyncio.to_thread(ox_bench.prepare_ox, ox, 0.05)
    inv = load_inventory(ox.ox_site_yaml)
    measured, summary = await ox_bench.bench_runs(
        ox, client, lab_worker, inv, total, sample, 4, 0.05, per_run, full=True, progress_every_s=1.0
    )
    assert [m.label for m in measured] == ["c1 sample", "c4 sample", "c4 full"]
    assert all(m.ok for m in measured), [m.error for m in measured]
    assert [(m.concurrency, m.schemata, m.upgraded) for m in measured] == [(1, 8, 8), (4, 8, 8), (4, 12, 12)]
    # Continue-as-new every 5 schemata; the result's figure is taken before each run's last
    # workflow task closes, so the server's listing is never smaller.
    assert [m.runs for m in measured] == [2, 2, 3]
    for m in measured:
        assert m.max_history_listed is not None and 0 < m.max_events_per_run <= m.max_history_listed
        u = m.unavailable
        assert (u.schemata, u.missing) == (m.schemata, 0)
        # Disabled before its update started, enabled after it ended: never less than the update.
        assert u.max_ms >= u.beyond_max_ms >= 0 and u.beyond_max_ms >= u.beyond_p50_ms >= 0
        assert "bench" in m.cpu.per_process and m.cpu.machine_s > 0
    # The line parses, and its numbers are the runs' own.
    figures = ox_bench.parse_result_line(ox_bench.result_line(summary))
    assert set(figures) == {
        "schemata",
        "c1_s",
        "c8_s",
        "speedup",
        "max_events_per_run",
        "max_unavailable_ms_beyond_runupdate",
    }
    c1, c4, full = measured
    assert figures["schemata"] == total
    assert figures["c1_s"] == pytest.approx(c1.wall_s / sample * total, abs=0.05)
    assert figures["c8_s"] == pytest.approx(full.wall_s, abs=0.05)
    assert figures["speedup"] == pytest.approx((c1.wall_s / sample) / (c4.wall_s / sample), abs=0.005)
    assert figures["max_events_per_run"] == max(m.max_events_per_run for m in measured)
    assert figures["max_unavailable_ms_beyond_runupdate"] == pytest.approx(
        max(m.unavailable.beyond_max_ms for m in measured), abs=0.5
    )
    # Only the asked schemata were touched: the lab's others are as created.
    states = configdb.schema_states(ox)
    names = sorted(states, key=configdb.natural_key)
    assert all(states[n].update_state == "none" and states[n].update_runs == 0 for n in names[total:])
