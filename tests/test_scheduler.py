"""TurnScheduler on its own: no socket, no daemon process; real SQLite state, bus and turn
log in a temporary directory, LiteLLM and our provider in this process, the fake CLI."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from daemon.claude.options import TurnOptions
from daemon.errors import ErrorCode, InvalidParameters, TurnFailed, Unavailable
from daemon.events.bus import EventBus
from daemon.events.subscriber import Subscriber
from daemon.settings import Settings
from daemon.state.db import Store
from daemon.state.records import StateManager
from daemon.turns.scheduler import TurnScheduler
from daemon.turns.turn import SpawnRequest

FAKE = Path(__file__).resolve().parent.parent / "devtools" / "fake_claude.py"


class Harness:
    def __init__(self, tmp: Path, **settings: Any) -> None:
        self.tmp = tmp
        self.calls = tmp / "calls.jsonl"
        settings.setdefault("warm_default", False)  # one CLI per turn, unless a test says
        self.settings = Settings(
            claude_bin=str(FAKE),
            state_dir=tmp / "state",
            log_dir=tmp / "logs",
            claude_env={"CLAUDE_CONFIG_DIR": str(tmp / "cfg"), "FAKE_CLAUDE_LOG": str(self.calls)},
            warm_up_litellm=False,
            **settings,
        )
        self.store = Store(self.settings.state_path / "ksi.sqlite3", queue_bytes=1 << 23)
        self.state = StateManager(self.store)
        self.bus = EventBus(self.store, history_size=1000)
        self.events = Subscriber("test", ["PROCESS_*"], maxsize=1000, policy="drop")
        self.turns = TurnScheduler(self.settings, self.store, self.state, self.bus)

    def invocations(self) -> list[dict[str, Any]]:
        if not self.calls.exists():
            return []
        calls = [orjson.loads(line) for line in self.calls.read_bytes().splitlines()]
        return [c for c in calls if "argv" in c]  # one per CLI process

    def completed(self) -> list[dict[str, Any]]:
        return [e.data for e in self.events.inbox if e.event_type == "PROCESS_COMPLETE"]


def request(prompt: str, **fields: Any) -> SpawnRequest:
    options = TurnOptions(**fields.pop("options", {}))
    return SpawnRequest(
        prompt=prompt, mode=fields.pop("mode", "sync"), model="sonnet", options=options, **fields
    )


async def _harness(tmp_path: Path, **settings: Any) -> AsyncIterator[Harness]:
    h = Harness(tmp_path, **settings)
    await h.store.open()
    await h.state.load(idempotency_window_s=h.settings.idempotency_window_s)
    await h.bus.load()
    h.bus.add(h.events)
    async with asyncio.TaskGroup() as tasks:
        h.turns.start(tasks)
        try:
            yield h
        finally:
            await h.turns.shutdown(grace_s=5.0)
    await h.bus.close()
    await h.store.close()


@pytest.fixture(name="h")
async def _h(tmp_path: Path) -> AsyncIterator[Harness]:
    async for h in _harness(tmp_path, max_concurrency=1):
        yield h


async def test_a_turn_is_typed_from_the_cli_to_the_record(h: Harness) -> None:
    result = await h.turns.submit(request("hello"))
    assert result.text == "echo: hello (turn 1)"
    assert result.status == "completed"
    (record,) = [p for p in h.state.processes.values() if p.process_id == result.process_id]
    assert record.status == "completed"
    assert record.session_id == result.session_id
    session = await h.state.session(result.session_id or "")
    assert session is not None
    assert session.turns == 1
    (event,) = h.completed()
    assert event["text"] == result.text
    assert "replayed" not in event


async def test_a_failure_is_one_typed_error_with_the_cli_evidence(h: Harness) -> None:
    with pytest.raises(TurnFailed) as info:
        await h.turns.submit(request("[[error:401]] nope"))
    assert info.value.code is ErrorCode.AUTH_FAILED
    assert info.value.details is not None
    assert info.value.details["api_error_status"] == 401
    (event,) = h.completed()
    assert event["status"] == "failed"
    assert event["error"]["code"] == ErrorCode.AUTH_FAILED
    assert event["error"]["process_id"] == event["process_id"]


async def test_the_same_client_request_id_runs_once(h: Harness) -> None:
    first, second = await asyncio.gather(
        h.turns.submit(request("[[sleep:0.3]] once", client_request_id="k1")),
        h.turns.submit(request("[[sleep:0.3]] once", client_request_id="k1")),
    )
    assert first.process_id == second.process_id
    assert sorted([first.replayed, second.replayed]) == [False, True]
    assert len(h.invocations()) == 1
    again = await h.turns.submit(request("[[sleep:0.3]] once", client_request_id="k1"))
    assert again.replayed
    assert again.text == first.text
    assert len(h.invocations()) == 1


async def test_queued_turns_run_in_fifo_order_under_the_cap(h: Harness) -> None:
    accepted = [
        await h.turns.submit(request(f"[[sleep:0.2]] job {i}", mode="async")) for i in range(3)
    ]
    assert [(a.status, a.state) for a in accepted] == [("started", "queued")] * 3
    await _until(lambda: h.turns.slots.queued == 2)
    assert h.turns.slots.running == 1
    await _until(lambda: len(h.completed()) == 3)
    order = [e["process_id"] for e in h.completed()]
    assert order == [a.process_id for a in accepted]


async def test_turns_of_one_session_never_overlap(tmp_path: Path) -> None:
    async for h in _harness(tmp_path, max_concurrency=4):
        first = await h.turns.submit(request("one"))
        sid = first.session_id
        results = await asyncio.gather(
            *(h.turns.submit(request(f"[[sleep:0.3]] n{i}", session_id=sid)) for i in range(3))
        )
        # Each resumed turn saw the one before it complete: turn numbers 2, 3, 4 in order.
        texts = sorted(r.text or "" for r in results)
        assert [t.rsplit("(turn ", 1)[1] for t in texts] == ["2)", "3)", "4)"]
        calls = h.invocations()[1:]
        spans = sorted((c["time"], c["time"] + 0.3) for c in calls)
        assert all(later[0] >= earlier[1] - 0.05 for earlier, later in itertools.pairwise(spans))


async def test_a_resume_elsewhere_is_refused_before_anything_runs(h: Harness) -> None:
    first = await h.turns.submit(request("here"))
    other = h.tmp / "other"
    other.mkdir()
    with pytest.raises(InvalidParameters) as info:
        await h.turns.submit(
            request("there", session_id=first.session_id, options={"cwd": str(other)})
        )
    assert info.value.details == {"session_cwd": str(h.settings.project_root.resolve())}
    assert len(h.invocations()) == 1


async def test_cancel_of_a_queued_turn(h: Harness) -> None:
    """Also right after the SPAWN, before the turn's task ever ran (an observer's SPAWN and
    CANCEL_PROCESS in a row): it was left "queued" for good, with no PROCESS_COMPLETE."""
    running = await h.turns.submit(request("[[sleep:1]] long", mode="async"))
    queued = await h.turns.submit(request("waits", mode="async"))
    info = await h.turns.cancel(queued.process_id)
    assert info.status == "cancelled"
    await h.turns.cancel(running.process_id)
    assert [e["status"] for e in h.completed()] == ["cancelled", "cancelled"]
    assert len(h.invocations()) <= 1


async def test_no_new_turn_once_shutting_down(h: Harness) -> None:
    h.turns.accepting = False
    with pytest.raises(Unavailable) as info:
        await h.turns.submit(request("late"))
    assert info.value.code is ErrorCode.SHUTTING_DOWN


async def _until(check: Any, within: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met"
        await asyncio.sleep(0.02)
