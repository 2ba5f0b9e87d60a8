"""SPAWN: everything around one Claude turn except running the CLI itself.

The scheduler validates and queues a turn, serialises turns of one session (concurrent
resumes silently fork a conversation), caps concurrent CLI runs with a FIFO queue, calls
``litellm.acompletion(model="claude-cli/<model>")`` (our provider runs the CLI), then
logs the turn, records it in the state manager and announces it on the bus.

LiteLLM takes ~2 s to import, so it is loaded in a worker thread after the socket is up;
a SPAWN that arrives earlier waits for it, every other command is served at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import random
import re
import sys
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson
import structlog
from pydantic import BaseModel, ValidationError

from daemon.claude.chat import cli_model
from daemon.claude.engine import CURRENT_ENGINE, ClaudeEngine, EngineConfig
from daemon.claude.errors import claude_error_of
from daemon.claude.options import ClaudeOptions, StartInfo
from daemon.commands.registry import invalid_parameters
from daemon.errors import Conflict, DaemonError, ErrorCode, InvalidParameters, NotFound, SpawnFailed
from daemon.protocol import utc_now_iso
from daemon.settings import Settings
from daemon.state.records import FINAL_STATUSES, SessionRecord, TurnRecord
from daemon.state.turnlog import TurnLog
from daemon.turns.orphans import child_env, start_ticks

if TYPE_CHECKING:
    from daemon.app import Daemon

log = structlog.get_logger("ksi.turns")

INSTALL_HINT = (
    "install the pinned CLI with `npm ci` in the project root, or point "
    "--claude-bin / KSI_CLAUDE_BIN at a claude executable"
)

# Turns that failed before the CLI could have written a session to disk.
_NO_SESSION_CODES = frozenset({"SESSION_NOT_FOUND", "CLAUDE_NOT_FOUND", "NOT_READY"})

_ERROR_STATUS: dict[str, Literal["timed_out", "cancelled", "failed"]] = {
    "TIMEOUT": "timed_out",
    "CANCELLED": "cancelled",
}


class SpawnRequest(BaseModel):
    """A validated SPAWN, as the scheduler needs it (built by the SPAWN command)."""

    prompt: str
    mode: Literal["sync", "async"]
    session_id: str | None = None
    model: str
    agent_id: str | None = None
    client_request_id: str | None = None
    options: dict[str, Any]  # ClaudeOptions fields other than the session ones


def _new_future() -> asyncio.Future[dict[str, Any]]:
    return asyncio.get_running_loop().create_future()


@dataclass
class Turn:
    info: TurnRecord
    request: SpawnRequest
    session_id: str
    resume: bool
    cwd: str
    done: asyncio.Future[dict[str, Any]] = field(default_factory=_new_future)
    task: asyncio.Task[None] | None = None
    # Set at shutdown for a queued async turn: its request is kept in SQLite and it runs
    # after the restart, so its cancellation now is not recorded as a cancelled turn.
    deferred: bool = False
    progress: int = 0  # PROCESS_PROGRESS events so far (their per-process index)

    def next_index(self) -> int:
        self.progress += 1
        return self.progress - 1


class TurnScheduler:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.settings = daemon.settings
        self.turnlog = TurnLog(self.settings.log_path)
        self.turns: dict[str, Turn] = {}  # live turns (queued or running)
        self.queue: OrderedDict[str, asyncio.Future[None]] = OrderedDict()
        self.running_count = 0
        self._session_locks: dict[str, tuple[asyncio.Lock, int]] = {}  # lock, turns using it
        self._idempotent: dict[str, tuple[str, float]] = {}  # client_request_id -> (pid, t)
        # Outcomes of recent turns that carried a client_request_id (for replays).
        self._finished: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._ready: asyncio.Event | None = None
        self._load_error: str | None = None
        self._acompletion: Any = None
        self.engine: ClaudeEngine | None = None
        self._version_probed = False  # `claude --version` takes ~0.5 s; HEALTH_CHECK says so
        self._bg: set[asyncio.Task[Any]] = set()
        self._loading = False
        self._hold_until = 0.0  # monotonic: no turn calls the API before (rate limited)

    # -- start-up -------------------------------------------------------------------------

    def start(self) -> None:
        self._ready = asyncio.Event()
        # Marks every CLI (and its tool subprocesses) as this run's: see daemon/turns/orphans.py.
        extra_env = {**self.settings.claude_env, **child_env(self.settings.state_path)}
        retries = self.settings.cli_max_retries
        if retries is not None and "CLAUDE_CODE_MAX_RETRIES" not in os.environ:
            extra_env["CLAUDE_CODE_MAX_RETRIES"] = str(retries)
        self.engine = ClaudeEngine(
            EngineConfig(
                claude_bin=self.settings.claude_bin,
                project_root=self.settings.project_root,
                default_cwd=self.settings.project_root,
                default_model=self.settings.default_model,
                default_timeout_s=self.settings.default_timeout_s,
                term_grace_s=self.settings.term_grace_s,
                extra_env=extra_env,
                warm_default=self.settings.warm_default,
                warm_idle_s=self.settings.warm_idle_s,
                warm_max=self.settings.warm_max,
                warm_pool_size=self.settings.warm_pool_size,
            )
        )
        self.engine.start_pool()  # pre-warmed CLIs (warm_pool_size of them) start now
        self._resume_pending()
        if self.settings.litellm_preload:
            self._ensure_loading()
        self._spawn_bg(self._probe_version())

    def _ensure_loading(self) -> None:
        if not self._loading:
            self._loading = True
            self._spawn_bg(self._load_litellm())

    def _spawn_bg(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _probe_version(self) -> None:
        assert self.engine is not None
        try:
            await self.engine.probe_version()
        finally:
            self._version_probed = True

    async def _load_litellm(self) -> None:
        started = time.perf_counter()
        try:
            root = str(self.settings.project_root)
            if root not in sys.path:
                sys.path.insert(0, root)
            # The import is ~2 s of CPU; a thread keeps the socket answering meanwhile.
            mod = await asyncio.to_thread(importlib.import_module, "claude_cli_provider")
            mod.quiet_litellm()
            provider = mod.ClaudeCLIProvider(self.engine)
            mod.register(provider)
            if self.settings.warm_up_litellm:
                await mod.warm_up(provider)
            import litellm

            self._acompletion = litellm.acompletion
            log.info("litellm.ready", ms=round((time.perf_counter() - started) * 1000, 1))
        except Exception as exc:
            self._load_error = f"{type(exc).__name__}: {exc}"
            log.exception("litellm.load_failed")
        finally:
            assert self._ready is not None
            self._ready.set()

    def litellm_status(self) -> dict[str, Any]:
        if self._load_error:
            return {"status": "failed", "error": self._load_error}
        if not self._loading:
            return {"status": "not_loaded", "hint": "loads at the first SPAWN"}
        ready = self._ready is not None and self._ready.is_set()
        return {"status": "ready" if ready else "loading"}

    def claude_status(self) -> dict[str, Any]:
        engine = self.engine
        path = engine.binary if engine is not None else None
        if engine is None or path is None:
            return {"found": False, "bin": None, "version": None, "install_hint": INSTALL_HINT}
        return {
            "found": True,
            "bin": str(path),
            "version": engine.version,
            "version_probed": self._version_probed,
        }

    def warm_status(self) -> dict[str, Any]:
        return self.engine.warm_status() if self.engine is not None else {}

    # -- SPAWN ------------------------------------------------------------------------------

    async def submit(self, req: SpawnRequest) -> dict[str, Any]:
        """Run (sync) or enqueue (async) a turn; returns the SPAWN result."""
        if self.daemon.stopping:
            raise DaemonError("the daemon is shutting down", code=ErrorCode.SHUTTING_DOWN)
        # A turn whose records could not be kept must not run: it would be paid for and
        # then be missing from its session, the process list and the replay cache.
        self.daemon.store.check_writable()
        # Looked up first: nothing may await between the idempotency check and the turn's
        # registration, or two copies of one request could both start.
        known = await self.daemon.state.session(req.session_id) if req.session_id else None
        existing = self._idempotent_hit(req.client_request_id)
        if existing is not None:
            return await self._reply_for(existing, req.mode, replay=True)
        turn = self._new_turn(req, known)
        process_id = turn.info.process_id
        self.turns[process_id] = turn
        await self.daemon.state.save_process(turn.info, wait=False)
        if req.mode == "async":
            # The reply promises the turn will run, so its request is durable first.
            try:
                await self.daemon.state.keep_pending(process_id, req.model_dump_json().encode())
            except BaseException:
                self._forget(turn)
                raise
        self._launch(turn)
        return await self._reply_for(process_id, req.mode)

    def _launch(self, turn: Turn) -> None:
        turn.task = asyncio.create_task(self._run(turn), name=f"turn-{turn.info.process_id}")

    def _forget(self, turn: Turn) -> None:
        """Undo the registration of a turn that will never run."""
        self.turns.pop(turn.info.process_id, None)
        if turn.request.client_request_id:
            self._idempotent.pop(turn.request.client_request_id, None)
        turn.info.status = "failed"
        self.daemon.state.note_process(turn.info)

    def _resume_pending(self) -> None:
        """Queue again the async turns an earlier run had accepted but not started, in
        their original order, and remember recent client_request_ids for replays."""
        state = self.daemon.state
        offset = time.time() - time.monotonic()
        for key, process_id, created in state.recent_request_ids:
            self._idempotent[key] = (process_id, created - offset)
        for info, raw in state.pending:
            req = SpawnRequest.model_validate_json(raw)
            cwd = info.cwd or req.options.get("cwd") or str(self.settings.project_root)
            turn = Turn(
                info,
                req,
                info.session_id or req.session_id or str(uuid.uuid4()),
                resume=req.session_id is not None,
                cwd=cwd,
            )
            self.turns[info.process_id] = turn
            state.note_process(info)
            if req.client_request_id:
                self._idempotent[req.client_request_id] = (info.process_id, time.monotonic())
            self._launch(turn)
            log.info(
                "turn.resumed_after_restart", process_id=info.process_id, session_id=turn.session_id
            )
        state.pending = []

    async def _reply_for(self, process_id: str, mode: str, replay: bool = False) -> dict[str, Any]:
        turn = self.turns.get(process_id)
        if mode == "async":
            info = turn.info if turn else self.daemon.state.processes.get(process_id)
            status = info.status if info else "completed"
            return {
                "process_id": process_id,
                "status": status,
                "mode": "async",
                "session_id": turn.session_id if turn else (info.session_id if info else None),
                "replayed": replay,
            }
        if turn is not None:
            # Shielded: if the waiting client goes away, the paid turn still finishes.
            outcome = await asyncio.shield(turn.done)
        else:
            outcome = self._finished.get(process_id) or await self._outcome_from_record(process_id)
        if "error" in outcome:
            err = dict(outcome["error"])
            raise SpawnFailed(err.pop("message"), code=err.pop("code"), details=err)
        result = dict(outcome["result"])
        result["replayed"] = replay
        return result

    async def _outcome_from_record(self, process_id: str) -> dict[str, Any]:
        """A replay of a turn whose full outcome is no longer cached (evicted, or from before
        a restart): what the record says, with the answer read back from the turn log."""
        info = self.daemon.state.processes.get(process_id)
        if info is None or info.status != "completed":
            error = (info.error if info and info.error else None) or {
                "code": "PROCESS_NOT_FOUND",
                "message": f"process {process_id} is gone",
            }
            return {"error": {**error, "process_id": process_id}}
        result: dict[str, Any] = {
            "process_id": process_id,
            "status": "completed",
            "session_id": info.session_id,
            "cost_usd": info.cost_usd,
            "model": info.model,
            "agent_id": info.agent_id,
        }
        if info.session_id:
            path = self.turnlog.path_for(info.session_id)
            raw = await asyncio.to_thread(_logged_result, path, process_id)
            if raw is not None:
                result.update(
                    text=raw.get("result"),
                    is_error=raw.get("is_error"),
                    usage=raw.get("usage"),
                    num_turns=raw.get("num_turns"),
                    duration_ms=raw.get("duration_ms"),
                    log_path=str(path),
                    raw=raw,
                )
        return {"result": result}

    def _idempotent_hit(self, client_request_id: str | None) -> str | None:
        if not client_request_id:
            return None
        now = time.monotonic()
        window = self.settings.idempotency_window_s
        for key, (_, t) in list(self._idempotent.items()):
            if now - t > window:
                del self._idempotent[key]
        hit = self._idempotent.get(client_request_id)
        if hit is None:
            return None
        info = self.daemon.state.processes.get(hit[0])
        if info is not None and info.status == "interrupted":
            return None  # never completed: the resubmission runs it (once)
        return hit[0]

    def _new_turn(self, req: SpawnRequest, known: SessionRecord | None) -> Turn:
        process_id = uuid.uuid4().hex[:12]
        requested_cwd = req.options.get("cwd")
        if req.session_id is not None:
            session_id, resume = req.session_id, True
            if known is not None:
                # Resume is cwd-scoped in the CLI: a session always runs where it began.
                if requested_cwd and Path(requested_cwd).resolve() != Path(known.cwd):
                    raise InvalidParameters(
                        f"session {session_id} lives in {known.cwd}; resume is scoped to the "
                        "directory a session began in",
                        details={"session_cwd": known.cwd},
                    )
                cwd = known.cwd
            else:
                cwd = requested_cwd or str(self.settings.project_root)
        else:
            session_id, resume = str(uuid.uuid4()), False
            cwd = requested_cwd or str(self.settings.project_root)
        cwd = str(Path(cwd).resolve())
        if not Path(cwd).is_dir():
            raise InvalidParameters(f"cwd {cwd} is not a directory")
        try:  # everything the provider will check, checked before anything is queued
            opts = ClaudeOptions.model_validate({**req.options, "cwd": cwd})
        except ValidationError as exc:
            raise invalid_parameters(exc) from None
        if not resume and self.engine is not None:
            # A warm first turn may take a pre-warmed CLI, whose own --session-id becomes the
            # session's id. Reserved here, before anything is recorded, so the async reply,
            # the JSONL log, the state and every event carry the real id from the start.
            session_id = self.engine.reserve_session(opts, cli_model(req.model)) or session_id
        info = TurnRecord(
            process_id=process_id,
            status="queued",
            mode=req.mode,
            session_id=session_id,
            agent_id=req.agent_id,
            model=req.model,
            client_request_id=req.client_request_id,
            prompt_preview=req.prompt[:200],
            created_at=utc_now_iso(),
            cwd=cwd,
            warm=bool(req.options.get("warm", self.settings.warm_default)),
        )
        if req.client_request_id:
            self._idempotent[req.client_request_id] = (process_id, time.monotonic())
        return Turn(info, req, session_id, resume, cwd)

    # -- running a turn ---------------------------------------------------------------------

    async def _run(self, turn: Turn) -> None:
        info = turn.info
        # Reference-counted, not "dropped when unlocked": right after a release the lock looks
        # free while a woken waiter has yet to take it, and a fresh lock for the same session
        # would let two of its turns run at once.
        lock, users = self._session_locks.get(turn.session_id, (asyncio.Lock(), 0))
        self._session_locks[turn.session_id] = (lock, users + 1)
        holding_slot = finishing = False
        try:
            async with lock:
                try:
                    await self._acquire_slot(info.process_id)
                    holding_slot = True
                    outcome = await self._execute(turn)
                except (asyncio.CancelledError, Exception) as exc:
                    if turn.deferred and info.status == "queued":
                        return  # kept for the next run of the daemon (see shutdown)
                    outcome = self._failure(exc, info.process_id)
                # Announced while the slot and the session lock are still held: events then
                # never show more turns running than the cap, and turn N of a session is
                # complete before turn N+1 starts.
                finishing = True
                await self._finish(turn, outcome)
        except asyncio.CancelledError:
            if finishing:
                raise  # a second cancel (forced shutdown) while recording: give up on it
            if turn.deferred:
                return
            # Cancelled while queued behind an earlier turn of the same session.
            await self._finish(turn, self._failure(asyncio.CancelledError(), info.process_id))
        finally:
            if holding_slot:
                self._release_slot()
            lock, users = self._session_locks[turn.session_id]
            if users == 1:
                del self._session_locks[turn.session_id]
            else:
                self._session_locks[turn.session_id] = (lock, users - 1)

    @staticmethod
    def _failure(exc: BaseException, process_id: str) -> dict[str, Any]:
        """The outcome of a turn that raised instead of returning a result."""
        if isinstance(exc, asyncio.CancelledError):
            error: dict[str, Any] = {"code": "CANCELLED", "message": "the turn was cancelled"}
        elif isinstance(exc, DaemonError):
            error = {**(exc.details or {}), "code": exc.code, "message": exc.message}
        else:
            log.error("turn.crashed", process_id=process_id, exc_info=exc)
            error = {"code": "INTERNAL_ERROR", "message": type(exc).__name__}
        return {"error": {**error, "process_id": process_id}}

    async def _execute(self, turn: Turn) -> dict[str, Any]:
        assert self._ready is not None
        self._ensure_loading()
        await self._ready.wait()
        if self._acompletion is None:
            raise DaemonError(
                f"LiteLLM could not be loaded: {self._load_error}", code=ErrorCode.NOT_READY
            )
        info, req = turn.info, turn.request
        info.status = "running"
        info.started_at = utc_now_iso()
        info.queue_position = None
        # Queued, not awaited: from here on a crash leaves the turn "interrupted", never
        # re-run (it may have been paid for), so its kept request goes too.
        self.daemon.state.queue_process(info)
        if req.mode == "async":
            self.daemon.state.drop_pending(info.process_id)
        # Queued, not awaited: the log's writer thread creates the file while the CLI
        # starts. The claude line below is queued behind it and awaited.
        self.turnlog.human(
            turn.session_id,
            req.prompt,
            process_id=info.process_id,
            agent_id=req.agent_id,
            model=req.model,
        )
        log_path = self.turnlog.path_for(turn.session_id)
        options = dict(req.options)
        options["cwd"] = turn.cwd
        if turn.resume:
            options["session_id"] = turn.session_id
        else:
            options["new_session_id"] = turn.session_id
        options["on_start"] = lambda start: self._on_start(turn, start)
        response = await self._attempts(turn, options)
        result = response._hidden_params["claude_turn"]
        # A log that cannot be written is reported (turnlog.write_failed) but does not turn a
        # paid, successful turn into a failure: the result still reaches the client and state.
        with contextlib.suppress(OSError):
            await self.turnlog.claude(turn.session_id, result.raw, process_id=info.process_id)
        return {
            "result": {
                "process_id": info.process_id,
                "status": "completed",
                "session_id": result.session_id,
                "text": result.text,
                "is_error": result.is_error,
                "cost_usd": result.cost_usd,
                "usage": result.usage,
                "num_turns": result.num_turns,
                "duration_ms": result.duration_ms,
                "model": result.model,
                "agent_id": req.agent_id,
                "warm": info.warm,
                "log_path": str(log_path),
                "raw": result.raw,
            }
        }

    async def _attempts(self, turn: Turn, options: dict[str, Any]) -> Any:
        """Call the provider; retry a transient API failure that did no paid work.

        Before a retry the session is rewound to where it was before the failed attempt
        (the CLI had stored the prompt already and would replay it next to the retried one),
        and while the API rate-limits or is overloaded, every turn waits for the backoff
        before it calls again (``_hold_until``): a queue of turns does not hammer it.
        """
        assert self.engine is not None
        req = turn.request
        attempt = 0
        while True:
            await self._wait_for_hold()
            mark = self.engine.transcript_mark(turn.session_id, turn.cwd)
            # The provider is LiteLLM's, one per process: this says the call is this engine's.
            CURRENT_ENGINE.set(self.engine)
            try:
                return await self._acompletion(
                    model=f"claude-cli/{req.model}",
                    messages=[{"role": "user", "content": req.prompt}],
                    claude=options,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = self._spawn_error(exc, turn)
            delay = retry_delay(error, attempt, self.settings)
            if delay is None:
                raise error
            attempt += 1
            if not await self.engine.rewind(
                turn.session_id, turn.cwd, mark, new_session=not turn.resume
            ):
                raise error
            if error.code == "RATE_LIMITED" or _overloaded(error):
                self._hold_until = max(self._hold_until, time.monotonic() + delay)
            details = error.details or {}
            log.warning(
                "turn.api_retry",
                process_id=turn.info.process_id,
                attempt=attempt,
                delay_s=round(delay, 3),
                code=error.code,
                status=details.get("api_error_status"),
            )
            self.daemon.bus.publish(
                "PROCESS_PROGRESS",
                {
                    "process_id": turn.info.process_id,
                    "session_id": turn.session_id,
                    "agent_id": req.agent_id,
                    "index": turn.next_index(),
                    "kind": "api_retry",
                    "attempt": attempt,
                    "max_retries": self.settings.api_retries,
                    "delay_s": round(delay, 3),
                    "status": details.get("api_error_status"),
                    "code": error.code,
                    "message": error.message[:500],
                },
            )
            await asyncio.sleep(delay)

    async def _wait_for_hold(self) -> None:
        wait = self._hold_until - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    def _on_start(self, turn: Turn, start: StartInfo) -> None:
        turn.info.pid = start.pid
        # The CLI leads its own process group; the start time tells it from a later process
        # that reuses the pid, so a restarted daemon can end it safely (daemon/turns/orphans.py).
        turn.info.pgid = start.pid
        turn.info.pid_ticks = start_ticks(start.pid)
        turn.info.warm = start.mode == "warm"
        self.daemon.state.queue_process(turn.info)
        self.daemon.bus.publish(
            "PROCESS_STARTED",
            {
                "process_id": turn.info.process_id,
                "session_id": turn.session_id,
                "agent_id": turn.request.agent_id,
                "pid": start.pid,
                "model": turn.request.model,
                "mode": turn.request.mode,
                "warm": turn.info.warm,
            },
        )

    def _spawn_error(self, exc: Exception, turn: Turn) -> DaemonError:
        cli = claude_error_of(exc)
        if cli is not None:
            details = cli.to_dict()
            details.pop("code", None)
            details.pop("message", None)
            details["session_id"] = details.get("session_id") or turn.session_id
            return SpawnFailed(cli.message, code=cli.code, details=details)
        log.error("turn.litellm_error", error=repr(exc), process_id=turn.info.process_id)
        return SpawnFailed(
            f"LiteLLM call failed: {type(exc).__name__}: {exc}", code=ErrorCode.CLI_CRASHED
        )

    async def _finish(self, turn: Turn, outcome: dict[str, Any]) -> None:
        try:
            await self._record(turn, outcome)
        finally:
            # Whatever happened while recording, a waiting sync SPAWN gets its answer.
            if not turn.done.done():
                turn.done.set_result(outcome)

    async def _record(self, turn: Turn, outcome: dict[str, Any]) -> None:
        info = turn.info
        info.finished_at = utc_now_iso()
        started = info.started_at is not None
        if "error" in outcome:
            err = outcome["error"]
            info.status = _ERROR_STATUS.get(err["code"], "failed")
            info.error = err
            cost = 0.0
            if started:
                with contextlib.suppress(OSError):
                    await self.turnlog.error(turn.session_id, err, process_id=info.process_id)
        else:
            info.status = "completed"
            cost = float(outcome["result"].get("cost_usd") or 0.0)
            info.cost_usd = cost
        await self.daemon.state.save_process(info, wait=False)
        if not started and turn.request.mode == "async":
            self.daemon.state.drop_pending(info.process_id)  # cancelled while queued
        error_code = outcome["error"]["code"] if "error" in outcome else None
        if started and error_code not in _NO_SESSION_CODES:
            # The CLI stored the session as soon as it started: it can be resumed even after
            # a failed turn, so the daemon knows it too.
            await self.daemon.state.record_turn(
                turn.session_id,
                cwd=turn.cwd,
                model=turn.request.model,
                agent_id=turn.request.agent_id,
                cost_usd=cost,
                process_id=info.process_id,
                log_path=str(self.turnlog.path_for(turn.session_id)),
                completed=info.status == "completed",
                new_session=not turn.resume,
            )
        self.turns.pop(info.process_id, None)
        if turn.request.client_request_id:
            # Kept for idempotent replays only: nothing else can ask for a finished turn's full
            # outcome, and it holds the CLI's whole JSON.
            self._finished[info.process_id] = outcome
            while len(self._finished) > 1000:
                self._finished.popitem(last=False)
        event = dict(outcome.get("result") or {})
        event.update(
            {
                "process_id": info.process_id,
                "status": info.status,
                "session_id": event.get("session_id") or turn.session_id,
                "agent_id": turn.request.agent_id,
                "mode": turn.request.mode,
            }
        )
        if "error" in outcome:
            event["error"] = outcome["error"]
        self.daemon.bus.publish("PROCESS_COMPLETE", event)
        log.info(
            "turn.finished",
            process_id=info.process_id,
            status=info.status,
            session_id=turn.session_id,
            cost_usd=cost,
        )

    # -- concurrency cap --------------------------------------------------------------------

    async def _acquire_slot(self, process_id: str) -> None:
        if self.running_count < self.settings.max_concurrency and not self.queue:
            self.running_count += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queue[process_id] = fut
        try:
            await fut
        except asyncio.CancelledError:
            self.queue.pop(process_id, None)
            if fut.done() and not fut.cancelled():
                self._release_slot()  # granted just as we were cancelled: pass it on
            raise

    def _release_slot(self) -> None:
        # Hand the slot straight to the oldest waiter, so the FIFO order holds.
        while self.queue:
            _, fut = self.queue.popitem(last=False)
            if not fut.done():
                fut.set_result(None)
                return
        self.running_count -= 1

    def queue_position(self, process_id: str) -> int | None:
        for i, pid in enumerate(self.queue):
            if pid == process_id:
                return i + 1
        return None

    # -- cancel and shutdown -------------------------------------------------------------

    async def cancel(self, process_id: str) -> TurnRecord:
        turn = self.turns.get(process_id)
        if turn is None:
            info = self.daemon.state.processes.get(process_id)
            if info is None:
                raise NotFound(f"no process {process_id!r}", code=ErrorCode.PROCESS_NOT_FOUND)
            if info.status in FINAL_STATUSES:
                raise Conflict(
                    f"process {process_id} already finished ({info.status})",
                    code=ErrorCode.PROCESS_FINISHED,
                    details={"status": info.status},
                )
            raise NotFound(
                f"process {process_id!r} is not running here", code=ErrorCode.PROCESS_NOT_FOUND
            )
        assert turn.task is not None
        turn.task.cancel()
        # The run's own cleanup kills the CLI's process group before the task ends.
        await asyncio.wait([turn.task])
        # The reply means the cancel is durable: this write commits behind the ones the turn
        # queued (its record, and the end of its kept request), so a crash now cannot bring
        # a cancelled queued turn back to life after the restart.
        await self.daemon.state.save_process(turn.info)
        return turn.info

    def force_stop(self) -> None:
        for turn in list(self.turns.values()):
            if turn.task is not None:
                turn.task.cancel()

    async def shutdown(self, grace_s: float) -> None:
        for turn in list(self.turns.values()):  # queued turns never started: stop them now
            if turn.info.status == "queued" and turn.task is not None:
                # An async one keeps its request in SQLite and runs after the restart; a sync
                # one's client is about to lose its connection, so it is cancelled.
                turn.deferred = turn.request.mode == "async"
                turn.task.cancel()
        tasks = [t.task for t in self.turns.values() if t.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        for task in list(self._bg):
            task.cancel()
        if self.engine is not None:
            await self.engine.aclose()
        self.turnlog.close()

    def snapshot(self) -> list[TurnRecord]:
        """Live turns with their queue positions, then recent finished ones (newest last)."""
        for turn in self.turns.values():
            turn.info.queue_position = self.queue_position(turn.info.process_id)
        return list(self.daemon.state.processes.values())

    def warm_processes(self) -> list[dict[str, Any]]:
        """Live warm CLIs (sessions and pool) for GET_PROCESSES."""
        return self.engine.warm_processes() if self.engine is not None else []

    def with_warm(self, session: SessionRecord) -> SessionRecord:
        """The session, with its warm-process details if a warm CLI serves it now."""
        warm = self.engine.warm_session(session.session_id) if self.engine is not None else None
        return replace(session, warm=warm) if warm else session


def _logged_result(path: Path, process_id: str) -> dict[str, Any] | None:
    """The CLI's JSON result of one turn, from its session's JSONL log (None if absent)."""
    needle = f'"process_id":"{process_id}"'.encode()
    try:
        with path.open("rb") as fh:
            for line in fh:
                if needle in line and line.startswith(b'{"'):
                    obj = orjson.loads(line)
                    if obj.get("type") == "claude" and obj.get("process_id") == process_id:
                        raw: dict[str, Any] = obj
                        raw.pop("timestamp", None)
                        raw.pop("process_id", None)
                        raw["type"] = "result"
                        return raw
    except (OSError, orjson.JSONDecodeError):
        return None
    return None


# Statuses worth another attempt: the request was refused or lost before the model did work.
_TRANSIENT_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
_TRANSIENT_TEXT = (
    "unable to connect",
    "overloaded",
    "econnreset",
    "socket hang up",
    "connection reset",
    "connection error",
)
_RETRY_AFTER = re.compile(r"retry[- _]after\W{0,3}(\d+(?:\.\d+)?)", re.IGNORECASE)
_MAX_RETRY_AFTER_S = 60.0  # beyond this the CLI itself gives up; so do we


def _overloaded(error: DaemonError) -> bool:
    details = error.details or {}
    return details.get("api_error_status") == 529 or "overloaded" in error.message.lower()


def retry_delay(error: DaemonError, attempt: int, settings: Settings) -> float | None:
    """Seconds to wait before retrying after ``error`` (attempt 0 = the first retry), or
    None if it must not be retried: not transient, retries used up, or the failed attempt
    did paid work (cost or output), which a rerun would pay for again."""
    if attempt >= settings.api_retries or error.code not in ("RATE_LIMITED", "API_ERROR"):
        return None
    details = error.details or {}
    status = details.get("api_error_status")
    if status is None:
        if not any(t in error.message.lower() for t in _TRANSIENT_TEXT):
            return None  # e.g. "Request timed out": the request may have been served
    elif status not in _TRANSIENT_STATUSES:
        return None
    raw = details.get("raw") or {}
    usage = raw.get("usage") or {}
    if (raw.get("total_cost_usd") or 0) > 0 or (usage.get("output_tokens") or 0) > 0:
        return None
    delay: float = min(settings.api_retry_max_s, settings.api_retry_base_s * 2**attempt)
    delay *= 1 + random.uniform(0, 0.25)
    hint = _RETRY_AFTER.search(f"{error.message} {details.get('stderr_tail') or ''}")
    if hint is not None:
        after = float(hint.group(1))
        if after > _MAX_RETRY_AFTER_S:
            return None
        delay = max(delay, after)
    return delay
