"""A connection's event subscription: replay, the event pump, dropping a slow subscriber;
and a sync SPAWN's progress streamed on its own connection (:class:`ProgressStream`).

Events are written in chunks of at most ``FLUSH_BYTES``, each only once the peer has taken
the previous one, so a slow peer holds at most about two chunks in the transport. A
subscriber that falls behind (``subscriber_queue`` events or ``subscriber_queue_bytes``
queued, see ``daemon/events/bus.py``) is dropped: its unsent backlog is discarded and the
``SUBSCRIBER_DROPPED`` notice is written at once, right after what the transport already
holds, with ``last_seq`` = the last event written, so ``SUBSCRIBE`` with
``since_seq=last_seq`` resumes without a gap or a duplicate. ``since_seq`` replays the
history first (``EVENTS_GAP`` if it no longer reaches back that far), then live events.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import structlog

from daemon.events.bus import EventBus
from daemon.events.subscriber import Event, StoredEvent, Subscriber
from daemon.protocol import Request, encode_event, ksi_shaped, utc_now_iso, with_echo

if TYPE_CHECKING:
    from daemon.server.connection import Connection

log = structlog.get_logger("ksi.server")

# A dropped subscriber's connection is closed once the transport has written what it holds
# (at most ~2 chunks and the SUBSCRIBER_DROPPED notice); it is aborted if the peer reads
# none of it for this long (a client that stopped reading would otherwise keep it, with
# its buffers, forever). Long enough for a client busy with an event for a few seconds.
DROP_GRACE_S: Final = 5.0
# How many history events a since_seq replay reads per query.
_REPLAY_PAGE: Final = 500
# Events are written in chunks of about this many bytes (and replies coalesced up to it).
FLUSH_BYTES: Final = 64 * 1024


class Subscription:
    """The subscriber of one connection on the bus, and the task that writes its events."""

    def __init__(
        self, conn: Connection, bus: EventBus, sub: Subscriber, since_seq: int | None
    ) -> None:
        self.conn = conn
        self.bus = bus
        self.subscriber = sub
        self._drop_timer: asyncio.TimerHandle | None = None
        sub.on_drop = self._dropped
        # No await between reading seq and joining the bus: events up to `upto` come
        # from the history, every later one is queued live, none is missed or doubled.
        upto = bus.seq
        # The last event seq handed to the transport: SUBSCRIBER_DROPPED's last_seq.
        self.sent_seq = upto if since_seq is None else min(since_seq, upto)
        bus.add(sub)
        self.pump = asyncio.create_task(self._run(since_seq, upto), name=f"pump-{conn.id}")

    async def _run(self, since_seq: int | None, upto: int) -> None:
        """Replay the history after ``since_seq`` up to ``upto``, then write live events as
        they come. A drop (see :meth:`_dropped`) closes the connection, which ends this."""
        if since_seq is not None and since_seq < upto:
            await self._replay(since_seq, upto)
        while not self.conn.closed:
            await self._write_events(await self.subscriber.next_batch())

    async def _replay(self, after: int, upto: int) -> None:
        bus = self.bus
        sub = self.subscriber
        while after < upto and not self.conn.closed:
            # Checked on every page: the history's oldest end moves on while we read.
            first = bus.first_available_seq()
            if after + 1 < first:
                gap = {
                    "since_seq": after,
                    "first_available_seq": first,
                    "hint": "events after since_seq and before first_available_seq are "
                    "no longer in the history",
                }
                log.warning(
                    "subscriber.events_gap",
                    conn=self.conn.id,
                    since_seq=after,
                    first_available_seq=first,
                )
                after = first - 1
                self.sent_seq = min(after, upto)
                await self.conn.send(encode_event("EVENTS_GAP", gap, 0, utc_now_iso()), now=True)
                continue
            events = await bus.replay(sub.patterns.items, after, _REPLAY_PAGE)
            if not events:
                break
            await self._write_events([e for e in events if e.seq <= upto and sub.wants(e)])
            after = events[-1].seq
            self.sent_seq = max(self.sent_seq, min(after, upto))
        self.sent_seq = max(self.sent_seq, upto)

    async def _write_events(self, events: Sequence[Event | StoredEvent]) -> None:
        """Write events in chunks of ~``FLUSH_BYTES``, each once the peer took the last:
        what a slow peer leaves unread stays countable in the inbox, not in the transport."""
        chunk: list[bytes] = []
        size = 0
        ksi = self.conn.ksi_events
        for ev in events:
            wire = ksi_shaped(ev.wire) if ksi else ev.wire
            chunk.append(wire)
            size += len(wire)
            if size >= FLUSH_BYTES:
                await self._push(chunk, ev.seq)
                chunk = []
                size = 0
        if chunk:
            await self._push(chunk, events[-1].seq)

    async def _push(self, chunk: list[bytes], last_seq: int) -> None:
        # Recorded first: send() hands the bytes to the transport before it waits.
        self.sent_seq = last_seq
        await self.conn.send(chunk[0] if len(chunk) == 1 else b"".join(chunk), now=True)

    def _dropped(self) -> None:
        """The bus dropped this subscriber (too slow). The notice goes out now, behind only
        what the transport already holds; the unsent backlog is discarded. Its last_seq is
        the last event written, so the client can resume with since_seq=last_seq."""
        sub = self.subscriber
        sub.inbox.clear()
        notice = encode_event(
            "SUBSCRIBER_DROPPED",
            {
                "reason": "slow_consumer",
                "queue_limit": sub.maxsize,
                "queue_limit_bytes": sub.max_bytes,
                "last_seq": self.sent_seq,
                "hint": "reconnect and SUBSCRIBE with since_seq=last_seq",
            },
            0,
            utc_now_iso(),
        )
        conn = self.conn
        conn.queue(notice)
        conn.close()  # flushes the notice, ends the pump; the transport closes once written
        if conn.transport is not None:
            held = conn.transport.get_write_buffer_size()
            if held:
                self._drop_timer = asyncio.get_running_loop().call_later(
                    DROP_GRACE_S, self._abort_if_stuck, held
                )

    def _abort_if_stuck(self, held_before: int) -> None:
        self._drop_timer = None
        conn = self.conn
        if conn.transport is None or conn.server.connections.get(conn.id) is not conn:
            return  # written and gone
        held = conn.transport.get_write_buffer_size()
        if 0 < held < held_before:  # the peer is reading: give it more time
            self._drop_timer = asyncio.get_running_loop().call_later(
                DROP_GRACE_S, self._abort_if_stuck, held
            )
            return
        log.warning(
            "connection.aborted",
            conn=conn.id,
            reason="dropped subscriber not reading",
            unsent_bytes=held,
        )
        conn.transport.abort()  # discards what it could not send

    def stop(self) -> None:
        """The connection closes: leave the bus and end the pump."""
        self.bus.remove(self.subscriber)
        if self._drop_timer is not None:
            self._drop_timer.cancel()
        # The pump waits on the subscriber's inbox, which nothing fills any more: end it,
        # or every subscribed connection would leave a pending task behind.
        # The connection tracks the task (Connection.pending_tasks): the shutdown awaits it.
        if self.pump is not asyncio.current_task():
            self.pump.cancel()


class ProgressStream:
    """The PROCESS_PROGRESS events of one sync SPAWN with ``stream: true``, written on the
    connection that sent it, ahead of its reply (the scheduler calls this as each event is
    published, daemon/turns/recorder.py). Each line is the event as subscribers get it, plus
    the request's ``id``.

    They are queued in the connection's output, in order and before the reply, so a client
    never sees the reply before the progress it follows. That output is bounded: once the
    peer leaves more than ``limit_bytes`` unread, streaming stops for this turn (a
    subscriber would be dropped at that point) and ``missed`` counts what was not written;
    the reply reports it, and GET_EVENTS still has every event.
    """

    def __init__(self, conn: Connection, req: Request, limit_bytes: int) -> None:
        self.conn = conn
        self.req = req
        self.limit_bytes = limit_bytes
        self.missed = 0

    def __call__(self, event: Event) -> None:
        conn = self.conn
        if conn.closed:
            return
        if self.missed or conn.unsent_bytes() > self.limit_bytes:
            if not self.missed:
                log.warning("connection.stream_stopped", conn=conn.id, seq=event.seq)
            self.missed += 1
            return
        conn.queue(with_echo(event.wire, self.req))
