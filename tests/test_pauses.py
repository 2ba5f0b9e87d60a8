"""Pause and resume (daemon/turns/pauses.py) with the fake CLI: queued turns of a paused agent
or session wait (``paused``), a running one finishes or is interrupted, resume releases them
in order, and all of it holds across a restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from daemon.claude.sessions import SessionHolds
from daemon.client import AsyncClient
from tests.helpers import DaemonProcess, wait_for


def prompts(d: DaemonProcess) -> list[str]:
    if not d.fake_log.exists():
        return []
    rows = [orjson.loads(x) for x in d.fake_log.read_bytes().splitlines() if x.strip()]
    return [r["turn_prompt"] for r in rows if "turn_prompt" in r]


def statuses(d: DaemonProcess, pids: list[str]) -> list[str]:
    procs = {p["process_id"]: p for p in d.result("GET_PROCESSES")["processes"]}
    return [procs[p]["status"] for p in pids]


def spawn_async(d: DaemonProcess, prompt: str, **params: Any) -> str:
    params.setdefault("cwd", str(d.work))
    pid: str = d.result("SPAWN", {"prompt": prompt, "mode": "async", **params})["process_id"]
    return pid


async def test_a_paused_agent_holds_its_queued_turns_while_others_run(
    make_daemon: Callable[..., DaemonProcess],
) -> None:
    d = make_daemon()
    paused = d.result("PAUSE_AGENT", {"agent_id": "writer"})
    assert (paused["paused"], paused["changed"], paused["waiting"]) == (True, True, [])
    sid = d.result("SPAWN", {"prompt": "start", "cwd": str(d.work)})["session_id"]
    held = [spawn_async(d, f"w{i}", session_id=sid, agent_id="writer") for i in range(3)]
    other = d.result("SPAWN", {"prompt": "free", "cwd": str(d.work), "agent_id": "reader"})
    assert other["text"]  # another agent's turn is not held
    wait_for(lambda: statuses(d, held) == ["paused"] * 3)
    assert d.result("GET_PROCESSES")["paused"][0]["id"] == "writer"
    assert not {"w0", "w1", "w2"} & set(prompts(d))
    async with AsyncClient.connect(d.socket) as c:
        await c.subscribe(["PROCESS_COMPLETE", "AGENT_RESUMED"])
        resumed = await c.call("RESUME_AGENT", {"agent_id": "writer"})
        assert resumed["waiting"] == held
        done: list[str] = []
        while len(done) < 3:
            ev = await c.next_event(timeout=20)
            if ev["event"] == "PROCESS_COMPLETE" and ev["data"]["process_id"] in held:
                assert ev["data"]["status"] == "completed"
                done.append(ev["data"]["process_id"])
    assert done == held
    assert [p for p in prompts(d) if p.startswith("w")] == ["w0", "w1", "w2"]


def test_a_running_turn_finishes_or_is_interrupted(
    make_daemon: Callable[..., DaemonProcess],
) -> None:
    d = make_daemon()
    sid = d.result("SPAWN", {"prompt": "start", "cwd": str(d.work)})["session_id"]
    running = spawn_async(d, "[[sleep:1]] long", session_id=sid)
    wait_for(lambda: statuses(d, [running]) == ["running"])
    after = spawn_async(d, "next", session_id=sid)
    paused = d.result("PAUSE_SESSION", {"session_id": sid})
    assert paused["waiting"] == [after]
    # The running turn finishes; the one after it waits.
    wait_for(lambda: statuses(d, [running]) == ["completed"], timeout=20)
    time.sleep(0.3)
    assert statuses(d, [after]) == ["paused"]
    assert "next" not in prompts(d)
    d.result("RESUME_SESSION", {"session_id": sid})
    wait_for(lambda: statuses(d, [after]) == ["completed"], timeout=20)

    long = spawn_async(d, "[[sleep:30]] very long", session_id=sid)
    wait_for(lambda: statuses(d, [long]) == ["running"])
    stopped = d.result("PAUSE_SESSION", {"session_id": sid, "interrupt": True})
    assert stopped["interrupted"] == [long]
    assert statuses(d, [long]) == ["cancelled"]
    # Still paused: a new turn of the session waits.
    later = spawn_async(d, "later", session_id=sid)
    wait_for(lambda: statuses(d, [later]) == ["paused"])
    d.result("RESUME_SESSION", {"session_id": sid})
    wait_for(lambda: statuses(d, [later]) == ["completed"], timeout=20)


def test_pauses_and_their_held_turns_survive_a_restart_and_resume_in_order(
    make_daemon: Callable[..., DaemonProcess],
) -> None:
    d = make_daemon(process=True)
    sid = d.result("SPAWN", {"prompt": "start", "cwd": str(d.work), "agent_id": "a"})["session_id"]
    d.result("PAUSE_AGENT", {"agent_id": "a"})
    held = [spawn_async(d, f"p{i}", session_id=sid, agent_id="a") for i in range(3)]
    wait_for(lambda: statuses(d, held) == ["paused"] * 3)
    d.stop()
    again = make_daemon(process=True, base=d.base)
    wait_for(lambda: statuses(again, held) == ["paused"] * 3)
    assert [p["id"] for p in again.result("GET_PROCESSES")["paused"]] == ["a"]
    assert again.result("RESUME_AGENT", {"agent_id": "a"})["changed"] is True
    wait_for(lambda: statuses(again, held) == ["completed"] * 3, timeout=30)
    assert [p for p in prompts(again) if p.startswith("p")] == ["p0", "p1", "p2"]
    # The resume was kept too: after another restart nothing is paused.
    again.stop()
    third = make_daemon(process=True, base=d.base)
    assert third.result("GET_PROCESSES")["paused"] == []


@pytest.mark.parametrize(
    ("command", "params", "code"),
    [
        (
            "PAUSE_SESSION",
            {"session_id": "00000000-0000-4000-8000-000000000000"},
            "SESSION_NOT_FOUND",
        ),
        ("PAUSE_AGENT", {"agent_id": ""}, "INVALID_PARAMETERS"),
        ("PAUSE_AGENT", {"agent_id": "a", "interrupt": "yes"}, "INVALID_PARAMETERS"),
        ("RESUME_SESSION", {}, "INVALID_PARAMETERS"),
    ],
)
def test_bad_pause_requests_are_typed_errors(
    d: DaemonProcess, command: str, params: dict[str, Any], code: str
) -> None:
    reply = d.call(command, params)
    assert reply["status"] == "error"
    assert reply["error"]["code"] == code


# -- steering: INTERRUPT_SESSION -------------------------------------------------------------


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_interrupt_with_a_prompt_runs_it_next_ahead_of_queued_turns(
    make_daemon: Callable[..., DaemonProcess], warm: bool
) -> None:
    d = make_daemon()
    sid = d.result("SPAWN", {"prompt": "start", "cwd": str(d.work), "warm": warm})["session_id"]
    long = spawn_async(d, "[[sleep:30]] long", session_id=sid, warm=warm)
    wait_for(lambda: statuses(d, [long]) == ["running"])
    queued = spawn_async(d, "queued", session_id=sid, warm=warm)
    async with AsyncClient.connect(d.socket) as c:
        await c.subscribe(["PROCESS_COMPLETE", "SESSION_INTERRUPTED"])
        steered = await c.call("INTERRUPT_SESSION", {"session_id": sid, "prompt": "steer"})
        assert steered["interrupted"] == [long]
        steer = steered["process_id"]
        order: list[str] = []
        while len(order) < 3:
            ev = await c.next_event(timeout=30)
            if ev["event"] == "PROCESS_COMPLETE" and ev["data"]["session_id"] == sid:
                order.append(ev["data"]["process_id"])
                if ev["data"]["process_id"] == steer:
                    # The session went on: a warm CLI keeps the interrupted prompt in the
                    # conversation (as the real one does); a killed cold one had not stored it.
                    assert f"(turn {3 if warm else 2})" in ev["data"]["text"]
    assert order == [long, steer, queued]
    assert statuses(d, [long, steer, queued]) == ["cancelled", "completed", "completed"]
    assert [p for p in prompts(d) if p in ("steer", "queued")] == ["steer", "queued"]


def test_interrupt_without_a_prompt_only_stops_and_an_unknown_session_is_an_error(
    make_daemon: Callable[..., DaemonProcess],
) -> None:
    d = make_daemon()
    sid = d.result("SPAWN", {"prompt": "start", "cwd": str(d.work)})["session_id"]
    idle = d.result("INTERRUPT_SESSION", {"session_id": sid})
    assert (idle["interrupted"], idle["process_id"]) == ([], None)
    long = spawn_async(d, "[[sleep:30]] long", session_id=sid)
    wait_for(lambda: statuses(d, [long]) == ["running"])
    assert d.result("INTERRUPT_SESSION", {"session_id": sid})["interrupted"] == [long]
    # With no turn to copy, the prompt runs with the session's own model and defaults.
    steer = d.result("INTERRUPT_SESSION", {"session_id": sid, "prompt": "after"})["process_id"]
    wait_for(lambda: statuses(d, [steer]) == ["completed"], timeout=20)
    unknown = d.call("INTERRUPT_SESSION", {"session_id": "00000000-0000-4000-8000-000000000000"})
    assert unknown["error"]["code"] == "SESSION_NOT_FOUND"


async def test_session_holds_run_in_order_first_goes_ahead_and_a_cancelled_waiter_passes_on() -> (
    None
):
    holds = SessionHolds()
    order: list[str] = []
    gate = asyncio.Event()

    async def turn(name: str, first: bool = False, wait: bool = False) -> None:
        async with holds.hold("s", first=first):
            order.append(name)
            if wait:
                await gate.wait()

    running = asyncio.create_task(turn("a", wait=True))
    await asyncio.sleep(0)
    b = asyncio.create_task(turn("b"))
    gone = asyncio.create_task(turn("gone"))
    c = asyncio.create_task(turn("c"))
    await asyncio.sleep(0)
    steer = asyncio.create_task(turn("steer", first=True))
    await asyncio.sleep(0)
    gone.cancel()  # a waiter that leaves does not block the ones behind it
    gate.set()
    await asyncio.gather(running, b, c, steer)
    assert order == ["a", "steer", "b", "c"]
    assert holds.active == 0
