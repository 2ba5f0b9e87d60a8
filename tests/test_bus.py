"""daemon.events.bus: patterns, seq, fan-out with bounded inboxes, directed events, history."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from daemon.app import Daemon
from daemon.events.bus import EventBus
from daemon.events.subscriber import Patterns, StoredEvent, Subscriber
from daemon.settings import Settings
from daemon.state.db import Store
from tests.helpers import FAKE_CLAUDE, short_tmpdir
from tests.wire import Wire


@pytest.mark.parametrize(
    ("patterns", "matching", "not_matching"),
    [
        (
            ["PROCESS_*"],
            ["PROCESS_COMPLETE", "PROCESS_", "PROCESS_A_B"],
            ["PROCESS", "XPROCESS_A", "process_complete", "AGENT_REGISTERED"],
        ),
        (["*"], ["A", "PROCESS_COMPLETE", "x.y:z"], []),
        (["AGENT_REGISTERED"], ["AGENT_REGISTERED"], ["AGENT_REGISTERED2", "AGENT_REGISTERE"]),
        (["*_DONE"], ["TASK_DONE", "_DONE"], ["TASK_DONE_2", "DONE"]),
        (["A?C"], ["ABC", "A_C"], ["AC", "ABBC"]),
        (["[AB]_X"], ["A_X", "B_X"], ["C_X"]),
        (["EXACT", "GLOB_*"], ["EXACT", "GLOB_1"], ["EXACT_1", "GLOB"]),
        (["a.b"], ["a.b"], ["aXb"]),  # '.' is literal, not a regex wildcard
        ([], [], ["ANYTHING"]),
    ],
)
def test_patterns(patterns: list[str], matching: list[str], not_matching: list[str]) -> None:
    p = Patterns(patterns)
    for name in matching:
        assert p.match(name), (patterns, name)
    for name in not_matching:
        assert not p.match(name), (patterns, name)
    assert bool(p) is bool(patterns)


def test_patterns_update() -> None:
    p = Patterns(["A_*", "B"])
    p.update(add=["C"], remove=["A_*"])
    assert p.items == {"B", "C"}
    assert not p.match("A_1")
    assert p.match("C")
    p.update(remove=set(p.items))
    assert not p
    assert not p.match("B")


def test_seq_is_monotonic_and_events_are_encoded_once() -> None:
    bus = EventBus(None, history_size=100)
    seqs = [bus.publish("T", {"i": i}).seq for i in range(50)]
    assert seqs == list(range(1, 51))
    assert bus.seq == 50
    assert bus.published == 50
    ev = bus.history[-1]
    assert orjson.loads(ev.wire) == {
        "event": "T",
        "type": "T",
        "data": {"i": 49},
        "seq": 50,
        "timestamp": ev.timestamp,
    }


async def test_fan_out_by_pattern() -> None:
    bus = EventBus(None, history_size=100)
    procs = Subscriber("procs", ["PROCESS_*"], maxsize=10)
    every = Subscriber("all", ["*"], maxsize=10)
    exact = Subscriber("exact", ["CUSTOM"], maxsize=10)
    for s in (procs, every, exact):
        bus.add(s)
    assert bus.publish("PROCESS_COMPLETE", {}).delivered == 2
    assert bus.publish("CUSTOM", {}).delivered == 2
    assert bus.publish("OTHER", {}).delivered == 1
    assert [e.event_type for e in await procs.next_batch()] == ["PROCESS_COMPLETE"]
    assert [e.seq for e in await every.next_batch()] == [1, 2, 3]
    assert [e.event_type for e in await exact.next_batch()] == ["CUSTOM"]
    assert every.last_seq == 3


async def test_next_batch_waits_for_an_event() -> None:
    bus = EventBus(None, history_size=100)
    sub = Subscriber("s", ["*"], maxsize=10)
    bus.add(sub)
    waiter = asyncio.ensure_future(sub.next_batch())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    bus.publish("X", {})
    batch = await asyncio.wait_for(waiter, 1)
    assert [e.seq for e in batch] == [1]


async def test_overflow_disconnect_policy() -> None:
    bus = EventBus(None, history_size=1000)
    slow = Subscriber("slow", ["*"], maxsize=5, policy="disconnect")
    fast = Subscriber("fast", ["*"], maxsize=1000)
    bus.add(slow)
    bus.add(fast)
    waiter = asyncio.ensure_future(slow.next_batch())
    await asyncio.sleep(0)
    for i in range(20):
        bus.publish("E", {"i": i})  # never waits, whatever the subscribers do
    # The waiter took nothing yet (it never ran): the inbox holds the first 5 only.
    assert slow.dropped
    assert slow not in bus.subscribers
    assert fast in bus.subscribers
    assert [e.seq for e in await asyncio.wait_for(waiter, 1)] == [1, 2, 3, 4, 5]
    assert slow.last_seq == 5
    # Once dropped it gets nothing more and next_batch returns at once, empty.
    bus.publish("E", {})
    assert await asyncio.wait_for(slow.next_batch(), 1) == []
    assert [e.seq for e in await fast.next_batch()] == list(range(1, 22))


async def test_overflow_drop_policy_counts_losses() -> None:
    bus = EventBus(None, history_size=1000)
    obs = Subscriber("observer:x", ["*"], maxsize=3, policy="drop", sees_directed=True)
    bus.add(obs)
    for _ in range(10):
        bus.publish("E", {})
    assert not obs.dropped
    assert obs in bus.subscribers
    assert obs.lost == 7
    assert [e.seq for e in await obs.next_batch()] == [1, 2, 3]
    bus.publish("E", {})  # room again: delivered
    assert [e.seq for e in await obs.next_batch()] == [11]
    assert obs.lost == 7


async def test_directed_events() -> None:
    bus = EventBus(None, history_size=100)
    alice = Subscriber("a", ["*"], maxsize=10, agent_id="alice")
    bob = Subscriber("b", ["*"], maxsize=10, agent_id="bob")
    anon = Subscriber("n", ["*"], maxsize=10)
    observer = Subscriber("o", ["*"], maxsize=10, policy="drop", sees_directed=True)
    for s in (alice, bob, anon, observer):
        bus.add(s)
    ev = bus.publish("MSG", {"text": "hi"}, from_agent="bob", to_agent="alice")
    assert ev.delivered == 2
    bus.publish("MSG", {"text": "all"})
    assert [e.seq for e in await alice.next_batch()] == [1, 2]
    assert [e.seq for e in await bob.next_batch()] == [2]
    assert [e.seq for e in await anon.next_batch()] == [2]
    assert [e.seq for e in await observer.next_batch()] == [1, 2]
    assert ev.to_dict() == {
        "event": "MSG",
        "data": {"text": "hi"},
        "seq": 1,
        "timestamp": ev.timestamp,
        "from_agent": "bob",
        "to_agent": "alice",
    }


def _seqs(events: list[StoredEvent]) -> list[int]:
    return [e.seq for e in events]


async def test_history_query_semantics() -> None:
    bus = EventBus(None, history_size=100)
    for i in range(30):
        bus.publish("A_EV" if i % 2 == 0 else "B_EV", {"i": i})
    await _check_query_semantics(bus)


async def test_history_query_reads_older_events_from_the_store(db: Store) -> None:
    """Memory keeps only the newest few; a query reaching further back reads SQLite and
    answers exactly as an all-in-memory history would."""
    bus = EventBus(db, history_size=100, memory_size=4)
    await bus.load()
    for i in range(30):
        bus.publish("A_EV" if i % 2 == 0 else "B_EV", {"i": i})
    assert _seqs(list(bus.history)) == [27, 28, 29, 30]
    await _check_query_semantics(bus)
    older = await bus.query(None, 2, 1)
    assert [(e.seq, e.data) for e in older] == [(3, {"i": 2})]
    assert older[0].wire == (await bus.query(None, 2, 1))[0].wire
    assert orjson.loads(older[0].wire)["seq"] == 3


async def _check_query_semantics(bus: EventBus) -> None:
    async def seqs(patterns: list[str] | None, since: int, limit: int) -> list[int]:
        return _seqs(await bus.query(patterns, since, limit))

    # Without since_seq: the newest `limit`, oldest first.
    assert await seqs(None, 0, 5) == [26, 27, 28, 29, 30]
    # With since_seq: the oldest `limit` after it, so a client can page forward.
    assert await seqs(None, 10, 5) == [11, 12, 13, 14, 15]
    assert await seqs(None, 28, 100) == [29, 30]
    assert await seqs(None, 30, 100) == []
    assert await seqs(None, 1000, 100) == []
    # Type filters accept globs; limit applies after filtering.
    assert await seqs(["A_*"], 0, 3) == [25, 27, 29]
    assert await seqs(["B_EV"], 20, 2) == [22, 24]
    assert await seqs(["A_EV", "B_EV"], 0, 100) == list(range(1, 31))
    assert await seqs(["NONE"], 0, 100) == []
    assert await seqs(["[!A]_EV"], 0, 2) == [28, 30]


async def test_history_is_bounded() -> None:
    bus = EventBus(None, history_size=100)
    for _ in range(250):
        bus.publish("E", {})
    assert len(bus.history) == 100
    assert [e.seq for e in await bus.query(None, 0, 1000)] == list(range(151, 251))
    # since_seq older than the history: what is left, from the oldest kept.
    assert (await bus.query(None, 5, 3))[0].seq == 151


async def test_history_on_disk_is_bounded_too(db: Store) -> None:
    bus = EventBus(db, history_size=100, memory_size=10)
    await bus.load()
    for _ in range(250):
        bus.publish("E", {})
    assert len(bus.history) == 10
    assert [e.seq for e in await bus.query(None, 0, 1000)] == list(range(151, 251))
    assert [e.seq for e in await bus.query(None, 5, 3)] == [151, 152, 153]
    assert [e.seq for e in await bus.query(["E"], 160, 2)] == [161, 162]


async def test_history_persists_and_seq_continues(tmp_path: Path) -> None:
    path = tmp_path / "bus.sqlite3"
    store = Store(path)
    await store.open()
    bus = EventBus(store, history_size=100)
    await bus.load()
    assert bus.seq == 0
    for i in range(120):
        bus.publish("T_A" if i % 3 else "T_B", {"i": i}, from_agent="f" if i == 119 else None)
    await bus.close()  # a clean stop, as the daemon's teardown does
    await store.close()

    store = Store(path)
    await store.open()
    try:
        again = EventBus(store, history_size=100)
        await again.load()
        assert again.seq == 120
        assert [e.seq for e in again.history] == list(range(21, 121))
        last = again.history[-1]
        assert (last.event_type, last.data, last.from_agent) == ("T_A", {"i": 119}, "f")
        assert orjson.loads(last.wire)["seq"] == 120
        assert again.publish("T_C", {}).seq == 121
    finally:
        await store.close()


async def test_seq_after_an_unclean_stop_skips_ahead_never_back(tmp_path: Path) -> None:
    path = tmp_path / "bus.sqlite3"
    store = Store(path)
    await store.open()
    bus = EventBus(store, history_size=100)
    await bus.load()
    for _ in range(5):
        bus.publish("T_A", {})
    await store.close()  # no bus.close(): as after a crash, the last seq was not recorded
    store = Store(path)
    await store.open()
    try:
        again = EventBus(store, history_size=100)
        await again.load()
        assert again.seq == EventBus.SEQ_RESERVE  # reserved when the first bus loaded
        assert again.publish("T_B", {}).seq > again.history[-2].seq
    finally:
        await store.close()


async def test_persisted_history_is_pruned(db: Store) -> None:
    bus = EventBus(db, history_size=100)
    for _ in range(EventBus.PRUNE_EVERY):
        bus.publish("E", {})
    rows = await db.query("SELECT MIN(seq) AS lo, MAX(seq) AS hi, COUNT(*) AS n FROM events")
    assert (rows[0]["lo"], rows[0]["hi"], rows[0]["n"]) == (
        EventBus.PRUNE_EVERY - 99,
        EventBus.PRUNE_EVERY,
        100,
    )


# -- the bus behind real connections, in-process (to look at the daemon's own tasks) -----------


async def _eventually(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def test_subscriber_pumps_end_with_their_connections(tmp_path: Path) -> None:
    base = short_tmpdir()
    settings = Settings(
        socket=base / "d.sock",
        state_dir=tmp_path / "state",
        log_dir=tmp_path / "logs",
        litellm_preload=False,
        claude_bin=str(FAKE_CLAUDE),
    )
    daemon = Daemon(settings)
    runner = asyncio.create_task(daemon.run())
    try:
        await _eventually(lambda: runner.done() or settings.socket_path.exists())
        assert not runner.done(), runner

        def pumps() -> list[asyncio.Task[None]]:
            return [t for t in asyncio.all_tasks() if t.get_name().startswith("pump-")]

        for _ in range(10):
            w = await Wire.open(settings.socket_path)
            await w.result("SUBSCRIBE", {"event_types": ["*"]})
            await w.close()
        w = await Wire.open(settings.socket_path)
        await w.result("SUBSCRIBE", {"event_types": ["*"]})
        await _eventually(lambda: len(daemon.server.connections) == 1)
        await asyncio.sleep(0.05)
        # Only the open connection keeps a pump; the closed ones left nothing behind.
        assert len(pumps()) == 1
        assert len(daemon.bus.subscribers) == 1
        await w.close()
        await _eventually(lambda: not daemon.server.connections)
        await asyncio.sleep(0.05)
        assert pumps() == []
        assert daemon.bus.subscribers == set()
    finally:
        daemon.request_shutdown("test")
        assert await asyncio.wait_for(runner, 10) == 0
        shutil.rmtree(base, ignore_errors=True)
