"""P9: how soon a client sees a turn's first words (issue 13), real CLI + loopback stub API.

* P9: a cold turn (new session, ``warm: false``): sync SPAWN with ``stream: true`` sent ->
  its first ``text`` PROCESS_PROGRESS line received, vs a bare ``claude -p --input-format
  stream-json --output-format stream-json --verbose`` started with the same environment,
  cwd and prompt -> its first assistant text line on stdout. Goal: <= +5 ms at p50.
* P9.warm: the same for a later turn of a warm session (the daemon's session CLI, and a
  bare long-lived CLI fed one line per turn). Report, same goal.

Both sides alternate (which goes first alternates too). The turn is then read to its end
(the reply; the bare CLI's ``result`` line and, for the cold one, its exit) before the next
measurement, so no work of one overlaps the next.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from typing import IO, Any

import orjson

from bench.core import REAL_CLAUDE, Row, Run, Stats, benchmark, fmt
from bench.procs import cold_real_cli_daemon, real_cli_missing, stop_pid
from bench.wire import LineConn, request_line

P9 = "SPAWN stream: true -> first text event vs bare CLI's first assistant line"
P9W = "same, a warm session's later turn vs a bare long-lived CLI"
GOAL = "<= +5 ms at p50"
_STREAM_JSON = ["-p", "--input-format", "stream-json", "--output-format", "stream-json"]


def _user_line(prompt: str) -> bytes:
    content = [{"type": "text", "text": prompt}]
    return orjson.dumps({"type": "user", "message": {"role": "user", "content": content}}) + b"\n"


def _first_text(out: IO[bytes]) -> float:
    """Read the CLI's stdout to its first assistant line with text; returns the time then."""
    for line in out:
        obj = orjson.loads(line)
        if obj.get("type") == "assistant":
            blocks = obj["message"]["content"]
            if any(b.get("type") == "text" for b in blocks):
                return time.perf_counter()
        if obj.get("type") == "result":
            break
    raise RuntimeError("the bare CLI gave no assistant text")


def _to_result(out: IO[bytes]) -> None:
    for line in out:
        if orjson.loads(line).get("type") == "result":
            return
    raise RuntimeError("the bare CLI ended without a result")


class _Ours:
    """SPAWN with stream: true on one persistent connection: time to the first text event."""

    def __init__(self, conn: LineConn, work: str) -> None:
        self.conn = conn
        self.work = work

    def first_text(self, prompt: str, **params: Any) -> tuple[float, dict[str, Any]]:
        line = request_line(
            "SPAWN", {"prompt": prompt, "cwd": self.work, "stream": True, **params}, id=1
        )
        t0 = time.perf_counter()
        self.conn.send(line)
        first: float | None = None
        while True:
            msg = orjson.loads(self.conn.read_line())
            if "event" not in msg:
                break
            if first is None and msg["data"].get("kind") == "text":
                first = time.perf_counter()
        if msg.get("status") != "success" or first is None:
            raise RuntimeError(f"streamed SPAWN failed: {str(msg)[:600]}")
        result: dict[str, Any] = msg["result"]
        return first - t0, result


@benchmark("P9", P9, order=25)
def p9_first_text(run: Run) -> list[Row]:
    why = real_cli_missing()
    if why:
        print(f"P9 skipped: {why}", flush=True)
        return [Row("P9", P9, "ms", None, goal=GOAL, skipped=why)]
    reps = run.reps(10, 2)
    d = cold_real_cli_daemon(run)
    env = dict(d.env)  # the daemon's own environment: its CLI children see exactly this
    conn = LineConn(d.socket, timeout=120)
    conn.call("CONNECT")
    ours = _Ours(conn, str(d.work))
    bare_warm: subprocess.Popen[bytes] | None = None

    def bare_cold(i: int) -> float:
        argv = [str(REAL_CLAUDE), *_STREAM_JSON, "--verbose", "--model", "sonnet"]
        argv += ["--session-id", str(uuid.uuid4())]
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=d.work, env=env
        )
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write(_user_line(f"bench p9 bare {i}"))
        proc.stdin.flush()
        first = _first_text(proc.stdout)
        _to_result(proc.stdout)
        proc.stdin.close()
        if proc.wait(60) != 0:
            raise RuntimeError(f"bare CLI exited {proc.returncode}")
        return first - t0

    def bare_warm_turn(i: int) -> float:
        assert bare_warm is not None
        assert bare_warm.stdin is not None
        assert bare_warm.stdout is not None
        t0 = time.perf_counter()
        bare_warm.stdin.write(_user_line(f"bench p9 warm bare {i}"))
        bare_warm.stdin.flush()
        first = _first_text(bare_warm.stdout)
        _to_result(bare_warm.stdout)
        return first - t0

    cold_o: list[float] = []
    cold_b: list[float] = []
    warm_o: list[float] = []
    warm_b: list[float] = []
    try:
        for i in range(1 + reps):  # the first pair warms caches up and is not counted
            if i % 2:
                b = bare_cold(i)
                o = ours.first_text(f"bench p9 {i}", warm=False, model="sonnet")[0]
            else:
                o = ours.first_text(f"bench p9 {i}", warm=False, model="sonnet")[0]
                b = bare_cold(i)
            if i:
                cold_o.append(1000 * o)
                cold_b.append(1000 * b)
        # Warm: one session each, opened by an uncounted first turn.
        _, first = ours.first_text("bench p9 warm 0", warm=True, model="sonnet")
        sid = first["session_id"]
        argv = [str(REAL_CLAUDE), *_STREAM_JSON, "--verbose", "--model", "sonnet"]
        argv += ["--session-id", str(uuid.uuid4())]
        bare_warm = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=d.work, env=env
        )
        bare_warm_turn(0)
        for i in range(1, 1 + reps):
            if i % 2:
                b = bare_warm_turn(i)
                o = ours.first_text(f"bench p9 warm {i}", session_id=sid, model="sonnet")[0]
            else:
                o = ours.first_text(f"bench p9 warm {i}", session_id=sid, model="sonnet")[0]
                b = bare_warm_turn(i)
            warm_o.append(1000 * o)
            warm_b.append(1000 * b)
    finally:
        conn.close()
        if bare_warm is not None:
            stop_pid(bare_warm)
        d.stop()
    return [
        _row("P9", P9, cold_o, cold_b, "cold turn, new session each"),
        _row("P9.warm", P9W, warm_o, warm_b, "turns 2.. of one session each"),
    ]


def _row(bench_id: str, what: str, ours: list[float], bare: list[float], notes: str) -> Row:
    o, b = Stats.of(ours, "ms"), Stats.of(bare, "ms")
    delta = o.median - b.median
    return Row(
        bench_id,
        what,
        "ms",
        o.median,
        b.median,
        compare="delta",
        goal=GOAL,
        met=delta <= 5.0,
        series={"daemon, first text event": o, "bare CLI, first assistant line": b},
        notes=f"{notes}; {len(ours)} pair(s); p99 ours {fmt(o.p99)} ms, bare {fmt(b.p99)} ms",
    )
