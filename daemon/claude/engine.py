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
  (a :class:`~daemon.claude.sessions.SessionDirectory`: the daemon's SQLite records; in memory by
  default).
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
import os
import signal
import uuid
from collections.abc import AsyncGenerator, Iterator
from contextlib import AbstractAsyncContextManager, aclosing, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog

from daemon.claude import defaults
from daemon.claude.backends import ColdBackend, StreamState, TurnBackend, TurnRequest, TurnStream
from daemon.claude.child import killpg_quiet
from daemon.claude.errors import ClaudeCLIError, ErrorCode, TurnRejected
from daemon.claude.locate import claude_version, locate_claude
from daemon.claude.mcp_servers import McpConfigFiles
from daemon.claude.options import ClaudeOptions, StartInfo
from daemon.claude.results import TurnResult
from daemon.claude.sessions import RememberedCwds, SessionDirectory, SessionHolds
from daemon.claude.transcripts import Transcripts
from daemon.claude.warm import WarmBackend
from daemon.claude.warm_process import ProcSpec

log = structlog.get_logger("ksi.claude.engine")

# The engine a LiteLLM call in this context is for (see ClaudeCLIProvider.engine): set by a
# caller that owns an engine around its ``litellm.acompletion`` calls.
CURRENT_ENGINE: ContextVar[ClaudeEngine | None] = ContextVar("ksi_claude_engine", default=None)


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
    warm_max: int = field(default_factory=defaults.warm_max_for_memory)
    """Cap on warm session processes (LRU eviction); 0 disables warm mode. Default: what
    the machine's available memory holds (:func:`~daemon.claude.defaults.warm_max_for_memory`)."""
    warm_pool_size: int = defaults.WARM_POOL_SIZE
    warm_interrupt_wait_s: float = defaults.WARM_INTERRUPT_WAIT_S
    warm_close_grace_s: float = defaults.WARM_CLOSE_GRACE_S
    permissions: Literal["cli", "relay"] = "cli"
    """What turns that do not say use: pool processes are started with these flags."""
    mcp_dir: Path | None = None
    """Where the ``--mcp-config`` files of turns with ``mcp_servers`` go (default: a new
    private temporary directory; :mod:`daemon.claude.mcp_servers`)."""


class ClaudeEngine:
    """Runs turns; see the module docstring for the policies it enforces."""

    def __init__(self, config: EngineConfig, sessions: SessionDirectory | None = None) -> None:
        self.config = config
        self.sessions: SessionDirectory = sessions or RememberedCwds()
        self._bin: Path | None = locate_claude(config.claude_bin, config.project_root)
        self._version: str | None = None
        self._cold = ColdBackend()
        self._warm = WarmBackend(config, self._pool_spec)
        self._holds = SessionHolds()
        self._transcripts = Transcripts(self.cli_env())
        self._mcp_files = McpConfigFiles(config.mcp_dir)
        self._running: dict[int, str] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False

    # -- public API -------------------------------------------------------

    async def run_turn(
        self, prompt: str, *, model: str | None = None, opts: ClaudeOptions | None = None
    ) -> TurnResult:
        """Run one turn to its result; raise ClaudeCLIError on failure."""
        opts = self._resolved(opts or ClaudeOptions())
        session_id, resume = self._session_for(opts, model)
        backend = self._backend_for(opts)
        async with self.hold_session(session_id):
            cwd = await self._cwd_for(opts, session_id, resume)
            await self._cold_takes_over(backend, session_id)
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
        opts = self._resolved(opts)
        session_id, resume = self._session_for(opts, model)
        cwd = await self._cwd_for(opts, session_id, resume)
        ids = (session_id, None) if resume else (None, session_id)
        return opts.model_copy(update={"session_id": ids[0], "new_session_id": ids[1], "cwd": cwd})

    def hold_session(
        self, session_id: str, first: bool = False
    ) -> AbstractAsyncContextManager[None]:
        """Keep the session to this context: other turns of it wait until the block ends
        (``first``: ahead of the others waiting); turns run inside it (in this task, or
        tasks it starts) do not."""
        return self._holds.hold(session_id, first)

    def stream_turn(
        self, prompt: str, *, model: str | None = None, opts: ClaudeOptions | None = None
    ) -> TurnStream:
        """Start a stream-json turn; iterate the result, and always ``aclose()`` it."""
        opts = self._resolved(opts or ClaudeOptions())
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
            "active_sessions": self._holds.active,
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
        opts = self._resolved(opts)
        spec = self._spec(model, opts, opts.cwd or str(self.config.default_cwd))
        return None if spec is None else self._warm.take_pooled(spec)

    def warm_status(self) -> dict[str, Any]:
        """Counts for HEALTH_CHECK: warm sessions, pool readiness and the limits."""
        return self._warm.status()

    def warm_session(self, session_id: str) -> dict[str, Any] | None:
        """pid, rss_mb, idle_s, turns, started_at of the session's warm CLI, if it has one."""
        return self._warm.session_info(session_id)

    def release_warm(self, session_id: str, reason: str) -> bool:
        """End the session's idle warm CLI, if it has one (its next turn resumes cold)."""
        return self._warm.release(session_id, reason)

    def warm_processes(self) -> list[dict[str, Any]]:
        """Every live warm CLI (sessions and pool) with pid, RSS and idle time."""
        return self._warm.processes()

    # -- rewinding a failed attempt ---------------------------------------------------

    def transcript_mark(self, session_id: str, cwd: str) -> int | None:
        """The session's transcript length now (None: none yet), for :meth:`rewind`."""
        return self._transcripts.mark(session_id, cwd)

    async def rewind(
        self, session_id: str, cwd: str, mark: int | None, *, new_session: bool
    ) -> bool:
        """Undo what a failed attempt added to a session (see Transcripts.rewind), so that a
        retry of the same prompt reaches the model once. The session's warm CLI (if any)
        holds the attempt in memory, so it is stopped first; the next attempt resumes from
        the rewound file."""
        await self._warm.forget(session_id)
        return self._transcripts.rewind(session_id, cwd, mark, new_session=new_session)

    # -- internals --------------------------------------------------------

    async def _cold_takes_over(self, backend: TurnBackend, session_id: str) -> None:
        """A cold turn of a session a warm CLI serves (or was reserved for, when planning
        took a pooled CLI): that CLI would not know of this turn (it holds the conversation
        in memory), so it is stopped first and the session's next warm turn resumes from
        the file."""
        if backend is self._cold:
            await self._warm.forget(session_id)

    def _backend_for(self, opts: ClaudeOptions) -> TurnBackend:
        """Warm if ``opts.warm`` says so (else ``config.warm_default``) and warm_max > 0."""
        warm = opts.warm if opts.warm is not None else self.config.warm_default
        if opts.max_cost_usd is not None:
            # Measured (2.1.197): --max-budget-usd counts what the process spent, so in a
            # long-lived CLI it would count earlier turns too; a resumed cold CLI starts at 0.
            warm = False
        return self._warm if warm and self.config.warm_max > 0 else self._cold

    def cli_env(self) -> dict[str, str]:
        """The environment every CLI child gets."""
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
            env=self.cli_env(),
        )

    def _pool_spec(self) -> ProcSpec | None:
        """Flags of pool processes: what a SPAWN without model, cwd or tool options uses."""
        if self._closed:
            return None
        opts = ClaudeOptions(permissions=self.config.permissions)
        return self._spec(None, opts, str(self.config.default_cwd))

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
            await self._cold_takes_over(backend, session_id)
            req, pids = self._request(prompt, model, opts, session_id, resume, cwd, backend.mode)
            with self._shutdown_is_cancel(pids):
                # Close the inner generator explicitly: leaving `async for` via
                # GeneratorExit would otherwise leave the CLI running until GC.
                async with aclosing(backend.stream(req, state)) as items:
                    async for item in items:
                        yield item

    def _resolved(self, opts: ClaudeOptions) -> ClaudeOptions:
        """``opts`` with its ``mcp_servers`` in its ``--mcp-config`` file: before anything
        compares flags (a pool process has none of them)."""
        if not opts.mcp_servers:
            return opts
        path = self._mcp_files.config_for(opts.mcp_servers, opts.mcp_config)
        return opts.model_copy(update={"mcp_config": path})

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
        env = self.cli_env()
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
