"""What the ACP face needs of the daemon, as any client may use it: SPAWN ``new_session_id``
(a session named before its first turn), ``mcp_servers`` (an editor's MCP servers for a
turn) and GET_SESSION_HISTORY (a session's conversation from its log)."""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from daemon.claude.mcp_servers import McpConfigFiles, StdioServer
from tests.helpers import DaemonProcess, PublishedSchemas, error_of, spawn, wait_for
from tests.test_spawn import fake_invocations


def _mcp_config(argv: list[str]) -> dict[str, Any]:
    config = orjson.loads(Path(argv[argv.index("--mcp-config") + 1]).read_bytes())
    assert isinstance(config, dict)
    return config


def test_a_session_named_by_the_client_starts_with_that_id_and_then_resumes(
    make_daemon: Any,
) -> None:
    d = make_daemon()
    sid = str(uuid.uuid4())
    first = spawn(d, prompt="one", new_session_id=sid)["result"]
    assert first["session_id"] == sid
    second = spawn(d, prompt="two", session_id=sid)["result"]
    assert second["text"] == "echo: two (turn 2)"
    first_argv, second_argv = (inv["argv"] for inv in fake_invocations(d))
    assert first_argv[first_argv.index("--session-id") + 1] == sid
    assert second_argv[second_argv.index("--resume") + 1] == sid
    assert d.result("GET_SESSION", {"session_id": sid})["session"]["turns"] == 2


def test_a_new_session_id_is_refused_when_taken_or_contradicted(make_daemon: Any) -> None:
    d = make_daemon()
    sid = spawn(d, prompt="one")["result"]["session_id"]
    taken = error_of(spawn(d, prompt="again", new_session_id=sid), "SESSION_EXISTS")
    assert taken["details"]["session_id"] == sid
    both = error_of(
        spawn(d, prompt="x", new_session_id=str(uuid.uuid4()), session_id=sid),
        "INVALID_PARAMETERS",
    )
    assert both["details"]["parameter"] == "new_session_id"
    error_of(spawn(d, prompt="x", new_session_id="nope"), "INVALID_PARAMETERS")
    # Nothing of the refused SPAWNs ran.
    assert len(fake_invocations(d)) == 1


def test_mcp_servers_reach_the_cli_in_a_private_file_with_the_ksi_face(
    make_daemon: Any,
) -> None:
    d = make_daemon()
    secret = "sk-editor-" + uuid.uuid4().hex
    servers = {
        "files": {"command": "npx", "args": ["-y", "files-mcp"], "env": {"API_KEY": secret}},
        "web": {"type": "http", "url": "http://127.0.0.1:9/mcp", "headers": {"X-Key": secret}},
    }
    r = spawn(d, prompt="one", mcp_servers=servers, ksi_tools=True)["result"]
    spawn(d, prompt="two", session_id=r["session_id"], mcp_servers=servers, ksi_tools=True)
    first, second = (inv["argv"] for inv in fake_invocations(d))
    # Secrets never in argv (every local user can read it); one stable file per session's
    # servers, so a warm CLI keeps its flags.
    assert not any(secret in a for a in first)
    path = Path(first[first.index("--mcp-config") + 1])
    assert second[second.index("--mcp-config") + 1] == str(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    config = _mcp_config(first)["mcpServers"]
    assert config["files"] == {
        "type": "stdio",
        "command": "npx",
        "args": ["-y", "files-mcp"],
        "env": {"API_KEY": secret},
    }
    assert config["web"] == {
        "type": "http",
        "url": "http://127.0.0.1:9/mcp",
        "headers": {"X-Key": secret},
    }
    assert config["ksi"]["type"] == "http"  # the daemon's own face, merged in
    assert config["ksi"]["headers"]["Authorization"].startswith("Bearer ")


def test_bad_mcp_servers_are_refused_before_anything_runs(make_daemon: Any) -> None:
    d = make_daemon()
    cases: list[Any] = [
        {"ksi": {"command": "x"}},  # the daemon's own name
        {"a b": {"command": "x"}},
        {"w": {"type": "http", "url": "file:///etc/passwd"}},
        {"w": {"url": "http://127.0.0.1:1/mcp"}},  # no type: neither shape
        {"w": {"command": "x", "shell": True}},
        {"w": {"command": "x\u0000y"}},
        ["not", "a", "mapping"],
    ]
    for servers in cases:
        error_of(spawn(d, prompt="x", mcp_servers=servers), "INVALID_PARAMETERS")
    assert fake_invocations(d) == []


def test_session_history_is_the_conversation_from_the_log(make_daemon: Any) -> None:
    d = make_daemon()
    sid = spawn(d, prompt="one", agent_id="a1")["result"]["session_id"]
    spawn(d, prompt="two", session_id=sid)
    spawn(d, prompt="[[error:500]] three", session_id=sid)
    history = PublishedSchemas(d).ok(d, "GET_SESSION_HISTORY", {"session_id": sid})
    roles = [(e["role"], e["text"]) for e in history["entries"]]
    assert roles[:4] == [
        ("user", "one"),
        ("assistant", "echo: one (turn 1)"),
        ("user", "two"),
        ("assistant", "echo: two (turn 2)"),
    ]
    assert roles[4] == ("user", "[[error:500]] three")
    assert roles[5][0] == "error"
    assert roles[5][1]  # the failure's message
    assert history["entries"][0]["agent_id"] == "a1"
    assert history["total"] == 6
    newest = d.result("GET_SESSION_HISTORY", {"session_id": sid, "limit": 2})
    assert [e["text"] for e in newest["entries"]] == [e["text"] for e in history["entries"][-2:]]
    error_of(d.call("GET_SESSION_HISTORY", {"session_id": str(uuid.uuid4())}), "SESSION_NOT_FOUND")


def test_history_skips_a_damaged_line(make_daemon: Any) -> None:
    d = make_daemon()
    sid = spawn(d, prompt="one")["result"]["session_id"]
    log = Path(d.result("GET_SESSION", {"session_id": sid})["session"]["log_path"])
    with log.open("ab") as f:
        f.write(b'{"type": "human", "content": "cut off\n')
    entries = d.result("GET_SESSION_HISTORY", {"session_id": sid})["entries"]
    assert [e["text"] for e in entries] == ["one", "echo: one (turn 1)"]


def test_config_files_are_content_addressed_and_merge_a_base(tmp_path: Path) -> None:
    files = McpConfigFiles(tmp_path / "mcp")
    servers: dict[str, Any] = {"a": StdioServer(command="x")}
    base = tmp_path / "ksi.json"
    base.write_bytes(orjson.dumps({"mcpServers": {"ksi": {"type": "http", "url": "u"}}}))
    path = files.config_for(servers, str(base))
    assert files.config_for(servers, str(base)) == path
    assert files.config_for(servers, path) == path  # already resolved: kept
    merged = orjson.loads(Path(path).read_bytes())["mcpServers"]
    assert merged == {"a": {"type": "stdio", "command": "x"}, "ksi": {"type": "http", "url": "u"}}
    other = files.config_for({"b": StdioServer(command="y")}, None)
    assert other != path
    inline = files.config_for(servers, '{"mcpServers": {"z": {"command": "z"}}}')
    assert set(orjson.loads(Path(inline).read_bytes())["mcpServers"]) == {"a", "z"}


@pytest.mark.parametrize("warm", [True, False])
def test_a_named_session_runs_warm_or_cold(make_daemon: Any, warm: bool) -> None:
    d: DaemonProcess = make_daemon()
    sid = str(uuid.uuid4())
    r = spawn(d, prompt="one", new_session_id=sid, warm=warm)["result"]
    assert r["session_id"] == sid
    assert spawn(d, prompt="two", session_id=sid, warm=warm)["result"]["text"].endswith("(turn 2)")


def test_a_session_whose_first_turn_was_cancelled_before_the_cli_wrote_begins_again(
    make_daemon: Any,
) -> None:
    # The CLI takes 2 s to start, so the cancel comes before it has kept anything.
    d: DaemonProcess = make_daemon(env={"FAKE_CLAUDE_START_DELAY": "2"})
    sid = str(uuid.uuid4())
    accepted = spawn(d, prompt="[[sleep:30]] one", new_session_id=sid, mode="async")["result"]
    pid = accepted["process_id"]
    wait_for(lambda: _status(d, pid) == "running", timeout=10)
    d.result("CANCEL_PROCESS", {"process_id": pid})
    wait_for(lambda: d.call("GET_SESSION", {"session_id": sid})["status"] == "success")
    # Nothing to resume: the next turn is the session's first, under the same id.
    again = spawn(d, prompt="two", session_id=sid)["result"]
    assert again["session_id"] == sid
    assert again["text"] == "echo: two (turn 1)"
    argv = fake_invocations(d)[-1]["argv"]
    assert argv[argv.index("--session-id") + 1] == sid
    # From then on it resumes as any session does.
    third = spawn(d, prompt="three", session_id=sid)["result"]
    assert third["text"] == "echo: three (turn 2)"


def _status(d: DaemonProcess, process_id: str) -> str | None:
    for p in d.result("GET_PROCESSES")["processes"]:
        if p["process_id"] == process_id:
            status: str = p["status"]
            return status
    return None
