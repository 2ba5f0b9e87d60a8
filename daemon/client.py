"""Clients for the daemon's socket: :class:`AsyncClient` (persistent, pipelined, events)
and :class:`SyncClient` (blocking, one connection per call, like ``nc -U``).

    async with AsyncClient.connect("sockets/claude_daemon.sock") as c:
        health = await c.call("HEALTH_CHECK")
        await c.subscribe(["PROCESS_*"])
        reply = await c.call("SPAWN", {"prompt": "hi", "mode": "async"})
        async for event in c.events():
            ...

        turn = await c.spawn_stream("list the files", cwd="/src")
        async for event in turn:          # PROCESS_PROGRESS events, as they happen
            print(event["data"]["kind"])
        print(turn.result()["text"])      # the SPAWN's result (or CommandError)

A failed command raises :class:`CommandError` with the daemon's ``code``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import select
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson

from daemon.settings import Settings

DEFAULT_LIMIT = 64 * 1024 * 1024  # replies carry whole CLI outputs; a line can be large


def default_socket() -> Path:
    return Settings().socket_path


class CommandError(Exception):
    """The daemon answered with ``status: error``."""

    def __init__(self, reply: dict[str, Any]) -> None:
        err = reply.get("error") or {}
        self.reply = reply
        self.code: str = err.get("code", "UNKNOWN")
        self.details: dict[str, Any] = err.get("details") or {}
        super().__init__(f"{self.code}: {err.get('message', '')}")


class ConnectionClosed(Exception):
    """The daemon closed the connection (for example after SUBSCRIBER_DROPPED)."""


def _result(reply: dict[str, Any]) -> Any:
    if reply.get("status") != "success":
        raise CommandError(reply)
    return reply.get("result")


class TurnProgress:
    """A sync SPAWN with ``stream: true``: iterate it for the turn's PROCESS_PROGRESS events
    (each as the daemon pushed it: ``event``, ``data``, ``seq``, ...) until its reply has
    come; then :meth:`result` gives the SPAWN's result (or raises :class:`CommandError`)."""

    def __init__(self, lines: asyncio.Queue[dict[str, Any] | None]) -> None:
        self._lines = lines
        self.reply: dict[str, Any] | None = None

    def __aiter__(self) -> TurnProgress:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self.reply is not None:
            raise StopAsyncIteration
        msg = await self._lines.get()
        if msg is None:
            self._lines.put_nowait(None)
            raise ConnectionClosed("daemon closed the connection before the reply")
        if "event" in msg:
            return msg
        self.reply = msg
        raise StopAsyncIteration

    async def wait(self) -> dict[str, Any]:
        """Read (and drop) the remaining events; returns the reply envelope."""
        async for _ in self:
            pass
        assert self.reply is not None
        return self.reply

    def result(self) -> Any:
        """The SPAWN's result once iteration has ended; raises CommandError if it failed."""
        if self.reply is None:
            raise RuntimeError("iterate the progress (or await wait()) first")
        return _result(self.reply)


class AsyncClient:
    """A persistent connection: calls are pipelined and matched to replies by ``id``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        # Requests whose streamed events and reply go to their own queue (spawn_stream).
        self._streams: dict[int, asyncio.Queue[dict[str, Any] | None]] = {}
        self._events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._reader_task = asyncio.create_task(self._read_loop())
        self.closed = False

    @classmethod
    async def open(
        cls,
        path: str | Path | None = None,
        *,
        agent_id: str | None = None,
        limit: int = DEFAULT_LIMIT,
    ) -> AsyncClient:
        reader, writer = await asyncio.open_unix_connection(
            str(path or default_socket()), limit=limit
        )
        client = cls(reader, writer)
        await client.call("CONNECT", {"agent_id": agent_id} if agent_id else {})
        return client

    @classmethod
    def connect(cls, path: str | Path | None = None, *, agent_id: str | None = None) -> _Connector:
        return _Connector(path, agent_id)

    async def call(
        self,
        command: str,
        parameters: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Send a command and wait for its reply; returns ``result`` or raises."""
        return _result(await self.request(command, parameters, timeout=timeout))

    async def request(
        self,
        command: str,
        parameters: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Send a command and return the whole reply envelope."""
        if self.closed:
            raise ConnectionClosed("connection is closed")
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self._writer.write(
            orjson.dumps(
                {"command": command, "parameters": parameters or {}, "id": rid},
                option=orjson.OPT_APPEND_NEWLINE,
            )
        )
        await self._writer.drain()
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(rid, None)

    async def spawn_stream(self, prompt: str, **parameters: Any) -> TurnProgress:
        """Start a sync SPAWN with ``stream: true``; iterate the result for its progress."""
        if self.closed:
            raise ConnectionClosed("connection is closed")
        rid = next(self._ids)
        lines: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._streams[rid] = lines
        params = {**parameters, "prompt": prompt, "mode": "sync", "stream": True}
        self._writer.write(
            orjson.dumps(
                {"command": "SPAWN", "parameters": params, "id": rid},
                option=orjson.OPT_APPEND_NEWLINE,
            )
        )
        await self._writer.drain()
        return TurnProgress(lines)

    async def subscribe(self, event_types: list[str], agent_id: str | None = None) -> Any:
        params: dict[str, Any] = {"event_types": event_types}
        if agent_id:
            params["agent_id"] = agent_id
        return await self.call("SUBSCRIBE", params)

    async def next_event(self, timeout: float | None = None) -> dict[str, Any]:
        event = await asyncio.wait_for(self._events.get(), timeout)
        if event is None:
            self._events.put_nowait(None)  # keep signalling the close to later callers
            raise ConnectionClosed("daemon closed the connection")
        return event

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            try:
                yield await self.next_event()
            except ConnectionClosed:
                return

    async def _read_loop(self) -> None:
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                msg = orjson.loads(line)
                stream = self._streams.get(msg.get("id")) if "id" in msg else None
                if stream is not None:
                    stream.put_nowait(msg)
                    if "event" not in msg:  # the reply ends the stream
                        del self._streams[msg["id"]]
                    continue
                if "event" in msg:
                    self._events.put_nowait(msg)
                    continue
                fut = self._pending.get(msg.get("id")) if "id" in msg else None
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except (ConnectionError, asyncio.IncompleteReadError, orjson.JSONDecodeError):
            pass
        finally:
            self.closed = True
            self._events.put_nowait(None)
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionClosed("daemon closed the connection"))
            for stream in self._streams.values():
                stream.put_nowait(None)

    async def close(self) -> None:
        self.closed = True
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader_task


class _Connector:
    def __init__(self, path: str | Path | None, agent_id: str | None) -> None:
        self.path, self.agent_id = path, agent_id
        self.client: AsyncClient | None = None

    async def __aenter__(self) -> AsyncClient:
        self.client = await AsyncClient.open(self.path, agent_id=self.agent_id)
        return self.client

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.client is not None:
            await self.client.close()


class SyncClient:
    """Blocking client: each call opens a one-shot connection (works before LiteLLM loads)."""

    def __init__(self, path: str | Path | None = None, timeout: float | None = 660.0) -> None:
        self.path = str(path or default_socket())
        self.timeout = timeout

    def _send(self, command: str, parameters: dict[str, Any] | None) -> socket.socket:
        """Open a connection and write one command line on it; the caller closes it."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(self.timeout)
            s.connect(self.path)
            s.sendall(
                orjson.dumps(
                    {"command": command, "parameters": parameters or {}},
                    option=orjson.OPT_APPEND_NEWLINE,
                )
            )
        except BaseException:
            s.close()
            raise
        return s

    def stream(
        self,
        command: str,
        parameters: dict[str, Any] | None = None,
        *,
        idle: float | None = None,
    ) -> Iterator[dict[str, Any] | None]:
        """Send one command and yield every line the daemon writes back until it closes the
        connection: a SPAWN with ``stream: true`` writes its progress events, then the
        reply. With ``idle``, None is yielded after every ``idle`` seconds without a line
        (a caller's chance to show it is still waiting)."""
        with self._send(command, parameters) as s:
            partial: list[bytes] = []  # the unfinished line's chunks (joined once complete)
            while True:
                if idle is not None and not select.select([s], [], [], idle)[0]:
                    yield None
                    continue
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                if b"\n" not in chunk:
                    partial.append(chunk)
                    continue
                *lines, rest = b"".join([*partial, chunk]).split(b"\n")
                partial = [rest] if rest else []
                for line in lines:
                    if line.strip():
                        yield orjson.loads(line)
        if partial and (last := b"".join(partial)).strip():
            yield orjson.loads(last)

    def request(self, command: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
        with self._send(command, parameters) as s:
            chunks = []
            while True:
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
                if chunk.endswith(b"\n"):
                    break
        data = b"".join(chunks)
        if not data:
            raise ConnectionClosed("daemon closed the connection without a reply")
        reply: dict[str, Any] = orjson.loads(data)
        return reply

    def call(self, command: str, parameters: dict[str, Any] | None = None) -> Any:
        return _result(self.request(command, parameters))
