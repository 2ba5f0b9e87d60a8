"""Property-based fuzzing of the wire protocol (issue 10's fault suite, wire part).

Whatever a client sends (random bytes, broken JSON, nesting up to and past orjson's limits,
huge command names, random but well-formed envelopes), every non-blank line gets exactly
one reply, in order, that is a well-formed success or a typed error; the id is echoed
whenever it can be; the connection keeps serving and the daemon stays healthy.

Examples per test: ``KSI_FUZZ_EXAMPLES`` (default 25, a few seconds in CI); e.g.
``KSI_FUZZ_EXAMPLES=2000 ./scripts/test tests/test_fuzz_protocol.py`` for a longer run.
"""

from __future__ import annotations

import os
import re
import socket
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.protocol import MAX_DEPTH
from tests.helpers import DaemonProcess, wait_for

settings.register_profile(
    "ksi-fuzz",
    max_examples=int(os.environ.get("KSI_FUZZ_EXAMPLES", "25")),
    deadline=None,  # a round trip to a subprocess; its time is not the property
    database=None,  # nothing written into the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile("ksi-fuzz")

# Commands that neither stop the daemon, run a (paid) turn, end the connection's
# persistence (AGENT_CONNECTION disconnect) nor subscribe (pushed events would interleave).
SAFE = [
    "HEALTH_CHECK",
    "GET_COMMANDS",
    "CONNECT",
    "GET_PROCESSES",
    "CANCEL_PROCESS",
    "GET_SESSIONS",
    "GET_SESSION",
    "SET_SHARED",
    "GET_SHARED",
    "DELETE_SHARED",
    "LIST_SHARED",
    "REGISTER_AGENT",
    "UNREGISTER_AGENT",
    "GET_AGENTS",
    "UNSUBSCRIBE",
    "PUBLISH",
    "GET_EVENTS",
]
CODE = re.compile(r"^[A-Z][A-Z0-9_]*$")
END = b'{"command":"HEALTH_CHECK","id":"__end__"}\n'

json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def envelopes(draw: st.DrawFn) -> bytes:
    """A well-formed request of a safe command, with random (mostly invalid) parameters."""
    obj: dict[str, Any] = {"command": draw(st.sampled_from(SAFE))}
    if draw(st.booleans()):
        obj["parameters"] = draw(
            st.dictionaries(
                st.sampled_from(
                    [
                        "key",
                        "value",
                        "event_type",
                        "payload",
                        "agent_id",
                        "since_seq",
                        "limit",
                        "event_types",
                        "process_id",
                        "session_id",
                        "x",
                    ]
                ),
                json_value,
                max_size=4,
            )
        )
    if draw(st.booleans()):
        obj["id"] = draw(json_value)
    if draw(st.booleans()):
        obj["metadata"] = {"request_id": draw(json_value)}
    if draw(st.integers(0, 9)) == 0:
        obj["version"] = draw(st.sampled_from(["2.0", "1.0", 2]))
    return orjson.dumps(obj)


@st.composite
def deep_requests(draw: st.DrawFn) -> bytes:
    """Nesting from shallow to past orjson's parse limit (1024), at the places a reply
    echoes or encodes: the id, metadata.request_id, a shared value, an event payload."""
    depth = draw(st.integers(1, 1100))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    deep = opener * depth + b"1" + closer * depth
    template = draw(
        st.sampled_from(
            [
                b'{"command":"HEALTH_CHECK","id":@}',
                b'{"command":"HEALTH_CHECK","id":1,"metadata":{"request_id":@}}',
                b'{"command":"SET_SHARED","id":2,"parameters":{"key":"fuzz-deep","value":@}}',
                b'{"command":"PUBLISH","id":3,"parameters":{"event_type":"FUZZ","payload":{"v":@}}}',
                b'{"command":"GET_SHARED","id":@,"parameters":{"key":"fuzz-deep"}}',
            ]
        )
    )
    return template.replace(b"@", deep)


def random_bytes() -> st.SearchStrategy[bytes]:
    return st.binary(max_size=200).map(lambda b: b.replace(b"\n", b" "))


def huge_names() -> st.SearchStrategy[bytes]:
    return st.integers(1, 300_000).map(lambda n: orjson.dumps({"command": "Q" * n, "id": n}))


def mutated() -> st.SearchStrategy[bytes]:
    """A valid request with a few bytes flipped, cut or inserted."""
    return st.tuples(envelopes(), st.integers(0, 10_000), random_bytes()).map(
        lambda t: (t[0][: t[1] % (len(t[0]) + 1)] + t[2] + t[0][t[1] % (len(t[0]) + 1) :]).replace(
            b"\n", b" "
        )
    )


def _depth(value: Any) -> int:
    """Nested arrays/objects, counted without recursion (the values go 1024 deep)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        v, level = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            deepest = max(deepest, level)
            stack.extend((item, level + 1) for item in v)
    return deepest


def _expected_id(line: bytes) -> tuple[bool, Any]:
    """Whether the reply to ``line`` must echo an id, and which."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return False, None
    if not isinstance(obj, dict) or "id" not in obj or _depth(obj["id"]) >= MAX_DEPTH - 1:
        return False, None
    return True, obj["id"]


def exchange(d: DaemonProcess, lines: list[bytes]) -> list[dict[str, Any]]:
    """CONNECT, the lines, a final HEALTH_CHECK on one connection; every reply, in order."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)  # never hangs: a missing reply fails the example
        s.connect(str(d.socket))
        s.sendall(b'{"command":"CONNECT"}\n' + b"".join(line + b"\n" for line in lines) + END)
        data = b""
        while not data.endswith(b'"id":"__end__"}\n'):
            chunk = s.recv(1 << 20)
            assert chunk, ("connection closed early", data[-300:])
            data += chunk
    return [orjson.loads(x) for x in data.splitlines()]


def check(d: DaemonProcess, lines: list[bytes]) -> None:
    replies = exchange(d, lines)
    answered = [line for line in lines if line.strip()]  # blank lines get no reply
    assert len(replies) == len(answered) + 2, (len(replies), len(answered))
    assert replies[0]["status"] == "success"
    assert (replies[-1]["status"], replies[-1]["id"]) == ("success", "__end__")
    for line, reply in zip(answered, replies[1:-1], strict=True):
        assert reply["status"] in ("success", "error"), reply
        assert "event" not in reply
        if reply["status"] == "error":
            err = reply["error"]
            assert CODE.match(err["code"]), err
            assert isinstance(err["message"], str)
            assert len(err["message"]) < 4096  # short, whatever was sent
        else:
            assert "result" in reply
        must_echo, rid = _expected_id(line)
        if must_echo:
            assert reply.get("id") == rid, (line[:200], reply)


@FUZZ
@given(st.lists(random_bytes() | mutated(), min_size=1, max_size=8))
def test_random_bytes_are_answered_line_by_line(d: DaemonProcess, lines: list[bytes]) -> None:
    check(d, lines)


@FUZZ
@given(st.lists(envelopes(), min_size=1, max_size=8))
def test_random_envelopes_are_answered_in_order(d: DaemonProcess, lines: list[bytes]) -> None:
    check(d, lines)


@FUZZ
@given(st.lists(deep_requests() | huge_names() | envelopes(), min_size=1, max_size=24))
def test_deep_nesting_and_huge_names_are_answered(d: DaemonProcess, lines: list[bytes]) -> None:
    # Up to 24 lines: past the 16 after which serving resumes from a loop callback.
    check(d, lines)


def test_the_daemon_is_healthy_after_the_fuzzing(d: DaemonProcess) -> None:
    assert d.running
    assert d.result("HEALTH_CHECK")["status"] == "healthy"
    # Every fuzzing connection was closed and freed on the daemon's side.
    wait_for(lambda: d.result("HEALTH_CHECK")["counts"]["connections"] == 1, 5)
    errors = [e for e in d.log_events() if e["level"] in ("error", "critical")]
    assert not errors, errors[:3]
