"""Fixtures for end-to-end tests that drive the real pinned Claude Code CLI offline.

Every test under ``tests/e2e`` gets the ``e2e`` marker automatically (``-m "not e2e"`` skips
them). The CLI never leaves the machine: ``claude_env`` points it at a loopback ``StubAPI``
and switches off every non-essential network call (see claude-cli.md §2).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from devtools.stub_api import OFFLINE_CLI_ENV, StubAPI
from tests.helpers import DaemonProcess

PROJECT_ROOT = Path(__file__).resolve().parents[2]
E2E_DIR = Path(__file__).resolve().parent


RunClaude = Callable[..., "subprocess.CompletedProcess[str]"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items, not only this directory's, hence the path check.
    for item in items:
        if item.path.is_relative_to(E2E_DIR):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def real_claude_bin() -> Path:
    """Path of the pinned CLI (``$KSI_CLAUDE_BIN`` or ``node_modules/.bin/claude``)."""
    override = os.environ.get("KSI_CLAUDE_BIN")
    path = Path(override) if override else PROJECT_ROOT / "node_modules" / ".bin" / "claude"
    if path.is_file() and os.access(path, os.X_OK):
        return path
    # In CI a missing CLI is a broken setup, not a reason to pass quietly.
    if os.environ.get("CI") == "true":
        pytest.fail(f"real Claude Code CLI not found at {path}; CI must run `npm ci` first")
    pytest.skip("real Claude Code CLI not installed; run `npm ci`")


@pytest.fixture
def stub_api() -> Iterator[StubAPI]:
    """A fresh loopback stub of the Messages API for one test."""
    with StubAPI() as api:
        yield api


@pytest.fixture
def claude_env(stub_api: StubAPI, tmp_path: Path) -> dict[str, str]:
    """Environment for a CLI child: offline, pointed at ``stub_api``, own config dir.

    HOME is left alone; ``CLAUDE_CONFIG_DIR`` alone isolates sessions and ``.claude.json``.
    ``CLAUDECODE`` is dropped so a test run from inside Claude Code does not look nested.
    """
    env = {k: v for k, v in os.environ.items() if k != "CLAUDECODE"}
    env.update(OFFLINE_CLI_ENV)
    env["ANTHROPIC_BASE_URL"] = stub_api.url
    config_dir = tmp_path / "claude-config"
    config_dir.mkdir()
    env["CLAUDE_CONFIG_DIR"] = str(config_dir)
    return env


@pytest.fixture
def claude_cwd(tmp_path: Path) -> Path:
    """Working directory for CLI children; sessions are scoped to it (claude-cli.md §5)."""
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture
def run_claude(real_claude_bin: Path, claude_env: dict[str, str], claude_cwd: Path) -> RunClaude:
    """Run one ``claude`` process to completion: ``run_claude(args, prompt, timeout=30)``.

    The prompt goes on stdin and stdin is then closed, so the CLI never waits the 3 s it gives
    an open, silent stdin.
    """

    def run(
        args: Sequence[str], prompt: str = "", *, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(real_claude_bin), *args],
            input=prompt,
            capture_output=True,
            text=True,
            cwd=claude_cwd,
            env=claude_env,
            timeout=timeout,
            check=False,
        )

    return run


@pytest.fixture
def start_real_daemon(
    real_claude_bin: Path, claude_env: dict[str, str], claude_cwd: Path
) -> Iterator[Callable[..., DaemonProcess]]:
    """``start_real_daemon(**extra_env)``: a daemon driving the real CLI against ``stub_api``,
    with ``claude_cwd`` as its work dir; stopped (and checked for leftovers) at teardown."""
    started: list[DaemonProcess] = []

    def start(**extra_env: str) -> DaemonProcess:
        d = DaemonProcess(claude_bin=real_claude_bin, env={**claude_env, **extra_env}, preload=True)
        d.work = claude_cwd
        started.append(d)
        return d.start()

    yield start
    for d in started:
        d.cleanup()
