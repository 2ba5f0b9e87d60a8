"""The JSONL turn log: line format, whole lines, descriptor reuse, the latest.jsonl pointer."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import orjson
import pytest
import structlog

from daemon.state import turnlog
from daemon.state.turnlog import TurnLog


def lines(path: Path) -> list[dict]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


def open_fds() -> set[str]:
    return {
        os.readlink(f"/proc/self/fd/{fd}")
        for fd in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{fd}")
    }


async def test_turn_lines_and_latest_pointer(tmp_path: Path) -> None:
    log = TurnLog(tmp_path)
    await log.human("s1", "hi", process_id="p1", agent_id="a", model="sonnet")
    await log.claude("s1", {"type": "result", "result": "yo", "session_id": "s1"}, process_id="p1")
    await log.human("s2", "next", process_id="p2", agent_id=None, model=None)
    await log.error("s2", {"code": "TIMEOUT", "message": "slow"}, process_id="p2")
    first = lines(tmp_path / "s1.jsonl")
    assert [x["type"] for x in first] == ["human", "claude"]
    assert first[0]["content"] == "hi"
    assert first[0]["agent_id"] == "a"
    assert first[1]["result"] == "yo"
    assert first[1]["process_id"] == "p1"
    assert first[1]["timestamp"].endswith("Z")
    assert [x["type"] for x in lines(tmp_path / "s2.jsonl")] == ["human", "error"]
    latest = tmp_path / "latest.jsonl"
    await asyncio.sleep(turnlog.LATEST_DELAY_S * 3)
    assert os.readlink(latest) == "s2.jsonl"  # relative, so the directory can move
    log.close()


async def test_close_points_latest_at_once_and_releases_descriptors(tmp_path: Path) -> None:
    log = TurnLog(tmp_path)
    await log.human("only", "x", process_id="p", agent_id=None, model=None)
    assert str(tmp_path / "only.jsonl") in open_fds()
    log.close()
    assert os.readlink(tmp_path / "latest.jsonl") == "only.jsonl"
    assert str(tmp_path / "only.jsonl") not in open_fds()


async def test_descriptors_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(turnlog, "OPEN_FILES", 3)
    log = TurnLog(tmp_path)
    for i in range(10):
        await log.human(f"s{i}", "x", process_id="p", agent_id=None, model=None)
    ours = [p for p in open_fds() if p.startswith(str(tmp_path))]
    assert len(ours) == 3
    await log.human("s0", "again", process_id="p", agent_id=None, model=None)  # reopened
    assert [x["content"] for x in lines(tmp_path / "s0.jsonl")] == ["x", "again"]
    log.close()


async def test_large_and_concurrent_lines_stay_whole(tmp_path: Path) -> None:
    log = TurnLog(tmp_path)
    big = "y" * (3 * 1024 * 1024)  # written from a worker thread
    await asyncio.gather(
        *[
            log.claude("s", {"result": big if i % 5 == 0 else f"small {i}"}, process_id=str(i))
            for i in range(20)
        ]
    )
    got = lines(tmp_path / "s.jsonl")
    assert len(got) == 20
    assert sorted(int(x["process_id"]) for x in got) == list(range(20))
    assert all(x["result"] in (big, f"small {x['process_id']}") for x in got)
    log.close()


async def test_lines_queued_without_waiting_keep_their_order(tmp_path: Path) -> None:
    log = TurnLog(tmp_path)
    for i in range(50):  # as the scheduler does: the human line is not awaited
        log.human("s", f"prompt {i}", process_id=str(i), agent_id=None, model=None)
        if i % 2:
            log.claude("s", {"result": f"answer {i}"}, process_id=str(i))
    await log.error("s", {"code": "X", "message": "last"}, process_id="end")
    got = lines(tmp_path / "s.jsonl")
    expected = []
    for i in range(50):
        expected.append(("human", str(i)))
        if i % 2:
            expected.append(("claude", str(i)))
    assert [(x["type"], x["process_id"]) for x in got] == [*expected, ("error", "end")]
    log.close()


async def test_a_failed_write_is_logged_and_raised_only_to_an_awaiting_caller(
    tmp_path: Path,
) -> None:
    logs = tmp_path / "logs"
    log = TurnLog(logs)
    logs.rmdir()
    logs.write_text("not a directory")  # every open now fails, even for root
    with structlog.testing.capture_logs() as captured:
        log.human("s", "hi", process_id="p", agent_id=None, model=None)  # not awaited
        with pytest.raises(NotADirectoryError):
            await log.claude("s", {"result": "x"}, process_id="p")
    failures = [e for e in captured if e["event"] == "turnlog.write_failed"]
    assert len(failures) == 2
    assert "NotADirectoryError" in failures[0]["error"]
    log.close()
