"""What the daemon keeps and tells about a turn: its JSONL log lines, its record in the state
(and its session's), and its events on the bus (PROCESS_STARTED, PROCESS_PROGRESS,
PROCESS_COMPLETE)."""

from __future__ import annotations

import contextlib
from typing import Any

import structlog

from daemon.claude.options import StartInfo
from daemon.claude.results import TurnResult
from daemon.errors import TurnFailed
from daemon.events.bus import EventBus
from daemon.protocol import utc_now_iso
from daemon.state.records import StateManager
from daemon.state.turnlog import TurnLog
from daemon.turns.orphans import start_ticks
from daemon.turns.outcome import NO_SESSION_CODES, Outcome, SpawnResult, final_status
from daemon.turns.turn import Turn

log = structlog.get_logger("ksi.turns")


class TurnRecorder:
    def __init__(self, state: StateManager, bus: EventBus, turnlog: TurnLog) -> None:
        self.state = state
        self.bus = bus
        self.turnlog = turnlog

    def began(self, turn: Turn) -> None:
        """The turn left the queue and is about to call the CLI."""
        info, req = turn.info, turn.request
        info.status = "running"
        info.started_at = utc_now_iso()
        info.queue_position = None
        # Queued, not awaited: from here on a crash leaves the turn "interrupted", never
        # re-run (it may have been paid for), so its kept request goes too.
        self.state.queue_process(info)
        if req.mode == "async":
            self.state.drop_pending(info.process_id)
        # Queued, not awaited: the log's writer thread creates the file while the CLI
        # starts. The claude line (completed) is queued behind it and awaited.
        self.turnlog.human(
            turn.session_id,
            req.prompt,
            process_id=info.process_id,
            agent_id=req.agent_id,
            model=req.model,
        )

    def cli_started(self, turn: Turn, start: StartInfo) -> None:
        info = turn.info
        info.pid = start.pid
        # The CLI leads its own process group; the start time tells it from a later process
        # that reuses the pid, so a restarted daemon can end it safely (daemon/turns/orphans.py).
        info.pgid = start.pid
        info.pid_ticks = start_ticks(start.pid)
        info.warm = start.mode == "warm"
        info.cwd = turn.cwd = start.cwd
        self.state.queue_process(info)
        self.bus.publish(
            "PROCESS_STARTED",
            {
                "process_id": info.process_id,
                "session_id": turn.session_id,
                "agent_id": turn.request.agent_id,
                "pid": start.pid,
                "model": turn.request.model,
                "mode": turn.request.mode,
                "warm": info.warm,
            },
        )

    def progress(self, turn: Turn, item: dict[str, Any]) -> None:
        """One step of the running turn (daemon/claude/progress.py) as PROCESS_PROGRESS: on
        the bus, and on the connection of a sync SPAWN that asked for ``stream``."""
        event = self.bus.publish(
            "PROCESS_PROGRESS",
            {
                "process_id": turn.info.process_id,
                "session_id": turn.session_id,
                "agent_id": turn.request.agent_id,
                "index": turn.next_index(),
                **item,
            },
        )
        for watch in turn.watchers:
            watch(event)

    def retrying(
        self, turn: Turn, error: TurnFailed, attempt: int, max_retries: int, delay: float
    ) -> None:
        details = error.details or {}
        log.warning(
            "turn.api_retry",
            process_id=turn.info.process_id,
            attempt=attempt,
            delay_s=round(delay, 3),
            code=error.code,
            status=details.get("api_error_status"),
        )
        self.progress(
            turn,
            {
                "kind": "api_retry",
                "source": "daemon",
                "attempt": attempt,
                "max_retries": max_retries,
                "delay_s": round(delay, 3),
                "status": details.get("api_error_status"),
                "code": error.code,
                "message": error.message[:500],
            },
        )

    async def completed(self, turn: Turn, result: TurnResult) -> SpawnResult:
        """The CLI answered: log its JSON and give the SPAWN its result."""
        info = turn.info
        # A log that cannot be written is reported (turnlog.write_failed) but does not turn a
        # paid, successful turn into a failure: the result still reaches the client and state.
        with contextlib.suppress(OSError):
            await self.turnlog.claude(turn.session_id, result.raw, process_id=info.process_id)
        return SpawnResult(
            process_id=info.process_id,
            status="completed",
            session_id=result.session_id,
            text=result.text,
            is_error=result.is_error,
            cost_usd=result.cost_usd,
            usage=result.usage,
            num_turns=result.num_turns,
            duration_ms=result.duration_ms,
            model=result.model,
            agent_id=turn.request.agent_id,
            warm=info.warm,
            log_path=str(self.turnlog.path_for(turn.session_id)),
            raw=result.raw,
        ).with_cli_fields()

    async def finished(self, turn: Turn, outcome: Outcome) -> None:
        """Record the turn's end (and its session's new state), then announce it."""
        info = turn.info
        info.finished_at = utc_now_iso()
        info.status = final_status(outcome)
        started = info.started_at is not None
        failed = isinstance(outcome, TurnFailed)
        if isinstance(outcome, TurnFailed):
            info.error = outcome.record()
            cost = _failed_cost(outcome) if started and not info.warm else 0.0
            if cost:
                info.cost_usd = cost
            if started:
                with contextlib.suppress(OSError):
                    await self.turnlog.error(
                        turn.session_id, info.error, process_id=info.process_id
                    )
        else:
            cost = float(outcome.cost_usd or 0.0)
            info.cost_usd = cost
        await self.state.save_process(info, wait=False)
        if not started and turn.request.mode == "async":
            self.state.drop_pending(info.process_id)  # cancelled while queued
        if started and not (isinstance(outcome, TurnFailed) and outcome.code in NO_SESSION_CODES):
            # The CLI stored the session as soon as it started: it can be resumed even after
            # a failed turn, so the daemon knows it too.
            await self.state.record_turn(
                turn.session_id,
                cwd=turn.cwd,
                model=turn.request.model,
                agent_id=turn.request.agent_id,
                cost_usd=cost,
                process_id=info.process_id,
                log_path=str(self.turnlog.path_for(turn.session_id)),
                completed=not failed,
                new_session=not turn.resume,
            )
        event: dict[str, Any] = dict(outcome) if isinstance(outcome, SpawnResult) else {}
        event.pop("replayed", None)
        event.update(
            {
                "process_id": info.process_id,
                "status": info.status,
                "session_id": event.get("session_id") or turn.session_id,
                "agent_id": turn.request.agent_id,
                "mode": turn.request.mode,
            }
        )
        if failed:
            event["error"] = info.error
        self.bus.publish("PROCESS_COMPLETE", event)
        log.info(
            "turn.finished",
            process_id=info.process_id,
            status=info.status,
            session_id=turn.session_id,
            cost_usd=cost,
        )


def _failed_cost(failed: TurnFailed) -> float:
    """What a failed cold turn cost, as its CLI reported it (a turn stopped by its budget or
    by max_turns was paid for). A warm CLI reports totals of its whole life, so a failed warm
    turn's share is not known and is not counted."""
    raw = (failed.details or {}).get("raw")
    cost = raw.get("total_cost_usd") if isinstance(raw, dict) else None
    return float(cost) if isinstance(cost, (int, float)) and cost > 0 else 0.0
