"""Turns that turns start: which turns get the KSI MCP tools, and the limits of spawn trees.

A turn with the tools can ``spawn`` another turn (daemon/mcp_face/tools.py), which gets
them too, so one prompt could grow a tree without end. Each spawned turn records its parent
and depth (:class:`~daemon.state.records.TurnRecord`); a SPAWN from a turn is refused with a
typed error, before anything runs, past ``spawn_max_depth`` levels below the client's turn
or when the parent already has ``spawn_max_children`` queued or running children.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from daemon.claude.options import ClaudeOptions
from daemon.errors import DaemonError, ErrorCode, InvalidParameters
from daemon.mcp_face.tokens import ALLOW_RULE
from daemon.settings import Settings
from daemon.state.records import StateManager
from daemon.turns.turn import SpawnRequest, Turn

ConfigFor = Callable[[str], Awaitable[Path]]


def wants_ksi_tools(req: SpawnRequest, state: StateManager, settings: Settings) -> bool:
    """Whether the turn gets the KSI MCP tools: as asked, else on for a registered agent's
    turn and for a spawned turn (a sub-task can report on the bus as its parent did)."""
    if req.ksi_tools is None:
        return settings.mcp and (req.agent_id in state.agents or req.parent_process_id is not None)
    if req.ksi_tools and not settings.mcp:
        raise InvalidParameters(
            "ksi_tools: this daemon runs without its MCP face (KSI_MCP=false)",
            details={"parameter": "ksi_tools"},
        )
    return req.ksi_tools


async def with_ksi_tools(
    opts: ClaudeOptions, session_id: str, config_for: ConfigFor
) -> ClaudeOptions:
    """``opts`` with the face's ``--mcp-config`` for the session and its tools pre-allowed
    (the same for every turn of the session: a warm CLI keeps its flags)."""
    path = await config_for(session_id)
    allowed = list(opts.allowed_tools or [])
    if ALLOW_RULE not in allowed:
        allowed.append(ALLOW_RULE)
    return opts.model_copy(update={"mcp_config": str(path), "allowed_tools": allowed})


def check_child(req: SpawnRequest, live: Iterable[Turn], settings: Settings) -> None:
    """Refuse a spawned turn past the tree's limits (nothing of it exists yet)."""
    if req.parent_process_id is None:
        return
    if req.depth > settings.spawn_max_depth:
        raise DaemonError(
            f"a turn {req.depth} levels below the client's would pass the spawn depth limit "
            f"({settings.spawn_max_depth})",
            code=ErrorCode.SPAWN_DEPTH_EXCEEDED,
            details={"depth": req.depth, "max_depth": settings.spawn_max_depth},
        )
    children = sum(1 for t in live if t.request.parent_process_id == req.parent_process_id)
    if children >= settings.spawn_max_children:
        raise DaemonError(
            f"process {req.parent_process_id} already has {children} live sub-tasks (the "
            f"limit); wait for one to finish",
            code=ErrorCode.TOO_MANY_CHILDREN,
            details={"live_children": children, "max_children": settings.spawn_max_children},
        )
