"""CLEANUP, MESSAGE_BUS_STATS and RELOAD_MODULE (daemon/commands/maintenance.py), with the fake
CLI: cleanup never touches a busy session, the bus stats name who is on the bus, and an
observer plugin runs new code after a reload (and keeps its old code if the new one fails)."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.client import AsyncClient
from tests.helpers import DaemonProcess, wait_for


def test_cleanup_logs_and_sessions_spare_a_busy_session(
    make_daemon: Callable[..., DaemonProcess],
) -> None:
    d = make_daemon()
    idle = d.result("SPAWN", {"prompt": "idle one", "cwd": str(d.work)})["session_id"]
    busy = d.result("SPAWN", {"prompt": "busy one", "cwd": str(d.work)})["session_id"]
    running = d.result(
        "SPAWN",
        {"prompt": "[[sleep:30]] still", "session_id": busy, "mode": "async"},
    )["process_id"]
    wait_for(
        lambda: any(
            p["process_id"] == running and p["status"] == "running"
            for p in d.result("GET_PROCESSES")["processes"]
        )
    )
    logs = {sid: d.log_dir / f"{sid}.jsonl" for sid in (idle, busy)}
    assert all(p.exists() for p in logs.values())
    done = d.result("CLEANUP", {"cleanup_type": "all"})
    assert (done["status"], done["cleanup_type"]) == ("cleaned", "all")
    assert done["removed"]["logs"] == 1
    assert done["removed"]["sessions"] == 1
    assert done["kept_busy"] == 2  # the busy session's log and record
    assert "Removed 1 log file(s)" in done["details"]
    assert not logs[idle].exists()
    assert logs[busy].exists()
    known = {s["session_id"] for s in d.result("GET_SESSIONS")["sessions"]}
    assert (idle in known, busy in known) == (False, True)
    # The CLI's own transcript stays: the forgotten session still resumes.
    again = d.result("SPAWN", {"prompt": "back", "session_id": idle, "cwd": str(d.work)})
    assert again["text"].endswith("(turn 2)")
    d.result("CANCEL_PROCESS", {"process_id": running})
    assert d.result("CLEANUP", {"cleanup_type": "logs", "older_than_s": 3600})["removed"] == {
        "logs": 0
    }


def test_cleanup_sockets_removes_only_dead_leftovers(
    make_daemon: Callable[..., DaemonProcess],
) -> None:
    d = make_daemon()
    folder = d.socket.parent
    dead = folder / "old.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(dead))  # bound, never listening, then closed: nobody answers there
    leftover = folder / "d.sock.new"
    leftover.write_text("")
    done = d.result("CLEANUP", {"cleanup_type": "sockets"})
    assert done["removed"] == {"sockets": 2}
    assert not dead.exists()
    assert not leftover.exists()
    assert d.socket.exists()
    assert d.result("HEALTH_CHECK")["status"] == "healthy"


@pytest.mark.parametrize(
    "params",
    [{}, {"cleanup_type": "everything"}, {"cleanup_type": "logs", "older_than_s": -1}],
)
def test_bad_cleanup_parameters_are_typed_errors(
    spawn_daemon: DaemonProcess, params: dict[str, object]
) -> None:
    assert spawn_daemon.call("CLEANUP", params)["error"]["code"] == "INVALID_PARAMETERS"


async def test_message_bus_stats_name_who_is_on_the_bus(
    make_daemon: Callable[..., DaemonProcess],
) -> None:
    d = make_daemon()
    d.result("PUBLISH", {"event_type": "DIRECT_MESSAGE", "payload": {"to": "away", "content": "x"}})
    async with AsyncClient.connect(d.socket, agent_id="watcher") as c:
        await c.subscribe(["PROCESS_*", "DIRECT_MESSAGE"], agent_id="watcher")
        stats = await c.call("MESSAGE_BUS_STATS")
    assert stats["connected_agents"] == ["watcher"]
    assert stats["subscriptions"] == {"DIRECT_MESSAGE": ["watcher"], "PROCESS_*": ["watcher"]}
    assert stats["offline_queues"] == {"away": 1}
    assert stats["history_size"] >= 1


PLUGIN = """
class Plugin:
    event_types = ["PING"]

    def __init__(self, api):
        self.api = api

    async def on_event(self, event):
        await self.api.call("SET_SHARED", {"key": "plugin.version", "value": VERSION})
"""


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    module = tmp_path / "reloadable_plugin.py"
    module.write_text("VERSION = 1\n" + PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield module
    sys.modules.pop("reloadable_plugin", None)


def _ping_version(d: DaemonProcess, marker: int) -> object:
    d.result("PUBLISH", {"event_type": "PING", "payload": {"n": marker}})
    return wait_for(
        lambda: (v := d.result("GET_SHARED", {"key": "plugin.version"}))["found"] and v["value"]
    )


def test_reload_module_restarts_an_observer_on_new_code(
    make_daemon: Callable[..., DaemonProcess], plugin_dir: Path
) -> None:
    d = make_daemon("--observer", "reloadable_plugin:Plugin")
    assert _ping_version(d, 1) == 1
    plugin_dir.write_text("VERSION = 2\n" + PLUGIN)
    os.utime(plugin_dir, (1, 2_000_000_000))  # a new mtime, so the import sees new source
    reloaded = d.result("RELOAD", {"module_name": "reloadable_plugin"})  # KSI's spelling
    assert (reloaded["status"], reloaded["observers"]) == ("reloaded", ["reloadable_plugin:Plugin"])
    d.result("DELETE_SHARED", {"key": "plugin.version"})
    assert _ping_version(d, 2) == 2
    # Code that does not import: an error, and the observer keeps its last good code.
    plugin_dir.write_text("VERSION = (\n")
    os.utime(plugin_dir, (1, 2_000_000_100))
    failed = d.call("RELOAD_MODULE", {"module_name": "reloadable_plugin"})
    assert failed["error"]["code"] == "RELOAD_FAILED"
    d.result("DELETE_SHARED", {"key": "plugin.version"})
    assert _ping_version(d, 3) == 2
    missing = d.call("RELOAD_MODULE", {"module_name": "nothing_here"})
    assert missing["error"]["code"] == "OBSERVER_NOT_FOUND"
