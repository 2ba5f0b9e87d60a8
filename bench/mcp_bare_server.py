"""The smallest HTTP MCP server the SDK makes (one tool, stateless, JSON answers), run as
its own process by bench M1.floor: what any already-running HTTP MCP server costs a cold
CLI, whoever serves it.

    python -m bench.mcp_bare_server PORT_FILE
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

import uvicorn
from mcp.server.mcpserver import MCPServer


def main() -> None:
    server = MCPServer("ksi")

    @server.tool()
    def publish(event_type: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Accept an event (and drop it)."""
        return {"status": "published", "event_type": event_type}

    app = server.streamable_http_app(stateless_http=True, json_response=True)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    port_file = Path(sys.argv[1])
    port_file.with_suffix(".tmp").write_text(str(sock.getsockname()[1]))
    port_file.with_suffix(".tmp").rename(port_file)  # whole, or not there yet
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
