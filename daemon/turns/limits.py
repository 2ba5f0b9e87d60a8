"""Budgets and iteration caps: what turns may spend, and how many turns a session may run.

Three budget levels meet in one number per turn:

* a SPAWN's own ``max_cost_usd`` (this turn),
* a session's budget and an agent's budget (SET_BUDGET; kept in SQLite ``limits``),
  against what its turns have spent so far (the CLI's reported ``total_cost_usd``,
  persisted with each turn).

Before a turn starts (at SPAWN, and again when it leaves the queue, since turns ahead of it
spend too) :meth:`Limits.admit` refuses it with ``BUDGET_EXCEEDED`` if a session or agent
budget is used up, or with ``SESSION_LIMIT_REACHED`` if the session has run its
``max_iterations`` turns; each refusal is also an event of the same name. Otherwise it
returns the smallest remaining amount, which the turn passes to the CLI as
``--max-budget-usd``: the CLI checks it after every model call, so a turn that crosses its
budget mid-run stops at the next call boundary (a tool it already asked for is not run),
fails with ``BUDGET_EXCEEDED`` and the spend is recorded (measured with 2.1.197: a resumed
CLI counts from 0, so the remaining amount is the right flag value; a long-lived one counts
all its turns, which is why a turn with a budget runs cold: ClaudeEngine._backend_for).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import structlog
from pydantic import BaseModel, Field

from daemon.errors import Conflict, ErrorCode, TurnFailed
from daemon.events.bus import EventBus
from daemon.state.db import Store
from daemon.state.records import StateManager

log = structlog.get_logger("ksi.turns")

Scope = Literal["session", "agent"]
# Spend is compared with a little slack: costs are sums of floats.
_EPSILON = 1e-9


@dataclass
class Limit:
    max_cost_usd: float | None = None
    max_iterations: int | None = None
    idle_timeout_s: float | None = None  # sessions: daemon/turns/idle.py


class BudgetInfo(BaseModel):
    """One session's or agent's limits and what it has used of them."""

    scope: Scope
    id: str
    max_cost_usd: float | None = None
    spent_usd: float = 0.0
    remaining_usd: float | None = Field(default=None, description="null: no budget")
    max_iterations: int | None = Field(default=None, description="sessions only")
    turns: int | None = Field(default=None, description="sessions: turns completed so far")


@dataclass
class Admission:
    """What :meth:`Limits.admit` lets a turn spend: ``max_cost_usd`` (None: no limit) and
    which budget that amount comes from (``turn``, ``session`` or ``agent``)."""

    max_cost_usd: float | None = None
    scope: str | None = None


class Limits:
    def __init__(
        self, store: Store, state: StateManager, bus: EventBus, default_max_iterations: int | None
    ) -> None:
        self.store = store
        self.state = state
        self.bus = bus
        self.default_max_iterations = default_max_iterations
        self._limits: dict[tuple[Scope, str], Limit] = {}

    async def load(self) -> None:
        for row in await self.store.query("SELECT * FROM limits"):
            self._limits[(row["scope"], row["key"])] = Limit(
                row["max_cost_usd"], row["max_iterations"], row["idle_timeout_s"]
            )

    def get(self, scope: Scope, key: str) -> Limit:
        return self._limits.get((scope, key)) or Limit()

    async def set(self, scope: Scope, key: str, changes: dict[str, Any]) -> Limit:
        """Change the given fields (None removes that limit); the reply waits for the commit."""
        limit = Limit(**{**vars(self.get(scope, key)), **changes})
        if limit == Limit():
            await self.store.write("DELETE FROM limits WHERE scope=? AND key=?", (scope, key))
            self._limits.pop((scope, key), None)
            return limit
        await self.store.write(
            "INSERT INTO limits(scope, key, max_cost_usd, max_iterations, idle_timeout_s, "
            "updated_at) VALUES(?,?,?,?,?,?) ON CONFLICT(scope, key) DO UPDATE SET "
            "max_cost_usd=excluded.max_cost_usd, max_iterations=excluded.max_iterations, "
            "idle_timeout_s=excluded.idle_timeout_s, updated_at=excluded.updated_at",
            (
                scope,
                key,
                limit.max_cost_usd,
                limit.max_iterations,
                limit.idle_timeout_s,
                time.time(),
            ),
        )
        self._limits[(scope, key)] = limit
        return limit

    async def info(self, scope: Scope, key: str) -> BudgetInfo:
        limit = self.get(scope, key)
        turns: int | None = None
        if scope == "session":
            session = await self.state.session(key)
            spent = session.total_cost_usd if session else 0.0
            turns = session.turns if session else 0
            iterations = self._iterations(key)
        else:
            spent, iterations = self.state.agent_spend(key), None
        remaining = None
        if limit.max_cost_usd is not None:
            remaining = round(max(0.0, limit.max_cost_usd - spent), 10)
        return BudgetInfo(
            scope=scope,
            id=key,
            max_cost_usd=limit.max_cost_usd,
            spent_usd=round(spent, 10),
            remaining_usd=remaining,
            max_iterations=iterations,
            turns=turns,
        )

    def known(self) -> list[tuple[Scope, str]]:
        """The sessions and agents with a budget or a turn cap."""
        return [
            k
            for k, v in self._limits.items()
            if v.max_cost_usd is not None or v.max_iterations is not None
        ]

    def idle_timeouts(self) -> dict[str, float]:
        """Sessions with an idle timeout of their own."""
        return {
            key: v.idle_timeout_s
            for (scope, key), v in self._limits.items()
            if scope == "session" and v.idle_timeout_s is not None
        }

    def _iterations(self, session_id: str) -> int | None:
        own = self.get("session", session_id).max_iterations
        return own if own is not None else self.default_max_iterations

    async def admit(
        self,
        *,
        session_id: str,
        agent_id: str | None,
        turn_budget: float | None,
        process_id: str | None = None,
    ) -> Admission:
        """May a turn of this session (and agent) start? Raises the typed refusal (and
        publishes it); else returns what the turn may spend."""
        ids = {"process_id": process_id, "session_id": session_id, "agent_id": agent_id}
        admission = Admission(turn_budget, "turn" if turn_budget is not None else None)
        session = await self.state.session(session_id)
        cap = self._iterations(session_id)
        if cap is not None and session is not None and session.turns >= cap:
            self.bus.publish(
                "SESSION_LIMIT_REACHED", {**ids, "max_iterations": cap, "turns": session.turns}
            )
            raise Conflict(
                f"session {session_id} has run its {cap} turns (max_iterations)",
                code=ErrorCode.SESSION_LIMIT_REACHED,
                details={"max_iterations": cap, "turns": session.turns},
            )
        spent_by: list[tuple[Scope, str, float]] = [
            ("session", session_id, session.total_cost_usd if session else 0.0)
        ]
        if agent_id is not None:
            spent_by.append(("agent", agent_id, self.state.agent_spend(agent_id)))
        for scope, key, spent in spent_by:
            budget = self.get(scope, key).max_cost_usd
            if budget is None:
                continue
            remaining = budget - spent
            if remaining <= _EPSILON:
                details = {"scope": scope, "id": key, "max_cost_usd": budget, "spent_usd": spent}
                self.bus.publish("BUDGET_EXCEEDED", {**ids, **details, "when": "before_start"})
                raise Conflict(
                    f"the {scope}'s budget is spent (${spent:.6f} of ${budget:.6f}); "
                    "raise it with SET_BUDGET",
                    code=ErrorCode.BUDGET_EXCEEDED,
                    details=details,
                )
            if admission.max_cost_usd is None or remaining < admission.max_cost_usd:
                admission = Admission(round(remaining, 10), scope)
        return admission

    def crossed(
        self,
        failed: TurnFailed,
        *,
        process_id: str,
        session_id: str,
        agent_id: str | None,
        scope: str | None,
    ) -> None:
        """A turn stopped mid-run by its budget (the CLI's error_max_budget_usd)."""
        raw = (failed.details or {}).get("raw") or {}
        self.bus.publish(
            "BUDGET_EXCEEDED",
            {
                "process_id": process_id,
                "session_id": session_id,
                "agent_id": agent_id,
                "scope": scope,
                "id": {"session": session_id, "agent": agent_id}.get(scope or ""),
                "spent_usd": raw.get("total_cost_usd"),
                "when": "mid_turn",
            },
        )
        log.info("turn.budget_exceeded", process_id=process_id, scope=scope)
