"""daemon.state.records: sessions live in SQLite with a bounded in-memory cache in front."""

from __future__ import annotations

import pytest

from daemon.state.db import Store
from daemon.state.records import StateManager


@pytest.fixture
async def state(db: Store, monkeypatch: pytest.MonkeyPatch) -> StateManager:
    monkeypatch.setattr(StateManager, "CACHED_SESSIONS", 3)
    manager = StateManager(db)
    await manager.load(idempotency_window_s=600.0)
    return manager


async def _turn(
    state: StateManager, n: int, *, agent: str | None = None, cost: float = 0.5
) -> None:
    await state.record_turn(
        f"s{n}",
        cwd=f"/w/{n}",
        model="sonnet",
        agent_id=agent,
        cost_usd=cost,
        process_id=f"p{n}",
        log_path=f"/logs/s{n}.jsonl",
        completed=True,
    )


async def test_cache_is_bounded_and_evicted_sessions_come_back_from_the_table(
    state: StateManager,
) -> None:
    for n in range(10):
        await _turn(state, n, agent="a" if n % 2 else None)
    assert state.session_count == 10
    assert list(state._sessions) == ["s7", "s8", "s9"]
    old = await state.session("s1")
    assert old is not None
    assert (old.cwd, old.model, old.agent_id, old.turns, old.total_cost_usd, old.log_path) == (
        "/w/1",
        "sonnet",
        "a",
        1,
        0.5,
        "/logs/s1.jsonl",
    )
    assert list(state._sessions) == ["s8", "s9", "s1"]  # read back, now most recent
    assert await state.session("never") is None


async def test_a_later_turn_of_an_evicted_session_adds_to_its_totals(state: StateManager) -> None:
    for n in range(6):
        await _turn(state, n)
    assert "s0" not in state._sessions
    await _turn(state, 0, cost=0.25)
    s0 = await state.session("s0")
    assert s0 is not None
    assert (s0.turns, s0.total_cost_usd) == (2, 0.75)
    assert state.session_count == 6  # a known session is not counted twice


async def test_list_sessions_is_newest_first_from_the_table(state: StateManager) -> None:
    for n in range(8):
        await _turn(state, n, agent="a" if n % 2 else "b")
    await _turn(state, 2, agent="b")  # used again: now the newest
    listed = [s.session_id for s in await state.list_sessions(None, 100)]
    assert listed == ["s2", "s7", "s6", "s5", "s4", "s3", "s1", "s0"]
    assert [s.session_id for s in await state.list_sessions("a", 2)] == ["s7", "s5"]
    assert [s.session_id for s in await state.list_sessions("b", 100)] == ["s2", "s6", "s4", "s0"]


async def test_sessions_and_their_count_survive_a_restart(state: StateManager) -> None:
    for n in range(5):
        await _turn(state, n)
    again = StateManager(state.store)
    await again.load(idempotency_window_s=600.0)
    assert again.session_count == 5
    assert list(again._sessions) == ["s2", "s3", "s4"]  # the most recently used, cached
    s0 = await again.session("s0")
    assert s0 is not None
    assert s0.turns == 1
