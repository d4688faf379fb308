"""Fixtures of the CLI tests: wide consoles (messages checked on one line) and no Temporal (a
connection attempt is recorded and fails)."""

from __future__ import annotations

from typing import Any

import pytest
from rich.console import Console

import starter.cli as cli
import worker.main


@pytest.fixture(autouse=True)
def wide_consoles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich wraps at 80 columns without a terminal; messages are checked on one line."""
    monkeypatch.setattr(cli, "console", Console(width=1000))
    monkeypatch.setattr(cli, "err", Console(stderr=True, width=1000))


@pytest.fixture
def no_temporal(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Any attempt of the CLI to connect to Temporal is recorded (and fails)."""
    calls: list[Any] = []

    async def connect(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        raise AssertionError("the CLI contacted Temporal")

    monkeypatch.setattr(worker.main, "connect", connect)
    return calls
