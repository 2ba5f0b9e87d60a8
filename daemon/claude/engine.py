"""ClaudeEngine: run Claude Code CLI turns with session continuity.

The engine alone owns three pieces of policy the bare CLI leaves to its callers (the
daemon's turn scheduler, daemon/turns/scheduler.py, uses them and keeps no copy):

* **Per-session serialisation.** Two concurrent ``--resume`` runs of one
  session both succeed but fork its history silently (measured with 2.1.197), so
  turns of one session id wait on an ``asyncio.Lock`` that is dropped when idle. A caller
  that must keep a session to itself for longer than the CLI run (the daemon records a
  turn before the next one starts) holds it with :meth:`ClaudeEngine.hold_session`; turns
  it runs inside do not wait for themselves.
* **cwd pinning.** Resume is scoped to the cwd the session was created in, so a resumed
  turn runs in the directory its session began in, and asking for another one is refused
  before a CLI starts. Where those directories are kept is the caller's choice
  (:class:`SessionDirectory`: the daemon's SQLite records; in memory by default).
* **Session ids.** First turns pass ``--session-id <uuid>`` so the id is known (and
  reported through ``on_start``) even if the run dies. :meth:`ClaudeEngine.plan_turn`
  fixes id and cwd ahead of the run for a caller that reports them at once.

How a turn is executed is behind :class:`TurnBackend`, chosen per turn by
:meth:`ClaudeEngine._backend_for`: cold (one ``claude -p`` process per turn) or
warm (one long-lived stream-json CLI per session plus a pre-warmed pool,
:mod:`daemon.claude.warm`). ``opts.warm`` decides, else ``config.warm_default``.
A new session's warm turn may take a pool process, whose session id then becomes
the session's id (see :meth:`ClaudeEngine.reserve_session`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import signal
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import aclosing, asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import structlog

from daemon.claude import defaults
from daemon.claude.backends import ColdBackend, StreamState, TurnBackend, TurnRequest, TurnStream
from daemon.claude.errors import ClaudeCLIError, ErrorCode, TurnRejected
from daemon.claude.locate import claude_version, locate_claude
from daemon.claude.options import ClaudeOptions, StartInfo
from daemon.claude.results import TurnResult
from daemon.claude.runner import killpg_quiet
from daemon.claude.warm import WarmBackend, WarmConfig
from daemon.claude.warm_process import ProcSpec

log = structlog.get_logger("ksi.claude.engine")

# The engine a LiteLLM call in this context is for (see ClaudeCLIProvider.engine): set by a
# caller that owns an engine around its ``litellm.acompletion`` calls.
CURRENT_ENGINE: ContextVar[ClaudeEngine | None] = ContextVar("ksi_claude_engine", default=None)

# The sessions the current context holds (hold_session): their turns do not wait on their
# own lock again.
_HELD_SESSIONS: ContextVar[frozenset[str]] = ContextVar("ksi_held_sessions", default=frozenset())

_MAX_REMEMBERED_SESSIONS = 10_000
_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9]")


@dataclass(kw_only=True)
class EngineConfig:
    """Static engine settings, built once by the daemon."""

    project_root: Path
    default_cwd: Path
    claude_bin: str | None = None
    default_model: str | None = None
    default_timeout_s: float = defaults.TIMEOUT_S
    term_grace_s: float = defaults.TERM_GRACE_S
    extra_env: dict[str, str] = field(default_factory=dict)
    warm_default: bool = defaults.WARM_DEFAULT
    warm_idle_s: float = defaults.WARM_IDLE_S
    warm_max: int = defaults.WARM_MAX
    """Cap on warm session processes (LRU eviction); 0 disables warm mode."""
    warm_pool_size: int = defaults.WARM_POOL_SIZE
    warm_interrupt_wait_s: float = 2.0


class SessionDirectory(Protocol):
    """Where the engine finds the directory a session began in (its cwd pin)."""

    async def cwd_of(self, session_id: str) -> str | None:
        """The session's cwd, or None if it is not known here."""
        ...

    def started(self, session_id: str, cwd: str) -> None:
        """A CLI of the session has started in ``cwd``."""
        ...


class RememberedCwds:
    """The default :class:`SessionDirectory`: the sessions this engine ran, in memory (LRU)."""

    def __init__(self, limit: int = _MAX_REMEMBERED_SESSIONS) -> None:
        self._cwds: OrderedDict[str, str] = OrderedDict()
        self._limit = limit

    async def cwd_of(self, session_id: str) -> str | None:
        return self._cwds.get(session_id)

    def started(self, session_id: str, cwd: str) -> None:
        self._cwds[session_id] = cwd
        self._cwds.move_to_end(session_id)
        while len(self._cwds) > self._limit:
            self._cwds.popitem(last=False)


@dataclass
class _SessionSlot:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class ClaudeEngine:
    """Runs turns; see the module docstring for the policies it enforces."""

    def __init__(self, config: EngineConfig, sessions: SessionDirectory | None = None) -> None:
        self.config = config
        self.sessions: SessionDirectory = sessions or RememberedCwds()
        self._bin: Path | None = locate_claude(config.claude_bin, config.project_root)
        self._version: str | None = None
        self._cold = ColdBackend()
        self._warm = WarmBackend(
            WarmConfig(
                idle_s=config.warm_idle_s,
                max_warm=config.warm_max,
                pool_size=config.warm_pool_size,
                interrupt_wait_s=config.warm_interrupt_wait_s,
                term_grace_s=config.term_grace_s,
            ),
            self._pool_spec,
        )
        self._slots: dict[str, _SessionSlot] = {}
        self._running: dict[int, str] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False

    # -- public API -------------------------------------------------------

    async def run_turn(
        self, prompt: str, *, model: str | None = None, opts: ClaudeOptions | None = None
    ) -> TurnResult:
        """Run one turn with ``--output-format json``; raise ClaudeCLIError on failure."""
        opts = opts or ClaudeOptions()
        session_id, resume = self._session_for(opts, model)
        backend = self._backend_for(opts)
        async with self.hold_session(session_id):
            cwd = await self._cwd_for(opts, session_id, resume)
            req, pids = self._request(prompt, model, opts, session_id, resume, cwd, backend.mode)
            with self._shutdown_is_cancel(pids):
                return await backend.run_json(req)

    async def plan_turn(self, opts: ClaudeOptions, model: str | None = None) -> ClaudeOptions:
        """The options a turn will run with, fixed now: its session id (the resumed one, the
        given ``new_session_id``, a pooled warm process's, or a new uuid) and its cwd (for a
        resume, the one the session began in). Running the result is the same turn; a caller
        that reports ids before the turn runs (the daemon) plans first, and a caller holding
        the session (:meth:`hold_session`) plans again right before the run, when the turns
        before it have settled where the session lives.

        Raises :class:`TurnRejected` (nothing ran): a resume asking for another directory than
        the session's, or a cwd that is not a directory (any more).
        """
        session_id, resume = self._session_for(opts, model)
        cwd = await self._cwd_for(opts, session_id, resume)
        ids = (session_id, None) if resume else (None, session_id)
        return opts.model_copy(update={"session_id": ids[0], "new_session_id": ids[1], "cwd": cwd})

    @asynccontextmanager
    async def hold_session(self, session_id: str) -> AsyncIterator[None]:
        """Keep the session to this context: other turns of it wait until the block ends;
        turns run inside it (in this task, or tasks it starts) do not."""
        held = _HELD_SESSIONS.get()
        if session_id in held:
            yield
            return
        # Reference-counted, not "dropped when unlocked": right after a release the lock looks
        # free while a woken waiter has yet to take it, and a fresh lock for the same session
        # would let two of its turns run at once.
        slot = self._slots.setdefault(session_id, _SessionSlot())
        slot.users += 1
        try:
            async with slot.lock:
                _HELD_SESSIONS.set(held | {session_id})
                try:
                    yield
                finally:
                    # Not ContextVar.reset: a stream's steps may each run in another context
                    # (the provider's sync streaming does), where the token is not valid.
                    _HELD_SESSIONS.set(held)
        finally:
            slot.users -= 1
            if slot.users == 0:
                self._slots.pop(session_id, None)

    def stream_turn(
        self, prompt: str, *, model: str | None = None, opts: ClaudeOptions | None = None
    ) -> TurnStream:
        """Start a stream-json turn; iterate the result, and always ``aclose()`` it."""
        opts = opts or ClaudeOptions()
        session_id, resume = self._session_for(opts, model)
        state = StreamState()
        gen = self._stream(prompt, model, opts, session_id, resume, state)
        return TurnStream(gen, state, session_id)

    async def aclose(self) -> None:
        """Refuse new turns and kill every CLI still running (TERM, grace, KILL)."""
        self._closed = True
        await self._warm.aclose()
        await self._cold.aclose()
        for pgid in list(self._running):
            killpg_quiet(pgid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.config.term_grace_s)
        for pgid in list(self._running):
            killpg_quiet(pgid, signal.SIGKILL)

    @property
    def binary(self) -> Path | None:
        """The CLI executable turns will use (looked up again while none is found)."""
        return self._binary()

    @property
    def version(self) -> str | None:
        """The CLI's version once :meth:`probe_version` has run, else None."""
        return self._version

    async def probe_version(self) -> str | None:
        """Ask the binary for its version (cached for describe())."""
        path = self._binary()
        if path is not None:
            self._version = await claude_version(path)
        return self._version

    def describe(self) -> dict[str, Any]:
        """Status snapshot for the daemon's status command."""
        return {
            "claude_bin": str(self._bin) if self._bin else None,
            "version": self._version,
            "running": len(self._running),
            "running_pids": sorted(self._running),
            "active_sessions": len(self._slots),
            "warm_default": self.config.warm_default,
            "warm": self._warm.status(),
            "closed": self._closed,
        }

    # -- warm sessions ----------------------------------------------------------

    def start_pool(self) -> None:
        """Start pre-warming ``warm_pool_size`` processes (call inside the running loop)."""
        if not self._closed:
            self._warm.start_pool()

    def reserve_session(self, opts: ClaudeOptions, model: str | None = None) -> str | None:
        """Give a new session a pre-warmed pool process; returns its session id, or None.

        Only for a turn that would run warm on a new session with the pool's flags
        (default cwd, model and tools). The pool process was started with its own
        ``--session-id``, so that id becomes the session's: run the turn with it as
        ``new_session_id``. Callers that do not pass ``new_session_id`` get this
        automatically; callers that pre-generate ids (the daemon) call it first.
        """
        if opts.session_id is not None or self._backend_for(opts) is not self._warm:
            return None
        spec = self._spec(model, opts, opts.cwd or str(self.config.default_cwd))
        return None if spec is None else self._warm.take_pooled(spec)

    def warm_status(self) -> dict[str, Any]:
        """Counts for HEALTH_CHECK: warm sessions, pool readiness and the limits."""
        return self._warm.status()

    def warm_session(self, session_id: str) -> dict[str, Any] | None:
        """pid, rss_mb, idle_s, turns, started_at of the session's warm CLI, if it has one."""
        return self._warm.session_info(session_id)

    def warm_processes(self) -> list[dict[str, Any]]:
        """Every live warm CLI (sessions and pool) with pid, RSS and idle time."""
        return self._warm.processes()

    # -- rewinding a failed attempt ---------------------------------------------------

    @functools.cached_property
    def _projects_dir(self) -> Path:
        # Once: it reads the whole environment, and every turn attempt asks for it.
        env = self._env()
        config = env.get("CLAUDE_CONFIG_DIR") or os.path.join(
            env.get("HOME") or os.path.expanduser("~"), ".claude"
        )
        return Path(config) / "projects"

    def transcript_path(self, session_id: str, cwd: str) -> Path:
        """Where the CLI keeps a session's transcript: ``projects/<cwd slug>/<id>.jsonl``.
        The slug is the cwd with every character but ASCII letters and digits made "-"
        (measured with 2.1.197: "/tmp/a_b c@d.e" -> "-tmp-a-b-c-d-e")."""
        return self._projects_dir / _SLUG_UNSAFE.sub("-", cwd) / f"{session_id}.jsonl"

    def transcript_mark(self, session_id: str, cwd: str) -> int | None:
        """The transcript's length now (None: it does not exist yet), for :meth:`rewind`."""
        try:
            return self.transcript_path(session_id, cwd).stat().st_size
        except OSError:
            return None

    async def rewind(
        self, session_id: str, cwd: str, mark: int | None, *, new_session: bool
    ) -> bool:
        """Undo what a failed attempt added to a session, so that a retry of the same prompt
        reaches the model once: the CLI stores a prompt before calling the API and replays
        it on the next resume (measured), which would send it twice.

        The session's warm CLI (if any) holds the attempt in memory, so it is stopped first;
        the next attempt resumes from the rewound file. Returns False if the transcript
        could not be found where it was expected, so a retry would not be safe.
        """
        await self._warm.forget(session_id)
        path = self.transcript_path(session_id, cwd)
        if mark is not None:
            try:
                os.truncate(path, mark)
            except FileNotFoundError:
                return False  # it existed before the attempt: something else removed it
            return True
        if path.exists():  # made by the failed attempt
            path.unlink()
            return True
        if not new_session:
            return False  # the CLI keeps it elsewhere: how long it was before is unknown
        # A new session's file did not exist before the attempt, wherever the CLI put it.
        for found in self._projects_dir.glob(f"*/{session_id}.jsonl"):
            found.unlink()
        return True

    # -- internals --------------------------------------------------------

    def _backend_for(self, opts: ClaudeOptions) -> TurnBackend:
        """Warm if ``opts.warm`` says so (else ``config.warm_default``) and warm_max > 0."""
        warm = opts.warm if opts.warm is not None else self.config.warm_default
        return self._warm if warm and self.config.warm_max > 0 else self._cold

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "CLAUDECODE"}
        env.update(self.config.extra_env)
        return env

    def _spec(self, model: str | None, opts: ClaudeOptions, cwd: str) -> ProcSpec | None:
        path = self._binary()
        if path is None:
            return None
        return ProcSpec(
            claude_bin=str(path),
            model=model or self.config.default_model,
            opts=opts,
            cwd=cwd,
            env=self._env(),
        )

    def _pool_spec(self) -> ProcSpec | None:
        """Flags of pool processes: what a SPAWN without model, cwd or tool options uses."""
        if self._closed:
            return None
        return self._spec(None, ClaudeOptions(), str(self.config.default_cwd))

    async def _stream(
        self,
        prompt: str,
        model: str | None,
        opts: ClaudeOptions,
        session_id: str,
        resume: bool,
        state: StreamState,
    ) -> AsyncGenerator[dict[str, Any], None]:
        backend = self._backend_for(opts)
        async with self.hold_session(session_id):
            cwd = await self._cwd_for(opts, session_id, resume)
            req, pids = self._request(prompt, model, opts, session_id, resume, cwd, backend.mode)
            with self._shutdown_is_cancel(pids):
                # Close the inner generator explicitly: leaving `async for` via
                # GeneratorExit would otherwise leave the CLI running until GC.
                async with aclosing(backend.stream(req, state)) as items:
                    async for item in items:
                        yield item

    def _session_for(self, opts: ClaudeOptions, model: str | None) -> tuple[str, bool]:
        if opts.session_id is not None:
            return opts.session_id, True
        if opts.new_session_id is not None:
            return opts.new_session_id, False
        return self.reserve_session(opts, model) or str(uuid.uuid4()), False

    async def _cwd_for(self, opts: ClaudeOptions, session_id: str, resume: bool) -> str:
        pinned = await self.sessions.cwd_of(session_id) if resume else None
        return self._settle_cwd(opts, session_id, pinned)

    def _settle_cwd(self, opts: ClaudeOptions, session_id: str, pinned: str | None) -> str:
        # Two stat calls on a local path: not worth a thread.
        asked = os.path.realpath(opts.cwd) if opts.cwd is not None else None
        if pinned is not None and asked is not None and asked != pinned:
            raise TurnRejected(
                ErrorCode.SESSION_NOT_FOUND,
                f"session {session_id} lives in {pinned}; resume is scoped to the directory "
                "a session began in",
                session_id=session_id,
                details={"session_cwd": pinned},
            )
        cwd = pinned or asked or os.path.realpath(self.config.default_cwd)
        if not os.path.isdir(cwd):
            raise TurnRejected(
                ErrorCode.INVALID_PARAMETERS, f"cwd {cwd} is not a directory", session_id=session_id
            )
        return cwd

    def _binary(self) -> Path | None:
        if self._bin is None:
            # Re-resolve so `npm ci` after daemon start is picked up.
            self._bin = locate_claude(self.config.claude_bin, self.config.project_root)
        return self._bin

    def _request(
        self,
        prompt: str,
        model: str | None,
        opts: ClaudeOptions,
        session_id: str,
        resume: bool,
        cwd: str,
        mode: Literal["cold", "warm"],
    ) -> tuple[TurnRequest, list[int]]:
        if self._closed:
            raise ClaudeCLIError(ErrorCode.CANCELLED, "engine is shut down", session_id=session_id)
        path = self._binary()
        if path is None:
            wanted = self.config.claude_bin or "claude"
            raise ClaudeCLIError(
                ErrorCode.CLAUDE_NOT_FOUND,
                f"Claude Code CLI not found ({wanted!r}). Install the pinned CLI with `npm ci` "
                f"in {self.config.project_root}, or pass --claude-bin / set KSI_CLAUDE_BIN.",
                session_id=session_id,
            )
        env = self._env()
        timeout = opts.timeout_s if opts.timeout_s is not None else self.config.default_timeout_s

        pids: list[int] = []

        def on_start(pid: int, argv: list[str]) -> None:
            pids.append(pid)
            self._running[pid] = session_id
            self._idle.clear()
            self.sessions.started(session_id, cwd)
            if opts.on_start is None:
                return
            info = StartInfo(pid=pid, session_id=session_id, mode=mode, argv=tuple(argv), cwd=cwd)
            try:
                opts.on_start(info)
            except Exception:
                # A faulty observer must not kill a paid turn.
                log.exception("claude.on_start_failed", pid=pid, session_id=session_id)

        req = TurnRequest(
            prompt=prompt,
            model=model or self.config.default_model,
            opts=opts,
            session_id=session_id,
            resume=resume,
            cwd=cwd,
            env=env,
            timeout_s=timeout,
            claude_bin=str(path),
            term_grace_s=self.config.term_grace_s,
            on_start=on_start,
        )
        return req, pids

    @contextmanager
    def _shutdown_is_cancel(self, pids: list[int]) -> Iterator[None]:
        """A turn killed by aclose() is CANCELLED, not a crash; also untrack its pids."""
        try:
            yield
        except ClaudeCLIError as exc:
            if self._closed and exc.code in (ErrorCode.CLI_CRASHED, ErrorCode.INVALID_OUTPUT):
                raise ClaudeCLIError(
                    ErrorCode.CANCELLED,
                    "engine shut down during the turn",
                    exit_code=exc.exit_code,
                    stderr_tail=exc.stderr_tail,
                    session_id=exc.session_id,
                    pid=exc.pid,
                ) from exc
            raise
        finally:
            for pid in pids:
                self._running.pop(pid, None)
            if not self._running:
                self._idle.set()
