"""Profile the daemon's SPAWN path with py-spy under a P1-style load (sync SPAWNs, instant
fake CLI, one client, back to back) and summarise where the daemon's CPU time goes.

    .venv/bin/pip install py-spy      # profiling only; not a project requirement
    .venv/bin/python -m bench.profile_spawn [--seconds 20] [--rate 250] [--load spawn]

``--load health`` / ``--load get_shared`` profile the P3 request path instead.

Writes the collapsed stacks and the summary to ``bench/results/profile-<load>.*``. The
summary lists self time (the function on top of the stack) and inclusive time (anywhere
in the stack) as a share of the daemon's busy samples, plus a breakdown by layer.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from bench.core import ROOT, Run
from bench.procs import fake_daemon
from bench.spawn import _check_spawn, spawn_line
from bench.wire import LineConn, request_line

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")

# Where a sample's time is charged: the innermost frame that belongs to one of these.
LAYERS: list[tuple[str, str]] = [
    ("daemon/server/", "daemon: server (socket, connections)"),
    ("daemon/protocol.py", "daemon: protocol (parse/encode)"),
    ("daemon/commands/registry.py", "daemon: registry (validate/dump)"),
    ("daemon/commands/", "daemon: command handlers"),
    ("daemon/turns/scheduler.py", "daemon: turn scheduler"),
    ("daemon/state/records.py", "daemon: state"),
    ("daemon/state/db.py", "daemon: store (SQLite)"),
    ("daemon/events/bus.py", "daemon: bus"),
    ("daemon/state/turnlog.py", "daemon: turn log"),
    ("daemon/claude/runner.py", "daemon.claude: runner"),
    ("daemon/claude/", "daemon.claude: engine/backends/results"),
    ("claude_cli_provider.py", "provider (claude_cli_provider)"),
    ("litellm/", "litellm"),
]
LIB_LAYERS: list[tuple[str, str]] = [
    ("pydantic", "pydantic"),
    ("structlog", "structlog"),
    ("asyncio/", "asyncio (loop, streams, subprocess)"),
    ("subprocess.py", "subprocess (fork/exec)"),
    ("selectors.py", "selectors"),
    ("threading.py", "threads"),
    ("sqlite3", "sqlite3"),
]


_THREAD = re.compile(r"^thread \(\d+\): (?P<name>.*)$")


def parse_raw(text: str) -> list[tuple[str, list[str], int]]:
    """py-spy ``--format raw --threads`` lines -> (thread group, frames, count)."""
    stacks = []
    for line in text.splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        group = "?"
        if frames and (m := _THREAD.match(frames[0])):
            frames = frames[1:]
            # asyncio-waitpid-1234 (one child-watcher thread per child), asyncio_0 (executor)
            group = re.sub(r"[-_ ]?\d+( \d+)?$", "", m.group("name"))
        stacks.append((group, frames, int(count)))
    return stacks


def short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m.group("file")
    for marker in ("site-packages/", "/lib/python3.11/", str(ROOT) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({path})"


def layer_of(frames: list[str]) -> str:
    """Innermost project/litellm frame decides; else the innermost known library."""
    for frame in reversed(frames):
        for marker, name in LAYERS:
            if marker in frame:
                return name
    for frame in reversed(frames):
        for marker, name in LIB_LAYERS:
            if marker in frame:
                return name
    return "other"


def _tops(stacks: list[tuple[list[str], int]], total: int, top: int, with_self: bool) -> list[str]:
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    for frames, c in stacks:
        names = [short(f) for f in frames]
        if names:
            self_t[names[-1]] += c
        for n in set(names):
            incl[n] += c
        layers[layer_of(frames)] += c
    out = ["  by layer (innermost project or library frame):"]
    out += [f"    {100 * c / total:5.1f}%  {name}" for name, c in layers.most_common()]
    out += [f"  top {top} inclusive:"]
    out += [f"    {100 * c / total:5.1f}%  {name}" for name, c in incl.most_common(top)]
    if with_self:
        out += [f"  top {top} self:"]
        out += [f"    {100 * c / total:5.1f}%  {name}" for name, c in self_t.most_common(top)]
    return out


def summarise(stacks: list[tuple[str, list[str], int]], possible: float, top: int = 30) -> str:
    """Per thread group: busy share of wall time; the event loop thread in detail."""
    groups: dict[str, list[tuple[list[str], int]]] = {}
    for group, frames, c in stacks:
        groups.setdefault(group, []).append((frames, c))
    sizes = {g: sum(c for _, c in v) for g, v in groups.items()}
    out = ["busy samples per thread group (% of the run's wall time):"]
    out += [
        f"  {100 * n / possible:5.1f}%  {g}"
        for g, n in sorted(sizes.items(), key=lambda kv: -kv[1])
    ]
    for g in sorted(groups, key=lambda k: -sizes[k]):
        if sizes[g] < 0.02 * possible:
            continue
        out += ["", f"{g}: {sizes[g]} busy samples (% below are of this thread's busy time)"]
        out += _tops(groups[g], sizes[g], top if g == "MainThread" else 10, g == "MainThread")
    return "\n".join(out)


def _spawn_load(conn: LineConn, work: Path, n: int) -> int:
    _check_spawn(conn.request(spawn_line(work, f"prof {n}")))
    return 1


def _pipelined(line: bytes) -> Callable[[LineConn, Path, int], int]:
    def load(conn: LineConn, work: Path, n: int) -> int:
        conn.send(line * 100)
        conn.read_count(100)
        return 100

    return load


LOADS: dict[str, Callable[[LineConn, Path, int], int]] = {
    "spawn": _spawn_load,
    "health": _pipelined(request_line("HEALTH_CHECK")),
    "get_shared": _pipelined(request_line("GET_SHARED", {"key": "bench"})),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output prefix (default bench/results/profile-<load>)",
    )
    ap.add_argument(
        "--load",
        choices=sorted(LOADS),
        default="spawn",
        help="spawn: sync SPAWNs back to back (P1); health / get_shared: "
        "pipelined windows of 100 on one connection (P3)",
    )
    ap.add_argument(
        "--blocking",
        action="store_true",
        help="pause the daemon for each sample: exact stacks, but ~3x slower "
        "turns (default: --nonblocking, rare torn stacks)",
    )
    args = ap.parse_args()
    args.out = args.out or ROOT / "bench" / "results" / f"profile-{args.load}"
    py_spy = shutil.which("py-spy") or str(ROOT / ".venv" / "bin" / "py-spy")
    if not Path(py_spy).exists():
        print("py-spy is not installed: .venv/bin/pip install py-spy")
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="kb-prof-", dir="/tmp"))
    run = Run(smoke=False, workdir=workdir)
    try:
        d = fake_daemon(run)
        conn = LineConn(d.socket)
        conn.request(request_line("CONNECT"))
        for i in range(30):  # warm-up
            _check_spawn(conn.request(spawn_line(d.work, f"warm {i}")))
        raw = args.out.with_suffix(".raw.txt")
        spy = subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(d.pid),
                "--rate",
                str(args.rate),
                "--format",
                "raw",
                "--output",
                str(raw),
                *([] if args.blocking else ["--nonblocking"]),
                "--threads",
                "--duration",
                str(int(args.seconds)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(1.0)  # let py-spy attach
        n = 0
        t0 = time.perf_counter()
        while spy.poll() is None:
            n += LOADS[args.load](conn, d.work, n)
        elapsed = time.perf_counter() - t0
        err = spy.stderr.read().decode() if spy.stderr else ""
        if spy.returncode != 0 or not raw.exists():
            print(f"py-spy failed ({spy.returncode}): {err}")
            return 1
        conn.close()
        summary = (
            f"load {args.load}: {n} requests in {elapsed:.1f} s ({n / elapsed:.0f}/s, "
            f"{1e6 * elapsed / n:.1f} us each), py-spy {args.rate} Hz, daemon pid "
            f"{d.pid}\n\n" + summarise(parse_raw(raw.read_text()), args.rate * args.seconds)
        )
        args.out.with_suffix(".txt").write_text(summary + "\n")
        print(summary)
        print(f"\nwritten: {args.out.with_suffix('.txt')} and {raw}")
        return 0
    finally:
        run.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
