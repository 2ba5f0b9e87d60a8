"""The Unix-socket listener and its connections.

A connection is one-shot by default (KSI's convention: one command, one reply, close, so
``echo ... | nc -U`` returns). ``CONNECT``, ``AGENT_CONNECTION`` or ``SUBSCRIBE`` make it
persistent: then it carries many pipelined commands and receives pushed events.

On a persistent connection, fast commands are answered in order, inline; long-running
ones (a sync ``SPAWN``) run in their own task and answer when done, matched by ``id``.
A client that goes away mid-turn does not cancel the turn: it is paid for and will be
logged and recorded; only the reply is lost.

Each connection is an :class:`asyncio.Protocol`, not a StreamReader/StreamWriter pair: a
request is parsed and answered inside the ``data_received`` call that delivered it, in the
same turn of the event loop. Command handlers are coroutines; most finish without ever
waiting (they read memory), so the first step of each is run right there ("eagerly", as
Python 3.12's eager tasks do) and, if it has to wait after all (a store write, a SPAWN), it
goes on as a task while the connection's later lines wait their turn. Measured (bench P3):
the streams version paid one more loop turn per request, ~50 us on the benchmark VM, more
than parsing, dispatch and encoding together. A handler's first step therefore may run
outside any task: use ``asyncio.wait_for``, not ``asyncio.timeout``, in command handlers.

Whatever goes wrong while a line is served, the line gets a reply (``INTERNAL_ERROR`` at
worst) and the connection goes on reading: an exception that escaped into a loop callback
used to leave reading paused for good, the client hung and the fd was never freed.

Input is bounded in bytes: a line longer than ``max_line_bytes`` is skipped to its end
(``LINE_TOO_LONG``); all connections' incomplete lines together may hold at most
``max_pending_input_bytes`` (past that the growing line is refused the same way,
``INPUT_BUFFERS_FULL``); and a connection whose incomplete line gets no byte for
``partial_line_timeout_s`` is told (``LINE_TIMEOUT``) and closed.

Subscribers: events are written in chunks of at most ``_FLUSH_BYTES``, each only once the
peer has taken the previous one, so a slow peer holds at most about two chunks in the
transport. A subscriber that falls behind (``subscriber_queue`` events or
``subscriber_queue_bytes`` queued) is dropped: its unsent backlog is discarded and the
``SUBSCRIBER_DROPPED`` notice is written at once, right after what the transport already
holds, with ``last_seq`` = the last event written, so ``SUBSCRIBE`` with
``since_seq=last_seq`` resumes without a gap or a duplicate. ``since_seq`` replays the
history first (``EVENTS_GAP`` if it no longer reaches back that far), then live events.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import itertools
import os
import socket
import struct
import types
from collections import deque
from collections.abc import Coroutine, Generator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import structlog

from daemon.commands.registry import Context
from daemon.errors import DaemonError, ErrorCode, InvalidParameters, PermissionDenied, ProtocolError
from daemon.events.bus import Event, StoredEvent, Subscriber
from daemon.fsmodes import private_dir, socket_files
from daemon.protocol import Request, encode_error, encode_event, parse_request, utc_now_iso

if TYPE_CHECKING:
    from daemon.app import Daemon

log = structlog.get_logger("ksi.server")

# Sentinels in place of a refused line: never valid lines (lines end with \n).
_TOO_LONG: Final = b"\x00too-long"
_BUFFERS_FULL: Final = b"\x00buffers-full"
_REFUSE_READ_S: Final = 1.0  # how long a refused peer may take to send its request line
# A dropped subscriber's connection is closed once the transport has written what it holds
# (at most ~2 chunks and the SUBSCRIBER_DROPPED notice); it is aborted if the peer reads
# none of it for this long (a client that stopped reading would otherwise keep it, with
# its buffers, forever). Long enough for a client busy with an event for a few seconds.
DROP_GRACE_S: Final = 5.0
# How many history events a since_seq replay reads per query.
_REPLAY_PAGE: Final = 500
# Replies to pipelined requests are coalesced: the replies to the lines of one read go out
# in one write (one syscall, one wake-up of the peer), or once this many bytes wait.
_FLUSH_BYTES: Final = 64 * 1024
# A pipelining connection gives way to other tasks after this many requests even when none
# of them published an event (after one that did, it gives way at once; see _process).
_YIELD_EVERY: Final = 16


class _Served(enum.Enum):
    NOTHING = "nothing"  # a blank line
    ANSWERED = "answered"
    WAITING = "waiting"  # being answered by a request that had to wait (see _waiting)
    DETACHED = "detached"  # a long-running command now running in a task of its own


class Connection(asyncio.Protocol):
    def __init__(self, server: Server, conn_id: int) -> None:
        self.server = server
        self.daemon = server.daemon
        self.id = conn_id
        self.transport: asyncio.Transport | None = None
        self.peer_pid: int | None = None
        self.persistent = False
        self.agent_id: str | None = None
        self.subscriber: Subscriber | None = None
        self.closed = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self._pump: asyncio.Task[None] | None = None
        self._drop_timer: asyncio.TimerHandle | None = None
        # The last event seq handed to the transport: SUBSCRIBER_DROPPED's last_seq.
        self._sent_seq = 0
        self.ctx = Context(server.daemon.services, self)
        # Output: queued replies, written together (see send/flush).
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_handle: asyncio.Handle | None = None
        self._write_paused = False
        self._wrote = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        # Input: the partial line, complete lines not yet served, and why serving paused.
        self._buf = bytearray()
        self._lines: deque[bytes] = deque()
        # Discarding the rest of a refused line: the sentinel it is answered with, or None.
        self._skipping: bytes | None = None
        self._limit = server.settings.max_line_bytes
        self._held = 0  # len(_buf) as counted in server.pending_input
        self._last_input = 0.0  # loop time of the last byte of an incomplete line
        self._idle_timer: asyncio.TimerHandle | None = None
        self._waiting: asyncio.Task[bytes] | None = None  # a request that had to wait
        self._resume_handle: asyncio.Handle | None = None  # serving resumes next loop turn
        self._read_paused = False
        self._eof = False
        self._refusing: asyncio.TimerHandle | None = None

    # -- transport callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.accepted += 1
        self.peer_pid, peer_uid = _peer_credentials(transport)
        if peer_uid is not None and peer_uid not in (self.server.uid, 0):
            log.warning(
                "connection.refused", conn=self.id, peer_uid=peer_uid, peer_pid=self.peer_pid
            )
            err = PermissionDenied(
                f"uid {peer_uid} may not use this daemon (only uid {self.server.uid} and root)"
            )
            transport.write(encode_error(None, err))
            # Take in the request the peer sends before closing: closing a Unix socket with
            # unread input resets the connection, and the peer would lose the error above.
            self._refusing = asyncio.get_running_loop().call_later(_REFUSE_READ_S, self._hang_up)
            return
        self.server.connections[self.id] = self

    def data_received(self, data: bytes) -> None:
        if self._refusing is not None:
            if b"\n" in data:
                self._hang_up()
            return
        if self.closed:
            return
        self._split(data)
        self._process()

    def eof_received(self) -> bool:
        if self._refusing is not None:
            self._hang_up()
            return False
        self._eof = True
        if self._skipping is not None:  # a refused last line is answered like the others
            self._lines.append(self._skipping)
            self._skipping = None
        elif self._buf:  # a last line without "\n" still counts
            self._lines.append(bytes(self._buf))
        self._buf.clear()
        self._account()
        self._process()
        return True  # keep the transport: replies may still be on their way

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:  # a reset, or a write to a peer that had gone
            event = "connection.lost_mid_reply" if self._wrote else "connection.reset"
            log.info(event, conn=self.id, error=type(exc).__name__)
        self.server.connections.pop(self.id, None)
        if self._refusing is not None:
            self._refusing.cancel()
        if self._drop_timer is not None:
            self._drop_timer.cancel()
        self._lines.clear()
        self._buf.clear()
        self._skipping = None
        self._account()
        self.close()
        for fut in self._drain_waiters:
            if not fut.done():
                fut.set_result(None)
        self._drain_waiters.clear()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        for fut in self._drain_waiters:
            if not fut.done():
                fut.set_result(None)
        self._drain_waiters.clear()
        if self._lines and self._waiting is None and self._resume_handle is None:
            # Serving stopped while the peer was not reading its replies: go on.
            self._resume_handle = asyncio.get_running_loop().call_soon(self._resume)

    def _hang_up(self) -> None:
        if self._refusing is not None:
            self._refusing.cancel()
        if self.transport is not None:
            self.transport.close()

    # -- input -----------------------------------------------------------------------------

    def _split(self, data: bytes) -> None:
        """Cut complete lines out of the input; an oversized line becomes ``_TOO_LONG``, one
        that would take the incomplete lines of all connections over their budget
        ``_BUFFERS_FULL``."""
        start = 0
        if self._skipping is not None:
            nl = data.find(b"\n")
            if nl < 0:
                self._last_input = asyncio.get_running_loop().time()
                return
            self._lines.append(self._skipping)
            self._skipping = None
            start = nl + 1
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                break
            if self._buf:
                self._buf += data[start : nl + 1]
                line = bytes(self._buf)
                self._buf.clear()
            else:
                line = data[start : nl + 1]
            self._lines.append(_TOO_LONG if len(line) - 1 > self._limit else line)
            start = nl + 1
        if start < len(data):
            server = self.server
            if len(self._buf) + len(data) - start > self._limit:  # no end in sight: drop it
                self._refuse_partial(_TOO_LONG)
            elif server.pending_input + len(data) - start > server.max_pending_input:
                # Over the global budget: the line that would grow past it is refused.
                log.warning(
                    "request.rejected",
                    conn=self.id,
                    code=ErrorCode.INPUT_BUFFERS_FULL,
                    pending_bytes=server.pending_input,
                )
                self._refuse_partial(_BUFFERS_FULL)
            else:
                self._buf += data[start:]
            self._last_input = asyncio.get_running_loop().time()
            if self._idle_timer is None:
                self._idle_timer = asyncio.get_running_loop().call_later(
                    server.settings.partial_line_timeout_s, self._check_idle
                )
        if self._held or self._buf:
            self._account()

    def _refuse_partial(self, sentinel: bytes) -> None:
        self._buf.clear()
        self._skipping = sentinel

    def _account(self) -> None:
        """Keep the server's count of bytes in incomplete lines up to date."""
        held = len(self._buf)
        self.server.pending_input += held - self._held
        self._held = held

    def _check_idle(self) -> None:
        """An incomplete line that gets no byte for ``partial_line_timeout_s``: close."""
        self._idle_timer = None
        if self.closed or (not self._buf and self._skipping is None):
            return
        timeout = self.server.settings.partial_line_timeout_s
        now = asyncio.get_running_loop().time()
        if self._read_paused:  # we stopped reading (back-pressure): the wait is not the peer's
            self._last_input = now
        idle = now - self._last_input
        if idle < timeout:
            self._idle_timer = asyncio.get_running_loop().call_later(
                timeout - idle, self._check_idle
            )
            return
        log.warning(
            "connection.idle_timeout", conn=self.id, held_bytes=len(self._buf), timeout_s=timeout
        )
        err = ProtocolError(
            f"incomplete request line, no data for {timeout:g} s",
            code=ErrorCode.LINE_TIMEOUT,
            details={"timeout_s": timeout},
        )
        self._queue(encode_error(None, err))
        self._buf.clear()
        self._skipping = None
        self._account()
        self.close()

    def _process(self) -> None:
        """Serve queued lines in order, inline, until one has to wait, one published an
        event or started a task (then other tasks get a turn first), or none are left."""
        if self._waiting is not None or self._resume_handle is not None:
            self._hold_input()
            return
        bus = self.daemon.bus
        published = bus.published
        served = 0
        while self._lines and not self.closed and not self._write_paused:
            line = self._lines.popleft()
            try:
                outcome = self._serve_line(line)
            except Exception:  # a bug must cost this line an error reply, nothing more
                log.exception("request.crashed", conn=self.id)
                self._queue(
                    encode_error(
                        None,
                        DaemonError("internal error while serving the request; see the daemon log"),
                    )
                )
                outcome = _Served.ANSWERED
            if outcome is _Served.NOTHING:
                continue
            if outcome is _Served.WAITING:
                break
            if not self.persistent:
                self.close()  # one command per connection: the reply goes, then we close
                return
            served += 1
            if self._lines and (
                bus.published != published or outcome is _Served.DETACHED or served >= _YIELD_EVERY
            ):
                # Give way: subscriber pumps must get to write what was just published,
                # or a burst of PUBLISHes would overflow subscribers that read promptly.
                self._resume_handle = asyncio.get_running_loop().call_soon(self._resume)
                break
        self.flush()
        if self._lines:
            self._hold_input()
        else:
            self._release_input()
            if self._eof and self._waiting is None and not self.closed:
                self.close()

    def _resume(self) -> None:
        self._resume_handle = None
        self._run_process()

    def _run_process(self) -> None:
        """``_process`` from a loop callback: an exception there would only be logged by
        the loop, with reading paused for good; close the connection instead."""
        try:
            self._process()
        except Exception:
            log.exception("connection.crashed", conn=self.id)
            self.close()

    def _serve_line(self, line: bytes) -> _Served:
        """Answer one line, or start answering it (see ``_waiting``)."""
        if line is _TOO_LONG:
            err = ProtocolError(
                f"request line exceeds {self._limit} bytes",
                code=ErrorCode.LINE_TOO_LONG,
                details={"limit_bytes": self._limit},
            )
            log.warning("request.rejected", conn=self.id, code=err.code)
            self._queue(encode_error(None, err))
            return _Served.ANSWERED
        if line is _BUFFERS_FULL:
            limit = self.server.max_pending_input
            err = ProtocolError(
                f"request refused: incomplete requests of all connections hold over {limit} "
                "bytes; retry",
                code=ErrorCode.INPUT_BUFFERS_FULL,
                details={"limit_bytes": limit},
            )
            self._queue(encode_error(None, err))
            return _Served.ANSWERED
        if not line.strip():
            return _Served.NOTHING
        try:
            req = parse_request(line)
        except ProtocolError as exc:
            log.warning("request.rejected", conn=self.id, code=exc.code, error=exc.message)
            self._queue(encode_error(exc.echo, exc))
            return _Served.ANSWERED
        spec = self.daemon.registry.get(req.command)
        if spec is not None and spec.long_running and self.persistent:
            self._track(asyncio.create_task(self._run_detached(req)))
            return _Served.DETACHED
        self.ctx.request = req
        coro = self.daemon.registry.dispatch(self.ctx, req)
        value: Any = None
        if spec is not None and spec.long_running:
            done = False  # a one-shot SPAWN: its code may need a task throughout
        else:
            done, value = _first_step(coro)
        if done:
            self._queue(value)
            return _Served.ANSWERED
        # It has to wait: it goes on as a task, and the connection's later lines wait for it.
        task = asyncio.get_running_loop().create_task(_run_rest(coro, value))
        self._waiting = task
        self._track(task)
        task.add_done_callback(functools.partial(self._waited, req))
        return _Served.WAITING

    def _waited(self, req: Request, task: asyncio.Task[bytes]) -> None:
        self._waiting = None
        if not task.cancelled():
            exc = task.exception()
            if exc is None:
                self._queue(task.result())
            else:  # dispatch does not raise; if it ever does, the request still gets a reply
                log.error("request.crashed", conn=self.id, command=req.command, exc_info=exc)
                self._queue(
                    encode_error(
                        req,
                        DaemonError("internal error while serving the request; see the daemon log"),
                    )
                )
        if not self.persistent:
            self.close()
            return
        self._run_process()

    async def _run_detached(self, req: Request) -> None:
        ctx = Context(self.daemon.services, self, req)
        reply = await self.daemon.registry.dispatch(ctx, req)
        await self.send(reply)

    def _track(self, task: asyncio.Task[Any]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _hold_input(self) -> None:
        """Queued lines wait: stop reading more until they are served (back-pressure)."""
        if not self._read_paused and self.transport is not None and not self.closed:
            self._read_paused = True
            self.transport.pause_reading()

    def _release_input(self) -> None:
        if self._read_paused and self.transport is not None and not self.closed:
            self._read_paused = False
            self.transport.resume_reading()

    # -- output -----------------------------------------------------------------------

    def _queue(self, data: bytes) -> None:
        self._out.append(data)
        self._out_bytes += len(data)
        if self._out_bytes >= _FLUSH_BYTES:
            self.flush()

    async def send(self, data: bytes, *, now: bool = False) -> None:
        """Queue ``data`` behind everything queued before it (``now``: and write it all at
        once, as event pushes do); wait if the peer is slow."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return
        self._queue(data)
        if now:
            self.flush()
        elif self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self.flush)
        if self._write_paused:
            fut = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(fut)
            await fut

    def flush(self) -> None:
        """Hand the queued output to the transport in one write."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._out:
            return
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        self._out_bytes = 0
        if self.transport is not None and not self.transport.is_closing():
            self._wrote = True
            self.transport.write(data)

    # -- persistence and subscriptions ----------------------------------------------------

    def make_persistent(self, agent_id: str | None = None) -> None:
        self.persistent = True
        if agent_id:
            self.agent_id = agent_id
            if self.subscriber is not None:
                self.subscriber.agent_id = agent_id

    def subscribe(
        self, patterns: list[str], agent_id: str | None, since_seq: int | None = None
    ) -> Subscriber:
        """Subscribe (or add patterns). ``since_seq``: first replay the history after it."""
        sub = self.subscriber
        if since_seq is not None and sub is not None and not sub.dropped:
            # Its replay would repeat events this connection has already been sent.
            raise InvalidParameters(
                "since_seq is only accepted by a connection's first SUBSCRIBE",
                details={"last_seq": self._sent_seq},
            )
        self.make_persistent(agent_id)
        if sub is None or sub.dropped:
            settings = self.daemon.settings
            bus = self.daemon.bus
            sub = Subscriber(
                f"conn-{self.id}",
                maxsize=settings.subscriber_queue,
                max_bytes=settings.subscriber_queue_bytes,
                agent_id=self.agent_id,
                policy="disconnect",
            )
            sub.on_drop = self._dropped
            self.subscriber = sub
            # No await between reading seq and joining the bus: events up to `upto` come
            # from the history, every later one is queued live, none is missed or doubled.
            upto = bus.seq
            self._sent_seq = upto if since_seq is None else min(since_seq, upto)
            bus.add(sub)
            self._pump = asyncio.create_task(
                self._pump_events(sub, since_seq, upto), name=f"pump-{self.id}"
            )
        sub.patterns.update(add=patterns)
        return sub

    def unsubscribe(self, patterns: list[str] | None) -> list[str]:
        sub = self.subscriber
        if sub is None:
            return []
        sub.patterns.update(remove=sub.patterns.items if patterns is None else patterns)
        return sorted(sub.patterns.items)

    async def _pump_events(self, sub: Subscriber, since_seq: int | None, upto: int) -> None:
        """Replay the history after ``since_seq`` up to ``upto``, then write live events as
        they come. A drop (see :meth:`_dropped`) closes the connection, which ends this."""
        if since_seq is not None and since_seq < upto:
            await self._replay(sub, since_seq, upto)
        while not self.closed:
            await self._write_events(await sub.next_batch())

    async def _replay(self, sub: Subscriber, after: int, upto: int) -> None:
        bus = self.daemon.bus
        while after < upto and not self.closed:
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
                    conn=self.id,
                    since_seq=after,
                    first_available_seq=first,
                )
                after = first - 1
                self._sent_seq = min(after, upto)
                await self.send(encode_event("EVENTS_GAP", gap, 0, utc_now_iso()), now=True)
                continue
            events = await bus.replay(sub.patterns.items, after, _REPLAY_PAGE)
            if not events:
                break
            await self._write_events([e for e in events if e.seq <= upto and sub.wants(e)])
            after = events[-1].seq
            self._sent_seq = max(self._sent_seq, min(after, upto))
        self._sent_seq = max(self._sent_seq, upto)

    async def _write_events(self, events: Sequence[Event | StoredEvent]) -> None:
        """Write events in chunks of ~``_FLUSH_BYTES``, each once the peer took the last:
        what a slow peer leaves unread stays countable in the inbox, not in the transport."""
        chunk: list[bytes] = []
        size = 0
        for ev in events:
            chunk.append(ev.wire)
            size += len(ev.wire)
            if size >= _FLUSH_BYTES:
                await self._push(chunk, ev.seq)
                chunk = []
                size = 0
        if chunk:
            await self._push(chunk, events[-1].seq)

    async def _push(self, chunk: list[bytes], last_seq: int) -> None:
        # Recorded first: send() hands the bytes to the transport before it waits.
        self._sent_seq = last_seq
        await self.send(chunk[0] if len(chunk) == 1 else b"".join(chunk), now=True)

    def _dropped(self) -> None:
        """The bus dropped this subscriber (too slow). The notice goes out now, behind only
        what the transport already holds; the unsent backlog is discarded. Its last_seq is
        the last event written, so the client can resume with since_seq=last_seq."""
        sub = self.subscriber
        assert sub is not None
        sub.inbox.clear()
        notice = encode_event(
            "SUBSCRIBER_DROPPED",
            {
                "reason": "slow_consumer",
                "queue_limit": sub.maxsize,
                "queue_limit_bytes": sub.max_bytes,
                "last_seq": self._sent_seq,
                "hint": "reconnect and SUBSCRIBE with since_seq=last_seq",
            },
            0,
            utc_now_iso(),
        )
        self._queue(notice)
        self.close()  # flushes the notice, ends the pump; the transport closes once written
        if self.transport is not None:
            held = self.transport.get_write_buffer_size()
            if held:
                self._drop_timer = asyncio.get_running_loop().call_later(
                    DROP_GRACE_S, self._abort_if_stuck, held
                )

    def _abort_if_stuck(self, held_before: int) -> None:
        self._drop_timer = None
        if self.transport is None or self.server.connections.get(self.id) is not self:
            return  # written and gone
        held = self.transport.get_write_buffer_size()
        if 0 < held < held_before:  # the peer is reading: give it more time
            self._drop_timer = asyncio.get_running_loop().call_later(
                DROP_GRACE_S, self._abort_if_stuck, held
            )
            return
        log.warning(
            "connection.aborted",
            conn=self.id,
            reason="dropped subscriber not reading",
            unsent_bytes=held,
        )
        self.transport.abort()  # discards what it could not send

    def close(self) -> None:
        if self.subscriber is not None:
            self.daemon.bus.remove(self.subscriber)
        if self._drop_timer is not None:
            self._drop_timer.cancel()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._resume_handle is not None:
            self._resume_handle.cancel()
            self._resume_handle = None
        # The pump waits on the subscriber's inbox, which nothing fills any more: end it,
        # or every subscribed connection would leave a pending task behind.
        if self._pump is not None and self._pump is not asyncio.current_task():
            self._pump.cancel()
        if self.closed:
            return
        self.flush()  # queued output goes before the close
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


def _first_step(coro: Coroutine[Any, Any, bytes]) -> tuple[bool, Any]:
    """Run a coroutine up to its first wait: (True, its result) if it never waited, else
    (False, what it is waiting on), to be handed to :func:`_run_rest`."""
    try:
        return False, coro.send(None)
    except StopIteration as stop:
        return True, stop.value


async def _run_rest(coro: Coroutine[Any, Any, bytes], waiting_on: Any) -> bytes:
    """Finish, inside a task, a coroutine that :func:`_first_step` started."""
    result: bytes = await _resume(coro, waiting_on)
    return result


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], waiting_on: Any) -> Generator[Any, Any, Any]:
    # Delegation by hand, as `await` does it: what the coroutine waits on goes up to the
    # task running us, what the task sends or throws (a result, a cancellation) goes down.
    while True:
        try:
            sent = yield waiting_on
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # everything, cancellation included, is the coroutine's
            try:
                waiting_on = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                waiting_on = coro.send(sent)
            except StopIteration as stop:
                return stop.value


class Server:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.settings = daemon.settings
        self.connections: dict[int, Connection] = {}
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self.uid = os.getuid()
        self.accepted = 0
        # Bytes held in all connections' incomplete lines, and the budget for them.
        self.pending_input = 0
        self.max_pending_input = daemon.settings.max_pending_input_bytes

    @property
    def path(self) -> Path:
        return self.settings.socket_path

    @functools.cached_property
    def path_str(self) -> str:
        return str(self.settings.socket_path)

    async def start(self) -> None:
        path = self.path
        private_dir(path.parent, socket_files(path))
        # The umask makes the socket 0600 from birth: no window in which others could connect.
        old = os.umask(0o177)
        try:
            loop = asyncio.get_running_loop()
            self._server = await loop.create_unix_server(
                lambda: Connection(self, next(self._ids)), path=str(path)
            )
        finally:
            os.umask(old)
        os.chmod(path, 0o600)

    async def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def close_all(self, grace_s: float = 2.0) -> None:
        conns = list(self.connections.values())
        for conn in conns:
            conn.close()
        tasks = [t for c in conns for t in c.tasks]
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)


def _peer_credentials(transport: asyncio.BaseTransport) -> tuple[int | None, int | None]:
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None, None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None, None
    pid, uid, _gid = struct.unpack("3i", raw)
    return pid, uid


__all__ = ["Connection", "DaemonError", "Server"]
