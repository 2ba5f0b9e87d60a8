"""Wire faults (issue 10): deep nesting, huge command names, memory bounds in bytes (events,
subscriber backlogs, the history, incomplete input lines), idle partial lines, the
SUBSCRIBER_DROPPED notice of a slow subscriber, and SUBSCRIBE since_seq (nothing lost).

Each test here failed before its fix."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import orjson
import pytest

from daemon import protocol
from daemon.app import Daemon
from daemon.errors import DaemonError, ErrorCode
from daemon.events.bus import EventBus
from daemon.events.subscriber import Subscriber
from daemon.protocol import MAX_DEPTH, Echo, encode_error, parse_request
from daemon.server import Server
from daemon.server.subscriptions import DROP_GRACE_S
from daemon.settings import Settings
from daemon.state.db import Store
from tests.helpers import (
    FAKE_CLAUDE,
    DaemonProcess,
    eventually,
    raw_exchange,
    short_tmpdir,
    wait_for,
)
from tests.inproc import InProcessDaemon
from tests.wire import Wire, persistent

QUEUE = 200
EVENT_BYTES = 64 * 1024
PENDING = 1024 * 1024
IDLE_S = 2.0
HISTORY = 100  # of the `small_history` daemon


@pytest.fixture(scope="module")
def d() -> Iterator[DaemonProcess]:
    dp = InProcessDaemon(
        env={
            "KSI_SUBSCRIBER_QUEUE": str(QUEUE),
            "KSI_MAX_EVENT_BYTES": str(EVENT_BYTES),
            "KSI_MAX_PENDING_INPUT_BYTES": str(PENDING),
            "KSI_PARTIAL_LINE_TIMEOUT_S": str(IDLE_S),
        }
    ).start()
    try:
        yield dp
    finally:
        dp.cleanup()


@pytest.fixture
def small_history() -> Iterator[DaemonProcess]:
    """Default limits but a short history (and no 1 MiB input budget, as `d` has)."""
    dp = InProcessDaemon(env={"KSI_EVENT_HISTORY": str(HISTORY)}).start()
    try:
        yield dp
    finally:
        dp.cleanup()


def nested(depth: int, leaf: Any = 1) -> Any:
    """``depth`` arrays, one inside the other."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def deep_line(request: dict[str, Any], depth: int) -> bytes:
    """``request`` as a line, its ``"DEEP"`` value replaced by ``depth`` nested arrays
    (orjson itself cannot encode more than 254)."""
    line = orjson.dumps(request) + b"\n"
    assert line.count(b'"DEEP"') == 1
    return line.replace(b'"DEEP"', b"[" * depth + b"1" + b"]" * depth)


def one_reply(d: DaemonProcess, data: bytes) -> dict[str, Any]:
    out = raw_exchange(d.socket, data, timeout=5)
    assert out.count(b"\n") == 1, out[:300]
    reply: dict[str, Any] = orjson.loads(out)
    return reply


def error_code(reply: dict[str, Any]) -> str:
    assert reply["status"] == "error", reply
    code: str = reply["error"]["code"]
    return code


# -- 1. deep nesting ------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [MAX_DEPTH, 200, 254, 255, 300, 1022])
def test_a_deep_id_gets_a_typed_error_without_the_id(d: DaemonProcess, depth: int) -> None:
    # The id sits at level 2 of the request: a request nested `depth + 1` deep.
    line = deep_line({"command": "HEALTH_CHECK", "id": "DEEP"}, depth)
    reply = one_reply(d, line)
    assert error_code(reply) == "NESTING_TOO_DEEP"
    assert reply["error"]["details"] == {"max_depth": MAX_DEPTH}
    assert reply["command"] == "HEALTH_CHECK"
    assert "id" not in reply  # it could not be encoded; the reply is sent without it


def test_a_deep_request_id_or_value_gets_a_typed_error(d: DaemonProcess) -> None:
    deep_rid = {"command": "HEALTH_CHECK", "id": 7, "metadata": {"request_id": "DEEP"}}
    reply = one_reply(d, deep_line(deep_rid, 400))
    assert (error_code(reply), reply["id"]) == ("NESTING_TOO_DEEP", 7)
    assert "request_id" not in reply
    for command, params in [
        ("SET_SHARED", {"key": "deep", "value": "DEEP"}),
        ("PUBLISH", {"event_type": "DEEP_EV", "payload": {"v": "DEEP"}}),
    ]:
        reply = one_reply(d, deep_line({"command": command, "parameters": params, "id": "x"}, 300))
        assert (error_code(reply), reply["id"]) == ("NESTING_TOO_DEEP", "x")
    assert d.result("GET_SHARED", {"key": "deep"})["found"] is False


def test_nesting_up_to_the_limit_is_accepted_and_read_back(d: DaemonProcess) -> None:
    # envelope (1) > parameters (2) > value: a value MAX_DEPTH - 2 deep is exactly at the limit.
    value = nested(MAX_DEPTH - 2)
    assert d.result("SET_SHARED", {"key": "at-limit", "value": value})
    assert d.result("GET_SHARED", {"key": "at-limit"})["value"] == value
    reply = d.call("SET_SHARED", {"key": "at-limit", "value": nested(MAX_DEPTH - 1)})
    assert error_code(reply) == "NESTING_TOO_DEEP"
    res = d.result("PUBLISH", {"event_type": "AT_LIMIT", "payload": {"v": nested(MAX_DEPTH - 4)}})
    events = d.result("GET_EVENTS", {"since_seq": res["seq"] - 1, "limit": 1})["events"]
    assert events[0]["data"] == {"v": nested(MAX_DEPTH - 4)}


async def test_deep_requests_after_a_pause_point_are_answered_and_reading_goes_on(
    d: DaemonProcess,
) -> None:
    """After 16 pipelined requests (or a PUBLISH) the rest is served from a loop callback;
    a reply that failed to encode there left reading paused and the client hanging."""
    deep = deep_line({"command": "HEALTH_CHECK", "id": "DEEP"}, 300)
    lines = [orjson.dumps({"command": "HEALTH_CHECK", "id": i}) + b"\n" for i in range(20)]
    lines.insert(17, deep)
    lines.insert(
        3,
        orjson.dumps({"command": "PUBLISH", "id": "p", "parameters": {"event_type": "PAUSE_POINT"}})
        + b"\n",
    )
    lines.insert(4, deep)
    async with await persistent(d.socket) as w:
        await w.send_raw(b"".join(lines) + b'{"command":"HEALTH_CHECK","id":"end"}\n')
        replies = [await w.recv() for _ in range(len(lines) + 1)]
        assert [r.get("id") for r in replies] == [
            0,
            1,
            2,
            "p",
            None,
            *range(3, 17),
            None,
            17,
            18,
            19,
            "end",
        ]
        assert [error_code(r) for r in replies if "id" not in r] == ["NESTING_TOO_DEEP"] * 2
        assert (await w.call("HEALTH_CHECK"))["status"] == "success"


def test_encode_error_leaves_out_an_echo_it_cannot_encode() -> None:
    err = DaemonError("boom", details={"x": 1})
    line = encode_error(Echo("X", nested(300), True, "rid"), err)
    reply = orjson.loads(line)
    assert reply == {"status": "error", "command": "X", "error": err.to_wire()}
    deep_details = DaemonError("boom", code=ErrorCode.CONFLICT, details={"v": nested(300)})
    reply = orjson.loads(encode_error(Echo("X", 1, True), deep_details))
    assert reply["error"] == {"code": "CONFLICT", "message": "boom"}


def test_depth_check_does_not_trip_on_brackets_in_strings() -> None:
    line = orjson.dumps({"command": "X", "parameters": {"s": "[{" * 5000}}) + b"\n"
    assert parse_request(line).parameters == {"s": "[{" * 5000}


# -- in-process daemon: a failure inside serving is answered, reading goes on ----------------


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Daemon]:
    base = short_tmpdir()
    settings = Settings(
        socket=base / "d.sock",
        state_dir=tmp_path / "state",
        log_dir=tmp_path / "logs",
        litellm_preload=False,
        claude_bin=str(FAKE_CLAUDE),
    )
    daemon = Daemon(settings)
    runner = asyncio.create_task(daemon.run())
    try:
        for _ in range(500):
            if runner.done() or settings.socket_path.exists():
                break
            await asyncio.sleep(0.01)
        assert not runner.done(), runner
        yield daemon
    finally:
        daemon.request_shutdown("test")
        assert await asyncio.wait_for(runner, 10) == 0
        shutil.rmtree(base, ignore_errors=True)


async def test_an_exception_while_serving_a_line_gets_internal_error(
    live: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = protocol.parse_request

    def flaky(line: bytes) -> Any:
        if b"BOOM" in line:
            raise RuntimeError("a bug in serving")
        return real(line)

    monkeypatch.setattr("daemon.server.connection.parse_request", flaky)
    lines = [b'{"command":"HEALTH_CHECK","id":%d}\n' % i for i in range(20)]
    lines.insert(1, b'{"command":"BOOM"}\n')  # served inline, in data_received
    lines.insert(19, b'{"command":"BOOM"}\n')  # served from the resume callback
    async with await persistent(live.settings.socket_path) as w:
        await w.send_raw(b"".join(lines))
        replies = [await w.recv() for _ in lines]
        assert [r.get("id") for r in replies] == [0, None, *range(1, 18), None, 18, 19]
        assert [error_code(r) for r in replies if "id" not in r] == ["INTERNAL_ERROR"] * 2
        assert (await w.call("HEALTH_CHECK"))["status"] == "success"
    # One-shot: the error, then the close.
    w = await Wire.open(live.settings.socket_path)
    try:
        await w.send_raw(b'{"command":"BOOM"}\n')
        assert error_code(await w.recv()) == "INTERNAL_ERROR"
        assert await w.at_eof()
    finally:
        await w.close()


# -- 9. command names ---------------------------------------------------------------------


def test_a_huge_command_name_gets_a_short_typed_reply(small_history: DaemonProcess) -> None:
    d = small_history
    name = "X" * (7 * 1000 * 1000)
    line = orjson.dumps({"command": name, "id": 1}) + b"\n"
    started = time.monotonic()
    out = raw_exchange(d.socket, line, timeout=10)
    elapsed = time.monotonic() - started
    assert len(out) < 1024, len(out)
    reply = orjson.loads(out)
    assert (error_code(reply), reply["command"], reply["id"]) == ("INVALID_REQUEST", None, 1)
    assert reply["error"]["details"] == {"max_length": protocol.MAX_COMMAND_CHARS}
    assert elapsed < 0.5, elapsed


def test_command_names_up_to_the_limit_are_looked_up(d: DaemonProcess) -> None:
    reply = d.request("Z" * protocol.MAX_COMMAND_CHARS)
    assert error_code(reply) == "UNKNOWN_COMMAND"
    assert "details" not in reply["error"]  # no suggestions for an implausible name
    assert error_code(d.request("Z" * (protocol.MAX_COMMAND_CHARS + 1))) == "INVALID_REQUEST"
    assert d.request("HEALTH_CHEK")["error"]["details"]["suggestions"][0] == "HEALTH_CHECK"


# -- 5. the socket's directory ---------------------------------------------------------------


async def _start_server(sock: Path) -> Server:
    services = SimpleNamespace(settings=Settings(socket=sock))
    server = Server(cast(Any, services))
    await server.start()
    return server


async def test_a_shared_socket_directory_keeps_its_mode() -> None:
    base = short_tmpdir()
    try:
        shared = base / "shared"
        shared.mkdir()
        os.chmod(shared, 0o1777)  # like /tmp
        busy = base / "busy"
        busy.mkdir()
        os.chmod(busy, 0o755)
        (busy / "someone-elses-file").write_text("x")
        for directory, mode in ((shared, 0o1777), (busy, 0o755)):
            server = await _start_server(directory / "x.sock")
            try:
                assert stat.S_IMODE(os.stat(directory).st_mode) == mode
                assert stat.S_IMODE(os.stat(directory / "x.sock").st_mode) == 0o600
            finally:
                await server.stop_accepting()
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def test_the_daemons_own_socket_directory_is_private() -> None:
    base = short_tmpdir()
    try:
        created = base / "new" / "sockets"
        own = base / "own"  # like the checkout's sockets/: only .gitkeep and our files
        own.mkdir()
        os.chmod(own, 0o755)
        (own / ".gitkeep").write_text("")
        (own / "d.pid").write_text("1")
        for sock in (created / "d.sock", own / "d.sock"):
            server = await _start_server(sock)
            try:
                assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o700
                assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
            finally:
                await server.stop_accepting()
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- 7. memory bounds in bytes -----------------------------------------------------------------


def test_publish_refuses_an_event_over_the_byte_limit(d: DaemonProcess) -> None:
    before = d.result("PUBLISH", {"event_type": "SIZED", "payload": {"pad": "x" * 1000}})
    reply = d.call("PUBLISH", {"event_type": "SIZED", "payload": {"pad": "x" * EVENT_BYTES}})
    assert error_code(reply) == "PAYLOAD_TOO_LARGE"
    details = reply["error"]["details"]
    assert details["limit_bytes"] == EVENT_BYTES
    assert details["size_bytes"] > EVENT_BYTES
    after = d.result("PUBLISH", {"event_type": "SIZED", "payload": {"pad": "x" * 1000}})
    assert after["seq"] == before["seq"] + 1  # the refused event took no seq
    events = d.result("GET_EVENTS", {"event_types": ["SIZED"], "since_seq": before["seq"] - 1})
    assert [e["seq"] for e in events["events"]] == [before["seq"], after["seq"]]


async def test_a_subscriber_backlog_is_bounded_in_bytes() -> None:
    bus = EventBus(None, history_size=1000)
    sub = Subscriber("s", ["*"], maxsize=1000, max_bytes=10_000)
    bus.add(sub)
    bus.publish("BIG", {"pad": "x" * 20_000})  # an empty inbox takes any event
    assert not sub.dropped
    assert [e.seq for e in await sub.next_batch()] == [1]
    assert sub.queued_bytes == 0
    for _ in range(3):
        bus.publish("E", {"pad": "x" * 3000})
    assert not sub.dropped
    assert sub.queued_bytes > 9000
    bus.publish("E", {"pad": "x" * 3000})  # 4 x 3 KB > 10 KB: overflow, as past maxsize
    assert (sub.dropped, sub in bus.subscribers) == (True, False)


async def test_the_in_memory_history_is_bounded_in_bytes(db: Store) -> None:
    bus = EventBus(db, history_size=1000, memory_bytes=50_000)
    await bus.load()
    for i in range(40):
        bus.publish("E", {"i": i, "pad": "x" * 5000})
    assert bus.history_bytes <= 50_000
    assert bus.history_bytes == sum(len(e.wire) for e in bus.history)
    assert 5 <= len(bus.history) < 10
    # What memory no longer holds is read back from the store.
    assert [e.seq for e in await bus.query(None, 0, 1000)] == list(range(1, 41))
    # Without a store, the history is what memory holds, and says so.
    mem = EventBus(None, history_size=1000, memory_bytes=50_000)
    for i in range(40):
        mem.publish("E", {"i": i, "pad": "x" * 5000})
    assert mem.first_available_seq() == mem.history[0].seq > 30


def _partial(d: DaemonProcess, nbytes: int) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(d.socket))
    s.sendall(b'{"command":"SET_SHARED","parameters":{"key":"pending","value":"' + b"p" * nbytes)
    return s


def _finish(s: socket.socket) -> dict[str, Any]:
    s.sendall(b'"}}\n')
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
    reply: dict[str, Any] = orjson.loads(data)
    return reply


def test_incomplete_lines_of_all_connections_share_a_byte_budget(d: DaemonProcess) -> None:
    """Each connection may hold up to max_line_bytes of an incomplete line, but all of them
    together at most max_pending_input_bytes: the line that would pass it is refused."""

    def buffered() -> int:
        counts: dict[str, int] = d.result("HEALTH_CHECK")["counts"]
        return counts["input_buffered_bytes"]

    # The budget is all this test's: no earlier test's connection still holds a line part.
    wait_for(lambda: buffered() == 0)
    first = _partial(d, 400_000)
    second = _partial(d, 400_000)
    try:
        # sendall() returned, so the bytes are queued at the daemon's end; it reads them
        # over a few loop turns (256 KiB a turn from each ready socket).
        wait_for(lambda: buffered() >= 800_000)
        third = _partial(d, 400_000)  # 1.2 MB > 1 MiB
        try:
            assert error_code(_finish(third)) == "INPUT_BUFFERS_FULL"
        finally:
            third.close()
        assert _finish(first)["status"] == "success"
        # The budget is freed as lines complete: the next one fits again.
        again = _partial(d, 400_000)
        try:
            assert _finish(again)["status"] == "success"
        finally:
            again.close()
        assert _finish(second)["status"] == "success"
    finally:
        first.close()
        second.close()
    assert d.result("HEALTH_CHECK")["status"] == "healthy"


async def test_an_idle_incomplete_line_is_timed_out_and_closed(d: DaemonProcess) -> None:
    quiet = await persistent(d.socket)  # idle, but holding no incomplete line
    holder = await Wire.open(d.socket)
    try:
        await holder.send_raw(b'{"command":"HEALTH_CHECK"')
        started = time.monotonic()
        reply = await holder.recv(timeout=IDLE_S + 5)
        assert error_code(reply) == "LINE_TIMEOUT"
        assert reply["error"]["details"] == {"timeout_s": IDLE_S}
        assert time.monotonic() - started >= IDLE_S * 0.9
        assert await holder.at_eof()
        assert (await quiet.call("HEALTH_CHECK"))["status"] == "success"
    finally:
        await holder.close()
        await quiet.close()
    timeouts = [e for e in d.log_events() if e["event"] == "connection.idle_timeout"]
    assert timeouts
    assert timeouts[-1]["level"] == "warning"


# -- 9. the SUBSCRIBER_DROPPED notice, and since_seq --------------------------------------------


def _stalled_subscriber(d: DaemonProcess, patterns: list[str]) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(5)
    s.connect(str(d.socket))
    s.sendall(
        orjson.dumps({"command": "SUBSCRIBE", "parameters": {"event_types": patterns}}) + b"\n"
    )
    reply = b""
    while not reply.endswith(b"\n"):
        reply += s.recv(1)
    assert orjson.loads(reply)["status"] == "success"
    return s


def _read_to_eof(s: socket.socket) -> list[dict[str, Any]]:
    s.settimeout(10)
    data = b""
    try:
        while chunk := s.recv(1 << 20):
            data += chunk
    except ConnectionResetError:
        pass
    return [orjson.loads(line) for line in data.splitlines(keepends=True) if line.endswith(b"\n")]


async def _publish(w: Wire, event_type: str, n: int, pad: int = 300) -> list[int]:
    lines = b"".join(
        orjson.dumps(
            {
                "command": "PUBLISH",
                "id": i,
                "parameters": {"event_type": event_type, "payload": {"i": i, "pad": "x" * pad}},
            }
        )
        + b"\n"
        for i in range(n)
    )
    await w.send_raw(lines)
    seqs = []
    for i in range(n):
        reply = await w.reply(timeout=10)
        assert (reply["id"], reply["status"]) == (i, "success"), reply
        seqs.append(reply["result"]["seq"])
    return seqs


async def test_a_dropped_subscriber_that_reads_late_still_gets_the_notice_and_resumes(
    d: DaemonProcess,
) -> None:
    """The notice used to wait behind the unsendable backlog and was thrown away with it
    when the connection was aborted; now it is written at once, and its last_seq resumes
    the stream exactly."""
    stalled = _stalled_subscriber(d, ["LATE"])
    pub = await persistent(d.socket)
    try:
        seqs = await _publish(pub, "LATE", 1000, pad=1500)  # 1.5 MB, far over the queue
        await eventually(lambda: d.result("HEALTH_CHECK")["counts"]["subscribers"] == 0)
        # Longer than the old grace (2 s) without reading: the old daemon aborted here.
        assert DROP_GRACE_S > 2.5
        await asyncio.sleep(2.5)
        got = await asyncio.to_thread(_read_to_eof, stalled)
        notice = got[-1]
        assert notice["event"] == "SUBSCRIBER_DROPPED", got[-3:]
        delivered = [m["seq"] for m in got[:-1]]
        assert delivered == seqs[: len(delivered)]
        assert len(delivered) < len(seqs)
        last = notice["data"]["last_seq"]
        assert last == (delivered[-1] if delivered else seqs[0] - 1)
        # Resume where it stopped: the rest, then live events; nothing twice, nothing missed.
        async with await Wire.open(d.socket) as again:
            res = await again.result("SUBSCRIBE", {"event_types": ["LATE"], "since_seq": last})
            assert res["last_seq"] == seqs[-1]
            live = await pub.result("PUBLISH", {"event_type": "LATE"})
            rest = [(await again.recv())["seq"] for _ in range(len(seqs) - len(delivered) + 1)]
            assert rest == [*seqs[len(delivered) :], live["seq"]]
    finally:
        stalled.close()
        await pub.close()


async def test_subscribe_since_seq_replays_then_goes_live(d: DaemonProcess) -> None:
    async with await persistent(d.socket, agent_id="replayer") as pub:
        seqs = await _publish(pub, "REPLAY", 5, pad=10)
        await pub.result("PUBLISH", {"event_type": "REPLAY", "to_agent": "someone-else"})
        mine = await pub.result("PUBLISH", {"event_type": "REPLAY", "to_agent": "me"})
        await pub.result("PUBLISH", {"event_type": "OTHER"})
        async with await persistent(d.socket, agent_id="me") as sub:
            res = await sub.result(
                "SUBSCRIBE", {"event_types": ["REPLAY"], "agent_id": "me", "since_seq": seqs[1]}
            )
            live = await pub.result("PUBLISH", {"event_type": "REPLAY"})
            got = [await sub.recv() for _ in range(5)]
            assert [m["seq"] for m in got] == [*seqs[2:], mine["seq"], live["seq"]]
            assert got[0]["data"] == {"i": 2, "pad": "x" * 10}
            assert res["last_seq"] == live["seq"] - 1
            # A second SUBSCRIBE with since_seq would send events twice: refused.
            again = await sub.call("SUBSCRIBE", {"event_types": ["X"], "since_seq": 0})
            assert error_code(again) == "INVALID_PARAMETERS"


async def test_since_seq_beyond_the_history_gets_an_events_gap_notice(
    small_history: DaemonProcess,
) -> None:
    d = small_history
    async with await persistent(d.socket) as pub:
        seqs = await _publish(pub, "GAPPY", HISTORY + 50, pad=10)
        async with await Wire.open(d.socket) as sub:
            await sub.result("SUBSCRIBE", {"event_types": ["GAPPY"], "since_seq": seqs[0]})
            gap = await sub.recv()
            assert gap["event"] == "EVENTS_GAP", gap
            first = gap["data"]["first_available_seq"]
            assert gap["data"]["since_seq"] == seqs[0]
            assert first == seqs[-1] - HISTORY + 1
            got = [(await sub.recv())["seq"] for _ in range(HISTORY)]
            assert got == [s for s in seqs if s >= first]


async def test_since_seq_while_events_keep_coming_loses_and_repeats_nothing(
    d: DaemonProcess,
) -> None:
    """The replay reads SQLite (the memory keeps only the newest events) while a publisher
    goes on: the subscriber still gets every event after since_seq exactly once, in order."""
    async with await persistent(d.socket) as pub:
        start = (await pub.result("PUBLISH", {"event_type": "RACE"}))["seq"]
        # More than memory keeps (EventBus.MEMORY_EVENTS): the replay starts in SQLite.
        before = await _publish(pub, "RACE", EventBus.MEMORY_EVENTS + 100, pad=10)
        publisher = asyncio.create_task(_publish(pub, "RACE", QUEUE // 2, pad=10))
        async with await Wire.open(d.socket) as sub:
            await sub.result("SUBSCRIBE", {"event_types": ["RACE"], "since_seq": start})
            during = await publisher
            expected = before + during
            got = [(await sub.recv())["seq"] for _ in range(len(expected))]
            assert got == expected
            assert sorted(set(got)) == got


def test_a_partial_line_held_back_by_the_daemon_is_not_timed_out(d: DaemonProcess) -> None:
    """A peer that pipelines without reading is held back (reading paused) with the start
    of its next line already read; that wait is the daemon's, not an idle peer's."""
    d.result("SET_SHARED", {"key": "held-back", "value": "v" * 50_000})
    n = 100  # 5 MB of replies: far more than the socket and the transport buffer take
    request = b"".join(
        orjson.dumps({"command": "GET_SHARED", "id": i, "parameters": {"key": "held-back"}}) + b"\n"
        for i in range(n)
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(d.socket))
        s.sendall(b'{"command":"CONNECT"}\n' + request + b'{"command":"HEALTH_CHECK",')
        time.sleep(IDLE_S * 2)  # not reading: the peer's side of the scenario
        s.sendall(b'"id":"last"}\n')
        data = b""
        while data.count(b"\n") < n + 2:
            chunk = s.recv(1 << 20)
            assert chunk, "connection closed early"
            data += chunk
    last = orjson.loads(data.splitlines()[-1])
    assert (last["status"], last["id"]) == ("success", "last"), last
