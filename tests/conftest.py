"""Shared fixtures, and each test's layer.

* Temporal: one real dev server per session and a worker helper (tests/temporal_env.py).
* The lab: `lab_cfg` (free ports, a temporary root) and `lab` (the whole lab, started
  once per session with `lab_up` and always stopped with `lab_down`).
* Layers (markers, set from the fixtures a test uses, its whole closure): `e2e` - the lab
  and a worker running the real activities (procedures on the site); `lab` - the lab, no
  such worker (adapters, the stand-ins, the CLI against the lab); `workflow` - a Temporal
  server, no lab (workflow logic with stand-in activities); `unit` - neither.
  `make test-fast` runs unit and workflow.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from lab.config import LabConfig
from tests import secret_leaks, signing_support

# --------------------------------------------------------------------------- Temporal
from tests.temporal_env import (  # noqa: F401
    client,
    lab_worker,
    task_queue,
    temporal_env,
    time_skipping_env,
)

# --------------------------------------------------------------------------- layers
LAYERS = {
    "unit": "no server, no lab",
    "workflow": "a Temporal server (dev or time-skipping), no lab",
    "lab": "the lab's real components, no worker of the real activities",
    "e2e": "procedures on the lab: the lab and a worker of the real activities",
}
TEMPORAL_FIXTURES = {"temporal_env", "client", "time_skipping_env"}


def layer_of(fixtures: set[str]) -> str:
    if "lab" in fixtures:
        return "e2e" if "lab_worker" in fixtures else "lab"
    return "workflow" if fixtures & TEMPORAL_FIXTURES else "unit"


def pytest_configure(config: pytest.Config) -> None:
    for name, meaning in LAYERS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")
    if not hasattr(config, "workerinput"):  # the controller (or a run without xdist)
        # Where the lab_worker fixtures of every xdist worker record the procedures whose
        # runs they searched for leaked secrets (tests/secret_leaks.py); workers inherit it.
        os.environ[secret_leaks.CHECKS_ENV] = tempfile.mkdtemp(prefix="zerodown-secret-checks-")


def _whole_suite(config: pytest.Config) -> bool:
    """`make test`: every test of testpaths, no -k / -m / --lf selection."""
    o = config.option
    return (
        config.args_source == pytest.Config.ArgsSource.TESTPATHS
        and not o.keyword
        and not o.markexpr
        and not getattr(o, "lf", False)
        and not getattr(o, "deselect", None)
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A whole-suite run fails when some procedure never ran under the secret-leak check
    (issue 17.5: every procedure, run on the lab with marked secrets, leaks none)."""
    config = session.config
    if hasattr(config, "workerinput"):
        return
    directory = Path(os.environ.get(secret_leaks.CHECKS_ENV, ""))
    checked = secret_leaks.checked_procedures(directory) if directory.is_dir() else set()
    shutil.rmtree(directory, ignore_errors=True)
    if exitstatus != 0 or not _whole_suite(config):
        return
    from workflows.registry import PROCEDURES

    missing = sorted(set(PROCEDURES) - checked)
    if missing:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                "secret-leak check: no e2e test ran " + ", ".join(missing) + " on the lab with a lab_worker "
                "(tests/secret_leaks.py): every procedure must",
                red=True,
            )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# The order tests start in: the long ones (procedures on the lab) first, so that on a
# 2-core machine the workers share them from the start instead of the last worker running
# the longest tests alone at the end; unit tests fill the gaps.
_START_ORDER = {"e2e": 0, "lab": 1, "workflow": 2, "unit": 3}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    layers = {}
    for item in items:
        layer = layer_of(set(getattr(item, "fixturenames", ())))
        item.add_marker(getattr(pytest.mark, layer))
        layers[item.nodeid] = layer
    items.sort(key=lambda item: _START_ORDER[layers[item.nodeid]])  # stable: file order kept within


# --------------------------------------------------------------------------- the lab

PORT_BASE_START = 21000
PORT_BASE_STEP = 100
PORT_BASE_TRIES = 200
# Ports a developer's own dev server / lab use: never hand them to a test lab.
RESERVED_PORTS = {7233, 8233, *range(18000, 18100)}
# Per-port-base lock files: two pytest sessions on one machine (parallel engineers, CI
# next to a developer) never pick the same ports, even if both probe them at once.
LOCK_DIR = Path(tempfile.gettempdir()) / "zerodown-test-ports"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR like the servers themselves: a port in TIME_WAIT is usable, one with
        # a listener is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _test_lab_config(root: Path, port_base: int) -> LabConfig:
    # The dev server ports sit in the same block (+50/+51, unused by the lab itself), so a
    # test dev server never collides with the developer's on 7233/8233. Four nodes: the
    # manual rolling upgrade splits them into two groups of two. Three OX nodes: the OX
    # cluster (seed 002) is always there; its processes are small.
    return LabConfig(
        root=root,
        nodes=4,
        port_base=port_base,
        temporal_port=port_base + 50,
        temporal_ui_port=port_base + 51,
        ox_nodes=3,
    )


def _claim_port_base(root: Path) -> tuple[LabConfig, int]:
    """A LabConfig whose ports are all free, and the fd of the lock that reserves them."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    for n in range(PORT_BASE_TRIES):
        base = PORT_BASE_START + n * PORT_BASE_STEP
        cfg = _test_lab_config(root, base)
        ports = [*cfg.all_ports(), cfg.temporal_port, cfg.temporal_ui_port]
        if RESERVED_PORTS.intersection(ports) or max(ports) > 65535:
            continue
        fd = os.open(LOCK_DIR / f"{base}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        if all(_port_free(p) for p in ports):
            return cfg, fd
        os.close(fd)  # releases the lock
    raise RuntimeError(f"no free block of lab ports from {PORT_BASE_START} in steps of {PORT_BASE_STEP}")


@pytest.fixture(scope="session")
def lab_cfg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabConfig]:
    """A 4-node lab config (3 OX nodes) on free ports, rooted in a session temp dir (not started)."""
    cfg, lock_fd = _claim_port_base(tmp_path_factory.mktemp("lab"))
    signing_support.LAB = cfg
    try:
        yield cfg
    finally:
        os.close(lock_fd)


@pytest.fixture(scope="session")
async def lab(lab_cfg: LabConfig) -> AsyncIterator[LabConfig]:
    """The running lab (without its own Temporal server), once per session; always torn
    down, also when lab_up fails half-way."""
    from lab.manager import lab_down, lab_up

    try:
        await lab_up(lab_cfg, with_temporal=False)
        yield lab_cfg
    finally:
        lab_down(lab_cfg)


# --------------------------------------------------------------------------- procedures on the lab


@pytest.fixture
async def fresh_lab(lab: LabConfig) -> AsyncIterator[LabConfig]:
    """The session lab at v1 (nodes, schema, load balancer, no fault injected) for the test,
    and left that way after it: the lab is shared by the whole session."""
    from tests.e2e_support import ensure_v1

    await ensure_v1(lab)
    yield lab
    await ensure_v1(lab)
