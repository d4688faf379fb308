"""The traffic probe's Open-Xchange mode: steady logins to every context while the schemata
are upgraded one by one, and the evidence of which context was unavailable when.

The OX middleware's contract (lab/ox/middleware.py; every response carries `X-Node`):
    GET /ox/login?context=<cid>&user=<uid>
    200 JSON {context, user, schema, server, node, version}  served
    403 + `X-OX-Refused: disabled`    the context's schema is disabled for its upgrade: the
                                      seed's expected unavailability, counted as `disabled`,
                                      never as failed
    302 + `X-OX-Redirect: migration`, `Location: <secondary LB>/ox/login?...`
                                      the context moved to the upgraded cluster (the seed's
                                      migration redirect URL): followed by hand, at most
                                      MAX_HOPS times, and the final answer judged
    409 JSON {"code": "CTX-0012"}     "context located in another server", no redirect
                                      configured (the seed's Q & A): a failure
    anything else - 404, 5xx, another status, a 200 that is not the asked context's login,
    a connection error, a timeout (TIMEOUT_S for the whole chain of hops), a redirect loop
    or more than MAX_HOPS redirects - is a failure.

Counting: every request ends in exactly one of ok (final 200), disabled or failed, so
total == ok + failed + disabled; `redirected` is the part of `ok` that got its 200 after at
least one redirect.

Requests go round-robin over the targets (lab_targets interleaves the schemata, so
consecutive requests hit different schemata and every context is hit every
len(targets)/rate seconds) with the generic probe's absolute schedule, one aiohttp session
and one task per request (lab/probe.py's shared plumbing).

`out` (JSONL, appended, flushed line by line) gets one line per request that was NOT a plain
success: {t, mono, cid, schema, outcome: failed|disabled|redirected, status, error, node,
hops, ms}. `t` (ISO, ms, UTC) and `mono` (time.monotonic(), system-wide on Linux, so a test
or bench process can compare it with its own clock) are both the request's START; `ms` is
its duration. Plain successes are only counted. Lines are written when requests finish, so
they are not strictly ordered by `mono`.

API: ``await run_ox_probe(url, rate, contexts, stop, out)`` -> OxProbeSummary;
``lab_targets(cfg, per_schema)``; ``write_targets`` / ``read_targets``;
``unavailability(events)``, ``failures(events)``, ``disabled_outside(events, windows)``.
CLI: ``python -m lab.ox.probe --url URL --rate 100 --targets targets.json --out F --summary F
[--duration S]``; runs until the duration passes or SIGTERM/SIGINT, writes the summary JSON
and prints one line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from yarl import URL

from lab.probe import (
    JsonlLog,
    client_connector,
    latency_stats,
    now_iso,
    run_at_fixed_rate,
    run_cli,
    spawn_probe,
    stop_probe_process,
)

if TYPE_CHECKING:
    from lab.config import LabConfig

TIMEOUT_S = 5.0
MAX_HOPS = 2
LOGIN_PATH = "/ox/login"
REFUSED_HEADER, REFUSED_DISABLED = "X-OX-Refused", "disabled"
REDIRECT_HEADER, REDIRECT_MIGRATION = "X-OX-Redirect", "migration"
CTX_ELSEWHERE = "CTX-0012"
OUTCOMES = ("failed", "disabled", "redirected")
_SCHEMA_KEYS = ("total", "ok", "failed", "disabled", "redirected")


@dataclass(frozen=True)
class OxTarget:
    """One context to log in to: its id, its schema (as the config DB says) and one user."""

    cid: int
    schema: str
    user: int


@dataclass(frozen=True)
class OxProbeSummary:
    total: int
    ok: int  # final answer 200 (redirected ones included)
    failed: int
    disabled: int  # 403 X-OX-Refused: disabled (expected, not failed)
    redirected: int  # of ok: served after >= 1 migration redirect
    by_status: dict[str, int] = field(default_factory=dict)  # final status: "200", "403", "error"
    by_node: dict[str, int] = field(default_factory=dict)  # final answering node -> requests
    by_version: dict[str, int] = field(default_factory=dict)  # version of the 200 answers
    by_schema: dict[str, dict[str, int]] = field(default_factory=dict)  # schema -> _SCHEMA_KEYS
    # str(cid) -> [first disabled request's start (ISO), last one's, how many were disabled]
    disabled_windows: dict[str, list[Any]] = field(default_factory=dict)
    started: str = ""
    ended: str = ""
    latency_p50_ms: float = 0.0
    latency_max_ms: float = 0.0
    rate: float = 0.0
    url: str = ""
    contexts: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def line(self) -> str:
        nodes = ",".join(f"{k}:{v}" for k, v in sorted(self.by_node.items()))
        return (
            f"requests={self.total} ok={self.ok} failed={self.failed} disabled={self.disabled} "
            f"redirected={self.redirected} p50_ms={self.latency_p50_ms:.1f} "
            f"max_ms={self.latency_max_ms:.1f} nodes={nodes or '-'}"
        )


class _OxRecorder:
    def __init__(self, out: Path | None) -> None:
        self.total = self.ok = self.failed = self.disabled = self.redirected = 0
        self.by_status: Counter[str] = Counter()
        self.by_node: Counter[str] = Counter()
        self.by_version: Counter[str] = Counter()
        self.by_schema: dict[str, Counter[str]] = defaultdict(Counter)
        # cid -> [first mono, first iso, last mono, last iso, count]
        self.windows: dict[int, list[Any]] = {}
        self.latencies: list[float] = []
        self._log = JsonlLog(out)

    def record(
        self,
        target: OxTarget,
        outcome: str,
        *,
        t: str,
        mono: float,
        status: int | None,
        error: str | None,
        node: str | None,
        hops: int,
        ms: float,
        version: str | None = None,
    ) -> None:
        """outcome: ok | failed | disabled (a redirected 200 is `ok` with hops >= 1)."""
        self.total += 1
        sch = self.by_schema[target.schema]
        sch["total"] += 1
        self.by_status[str(status) if status is not None else "error"] += 1
        if node:
            self.by_node[node] += 1
        if status is not None:
            self.latencies.append(ms)
        line_outcome: str | None = None
        if outcome == "ok":
            self.ok += 1
            sch["ok"] += 1
            if version:
                self.by_version[version] += 1
            if hops:
                self.redirected += 1
                sch["redirected"] += 1
                line_outcome = "redirected"
        elif outcome == "disabled":
            self.disabled += 1
            sch["disabled"] += 1
            line_outcome = "disabled"
            w = self.windows.get(target.cid)
            if w is None:
                self.windows[target.cid] = [mono, t, mono, t, 1]
            else:
                if mono < w[0]:
                    w[0], w[1] = mono, t
                if mono > w[2]:
                    w[2], w[3] = mono, t
                w[4] += 1
        else:
            self.failed += 1
            sch["failed"] += 1
            line_outcome = "failed"
        if line_outcome is not None:
            self._log.write(
                {
                    "t": t,
                    "mono": round(mono, 6),
                    "cid": target.cid,
                    "schema": target.schema,
                    "outcome": line_outcome,
                    "status": status,
                    "error": error,
                    "node": node,
                    "hops": hops,
                    "ms": round(ms, 1),
                }
            )

    def close(self) -> None:
        self._log.close()


def login_url(base: str, target: OxTarget) -> str:
    return f"{base}{LOGIN_PATH}?context={target.cid}&user={target.user}"


def _ctx0012(body: bytes) -> str | None:
    """OX's message for a 409 CTX-0012 body, None if the body is not one."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if isinstance(data, dict) and data.get("code") == CTX_ELSEWHERE:
        return str(data.get("message") or data.get("error") or "context located in another server")
    return None


async def _login(
    session: aiohttp.ClientSession, base: str, target: OxTarget, rec: _OxRecorder, timeout_s: float
) -> None:
    t, mono, t0 = now_iso(), time.monotonic(), time.perf_counter()
    url = URL(login_url(base, target))
    seen = {str(url)}
    hops = 0
    node: str | None = None
    status: int | None = None

    def done(outcome: str, error: str | None, version: str | None = None) -> None:
        rec.record(
            target,
            outcome,
            t=t,
            mono=mono,
            status=status,
            error=error,
            node=node,
            hops=hops,
            ms=(time.perf_counter() - t0) * 1000,
            version=version,
        )

    try:
        async with asyncio.timeout(timeout_s):  # the whole chain of hops
            while True:
                async with session.get(url, allow_redirects=False) as resp:
                    body = await resp.read()
                    status, node = resp.status, resp.headers.get("X-Node") or node
                    headers = resp.headers
                if status not in (301, 302, 303, 307, 308):
                    break
                if headers.get(REDIRECT_HEADER) != REDIRECT_MIGRATION:
                    return done("failed", f"{status} redirect that is not a migration redirect")
                location = headers.get("Location")
                if not location:
                    return done("failed", f"{status} migration redirect without Location")
                nxt = url.join(URL(location))
                if str(nxt) in seen:
                    return done("failed", f"redirect loop after {hops + 1} hop(s): back to {nxt}")
                if hops >= MAX_HOPS:
                    return done("failed", f"too many redirects (more than {MAX_HOPS})")
                seen.add(str(nxt))
                hops += 1
                url = nxt
    except TimeoutError:
        status = None
        return done("failed", f"timeout after {timeout_s:.1f}s")
    except (aiohttp.ClientError, OSError, ValueError) as e:
        status = None
        return done("failed", f"{type(e).__name__}: {e}")

    if status == 200:
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if (
            not isinstance(data, dict)
            or str(data.get("context")) != str(target.cid)
            or str(data.get("user")) != str(target.user)
        ):
            return done("failed", f"200 that is not context {target.cid}'s login: {body[:200]!r}")
        node = node or (str(data["node"]) if data.get("node") else None)
        return done("ok", None, str(data["version"]) if data.get("version") is not None else None)
    if status == 403 and headers.get(REFUSED_HEADER) == REFUSED_DISABLED:
        return done("disabled", None)
    if status == 409:
        msg = _ctx0012(body)
        return done("failed", f"{CTX_ELSEWHERE}: {msg}" if msg is not None else f"409: {body[:200]!r}")
    return done("failed", f"unexpected status {status}: {body[:200]!r}")


async def run_ox_probe(
    url: str,
    rate: float,
    contexts: Sequence[OxTarget],
    stop: asyncio.Event,
    out: Path | None,
    *,
    timeout_s: float = TIMEOUT_S,
) -> OxProbeSummary:
    """Log in to `contexts` round-robin through `url` at `rate` per second until `stop` is
    set, then wait for the requests in flight and return the summary. Non-plain-success
    events go to `out` (JSONL) as they happen."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    if not contexts:
        raise ValueError("no contexts to probe")
    targets = list(contexts)
    base = url.rstrip("/")
    rec = _OxRecorder(out)
    started = now_iso()
    try:
        async with aiohttp.ClientSession(connector=client_connector()) as session:

            def fire(n: int) -> Coroutine[Any, Any, None]:
                return _login(session, base, targets[(n - 1) % len(targets)], rec, timeout_s)

            await run_at_fixed_rate(rate, stop, fire)
    finally:
        rec.close()
    p50, pmax = latency_stats(rec.latencies)
    return OxProbeSummary(
        total=rec.total,
        ok=rec.ok,
        failed=rec.failed,
        disabled=rec.disabled,
        redirected=rec.redirected,
        by_status=dict(sorted(rec.by_status.items())),
        by_node=dict(sorted(rec.by_node.items())),
        by_version=dict(sorted(rec.by_version.items())),
        by_schema={
            s: {k: c[k] for k in _SCHEMA_KEYS}
            for s, c in sorted(rec.by_schema.items(), key=lambda kv: _natural(kv[0]))
        },
        disabled_windows={str(cid): [w[1], w[3], w[4]] for cid, w in sorted(rec.windows.items())},
        started=started,
        ended=now_iso(),
        latency_p50_ms=p50,
        latency_max_ms=pmax,
        rate=rate,
        url=base,
        contexts=len(targets),
    )


# --------------------------------------------------------------------------- targets


def _natural(name: str) -> tuple[str, int, str]:
    head = name.rstrip("0123456789")
    tail = name[len(head) :]
    return (head, int(tail) if tail else -1, name)


def lab_targets(cfg: LabConfig, per_schema: int = 1) -> list[OxTarget]:
    """`per_schema` contexts (lowest cids) of every schema of the lab's OX config DB, each
    with its lowest user id, interleaved across schemata (schema 1's first context, schema
    2's first, ..., schema 1's second, ...) so that round-robin spreads consecutive requests
    over all schemata. Contexts without users are left out (nobody can log in to them)."""
    if per_schema < 1:
        raise ValueError("per_schema must be >= 1")
    from lab import mariadb
    from lab.ox import configdb

    rows = mariadb.query(
        cfg,
        "primary",
        f"SELECT m.db_schema, m.cid, MIN(u.id) FROM `{configdb.CONFIGDB}`.context_server2db_pool m "
        f"JOIN `{configdb.SCHEMATA_DB}`.users u ON u.cid = m.cid GROUP BY m.db_schema, m.cid",
        database=configdb.CONFIGDB,
    )
    by_schema: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for schema, cid, user in rows:
        by_schema[str(schema)].append((int(cid), int(user)))
    chosen = {s: sorted(v)[:per_schema] for s, v in by_schema.items()}
    order = sorted(chosen, key=configdb.natural_key)
    return [
        OxTarget(cid=chosen[s][i][0], schema=s, user=chosen[s][i][1])
        for i in range(per_schema)
        for s in order
        if i < len(chosen[s])
    ]


def write_targets(path: Path, targets: Sequence[OxTarget]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(t) for t in targets], indent=1) + "\n", encoding="utf-8")
    return path


def read_targets(path: Path) -> list[OxTarget]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {{cid, schema, user}}")
    return [OxTarget(cid=int(d["cid"]), schema=str(d["schema"]), user=int(d["user"])) for d in data]


# --------------------------------------------------------------------------- analysis


def read_events(events_jsonl: Path) -> list[dict[str, Any]]:
    """The probe's event lines (none if the file does not exist)."""
    try:
        text = events_jsonl.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(ln) for ln in text.splitlines() if ln.strip()]


def unavailability(events_jsonl: Path) -> dict[str, tuple[float, float]]:
    """schema -> (first, last) request start (`mono`) of its contexts' `disabled` answers."""
    spans: dict[str, tuple[float, float]] = {}
    for e in read_events(events_jsonl):
        if e["outcome"] == "disabled":
            m = float(e["mono"])
            lo, hi = spans.get(e["schema"], (m, m))
            spans[e["schema"]] = (min(lo, m), max(hi, m))
    return dict(sorted(spans.items(), key=lambda kv: _natural(kv[0])))


def failures(events_jsonl: Path) -> list[dict[str, Any]]:
    """The `failed` events, in file order."""
    return [e for e in read_events(events_jsonl) if e["outcome"] == "failed"]


def disabled_outside(
    events_jsonl: Path, windows: Mapping[str, tuple[float, float]], slack_s: float = 0.0
) -> list[dict[str, Any]]:
    """The `disabled` events outside their own schema's window (time.monotonic() of its
    disableschema and enableschema). A disabled event's `mono` is the request's start, which
    may precede the disable by up to one request latency: `slack_s` widens the window's
    start by that much. A schema without a window makes all its disabled events outside."""
    bad = []
    for e in read_events(events_jsonl):
        if e["outcome"] != "disabled":
            continue
        w = windows.get(e["schema"])
        if w is None or not (w[0] - slack_s <= float(e["mono"]) <= w[1]):
            bad.append(e)
    return bad


# --------------------------------------------------------------------------- process mode


def start_ox_probe_process(
    url: str,
    rate: float,
    targets: Sequence[OxTarget] | Path,
    out: Path,
    summary: Path,
    timeout_s: float = TIMEOUT_S,
) -> subprocess.Popen[bytes]:
    """The OX probe in its own process (fresh output files). `targets`: a targets JSON file,
    or targets, written next to `summary` as <summary stem>.targets.json."""
    if not isinstance(targets, Path):
        targets = write_targets(summary.with_name(summary.stem + ".targets.json"), targets)
    return spawn_probe(
        "lab.ox.probe",
        ["--url", url, "--rate", str(rate), "--targets", str(targets), "--timeout", str(timeout_s)],
        out,
        summary,
    )


def stop_ox_probe_process(proc: subprocess.Popen[bytes], summary: Path) -> dict[str, Any]:
    """SIGTERM; the probe finishes its requests in flight and writes its summary. The
    summary as a dict, or {} if it wrote none."""
    return stop_probe_process(proc, summary)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.ox.probe", description="OX login traffic probe")
    p.add_argument("--url", required=True)
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--targets", type=Path, required=True, help="JSON list of {cid, schema, user}")
    p.add_argument("--duration", type=float, default=None, help="seconds (default: until SIGTERM)")
    p.add_argument("--out", type=Path, default=None, help="JSONL file of events (appended)")
    p.add_argument("--summary", type=Path, default=None, help="summary JSON written at the end")
    p.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per request (all hops)")
    a = p.parse_args(argv)
    targets = read_targets(a.targets)
    run_cli(
        lambda stop: run_ox_probe(a.url, a.rate, targets, stop, a.out, timeout_s=a.timeout),
        a.duration,
        a.summary,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
