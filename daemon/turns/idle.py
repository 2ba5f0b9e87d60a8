"""Conversations that await input: a session between its turns, and when nobody comes back.

A session with a queued or running turn is ``running``. Once its last turn has ended it is
``awaiting_input`` until ``idle_expires_at`` (its last use plus its idle timeout: the
SPAWN's ``idle_timeout_s``, kept for the session, else ``session_idle_s``, 660 s as in the
seed's human-in-the-loop template). Then the daemon ends its warm CLI, if it still has one,
and publishes ``SESSION_IDLE_EXPIRED``; the session is ``expired`` but not gone: a later
SPAWN resumes it (cold, from the CLI's session file).

The state is derived from the session's record when asked (GET_SESSION/GET_SESSIONS), so it
is right after a restart too; the timers that publish the event are re-armed at start for
the sessions whose expiry is still ahead.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Literal

import structlog

from daemon.claude.engine import ClaudeEngine
from daemon.events.bus import EventBus
from daemon.protocol import iso_from_epoch
from daemon.state.db import Store
from daemon.turns.limits import Limits

log = structlog.get_logger("ksi.turns")

SessionState = Literal["running", "awaiting_input", "expired"]


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


class IdleWatch:
    def __init__(self, bus: EventBus, engine: ClaudeEngine, limits: Limits, default_s: float):
        self.bus = bus
        self.engine = engine
        self.limits = limits
        self.default_s = default_s
        self.expired = 0  # SESSION_IDLE_EXPIRED events since start
        self._live: dict[str, set[str]] = {}  # session -> its queued or running turns
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def timeout_for(self, session_id: str) -> float:
        own = self.limits.get("session", session_id).idle_timeout_s
        return own if own is not None else self.default_s

    # -- turns come and go --------------------------------------------------------------

    def turn_began(self, session_id: str, process_id: str) -> None:
        """A turn of the session is queued or running: it is not waiting for anyone."""
        self._live.setdefault(session_id, set()).add(process_id)
        timer = self._timers.pop(session_id, None)
        if timer is not None:
            timer.cancel()

    def turn_ended(
        self, session_id: str, process_id: str, agent_id: str | None, *, exists: bool
    ) -> None:
        """The turn is over (``exists``: its session is known, so it now awaits input)."""
        live = self._live.get(session_id)
        if live is None or process_id not in live:
            return
        live.discard(process_id)
        if live:
            return
        del self._live[session_id]
        if exists:
            self._arm(session_id, agent_id, time.time() + self.timeout_for(session_id))

    def _arm(self, session_id: str, agent_id: str | None, at: float) -> None:
        old = self._timers.pop(session_id, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._timers[session_id] = loop.call_at(
            loop.time() + max(0.0, at - time.time()), self._expire, session_id, agent_id, at
        )

    def _expire(self, session_id: str, agent_id: str | None, at: float) -> None:
        self._timers.pop(session_id, None)
        released = self.engine.release_warm(session_id, "session idle")
        self.expired += 1
        log.info("session.idle_expired", session_id=session_id, warm_released=released)
        self.bus.publish(
            "SESSION_IDLE_EXPIRED",
            {
                "session_id": session_id,
                "agent_id": agent_id,
                "idle_timeout_s": self.timeout_for(session_id),
                "idle_expires_at": iso_from_epoch(at),
                "warm_released": released,
            },
        )

    # -- what clients see ---------------------------------------------------------------

    def state_of(self, session_id: str, last_used_at: str) -> tuple[SessionState, str | None]:
        """The session's state and, between turns, when it stops awaiting input."""
        if self._live.get(session_id):
            return "running", None
        at = _epoch(last_used_at) + self.timeout_for(session_id)
        return ("awaiting_input" if at > time.time() else "expired"), iso_from_epoch(at)

    # -- start and stop -----------------------------------------------------------------

    async def load(self, store: Store) -> None:
        """Re-arm the expiry of the sessions an earlier run left awaiting input."""
        longest = max([self.default_s, *self.limits.idle_timeouts().values()])
        now = time.time()
        rows = await store.query(
            "SELECT session_id, agent_id, last_used_at FROM sessions WHERE last_used_at > ?",
            (now - longest,),
        )
        for row in rows:
            sid = row["session_id"]
            at = row["last_used_at"] + self.timeout_for(sid)
            if at > now and not self._live.get(sid):
                self._arm(sid, row["agent_id"], at)

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
