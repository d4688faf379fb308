"""What the tests of the lab's HAProxy (tests/test_lab_haproxy_runtime.py) and those of the
product's HAProxy adapter against it (tests/test_adapter_haproxy.py) share: the lab's inventory
and a balancer of it by name, a spare node to attach at run time, HAProxy's runtime state put
back after every test, HAProxy's pid (a reload changes it), a GET on a fresh connection and
waiting until a member holds an open session.

The spare node is index cfg.nodes + 1: its own folder and port, in no backend of haproxy.cfg.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from multidict import CIMultiDict

from activities import haproxy as lb_api
from inventory.load import load_inventory
from inventory.model import Inventory, LoadBalancer
from lab import haproxy, nodes
from lab.config import LabConfig
from lab.procs import read_pid

# How long a request to the app's /slow holds its session open.
SLOW_MS = 3000


@pytest.fixture(scope="module")
def inv(lab: LabConfig) -> Inventory:
    return load_inventory(lab.site_yaml)


def balancer(inv: Inventory, name: str) -> LoadBalancer:
    return next(lb for lb in inv.load_balancers if lb.name == name)


@pytest.fixture(scope="module")
def spare(lab: LabConfig) -> Iterator[int]:
    """A throwaway node (package 1) running on its own port, behind no configured backend."""
    i = lab.nodes + 1
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", lab.app_port(i))) == 0:
            pytest.fail(f"port {lab.app_port(i)} of the spare node is already in use")
    nodes.install_node(lab, i, lab.package(1))
    try:
        nodes.start_node(lab, i)
        yield i
    finally:
        nodes.stop_node(lab, i)
        shutil.rmtree(lab.node_dir(i), ignore_errors=True)


@pytest.fixture(autouse=True)
async def restore(lab: LabConfig) -> AsyncIterator[None]:
    """After the test: node1's health file back and the runtime state of HAProxy as after
    start (no server attached at run time, maintenance page off, no preview key, every node
    ready and UP)."""
    yield
    nodes.write_health_file(lab.node_dir(1), only_if_missing=True)
    await asyncio.to_thread(haproxy.reset_servers, lab)
    await asyncio.to_thread(haproxy.wait_all_up, lab)


def haproxy_pid(lab: LabConfig) -> int | None:
    return read_pid(haproxy.pid_file(lab))


async def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, CIMultiDict[str], str]:
    # A fresh connection per request: keep-alive would pin it to one server. Headers stay
    # case-insensitive (HAProxy sends the ones it sets lower-cased).
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s,
        s.get(url, headers={"Connection": "close", **(headers or {})}) as r,
    ):
        return r.status, r.headers.copy(), await r.text()


async def wait_scur(lb: LoadBalancer, node: str, at_least: int = 1, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (await lb_api.member_state(lb, node)).scur < at_least:
        assert time.monotonic() < deadline, f"{node}: no session opened within {timeout}s"
        await asyncio.sleep(0.05)
