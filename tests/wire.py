"""A raw, line-level async connection to a daemon socket, for protocol-level tests.

Unlike :class:`daemon.client.AsyncClient` it hides nothing: every line the daemon sends
(replies and pushed events alike) is returned in order, so tests can check the exact shape
and ordering of what is on the wire.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import orjson

LIMIT = 64 * 1024 * 1024


class Wire:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._ids = itertools.count(1)

    @classmethod
    async def open(cls, path: Path | str) -> Wire:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=LIMIT)
        return cls(reader, writer)

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send(
        self, command: str, parameters: dict[str, Any] | None = None, **envelope: Any
    ) -> None:
        line = {"command": command, "parameters": parameters or {}, **envelope}
        await self.send_raw(orjson.dumps(line) + b"\n")

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next line, whatever it is; raises EOFError when the daemon closed."""
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        if not line:
            raise EOFError("daemon closed the connection")
        assert line.endswith(b"\n"), line
        msg: dict[str, Any] = orjson.loads(line)
        return msg

    async def reply(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next reply, skipping pushed events."""
        while True:
            msg = await self.recv(timeout)
            if "event" not in msg:
                return msg

    async def call(
        self, command: str, parameters: dict[str, Any] | None = None, timeout: float = 5.0
    ) -> dict[str, Any]:
        """Send with a fresh id and return the reply carrying that id (events skipped)."""
        rid = next(self._ids)
        await self.send(command, parameters, id=rid)
        msg = await self.reply(timeout)
        assert msg.get("id") == rid, msg
        return msg

    async def result(self, command: str, parameters: dict[str, Any] | None = None) -> Any:
        msg = await self.call(command, parameters)
        assert msg["status"] == "success", msg
        return msg["result"]

    async def at_eof(self, timeout: float = 5.0) -> bool:
        """Read and discard until the daemon closes; True if it did within ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(1 << 20):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        return True

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass

    async def __aenter__(self) -> Wire:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def persistent(path: Path | str, agent_id: str | None = None) -> Wire:
    """A connection made persistent with CONNECT."""
    w = await Wire.open(path)
    res = await w.result("CONNECT", {"agent_id": agent_id} if agent_id else {})
    assert res["status"] == "connected"
    return w
