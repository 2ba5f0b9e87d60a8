"""One client connection: input bounds, serving its lines in order, replies and back-pressure.

A connection is one-shot by default (KSI's convention: one command, one reply, close, so
``echo ... | nc -U`` returns). ``CONNECT``, ``AGENT_CONNECTION`` or ``SUBSCRIBE`` make it
persistent: then it carries many pipelined commands and receives pushed events
(``daemon/server/subscriptions.py``).

On a persistent connection, fast commands are answered in order; long-running ones (a
sync ``SPAWN``) run in their own task and answer when done, matched by ``id``. A client
that goes away mid-turn does not cancel the turn: it is paid for and will be logged and
recorded; only the reply is lost.

Each connection is an :class:`asyncio.Protocol`, not a StreamReader/StreamWriter pair. A
line whose command never waits (a plain-``def`` handler, an unknown command, bad input) is
answered inside the read callback when nothing of the connection is being served; the
others are served by the connection's one ordinary task, in order, each handler awaited in
turn: a coroutine handler runs inside that task like any coroutine (``asyncio.timeout`` and
the rest work); one that has to wait (a store write) holds the connection's later lines
until it is done. Answering at once saves the loop turn that waking the task costs (~7 % of
a sequential HEALTH_CHECK, bench/README.md). The replies to the lines of one read are
coalesced into one write (one syscall, one wake-up of the peer), or go out once
``FLUSH_BYTES`` wait or a handler waits.

Whatever goes wrong while a line is served, the line gets a reply (``INTERNAL_ERROR`` at
worst) and the connection goes on reading: an exception that escaped into a loop callback
used to leave reading paused for good, the client hung and the fd was never freed.

Input is framed by :class:`daemon.framing.LineSplitter` and bounded in bytes: a line longer
than ``max_line_bytes`` is skipped to its end (``LINE_TOO_LONG``); all connections'
incomplete lines together may hold at most ``max_pending_input_bytes`` (past that the
growing line is refused the same way, ``INPUT_BUFFERS_FULL``); and a connection whose
incomplete line gets no byte for ``partial_line_timeout_s`` is told (``LINE_TIMEOUT``) and
closed. While lines wait to be served, or the peer does not read its replies, reading
pauses (back-pressure), so a peer that pipelines without reading is held back.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from typing import TYPE_CHECKING, Any, Final, cast

import structlog

from daemon.commands.registry import Context
from daemon.errors import Conflict, DaemonError, ErrorCode, InvalidParameters, ProtocolError
from daemon.events.subscriber import Subscriber
from daemon.framing import Line, LineSplitter, Refused
from daemon.protocol import Request, encode_error, parse_request
from daemon.server.subscriptions import FLUSH_BYTES, ProgressStream, Subscription

if TYPE_CHECKING:
    from daemon.server.listener import Refusal, Server

log = structlog.get_logger("ksi.server")

# A pipelining connection gives way to other tasks after this many requests even when none
# of them published an event (after one that did, it gives way at once; see _serve).
_YIELD_EVERY: Final = 16
_INTERNAL = "internal error while serving the request; see the daemon log"


class _Served(enum.Enum):
    NOTHING = "nothing"  # a blank line
    DETACHED = "detached"  # a long-running command now running in a task of its own


class Connection(asyncio.Protocol):
    def __init__(self, server: Server, conn_id: int) -> None:
        self.server = server
        self.services = server.services
        self.id = conn_id
        self.transport: asyncio.Transport | None = None
        self.peer_pid: int | None = None
        self.persistent = False
        self.agent_id: str | None = None
        # Pushed events in the original KSI's shape too (payload fields at the top level,
        # ``from``): set by KSI's AGENT_CONNECTION, which only its clients send.
        self.ksi_events = False
        self.subscription: Subscription | None = None
        self.closed = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self.ctx = Context(server.services, self)
        self._refusal: Refusal | None = None
        # Output: queued replies, written together (see send/flush).
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_handle: asyncio.Handle | None = None
        self._write_paused = False
        self._wrote = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        # Input: the framing, complete lines not yet served, and the task serving them.
        self._splitter = LineSplitter(server.settings.max_line_bytes, keep_newline=True)
        self._lines: deque[Line | Request] = deque()
        self._serving: asyncio.Task[None] | None = None
        self._idle: asyncio.Future[None] | None = None  # set while _serving waits for lines
        self._held = 0  # the splitter's pending bytes as counted in server.pending_input
        self._last_input = 0.0  # loop time of the last byte of an incomplete line
        self._idle_timer: asyncio.TimerHandle | None = None
        self._read_paused = False
        self._eof = False

    @property
    def subscriber(self) -> Subscriber | None:
        return None if self.subscription is None else self.subscription.subscriber

    # -- transport callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without deriving from it.
        self.transport = transport = cast(asyncio.Transport, transport)
        self._refusal = self.server.admit(self, transport)

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            self._refusal.data_received(data)
            return
        if self.closed:
            return
        server = self.server
        splitter = self._splitter
        lines = splitter.take(data, server.max_pending_input - server.pending_input)
        if splitter.incomplete:
            loop = asyncio.get_running_loop()
            self._last_input = loop.time()
            if self._idle_timer is None:
                self._idle_timer = loop.call_later(
                    server.settings.partial_line_timeout_s, self._check_idle
                )
        if self._held or splitter.pending_bytes:
            self._account()
        if lines:
            if self._lines or not self._at_rest():
                self._lines.extend(lines)
            else:
                self._answer_at_once(lines)
            self._serve_soon()

    def eof_received(self) -> bool:
        if self._refusal is not None:
            self._refusal.hang_up()
            return False
        self._eof = True
        last = self._splitter.finish()  # a last line without "\n" still counts
        self._account()
        if last is not None:
            self._lines.append(last)
        self._serve_soon()
        return True  # keep the transport: replies may still be on their way

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:  # a reset, or a write to a peer that had gone
            event = "connection.lost_mid_reply" if self._wrote else "connection.reset"
            log.info(event, conn=self.id, error=type(exc).__name__)
        self.server.connections.pop(self.id, None)
        if self._refusal is not None:
            self._refusal.hang_up()
        self._lines.clear()
        self._splitter.discard()
        self._account()
        self.close()
        self._wake_writers()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writers()
        self._serve_soon()  # serving stopped while the peer was not reading its replies

    def _wake_writers(self) -> None:
        for fut in self._drain_waiters:
            if not fut.done():
                fut.set_result(None)
        self._drain_waiters.clear()

    # -- input -----------------------------------------------------------------------------

    def _account(self) -> None:
        """Keep the server's count of bytes in incomplete lines up to date."""
        held = self._splitter.pending_bytes
        self.server.pending_input += held - self._held
        self._held = held

    def _check_idle(self) -> None:
        """An incomplete line that gets no byte for ``partial_line_timeout_s``: close."""
        self._idle_timer = None
        if self.closed or not self._splitter.incomplete:
            return
        timeout = self.server.settings.partial_line_timeout_s
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._read_paused:  # we stopped reading (back-pressure): the wait is not the peer's
            self._last_input = now
        idle = now - self._last_input
        if idle < timeout:
            self._idle_timer = loop.call_later(timeout - idle, self._check_idle)
            return
        log.warning(
            "connection.idle_timeout",
            conn=self.id,
            held_bytes=self._splitter.pending_bytes,
            timeout_s=timeout,
        )
        err = ProtocolError(
            f"incomplete request line, no data for {timeout:g} s",
            code=ErrorCode.LINE_TIMEOUT,
            details={"timeout_s": timeout},
        )
        self.queue(encode_error(None, err))
        self._splitter.discard()
        self._account()
        self.close()

    # -- serving ---------------------------------------------------------------------------

    def _serve_soon(self) -> None:
        """Have the connection's task serve the queued lines, unless it is at them already
        or the peer is not reading its replies (then stop reading until that changes:
        back-pressure)."""
        if self.closed:
            return
        if self._lines and not self._write_paused:
            if self._serving is None:
                self._serving = asyncio.get_running_loop().create_task(self._serve())
            elif self._idle is not None:
                self._wake()
            else:
                self._hold_input()
        elif self._lines:
            self._hold_input()
        elif self._eof and (self._serving is None or self._idle is not None):
            self.close()

    def _wake(self) -> None:
        if self._idle is not None:
            if not self._idle.done():
                self._idle.set_result(None)
            self._idle = None

    async def _serve(self) -> None:
        """The connection's task: serves lines as they come, waits while there are none
        (or the peer reads no replies), ends when the connection closes."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._serve_lines()
                if self.closed:
                    break
                if self._lines:
                    self._hold_input()
                else:
                    self._release_input()
                    if self._eof:
                        self.close()
                        break
                self._idle = idle = loop.create_future()
                await idle
        except Exception:  # a bug outside any one line's serving: do not leave reading paused
            log.exception("connection.crashed", conn=self.id)
            self.close()
        finally:
            self._serving = None
            self._idle = None

    async def _serve_lines(self) -> None:
        """Serve queued lines in order until none are left or the peer stops reading. After
        one that published an event or started a task, other tasks get a turn first."""
        bus = self.services.bus
        published = bus.published
        served = 0
        while self._lines and not self.closed and not self._write_paused:
            outcome = await self._serve_line(self._lines.popleft())
            if outcome is _Served.NOTHING:
                continue
            if isinstance(outcome, bytes):
                # The last line's reply goes out below; with more lines to serve it waits
                # for theirs, or for the next loop turn if one of them has to wait.
                self.queue(outcome, soon=bool(self._lines))
            if not self.persistent:
                self.close()  # one command per connection: the reply goes, then we close
                return
            served += 1
            if self._lines and (
                bus.published != published or outcome is _Served.DETACHED or served >= _YIELD_EVERY
            ):
                # Give way: subscriber pumps must get to write what was just published,
                # or a burst of PUBLISHes would overflow subscribers that read promptly.
                self.flush()
                await asyncio.sleep(0)
                published = bus.published
                served = 0
        self.flush()

    def _at_rest(self) -> bool:
        """Nothing of this connection is being served and its peer reads: a line may be
        answered right here."""
        return (
            (self._serving is None or self._idle is not None)
            and not self._write_paused
            and not self.closed
        )

    def _answer_at_once(self, lines: list[Line]) -> None:
        """Answer the lines of one read that need no waiting, here in the read callback; the
        first that would wait, and all after it, go to the serving task (in order). After a
        line that published an event or started a task, the rest go there too: subscriber
        pumps get their turn first, as in :meth:`_serve_lines`."""
        published = self.services.bus.published
        for i, line in enumerate(lines):
            outcome = self._serve_now(line)
            if isinstance(outcome, Request):
                self._lines.append(outcome)
                self._lines.extend(lines[i + 1 :])
                break
            if outcome is _Served.NOTHING:
                continue
            if isinstance(outcome, bytes):
                self.queue(outcome, soon=False)
            if not self.persistent:
                self.close()  # one command per connection: the reply goes, then we close
                return
            rest = lines[i + 1 :]
            if rest and (
                self.services.bus.published != published
                or outcome is _Served.DETACHED
                or i + 1 >= _YIELD_EVERY
            ):
                self._lines.extend(rest)
                break
        self.flush()

    def _serve_now(self, line: Line | Request) -> bytes | _Served | Request:
        """Answer one line (its reply) if that needs no waiting; else its parsed request, for
        :meth:`_serve_line`. Whatever goes wrong, the line gets a reply."""
        req: Request | None = None
        try:
            if isinstance(line, Request):
                req = line
            elif isinstance(line, Refused):
                return encode_error(None, self._refused(line))
            elif not line.strip():
                return _Served.NOTHING
            else:
                try:
                    req = parse_request(line)
                except ProtocolError as exc:
                    log.warning("request.rejected", conn=self.id, code=exc.code, error=exc.message)
                    return encode_error(exc.echo, exc)
            registry = self.services.registry
            spec = registry.get(req.command)
            if spec is not None and spec.long_running and self.persistent:
                self._track(asyncio.create_task(self._run_detached(req)))
                return _Served.DETACHED
            self.ctx.request = req
            if spec is not None and not spec.immediate:
                return req  # it waits: the serving task dispatches it
            # An immediate handler, or an unknown command (its error needs no waiting).
            reply = registry.dispatch_now(self.ctx, req)
            assert reply is not None
            return reply
        except Exception:  # a bug must cost this line an error reply, nothing more
            log.exception("request.crashed", conn=self.id)
            return encode_error(req, DaemonError(_INTERNAL))

    async def _serve_line(self, line: Line | Request) -> bytes | _Served:
        """Answer one line (its reply), waiting if it has to; whatever goes wrong, it gets one."""
        outcome = self._serve_now(line)
        if not isinstance(outcome, Request):
            return outcome
        try:  # _serve_now has set ctx.request
            return await self.services.registry.dispatch(self.ctx, outcome)
        except Exception:  # dispatch never raises; if it ever does, the line still gets a reply
            log.exception("request.crashed", conn=self.id)
            return encode_error(outcome, DaemonError(_INTERNAL))

    def _refused(self, why: Refused) -> ProtocolError:
        if why is Refused.TOO_LONG:
            limit = self.server.settings.max_line_bytes
            log.warning("request.rejected", conn=self.id, code=ErrorCode.LINE_TOO_LONG)
            return ProtocolError(
                f"request line exceeds {limit} bytes",
                code=ErrorCode.LINE_TOO_LONG,
                details={"limit_bytes": limit},
            )
        # Over the global budget: the line that would have grown past it was refused.
        limit = self.server.max_pending_input
        log.warning(
            "request.rejected",
            conn=self.id,
            code=ErrorCode.INPUT_BUFFERS_FULL,
            pending_bytes=self.server.pending_input,
        )
        return ProtocolError(
            f"request refused: incomplete requests of all connections hold over {limit} "
            "bytes; retry",
            code=ErrorCode.INPUT_BUFFERS_FULL,
            details={"limit_bytes": limit},
        )

    async def _run_detached(self, req: Request) -> None:
        ctx = Context(self.services, self, req)
        reply = await self.services.registry.dispatch(ctx, req)
        await self.send(reply)

    def pending_tasks(self) -> list[asyncio.Task[Any]]:
        """What is still running for this connection: its detached commands and the line
        being served."""
        busy = self._serving is not None and self._idle is None
        serving = [self._serving] if busy and self._serving is not None else []
        return [*self.tasks, *serving]

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

    def queue(self, data: bytes, *, soon: bool = True) -> None:
        """Queue ``data`` to go out with the next write: at once past ``FLUSH_BYTES``, else
        at the end of the lines being served or (``soon``) the next loop turn at the latest."""
        self._out.append(data)
        self._out_bytes += len(data)
        if self._out_bytes >= FLUSH_BYTES:
            self.flush()
        elif soon and self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self.flush)

    async def send(self, data: bytes, *, now: bool = False) -> None:
        """Queue ``data`` behind everything queued before it (``now``: and write it all at
        once, as event pushes do); wait if the peer is slow."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return
        self.queue(data)
        if now:
            self.flush()
        if self._write_paused:
            fut = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(fut)
            await fut

    def unsent_bytes(self) -> int:
        """Output queued here or in the transport that the peer has not taken yet."""
        held = self.transport.get_write_buffer_size() if self.transport is not None else 0
        return self._out_bytes + held

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
            if self.subscription is not None:
                self.subscription.subscriber.agent_id = agent_id
                self.services.agents.on_subscribed(self.subscription.subscriber, None)

    def subscribe(
        self, patterns: list[str], agent_id: str | None, since_seq: int | None = None
    ) -> Subscriber:
        """Subscribe (or add patterns). ``since_seq``: first replay the history after it.
        ``agent_id``: this connection's own agent (see :meth:`check_agent`)."""
        if agent_id:
            self.check_agent(agent_id)
        subscription = self.subscription
        live = subscription is not None and not subscription.subscriber.dropped
        if since_seq is not None and subscription is not None and live:
            # Its replay would repeat events this connection has already been sent.
            raise InvalidParameters(
                "since_seq is only accepted by a connection's first SUBSCRIBE",
                details={"last_seq": subscription.sent_seq},
            )
        self.make_persistent(agent_id)
        if subscription is None or subscription.subscriber.dropped:
            settings = self.server.settings
            sub = Subscriber(
                f"conn-{self.id}",
                maxsize=settings.subscriber_queue,
                max_bytes=settings.subscriber_queue_bytes,
                agent_id=self.agent_id,
                policy="disconnect",
            )
            subscription = Subscription(self, self.services.bus, sub, since_seq)
            self._track(subscription.pump)
            self.subscription = subscription
        subscription.subscriber.patterns.update(add=patterns)
        # Direct messages kept while this agent was away come first (daemon/agents).
        self.services.agents.on_subscribed(subscription.subscriber, since_seq)
        return subscription.subscriber

    def check_agent(self, agent_id: str) -> None:
        """SUBSCRIBE may name only this connection's own agent (set by CONNECT,
        AGENT_CONNECTION connect or an earlier SUBSCRIBE); a connection without one is bound
        to ``agent_id`` if that agent is registered or connected on another connection.
        Otherwise AGENT_NOT_CONNECTED, as KSI answered a SUBSCRIBE for an agent that had not
        connected."""
        if agent_id == self.agent_id:
            return
        if self.agent_id is not None:
            raise Conflict(
                f"this connection is agent {self.agent_id!r}'s, not {agent_id!r}: CONNECT as "
                f"{agent_id!r} on a connection of its own to subscribe as it",
                code=ErrorCode.AGENT_NOT_CONNECTED,
                details={"agent_id": agent_id, "connection_agent_id": self.agent_id},
            )
        if agent_id in self.services.state.agents:
            return
        connected = sorted(
            {
                c.agent_id
                for c in self.server.connections.values()
                if c.agent_id is not None and not c.closed
            }
        )
        if agent_id in connected:
            return
        raise Conflict(
            f"agent {agent_id!r} is not connected: CONNECT (or AGENT_CONNECTION connect) "
            f"with agent_id {agent_id!r} on this connection first, or REGISTER_AGENT it",
            code=ErrorCode.AGENT_NOT_CONNECTED,
            details={"agent_id": agent_id, "connected_agents": connected[:50]},
        )

    def stream_progress(self, req: Request) -> ProgressStream:
        """Where a sync SPAWN with ``stream: true`` writes its progress: this connection,
        bounded like a subscriber's backlog."""
        return ProgressStream(self, req, self.server.settings.subscriber_queue_bytes)

    def unsubscribe(self, patterns: list[str] | None) -> list[str]:
        sub = self.subscriber
        if sub is None:
            return []
        sub.patterns.update(remove=sub.patterns.items if patterns is None else patterns)
        return sorted(sub.patterns.items)

    def close(self) -> None:
        if self.subscription is not None:
            self.subscription.stop()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self.closed:
            return
        self.flush()  # queued output goes before the close
        self.closed = True
        self._wake()  # a task waiting for lines ends
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
