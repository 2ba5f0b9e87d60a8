"""Shared fixtures: a running daemon subprocess on a short temporary socket path."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from daemon.store import Store
from tests.helpers import DaemonProcess


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Store]:
    """An open SQLite store (migrated) in the test's temporary directory."""
    s = Store(tmp_path / "state" / "ksi.sqlite3")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture(scope="module")
def d() -> Iterator[DaemonProcess]:
    """One plain daemon per test module; tests use their own keys, agent ids and event
    types. Modules that need other settings define their own ``d``."""
    dp = DaemonProcess().start()
    try:
        yield dp
    finally:
        dp.cleanup()


@pytest.fixture
def daemon() -> Iterator[DaemonProcess]:
    """A daemon that has not loaded LiteLLM (commands other than SPAWN)."""
    d = DaemonProcess().start()
    try:
        yield d
    finally:
        d.cleanup()


@pytest.fixture
def spawn_daemon() -> Iterator[DaemonProcess]:
    """A daemon with LiteLLM preloaded, driving the fake claude CLI."""
    d = DaemonProcess(preload=True).start()
    try:
        yield d
    finally:
        d.cleanup()
