"""The ACP face (``python -m daemon.acp``) with the fake CLI: what an editor sees when things go
wrong or sideways (unknown sessions, a cwd that is not the session's, a cancel before the turn
has said anything, an editor that does not answer a permission request, or withdraws it, no
daemon, ``--start``), and how tool calls are titled. The happy path with the real CLI:
tests/e2e/test_acp_real_cli.py."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import acp
import pytest
from acp.schema import ToolCallProgress, ToolCallStart, UsageUpdate

from daemon.acp.agent import daemon_mcp_servers, prompt_text
from daemon.acp.updates import tool_kind, tool_title, updates_for, usage_update
from daemon.client import AsyncClient
from tests.acp_editor import Editor, connect, face, prompt
from tests.helpers import DaemonProcess, eventually, pid_alive, short_tmpdir


@pytest.fixture
def d(make_daemon: Any) -> DaemonProcess:
    daemon: DaemonProcess = make_daemon(env={"KSI_PERMISSION_TIMEOUT_S": "2"})
    return daemon


async def test_unknown_sessions_and_a_foreign_cwd_are_clear_errors(
    d: DaemonProcess, tmp_path: Path
) -> None:
    async with face(d, Editor(), tmp_path / "acp.log") as (conn, _):
        with pytest.raises(acp.RequestError) as unknown:
            await conn.prompt(session_id="no-such-session", prompt=prompt("hi"))
        assert "session/new or session/load" in str(unknown.value.data)
        with pytest.raises(acp.RequestError):
            await conn.load_session(cwd=str(d.work), session_id=str(os.urandom(4).hex()))
        with pytest.raises(acp.RequestError) as bad_cwd:
            await conn.new_session(cwd="relative/dir", mcp_servers=[])
        assert "absolute" in str(bad_cwd.value.data)
        sid = (await conn.new_session(cwd=str(d.work), mcp_servers=[])).session_id
        await conn.prompt(session_id=sid, prompt=prompt("hi"))
        elsewhere = short_tmpdir("elsewhere")
        with pytest.raises(acp.RequestError) as moved:
            await conn.load_session(cwd=str(elsewhere), session_id=sid)
        data = moved.value.data
        assert isinstance(data, dict)
        assert data["session_cwd"] == str(d.work.resolve())


async def test_cancel_before_the_turn_has_said_anything(make_daemon: Any, tmp_path: Path) -> None:
    # The CLI takes 3 s to start: the cancel comes before any of the turn's events.
    d: DaemonProcess = make_daemon(env={"FAKE_CLAUDE_START_DELAY": "3"})
    editor = Editor()
    async with face(d, editor, tmp_path / "acp.log") as (conn, _):
        sid = (await conn.new_session(cwd=str(d.work), mcp_servers=[])).session_id
        started = time.monotonic()
        running = asyncio.create_task(conn.prompt(session_id=sid, prompt=prompt("[[sleep:30]]")))
        await asyncio.sleep(0.5)
        await conn.cancel(session_id=sid)
        reply = await asyncio.wait_for(running, 20)
        assert reply.stop_reason == "cancelled"
        assert time.monotonic() - started < 15  # not the 30 s the turn would have slept
        assert editor.text(sid) == ""
        # The session goes on: its id is the daemon's from the next turn on.
        again = await asyncio.wait_for(conn.prompt(session_id=sid, prompt=prompt("next")), 30)
        assert again.stop_reason == "end_turn"
        assert editor.text(sid).startswith("echo: next")
    listed = d.result("GET_PROCESSES")["processes"]
    assert {p["status"] for p in listed if p["session_id"] == sid} == {"cancelled", "completed"}


async def test_an_editor_that_does_not_answer_gets_the_daemons_default(
    d: DaemonProcess, tmp_path: Path
) -> None:
    class Silent(Editor):
        async def request_permission(self, *args: Any, **kwargs: Any) -> Any:
            self.asked.append(args)
            await asyncio.sleep(3600)

    editor = Silent()
    target = d.work / "not-made"
    async with face(d, editor, tmp_path / "acp.log") as (conn, _):
        sid = (await conn.new_session(cwd=str(d.work), mcp_servers=[])).session_id
        reply = await asyncio.wait_for(
            conn.prompt(session_id=sid, prompt=prompt(f"[[tool:Bash:touch {target}]]")), 30
        )
        assert reply.stop_reason == "end_turn"
        assert len(editor.asked) == 1
        (result,) = editor.of(ToolCallProgress, sid)
        assert result.status == "failed"  # denied: the default after KSI_PERMISSION_TIMEOUT_S
    decided = d.result("GET_PERMISSION_REQUESTS", {"include_decided": True})["requests"]
    assert [(r["status"], r["decided_by"]) for r in decided] == [("timed_out", "timeout")]


async def test_a_withdrawn_request_is_a_denial_and_allow_always_is_remembered(
    d: DaemonProcess, tmp_path: Path
) -> None:
    editor = Editor(None)  # withdraws (the "cancelled" outcome)
    async with face(d, editor, tmp_path / "acp.log") as (conn, _):
        sid = (await conn.new_session(cwd=str(d.work), mcp_servers=[])).session_id
        tool = prompt(f"[[tool:Bash:touch {d.work / 'x'}]]")
        await asyncio.wait_for(conn.prompt(session_id=sid, prompt=tool), 30)
        editor.choice = "allow_always"
        await asyncio.wait_for(conn.prompt(session_id=sid, prompt=tool), 30)
        await asyncio.wait_for(conn.prompt(session_id=sid, prompt=tool), 30)
        assert len(editor.asked) == 2  # the third call was allowed by the session's rule
        statuses = [u.status for u in editor.of(ToolCallProgress, sid)]
        assert statuses == ["failed", "completed", "completed"]
        starts = editor.of(ToolCallStart, sid)
        assert [s.kind for s in starts] == ["execute"] * 3
        assert len(editor.of(UsageUpdate, sid)) == 3
    requests = d.result("GET_PERMISSION_REQUESTS", {"include_decided": True})["requests"]
    by_time = sorted(requests, key=lambda r: r["created_at"])
    assert [(r["decision"], r["decided_by"]) for r in by_time] == [
        ("deny", "acp"),
        ("allow", "acp"),
    ]
    assert "withdrew" in (by_time[0]["message"] or "")
    assert by_time[1]["remembered"] is True


async def test_without_a_daemon_the_editor_is_told_and_start_starts_one(
    tmp_path: Path,
) -> None:
    base = short_tmpdir("acp-start")
    socket = base / "s" / "d.sock"
    log = tmp_path / "acp.log"
    async with connect(socket, Editor(), log) as (conn, _):
        with pytest.raises(acp.RequestError) as none:
            await conn.initialize(protocol_version=acp.PROTOCOL_VERSION)
        assert "no daemon answers" in str(none.value.data)
    # With --start the face starts one (detached: it outlives the face), configured by the
    # environment the editor gave the face.
    proto = DaemonProcess(base)
    env = {
        **proto.env_overrides,
        "KSI_STATE_DIR": str(proto.state_dir),
        "KSI_LOG_DIR": str(proto.log_dir),
    }
    pid_file = socket.with_suffix(".pid")
    try:
        async with face(socket, Editor(), log, "--start", env=env) as (conn, _):
            sid = (await conn.new_session(cwd=str(proto.work), mcp_servers=[])).session_id
            reply = await asyncio.wait_for(conn.prompt(session_id=sid, prompt=prompt("hi")), 30)
            assert reply.stop_reason == "end_turn"
        async with AsyncClient.connect(socket) as c:
            assert (await c.call("GET_SESSION", {"session_id": sid}))["session"]["turns"] == 1
    finally:
        if pid_file.exists():
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGTERM)
            await eventually(lambda: not pid_alive(pid), timeout=30)
        proto.cleanup()


def test_tool_titles_kinds_and_updates() -> None:
    assert tool_title("Bash", {"command": "pytest -q\n  --lf"}) == "`pytest -q --lf`"
    assert tool_title("Read", {"file_path": "/src/app.py"}) == "Read /src/app.py"
    assert tool_title("Edit", {"file_path": "/a"}) == "Edit /a"
    assert tool_title("Grep", {"pattern": "TODO", "path": "src"}) == "grep 'TODO' in src"
    assert tool_title("WebFetch", {"url": "https://x"}) == "Fetch https://x"
    assert tool_title("mcp__ksi__publish", {"event_type": "E"}) == "mcp__ksi__publish"
    assert tool_title("Bash", {}) == "Bash"  # no command to show
    assert len(tool_title("Bash", {"command": "x" * 1000})) == 200
    assert (tool_kind("Write"), tool_kind("Glob"), tool_kind("mcp__x__y")) == (
        "edit",
        "search",
        "other",
    )
    (start,) = updates_for(
        {"kind": "tool_use", "tool_use_id": "t1", "name": "Read", "input": {"file_path": "/f"}}
    )
    assert isinstance(start, ToolCallStart)
    assert start.locations is not None
    assert [loc.path for loc in start.locations] == ["/f"]
    (done,) = updates_for({"kind": "tool_result", "tool_use_id": "t1", "is_error": True})
    assert isinstance(done, ToolCallProgress)
    assert done.status == "failed"
    assert list(updates_for({"kind": "started", "model": "m"})) == []
    assert list(updates_for({"kind": "text", "text": ""})) == []
    usage = usage_update(
        {
            "usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 2},
            "raw": {"modelUsage": {"m": {"contextWindow": 1_000_000}}},
        },
        0.25,
    )
    assert (usage.used, usage.size) == (17, 1_000_000)
    assert usage.cost is not None
    assert (usage.cost.amount, usage.cost.currency) == (0.25, "USD")


def test_prompt_blocks_and_mcp_servers_in_the_daemons_shapes() -> None:
    blocks = [
        acp.text_block("look at this"),
        acp.resource_block(acp.embedded_text_resource("file:///a.py", "print(1)")),
        acp.resource_link_block("b.py", "file:///b.py"),
    ]
    text = prompt_text(blocks)  # type: ignore[arg-type]
    assert text.startswith('look at this\n\n<file uri="file:///a.py">\nprint(1)\n</file>')
    assert text.endswith("[b.py](file:///b.py)")
    servers = daemon_mcp_servers(
        [
            acp.schema.McpServerStdio(
                name="fs",
                command="npx",
                args=["fs"],
                env=[acp.schema.EnvVariable(name="K", value="v")],
            ),
            acp.schema.HttpMcpServer(
                type="http",
                name="web",
                url="http://127.0.0.1:1/mcp",
                headers=[acp.schema.HttpHeader(name="A", value="b")],
            ),
        ]
    )
    assert servers == {
        "fs": {"command": "npx", "args": ["fs"], "env": {"K": "v"}},
        "web": {"type": "http", "url": "http://127.0.0.1:1/mcp", "headers": {"A": "b"}},
    }
