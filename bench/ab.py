"""A/B: measure two daemon trees ("before" and "after" = this checkout) in one run.

    .venv/bin/python -m bench.ab --revert daemon/server/connection.py,daemon/commands/registry.py
    .venv/bin/python -m bench.ab --revert daemon/server/connection.py --only P3,P4 --rounds 2

``--revert`` builds the "before" tree: a copy of the working tree's daemon with the given
files taken from ``--rev`` (default HEAD), so only those changes differ. ``--base DIR``
uses a ready tree instead (one holding ``daemon.py``, ``daemon/`` and
``claude_cli_provider.py``).

Without ``--only`` both daemons run at once (instant fake CLI): sequential HEALTH_CHECK /
GET_SHARED latency alternates request by request between them, and pipelined throughput,
one-shot connections, sync SPAWN round trips and async SPAWN throughput alternate in
small blocks. That is the fair comparison on a noisy machine. With ``--only`` whole
benchmarks run once per tree per round instead (order alternating between rounds).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.core import ROOT, Row, Run, Stats, fmt, selected
from bench.procs import COLD, DaemonHandle, instant_fake, start_daemon
from bench.sockets import CONNECT, GS, HC, _pipelined, _sequential
from bench.spawn import _check_spawn, ours_throughput, spawn_line
from bench.suite import REGISTRY
from bench.wire import LineConn, one_shot

TREE = ["daemon.py", "daemon", "claude_cli_provider.py"]


def make_base(revert: list[str], rev: str) -> Path:
    base = Path(tempfile.mkdtemp(prefix="kb-ab-", dir="/tmp"))
    for name in TREE:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, base / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, base / name)
    for path in revert:
        old = subprocess.run(
            ["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True
        ).stdout
        (base / path).write_bytes(old)
    return base


def _measures(d: DaemonHandle, smoke: bool) -> dict[str, tuple[float, str]]:
    """One block of each measurement on one daemon: name -> (value, unit)."""
    k = 1 if smoke else 5
    out: dict[str, tuple[float, str]] = {}
    c = LineConn(d.socket)
    try:
        c.request(CONNECT)
        for name, line in (("HEALTH_CHECK", HC), ("GET_SHARED", GS)):
            out[f"{name} pipelined w=100"] = (_pipelined(c, line, 100, 10 * k), "req/s")
            out[f"{name} pipelined w=1000"] = (_pipelined(c, line, 1000, 2 * k), "req/s")
        lat: list[float] = []
        for i in range(10 * k):
            t0 = time.perf_counter_ns()
            _check_spawn(c.request(spawn_line(d.work, f"ab {i}")))
            lat.append((time.perf_counter_ns() - t0) / 1e6)
        out["sync SPAWN p50"] = (Stats.of(lat, "ms").median, "ms")
    finally:
        c.close()
    lat = []
    for _ in range(50 * k):
        t0 = time.perf_counter_ns()
        one_shot(d.socket, HC)
        lat.append((time.perf_counter_ns() - t0) / 1e3)
    out["one-shot HEALTH_CHECK p50"] = (Stats.of(lat, "us").median, "us")
    out["async SPAWN throughput, cap 4"] = (ours_throughput(d, 20 * k, "ab"), "spawns/s")
    return out


def _sequential_pairs(daemons: dict[str, DaemonHandle], n: int) -> dict[str, tuple[float, str]]:
    """Sequential latency, alternating single requests between the two daemons."""
    out: dict[str, tuple[float, str]] = {}
    conns = {side: LineConn(d.socket) for side, d in daemons.items()}
    try:
        for c in conns.values():
            c.request(CONNECT)
        for name, line in (("HEALTH_CHECK", HC), ("GET_SHARED", GS)):
            lat: dict[str, list[float]] = {side: [] for side in conns}
            for i in range(n):
                for side in ("before", "after") if i % 2 else ("after", "before"):
                    _sequential(conns[side], line, 1, lat[side])
            for side in conns:
                out[f"{side}:{name} sequential p50"] = (Stats.of(lat[side], "us").median, "us")
    finally:
        for c in conns.values():
            c.close()
    return out


def interleaved(base: Path, rounds: int, smoke: bool) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="kb-ab-run-", dir="/tmp"))
    run = Run(smoke=smoke, workdir=workdir)
    got: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    units: dict[str, str] = {}
    try:
        fake = instant_fake(run)
        env = {**COLD, "KSI_MAX_CONCURRENCY": "4"}
        daemons = {
            "before": start_daemon(run, claude_bin=fake, env=env, root=base),
            "after": start_daemon(run, claude_bin=fake, env=env, root=ROOT),
        }
        for d in daemons.values():  # warm-up, and the key GET_SHARED reads
            c = LineConn(d.socket)
            c.request(CONNECT)
            c.call("SET_SHARED", {"key": "bench", "value": {"n": 1, "tag": "benchmark"}})
            c.close()
            _measures(d, True)
        for r in range(rounds):
            order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
            for key, (value, unit) in _sequential_pairs(daemons, 100 if smoke else 500).items():
                side, name = key.split(":", 1)
                got[side].setdefault(name, []).append(value)
                units[name] = unit
            for side in order:
                for name, (value, unit) in _measures(daemons[side], smoke).items():
                    got[side].setdefault(name, []).append(value)
                    units[name] = unit
            print(f"  round {r + 1}/{rounds} done", flush=True)
    finally:
        run.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n{'measure (median of rounds)':<34} {'before':>10} {'after':>10} {'after/before':>12}")
    for name, after in got["after"].items():
        mb, ma = statistics.median(got["before"][name]), statistics.median(after)
        print(f"{name:<34} {fmt(mb):>10} {fmt(ma):>10} {ma / mb:>11.3f}x  {units[name]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--base", type=Path, help="a ready 'before' tree")
    src.add_argument("--revert", help="comma-separated files to take from --rev")
    ap.add_argument("--rev", default="HEAD")
    ap.add_argument("--only", help="whole benchmarks by id, e.g. P3,P4")
    ap.add_argument(
        "--rounds", type=int, default=None, help="default 20 (interleaved) or 2 (--only)"
    )
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    base = args.base or make_base(args.revert.split(","), args.rev)
    if not args.only:
        try:
            interleaved(base, args.rounds or 20, args.smoke)
        finally:
            if args.revert:
                shutil.rmtree(base, ignore_errors=True)
        return 0
    benches = selected(args.only.split(","))
    args.rounds = args.rounds or 2
    trees = {"before": base, "after": ROOT}
    results: dict[str, dict[str, list[Row]]] = {"before": {}, "after": {}}
    print(f"A/B of {', '.join(b.id for b in benches)} ({len(REGISTRY)} known): before = {base}")
    try:
        for r in range(args.rounds):
            order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
            for side in order:
                workdir = Path(tempfile.mkdtemp(prefix="kb-ab-run-", dir="/tmp"))
                run = Run(smoke=args.smoke, workdir=workdir, daemon_root=trees[side])
                try:
                    for b in benches:
                        for row in b.fn(run):
                            results[side].setdefault(row.id, []).append(row)
                            print(
                                f"  round {r} {side:6} {row.id}: "
                                f"{row.ours_text or fmt(row.ours_value)} {row.unit}",
                                flush=True,
                            )
                finally:
                    run.close()
                    shutil.rmtree(workdir, ignore_errors=True)
    finally:
        if args.revert:
            shutil.rmtree(base, ignore_errors=True)
    print(f"\n{'id':<11} {'what':<58} {'before':>12} {'after':>12} {'after/before':>12}")
    for rid, rows in results["after"].items():
        before = [x.ours_value for x in results["before"].get(rid, []) if x.ours_value]
        after = [x.ours_value for x in rows if x.ours_value]
        if not before or not after:
            continue
        mb, ma = statistics.median(before), statistics.median(after)
        print(
            f"{rid:<11} {rows[0].what[:58]:<58} {fmt(mb):>12} {fmt(ma):>12} {ma / mb:>11.3f}x"
            f"  {rows[0].unit}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
