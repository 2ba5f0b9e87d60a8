"""Paused agents and sessions: their queued turns wait until RESUME_AGENT / RESUME_SESSION.

A pause is kept in SQLite (``pauses``), so it holds across a restart: async turns an earlier
run accepted are queued again at start and wait here like the others. A turn checks before
it takes its session and again before it takes a concurrency slot (a pause may come while
it waits for the turn ahead of it); a waiting turn is ``paused`` in GET_PROCESSES and holds
no slot. A resume wakes the waiters in the order they began to wait; turns of one session
then run in their order as always (the session is held one turn at a time).
"""

from __future__ import annotations

import asyncio
import time

from daemon.protocol import iso_from_epoch
from daemon.state.db import Store
from daemon.turns.limits import Scope


class Pauses:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._paused: dict[tuple[Scope, str], float] = {}
        self._resumed = asyncio.Event()  # replaced at each resume: set wakes every waiter

    async def load(self) -> None:
        for row in await self.store.query("SELECT scope, key, paused_at FROM pauses"):
            self._paused[(row["scope"], row["key"])] = row["paused_at"]

    def blocks(self, session_id: str, agent_id: str | None) -> bool:
        return ("session", session_id) in self._paused or (
            agent_id is not None and ("agent", agent_id) in self._paused
        )

    async def wait(self, session_id: str, agent_id: str | None) -> None:
        while self.blocks(session_id, agent_id):
            await self._resumed.wait()

    async def pause(self, scope: Scope, key: str) -> bool:
        """True if it was not paused before; the reply waits for the commit."""
        if (scope, key) in self._paused:
            return False
        at = time.time()
        await self.store.write(
            "INSERT OR REPLACE INTO pauses(scope, key, paused_at) VALUES(?,?,?)", (scope, key, at)
        )
        self._paused[(scope, key)] = at
        return True

    async def resume(self, scope: Scope, key: str) -> bool:
        """True if it was paused."""
        if (scope, key) not in self._paused:
            return False
        await self.store.write("DELETE FROM pauses WHERE scope=? AND key=?", (scope, key))
        del self._paused[(scope, key)]
        self._resumed.set()
        self._resumed = asyncio.Event()
        return True

    def listing(self) -> list[dict[str, str]]:
        return [
            {"scope": scope, "id": key, "paused_at": iso_from_epoch(at)}
            for (scope, key), at in self._paused.items()
        ]
