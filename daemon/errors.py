"""The daemon's one error vocabulary: :class:`ErrorCode`, and the exceptions that carry it.

Every failure a client can see is a :class:`DaemonError` with a ``code`` from
:class:`ErrorCode` and an optional ``details`` dict. A Claude turn's failure
(:class:`daemon.claude.errors.ClaudeCLIError`) uses the same codes, so a code is never
translated on its way from the CLI to the wire. The dispatcher is the only place that
turns exceptions into error replies; anything that is not a ``DaemonError`` becomes
``INTERNAL_ERROR`` with the traceback logged, never sent.

    DaemonError
    ├── ProtocolError        INVALID_JSON, INVALID_REQUEST, INVALID_UTF8, LINE_TOO_LONG, ...
    ├── UnknownCommand       UNKNOWN_COMMAND
    ├── InvalidParameters    INVALID_PARAMETERS, CONTEXT_VALIDATION_ERROR (a composition's
    │                        variables missing from COMPOSE_PROMPT's context)
    ├── NotFound             SESSION_NOT_FOUND, PROCESS_NOT_FOUND, AGENT_NOT_FOUND,
    │                        IDENTITY_NOT_FOUND, COMPOSITION_NOT_FOUND, DIRECTORY_NOT_FOUND
    ├── Conflict             PROCESS_FINISHED (cancel of a finished process), IDENTITY_EXISTS,
    │                        COMPOSITION_EXISTS, COMPOSITION_READ_ONLY, SESSION_EXISTS,
    │                        AGENT_NOT_CONNECTED (SUBSCRIBE as an agent this connection is not)
    ├── CompositionInvalid   COMPOSITION_INVALID (a recipe or component that cannot be used)
    ├── Unavailable          SHUTTING_DOWN, NOT_READY
    ├── PermissionDenied     PERMISSION_DENIED
    ├── StorageError         STORAGE_FULL, STORAGE_ERROR, STORAGE_BUSY
    └── TurnFailed           a Claude turn's codes (TIMEOUT, RATE_LIMITED, ...)
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    """Stable error codes: the string values go over the wire unchanged."""

    # The request itself (daemon/protocol.py, daemon/server/).
    INVALID_JSON = "INVALID_JSON"
    INVALID_UTF8 = "INVALID_UTF8"
    INVALID_REQUEST = "INVALID_REQUEST"
    LINE_TOO_LONG = "LINE_TOO_LONG"
    LINE_TIMEOUT = "LINE_TIMEOUT"
    INPUT_BUFFERS_FULL = "INPUT_BUFFERS_FULL"
    NESTING_TOO_DEEP = "NESTING_TOO_DEEP"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    UNKNOWN_COMMAND = "UNKNOWN_COMMAND"
    INVALID_PARAMETERS = "INVALID_PARAMETERS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    # Things a command names.
    NOT_FOUND = "NOT_FOUND"
    SESSION_NOT_FOUND = "SESSION_NOT_FOUND"
    PROCESS_NOT_FOUND = "PROCESS_NOT_FOUND"
    AGENT_NOT_FOUND = "AGENT_NOT_FOUND"
    # SUBSCRIBE as an agent that is not this connection's: another agent's connection, or
    # an agent neither registered nor connected anywhere (KSI's code for it).
    AGENT_NOT_CONNECTED = "AGENT_NOT_CONNECTED"
    IDENTITY_NOT_FOUND = "IDENTITY_NOT_FOUND"
    CONFLICT = "CONFLICT"
    PROCESS_FINISHED = "PROCESS_FINISHED"
    IDENTITY_EXISTS = "IDENTITY_EXISTS"
    SESSION_EXISTS = "SESSION_EXISTS"
    # Prompt compositions (daemon/compositions.py, daemon/commands/compositions.py).
    COMPOSITION_NOT_FOUND = "COMPOSITION_NOT_FOUND"
    DIRECTORY_NOT_FOUND = "DIRECTORY_NOT_FOUND"
    COMPOSITION_EXISTS = "COMPOSITION_EXISTS"
    COMPOSITION_READ_ONLY = "COMPOSITION_READ_ONLY"
    COMPOSITION_INVALID = "COMPOSITION_INVALID"
    CONTEXT_VALIDATION_ERROR = "CONTEXT_VALIDATION_ERROR"
    PERMISSION_NOT_FOUND = "PERMISSION_NOT_FOUND"
    PERMISSION_ALREADY_DECIDED = "PERMISSION_ALREADY_DECIDED"
    PERMISSION_EXPIRED = "PERMISSION_EXPIRED"
    # Limits a turn ran into (daemon/turns/limits.py).
    BUDGET_EXCEEDED = "BUDGET_EXCEEDED"
    SESSION_LIMIT_REACHED = "SESSION_LIMIT_REACHED"
    # Spawn trees: turns a turn starts through the KSI MCP face (daemon/turns/tree.py).
    SPAWN_DEPTH_EXCEEDED = "SPAWN_DEPTH_EXCEEDED"
    TOO_MANY_CHILDREN = "TOO_MANY_CHILDREN"
    TREE_BUDGET_EXCEEDED = "TREE_BUDGET_EXCEEDED"
    OBSERVER_NOT_FOUND = "OBSERVER_NOT_FOUND"
    RELOAD_FAILED = "RELOAD_FAILED"
    # The daemon's condition.
    UNAVAILABLE = "UNAVAILABLE"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    NOT_READY = "NOT_READY"
    STORAGE_FULL = "STORAGE_FULL"
    STORAGE_ERROR = "STORAGE_ERROR"
    STORAGE_BUSY = "STORAGE_BUSY"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    # A Claude turn (daemon/claude/errors.py says when each is raised).
    CLAUDE_NOT_FOUND = "CLAUDE_NOT_FOUND"
    AUTH_FAILED = "AUTH_FAILED"
    RATE_LIMITED = "RATE_LIMITED"
    API_ERROR = "API_ERROR"
    MAX_TURNS = "MAX_TURNS"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"
    INTERRUPTED = "INTERRUPTED"
    CLI_CRASHED = "CLI_CRASHED"
    INVALID_OUTPUT = "INVALID_OUTPUT"
    # Only the LiteLLM provider's (claude_cli_provider.py): no turn was attempted.
    BAD_REQUEST = "BAD_REQUEST"


class DaemonError(Exception):
    """Base class: an error that is sent to the client as ``{"code", "message", "details"}``."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            err["details"] = self.details
        return err


class ProtocolError(DaemonError):
    """The bytes on the wire were not a valid request envelope.

    ``echo``: as much of the request's ``id`` / ``metadata.request_id`` as could be read,
    so that a pipelining client can still match the error reply to its request.
    """

    code = ErrorCode.INVALID_REQUEST

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        details: dict[str, Any] | None = None,
        echo: Any = None,
    ) -> None:
        super().__init__(message, code=code, details=details)
        self.echo = echo


class UnknownCommand(DaemonError):
    code = ErrorCode.UNKNOWN_COMMAND


class InvalidParameters(DaemonError):
    code = ErrorCode.INVALID_PARAMETERS


class NotFound(DaemonError):
    code = ErrorCode.NOT_FOUND


class Conflict(DaemonError):
    code = ErrorCode.CONFLICT


class CompositionInvalid(DaemonError):
    """A prompt composition (its YAML, a component's path or template, a condition) cannot
    be used; ``details`` name the composition and what is wrong."""

    code = ErrorCode.COMPOSITION_INVALID


class Unavailable(DaemonError):
    code = ErrorCode.UNAVAILABLE


class PermissionDenied(DaemonError):
    code = ErrorCode.PERMISSION_DENIED


class StorageError(DaemonError):
    """The daemon's state could not be persisted, so the change did not happen.

    ``STORAGE_FULL``: the disk (or quota) holding the state is full; ``STORAGE_ERROR``: any
    other failure to write it (I/O error, read-only, corrupt); ``STORAGE_BUSY``: writes are
    queued faster than the disk takes them and the queue is at its byte limit (retry later).
    ``details`` name the SQLite error and the path.
    """

    code = ErrorCode.STORAGE_ERROR


class TurnFailed(DaemonError):
    """A Claude turn failed; ``code`` is the CLI-level code (TIMEOUT, RATE_LIMITED, ...) and
    ``details`` its evidence (``process_id``, ``exit_code``, ``stderr_tail``,
    ``api_error_status``, ``session_id``, the CLI's ``raw`` JSON)."""

    code = ErrorCode.CLI_CRASHED

    def record(self) -> dict[str, Any]:
        """The flat form kept in the turn's record, its JSONL log line and its events."""
        return {**(self.details or {}), "code": self.code, "message": self.message}
