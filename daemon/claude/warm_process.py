"""One long-lived Claude CLI in warm mode (stream-json in and out).

``claude -p --input-format stream-json --output-format stream-json --verbose`` reads one
JSON user message per stdin line and answers each with a ``system/init`` line, the
assistant lines and a ``result`` line; it prints nothing before the first message and
exits 0 when stdin closes (measured with CLI 2.1.197; LITELLM_INTEGRATION.md, "Warm sessions").

The process itself is a :class:`~daemon.claude.child.Child` (own process group, our own
pipes, line framing, TERM -> grace -> KILL), as a cold turn's is. What is warm-specific
lives here:

* a process is never restarted: its argv carries ``--session-id``, whose reuse fails once
  the session exists, and a restart mid-turn could re-send a paid turn. A warm process that
  dies is replaced by :class:`~daemon.claude.warm.WarmBackend` with ``--resume`` at the
  next turn instead, where the turn is known not to have been sent yet;
* when the CLI exits on its own, what is left of its group (tool shells, MCP servers) is
  killed at once and the backend is told (``on_exit``);
* stdout lines go to the current turn's queue (:meth:`begin_turn` .. :meth:`end_turn`);
  between turns the CLI has nothing to say, so stray lines are only logged;
* ending is close stdin (the CLI's clean exit, ~30 ms when idle) -> SIGTERM -> SIGKILL.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog

from daemon.claude.argv import build_argv
from daemon.claude.child import Child
from daemon.claude.options import ClaudeOptions

log = structlog.get_logger("ksi.claude.warm")

_READER_GRACE_S = 0.5  # pipes still open this long after the exit mean orphans: stop reading


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
        self._child: Child | None = None
        self._sink: asyncio.Queue[bytes | None] | None = None
        self._eof = False
        self._stderr_mark = 0
        self._stop_task: asyncio.Future[None] | None = None
        self._ids = itertools.count(1)

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn the CLI; raises OSError when it cannot be executed."""
        self._child = await Child.start(
            self.argv,
            cwd=self.spec.cwd,
            env=self.spec.env,
            on_line=self._deliver,
            on_eof=self._stdout_closed,
            on_exit=self._exited,
            max_stdout_bytes=None,  # it lives for many turns; one line is still capped
        )
        self.pid = self._child.pid
        log.info(
            "claude.warm.started",
            pid=self.pid,
            session_id=self.session_id,
            resume=self.resume,
            pooled=self.pooled,
        )

    @property
    def returncode(self) -> int | None:
        return None if self._child is None else self._child.returncode

    @property
    def alive(self) -> bool:
        """Running, stdout open and not being stopped: able to take a turn."""
        return (
            self._child is not None
            and self._child.returncode is None
            and not self._eof
            and self._stop_task is None
        )

    def _exited(self, returncode: int) -> None:
        # Tool shells or MCP servers of a crashed CLI must not outlive it.
        self.kill_now()
        if self.on_exit is not None:
            self.on_exit(self)

    async def wait_exited(self, timeout: float) -> bool:
        return self._child is None or await self._child.wait(timeout)

    async def stop(self, close_grace_s: float = 2.0, term_grace_s: float = 3.0) -> None:
        """End the CLI and its group: close stdin -> wait -> SIGTERM -> wait -> SIGKILL."""
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._stop(close_grace_s, term_grace_s))
        await asyncio.shield(self._stop_task)

    async def _stop(self, close_grace_s: float, term_grace_s: float) -> None:
        child = self._child
        if child is None:
            return
        if child.returncode is None:
            await child.terminate(close_grace_s=close_grace_s, term_grace_s=term_grace_s)
        await child.aclose(orphan_grace_s=_READER_GRACE_S)
        log.info(
            "claude.warm.stopped",
            pid=self.pid,
            session_id=self.session_id,
            returncode=child.returncode,
        )

    def kill_now(self) -> None:
        """Synchronous SIGKILL of the group (second cancel, emergencies); stop() still reaps."""
        if self._child is not None:
            self._child.signal(signal.SIGKILL)

    # -- I/O -------------------------------------------------------------------------

    def _deliver(self, line: bytes) -> None:
        if self._sink is not None:
            self._sink.put_nowait(line)
        elif line.strip():
            # Between turns the CLI has nothing to say; a late control_response lands here.
            text = line[:200].decode("utf-8", "replace")
            log.debug("claude.warm.idle_output", pid=self.pid, line=text)

    def _stdout_closed(self) -> None:
        self._eof = True
        if self._sink is not None:
            self._sink.put_nowait(None)

    async def stderr_settled(self) -> None:
        """Give the stderr reader a moment to catch up after the process died."""
        if self._child is not None:
            await self._child.output_closed(_READER_GRACE_S)

    def stderr_since_turn(self) -> str:
        """stderr written since the current turn began (bounded by the tail size)."""
        if self._child is None:
            return ""
        tail = self._child.stderr_tail()
        new = min(self._child.stderr_total - self._stderr_mark, len(tail))
        return tail[len(tail) - new :].decode("utf-8", "replace")

    def begin_turn(self) -> None:
        self.busy = True
        self._sink = asyncio.Queue()
        if self._eof:
            self._sink.put_nowait(None)
        self._stderr_mark = 0 if self._child is None else self._child.stderr_total

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
        return self._child is not None and await self._child.write(orjson.dumps(obj) + b"\n")

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
