"""The Unix-socket listener and its connections.

A connection is one-shot by default (KSI's convention: one command, one reply, close, so
``echo ... | nc -U`` returns). ``CONNECT``, ``AGENT_CONNECTION`` or ``SUBSCRIBE`` make it
persistent: then it carries many pipelined commands and receives pushed events.

On a persistent connection, fast commands are answered in order, inline; long-running
ones (a sync ``SPAWN``) run in their own task and answer when done, matched by ``id``.
A client that goes away mid-turn does not cancel the turn: it is paid for and will be
logged and recorded; only the reply is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import socket
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

import orjson
import structlog

from daemon.bus import Subscriber
from daemon.errors import DaemonError, PermissionDenied, ProtocolError
from daemon.protocol import Request, encode_error, encode_event, parse_request, utc_now_iso
from daemon.registry import Context

if TYPE_CHECKING:
    from daemon.app import Daemon

log = structlog.get_logger("ksi.server")

_TOO_LONG: Final = b"\x00too-long"  # sentinel: never a valid line (lines end with \n)
_REFUSE_READ_S: Final = 1.0  # how long a refused peer may take to send its request line
# How long a dropped subscriber has to read its backlog and the SUBSCRIBER_DROPPED notice
# before the connection is aborted (a client that stopped reading would otherwise keep it,
# with its buffers, forever: the pump would wait on drain() for good).
DROP_GRACE_S: Final = 2.0
# Replies to pipelined requests are coalesced: while more request lines are already
# buffered, replies queue up and go out in one write (one syscall, one wake-up of the peer)
# with the reply to the last of them, when the loop next turns, or once this many bytes wait.
_FLUSH_BYTES: Final = 64 * 1024
# A pipelining connection gives way to other tasks after this many requests even when none
# of them published an event (after one that did, it gives way at once; see _serve).
_YIELD_EVERY: Final = 16


class Connection:
    def __init__(
        self,
        daemon: Daemon,
        conn_id: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer_pid: int | None,
    ) -> None:
        self.daemon = daemon
        self.id = conn_id
        self.reader = reader
        self.writer = writer
        self.peer_pid = peer_pid
        self.persistent = False
        self.agent_id: str | None = None
        self.subscriber: Subscriber | None = None
        self.closed = False
        self.tasks: set[asyncio.Task[None]] = set()
        self._pump: asyncio.Task[None] | None = None
        self._drop_timer: asyncio.TimerHandle | None = None
        self.ctx = Context(daemon, self)
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_handle: asyncio.Handle | None = None

    # -- output -----------------------------------------------------------------------

    async def send(self, data: bytes, *, now: bool = False) -> None:
        """Queue ``data`` behind everything queued before it (``now``: and write it all at
        once, as event pushes do); wait if the peer is slow."""
        if self.closed or self.writer.is_closing():
            return
        try:
            self._out.append(data)
            self._out_bytes += len(data)
            if now or self._out_bytes >= _FLUSH_BYTES:
                self.flush()
            elif self._flush_handle is None:
                self._flush_handle = asyncio.get_running_loop().call_soon(self.flush)
            await self.writer.drain()
        except (ConnectionError, BrokenPipeError) as exc:
            log.info("connection.lost_mid_reply", conn=self.id, error=type(exc).__name__)
            self.closed = True

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
        if not self.writer.is_closing():
            self.writer.write(data)

    # -- persistence and subscriptions ----------------------------------------------------

    def make_persistent(self, agent_id: str | None = None) -> None:
        self.persistent = True
        if agent_id:
            self.agent_id = agent_id
            if self.subscriber is not None:
                self.subscriber.agent_id = agent_id

    def subscribe(self, patterns: list[str], agent_id: str | None) -> Subscriber:
        self.make_persistent(agent_id)
        sub = self.subscriber
        if sub is None or sub.dropped:
            sub = Subscriber(
                f"conn-{self.id}", maxsize=self.daemon.settings.subscriber_queue,
                agent_id=self.agent_id, policy="disconnect",
            )
            sub.on_drop = self._dropped
            self.subscriber = sub
            self.daemon.bus.add(sub)
            self._pump = asyncio.create_task(self._pump_events(sub), name=f"pump-{self.id}")
        sub.patterns.update(add=patterns)
        return sub

    def unsubscribe(self, patterns: list[str] | None) -> list[str]:
        sub = self.subscriber
        if sub is None:
            return []
        sub.patterns.update(remove=sub.patterns.items if patterns is None else patterns)
        return sorted(sub.patterns.items)

    async def _pump_events(self, sub: Subscriber) -> None:
        """Write queued events in batches; tell a too-slow subscriber and hang up on it."""
        while not self.closed:
            batch = await sub.next_batch()
            if batch:
                await self.send(b"".join(ev.wire for ev in batch), now=True)
            if sub.dropped:
                notice = encode_event(
                    "SUBSCRIBER_DROPPED",
                    {"reason": "slow_consumer", "queue_limit": sub.maxsize,
                     "last_seq": sub.last_seq,
                     "hint": "reconnect and use GET_EVENTS with since_seq=last_seq"},
                    0, utc_now_iso(),
                )
                await self.send(notice)
                self.close()
                return

    def _dropped(self) -> None:
        self._drop_timer = asyncio.get_running_loop().call_later(DROP_GRACE_S,
                                                                 self._abort_if_stuck)

    def _abort_if_stuck(self) -> None:
        if self.closed:
            return
        log.warning("connection.aborted", conn=self.id, reason="dropped subscriber not reading")
        self.writer.transport.abort()  # discards the unsendable backlog
        self.close()

    def close(self) -> None:
        if self.subscriber is not None:
            self.daemon.bus.remove(self.subscriber)
        self.closed = True
        if self._drop_timer is not None:
            self._drop_timer.cancel()
        # The pump waits on the subscriber's inbox, which nothing fills any more: end it,
        # or every subscribed connection would leave a pending task behind.
        if self._pump is not None and self._pump is not asyncio.current_task():
            self._pump.cancel()
        self.flush()  # queued output goes before the close
        if not self.writer.is_closing():
            self.writer.close()


class Server:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.settings = daemon.settings
        self.connections: dict[int, Connection] = {}
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._uid = os.getuid()
        self.accepted = 0

    @property
    def path(self) -> Path:
        return self.settings.socket_path

    @functools.cached_property
    def path_str(self) -> str:
        return str(self.settings.socket_path)

    async def start(self) -> None:
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        # The umask makes the socket 0600 from birth: no window in which others could connect.
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._handle, path=str(path), limit=self.settings.max_line_bytes
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

    # -- per connection -------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn_id = next(self._ids)
        self.accepted += 1
        peer_pid, peer_uid = _peer_credentials(writer)
        if peer_uid is not None and peer_uid not in (self._uid, 0):
            log.warning("connection.refused", conn=conn_id, peer_uid=peer_uid, peer_pid=peer_pid)
            err = PermissionDenied(
                f"uid {peer_uid} may not use this daemon (only uid {self._uid} and root)"
            )
            with contextlib.suppress(ConnectionError):
                writer.write(encode_error(None, err))
                await writer.drain()
            # Take in the request the peer sent before closing: closing a Unix socket with
            # unread input resets the connection, and the peer would lose the error above.
            with contextlib.suppress(ConnectionError, TimeoutError, asyncio.IncompleteReadError,
                                     asyncio.LimitOverrunError):
                await asyncio.wait_for(reader.readuntil(b"\n"), _REFUSE_READ_S)
            writer.close()
            return
        conn = Connection(self.daemon, conn_id, reader, writer, peer_pid)
        self.connections[conn_id] = conn
        try:
            await self._serve(conn)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            del self.connections[conn_id]
            conn.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _serve(self, conn: Connection) -> None:
        registry = self.daemon.registry
        bus = self.daemon.bus
        published = bus.published
        unyielded = 0
        while not conn.closed:
            detached = False
            line = await self._read_line(conn.reader)
            if line is None:
                return
            if line is _TOO_LONG:
                limit = self.settings.max_line_bytes
                err = ProtocolError(f"request line exceeds {limit} bytes", code="LINE_TOO_LONG",
                                    details={"limit_bytes": limit})
                log.warning("request.rejected", conn=conn.id, code=err.code)
                await conn.send(encode_error(None, err))
            elif not line.strip():
                continue
            else:
                try:
                    req = parse_request(line)
                except ProtocolError as exc:
                    log.warning("request.rejected", conn=conn.id, code=exc.code,
                                error=exc.message)
                    await conn.send(encode_error(getattr(exc, "echo", None), exc))
                else:
                    spec = registry.get(req.command)
                    if spec is not None and spec.long_running and conn.persistent:
                        task = asyncio.create_task(self._run_detached(conn, req))
                        conn.tasks.add(task)
                        task.add_done_callback(conn.tasks.discard)
                        detached = True
                    else:
                        reply = await self._dispatch(conn, req)
                        await conn.send(reply, now=not _line_buffered(conn.reader))
            if not conn.persistent:
                return
            # Yield between pipelined requests: lines already buffered are otherwise served
            # without ever giving way, and a burst of PUBLISHes would overflow (and drop) even
            # subscribers that read promptly, whose pumps never got a turn to run. So: at once
            # after a request that published an event or started a task, else every few
            # requests (each turn of the loop costs a syscall and flushes the output).
            unyielded += 1
            if bus.published == published and not detached and unyielded < _YIELD_EVERY:
                continue
            await asyncio.sleep(0)
            published = bus.published
            unyielded = 0

    async def _dispatch(self, conn: Connection, req: Request) -> bytes:
        started = time.perf_counter()
        conn.ctx.request = req
        reply = await self.daemon.registry.dispatch(conn.ctx, req)
        if reply.startswith(b'{"status":"error"'):
            code = orjson.loads(reply)["error"]["code"]  # error path only: parse is cheap
            log.info("command.failed", conn=conn.id, command=req.command, code=code,
                     ms=round((time.perf_counter() - started) * 1000, 3))
        return reply

    async def _run_detached(self, conn: Connection, req: Request) -> None:
        ctx = Context(self.daemon, conn, req)
        reply = await self.daemon.registry.dispatch(ctx, req)
        await conn.send(reply)

    @staticmethod
    async def _read_line(reader: asyncio.StreamReader) -> bytes | None:
        """One line, ``None`` at EOF, or ``_TOO_LONG`` after discarding an oversized line."""
        try:
            return await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            return exc.partial or None  # a last line without "\n" still counts
        except asyncio.LimitOverrunError as exc:
            consumed = exc.consumed
        # Skip the rest of the oversized line so the connection can go on.
        while True:
            await reader.readexactly(consumed)
            try:
                await reader.readuntil(b"\n")
                return _TOO_LONG
            except asyncio.IncompleteReadError:
                return _TOO_LONG
            except asyncio.LimitOverrunError as exc:
                consumed = exc.consumed


def _line_buffered(reader: asyncio.StreamReader) -> bool:
    """Whether another complete request line is already buffered (read, not yet served).

    Peeks at StreamReader's buffer, which asyncio does not expose; without it every reply
    is simply written at once.
    """
    buf = getattr(reader, "_buffer", None)
    return buf is not None and b"\n" in buf


def _peer_credentials(writer: asyncio.StreamWriter) -> tuple[int | None, int | None]:
    sock = writer.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None, None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None, None
    pid, uid, _gid = struct.unpack("3i", raw)
    return pid, uid


__all__ = ["Connection", "DaemonError", "Server"]
