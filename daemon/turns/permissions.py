"""The permission relay: a turn's tool permission questions, put to whoever is listening.

A SPAWN with ``permissions: "relay"`` runs its CLI with ``--permission-prompt-tool stdio``
(daemon/claude/permissions.py). Each question the CLI asks comes here, to
:meth:`PermissionBroker.ask`, which

1. allows it at once if a ``remember: "session"`` answer earlier in the session added a
   rule that covers it;
2. else records it (SQLite ``permission_requests``), marks the turn ``awaiting_permission``
   and publishes ``PERMISSION_REQUEST`` for clients, people and observer plugins;
3. waits for the first ``RESPOND_PERMISSION`` (later ones get PERMISSION_ALREADY_DECIDED)
   or for ``permission_timeout_s``, after which ``permission_default`` applies and
   ``PERMISSION_TIMEOUT`` is published;
4. publishes ``PERMISSION_DECIDED`` and hands the decision back to the CLI.

A request still pending when the daemon stops is ``expired`` at the next start (its turn
was interrupted with the daemon): GET_PERMISSION_REQUESTS shows it and a late answer gets
PERMISSION_EXPIRED, so nothing is lost without a word.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal

import structlog
from pydantic import Field, TypeAdapter
from pydantic.dataclasses import dataclass

from daemon.claude.permissions import Decision, PermissionAnswer, PermissionAsk
from daemon.errors import Conflict, ErrorCode, NotFound
from daemon.events.bus import EventBus
from daemon.protocol import iso_from_epoch
from daemon.state.db import Store
from daemon.state.records import StateManager
from daemon.turns.turn import Turn

log = structlog.get_logger("ksi.permissions")

RequestStatus = Literal["pending", "allowed", "denied", "timed_out", "expired", "cancelled"]
_DECIDED_CACHE = 1000  # decided requests kept in memory for late answers and listings


@dataclass(slots=True, kw_only=True)
class PermissionRequest:
    """One relayed question, as clients see it (GET_PERMISSION_REQUESTS, the events)."""

    request_id: str
    process_id: str
    session_id: str | None
    agent_id: str | None
    tool_name: str
    input: dict[str, Any]
    suggestions: list[dict[str, Any]] = Field(
        default_factory=list, description="the CLI's permission_suggestions"
    )
    description: str | None = None
    tool_use_id: str | None = None
    cwd: str | None = None
    created_at: str
    expires_at: str
    default: Decision
    status: RequestStatus = "pending"
    decision: Decision | None = None
    decided_by: str | None = Field(
        default=None, description="who answered: a connection, an observer, or timeout"
    )
    decided_at: str | None = None
    message: str | None = None
    remembered: bool = False


_RECORD_JSON: TypeAdapter[PermissionRequest] = TypeAdapter(PermissionRequest)


def record_json(record: PermissionRequest) -> dict[str, Any]:
    out: dict[str, Any] = _RECORD_JSON.dump_python(record, mode="json")
    return out


def rules_of(ask: PermissionAsk) -> list[tuple[str, str]]:
    """The (tool, rule content) pairs an allow-for-the-session answer adds: the CLI's own
    ``addRules`` suggestions when it made any (e.g. Bash with this command), else the
    whole tool."""
    rules: list[tuple[str, str]] = []
    for suggestion in ask.suggestions:
        if suggestion.get("type") != "addRules" or suggestion.get("behavior", "allow") != "allow":
            continue
        for rule in suggestion.get("rules") or []:
            if isinstance(rule, dict) and isinstance(rule.get("toolName"), str):
                content = rule.get("ruleContent")
                rules.append((rule["toolName"], content if isinstance(content, str) else ""))
    return rules or [(ask.tool_name, "")]


class _Waiting:
    __slots__ = ("answer", "ask", "record")

    def __init__(self, record: PermissionRequest, ask: PermissionAsk) -> None:
        self.record = record
        self.ask = ask
        self.answer: asyncio.Future[PermissionAnswer] = asyncio.get_running_loop().create_future()


class PermissionBroker:
    def __init__(self, store: Store, state: StateManager, bus: EventBus) -> None:
        self.store = store
        self.state = state
        self.bus = bus
        self.pending: dict[str, _Waiting] = {}
        self.decided: OrderedDict[str, PermissionRequest] = OrderedDict()
        self.rules: dict[str, set[tuple[str, str]]] = {}
        self.asked = 0
        self.closing = False  # the daemon is stopping: turns still waiting end with it
        self.auto_allowed = 0
        # Told of each step a turn's request goes through (the turn's PROCESS_PROGRESS).
        self.on_progress: Callable[[Turn, dict[str, Any]], None] | None = None

    # -- start-up ---------------------------------------------------------------------------

    async def load(self) -> None:
        """Rules remembered per session, and the requests an earlier run left pending:
        their turns ended with that run, so they are expired, visibly."""
        for row in await self.store.query(
            "SELECT session_id, tool_name, rule_content FROM permission_rules"
        ):
            self.rules.setdefault(row["session_id"], set()).add(
                (row["tool_name"], row["rule_content"])
            )
        rows = await self.store.query(
            "SELECT record FROM permission_requests WHERE status='pending' ORDER BY created_at"
        )
        now = time.time()
        for row in rows:
            record = _RECORD_JSON.validate_json(row["record"])
            record.status = "expired"
            record.decided_at = iso_from_epoch(now)
            record.decided_by = "restart"
            record.message = "the daemon stopped while this request waited; its turn ended"
            self._save(record)
            self._keep_decided(record)
        if rows:
            log.info("permissions.expired_after_restart", count=len(rows))

    # -- a turn asks ------------------------------------------------------------------------

    async def ask(self, turn: Turn, ask: PermissionAsk) -> PermissionAnswer:
        """Decide one question of ``turn``'s CLI (see the module docstring)."""
        session_id = turn.session_id
        if self._covered(session_id, ask):
            self.auto_allowed += 1
            self._progress(turn, ask, "allowed", "allow", by="session rule")
            return PermissionAnswer("allow")
        now = time.time()
        record = PermissionRequest(
            request_id=uuid.uuid4().hex,
            process_id=turn.info.process_id,
            session_id=session_id,
            agent_id=turn.request.agent_id,
            tool_name=ask.tool_name,
            input=ask.input,
            suggestions=ask.suggestions,
            description=ask.description,
            tool_use_id=ask.tool_use_id,
            cwd=turn.cwd,
            created_at=iso_from_epoch(now),
            expires_at=iso_from_epoch(now + ask.timeout_s),
            default=ask.default,
        )
        waiting = _Waiting(record, ask)
        self.asked += 1
        # Committed before anyone hears of it, GET_PERMISSION_REQUESTS included (so it joins
        # ``pending`` only after the commit): a request a client saw is never lost, even if
        # the daemon dies the next moment (the next start reports it expired).
        try:
            await self.store.write(*_upsert(record))
        except asyncio.CancelledError:
            # The row commits anyway (the store thread does not drop a queued write); the
            # update queued behind it keeps it from looking pending until the next start.
            record.status, record.message = "cancelled", "the turn ended before an answer"
            record.decided_at = iso_from_epoch(time.time())
            self._save(record)
            raise
        self.pending[record.request_id] = waiting
        self._set_awaiting(turn)
        self.bus.publish("PERMISSION_REQUEST", _request_event(record))
        self._progress(turn, ask, "pending", None, request_id=record.request_id)
        try:
            try:
                async with asyncio.timeout(ask.timeout_s):
                    answer = await asyncio.shield(waiting.answer)
            except TimeoutError:
                answer = PermissionAnswer(
                    ask.default,
                    message=f"no answer within {ask.timeout_s:g}s; the default is {ask.default}",
                )
                self._decide(record, answer, status="timed_out", by="timeout")
                self.bus.publish(
                    "PERMISSION_TIMEOUT",
                    {**_ids(record), "tool_name": record.tool_name, "decision": ask.default},
                )
        except asyncio.CancelledError:
            # The turn ended (cancelled, timed out, its CLI died) while it waited.
            if record.status == "pending":
                # At shutdown it is expired, as one found pending at the next start would be.
                record.status = "expired" if self.closing else "cancelled"
                record.decided_at = iso_from_epoch(time.time())
                record.decided_by = "shutdown" if self.closing else None
                record.message = (
                    "the daemon stopped while this request waited; its turn ended"
                    if self.closing
                    else "the turn ended before an answer"
                )
                self._settled(record)
            raise
        finally:
            self.pending.pop(record.request_id, None)
            self._unset_awaiting(turn)
        self._progress(
            turn,
            ask,
            record.status,
            record.decision,
            by=record.decided_by,
            request_id=record.request_id,
        )
        return answer

    def _covered(self, session_id: str, ask: PermissionAsk) -> bool:
        rules = self.rules.get(session_id)
        if not rules:
            return False
        return (ask.tool_name, "") in rules or any(r in rules for r in rules_of(ask))

    # -- someone answers --------------------------------------------------------------------

    def respond(
        self,
        request_id: str,
        decision: Decision,
        *,
        by: str,
        message: str | None = None,
        updated_input: dict[str, Any] | None = None,
        remember: bool = False,
    ) -> PermissionRequest:
        """Answer a pending request: the first answer wins (checked and settled without an
        await in between, so two clients cannot both win)."""
        waiting = self.pending.get(request_id)
        if waiting is None or waiting.record.status != "pending":
            raise self._not_pending(request_id)
        record = waiting.record
        if remember and decision == "allow" and record.session_id:
            self._remember(record.session_id, rules_of(waiting.ask))
            record.remembered = True
        answer = PermissionAnswer(
            decision,
            message=message or ("" if decision == "allow" else f"denied by {by}"),
            updated_input=updated_input,
        )
        self._decide(record, answer, status="allowed" if decision == "allow" else "denied", by=by)
        waiting.answer.set_result(answer)
        return record

    def _not_pending(self, request_id: str) -> Exception:
        record = self.decided.get(request_id)
        if record is None and (waiting := self.pending.get(request_id)) is not None:
            record = waiting.record
        if record is None:
            return NotFound(
                f"no permission request {request_id!r}", code=ErrorCode.PERMISSION_NOT_FOUND
            )
        details = {"status": record.status, "decision": record.decision}
        if record.status == "expired":
            return Conflict(
                f"permission request {request_id} expired: {record.message}",
                code=ErrorCode.PERMISSION_EXPIRED,
                details=details,
            )
        return Conflict(
            f"permission request {request_id} was already decided ({record.status}"
            f"{' by ' + record.decided_by if record.decided_by else ''})",
            code=ErrorCode.PERMISSION_ALREADY_DECIDED,
            details=details,
        )

    async def find(self, request_id: str) -> PermissionRequest | None:
        """A request by id, also one decided before this run (read from SQLite)."""
        if (waiting := self.pending.get(request_id)) is not None:
            return waiting.record
        if (record := self.decided.get(request_id)) is not None:
            return record
        rows = await self.store.query(
            "SELECT record FROM permission_requests WHERE request_id=?", (request_id,)
        )
        if not rows:
            return None
        record = _RECORD_JSON.validate_json(rows[0]["record"])
        self._keep_decided(record)
        return record

    def listing(self, include_decided: bool, limit: int) -> list[PermissionRequest]:
        """Pending requests, oldest first; then (if asked) recently decided ones."""
        out = [w.record for w in self.pending.values()][:limit]
        if include_decided:
            out += list(self.decided.values())[-limit:]
        return out

    def stats(self) -> dict[str, int]:
        return {
            "pending": len(self.pending),
            "asked": self.asked,
            "auto_allowed": self.auto_allowed,
        }

    # -- internals ---------------------------------------------------------------------------

    def _decide(
        self, record: PermissionRequest, answer: PermissionAnswer, *, status: RequestStatus, by: str
    ) -> None:
        record.status = status
        record.decision = answer.decision
        record.decided_by = by
        record.decided_at = iso_from_epoch(time.time())
        record.message = answer.message or None
        self._settled(record)

    def _settled(self, record: PermissionRequest) -> None:
        self._save(record)
        self._keep_decided(record)
        self.bus.publish(
            "PERMISSION_DECIDED",
            {
                **_ids(record),
                "tool_name": record.tool_name,
                "status": record.status,
                "decision": record.decision,
                "decided_by": record.decided_by,
                "remembered": record.remembered,
            },
        )

    def _keep_decided(self, record: PermissionRequest) -> None:
        self.decided[record.request_id] = record
        self.decided.move_to_end(record.request_id)
        while len(self.decided) > _DECIDED_CACHE:
            self.decided.popitem(last=False)

    def _save(self, record: PermissionRequest) -> None:
        """Queue the upsert of the request's row behind the turn's own writes (not awaited:
        a crash before it commits leaves the row pending, and the next start reports it
        expired)."""
        self.store.write_nowait(*_upsert(record))

    def _remember(self, session_id: str, rules: list[tuple[str, str]]) -> None:
        known = self.rules.setdefault(session_id, set())
        for tool, content in rules:
            if (tool, content) in known:
                continue
            known.add((tool, content))
            self.store.write_nowait(
                "INSERT OR IGNORE INTO permission_rules(session_id, tool_name, rule_content, "
                "created_at) VALUES(?,?,?,?)",
                (session_id, tool, content, time.time()),
            )

    def _set_awaiting(self, turn: Turn) -> None:
        turn.awaiting += 1
        if turn.info.status == "running":
            turn.info.status = "awaiting_permission"
            self.state.note_process(turn.info)  # memory only: on disk it stays "running"

    def _unset_awaiting(self, turn: Turn) -> None:
        turn.awaiting -= 1
        if turn.awaiting == 0 and turn.info.status == "awaiting_permission":
            turn.info.status = "running"
            self.state.note_process(turn.info)

    def _progress(
        self,
        turn: Turn,
        ask: PermissionAsk,
        status: str,
        decision: Decision | None,
        *,
        by: str | None = None,
        request_id: str | None = None,
    ) -> None:
        if self.on_progress is None:
            return
        item: dict[str, Any] = {
            "kind": "permission",
            "status": status,
            "tool_name": ask.tool_name,
            "tool_use_id": ask.tool_use_id,
        }
        if request_id is not None:
            item["request_id"] = request_id
        if decision is not None:
            item["decision"] = decision
        if by is not None:
            item["decided_by"] = by
        self.on_progress(turn, item)


def _upsert(record: PermissionRequest) -> tuple[str, tuple[Any, ...]]:
    return (
        "INSERT INTO permission_requests(request_id, process_id, session_id, status, "
        "created_at, record) VALUES(?,?,?,?,?,?) ON CONFLICT(request_id) DO UPDATE SET "
        "status=excluded.status, record=excluded.record",
        (
            record.request_id,
            record.process_id,
            record.session_id,
            record.status,
            time.time(),
            _RECORD_JSON.dump_json(record),
        ),
    )


def _ids(record: PermissionRequest) -> dict[str, Any]:
    return {
        "request_id": record.request_id,
        "process_id": record.process_id,
        "session_id": record.session_id,
        "agent_id": record.agent_id,
    }


def _request_event(record: PermissionRequest) -> dict[str, Any]:
    data = record_json(record)
    for key in ("status", "decision", "decided_by", "decided_at", "message", "remembered"):
        data.pop(key, None)
    return data
