"""Every class of bad input gets a typed error (or a clean close) and a log line, and the
daemon goes on serving everyone else, including the connection that sent it."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from tests.helpers import DaemonProcess, raw_exchange, wait_for
from tests.inproc import InProcessDaemon
from tests.wire import Wire, persistent

LIMIT = 4096


@pytest.fixture(scope="module")
def d() -> Iterator[DaemonProcess]:
    dp = InProcessDaemon(env={"KSI_MAX_LINE_BYTES": str(LIMIT)}).start()
    try:
        yield dp
    finally:
        dp.cleanup()


def one_reply(d: DaemonProcess, data: bytes) -> dict[str, Any]:
    """Send on a one-shot connection (never half-closed): exactly one reply line, then EOF."""
    out = raw_exchange(d.socket, data, timeout=5)
    assert out.endswith(b"\n"), out
    assert out.count(b"\n") == 1, out
    reply: dict[str, Any] = orjson.loads(out)
    return reply


def half_closed(d: DaemonProcess, data: bytes) -> bytes:
    """Send, half-close (as `nc -N` or a pipe into socat would), read until EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(d.socket))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def expect_error(reply: dict[str, Any], code: str, command: str | None = None) -> dict[str, Any]:
    assert reply["status"] == "error", reply
    assert reply["command"] == command, reply
    err: dict[str, Any] = reply["error"]
    assert err["code"] == code, reply
    assert isinstance(err["message"], str)
    assert err["message"]
    return err


class LogCursor:
    """New structured log lines of the daemon since the cursor was made."""

    def __init__(self, d: DaemonProcess) -> None:
        self.d = d
        self.start = len(d.log_events())

    def new(self) -> list[dict[str, Any]]:
        return self.d.log_events()[self.start :]

    def wait(self, event: str, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            for line in self.new():
                if line["event"] == event and all(line.get(k) == v for k, v in fields.items()):
                    return line
            return None

        found: dict[str, Any] = wait_for(find, timeout)
        return found


def assert_healthy(d: DaemonProcess) -> None:
    assert d.running
    assert d.call("HEALTH_CHECK")["result"]["status"] == "healthy"


# -- each class on a one-shot connection -------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"{not json}\n",
        b'{"command": "HEALTH_CHECK"\n',
        b"{'command': 'X'}\n",
        b'{"command":"X","parameters":{"v":NaN}}\n',
        b"[" * 1500 + b"]" * 1500 + b"\n",
        b'{"command":"HEALTH_CHECK"} trailing\n',
    ],
    ids=["garbage", "truncated", "single-quotes", "nan", "deep-nesting", "trailing-data"],
)
def test_invalid_json(d: DaemonProcess, line: bytes) -> None:
    logs = LogCursor(d)
    err = expect_error(one_reply(d, line), "INVALID_JSON")
    assert "invalid JSON" in err["message"]
    logs.wait("request.rejected", code="INVALID_JSON")
    assert logs.new()[-1]["level"] == "warning"
    assert_healthy(d)


@pytest.mark.parametrize(
    "line", [b"[]", b'["HEALTH_CHECK"]', b'"HEALTH_CHECK"', b"42", b"null", b"true", b"3.5"]
)
def test_non_object_json(d: DaemonProcess, line: bytes) -> None:
    logs = LogCursor(d)
    err = expect_error(one_reply(d, line + b"\n"), "INVALID_REQUEST")
    assert "JSON object" in err["message"]
    logs.wait("request.rejected", code="INVALID_REQUEST")
    assert_healthy(d)


def test_unknown_command_with_suggestion(d: DaemonProcess) -> None:
    logs = LogCursor(d)
    reply = d.request("HEALTH_CHEK", id=3)
    err = expect_error(reply, "UNKNOWN_COMMAND", "HEALTH_CHEK")
    assert reply["id"] == 3
    assert "HEALTH_CHECK" in err["message"]
    assert err["details"]["suggestions"][0] == "HEALTH_CHECK"
    # Lower case and a typo still find their way.
    err = expect_error(d.request("set_shard"), "UNKNOWN_COMMAND", "set_shard")
    assert "SET_SHARED" in err["details"]["suggestions"]
    # Nothing close: no suggestions, but a pointer to GET_COMMANDS.
    err = expect_error(d.request("XYZZY"), "UNKNOWN_COMMAND", "XYZZY")
    assert "GET_COMMANDS" in err["message"]
    assert "details" not in err
    logs.wait("command.failed", command="HEALTH_CHEK", code="UNKNOWN_COMMAND")
    assert_healthy(d)


@pytest.mark.parametrize(
    ("command", "params", "field", "type_"),
    [
        ("SET_SHARED", {"key": "k"}, "value", "missing"),
        ("GET_SHARED", {}, "key", "missing"),
        ("GET_SHARED", {"key": 5}, "key", "string_type"),
        ("GET_SHARED", {"key": ""}, "key", "string_too_short"),
        ("GET_EVENTS", {"limit": "many"}, "limit", "int_parsing"),
        ("GET_EVENTS", {"since_seq": -5}, "since_seq", "greater_than_equal"),
        ("GET_EVENTS", {"event_types": "X"}, "event_types", "list_type"),
        (
            "REGISTER_AGENT",
            {"agent_id": "a", "role": "tester", "metadata": []},
            "metadata",
            "dict_type",
        ),
        ("REGISTER_AGENT", {"agent_id": "a"}, "role", "missing"),  # KSI required it too
        ("REGISTER_AGENT", {"agent_id": "a", "role": ""}, "role", "string_too_short"),
        ("PUBLISH", {"event_type": "OK", "payload": "text"}, "payload", "dict_type"),
        ("SUBSCRIBE", {"event_types": ["A"], "agent_id": ""}, "agent_id", "string_too_short"),
        ("HEALTH_CHECK", {"verbose": True}, "verbose", "extra_forbidden"),
        ("SET_SHARED", {"key": "k", "value": 1, "ttl": 5}, "ttl", "extra_forbidden"),
    ],
)
def test_invalid_parameters_name_the_field(
    d: DaemonProcess, command: str, params: dict, field: str, type_: str
) -> None:
    logs = LogCursor(d)
    reply = d.request(command, params, id="p", metadata={"request_id": "rq"})
    err = expect_error(reply, "INVALID_PARAMETERS", command)
    assert (reply["id"], reply["request_id"]) == ("p", "rq")
    assert f"{field}:" in err["message"]
    errors = err["details"]["errors"]
    assert {"field": field, "type": type_} == {k: errors[0][k] for k in ("field", "type")}
    logs.wait("command.failed", command=command, code="INVALID_PARAMETERS")
    assert_healthy(d)


def test_several_invalid_parameters_are_all_named(d: DaemonProcess) -> None:
    err = expect_error(
        d.request("REGISTER_AGENT", {"role": 5, "extra": 1}), "INVALID_PARAMETERS", "REGISTER_AGENT"
    )
    assert {e["field"] for e in err["details"]["errors"]} == {"agent_id", "role", "extra"}


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        ({"command": "HEALTH_CHECK", "params": {}}, "params"),
        ({"command": "HEALTH_CHECK", "request_id": "x"}, "request_id"),
        ({"command": "HEALTH_CHECK", "version": "1.0"}, "version"),
        ({"command": "HEALTH_CHECK", "version": 2.0}, "version"),
        ({"command": "HEALTH_CHECK", "parameters": [1]}, "parameters"),
        ({"command": "HEALTH_CHECK", "metadata": "m"}, "metadata"),
        ({"command": ["HEALTH_CHECK"]}, "command"),
        ({"parameters": {}}, "command"),
    ],
)
def test_bad_envelope(d: DaemonProcess, obj: dict, needle: str) -> None:
    logs = LogCursor(d)
    reply = one_reply(d, orjson.dumps({**obj, "id": 99}) + b"\n")
    command = obj["command"] if isinstance(obj.get("command"), str) else None
    err = expect_error(reply, "INVALID_REQUEST", command)
    assert needle in err["message"]
    assert reply["id"] == 99  # still matched to its request
    logs.wait("request.rejected", code="INVALID_REQUEST")
    assert_healthy(d)


def test_version_2_is_accepted(d: DaemonProcess) -> None:
    assert d.request("HEALTH_CHECK", version="2.0")["status"] == "success"


@pytest.mark.parametrize(
    "line",
    [
        b'{"command": "\xff\xfe"}\n',
        b"\xc3\x28\n",
        b'{"command":"SET_SHARED","parameters":{"key":"k","value":"\xed\xa0\x80"}}\n',
    ],
    ids=["bad-bytes", "bad-sequence", "surrogate"],
)
def test_invalid_utf8(d: DaemonProcess, line: bytes) -> None:
    logs = LogCursor(d)
    err = expect_error(one_reply(d, line), "INVALID_UTF8")
    assert "UTF-8" in err["message"]
    logs.wait("request.rejected", code="INVALID_UTF8")
    assert_healthy(d)


# -- line length ------------------------------------------------------------------------------


def _line_of(size: int) -> bytes:
    """A valid SET_SHARED request line of exactly ``size`` bytes before the newline."""
    head = b'{"command":"SET_SHARED","parameters":{"key":"long","value":"'
    tail = b'"}}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def test_line_at_the_limit_is_accepted(d: DaemonProcess) -> None:
    line = _line_of(LIMIT)
    assert len(line) == LIMIT
    assert one_reply(d, line + b"\n")["status"] == "success"


def test_line_over_the_limit_is_refused(d: DaemonProcess) -> None:
    logs = LogCursor(d)
    err = expect_error(one_reply(d, _line_of(LIMIT + 1) + b"\n"), "LINE_TOO_LONG")
    assert err["details"] == {"limit_bytes": LIMIT}
    logs.wait("request.rejected", code="LINE_TOO_LONG")
    assert_healthy(d)


async def test_oversized_lines_on_a_persistent_connection(d: DaemonProcess) -> None:
    async with await persistent(d.socket) as w:
        big = _line_of(LIMIT + 1) + b"\n"
        huge = b'{"command":"HEALTH_CHECK","pad":"' + b"y" * (2 * 1024 * 1024) + b'"}\n'
        await w.send_raw(
            b'{"command":"HEALTH_CHECK","id":1}\n'
            + big
            + b'{"command":"GET_SHARED","parameters":{"key":"long"},"id":2}\n'
            + huge
            + b'{"command":"HEALTH_CHECK","id":3}\n'
        )
        first = await w.recv()
        assert (first["id"], first["status"]) == (1, "success")
        expect_error(await w.recv(), "LINE_TOO_LONG")
        second = await w.recv()
        assert second["id"] == 2
        assert second["status"] == "success"
        expect_error(await w.recv(), "LINE_TOO_LONG")
        third = await w.recv()
        assert (third["id"], third["status"]) == (3, "success")
        # An oversized line that arrives slowly, in pieces, is skipped just the same.
        for _ in range(5):
            await w.send_raw(b"z" * 3000)
            await asyncio.sleep(0.01)
        await w.send_raw(b"\n")
        expect_error(await w.recv(), "LINE_TOO_LONG")
        assert (await w.call("HEALTH_CHECK"))["status"] == "success"
    assert_healthy(d)


# -- framing ---------------------------------------------------------------------------------


def test_blank_lines_are_ignored(d: DaemonProcess) -> None:
    reply = one_reply(d, b'\n\n   \n\t\r\n{"command":"HEALTH_CHECK","id":"after-blanks"}\n')
    assert reply["status"] == "success"
    assert reply["id"] == "after-blanks"


async def test_blank_lines_on_a_persistent_connection(d: DaemonProcess) -> None:
    async with await persistent(d.socket) as w:
        await w.send_raw(b"\n \n\n")
        await w.send_raw(b'{"command":"HEALTH_CHECK","id":"x"}\n')
        reply = await w.recv()  # the very next line is the reply: blanks got none
        assert reply["id"] == "x"
        assert reply["status"] == "success"


def test_crlf_line_endings(d: DaemonProcess) -> None:
    assert one_reply(d, b'{"command":"HEALTH_CHECK"}\r\n')["status"] == "success"


def test_final_line_without_newline_is_answered(d: DaemonProcess) -> None:
    out = half_closed(d, b'{"command":"HEALTH_CHECK","id":"no-newline"}')
    reply = orjson.loads(out)
    assert reply["status"] == "success"
    assert reply["id"] == "no-newline"
    # On a persistent connection, the last of several lines too.
    out = half_closed(d, b'{"command":"CONNECT","id":1}\n{"command":"GET_AGENTS","id":2}')
    replies = [orjson.loads(x) for x in out.splitlines()]
    assert [(r["id"], r["status"]) for r in replies] == [(1, "success"), (2, "success")]


def test_empty_connection_is_closed_quietly(d: DaemonProcess) -> None:
    logs = LogCursor(d)
    assert half_closed(d, b"") == b""
    assert half_closed(d, b"\n\n") == b""
    assert_healthy(d)
    assert not [e for e in logs.new() if e["level"] in ("warning", "error")]


# -- bad input on a persistent connection keeps it open ----------------------------------------


async def test_persistent_connection_survives_every_bad_line(d: DaemonProcess) -> None:
    bad: list[tuple[bytes, str]] = [
        (b"{oops\n", "INVALID_JSON"),
        (b"[1,2]\n", "INVALID_REQUEST"),
        (b'{"command":"NOPE","id":"u"}\n', "UNKNOWN_COMMAND"),
        (b'{"command":"SET_SHARED","parameters":{},"id":"m"}\n', "INVALID_PARAMETERS"),
        (b'{"command":"HEALTH_CHECK","x":1}\n', "INVALID_REQUEST"),
        (b'{"command":"HEALTH_CHECK","version":"3"}\n', "INVALID_REQUEST"),
        (b"\xff\xff\n", "INVALID_UTF8"),
        (_line_of(LIMIT * 3) + b"\n", "LINE_TOO_LONG"),
        (
            b'{"command":"PUBLISH","parameters":{"event_type":"PROCESS_FAKE"}}\n',
            "INVALID_PARAMETERS",
        ),
    ]
    async with await persistent(d.socket) as w:
        await w.result("SUBSCRIBE", {"event_types": ["BAD_INPUT_OK"]})
        await w.send_raw(
            b"".join(line for line, _ in bad) + b'{"command":"HEALTH_CHECK","id":"end"}\n'
        )
        for _, code in bad:
            reply = await w.recv()
            assert reply["status"] == "error", reply
            assert reply["error"]["code"] == code, reply
        assert (await w.recv())["id"] == "end"
        # Still subscribed, still answering.
        res = await w.result("PUBLISH", {"event_type": "BAD_INPUT_OK"})
        ev = await w.recv()
        assert (ev["event"], ev["seq"]) == ("BAD_INPUT_OK", res["seq"])


async def test_neighbours_are_unaffected(d: DaemonProcess) -> None:
    async with await persistent(d.socket) as neighbour, await Wire.open(d.socket) as sub:
        await sub.result("SUBSCRIBE", {"event_types": ["NEIGHBOUR"]})
        bad_lines = [
            b"{oops\n",
            b"\xff\n",
            b"[]\n",
            b'{"command":"NOPE"}\n',
            _line_of(LIMIT + 100) + b"\n",
        ]
        for i, line in enumerate(bad_lines):
            await asyncio.to_thread(raw_exchange, d.socket, line, 5)
            res = await neighbour.result(
                "PUBLISH", {"event_type": "NEIGHBOUR", "payload": {"i": i}}
            )
            ev = await sub.recv()
            assert (ev["seq"], ev["data"]) == (res["seq"], {"i": i})


# -- clients that go away --------------------------------------------------------------------


def _send_and_vanish(d: DaemonProcess, data: bytes, reset: bool, wait_s: float = 0.0) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(d.socket))
    s.sendall(data)
    if wait_s:
        time.sleep(wait_s)  # the daemon is mid-reply: its unread output fills the socket
    if reset:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()


def test_client_disconnecting_mid_reply(d: DaemonProcess) -> None:
    logs = LogCursor(d)
    for i in range(30):
        _send_and_vanish(d, b'{"command":"GET_COMMANDS"}\n', reset=i % 2 == 0)
    # Persistent connections that pipeline a lot and leave without reading. They leave once
    # the daemon is surely mid-reply (~1.5 MB of replies, far more than a socket buffers):
    # closing at once raced with the daemon's first write, and sometimes nothing was cut off.
    for _ in range(5):
        _send_and_vanish(
            d,
            b'{"command":"CONNECT"}\n' + b'{"command":"GET_COMMANDS"}\n' * 50,
            reset=False,
            wait_s=0.2,
        )
    logs.wait("connection.lost_mid_reply")
    assert_healthy(d)

    def settled() -> bool:
        return bool(d.call("HEALTH_CHECK")["result"]["counts"]["connections"] == 1)

    wait_for(settled, 5)  # every abandoned connection was closed on the daemon's side
    assert not [e for e in logs.new() if e["level"] == "error"]


def test_client_disconnecting_before_sending(d: DaemonProcess) -> None:
    logs = LogCursor(d)
    for _ in range(20):
        _send_and_vanish(d, b"", reset=True)
        _send_and_vanish(d, b'{"command":"HEALTH_', reset=False)  # half a line, then gone
    assert_healthy(d)
    assert not [e for e in logs.new() if e["level"] == "error"]
