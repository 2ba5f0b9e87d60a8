"""One Claude CLI child process: its own process group, its pipes, and its end.

Cold turns (:func:`daemon.claude.runner.run_process`) and warm CLIs
(:class:`daemon.claude.warm_process.WarmProcess`) both start the CLI through
:class:`Child`, so these rules are written once:

* The child leads its own process group (``start_new_session=True``): one ``killpg``
  reaches the tool shells and MCP servers it started, unless they called setsid.
* The pipes are ours: made with ``os.pipe`` and attached with ``connect_read_pipe`` /
  ``connect_write_pipe`` rather than ``stdout=PIPE``. With ``PIPE``, ``Process.wait()``
  resolves only once every pipe is closed (a grandchild that inherited stdout delays it
  forever) and dropping pipes an orphan still holds needs the private
  ``Process._transport``. Here ``wait`` means the child itself exited, and closing the
  pipes is a public ``transport.close()``.
* stdout is split into lines as it arrives (:class:`~daemon.framing.LineSplitter`), so a
  multi-megabyte stream-json line meets no reader line limit; an unfinished line or a
  total past its cap kills the group instead of filling memory. stderr keeps a bounded
  tail for error messages.
* A line callback that raises does not reach the event loop: the error is kept, the group
  is killed and the caller re-raises it (:attr:`Child.error`).
* Ending is one escalation, :meth:`Child.terminate`: close stdin -> grace -> SIGTERM ->
  grace -> SIGKILL; :meth:`Child.aclose` then sweeps the group with SIGKILL, stops
  reading pipes that orphans hold, and reaps.
* Nothing here starts a child twice: a paid turn is never re-run by a supervisor (why
  simpervisor is not used: LITELLM_INTEGRATION.md, "Card libraries not used").
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
from collections.abc import Callable, Sequence

import structlog

from daemon.framing import LineSplitter

log = structlog.get_logger("ksi.claude.child")

DEFAULT_STDERR_TAIL = 64 * 1024
DEFAULT_MAX_STDOUT = 256 * 1024 * 1024
_REAP_TIMEOUT_S = 5.0


def killpg_quiet(pgid: int, sig: int) -> bool:
    """Signal a whole process group; False if nobody is left in it."""
    if pgid <= 0:  # 0 would be our own group: never signal before a start succeeded
        return False
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        # PermissionError: on some kernels an all-zombie group reports EPERM.
        return False
    return True


def _returning(reader: _PipeReader) -> Callable[[], _PipeReader]:
    return lambda: reader


class _PipeReader(asyncio.Protocol):
    """Hands each chunk of a read pipe to ``on_data``; ``closed`` resolves at EOF."""

    def __init__(self, on_data: Callable[[bytes], None]) -> None:
        self._on_data = on_data
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self._on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class _PipeWriter(asyncio.BaseProtocol):
    """Flow control for the stdin pipe: ``drain`` waits while the pipe buffer is full."""

    def __init__(self) -> None:
        self._resume: asyncio.Future[None] | None = None
        self.lost = False

    def pause_writing(self) -> None:
        self._resume = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)
        self._resume = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.resume_writing()

    async def drain(self) -> None:
        if self._resume is not None:
            await self._resume


class Child:
    """A started CLI process; create it with :meth:`start`, end it with :meth:`aclose`."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        *,
        on_line: Callable[[bytes], None] | None,
        on_eof: Callable[[], None] | None,
        collect_stdout: bool,
        max_stdout_bytes: int | None,
        max_line_bytes: int,
        stderr_tail_bytes: int,
    ) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.stdout = bytearray()  # only with collect_stdout
        self.stdout_bytes = 0
        self.stderr_total = 0
        self.killed = False  # we had to SIGKILL it while it ran
        self.overflowed = False  # output past its cap: the group was killed
        self.orphans_killed = False  # descendants held the pipes after the exit
        self.error: BaseException | None = None  # raised by on_line
        self._on_line = on_line
        self._on_eof = on_eof
        self._collect = collect_stdout
        self._max_stdout = max_stdout_bytes
        self._max_line = max_line_bytes
        self._lines = LineSplitter()
        self._stderr = bytearray()
        self._stderr_cap = stderr_tail_bytes
        self._exit: asyncio.Task[int] = asyncio.ensure_future(proc.wait())
        self._transports: list[asyncio.BaseTransport] = []
        self._readers: list[_PipeReader] = []
        self._stdin: asyncio.WriteTransport | None = None
        self._stdin_proto = _PipeWriter()
        self._closing: asyncio.Future[None] | None = None

    @classmethod
    async def start(
        cls,
        argv: Sequence[str],
        *,
        cwd: str | os.PathLike[str] | None,
        env: dict[str, str] | None,
        on_line: Callable[[bytes], None] | None = None,
        on_eof: Callable[[], None] | None = None,
        on_exit: Callable[[int], None] | None = None,
        collect_stdout: bool = False,
        max_stdout_bytes: int | None = DEFAULT_MAX_STDOUT,
        max_line_bytes: int = DEFAULT_MAX_STDOUT,
        stderr_tail_bytes: int = DEFAULT_STDERR_TAIL,
    ) -> Child:
        """Spawn ``argv``; raises ``OSError`` (e.g. FileNotFoundError) if it cannot run.

        ``max_stdout_bytes`` caps the whole stdout (None: no cap, for a CLI that lives
        for many turns), ``max_line_bytes`` a single unfinished line. ``on_exit`` gets the
        return code as soon as the child itself has exited.
        """
        loop = asyncio.get_running_loop()
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        ours = [in_w, out_r, err_r]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=in_r,
                stdout=out_w,
                stderr=err_w,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in (in_r, out_w, err_w):  # the child has its copies now
                os.close(fd)
        child = cls(
            proc,
            on_line=on_line,
            on_eof=on_eof,
            collect_stdout=collect_stdout,
            max_stdout_bytes=max_stdout_bytes,
            max_line_bytes=max_line_bytes,
            stderr_tail_bytes=stderr_tail_bytes,
        )
        if on_exit is not None:
            child._exit.add_done_callback(lambda task: task.cancelled() or on_exit(task.result()))
        try:
            stdin, _ = await loop.connect_write_pipe(
                lambda: child._stdin_proto, io.FileIO(in_w, "wb")
            )
            child._stdin = stdin
            child._transports.append(stdin)
            for fd, on_data in ((out_r, child._stdout_data), (err_r, child._stderr_data)):
                reader = _PipeReader(on_data)
                transport, _ = await loop.connect_read_pipe(_returning(reader), io.FileIO(fd, "rb"))
                child._transports.append(transport)
                child._readers.append(reader)
        except BaseException:
            # Not reached in practice (the pipes are fresh); never leave a child behind.
            child.signal(signal.SIGKILL)
            await child.aclose(orphan_grace_s=0)
            raise
        child._readers[0].closed.add_done_callback(lambda _: child._stdout_eof())
        return child

    # -- state -------------------------------------------------------------------------

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def stderr_tail(self) -> bytes:
        return bytes(self._stderr)

    # -- output ------------------------------------------------------------------------

    def _stdout_data(self, chunk: bytes) -> None:
        if self.overflowed or self.error is not None:
            return
        self.stdout_bytes += len(chunk)
        if self._max_stdout is not None and self.stdout_bytes > self._max_stdout:
            self._overflow(self.stdout_bytes)
            return
        if self._collect:
            self.stdout += chunk
        if self._on_line is None:
            return
        for line in self._lines.feed(chunk):
            self._emit(line)
        if self._lines.pending_bytes > self._max_line:
            self._overflow(self._lines.pending_bytes)

    def _stdout_eof(self) -> None:
        rest = self._lines.flush()
        if rest is not None and self._on_line is not None and not self.overflowed:
            self._emit(rest)
        if self._on_eof is not None:
            self._on_eof()

    def _emit(self, line: bytes) -> None:
        if self.error is not None or self._on_line is None:
            return
        try:
            self._on_line(line)
        except Exception as exc:  # the caller re-raises it once the group is dead
            self.error = exc
            self.kill()

    def _overflow(self, size: int) -> None:
        log.error("claude.child.output_limit", pid=self.pid, bytes=size)
        self.overflowed = True
        self.kill()

    def _stderr_data(self, chunk: bytes) -> None:
        self.stderr_total += len(chunk)
        self._stderr += chunk
        if len(self._stderr) > self._stderr_cap:
            del self._stderr[: len(self._stderr) - self._stderr_cap]

    # -- input -------------------------------------------------------------------------

    async def write(self, data: bytes) -> bool:
        """Write to stdin; False if it is closed or the child stopped reading (EPIPE)."""
        stdin = self._stdin
        if stdin is None or stdin.is_closing() or self._stdin_proto.lost:
            return False
        stdin.write(data)
        # A failed write (EPIPE) closes the transport at once; the loss arrives later.
        if stdin.is_closing():
            return False
        await self._stdin_proto.drain()
        return not self._stdin_proto.lost

    def close_stdin(self) -> None:
        """EOF on stdin: the CLI's own clean end (it exits 0 once its turn is done)."""
        if self._stdin is not None and not self._stdin.is_closing():
            self._stdin.close()

    # -- ending ------------------------------------------------------------------------

    def signal(self, sig: int) -> None:
        """Signal the whole group (also after the leader exited: it sweeps descendants)."""
        killpg_quiet(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL the group now (second cancel, output limit); :meth:`aclose` still reaps."""
        if self.returncode is None:
            self.killed = True
        self.signal(signal.SIGKILL)

    async def wait(self, timeout: float | None) -> bool:
        """Wait for the child itself to exit (not for its pipes); True if it has."""
        if not self._exit.done():
            await asyncio.wait({self._exit}, timeout=timeout)
        return self._exit.done()

    async def output_closed(self, timeout: float) -> bool:
        """Wait for EOF on stdout and stderr; False while someone still holds them."""
        pending = [r.closed for r in self._readers if not r.closed.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        return all(r.closed.done() for r in self._readers)

    async def terminate(self, *, close_grace_s: float | None, term_grace_s: float) -> None:
        """Close stdin and wait ``close_grace_s`` (None: skip), SIGTERM and wait, SIGKILL."""
        if close_grace_s is not None:
            self.close_stdin()
            if await self.wait(close_grace_s):
                return
        if self.returncode is None:
            self.signal(signal.SIGTERM)
            if not await self.wait(term_grace_s):
                self.kill()
                await self.wait(_REAP_TIMEOUT_S)

    async def aclose(self, *, orphan_grace_s: float) -> None:
        """After the exit: give the pipes ``orphan_grace_s`` to reach EOF (SIGKILL the group
        if descendants hold them, then give up on them), sweep the group, close the pipes
        and reap. Idempotent; safe to call concurrently."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._aclose(orphan_grace_s))
        await asyncio.shield(self._closing)

    async def _aclose(self, orphan_grace_s: float) -> None:
        if self.returncode is None:
            self.kill()
        await self.wait(_REAP_TIMEOUT_S)
        if not await self.output_closed(orphan_grace_s):
            self.orphans_killed = True
            self.signal(signal.SIGKILL)
            # Anything that escaped the group with setsid still holds the pipe; stop
            # reading it rather than hang.
            await self.output_closed(orphan_grace_s)
        self.signal(signal.SIGKILL)
        for transport in self._transports:
            transport.close()
        if not self._exit.done():  # a child stuck in the kernel: do not wait for ever
            self._exit.cancel()
        await asyncio.gather(self._exit, return_exceptions=True)
