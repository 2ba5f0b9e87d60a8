"""W1-W4: warm sessions (issue 6), real CLI + loopback stub API, through the daemon.

* W1: a later turn (2, 3, ...) of a session: warm SPAWN (the session's CLI stays up) vs cold
  SPAWN (``claude -p --resume``), alternating on one daemon. Goal: ratio <= 0.15.
* W2: a new session's first turn taken by a pre-warmed pool process (started >= 3 s before,
  as a pool process normally is) vs a cold first turn. Goal: <= 60 ms.
* W3: memory of one warm session's CLI after a few turns (VmRSS and PSS of its process
  group), and of an idle pool process. Report only.
* W4: the same two turns through blemeesd (``pip install blemees``), interleaved with ours.
  Goal: ours not slower. Skipped, with the reason, when blemees is not installed.

Every figure is a full turn as a client sees it: request sent -> result received.
``python -m bench.warm`` runs only these and writes ``bench/results/warm.json``.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from bench.core import REAL_CLAUDE, ROOT, Row, Run, Stats, benchmark, fmt
from bench.procs import (
    DaemonHandle,
    base_env,
    real_cli_missing,
    short_dir,
    start_daemon,
    start_stub_api,
    stop_pid,
)
from bench.wire import LineConn, request_line
from devtools.stub_api import OFFLINE_CLI_ENV

POOL_AGE_S = 3.0  # the real CLI finishes its own start-up ~3 s after exec
BLEMEESD = ROOT / ".venv" / "bin" / "blemeesd"


class Warm:
    """The shared set-up: stub API, a daemon with the default warm settings (warm turns, a
    pool of 1), and its work directory."""

    def __init__(self, run: Run) -> None:
        self.stub = start_stub_api(run)
        self.work = run.workdir / "warm-work"  # also the daemon's default cwd (pool flags)
        self.work.mkdir(exist_ok=True)
        self.env = {
            **OFFLINE_CLI_ENV,
            "ANTHROPIC_BASE_URL": self.stub.url,
            "KSI_PROJECT_ROOT": str(self.work),  # warm by default, a pool of 1: no flags
        }
        self.d: DaemonHandle = start_daemon(run, claude_bin=REAL_CLAUDE, env=self.env)
        self.conn = LineConn(self.d.socket, timeout=120)
        self.conn.call("CONNECT")
        self.seen: dict[int, float] = {}  # pool pid -> when first seen
        self.warm_sid: str | None = None
        self.cold_sid: str | None = None

    def spawn(self, prompt: str, **params: Any) -> tuple[float, dict[str, Any]]:
        line = request_line("SPAWN", {"prompt": prompt, "cwd": str(self.work), **params})
        t0 = time.perf_counter()
        reply = self.conn.request(line)
        dt = time.perf_counter() - t0
        obj: dict[str, Any] = orjson.loads(reply)
        if obj.get("status") != "success" or not obj["result"]["text"].startswith("echo:"):
            raise RuntimeError(f"SPAWN failed: {reply[:800]!r}")
        return dt, obj["result"]

    def aged_pool_process(self) -> dict[str, Any]:
        """Wait for a pool process that has been up for POOL_AGE_S; return its entry."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pooled = [w for w in self.conn.call("GET_PROCESSES")["result"]["warm"] if w["pooled"]]
            for w in pooled:
                first = self.seen.setdefault(w["pid"], time.monotonic())
                if time.monotonic() - first >= POOL_AGE_S:
                    entry: dict[str, Any] = w
                    return entry
            time.sleep(0.1)
        raise TimeoutError("the pool did not refill")

    def settle_refill(self) -> None:
        """After a pool hand-out: wait until the replacement CLI has started and settled, so
        that its start-up burst (~0.4 s of CPU) does not land in the next measurement."""
        deadline = time.monotonic() + 30
        while not any(w["pooled"] for w in self.conn.call("GET_PROCESSES")["result"]["warm"]):
            if time.monotonic() > deadline:
                raise TimeoutError("the pool did not refill")
            time.sleep(0.05)
        time.sleep(1.5)

    def session_pid(self, session_id: str) -> int:
        info = self.conn.call("GET_SESSION", {"session_id": session_id})["result"]["session"]
        if not info.get("warm"):
            raise RuntimeError(f"session {session_id} has no warm process")
        pid: int = info["warm"]["pid"]
        return pid


def warm_setup(run: Run) -> Warm:
    w: Warm = run.shared("warm", lambda: Warm(run))
    return w


def _skip(bench_id: str, what: str, goal: str) -> list[Row] | None:
    why = real_cli_missing()
    if why:
        print(f"{bench_id} skipped: {why}", flush=True)
        return [Row(bench_id, what, "ms", None, goal=goal, skipped=why)]
    return None


W1 = "later turn: warm SPAWN vs cold --resume SPAWN"


@benchmark("W1", W1, order=90)
def w1_turn_two(run: Run) -> list[Row]:
    if (skipped := _skip("W1", W1, "ratio <= 0.15")) is not None:
        return skipped
    w = warm_setup(run)
    reps = run.reps(12, 2)
    _, first = w.spawn("w1 warm 1", model="sonnet")  # non-default model: not the pool
    w.warm_sid = first["session_id"]
    _, cold_first = w.spawn("w1 cold 1", warm=False)
    w.cold_sid = cold_first["session_id"]
    warm_ms: list[float] = []
    cold_ms: list[float] = []
    cli_ms: list[float] = []  # the CLI's own duration_ms of the warm turns

    def warm_turn(i: int) -> None:
        dt, result = w.spawn(f"w1 warm {i + 2}", model="sonnet", session_id=w.warm_sid)
        warm_ms.append(1000 * dt)
        cli_ms.append(float(result["raw"]["duration_ms"]))

    def cold_turn(i: int) -> None:
        cold_ms.append(1000 * w.spawn(f"w1 cold {i + 2}", warm=False, session_id=w.cold_sid)[0])

    for i in range(reps):
        for step in (warm_turn, cold_turn) if i % 2 else (cold_turn, warm_turn):
            step(i)
    ws, cs = Stats.of(warm_ms, "ms"), Stats.of(cold_ms, "ms")
    ratio = ws.median / cs.median
    return [
        Row(
            "W1",
            W1,
            "ms",
            ws.median,
            cs.median,
            compare="ratio",
            goal="ratio <= 0.15",
            met=ratio <= 0.15,
            series={"warm SPAWN": ws, "cold --resume SPAWN": cs},
            notes=f"turns 2..{reps + 1} of one session each; saved "
            f"{fmt(cs.median - ws.median)} ms per turn at p50; the CLI's own "
            f"duration_ms of the warm turns p50 {fmt(Stats.of(cli_ms, 'ms').median)}",
        )
    ]


W2 = "first turn of a new session from the pool vs cold"


@benchmark("W2", W2, order=91)
def w2_pool_first_turn(run: Run) -> list[Row]:
    if (skipped := _skip("W2", W2, "<= 60 ms")) is not None:
        return skipped
    w = warm_setup(run)
    reps = run.reps(5, 1)
    pool_ms: list[float] = []
    cold_ms: list[float] = []
    cli_ms: list[float] = []  # the CLI's own duration_ms of those first turns
    misses = 0
    for i in range(reps):
        pooled = w.aged_pool_process()
        dt, result = w.spawn(f"w2 pool {i}")
        if result["session_id"] != pooled["session_id"]:
            misses += 1  # the pool process was not taken: not a pool figure
        else:
            pool_ms.append(1000 * dt)
            cli_ms.append(float(result["raw"]["duration_ms"]))
        w.settle_refill()
        cold_ms.append(1000 * w.spawn(f"w2 cold {i}", warm=False)[0])
    ps, cs = Stats.of(pool_ms, "ms"), Stats.of(cold_ms, "ms")
    return [
        Row(
            "W2",
            W2,
            "ms",
            ps.median,
            cs.median,
            compare="ratio",
            goal="<= 60 ms",
            met=ps.median <= 60 if pool_ms else None,
            series={
                "pool first turn": ps,
                "cold first turn": cs,
                "CLI's own duration_ms": Stats.of(cli_ms, "ms"),
            },
            notes=f"pool process up >= {POOL_AGE_S:g} s before the SPAWN; "
            f"{misses} miss(es) of {reps}; the CLI's own duration_ms is the part "
            "no daemon can remove",
        )
    ]


def _proc_mem_kb(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, keys in (
        ("status", ("VmRSS",)),
        ("smaps_rollup", ("Pss", "Private_Clean", "Private_Dirty")),
    ):
        try:
            text = Path(f"/proc/{pid}/{name}").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            if key in keys:
                out[key] = out.get(key, 0) + int(rest.split()[0])
    return out


def group_mem_mb(pgid: int) -> dict[str, float]:
    """VmRSS, PSS and private memory summed over the process group ``pgid`` (MiB)."""
    total: dict[str, int] = {}
    members = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) != pgid:  # fields after the comm: state, ppid, pgrp, ...
            continue
        members += 1
        for k, v in _proc_mem_kb(int(entry)).items():
            total[k] = total.get(k, 0) + v
    private = total.get("Private_Clean", 0) + total.get("Private_Dirty", 0)
    return {
        "rss": total.get("VmRSS", 0) / 1024,
        "pss": total.get("Pss", 0) / 1024,
        "private": private / 1024,
        "processes": members,
    }


W3 = "memory of a warm session's CLI (process group)"


@benchmark("W3", W3, order=92)
def w3_memory(run: Run) -> list[Row]:
    if (skipped := _skip("W3", W3, "report")) is not None:
        return skipped
    w = warm_setup(run)
    if w.warm_sid is None:  # W1 did not run: make a session with a few turns
        _, first = w.spawn("w3 1", warm=True, model="sonnet")
        w.warm_sid = first["session_id"]
        for i in range(3):
            w.spawn(f"w3 {i + 2}", warm=True, model="sonnet", session_id=w.warm_sid)
    session = group_mem_mb(w.session_pid(w.warm_sid))
    pool = group_mem_mb(w.aged_pool_process()["pid"])
    return [
        Row(
            "W3",
            W3,
            "MiB",
            session["pss"],
            pool["pss"],
            compare="delta",
            goal="report",
            ours_text=f"PSS {session['pss']:.0f} / RSS {session['rss']:.0f} / private "
            f"{session['private']:.0f} MiB",
            notes=f"floor = an idle pool process (PSS {pool['pss']:.0f}, RSS "
            f"{pool['rss']:.0f} MiB); {session['processes']:.0f} process(es) in the "
            "session's group",
            extra={"session": session, "pool_process": pool},
        )
    ]


W4 = "blemeesd: warm turn 2 and first turn, vs ours"


async def _blemees_turn(sess: Any, prompt: str) -> tuple[float, float]:
    """(wall seconds, the CLI's own duration_ms) of one blemeesd turn."""
    t0 = time.perf_counter()
    await sess.send_user(prompt)
    async for evt in sess.events():
        if evt.get("type") == "agent.result":
            return time.perf_counter() - t0, float(evt.get("duration_ms") or 0)
        if evt.get("type") == "blemeesd.error":
            raise RuntimeError(f"blemeesd error: {evt}")
    raise RuntimeError("blemeesd session ended without a result")


async def _w4_pairs(w: Warm, socket_path: str, reps: int) -> dict[str, list[float]]:
    # Imported by name: an optional benchmark dependency, not a requirement (untyped too).
    BlemeesClient = importlib.import_module("blemees.client").BlemeesClient

    # *_cli: the CLI's own duration_ms of the same turns; wall - cli = what the daemon adds.
    out: dict[str, list[float]] = {
        k: []
        for k in ("ours_warm", "bl_warm", "ours_first", "bl_first", "ours_warm_cli", "bl_warm_cli")
    }
    opts = {"model": "sonnet", "cwd": str(w.work)}
    async with await BlemeesClient.connect(socket_path) as client:
        for i in range(reps):
            pooled = w.aged_pool_process()
            dt, result = w.spawn(f"w4 ours {i}", warm=True)
            if result["session_id"] == pooled["session_id"]:
                out["ours_first"].append(1000 * dt)
            dt, second = w.spawn(f"w4 ours {i} b", warm=True, session_id=result["session_id"])
            out["ours_warm"].append(1000 * dt)
            out["ours_warm_cli"].append(float(second["raw"]["duration_ms"]))
            w.settle_refill()
            t0 = time.perf_counter()
            async with client.open_session(
                session_id=str(uuid.uuid4()), backend="claude", options=opts
            ) as sess:
                await _blemees_turn(sess, f"w4 blemees {i}")
                out["bl_first"].append(1000 * (time.perf_counter() - t0))
                dt, cli = await _blemees_turn(sess, f"w4 blemees {i} b")
                out["bl_warm"].append(1000 * dt)
                out["bl_warm_cli"].append(cli)
    return out


@benchmark("W4", W4, order=93)
def w4_blemeesd(run: Run) -> list[Row]:
    goal = "ours <= blemeesd"
    if (skipped := _skip("W4", W4, goal)) is not None:
        return skipped
    if not BLEMEESD.exists():
        why = "blemees is not installed in .venv (`pip install blemees`; not a requirement)"
        print(f"W4 skipped: {why}", flush=True)
        return [Row("W4", W4, "ms", None, goal=goal, skipped=why)]
    w = warm_setup(run)
    base = short_dir("bl")
    sock = base / "b.sock"
    env = {
        **base_env(),
        **OFFLINE_CLI_ENV,
        "ANTHROPIC_BASE_URL": w.stub.url,
        "CLAUDE_CONFIG_DIR": str(base / "claude-config"),
    }
    proc = subprocess.Popen(
        [
            str(BLEMEESD),
            "--socket",
            str(sock),
            "--claude",
            str(REAL_CLAUDE),
            "--log-level",
            "warning",
        ],
        cwd=w.work,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(base / "blemeesd.stderr", "wb"),  # noqa: SIM115
    )

    def cleanup() -> None:
        stop_pid(proc)
        shutil.rmtree(base, ignore_errors=True)

    run.on_exit(cleanup)
    deadline = time.monotonic() + 20
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"blemeesd did not start: {(base / 'blemeesd.stderr').read_text()}")
        time.sleep(0.02)
    got = asyncio.run(_w4_pairs(w, str(sock), run.reps(8, 1)))
    st = {k: Stats.of(v, "ms") for k, v in got.items()}
    added = {
        side: Stats.of(
            [a - b for a, b in zip(got[f"{side}_warm"], got[f"{side}_warm_cli"], strict=True)], "ms"
        )
        for side in ("ours", "bl")
    }
    return [
        Row(
            "W4a",
            "warm turn 2: ours vs blemeesd",
            "ms",
            st["ours_warm"].median,
            st["bl_warm"].median,
            compare="ratio",
            goal=goal,
            met=st["ours_warm"].median <= st["bl_warm"].median,
            series={
                "ours warm SPAWN": st["ours_warm"],
                "blemeesd warm turn": st["bl_warm"],
                "ours: wall - CLI duration_ms": added["ours"],
                "blemeesd: wall - CLI duration": added["bl"],
            },
            notes="interleaved; request -> result at the client; the CLI's own turn time "
            f"varies most, so compare what each adds: ours {fmt(added['ours'].median)} "
            f"ms vs blemeesd {fmt(added['bl'].median)} ms at p50",
        ),
        Row(
            "W4b",
            "first turn: ours (pool) vs blemeesd (open + turn)",
            "ms",
            st["ours_first"].median,
            st["bl_first"].median,
            compare="ratio",
            goal=goal,
            met=st["ours_first"].median <= st["bl_first"].median if got["ours_first"] else None,
            series={
                "ours pool first turn": st["ours_first"],
                "blemeesd open + first turn": st["bl_first"],
            },
            notes="blemeesd has no pool: its first turn includes the CLI start",
        ),
    ]


def main() -> int:
    """Run only W1-W4 and write bench/results/warm.json."""
    from bench.core import REGISTRY

    if __name__ == "__main__":
        # Run as a script, this module registered W1-W4 as ``__main__``; bench.suite imports
        # it again as ``bench.warm``, which must be the registration that counts.
        for bench_id in ("W1", "W2", "W3", "W4"):
            REGISTRY.pop(bench_id, None)
    from bench.__main__ import main as bench_main

    args = [
        "--only",
        "W1,W2,W3,W4",
        "--json",
        str(ROOT / "bench" / "results" / "warm.json"),
        *sys.argv[1:],
    ]
    return bench_main(args)


if __name__ == "__main__":
    sys.exit(main())
