"""The ACP face (``python -m daemon.acp``) driven by the ACP SDK's own client side
(``acp.spawn_agent_process``), as an editor drives it, with the real CLI against the stub API."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from acp.schema import (
    AgentMessageChunk,
    HttpMcpServer,
    ToolCallProgress,
    ToolCallStart,
    UsageUpdate,
    UserMessageChunk,
)

from daemon.client import AsyncClient
from tests.acp_editor import ROOT, Editor, face, prompt
from tests.helpers import DaemonProcess, eventually, pid_alive, wait_for


@pytest.fixture
def daemon(start_real_daemon: Callable[..., DaemonProcess]) -> DaemonProcess:
    return start_real_daemon()


async def test_an_editor_session_prompts_uses_tools_cancels_and_loads_again(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    d = daemon
    editor = Editor("allow")
    log = tmp_path / "acp.log"
    target = d.work / "made-by-acp"
    async with AsyncClient.connect(d.socket) as watcher, face(d, editor, log) as (conn, _):
        await watcher.subscribe(["PROCESS_PROGRESS", "PERMISSION_DECIDED"])
        new = await conn.new_session(cwd=str(d.work), mcp_servers=[])
        sid = new.session_id

        # A prompt: its answer arrives as message chunks, then the usage with the cost.
        first = await asyncio.wait_for(conn.prompt(session_id=sid, prompt=prompt("hello")), 120)
        assert first.stop_reason == "end_turn"
        assert editor.text(sid) == "echo: hello"
        assert first.usage is not None
        assert first.usage.output_tokens > 0
        (usage,) = editor.of(UsageUpdate, sid)
        assert usage.cost is not None
        assert usage.cost.amount > 0
        assert usage.used > 0
        # An ordinary daemon session: listed, logged, its progress on the bus.
        session = (await watcher.call("GET_SESSION", {"session_id": sid}))["session"]
        assert session["turns"] == 1
        assert session["cwd"] == str(d.work.resolve())
        seen = await watcher.next_event(timeout=10)
        assert seen["event"] == "PROCESS_PROGRESS"
        assert seen["data"]["session_id"] == sid

        # A second prompt continues the session.
        second = await asyncio.wait_for(conn.prompt(session_id=sid, prompt=prompt("again")), 120)
        assert second.stop_reason == "end_turn"
        assert editor.text(sid) == "echo: helloecho: again"
        session = (await watcher.call("GET_SESSION", {"session_id": sid}))["session"]
        assert session["turns"] == 2

        # A tool call the CLI does not allow alone: the editor is asked, allows it, it runs.
        done = await asyncio.wait_for(
            conn.prompt(session_id=sid, prompt=prompt(f"[[bash:touch {target}]]")), 120
        )
        assert done.stop_reason == "end_turn"
        assert target.exists()
        ((asked, options),) = editor.asked
        assert asked.title == f"`touch {target}`"
        assert asked.kind == "execute"
        assert {o.kind for o in options} == {"allow_once", "allow_always", "reject_once"}
        (started,) = editor.of(ToolCallStart, sid)
        assert started.tool_call_id == asked.tool_call_id
        assert (started.kind, started.title) == ("execute", asked.title)
        (finished,) = editor.of(ToolCallProgress, sid)
        assert finished.tool_call_id == started.tool_call_id
        assert finished.status == "completed"
        decided = await _event(watcher, "PERMISSION_DECIDED")
        assert (decided["decision"], decided["decided_by"]) == ("allow", "acp")

        # Cancel of a long prompt: the prompt answers cancelled, and its CLI is gone.
        long = asyncio.create_task(conn.prompt(session_id=sid, prompt=prompt("[[sleep:60]] x")))
        pid = await _running_pid(watcher, sid)
        await conn.cancel(session_id=sid)
        cancelled = await asyncio.wait_for(long, 30)
        assert cancelled.stop_reason == "cancelled"
        await eventually(lambda: not pid_alive(pid), timeout=15)
        history = (await watcher.call("GET_SESSION_HISTORY", {"session_id": sid}))["entries"]
        assert history[-1]["role"] == "error"

    # A fresh face process (the editor restarted) loads the session and goes on with it.
    later = Editor()
    async with face(d, later, log) as (conn, _):
        listed = await conn.list_sessions(cwd=str(d.work))
        assert sid in [s.session_id for s in listed.sessions]
        await asyncio.wait_for(conn.load_session(cwd=str(d.work), session_id=sid), 30)
        replayed = [
            (type(u).__name__, u.content.text)
            for _, u in later.updates
            if isinstance(u, UserMessageChunk | AgentMessageChunk)
        ]
        assert replayed[:4] == [
            ("UserMessageChunk", "hello"),
            ("AgentMessageChunk", "echo: hello"),
            ("UserMessageChunk", "again"),
            ("AgentMessageChunk", "echo: again"),
        ]
        later.updates.clear()
        reply = await asyncio.wait_for(conn.prompt(session_id=sid, prompt=prompt("more")), 120)
        assert reply.stop_reason == "end_turn"
        assert later.text(sid) == "echo: more"
    async with AsyncClient.connect(d.socket) as c:
        session = (await c.call("GET_SESSION", {"session_id": sid}))["session"]
        # hello, again, the tool turn and more: a cancelled turn is not one of its turns.
        assert session["turns"] == 4


@pytest.fixture
def bare_mcp_url(tmp_path: Path) -> Iterator[str]:
    """An HTTP MCP server of the editor's (one tool, ``publish``), on loopback."""
    port_file = tmp_path / "port"
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.mcp_bare_server", str(port_file)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: port_file.exists() and port_file.read_text().strip(), timeout=30)
        yield f"http://127.0.0.1:{port_file.read_text().strip()}/mcp"
    finally:
        server.terminate()
        server.wait(10)


async def test_an_editors_mcp_server_and_a_rejected_tool(
    daemon: DaemonProcess, bare_mcp_url: str, tmp_path: Path
) -> None:
    d = daemon
    editor = Editor("reject")
    async with face(d, editor, tmp_path / "acp.log") as (conn, _):
        mcp = HttpMcpServer(type="http", name="bare", url=bare_mcp_url, headers=[])
        sid = (await conn.new_session(cwd=str(d.work), mcp_servers=[mcp])).session_id
        call = '[[tool:mcp__bare__publish:{"event_type": "E", "payload": {}}]]'
        reply = await asyncio.wait_for(conn.prompt(session_id=sid, prompt=prompt(call)), 120)
        assert reply.stop_reason == "end_turn"
        # The CLI had the editor's server: it offered the tool, the call was relayed, the
        # editor rejected it, and the model was told.
        ((asked, _),) = editor.asked
        assert asked.title == "mcp__bare__publish"
        assert asked.kind == "other"
        (finished,) = editor.of(ToolCallProgress, sid)
        assert finished.status == "failed"
        assert "rejected" in str(finished.raw_output)
        editor.choice = "allow"
        reply = await asyncio.wait_for(conn.prompt(session_id=sid, prompt=prompt(call)), 120)
        assert reply.stop_reason == "end_turn"
        results = editor.of(ToolCallProgress, sid)
        assert results[-1].status == "completed"
        assert "published" in str(results[-1].raw_output)


async def _event(c: AsyncClient, name: str) -> dict[str, Any]:
    while True:
        ev = await c.next_event(timeout=30)
        if ev["event"] == name:
            data: dict[str, Any] = ev["data"]
            return data


async def _running_pid(c: AsyncClient, session_id: str) -> int:
    """The pid of the session's running CLI, once it runs."""
    for _ in range(600):
        for p in (await c.call("GET_PROCESSES"))["processes"]:
            if p["session_id"] == session_id and p["status"] == "running" and p.get("pid"):
                pid: int = p["pid"]
                return pid
        await asyncio.sleep(0.1)
    raise AssertionError(f"no running turn in session {session_id}")
