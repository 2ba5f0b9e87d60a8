"""The face's HTTP side: the SDK's streamable-HTTP app, served by uvicorn in the daemon's
loop. Imported in a thread at the face's first use (daemon/mcp_face/face.py), with the SDK."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn

from daemon.mcp_face.tools import Call, build_server


class EmbeddedServer(uvicorn.Server):
    """uvicorn's Server without its signal handlers: the daemon owns SIGINT and SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def build_app(call: Call) -> Any:
    """The ``ksi`` server as an ASGI app: stateless (every tool call is one POST, nothing
    to keep per CLI) with JSON answers (no SSE stream to hold open for a tool's result)."""
    return build_server(call).streamable_http_app(stateless_http=True, json_response=True)


def serving(app: Any) -> tuple[EmbeddedServer, socket.socket]:
    """A server for ``app`` and its listening socket on 127.0.0.1, on a port the kernel
    picks (known before the server starts, so the first config can be written at once)."""
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on connections of a socket whose
    # proto says TCP, and a plain socket() says 0. Without it each answer (headers and body,
    # two writes) waited for the client's delayed ACK: 44 ms a tool call instead of 1 ms
    # (bench M2).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    config = uvicorn.Config(
        app,
        lifespan="on",  # runs the SDK's session manager
        log_config=None,  # the daemon's logging stays as the daemon set it up
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    return EmbeddedServer(config), sock
