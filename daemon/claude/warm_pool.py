"""The pre-warmed pool: CLIs started ahead, each with a fresh ``--session-id`` uuid.

A warm CLI answers its first turn in ~80 ms when it was started a few seconds earlier,
against ~450 ms when it is started for the turn (measured, real 2.1.197). Pool processes
carry the default flags (default cwd and model, no tool options), because flags are fixed
at start; a new session whose first turn wants exactly those takes one, and its session
id becomes that process's id (:meth:`WarmPool.take`). The pool refills in the background;
a pool process unused for the idle timeout is replaced; start failures and pool processes
dying young back off exponentially, so a broken CLI is not restarted in a tight loop.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import structlog

from daemon.claude.warm_process import ProcSpec, WarmProcess

log = structlog.get_logger("ksi.claude.warm")

_FAST_DEATH_S = 5.0  # an unused pool process dying sooner counts as a failed start
# A CLI start is ~0.3-0.4 s of CPU: starting the replacement at the moment of a hand-out
# would compete with the very first turn the pool is there to speed up (2 cores, measured).
_REFILL_DELAY_S = 1.0


class WarmPool:
    """Up to ``size`` idle warm CLIs waiting for new sessions."""

    def __init__(
        self,
        size: int,
        spec: Callable[[], ProcSpec | None],
        *,
        on_exit: Callable[[WarmProcess], None],
        retire: Callable[[WarmProcess, str], object],
    ) -> None:
        self.size = size
        self.procs: list[WarmProcess] = []
        self._spec = spec
        self._on_exit = on_exit
        self._retire = retire
        self._failures = 0
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def alive(self) -> list[WarmProcess]:
        return [p for p in self.procs if p.alive]

    def refill(self, delay_s: float = 0.0) -> None:
        """Top the pool up in the background, after ``delay_s`` (needs a running loop)."""
        if self._closed or self.size <= 0:
            return
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._fill(delay_s), name="warm-pool-refill")

    async def _fill(self, delay_s: float) -> None:
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        while not self._closed and len(self.procs) < self.size:
            if self._failures:
                await asyncio.sleep(min(60.0, 0.5 * 2 ** min(self._failures, 7)))
            spec = self._spec()
            if spec is None:
                log.warning("claude.warm.pool_unavailable", reason="Claude CLI not found")
                return
            proc = WarmProcess(spec, str(uuid.uuid4()), resume=False, pooled=True)
            proc.on_exit = self._on_exit
            try:
                await proc.start()
            except OSError as exc:
                self._failures += 1
                log.warning(
                    "claude.warm.pool_start_failed", error=str(exc), failures=self._failures
                )
                continue
            self.procs.append(proc)
            if self.closed:  # close() ran while it was starting
                self._retire(proc, "shutdown")

    def take(self, signature: tuple[str, ...]) -> WarmProcess | None:
        """Remove and return a live pool process started with ``signature``; refill."""
        for proc in self.procs:
            if proc.alive and proc.signature == signature:
                self.procs.remove(proc)
                proc.pooled = False
                proc.last_used = time.monotonic()  # its idle clock as a session starts now
                self._failures = 0
                self.refill(_REFILL_DELAY_S)
                log.info("claude.warm.pool_handout", pid=proc.pid, session_id=proc.session_id)
                return proc
        return None

    def discard(self, proc: WarmProcess) -> None:
        if proc in self.procs:
            self.procs.remove(proc)

    def exited(self, proc: WarmProcess) -> None:
        """A pool process died on its own (the backend already retired it): replace it."""
        if time.monotonic() - proc.started_mono < _FAST_DEATH_S:
            self._failures += 1
        self.refill()

    def expire(self, now: float, idle_s: float) -> None:
        """Replace pool processes older than ``idle_s`` (a fresh one picks up new config)."""
        stale = [p for p in self.procs if now - p.started_mono >= idle_s]
        for proc in stale:
            self._retire(proc, "pool_idle")
        if stale:
            self.refill()

    async def close(self) -> list[WarmProcess]:
        """Stop refilling; returns the processes still in the pool (the caller ends them)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        return list(self.procs)
