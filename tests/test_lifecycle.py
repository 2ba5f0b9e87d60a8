"""Start-up, restart, signals, the pid-file lock, permissions, and the `nc -U` one-liner."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from daemon.state.db import SCHEMA_VERSION
from tests.helpers import ROOT, DaemonProcess, pid_alive, raw_exchange, short_tmpdir, wait_for


@pytest.fixture
def base() -> Iterator[Path]:
    path = short_tmpdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def pid_file(d: DaemonProcess) -> Path:
    return d.socket.with_suffix(".pid")


def publish(d: DaemonProcess, event_type: str, payload: dict | None = None) -> int:
    seq: int = d.result("PUBLISH", {"event_type": event_type, "payload": payload or {}})["seq"]
    return seq


# -- persistence -------------------------------------------------------------------------------


def test_state_survives_a_restart(base: Path) -> None:
    d = DaemonProcess(base).start()
    try:
        values = {"p/int": 1, "p/null": None, "p/obj": {"a": [1, "b", None]}, "p/str": "é"}
        for key, value in values.items():
            d.result("SET_SHARED", {"key": key, "value": value})
        d.result("SET_SHARED", {"key": "p/deleted", "value": 1})
        d.result("DELETE_SHARED", {"key": "p/deleted"})
        agent = d.result(
            "REGISTER_AGENT",
            {"agent_id": "keeper", "role": "r", "capabilities": "a,b", "metadata": {"m": 1}},
        )["agent"]
        d.result("REGISTER_AGENT", {"agent_id": "leaver", "role": "tester"})
        d.result("UNREGISTER_AGENT", {"agent_id": "leaver"})
        custom = [publish(d, "KEEP_ME", {"i": i}) for i in range(5)]
        # Fire-and-forget history writes right before the signal are flushed on the way out.
        burst = b"".join(
            orjson.dumps(
                {
                    "command": "PUBLISH",
                    "id": i,
                    "parameters": {"event_type": "BURST", "payload": {"i": i}},
                }
            )
            + b"\n"
            for i in range(200)
        )
        out = _pipelined(d, burst, 200)
        last_seq = max(r["result"]["seq"] for r in out)
        before = d.result("GET_EVENTS", {"limit": 1000})
        assert d.stop() == 0

        d.start()
        assert d.result("LIST_SHARED", {"prefix": "p/"})["keys"] == sorted(values)
        for key, value in values.items():
            got = d.result("GET_SHARED", {"key": key})
            assert got["found"] is True
            assert got["value"] == value
        assert d.result("GET_SHARED", {"key": "p/deleted"})["found"] is False
        agents = d.result("GET_AGENTS")["agents"]
        assert list(agents) == ["keeper"]
        assert agents["keeper"] == agent  # same role, capabilities, metadata and timestamps

        after = d.result("GET_EVENTS", {"limit": 1000})
        assert after["events"] == before["events"]
        assert (
            d.result("GET_EVENTS", {"event_types": ["KEEP_ME"]})["events"][-1]["seq"] == custom[-1]
        )
        burst_events = d.result("GET_EVENTS", {"event_types": ["BURST"], "limit": 1000})
        assert [e["data"]["i"] for e in burst_events["events"]] == list(range(200))
        health = d.result("HEALTH_CHECK")
        assert health["counts"]["last_seq"] == last_seq
        assert health["counts"]["shared_keys"] == len(values)
        # seq continues, monotonic, after the restart.
        assert publish(d, "AFTER_RESTART") == last_seq + 1
        assert publish(d, "AFTER_RESTART") == last_seq + 2
    finally:
        d.cleanup()


def _pipelined(d: DaemonProcess, lines: bytes, n: int) -> list[dict]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(d.socket))
        s.sendall(b'{"command":"CONNECT"}\n' + lines)
        buf = b""
        while buf.count(b"\n") < n + 1:
            chunk = s.recv(1 << 20)
            assert chunk, "daemon closed early"
            buf += chunk
    replies = [orjson.loads(x) for x in buf.splitlines()[1:]]
    assert all(r["status"] == "success" for r in replies)
    return replies


def test_acknowledged_writes_survive_sigkill(base: Path) -> None:
    d = DaemonProcess(base).start()
    try:
        d.result("SET_SHARED", {"key": "durable", "value": [1, 2, 3]})
        d.result("REGISTER_AGENT", {"agent_id": "durable-agent", "role": "tester"})
        old_pid = d.pid
        assert d.stop(signal.SIGKILL) == -signal.SIGKILL
        # A crash leaves the socket and pid file behind ...
        assert d.socket.exists()
        assert pid_file(d).exists()
        assert pid_file(d).read_text().strip() == str(old_pid)

        d.start()  # ... and the next start cleans them up
        assert pid_file(d).read_text().strip() == str(d.pid) != str(old_pid)
        assert any(e["event"] == "daemon.stale_socket_removed" for e in d.log_events())
        assert d.result("GET_SHARED", {"key": "durable"})["value"] == [1, 2, 3]
        assert list(d.result("GET_AGENTS")["agents"]) == ["durable-agent"]
    finally:
        d.cleanup()


def test_stale_files_without_a_previous_daemon(base: Path) -> None:
    sock = base / "s" / "d.sock"
    sock.parent.mkdir(mode=0o700)
    sock.write_text("not a socket")
    sock.with_suffix(".pid").write_text("999999\n")
    d = DaemonProcess(base).start()
    try:
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert pid_file(d).read_text().strip() == str(d.pid)
    finally:
        d.cleanup()


def test_second_instance_refuses_while_first_is_healthy(base: Path) -> None:
    first = DaemonProcess(base).start()
    try:
        second = DaemonProcess(base, env={"KSI_LOG_FORMAT": "json"})
        cmd = [
            sys.executable,
            str(ROOT / "daemon.py"),
            "--socket",
            str(second.socket),
            "--state-dir",
            str(base / "other-state"),
            "--log-dir",
            str(second.log_dir),
        ]
        started = time.monotonic()
        proc = subprocess.run(
            cmd,
            env=second.env,
            capture_output=True,
            timeout=20,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert time.monotonic() - started < 10
        assert proc.returncode == 1
        err = proc.stderr.decode()
        assert f"another daemon (pid {first.pid}) is running and healthy" in err
        assert str(first.socket) in err
        assert proc.stdout == b""
        # The first one is untouched: socket, pid file and health.
        assert first.socket.exists()
        assert pid_file(first).read_text().strip() == str(first.pid)
        assert first.result("HEALTH_CHECK")["status"] == "healthy"
        assert not (base / "other-state").exists()
    finally:
        first.cleanup()


def test_second_instance_refuses_while_first_holds_the_lock_but_hangs(base: Path) -> None:
    first = DaemonProcess(base).start()
    try:
        os.kill(first.pid, signal.SIGSTOP)  # alive, holding the pid-file lock, not answering
        try:
            cmd = [
                sys.executable,
                str(ROOT / "daemon.py"),
                "--socket",
                str(first.socket),
                "--state-dir",
                str(base / "other-state"),
            ]
            proc = subprocess.run(
                cmd,
                env=first.env,
                capture_output=True,
                timeout=20,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert proc.returncode == 1
        assert b"holds the lock but does not answer" in proc.stderr
        # Its socket was not taken away from it.
        assert first.result("HEALTH_CHECK")["status"] == "healthy"
        assert pid_file(first).read_text().strip() == str(first.pid)
    finally:
        first.cleanup()


# -- signals and SHUTDOWN ----------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_gives_a_clean_exit(base: Path, sig: int) -> None:
    d = DaemonProcess(base).start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sub:
            sub.settimeout(5)
            sub.connect(str(d.socket))
            sub.sendall(b'{"command":"SUBSCRIBE","parameters":{"event_types":["*"]}}\n')
            assert orjson.loads(sub.recv(65536))["status"] == "success"
            pid = d.pid
            assert d.stop(sig, timeout=10) == 0
            assert sub.recv(65536) == b""  # the daemon closed the persistent connection
        assert not pid_alive(pid)
        assert not d.socket.exists()
        assert not pid_file(d).exists()
        reasons = [e.get("reason") for e in d.log_events() if e["event"] == "daemon.shutting_down"]
        assert reasons == [signal.Signals(sig).name]
        assert d.log_events()[-1]["event"] == "daemon.stopped"
        assert "Traceback" not in d.stderr()
    finally:
        d.cleanup()


# -- permissions -------------------------------------------------------------------------------


def test_socket_and_dir_permissions(base: Path) -> None:
    sock_dir = base / "s"
    sock_dir.mkdir(mode=0o755)
    os.chmod(sock_dir, 0o755)  # a pre-existing, too-open directory is tightened
    d = DaemonProcess(base).start()
    try:
        assert stat.S_IMODE(sock_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE(d.socket.stat().st_mode) == 0o600
        assert stat.S_IMODE(pid_file(d).stat().st_mode) == 0o600
        assert stat.S_ISSOCK(d.socket.stat().st_mode)
    finally:
        d.cleanup()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_peer_with_another_uid_is_refused(base: Path) -> None:
    d = DaemonProcess(base).start()
    try:
        # Open the file-system gate so that only the SO_PEERCRED check stands in the way.
        os.chmod(base, 0o755)  # mkdtemp made it 0700
        os.chmod(d.socket.parent, 0o755)
        os.chmod(d.socket, 0o666)
        read_fd, write_fd = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child
            try:
                os.close(read_fd)
                os.setgid(65534)
                os.setuid(65534)
                replies = []
                # Several tries: the request reaching the daemon before or after it answers
                # are both common, and the error line must arrive in either case.
                for _ in range(8):
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                        s.settimeout(5)
                        s.connect(str(d.socket))
                        try:  # the daemon may already have answered and closed
                            s.sendall(b'{"command":"GET_SHARED","parameters":{"key":"x"}}\n')
                        except BrokenPipeError:
                            pass
                        data = b""
                        while chunk := s.recv(65536):
                            data += chunk
                        replies.append(data.decode())
                os.write(write_fd, orjson.dumps({"uid": os.getuid(), "replies": replies}))
            except BaseException as exc:
                os.write(write_fd, orjson.dumps({"exc": repr(exc)}))
            finally:
                os._exit(0)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as r:
            report = orjson.loads(r.read())
        os.waitpid(child, 0)
        assert "exc" not in report, report
        assert report["uid"] == 65534
        for data in report["replies"]:
            lines = data.splitlines()
            assert len(lines) == 1  # one error line, then the daemon closed
            reply = orjson.loads(lines[0])
            assert reply["status"] == "error"
            assert reply["error"]["code"] == "PERMISSION_DENIED"
            assert "65534" in reply["error"]["message"]
        refused = [e for e in d.log_events() if e["event"] == "connection.refused"]
        assert refused
        assert refused[-1]["peer_uid"] == 65534
        assert refused[-1]["peer_pid"] == child
        # Our own uid (root here) is still served.
        assert d.result("HEALTH_CHECK")["status"] == "healthy"
    finally:
        d.cleanup()


# -- the nc -U one-liner ------------------------------------------------------------------------


def test_raw_socket_that_never_half_closes_gets_one_reply(base: Path) -> None:
    d = DaemonProcess(base).start()
    try:
        for _ in range(3):
            started = time.monotonic()
            out = raw_exchange(d.socket, b'{"command":"HEALTH_CHECK"}\n', timeout=5)
            assert time.monotonic() - started < 5
            assert out.count(b"\n") == 1
            assert out.endswith(b"\n")
            assert orjson.loads(out)["result"]["status"] == "healthy"
    finally:
        d.cleanup()


@pytest.mark.parametrize("tool", ["nc", "socat"])
def test_shell_one_liner(base: Path, tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")
    d = DaemonProcess(base).start()
    try:
        target = f"nc -U {d.socket}" if tool == "nc" else f"socat - UNIX-CONNECT:{d.socket}"
        started = time.monotonic()
        proc = subprocess.run(
            ["sh", "-c", f'echo \'{{"command":"HEALTH_CHECK"}}\' | {target}'],
            capture_output=True,
            timeout=5,
            check=False,
        )
        assert time.monotonic() - started < 5
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert len(lines) == 1, proc.stdout
        reply = orjson.loads(lines[0])
        assert reply["status"] == "success"
        assert reply["result"]["status"] == "healthy"
    finally:
        d.cleanup()


# -- configuration -----------------------------------------------------------------------------


def _launch(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KSI_")}
    full_env.update({"KSI_LITELLM_PRELOAD": "false", **env})
    return subprocess.Popen(
        [sys.executable, str(ROOT / "daemon.py"), *args],
        cwd=str(cwd),
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _health(sock: Path) -> dict | None:
    try:
        reply = orjson.loads(raw_exchange(sock, b'{"command":"HEALTH_CHECK"}\n', timeout=2))
    except (OSError, ValueError):
        return None
    result: dict = reply["result"]
    return result


def _stop(proc: subprocess.Popen[bytes]) -> tuple[int, bytes]:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    return proc.returncode, err


def test_environment_variables_are_honoured(base: Path) -> None:
    sock = base / "env-sock" / "k.sock"
    env = {
        "KSI_SOCKET": str(sock),
        "KSI_STATE_DIR": str(base / "env-state"),
        "KSI_LOG_DIR": str(base / "env-logs"),
        "KSI_LOG_LEVEL": "WARNING",
        "KSI_LOG_FORMAT": "json",
        "KSI_MAX_LINE_BYTES": "2048",
        "KSI_CLAUDE_BIN": str(ROOT / "devtools" / "fake_claude.py"),
    }
    proc = _launch([], env, base)
    try:
        health = wait_for(lambda: _health(sock), 15)
        assert health["socket"] == str(sock)
        assert health["pid"] == proc.pid
        assert (base / "env-state" / "ksi.sqlite3").exists()
        assert sock.with_suffix(".pid").exists()
        too_long = b'{"command":"HEALTH_CHECK","pad":"' + b"x" * 3000 + b'"}\n'
        reply = orjson.loads(raw_exchange(sock, too_long, timeout=5))
        assert reply["error"] == {
            "code": "LINE_TOO_LONG",
            "message": reply["error"]["message"],
            "details": {"limit_bytes": 2048},
        }
    finally:
        rc, err = _stop(proc)
    assert rc == 0
    # KSI_LOG_LEVEL=WARNING: the LINE_TOO_LONG warning is logged, info lines are not.
    events = [orjson.loads(x) for x in err.splitlines() if x.startswith(b"{")]
    assert any(e["event"] == "request.rejected" for e in events)
    assert not [e for e in events if e["level"] == "info"]
    assert not sock.exists()


def test_flags_override_environment(base: Path) -> None:
    env_sock = base / "e" / "env.sock"
    flag_sock = base / "f" / "flag.sock"
    env = {
        "KSI_SOCKET": str(env_sock),
        "KSI_STATE_DIR": str(base / "env-state"),
        "KSI_LOG_LEVEL": "WARNING",
    }
    proc = _launch(
        [
            "--socket",
            str(flag_sock),
            "--state-dir",
            str(base / "flag-state"),
            "--log-level",
            "INFO",
            "--log-format",
            "json",
        ],
        env,
        base,
    )
    try:
        health = wait_for(lambda: _health(flag_sock), 15)
        assert health["socket"] == str(flag_sock)
        assert not env_sock.exists()
        assert (base / "flag-state" / "ksi.sqlite3").exists()
        assert not (base / "env-state").exists()
    finally:
        rc, err = _stop(proc)
    assert rc == 0
    events = [orjson.loads(x) for x in err.splitlines() if x.startswith(b"{")]
    assert any(e["event"] == "daemon.ready" for e in events)  # --log-level INFO won


def test_relative_paths_resolve_against_the_project_root(base: Path) -> None:
    """Started from another directory, a relative --state-dir still lands in the project."""
    rel_state = Path("state") / f"test-{base.name}"
    sock = base / "s" / "rel.sock"
    state_existed = (ROOT / "state").exists()
    proc = _launch(["--socket", str(sock), "--state-dir", str(rel_state)], {}, base)
    try:
        wait_for(lambda: _health(sock), 15)
        assert (ROOT / rel_state / "ksi.sqlite3").exists()
        assert not (base / rel_state).exists()
    finally:
        rc, err = _stop(proc)
        shutil.rmtree(ROOT / rel_state, ignore_errors=True)
        if not state_existed:
            with contextlib.suppress(OSError):
                (ROOT / "state").rmdir()  # only if the test left it empty
    assert rc == 0
    # No --log-format and stderr is not a terminal: structlog writes JSON lines.
    lines = err.splitlines()
    assert lines
    assert all(orjson.loads(line)["event"] for line in lines)
    assert {"daemon.ready", "daemon.stopped"} <= {orjson.loads(x)["event"] for x in lines}


def test_newer_state_schema_refuses_to_start(base: Path) -> None:
    import sqlite3

    state = base / "state"
    state.mkdir()
    conn = sqlite3.connect(state / "ksi.sqlite3")
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 5}")
    conn.commit()
    conn.close()
    d = DaemonProcess(base)
    cmd = [
        sys.executable,
        str(ROOT / "daemon.py"),
        "--socket",
        str(d.socket),
        "--state-dir",
        str(state),
        "--log-format",
        "json",
    ]
    proc = subprocess.run(
        cmd, env=d.env, capture_output=True, timeout=20, check=False, stdin=subprocess.DEVNULL
    )
    assert proc.returncode != 0
    assert b"newer than this daemon" in proc.stderr
    assert not d.socket.exists()
    assert not pid_file(d).exists()


def test_seq_is_never_reused_after_a_crash() -> None:
    """Event rows are written without waiting; a SIGKILL may lose the newest, not their seqs."""
    d = DaemonProcess()
    try:
        d.start()
        seqs = [d.result("PUBLISH", {"event_type": "BEFORE_CRASH"})["seq"] for _ in range(5)]
        d.stop(signal.SIGKILL)
        d.start()
        after = d.result("PUBLISH", {"event_type": "AFTER_CRASH"})["seq"]
        assert after > seqs[-1]
        stored = d.result("GET_EVENTS", {"limit": 100})["events"]
        assert len({e["seq"] for e in stored}) == len(stored)
    finally:
        d.cleanup()


CHILD_WATCHER_PROBE = """
import asyncio, sys, threading
from daemon.app import use_pidfd_child_watcher

async def main():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(0.3)")
    threads = threading.active_count()  # sampled while the child runs
    return threads, await proc.wait()

chosen = use_pidfd_child_watcher()
print(chosen, *asyncio.run(main()))
"""


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.12+ picks the pidfd watcher itself")
def test_children_are_awaited_without_a_thread_each() -> None:
    """On 3.11 the daemon swaps the thread-per-child watcher for a pidfd one: the child is
    still reaped with its exit status, and no waitpid thread runs meanwhile."""
    if not hasattr(os, "pidfd_open"):
        pytest.skip("no pidfd_open on this platform")
    out = subprocess.run(
        [sys.executable, "-c", CHILD_WATCHER_PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert out == ["True", "1", "0"]


def test_systemd_readiness_and_stopping_notifications(make_daemon: Any) -> None:
    """Under a Type=notify unit: READY=1 once the socket answers, STOPPING=1 on SIGTERM."""
    where = short_tmpdir()  # AF_UNIX paths are short
    addr = str(where / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(addr)
        notify.settimeout(20)
        d = make_daemon(env={"NOTIFY_SOCKET": addr}, process=True)
        ready = notify.recv(4096).decode()
        assert ready.startswith("READY=1\n")
        assert f"serving on {d.socket}" in ready
        assert d.call("HEALTH_CHECK")["status"] == "success"  # ready meant answering
        d.stop()
        assert notify.recv(4096).decode() == "STOPPING=1"
    shutil.rmtree(where)
