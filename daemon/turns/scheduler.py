"""SPAWN: everything around one Claude turn except running the CLI itself.

The scheduler owns four policies: idempotency (the same ``client_request_id`` within the
window is the same turn, paid for once), the FIFO queue with its concurrency cap
(daemon/turns/slots.py), recording (daemon/turns/recorder.py: log, state, events), and
cancel. Between queue and recording it calls ``litellm.acompletion("claude-cli/<model>")``,
whose provider (claude_cli_provider.py) runs the turn on this daemon's engine
(daemon/claude/engine.py). Session ids, cwd pinning and one-turn-at-a-time per session are
the engine's: the scheduler holds the session (``engine.hold_session``) from the queue to
the recorded end, so turn N of a session is recorded before turn N+1 starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import structlog
from pydantic import ValidationError

from daemon.claude.auth import AuthWatch
from daemon.claude.chat import cli_model
from daemon.claude.engine import CURRENT_ENGINE, ClaudeEngine
from daemon.claude.errors import TurnRejected
from daemon.claude.options import ClaudeOptions, TurnOptions
from daemon.commands.registry import Origin
from daemon.errors import (
    Conflict,
    ErrorCode,
    InvalidParameters,
    NotFound,
    TurnFailed,
    Unavailable,
)
from daemon.events.bus import EventBus
from daemon.events.subscriber import Event
from daemon.protocol import utc_now_iso
from daemon.settings import Settings
from daemon.state.db import Store
from daemon.state.records import (
    FINAL_STATUSES,
    ProcessStatus,
    SessionRecord,
    StateManager,
    TurnRecord,
)
from daemon.state.turnlog import TurnLog
from daemon.turns.engine import build_engine
from daemon.turns.idle import IdleWatch
from daemon.turns.limits import Limits, Scope
from daemon.turns.outcome import Outcome, SpawnResult, cli_failure, failure_of, recorded_outcome
from daemon.turns.pauses import Pauses
from daemon.turns.permissions import PermissionBroker
from daemon.turns.provider import Acompletion, ProviderLoader
from daemon.turns.recorder import TurnRecorder
from daemon.turns.retry import Backoff, retry_delay, slows_everyone
from daemon.turns.slots import Slots
from daemon.turns.tree import ConfigFor, check_child, wants_ksi_tools, with_ksi_tools
from daemon.turns.turn import SpawnRequest, Turn, restored_turn

log = structlog.get_logger("ksi.turns")

INSTALL_HINT = (
    "install the pinned CLI with `npm ci` in the project root, or point "
    "--claude-bin / KSI_CLAUDE_BIN at a claude executable"
)
_REPLAY_CACHE = 1000  # finished outcomes kept for replays of a client_request_id


class TurnScheduler:
    def __init__(
        self, settings: Settings, store: Store, state: StateManager, bus: EventBus
    ) -> None:
        self.settings = settings
        self.store = store
        self.state = state
        self.turnlog = TurnLog(settings.log_path)
        self.recorder = TurnRecorder(state, bus, self.turnlog)
        self.permissions = PermissionBroker(store, state, bus)
        self.permissions.on_progress = self.recorder.progress
        self.limits = Limits(store, state, bus, settings.max_iterations)
        self.pauses = Pauses(store)
        self.bus = bus
        self.engine: ClaudeEngine = build_engine(settings, state)
        self.idle = IdleWatch(bus, self.engine, self.limits, settings.session_idle_s)
        self.provider = ProviderLoader(settings, self.engine)
        self.auth = AuthWatch(self.engine.cli_env())
        self.slots = Slots(settings.max_concurrency)
        self.backoff = Backoff()
        self.turns: dict[str, Turn] = {}  # live turns (queued or running)
        self.accepting = True
        self._idempotent: dict[str, tuple[str, float]] = {}  # client_request_id -> (pid, t)
        # Outcomes of recent turns that carried a client_request_id (for replays).
        self._finished: OrderedDict[str, Outcome] = OrderedDict()
        self._version_probe: asyncio.Task[Any] | None = None
        # The KSI MCP face's config files (daemon/mcp_face), set by the daemon that serves it.
        self.mcp_config: ConfigFor | None = None

    # -- start-up -------------------------------------------------------------------------

    def start(self, tasks: asyncio.TaskGroup) -> None:
        """Start serving turns; background work (loading LiteLLM, probing the CLI's
        version) runs in ``tasks``, the daemon's group, until :meth:`shutdown`."""
        self.engine.start_pool()  # pre-warmed CLIs (warm_pool_size of them) start now
        self.provider.start(tasks)
        self._resume_pending()
        if self.settings.litellm_preload:
            self.provider.ensure_loading()
        self._version_probe = tasks.create_task(self._probe_version(), name="ksi-claude-version")

    async def _probe_version(self) -> None:
        try:
            await self.engine.probe_version()
        except Exception:  # a task of the daemon's group must not fail: it would end them all
            log.exception("claude.version_probe_failed")

    def stats(self) -> dict[str, Any]:
        """HEALTH_CHECK's view of turns: counts, LiteLLM, the CLI, warm processes."""
        engine = self.engine
        path = engine.binary
        if path is None:
            claude = {"found": False, "bin": None, "version": None, "install_hint": INSTALL_HINT}
        else:
            probe = self._version_probe
            claude = {
                "found": True,
                "bin": str(path),
                "version": engine.version,
                "version_probed": probe is not None and probe.done(),
            }
        return {
            "running": self.slots.running,
            "queued": self.slots.queued,
            "litellm": self.provider.status(),
            "claude": {**claude, "auth": self.auth.status()},
            "warm": engine.warm_status(),
        }

    # -- SPAWN ------------------------------------------------------------------------------

    async def submit(
        self, req: SpawnRequest, watch: Callable[[Event], None] | None = None
    ) -> SpawnResult:
        """Run (sync) or enqueue (async) a turn; returns the SPAWN result. ``watch`` is
        told of each PROCESS_PROGRESS event of the turn from now on (for a replay of a
        running turn: of the rest of it)."""
        if not self.accepting:
            raise Unavailable("the daemon is shutting down", code=ErrorCode.SHUTTING_DOWN)
        # A turn whose records could not be kept must not run: it would be paid for and
        # then be missing from its session, the process list and the replay cache.
        self.store.check_writable()
        existing = self._idempotent_hit(req.client_request_id)
        if existing is not None:
            return await self._reply_for(existing, req.mode, replay=True, watch=watch)
        req = check_child(req, self.turns.values(), self.settings, self.state.processes)
        ksi = wants_ksi_tools(req, self.state, self.settings)
        if ksi and self.mcp_config is None:
            raise Unavailable("this daemon serves no MCP face", code=ErrorCode.NOT_READY)
        req = req.model_copy(update={"ksi_tools": ksi})  # kept with it: also after a restart
        planned = await self._plan(req)
        # Planning a resume reads the session's record, so a copy of this request may have
        # registered meanwhile (planning a new session, which may take a pooled CLI, never
        # waits). Nothing awaits from here to the registration.
        existing = self._idempotent_hit(req.client_request_id)
        if existing is not None:
            return await self._reply_for(existing, req.mode, replay=True, watch=watch)
        session_id = planned.session_id or planned.new_session_id
        assert session_id is not None
        own = {
            name: getattr(req, name)
            for name in ("max_iterations", "idle_timeout_s")
            if getattr(req, name) is not None
        }
        if own:  # the session's own, from now on
            await self.limits.set("session", session_id, own)
        # Refused now rather than queued: a client learns at once that it is over a limit
        # (checked again when the turn leaves the queue).
        await self.limits.admit(
            session_id=session_id, agent_id=req.agent_id, turn_budget=req.options.max_cost_usd
        )
        existing = self._idempotent_hit(req.client_request_id)
        if existing is not None:
            return await self._reply_for(existing, req.mode, replay=True, watch=watch)
        turn = self._new_turn(req, planned)
        if watch is not None:
            turn.watchers.append(watch)
        process_id = turn.info.process_id
        self._register(turn)
        await self.state.save_process(turn.info, wait=False)
        if req.mode == "async":
            # The reply promises the turn will run, so its request is durable first.
            try:
                await self.state.keep_pending(process_id, req.model_dump_json().encode())
            except BaseException:
                self._forget(turn)
                raise
        self._launch(turn)
        return await self._reply_for(process_id, req.mode)

    async def _plan(self, req: SpawnRequest) -> ClaudeOptions:
        """The turn's session id and cwd, fixed now (the engine's policy): a mismatch is the
        client's error before anything is queued, and a warm first turn may take a
        pre-warmed CLI, whose own id then is the session's from the first event on."""
        ids = {"session_id": req.session_id, "new_session_id": req.new_session_id}
        if req.session_id is not None and await self._never_began(req.session_id):
            ids = {"session_id": None, "new_session_id": req.session_id}
        opts = ClaudeOptions.of(req.options, **ids, **self._permission_defaults(req))
        if req.ksi_tools:
            # Its own session id now (never a pooled CLI's: that one runs without the
            # face's flags), so that the session's config file is part of its plan.
            if opts.session_id is None and opts.new_session_id is None:
                opts = opts.model_copy(update={"new_session_id": str(uuid.uuid4())})
            opts = await self._with_ksi_tools(opts)
        try:
            return await self.engine.plan_turn(opts, cli_model(req.model))
        except TurnRejected as exc:
            raise InvalidParameters(exc.message, details=exc.details or None) from None

    async def _never_began(self, session_id: str) -> bool:
        """A session the daemon knows whose CLI never kept a conversation (its first turn
        was cancelled, or failed, before the CLI wrote anything): there is nothing to
        resume, and ``--resume`` would fail with "no conversation found", so its next turn
        is its first, under the same id. Not while another of its turns is queued or
        running (that one begins it)."""
        if any(t.session_id == session_id for t in self.turns.values()):
            return False
        record = await self.state.session(session_id)
        return (
            record is not None
            and record.turns == 0
            and self.engine.transcript_mark(session_id, record.cwd) is None
        )

    async def _with_ksi_tools(self, opts: ClaudeOptions) -> ClaudeOptions:
        session_id = opts.session_id or opts.new_session_id
        assert session_id is not None
        assert self.mcp_config is not None
        return await with_ksi_tools(opts, session_id, self.mcp_config)

    def origin_of(self, session_id: str) -> Origin | None:
        """The running turn of a session that has the KSI MCP tools: whom a token's call is
        for (daemon/mcp_face). None between turns, so a token outliving its turn is refused."""
        for turn in self.turns.values():
            if (
                turn.session_id == session_id
                and turn.info.status in ("running", "awaiting_permission")
                and turn.request.ksi_tools
            ):
                req = turn.request
                return Origin(turn.info.process_id, session_id, req.agent_id, req.depth)
        return None

    def _permission_defaults(self, req: SpawnRequest) -> dict[str, Any]:
        """The daemon's permission settings where the SPAWN does not say (they are part of
        the CLI's flags, so they are fixed before planning picks a warm process)."""
        o, s = req.options, self.settings
        return {
            "permissions": o.permissions or s.permissions,
            "permission_timeout_s": o.permission_timeout_s or s.permission_timeout_s,
            "permission_default": o.permission_default or s.permission_default,
        }

    def _new_turn(self, req: SpawnRequest, planned: ClaudeOptions) -> Turn:
        process_id = uuid.uuid4().hex[:12]
        session_id = planned.session_id or planned.new_session_id
        assert session_id is not None
        assert planned.cwd is not None
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
            cwd=planned.cwd,
            warm=bool(
                req.options.warm if req.options.warm is not None else self.settings.warm_default
            ),
            parent_process_id=req.parent_process_id,
            depth=req.depth,
            ksi_tools=bool(req.ksi_tools),
            tree_max_cost_usd=req.tree_max_cost_usd,
        )
        opts = planned.model_copy(update={"cwd": req.options.cwd})
        return Turn(info, req, opts, session_id, planned.cwd)

    def _register(self, turn: Turn) -> None:
        """A live turn, found by its process id and (if it has one) its client_request_id."""
        self.turns[turn.info.process_id] = turn
        self.idle.turn_began(turn.session_id, turn.info.process_id)
        if turn.request.client_request_id:
            key = turn.request.client_request_id
            self._idempotent[key] = (turn.info.process_id, time.monotonic())

    def _launch(self, turn: Turn) -> None:
        turn.task = asyncio.create_task(self._run(turn), name=f"turn-{turn.info.process_id}")

    def _forget(self, turn: Turn) -> None:
        """Undo the :meth:`_register` of a turn that will never run."""
        self.turns.pop(turn.info.process_id, None)
        self.idle.turn_ended(turn.session_id, turn.info.process_id, None, exists=False)
        if turn.request.client_request_id:
            self._idempotent.pop(turn.request.client_request_id, None)
        turn.info.status = "failed"
        self.state.note_process(turn.info)

    def _resume_pending(self) -> None:
        """Queue again the async turns an earlier run had accepted but not started, in
        their original order, and remember recent client_request_ids for replays."""
        state = self.state
        offset = time.time() - time.monotonic()
        for key, process_id, created in state.recent_request_ids:
            self._idempotent[key] = (process_id, created - offset)
        for info, raw in state.pending:
            try:
                turn = restored_turn(info, raw, str(self.settings.project_root))
            except ValidationError as exc:
                failed = failure_of(InvalidParameters(str(exc)), info.process_id)
                info.status, info.error = "failed", failed.record()
                state.drop_pending(info.process_id)
                state.queue_process(info)
                continue
            self._register(turn)
            state.note_process(info)
            self._launch(turn)
            log.info(
                "turn.resumed_after_restart",
                process_id=info.process_id,
                session_id=turn.session_id,
            )
        state.pending = []

    async def _reply_for(
        self,
        process_id: str,
        mode: str,
        replay: bool = False,
        watch: Callable[[Event], None] | None = None,
    ) -> SpawnResult:
        turn = self.turns.get(process_id)
        if turn is not None and watch is not None:
            turn.watchers.append(watch)
        if mode == "async":
            info = turn.info if turn else self.state.processes.get(process_id)
            now = info.status if info else "completed"
            return SpawnResult(
                process_id=process_id,
                status=now if now in FINAL_STATUSES else "started",
                state=now,
                type="claude",
                mode="async",
                session_id=turn.session_id if turn else (info.session_id if info else None),
                replayed=replay,
            )
        if turn is not None:
            # Shielded: if the waiting client goes away, the paid turn still finishes.
            outcome = await asyncio.shield(turn.done)
        else:
            outcome = self._finished.get(process_id) or await self._recorded(process_id)
        if isinstance(outcome, TurnFailed):
            # A new exception each time: the one in the replay cache is raised again later.
            raise TurnFailed(outcome.message, code=outcome.code, details=outcome.details)
        return outcome.model_copy(update={"replayed": replay}) if replay else outcome

    async def _recorded(self, process_id: str) -> Outcome:
        info = self.state.processes.get(process_id)
        path = self.turnlog.path_for(info.session_id) if info and info.session_id else None
        return await asyncio.to_thread(recorded_outcome, info, process_id, path)

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
        info = self.state.processes.get(hit[0])
        if info is not None and info.status == "interrupted":
            return None  # never completed: the resubmission runs it (once)
        return hit[0]

    # -- running a turn ---------------------------------------------------------------------

    async def _run(self, turn: Turn) -> None:
        turn.entered = True
        info = turn.info
        holding_slot = finishing = False
        try:
            await self._unpaused(turn)
            async with self.engine.hold_session(turn.session_id, first=turn.request.first):
                try:
                    while True:
                        # Paused meanwhile (while waiting for the turn ahead, or for a
                        # slot)? Then wait without holding a slot.
                        await self._unpaused(turn)
                        await self.slots.acquire(info.process_id)
                        if not self._paused(turn):
                            break
                        self.slots.release()
                    holding_slot = True
                    outcome: Outcome = await self._execute(turn)
                except (asyncio.CancelledError, Exception) as exc:
                    if turn.deferred and info.status in ("queued", "paused"):
                        return  # kept for the next run of the daemon (see shutdown)
                    outcome = failure_of(exc, info.process_id)
                # Announced while the slot and the session are still held: events then never
                # show more turns running than the cap, and turn N of a session is complete
                # before turn N+1 starts.
                finishing = True
                await self._finish(turn, outcome)
        except asyncio.CancelledError:
            if finishing:
                raise  # a second cancel (forced shutdown) while recording: give up on it
            if turn.deferred:
                return
            # Cancelled while queued behind an earlier turn of the same session.
            await self._finish(turn, failure_of(asyncio.CancelledError(), info.process_id))
        finally:
            if holding_slot:
                self.slots.release()

    def _paused(self, turn: Turn) -> bool:
        return self.pauses.blocks(turn.session_id, turn.request.agent_id)

    async def _unpaused(self, turn: Turn) -> None:
        """Wait while the turn's session or agent is paused (shown as ``paused``)."""
        if not self._paused(turn):
            return
        self._show(turn, "paused")
        try:
            await self.pauses.wait(turn.session_id, turn.request.agent_id)
        finally:
            if turn.info.status == "paused":
                self._show(turn, "queued")

    def _show(self, turn: Turn, status: ProcessStatus) -> None:
        turn.info.status = status
        self.state.note_process(turn.info)  # memory only: on disk it stays "queued"

    async def _execute(self, turn: Turn) -> SpawnResult:
        acompletion = await self.provider.acompletion()
        # The turns ahead of it in the session (or of its agent) have spent meanwhile.
        admission = await self.limits.admit(
            session_id=turn.session_id,
            agent_id=turn.request.agent_id,
            turn_budget=turn.request.options.max_cost_usd,
            process_id=turn.info.process_id,
        )
        turn.budget_scope = admission.scope
        turn.opts = turn.opts.model_copy(update={"max_cost_usd": admission.max_cost_usd})
        self.recorder.began(turn)
        response = await self._attempts(turn, acompletion)
        return await self.recorder.completed(turn, response._hidden_params["claude_turn"])

    async def _attempts(self, turn: Turn, acompletion: Acompletion) -> Any:
        """Call the provider; retry a transient API failure that did no paid work.

        Before a retry the session is rewound to where it was before the failed attempt
        (the CLI had stored the prompt already and would replay it next to the retried one),
        and while the API rate-limits or is overloaded, every turn waits for the backoff
        before it calls again.
        """
        engine, req = self.engine, turn.request
        try:
            # Planned again inside the session's hold: the turns before it have settled
            # where the session lives.
            planned = turn.opts.model_copy(update=self._permission_defaults(req))
            if req.ksi_tools:  # (again: a turn restored after a restart was planned without)
                planned = await self._with_ksi_tools(planned)
            opts = await engine.plan_turn(planned, cli_model(req.model))
        except TurnRejected as exc:
            raise cli_failure(exc, turn.session_id) from None
        assert opts.cwd is not None
        turn.cwd = opts.cwd
        recorder, broker = self.recorder, self.permissions
        opts = opts.model_copy(
            update={
                "on_start": lambda start: recorder.cli_started(turn, start),
                "on_progress": lambda item: recorder.progress(turn, item),
                "on_permission": lambda ask: broker.ask(turn, ask),
            }
        )
        attempt = 0
        while True:
            await self.backoff.wait()
            mark = engine.transcript_mark(turn.session_id, turn.cwd)
            # The provider is LiteLLM's, one per process: this says the call is this engine's.
            CURRENT_ENGINE.set(engine)
            try:
                return await acompletion(
                    model=f"claude-cli/{req.model}",
                    messages=[{"role": "user", "content": req.prompt}],
                    claude=opts,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = cli_failure(exc, turn.session_id)
            delay = retry_delay(error, attempt, self.settings)
            if delay is None:
                raise error
            attempt += 1
            if not await engine.rewind(
                turn.session_id, turn.cwd, mark, new_session=not turn.resume
            ):
                raise error
            if slows_everyone(error):
                self.backoff.hold(delay)
            self.recorder.retrying(turn, error, attempt, self.settings.api_retries, delay)
            await asyncio.sleep(delay)

    async def _finish(self, turn: Turn, outcome: Outcome) -> None:
        if isinstance(outcome, TurnFailed):
            self.auth.turn_ended(outcome.code, outcome.message)
            if outcome.code == ErrorCode.BUDGET_EXCEEDED and turn.info.started_at is not None:
                self.limits.crossed(
                    outcome,
                    process_id=turn.info.process_id,
                    session_id=turn.session_id,
                    agent_id=turn.request.agent_id,
                    scope=turn.budget_scope,
                )
        else:
            self.auth.turn_ended(None)
        try:
            await self.recorder.finished(turn, outcome)
            self.turns.pop(turn.info.process_id, None)
            if turn.request.client_request_id:
                # Kept for idempotent replays only: nothing else can ask for a finished turn's
                # full outcome, and it holds the CLI's whole JSON.
                self._finished[turn.info.process_id] = outcome
                while len(self._finished) > _REPLAY_CACHE:
                    self._finished.popitem(last=False)
        finally:
            # The session now awaits input (if it exists: the turn started, or resumed it).
            self.idle.turn_ended(
                turn.session_id,
                turn.info.process_id,
                turn.request.agent_id,
                exists=turn.resume or turn.info.started_at is not None,
            )
            # Whatever happened while recording, a waiting sync SPAWN gets its answer.
            if not turn.done.done():
                turn.done.set_result(outcome)

    # -- pause and resume ----------------------------------------------------------------

    def _of(self, scope: Scope, key: str) -> list[Turn]:
        if scope == "session":
            return [t for t in self.turns.values() if t.session_id == key]
        return [t for t in self.turns.values() if t.request.agent_id == key]

    async def pause(self, scope: Scope, key: str, *, interrupt: bool) -> dict[str, Any]:
        """Hold the queued turns of a session or an agent (kept across restarts); with
        ``interrupt``, cancel its running ones too (else they finish)."""
        changed = await self.pauses.pause(scope, key)
        waiting, interrupted = [], []
        for turn in self._of(scope, key):
            if turn.info.status in ("queued", "paused"):
                self._show(turn, "paused")  # also one waiting for its session's last turn
                waiting.append(turn.info.process_id)
            elif interrupt:
                with contextlib.suppress(NotFound, Conflict):  # it ended meanwhile
                    await self.cancel(turn.info.process_id)
                    interrupted.append(turn.info.process_id)
        self.bus.publish(
            f"{scope.upper()}_PAUSED",
            {"scope": scope, "id": key, "waiting": waiting, "interrupted": interrupted},
        )
        return {
            "scope": scope,
            "id": key,
            "paused": True,
            "changed": changed,
            "waiting": waiting,
            "interrupted": interrupted,
        }

    async def resume(self, scope: Scope, key: str) -> dict[str, Any]:
        """Release the session's or agent's waiting turns, in their order."""
        changed = await self.pauses.resume(scope, key)
        released = []
        for turn in self._of(scope, key):
            if turn.info.status == "paused" and not self._paused(turn):
                self._show(turn, "queued")
                released.append(turn.info.process_id)
        self.bus.publish(
            f"{scope.upper()}_RESUMED", {"scope": scope, "id": key, "released": released}
        )
        return {
            "scope": scope,
            "id": key,
            "paused": False,
            "changed": changed,
            "waiting": released,
            "interrupted": [],
        }

    # -- steering -------------------------------------------------------------------------

    async def interrupt_session(
        self, session_id: str, prompt: str | None
    ) -> tuple[list[str], SpawnResult | None]:
        """Stop the session's running turn (warm: the CLI's interrupt, the CLI lives on;
        cold: its process group is ended) and, with ``prompt``, run that next in the session,
        ahead of its other queued turns. Returns the interrupted process ids and the new
        turn's (async) SPAWN result."""
        live = [t for t in self.turns.values() if t.session_id == session_id]
        running = [t for t in live if t.info.status in ("running", "awaiting_permission")]
        steer = None
        if prompt is not None:
            like = running[0].request if running else (live[0].request if live else None)
            if like is None:
                session = await self.state.session(session_id)
                assert session is not None  # the command checked
                base = SpawnRequest(
                    prompt=prompt,
                    mode="async",
                    session_id=session_id,
                    model=session.model or self.settings.default_model,
                    agent_id=session.agent_id,
                    options=TurnOptions(),
                )
            else:
                base = like.model_copy(update={"client_request_id": None, "mode": "async"})
            # Submitted before the interrupt: its task is waiting for the session, at the
            # front, when the interrupted turn lets go of it.
            update = {
                "prompt": prompt,
                "session_id": session_id,
                "first": True,
                "max_iterations": None,
                "idle_timeout_s": None,
            }
            steer = await self.submit(base.model_copy(update=update))
        interrupted = []
        for turn in running:
            with contextlib.suppress(NotFound, Conflict):  # it ended meanwhile
                await self.cancel(turn.info.process_id)
                interrupted.append(turn.info.process_id)
        self.bus.publish(
            "SESSION_INTERRUPTED",
            {
                "session_id": session_id,
                "interrupted": interrupted,
                "next_process_id": steer.process_id if steer else None,
            },
        )
        return interrupted, steer

    async def wait(self, process_id: str, timeout_s: float) -> tuple[TurnRecord, Outcome | None]:
        """A turn's record and, once it has finished (within ``timeout_s``), its outcome;
        None while it is still queued or running."""
        turn = self.turns.get(process_id)
        if turn is not None:
            with contextlib.suppress(TimeoutError):
                # Shielded: a waiter that gives up must not cancel the turn.
                await asyncio.wait_for(asyncio.shield(turn.done), timeout_s)
            return turn.info, (turn.done.result() if turn.done.done() else None)
        info = self.state.processes.get(process_id)
        if info is None:
            raise NotFound(f"no process {process_id!r}", code=ErrorCode.PROCESS_NOT_FOUND)
        if info.status not in FINAL_STATUSES:
            return info, None
        return info, self._finished.get(process_id) or await self._recorded(process_id)

    # -- cancel and shutdown -------------------------------------------------------------

    async def cancel(self, process_id: str) -> TurnRecord:
        turn = self.turns.get(process_id)
        if turn is None:
            info = self.state.processes.get(process_id)
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
        await self._settle_unstarted(turn)
        # The reply means the cancel is durable: this write commits behind the ones the turn
        # queued (its record, and the end of its kept request), so a crash now cannot bring
        # a cancelled queued turn back to life after the restart.
        await self.state.save_process(turn.info)
        return turn.info

    async def _settle_unstarted(self, turn: Turn) -> None:
        """Record a turn whose task was cancelled before its first step: the coroutine never
        ran, so neither did its own handling of the cancel."""
        if not turn.entered and turn.info.process_id in self.turns:
            await self._finish(turn, failure_of(asyncio.CancelledError(), turn.info.process_id))

    def force_stop(self) -> None:
        for turn in list(self.turns.values()):
            if turn.task is not None:
                turn.task.cancel()

    async def shutdown(self, grace_s: float) -> None:
        self.accepting = False
        self.permissions.closing = True
        for turn in list(self.turns.values()):  # queued turns never started: stop them now
            if turn.info.status in ("queued", "paused") and turn.task is not None:
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
        for turn in list(self.turns.values()):
            if not turn.deferred:
                await self._settle_unstarted(turn)
        background = [t for t in (self._version_probe, self.provider.task) if t is not None]
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        self.idle.close()
        await self.engine.aclose()
        self.turnlog.close()

    def snapshot(self) -> list[TurnRecord]:
        """Live turns with their queue positions, then recent finished ones (newest last)."""
        for turn in self.turns.values():
            turn.info.queue_position = self.slots.position(turn.info.process_id)
        return list(self.state.processes.values())

    def with_warm(self, session: SessionRecord) -> SessionRecord:
        """The session, with its state (running, awaiting input, expired) and its
        warm-process details if a warm CLI serves it now."""
        state, expires = self.idle.state_of(session.session_id, session.last_used_at)
        return replace(
            session,
            warm=self.engine.warm_session(session.session_id),
            state=state,
            idle_expires_at=expires,
        )
