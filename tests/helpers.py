"""Test harness: a real daemon in a subprocess on a short socket path, plus small helpers."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import orjson

from daemon.claude.auth import CREDENTIAL_ENV

ROOT = Path(__file__).resolve().parent.parent
FAKE_CLAUDE = ROOT / "devtools" / "fake_claude.py"
# Set over the test process's environment: a CLI (and a daemon) with no credentials at all.
NO_CREDENTIALS = dict.fromkeys(CREDENTIAL_ENV, "")


def short_tmpdir(prefix: str = "ksi") -> Path:
    # AF_UNIX paths are limited to ~107 bytes; pytest's tmp_path can be longer.
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp"))


def _poll(pred: Callable[[], Any], deadline: float, timeout: float) -> Any:
    """One look at ``pred``: its value, falsy while there is time left, else TimeoutError."""
    value = pred()
    if not value and time.monotonic() > deadline:
        raise TimeoutError(f"condition not met within {timeout}s")
    return value


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := _poll(pred, deadline, timeout)):
        time.sleep(interval)
    return value


async def eventually(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """:func:`wait_for` for async tests: the test's loop keeps running between polls."""
    deadline = time.monotonic() + timeout
    # Polled: the condition lives in a daemon (a thread or a process), with no event to await.
    while not (value := _poll(pred, deadline, timeout)):  # noqa: ASYNC110
        await asyncio.sleep(interval)
    return value


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def raw_exchange(path: Path, data: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes on a fresh connection without half-closing; read until the daemon closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(data)
        chunks = []
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


class DaemonProcess:
    """``python daemon.py`` with its own socket, state and log dirs, driven from a test."""

    def __init__(
        self,
        base: Path | None = None,
        *,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        claude_bin: Path | None = FAKE_CLAUDE,
        preload: bool = False,
        defaults: bool = False,
    ) -> None:
        """``defaults``: the daemon's own warm defaults (warm turns, a pre-warmed CLI). Else
        turns are cold unless a test asks for warm ones: most tests here are about one CLI
        run per turn, and a pool process would be one more CLI in every count."""
        self.base = base or short_tmpdir()
        self.owns_base = base is None
        self.socket = self.base / "s" / "d.sock"
        self.state_dir = self.base / "state"
        self.log_dir = self.base / "logs"
        self.work = self.base / "work"  # cwd for turns; CLI sessions are scoped to it
        self.work.mkdir(parents=True, exist_ok=True)
        self.config_dir = self.base / "claude-config"
        self.fake_log = self.base / "fake_claude.jsonl"
        self.args = args or []
        # What this daemon's environment sets over the test process's own.
        self.env_overrides = {
            "CLAUDE_CONFIG_DIR": str(self.config_dir),
            # The fake CLI ignores it; HEALTH_CHECK reports a CLI without credentials.
            "ANTHROPIC_API_KEY": "fake-key",
            "FAKE_CLAUDE_LOG": str(self.fake_log),
            "KSI_LITELLM_PRELOAD": "true" if preload else "false",
            # Transient API errors are retried (3 times, from 1 s by default): tests of
            # error mapping need not wait for the production backoff.
            "KSI_API_RETRY_BASE_S": "0.01",
        }
        if not defaults:
            self.env_overrides["KSI_WARM_DEFAULT"] = "false"
        if claude_bin is not None:
            self.env_overrides["KSI_CLAUDE_BIN"] = str(claude_bin)
        self.env_overrides.update(env or {})
        self.env = {k: v for k, v in os.environ.items() if k != "CLAUDECODE"}
        self.env.update(self.env_overrides)
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr_path = self.base / "daemon.stderr"

    def flags(self) -> list[str]:
        """The daemon's command line after ``daemon.py``."""
        return [
            "--socket",
            str(self.socket),
            "--state-dir",
            str(self.state_dir),
            "--log-dir",
            str(self.log_dir),
            "--log-format",
            "json",
            *self.args,
        ]

    def start(self, timeout: float = 15.0) -> DaemonProcess:
        cmd = [sys.executable, str(ROOT / "daemon.py"), *self.flags()]
        self._close_stdout()  # a restart: the earlier run's pipe
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                cmd,
                cwd=str(self.work),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        wait_for(self._healthy, timeout)
        return self

    def ended(self) -> str | None:
        """Why the daemon is no longer running, if it ended (None while it runs)."""
        if self.proc is not None and self.proc.poll() is not None:
            return f"daemon exited with {self.proc.returncode}"
        return None

    def _healthy(self) -> bool:
        if (why := self.ended()) is not None:
            raise RuntimeError(f"{why}:\n{self.stderr()}")
        try:
            return self.call("HEALTH_CHECK")["status"] == "success"
        except OSError:
            return False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        """Wait for the daemon to end by itself (SHUTDOWN); its exit code."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    @property
    def serving_pid(self) -> int:
        """The pid the daemon reports (HEALTH_CHECK's ``pid``)."""
        return self.pid

    def request(
        self, command: str, params: dict[str, Any] | None = None, **envelope: Any
    ) -> dict[str, Any]:
        line = {"command": command, "parameters": params or {}, **envelope}
        reply = raw_exchange(self.socket, orjson.dumps(line) + b"\n", timeout=120)
        result: dict[str, Any] = orjson.loads(reply)
        return result

    def call(self, command: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.request(command, params)

    def result(self, command: str, params: dict[str, Any] | None = None) -> Any:
        reply = self.call(command, params)
        assert reply["status"] == "success", reply
        return reply["result"]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def _close_stdout(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stderr().splitlines():
            if line.startswith("{"):
                out.append(orjson.loads(line))
        return out

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        self._close_stdout()
        if self.owns_base:
            shutil.rmtree(self.base, ignore_errors=True)


def fill(directory: Path) -> Path:
    """Fill the file system holding ``directory`` up to the last byte."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    block = b"\0" * 65536
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(block) == 1:
                    break
                block = block[: len(block) // 2]
    finally:
        os.close(fd)
    assert os.statvfs(directory).f_bavail == 0
    return filler


def spawn(d: DaemonProcess, **params: Any) -> dict[str, Any]:
    """SPAWN on ``d``, in its work directory unless ``cwd`` is given."""
    params.setdefault("cwd", str(d.work))
    return d.call("SPAWN", params)


class PublishedSchemas:
    """The parameter and result schemas a daemon publishes (GET_COMMANDS with
    ``include_results``), per command, to check live replies against."""

    def __init__(self, d: DaemonProcess) -> None:
        listing = d.result("GET_COMMANDS", {"include_results": True})["commands"]
        self.specs = {c["command"]: c for c in listing}
        self.params = {
            n: jsonschema.Draft202012Validator(c["parameters"]) for n, c in self.specs.items()
        }
        self.results = {
            n: jsonschema.Draft202012Validator(c["result"]) for n, c in self.specs.items()
        }

    def ok(self, d: DaemonProcess, command: str, params: dict[str, Any] | None = None) -> Any:
        """A success reply's result, validated against the published result schema."""
        reply = d.call(command, params)
        assert reply["status"] == "success", reply
        self.results[command].validate(reply["result"])
        return reply["result"]


def error_of(reply: dict[str, Any], code: str) -> dict[str, Any]:
    """The error of an error reply with this code (and a message)."""
    assert reply["status"] == "error", reply
    assert reply["error"]["code"] == code, reply
    assert reply["error"]["message"]
    error: dict[str, Any] = reply["error"]
    return error
