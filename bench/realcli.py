"""P2: one real Claude CLI turn through the daemon vs the same ``claude -p`` run bare.

Both sides run the pinned CLI against the loopback stub API with the same environment,
config dir, working directory and prompt; the daemon's turn is a cold one (``warm: false``,
no pool), which it runs in stream-json mode (the prompt as a JSON line on stdin, stdin
closed at the result), the bare one is ``claude -p --output-format json --model sonnet
--session-id <new uuid>`` with the prompt on stdin. Runs alternate (which side goes first
alternates too) so that drift on a noisy machine cancels out. Skipped, with the reason,
when the real CLI is not installed.
"""

from __future__ import annotations

import subprocess
import time
import uuid

from bench.core import REAL_CLAUDE, Row, Run, Stats, benchmark, fmt
from bench.procs import cold_real_cli_daemon, real_cli_missing
from bench.spawn import spawn_line
from bench.wire import LineConn, request_line

WHAT = "real CLI turn via daemon vs bare claude -p"


@benchmark("P2", WHAT, order=20)
def p2_real_cli(run: Run) -> list[Row]:
    why = real_cli_missing()
    if why:
        print(f"P2 skipped: {why}", flush=True)
        return [Row("P2", WHAT, "s", None, goal="ratio <= 1.02", skipped=why)]
    reps, warm = run.reps(10, 2), 1
    d = cold_real_cli_daemon(run)
    env = dict(d.env)  # the daemon's own environment: the CLI child sees exactly this
    conn = LineConn(d.socket, timeout=120)
    conn.request(request_line("CONNECT"))

    def ours(i: int) -> float:
        line = spawn_line(d.work, f"bench p2 {i}", warm=False)
        t0 = time.perf_counter()
        reply = conn.request(line)
        dt = time.perf_counter() - t0
        if not reply.startswith(b'{"status":"success"') or b"echo: bench p2" not in reply:
            raise RuntimeError(f"daemon turn failed: {reply[:800]!r}")
        return dt

    def bare(i: int) -> float:
        argv = [
            str(REAL_CLAUDE),
            "-p",
            "--output-format",
            "json",
            "--model",
            "sonnet",
            "--session-id",
            str(uuid.uuid4()),
        ]
        t0 = time.perf_counter()
        out = subprocess.run(
            argv,
            input=f"bench p2 bare {i}".encode(),
            capture_output=True,
            cwd=d.work,
            env=env,
            timeout=120,
            check=False,
        )
        dt = time.perf_counter() - t0
        if out.returncode != 0 or b'"type":"result"' not in out.stdout:
            raise RuntimeError(
                f"bare claude -p failed ({out.returncode}): "
                f"{out.stdout[:400]!r} {out.stderr[:400]!r}"
            )
        return dt

    o_s: list[float] = []
    b_s: list[float] = []
    try:
        for i in range(warm + reps):
            if i % 2:
                o, b = ours(i), bare(i)
            else:
                b, o = bare(i), ours(i)
            if i >= warm:
                o_s.append(o)
                b_s.append(b)
    finally:
        conn.close()
        d.stop()
    o_st, b_st = Stats.of(o_s, "s"), Stats.of(b_s, "s")
    ratio = o_st.median / b_st.median
    return [
        Row(
            "P2",
            WHAT,
            "s",
            o_st.median,
            b_st.median,
            compare="ratio",
            goal="ratio <= 1.02",
            met=ratio <= 1.02,
            series={"daemon sync SPAWN": o_st, "bare claude -p": b_st},
            notes=f"added at p50 {1000 * (o_st.median - b_st.median):+.1f} ms; min ratio "
            f"{o_st.min / b_st.min:.3f}; {reps} pair(s); p99 ours {fmt(o_st.p99)} s",
        )
    ]
