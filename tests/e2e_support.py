"""Helpers for end-to-end tests on the lab: the probe as a real client process, file
manifests, SSH command counts, versions as served."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from lab.config import LabConfig
from lab.probe import start_probe_process, stop_probe_process


@dataclass
class ProbeRun:
    summary_file: Path
    failures_file: Path
    summary: dict[str, Any] = field(default_factory=dict)

    def failures(self) -> list[dict[str, Any]]:
        if not self.failures_file.exists():
            return []
        return [json.loads(line) for line in self.failures_file.read_text().splitlines() if line.strip()]


@contextmanager
def probe(lab: LabConfig, out_dir: Path, rate: float = 100.0, slow_every: int = 50,
          slow_ms: int = 1500) -> Iterator[ProbeRun]:
    """The traffic probe in its own process for the duration of the block."""
    run = ProbeRun(summary_file=out_dir / "probe-summary.json", failures_file=out_dir / "probe.jsonl")
    proc = start_probe_process(lab.main_url, rate, run.failures_file, run.summary_file,
                               slow_every=slow_every, slow_ms=slow_ms)
    time.sleep(0.5)  # let it warm up so the procedure starts under load
    try:
        yield run
    finally:
        run.summary = stop_probe_process(proc, run.summary_file)


def manifest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def app_manifests(lab: LabConfig) -> dict[str, dict[str, str]]:
    return {lab.node_name(i): manifest(lab.node_dir(i) / "app") for i in lab.node_indexes}


def ssh_commands(lab: LabConfig, i: int) -> list[str]:
    log = lab.node_dir(i) / "ssh.log"
    if not log.exists():
        return []
    return [json.loads(line)["command"] for line in log.read_text().splitlines() if line.strip()]


async def served_versions(lab: LabConfig) -> dict[str, str]:
    out: dict[str, str] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        for i in lab.node_indexes:
            async with s.get(f"http://127.0.0.1:{lab.app_port(i)}/version") as r:
                out[lab.node_name(i)] = (await r.json())["version"]
    return out
