"""The agents' mailboxes: answer queues and the offline queue (see the package docstring)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import structlog

from daemon.commands.registry import Context, Services
from daemon.errors import DaemonError, ErrorCode, NotFound, TurnFailed
from daemon.events.bus import EventBus
from daemon.events.subscriber import Event, Subscriber, exact_copy
from daemon.settings import Settings
from daemon.state.db import Store
from daemon.state.records import StateManager

log = structlog.get_logger("ksi.agents")

DIRECT_MESSAGE = "DIRECT_MESSAGE"
# The directed events an agent's mailbox holds: messages, and tasks ROUTE_TASK assigns.
KINDS = {DIRECT_MESSAGE: "direct message", "TASK_ASSIGNMENT": "task assignment"}
END_MARKERS = frozenset({"[END]", "[TERMINATE]"})
NO_RESPONSE = "[NO_RESPONSE]"
EndReason = Literal["end_marker", "turn_limit", "budget"]
_CONVERSATIONS_CACHED = 10_000
_WAIT_S = 3600.0  # one wait for a turn's outcome; waited again while it runs


@dataclass(slots=True)
class Letter:
    """A direct message the daemon holds for ``agent_id``: to answer, or to deliver."""

    id: int
    agent_id: str
    kind: Literal["answer", "offline"]
    seq: int
    wire: bytes  # the event as subscribers got it
    process_id: str | None = None  # the answering turn, once it was started

    def event(self) -> dict[str, Any]:
        ev: dict[str, Any] = orjson.loads(self.wire)
        return ev

    @property
    def event_type(self) -> str:
        return str(self.event().get("event", DIRECT_MESSAGE))


@dataclass(slots=True)
class Conversation:
    conversation_id: str
    max_turns: int
    max_cost_usd: float | None
    turns: int = 0
    cost_usd: float = 0.0
    ended: str | None = None

    def limit_reached(self) -> EndReason | None:
        if self.turns >= self.max_turns:
            return "turn_limit"
        if self.max_cost_usd is not None and self.cost_usd >= self.max_cost_usd:
            return "budget"
        return None


def ends_conversation(text: str) -> bool:
    """An answer whose last line is ``[END]`` or ``[TERMINATE]`` (KSI's markers)."""
    lines = text.strip().splitlines()
    if not lines:
        return False
    last = lines[-1].strip()
    return last in END_MARKERS or last.endswith("[END]")


def frame(agent_id: str, sender: str | None, content: str, conv: Conversation, kind: str) -> str:
    """The prompt of an answering turn: who wrote, in which conversation, and how to end it."""
    who = sender or "a program without an agent id"
    return (
        f"[KSI {KINDS.get(kind, 'direct message')} to you ({agent_id}) from {who}; conversation "
        f"{conv.conversation_id}, turn {conv.turns + 1} of at most {conv.max_turns}]\n\n"
        f"{content}\n\n"
        f"[Your answer is sent to {who} as a direct message. When the conversation is done, "
        f"make the last line of your answer [END]; answer only {NO_RESPONSE} to send nothing.]"
    )


class Mailboxes:
    def __init__(self, settings: Settings, store: Store, state: StateManager, bus: EventBus):
        self.settings = settings
        self.store = store
        self.state = state
        self.bus = bus
        self.services: Services | None = None  # bound once the daemon's services exist
        self.answering: dict[str, deque[Letter]] = {}
        self.offline: dict[str, list[Letter]] = {}
        self.conversations: OrderedDict[str, Conversation] = OrderedDict()
        self.answered = 0
        self.failed = 0
        self.delivered_offline = 0
        self._next_id = 1
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._tasks: asyncio.TaskGroup | None = None
        bus.on_directed = self.on_directed

    # -- start and stop ---------------------------------------------------------------

    async def load(self) -> None:
        rows = await self.store.query(
            "SELECT * FROM agent_messages WHERE status IN ('queued', 'running') ORDER BY id"
        )
        for row in rows:
            letter = Letter(
                row["id"], row["agent_id"], row["kind"], row["seq"], row["wire"], row["process_id"]
            )
            self._queue_of(letter).append(letter)
        (top,) = await self.store.query("SELECT MAX(id) AS n FROM agent_messages")
        self._next_id = (top["n"] or 0) + 1
        if rows:
            log.info("agents.messages_restored", count=len(rows))

    def start(self, services: Services, tasks: asyncio.TaskGroup) -> None:
        self.services = services
        self._tasks = tasks
        for agent_id in list(self.answering):
            self._wake(agent_id)

    async def stop(self) -> None:
        """Stop answering; a message whose turn runs stays ``running`` and is answered from
        that turn's outcome after the next start, not run again."""
        self._tasks = None
        workers = list(self._workers.values())
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        self._workers.clear()

    # -- arriving messages --------------------------------------------------------------

    def on_directed(self, ev: Event) -> None:
        """The bus published an event with ``to_agent`` (called before publish returns)."""
        to = ev.to_agent
        if ev.event_type not in KINDS or to is None or to == ev.from_agent:
            return
        agent = self.state.agents.get(to)
        if agent is not None and agent.respond_to_messages:
            self._keep(to, "answer", ev)
            self._wake(to)
        elif not self._receivable(ev):
            self._keep(to, "offline", ev)

    def _receivable(self, ev: Event) -> bool:
        return any(
            sub.agent_id == ev.to_agent and not sub.sees_directed and sub.wants(ev)
            for sub in self.bus.subscribers
            if not sub.dropped
        )

    def _keep(self, agent_id: str, kind: Literal["answer", "offline"], ev: Event) -> None:
        letter = Letter(self._next_id, agent_id, kind, ev.seq, exact_copy(ev.wire))
        self._next_id += 1
        self._queue_of(letter).append(letter)
        # Queued behind the event's own history row, in the same order.
        self.store.write_nowait(
            "INSERT INTO agent_messages(id, agent_id, kind, seq, status, wire, created_at) "
            "VALUES(?,?,?,?,?,?,?)",
            (letter.id, agent_id, kind, ev.seq, "queued", letter.wire, time.time()),
        )

    def _queue_of(self, letter: Letter) -> deque[Letter] | list[Letter]:
        if letter.kind == "answer":
            return self.answering.setdefault(letter.agent_id, deque())
        return self.offline.setdefault(letter.agent_id, [])

    def _move(self, letter: Letter, kind: Literal["answer", "offline"]) -> None:
        """Put ``letter`` in its agent's other queue (in memory and in its row)."""
        letter.kind = kind
        self._queue_of(letter).append(letter)
        self.store.write_nowait("UPDATE agent_messages SET kind=? WHERE id=?", (kind, letter.id))

    def _set(self, letter: Letter, status: str, **columns: Any) -> None:
        sets = ", ".join(f"{name}=?" for name in ("status", *columns))
        self.store.write_nowait(
            f"UPDATE agent_messages SET {sets} WHERE id=?", (status, *columns.values(), letter.id)
        )

    # -- the offline queue ---------------------------------------------------------------

    def on_subscribed(self, sub: Subscriber, since_seq: int | None) -> None:
        """A connection subscribes as ``sub.agent_id``: hand it the messages kept for it,
        oldest first (those a ``since_seq`` replay brings anyway are only marked delivered)."""
        agent_id = sub.agent_id
        if agent_id is None or sub.dropped or agent_id not in self.offline:
            return
        kept: list[Letter] = []
        later: list[Letter] = []
        for letter in self.offline.pop(agent_id):
            (kept if sub.patterns.match(letter.event_type) else later).append(letter)
        if later:  # kinds it does not subscribe to wait for a subscription that does
            self.offline[agent_id] = later
        for i, letter in enumerate(kept):
            if since_seq is None or letter.seq <= since_seq:
                ev = letter.event()
                event = Event(
                    letter.seq,
                    letter.event_type,
                    ev.get("data") or {},
                    ev.get("timestamp", ""),
                    ev.get("from_agent"),
                    agent_id,
                    letter.wire,
                )
                if not sub.offer(event):  # its inbox is full: keep the rest for next time
                    self.offline[agent_id] = kept[i:] + later
                    return
            self.delivered_offline += 1
            self._set(letter, "delivered")

    def on_registered(self, agent_id: str) -> None:
        """An agent (re)registered: if it now answers, its kept messages are its to answer."""
        agent = self.state.agents.get(agent_id)
        if agent is None or not agent.respond_to_messages or agent_id not in self.offline:
            return
        for letter in self.offline.pop(agent_id):
            self._move(letter, "answer")
        self._wake(agent_id)

    def queued_offline(self, agent_id: str, seq: int) -> bool:
        """Whether the event ``seq`` for ``agent_id`` waits in the offline queue."""
        return any(letter.seq == seq for letter in self.offline.get(agent_id, ()))

    def queued(self, agent_id: str) -> int:
        return len(self.answering.get(agent_id, ())) + len(self.offline.get(agent_id, ()))

    def stats(self) -> dict[str, int]:
        return {
            "answering": sum(len(q) for q in self.answering.values()),
            "offline": sum(len(q) for q in self.offline.values()),
            "answered": self.answered,
            "failed": self.failed,
            "delivered_offline": self.delivered_offline,
        }

    # -- answering ------------------------------------------------------------------------

    def _wake(self, agent_id: str) -> None:
        if self._tasks is None:
            return  # started by start()
        worker = self._workers.get(agent_id)
        if worker is None or worker.done():
            self._workers[agent_id] = self._tasks.create_task(
                self._work(agent_id), name=f"answer-{agent_id}"
            )

    async def _work(self, agent_id: str) -> None:
        """Answer ``agent_id``'s messages one at a time, in order."""
        queue = self.answering.get(agent_id)
        while queue:
            letter = queue[0]
            try:
                status = await self._answer(letter)
            except asyncio.CancelledError:
                raise  # the daemon stops: the letter stays as it is, for the next start
            except Exception as exc:
                log.exception("agents.answer_failed", agent_id=agent_id, seq=letter.seq)
                self._failed(letter, exc)
                status = "failed"
            queue.popleft()
            self._set(letter, status)
        self.answering.pop(agent_id, None)

    async def _answer(self, letter: Letter) -> str:
        """Run (or, after a restart, await) the turn that answers ``letter``; its status."""
        services = self.services
        assert services is not None
        ev = letter.event()
        data: dict[str, Any] = ev.get("data") or {}
        sender: str | None = ev.get("from_agent")
        conv = await self._conversation(data)
        if conv.ended is not None:
            return "skipped"
        if (reached := conv.limit_reached()) is not None:
            self._end(conv, reached)
            return "skipped"
        if letter.process_id is None:
            agent = self.state.agents.get(letter.agent_id)
            if agent is None or not agent.respond_to_messages:
                # Unregistered, or no longer answering, while the message waited: keep it.
                self._move(letter, "offline")
                return "queued"
            params: dict[str, Any] = {
                "prompt": frame(letter.agent_id, sender, _content(data), conv, letter.event_type),
                "agent_id": letter.agent_id,
                "mode": "async",
                # A crash between this SPAWN and the row's update below: the same id after
                # the restart returns the same turn instead of paying for a second one.
                "client_request_id": f"ksi-answer:{letter.agent_id}:{letter.seq}",
            }
            # No session_id: SPAWN continues the agent's latest session (its agent_id rule).
            ctx = Context(services, caller=f"agent:{letter.agent_id}")
            accepted = await services.registry.call(ctx, "SPAWN", params)
            letter.process_id = accepted["process_id"]
            self._set(letter, "running", process_id=letter.process_id)
        outcome = await self._outcome(letter.process_id)
        if isinstance(outcome, DaemonError):
            self._failed(letter, outcome)
            return "failed"
        text = outcome.text or ""
        conv.turns += 1
        conv.cost_usd += outcome.cost_usd or 0.0
        reason: EndReason | None = "end_marker" if ends_conversation(text) else None
        reason = reason or conv.limit_reached()
        if text.strip() != NO_RESPONSE:
            payload = {
                "to": sender,
                "content": text,
                "conversation_id": conv.conversation_id,
                "in_reply_to": letter.seq,
                "process_id": outcome.process_id,
                "session_id": outcome.session_id,
                "turn": conv.turns,
                "end": reason is not None,
            }
            # A sender without an agent id cannot be messaged: the answer is an AGENT_REPLY
            # for whoever subscribes to those.
            self.bus.publish(
                DIRECT_MESSAGE if sender is not None else "AGENT_REPLY",
                payload,
                from_agent=letter.agent_id,
                to_agent=sender,
                parent_process_id=outcome.process_id,
            )
        self._save(conv)
        if reason is not None:
            self._end(conv, reason)
        self.answered += 1
        return "answered"

    async def _outcome(self, process_id: str) -> Any:
        """The turn's SpawnResult, or the error it failed with (NotFound if it is gone)."""
        assert self.services is not None
        while True:
            try:
                _, outcome = await self.services.turns.wait(process_id, _WAIT_S)
            except NotFound as exc:
                return exc
            if outcome is not None:
                return outcome

    def _failed(self, letter: Letter, exc: Exception) -> None:
        self.failed += 1
        error = (
            exc.to_wire()
            if isinstance(exc, DaemonError)
            else {"code": ErrorCode.INTERNAL_ERROR, "message": f"{type(exc).__name__}: {exc}"}
        )
        ev = letter.event()
        self.bus.publish(
            "AGENT_REPLY_FAILED",
            {
                "agent_id": letter.agent_id,
                "to": ev.get("from_agent"),
                "in_reply_to": letter.seq,
                "conversation_id": (ev.get("data") or {}).get("conversation_id"),
                "process_id": letter.process_id,
                "error": error,
            },
            from_agent=letter.agent_id,
        )
        if isinstance(exc, TurnFailed):
            log.warning("agents.turn_failed", agent_id=letter.agent_id, code=exc.code)

    # -- conversations ---------------------------------------------------------------------

    async def _conversation(self, data: dict[str, Any]) -> Conversation:
        """The message's conversation (started by it if it names none, or an unknown one)."""
        conv_id = data.get("conversation_id")
        if not isinstance(conv_id, str) or not conv_id:
            conv_id = uuid.uuid4().hex
            data["conversation_id"] = conv_id  # the answer carries it on
        conv = self.conversations.get(conv_id)
        if conv is None:
            rows = await self.store.query(
                "SELECT * FROM conversations WHERE conversation_id=?", (conv_id,)
            )
            if rows:
                r = rows[0]
                conv = Conversation(conv_id, r["max_turns"], r["max_cost_usd"])
                conv.turns, conv.cost_usd, conv.ended = r["turns"], r["cost_usd"], r["ended"]
            else:  # PUBLISH checked these limits (daemon/commands/events.py)
                max_turns = data.get("max_turns") or self.settings.conversation_max_turns
                max_cost = data.get("max_cost_usd") or self.settings.conversation_max_cost_usd
                conv = Conversation(conv_id, int(max_turns), max_cost and float(max_cost))
            self.conversations[conv_id] = conv
            while len(self.conversations) > _CONVERSATIONS_CACHED:
                self.conversations.popitem(last=False)
        self.conversations.move_to_end(conv_id)
        return conv

    def _save(self, conv: Conversation) -> None:
        self.store.write_nowait(
            "INSERT INTO conversations(conversation_id, turns, cost_usd, max_turns, "
            "max_cost_usd, ended, updated_at) VALUES(?,?,?,?,?,?,?) ON CONFLICT(conversation_id) "
            "DO UPDATE SET turns=excluded.turns, cost_usd=excluded.cost_usd, "
            "ended=excluded.ended, updated_at=excluded.updated_at",
            (
                conv.conversation_id,
                conv.turns,
                conv.cost_usd,
                conv.max_turns,
                conv.max_cost_usd,
                conv.ended,
                time.time(),
            ),
        )

    def _end(self, conv: Conversation, reason: EndReason) -> None:
        conv.ended = reason
        self._save(conv)
        self.bus.publish(
            "CONVERSATION_ENDED",
            {
                "conversation_id": conv.conversation_id,
                "reason": reason,
                "turns": conv.turns,
                "cost_usd": round(conv.cost_usd, 10),
                "max_turns": conv.max_turns,
                "max_cost_usd": conv.max_cost_usd,
            },
        )


def _content(data: dict[str, Any]) -> str:
    """The message's text: ``content`` (KSI also sent ``message``), else its whole payload."""
    for key in ("content", "message"):
        if isinstance(value := data.get(key), str) and value.strip():
            return value
    if isinstance(task := data.get("task"), str) and task.strip():  # a bare TASK_ASSIGNMENT
        return task
    rest = {k: v for k, v in data.items() if k not in ("to", "conversation_id")}
    return orjson.dumps(rest).decode()
