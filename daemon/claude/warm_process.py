"""One long-lived Claude CLI in warm mode (stream-json in and out), supervised by simpervisor.

``claude -p --input-format stream-json --output-format stream-json --verbose`` reads one
JSON user message per stdin line and answers each with a ``system/init`` line, the
assistant lines and a ``result`` line; it prints nothing before the first message and
exits 0 when stdin closes (claude-cli.md §12, re-measured with 2.1.197).

How simpervisor 1.0 is used, and what had to be switched off (litellm-and-simpervisor.md §5):

* ``SupervisedProcess`` starts the child (its start lock, ``running`` flag and "a killed
  process is never started again" rule fit a long-lived process that belongs to one session).
* Its restart loop is replaced (:meth:`_Supervised._restart_process_if_needed`): it re-runs
  the same argv after any non-zero exit, but our argv carries ``--session-id``, whose reuse
  fails once the session exists, and a restart could re-send a paid turn. A warm process
  that dies is replaced by :class:`~daemon.claude.warm.WarmBackend` with ``--resume`` at
  the next turn instead, where the turn is known not to have been sent yet.
* Its signal takeover (process-wide SIGINT/SIGTERM handlers that call ``sys.exit``) is
  disabled through the module flag ``simpervisor.atexitasync.signal_handler_set`` before
  every start; the daemon owns its signals and ends warm processes itself at shutdown.
* ``terminate()``/``kill()`` are not used: they signal only the leader (tool shells and
  MCP servers would survive), wait without a timeout and cannot escalate. Every signal here
  goes to the process group (``start_new_session=True``), escalating stdin close -> SIGTERM
  -> SIGKILL.
* Exit is detected by polling ``returncode`` (``runner.wait_exit``), never by
  ``Process.wait()`` alone: on Python 3.11 it waits for every pipe to close, which a
  grandchild holding stdout delays indefinitely.

simpervisor has no I/O API, so the pipes are read here, in 64 KiB chunks split by
:class:`~daemon.framing.LineSplitter` (a stream-json line can be megabytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from simpervisor import SupervisedProcess, atexitasync

from daemon.claude.argv import build_argv
from daemon.claude.options import ClaudeOptions
from daemon.claude.runner import (
    CHUNK_BYTES,
    DEFAULT_MAX_STDOUT,
    DEFAULT_STDERR_TAIL,
    killpg_quiet,
    wait_exit,
)
from daemon.framing import LineSplitter

log = structlog.get_logger("ksi.claude.warm")

_READER_GRACE_S = 0.5  # pipes still open this long after the exit mean orphans: stop reading
_WATCH_POLL_S = 1.0
# simpervisor's debug records put the child's whole environment (API keys included) into
# `extra`: keep them out of every handler whatever the daemon's log level.
_SIMPERVISOR_LOG = logging.getLogger("ksi.claude.simpervisor")
_SIMPERVISOR_LOG.setLevel(logging.WARNING)


@dataclass(frozen=True, slots=True, eq=False)
class ProcSpec:
    """How a warm CLI is started; everything except the session id is fixed for its life."""

    claude_bin: str
    model: str | None
    opts: ClaudeOptions
    cwd: str
    env: dict[str, str]

    def argv(self, session_id: str, resume: bool) -> list[str]:
        return build_argv(
            self.claude_bin,
            model=self.model,
            opts=self.opts,
            session_id=session_id,
            resume=resume,
            output_format="stream-json",
            stream_input=True,
        )

    @property
    def signature(self) -> tuple[str, ...]:
        """cwd plus argv without the session flag: a turn may reuse a process iff equal."""
        argv = self.argv("", resume=False)
        i = argv.index("--session-id")
        return (self.cwd, *argv[:i], *argv[i + 2 :])


def user_message(prompt: str) -> dict[str, Any]:
    content = [{"type": "text", "text": prompt}]
    return {"type": "user", "message": {"role": "user", "content": content}}


class _Supervised(SupervisedProcess):  # type: ignore[misc]  # simpervisor is untyped
    """SupervisedProcess without its restart loop and without its signal takeover."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        cwd: str,
        env: dict[str, str],
        on_exit: Callable[[], None],
    ) -> None:
        super().__init__(
            name,
            *argv,
            cwd=cwd,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # own process group: one killpg reaches tool children
            log=_SIMPERVISOR_LOG,
        )
        self._on_exit = on_exit

    async def start(self) -> None:
        # add_handler() installs SIGINT/SIGTERM handlers only while this flag is False.
        atexitasync.signal_handler_set = True
        await super().start()

    async def _restart_process_if_needed(self) -> None:
        """Replaces simpervisor's watcher: record the exit, never restart (module docstring)."""
        try:
            # Slow poll: this watcher lives as long as the process; returncode itself is
            # set promptly by asyncio's child watcher, and `alive` reads it directly.
            await wait_exit(self.aproc, poll_s=_WATCH_POLL_S)
        finally:
            with contextlib.suppress(ValueError):
                atexitasync.remove_handler(self._handle_signal)
            self.running = False
            self._killed = True  # start() now raises KilledProcessError: argv is single-use
        self._on_exit()

    @property
    def aproc(self) -> asyncio.subprocess.Process:
        proc: asyncio.subprocess.Process = self.proc._proc  # POSIXProcess wraps it
        return proc


class WarmProcess:
    """A warm CLI serving one session (or waiting in the pool for one)."""

    def __init__(self, spec: ProcSpec, session_id: str, *, resume: bool, pooled: bool = False):
        self.spec = spec
        self.session_id = session_id
        self.resume = resume
        self.argv = spec.argv(session_id, resume)
        self.signature = spec.signature
        self.pooled = pooled
        self.busy = False
        self.turns = 0
        self.cost_base = 0.0  # total_cost_usd of the previous result: it accumulates per process
        self.started_at = time.time()
        self.started_mono = time.monotonic()
        self.last_used = self.started_mono
        self.pid = 0
        self.on_exit: Callable[[WarmProcess], None] | None = None
        self._sup: _Supervised | None = None
        self._sink: asyncio.Queue[bytes | None] | None = None
        self._eof = False
        self._stderr = bytearray()
        self._stderr_total = 0
        self._stderr_mark = 0
        self._readers: list[asyncio.Task[None]] = []
        self._stop_task: asyncio.Future[None] | None = None
        self._ids = itertools.count(1)

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn the CLI; raises OSError when it cannot be executed."""
        sup = _Supervised(
            f"claude-warm-{self.session_id[:8]}",
            self.argv,
            cwd=self.spec.cwd,
            env=self.spec.env,
            on_exit=self._exited,
        )
        await sup.start()
        self._sup = sup
        self.pid = sup.pid
        self._readers = [
            asyncio.create_task(self._drain_stdout(), name=f"warm-out-{self.pid}"),
            asyncio.create_task(self._drain_stderr(), name=f"warm-err-{self.pid}"),
        ]
        log.info(
            "claude.warm.started",
            pid=self.pid,
            session_id=self.session_id,
            resume=self.resume,
            pooled=self.pooled,
        )

    @property
    def aproc(self) -> asyncio.subprocess.Process:
        assert self._sup is not None
        return self._sup.aproc

    @property
    def returncode(self) -> int | None:
        return None if self._sup is None else self.aproc.returncode

    @property
    def alive(self) -> bool:
        """Running, stdout open and not being stopped: able to take a turn."""
        return (
            self._sup is not None
            and self.aproc.returncode is None
            and not self._eof
            and self._stop_task is None
        )

    def _signal_group(self, sig: int) -> None:
        # pid 0 would mean "our own process group": never signal before the start succeeded.
        if self._sup is not None and self.pid > 0:
            killpg_quiet(self.pid, sig)

    def _exited(self) -> None:
        # Tool shells or MCP servers of a crashed CLI must not outlive it.
        self._signal_group(signal.SIGKILL)
        if self.on_exit is not None:
            self.on_exit(self)

    async def wait_exited(self, timeout: float) -> bool:
        if self._sup is None:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wait_exit(self.aproc), timeout)
        return self.aproc.returncode is not None

    async def stop(self, close_grace_s: float = 2.0, term_grace_s: float = 3.0) -> None:
        """End the CLI and its group: close stdin -> wait -> SIGTERM -> wait -> SIGKILL."""
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._stop(close_grace_s, term_grace_s))
        await asyncio.shield(self._stop_task)

    async def _stop(self, close_grace_s: float, term_grace_s: float) -> None:
        if self._sup is None:
            return
        self._sup._killed = True  # simpervisor's own rule: an ended process never restarts
        proc = self.aproc
        if proc.returncode is None:
            # Closing stdin is the CLI's clean exit (exit 0 within ~30 ms when idle).
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            if not await self.wait_exited(close_grace_s):
                self._signal_group(signal.SIGTERM)
                if not await self.wait_exited(term_grace_s):
                    self._signal_group(signal.SIGKILL)
                    await self.wait_exited(5.0)
        self._signal_group(signal.SIGKILL)  # sweep what is left of the group
        await self._close_io()
        log.info(
            "claude.warm.stopped",
            pid=self.pid,
            session_id=self.session_id,
            returncode=proc.returncode,
        )

    def kill_now(self) -> None:
        """Synchronous SIGKILL of the group (second cancel, emergencies); stop() still reaps."""
        self._signal_group(signal.SIGKILL)

    async def _close_io(self) -> None:
        if self._readers:
            _, pending = await asyncio.wait(self._readers, timeout=_READER_GRACE_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._readers, return_exceptions=True)
        transport: Any = getattr(self.aproc, "_transport", None)
        if transport is not None:
            # Drops pipes an escaped orphan may still hold (see runner._finish).
            transport.close()

    # -- I/O -------------------------------------------------------------------------

    async def _drain_stdout(self) -> None:
        reader = self.aproc.stdout
        assert reader is not None
        lines = LineSplitter()
        try:
            while chunk := await reader.read(CHUNK_BYTES):
                for line in lines.feed(chunk):
                    self._deliver(line)
                if lines.pending_bytes > DEFAULT_MAX_STDOUT:
                    log.error("claude.warm.line_too_long", pid=self.pid, bytes=lines.pending_bytes)
                    self.kill_now()
                    return
            rest = lines.flush()
            if rest is not None:
                self._deliver(rest)
        finally:
            self._eof = True
            if self._sink is not None:
                self._sink.put_nowait(None)

    def _deliver(self, line: bytes) -> None:
        if self._sink is not None:
            self._sink.put_nowait(line)
        elif line.strip():
            # Between turns the CLI has nothing to say; a late control_response lands here.
            text = line[:200].decode("utf-8", "replace")
            log.debug("claude.warm.idle_output", pid=self.pid, line=text)

    async def _drain_stderr(self) -> None:
        reader = self.aproc.stderr
        assert reader is not None
        while chunk := await reader.read(CHUNK_BYTES):
            self._stderr_total += len(chunk)
            self._stderr += chunk
            if len(self._stderr) > DEFAULT_STDERR_TAIL:
                del self._stderr[: len(self._stderr) - DEFAULT_STDERR_TAIL]

    async def stderr_settled(self) -> None:
        """Give the stderr reader a moment to catch up after the process died."""
        if len(self._readers) > 1:
            await asyncio.wait([self._readers[1]], timeout=_READER_GRACE_S)

    def stderr_since_turn(self) -> str:
        """stderr written since the current turn began (bounded by the tail size)."""
        new = min(self._stderr_total - self._stderr_mark, len(self._stderr))
        return bytes(self._stderr[len(self._stderr) - new :]).decode("utf-8", "replace")

    def begin_turn(self) -> None:
        self.busy = True
        self._sink = asyncio.Queue()
        if self._eof:
            self._sink.put_nowait(None)
        self._stderr_mark = self._stderr_total

    def end_turn(self) -> None:
        self._sink = None
        self.busy = False
        self.last_used = time.monotonic()

    async def next_line(self) -> bytes | None:
        """The next stdout line of the current turn; None once stdout is closed."""
        assert self._sink is not None, "no turn in progress"
        return await self._sink.get()

    async def write(self, obj: dict[str, Any]) -> bool:
        """Send one JSON line; False if the CLI's stdin is gone (it died)."""
        stdin = self.aproc.stdin if self._sup is not None else None
        if stdin is None or stdin.is_closing():
            return False
        try:
            stdin.write(orjson.dumps(obj) + b"\n")
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    async def send_interrupt(self) -> bool:
        """The CLI's interrupt: the running turn ends with an error result; the CLI lives on."""
        request_id = f"ksi-interrupt-{next(self._ids)}"
        request = {
            "type": "control_request",
            "request_id": request_id,
            "request": {"subtype": "interrupt"},
        }
        return await self.write(request)

    # -- introspection ---------------------------------------------------------------

    def rss_mb(self) -> float | None:
        """Resident memory from /proc/<pid>/status (VmRSS), in MiB."""
        try:
            with open(f"/proc/{self.pid}/status", encoding="ascii", errors="replace") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return round(int(line.split()[1]) / 1024, 1)
        except (OSError, ValueError, IndexError):
            pass
        return None

    def describe(self) -> dict[str, Any]:
        started = datetime.fromtimestamp(self.started_at, UTC)
        return {
            "session_id": self.session_id,
            "pid": self.pid,
            "rss_mb": self.rss_mb(),
            "idle_s": 0.0 if self.busy else round(time.monotonic() - self.last_used, 3),
            "turns": self.turns,
            "started_at": started.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
            "busy": self.busy,
            "pooled": self.pooled,
        }
