"""CLI processes left behind by an earlier run of this daemon: found and ended at start-up.

A daemon killed with SIGKILL (or by the OOM killer, or a power cut of its cgroup) cannot
end its children: every running CLI is re-parented to init and goes on with its turn. A
restarted daemon that then resumes one of those sessions would run two turns of it at
once, which forks the session's history. So before any new turn runs, start-up ends every
CLI process group of an earlier run. Adopting them instead is not possible: their stdin
and stdout pipes died with the old daemon, so nothing could be read from or sent to them.

Two sources find them, because either alone misses cases:

* **Process records.** Each turn's record carries its CLI's pid, process group and the
  kernel start time of that pid (``/proc/<pid>/stat`` field 22) as soon as the CLI starts.
  The start time tells a live orphan from an unrelated process that reuses the pid.
* **An environment mark.** Every CLI the daemon starts (cold, warm and pre-warmed pool
  processes alike) gets ``KSI_DAEMON_OWNER`` (which state directory it belongs to) and
  ``KSI_DAEMON_RUN`` (the daemon's pid and start time). Tool subprocesses inherit them,
  including those that left the process group with ``setsid``. A process marked with our
  owner whose run is no longer alive is an orphan. A run that *is* alive belongs to
  another daemon sharing the state directory and is left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("ksi.orphans")

ENV_OWNER = "KSI_DAEMON_OWNER"
ENV_RUN = "KSI_DAEMON_RUN"
_PROC = Path("/proc")
_POLL_S = 0.02


def start_ticks(pid: int) -> int | None:
    """The kernel's start time of ``pid`` in clock ticks since boot, or None if it is gone."""
    try:
        stat = (_PROC / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself contain ") ".
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 overall; fields[0] is field 3 (state)
    except (IndexError, ValueError):
        return None


def _is_zombie(pid: int) -> bool:
    try:
        stat = (_PROC / str(pid) / "stat").read_bytes()
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] == b"Z"


def owner_token(state_path: Path) -> str:
    """Names the state directory a CLI belongs to (a daemon is its state)."""
    return hashlib.sha256(str(state_path.resolve()).encode()).hexdigest()[:16]


def run_token(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{start_ticks(pid)}"


def run_alive(token: str) -> bool:
    pid_s, _, ticks_s = token.partition(":")
    try:
        pid = int(pid_s)
    except ValueError:
        return False
    return ticks_s != "None" and str(start_ticks(pid)) == ticks_s


def child_env(state_path: Path) -> dict[str, str]:
    """The marks every CLI of this daemon run carries in its environment."""
    return {ENV_OWNER: owner_token(state_path), ENV_RUN: run_token()}


@dataclass(frozen=True, slots=True)
class Recorded:
    """What a process record says of its CLI."""

    pid: int
    pgid: int
    ticks: int


def find_orphans(owner: str, recorded: Iterable[Recorded]) -> dict[int, int]:
    """Orphaned CLI processes: ``{pid: process group}``."""
    me, run = os.getpid(), run_token()
    found: dict[int, int] = {}
    for rec in recorded:
        if rec.pid != me and start_ticks(rec.pid) == rec.ticks:
            found[rec.pid] = rec.pgid
    owner_mark = f"{ENV_OWNER}={owner}".encode()
    run_prefix = f"{ENV_RUN}=".encode()
    try:
        entries = os.listdir(_PROC)
    except OSError:
        return found
    for name in entries:
        if not name.isdigit() or int(name) == me:
            continue
        try:
            environ = (_PROC / name / "environ").read_bytes()
        except OSError:  # gone, or another user's process
            continue
        if owner_mark not in environ:
            continue
        marks = environ.split(b"\0")
        if owner_mark not in marks:
            continue
        their_run = next(
            (
                m[len(run_prefix) :].decode(errors="replace")
                for m in marks
                if m.startswith(run_prefix)
            ),
            "",
        )
        if their_run == run or run_alive(their_run):
            continue  # ours, or a live daemon sharing this state directory
        pid = int(name)
        with contextlib.suppress(OSError):
            found[pid] = os.getpgid(pid)
    return found


async def end_orphans(orphans: dict[int, int], grace_s: float) -> int:
    """SIGTERM every orphan's group (and the orphan), SIGKILL what is left after
    ``grace_s``. Returns how many processes were found alive."""
    if not orphans:
        return 0
    # Never our own group: a daemon started from a turn of the dead one (its Bash tool)
    # would be in that turn's group and carry its marks.
    groups = {pgid for pgid in orphans.values() if pgid > 1 and pgid != os.getpgrp()}
    _signal(groups, orphans, signal.SIGTERM)
    # Polled: they are not our children, so there is no exit to wait for (pidfds would do,
    # but a process can exit between the scan and pidfd_open; polling /proc is simpler).
    for _ in range(max(1, round(grace_s / _POLL_S))):
        if all(_is_zombie(p) for p in orphans):
            break
        await asyncio.sleep(_POLL_S)
    _signal(groups, orphans, signal.SIGKILL)
    log.warning("daemon.orphans_ended", pids=sorted(orphans), groups=sorted(groups))
    return len(orphans)


def _signal(groups: Iterable[int], pids: Iterable[int], sig: int) -> None:
    for pgid in groups:
        with contextlib.suppress(OSError):
            os.killpg(pgid, sig)
    for pid in pids:  # also those that left their group with setsid
        with contextlib.suppress(OSError):
            os.kill(pid, sig)
