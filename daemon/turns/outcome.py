"""How a turn ends, typed all the way from the engine to the reply, the log and the events.

An outcome is a :class:`SpawnResult` (the turn completed: the CLI's answer) or a
:class:`~daemon.errors.TurnFailed` (how it failed, the CLI's evidence in ``details``). The
CLI's own failure (:class:`~daemon.claude.errors.ClaudeCLIError`, raised through LiteLLM as
the provider's exception) becomes a TurnFailed once, in :func:`failure_of`; the registry
writes the wire envelope from it (daemon/commands/registry.py), once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Literal, TypeAlias

import orjson
import structlog
from pydantic import Field

from daemon.claude.errors import claude_error_of
from daemon.commands.registry import Result
from daemon.errors import DaemonError, ErrorCode, TurnFailed
from daemon.state.records import ProcessStatus, TurnRecord

log = structlog.get_logger("ksi.turns")


class SpawnResult(Result):
    """What SPAWN answers: a completed turn (sync), or the accepted one (async)."""

    process_id: str
    status: ProcessStatus | Literal["started"] = Field(
        description='a sync turn: how it ended; an accepted async one: "started" (as KSI '
        "answered; where it is now is in state), or how it ended if a replay found it done"
    )
    state: ProcessStatus | None = Field(
        default=None, description="async: the turn's status now (queued, paused, running, ...)"
    )
    session_id: str | None = None
    mode: Literal["async"] | None = None
    replayed: bool = Field(
        default=False,
        description="true when client_request_id matched an earlier SPAWN and no new turn was run",
    )
    text: str | None = None
    is_error: bool | None = None
    cost_usd: float | None = None
    usage: dict[str, Any] | None = None
    num_turns: int | None = None
    duration_ms: int | None = None
    model: str | None = None
    agent_id: str | None = None
    warm: bool | None = None
    log_path: str | None = None
    raw: dict[str, Any] | None = Field(default=None, description="the CLI's full JSON result")
    progress_missed: int | None = Field(
        default=None,
        description="stream: true only: progress events not written because the client "
        "left too much unread (GET_EVENTS has them)",
    )
    # The CLI's own JSON result fields, at the top level as the original KSI daemon answered
    # (its clients read result.result): set for a turn that answered, next to ours above.
    type: Literal["result", "claude"] | None = Field(
        default=None, description="the CLI's 'result' for an answer; 'claude' for an async accept"
    )
    subtype: str | None = Field(default=None, description="the CLI's: 'success', ...")
    result: str | None = Field(default=None, description="the CLI's answer text (= text)")
    total_cost_usd: float | None = Field(default=None, description="the CLI's (= cost_usd)")
    duration_api_ms: int | None = None

    def with_cli_fields(self) -> SpawnResult:
        """This result with the CLI's JSON fields copied to the top level (KSI's shape)."""
        raw = self.raw or {}
        return self.model_copy(
            update={
                "type": "result",
                "subtype": raw.get("subtype") or "success",
                "result": self.text,
                "total_cost_usd": self.cost_usd,
                "duration_api_ms": raw.get("duration_api_ms"),
            }
        )


Outcome: TypeAlias = SpawnResult | TurnFailed

# Failures whose turn ended before the CLI could have written a session to disk.
NO_SESSION_CODES = frozenset(
    {ErrorCode.SESSION_NOT_FOUND, ErrorCode.CLAUDE_NOT_FOUND, ErrorCode.NOT_READY}
)
_STATUS_OF: dict[ErrorCode, ProcessStatus] = {
    ErrorCode.TIMEOUT: "timed_out",
    ErrorCode.CANCELLED: "cancelled",
}


def final_status(outcome: Outcome) -> ProcessStatus:
    if isinstance(outcome, SpawnResult):
        return "completed"
    return _STATUS_OF.get(outcome.code, "failed")


def cli_failure(exc: Exception, session_id: str) -> TurnFailed:
    """A failed LiteLLM call as the daemon's error: the CLI's own (code and evidence) when
    the provider raised one, else a crash of the call itself."""
    cli = claude_error_of(exc)
    if cli is None:
        return TurnFailed(
            f"LiteLLM call failed: {type(exc).__name__}: {exc}", code=ErrorCode.CLI_CRASHED
        )
    details = cli.to_dict()
    del details["code"], details["message"]
    details["session_id"] = details["session_id"] or session_id
    return TurnFailed(cli.message, code=cli.code, details=details)


def failure_of(exc: BaseException, process_id: str) -> TurnFailed:
    """The outcome of a turn that raised instead of returning a result."""
    if isinstance(exc, asyncio.CancelledError):
        failed = TurnFailed("the turn was cancelled", code=ErrorCode.CANCELLED)
    elif isinstance(exc, DaemonError):
        failed = TurnFailed(exc.message, code=exc.code, details=dict(exc.details or {}))
    else:
        log.error("turn.crashed", process_id=process_id, exc_info=exc)
        failed = TurnFailed(type(exc).__name__, code=ErrorCode.INTERNAL_ERROR)
    failed.details = {**(failed.details or {}), "process_id": process_id}
    return failed


def recorded_outcome(info: TurnRecord | None, process_id: str, log_path: Path | None) -> Outcome:
    """A replay of a turn whose full outcome is no longer cached (evicted, or from before a
    restart): what its record says, with the answer read back from its turn log. Blocking
    (reads the log): run it in a thread."""
    if info is None or info.status != "completed":
        error = (info.error if info and info.error else None) or {
            "code": ErrorCode.PROCESS_NOT_FOUND,
            "message": f"process {process_id} is gone",
        }
        details = {k: v for k, v in error.items() if k not in ("code", "message")}
        details["process_id"] = process_id
        return TurnFailed(error["message"], code=ErrorCode(error["code"]), details=details)
    result = SpawnResult(
        process_id=process_id,
        status="completed",
        session_id=info.session_id,
        cost_usd=info.cost_usd,
        model=info.model,
        agent_id=info.agent_id,
    )
    raw = _logged_result(log_path, process_id) if log_path is not None else None
    if raw is None:
        return result
    return result.model_copy(
        update={
            "text": raw.get("result"),
            "is_error": raw.get("is_error"),
            "usage": raw.get("usage"),
            "num_turns": raw.get("num_turns"),
            "duration_ms": raw.get("duration_ms"),
            "log_path": str(log_path),
            "raw": raw,
        }
    ).with_cli_fields()


def _logged_result(path: Path, process_id: str) -> dict[str, Any] | None:
    """The CLI's JSON result of one turn, from its session's JSONL log (None if absent)."""
    needle = f'"process_id":"{process_id}"'.encode()
    try:
        with path.open("rb") as fh:
            for line in fh:
                if needle in line and line.startswith(b'{"'):
                    obj = orjson.loads(line)
                    if obj.get("type") == "claude" and obj.get("process_id") == process_id:
                        raw: dict[str, Any] = obj
                        raw.pop("timestamp", None)
                        raw.pop("process_id", None)
                        raw["type"] = "result"
                        return raw
    except (OSError, orjson.JSONDecodeError):
        return None
    return None
