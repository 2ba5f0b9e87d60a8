"""Run one child process to completion, safely, on plain asyncio.

Why not simpervisor (measured, see the LiteLLM/simpervisor reference §5):

* its restart loop re-runs any child that exits non-zero, which for the
  Claude CLI means repeating a paid, non-idempotent turn (a one-shot child
  exiting 3 ran 120 times in a second);
* its first ``start()`` takes over SIGINT/SIGTERM process-wide and calls
  ``sys.exit`` inside the handler, bypassing the daemon's own shutdown;
* it knows nothing about process groups, so tool subprocesses and MCP servers
  (grandchildren) survive, and their inherited pipes make waiting hang;
* ``terminate()`` has no timeout and cannot escalate to SIGKILL afterwards.

What this runner guarantees instead:

* the child leads its own process group (``start_new_session=True``), so one
  ``killpg`` reaches every descendant that did not call setsid itself;
* stdin is written by a task and then closed (the CLI otherwise waits 3 s for
  input); stdout and stderr are drained concurrently in 64 KiB chunks and
  lines are split here, so multi-megabyte lines and full pipes both ways
  cannot deadlock or hit ``StreamReader``'s line limit;
* exit is detected from the return code, not from ``Process.wait()``, which on
  3.11 resolves only once every pipe is closed (a grandchild holding stdout
  would block it); pipes still open ``orphan_grace_s`` after the exit mean
  orphans, and the group gets SIGKILL;
* timeout and cancellation both escalate SIGTERM -> ``term_grace_s`` -> SIGKILL,
  and every run ends with a SIGKILL sweep of the group;
* a run is never repeated.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from daemon.framing import LineSplitter

CHUNK_BYTES = 64 * 1024
DEFAULT_STDERR_TAIL = 64 * 1024
DEFAULT_MAX_STDOUT = 256 * 1024 * 1024
_POLL_S = 0.05
_REAP_TIMEOUT_S = 5.0


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


def killpg_quiet(pgid: int, sig: int) -> bool:
    """Signal a whole process group; False if nobody is left in it."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        # PermissionError: on some kernels an all-zombie group reports EPERM.
        return False
    return True


class _Run:
    """State of one run shared by its helper tasks."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        *,
        collect_stdout: bool,
        on_stdout_line: Callable[[bytes], None] | None,
        stderr_tail_bytes: int,
        max_stdout_bytes: int,
    ) -> None:
        self.proc = proc
        self.pgid = proc.pid
        self.collect_stdout = collect_stdout
        self.on_stdout_line = on_stdout_line
        self.stderr_cap = stderr_tail_bytes
        self.max_stdout = max_stdout_bytes
        self.stdout = bytearray()
        self.stdout_bytes = 0
        self.stderr = bytearray()
        self.overflow = False
        self.killed = False
        self.callback_error: BaseException | None = None

    def kill_group(self) -> None:
        self.killed = True
        killpg_quiet(self.pgid, signal.SIGKILL)

    async def feed_stdin(self, data: bytes) -> None:
        stdin = self.proc.stdin
        if stdin is None:
            return
        # A child that exits without reading its input is not our failure.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            if data:
                stdin.write(data)
                await stdin.drain()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            stdin.close()
            await stdin.wait_closed()

    async def drain_stdout(self) -> None:
        reader = self.proc.stdout
        assert reader is not None
        lines = LineSplitter()
        while chunk := await reader.read(CHUNK_BYTES):
            self.stdout_bytes += len(chunk)
            if self.stdout_bytes > self.max_stdout:
                self.overflow = True
                self.kill_group()
                return
            if self.collect_stdout:
                self.stdout += chunk
            if self.on_stdout_line is None or self.callback_error is not None:
                continue
            for line in lines.feed(chunk):
                self._emit(line)
        rest = lines.flush()
        if rest is not None and self.on_stdout_line is not None:
            self._emit(rest)

    def _emit(self, line: bytes) -> None:
        if self.callback_error is not None or self.on_stdout_line is None:
            return
        try:
            self.on_stdout_line(line)
        except Exception as exc:  # re-raised by run_process after the group is dead
            self.callback_error = exc
            self.kill_group()

    async def drain_stderr(self) -> None:
        reader = self.proc.stderr
        assert reader is not None
        while chunk := await reader.read(CHUNK_BYTES):
            self.stderr += chunk
            if len(self.stderr) > self.stderr_cap:
                del self.stderr[: len(self.stderr) - self.stderr_cap]

    async def wait_exit(self) -> None:
        await wait_exit(self.proc)

    async def escalate(self, term_grace_s: float) -> None:
        """SIGTERM the group, give it ``term_grace_s``, then SIGKILL."""
        if self.proc.returncode is None:
            killpg_quiet(self.pgid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.wait_exit(), term_grace_s)
            except TimeoutError:
                self.kill_group()
        killpg_quiet(self.pgid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wait_exit(), _REAP_TIMEOUT_S)

    def hard_kill(self) -> None:
        if self.proc.returncode is None:
            self.killed = True
        killpg_quiet(self.pgid, signal.SIGKILL)


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
    through ``on_stdout_line``.
    """
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
        env=env,
        start_new_session=True,
    )
    run = _Run(
        proc,
        collect_stdout=collect_stdout,
        on_stdout_line=on_stdout_line,
        stderr_tail_bytes=stderr_tail_bytes,
        max_stdout_bytes=max_stdout_bytes,
    )
    helpers: list[asyncio.Task[None]] = []
    timed_out = orphans = False
    try:
        if on_start is not None:
            on_start(proc.pid)
        helpers = [
            asyncio.create_task(run.feed_stdin(stdin_data)),
            asyncio.create_task(run.drain_stdout()),
            asyncio.create_task(run.drain_stderr()),
        ]
        try:
            async with asyncio.timeout(timeout_s):
                await run.wait_exit()
        except TimeoutError:
            timed_out = True
            await run.escalate(term_grace_s)
        readers = set(helpers[1:])
        _, pending = await asyncio.wait(readers, timeout=orphan_grace_s)
        if pending:
            orphans = True
            killpg_quiet(run.pgid, signal.SIGKILL)
            # Anything that escaped the group with setsid still holds the pipe;
            # give up on it rather than hang (the finally cancels the readers).
            await asyncio.wait(pending, timeout=orphan_grace_s)
    except asyncio.CancelledError:
        cleanup = asyncio.ensure_future(run.escalate(term_grace_s))
        try:
            await asyncio.shield(cleanup)
        except asyncio.CancelledError:
            run.hard_kill()
        raise
    except BaseException:
        run.hard_kill()
        raise
    finally:
        killpg_quiet(run.pgid, signal.SIGKILL)
        await _finish(proc, helpers)

    if run.callback_error is not None:
        raise run.callback_error
    result = RunResult(
        returncode=proc.returncode,
        stdout=bytes(run.stdout),
        stderr_tail=bytes(run.stderr),
        timed_out=timed_out,
        killed=run.killed,
        pid=proc.pid,
        duration_s=time.monotonic() - started,
        orphans_killed=orphans,
        stdout_bytes=run.stdout_bytes,
    )
    if run.overflow:
        raise OutputLimitError(result, max_stdout_bytes)
    return result


async def _finish(proc: asyncio.subprocess.Process, helpers: list[asyncio.Task[None]]) -> None:
    """Reap the child, stop helper tasks and release the pipes."""
    for task in helpers:
        if not task.done():
            task.cancel()
    if helpers:
        await asyncio.gather(*helpers, return_exceptions=True)
    if proc.returncode is None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wait_exit(proc), _REAP_TIMEOUT_S)
    transport: Any = getattr(proc, "_transport", None)
    if transport is not None:
        # Private, but the only way to drop pipes an escaped orphan still holds;
        # asyncio would otherwise close them from __del__ with a ResourceWarning.
        transport.close()


async def wait_exit(proc: asyncio.subprocess.Process, poll_s: float = _POLL_S) -> None:
    """Wait for the child itself, not for its pipes (see module docstring).

    ``proc.wait()`` wakes us at once in the common case; ``poll_s`` bounds how late an
    exit is noticed while a grandchild still holds the pipes.
    """
    waiter = asyncio.ensure_future(proc.wait())
    try:
        while proc.returncode is None and not waiter.done():
            await asyncio.wait({waiter}, timeout=poll_s)
    finally:
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
