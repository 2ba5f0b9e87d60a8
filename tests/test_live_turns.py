"""Live turns through the daemon: PROCESS_PROGRESS on the bus, ``stream: true`` on the SPAWN's
own connection, the client's iterator and ``daemon.cli --follow`` (fake CLI)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from daemon.client import AsyncClient
from tests.helpers import DaemonProcess, pid_alive, raw_exchange

ROOT = Path(__file__).resolve().parents[1]
TOOL_PROMPT = "[[say:Let me look.]] [[tool:Bash:echo hi]]"
TOOL_KINDS = ["started", "text", "tool_use", "tool_result", "text"]


def _progress_of(events: list[dict[str, Any]], process_id: str) -> list[dict[str, Any]]:
    return [
        e["data"]
        for e in events
        if e["event"] == "PROCESS_PROGRESS" and e["data"]["process_id"] == process_id
    ]


async def _until_complete(c: AsyncClient, process_id: str) -> list[dict[str, Any]]:
    """Events of the turn as a subscriber sees them, through its PROCESS_COMPLETE."""
    seen: list[dict[str, Any]] = []
    while True:
        ev = await c.next_event(timeout=20)
        if ev["data"].get("process_id") != process_id:
            continue
        seen.append(ev)
        if ev["event"] == "PROCESS_COMPLETE":
            return seen


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_a_tool_turn_is_published_step_by_step(make_daemon: Any, warm: bool) -> None:
    d = make_daemon()
    async with AsyncClient.connect(d.socket) as c:
        await c.subscribe(["PROCESS_*"])
        accepted = await c.call(
            "SPAWN",
            {
                "prompt": TOOL_PROMPT,
                "mode": "async",
                "cwd": str(d.work),
                "allowed_tools": ["Bash"],
                "agent_id": "watcher",
                "warm": warm,
            },
        )
        pid = accepted["process_id"]
        events = await _until_complete(c, pid)
    progress = _progress_of(events, pid)
    assert [p["kind"] for p in progress] == TOOL_KINDS
    assert [p["index"] for p in progress] == list(range(len(TOOL_KINDS)))  # gapless
    session_id = events[-1]["data"]["session_id"]
    for p in progress:
        assert (p["process_id"], p["session_id"], p["agent_id"]) == (pid, session_id, "watcher")
    assert progress[0]["cwd"] == str(d.work)
    assert progress[2]["name"] == "Bash"
    assert progress[2]["input"]["command"] == "echo hi"
    assert progress[3]["content"] == "echo hi"
    assert progress[3]["is_error"] is False
    assert progress[4]["text"] == "tool result: echo hi"
    # PROCESS_COMPLETE is the turn's last event; STARTED comes before the CLI's first line.
    names = [e["event"] for e in events]
    assert names[-1] == "PROCESS_COMPLETE"
    assert names.count("PROCESS_COMPLETE") == 1
    assert names.index("PROCESS_STARTED") < names.index("PROCESS_PROGRESS")
    # The bus keeps them: GET_EVENTS gives the same events.
    stored = d.result("GET_EVENTS", {"event_types": ["PROCESS_PROGRESS"]})["events"]
    assert _progress_of(stored, pid) == progress


async def test_stream_true_writes_progress_on_the_spawn_connection(make_daemon: Any) -> None:
    d = make_daemon()
    async with AsyncClient.connect(d.socket) as c:
        # No SUBSCRIBE: the events come because the SPAWN asked for them.
        turn = await c.spawn_stream(TOOL_PROMPT, cwd=str(d.work), allowed_tools=["Bash"])
        lines = [event async for event in turn]
        result = turn.result()
        # The connection stays usable, and nothing else was pushed to it.
        assert (await c.call("HEALTH_CHECK"))["status"] == "healthy"
    assert [e["event"] for e in lines] == ["PROCESS_PROGRESS"] * len(TOOL_KINDS)
    assert [e["data"]["kind"] for e in lines] == TOOL_KINDS
    assert all(e["id"] == turn.reply["id"] for e in lines)  # type: ignore[index]
    assert result["text"] == "tool result: echo hi"
    assert "progress_missed" not in result
    # The same shape as a subscriber's events (plus the request's id).
    stored = d.result("GET_EVENTS", {"event_types": ["PROCESS_PROGRESS"]})["events"]
    mine = [e for e in stored if e["data"]["process_id"] == result["process_id"]]
    assert [{k: v for k, v in e.items() if k != "id"} for e in lines] == mine


def test_one_shot_stream_prints_progress_then_the_reply_then_closes(make_daemon: Any) -> None:
    d = make_daemon()
    request = {
        "command": "SPAWN",
        "parameters": {"prompt": "hello", "cwd": str(d.work), "stream": True},
    }
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # what `nc -U` does
        s.settimeout(20)
        s.connect(str(d.socket))
        s.sendall(orjson.dumps(request) + b"\n")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    lines = [orjson.loads(line) for line in data.splitlines()]
    *events, reply = lines
    assert [e["data"]["kind"] for e in events] == ["started", "text"]
    assert events[1]["data"]["text"] == "echo: hello (turn 1)"
    assert reply["status"] == "success"
    assert reply["result"]["text"] == "echo: hello (turn 1)"


def test_stream_needs_a_sync_spawn(make_daemon: Any) -> None:
    d = make_daemon()
    reply = d.call("SPAWN", {"prompt": "x", "mode": "async", "stream": True})
    assert reply["error"]["code"] == "INVALID_PARAMETERS"
    assert "sync" in reply["error"]["message"]
    reply = d.call("SPAWN", {"prompt": "x", "stream": "yes"})
    assert reply["error"]["code"] == "INVALID_PARAMETERS"
    assert d.result("GET_PROCESSES")["total"] == 0  # nothing ran


async def test_a_subscriber_that_joins_mid_turn_sees_the_rest(make_daemon: Any) -> None:
    d = make_daemon()
    async with AsyncClient.connect(d.socket) as first, AsyncClient.connect(d.socket) as late:
        turn = await first.spawn_stream("[[pause:0.5]] slow", cwd=str(d.work))
        async for event in turn:
            if event["data"]["kind"] == "text":  # "working on it": the turn is under way
                break
        await late.subscribe(["PROCESS_PROGRESS", "PROCESS_COMPLETE"])
        process_id = event["data"]["process_id"]
        rest = await _until_complete(late, process_id)
        await turn.wait()
    assert [e["data"]["kind"] for e in rest[:-1]] == ["text"]
    assert rest[0]["data"]["index"] == event["data"]["index"] + 1
    assert rest[0]["data"]["text"].startswith("echo: ")
    assert rest[-1]["event"] == "PROCESS_COMPLETE"


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_cancel_mid_stream(make_daemon: Any, tmp_path: Path, warm: bool) -> None:
    d = make_daemon()
    pidfile = tmp_path / "cli.pid"
    async with AsyncClient.connect(d.socket) as c, AsyncClient.connect(d.socket) as other:
        await other.subscribe(["PROCESS_COMPLETE"])
        turn = await c.spawn_stream(
            f"[[pidfile:{pidfile}]] [[pause:30]] long", cwd=str(d.work), warm=warm
        )
        async for event in turn:
            if event["data"]["kind"] == "text":
                break
        process_id = event["data"]["process_id"]
        cancelled = await other.call("CANCEL_PROCESS", {"process_id": process_id})
        assert cancelled["status"] == "cancelled"
        reply = await asyncio.wait_for(turn.wait(), 20)
        complete = await other.next_event(timeout=20)
    assert reply["error"]["code"] == "CANCELLED"
    assert complete["data"]["status"] == "cancelled"
    cli_pid = int(pidfile.read_text())
    if warm:  # the interrupt ended the turn; the session's CLI may live on, idle
        procs = d.result("GET_PROCESSES")["warm"]
        assert all(not p["busy"] for p in procs)
    else:
        assert not pid_alive(cli_pid)


def test_a_client_that_does_not_read_gets_a_bounded_stream(make_daemon: Any) -> None:
    d = make_daemon(env={"KSI_SUBSCRIBER_QUEUE_BYTES": "1024"})
    request = {
        "command": "SPAWN",
        "parameters": {"prompt": "[[huge:4000000]]", "cwd": str(d.work), "stream": True},
    }
    # Nothing is read until the daemon closes: the kernel buffer fills, then ours would.
    data = raw_exchange(d.socket, orjson.dumps(request) + b"\n", timeout=60)
    *events, reply = [orjson.loads(line) for line in data.splitlines()]
    result = reply["result"]
    assert len(result["text"]) == 4_000_000
    assert result["progress_missed"] > 0
    indices = [e["data"]["index"] for e in events]
    assert indices == list(range(len(indices)))  # a clean prefix, then nothing
    stored = d.result("GET_EVENTS", {"event_types": ["PROCESS_PROGRESS"], "limit": 1000})
    assert len(stored["events"]) == len(events) + result["progress_missed"]


def test_get_commands_documents_stream(make_daemon: Any) -> None:
    d = make_daemon()
    listing = d.result("GET_COMMANDS", {"include_results": True})["commands"]
    spawn = next(c for c in listing if c["command"] == "SPAWN")
    props = spawn["parameters"]["properties"]
    assert props["stream"]["type"] == "boolean"
    assert "PROCESS_PROGRESS" in props["stream"]["description"]
    assert "progress_missed" in spawn["result"]["properties"]


def test_cli_follow_prints_the_turn_as_it_happens(make_daemon: Any) -> None:
    d: DaemonProcess = make_daemon()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KSI_")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon.cli",
            "--socket",
            str(d.socket),
            "send",
            "SPAWN",
            f"prompt={TOOL_PROMPT}",
            f"cwd={d.work}",
            'allowed_tools=["Bash"]',
            "--follow",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:4] == [
        "Let me look.",
        "· Bash echo hi",
        "  ↳ ok echo hi",
        "tool result: echo hi",
    ]
    assert lines[4].startswith("-- session ")
    assert len(lines) == 5
    assert "waiting" not in proc.stderr  # no spinner when stderr is not a terminal


async def test_a_replayed_stream_spawn_follows_the_running_turn(make_daemon: Any) -> None:
    """The same client_request_id again (a client reconnecting mid-turn) runs nothing new:
    its connection gets the rest of the running turn's progress, then the replayed reply."""
    d = make_daemon()
    params = {"cwd": str(d.work), "client_request_id": "job-1"}
    async with AsyncClient.connect(d.socket) as first, AsyncClient.connect(d.socket) as again:
        turn = await first.spawn_stream("[[pause:0.5]] slow", **params)
        async for event in turn:
            if event["data"]["kind"] == "text":
                break
        replay = await again.spawn_stream("[[pause:0.5]] slow", **params)
        rest = [e["data"] async for e in replay]
        await turn.wait()
    assert replay.result()["replayed"] is True
    assert replay.result()["process_id"] == event["data"]["process_id"]
    assert [p["kind"] for p in rest] == ["text"]
    assert rest[0]["index"] == event["data"]["index"] + 1
    assert len([e for e in d.log_events() if e.get("event") == "turn.finished"]) == 1
