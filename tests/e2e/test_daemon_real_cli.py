"""The daemon and the provider driving the REAL pinned Claude Code CLI, offline.

Every model call goes to the loopback stub (``devtools/stub_api.py``); the stub's request
log shows what the CLI really sent, which is how continuity and serialisation are proven.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.claude.engine import ClaudeEngine, EngineConfig
from daemon.client import AsyncClient
from devtools.stub_api import StubAPI
from tests.helpers import NO_CREDENTIALS, DaemonProcess, eventually, pid_alive, wait_for


@pytest.fixture
def real_daemon(start_real_daemon: Callable[..., DaemonProcess]) -> DaemonProcess:
    return start_real_daemon()


def user_texts(request: dict[str, Any]) -> list[str]:
    """The user/assistant texts of one logged Messages API request, reminders left out."""
    out = []
    for msg in request["body"]["messages"]:
        if msg["role"] not in ("user", "assistant"):
            continue
        content = msg["content"]
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for block in blocks:
            if block.get("type") == "text" and not block["text"].startswith("<system-reminder>"):
                out.append(f"{msg['role']}:{block['text'].strip()}")
    return out


def model_calls(stub: StubAPI) -> list[dict[str, Any]]:
    return [r for r in stub.requests() if r["method"] == "POST" and r["path"] == "/v1/messages"]


def spawn(d: DaemonProcess, **params: Any) -> dict[str, Any]:
    params.setdefault("cwd", str(d.work))
    return d.call("SPAWN", params)


def test_sync_spawn_and_resume_with_the_real_cli(
    real_daemon: DaemonProcess, stub_api: StubAPI
) -> None:
    health = wait_for(
        lambda: (h := real_daemon.result("HEALTH_CHECK"))["claude"]["version_probed"] and h
    )
    assert health["claude"]["found"]
    assert health["claude"]["version"] == "2.1.197"
    first = spawn(real_daemon, prompt="hello", model="sonnet")
    assert first["status"] == "success", first
    r1 = first["result"]
    assert r1["text"] == "echo: hello"
    assert r1["cost_usd"] > 0
    assert r1["usage"]["input_tokens"] > 0
    assert r1["model"].startswith("claude-sonnet")
    sid = r1["session_id"]
    second = spawn(real_daemon, prompt="second", session_id=sid)["result"]
    assert second["text"] == "echo: second"
    assert second["session_id"] == sid
    # The stub saw the whole earlier conversation on the resumed turn.
    assert user_texts(model_calls(stub_api)[-1]) == [
        "user:hello",
        "assistant:echo: hello",
        "user:second",
    ]


async def test_concurrent_turns_of_one_session_are_serialised(
    real_daemon: DaemonProcess, stub_api: StubAPI
) -> None:
    sid = spawn(real_daemon, prompt="base")["result"]["session_id"]
    async with AsyncClient.connect(real_daemon.socket) as c:
        a, b = await asyncio.gather(
            c.call("SPAWN", {"prompt": "alpha", "session_id": sid}),
            c.call("SPAWN", {"prompt": "beta", "session_id": sid}),
        )
    assert {a["text"], b["text"]} == {"echo: alpha", "echo: beta"}
    last = spawn(real_daemon, prompt="check", session_id=sid)["result"]
    assert last["text"] == "echo: check"
    texts = user_texts(model_calls(stub_api)[-1])
    # Forked history would lose one of the two: both must be in the final conversation.
    assert "user:alpha" in texts
    assert "user:beta" in texts
    assert texts[0] == "user:base"


async def test_async_spawn_publishes_process_complete(real_daemon: DaemonProcess) -> None:
    async with AsyncClient.connect(real_daemon.socket) as c:
        await c.subscribe(["PROCESS_COMPLETE"])
        reply = await c.call(
            "SPAWN", {"prompt": "in the background", "mode": "async", "cwd": str(real_daemon.work)}
        )
        event = await c.next_event(timeout=60)
    assert event["event"] == "PROCESS_COMPLETE"
    assert event["data"]["process_id"] == reply["process_id"]
    assert event["data"]["status"] == "completed"
    assert event["data"]["text"] == "echo: in the background"


@pytest.mark.parametrize(
    ("status", "code"), [(401, "AUTH_FAILED"), (429, "RATE_LIMITED"), (500, "API_ERROR")]
)
def test_api_errors_become_typed_codes(real_daemon: DaemonProcess, status: int, code: str) -> None:
    reply = spawn(real_daemon, prompt=f"[[error:{status}]]")
    assert reply["status"] == "error"
    assert reply["error"]["code"] == code
    assert reply["error"]["details"]["api_error_status"] == status
    assert reply["error"]["details"]["exit_code"] == 1


def test_no_credentials_is_auth_failed_and_unhealthy(
    start_real_daemon: Callable[..., DaemonProcess], stub_api: StubAPI
) -> None:
    d = start_real_daemon(**NO_CREDENTIALS)
    health = d.call("HEALTH_CHECK")["result"]
    assert (health["status"], health["claude"]["auth"]["status"]) == ("degraded", "missing")
    reply = spawn(d, prompt="hello")
    assert reply["error"]["code"] == "AUTH_FAILED", reply
    assert "Not logged in" in reply["error"]["message"]
    assert model_calls(stub_api) == []  # the CLI knew without asking the API
    assert d.call("HEALTH_CHECK")["result"]["claude"]["auth"]["status"] == "failed"


def test_unknown_session_is_session_not_found(real_daemon: DaemonProcess) -> None:
    reply = spawn(real_daemon, prompt="hi", session_id="0b7e2cbe-5d0e-4a52-8b0e-5c1f9d1f2a11")
    assert reply["error"]["code"] == "SESSION_NOT_FOUND"
    assert "No conversation found" in reply["error"]["details"]["stderr_tail"]


async def test_timeout_and_cancel_kill_the_real_cli(real_daemon: DaemonProcess) -> None:
    async with AsyncClient.connect(real_daemon.socket) as c:
        await c.subscribe(["PROCESS_STARTED"])
        timed = await c.request(
            "SPAWN", {"prompt": "[[sleep:30]] slow", "timeout_s": 3, "cwd": str(real_daemon.work)}
        )
        started = await c.next_event(timeout=10)
        assert timed["error"]["code"] == "TIMEOUT"
        assert not pid_alive(started["data"]["pid"])

        job = await c.call(
            "SPAWN",
            {"prompt": "[[sleep:30]] cancel me", "mode": "async", "cwd": str(real_daemon.work)},
        )
        started = await c.next_event(timeout=20)
        pid = started["data"]["pid"]
        assert pid_alive(pid)
        cancelled = await c.call("CANCEL_PROCESS", {"process_id": job["process_id"]})
        assert cancelled["status"] == "cancelled"
    await eventually(lambda: not pid_alive(pid), timeout=5)


def test_tool_round_trip_with_allowed_tools(real_daemon: DaemonProcess, stub_api: StubAPI) -> None:
    r = spawn(real_daemon, prompt="[[bash:echo hi]]", allowed_tools=["Bash"])["result"]
    assert r["text"] == "tool result: hi"
    assert r["num_turns"] == 2
    assert len(model_calls(stub_api)) == 2


async def test_provider_straight_from_litellm(
    real_claude_bin: Path,
    claude_env: dict[str, str],
    claude_cwd: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import litellm

    import claude_cli_provider

    for key, value in claude_env.items():
        monkeypatch.setenv(key, value)
    engine = ClaudeEngine(
        EngineConfig(
            project_root=claude_cwd, default_cwd=claude_cwd, claude_bin=str(real_claude_bin)
        )
    )
    saved = list(litellm.custom_provider_map)
    claude_cli_provider.register(claude_cli_provider.ClaudeCLIProvider(engine))
    try:
        resp = await litellm.acompletion(
            model="claude-cli/sonnet",
            messages=[{"role": "user", "content": "direct"}],
            claude={"cwd": str(claude_cwd)},
        )
        assert resp.choices[0].message.content == "echo: direct"
        sid = resp._hidden_params["claude_session_id"]
        assert resp._hidden_params["response_cost"] > 0

        stream = await litellm.acompletion(
            model="claude-cli/sonnet",
            stream=True,
            messages=[{"role": "user", "content": "streamed"}],
            claude={"session_id": sid},
        )
        text, session = "", None
        try:
            async for chunk in stream:
                text += chunk.choices[0].delta.content or ""
                session = getattr(chunk, "claude_session_id", None) or session
        finally:
            await stream.aclose()
        assert text == "echo: streamed"
        assert session == sid
    finally:
        litellm.custom_provider_map = saved
        await engine.aclose()


def test_a_transient_failure_is_retried_and_the_model_sees_one_prompt(
    real_daemon: DaemonProcess, stub_api: StubAPI
) -> None:
    """The real CLI stores a prompt before it calls the API and sends it again on the next
    resume; the daemon's retry rewinds the session first, for a first turn and a resumed
    one. (The work directory's name has "_": the CLI's slug turns it into "-".)"""
    stub_api.script_failure(529, 2)
    first = spawn(real_daemon, prompt="hello")
    assert first["status"] == "success", first
    assert first["result"]["text"] == "echo: hello"
    sid = first["result"]["session_id"]
    stub_api.script_failure(429, 1)
    second = spawn(real_daemon, prompt="second", session_id=sid)
    assert second["status"] == "success", second
    calls = model_calls(stub_api)
    assert user_texts(calls[-1]) == ["user:hello", "assistant:echo: hello", "user:second"]
    events = real_daemon.result("GET_EVENTS", {"event_types": ["PROCESS_PROGRESS"]})["events"]
    retries = [
        (e["data"]["status"], e["data"]["attempt"])
        for e in events
        if e["data"]["kind"] == "api_retry"
    ]
    assert retries == [(529, 1), (529, 2), (429, 1)]


TOOL_KINDS = ["started", "text", "tool_use", "tool_result", "text"]


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_a_tool_turn_streams_its_progress_with_the_real_cli(
    real_daemon: DaemonProcess, warm: bool
) -> None:
    work = str(real_daemon.work)
    async with (
        AsyncClient.connect(real_daemon.socket) as watcher,
        AsyncClient.connect(real_daemon.socket) as caller,
    ):
        await watcher.subscribe(["PROCESS_PROGRESS", "PROCESS_COMPLETE"])
        turn = await caller.spawn_stream(
            "[[say:Let me check.]] [[bash:echo hi]]", cwd=work, allowed_tools=["Bash"], warm=warm
        )
        streamed = [event async for event in turn]
        result = turn.result()
        seen: list[dict[str, Any]] = []
        while not seen or seen[-1]["event"] != "PROCESS_COMPLETE":
            seen.append(await watcher.next_event(timeout=30))
    assert result["text"] == "tool result: hi"
    assert result["warm"] is warm
    progress = [e["data"] for e in streamed]
    assert [p["kind"] for p in progress] == TOOL_KINDS
    assert [p["index"] for p in progress] == list(range(len(TOOL_KINDS)))
    started, said, use, tool_result, answer = progress
    assert started["cwd"] == work
    assert "Bash" in started["tools"]
    assert said["text"] == "Let me check."
    assert (use["name"], use["input"]["command"]) == ("Bash", "echo hi")
    assert (tool_result["tool_use_id"], tool_result["content"]) == (use["tool_use_id"], "hi")
    assert answer["text"] == result["text"]
    # The subscriber saw the same events (without the request's id), then the completion.
    assert [e["data"] for e in seen[:-1]] == progress
    assert seen[-1]["data"]["process_id"] == result["process_id"]


async def test_a_late_subscriber_and_a_cancel_mid_stream_with_the_real_cli(
    real_daemon: DaemonProcess,
) -> None:
    work = str(real_daemon.work)
    async with (
        AsyncClient.connect(real_daemon.socket) as caller,
        AsyncClient.connect(real_daemon.socket) as late,
    ):
        turn = await caller.spawn_stream(
            "[[say:This takes a while.]] [[bash:sleep 30]]",
            cwd=work,
            allowed_tools=["Bash"],
            warm=False,
        )
        early: list[dict[str, Any]] = []
        async for event in turn:
            early.append(event["data"])
            if event["data"]["kind"] == "tool_use":  # the tool now runs for 30 s
                break
        process_id = early[0]["process_id"]
        procs = real_daemon.result("GET_PROCESSES")["processes"]
        pid = next(p["pid"] for p in procs if p["process_id"] == process_id)
        await late.subscribe(["PROCESS_PROGRESS", "PROCESS_COMPLETE"])
        cancelled = await late.call("CANCEL_PROCESS", {"process_id": process_id})
        assert cancelled["status"] == "cancelled"
        reply = await asyncio.wait_for(turn.wait(), 30)
        rest: list[dict[str, Any]] = []
        while not rest or rest[-1]["event"] != "PROCESS_COMPLETE":
            rest.append(await late.next_event(timeout=30))
    assert [p["kind"] for p in early] == ["started", "text", "tool_use"]
    assert reply["error"]["code"] == "CANCELLED"
    complete = rest[-1]["data"]
    assert (complete["process_id"], complete["status"]) == (process_id, "cancelled")
    # What the late subscriber got continues the turn's numbering: nothing missed, no repeat.
    indices = [e["data"]["index"] for e in rest[:-1]]
    assert indices == list(range(len(early), len(early) + len(indices)))
    await eventually(lambda: not pid_alive(pid), timeout=5)  # the CLI and its tool are gone
