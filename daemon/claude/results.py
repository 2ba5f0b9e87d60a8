"""Turn a finished CLI run into a :class:`TurnResult` or a :class:`ClaudeCLIError`.

What the CLI does on failure (measured against 2.1.197; the table is in the "Errors" section
of LITELLM_INTEGRATION.md) drives the order of checks:

* API errors print a normal result object with ``"subtype": "success"`` and
  ``"is_error": true`` and exit 1, so ``subtype`` alone proves nothing;
  ``api_error_status`` is the HTTP status, or null for "Unable to connect" and
  "Request timed out".
* ``error_max_turns`` has no ``result`` key at all.
* An unknown ``--resume`` id prints nothing on stdout, only
  ``No conversation found with session ID: <id>`` on stderr.
* A signal leaves a negative return code (asyncio convention) and no JSON.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass, field
from typing import Any

import orjson

from daemon.claude.errors import ClaudeCLIError, ErrorCode

_EXCERPT_BYTES = 2048
_MODEL_SUFFIX = re.compile(r"\[[^\]]*\]$")
# How the CLI words a credentials problem: a 401/403 from the API, or no credentials at all
# ("Not logged in · Please run /login", api_error_status null: the CLI never called the API).
_AUTH_SIGNS = ("Failed to authenticate", "Not logged in")


@dataclass(frozen=True, slots=True)
class TurnResult:
    """A successful turn. ``raw`` is the CLI's complete result object."""

    session_id: str
    text: str
    is_error: bool
    cost_usd: float
    usage: dict[str, Any]
    num_turns: int
    duration_ms: int
    model: str | None
    raw: dict[str, Any] = field(repr=False)
    pid: int | None
    exit_code: int | None
    stderr_tail: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the daemon's replies, provider_specific_fields)."""
        return {
            "session_id": self.session_id,
            "text": self.text,
            "is_error": self.is_error,
            "cost_usd": self.cost_usd,
            "usage": self.usage,
            "num_turns": self.num_turns,
            "duration_ms": self.duration_ms,
            "model": self.model,
            "raw": self.raw,
            "pid": self.pid,
            "exit_code": self.exit_code,
            "stderr_tail": self.stderr_tail,
        }


_JUNK_KEPT = 8192  # unparseable stdout kept per turn, for the error that explains it
_JUNK_LINE = 4096


def json_line(line: bytes) -> dict[str, Any] | None:
    """One stdout line as a JSON object, or None (blank, not JSON, not an object)."""
    try:
        obj = orjson.loads(line) if line.strip() else None
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


class StdoutLines:
    """A turn's stdout as the cold and warm backends read it: JSON objects are parsed, and
    anything else is kept (bounded) for the error of a turn that ends without a result."""

    def __init__(self) -> None:
        self._junk = bytearray()

    def parse(self, line: bytes) -> dict[str, Any] | None:
        obj = json_line(line)
        if obj is None and line.strip() and len(self._junk) < _JUNK_KEPT:
            self._junk += line[:_JUNK_LINE] + b"\n"
        return obj

    def excerpt(self) -> str:
        return stdout_excerpt(bytes(self._junk))


def stdout_excerpt(stdout: bytes) -> str:
    """Head and tail of unparseable output, bounded so errors stay small."""
    if len(stdout) <= 2 * _EXCERPT_BYTES:
        return stdout.decode("utf-8", "replace")
    head = stdout[:_EXCERPT_BYTES].decode("utf-8", "replace")
    tail = stdout[-_EXCERPT_BYTES:].decode("utf-8", "replace")
    return f"{head}\n...[{len(stdout) - 2 * _EXCERPT_BYTES} bytes omitted]...\n{tail}"


def _reported_model(raw: dict[str, Any], requested: str | None) -> str | None:
    usage = raw.get("modelUsage")
    if isinstance(usage, dict) and usage:
        # Sub-agents can add cheaper models; the main model is the one that cost most.
        def weight(item: tuple[str, Any]) -> tuple[float, float]:
            stats = item[1] if isinstance(item[1], dict) else {}
            return (float(stats.get("costUSD") or 0), float(stats.get("outputTokens") or 0))

        name = max(usage.items(), key=weight)[0]
        # "claude-opus-4-8[1m]" names the context window, not a different model.
        return _MODEL_SUFFIX.sub("", name)
    return requested


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


def _exit_description(exit_code: int | None) -> str:
    if exit_code is None:
        return "did not report an exit status"
    if exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        return f"was killed by {name}"
    return f"exited with code {exit_code}"


def classify_result(
    obj: dict[str, Any] | None,
    *,
    exit_code: int | None,
    stderr_tail: str,
    requested_model: str | None,
    session_id: str,
    pid: int | None,
    stdout_sample: str = "",
) -> TurnResult:
    """Return the TurnResult of a finished run or raise the matching ClaudeCLIError."""
    evidence: dict[str, Any] = {
        "exit_code": exit_code,
        "stderr_tail": stderr_tail,
        "session_id": session_id,
        "pid": pid,
    }
    if "No conversation found" in stderr_tail:
        raise ClaudeCLIError(
            ErrorCode.SESSION_NOT_FOUND,
            _last_line(stderr_tail) or f"no conversation {session_id} in this cwd",
            raw=obj,
            **evidence,
        )
    if obj is None:
        if exit_code == 0:
            raise ClaudeCLIError(
                ErrorCode.INVALID_OUTPUT,
                "CLI exited 0 but printed no result object",
                raw={"stdout_excerpt": stdout_sample},
                **evidence,
            )
        if any(sign in stderr_tail for sign in _AUTH_SIGNS):
            raise ClaudeCLIError(ErrorCode.AUTH_FAILED, _last_line(stderr_tail), **evidence)
        detail = _last_line(stderr_tail)
        message = f"CLI {_exit_description(exit_code)}" + (f": {detail}" if detail else "")
        raise ClaudeCLIError(ErrorCode.CLI_CRASHED, message, **evidence)

    subtype = obj.get("subtype")
    is_error = bool(obj.get("is_error"))
    status = obj.get("api_error_status")
    status = status if isinstance(status, int) else None
    evidence["session_id"] = obj.get("session_id") or session_id
    text = obj.get("result")
    errors = obj.get("errors")
    error_text = "; ".join(str(e) for e in errors) if isinstance(errors, list) else ""
    if subtype == "error_max_turns":
        raise ClaudeCLIError(
            ErrorCode.MAX_TURNS,
            error_text or "reached the maximum number of turns",
            raw=obj,
            api_error_status=status,
            **evidence,
        )
    if subtype == "error_max_budget_usd":
        raise ClaudeCLIError(
            ErrorCode.BUDGET_EXCEEDED,
            error_text or "reached the maximum budget",
            raw=obj,
            api_error_status=status,
            **evidence,
        )
    if is_error or subtype != "success":
        message = str(text or error_text or f"CLI reported failure (subtype {subtype!r})")
        if status in (401, 403) or any(sign in message for sign in _AUTH_SIGNS):
            code = ErrorCode.AUTH_FAILED
        elif status == 429:
            code = ErrorCode.RATE_LIMITED
        elif subtype == "success" or status is not None:
            # API failures keep subtype "success"; connect errors have status null.
            code = ErrorCode.API_ERROR
        else:
            code = ErrorCode.CLI_CRASHED
        raise ClaudeCLIError(code, message, raw=obj, api_error_status=status, **evidence)
    if exit_code != 0:
        raise ClaudeCLIError(
            ErrorCode.CLI_CRASHED,
            f"CLI {_exit_description(exit_code)} after printing a success result",
            raw=obj,
            **evidence,
        )
    usage = obj.get("usage")
    return TurnResult(
        session_id=str(evidence["session_id"]),
        text=str(text) if text is not None else "",
        is_error=False,
        cost_usd=float(obj.get("total_cost_usd") or 0.0),
        usage=usage if isinstance(usage, dict) else {},
        num_turns=int(obj.get("num_turns") or 0),
        duration_ms=int(obj.get("duration_ms") or 0),
        model=_reported_model(obj, requested_model),
        raw=obj,
        pid=pid,
        exit_code=exit_code,
        stderr_tail=stderr_tail,
    )
