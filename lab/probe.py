"""The traffic probe: steady synthetic load through the load balancer during a procedure.

It answers the one question a zero-downtime upgrade is judged by: did any request fail?

* requests are sent at a fixed rate, scheduled by absolute times (no drift), each in its
  own task so a slow answer never holds back the next request;
* one aiohttp ClientSession with keep-alive (at most ~20 connections), like a browser pool;
* mix: ~70% GET /items, ~30% POST /items, and every `slow_every`-th request a
  GET /slow?ms=`slow_ms`: a long-lived request that a drain has to wait for;
* a failure is a connection error, a timeout (5 s beyond the slow request's own time), a
  status >= 500 or any other unexpected status; each is appended to `out` as one JSON line
  {t, method, path, status, error, node} when it happens, so a crash loses nothing;
* a change refused by maintenance mode (423 with `X-Refused: maintenance`) is counted as
  `refused`, not failed: the site answered as designed (reads served, changes refused),
  which is what the seed's optional maintenance mode promises. Any other refusal (the
  version mismatch page, 409) is a failure;
* the load balancer's maintenance page (503 with `Retry-After`, seed 004 step 18: the
  announced downtime) is counted as `maintenance`, with the times of the first and the last
  one, not as failed. Any other 5xx (an application's, or HAProxy's "no server available",
  which carries no Retry-After) and every connection error stays a failure.

API: ``await run_probe(url, rate, stop, out)`` -> ProbeSummary.
CLI: ``python -m lab.probe --url URL --rate 100 [--duration S] --out F --summary F``; runs until
the duration passes or SIGTERM/SIGINT, writes the summary JSON and prints one line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

import aiohttp

TIMEOUT_S = 5.0
EXPECTED = {"GET": {200}, "POST": {201}}
REFUSED_STATUS = 423
REFUSED_BY = "maintenance"
MAINTENANCE_STATUS = 503


@dataclass(frozen=True)
class ProbeSummary:
    total: int
    failed: int
    by_status: dict[str, int] = field(default_factory=dict)  # "200", "503", "error"
    by_node: dict[str, int] = field(default_factory=dict)  # served-by node -> answered requests
    started: str = ""
    ended: str = ""
    latency_p50_ms: float = 0.0
    latency_max_ms: float = 0.0
    rate: float = 0.0
    url: str = ""
    # Changes refused by maintenance mode (423, X-Refused: maintenance): counted in total,
    # not in failed.
    refused: int = 0
    # The maintenance page (503 with Retry-After): counted in total, not in failed; when the
    # first and the last one came (ISO times, "" when none).
    maintenance: int = 0
    maintenance_first: str = ""
    maintenance_last: str = ""
    # The writes the site acknowledged (201): their bodies start "probe <write_token> ", and
    # the ids of the rows created. Not in `line()`: a test compares them with the table.
    write_token: str = ""
    acked_ids: list[int] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def line(self) -> str:
        nodes = ",".join(f"{k}:{v}" for k, v in sorted(self.by_node.items()))
        return (
            f"requests={self.total} failed={self.failed} refused={self.refused} "
            f"maintenance={self.maintenance} p50_ms={self.latency_p50_ms:.1f} "
            f"max_ms={self.latency_max_ms:.1f} nodes={nodes or '-'}"
        )


# --------------------------------------------------------------------------- shared plumbing
# (also used by lab/ox/probe.py, the probe's Open-Xchange mode)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


class JsonlLog:
    """An append-only JSONL file, every line flushed as it is written (a crash loses
    nothing: the file is the evidence). `out=None`: lines are dropped."""

    def __init__(self, out: Path | None) -> None:
        self._fh: IO[str] | None = None
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(out, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def latency_stats(latencies: list[float]) -> tuple[float, float]:
    """(p50, max) in ms, rounded to 0.1; (0, 0) without samples."""
    lat = sorted(latencies)
    if not lat:
        return 0.0, 0.0
    return round(lat[len(lat) // 2], 1), round(lat[-1], 1)


def client_connector() -> aiohttp.TCPConnector:
    # Enough connections for every request in flight (long-lived ones included): a request
    # waiting for a free connection inside the probe would be a client-side artefact, not
    # the site failing.
    return aiohttp.TCPConnector(limit=200, limit_per_host=200, keepalive_timeout=30)


async def run_at_fixed_rate(
    rate: float, stop: asyncio.Event, fire: Callable[[int], Coroutine[Any, Any, None]]
) -> None:
    """Start `fire(n)` (n = 1, 2, ...) as its own task `rate` times per second until `stop`
    is set, then wait for the tasks still in flight. Absolute schedule: request n+1 is due
    at t_start + n/rate however long an iteration took, so the rate never drifts and a slow
    answer never holds back the next request."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    interval = 1.0 / rate
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    t_start = loop.time()
    n = 0
    while not stop.is_set():
        n += 1
        task = asyncio.create_task(fire(n))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        delay = t_start + n * interval - loop.time()
        if delay > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


class _Summary(Protocol):
    def to_json(self) -> str: ...

    def line(self) -> str: ...


S = TypeVar("S", bound=_Summary)


def run_cli(
    make: Callable[[asyncio.Event], Coroutine[Any, Any, S]], duration: float | None, summary_path: Path | None
) -> S:
    """The probes' process mode: run `make(stop)` until `duration` passes or SIGTERM/SIGINT
    sets `stop`, write the summary JSON to `summary_path`, print its one line."""

    async def run() -> S:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if duration is not None:
            loop.call_later(duration, stop.set)
        return await make(stop)

    summary = asyncio.run(run())
    if summary_path is not None:
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(summary.to_json() + "\n", encoding="utf-8")
    print(summary.line(), flush=True)
    return summary


def spawn_probe(module: str, args: list[str], out: Path, summary: Path) -> subprocess.Popen[bytes]:
    """`python -m <module> <args> --out OUT --summary SUMMARY` in its own process, like a
    real client population (fresh output files)."""
    for f in (out, summary):
        f.unlink(missing_ok=True)
    argv = [sys.executable, "-m", module, *args, "--out", str(out), "--summary", str(summary)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL)


# --------------------------------------------------------------------------- the generic probe


class _Recorder:
    def __init__(self, out: Path | None) -> None:
        self.total = 0
        self.failed = 0
        self.refused = 0
        self.maintenance = 0
        self.maintenance_first = ""
        self.maintenance_last = ""
        self.by_status: Counter[str] = Counter()
        self.by_node: Counter[str] = Counter()
        self.latencies: list[float] = []
        # Ids of the rows the site acknowledged creating (201): every one must still be
        # there after an upgrade or a rollback.
        self.acked_ids: list[int] = []
        self.token = ""
        self._log = JsonlLog(out)

    def ok(self, status: int, node: str | None, latency_ms: float) -> None:
        self.total += 1
        self.by_status[str(status)] += 1
        if node:
            self.by_node[node] += 1
        self.latencies.append(latency_ms)

    def refuse(self, status: int, node: str | None, latency_ms: float) -> None:
        self.ok(status, node, latency_ms)
        self.refused += 1

    def maintenance_page(self, status: int, latency_ms: float) -> None:
        self.ok(status, None, latency_ms)  # HAProxy answered: no node served it
        self.maintenance += 1
        self.maintenance_last = now_iso()
        self.maintenance_first = self.maintenance_first or self.maintenance_last

    def fail(
        self,
        method: str,
        path: str,
        status: int | None,
        error: str | None,
        node: str | None,
        latency_ms: float | None,
    ) -> None:
        self.total += 1
        self.failed += 1
        self.by_status[str(status) if status is not None else "error"] += 1
        if node:
            self.by_node[node] += 1
        if latency_ms is not None:
            self.latencies.append(latency_ms)
        self._log.write(
            {"t": now_iso(), "method": method, "path": path, "status": status, "error": error, "node": node}
        )

    def close(self) -> None:
        self._log.close()


async def _one(
    session: aiohttp.ClientSession,
    base: str,
    method: str,
    path: str,
    rec: _Recorder,
    n: int,
    timeout_s: float,
) -> None:
    t0 = time.perf_counter()
    node: str | None = None
    try:
        kwargs: dict[str, Any] = {"timeout": aiohttp.ClientTimeout(total=timeout_s)}
        if method == "POST":
            kwargs["json"] = {"body": f"probe {rec.token} {n}"}
        async with session.request(method, base + path, **kwargs) as resp:
            body = await resp.read()
            node = resp.headers.get("X-Node") or resp.headers.get("X-Served-By")
            ms = (time.perf_counter() - t0) * 1000
            if resp.status in EXPECTED[method]:
                rec.ok(resp.status, node, ms)
                if method == "POST":
                    rec.acked_ids.append(int(json.loads(body)["id"]))
            elif resp.status == REFUSED_STATUS and resp.headers.get("X-Refused") == REFUSED_BY:
                rec.refuse(resp.status, node, ms)
            elif resp.status == MAINTENANCE_STATUS and "Retry-After" in resp.headers:
                rec.maintenance_page(resp.status, ms)
            else:
                rec.fail(method, path, resp.status, None, node, ms)
    except TimeoutError:
        rec.fail(method, path, None, f"timeout after {timeout_s:.1f}s", node, None)
    except (aiohttp.ClientError, OSError) as e:
        rec.fail(method, path, None, f"{type(e).__name__}: {e}", node, None)


async def run_probe(
    url: str, rate: float, stop: asyncio.Event, out: Path | None, slow_every: int = 50, slow_ms: int = 1500
) -> ProbeSummary:
    """Send requests to `url` at `rate` per second until `stop` is set, then wait for the
    requests in flight and return the summary. Failures go to `out` (JSONL) as they happen."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    base = url.rstrip("/")
    rec = _Recorder(out)
    rec.token = secrets.token_hex(4)  # marks this probe's rows: body "probe <token> <n>"
    started = now_iso()
    try:
        async with aiohttp.ClientSession(connector=client_connector()) as session:

            def fire(n: int) -> Coroutine[Any, Any, None]:
                if slow_every > 0 and n % slow_every == 0:
                    method, path, timeout_s = "GET", f"/slow?ms={slow_ms}", TIMEOUT_S + slow_ms / 1000
                elif n % 10 in (3, 6, 9):  # 30% writes, spread evenly
                    method, path, timeout_s = "POST", "/items", TIMEOUT_S
                else:
                    method, path, timeout_s = "GET", "/items", TIMEOUT_S
                return _one(session, base, method, path, rec, n, timeout_s)

            await run_at_fixed_rate(rate, stop, fire)
    finally:
        rec.close()
    p50, pmax = latency_stats(rec.latencies)
    return ProbeSummary(
        total=rec.total,
        failed=rec.failed,
        by_status=dict(sorted(rec.by_status.items())),
        by_node=dict(sorted(rec.by_node.items())),
        started=started,
        ended=now_iso(),
        latency_p50_ms=p50,
        latency_max_ms=pmax,
        rate=rate,
        url=base,
        refused=rec.refused,
        maintenance=rec.maintenance,
        maintenance_first=rec.maintenance_first,
        maintenance_last=rec.maintenance_last,
        write_token=rec.token,
        acked_ids=sorted(rec.acked_ids),
    )


def start_probe_process(
    url: str, rate: float, out: Path, summary: Path, slow_every: int = 50, slow_ms: int = 1500
) -> subprocess.Popen[bytes]:
    """The probe in its own process, like a real client population (fresh output files)."""
    return spawn_probe(
        "lab.probe",
        ["--url", url, "--rate", str(rate), "--slow-every", str(slow_every), "--slow-ms", str(slow_ms)],
        out,
        summary,
    )


def stop_probe_process(proc: subprocess.Popen[bytes], summary: Path) -> dict[str, Any]:
    """SIGTERM (the probe finishes its requests in flight and writes its summary); the summary,
    or {} if it wrote none. Serves every probe mode (lab/ox/probe.py too)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    try:
        data: dict[str, Any] = json.loads(summary.read_text())
    except (OSError, ValueError):
        return {}
    return data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.probe", description="steady traffic probe")
    p.add_argument("--url", required=True)
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--duration", type=float, default=None, help="seconds (default: until SIGTERM)")
    p.add_argument("--out", type=Path, default=None, help="JSONL file of failures (appended)")
    p.add_argument("--summary", type=Path, default=None, help="summary JSON written at the end")
    p.add_argument("--slow-every", type=int, default=50)
    p.add_argument("--slow-ms", type=int, default=1500)
    a = p.parse_args(argv)
    run_cli(
        lambda stop: run_probe(a.url, a.rate, stop, a.out, a.slow_every, a.slow_ms), a.duration, a.summary
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
