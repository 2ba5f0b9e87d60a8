"""daemon.protocol: parsing request lines and encoding replies and events (pure functions)."""

from __future__ import annotations

import re

import orjson
import pytest

from daemon.errors import DaemonError, ErrorCode, InvalidParameters, ProtocolError
from daemon.protocol import (
    PROTOCOL_VERSION,
    Echo,
    Request,
    encode_error,
    encode_event,
    encode_success,
    iso_from_epoch,
    parse_request,
    utc_now_iso,
)

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def decode(line: bytes) -> dict:
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1, "one reply is exactly one line"
    return orjson.loads(line)


# -- parse_request ---------------------------------------------------------------------------


def test_minimal_request() -> None:
    req = parse_request(b'{"command": "HEALTH_CHECK"}\n')
    assert req.command == "HEALTH_CHECK"
    assert req.parameters == {}
    assert req.metadata is None
    assert req.has_id is False
    assert req.request_id is None


def test_full_envelope() -> None:
    line = orjson.dumps(
        {
            "command": "SET_SHARED",
            "parameters": {"key": "k", "value": [1, {"a": None}]},
            "version": PROTOCOL_VERSION,
            "metadata": {"request_id": "r-1", "client_id": "c"},
            "id": 42,
        }
    )
    req = parse_request(line)
    assert req.command == "SET_SHARED"
    assert req.parameters == {"key": "k", "value": [1, {"a": None}]}
    assert req.metadata == {"request_id": "r-1", "client_id": "c"}
    assert (req.id, req.has_id, req.request_id) == (42, True, "r-1")


def test_parameters_null_means_empty() -> None:
    assert parse_request(b'{"command":"X","parameters":null}').parameters == {}


@pytest.mark.parametrize("rid", [0, "", None, "abc", [1, 2], {"x": 1}, 1.5, False])
def test_any_id_is_kept_even_falsy(rid: object) -> None:
    req = parse_request(orjson.dumps({"command": "X", "id": rid}))
    assert req.has_id is True
    assert req.id == rid


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{not json", "INVALID_JSON"),
        (b"", "INVALID_JSON"),
        (b'{"command": "X"', "INVALID_JSON"),
        (b'{"command": "\xff"}', "INVALID_UTF8"),
        (b"\xc3\x28", "INVALID_UTF8"),
        (b"[1, 2]", "INVALID_REQUEST"),
        (b'"HEALTH_CHECK"', "INVALID_REQUEST"),
        (b"42", "INVALID_REQUEST"),
        (b"null", "INVALID_REQUEST"),
        (b"{}", "INVALID_REQUEST"),
        (b'{"command": ""}', "INVALID_REQUEST"),
        (b'{"command": 5}', "INVALID_REQUEST"),
        (b'{"command": "X", "parameters": [1]}', "INVALID_REQUEST"),
        (b'{"command": "X", "parameters": "a=b"}', "INVALID_REQUEST"),
        (b'{"command": "X", "version": "1.0"}', "INVALID_REQUEST"),
        (b'{"command": "X", "version": 2}', "INVALID_REQUEST"),
        (b'{"command": "X", "metadata": "m"}', "INVALID_REQUEST"),
        (b'{"command": "X", "params": {}}', "INVALID_REQUEST"),
    ],
)
def test_bad_lines_raise_typed_errors(line: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request(line)
    assert info.value.code == code
    assert info.value.message


def test_invalid_utf8_names_the_byte() -> None:
    with pytest.raises(ProtocolError, match="byte 13"):
        parse_request(b'{"command": "\xff"}')


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"command": "X", "parameters": 1}, "parameters"),
        ({"command": "X", "version": "9"}, "version"),
        ({"command": "X", "metadata": []}, "metadata"),
        ({"command": None}, "command"),
    ],
)
def test_envelope_errors_name_the_field(obj: dict, field: str) -> None:
    with pytest.raises(ProtocolError, match=f"'{field}'"):
        parse_request(orjson.dumps(obj))


def test_unknown_top_level_key_is_named() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request(b'{"command": "X", "zzz": 1, "params": {}}')
    assert "zzz" in info.value.message
    assert "params" in info.value.message


def test_envelope_error_keeps_the_echo() -> None:
    """A pipelining client must be able to match even a rejected envelope."""
    line = orjson.dumps(
        {"command": "GET_AGENTS", "version": "1.0", "id": "abc", "metadata": {"request_id": "r9"}}
    )
    with pytest.raises(ProtocolError) as info:
        parse_request(line)
    echo = info.value.echo
    assert echo == Echo("GET_AGENTS", "abc", True, "r9")
    reply = decode(encode_error(echo, info.value))
    assert reply["id"] == "abc"
    assert reply["request_id"] == "r9"
    assert reply["command"] == "GET_AGENTS"
    assert reply["error"]["code"] == "INVALID_REQUEST"


def test_envelope_error_without_id_has_no_id() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request(b'{"command": 7}')
    reply = decode(encode_error(info.value.echo, info.value))
    assert reply["command"] is None
    assert "id" not in reply
    assert "request_id" not in reply


# -- encoders ---------------------------------------------------------------------------


def test_encode_success_echoes_id_and_request_id() -> None:
    req = parse_request(b'{"command":"GET_AGENTS","id":7,"metadata":{"request_id":"q"}}')
    reply = decode(encode_success(req, {"agents": [], "total": 0}))
    assert reply == {
        "status": "success",
        "command": "GET_AGENTS",
        "result": {"agents": [], "total": 0},
        "id": 7,
        "request_id": "q",
    }


def test_encode_success_echoes_null_id() -> None:
    req = parse_request(b'{"command":"X","id":null}')
    reply = decode(encode_success(req, {}))
    assert "id" in reply
    assert reply["id"] is None


def test_encode_success_without_id() -> None:
    reply = decode(encode_success(Request("X", {}), {"a": 1}))
    assert reply == {"status": "success", "command": "X", "result": {"a": 1}}


def test_encode_error_from_request() -> None:
    req = parse_request(b'{"command":"X","id":[1],"metadata":{"request_id":5}}')
    err = InvalidParameters("bad", details={"errors": [{"field": "key"}]})
    reply = decode(encode_error(req, err))
    assert reply == {
        "status": "error",
        "command": "X",
        "error": {
            "code": "INVALID_PARAMETERS",
            "message": "bad",
            "details": {"errors": [{"field": "key"}]},
        },
        "id": [1],
        "request_id": 5,
    }


def test_encode_error_without_echo() -> None:
    reply = decode(encode_error(None, ProtocolError("too long", code=ErrorCode.LINE_TOO_LONG)))
    assert reply == {
        "status": "error",
        "command": None,
        "error": {"code": "LINE_TOO_LONG", "message": "too long"},
    }


def test_error_codes_and_defaults() -> None:
    assert DaemonError("x").code == "INTERNAL_ERROR"
    assert DaemonError("x", code=ErrorCode.CONFLICT).to_wire() == {
        "code": "CONFLICT",
        "message": "x",
    }
    assert "details" not in DaemonError("x", details={}).to_wire()


def test_unicode_round_trips() -> None:
    req = parse_request(orjson.dumps({"command": "SET_SHARED", "parameters": {"v": "é✓😀"}}))
    assert req.parameters["v"] == "é✓😀"
    reply = decode(encode_success(req, {"v": "é✓😀\n"}))
    assert reply["result"]["v"] == "é✓😀\n"


def test_encode_event_shape() -> None:
    ev = decode(encode_event("PROCESS_COMPLETE", {"process_id": "p"}, 17, "2024-01-01T00:00:00Z"))
    assert ev == {
        "event": "PROCESS_COMPLETE",
        "type": "PROCESS_COMPLETE",  # what KSI's clients dispatch on
        "data": {"process_id": "p"},
        "seq": 17,
        "timestamp": "2024-01-01T00:00:00Z",
    }
    assert "status" not in ev  # told apart from replies by shape


def test_timestamps() -> None:
    assert ISO_Z.match(utc_now_iso())
    assert iso_from_epoch(0) == "1970-01-01T00:00:00.000Z"
    assert iso_from_epoch(1.2345) == "1970-01-01T00:00:01.234Z"
