"""Tests of the loopback stub Messages API, over plain HTTP and with the real pinned CLI.

The HTTP tests pin the wire details the CLI depends on (SSE framing, error bodies, system-role
messages). The CLI tests prove the stub is good enough to stand in for the real API: one-shot
JSON turns, ``--resume`` history, API errors, a Bash tool round trip and warm mode.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from devtools.stub_api import HOST, TOOL_RESULT_PREVIEW, StubAPI

PROJECT_ROOT = Path(__file__).resolve().parents[2]
RunClaude = Callable[..., "subprocess.CompletedProcess[str]"]
JSON_ARGS = ["-p", "--output-format", "json"]
WARM_ARGS = ["-p", "--input-format", "stream-json", "--output-format", "stream-json", "--verbose"]
REMINDER = "<system-reminder>\ncurrentDate: today\n</system-reminder>\n"


# --------------------------------------------------------------------------- helpers


def _post(api: StubAPI, body: dict[str, Any], path: str = "/v1/messages?beta=true") -> Any:
    request = urllib.request.Request(
        api.url + path,
        data=json.dumps(body).encode(),
        headers={
            "content-type": "application/json",
            "x-api-key": "secret-key",
            "x-claude-code-session-id": "sess-1",
        },
        method="POST",
    )
    return urllib.request.urlopen(request, timeout=10)


def _sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Split an SSE body into (event, data) pairs, checking each frame's shape."""
    events = []
    for frame in raw.decode().split("\n\n"):
        if not frame:
            continue
        event_line, data_line = frame.split("\n")
        assert event_line.startswith("event: ")
        assert data_line.startswith("data: ")
        data = json.loads(data_line.removeprefix("data: "))
        assert data["type"] == event_line.removeprefix("event: ")
        events.append((data["type"], data))
    return events


def _user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": text}]}


def _posts(api: StubAPI) -> list[dict[str, Any]]:
    return [r for r in api.requests() if r["method"] == "POST"]


def _result(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.stdout, f"no stdout; rc={proc.returncode} stderr={proc.stderr!r}"
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


# --------------------------------------------------------------------------- pure HTTP


def test_binds_loopback_only(stub_api: StubAPI) -> None:
    assert stub_api.url == f"http://{HOST}:{stub_api.port}"
    assert HOST == "127.0.0.1"


def test_stream_sse_framing_skips_reminders_and_system_messages(stub_api: StubAPI) -> None:
    body = {
        "model": "claude-test-1",
        "stream": True,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": REMINDER},
                    {"type": "text", "text": "a prompt longer than sixteen characters"},
                ],
            },
            # The CLI sends a system entry after the user turn (mid-conversation-system beta).
            {"role": "system", "content": "agent listing"},
        ],
    }
    with _post(stub_api, body) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["Transfer-Encoding"] == "chunked"
        events = _sse(response.read())

    kinds = [kind for kind, _ in events]
    assert kinds[:3] == ["message_start", "content_block_start", "ping"]
    assert kinds[-4:] == [
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    deltas = [d["delta"]["text"] for kind, d in events if kind == "content_block_delta"]
    assert all(len(piece) <= 16 for piece in deltas)
    assert "".join(deltas) == "echo: a prompt longer than sixteen characters"
    start = events[0][1]["message"]
    assert start["model"] == "claude-test-1"
    assert start["id"].startswith("msg_")
    message_delta = events[-2][1]
    assert message_delta["delta"]["stop_reason"] == "end_turn"
    assert message_delta["usage"]["output_tokens"] > 0

    (entry,) = stub_api.requests()
    assert (entry["method"], entry["path"], entry["query"]) == ("POST", "/v1/messages", "beta=true")
    assert entry["status"] == 200
    assert entry["session"] == "sess-1"
    assert entry["headers"]["x-api-key"] == "<redacted>"
    assert entry["body"]["model"] == "claude-test-1"


def test_json_reply_is_deterministic(stub_api: StubAPI) -> None:
    body = {"model": "m", "messages": [_user("same")]}
    with _post(stub_api, body) as first, _post(stub_api, body) as second:
        a, b = json.load(first), json.load(second)
    assert a == b
    assert a["content"] == [{"type": "text", "text": "echo: same"}]
    assert a["stop_reason"] == "end_turn"
    assert a["usage"]["input_tokens"] == (len(json.dumps(body)) + 3) // 4


def test_tool_triggers_and_tool_result(stub_api: StubAPI) -> None:
    bash = {"name": "Bash", "input_schema": {"type": "object"}}
    # No Bash offered: the trigger is just text.
    with _post(stub_api, {"messages": [_user("[[bash:ls]]")]}) as r:
        assert json.load(r)["content"][0]["text"] == "echo: [[bash:ls]]"
    with _post(stub_api, {"messages": [_user("[[bash:ls -l]]")], "tools": [bash]}) as r:
        reply = json.load(r)
    assert reply["stop_reason"] == "tool_use"
    (tool_use,) = reply["content"]
    assert (tool_use["name"], tool_use["input"]) == ("Bash", {"command": "ls -l"})
    with _post(stub_api, {"messages": [_user('[[tool:Read:{"file_path": "/x"}]]')]}) as r:
        assert json.load(r)["content"][0]["input"] == {"file_path": "/x"}

    result_turn = {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_use_id": tool_use["id"],
                "content": "x" * (TOOL_RESULT_PREVIEW + 100),
            }
        ],
    }
    messages = [_user("[[bash:ls -l]]"), {"role": "assistant", "content": [tool_use]}, result_turn]
    with _post(stub_api, {"messages": messages, "tools": [bash]}) as r:
        assert json.load(r)["content"][0]["text"] == "tool result: " + "x" * TOOL_RESULT_PREVIEW


def test_then_trigger_chains_a_second_tool_with_the_first_result(stub_api: StubAPI) -> None:
    prompt = '[[tool:start:{"n": 1}]] [[then:finish:{"id": "{{result.pid}}", "t": 5}]]'
    with _post(stub_api, {"messages": [_user(prompt)]}) as r:
        first = json.load(r)["content"][0]
    assert (first["name"], first["input"]) == ("start", {"n": 1})

    def result_of(tool_use: dict[str, Any], content: str) -> dict[str, Any]:
        block = {"type": "tool_result", "tool_use_id": tool_use["id"], "content": content}
        return {"role": "user", "content": [block]}

    messages = [
        _user(prompt),
        {"role": "assistant", "content": [first]},
        result_of(first, '{"pid": "abc123"}'),
    ]
    with _post(stub_api, {"messages": messages}) as r:
        second = json.load(r)["content"][0]
    assert (second["name"], second["input"]) == ("finish", {"id": "abc123", "t": 5})
    messages += [{"role": "assistant", "content": [second]}, result_of(second, "all done")]
    with _post(stub_api, {"messages": messages}) as r:  # after the second: the answer
        assert json.load(r)["content"][0]["text"] == "tool result: all done"


def test_error_trigger_and_scripted_failures(stub_api: StubAPI) -> None:
    with pytest.raises(urllib.error.HTTPError) as caught:
        _post(stub_api, {"messages": [_user("x [[error:529]]")]})
    assert caught.value.code == 529
    with caught.value:  # an HTTPError holds the response (and its socket) until closed
        assert json.load(caught.value) == {
            "type": "error",
            "error": {"type": "overloaded_error", "message": "fake triggered 529"},
        }

    stub_api.script_failure(503, 1, retry_after=2)
    with pytest.raises(urllib.error.HTTPError) as caught:
        _post(stub_api, {"messages": [_user("hi")]})
    with caught.value:
        assert caught.value.code == 503
        assert caught.value.headers["retry-after"] == "2"
    with _post(stub_api, {"messages": [_user("hi")]}) as r:
        assert r.status == 200


def test_head_probe_unknown_path_and_keep_alive(stub_api: StubAPI) -> None:
    conn = http.client.HTTPConnection(HOST, stub_api.port, timeout=10)
    try:
        # Several requests on one connection: the CLI relies on HTTP/1.1 keep-alive.
        conn.request("HEAD", "/")
        probe = conn.getresponse()
        probe.read()
        assert probe.status == 200
        conn.request("GET", "/v1/nothing")
        missing = conn.getresponse()
        assert missing.status == 404
        assert json.loads(missing.read())["error"]["type"] == "not_found_error"
        conn.request("GET", "/v1/models")
        models = conn.getresponse()
        assert models.status == 200
        assert json.loads(models.read())["data"]
    finally:
        conn.close()
    assert [(r["method"], r["status"], r["note"]) for r in stub_api.requests()] == [
        ("HEAD", 200, ""),
        ("GET", 404, "UNKNOWN PATH"),
        ("GET", 200, ""),
    ]


def test_command_line_prints_port_and_logs(tmp_path: Path) -> None:
    port_file, log = tmp_path / "port", tmp_path / "log.jsonl"
    argv = [sys.executable, "-m", "devtools.stub_api", "--port", "0", "--port-file", str(port_file)]
    argv += ["--log", str(log), "--quiet", "--fail-status", "500", "--fail-count", "1"]
    proc = subprocess.Popen(
        argv,
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("PORT=")
        port = int(line.removeprefix("PORT=").strip())
        assert int(port_file.read_text()) == port
        api_url = f"http://{HOST}:{port}/v1/messages"
        request = urllib.request.Request(api_url, data=b'{"messages":[]}', method="POST")
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        with caught.value:
            assert caught.value.code == 500
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        if proc.stdout is not None:
            proc.stdout.close()
    (entry,) = [json.loads(x) for x in log.read_text().splitlines()]
    assert entry["status"] == 500
    assert "scripted failure" in entry["note"]


# --------------------------------------------------------------------------- real CLI, one-shot


def test_json_turn_echoes(run_claude: RunClaude, stub_api: StubAPI) -> None:
    proc = run_claude(JSON_ARGS, "hello")
    assert proc.returncode == 0, proc.stderr
    result = _result(proc)
    assert result["is_error"] is False
    assert result["result"] == "echo: hello"
    assert [(r["method"], r["path"]) for r in stub_api.requests()] == [
        ("HEAD", "/"),
        ("POST", "/v1/messages"),
    ]
    assert _posts(stub_api)[0]["session"] == result["session_id"]


def test_resume_sends_full_history(run_claude: RunClaude, stub_api: StubAPI) -> None:
    first = _result(run_claude(JSON_ARGS, "hello"))
    stub_api.clear()
    proc = run_claude([*JSON_ARGS, "--resume", first["session_id"]], "second")
    assert proc.returncode == 0, proc.stderr
    second = _result(proc)
    assert second["session_id"] == first["session_id"]
    assert second["result"] == "echo: second"

    (request,) = _posts(stub_api)
    messages = request["body"]["messages"]
    assert [m["role"] for m in messages] == ["user", "system", "assistant", "user"]
    assert messages[0]["content"][-1]["text"] == "hello"
    assert messages[2]["content"] == [{"type": "text", "text": "echo: hello"}]
    assert messages[3]["content"][-1]["text"] == "second"


@pytest.mark.parametrize("status", [401, 429, 500])
def test_api_errors_are_reported(run_claude: RunClaude, stub_api: StubAPI, status: int) -> None:
    proc = run_claude(JSON_ARGS, f"boom [[error:{status}]]")
    assert proc.returncode == 1
    result = _result(proc)
    assert result["is_error"] is True
    assert result["api_error_status"] == status
    # subtype stays "success" on API errors (claude-cli.md §4).
    assert result["subtype"] == "success"
    assert f"fake triggered {status}" in result["result"]
    # CLAUDE_CODE_MAX_RETRIES=0: exactly one attempt.
    assert [r["status"] for r in _posts(stub_api)] == [status]


def test_resume_unknown_session(run_claude: RunClaude, stub_api: StubAPI) -> None:
    unknown = str(uuid.uuid4())
    proc = run_claude([*JSON_ARGS, "--resume", unknown], "hello")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert f"No conversation found with session ID: {unknown}" in proc.stderr
    assert _posts(stub_api) == []


def test_bash_tool_round_trip(run_claude: RunClaude, stub_api: StubAPI) -> None:
    proc = run_claude([*JSON_ARGS, "--allowedTools", "Bash"], "[[bash:echo hi]]")
    assert proc.returncode == 0, proc.stderr
    result = _result(proc)
    assert result["result"] == "tool result: hi"
    assert result["num_turns"] == 2
    notes = [r["note"] for r in _posts(stub_api)]
    assert len(notes) == 2
    assert "tool_use Bash" in notes[0]
    assert "after tool_result" in notes[1]


# --------------------------------------------------------------------------- real CLI, warm mode


class WarmCLI:
    """One long-lived ``claude -p --input-format stream-json`` process."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []

    async def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        await self.proc.stdin.drain()

    async def user(self, text: str) -> None:
        await self.send({"type": "user", "message": _user(text)})

    async def until(self, kind: str, timeout: float = 20) -> dict[str, Any]:
        """Read stdout lines until one of ``type == kind`` arrives."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stdout.readline()
                assert raw, f"CLI closed stdout; lines so far: {self.lines}"
                line: dict[str, Any] = json.loads(raw)
                self.lines.append(line)
                if line["type"] == kind:
                    return line


@pytest.fixture
async def warm_cli(real_claude_bin: Path, claude_env: dict[str, str], claude_cwd: Path):
    session_id = str(uuid.uuid4())
    proc = await asyncio.create_subprocess_exec(
        str(real_claude_bin),
        *WARM_ARGS,
        "--session-id",
        session_id,
        cwd=claude_cwd,
        env=claude_env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # One stream-json line can be megabytes (claude-cli.md §12).
        limit=16 * 1024 * 1024,
    )
    warm = WarmCLI(proc)
    try:
        yield warm
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_warm_two_turns_on_one_process(warm_cli: WarmCLI, stub_api: StubAPI) -> None:
    await warm_cli.user("first")
    first = await warm_cli.until("result")
    await warm_cli.user("second")
    second = await warm_cli.until("result")
    assert (first["result"], second["result"]) == ("echo: first", "echo: second")
    assert first["session_id"] == second["session_id"]

    turn2 = _posts(stub_api)[-1]["body"]["messages"]
    assert [m["role"] for m in turn2] == ["user", "system", "assistant", "user"]

    # Closing stdin is the clean way to end a warm process.
    assert warm_cli.proc.stdin is not None
    warm_cli.proc.stdin.close()
    assert await asyncio.wait_for(warm_cli.proc.wait(), 10) == 0


async def test_warm_interrupt_keeps_process_usable(warm_cli: WarmCLI, stub_api: StubAPI) -> None:
    await warm_cli.user("slow [[sleep:5]]")
    # Interrupt only once the request is waiting in the stub, so the turn is really in flight.
    deadline = time.monotonic() + 15
    while not any("sleep 5" in r["note"] for r in _posts(stub_api)):
        assert time.monotonic() < deadline, "the slow request never reached the stub"
        await asyncio.sleep(0.05)
    request = {"type": "control_request", "request_id": "r1", "request": {"subtype": "interrupt"}}
    await warm_cli.send(request)

    response = await warm_cli.until("control_response", timeout=5)
    assert response["response"] == {"subtype": "success", "request_id": "r1"}
    interrupted = await warm_cli.until("result", timeout=5)
    assert interrupted["subtype"] == "error_during_execution"
    assert interrupted["is_error"] is True
    assert interrupted["terminal_reason"] == "aborted_streaming"

    await warm_cli.user("after")
    after = await warm_cli.until("result")
    assert after["is_error"] is False
    assert after["result"].endswith("after")
