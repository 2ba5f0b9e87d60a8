"""SPAWN benchmarks on the instant fake CLI: P1 (sync round trip), P7 (memory), P8 (throughput).

The floor of P1 and P8 is :mod:`bench.floor_server` in ``exec`` mode: a minimal asyncio
server that runs the same fake with bare ``asyncio.create_subprocess_exec`` per request.
Both sides are timed the same way, from the benchmark client, so the difference is what
the daemon adds on top of process creation and a socket round trip.

A second floor, ``litellm`` mode, puts that bare exec behind ``litellm.acompletion`` (a
minimal CustomLLM). The product requires every turn to go through LiteLLM, so the rows
P1.L and P8.L.* (reported, no goal) separate LiteLLM's own cost from the daemon's.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import orjson

from bench.core import Row, Run, Stats, benchmark
from bench.procs import COLD, DaemonHandle, fake_daemon, instant_fake, start_daemon, start_floor
from bench.wire import LineConn, request_line

COMPLETE = b'{"event":"PROCESS_COMPLETE"'


def spawn_line(work: Path, prompt: str, mode: str = "sync", **params: Any) -> bytes:
    return request_line("SPAWN", {"prompt": prompt, "mode": mode, "cwd": str(work), **params})


def exec_floor(run: Run):  # -> ServerHandle
    return run.shared("exec_floor", lambda: start_floor(run, "exec", fake=instant_fake(run)))


def litellm_floor(run: Run):  # -> ServerHandle
    return run.shared("litellm_floor", lambda: start_floor(run, "litellm", fake=instant_fake(run)))


def _check_spawn(reply: bytes) -> None:
    if not reply.startswith(b'{"status":"success"') or b'"status":"completed"' not in reply:
        raise RuntimeError(f"SPAWN failed: {reply[:600]!r}")


# -- P1 -------------------------------------------------------------------------------------


@benchmark("P1", "sync SPAWN round trip, instant fake CLI", order=10)
def p1_sync_spawn(run: Run) -> list[Row]:
    d = fake_daemon(run)
    floor = exec_floor(run)
    n, warm = run.reps(300, 20), run.reps(20, 3)
    ours_conn = LineConn(d.socket)
    ours_conn.call("CONNECT")
    floor_conn = LineConn(floor.socket)
    llm_conn = LineConn(litellm_floor(run).socket)
    ours_ms: list[float] = []
    floor_ms: list[float] = []
    exec_ms: list[float] = []
    llm_ms: list[float] = []

    def ours_once(i: int) -> float:
        line = spawn_line(d.work, f"bench {i}")
        t0 = time.perf_counter_ns()
        reply = ours_conn.request(line)
        dt = (time.perf_counter_ns() - t0) / 1e6
        _check_spawn(reply)
        return dt

    def floor_once(i: int, conn: LineConn) -> tuple[float, float]:
        line = f"bench {i}\n".encode()
        t0 = time.perf_counter_ns()
        reply = conn.request(line)
        dt = (time.perf_counter_ns() - t0) / 1e6
        obj = orjson.loads(reply)
        if obj["rc"] != 0 or '"type":"result"' not in obj["out"]:
            raise RuntimeError(f"floor exec failed: {obj}")
        return dt, obj["exec_ns"] / 1e6

    gc.disable()
    try:
        for i in range(warm + n):
            # Alternate which side goes first so that drift and ordering effects cancel.
            if i % 2:
                o = ours_once(i)
                f, e = floor_once(i, floor_conn)
                lf, _ = floor_once(i, llm_conn)
            else:
                lf, _ = floor_once(i, llm_conn)
                f, e = floor_once(i, floor_conn)
                o = ours_once(i)
            if i >= warm:
                ours_ms.append(o)
                floor_ms.append(f)
                exec_ms.append(e)
                llm_ms.append(lf)
    finally:
        gc.enable()
        ours_conn.close()
        floor_conn.close()
        llm_conn.close()
    ours, fl, ex = Stats.of(ours_ms, "ms"), Stats.of(floor_ms, "ms"), Stats.of(exec_ms, "ms")
    llm = Stats.of(llm_ms, "ms")
    added = ours.median - fl.median
    return [
        Row(
            "P1",
            "sync SPAWN round trip (p50), instant fake",
            "ms",
            ours.median,
            fl.median,
            compare="delta",
            goal="<= +3 ms at p50",
            met=added <= 3.0,
            series={"daemon SPAWN": ours, "floor server exec": fl, "bare exec (in-process)": ex},
            notes=(
                f"added at p50 {added:.2f} ms; vs bare in-process exec "
                f"{ours.median - ex.median:.2f} ms; p99 ours {ours.p99:.2f} / floor {fl.p99:.2f}"
            ),
        ),
        Row(
            "P1.L",
            "same, floor = bare exec behind litellm.acompletion",
            "ms",
            ours.median,
            llm.median,
            compare="delta",
            goal="report",
            series={"floor server litellm + exec": llm},
            notes=f"LiteLLM's own share of the P1 delta: {llm.median - fl.median:.2f} ms at p50",
        ),
    ]


# -- P8 -------------------------------------------------------------------------------------


def ours_throughput(d: DaemonHandle, n: int, tag: str) -> float:
    """Send ``n`` async SPAWNs at once; spawns/s until the n-th PROCESS_COMPLETE arrives."""
    conn = LineConn(d.socket)
    try:
        conn.call("SUBSCRIBE", {"event_types": ["PROCESS_COMPLETE"]})
        batch = b"".join(spawn_line(d.work, f"{tag} {i}", "async") for i in range(n))
        completes = acks = 0
        t0 = time.perf_counter_ns()
        conn.send(batch)
        while completes < n:
            line = conn.read_line()
            if line.startswith(COMPLETE):
                completes += 1
                if orjson.loads(line)["data"]["status"] != "completed":
                    raise RuntimeError(f"spawn failed: {line[:600]!r}")
            else:
                acks += 1
                if not line.startswith(b'{"status":"success"'):
                    raise RuntimeError(f"async SPAWN refused: {line[:600]!r}")
        dt = (time.perf_counter_ns() - t0) / 1e9
        while acks < n:  # every ack precedes its turn's completion, but be exact
            conn.read_line()
            acks += 1
        return n / dt
    finally:
        conn.close()


def floor_throughput(sock: Path, n: int, parallel: int) -> float:
    conn = LineConn(sock)
    try:
        conn.request(f"C {parallel}\n".encode())
        batch = b"".join(f"bench {i}\n".encode() for i in range(n))
        t0 = time.perf_counter_ns()
        conn.send(batch)
        for _ in range(n):
            line = conn.read_line()
            if b'"rc":0' not in line:
                raise RuntimeError(f"floor exec failed: {line[:300]!r}")
        return n / ((time.perf_counter_ns() - t0) / 1e9)
    finally:
        conn.close()


@benchmark("P8", "async SPAWN throughput at concurrency cap 4 / 16", order=80)
def p8_throughput(run: Run) -> list[Row]:
    n, rounds = run.reps(400, 40), run.reps(3, 1)
    d4 = fake_daemon(run)
    d16 = start_daemon(run, claude_bin=instant_fake(run), env={**COLD, "KSI_MAX_CONCURRENCY": "16"})
    floor, llm_floor = exec_floor(run), litellm_floor(run)
    # Warm-up: both daemons and the floors run the fake a few times first.
    ours_throughput(d4, 8, "warm")
    ours_throughput(d16, 8, "warm")
    floor_throughput(floor.socket, 8, 4)
    floor_throughput(llm_floor.socket, 8, 4)
    res: dict[int, tuple[list[float], list[float], list[float]]] = {
        4: ([], [], []),
        16: ([], [], []),
    }
    gc.disable()
    try:
        for r in range(rounds):
            for cap, d in ((4, d4), (16, d16)):
                ours, bare, llm = res[cap]
                if r % 2:
                    llm.append(floor_throughput(llm_floor.socket, n, cap))
                    bare.append(floor_throughput(floor.socket, n, cap))
                    ours.append(ours_throughput(d, n, f"r{r}"))
                else:
                    ours.append(ours_throughput(d, n, f"r{r}"))
                    bare.append(floor_throughput(floor.socket, n, cap))
                    llm.append(floor_throughput(llm_floor.socket, n, cap))
    finally:
        gc.enable()
    d16.stop()
    rows = []
    for cap in (4, 16):
        ours_s, fl, llm_s = (Stats.of(x, "spawns/s") for x in res[cap])
        ratio = ours_s.median / fl.median
        rows.append(
            Row(
                f"P8.{cap}",
                f"async SPAWN throughput, cap {cap} ({n} spawns)",
                "spawns/s",
                ours_s.median,
                fl.median,
                compare="ratio",
                goal=">= 0.8x bare",
                met=ratio >= 0.8,
                series={"daemon": ours_s, f"bare exec, {cap} parallel": fl},
                notes=f"median of {rounds} round(s) of {n}",
            )
        )
        rows.append(
            Row(
                f"P8.L.{cap}",
                f"same, floor = bare exec behind litellm.acompletion, cap {cap}",
                "spawns/s",
                ours_s.median,
                llm_s.median,
                compare="ratio",
                goal="report",
                series={f"litellm + exec, {cap} parallel": llm_s},
                notes=f"LiteLLM alone takes the floor to {llm_s.median / fl.median:.2f}x of bare",
            )
        )
    return rows


# -- P7 -------------------------------------------------------------------------------------


def spawn_batch(conn: LineConn, work: Path, count: int, start: int) -> None:
    """``count`` async SPAWNs at once on a PROCESS_COMPLETE subscriber; wait for them all."""
    conn.send(b"".join(spawn_line(work, f"mem {start + i}", "async") for i in range(count)))
    completes = acks = 0
    while completes < count or acks < count:
        line = conn.read_line()
        if line.startswith(COMPLETE):
            completes += 1
            if b'"status":"failed"' in line:
                raise RuntimeError(f"spawn failed: {line[:600]!r}")
        else:
            acks += 1
            if not line.startswith(b'{"status":"success"'):
                raise RuntimeError(f"async SPAWN refused: {line[:600]!r}")


@benchmark("P7", "daemon RSS idle, and its growth over many SPAWNs", order=70)
def p7_memory(run: Run) -> list[Row]:
    total, warm_up = run.reps(5000, 200), run.reps(500, 50)
    step = run.reps(500, 50)
    d = start_daemon(run, claude_bin=instant_fake(run), env={**COLD, "KSI_MAX_CONCURRENCY": "4"})
    conn = LineConn(d.socket)
    conn.call("SUBSCRIBE", {"event_types": ["PROCESS_COMPLETE"]})
    spawn_batch(conn, d.work, 5, 0)  # first turns: lazy imports and caches
    time.sleep(1.0)
    idle_kb = d.rss_kb()
    trajectory: list[tuple[int, int]] = [(0, idle_kb)]
    done = 0
    warm_kb = idle_kb
    t0 = time.perf_counter()
    checkpoints = sorted({warm_up, total, *range(step, total, step)})
    for mark in checkpoints:
        while done < mark:
            count = min(100, mark - done)
            spawn_batch(conn, d.work, count, done)
            done += count
        if done == warm_up:
            time.sleep(0.5)
            warm_kb = d.rss_kb()
        trajectory.append((done, d.rss_kb()))
    elapsed = time.perf_counter() - t0
    time.sleep(1.0)
    end_kb = d.rss_kb()
    hwm = _vm_hwm(d.pid)
    health = d.health()
    conn.close()
    d.stop()
    growth = (end_kb - idle_kb) / 1024
    after = (end_kb - warm_kb) / 1024
    idle_mb = idle_kb / 1024
    traj = {
        "spawns": [t[0] for t in trajectory],
        "rss_mb": [round(t[1] / 1024, 2) for t in trajectory],
    }
    return [
        Row(
            "P7a",
            "RSS idle after warm-up (LiteLLM loaded)",
            "MB",
            idle_mb,
            goal="<= 230 MB",
            met=idle_mb <= 230,
            extra={"vm_hwm_mb": hwm},
        ),
        Row(
            "P7b",
            f"RSS growth over {total} SPAWNs",
            "MB",
            growth,
            goal="<= 5 MB",
            met=growth <= 5,
            notes=f"{total} spawns in {elapsed:.1f} s; end RSS "
            f"{end_kb / 1024:.1f} MB, peak {hwm:.1f} MB",
            extra={"trajectory": traj, "counts": health.get("counts")},
        ),
        Row(
            "P7c",
            f"RSS growth after a {warm_up}-SPAWN warm-up ({total - warm_up} more)",
            "MB",
            after,
            goal="<= 5 MB",
            met=after <= 5,
            notes=f"RSS after warm-up {warm_kb / 1024:.1f} MB",
        ),
    ]


def _vm_hwm(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")
