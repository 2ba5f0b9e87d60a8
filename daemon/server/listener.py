"""The Unix-socket listener: bind, accept, who may connect, and closing every connection.

The socket is created 0600 (under a umask, so there is no window in which others could
connect) in a directory made private unless it is shared (``daemon/fsmodes.py``). A peer
whose uid (``SO_PEERCRED``) is neither the daemon's nor root's is answered
``PERMISSION_DENIED`` and hung up on once it has sent its request line: closing a Unix
socket with unread input resets the connection, and the peer would lose the error. Each
accepted connection is a :class:`~daemon.server.connection.Connection`.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import socket
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Final

import structlog

from daemon.errors import PermissionDenied
from daemon.fsmodes import private_dir, socket_files
from daemon.protocol import encode_error
from daemon.server.connection import Connection

if TYPE_CHECKING:
    from daemon.commands.registry import Services

log = structlog.get_logger("ksi.server")

_REFUSE_READ_S: Final = 1.0  # how long a refused peer may take to send its request line


class Server:
    def __init__(self, services: Services) -> None:
        self.services = services  # what a connection's commands use (not the whole daemon)
        self.settings = services.settings
        self.connections: dict[int, Connection] = {}
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self.uid = os.getuid()
        # Bytes held in all connections' incomplete lines, and the budget for them.
        self.pending_input = 0
        self.max_pending_input = services.settings.max_pending_input_bytes

    @property
    def path(self) -> Path:
        return self.settings.socket_path

    @functools.cached_property
    def path_str(self) -> str:
        return str(self.settings.socket_path)

    async def start(self, inherited: socket.socket | None = None) -> None:
        """Listen on the socket path, or (a RELOAD_DAEMON successor) on the listening socket
        the old daemon handed over, with the clients waiting in its backlog."""
        path = self.path
        loop = asyncio.get_running_loop()
        if inherited is not None:
            self._server = await loop.create_unix_server(
                lambda: Connection(self, next(self._ids)), sock=inherited
            )
            return
        private_dir(path.parent, socket_files(path))
        # The umask makes the socket 0600 from birth: no window in which others could connect.
        old = os.umask(0o177)
        try:
            self._server = await loop.create_unix_server(
                lambda: Connection(self, next(self._ids)), path=str(path)
            )
        finally:
            os.umask(old)
        os.chmod(path, 0o600)

    def listening_socket(self) -> socket.socket:
        """The socket this daemon accepts on (RELOAD_DAEMON hands a duplicate over)."""
        assert self._server is not None, "not listening"
        assert self._server.sockets, "not listening"
        return self._server.sockets[0]

    def admit(self, conn: Connection, transport: asyncio.Transport) -> Refusal | None:
        """Register a new connection, or refuse its peer (see the module's docstring)."""
        conn.peer_pid, peer_uid = _peer_credentials(transport)
        if peer_uid is None or peer_uid in (self.uid, 0):
            self.connections[conn.id] = conn
            return None
        log.warning("connection.refused", conn=conn.id, peer_uid=peer_uid, peer_pid=conn.peer_pid)
        err = PermissionDenied(
            f"uid {peer_uid} may not use this daemon (only uid {self.uid} and root)"
        )
        transport.write(encode_error(None, err))
        return Refusal(transport)

    def stats(self) -> dict[str, int]:
        """HEALTH_CHECK counts: open connections, bytes held in incomplete request lines."""
        return {"connections": len(self.connections), "input_buffered_bytes": self.pending_input}

    async def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def close_all(self, grace_s: float = 2.0) -> None:
        conns = list(self.connections.values())
        for conn in conns:
            conn.close()
        tasks = [t for c in conns for t in c.pending_tasks()]
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)


class Refusal:
    """A refused peer's connection: takes in its request line, then hangs up."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(_REFUSE_READ_S, self.hang_up)

    def data_received(self, data: bytes) -> None:
        if b"\n" in data:
            self.hang_up()

    def hang_up(self) -> None:
        self._timer.cancel()
        self._transport.close()


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
