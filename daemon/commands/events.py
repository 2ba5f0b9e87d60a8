"""The message bus over the socket: subscribe, publish, read the recent history."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from daemon.commands.registry import Context, Params, Registry, Result
from daemon.errors import InvalidParameters

_PATTERN = re.compile(r"^[A-Za-z0-9_.:*?\[\]-]{1,128}$")
_TYPE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
# Only the daemon announces these: a client must not be able to fake a finished turn.
RESERVED_PREFIXES = (
    "PROCESS_",
    "SUBSCRIBER_",
    "SHARED_STATE_",
    "AGENT_REGISTERED",
    "AGENT_UNREGISTERED",
    "OBSERVER_",
    "CONVERSATION_ENDED",
    "AGENT_REPLY_FAILED",
    "AGENT_REPLY",
)


def _check_patterns(values: list[str]) -> list[str]:
    for v in values:
        if not _PATTERN.match(v):
            raise ValueError(f"{v!r} is not an event type or glob pattern")
    return values


class SubscribeParams(Params):
    event_types: list[str] = Field(min_length=1, description="names or globs, e.g. PROCESS_*")
    agent_id: str | None = Field(default=None, min_length=1, max_length=256)
    since_seq: int | None = Field(
        default=None,
        ge=0,
        strict=True,
        description="first send every matching event after this seq from the history "
        "(EVENTS_GAP first if it no longer reaches back that far), then live events: no gap, "
        "no duplicate. Only on a connection's first SUBSCRIBE.",
    )

    @field_validator("event_types")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        return _check_patterns(v)


class SubscribeResult(Result):
    status: Literal["active"]
    subscribed_to: list[str]
    agent_id: str | None = None
    last_seq: int = Field(
        description="seq of the newest event so far; later ones are pushed "
        "(with since_seq, those after since_seq up to this are replayed)"
    )


class UnsubscribeParams(Params):
    event_types: list[str] | None = Field(default=None, description="omit to drop all")


class UnsubscribeResult(Result):
    subscribed_to: list[str]


class PublishParams(Params):
    event_type: str = Field(min_length=1, max_length=128)
    payload: dict[str, Any] = Field(default_factory=dict)
    from_agent: str | None = None
    to_agent: str | None = Field(
        default=None, description="deliver only to this agent's subscriptions (and to observers)"
    )

    @field_validator("event_type")
    @classmethod
    def _type(cls, v: str) -> str:
        if not _TYPE.match(v):
            raise ValueError("letters, digits and _ . : - only")
        return v

    @model_validator(mode="after")
    def _direct_message(self) -> PublishParams:
        """KSI names a DIRECT_MESSAGE's recipient in ``payload.to``; the limits a first
        message may set for its conversation (daemon/agents) must be usable."""
        if self.event_type not in ("DIRECT_MESSAGE", "TASK_ASSIGNMENT"):
            return self
        to = self.payload.get("to")
        if self.to_agent is None and isinstance(to, str) and to:
            self.to_agent = to
        if self.to_agent is None:  # KSI refused these too
            raise ValueError(
                f"a {self.event_type} needs its recipient: to_agent, or payload.to"
                + (" (ROUTE_TASK picks one by capability)" if "TASK" in self.event_type else "")
            )
        turns = self.payload.get("max_turns")
        if turns is not None and (type(turns) is not int or not 1 <= turns <= 10_000):
            raise ValueError("payload.max_turns must be an integer from 1 to 10000")
        cost = self.payload.get("max_cost_usd")
        if cost is not None and (type(cost) not in (int, float) or not 0 < cost <= 1e6):
            raise ValueError("payload.max_cost_usd must be a positive number of dollars")
        return self


class PublishResult(Result):
    status: Literal["published"]
    event_type: str
    seq: int
    delivered_to: int


class GetEventsParams(Params):
    event_types: list[str] | None = None
    since_seq: int = Field(default=0, ge=0)
    limit: int = Field(default=100, ge=1, le=10_000)

    @field_validator("event_types")
    @classmethod
    def _patterns(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else _check_patterns(v)


class GetEventsResult(Result):
    events: list[dict[str, Any]]
    last_seq: int


def register(r: Registry) -> None:
    @r.command("SUBSCRIBE", params=SubscribeParams, result=SubscribeResult)
    def subscribe(ctx: Context, p: SubscribeParams) -> SubscribeResult:
        """Receive matching events on this connection (which becomes persistent). Patterns
        may be globs (``PROCESS_*``, ``*``). With ``since_seq``, the events after it are
        replayed from the history first. A subscriber that falls more than the queue limit
        (events or bytes) behind gets SUBSCRIBER_DROPPED (with ``last_seq``, to resubscribe
        with ``since_seq``) and is disconnected. ``agent_id`` must be this connection's own
        agent (CONNECT / AGENT_CONNECTION connect with it, or an earlier SUBSCRIBE); a
        connection without one is bound to it if that agent is registered (REGISTER_AGENT)
        or connected on another connection. Otherwise AGENT_NOT_CONNECTED, as in KSI."""
        if ctx.conn is None:
            raise InvalidParameters(
                "SUBSCRIBE needs a socket connection; observers get all events already"
            )
        sub = ctx.conn.subscribe(p.event_types, p.agent_id, p.since_seq)
        return SubscribeResult(
            status="active",
            subscribed_to=sorted(sub.patterns.items),
            agent_id=sub.agent_id,
            last_seq=ctx.services.bus.seq,
        )

    @r.command("UNSUBSCRIBE", params=UnsubscribeParams, result=UnsubscribeResult)
    def unsubscribe(ctx: Context, p: UnsubscribeParams) -> UnsubscribeResult:
        """Stop receiving some (or, without ``event_types``, all) events."""
        if ctx.conn is None:
            raise InvalidParameters("UNSUBSCRIBE needs a socket connection")
        return UnsubscribeResult(subscribed_to=ctx.conn.unsubscribe(p.event_types))

    @r.command("PUBLISH", params=PublishParams, result=PublishResult)
    async def publish(ctx: Context, p: PublishParams) -> PublishResult:
        """Publish an event to every matching subscriber and observer. An event whose wire
        line exceeds ``max_event_bytes`` (1 MiB) is refused with PAYLOAD_TOO_LARGE."""
        if p.event_type.startswith(RESERVED_PREFIXES):
            raise InvalidParameters(
                f"event type {p.event_type!r} is reserved for the daemon",
                details={"reserved_prefixes": list(RESERVED_PREFIXES)},
            )
        # The event's history row is written without waiting: while the store is failing or
        # behind, say so (STORAGE_*) instead of answering "published" for an event that
        # GET_EVENTS and SUBSCRIBE since_seq would then never replay.
        await ctx.services.store.wait_writable()
        ev = ctx.publish(
            p.event_type,
            p.payload,
            from_agent=p.from_agent,
            to_agent=p.to_agent,
            max_bytes=ctx.services.settings.max_event_bytes,
        )
        return PublishResult(
            status="published", event_type=ev.event_type, seq=ev.seq, delivered_to=ev.delivered
        )

    @r.command("GET_EVENTS", params=GetEventsParams, result=GetEventsResult)
    async def get_events(ctx: Context, p: GetEventsParams) -> GetEventsResult:
        """Recent events (persisted across restarts), optionally filtered by type patterns
        and newer than ``since_seq``. Without ``since_seq`` the newest ``limit`` are
        returned; with it, the oldest ``limit`` after it (page forward with last_seq)."""
        events = await ctx.services.bus.query(p.event_types, p.since_seq, p.limit)
        last = events[-1].seq if events else p.since_seq
        return GetEventsResult(events=[e.to_dict() for e in events], last_seq=last)
