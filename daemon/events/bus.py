"""The message bus: every event gets a monotonic ``seq``, is kept in a bounded history
(persisted, so ``GET_EVENTS`` survives a restart) and is fanned out to subscribers.

The history (``event_history`` events, 10 000 by default) lives in SQLite; memory keeps
only the newest :attr:`EventBus.MEMORY_EVENTS` of it, which answer the usual
``GET_EVENTS`` (a subscriber catching up on what it just missed). Older pages are read
from the database. Holding all 10 000 in memory cost ~1.3 KB per SPAWN until it filled.

Publishing never waits: each subscriber has its own bounded inbox, and a full inbox is the
subscriber's problem, not the publisher's. Socket subscribers are told and disconnected
(``policy="disconnect"``: they can catch up with ``GET_EVENTS since_seq``); observers lose
the overflowing events and the loss is counted and logged (``policy="drop"``).

An event is encoded to its wire line once, however many subscribers receive it. The
history keeps only an exact-size copy of that line (:class:`StoredEvent`), not the payload
as Python objects: it holds 10 000 events, and both the payload's dicts and orjson's output
buffer (allocated with room to spare: ~8 KiB for a 0.7 KiB PROCESS_COMPLETE line) take
several times the line's size.

Memory is bounded in bytes as well as in events (250 PUBLISHes of 4 MB held 1 GB): the
in-memory history keeps at most :attr:`EventBus.MEMORY_BYTES` of wire lines (older ones
are still read back from SQLite), a subscriber's inbox at most its ``max_bytes`` (past
either limit it overflows, as past ``maxsize``), and :meth:`EventBus.publish` refuses an
event whose wire line exceeds ``max_bytes`` with ``PAYLOAD_TOO_LARGE``.
"""

from __future__ import annotations

import sqlite3
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import orjson
import structlog

from daemon.errors import DaemonError, ErrorCode
from daemon.events.subscriber import Event, Patterns, StoredEvent, Subscriber, exact_copy
from daemon.protocol import encode_event, utc_now_iso
from daemon.state.db import Store

log = structlog.get_logger("ksi.bus")

MiB = 1024 * 1024


class EventBus:
    PRUNE_EVERY = 1000
    # Event rows are written without waiting, so a SIGKILL can lose the newest few. To keep
    # seq monotonic across such a crash, a high-water mark is stored well ahead of use and
    # a restarted bus continues above it (leaving a gap, never reusing a number).
    SEQ_RESERVE = 10_000
    _RESERVE_SQL = (
        "INSERT INTO meta(key, value) VALUES('seq_reserved', ?) "
        "ON CONFLICT(key) DO UPDATE SET value=excluded.value"
    )

    # The newest events, kept in memory as well as on disk (all of them without a store),
    # at most this many and this many bytes of wire lines.
    MEMORY_EVENTS = 1000
    MEMORY_BYTES = 16 * MiB

    def __init__(
        self,
        store: Store | None,
        *,
        history_size: int,
        memory_size: int | None = None,
        memory_bytes: int | None = None,
    ) -> None:
        self.store = store
        self.history_size = history_size
        in_memory = (
            history_size
            if store is None
            else min(history_size, memory_size if memory_size is not None else self.MEMORY_EVENTS)
        )
        self.history: deque[StoredEvent] = deque(maxlen=in_memory)
        self.memory_bytes = memory_bytes if memory_bytes is not None else self.MEMORY_BYTES
        self.history_bytes = 0  # wire bytes in self.history
        self.subscribers: set[Subscriber] = set()
        # Told of every directed event (one with to_agent) once it is published, in order and
        # before publish returns: the mailboxes of daemon/agents, which must not lose one to
        # a full inbox the way a subscriber may.
        self.on_directed: Callable[[Event], None] | None = None
        self.seq = 0
        self.published = 0
        self._since_prune = 0
        self._seq_reserved = 0

    async def load(self) -> None:
        """Restore the history and the seq counter from the store."""
        if self.store is None:
            return
        rows = await self.store.query(
            "SELECT seq, event_type, timestamp, from_agent, to_agent, parent_process_id, data "
            "FROM events "
            "ORDER BY seq DESC LIMIT ?",
            (self.history.maxlen,),
        )
        for row in reversed(rows):
            self._remember(_stored_from_row(row))
        max_rows = await self.store.query("SELECT MAX(seq) AS m FROM events")
        reserved = await self.store.query("SELECT value FROM meta WHERE key='seq_reserved'")
        self.seq = max(max_rows[0]["m"] or 0, reserved[0]["value"] if reserved else 0)
        # The first reservation is awaited: a crash right after start-up must not lose it.
        # Later ones are written SEQ_RESERVE / 2 events before they are needed.
        self._seq_reserved = self.seq + self.SEQ_RESERVE
        await self._write_reserved(self._seq_reserved)

    async def close(self) -> None:
        """On a clean stop, record the exact last seq: the next start continues at seq + 1."""
        await self._write_reserved(self.seq)

    async def _write_reserved(self, value: int) -> None:
        if self.store is not None:
            await self.store.write(self._RESERVE_SQL, (value,))

    def stats(self) -> dict[str, int]:
        """HEALTH_CHECK's counts of the bus."""
        return {
            "subscribers": len(self.subscribers),
            "events_published": self.published,
            "last_seq": self.seq,
        }

    def add(self, sub: Subscriber) -> None:
        self.subscribers.add(sub)

    def remove(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    def publish(
        self,
        event_type: str,
        data: dict[str, Any],
        *,
        from_agent: str | None = None,
        to_agent: str | None = None,
        parent_process_id: str | None = None,
        max_bytes: int | None = None,
    ) -> Event:
        """Publish an event. ``max_bytes``: refuse it (``PAYLOAD_TOO_LARGE``, no seq used)
        if its wire line is longer. An event that cannot be encoded raises, likewise
        before it takes a seq."""
        seq = self.seq + 1
        ts = utc_now_iso()
        wire = encode_event(
            event_type,
            data,
            seq,
            ts,
            from_agent=from_agent,
            to_agent=to_agent,
            parent_process_id=parent_process_id,
        )
        if max_bytes is not None and len(wire) > max_bytes:
            raise DaemonError(
                f"event of {len(wire)} bytes (as sent to subscribers) exceeds the limit of "
                f"{max_bytes}",
                code=ErrorCode.PAYLOAD_TOO_LARGE,
                details={"limit_bytes": max_bytes, "size_bytes": len(wire)},
            )
        self.seq = seq
        ev = Event(seq, event_type, data, ts, from_agent, to_agent, wire, 0, parent_process_id)
        self._remember(ev.stored())
        self.published += 1
        self._persist(ev)
        for sub in tuple(self.subscribers):
            if sub.wants(ev):
                if sub.offer(ev):
                    ev.delivered += 1
                else:
                    self._overflow(sub, ev)
        if to_agent is not None and self.on_directed is not None:
            self.on_directed(ev)
        return ev

    def _remember(self, ev: StoredEvent) -> None:
        """Append to the in-memory history, within its count and its byte budget."""
        history = self.history
        if len(history) == history.maxlen:
            self.history_bytes -= len(history[0].wire)  # append() pushes it out
        history.append(ev)
        self.history_bytes += len(ev.wire)
        while self.history_bytes > self.memory_bytes and len(history) > 1:
            self.history_bytes -= len(history.popleft().wire)

    def first_available_seq(self) -> int:
        """The oldest seq the history can still return (``seq + 1`` when it is empty)."""
        floor = max(0, self.seq - self.history_size) + 1
        if self.store is not None:
            return floor  # older than memory holds is read back from the store
        return max(floor, self.history[0].seq if self.history else self.seq + 1)

    def _overflow(self, sub: Subscriber, ev: Event) -> None:
        if sub.policy == "drop":
            sub.lost += 1
            if sub.lost == 1 or sub.lost % 1000 == 0:
                log.warning("bus.events_lost", subscriber=sub.name, lost=sub.lost, seq=ev.seq)
            return
        log.warning(
            "bus.subscriber_dropped", subscriber=sub.name, queued=len(sub.inbox), seq=ev.seq
        )
        sub.dropped = True
        self.remove(sub)
        sub.wake()
        if sub.on_drop is not None:
            sub.on_drop()

    def _persist(self, ev: Event) -> None:
        if self.store is None:
            return
        if ev.seq > self._seq_reserved - self.SEQ_RESERVE // 2:
            self._seq_reserved = ev.seq + self.SEQ_RESERVE
            self.store.write_nowait(self._RESERVE_SQL, (self._seq_reserved,))
        self.store.write_nowait(
            "INSERT INTO events(seq, event_type, timestamp, from_agent, to_agent, "
            "parent_process_id, data) VALUES(?,?,?,?,?,?,?)",
            (
                ev.seq,
                ev.event_type,
                ev.timestamp,
                ev.from_agent,
                ev.to_agent,
                ev.parent_process_id,
                orjson.dumps(ev.data),
            ),
        )
        self._since_prune += 1
        if self._since_prune >= self.PRUNE_EVERY:
            self._since_prune = 0
            self.store.write_nowait(
                "DELETE FROM events WHERE seq <= ?", (ev.seq - self.history_size,)
            )

    async def query(
        self, patterns: Iterable[str] | None, since_seq: int, limit: int
    ) -> list[StoredEvent]:
        """History after ``since_seq``, oldest first, at most ``limit`` events: the newest
        ``limit`` without ``since_seq``, else the oldest ``limit`` after it."""
        return await self._select(patterns, since_seq, limit, newest=since_seq == 0)

    async def replay(
        self, patterns: Iterable[str] | None, after: int, limit: int
    ) -> list[StoredEvent]:
        """The oldest ``limit`` events after ``after`` (0: from the oldest kept)."""
        return await self._select(patterns, after, limit, newest=False)

    async def _select(
        self, patterns: Iterable[str] | None, since_seq: int, limit: int, *, newest: bool
    ) -> list[StoredEvent]:
        pat = Patterns(patterns) if patterns else None
        # The history is the last `history_size` seqs, whatever the table still holds.
        after = max(since_seq, self.seq - self.history_size)
        out: list[StoredEvent] = []
        for ev in reversed(self.history):
            if ev.seq <= after:
                break
            if pat is None or pat.match(ev.event_type):
                out.append(ev)
        out.reverse()
        if newest and len(out) >= limit:
            return out[-limit:]
        oldest_in_memory = self.history[0].seq if self.history else self.seq + 1
        if self.store is None or oldest_in_memory <= after + 1:
            return out[-limit:] if newest else out[:limit]  # memory holds all of it
        rows = await self.store.call(lambda conn: _scan_events(conn, pat, after, limit, newest))
        events = [_stored_from_row(row) for row in rows]
        if newest:
            events.reverse()
        return events


def _scan_events(
    conn: sqlite3.Connection, pat: Patterns | None, after: int, limit: int, newest: bool
) -> list[sqlite3.Row]:
    """Runs on the store thread. Filters in Python because patterns are fnmatch globs,
    which SQLite's GLOB does not spell the same way ([!x] vs [^x])."""
    order = "DESC" if newest else "ASC"
    cursor = conn.execute(
        "SELECT seq, event_type, timestamp, from_agent, to_agent, parent_process_id, data "
        "FROM events "
        f"WHERE seq > ? ORDER BY seq {order}",
        (after,),
    )
    out: list[sqlite3.Row] = []
    for row in cursor:
        if pat is None or pat.match(row["event_type"]):
            out.append(row)
            if len(out) >= limit:
                break
    cursor.close()
    return out


def _stored_from_row(row: sqlite3.Row) -> StoredEvent:
    wire = encode_event(
        row["event_type"],
        orjson.loads(row["data"]),
        row["seq"],
        row["timestamp"],
        from_agent=row["from_agent"],
        to_agent=row["to_agent"],
        parent_process_id=row["parent_process_id"],
    )
    return StoredEvent(
        row["seq"],
        row["event_type"],
        row["timestamp"],
        row["from_agent"],
        row["to_agent"],
        exact_copy(wire),
    )
