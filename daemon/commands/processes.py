"""SPAWN and the commands that inspect and control turns and sessions."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import ConfigDict, Field, field_validator

from daemon.claude.options import TurnOptions, UsdAmount
from daemon.commands.registry import Context, NoParams, Params, Registry, Result, comma_list
from daemon.errors import Conflict, ErrorCode, InvalidParameters, NotFound, TurnFailed
from daemon.state.records import AgentInfo, SessionRecord, TurnRecord
from daemon.turns.outcome import SpawnResult
from daemon.turns.turn import SpawnRequest


class SpawnParams(Params, TurnOptions):
    """A SPAWN: the prompt, where the turn belongs, and its :class:`TurnOptions` (declared
    and validated there, shared with the provider's ``claude={...}``)."""

    # Strict: JSON true is not 1 second, "yes" is not a boolean, 3.0 is not a turn count.
    # A paid turn runs on these values, so a client's slip is an error, not a guess.
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, description="sent to the CLI on stdin, never argv")
    mode: Literal["sync", "async"] = "sync"
    type: Literal["claude"] = Field(default="claude", description="KSI compatibility")
    session_id: str | None = Field(
        default=None,
        description="resume this session; without it, a client's SPAWN with agent_id "
        "continues that agent's most recent session (unless new_session)",
    )
    new_session: bool = Field(
        default=False, description="with agent_id: start a new session instead of continuing"
    )
    new_session_id: str | None = Field(
        default=None,
        description="start a new session with this id (a UUID the client chose, e.g. to "
        "name the session before its first turn: the ACP face); an id the daemon already "
        "knows is refused with SESSION_EXISTS",
    )
    model: str | None = Field(
        default=None,
        description="alias (sonnet, opus, haiku), a full "
        "model id, or 'claude-cli/<model>'; default from config",
    )
    agent_id: str | None = Field(default=None, min_length=1, max_length=256)
    client_request_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="the same id within the idempotency window returns the same process",
    )
    max_iterations: int | None = Field(
        default=None,
        ge=1,
        description="cap the session at this many turns (kept for the session; a turn past "
        "it gets SESSION_LIMIT_REACHED); default from config, off",
    )
    idle_timeout_s: float | None = Field(
        default=None,
        gt=0,
        le=30 * 24 * 3600,
        allow_inf_nan=False,
        description="how long the session awaits input after a turn before its warm CLI is "
        "released and SESSION_IDLE_EXPIRED is published (kept for the session; default "
        "from config, 660)",
    )
    stream: bool = Field(
        default=False,
        description="sync only: write the turn's PROCESS_PROGRESS events on this connection "
        "(each with this request's id) before the reply",
    )
    tree_max_cost_usd: UsdAmount | None = Field(
        default=None,
        description="what this turn and every sub-task below it (spawned through the KSI MCP "
        "face) may cost together: a sub-task that would start with the tree's finished turns "
        "at it gets TREE_BUDGET_EXCEEDED, and each one's CLI budget is what is left. A "
        "client's SPAWN only",
    )
    ksi_tools: bool | None = Field(
        default=None,
        description="give the turn the KSI MCP tools (mcp__ksi__publish, spawn, ...: the bus, "
        "shared state and sub-tasks); default: on for a registered agent's turn",
    )

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v

    @field_validator("session_id", "new_session_id")
    @classmethod
    def _uuid(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                return str(uuid.UUID(v))
            except ValueError:
                raise ValueError("must be a session UUID as returned by SPAWN") from None
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if "\0" in v:
            raise ValueError("must not contain a NUL character")
        if v.startswith("claude-cli/"):
            v = v.removeprefix("claude-cli/")
        if not v or "/" in v:
            raise ValueError(
                "the daemon runs the Claude CLI: use an alias such as 'sonnet', "
                "a model id, or 'claude-cli/<model>'"
            )
        return v

    # KSI clients sometimes send "Bash,Read" instead of a list.
    _tools = field_validator("allowed_tools", "disallowed_tools", mode="before")(comma_list)


class ProcessesResult(Result):
    processes: list[TurnRecord]
    running: int
    queued: int
    max_concurrency: int
    total: int
    warm: list[dict[str, Any]] = Field(
        default_factory=list,
        description="live warm CLI processes (per session and pooled): "
        "session_id, pid, rss_mb, idle_s, turns, started_at, busy, pooled",
    )
    paused: list[dict[str, str]] = Field(
        default_factory=list,
        description="paused agents and sessions (PAUSE_AGENT / PAUSE_SESSION): scope, id, "
        "paused_at",
    )


class ProcessIdParams(Params):
    process_id: str = Field(min_length=1)


MAX_WAIT_S = 3600.0


class WaitParams(Params):
    process_id: str = Field(min_length=1)
    timeout_s: float = Field(
        default=30.0,
        ge=0,
        le=MAX_WAIT_S,
        allow_inf_nan=False,
        description="how long to wait for the turn to finish (0: just look)",
    )


class WaitResult(Result):
    process_id: str
    status: str
    done: bool = Field(description="false: still queued or running (wait again)")
    session_id: str | None = None
    result: SpawnResult | None = Field(default=None, description="a completed turn's result")
    error: dict[str, Any] | None = Field(
        default=None, description="a failed turn's error: code, message, details"
    )


class CancelResult(Result):
    process_id: str
    status: str


class SessionsParams(Params):
    agent_id: str | None = None
    limit: int = Field(default=100, ge=1, le=10_000)


class SessionsResult(Result):
    sessions: list[SessionRecord]
    total: int


class SessionIdParams(Params):
    session_id: str = Field(min_length=1)


class SessionResult(Result):
    session: SessionRecord
    processes: list[TurnRecord]


class HistoryParams(Params):
    session_id: str = Field(min_length=1)
    limit: int = Field(
        default=1000, ge=1, le=100_000, description="at most this many entries, the newest"
    )


class HistoryEntry(Result):
    role: Literal["user", "assistant", "error"]
    text: str
    timestamp: str | None = None
    process_id: str | None = None
    agent_id: str | None = Field(default=None, description="user entries: who asked")


class HistoryResult(Result):
    session_id: str
    entries: list[HistoryEntry] = Field(description="oldest first")
    total: int = Field(description="entries in the session's log (before the limit)")


def _history_entry(line: dict[str, Any]) -> HistoryEntry | None:
    kind = line.get("type")
    stamp = {"timestamp": line.get("timestamp"), "process_id": line.get("process_id")}
    if kind == "human":
        return HistoryEntry(
            role="user", text=str(line.get("content", "")), agent_id=line.get("agent_id"), **stamp
        )
    if kind == "claude":
        return HistoryEntry(role="assistant", text=str(line.get("result") or ""), **stamp)
    if kind == "error":
        error = line.get("error")
        message = error.get("message") if isinstance(error, dict) else None
        return HistoryEntry(role="error", text=str(message or ""), **stamp)
    return None


def read_history(path: Path) -> list[HistoryEntry]:
    """A session's turns from its JSONL log (``daemon/state/turnlog.py``); a line that is
    not whole JSON (a log someone edited) is skipped, not fatal."""
    entries = []
    try:
        with path.open("rb") as f:
            for raw in f:
                try:
                    line = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    continue
                entry = _history_entry(line) if isinstance(line, dict) else None
                if entry is not None:
                    entries.append(entry)
    except FileNotFoundError:
        pass  # removed by CLEANUP: the session has no history to show
    return entries


def with_profile(p: SpawnParams, agent: AgentInfo | None) -> SpawnParams:
    """``p`` with the agent's profile filling what the SPAWN did not set itself (validated
    together, as if the client had sent them)."""
    if agent is None or agent.profile is None:
        return p
    defaults = agent.profile.model_dump(exclude_none=True)
    return SpawnParams.model_validate({**defaults, **p.model_dump(exclude_unset=True)})


async def _check_new_id(ctx: Context, p: SpawnParams) -> None:
    if p.session_id is not None or p.new_session:
        raise InvalidParameters(
            "new_session_id starts a session: it goes with neither session_id nor new_session",
            details={"parameter": "new_session_id"},
        )
    assert p.new_session_id is not None
    if await ctx.services.state.session(p.new_session_id) is not None or any(
        x.session_id == p.new_session_id for x in ctx.services.state.processes.values()
    ):
        raise Conflict(
            f"session {p.new_session_id} exists already: resume it with session_id",
            code=ErrorCode.SESSION_EXISTS,
            details={"parameter": "new_session_id", "session_id": p.new_session_id},
        )


def register(r: Registry) -> None:
    @r.command(
        "SPAWN",
        params=SpawnParams,
        result=SpawnResult,
        long_running=True,
        aliases=("COMPLETION",),
        exclude_none=True,
    )
    async def spawn(ctx: Context, p: SpawnParams) -> SpawnResult:
        """Run a Claude turn through LiteLLM and the claude-cli provider. ``mode: sync``
        answers with the turn's text, session_id, cost and usage; ``async`` answers at once
        with a process_id and later publishes PROCESS_COMPLETE."""
        services = ctx.services
        stream = None
        if p.stream:
            if p.mode != "sync":
                raise InvalidParameters(
                    "stream: true is for a sync SPAWN; an async turn's progress is on the "
                    "bus (SUBSCRIBE to PROCESS_PROGRESS)"
                )
            if ctx.conn is None or ctx.request is None:
                raise InvalidParameters("stream: true needs a socket connection to write to")
            stream = ctx.conn.stream_progress(ctx.request)
        origin = ctx.origin  # a turn's spawn tool: the new turn is its sub-task
        if origin is not None and p.session_id == origin.session_id:
            raise InvalidParameters(
                "a turn cannot spawn into its own session: the sub-task would wait for the "
                "turn to end",
                details={"parameter": "session_id"},
            )
        if origin is not None and p.tree_max_cost_usd is not None:
            raise InvalidParameters(
                "tree_max_cost_usd is set on a client's turn: the budget of its whole tree",
                details={"parameter": "tree_max_cost_usd"},
            )
        agent_id = p.agent_id if origin is not None else p.agent_id or ctx.agent_id
        p = with_profile(p, services.state.agents.get(agent_id) if agent_id else None)
        session_id = p.session_id
        if p.new_session and session_id is not None:
            raise InvalidParameters(
                "new_session and session_id contradict each other",
                details={"parameter": "new_session"},
            )
        if p.new_session_id is not None:
            await _check_new_id(ctx, p)
        elif session_id is None and agent_id and not p.new_session and origin is None:
            # KSI's rule: an agent's turns form one conversation unless asked otherwise. Not
            # for a turn's sub-task: the agent's session may be the very one waiting for it.
            last = await services.state.list_sessions(agent_id, 1)
            session_id = last[0].session_id if last else None
        req = SpawnRequest(
            prompt=p.prompt,
            mode=p.mode,
            session_id=session_id,
            new_session_id=p.new_session_id,
            model=p.model or services.settings.default_model,
            agent_id=agent_id,
            client_request_id=p.client_request_id,
            max_iterations=p.max_iterations,
            idle_timeout_s=p.idle_timeout_s,
            options=TurnOptions.of(p),  # the SPAWN's own fields, validated with it
            ksi_tools=p.ksi_tools,
            parent_process_id=origin.process_id if origin else None,
            depth=origin.depth + 1 if origin else 0,
            tree_max_cost_usd=p.tree_max_cost_usd,
        )
        result = await services.turns.submit(req, watch=stream)
        if stream is not None and stream.missed:
            result = result.model_copy(update={"progress_missed": stream.missed})
        return result

    @r.command("GET_PROCESSES", params=NoParams, result=ProcessesResult)
    def get_processes(ctx: Context, p: NoParams) -> ProcessesResult:
        """Queued and running turns (with queue positions) and recent finished ones."""
        turns = ctx.services.turns
        procs = turns.snapshot()
        return ProcessesResult(
            processes=procs,
            running=turns.slots.running,
            queued=turns.slots.queued,
            max_concurrency=turns.slots.limit,
            total=len(procs),
            warm=turns.engine.warm_processes(),
            paused=turns.pauses.listing(),
        )

    @r.command(
        "WAIT_PROCESS", params=WaitParams, result=WaitResult, long_running=True, exclude_none=True
    )
    async def wait_process(ctx: Context, p: WaitParams) -> WaitResult:
        """Wait up to ``timeout_s`` for a turn (an async SPAWN's process_id) to finish: its
        result or error with ``done: true``, else ``done: false`` and its status now. The
        KSI MCP face's wait tool."""
        info, outcome = await ctx.services.turns.wait(p.process_id, p.timeout_s)
        if outcome is None:
            return WaitResult(
                process_id=p.process_id, status=info.status, done=False, session_id=info.session_id
            )
        if isinstance(outcome, TurnFailed):
            return WaitResult(
                process_id=p.process_id,
                status=info.status,
                done=True,
                session_id=info.session_id,
                error=outcome.to_wire(),
            )
        return WaitResult(
            process_id=p.process_id,
            status=outcome.status,
            done=True,
            session_id=outcome.session_id,
            result=outcome,
        )

    @r.command("CANCEL_PROCESS", params=ProcessIdParams, result=CancelResult)
    async def cancel_process(ctx: Context, p: ProcessIdParams) -> CancelResult:
        """Cancel a queued or running turn; a running CLI's whole process group is killed."""
        info = await ctx.services.turns.cancel(p.process_id)
        return CancelResult(process_id=info.process_id, status=info.status)

    @r.command("GET_SESSIONS", params=SessionsParams, result=SessionsResult)
    async def get_sessions(ctx: Context, p: SessionsParams) -> SessionsResult:
        """Known sessions, most recently used first (optionally one agent's)."""
        sessions = [
            ctx.services.turns.with_warm(s)
            for s in await ctx.services.state.list_sessions(p.agent_id, p.limit)
        ]
        return SessionsResult(sessions=sessions, total=len(sessions))

    @r.command("GET_SESSION_HISTORY", params=HistoryParams, result=HistoryResult)
    async def get_session_history(ctx: Context, p: HistoryParams) -> HistoryResult:
        """A session's conversation from its log in claude_logs/: each turn's prompt
        (``user``) and answer (``assistant``, or ``error`` for a failed turn), oldest first.
        The ACP face replays it on ``session/load``."""
        info = await ctx.services.state.session(p.session_id)
        if info is None:
            raise NotFound(
                f"no session {p.session_id!r} is known to the daemon",
                code=ErrorCode.SESSION_NOT_FOUND,
            )
        path = ctx.services.turns.turnlog.path_for(info.session_id)
        entries = await asyncio.to_thread(read_history, path)
        return HistoryResult(
            session_id=info.session_id, entries=entries[-p.limit :], total=len(entries)
        )

    @r.command("GET_SESSION", params=SessionIdParams, result=SessionResult)
    async def get_session(ctx: Context, p: SessionIdParams) -> SessionResult:
        """One session: cwd, model, turns, total cost, last use, log path, and its recent
        processes."""
        info = await ctx.services.state.session(p.session_id)
        if info is None:
            raise NotFound(
                f"no session {p.session_id!r} is known to the daemon",
                code=ErrorCode.SESSION_NOT_FOUND,
            )
        procs = [x for x in ctx.services.state.processes.values() if x.session_id == p.session_id]
        return SessionResult(session=ctx.services.turns.with_warm(info), processes=procs)
