"""Command line: ``python -m bench [--smoke] [--only P1,P3] [--json PATH] [--list]``.

Prints the results table (id, what, ours, floor, ratio/delta, goal, met?) and the
statistics of every series, and writes the JSON report (default
``bench/results/latest.json``) with the machine facts. Goals are reported, not enforced:
the exit status is non-zero only when a benchmark could not run (a harness failure).
``python -m bench.profile_spawn`` is the separate profiling step.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

import orjson

from bench.core import (
    ROOT,
    Row,
    Run,
    machine_facts,
    render_details,
    render_facts,
    render_table,
    selected,
)
from bench.suite import REGISTRY


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny repetition counts (CI smoke)")
    ap.add_argument("--only", help="comma-separated benchmark ids, e.g. P1,P3")
    ap.add_argument(
        "--json",
        type=Path,
        default=ROOT / "bench" / "results" / "latest.json",
        help="where to write the JSON report",
    )
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = ap.parse_args(argv)
    benches = selected(args.only.split(",") if args.only else None)
    if args.list:
        for b in benches:
            print(f"{b.id:<4} {b.title}")
        return 0

    # SIGTERM (e.g. a CI timeout) goes through the same cleanup as Ctrl-C.
    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    facts = machine_facts()
    mode = "smoke" if args.smoke else "full"
    print(f"KSI daemon benchmarks ({mode}), {len(benches)} of {len(REGISTRY)}", flush=True)
    print(render_facts(facts), flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="kb-run-", dir="/tmp"))
    run = Run(smoke=args.smoke, workdir=workdir)
    rows: list[Row] = []
    errors: dict[str, str] = {}
    timings: dict[str, float] = {}
    started = time.perf_counter()
    try:
        for b in benches:
            t0 = time.perf_counter()
            print(f"-- {b.id}: {b.title} ...", flush=True)
            try:
                got = b.fn(run)
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                errors[b.id] = "".join(traceback.format_exception(exc))
                print(f"   {b.id} FAILED: {exc!r}", flush=True)
                got = []
            timings[b.id] = round(time.perf_counter() - t0, 2)
            rows.extend(got)
            for r in got:
                status = "skipped" if r.skipped else (r.ours_text or f"{r.ours_value:.4g}")
                print(f"   {r.id}: {status}", flush=True)
            print(f"   ({timings[b.id]:.1f} s)", flush=True)
    except KeyboardInterrupt:
        print("interrupted; stopping the processes started", flush=True)
        errors["interrupted"] = "KeyboardInterrupt"
    finally:
        run.close()
        shutil.rmtree(workdir, ignore_errors=True)
    total = time.perf_counter() - started
    print()
    print(render_table(rows))
    print()
    print(render_details(rows))
    for bid, err in errors.items():
        print(f"\n{bid} error:\n{err}")
    report: dict[str, Any] = {
        "mode": mode,
        "machine": facts,
        "total_s": round(total, 1),
        "timings_s": timings,
        "rows": [r.to_dict() for r in rows],
        "errors": errors,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    tmp.replace(args.json)
    print(f"\ntotal {total:.1f} s; JSON report: {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
