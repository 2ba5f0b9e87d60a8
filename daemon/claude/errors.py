"""Typed failure of one Claude CLI turn.

Every way a turn can fail ends up as a :class:`ClaudeCLIError` with a stable
``code`` from the daemon's one vocabulary (:class:`daemon.errors.ErrorCode`); the code
reaches the wire unchanged::

    ClaudeCLIError
      code = CLAUDE_NOT_FOUND   executable missing / not executable
           | SESSION_NOT_FOUND  --resume of an id unknown in that cwd
           | AUTH_FAILED        API said 401/403 ("Failed to authenticate")
           | RATE_LIMITED       API said 429
           | API_ERROR          any other API failure (5xx, 400, connect, timeout)
           | MAX_TURNS          subtype error_max_turns
           | BUDGET_EXCEEDED    subtype error_max_budget_usd (--max-budget-usd reached)
           | TIMEOUT            our own wall-clock limit hit; process group killed
           | CANCELLED          the engine was shut down under the turn
           | CLI_CRASHED        killed by a signal / non-zero exit without a result
           | INVALID_OUTPUT     exit 0 but stdout is not a result object
"""

from __future__ import annotations

from typing import Any

from daemon.errors import ErrorCode

__all__ = ["ClaudeCLIError", "ErrorCode", "TurnRejected", "claude_error_of"]


class ClaudeCLIError(Exception):
    """A Claude CLI turn failed; ``code`` says how, the rest is evidence.

    ``raw`` is the CLI's result object when one was printed (API errors and
    max-turns still print one), otherwise ``None`` (or, for INVALID_OUTPUT, a
    dict holding a bounded excerpt of what stdout did contain).
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        exit_code: int | None = None,
        stderr_tail: str = "",
        api_error_status: int | None = None,
        session_id: str | None = None,
        raw: dict[str, Any] | None = None,
        pid: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.exit_code = exit_code
        self.stderr_tail = stderr_tail
        self.api_error_status = api_error_status
        self.session_id = session_id
        self.raw = raw
        self.pid = pid

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"

    def __repr__(self) -> str:
        return f"ClaudeCLIError({self.code.value!r}, {self.message!r}, exit={self.exit_code!r})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the daemon's error replies and event payloads."""
        return {
            "code": self.code.value,
            "message": self.message,
            "exit_code": self.exit_code,
            "stderr_tail": self.stderr_tail,
            "api_error_status": self.api_error_status,
            "session_id": self.session_id,
            "pid": self.pid,
            "raw": self.raw,
        }


class TurnRejected(ClaudeCLIError):
    """The engine refused a turn before any CLI started (nothing ran, nothing was paid):
    ``SESSION_NOT_FOUND`` for a resume in a directory the session did not begin in (the CLI
    would not find it there), ``INVALID_PARAMETERS`` for a cwd that is not a directory.
    ``details`` say what the caller got wrong (``session_cwd``)."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        session_id: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(code, message, session_id=session_id)
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), **self.details}


def claude_error_of(exc: BaseException) -> ClaudeCLIError | None:
    """Find the ClaudeCLIError behind a provider error.

    Works on the provider's LiteLLM exceptions (``.claude_error``) and on LiteLLM's
    ``MidStreamFallbackError`` wrapping one (``.original_exception``), without importing LiteLLM.
    """
    seen: BaseException | None = exc
    for _ in range(3):
        if seen is None:
            return None
        if isinstance(seen, ClaudeCLIError):
            return seen
        found = getattr(seen, "claude_error", None)
        if isinstance(found, ClaudeCLIError):
            return found
        seen = getattr(seen, "original_exception", None)
    return None
