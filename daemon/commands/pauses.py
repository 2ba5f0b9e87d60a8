"""Pause and resume an agent's or a session's queued turns (daemon/turns/pauses.py), and
steer a session: interrupt its running turn, optionally with the prompt to run next."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from daemon.commands.registry import Context, Params, Registry, Result
from daemon.errors import ErrorCode, NotFound
from daemon.turns.limits import Scope


class AgentParams(Params):
    # Strict: an interrupt cancels paid turns, so "yes" is not a boolean.
    model_config = ConfigDict(extra="forbid", strict=True)

    agent_id: str = Field(min_length=1, max_length=256)


class SessionParams(Params):
    model_config = ConfigDict(extra="forbid", strict=True)

    session_id: str = Field(min_length=1, max_length=128)


class PauseAgentParams(AgentParams):
    interrupt: bool = Field(
        default=False, description="also cancel its running turns (else they finish)"
    )


class PauseSessionParams(SessionParams):
    interrupt: bool = Field(
        default=False, description="also cancel its running turn (else it finishes)"
    )


class PauseResult(Result):
    scope: Scope
    id: str
    paused: bool
    changed: bool = Field(description="false: it was paused (or running) already")
    waiting: list[str] = Field(
        description="pause: the queued turns now held; resume: the turns released, in order"
    )
    interrupted: list[str] = Field(description="pause with interrupt: the turns cancelled")


class InterruptParams(SessionParams):
    prompt: str | None = Field(
        default=None,
        min_length=1,
        description="run this next in the session (async, ahead of its other queued turns), "
        "with the interrupted turn's options",
    )


class InterruptResult(Result):
    session_id: str
    interrupted: list[str] = Field(description="the turns stopped (their status: cancelled)")
    process_id: str | None = Field(
        default=None, description="the prompt's turn: PROCESS_COMPLETE follows on the bus"
    )


async def _known_session(ctx: Context, session_id: str) -> None:
    turns = ctx.services.turns
    if any(t.session_id == session_id for t in turns.turns.values()):
        return
    if await ctx.services.state.session(session_id) is None:
        raise NotFound(
            f"no session {session_id!r} is known to the daemon", code=ErrorCode.SESSION_NOT_FOUND
        )


def register(r: Registry) -> None:
    @r.command("PAUSE_AGENT", params=PauseAgentParams, result=PauseResult)
    async def pause_agent(ctx: Context, p: PauseAgentParams) -> PauseResult:
        """Hold the agent's queued turns (also ones submitted later, and after a restart)
        until RESUME_AGENT; they show as paused in GET_PROCESSES."""
        out = await ctx.services.turns.pause("agent", p.agent_id, interrupt=p.interrupt)
        return PauseResult(**out)

    @r.command("RESUME_AGENT", params=AgentParams, result=PauseResult)
    async def resume_agent(ctx: Context, p: AgentParams) -> PauseResult:
        """Release the agent's held turns, in their order."""
        return PauseResult(**await ctx.services.turns.resume("agent", p.agent_id))

    @r.command("PAUSE_SESSION", params=PauseSessionParams, result=PauseResult)
    async def pause_session(ctx: Context, p: PauseSessionParams) -> PauseResult:
        """Hold the session's queued turns until RESUME_SESSION (kept across restarts)."""
        await _known_session(ctx, p.session_id)
        out = await ctx.services.turns.pause("session", p.session_id, interrupt=p.interrupt)
        return PauseResult(**out)

    @r.command("INTERRUPT_SESSION", params=InterruptParams, result=InterruptResult)
    async def interrupt_session(ctx: Context, p: InterruptParams) -> InterruptResult:
        """Stop the session's running turn (warm: the CLI's interrupt; cold: its process
        group ends, the next turn resumes) and, with prompt, run that next in the session."""
        await _known_session(ctx, p.session_id)
        interrupted, steer = await ctx.services.turns.interrupt_session(p.session_id, p.prompt)
        return InterruptResult(
            session_id=p.session_id,
            interrupted=interrupted,
            process_id=steer.process_id if steer else None,
        )

    @r.command("RESUME_SESSION", params=SessionParams, result=PauseResult)
    async def resume_session(ctx: Context, p: SessionParams) -> PauseResult:
        """Release the session's held turns, in their order."""
        return PauseResult(**await ctx.services.turns.resume("session", p.session_id))
