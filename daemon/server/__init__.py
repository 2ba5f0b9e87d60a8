"""The Unix-socket face of the daemon: the listener, its connections and their framing."""

from __future__ import annotations

from daemon.server.connection import Connection, Server

__all__ = ["Connection", "Server"]
