"""The wire format: one UTF-8 JSON object per line, each way.

Request::

    {"command": "NAME", "parameters": {...}, "version": "2.0"?, "metadata": {...}?, "id"?: any}

Reply (echoes ``id`` and ``metadata.request_id`` so pipelined replies can be matched)::

    {"status": "success", "command": "NAME", "result": {...}, "id"?: ..., "request_id"?: ...}
    {"status": "error", "command": "NAME" | null, "error": {"code", "message", "details"?}, ...}

Pushed event (told apart from replies by the ``event`` key)::

    {"event": "PROCESS_COMPLETE", "data": {...}, "seq": 17, "timestamp": "...Z"}

The envelope is checked by hand rather than with pydantic: it is on the hot path of every
request and has five keys. Command parameters are validated by pydantic in the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from daemon.errors import DaemonError, ProtocolError

PROTOCOL_VERSION = "2.0"
_ENVELOPE_KEYS = frozenset({"command", "parameters", "version", "metadata", "id"})


def utc_now_iso() -> str:
    """ISO-8601 UTC with millisecond precision and a trailing ``Z`` (the KSI convention)."""
    # isoformat truncates to milliseconds like strftime's %f[:-3], at ~60% of its cost;
    # [:-6] drops the "+00:00" offset.
    return datetime.now(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def iso_from_epoch(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


@dataclass(slots=True)
class Request:
    command: str
    parameters: dict[str, Any]
    metadata: dict[str, Any] | None = None
    id: Any = None
    has_id: bool = False

    @property
    def request_id(self) -> Any:
        return self.metadata.get("request_id") if self.metadata else None


@dataclass(slots=True)
class Echo:
    """What a reply must carry back so the client can match it, even for a broken request."""

    command: str | None = None
    id: Any = None
    has_id: bool = False
    request_id: Any = None


def parse_request(line: bytes) -> Request:
    """Parse one line into a :class:`Request` or raise a :class:`ProtocolError`.

    On a partly valid envelope the error carries as much of the echo as could be read,
    via :func:`echo_of`, so that a pipelining client can still match the error reply.
    """
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as uexc:
            raise ProtocolError(
                f"request is not valid UTF-8 (byte {uexc.start})", code="INVALID_UTF8"
            ) from None
        raise ProtocolError(f"invalid JSON: {exc}", code="INVALID_JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(
            f"a request must be a JSON object, got {type(obj).__name__}", code="INVALID_REQUEST"
        )
    command = obj.get("command")
    if not isinstance(command, str) or not command:
        raise _envelope_error(obj, "field 'command': required, a non-empty string")
    if not obj.keys() <= _ENVELOPE_KEYS:  # a subset test builds no set on the hot path
        extra = obj.keys() - _ENVELOPE_KEYS
        raise _envelope_error(
            obj,
            f"unknown top-level field(s) {sorted(extra)}; "
            "allowed: command, parameters, version, metadata, id",
        )
    params = obj.get("parameters")
    if params is None:
        params = {}
    elif not isinstance(params, dict):
        raise _envelope_error(obj, "field 'parameters': must be a JSON object")
    version = obj.get("version")
    if version is not None and version != PROTOCOL_VERSION:
        raise _envelope_error(obj, f"field 'version': only {PROTOCOL_VERSION!r} is supported")
    metadata = obj.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise _envelope_error(obj, "field 'metadata': must be a JSON object")
    return Request(command, params, metadata, obj.get("id"), "id" in obj)


def _envelope_error(obj: dict[str, Any], message: str) -> ProtocolError:
    err = ProtocolError(message, code="INVALID_REQUEST")
    err.echo = echo_of(obj)  # type: ignore[attr-defined]
    return err


def echo_of(obj: dict[str, Any]) -> Echo:
    command = obj.get("command")
    metadata = obj.get("metadata")
    return Echo(
        command if isinstance(command, str) else None,
        obj.get("id"),
        "id" in obj,
        metadata.get("request_id") if isinstance(metadata, dict) else None,
    )


def _add_echo(reply: dict[str, Any], echo_id: Any, has_id: bool, request_id: Any) -> None:
    if has_id:
        reply["id"] = echo_id
    if request_id is not None:
        reply["request_id"] = request_id


def encode_success(req: Request, result: Any) -> bytes:
    reply: dict[str, Any] = {"status": "success", "command": req.command, "result": result}
    _add_echo(reply, req.id, req.has_id, req.request_id)
    return orjson.dumps(reply, option=orjson.OPT_APPEND_NEWLINE)


def encode_error(echo: Request | Echo | None, error: DaemonError) -> bytes:
    reply: dict[str, Any] = {
        "status": "error",
        "command": echo.command if echo is not None else None,
        "error": error.to_wire(),
    }
    if echo is not None:
        _add_echo(reply, echo.id, echo.has_id, echo.request_id)
    return orjson.dumps(reply, option=orjson.OPT_APPEND_NEWLINE)


def encode_event(event_type: str, data: Any, seq: int, timestamp: str) -> bytes:
    return orjson.dumps(
        {"event": event_type, "data": data, "seq": seq, "timestamp": timestamp},
        option=orjson.OPT_APPEND_NEWLINE,
    )
