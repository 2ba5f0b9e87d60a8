"""Socket benchmarks: P3 (persistent connection), P4 (one-shot connections), P5 (fan-out).

The floor of P3/P4 is :mod:`bench.floor_server` in ``echo``/``oneshot`` mode, answering
each request with the byte-identical reply line the daemon gave for it, so both sides
move the same bytes. The client is this process (the daemon and the floors run in their
own), a blocking raw-socket client that does not parse replies on the measured path.
"""

from __future__ import annotations

import gc
import selectors
import socket
import time
from datetime import UTC, datetime

import orjson

from bench.core import Row, Run, Stats, benchmark, fmt
from bench.procs import fake_daemon, start_floor
from bench.spawn import COMPLETE, spawn_line
from bench.wire import RECV, LineConn, one_shot, request_line

HC = request_line("HEALTH_CHECK")
GS = request_line("GET_SHARED", {"key": "bench"})
CONNECT = request_line("CONNECT")


def _echo_floor(run: Run, mode: str, replies: list[tuple[bytes, bytes]]):  # -> ServerHandle
    return run.shared(f"floor_{mode}", lambda: start_floor(run, mode, replies=replies))


def _daemon_replies(run: Run) -> list[tuple[bytes, bytes]]:
    """The daemon's reply to each request P3/P4 send (the floors send the same bytes)."""

    def make() -> list[tuple[bytes, bytes]]:
        d = fake_daemon(run)
        c = LineConn(d.socket)
        try:
            pairs = [(CONNECT, c.request(CONNECT))]
            c.call("SET_SHARED", {"key": "bench", "value": {"n": 1, "tag": "benchmark"}})
            pairs += [(HC, c.request(HC)), (GS, c.request(GS))]
        finally:
            c.close()
        return pairs

    pairs: list[tuple[bytes, bytes]] = run.shared("daemon_replies", make)
    return pairs


def _sequential(conn: LineConn, line: bytes, n: int, out: list[float]) -> None:
    for _ in range(n):
        t0 = time.perf_counter_ns()
        conn.sock.sendall(line)
        conn.read_line()
        out.append((time.perf_counter_ns() - t0) / 1e3)


def _pipelined(conn: LineConn, line: bytes, window: int, windows: int) -> float:
    blob = line * window
    t0 = time.perf_counter_ns()
    for _ in range(windows):
        conn.sock.sendall(blob)
        conn.read_count(window)
    return window * windows / ((time.perf_counter_ns() - t0) / 1e9)


@benchmark("P3", "HEALTH_CHECK / GET_SHARED on one persistent connection", order=30)
def p3_persistent(run: Run) -> list[Row]:
    d = fake_daemon(run)
    replies = _daemon_replies(run)
    floor = _echo_floor(run, "echo", replies)
    rounds = run.reps(5, 1)
    seq_n = run.reps(2000, 200)
    windows = {100: run.reps(100, 4), 1000: run.reps(20, 2)}
    ours_c, floor_c = LineConn(d.socket), LineConn(floor.socket)
    ours_c.request(CONNECT)
    floor_c.request(CONNECT)
    seq: dict[tuple[str, str], list[float]] = {}
    pipe: dict[tuple[str, str, int], list[float]] = {}
    # Warm-up.
    for c in (ours_c, floor_c):
        _sequential(c, HC, 200, [])
        _pipelined(c, GS, 100, 2)
    gc.disable()
    try:
        for r in range(rounds):
            sides = [("ours", ours_c), ("floor", floor_c)]
            if r % 2:
                sides.reverse()
            for cmd, line in (("HEALTH_CHECK", HC), ("GET_SHARED", GS)):
                for side, c in sides:
                    _sequential(c, line, seq_n, seq.setdefault((side, cmd), []))
                for w, k in windows.items():
                    for side, c in sides:
                        pipe.setdefault((side, cmd, w), []).append(_pipelined(c, line, w, k))
    finally:
        gc.enable()
        ours_c.close()
        floor_c.close()
    rows = []
    for cmd in ("HEALTH_CHECK", "GET_SHARED"):
        o, f = Stats.of(seq[("ours", cmd)], "us"), Stats.of(seq[("floor", cmd)], "us")
        rows.append(
            Row(
                f"P3.seq.{'HC' if cmd == 'HEALTH_CHECK' else 'GS'}",
                f"{cmd} sequential latency (p50)",
                "us",
                o.median,
                f.median,
                compare="delta",
                goal="p50 <= 60 us",
                met=o.median <= 60,
                series={"daemon": o, "echo floor": f},
                notes=f"p99 ours {fmt(o.p99)} / floor {fmt(f.p99)} us; {fmt(1e6 / o.median)} req/s",
            )
        )
    for cmd in ("HEALTH_CHECK", "GET_SHARED"):
        series = {}
        for w in windows:
            series[f"daemon, window {w}"] = Stats.of(pipe[("ours", cmd, w)], "req/s")
            series[f"echo floor, window {w}"] = Stats.of(pipe[("floor", cmd, w)], "req/s")
        o, f = series["daemon, window 1000"], series["echo floor, window 1000"]
        o100, f100 = series["daemon, window 100"], series["echo floor, window 100"]
        rows.append(
            Row(
                f"P3.pipe.{'HC' if cmd == 'HEALTH_CHECK' else 'GS'}",
                f"{cmd} pipelined throughput (window 1000)",
                "req/s",
                o.median,
                f.median,
                compare="ratio",
                goal=">= 25k/s",
                met=o.median >= 25_000,
                series=series,
                notes=f"window 100: ours {fmt(o100.median)} / floor {fmt(f100.median)} req/s",
            )
        )
    return rows


@benchmark("P4", "one-shot connections per second (connect, HEALTH_CHECK, close)", order=40)
def p4_oneshot(run: Run) -> list[Row]:
    d = fake_daemon(run)
    replies = _daemon_replies(run)
    floor = _echo_floor(run, "oneshot", replies)
    blocks, per_block = run.reps(20, 2), run.reps(150, 50)
    lat: dict[str, list[float]] = {"ours": [], "floor": []}
    for path in (d.socket, floor.socket):
        for _ in range(50):
            one_shot(path, HC)
    gc.disable()
    try:
        for b in range(blocks):
            sides = [("ours", d.socket), ("floor", floor.socket)]
            if b % 2:
                sides.reverse()
            for side, path in sides:
                out = lat[side]
                for _ in range(per_block):
                    t0 = time.perf_counter_ns()
                    reply = one_shot(path, HC)
                    out.append((time.perf_counter_ns() - t0) / 1e3)
                    if not reply.endswith(b"\n"):
                        raise RuntimeError(f"one-shot reply incomplete: {reply[:200]!r}")
    finally:
        gc.enable()
    o, f = Stats.of(lat["ours"], "us"), Stats.of(lat["floor"], "us")
    o_rate, f_rate = (
        len(lat["ours"]) / (sum(lat["ours"]) / 1e6),
        len(lat["floor"]) / (sum(lat["floor"]) / 1e6),
    )
    return [
        Row(
            "P4",
            "one-shot connections/s (sequential client)",
            "conn/s",
            o_rate,
            f_rate,
            compare="ratio",
            goal="report",
            series={"daemon latency": o, "echo floor latency": f},
            notes=f"p50 ours {fmt(o.median)} / floor {fmt(f.median)} us per connection",
        )
    ]


# -- P5 -------------------------------------------------------------------------------------


def _parse_ts(ts: str) -> float:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


class Subscribers:
    """``k`` subscriber connections in this process, watched with one epoll selector."""

    def __init__(self, path: str, k: int, patterns: list[str]) -> None:
        self.socks: list[socket.socket] = []
        self.bufs: list[bytes] = []
        self.sel = selectors.DefaultSelector()
        sub = request_line("SUBSCRIBE", {"event_types": patterns})
        for i in range(k):
            c = LineConn(path)
            reply = c.request(sub)
            if not reply.startswith(b'{"status":"success"'):
                raise RuntimeError(f"SUBSCRIBE failed: {reply!r}")
            self.socks.append(c.sock)
            self.bufs.append(c.buf)
            self.sel.register(c.sock, selectors.EVENT_READ, i)

    def receive_one_each(self, timeout: float = 10.0) -> list[tuple[int, bytes]]:
        """Wait until every subscriber has one more line: (monotonic ns at receipt, line)."""
        k = len(self.socks)
        got: list[tuple[int, bytes] | None] = [None] * k
        left = k
        deadline = time.monotonic() + timeout
        for i, buf in enumerate(self.bufs):  # lines that arrived with an earlier chunk
            if b"\n" in buf:
                line, _, rest = buf.partition(b"\n")
                got[i], self.bufs[i] = (time.monotonic_ns(), line), rest
                left -= 1
        while left:
            events = self.sel.select(max(0.0, deadline - time.monotonic()))
            now = time.monotonic_ns()
            if not events:
                raise TimeoutError(f"{left} of {k} subscribers got nothing")
            for key, _ in events:
                i = key.data
                chunk = key.fileobj.recv(RECV)  # type: ignore[union-attr]
                if not chunk:
                    raise ConnectionError("daemon closed a subscriber connection")
                buf = self.bufs[i] + chunk
                if got[i] is None and b"\n" in buf:
                    line, _, buf = buf.partition(b"\n")
                    got[i] = (now, line)
                    left -= 1
                self.bufs[i] = buf
        return [g for g in got if g is not None]

    def close(self) -> None:
        self.sel.close()
        for s in self.socks:
            s.close()


@benchmark("P5", "event fan-out latency to 1 / 10 / 100 subscribers", order=50)
def p5_fanout(run: Run) -> list[Row]:
    d = fake_daemon(run)
    pings, spawns = run.reps(300, 20), run.reps(100, 10)
    ctl = LineConn(d.socket)
    ctl.request(CONNECT)
    rows = []
    for k in (1, 10, 100):
        subs = Subscribers(str(d.socket), k, ["BENCH_PING", "PROCESS_COMPLETE"])
        ping_all: list[float] = []
        ping_last: list[float] = []
        comp_ts: list[float] = []
        comp_spread: list[float] = []
        comp_e2e: list[float] = []
        gc.disable()
        try:
            for i in range(pings + 5):
                t_send = time.monotonic_ns()
                ctl.send(
                    request_line(
                        "PUBLISH", {"event_type": "BENCH_PING", "payload": {"t_ns": t_send, "i": i}}
                    )
                )
                got = subs.receive_one_each()
                reply = ctl.read_line()
                if not reply.startswith(b'{"status":"success"'):
                    raise RuntimeError(f"PUBLISH failed: {reply!r}")
                if i < 5:
                    continue  # warm-up
                tag = f'"i":{i}'.encode()
                lat = []
                for t, line in got:
                    if tag not in line:
                        raise RuntimeError(f"unexpected event: {line[:200]!r}")
                    lat.append((t - t_send) / 1e6)
                ping_all += lat
                ping_last.append(max(lat))
            for i in range(spawns + 2):
                t_send = time.monotonic_ns()
                ctl.send(spawn_line(d.work, f"fan {k} {i}", "async"))
                got = subs.receive_one_each()
                wall = time.time()
                t_first = min(t for t, _ in got)
                t_last = max(t for t, _ in got)
                ack = ctl.read_line()
                if not ack.startswith(b'{"status":"success"'):
                    raise RuntimeError(f"SPAWN failed: {ack!r}")
                if not all(line.startswith(COMPLETE) for _, line in got):
                    raise RuntimeError(f"unexpected event: {got[0][1][:200]!r}")
                if i < 2:
                    continue
                ev = orjson.loads(got[-1][1])
                # Receipt of the last subscriber, back-dated from its monotonic receipt time.
                last_wall = wall - (time.monotonic_ns() - t_last) / 1e9
                comp_ts.append((last_wall - _parse_ts(ev["timestamp"])) * 1000)
                comp_spread.append((t_last - t_first) / 1e6)
                comp_e2e.append((t_last - t_send) / 1e6)
        finally:
            gc.enable()
            subs.close()
        pa, pl = Stats.of(ping_all, "ms"), Stats.of(ping_last, "ms")
        ct, cs, ce = (
            Stats.of(comp_ts, "ms"),
            Stats.of(comp_spread, "ms"),
            Stats.of(comp_e2e, "ms"),
        )
        goal = "p99 <= 10 ms" if k == 100 else "report"
        rows.append(
            Row(
                f"P5.{k}",
                f"PROCESS_COMPLETE to {k} subscriber(s), publish->last receipt",
                "ms",
                ct.p99,
                goal=goal,
                met=(ct.p99 <= 10) if k == 100 else None,
                ours_text=f"p50 {fmt(ct.median)} / p99 {fmt(ct.p99)} ms",
                series={
                    "complete: event ts -> last receipt": ct,
                    "complete: first->last receipt": cs,
                    "complete: SPAWN sent -> last receipt": ce,
                },
                notes="event timestamp has ms resolution (truncated): up to +1 ms high",
            )
        )
        rows.append(
            Row(
                f"P5.{k}p",
                f"PUBLISH BENCH_PING to {k} subscriber(s), send->receipt",
                "ms",
                pa.p99,
                goal=goal,
                met=(pa.p99 <= 10) if k == 100 else None,
                ours_text=f"p50 {fmt(pa.median)} / p99 {fmt(pa.p99)} ms",
                series={"ping: every delivery": pa, "ping: last subscriber": pl},
                notes="includes the publisher's request hop and PUBLISH handling",
            )
        )
    ctl.close()
    return rows
