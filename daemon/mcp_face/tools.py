"""The ``ksi`` MCP server's tools, on the official ``mcp`` SDK (imported only here: the face
loads this module in a thread at its first use).

Each tool is a thin call into the daemon's command registry (``call``): the same validation,
typed errors and events as over the socket. Who calls is the token's business (the face
resolves it from the request's ``Authorization`` header), never an argument a model could
set: a turn cannot publish as another agent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from pydantic import Field

# (the request's headers, command, parameters) -> the command's JSON result; raises
# ToolError with the daemon's typed error.
Call = Callable[[Mapping[str, str] | None, str, dict[str, Any]], Awaitable[Any]]

MAX_WAIT_S = 50.0  # well under the CLI's MCP tool timeout

INSTRUCTIONS = """\
Tools of the KSI daemon that runs this turn: the message bus other agents and programs \
listen on, shared state, the registered agents, and sub-tasks (spawn runs another Claude \
turn; wait collects its answer). Events you cause carry your agent id and process id."""


def build_server(call: Call) -> MCPServer:
    server = MCPServer("ksi", instructions=INSTRUCTIONS, log_level="WARNING")

    def headers(ctx: Context) -> Mapping[str, str] | None:
        return ctx.headers

    @server.tool()
    async def publish(
        event_type: str,
        ctx: Context,
        payload: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Publish an event on the KSI bus to every subscriber of its type (names of
        letters, digits and _ . : -; PROCESS_* and other daemon events are reserved)."""
        params = {"event_type": event_type, "payload": payload or {}}
        result: dict[str, Any] = await call(headers(ctx), "PUBLISH", params)
        return result

    @server.tool()
    async def send_message(to_agent: str, content: str, ctx: Context) -> dict[str, Any]:
        """Send a DIRECT_MESSAGE to one agent (only its subscriptions receive it)."""
        params = {
            "event_type": "DIRECT_MESSAGE",
            "payload": {"to": to_agent, "content": content},
            "to_agent": to_agent,
        }
        result: dict[str, Any] = await call(headers(ctx), "PUBLISH", params)
        return result

    @server.tool()
    async def get_shared(key: str, ctx: Context) -> dict[str, Any]:
        """Read a key of the daemon's shared state (found: false if it is not set)."""
        result: dict[str, Any] = await call(headers(ctx), "GET_SHARED", {"key": key})
        return result

    @server.tool()
    async def set_shared(key: str, value: Any, ctx: Context) -> dict[str, Any]:
        """Store any JSON value under a key of the daemon's shared state (durable)."""
        params = {"key": key, "value": value}
        result: dict[str, Any] = await call(headers(ctx), "SET_SHARED", params)
        return result

    @server.tool()
    async def list_agents(ctx: Context) -> dict[str, Any]:
        """The registered agents: id, role, capabilities, status, turns and cost."""
        result: dict[str, Any] = await call(headers(ctx), "GET_AGENTS", {})
        return result

    @server.tool()
    async def get_events(
        ctx: Context,
        patterns: list[str] | None = None,
        since_seq: int = 0,
        limit: int = Field(default=50, ge=1, le=1000),
    ) -> dict[str, Any]:
        """Recent bus events, optionally of some types (names or globs such as
        PROCESS_*); with since_seq, the oldest ones after it (page on with last_seq)."""
        params: dict[str, Any] = {"since_seq": since_seq, "limit": limit}
        if patterns:
            params["event_types"] = patterns
        result: dict[str, Any] = await call(headers(ctx), "GET_EVENTS", params)
        return result

    @server.tool()
    async def spawn(
        prompt: str,
        ctx: Context,
        agent_id: str | None = None,
        session_id: str | None = None,
        model: str | None = None,
        cwd: str | None = None,
        max_cost_usd: float | None = None,
    ) -> dict[str, Any]:
        """Start another Claude turn (a sub-task) and return its process_id at once; collect
        its answer with wait. session_id continues that session (not your own); without
        it the sub-task starts a new one. Sub-tasks count against a depth limit and a limit
        of live sub-tasks per turn."""
        params: dict[str, Any] = {"prompt": prompt, "mode": "async"}
        for name, value in (
            ("agent_id", agent_id),
            ("session_id", session_id),
            ("model", model),
            ("cwd", cwd),
            ("max_cost_usd", max_cost_usd),
        ):
            if value is not None:
                params[name] = value
        result: dict[str, Any] = await call(headers(ctx), "SPAWN", params)
        return result

    @server.tool()
    async def wait(
        process_id: str,
        ctx: Context,
        timeout_s: float = Field(default=30.0, gt=0, le=MAX_WAIT_S),
    ) -> dict[str, Any]:
        """Wait up to timeout_s (at most 50) for a turn to finish: done: true with its
        result (text, cost, session_id) or error, else done: false (call wait again)."""
        params = {"process_id": process_id, "timeout_s": timeout_s}
        result: dict[str, Any] = await call(headers(ctx), "WAIT_PROCESS", params)
        return result

    return server
