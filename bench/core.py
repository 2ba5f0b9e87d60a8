"""The harness core: statistics, result rows, the benchmark registry, and the report.

Every benchmark is a function registered with :func:`benchmark`. It receives a
:class:`Run` (mode, repetition scaling, shared resources such as a running daemon) and
returns :class:`Row` objects: one measured figure each, with its floor measured side by
side in the same run, the comparison (ratio or delta) and the goal. Goals are reported,
never enforced: a missed goal does not make the harness fail.

Adding a benchmark (e.g. the warm-session ones of issue 6)::

    from bench.core import Row, Run, benchmark

    @benchmark("W1", "turn 2 warm vs cold --resume", order=90)
    def warm_turn(run: Run) -> list[Row]:
        ...
        return [Row("W1", "turn 2 warm vs cold --resume", ours=..., floor=..., ...)]

and import its module in :mod:`bench.suite`.
"""

from __future__ import annotations

import math
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parent.parent
VENV_PY = ROOT / ".venv" / "bin" / "python"
REAL_CLAUDE = ROOT / "node_modules" / ".bin" / "claude"


# -- statistics -----------------------------------------------------------------------------


def percentile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100) of an already sorted sequence."""
    if not sorted_xs:
        return math.nan
    if len(sorted_xs) == 1:
        return float(sorted_xs[0])
    pos = (len(sorted_xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return float(sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo))


@dataclass(frozen=True, slots=True)
class Stats:
    """Summary of repeated measurements, all in ``unit``."""

    n: int
    min: float
    median: float
    p99: float
    max: float
    mean: float
    unit: str

    @classmethod
    def of(cls, xs: Sequence[float], unit: str) -> Stats:
        s = sorted(xs)
        if not s:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan, unit)
        return cls(len(s), s[0], percentile(s, 50), percentile(s, 99), s[-1], sum(s) / len(s), unit)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "min": self.min,
            "median": self.median,
            "p99": self.p99,
            "max": self.max,
            "mean": self.mean,
            "unit": self.unit,
        }

    def brief(self) -> str:
        return (
            f"n={self.n} min={fmt(self.min)} med={fmt(self.median)} "
            f"p99={fmt(self.p99)} max={fmt(self.max)} {self.unit}"
        )


def fmt(x: float | None, digits: int = 3) -> str:
    """A number with ``digits`` significant digits, without scientific notation."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    decimals = max(0, digits - 1 - mag)
    return f"{x:,.{decimals}f}"


# -- result rows ----------------------------------------------------------------------------

Compare = Literal["ratio", "delta", "none"]


@dataclass
class Row:
    """One reported figure: ours vs its floor, and the goal.

    ``ours_value``/``floor_value`` are the headline numbers (e.g. a median); ``series``
    keeps the full statistics of every measured series for the JSON report.
    """

    id: str
    what: str
    unit: str
    ours_value: float | None
    floor_value: float | None = None
    compare: Compare = "none"
    goal: str = "report"
    # True/False when the goal applies; None when it is report-only or was not measured.
    met: bool | None = None
    series: dict[str, Stats] = field(default_factory=dict)
    notes: str = ""
    skipped: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Replaces the "ours" cell when one number does not say it (e.g. "p50 1.2 / p99 3.4 ms").
    ours_text: str | None = None

    @property
    def comparison(self) -> float | None:
        if self.ours_value is None or self.floor_value is None:
            return None
        if self.compare == "ratio":
            return self.ours_value / self.floor_value if self.floor_value else None
        if self.compare == "delta":
            return self.ours_value - self.floor_value
        return None

    def comparison_text(self) -> str:
        c = self.comparison
        if c is None:
            return "-"
        if self.compare == "ratio":
            return f"{c:.3f}x"
        return f"{'+' if c >= 0 else ''}{fmt(c)} {self.unit}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "what": self.what,
            "unit": self.unit,
            "ours": self.ours_value,
            "floor": self.floor_value,
            "compare": self.compare,
            "comparison": self.comparison,
            "goal": self.goal,
            "met": self.met,
            "notes": self.notes,
            "skipped": self.skipped,
            "ours_text": self.ours_text,
            "series": {k: v.to_dict() for k, v in self.series.items()},
            "extra": self.extra,
        }


@dataclass
class Run:
    """What a benchmark function gets: the mode, scaling helpers and shared resources."""

    smoke: bool
    workdir: Path
    # The project tree whose daemon.py the benchmarks start (bench.ab points it at a copy).
    daemon_root: Path = ROOT
    resources: dict[str, Any] = field(default_factory=dict)
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def reps(self, full: int, smoke: int) -> int:
        return smoke if self.smoke else full

    def shared(self, key: str, factory: Callable[[], Any]) -> Any:
        """A resource created on first use and reused by later benchmarks in this run."""
        if key not in self.resources:
            self.resources[key] = factory()
        return self.resources[key]

    def on_exit(self, fn: Callable[[], None]) -> None:
        self.cleanups.append(fn)

    def close(self) -> None:
        while self.cleanups:
            fn = self.cleanups.pop()
            try:
                fn()
            except Exception as exc:  # cleanup must go on
                print(f"warning: cleanup failed: {exc!r}")


# -- registry -------------------------------------------------------------------------------

BenchFn = Callable[[Run], list[Row]]


@dataclass(frozen=True)
class Benchmark:
    id: str
    title: str
    fn: BenchFn
    order: int


REGISTRY: dict[str, Benchmark] = {}


def benchmark(
    bench_id: str, title: str, *, order: int | None = None
) -> Callable[[BenchFn], BenchFn]:
    """Register a benchmark function under ``bench_id`` (run in ``order``, then id)."""

    def decorate(fn: BenchFn) -> BenchFn:
        if bench_id in REGISTRY:
            raise ValueError(f"benchmark {bench_id} registered twice")
        REGISTRY[bench_id] = Benchmark(
            bench_id, title, fn, order if order is not None else len(REGISTRY) * 10
        )
        return fn

    return decorate


def selected(ids: Sequence[str] | None) -> list[Benchmark]:
    benches = sorted(REGISTRY.values(), key=lambda b: (b.order, b.id))
    if not ids:
        return benches
    wanted = {i.upper() for i in ids}
    unknown = wanted - set(REGISTRY)
    if unknown:
        raise SystemExit(
            f"unknown benchmark id(s): {', '.join(sorted(unknown))}; "
            f"known: {', '.join(b.id for b in benches)}"
        )
    return [b for b in benches if b.id in wanted]


# -- machine facts --------------------------------------------------------------------------


def _cmd(argv: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=cwd, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return m.group(1).strip() if m else "unknown"


def mem_total_mb() -> float | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    m = re.search(r"^MemTotal:\s+(\d+) kB", text, re.M)
    return round(int(m.group(1)) / 1024) if m else None


def machine_facts() -> dict[str, Any]:
    commit = _cmd(["git", "rev-parse", "HEAD"], ROOT)
    dirty = _cmd(["git", "status", "--porcelain", "--untracked-files=no"], ROOT)
    claude = _cmd([str(REAL_CLAUDE), "--version"]) if REAL_CLAUDE.exists() else None
    py = _cmd([str(VENV_PY), "-c", "import sys; print(sys.version.split()[0])"])
    return {
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "mem_total_mb": mem_total_mb(),
        "kernel": platform.release(),
        "python": py or platform.python_version(),
        "claude_cli": claude,
        "git_commit": commit,
        "git_dirty": bool(dirty),
        "loadavg_at_start": list(os.getloadavg()),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# -- report ---------------------------------------------------------------------------------


def value_text(v: float | None, unit: str) -> str:
    return "-" if v is None else f"{fmt(v)} {unit}"


def render_table(rows: Sequence[Row]) -> str:
    header = ("id", "what", "ours", "floor", "ratio/delta", "goal", "met?")
    body = []
    for r in rows:
        if r.skipped:
            body.append((r.id, r.what, "skipped", "-", "-", r.goal, "-"))
            continue
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        body.append(
            (
                r.id,
                r.what,
                r.ours_text or value_text(r.ours_value, r.unit),
                value_text(r.floor_value, r.unit),
                r.comparison_text(),
                r.goal,
                met,
            )
        )
    widths = [
        max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)
    ]
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def render_details(rows: Sequence[Row]) -> str:
    out = []
    for r in rows:
        if r.skipped:
            out.append(f"{r.id} {r.what}: skipped: {r.skipped}")
            continue
        out.append(f"{r.id} {r.what}")
        for name, st in r.series.items():
            out.append(f"    {name:<28} {st.brief()}")
        if r.notes:
            out.append(f"    note: {r.notes}")
    return "\n".join(out)


def render_facts(facts: dict[str, Any]) -> str:
    return (
        f"machine: {facts['nproc']} cpus ({facts['cpu_model']}), "
        f"{facts['mem_total_mb']} MB, kernel {facts['kernel']}, python {facts['python']}, "
        f"claude CLI {facts['claude_cli'] or 'not installed'}, "
        f"commit {str(facts['git_commit'])[:12]}{' (dirty)' if facts['git_dirty'] else ''}, "
        f"load {' '.join(f'{x:.2f}' for x in facts['loadavg_at_start'])}"
    )
