"""A SPAWN as the scheduler keeps it: the validated request and the live turn."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel

from daemon.claude.options import ClaudeOptions, TurnOptions
from daemon.errors import TurnFailed
from daemon.events.subscriber import Event
from daemon.state.records import TurnRecord
from daemon.turns.outcome import Outcome, SpawnResult


class SpawnRequest(BaseModel):
    """A validated SPAWN (built by the SPAWN command; kept in SQLite while an async one
    waits, so it runs after a restart)."""

    prompt: str
    mode: Literal["sync", "async"]
    session_id: str | None = None
    new_session_id: str | None = None  # a new session's id, chosen by the client
    model: str
    agent_id: str | None = None
    client_request_id: str | None = None
    options: TurnOptions
    max_iterations: int | None = None  # sets the session's turn cap (daemon/turns/limits.py)
    idle_timeout_s: float | None = None  # sets the session's idle timeout (daemon/turns/idle.py)
    # A steering turn (INTERRUPT_SESSION with a prompt): runs before the session's other
    # queued turns.
    first: bool = False
    # The KSI MCP face (daemon/mcp_face): whether the turn gets its tools (None: on for a
    # registered agent's turn and for a turn another turn spawned), and, for a spawned one,
    # which turn spawned it and how deep in the tree it is.
    ksi_tools: bool | None = None
    parent_process_id: str | None = None
    depth: int = 0
    # What the whole spawn tree a client's turn starts may cost (its own cost included);
    # set on the root only (daemon/turns/tree.py).
    tree_max_cost_usd: float | None = None


def _new_future() -> asyncio.Future[Outcome]:
    return asyncio.get_running_loop().create_future()


@dataclass
class Turn:
    info: TurnRecord
    request: SpawnRequest
    # Its session fixed at submit (resume, or the new session's id); cwd as the client asked:
    # the engine plans it again inside the session's hold (ClaudeEngine.plan_turn).
    opts: ClaudeOptions
    session_id: str
    cwd: str  # where it runs (planned at submit; settled when it starts)
    done: asyncio.Future[SpawnResult | TurnFailed] = field(default_factory=_new_future)
    task: asyncio.Task[None] | None = None
    # Set at shutdown for a queued async turn: its request is kept in SQLite and it runs
    # after the restart, so its cancellation now is not recorded as a cancelled turn.
    deferred: bool = False
    entered: bool = False  # its task has begun (a task cancelled before that never does)
    progress: int = 0  # PROCESS_PROGRESS events so far (their per-process index)
    awaiting: int = 0  # relayed permission requests it waits on (daemon/turns/permissions.py)
    budget_scope: str | None = None  # whose budget its --max-budget-usd is (limits.py)
    # Told of each PROCESS_PROGRESS event as it is published: the connections of sync
    # SPAWNs with ``stream: true`` waiting for this turn.
    watchers: list[Callable[[Event], None]] = field(default_factory=list)

    @property
    def resume(self) -> bool:
        return self.opts.session_id is not None

    def next_index(self) -> int:
        self.progress += 1
        return self.progress - 1


def restored_turn(info: TurnRecord, raw: bytes, default_cwd: str) -> Turn:
    """The turn of an async SPAWN an earlier run accepted but did not start, from its
    request as kept in SQLite. Raises ValidationError if the request no longer validates
    (e.g. its cwd was removed while the daemon was down)."""
    req = SpawnRequest.model_validate_json(raw)
    session_id = info.session_id or req.session_id or str(uuid.uuid4())
    ids = {"session_id": session_id} if req.session_id else {"new_session_id": session_id}
    cwd = info.cwd or req.options.cwd or default_cwd
    return Turn(info, req, ClaudeOptions.of(req.options, **ids), session_id, cwd)
