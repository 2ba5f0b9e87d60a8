"""A session's two engine policies: one turn at a time, and the directory it lives in.

Two concurrent ``--resume`` runs of one session both succeed but fork its history silently
(measured with 2.1.197), so turns of one session hold it (:class:`SessionHolds`) while they
run. Resume is scoped to the cwd a session began in, so the engine asks a
:class:`SessionDirectory` where that was (the daemon's SQLite records, or
:class:`RememberedCwds` in memory).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol

# The sessions the current context holds: their turns do not wait on their own hold again.
_HELD_SESSIONS: ContextVar[frozenset[str]] = ContextVar("ksi_held_sessions", default=frozenset())

_MAX_REMEMBERED_SESSIONS = 10_000


class SessionDirectory(Protocol):
    """Where the engine finds the directory a session began in (its cwd pin)."""

    async def cwd_of(self, session_id: str) -> str | None:
        """The session's cwd, or None if it is not known here."""
        ...

    def started(self, session_id: str, cwd: str) -> None:
        """A CLI of the session has started in ``cwd``."""
        ...


class RememberedCwds:
    """The default :class:`SessionDirectory`: the sessions this engine ran, in memory (LRU)."""

    def __init__(self, limit: int = _MAX_REMEMBERED_SESSIONS) -> None:
        self._cwds: OrderedDict[str, str] = OrderedDict()
        self._limit = limit

    async def cwd_of(self, session_id: str) -> str | None:
        return self._cwds.get(session_id)

    def started(self, session_id: str, cwd: str) -> None:
        self._cwds[session_id] = cwd
        self._cwds.move_to_end(session_id)
        while len(self._cwds) > self._limit:
            self._cwds.popitem(last=False)


@dataclass
class _SessionSlot:
    """A FIFO lock with a front door: the holder hands the session straight to the next
    waiter, and a waiter marked ``first`` (a turn that steers the session) goes ahead of
    the others."""

    busy: bool = False
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)
    users: int = 0

    async def acquire(self, first: bool) -> None:
        if not self.busy and not self.waiters:
            self.busy = True
            return
        waiter = asyncio.get_running_loop().create_future()
        if first:
            self.waiters.appendleft(waiter)
        else:
            self.waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed over just as we were cancelled: pass it on
            else:
                self.waiters.remove(waiter)
            raise

    def release(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the session passes on; it stays busy
                return
        self.busy = False


class SessionHolds:
    """Per-session locks that exist only while some turn of the session uses them."""

    def __init__(self) -> None:
        self._slots: dict[str, _SessionSlot] = {}

    @property
    def active(self) -> int:
        """Sessions with a turn running or waiting."""
        return len(self._slots)

    @asynccontextmanager
    async def hold(self, session_id: str, first: bool = False) -> AsyncIterator[None]:
        """Keep the session to this context: other turns of it wait until the block ends
        (in order; ``first`` goes ahead of those waiting); turns run inside it (in this
        task, or tasks it starts) do not."""
        held = _HELD_SESSIONS.get()
        if session_id in held:
            yield
            return
        # Reference-counted, not "dropped when unlocked": right after a release the lock looks
        # free while a woken waiter has yet to take it, and a fresh lock for the same session
        # would let two of its turns run at once.
        slot = self._slots.setdefault(session_id, _SessionSlot())
        slot.users += 1
        try:
            await slot.acquire(first)
            try:
                _HELD_SESSIONS.set(held | {session_id})
                yield
            finally:
                # Not ContextVar.reset: a stream's steps may each run in another context
                # (the provider's sync streaming does), where the token is not valid.
                _HELD_SESSIONS.set(held)
                slot.release()
        finally:
            slot.users -= 1
            if slot.users == 0:
                self._slots.pop(session_id, None)
