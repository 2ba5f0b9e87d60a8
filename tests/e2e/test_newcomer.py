"""The README's first steps without credentials: ``./scripts/run --stub`` and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from daemon.client import SyncClient
from tests.e2e.conftest import PROJECT_ROOT
from tests.helpers import NO_CREDENTIALS, wait_for


def test_run_stub_answers_the_readme_commands(real_claude_bin: Path, tmp_path: Path) -> None:
    sock = tmp_path / "d.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KSI_")}
    env.update(NO_CREDENTIALS)  # a newcomer has none
    env["KSI_CLAUDE_BIN"] = str(real_claude_bin)
    flags = [
        "--socket",
        str(sock),
        "--state-dir",
        str(tmp_path / "state"),
        "--log-dir",
        str(tmp_path / "logs"),
    ]
    with (tmp_path / "stderr").open("wb") as stderr:
        proc = subprocess.Popen(
            [str(PROJECT_ROOT / "scripts" / "run"), "--stub", *flags],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        wait_for(lambda: sock.exists(), 60)
        health = SyncClient(sock, timeout=30).call("HEALTH_CHECK")
        assert (health["status"], health["claude"]["auth"]["source"]) == (
            "healthy",
            "ANTHROPIC_API_KEY",
        )
        cli = [sys.executable, "-m", "daemon.cli", "--socket", str(sock)]
        turn = subprocess.run(
            [*cli, "send", "SPAWN", "prompt=Say hi"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=PROJECT_ROOT,
        )
        assert turn.returncode == 0, turn.stdout + turn.stderr
        footer = turn.stdout.splitlines()[-1]
        assert footer.startswith("-- session ")
        session_id = footer.split()[2]
        # Turn 2, followed as it happens: warm by default, on the session's own CLI.
        again = subprocess.run(
            [*cli, "send", "SPAWN", "prompt=And again", f"session_id={session_id}", "--follow"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=PROJECT_ROOT,
        )
        assert again.returncode == 0, again.stdout + again.stderr
        assert again.stdout.splitlines()[0] == "echo: And again"
        assert again.stdout.splitlines()[-1].startswith(f"-- session {session_id} ")
        info = SyncClient(sock, timeout=30).call("GET_SESSION", {"session_id": session_id})
        assert info["session"]["turns"] == 2
        assert info["session"]["warm"]["turns"] == 2  # both turns on one warm CLI
        assert [p["warm"] for p in info["processes"]] == [True, True]
        assert "stub Anthropic API on http://127.0.0.1:" in (tmp_path / "stderr").read_text()
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
