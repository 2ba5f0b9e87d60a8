"""R1: what the permission relay adds each way (issue 14), fake CLI, warm session.

* R1.ask: the CLI writes its ``can_use_tool`` control request -> a subscriber reads the
  PERMISSION_REQUEST (the daemon parses it, commits the request to SQLite, publishes).
  Floor: the same turn's ``tool_use`` line, written by the CLI just before -> the
  subscriber reads its PROCESS_PROGRESS (the daemon's plain line-to-bus path).
* R1.answer: RESPOND_PERMISSION sent -> the CLI has read the answer on its stdin. Floor:
  PUBLISH sent on the same connection -> the subscriber reads the event (one socket hop in
  and one out, as the answer's socket-in, pipe-out).

Goal: <= 2 ms at p50 each way. Times are wall-clock (``time.time()``) taken in the CLI (the
fake logs them: FAKE_CLAUDE_LOG) and in this process, on the same machine.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson

from bench.core import ROOT, Row, Run, Stats, benchmark, fmt
from bench.procs import start_daemon
from bench.wire import LineConn, request_line

R1 = "permission relay: CLI request -> PERMISSION_REQUEST, answer -> CLI"
GOAL = "<= 2 ms at p50 each way"
FAKE = ROOT / "devtools" / "fake_claude.py"


def _fake_times(log: Path) -> dict[str, float]:
    """Times the fake CLI logged, keyed by what happened (tool_use / asked / answered ids)."""
    out: dict[str, float] = {}
    for line in log.read_bytes().splitlines():
        obj = orjson.loads(line)
        for key in ("tool_use", "permission_asked", "permission_answered"):
            if key in obj:
                out[f"{key}:{obj[key]}"] = obj["time"]
    return out


def _until(sub: LineConn, want: str, process_id: str | None = None) -> tuple[dict[str, Any], float]:
    while True:
        line = sub.read_line()
        at = time.time()
        msg = orjson.loads(line)
        if msg.get("event") == want and process_id in (None, msg["data"].get("process_id")):
            data: dict[str, Any] = msg["data"]
            return data, at


@benchmark("R1", R1, order=27)
def r1_relay(run: Run) -> list[Row]:
    reps = run.reps(40, 3)
    # The fake CLI logs its times here (it inherits the daemon's environment).
    log = run.workdir / "r1-fake.jsonl"
    log.unlink(missing_ok=True)
    d = start_daemon(
        run, claude_bin=FAKE, env={"KSI_WARM_DEFAULT": "true", "FAKE_CLAUDE_LOG": str(log)}
    )
    conn = LineConn(d.socket, timeout=60)
    conn.call("CONNECT")  # persistent: many commands on one connection
    sub = LineConn(d.socket, timeout=60)
    sub.call("SUBSCRIBE", {"event_types": ["PERMISSION_REQUEST", "PROCESS_*", "R1_PING"]})
    work = str(d.base / "work")
    ask, ask_floor, answer, answer_floor = [], [], [], []
    session: dict[str, Any] = {}
    try:
        for i in range(1 + reps):  # the first turn opens the warm session, uncounted
            params = {
                "prompt": f"[[tool:Bash:echo r1 {i}]]",
                "mode": "async",
                "cwd": work,
                "permissions": "relay",
                "warm": True,
                **session,
            }
            pid = conn.call("SPAWN", params)["result"]["process_id"]
            use, use_at = _until(sub, "PROCESS_PROGRESS", pid)
            while use.get("kind") != "tool_use":
                use, use_at = _until(sub, "PROCESS_PROGRESS", pid)
            asked, asked_at = _until(sub, "PERMISSION_REQUEST", pid)
            sent = time.time()
            conn.send(
                request_line(
                    "RESPOND_PERMISSION", {"request_id": asked["request_id"], "decision": "allow"}
                )
            )
            done, _ = _until(sub, "PROCESS_COMPLETE", pid)
            if done["status"] != "completed":
                raise RuntimeError(f"relayed turn failed: {done}")
            conn.read_line()  # RESPOND_PERMISSION's reply
            session = {"session_id": done["session_id"]}
            ping_sent = time.time()
            conn.send(request_line("PUBLISH", {"event_type": "R1_PING", "payload": {"i": i}}))
            _, ping_at = _until(sub, "R1_PING")
            conn.read_line()
            if not i:
                continue
            times = _fake_times(log)
            cli_ask = _newest(times, "permission_asked:")
            ask.append(1000 * (asked_at - cli_ask))
            ask_floor.append(1000 * (use_at - times[f"tool_use:{use['tool_use_id']}"]))
            answered = _newest(times, "permission_answered:")
            answer.append(1000 * (answered - sent))
            answer_floor.append(1000 * (ping_at - ping_sent))
    finally:
        conn.close()
        sub.close()
        d.stop()
    return [
        _row("R1.ask", "CLI request -> PERMISSION_REQUEST at a subscriber", ask, ask_floor),
        _row("R1.answer", "RESPOND_PERMISSION -> the CLI reads the answer", answer, answer_floor),
    ]


def _newest(times: dict[str, float], prefix: str) -> float:
    # The daemon's request_id is its own; the fake logged the CLI's id. The newest entry is
    # this turn's (one ask and one answer per turn, read after the turn completed).
    return max(v for k, v in times.items() if k.startswith(prefix))


def _row(bench_id: str, what: str, ours: list[float], floor: list[float]) -> Row:
    o, f = Stats.of(ours, "ms"), Stats.of(floor, "ms")
    return Row(
        bench_id,
        what,
        "ms",
        o.median,
        f.median,
        compare="delta",
        goal=GOAL,
        met=o.median <= 2.0,
        series={"relay": o, "floor": f},
        notes=f"{len(ours)} turn(s), warm session; p99 ours {fmt(o.p99)} ms, floor {fmt(f.p99)} ms",
    )
