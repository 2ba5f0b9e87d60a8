"""ClaudeEngine (and its options, argv, result parsing, locator) against the fake CLI.

Every test gets its own CLAUDE_CONFIG_DIR and cwd (tmp dirs), so sessions never
leak between tests. Process death is proven by pid (see tests/test_runner.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pydantic
import pytest

from daemon.claude import (
    ClaudeCLIError,
    ClaudeEngine,
    ClaudeOptions,
    EngineConfig,
    ErrorCode,
    StartInfo,
    TurnStream,
)
from daemon.claude.argv import build_argv
from daemon.claude.locate import claude_version, locate_claude
from daemon.claude.results import StdoutLines, TurnResult, classify_result
from tests.test_runner import assert_gone, wait_for_file

ROOT = Path(__file__).resolve().parents[1]
FAKE = ROOT / "devtools" / "fake_claude.py"
SID = "6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f"


class Env:
    """Paths of one test's private fake-CLI world."""

    def __init__(self, tmp: Path) -> None:
        self.config = tmp / "config"
        self.cwd = tmp / "cwd"
        self.log = tmp / "fake.jsonl"
        self.tmp = tmp
        self.config.mkdir()
        self.cwd.mkdir()

    def engine(self, **overrides: Any) -> ClaudeEngine:
        params: dict[str, Any] = {
            "claude_bin": str(FAKE),
            "project_root": ROOT,
            "default_cwd": self.cwd,
            "default_timeout_s": 30.0,
            "term_grace_s": 1.0,
            "extra_env": {"CLAUDE_CONFIG_DIR": str(self.config), "FAKE_CLAUDE_LOG": str(self.log)},
            # Cold unless a test asks for warm (opts.warm, or this override): these are tests
            # of one CLI run per turn; the warm backend's are in tests/test_warm.py.
            "warm_default": False,
        }
        params.update(overrides)
        return ClaudeEngine(EngineConfig(**params))

    def entries(self) -> list[dict[str, Any]]:
        """Everything the fake CLI logged (FAKE_CLAUDE_LOG)."""
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def invocations(self) -> list[dict[str, Any]]:
        return [entry for entry in self.entries() if "argv" in entry]


@pytest.fixture(name="env")
def _env(tmp_path: Path) -> Env:
    return Env(tmp_path)


@pytest.fixture(name="engine")
async def _engine(env: Env) -> AsyncIterator[ClaudeEngine]:
    engine = env.engine()
    yield engine
    await engine.aclose()


# -- turns -----------------------------------------------------------------------------


async def test_turn_result_fields(engine: ClaudeEngine, env: Env) -> None:
    starts: list[StartInfo] = []
    result = await engine.run_turn(
        "hello", model="sonnet", opts=ClaudeOptions(on_start=starts.append)
    )
    assert result.text == "echo: hello (turn 1)"
    assert str(uuid.UUID(result.session_id)) == result.session_id
    assert result.is_error is False
    assert result.cost_usd > 0
    assert result.usage["input_tokens"] > 0
    assert result.num_turns == 1
    assert result.duration_ms >= 0
    assert result.model == "claude-sonnet-5"
    assert result.raw["type"] == "result"
    assert result.exit_code == 0
    assert result.stderr_tail == ""
    [info] = starts
    assert info.pid == result.pid
    assert info.session_id == result.session_id
    assert info.mode == "cold"
    assert info.cwd == str(env.cwd)
    assert "hello" not in " ".join(info.argv)
    assert info.argv[info.argv.index("--session-id") + 1] == result.session_id
    assert result.to_dict()["text"] == result.text
    assert result.pid is not None
    await assert_gone(result.pid)
    assert engine.describe()["running"] == 0
    assert engine.describe()["active_sessions"] == 0


async def test_new_session_id_is_used(engine: ClaudeEngine) -> None:
    result = await engine.run_turn("hi", opts=ClaudeOptions(new_session_id=SID.upper()))
    assert result.session_id == SID


async def test_resume_continues_the_session(engine: ClaudeEngine, env: Env) -> None:
    first = await engine.run_turn("one")
    second = await engine.run_turn("two", opts=ClaudeOptions(session_id=first.session_id))
    assert second.session_id == first.session_id
    assert second.text == "echo: two (turn 2)"
    argv = env.invocations()[-1]["argv"]
    assert argv[argv.index("--resume") + 1] == first.session_id


async def test_turns_of_one_session_are_serialised(engine: ClaudeEngine, env: Env) -> None:
    first = await engine.run_turn("one")
    opts = ClaudeOptions(session_id=first.session_id)
    results = await asyncio.gather(
        engine.run_turn("[[sleep:0.4]] a", opts=opts),
        engine.run_turn("[[sleep:0.4]] b", opts=opts),
    )
    assert sorted(r.text[-len("(turn 2)") :] for r in results) == ["(turn 2)", "(turn 3)"]
    # The turn numbers alone could pass by luck (the fake stores the prompt early);
    # the start times prove the second CLI only started after the first one's sleep.
    starts = sorted(c["time"] for c in env.invocations()[1:3])
    assert starts[1] - starts[0] >= 0.4
    third = await engine.run_turn("four", opts=opts)
    assert third.text.endswith("(turn 4)")


async def test_different_sessions_run_in_parallel(engine: ClaudeEngine) -> None:
    t0 = time.monotonic()
    results = await asyncio.gather(*(engine.run_turn("[[sleep:1]] p") for _ in range(3)))
    assert time.monotonic() - t0 < 2.5
    assert len({r.session_id for r in results}) == 3


async def test_resume_reuses_the_session_cwd(engine: ClaudeEngine, env: Env) -> None:
    project = env.tmp / "project"
    other = env.tmp / "other"
    project.mkdir()
    other.mkdir()
    first = await engine.run_turn("one", opts=ClaudeOptions(cwd=str(project)))
    starts: list[StartInfo] = []
    second = await engine.run_turn(
        "two", opts=ClaudeOptions(session_id=first.session_id, on_start=starts.append)
    )
    assert second.text.endswith("(turn 2)")
    assert starts[0].cwd == str(project)
    assert await engine.sessions.cwd_of(first.session_id) == str(project)
    # Resume is cwd-scoped in the CLI: elsewhere the session does not exist.
    with pytest.raises(ClaudeCLIError) as info:
        await engine.run_turn("x", opts=ClaudeOptions(session_id=first.session_id, cwd=str(other)))
    assert info.value.code is ErrorCode.SESSION_NOT_FOUND
    # A fresh engine has no memory of the cwd and falls back to default_cwd.
    fresh = env.engine()
    with pytest.raises(ClaudeCLIError) as info:
        await fresh.run_turn("x", opts=ClaudeOptions(session_id=first.session_id))
    assert info.value.code is ErrorCode.SESSION_NOT_FOUND


async def test_child_env(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAUDECODE", "1")
    engine = env.engine()
    await engine.run_turn("hi")
    [call] = env.invocations()
    assert call["env_CLAUDECODE"] is None
    assert call["stdin_is_tty"] is False


async def test_prompt_goes_through_stdin(engine: ClaudeEngine, env: Env) -> None:
    result = await engine.run_turn("--help me")
    assert result.text == "echo: --help me (turn 1)"
    big = "word " * 200_000  # 1 MB
    result = await engine.run_turn(big)
    assert len(result.text) > 1_000_000
    assert all(len(" ".join(c["argv"])) < 1000 for c in env.invocations())


async def test_huge_reply_and_noisy_stderr(engine: ClaudeEngine) -> None:
    result = await engine.run_turn("[[huge:3000000]] [[stderr:200000]]")
    assert len(result.text) == 3_000_000
    assert len(result.stderr_tail) == 64 * 1024


async def test_argv_flags_reach_the_cli(engine: ClaudeEngine, env: Env) -> None:
    opts = ClaudeOptions(
        enable_tools=False,
        allowed_tools=["Read", "Bash(git log:*)"],
        disallowed_tools=["Write", "Edit"],
        max_turns=3,
        append_system_prompt="--- be brief ---",
        permission_mode="plan",
    )
    result = await engine.run_turn("flags", model="haiku", opts=opts)
    assert result.model == "claude-haiku-4-5-20251001"
    argv = env.invocations()[-1]["argv"]
    assert argv[argv.index("--tools") + 1] == ""
    assert argv[argv.index("--allowedTools") + 1] == "Read,Bash(git log:*)"
    assert argv[argv.index("--disallowedTools") + 1] == "Write,Edit"
    assert argv[argv.index("--max-turns") + 1] == "3"
    assert "--append-system-prompt=--- be brief ---" in argv
    assert argv[argv.index("--permission-mode") + 1] == "plan"


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "code", "status", "exit_code"),
    [
        ("[[error:401]]", ErrorCode.AUTH_FAILED, 401, 1),
        ("[[error:429]]", ErrorCode.RATE_LIMITED, 429, 1),
        ("[[error:500]]", ErrorCode.API_ERROR, 500, 1),
        ("[[error:529]]", ErrorCode.API_ERROR, 529, 1),
        ("[[error:400]]", ErrorCode.API_ERROR, 400, 1),
        ("[[error:connect]]", ErrorCode.API_ERROR, None, 1),
        ("[[error:login]]", ErrorCode.AUTH_FAILED, None, 1),
        ("[[max-turns]]", ErrorCode.MAX_TURNS, None, 1),
        ("[[crash:3]]", ErrorCode.CLI_CRASHED, None, 3),
        ("[[bad-json]]", ErrorCode.INVALID_OUTPUT, None, 0),
    ],
)
async def test_error_codes(
    engine: ClaudeEngine, prompt: str, code: ErrorCode, status: int | None, exit_code: int
) -> None:
    with pytest.raises(ClaudeCLIError) as info:
        await engine.run_turn(prompt)
    err = info.value
    assert err.code is code
    assert err.api_error_status == status
    assert err.exit_code == exit_code
    assert err.session_id is not None
    assert err.pid is not None
    assert err.to_dict()["code"] == code.value
    if code is ErrorCode.CLI_CRASHED:
        assert "simulated crash" in err.stderr_tail
    if code is ErrorCode.INVALID_OUTPUT:
        assert err.raw is not None
        assert "this is not json" in err.raw["stdout_excerpt"]
    if code in (ErrorCode.API_ERROR, ErrorCode.RATE_LIMITED, ErrorCode.MAX_TURNS):
        assert err.raw is not None
        assert err.raw["type"] == "result"


async def test_unknown_session(engine: ClaudeEngine) -> None:
    with pytest.raises(ClaudeCLIError) as info:
        await engine.run_turn("x", opts=ClaudeOptions(session_id=SID))
    assert info.value.code is ErrorCode.SESSION_NOT_FOUND
    assert SID in info.value.message


async def test_missing_binary(env: Env) -> None:
    engine = env.engine(claude_bin=str(env.tmp / "no-such-claude"))
    with pytest.raises(ClaudeCLIError) as info:
        await engine.run_turn("x")
    assert info.value.code is ErrorCode.CLAUDE_NOT_FOUND
    assert "npm ci" in info.value.message
    assert engine.describe()["claude_bin"] is None


async def test_timeout_kills_the_group(engine: ClaudeEngine, env: Env) -> None:
    pid_file, gc_file = env.tmp / "pid", env.tmp / "gc"
    t0 = time.monotonic()
    with pytest.raises(ClaudeCLIError) as info:
        await engine.run_turn(
            f"[[pidfile:{pid_file}]] [[grandchild:{gc_file}]] [[sleep:30]]",
            opts=ClaudeOptions(timeout_s=1.0),
        )
    assert info.value.code is ErrorCode.TIMEOUT
    assert time.monotonic() - t0 < 3.0
    await assert_gone(int(pid_file.read_text()), int(gc_file.read_text()))


async def test_timeout_escalates_past_ignored_sigterm(engine: ClaudeEngine, env: Env) -> None:
    pid_file = env.tmp / "pid"
    t0 = time.monotonic()
    with pytest.raises(ClaudeCLIError) as info:
        await engine.run_turn(
            f"[[pidfile:{pid_file}]] [[ignore-sigterm]] [[sleep:30]]",
            opts=ClaudeOptions(timeout_s=0.5),
        )
    assert info.value.code is ErrorCode.TIMEOUT
    assert info.value.exit_code == -signal.SIGKILL
    assert time.monotonic() - t0 < 0.5 + 1.0 + 1.0
    await assert_gone(int(pid_file.read_text()))


async def test_cancel_kills_the_group(engine: ClaudeEngine, env: Env) -> None:
    pid_file, gc_file = env.tmp / "pid", env.tmp / "gc"
    task = asyncio.create_task(
        engine.run_turn(f"[[pidfile:{pid_file}]] [[grandchild:{gc_file}]] [[sleep:30]]")
    )
    pid = int(await wait_for_file(pid_file))
    gc = int(await wait_for_file(gc_file))
    assert engine.describe()["running"] == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_gone(pid, gc)
    assert engine.describe()["running"] == 0


async def test_engine_aclose_cancels_running_turns(engine: ClaudeEngine, env: Env) -> None:
    pid_file = env.tmp / "pid"
    task = asyncio.create_task(engine.run_turn(f"[[pidfile:{pid_file}]] [[sleep:30]]"))
    pid = int(await wait_for_file(pid_file))
    await engine.aclose()
    with pytest.raises(ClaudeCLIError) as info:
        await task
    assert info.value.code is ErrorCode.CANCELLED
    await assert_gone(pid)
    with pytest.raises(ClaudeCLIError) as info:
        await engine.run_turn("after close")
    assert info.value.code is ErrorCode.CANCELLED


async def test_failing_on_start_hook_does_not_break_the_turn(engine: ClaudeEngine) -> None:
    def hook(info: StartInfo) -> None:
        raise RuntimeError("observer bug")

    result = await engine.run_turn("hi", opts=ClaudeOptions(on_start=hook))
    assert result.text == "echo: hi (turn 1)"


# -- streaming -------------------------------------------------------------------------


async def consume(stream: TurnStream, into: list[dict[str, Any]] | None = None) -> None:
    async with stream:
        async for line in stream:
            if into is not None:
                into.append(line)


async def test_stream_lines_and_result(engine: ClaudeEngine) -> None:
    stream = engine.stream_turn("hi", model="sonnet", opts=ClaudeOptions(new_session_id=SID))
    assert stream.session_id == SID
    async with stream:
        lines = [line async for line in stream]
    assert lines[0]["type"] == "system"
    assert lines[0]["subtype"] == "init"
    assert lines[-1]["type"] == "result"
    assert any(line["type"] == "assistant" for line in lines)
    assert stream.result is not None
    assert stream.result.text == "echo: hi (turn 1)"
    assert stream.result.session_id == SID
    follow = await engine.run_turn("again", opts=ClaudeOptions(session_id=SID))
    assert follow.text.endswith("(turn 2)")


async def test_stream_partial_messages(engine: ClaudeEngine) -> None:
    opts = ClaudeOptions(include_partial_messages=True)
    async with engine.stream_turn("partial please", opts=opts) as stream:
        kinds = [line["type"] async for line in stream]
    assert "stream_event" in kinds
    assert kinds[-1] == "result"


async def test_stream_error_after_result_line(engine: ClaudeEngine) -> None:
    seen: list[dict[str, Any]] = []
    with pytest.raises(ClaudeCLIError) as info:
        await consume(engine.stream_turn("[[error:429]]"), seen)
    assert info.value.code is ErrorCode.RATE_LIMITED
    assert seen[-1]["type"] == "result"


async def test_stream_aclose_kills_the_cli(engine: ClaudeEngine, env: Env) -> None:
    pid_file, gc_file = env.tmp / "pid", env.tmp / "gc"
    stream = engine.stream_turn(f"[[pidfile:{pid_file}]] [[grandchild:{gc_file}]] [[sleep:5]]")
    first = await anext(stream)
    assert first["subtype"] == "init"
    pid = int(await wait_for_file(pid_file))
    gc = int(await wait_for_file(gc_file))
    t0 = time.monotonic()
    await stream.aclose()
    assert time.monotonic() - t0 < 1.5
    await assert_gone(pid, gc)
    assert engine.describe()["running"] == 0
    assert engine.describe()["active_sessions"] == 0


async def test_stream_timeout(engine: ClaudeEngine) -> None:
    with pytest.raises(ClaudeCLIError) as info:
        await consume(engine.stream_turn("[[sleep:30]]", opts=ClaudeOptions(timeout_s=0.5)))
    assert info.value.code is ErrorCode.TIMEOUT


# -- options, argv, parsing, locating --------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"session_id": "not-a-uuid"},
        {"new_session_id": "123"},
        {"session_id": SID, "new_session_id": SID},
        {"cwd": "relative/dir"},
        {"cwd": "/definitely/not/here"},
        {"max_turns": 0},
        {"timeout_s": 0},
        {"permission_mode": "yolo"},
        {"allowed_tools": [""]},
        {"unknown_option": 1},
    ],
)
def test_options_reject(bad: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        ClaudeOptions.model_validate(bad)


def test_options_dump_skips_on_start() -> None:
    opts = ClaudeOptions(session_id=SID, on_start=print)
    assert "on_start" not in opts.model_dump()
    assert opts.on_start is print


def test_build_argv_first_turn_and_resume() -> None:
    stream_json = [
        "-p", "--input-format", "stream-json", "--output-format", "stream-json", "--verbose",
    ]  # fmt: skip
    first = build_argv("claude", model=None, opts=ClaudeOptions(), session_id=SID, resume=False)
    assert first == ["claude", *stream_json, "--session-id", SID]
    again = build_argv(
        "claude",
        model="-odd",
        opts=ClaudeOptions(include_partial_messages=True),
        session_id=SID,
        resume=True,
    )
    assert again == [
        "claude", *stream_json, "--include-partial-messages", "--model=-odd", "--resume", SID,
    ]  # fmt: skip


def _result(**fields: Any) -> dict[str, Any]:
    base = {
        "type": "result",
        "subtype": "success",
        "is_error": False,
        "result": "ok",
        "session_id": SID,
        "total_cost_usd": 0.5,
        "usage": {"input_tokens": 1},
    }
    base.update(fields)
    return base


def _classify(obj: dict[str, Any] | None, exit_code: int | None, **kw: Any) -> TurnResult:
    return classify_result(obj, exit_code=exit_code, stderr_tail="", session_id=SID, pid=None, **kw)


def test_classify_result_variants() -> None:
    usage = {"claude-opus-4-8[1m]": {"costUSD": 1.0}, "claude-haiku-4-5": {"costUSD": 0.1}}
    turn = _classify(_result(modelUsage=usage), 0, requested_model="opus")
    assert turn.model == "claude-opus-4-8"
    assert turn.cost_usd == 0.5
    assert _classify(_result(), 0, requested_model="sonnet").model == "sonnet"
    with pytest.raises(ClaudeCLIError) as info:
        _classify(_result(), 1, requested_model=None)
    assert info.value.code is ErrorCode.CLI_CRASHED
    with pytest.raises(ClaudeCLIError) as info:
        _classify(None, -9, requested_model=None)
    assert info.value.code is ErrorCode.CLI_CRASHED
    assert "SIGKILL" in info.value.message
    lines = StdoutLines()
    for _ in range(100):
        lines.parse(b"x" * 1000)
    with pytest.raises(ClaudeCLIError) as info:
        _classify(None, 0, requested_model=None, stdout_sample=lines.excerpt())
    assert info.value.code is ErrorCode.INVALID_OUTPUT
    assert info.value.raw is not None
    assert len(info.value.raw["stdout_excerpt"]) < 5000


def test_locate_claude(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert locate_claude(str(FAKE), tmp_path) == FAKE
    assert locate_claude(str(tmp_path / "missing"), ROOT) is None
    assert locate_claude(None, tmp_path) is None
    bin_dir = tmp_path / "node_modules" / ".bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "claude").symlink_to(FAKE)
    assert locate_claude(None, tmp_path) == bin_dir / "claude"
    on_path = tmp_path / "onpath"
    on_path.mkdir()
    (on_path / "claude").symlink_to(FAKE)
    (on_path / "my-claude").symlink_to(FAKE)
    monkeypatch.setenv("PATH", str(on_path))
    assert locate_claude(None, tmp_path) == on_path / "claude"
    assert locate_claude("my-claude", tmp_path) == on_path / "my-claude"


async def test_claude_version(engine: ClaudeEngine, tmp_path: Path) -> None:
    assert await claude_version(FAKE) == "2.1.197"
    assert await claude_version(tmp_path / "missing") is None
    assert await engine.probe_version() == "2.1.197"
    assert engine.describe()["version"] == "2.1.197"


def test_fake_is_executable() -> None:
    assert os.access(FAKE, os.X_OK)
