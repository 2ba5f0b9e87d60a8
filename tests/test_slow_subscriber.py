"""A subscriber that does not read never slows publishers or other subscribers: it is told
(SUBSCRIBER_DROPPED) and dropped once it is more than its queue behind."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import orjson
import pytest

from tests.helpers import DaemonProcess, wait_for
from tests.inproc import InProcessDaemon
from tests.wire import Wire, persistent

QUEUE = 50
EVENTS = 3000
CHUNK = 50  # PUBLISH requests per pipelined write
PAYLOAD = {"pad": "x" * 300}


@pytest.fixture
def d() -> Iterator[DaemonProcess]:
    dp = InProcessDaemon(env={"KSI_SUBSCRIBER_QUEUE": str(QUEUE)}).start()
    try:
        yield dp
    finally:
        dp.cleanup()


def _stalled_subscriber(d: DaemonProcess, patterns: list[str]) -> socket.socket:
    """A blocking socket that subscribes and then reads nothing (unlike an asyncio stream,
    whose transport would keep reading into its buffer behind the test's back)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(5)
    s.connect(str(d.socket))
    s.sendall(
        orjson.dumps({"command": "SUBSCRIBE", "parameters": {"event_types": patterns}}) + b"\n"
    )
    reply = b""
    while not reply.endswith(b"\n"):
        reply += s.recv(1)  # byte by byte: leave any pushed event unread
    assert orjson.loads(reply)["status"] == "success"
    return s


def _read_to_eof(s: socket.socket) -> list[dict]:
    s.settimeout(10)
    data = b""
    try:
        while chunk := s.recv(1 << 20):
            data += chunk
    except ConnectionResetError:
        pass
    assert data.endswith(b"\n")
    return [orjson.loads(line) for line in data.splitlines()]


async def _fast_reader(w: Wire, n: int, out: list[int]) -> None:
    while len(out) < n:
        msg = await w.recv(timeout=20)
        assert msg.get("event") == "LOAD", msg  # never SUBSCRIBER_DROPPED
        out.append(msg["seq"])


async def _publish_burst(pub: Wire) -> tuple[list[int], list[float]]:
    seqs: list[int] = []
    round_trips: list[float] = []
    for start in range(0, EVENTS, CHUNK):
        lines = b"".join(
            orjson.dumps(
                {
                    "command": "PUBLISH",
                    "id": i,
                    "parameters": {"event_type": "LOAD", "payload": {"i": i, **PAYLOAD}},
                }
            )
            + b"\n"
            for i in range(start, start + CHUNK)
        )
        t0 = time.monotonic()
        await pub.send_raw(lines)
        for i in range(start, start + CHUNK):
            reply = await pub.recv(timeout=10)
            assert reply["id"] == i, reply
            assert reply["status"] == "success", reply
            seqs.append(reply["result"]["seq"])
        round_trips.append(time.monotonic() - t0)
    return seqs, round_trips


async def test_slow_subscribers_are_dropped_and_nobody_else_waits(d: DaemonProcess) -> None:
    pub = await persistent(d.socket)
    fast = await Wire.open(d.socket)
    slow_later = _stalled_subscriber(d, ["LOAD"])  # stops reading, then catches up
    slow_never = _stalled_subscriber(d, ["LOAD"])  # stops reading for good
    try:
        res = await fast.result("SUBSCRIBE", {"event_types": ["LOAD"]})
        assert res["subscribed_to"] == ["LOAD"]
        health = await pub.result("HEALTH_CHECK")
        assert health["counts"]["subscribers"] == 3

        received: list[int] = []
        reader = asyncio.create_task(_fast_reader(fast, EVENTS, received))
        started = time.monotonic()
        seqs, round_trips = await _publish_burst(pub)
        elapsed = time.monotonic() - started

        # Publishers never waited for the stalled subscribers.
        assert seqs == list(range(seqs[0], seqs[0] + EVENTS))
        assert elapsed < 20, elapsed
        assert max(round_trips) < 2.0, max(round_trips)
        single = time.monotonic()
        await pub.result("PUBLISH", {"event_type": "OTHER"})
        assert time.monotonic() - single < 0.5

        # The fast subscriber alongside got every event, in seq order.
        await asyncio.wait_for(reader, 20)
        assert received == seqs

        # Both stalled subscribers were dropped from the bus.
        health = await pub.result("HEALTH_CHECK")
        assert health["counts"]["subscribers"] == 1

        # The one that reads again finds what it was sent, then SUBSCRIBER_DROPPED, then EOF.
        got = await asyncio.to_thread(_read_to_eof, slow_later)
        notice = got[-1]
        assert notice["event"] == "SUBSCRIBER_DROPPED", notice
        assert set(notice) == {"event", "type", "data", "seq", "timestamp"}
        assert notice["data"]["reason"] == "slow_consumer"
        assert notice["data"]["queue_limit"] == QUEUE
        delivered = [m["seq"] for m in got[:-1]]
        assert all(m["event"] == "LOAD" for m in got[:-1])
        assert delivered == seqs[: len(delivered)]  # a prefix, in order, nothing skipped
        assert len(delivered) < EVENTS
        assert notice["data"]["last_seq"] == delivered[-1]
        # ... and can catch up from the history, as the notice's hint says.
        catch_up = await pub.result(
            "GET_EVENTS",
            {"event_types": ["LOAD"], "since_seq": notice["data"]["last_seq"], "limit": 10_000},
        )
        assert [e["seq"] for e in catch_up["events"]] == seqs[len(delivered) :]

        # The one that never reads again is disconnected by the daemon, not kept forever.
        def only_two_left() -> bool:
            counts = d.call("HEALTH_CHECK")["result"]["counts"]
            return bool(counts["connections"] == 3)  # pub, fast, this HEALTH_CHECK

        await asyncio.to_thread(wait_for, only_two_left, 15)
        leftovers = await asyncio.to_thread(_read_to_eof, slow_never)  # then EOF, not a hang
        assert len(leftovers) < EVENTS

        drops = [e for e in d.log_events() if e["event"] == "bus.subscriber_dropped"]
        assert len(drops) == 2
        assert all(e["level"] == "warning" for e in drops)
        assert (await pub.result("HEALTH_CHECK"))["status"] == "healthy"
    finally:
        for w in (pub, fast):
            await w.close()
        slow_later.close()
        slow_never.close()


async def test_many_publishers_one_stalled_subscriber(d: DaemonProcess) -> None:
    """Concurrent publishers on separate connections stay fast while a subscriber stalls."""
    stalled = _stalled_subscriber(d, ["*"])
    pubs = [await persistent(d.socket) for _ in range(4)]
    try:

        async def run(p: Wire, n: int) -> float:
            worst = 0.0
            for i in range(n):
                t0 = time.monotonic()
                res = await p.result(
                    "PUBLISH", {"event_type": "MANY", "payload": {"i": i, **PAYLOAD}}
                )
                assert res["status"] == "published"
                worst = max(worst, time.monotonic() - t0)
            return worst

        worst = await asyncio.wait_for(asyncio.gather(*(run(p, 300) for p in pubs)), 30)
        assert max(worst) < 1.0, worst
        health = await pubs[0].result("HEALTH_CHECK")
        assert health["counts"]["subscribers"] == 0
        assert health["counts"]["events_published"] >= 1200
    finally:
        stalled.close()
        for w in pubs:
            await w.close()
