"""Turns that turns start: which turns get the KSI MCP tools, and the limits of spawn trees.

A turn with the tools can ``spawn`` another turn (daemon/mcp_face/tools.py), which gets
them too, so one prompt could grow a tree without end. Each spawned turn records its parent
and depth (:class:`~daemon.state.records.TurnRecord`); a SPAWN from a turn is refused with a
typed error, before anything runs, past ``spawn_max_depth`` levels below the client's turn
or when the parent already has ``spawn_max_children`` queued or running children.

A client's turn may also set ``tree_max_cost_usd``, what its whole tree may cost: a sub-task
is refused once the tree's turns have cost that much (the CLI's reported costs of finished
turns; a running turn's cost is known when it ends), and the CLI budget of each one that
starts (``--max-budget-usd``) is what is left, so no single turn can overspend it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path

from daemon.claude.options import ClaudeOptions
from daemon.errors import DaemonError, ErrorCode, InvalidParameters
from daemon.mcp_face.tokens import ALLOW_RULE
from daemon.settings import Settings
from daemon.state.records import StateManager, TurnRecord
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


def check_child(
    req: SpawnRequest,
    live: Iterable[Turn],
    settings: Settings,
    records: Mapping[str, TurnRecord],
) -> SpawnRequest:
    """Refuse a spawned turn past the tree's limits (nothing of it exists yet); else the
    request, its CLI budget capped at what its tree has left."""
    if req.parent_process_id is None:
        return req
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
    root = root_of(req.parent_process_id, records)
    budget = root.tree_max_cost_usd if root is not None else None
    if root is None or budget is None:
        return req
    spent = tree_spent(root.process_id, records)
    if spent >= budget:
        raise DaemonError(
            f"the spawn tree of process {root.process_id} has cost ${spent:.4f} of its "
            f"${budget:.4f} budget",
            code=ErrorCode.TREE_BUDGET_EXCEEDED,
            details={"root_process_id": root.process_id, "spent_usd": spent, "max_usd": budget},
        )
    left = budget - spent
    own = req.options.max_cost_usd
    if own is not None and own <= left:
        return req
    options = req.options.model_copy(update={"max_cost_usd": round(left, 6)})
    return req.model_copy(update={"options": options})


def root_of(process_id: str, records: Mapping[str, TurnRecord]) -> TurnRecord | None:
    """The client's turn at the top of ``process_id``'s tree (None if it is not known)."""
    rec = records.get(process_id)
    seen: set[str] = set()
    while rec is not None and rec.parent_process_id is not None and rec.process_id not in seen:
        seen.add(rec.process_id)
        parent = records.get(rec.parent_process_id)
        if parent is None:
            break  # the top is no longer kept: the oldest known ancestor stands for it
        rec = parent
    return rec


def tree_spent(root_id: str, records: Mapping[str, TurnRecord]) -> float:
    """What the turns of ``root_id``'s tree (it included) have cost so far."""
    below: dict[str, list[TurnRecord]] = {}
    for rec in records.values():
        if rec.parent_process_id is not None:
            below.setdefault(rec.parent_process_id, []).append(rec)
    total, todo = 0.0, [root_id]
    while todo:
        pid = todo.pop()
        node = records.get(pid)
        total += (node.cost_usd or 0.0) if node is not None else 0.0
        todo.extend(r.process_id for r in below.get(pid, []))
    return round(total, 10)
