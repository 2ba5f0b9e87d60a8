"""The connection layer: requests answered in order whether their handler finishes at once
or has to wait, one-shot connections whose command waits, and back-pressure on a peer
that pipelines without reading its replies."""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
import time

import orjson

from tests.helpers import DaemonProcess, raw_exchange
from tests.wire import Wire


def rss_kb(d: DaemonProcess) -> int:
    assert d.proc is not None
    with open(f"/proc/{d.proc.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_waiting_and_immediate_commands_are_answered_in_order(d: DaemonProcess) -> None:
    # SET_SHARED waits for its commit, GET_SHARED answers at once: pipelined together, every
    # GET must still see the SET before it, and replies must come back in request order.
    lines = [b'{"command":"CONNECT"}\n']
    for i in range(40):
        lines.append(
            orjson.dumps(
                {"command": "SET_SHARED", "id": f"s{i}", "parameters": {"key": "order", "value": i}}
            )
            + b"\n"
        )
        lines.append(
            orjson.dumps({"command": "GET_SHARED", "id": f"g{i}", "parameters": {"key": "order"}})
            + b"\n"
        )
    w = await Wire.open(d.socket)
    try:
        await w.send_raw(b"".join(lines))
        assert (await w.recv())["status"] == "success"  # CONNECT
        for i in range(40):
            set_reply, get_reply = await w.recv(), await w.recv()
            assert (set_reply["id"], set_reply["status"]) == (f"s{i}", "success")
            assert get_reply["id"] == f"g{i}"
            assert get_reply["result"]["value"] == i
    finally:
        await w.close()


def test_a_one_shot_command_that_waits_still_gets_its_reply(d: DaemonProcess) -> None:
    out = raw_exchange(
        d.socket, b'{"command":"SET_SHARED","parameters":{"key":"one-shot","value":[1,2]}}\n'
    )
    assert out.count(b"\n") == 1
    assert orjson.loads(out)["status"] == "success"
    assert d.result("GET_SHARED", {"key": "one-shot"})["value"] == [1, 2]


def settled(s: socket.socket, timeout: float = 10.0) -> int:
    """Wait until replies wait at our end and stop growing: the sender holds back. Returns
    the bytes waiting (FIONREAD)."""
    deadline = time.monotonic() + timeout
    before = -1
    while True:
        waiting = struct.unpack("i", fcntl.ioctl(s.fileno(), termios.FIONREAD, b"\0" * 4))[0]
        if waiting > 0 and waiting == before:
            return int(waiting)
        assert time.monotonic() < deadline, f"replies still growing: {waiting} bytes"
        before = waiting
        time.sleep(0.05)


def test_a_peer_that_pipelines_without_reading_is_held_back_not_buffered(
    daemon_process: DaemonProcess,
) -> None:
    """GET_COMMANDS replies are large; the daemon stops serving (and reading) while its
    output waits, and every reply still arrives, whole and in order, once the peer reads."""
    n = 400
    request = b"".join(orjson.dumps({"command": "GET_COMMANDS", "id": i}) + b"\n" for i in range(n))
    d = daemon_process  # a process of its own: its memory is measured
    rss_before = rss_kb(d)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(d.socket))
        s.sendall(b'{"command":"CONNECT"}\n')
        s.sendall(request)  # never blocks for long: the daemon keeps reading until it holds
        settled(s)  # the daemon has written what the socket takes, then held back
        rss_held = rss_kb(d)
        data = b""
        while data.count(b"\n") < n + 1:
            chunk = s.recv(1 << 20)
            assert chunk, "connection closed early"
            data += chunk
    replies = [orjson.loads(x) for x in data.splitlines()]
    assert replies[0]["status"] == "success"
    assert [r["id"] for r in replies[1:]] == list(range(n))
    assert all(r["status"] == "success" for r in replies[1:])
    reply_bytes = len(data) // (n + 1)
    # Unread replies would be n * reply_bytes in the daemon's memory; held back, they are not.
    assert (rss_held - rss_before) * 1024 < n * reply_bytes / 4
    assert d.result("HEALTH_CHECK")["status"] == "healthy"
