"""Progress of a running turn: the CLI's stream-json lines as progress items
(daemon/claude/progress.py), and the engine reporting them for cold and warm turns alike."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from daemon.claude import ClaudeEngine, ClaudeOptions
from daemon.claude.progress import (
    TEXT_CHUNK,
    TOOL_INPUT_CHARS,
    TOOL_RESULT_CHARS,
    Progress,
    ProgressMapper,
    cut,
)
from tests.test_engine import Env

FIXTURES = Path(__file__).parent / "fixtures" / "real_cli"
TOOL_PROMPT = "[[say:Let me look.]] [[tool:Bash:echo hi]]"


def _lines(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines() if line]


def _items(lines: list[dict[str, Any]], partial: bool = False) -> list[Progress]:
    mapper = ProgressMapper(partial=partial)
    return [item for line in lines for item in mapper.items(line)]


def test_a_real_tool_turn_maps_to_started_tool_use_tool_result_text() -> None:
    items = _items(_lines("bash_tool_stream.jsonl"))
    assert [i["kind"] for i in items] == ["started", "tool_use", "tool_result", "text"]
    started, use, result, text = items
    assert started["model"] == "claude-opus-4-8[1m]"
    assert "Bash" in started["tools"]
    assert started["cwd"].endswith("/cwd")
    assert started["permission_mode"] == "default"
    assert started["claude_code_version"] == "2.1.197"
    assert use["name"] == "Bash"
    assert use["input"] == {"command": "echo hi"}
    assert result == {
        "kind": "tool_result",
        "tool_use_id": use["tool_use_id"],
        "is_error": False,
        "content": "hi",
    }
    assert text == {"kind": "text", "text": "tool result: hi"}


def test_a_real_api_error_is_a_status_item_not_text() -> None:
    items = _items(_lines("stream_json_error_500.jsonl"))
    assert [i["kind"] for i in items] == ["started", "status"]
    assert items[1]["status"] == "api_error"
    assert "500" in items[1]["message"]


def test_partial_messages_give_deltas_and_no_repeated_block() -> None:
    lines: list[dict[str, Any]] = [
        {"type": "system", "subtype": "status", "status": "requesting"},
        {"type": "stream_event", "event": {"type": "message_start", "message": {}}},
        {
            "type": "stream_event",
            "event": {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "ab"}},
        },
        {
            "type": "stream_event",
            "event": {
                "type": "content_block_delta",
                "delta": {"type": "input_json_delta", "partial_json": "{"},
            },
        },
        {"type": "assistant", "message": {"content": [{"type": "text", "text": "ab"}]}},
    ]
    assert _items(lines, partial=True) == [
        {"kind": "status", "status": "requesting"},
        {"kind": "text", "text": "ab", "delta": True},
    ]
    assert _items(lines, partial=False)[-1] == {"kind": "text", "text": "ab"}


def test_cli_api_retry_lines() -> None:
    line = {
        "type": "system",
        "subtype": "api_retry",
        "attempt": 1,
        "max_retries": 2,
        "retry_delay_ms": 584.9,
        "error_status": 529,
        "error": "overloaded",
        "parent_tool_use_id": "toolu_1",
    }
    assert _items([line]) == [
        {
            "kind": "api_retry",
            "source": "cli",
            "attempt": 1,
            "max_retries": 2,
            "delay_s": 0.585,
            "status": 529,
            "error": "overloaded",
            "parent_tool_use_id": "toolu_1",
        }
    ]


def test_large_payloads_are_cut_with_a_marker_and_text_is_split() -> None:
    big_input = {"command": "x" * (TOOL_INPUT_CHARS * 2)}
    big_result = "y" * (TOOL_RESULT_CHARS + 10)
    long_text = "z" * (TEXT_CHUNK * 2 + 5)
    lines = [
        {
            "type": "assistant",
            "message": {
                "content": [
                    {"type": "text", "text": long_text},
                    {"type": "tool_use", "id": "t1", "name": "Bash", "input": big_input},
                ]
            },
        },
        {
            "type": "user",
            "message": {
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t1",
                        "is_error": True,
                        "content": [{"type": "text", "text": big_result}, {"type": "image"}],
                    }
                ]
            },
        },
    ]
    items = _items(lines)
    texts = [i for i in items if i["kind"] == "text"]
    assert [len(t["text"]) for t in texts] == [TEXT_CHUNK, TEXT_CHUNK, 5]
    assert "".join(t["text"] for t in texts) == long_text  # split, nothing lost
    use = next(i for i in items if i["kind"] == "tool_use")
    assert use["truncated"] is True
    assert isinstance(use["input"], str)  # never mistaken for the real input
    assert use["input"].startswith('{"command":"xxx')
    assert "[truncated" in use["input"]
    assert use["original_chars"] == len(json.dumps(big_input, separators=(",", ":")))
    result = next(i for i in items if i["kind"] == "tool_result")
    assert result["is_error"] is True
    assert result["truncated"] is True
    assert result["original_chars"] == len(big_result) + len("\n[image]")
    assert len(result["content"]) < TOOL_RESULT_CHARS + 100


def test_cut_leaves_short_text_alone() -> None:
    assert cut("abc", 3) == ("abc", False)
    text, truncated = cut("abcd", 3)
    assert truncated
    assert text.startswith("abc…[truncated 1 of 4")


def test_sub_agent_work_is_marked() -> None:
    line = {
        "type": "assistant",
        "parent_tool_use_id": "toolu_parent",
        "message": {"content": [{"type": "text", "text": "inner"}]},
    }
    assert _items([line]) == [
        {"kind": "text", "text": "inner", "parent_tool_use_id": "toolu_parent"}
    ]


# -- the engine reports progress for every turn ---------------------------------------------


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_engine_reports_a_tool_turn_as_it_runs(tmp_path: Path, warm: bool) -> None:
    env = Env(tmp_path)
    engine: ClaudeEngine = env.engine()
    seen: list[Progress] = []
    try:
        opts = ClaudeOptions(warm=warm, allowed_tools=["Bash"], on_progress=seen.append)
        result = await engine.run_turn(TOOL_PROMPT, opts=opts)
    finally:
        await engine.aclose()
    assert result.text == "tool result: echo hi"
    assert [i["kind"] for i in seen] == ["started", "text", "tool_use", "tool_result", "text"]
    assert seen[1]["text"] == "Let me look."
    assert seen[2]["name"] == "Bash"
    assert seen[3]["tool_use_id"] == seen[2]["tool_use_id"]
    assert seen[4]["text"] == result.text
    [argv] = [e["argv"] for e in env.invocations()]
    # One stream-json path: the cold turn is read exactly as a warm one.
    assert argv[argv.index("--input-format") + 1] == "stream-json"
    assert argv[argv.index("--output-format") + 1] == "stream-json"


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_a_failing_progress_listener_does_not_break_the_turn(
    tmp_path: Path, warm: bool
) -> None:
    engine = Env(tmp_path).engine()
    calls: list[Progress] = []

    def broken(item: Progress) -> None:
        calls.append(item)
        raise RuntimeError("listener bug")

    try:
        result = await engine.run_turn("hi", opts=ClaudeOptions(warm=warm, on_progress=broken))
    finally:
        await engine.aclose()
    assert result.text == "echo: hi (turn 1)"
    assert [c["kind"] for c in calls] == ["started", "text"]


async def test_partial_messages_reach_the_listener_as_deltas(tmp_path: Path) -> None:
    engine = Env(tmp_path).engine()
    seen: list[Progress] = []
    opts = ClaudeOptions(include_partial_messages=True, on_progress=seen.append)
    try:
        result = await engine.run_turn("hello there", opts=opts)
    finally:
        await engine.aclose()
    texts = [i for i in seen if i["kind"] == "text"]
    assert texts
    assert all(t.get("delta") for t in texts)
    assert "".join(t["text"] for t in texts) == result.text
    assert {"kind": "status", "status": "requesting"} in seen
