"""Run one child process to completion, once: a cold ``claude -p`` turn or ``--version``.

The process rules (own process group, our own pipes, line framing, TERM -> grace -> KILL,
the group sweep and the reaping) are :class:`~daemon.claude.child.Child`'s; this module
adds what a one-shot run needs on top:

* stdin is written by a task while stdout and stderr are read, so full pipes both ways
  cannot deadlock; it is closed once written, or (a stream-json turn, which must be able to
  answer the CLI's control requests) when the caller says so;
* a timeout or a cancellation escalates SIGTERM -> ``term_grace_s`` -> SIGKILL, and a
  second cancellation during that grace SIGKILLs at once;
* pipes still open ``orphan_grace_s`` after the exit mean orphans, and the group gets
  SIGKILL;
* a run is never repeated: the caller gets a :class:`RunResult` (or the error) and
  decides.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from daemon.claude.child import DEFAULT_MAX_STDOUT, DEFAULT_STDERR_TAIL, Child


@dataclass(frozen=True, slots=True)
class RunResult:
    """Outcome of one process run.

    ``returncode`` is negative when a signal ended the child. ``killed`` means
    we had to SIGKILL it (escalation after SIGTERM, or the output limit);
    ``orphans_killed`` means descendants kept the pipes open after it exited.
    """

    returncode: int | None
    stdout: bytes
    stderr_tail: bytes
    timed_out: bool
    killed: bool
    pid: int
    duration_s: float
    orphans_killed: bool = False
    stdout_bytes: int = 0


class OutputLimitError(Exception):
    """stdout grew past ``max_stdout_bytes``; the group was killed."""

    def __init__(self, result: RunResult, limit: int) -> None:
        super().__init__(f"child wrote more than {limit} bytes to stdout")
        self.result = result
        self.limit = limit


async def _feed(child: Child, data: bytes, more: asyncio.Queue[bytes | None] | None) -> None:
    # A child that exits without reading its input is not our failure: write() says False.
    if data:
        await child.write(data)
    while more is not None and (chunk := await more.get()) is not None:
        await child.write(chunk)
    child.close_stdin()


async def run_process(
    argv: Sequence[str],
    *,
    stdin_data: bytes,
    cwd: str | os.PathLike[str] | None,
    env: dict[str, str] | None,
    timeout_s: float | None,
    term_grace_s: float = 3.0,
    orphan_grace_s: float = 1.0,
    on_start: Callable[[int], None] | None = None,
    stdin_more: asyncio.Queue[bytes | None] | None = None,
    on_stdout_line: Callable[[bytes], None] | None = None,
    stderr_tail_bytes: int = DEFAULT_STDERR_TAIL,
    max_stdout_bytes: int = DEFAULT_MAX_STDOUT,
    collect_stdout: bool = True,
) -> RunResult:
    """Run ``argv`` once and return its outcome; see the module docstring.

    Raises ``FileNotFoundError``/``PermissionError`` if argv[0] cannot be
    executed, :class:`OutputLimitError` past ``max_stdout_bytes``, whatever
    ``on_start``/``on_stdout_line`` raised, and ``CancelledError`` when
    cancelled. In every case the process group is dead before it returns.
    ``collect_stdout=False`` keeps stdout out of memory when lines are consumed
    through ``on_stdout_line``. ``stdin_more``: after ``stdin_data``, stdin stays open
    and gets each chunk put on this queue until a None (else it is closed at once).
    """
    started = time.monotonic()
    child = await Child.start(
        argv,
        cwd=cwd,
        env=env,
        on_line=on_stdout_line,
        collect_stdout=collect_stdout,
        max_stdout_bytes=max_stdout_bytes,
        stderr_tail_bytes=stderr_tail_bytes,
    )
    timed_out = False
    feeder: asyncio.Task[None] | None = None
    try:
        if on_start is not None:
            on_start(child.pid)
        feeder = asyncio.create_task(_feed(child, stdin_data, stdin_more))
        if not await child.wait(timeout_s):
            timed_out = True
            await child.terminate(close_grace_s=None, term_grace_s=term_grace_s)
    except asyncio.CancelledError:
        cleanup = asyncio.ensure_future(
            child.terminate(close_grace_s=None, term_grace_s=term_grace_s)
        )
        try:
            await asyncio.shield(cleanup)
        except asyncio.CancelledError:
            child.kill()
            await asyncio.shield(cleanup)
        raise
    except BaseException:
        child.kill()
        raise
    finally:
        if feeder is not None:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
        await child.aclose(orphan_grace_s=orphan_grace_s)

    if child.error is not None:
        raise child.error
    result = RunResult(
        returncode=child.returncode,
        stdout=bytes(child.stdout),
        stderr_tail=child.stderr_tail(),
        timed_out=timed_out,
        killed=child.killed,
        pid=child.pid,
        duration_s=time.monotonic() - started,
        orphans_killed=child.orphans_killed,
        stdout_bytes=child.stdout_bytes,
    )
    if child.overflowed:
        raise OutputLimitError(result, max_stdout_bytes)
    return result
