"""WarmBackend: one long-lived Claude CLI per active session, and a pre-warmed pool.

A warm turn skips the CLI's ~0.3-0.4 s start-up: the session's CLI (a
:class:`~daemon.claude.warm_process.WarmProcess`) stays up between
turns and each turn is one JSON line on its stdin, answered by lines ending in ``result``.
The turn's result goes through the same :func:`~daemon.claude.results.classify_result`
as a cold turn, so callers see the same TurnResult and ClaudeCLIError codes.

Policies (each one is a decision, see "Warm sessions" in LITELLM_INTEGRATION.md):

* **Fixed flags.** cwd, model, tool, permission and system-prompt flags are argv, fixed at
  start. A turn asking for different ones ends the process and starts a new one with
  ``--resume`` (the session continues; only the start-up cost is paid again).
* **Cost.** ``total_cost_usd`` in a warm result accumulates over the process (measured), so
  a turn's cost is the difference to the previous result of the same process; ``raw`` is
  left verbatim.
* **Death.** A process found dead before a turn's line was written to it is replaced with
  ``--resume`` and the turn runs there: nothing was lost. A process dying *after* the line
  was written fails that turn with the CLI's own error (CLI_CRASHED for a crash). It is not
  re-sent: the CLI may already have called the API (paid) or run tools (side effects). The
  next turn resumes the session in a new process. Nothing restarts a process for exactly
  this reason (warm_process.py).
* **Cancel and timeout.** The CLI's interrupt control request ends the turn within
  milliseconds and keeps the process; if no ``result`` follows within
  ``warm_interrupt_wait_s``, the process group is killed and the next turn resumes in a new one.
* **Idle and cap.** Processes idle for ``warm_idle_s`` are ended; more than ``warm_max`` session
  processes end the least recently used idle one. Busy processes are never evicted: if all
  are busy a new session briefly exceeds the cap.
* **Pool** (:mod:`daemon.claude.warm_pool`). :meth:`WarmBackend.take_pooled` hands a
  pre-warmed process to a new session *before* its turn is resolved, so the pool process's
  id is the session id from the start (the engine and the daemon use it everywhere).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any, Literal

import structlog

from daemon.claude.backends import StreamState, TurnLines, TurnRequest, result_of, spawn_errors
from daemon.claude.errors import ClaudeCLIError, ErrorCode
from daemon.claude.results import TurnResult, classify_result, json_line
from daemon.claude.warm_pool import WarmPool
from daemon.claude.warm_process import ProcSpec, WarmProcess, user_message

if TYPE_CHECKING:
    from daemon.claude.engine import EngineConfig

log = structlog.get_logger("ksi.claude.warm")

_MAX_HISTORY = 10_000


def spec_for(req: TurnRequest) -> ProcSpec:
    return ProcSpec(
        claude_bin=req.claude_bin, model=req.model, opts=req.opts, cwd=req.cwd, env=req.env
    )


class WarmBackend:
    """Turns on long-lived CLIs; implements :class:`~daemon.claude.backends.TurnBackend`."""

    mode: Literal["cold", "warm"] = "warm"

    def __init__(self, config: EngineConfig, pool_spec: Callable[[], ProcSpec | None]) -> None:
        self.config = config
        self._sessions: OrderedDict[str, WarmProcess] = OrderedDict()  # LRU order, oldest first
        self._pool = WarmPool(
            config.warm_pool_size if config.warm_max > 0 else 0,
            pool_spec,
            on_exit=self._on_exit,
            retire=self._retire,
        )
        # Sessions a warm CLI has received a turn for: a restart must --resume them.
        self._history: OrderedDict[str, None] = OrderedDict()
        self._retiring: dict[WarmProcess, asyncio.Task[None]] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False

    # -- TurnBackend -------------------------------------------------------------------

    async def run_json(self, req: TurnRequest) -> TurnResult:
        state = StreamState()
        return await result_of(self._turn(req, state), state)

    def stream(self, req: TurnRequest, state: StreamState) -> AsyncGenerator[dict[str, Any], None]:
        return self._turn(req, state)

    async def aclose(self) -> None:
        """End every warm and pool process with its group (stdin close -> TERM -> KILL)."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        for proc in [*self._sessions.values(), *await self._pool.close()]:
            self._retire(proc, "shutdown")
        if self._retiring:
            await asyncio.wait(list(self._retiring.values()))

    def release(self, session_id: str, reason: str) -> bool:
        """End the session's warm CLI if it is idle (the session stays resumable: its next
        turn resumes from the file). True if there was one to end."""
        proc = self._sessions.get(session_id)
        if proc is None or proc.busy:
            return False
        self._retire(proc, reason)
        return True

    async def forget(self, session_id: str) -> None:
        """Stop the session's warm CLI and forget that one ever ran it (its next turn starts
        from the session's file as it is then; see ClaudeEngine.rewind)."""
        self._history.pop(session_id, None)
        proc = self._sessions.get(session_id)
        if proc is not None:
            await asyncio.shield(self._retire(proc, "rewind"))

    # -- one turn ------------------------------------------------------------------------

    async def _turn(
        self, req: TurnRequest, state: StreamState
    ) -> AsyncGenerator[dict[str, Any], None]:
        proc = await self._acquire(req)
        proc.begin_turn()
        settled = False  # True once nothing is left to abort: result read, or process gone
        turn: TurnLines | None = None
        try:
            if not await proc.write(user_message(req.prompt)):
                # It died between the liveness check and the write, so the line never
                # arrived: replace it and send the turn there (the idle-death case).
                proc.end_turn()
                self._retire(proc, "died_idle")
                proc = await self._acquire(req)
                proc.begin_turn()
                if not await proc.write(user_message(req.prompt)):
                    settled = True
                    raise await self._died(proc, req)
            self._remember(req.session_id)
            proc.turns += 1
            req.on_start(proc.pid, proc.argv)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + req.timeout_s
            turn = TurnLines(req.opts, proc.write)
            while True:
                try:
                    # A timeout around this await only (never around a yield), and not
                    # wait_for: on 3.11 it can drop a value that arrives as it is cancelled.
                    async with asyncio.timeout_at(deadline):
                        line = await proc.next_line()
                except TimeoutError:
                    settled = True
                    raise await self._timed_out(proc, req) from None
                if line is None:
                    break
                if (obj := turn.take(line)) is None:
                    continue
                if turn.result is not None:
                    settled = True
                    yield obj
                    break
                yield obj
            if turn.result is None:
                settled = True
                raise await self._died(proc, req, turn.stdout.excerpt())
            state.result = self._classify(proc, req, turn.result)
        except BaseException:
            if not settled:
                # Cancelled (CANCEL_PROCESS) or closed (stream aclose) mid-turn.
                await self._abandon(proc)
            raise
        finally:
            if turn is not None:
                await turn.aclose()
            proc.end_turn()
            self._enforce_cap()

    def _classify(self, proc: WarmProcess, req: TurnRequest, obj: dict[str, Any]) -> TurnResult:
        turn_cost = self._note_total(proc, obj)
        try:
            # exit_code=0: a live process has not failed; classify_result needs that for success.
            result = classify_result(
                obj,
                exit_code=0,
                stderr_tail=proc.stderr_since_turn(),
                requested_model=req.model,
                session_id=req.session_id,
                pid=proc.pid,
            )
        except ClaudeCLIError as exc:
            exc.exit_code = None  # the CLI is still running
            raise
        return dataclasses.replace(result, cost_usd=turn_cost, exit_code=None)

    @staticmethod
    def _note_total(proc: WarmProcess, obj: dict[str, Any]) -> float:
        """This turn's cost from the process-cumulative ``total_cost_usd``."""
        try:
            total = float(obj.get("total_cost_usd") or 0.0)
        except (TypeError, ValueError):
            total = 0.0
        turn_cost = max(0.0, total - proc.cost_base)
        proc.cost_base = max(proc.cost_base, total)
        return turn_cost

    async def _died(
        self, proc: WarmProcess, req: TurnRequest, stdout_sample: str = ""
    ) -> ClaudeCLIError:
        """stdout closed before the turn's result: the CLI died (or never started)."""
        await proc.wait_exited(self.config.warm_close_grace_s)
        await proc.stderr_settled()
        await asyncio.shield(self._retire(proc, "died"))
        log.warning(
            "claude.warm.died_mid_turn",
            pid=proc.pid,
            session_id=req.session_id,
            returncode=proc.returncode,
        )
        try:
            classify_result(
                None,
                exit_code=proc.returncode,
                stderr_tail=proc.stderr_since_turn(),
                requested_model=req.model,
                session_id=req.session_id,
                pid=proc.pid,
                stdout_sample=stdout_sample,
            )
        except ClaudeCLIError as exc:
            return exc
        raise AssertionError("classify_result accepted a turn without a result")

    async def _timed_out(self, proc: WarmProcess, req: TurnRequest) -> ClaudeCLIError:
        survived = await self._abandon(proc)
        what = (
            "the turn was interrupted; the warm CLI keeps running"
            if survived
            else "the CLI process group was killed"
        )
        return ClaudeCLIError(
            ErrorCode.TIMEOUT,
            f"turn exceeded {req.timeout_s:g}s; {what}",
            exit_code=proc.returncode,
            stderr_tail=proc.stderr_since_turn(),
            session_id=req.session_id,
            pid=proc.pid,
        )

    async def _abandon(self, proc: WarmProcess) -> bool:
        """Stop the running turn (shielded); True if the CLI survived it."""
        task = asyncio.ensure_future(self._interrupt(proc))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            proc.kill_now()  # cancelled again while waiting: no more patience
            self._retire(proc, "cancelled")
            raise

    async def _interrupt(self, proc: WarmProcess) -> bool:
        """Interrupt control request, then read through the turn's result.

        Measured with 2.1.197: the control_response comes within ~4 ms and the turn ends
        with an ``error_during_execution`` result; the process lives on. If that does not
        happen within ``warm_interrupt_wait_s`` the group is killed and the session will resume
        in a new process.
        """
        started = time.monotonic()
        if proc.alive and await proc.send_interrupt():
            try:
                async with asyncio.timeout(self.config.warm_interrupt_wait_s):
                    while (line := await proc.next_line()) is not None:
                        obj = json_line(line)
                        if obj is not None and obj.get("type") == "result":
                            self._note_total(proc, obj)
                            log.info(
                                "claude.warm.interrupted",
                                pid=proc.pid,
                                session_id=proc.session_id,
                                ms=round((time.monotonic() - started) * 1000, 1),
                            )
                            return True
            except TimeoutError:
                pass
        proc.kill_now()
        await asyncio.shield(self._retire(proc, "interrupt_failed"))
        return False

    # -- processes -------------------------------------------------------------------------

    async def _acquire(self, req: TurnRequest) -> WarmProcess:
        """The session's live process with the turn's flags, started (or restarted) if needed."""
        self._check_open(req.session_id)
        self._ensure_reaper()
        spec = spec_for(req)
        proc = self._sessions.get(req.session_id)
        if proc is not None and not (proc.alive and proc.signature == spec.signature):
            reason = "flags_changed" if proc.alive else "exited"
            await asyncio.shield(self._retire(proc, reason))
            proc = None
        if proc is None:
            # An evicted or expired process of this session may still be exiting: never run
            # two CLIs on one session.
            pending = [t for p, t in self._retiring.items() if p.session_id == req.session_id]
            if pending:
                await asyncio.wait(pending)
            resume = req.resume or req.session_id in self._history
            proc = WarmProcess(spec, req.session_id, resume=resume)
            proc.on_exit = self._on_exit
            self._sessions[req.session_id] = proc
            try:
                with spawn_errors(req):
                    await proc.start()
                self._check_open(req.session_id)
            except BaseException:
                await asyncio.shield(self._retire(proc, "start_failed"))
                raise
            self._enforce_cap(keep=proc)
        self._sessions.move_to_end(req.session_id)
        return proc

    def _check_open(self, session_id: str) -> None:
        if self._closed:
            raise ClaudeCLIError(ErrorCode.CANCELLED, "engine is shut down", session_id=session_id)

    def _remember(self, session_id: str) -> None:
        self._history[session_id] = None
        self._history.move_to_end(session_id)
        while len(self._history) > _MAX_HISTORY:
            self._history.popitem(last=False)

    def _retire(self, proc: WarmProcess, reason: str) -> asyncio.Task[None]:
        """Forget ``proc`` and end it in the background; returns the stopping task."""
        if self._sessions.get(proc.session_id) is proc:
            del self._sessions[proc.session_id]
        self._pool.discard(proc)
        task = self._retiring.get(proc)
        if task is None:
            log.info(
                "claude.warm.retire",
                pid=proc.pid,
                session_id=proc.session_id,
                reason=reason,
                turns=proc.turns,
                pooled=proc.pooled,
            )
            task = asyncio.ensure_future(
                proc.stop(self.config.warm_close_grace_s, self.config.term_grace_s)
            )
            self._retiring[proc] = task
            task.add_done_callback(functools.partial(self._retired, proc))
        return task

    def _retired(self, proc: WarmProcess, _task: asyncio.Task[None]) -> None:
        self._retiring.pop(proc, None)

    def _on_exit(self, proc: WarmProcess) -> None:
        """A warm CLI exited. Ours (retiring) or busy ones are handled elsewhere."""
        if proc in self._retiring or proc.busy:
            return
        log.warning(
            "claude.warm.exited",
            pid=proc.pid,
            session_id=proc.session_id,
            returncode=proc.returncode,
            pooled=proc.pooled,
        )
        # Not restarted now: the next turn of the session resumes it (no process idles for
        # a session that may never come back); a pool process is replaced by the refill.
        self._retire(proc, "exited")
        if proc.pooled:
            self._pool.exited(proc)

    def _enforce_cap(self, keep: WarmProcess | None = None) -> None:
        excess = len(self._sessions) - self.config.warm_max
        for proc in list(self._sessions.values()):  # least recently used first
            if excess <= 0:
                return
            if not proc.busy and proc is not keep:
                self._retire(proc, "lru")
                excess -= 1

    def _ensure_reaper(self) -> None:
        if self._reaper is None and not self._closed:
            self._reaper = asyncio.create_task(self._reap_idle(), name="warm-reaper")

    async def _reap_idle(self) -> None:
        interval = min(max(self.config.warm_idle_s / 4, 0.05), 5.0)
        while not self._closed:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for proc in list(self._sessions.values()):
                if not proc.busy and now - proc.last_used >= self.config.warm_idle_s:
                    self._retire(proc, "idle")
            self._pool.expire(now, self.config.warm_idle_s)

    # -- pool -------------------------------------------------------------------------------

    def start_pool(self) -> None:
        """Start filling the pool (needs a running loop); a no-op for pool_size 0."""
        if self._pool.size > 0 and not self._closed:
            self._ensure_reaper()
            self._pool.refill()

    def take_pooled(self, spec: ProcSpec) -> str | None:
        """Hand a pool process with ``spec``'s flags to a new session; returns its id.

        The process becomes that session's warm process at once (its idle clock starts),
        so the caller must run the session's first turn with this id as ``new_session_id``.
        """
        if self._closed:
            return None
        proc = self._pool.take(spec.signature)
        if proc is None:
            return None
        self._sessions[proc.session_id] = proc
        self._enforce_cap(keep=proc)
        return proc.session_id

    # -- introspection ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        sessions = [p for p in self._sessions.values() if p.alive]
        pool = self._pool.alive()
        return {
            "warm_sessions": len(sessions),
            "busy": sum(1 for p in sessions if p.busy),
            "pool_ready": len(pool),
            "pool_size": self._pool.size,
            "max_warm": self.config.warm_max,
            "idle_timeout_s": self.config.warm_idle_s,
            "session_pids": sorted(p.pid for p in sessions),
            "pool_pids": [p.pid for p in pool],
        }

    def session_info(self, session_id: str) -> dict[str, Any] | None:
        proc = self._sessions.get(session_id)
        if proc is None or not proc.alive:
            return None
        info = proc.describe()
        return {k: info[k] for k in ("pid", "rss_mb", "idle_s", "turns", "started_at", "busy")}

    def processes(self) -> list[dict[str, Any]]:
        return [p.describe() for p in [*self._sessions.values(), *self._pool.alive()] if p.alive]
