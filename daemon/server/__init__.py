"""The Unix-socket face of the daemon.

``daemon/server/listener.py`` binds the socket, accepts connections and refuses other
users; ``daemon/server/connection.py`` serves one connection's lines (framed by
``daemon/framing.py``); ``daemon/server/subscriptions.py`` pushes a subscribed
connection's events.
"""

from __future__ import annotations

from daemon.server.connection import Connection
from daemon.server.listener import Server

__all__ = ["Connection", "Server"]
