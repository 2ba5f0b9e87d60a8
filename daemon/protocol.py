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

Limits that keep every reply encodable and short:

- ``NESTING_TOO_DEEP``: a request nested more than :data:`MAX_DEPTH` (128) arrays/objects
  deep. orjson parses 1024 levels but encodes only 254, and a reply wraps what it echoes
  (an ``id``, a shared value, an event payload inside GET_EVENTS) a few levels deeper; a
  request that was parsed but whose reply could not be encoded left the client without an
  answer. 128 leaves the encoder 126 levels of room for any reply's own envelope.
- ``INVALID_REQUEST`` for a ``command`` longer than :data:`MAX_COMMAND_CHARS` (128): the
  name is echoed in the reply and quoted in the message, so a 7 MB name made a 14 MB reply.
- :func:`encode_error` never raises: an echo it cannot encode is left out of the reply.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from daemon.errors import DaemonError, ErrorCode, ProtocolError

PROTOCOL_VERSION = "2.0"
_ENVELOPE_KEYS = frozenset({"command", "parameters", "version", "metadata", "id"})

MAX_DEPTH = 128  # arrays/objects nested in one request, the envelope object included
MAX_COMMAND_CHARS = 128
# orjson encodes at most this many nested containers (255 raise "Recursion limit reached").
_ENCODER_DEPTH = 254
# An echoed id or request_id sits one level below the reply's top object.
_ECHO_DEPTH = MAX_DEPTH - 1


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
                f"request is not valid UTF-8 (byte {uexc.start})", code=ErrorCode.INVALID_UTF8
            ) from None
        raise ProtocolError(f"invalid JSON: {exc}", code=ErrorCode.INVALID_JSON) from None
    if not isinstance(obj, dict):
        raise ProtocolError(
            f"a request must be a JSON object, got {type(obj).__name__}",
            code=ErrorCode.INVALID_REQUEST,
        )
    # Nesting deeper than MAX_DEPTH needs more than MAX_DEPTH opening brackets, so the
    # exact check (an encode of the request) runs only for lines that have that many:
    # two memchr-speed counts, and none at all for a line too short to hold them.
    if (
        len(line) > 2 * MAX_DEPTH
        and line.count(b"[") + line.count(b"{") > MAX_DEPTH
        and (too_deep(obj))
    ):
        raise ProtocolError(
            f"request nested more than {MAX_DEPTH} arrays/objects deep",
            code=ErrorCode.NESTING_TOO_DEEP,
            details={"max_depth": MAX_DEPTH},
            echo=echo_of(obj, check_depth=True),
        )
    command = obj.get("command")
    if not isinstance(command, str) or not command:
        raise _envelope_error(obj, "field 'command': required, a non-empty string")
    if len(command) > MAX_COMMAND_CHARS:
        err = _envelope_error(
            obj, f"field 'command': at most {MAX_COMMAND_CHARS} characters, got {len(command)}"
        )
        err.details = {"max_length": MAX_COMMAND_CHARS}
        raise err
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
    return ProtocolError(message, code=ErrorCode.INVALID_REQUEST, echo=echo_of(obj))


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether ``value`` (parsed JSON) nests more than ``limit`` arrays/objects.

    Measured by the encoder itself, in C: wrapped in ``254 - limit`` more lists, the value
    encodes only if it is at most ``limit`` deep. A walk in Python would cost ~1000 times
    more on a large payload."""
    probe = value
    for _ in range(_ENCODER_DEPTH - limit):
        probe = [probe]
    try:
        orjson.dumps(probe)
    except TypeError:  # orjson.JSONEncodeError: parsed JSON fails only on depth
        return True
    return False


def echo_of(obj: dict[str, Any], *, check_depth: bool = False) -> Echo:
    """The echo of a request that could not be served. ``check_depth``: leave out an id
    or request_id too deep to encode (of a request rejected as NESTING_TOO_DEEP)."""
    command = obj.get("command")
    if not isinstance(command, str) or len(command) > MAX_COMMAND_CHARS:
        command = None  # an over-long name is not sent back
    metadata = obj.get("metadata")
    echo_id = obj.get("id")
    has_id = "id" in obj
    request_id = metadata.get("request_id") if isinstance(metadata, dict) else None
    if check_depth:
        if has_id and too_deep(echo_id, _ECHO_DEPTH):
            echo_id, has_id = None, False
        if request_id is not None and too_deep(request_id, _ECHO_DEPTH):
            request_id = None
    return Echo(command, echo_id, has_id, request_id)


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
    """The error reply line; never raises. What cannot be encoded (an echo or details too
    deep, say) is left out rather than leaving the client with no reply at all."""
    reply: dict[str, Any] = {
        "status": "error",
        "command": echo.command if echo is not None else None,
        "error": error.to_wire(),
    }
    if echo is not None:
        _add_echo(reply, echo.id, echo.has_id, echo.request_id)
    try:
        return orjson.dumps(reply, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:
        pass
    reply.pop("id", None)
    reply.pop("request_id", None)
    try:
        return orjson.dumps(reply, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:
        reply["error"] = {"code": error.code, "message": str(error.message)}
        return orjson.dumps(reply, option=orjson.OPT_APPEND_NEWLINE)


def encode_event(
    event_type: str,
    data: Any,
    seq: int,
    timestamp: str,
    *,
    from_agent: str | None = None,
    to_agent: str | None = None,
    parent_process_id: str | None = None,
) -> bytes:
    """An event's wire line (``event`` and, for KSI's clients, ``type``). Who sent it
    (``from_agent``), to whom (``to_agent``) and which turn caused it (``parent_process_id``:
    a turn's MCP call, daemon/mcp_face) are keys of the line when known, so a live subscriber
    sees them as GET_EVENTS does."""
    # ``type`` repeats ``event``: the original KSI's clients dispatch pushed messages on it.
    line: dict[str, Any] = {
        "event": event_type,
        "type": event_type,
        "data": data,
        "seq": seq,
        "timestamp": timestamp,
    }
    if from_agent is not None:
        line["from_agent"] = from_agent
    if to_agent is not None:
        line["to_agent"] = to_agent
    if parent_process_id is not None:
        line["parent_process_id"] = parent_process_id
    return orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)


def ksi_shaped(wire: bytes) -> bytes:
    """An event line as the original KSI's bus also wrote it, for its clients: the payload's
    fields at the top level (never over the line's own keys) and ``from``; a
    PROCESS_COMPLETE's ``status`` is KSI's ``success`` / ``error`` (ours stays in ``data``)
    and its ``error`` the message. Everything of our own shape is kept."""
    line: dict[str, Any] = orjson.loads(wire)
    data = line.get("data")
    if isinstance(data, dict):
        for key, value in data.items():
            line.setdefault(key, value)
        if line.get("event") == "PROCESS_COMPLETE":
            line["status"] = "success" if data.get("status") == "completed" else "error"
            error = data.get("error")
            if isinstance(error, dict):
                line["error"] = error.get("message", "")
    line.setdefault("from", line.get("from_agent") or "daemon")
    return orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)


def with_echo(wire: bytes, req: Request) -> bytes:
    """An encoded event line with the ``id`` (and ``request_id``) of the request it answers
    to spliced in: a sync SPAWN's streamed progress, told apart from subscribed events on
    the same connection. ``wire`` is a line :func:`encode_event` wrote (``...}\n``)."""
    echo: dict[str, Any] = {}
    _add_echo(echo, req.id, req.has_id, req.request_id)
    if not echo:
        return wire
    return wire[:-2] + b"," + orjson.dumps(echo)[1:] + b"\n"
