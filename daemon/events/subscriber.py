"""An event, as published and as the history keeps it, and a subscriber's bounded inbox.

The bus (``daemon/events/bus.py``) numbers, stores and fans out events; what one consumer
(a socket connection, ``daemon/server/subscriptions.py``, or an observer,
``daemon/events/observers.py``) wants and holds is decided here: its patterns
(:class:`Patterns`) and its inbox (:class:`Subscriber`), bounded in events and in bytes.
"""

from __future__ import annotations

import asyncio
import fnmatch
import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import orjson

OverflowPolicy = Literal["disconnect", "drop"]

# A subscriber's inbox in bytes, unless it is given another bound (observers use this).
QUEUE_BYTES = 16 * 1024 * 1024


@dataclass(slots=True)
class Event:
    seq: int
    event_type: str
    data: dict[str, Any]
    timestamp: str
    from_agent: str | None = None
    to_agent: str | None = None
    wire: bytes = b""
    delivered: int = 0
    parent_process_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "event": self.event_type,
            "data": self.data,
            "seq": self.seq,
            "timestamp": self.timestamp,
        }
        if self.from_agent is not None:
            out["from_agent"] = self.from_agent
        if self.to_agent is not None:
            out["to_agent"] = self.to_agent
        if self.parent_process_id is not None:
            out["parent_process_id"] = self.parent_process_id
        return out

    def stored(self) -> StoredEvent:
        return StoredEvent(
            self.seq,
            self.event_type,
            self.timestamp,
            self.from_agent,
            self.to_agent,
            exact_copy(self.wire),
        )


def exact_copy(data: bytes) -> bytes:
    """A copy without the spare capacity orjson leaves in its output."""
    return bytes(memoryview(data))


@dataclass(slots=True)
class StoredEvent:
    """An event as the history keeps it: the wire line, and what queries filter on.

    ``data`` and :meth:`to_dict` decode the payload from ``wire`` when asked (GET_EVENTS).
    """

    seq: int
    event_type: str
    timestamp: str
    from_agent: str | None
    to_agent: str | None
    wire: bytes

    @property
    def data(self) -> dict[str, Any]:
        data: dict[str, Any] = orjson.loads(self.wire)["data"]
        return data

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = orjson.loads(self.wire)  # all of it: see encode_event
        return out


class Patterns:
    """A set of event-type patterns: exact names, or globs such as ``PROCESS_*`` and ``*``."""

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self.items: set[str] = set()
        self._exact: set[str] = set()
        self._regex: re.Pattern[str] | None = None
        self.update(add=patterns)

    def update(self, *, add: Iterable[str] = (), remove: Iterable[str] = ()) -> None:
        self.items.update(add)
        self.items.difference_update(remove)
        self._exact = {p for p in self.items if not _is_glob(p)}
        globs = [fnmatch.translate(p) for p in self.items if _is_glob(p)]
        self._regex = re.compile("|".join(globs)) if globs else None

    def match(self, event_type: str) -> bool:
        if event_type in self._exact:
            return True
        return self._regex is not None and self._regex.match(event_type) is not None

    def __bool__(self) -> bool:
        return bool(self.items)


def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


class Subscriber:
    """A bounded inbox of the events that match its patterns."""

    def __init__(
        self,
        name: str,
        patterns: Iterable[str] = (),
        *,
        maxsize: int,
        max_bytes: int = QUEUE_BYTES,
        agent_id: str | None = None,
        policy: OverflowPolicy = "disconnect",
        sees_directed: bool = False,
    ) -> None:
        self.name = name
        self.patterns = Patterns(patterns)
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self.queued_bytes = 0  # wire bytes in the inbox
        self.agent_id = agent_id
        self.policy = policy
        # Observers see directed events too; socket subscribers only those sent to them.
        self.sees_directed = sees_directed
        self.inbox: deque[Event] = deque()
        self.dropped = False  # disconnected for being too slow
        self.lost = 0  # events lost under policy "drop"
        self.last_seq = 0  # last seq handed to the consumer
        # Called once when the bus drops this subscriber (policy "disconnect").
        self.on_drop: Callable[[], None] | None = None
        self._wakeup = asyncio.Event()

    def wants(self, event: Event | StoredEvent) -> bool:
        if (
            event.to_agent is not None
            and not self.sees_directed
            and (self.agent_id != event.to_agent)
        ):
            return False
        return self.patterns.match(event.event_type)

    def offer(self, event: Event) -> bool:
        """Queue an event; False if the inbox is full, in events or bytes (the bus then
        applies the policy). An empty inbox takes an event of any size: one that keeps up
        gets every event."""
        size = len(event.wire)
        if len(self.inbox) >= self.maxsize or (
            self.queued_bytes + size > self.max_bytes and self.inbox
        ):
            return False
        self.inbox.append(event)
        self.queued_bytes += size
        self._wakeup.set()
        return True

    def wake(self) -> None:
        self._wakeup.set()

    async def next_batch(self) -> list[Event]:
        """Wait for events and take all that are queued (empty once dropped)."""
        while not self.inbox and not self.dropped:
            self._wakeup.clear()
            await self._wakeup.wait()
        batch = list(self.inbox)
        self.inbox.clear()
        self.queued_bytes = 0
        if batch:
            self.last_seq = batch[-1].seq
        return batch
