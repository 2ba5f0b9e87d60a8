"""Start, watch and stop the processes a benchmark needs: the daemon, floor servers, the
stub API, and the instant fake CLI.

Every process is started here, remembered by pid, and stopped by that pid (SIGTERM, then
SIGKILL) when the run ends, however it ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from bench.core import REAL_CLAUDE, ROOT, VENV_PY, Run
from bench.wire import LineConn, request_line, wait_accepting
from devtools.stub_api import OFFLINE_CLI_ENV

HEALTH = request_line("HEALTH_CHECK")

# A fake `claude` that costs one /bin/sh exec: it prints a valid result object and exits, so
# the floor of P1/P8 is process creation, not the ~30 ms interpreter start of devtools' fake.
INSTANT_FAKE = """#!/bin/sh
# Instant fake Claude CLI for benchmarks: one valid result object, nothing else.
case "$1" in --version) echo "2.1.197 (Claude Code)"; exit 0;; esac
echo '{"type":"result","subtype":"success","is_error":false,"duration_ms":1,\
"duration_api_ms":0,"num_turns":1,"result":"ok","stop_reason":"end_turn","session_id":"",\
"total_cost_usd":0.0001,"usage":{"input_tokens":3,"output_tokens":1},"permission_denials":[]}'
"""


# The instant fake answers one turn and exits, as a cold `claude -p` does: daemons that run it
# (P1, P3-P8) keep warm mode off, and measure the per-turn exec path their floors exec too.
COLD = {"KSI_WARM_DEFAULT": "false"}


def short_dir(prefix: str) -> Path:
    """A fresh directory under /tmp (AF_UNIX paths must stay under ~107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=f"kb-{prefix}-", dir="/tmp"))


def instant_fake(run: Run) -> Path:
    def make() -> Path:
        path = run.workdir / "instant-claude"
        path.write_text(INSTANT_FAKE)
        path.chmod(0o755)
        return path

    path: Path = run.shared("instant_fake", make)
    return path


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CLAUDECODE" and not k.startswith("KSI_")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def stop_pid(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int | None:
    """SIGTERM this process (by its pid), wait, SIGKILL if it does not go."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` from /proc/<pid>/status (VmRSS, kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class DaemonHandle:
    """A daemon subprocess with its own socket, state, logs and work dir."""

    base: Path
    proc: subprocess.Popen[bytes]
    started_at: float  # perf_counter just before Popen
    env: dict[str, str] = field(repr=False)

    @property
    def socket(self) -> Path:
        return self.base / "s" / "d.sock"

    @property
    def work(self) -> Path:
        return self.base / "work"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kb(self) -> int:
        return rss_kb(self.pid)

    def health(self) -> dict[str, object]:
        conn = LineConn(self.socket)
        try:
            reply: dict[str, object] = orjson.loads(conn.request(HEALTH))["result"]
            return reply
        finally:
            conn.close()

    def wait_accepting(self, timeout: float = 30.0, interval: float = 0.001) -> float:
        self._check_alive()
        return wait_accepting(self.socket, timeout, HEALTH, interval)

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.02) -> float:
        """Poll HEALTH_CHECK until litellm.status is ready; return the perf_counter time."""
        deadline = time.perf_counter() + timeout
        while True:
            self._check_alive()
            with contextlib.suppress(OSError):
                status = self.health()["litellm"]
                assert isinstance(status, dict)
                if status.get("status") == "ready":
                    return time.perf_counter()
                if status.get("status") == "failed":
                    raise RuntimeError(f"daemon could not load LiteLLM: {status}")
            if time.perf_counter() > deadline:
                raise TimeoutError("daemon did not become SPAWN-ready")
            time.sleep(interval)

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            err = (self.base / "daemon.stderr").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{err}")

    def stop(self) -> int | None:
        return stop_pid(self.proc)

    def log_tail(self, n: int = 3000) -> str:
        path = self.base / "daemon.stderr"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""


def start_daemon(
    run: Run,
    *,
    claude_bin: Path | None,
    env: dict[str, str] | None = None,
    preload: bool = True,
    wait: str = "ready",
    args: list[str] | None = None,
    root: Path | None = None,
) -> DaemonHandle:
    """Start ``python daemon.py`` on a short socket; wait for ``accepting`` or ``ready``.

    ``root`` is the project tree whose ``daemon.py`` runs (default ``run.daemon_root``).
    """
    base = short_dir("d")
    (base / "work").mkdir()
    full_env = base_env()
    full_env.update(
        {
            "KSI_LITELLM_PRELOAD": "true" if preload else "false",
            "CLAUDE_CONFIG_DIR": str(base / "claude-config"),
        }
    )
    if claude_bin is not None:
        full_env["KSI_CLAUDE_BIN"] = str(claude_bin)
    full_env.update(env or {})
    daemon_py = (root or run.daemon_root) / "daemon.py"
    cmd = [
        str(VENV_PY),
        str(daemon_py),
        "--socket",
        str(base / "s" / "d.sock"),
        "--state-dir",
        str(base / "state"),
        "--log-dir",
        str(base / "logs"),
        "--log-format",
        "json",
        *(args or []),
    ]
    with open(base / "daemon.stderr", "ab") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            cwd=base / "work",
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    handle = DaemonHandle(base, proc, started, full_env)

    def cleanup() -> None:
        handle.stop()
        shutil.rmtree(base, ignore_errors=True)

    run.on_exit(cleanup)
    if wait == "accepting":
        handle.wait_accepting()
    elif wait == "ready":
        handle.wait_accepting()
        handle.wait_ready()
    return handle


@dataclass
class ServerHandle:
    socket: Path
    proc: subprocess.Popen[bytes]

    def stop(self) -> int | None:
        return stop_pid(self.proc)


def start_floor(
    run: Run,
    mode: str,
    *,
    replies: list[tuple[bytes, bytes]] | None = None,
    fake: Path | None = None,
) -> ServerHandle:
    """Start a :mod:`bench.floor_server` process and wait until it answers."""
    base = short_dir("f")
    sock = base / "f.sock"
    cmd = [str(VENV_PY), "-m", "bench.floor_server", "--socket", str(sock), "--mode", mode]
    if replies:
        path = base / "replies.json"
        path.write_bytes(orjson.dumps([[a.decode(), b.decode()] for a, b in replies]))
        cmd += ["--replies", str(path)]
    if fake is not None:
        cmd += ["--fake", str(fake)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=base_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    handle = ServerHandle(sock, proc)

    def cleanup() -> None:
        handle.stop()
        shutil.rmtree(base, ignore_errors=True)

    run.on_exit(cleanup)
    deadline = time.monotonic() + 20
    while True:  # the socket file appears at bind(), a moment before listen()
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(sock))
            break
        if proc.poll() is not None:
            raise RuntimeError(f"floor server ({mode}) exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"floor server ({mode}) did not start")
        time.sleep(0.005)
    return handle


@dataclass
class StubHandle:
    url: str
    proc: subprocess.Popen[bytes]


def start_stub_api(run: Run) -> StubHandle:
    """The loopback stub Messages API (devtools.stub_api) in its own process."""
    port, proc = start_loopback_server(
        run, "stub API", ["-m", "devtools.stub_api", "--port", "0", "--quiet", "--port-file"]
    )
    return StubHandle(f"http://127.0.0.1:{port}", proc)


def start_loopback_server(
    run: Run, name: str, args: list[str]
) -> tuple[int, subprocess.Popen[bytes]]:
    """``python *args PORT_FILE``: a server that binds a loopback port and writes it to
    PORT_FILE; wait for that and return the port (it is stopped when the run ends)."""
    base = short_dir("srv")
    port_file = base / "port"
    proc = subprocess.Popen(
        [str(VENV_PY), *args, str(port_file)],
        cwd=ROOT,
        env=base_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def cleanup() -> None:
        stop_pid(proc)
        shutil.rmtree(base, ignore_errors=True)

    run.on_exit(cleanup)
    deadline = time.monotonic() + 20
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} did not start")
        time.sleep(0.01)
    return int(port_file.read_text().strip()), proc


def real_cli_missing() -> str | None:
    """Why the real CLI cannot be benchmarked, or None if it can."""
    if not (REAL_CLAUDE.exists() and os.access(REAL_CLAUDE, os.X_OK)):
        return f"real Claude CLI not installed at {REAL_CLAUDE} (run `npm ci`)"
    return None


def cold_real_cli_daemon(run: Run) -> DaemonHandle:
    """A daemon on the real CLI against a fresh stub API, with no pre-warmed CLI: for
    benchmarks that compare its cold turns with a bare CLI run in the same environment
    (the handle's ``env`` is what the daemon's CLI children see)."""
    stub = start_stub_api(run)
    env = {**OFFLINE_CLI_ENV, "ANTHROPIC_BASE_URL": stub.url, "KSI_WARM_POOL_SIZE": "0"}
    return start_daemon(run, claude_bin=REAL_CLAUDE, env=env)


def fake_daemon(run: Run) -> DaemonHandle:
    """The run's shared daemon on the instant fake CLI (concurrency cap 4), SPAWN-ready."""

    def make() -> DaemonHandle:
        env = {**COLD, "KSI_MAX_CONCURRENCY": "4"}
        return start_daemon(run, claude_bin=instant_fake(run), env=env)

    handle: DaemonHandle = run.shared("fake_daemon", make)
    return handle
