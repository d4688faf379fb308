"""What the tests of the lab application's Secret Server behaviour
(tests/test_lab_secret_server.py) and those of the product's admin-interface adapter against it
(tests/test_adapter_app_admin.py) share: the site's admin interface entry, a node's URL, a plain
HTTP request to a node, and the Secret Server side put at its defaults before and after every
test (autouse)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from inventory.model import AdminApi, SecretRef
from lab import mariadb
from lab.config import LabConfig
from tests.e2e_support import ensure_site_defaults


def admin_api(lab: LabConfig) -> AdminApi:
    return AdminApi(token=SecretRef(file=str(lab.admin_token_file)))


def node_url(lab: LabConfig, i: int) -> str:
    return f"http://127.0.0.1:{lab.app_port(i)}"


async def request(
    method: str,
    url: str,
    *,
    token: str | None = None,
    json_body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str, dict[str, str]]:
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s,
        s.request(method, url, json=json_body, headers=h) as r,
    ):
        return r.status, await r.text(), dict(r.headers)


@pytest.fixture(autouse=True)
async def site_defaults(lab: LabConfig) -> AsyncIterator[None]:
    """The Secret Server side at its defaults before the test, and put back after it."""
    await ensure_site_defaults(lab)
    yield
    await ensure_site_defaults(lab)
    assert await asyncio.to_thread(mariadb.site_state_problems, lab) == []
