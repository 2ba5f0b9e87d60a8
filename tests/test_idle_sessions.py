"""Conversations that await input (daemon/turns/idle.py): a session's state between turns,
its idle expiry (the warm CLI released, SESSION_IDLE_EXPIRED), resuming it afterwards, and
the expiry timers after a restart. Fake CLI."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from daemon.client import AsyncClient
from tests.helpers import DaemonProcess, eventually, pid_alive, wait_for


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def _next(c: AsyncClient, name: str) -> dict[str, Any]:
    while True:
        ev = await c.next_event(timeout=20)
        if ev["event"] == name:
            data: dict[str, Any] = ev["data"]
            return data


async def test_a_session_awaits_input_then_expires_and_can_still_be_resumed(
    make_daemon: Callable[..., DaemonProcess],
) -> None:
    d = make_daemon()
    async with AsyncClient.connect(d.socket) as c:
        await c.subscribe(["SESSION_IDLE_EXPIRED"])
        first = await c.call(
            "SPAWN",
            {"prompt": "hi", "cwd": str(d.work), "warm": True, "idle_timeout_s": 2.0},
        )
        sid = first["session_id"]
        session = (await c.call("GET_SESSION", {"session_id": sid}))["session"]
        assert session["state"] == "awaiting_input"
        assert _epoch(session["idle_expires_at"]) - _epoch(session["last_used_at"]) == 2.0
        pid = session["warm"]["pid"]
        assert pid_alive(pid)
        expired = await _next(c, "SESSION_IDLE_EXPIRED")
        assert (expired["session_id"], expired["warm_released"]) == (sid, True)
        assert expired["idle_timeout_s"] == 2.0
        await eventually(lambda: not pid_alive(pid))
        session = (await c.call("GET_SESSION", {"session_id": sid}))["session"]
        assert (session["state"], session["warm"]) == ("expired", None)
        # Expired is not gone: the next turn resumes the conversation (cold, from the file).
        again = await c.call("SPAWN", {"prompt": "still there?", "session_id": sid})
        assert "(turn 2)" in again["text"]
        listed = (await c.call("GET_SESSIONS"))["sessions"]
        assert [s["state"] for s in listed if s["session_id"] == sid] == ["awaiting_input"]


async def test_a_session_with_a_turn_running_is_running_and_its_timer_waits(
    make_daemon: Callable[..., DaemonProcess],
) -> None:
    d = make_daemon()
    async with AsyncClient.connect(d.socket) as c:
        await c.subscribe(["SESSION_IDLE_EXPIRED", "PROCESS_COMPLETE"])
        first = await c.call("SPAWN", {"prompt": "a", "cwd": str(d.work), "idle_timeout_s": 1.5})
        sid = first["session_id"]
        second = await c.call(
            "SPAWN", {"prompt": "[[sleep:2.5]] b", "session_id": sid, "mode": "async"}
        )
        session = (await c.call("GET_SESSION", {"session_id": sid}))["session"]
        assert (session["state"], session["idle_expires_at"]) == ("running", None)
        # No expiry while the turn runs, although it outlasts the timeout: the expiry comes
        # after the turn's completion, its timeout later.
        while True:
            ev = await c.next_event(timeout=20)
            assert ev["event"] != "SESSION_IDLE_EXPIRED", "expired during a turn"
            if ev["data"]["process_id"] == second["process_id"]:
                break
        ended = time.time()
        expired = await _next(c, "SESSION_IDLE_EXPIRED")
        assert time.time() - ended >= 1.4
        assert expired["session_id"] == sid


def test_sessions_awaiting_input_expire_after_a_restart_too(
    make_daemon: Callable[..., DaemonProcess],
) -> None:
    d = make_daemon(process=True)
    sid = d.result("SPAWN", {"prompt": "hi", "cwd": str(d.work), "idle_timeout_s": 4.0})[
        "session_id"
    ]
    d.stop()
    again = make_daemon(process=True, base=d.base)
    session = again.result("GET_SESSION", {"session_id": sid})["session"]
    assert session["state"] == "awaiting_input"  # its own timeout was kept
    found = wait_for(
        lambda: (
            again.result("GET_EVENTS", {"event_types": ["SESSION_IDLE_EXPIRED"]})["events"] or None
        ),
        timeout=15,
    )
    assert [e["data"]["session_id"] for e in found] == [sid]
    assert found[0]["data"]["warm_released"] is False  # the restart ended its CLIs already
    assert again.result("GET_SESSION", {"session_id": sid})["session"]["state"] == "expired"


def test_a_bad_idle_timeout_is_a_typed_error(d: DaemonProcess) -> None:
    for bad in (0, -1, "10", True):
        reply = d.call("SPAWN", {"prompt": "hi", "idle_timeout_s": bad})
        assert reply["error"]["code"] == "INVALID_PARAMETERS", bad
