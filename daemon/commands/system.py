"""HEALTH_CHECK, GET_COMMANDS, SHUTDOWN, and making a connection persistent."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from pydantic import Field

from daemon.commands.registry import Context, NoParams, Params, Registry, Result
from daemon.errors import InvalidParameters


class HealthResult(Result):
    status: Literal["healthy", "degraded", "starting", "shutting_down"] = Field(
        description="degraded: the state database refuses writes (see storage), or the CLI "
        "has no working credentials (see claude.auth)"
    )
    version: str
    pid: int
    started_at: str
    uptime_s: float
    socket: str
    counts: dict[str, int]
    litellm: dict[str, Any] = Field(description="status: not_loaded | loading | ready | failed")
    claude: dict[str, Any] = Field(
        description="which CLI binary and version the daemon uses; auth.status: ok | missing "
        "(no credentials where the CLI looks) | failed (the last turn was refused for them)"
    )
    warm: dict[str, Any] = Field(default_factory=dict)
    storage: dict[str, Any] = Field(
        default_factory=dict, description="writable, failure, queued_bytes, lost_writes"
    )
    permissions: dict[str, int] = Field(
        default_factory=dict,
        description="the permission relay: pending requests now, asked and auto_allowed "
        "(by a session rule) since start",
    )
    mcp: dict[str, Any] = Field(
        default_factory=dict,
        description="the KSI MCP face: status (disabled | not_loaded | loading | ready | "
        "failed), url, calls (tool calls served) and refused (requests without a live "
        "turn's token)",
    )
    agents: dict[str, int] = Field(
        default_factory=dict,
        description="direct messages held: answering (queued for agents that answer) and "
        "offline (for agents away) now; answered, failed and delivered_offline since start",
    )
    orphans_ended: int = Field(
        default=0,
        description="CLI processes of an earlier run that start-up found still running and ended",
    )


class CommandsParams(Params):
    include_results: bool = Field(
        default=False,
        description="also each command's result schema (a reply of ~70 KB; without it the "
        "reply stays under the 64 KiB line a default asyncio reader takes, as KSI's "
        "clients read it)",
    )


class CommandsResult(Result):
    commands: list[dict[str, Any]]
    total: int


class ShutdownResult(Result):
    status: Literal["shutting_down"]
    message: str


class ReloadDaemonResult(Result):
    status: Literal["reloading"]
    new_pid: int = Field(description="the successor, prepared to take over")
    message: str


class ConnectParams(Params):
    agent_id: str | None = Field(default=None, min_length=1, max_length=256)


class AgentConnectionParams(Params):
    action: Literal["connect", "disconnect"]
    agent_id: str = Field(min_length=1, max_length=256)


class ConnectResult(Result):
    status: Literal["connected", "disconnected"]
    agent_id: str | None = None
    connection_id: int | None = None


def register(r: Registry) -> None:
    @r.command("HEALTH_CHECK", params=NoParams, result=HealthResult)
    def health_check(ctx: Context, p: NoParams) -> dict[str, Any]:
        """Liveness and counters: version, uptime, connections, sessions, processes, and
        the state of LiteLLM and of the Claude CLI binary."""
        # Built by the daemon from its own counters, in HealthResult's shape: nothing to
        # validate (tests check it against the published schema), and this is the liveness
        # probe, called often.
        return ctx.services.health()

    @r.command("GET_COMMANDS", params=CommandsParams, result=CommandsResult)
    def get_commands(ctx: Context, p: CommandsParams) -> CommandsResult:
        """Every command with its description and the JSON Schema of its parameters (and,
        with ``include_results``, of its result)."""
        commands = ctx.services.registry.describe(results=p.include_results)
        return CommandsResult(commands=commands, total=len(commands))

    @r.command("SHUTDOWN", params=NoParams, result=ShutdownResult)
    def shutdown(ctx: Context, p: NoParams) -> ShutdownResult:
        """Reply, then stop gracefully (the same path as SIGTERM)."""
        # Scheduled, not awaited: the reply is written before the shutdown starts closing.
        asyncio.get_running_loop().call_soon(ctx.services.request_shutdown, "SHUTDOWN command")
        return ShutdownResult(status="shutting_down", message="daemon is shutting down")

    @r.command("RELOAD_DAEMON", params=NoParams, result=ReloadDaemonResult, long_running=True)
    async def reload_daemon(ctx: Context, p: NoParams) -> ReloadDaemonResult:
        """Restart without downtime: a new daemon process (the same command line, the code
        on disk now) is started and, once it has loaded, this one stops accepting (new
        clients wait in the socket's backlog for the new one), finishes its running turns,
        keeps queued ones for it, and exits; the new one then serves the same socket and
        state. Live connections close: persistent clients reconnect. If the new process
        fails to start, this daemon keeps serving and the reply is RELOAD_FAILED."""
        pid = await ctx.services.reload_daemon()
        return ReloadDaemonResult(
            status="reloading",
            new_pid=pid,
            message=f"pid {pid} takes over once this daemon's turns are done",
        )

    @r.command("CONNECT", params=ConnectParams, result=ConnectResult)
    def connect(ctx: Context, p: ConnectParams) -> ConnectResult:
        """Keep this connection open for many pipelined commands and pushed events."""
        if ctx.conn is None:
            raise InvalidParameters("CONNECT only makes sense over the socket")
        ctx.conn.make_persistent(p.agent_id)
        return ConnectResult(
            status="connected", agent_id=ctx.conn.agent_id, connection_id=ctx.conn.id
        )

    @r.command("AGENT_CONNECTION", params=AgentConnectionParams, result=ConnectResult)
    def agent_connection(ctx: Context, p: AgentConnectionParams) -> ConnectResult:
        """KSI-compatible form of CONNECT: ``action: connect`` binds the connection to
        ``agent_id`` and keeps it open; ``disconnect`` drops its subscriptions."""
        if ctx.conn is None:
            raise InvalidParameters("AGENT_CONNECTION only makes sense over the socket")
        if p.action == "connect":
            ctx.conn.ksi_events = True  # a KSI client: it reads pushed events flat
            ctx.conn.make_persistent(p.agent_id)
            return ConnectResult(status="connected", agent_id=p.agent_id, connection_id=ctx.conn.id)
        ctx.conn.unsubscribe(None)
        return ConnectResult(status="disconnected", agent_id=p.agent_id, connection_id=ctx.conn.id)
