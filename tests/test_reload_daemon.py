"""RELOAD_DAEMON (daemon/handover.py): a new daemon process takes over the socket and the state
while clients keep connecting, and a new process that fails to start leaves the old serving.

The daemon runs from an entry script in the test's directory (the "code on disk"), so a
test can break it before the reload the way a bad deploy would."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.helpers import ROOT, DaemonProcess, raw_exchange, wait_for

ENTRY = f"""import sys
sys.path.insert(0, {str(ROOT)!r})
from daemon.app import main
raise SystemExit(main(sys.argv[1:]))
"""


class EntryDaemon(DaemonProcess):
    """A daemon process started from ``entry`` instead of the project's daemon.py."""

    def __init__(self, entry: Path) -> None:
        super().__init__()
        self.entry = entry

    def start(self, timeout: float = 15.0) -> DaemonProcess:
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(self.entry), *self.flags()],
                cwd=str(self.work),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        wait_for(self._healthy, timeout)
        return self


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[EntryDaemon]:
    entry = tmp_path / "entry.py"
    entry.write_text(ENTRY)
    d = EntryDaemon(entry)
    d.start()
    started = {d.pid}
    yield d
    # The successors this test caused: end them by the pid they report.
    with contextlib.suppress(OSError, KeyError, AssertionError):
        started.add(d.result("HEALTH_CHECK")["pid"])
    for pid in started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    d.cleanup()


def _health(d: DaemonProcess) -> dict[str, Any]:
    reply: dict[str, Any] = d.result("HEALTH_CHECK")
    return reply


def test_a_new_process_takes_over_without_refusing_a_client(daemon: EntryDaemon) -> None:
    d = daemon
    old_pid = _health(d)["pid"]
    d.result("SET_SHARED", {"key": "kept", "value": [1, 2]})
    queued = d.result("SPAWN", {"prompt": "[[sleep:1]] in flight", "mode": "async"})
    failures: list[str] = []
    answered: list[int] = []
    stop = threading.Event()

    def hammer() -> None:  # a new connection each time, as `nc -U` would
        while not stop.is_set():
            try:
                line = raw_exchange(d.socket, b'{"command":"HEALTH_CHECK"}\n', timeout=30)
                answered.append(int(orjson.loads(line)["result"]["pid"]))
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.005)

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        reloading = d.result("RELOAD_DAEMON")
        new_pid = reloading["new_pid"]
        assert reloading["status"] == "reloading"
        assert new_pid != old_pid
        wait_for(lambda: answered and answered[-1] == new_pid, timeout=60)
    finally:
        stop.set()
        thread.join()
    assert failures == []  # no client was refused or dropped, before, during or after
    assert old_pid in answered
    assert d.proc is not None
    assert d.proc.wait(30) == 0  # the old one shut down cleanly
    after = _health(d)
    assert (after["pid"], after["status"]) == (new_pid, "healthy")
    assert d.result("GET_SHARED", {"key": "kept"})["value"] == [1, 2]
    # The turn accepted before the hand-over finished (in the old daemon, or queued for the
    # new one): either way it is recorded, not lost.
    wait_for(
        lambda: (
            {p["process_id"]: p for p in d.result("GET_PROCESSES")["processes"]}.get(
                queued["process_id"], {}
            ).get("status")
            in ("completed", "interrupted")
        )
    )


def test_a_successor_that_fails_to_start_leaves_the_old_one_serving(
    daemon: EntryDaemon,
) -> None:
    d = daemon
    old_pid = _health(d)["pid"]
    d.entry.write_text("raise SystemExit(3)\n")  # a broken deploy
    failed = d.call("RELOAD_DAEMON")
    assert failed["error"]["code"] == "RELOAD_FAILED"
    assert failed["error"]["details"]["exit_code"] == 3
    assert _health(d)["pid"] == old_pid
    assert d.result("SET_SHARED", {"key": "still", "value": True})["status"] == "set"
    d.entry.write_text(ENTRY)  # fixed: now it goes through
    assert d.result("RELOAD_DAEMON")["new_pid"] != old_pid


def test_an_in_process_daemon_refuses_to_reload(spawn_daemon: DaemonProcess) -> None:
    assert spawn_daemon.call("RELOAD_DAEMON")["error"]["code"] == "RELOAD_FAILED"
