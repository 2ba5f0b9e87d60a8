"""Shared fixtures: running daemons on short temporary socket paths.

Daemons run in the test process (tests/inproc.py) unless a test needs the process itself;
such tests start a :class:`tests.helpers.DaemonProcess` (``daemon_process``)."""

from __future__ import annotations

import os

# As claude_cli_provider.py does before its import: LiteLLM must not fetch its price list
# from the internet, and test modules (test_provider.py) import LiteLLM before it.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ.setdefault("LITELLM_LOG", "ERROR")
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.state.db import Store
from tests.helpers import DaemonProcess, short_tmpdir
from tests.inproc import InProcessDaemon


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
    dp = InProcessDaemon().start()
    try:
        yield dp
    finally:
        dp.cleanup()


@pytest.fixture
def daemon() -> Iterator[DaemonProcess]:
    """A daemon that has not loaded LiteLLM (commands other than SPAWN)."""
    d = InProcessDaemon().start()
    try:
        yield d
    finally:
        d.cleanup()


@pytest.fixture
def daemon_process() -> Iterator[DaemonProcess]:
    """A daemon subprocess, for tests of the process itself (signals, exit, pid file)."""
    d = DaemonProcess().start()
    try:
        yield d
    finally:
        d.cleanup()


@pytest.fixture
def make_daemon() -> Iterator[Callable[..., DaemonProcess]]:
    """Start daemons with LiteLLM preloaded (driving the fake CLI), extra flags and
    environment; ``process=True`` for a subprocess (tests of the process itself: signals,
    restarts, its environment). All are cleaned up after the test."""
    started: list[DaemonProcess] = []

    def make(
        *args: str, env: dict[str, str] | None = None, process: bool = False, **kw: Any
    ) -> DaemonProcess:
        kind = DaemonProcess if process else InProcessDaemon
        d = kind(args=list(args), env=env, preload=True, **kw).start()
        started.append(d)
        return d

    yield make
    for d in started:
        d.cleanup()


@pytest.fixture
def spawn_daemon() -> Iterator[DaemonProcess]:
    """A daemon with LiteLLM preloaded, driving the fake claude CLI."""
    d = InProcessDaemon(preload=True).start()
    try:
        yield d
    finally:
        d.cleanup()


@pytest.fixture
def tmpfs() -> Iterator[Callable[[str], Path]]:
    """Mount small tmpfs file systems (torn down, and only ours, after the test)."""
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a tmpfs mount, which needs root (CI runs as root)")
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        where = short_tmpdir("ksi-tmpfs")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode:
            where.rmdir()
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        # Lazily if need be: a test that failed may still hold a file open on it.
        if subprocess.run(["umount", str(where)], check=False).returncode:
            subprocess.run(["umount", "-l", str(where)], check=True)
        where.rmdir()
