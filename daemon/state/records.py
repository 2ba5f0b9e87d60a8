"""The state manager: sessions, agents, shared state and processes, persisted in SQLite.

Reads are served from memory (loaded once at start-up). A client's own writes (shared
state, agents) go through to the store and are awaited, so a reply means the change is
durable; the daemon's per-turn bookkeeping (process records, session rows) is queued in
order without waiting for its commit.

Two tables grow without bound, one row per turn or per new session, so memory holds only
a window of them and the database holds all: processes (the live ones plus the most
recent) and sessions (the most recently used, an LRU cache in front of the table).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from datetime import datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from pydantic.dataclasses import dataclass

from daemon.claude.options import TurnOptions
from daemon.errors import ErrorCode
from daemon.protocol import iso_from_epoch
from daemon.state.db import Store
from daemon.turns.orphans import Recorded

ProcessStatus = Literal[
    "queued",
    "paused",
    "running",
    "awaiting_permission",
    "completed",
    "failed",
    "cancelled",
    "timed_out",
    "interrupted",
]
# "paused": queued, and its agent or session is paused (PAUSE_AGENT / PAUSE_SESSION); kept
# in memory only: on disk it is "queued".
# "awaiting_permission": running, and the CLI waits for a relayed permission decision
# (daemon/turns/permissions.py). Kept in memory only: on disk such a turn is "running".
# "interrupted": the daemon stopped (or died) under the turn; the session is intact and the
# request may be resubmitted (with the same client_request_id it runs once more, once).
FINAL_STATUSES = frozenset({"completed", "failed", "cancelled", "timed_out", "interrupted"})


class AgentProfile(TurnOptions):
    """How an agent's turns run (REGISTER_AGENT ``profile``): the defaults of every SPAWN
    with its agent_id, the turns that answer its messages included. A SPAWN's own fields
    win."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(default=None, description="alias or model id")


class AgentInfo(BaseModel):
    agent_id: str
    role: str | None = None
    capabilities: list[str] = Field(default_factory=list)
    status: str = "active"
    metadata: dict[str, Any] = Field(default_factory=dict)
    registered_at: str
    updated_at: str
    turns: int = 0
    total_cost_usd: float = 0.0
    profile: AgentProfile | None = None
    respond_to_messages: bool = Field(
        default=False,
        description="a DIRECT_MESSAGE to it runs a turn in its session; the answer goes back "
        "to the sender as a DIRECT_MESSAGE",
    )
    # Filled in by GET_AGENTS from the daemon's live state (not stored).
    session_id: str | None = Field(default=None, description="its most recent session")
    queued_messages: int = Field(
        default=0, description="direct messages waiting for it (to answer, or offline)"
    )
    connected: bool = Field(default=False, description="a connection subscribes as it")
    live_children: int = Field(
        default=0, description="queued or running sub-tasks its turns spawned"
    )


_PROFILE_JSON: TypeAdapter[AgentProfile] = TypeAdapter(AgentProfile)


# Sessions and processes are the records memory holds hundreds of: slotted dataclasses
# take ~0.25 KB each where a BaseModel (its __dict__ and fields-set) takes ~1.3 KB.
@dataclass(slots=True, kw_only=True)
class SessionRecord:
    session_id: str
    cwd: str
    model: str | None = None
    agent_id: str | None = None
    created_at: str
    last_used_at: str
    turns: int = 0
    total_cost_usd: float = 0.0
    last_process_id: str | None = None
    log_path: str | None = None
    warm: dict[str, Any] | None = Field(
        default=None, description="Set while a warm CLI process serves this session."
    )
    state: Literal["running", "awaiting_input", "expired"] | None = Field(
        default=None,
        description="running: a turn is queued or running; awaiting_input: between turns, "
        "until idle_expires_at; expired: idle for longer (a SPAWN still resumes it, cold)",
    )
    idle_expires_at: str | None = None


@dataclass(slots=True, kw_only=True)
class TurnRecord:
    process_id: str
    status: ProcessStatus
    mode: Literal["sync", "async"]
    session_id: str | None = None
    agent_id: str | None = None
    model: str | None = None
    client_request_id: str | None = None
    prompt_preview: str = ""
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    cost_usd: float | None = None
    pid: int | None = None
    pgid: int | None = Field(default=None, description="the CLI's process group")
    pid_ticks: int | None = Field(
        default=None,
        description="the CLI pid's kernel start "
        "time: tells it from a later process reusing the pid",
    )
    cwd: str | None = None
    warm: bool = False
    queue_position: int | None = None
    error: dict[str, Any] | None = None
    parent_process_id: str | None = Field(
        default=None, description="the turn that spawned this one (its MCP spawn tool)"
    )
    depth: int = Field(default=0, description="0: a client's turn; a spawned one: its parent's + 1")
    ksi_tools: bool = Field(default=False, description="the turn has the KSI MCP tools")
    tree_max_cost_usd: float | None = Field(
        default=None, description="a client's turn: what it and every turn below it may cost"
    )


_PROCESS_JSON: TypeAdapter[TurnRecord] = TypeAdapter(TurnRecord)


class StateManager:
    RECENT_PROCESSES = 500
    # Sessions cached in memory (~0.5 KB each); older ones are read back from the table.
    CACHED_SESSIONS = 512

    def __init__(self, store: Store) -> None:
        self.store = store
        self.shared: dict[str, tuple[Any, float]] = {}
        self.agents: dict[str, AgentInfo] = {}
        self._sessions: OrderedDict[str, SessionRecord] = OrderedDict()  # LRU, oldest first
        self.session_count = 0
        self.processes: OrderedDict[str, TurnRecord] = OrderedDict()
        self._agent_costs: dict[str, tuple[int, float]] = {}
        # Filled by load(): what an earlier run left behind.
        self.orphans: list[Recorded] = []
        self.pending: list[tuple[TurnRecord, bytes]] = []
        self.recent_request_ids: list[tuple[str, str, float]] = []

    async def load(self, *, idempotency_window_s: float) -> None:
        """Read what the daemon remembers; ``idempotency_window_s``: how far back the
        client_request_ids that can still be replayed go (Settings.idempotency_window_s)."""
        for row in await self.store.query("SELECT key, value, updated_at FROM shared"):
            self.shared[row["key"]] = (orjson.loads(row["value"]), row["updated_at"])
        for row in await self.store.query("SELECT * FROM agents"):
            self.agents[row["agent_id"]] = AgentInfo(
                agent_id=row["agent_id"],
                role=row["role"],
                capabilities=orjson.loads(row["capabilities"]),
                status=row["status"],
                metadata=orjson.loads(row["metadata"]),
                registered_at=iso_from_epoch(row["registered_at"]),
                updated_at=iso_from_epoch(row["updated_at"]),
                profile=_PROFILE_JSON.validate_json(row["profile"]) if row["profile"] else None,
                respond_to_messages=bool(row["respond_to_messages"]),
            )
        rows = await self.store.query(
            "SELECT * FROM sessions ORDER BY last_used_at DESC LIMIT ?", (self.CACHED_SESSIONS,)
        )
        for row in reversed(rows):
            self._cache_session(_session_from_row(row))
        (count,) = await self.store.query("SELECT COUNT(*) AS n FROM sessions")
        self.session_count = count["n"]
        await self._recover(idempotency_window_s)
        rows = await self.store.query(
            "SELECT record, status, error_code FROM processes ORDER BY created_at DESC LIMIT ?",
            (self.RECENT_PROCESSES,),
        )
        for row in reversed(rows):
            info = _PROCESS_JSON.validate_json(row["record"])
            if info.status != row["status"]:  # marked by a daemon before schema 4
                info.status = row["status"]
                info.error = {"code": row["error_code"], "message": "the daemon stopped first"}
            self.processes[info.process_id] = info
        for row in await self.store.query(
            # Turns count when they completed; spend counts whatever a turn cost (a turn
            # stopped by its budget was paid for too).
            "SELECT agent_id, COUNT(CASE WHEN status='completed' THEN 1 END) AS n, "
            "COALESCE(SUM(cost_usd), 0) AS cost FROM processes "
            "WHERE agent_id IS NOT NULL GROUP BY agent_id"
        ):
            self._agent_costs[row["agent_id"]] = (row["n"], row["cost"])

    async def _recover(self, idempotency_window_s: float) -> None:
        """Settle the turns an earlier run left unfinished (it stopped or died under them).

        A turn that was running is ``interrupted``: it may have been paid for, so it is never
        re-run behind the client's back, and its CLI (if still alive) is reported in
        ``orphans`` for start-up to end. A queued async turn whose request was kept in
        ``pending_turns`` stays queued and is handed back in ``pending`` to run again; any
        other queued turn (a sync one, whose client lost its connection) is ``interrupted``.
        """
        self.orphans = []
        self.pending = []
        pending = {
            row["process_id"]: row["request"]
            for row in await self.store.query("SELECT process_id, request FROM pending_turns")
        }
        rows = await self.store.query(
            "SELECT record FROM processes WHERE status IN ('queued','running') ORDER BY created_at"
        )
        now = time.time()
        for row in rows:
            info = _PROCESS_JSON.validate_json(row["record"])
            if info.status == "queued" and info.process_id in pending:
                self.pending.append((info, pending.pop(info.process_id)))
                continue
            if info.pid is not None and info.pgid is not None and info.pid_ticks is not None:
                self.orphans.append(Recorded(info.pid, info.pgid, info.pid_ticks))
            started = info.status == "running"
            info.status = "interrupted"
            info.finished_at = iso_from_epoch(now)
            info.error = {
                "code": ErrorCode.INTERRUPTED,
                "message": (
                    "the daemon stopped while this turn ran; the session is intact "
                    "and the request may be resubmitted"
                )
                if started
                else "the daemon stopped before this turn started",
                "process_id": info.process_id,
            }
            # Queued, not awaited (one commit for all of them): a crash before it commits
            # leaves the rows as they were, and the next start settles them the same way.
            self.queue_process(info)
            if started and info.session_id and info.cwd:
                # The CLI stored the session when it started: it can be resumed.
                await self.record_turn(
                    info.session_id,
                    cwd=info.cwd,
                    model=info.model,
                    agent_id=info.agent_id,
                    cost_usd=0.0,
                    process_id=info.process_id,
                    log_path=None,
                    completed=False,
                )
        for process_id in pending:  # requests whose turn had started or ended meanwhile
            self.drop_pending(process_id)
        window_start = now - idempotency_window_s
        self.recent_request_ids = [
            (row["client_request_id"], row["process_id"], row["created_at"])
            for row in await self.store.query(
                "SELECT client_request_id, process_id, created_at FROM processes "
                "WHERE client_request_id IS NOT NULL AND created_at >= ? ORDER BY created_at",
                (window_start,),
            )
        ]

    # -- pending (queued async) turns ---------------------------------------------------

    async def keep_pending(self, process_id: str, request: bytes) -> None:
        """Persist a queued async turn's request (awaited: an async SPAWN's reply promises
        the turn will run, even across a restart)."""
        await self.store.write(
            "INSERT OR REPLACE INTO pending_turns(process_id, created_at, request) VALUES(?,?,?)",
            (process_id, time.time(), request),
        )

    def drop_pending(self, process_id: str) -> None:
        """The turn started, or will never run: its request need not survive a restart."""
        self.store.write_nowait("DELETE FROM pending_turns WHERE process_id=?", (process_id,))

    # -- shared state -----------------------------------------------------------------

    async def set_shared(self, key: str, value: Any) -> float:
        now = time.time()
        await self.store.write(
            "INSERT INTO shared(key, value, updated_at) VALUES(?,?,?) "
            "ON CONFLICT(key) DO UPDATE SET value=excluded.value, updated_at=excluded.updated_at",
            (key, orjson.dumps(value), now),
        )
        self.shared[key] = (value, now)
        return now

    async def delete_shared(self, key: str) -> bool:
        if key not in self.shared:
            return False
        await self.store.write("DELETE FROM shared WHERE key=?", (key,))
        self.shared.pop(key, None)
        return True

    # -- agents -----------------------------------------------------------------------

    async def register_agent(
        self,
        agent_id: str,
        role: str | None,
        capabilities: list[str],
        metadata: dict[str, Any],
        *,
        profile: AgentProfile | None = None,
        respond_to_messages: bool = False,
    ) -> AgentInfo:
        now = time.time()
        existing = self.agents.get(agent_id)
        registered = existing.registered_at if existing else iso_from_epoch(now)
        await self.store.write(
            "INSERT INTO agents(agent_id, role, capabilities, status, metadata, registered_at, "
            "updated_at, profile, respond_to_messages) VALUES(?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT(agent_id) DO UPDATE SET "
            "role=excluded.role, capabilities=excluded.capabilities, status=excluded.status, "
            "metadata=excluded.metadata, updated_at=excluded.updated_at, "
            "profile=excluded.profile, respond_to_messages=excluded.respond_to_messages",
            (
                agent_id,
                role,
                orjson.dumps(capabilities),
                "active",
                orjson.dumps(metadata),
                now,
                now,
                None if profile is None else _PROFILE_JSON.dump_json(profile, exclude_none=True),
                int(respond_to_messages),
            ),
        )
        info = AgentInfo(
            agent_id=agent_id,
            role=role,
            capabilities=capabilities,
            status="active",
            metadata=metadata,
            registered_at=registered,
            updated_at=iso_from_epoch(now),
            profile=profile,
            respond_to_messages=respond_to_messages,
        )
        self.agents[agent_id] = self._with_costs(info)
        return self.agents[agent_id]

    async def unregister_agent(self, agent_id: str) -> bool:
        if agent_id not in self.agents:
            return False
        await self.store.write("DELETE FROM agents WHERE agent_id=?", (agent_id,))
        del self.agents[agent_id]
        return True

    def agent_list(self) -> list[AgentInfo]:
        return [self._with_costs(a) for a in self.agents.values()]

    def agent_spend(self, agent_id: str) -> float:
        """What the agent's turns have cost so far (the CLI's reported costs)."""
        return round(self._agent_costs.get(agent_id, (0, 0.0))[1], 10)

    def _with_costs(self, info: AgentInfo) -> AgentInfo:
        turns, cost = self._agent_costs.get(info.agent_id, (0, 0.0))
        info.turns, info.total_cost_usd = turns, round(cost, 10)
        return info

    def stats(self) -> dict[str, int]:
        """HEALTH_CHECK's counts of what the state holds."""
        return {
            "agents": len(self.agents),
            "sessions": self.session_count,
            "shared_keys": len(self.shared),
        }

    # -- sessions ---------------------------------------------------------------------

    async def session(self, session_id: str) -> SessionRecord | None:
        """A known session, from the cache or the table; None if the daemon never ran it."""
        info = self._sessions.get(session_id)
        if info is not None:
            self._sessions.move_to_end(session_id)
            return info
        rows = await self.store.query("SELECT * FROM sessions WHERE session_id=?", (session_id,))
        if not rows:
            return None
        # Another task may have cached (and updated) it while we read: that copy wins.
        cached = self._sessions.get(session_id)
        return cached if cached is not None else self._cache_session(_session_from_row(rows[0]))

    async def list_sessions(self, agent_id: str | None, limit: int) -> list[SessionRecord]:
        """Sessions, most recently used first (optionally one agent's)."""
        where, params = ("WHERE agent_id=? ", (agent_id, limit)) if agent_id else ("", (limit,))
        rows = await self.store.query(
            f"SELECT * FROM sessions {where}ORDER BY last_used_at DESC, rowid DESC LIMIT ?", params
        )
        # Cached objects match their rows: every write was queued ahead of this query.
        return [self._sessions.get(row["session_id"]) or _session_from_row(row) for row in rows]

    async def forget_sessions(self, busy: set[str], cutoff: float) -> tuple[int, int]:
        """Delete the records of sessions last used before ``cutoff`` (epoch seconds) that
        are not ``busy`` (CLEANUP sessions); (how many went, how many busy ones stayed)."""
        rows = await self.store.query(
            "SELECT session_id FROM sessions WHERE last_used_at <= ?", (cutoff,)
        )
        ids = [row["session_id"] for row in rows]
        gone = [(sid,) for sid in ids if sid not in busy]
        if gone:
            await self.store.call(
                lambda c: c.executemany("DELETE FROM sessions WHERE session_id=?", gone),
                write=True,
            )
        for (sid,) in gone:
            self._sessions.pop(sid, None)
        self.session_count = max(0, self.session_count - len(gone))
        return len(gone), len(ids) - len(gone)

    async def latest_sessions(self) -> dict[str, str]:
        """Each agent's most recently used session (as ``list_sessions(agent, 1)`` picks
        it), in one query."""
        rows = await self.store.query(
            "SELECT agent_id, session_id FROM (SELECT agent_id, session_id, ROW_NUMBER() OVER "
            "(PARTITION BY agent_id ORDER BY last_used_at DESC, rowid DESC) AS n FROM sessions "
            "WHERE agent_id IS NOT NULL) WHERE n = 1"
        )
        return {row["agent_id"]: row["session_id"] for row in rows}

    def _cache_session(self, info: SessionRecord) -> SessionRecord:
        self._sessions[info.session_id] = info
        self._sessions.move_to_end(info.session_id)
        while len(self._sessions) > self.CACHED_SESSIONS:
            self._sessions.popitem(last=False)
        return info

    async def record_turn(
        self,
        session_id: str,
        *,
        cwd: str,
        model: str | None,
        agent_id: str | None,
        cost_usd: float,
        process_id: str,
        log_path: str | None,
        completed: bool,
        new_session: bool = False,
    ) -> SessionRecord:
        """Note one finished turn (successful or not) of a session: it now exists for resume.

        ``new_session`` (a session id the daemon just made) skips looking for a row. The
        write is queued, not awaited: every later read goes through the same ordered queue,
        so the daemon sees it at once, and a reply need not wait for this bookkeeping commit
        (the turn itself is already in the CLI's session store and the JSONL log).
        """
        info = None if new_session else await self.session(session_id)
        now = time.time()
        if info is None:
            info = SessionRecord(
                session_id=session_id,
                cwd=cwd,
                created_at=iso_from_epoch(now),
                last_used_at=iso_from_epoch(now),
            )
            self.session_count += 1
        info.model = model or info.model
        info.agent_id = agent_id or info.agent_id
        info.last_used_at = iso_from_epoch(now)
        info.turns += 1 if completed else 0
        info.total_cost_usd = round(info.total_cost_usd + cost_usd, 10)
        info.last_process_id = process_id
        info.log_path = log_path or info.log_path
        self.store.write_nowait(
            "INSERT INTO sessions(session_id, cwd, model, agent_id, created_at, last_used_at, "
            "turns, total_cost_usd, last_process_id, log_path) VALUES(?,?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT(session_id) DO UPDATE SET model=excluded.model, "
            "agent_id=excluded.agent_id, last_used_at=excluded.last_used_at, "
            "turns=excluded.turns, total_cost_usd=excluded.total_cost_usd, "
            "last_process_id=excluded.last_process_id, log_path=excluded.log_path",
            (
                session_id,
                info.cwd,
                info.model,
                info.agent_id,
                now,
                now,
                info.turns,
                info.total_cost_usd,
                process_id,
                info.log_path,
            ),
        )
        self._cache_session(info)
        if agent_id and (completed or cost_usd):
            n, c = self._agent_costs.get(agent_id, (0, 0.0))
            self._agent_costs[agent_id] = (n + int(completed), c + cost_usd)
        return info

    # -- processes --------------------------------------------------------------------

    def note_process(self, info: TurnRecord) -> None:
        """Keep a process record in memory only (a transition not worth a disk write)."""
        self.processes[info.process_id] = info
        self.processes.move_to_end(info.process_id)
        while len(self.processes) > self.RECENT_PROCESSES:
            oldest = next(iter(self.processes))
            if self.processes[oldest].status not in FINAL_STATUSES:
                break  # never forget a live process
            self.processes.popitem(last=False)

    async def save_process(self, info: TurnRecord, *, wait: bool = True) -> None:
        """Upsert a process record; ``wait=False`` for transitions nobody is waiting on."""
        if wait:
            await self.store.write(*self._process_upsert(info))
        else:
            self.queue_process(info)

    def queue_process(self, info: TurnRecord) -> None:
        """Upsert a process record behind earlier writes, without waiting for the commit."""
        self.store.write_nowait(*self._process_upsert(info))

    def _process_upsert(self, info: TurnRecord) -> tuple[str, tuple[Any, ...]]:
        self.note_process(info)
        error_code = info.error.get("code") if info.error else None
        sql = (
            "INSERT INTO processes(process_id, status, mode, session_id, agent_id, model, "
            "client_request_id, prompt_preview, created_at, started_at, finished_at, cost_usd, "
            "error_code, record) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT(process_id) DO UPDATE SET status=excluded.status, "
            "session_id=excluded.session_id, started_at=excluded.started_at, "
            "finished_at=excluded.finished_at, cost_usd=excluded.cost_usd, "
            "error_code=excluded.error_code, record=excluded.record"
        )
        params = (
            info.process_id,
            info.status,
            info.mode,
            info.session_id,
            info.agent_id,
            info.model,
            info.client_request_id,
            info.prompt_preview,
            _epoch(info.created_at),
            _epoch(info.started_at),
            _epoch(info.finished_at),
            info.cost_usd,
            error_code,
            _PROCESS_JSON.dump_json(info),
        )
        return sql, params


def _session_from_row(row: Any) -> SessionRecord:
    return SessionRecord(
        session_id=row["session_id"],
        cwd=row["cwd"],
        model=row["model"],
        agent_id=row["agent_id"],
        created_at=iso_from_epoch(row["created_at"]),
        last_used_at=iso_from_epoch(row["last_used_at"]),
        turns=row["turns"],
        total_cost_usd=row["total_cost_usd"],
        last_process_id=row["last_process_id"],
        log_path=row["log_path"],
    )


def _epoch(iso: str | None) -> float | None:
    if iso is None:
        return None
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
