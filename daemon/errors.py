"""Typed errors with stable wire codes.

Every failure a client can see is a :class:`DaemonError` carrying a ``code`` (a stable,
upper-case string) and an optional ``details`` dict. The dispatcher is the only place
that turns exceptions into error replies; anything that is not a ``DaemonError`` becomes
``INTERNAL_ERROR`` with the traceback logged, never sent.

    DaemonError
    ├── ProtocolError        INVALID_JSON, INVALID_REQUEST, INVALID_UTF8, LINE_TOO_LONG
    ├── UnknownCommand       UNKNOWN_COMMAND
    ├── InvalidParameters    INVALID_PARAMETERS
    ├── NotFound             SESSION_NOT_FOUND, PROCESS_NOT_FOUND, AGENT_NOT_FOUND
    ├── Conflict             e.g. PROCESS_FINISHED (cancel of a finished process)
    ├── Unavailable          SHUTTING_DOWN, NOT_READY
    ├── StorageError         STORAGE_FULL, STORAGE_ERROR, STORAGE_BUSY
    └── SpawnFailed          the CLI's own codes (TIMEOUT, RATE_LIMITED, ...)
"""

from __future__ import annotations

from typing import Any


class DaemonError(Exception):
    """Base class: an error that is sent to the client as ``{"code", "message", "details"}``."""

    code: str = "INTERNAL_ERROR"

    def __init__(
        self, message: str, *, code: str | None = None, details: dict[str, Any] | None = None
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
    """The bytes on the wire were not a valid request envelope."""

    code = "INVALID_REQUEST"


class UnknownCommand(DaemonError):
    code = "UNKNOWN_COMMAND"


class InvalidParameters(DaemonError):
    code = "INVALID_PARAMETERS"


class NotFound(DaemonError):
    code = "NOT_FOUND"


class Conflict(DaemonError):
    code = "CONFLICT"


class Unavailable(DaemonError):
    code = "UNAVAILABLE"


class PermissionDenied(DaemonError):
    code = "PERMISSION_DENIED"


class StorageError(DaemonError):
    """The daemon's state could not be persisted, so the change did not happen.

    ``STORAGE_FULL``: the disk (or quota) holding the state is full; ``STORAGE_ERROR``: any
    other failure to write it (I/O error, read-only, corrupt); ``STORAGE_BUSY``: writes are
    queued faster than the disk takes them and the queue is at its byte limit (retry later).
    ``details`` name the SQLite error and the path.
    """

    code = "STORAGE_ERROR"


class SpawnFailed(DaemonError):
    """A Claude turn failed; ``code`` is the CLI-level code (TIMEOUT, RATE_LIMITED, ...)."""

    code = "CLI_CRASHED"
