"""The daemon's Claude engine, built from its Settings in this one place."""

from __future__ import annotations

import os

from daemon.claude.engine import ClaudeEngine, EngineConfig
from daemon.settings import Settings
from daemon.state.records import StateManager
from daemon.turns.orphans import child_env


class RecordedCwds:
    """Sessions' cwd pins as the daemon keeps them: in their SQLite records, which survive a
    restart. A session's record is written when its first turn ends, inside the session's
    hold (daemon/turns/scheduler.py), so no later turn of it can plan before it exists."""

    def __init__(self, state: StateManager) -> None:
        self._state = state

    async def cwd_of(self, session_id: str) -> str | None:
        record = await self._state.session(session_id)
        return record.cwd if record is not None else None

    def started(self, session_id: str, cwd: str) -> None:
        pass  # recorded with the turn's end (TurnRecorder.finished)


def build_engine(settings: Settings, state: StateManager) -> ClaudeEngine:
    # Marks every CLI (and its tool subprocesses) as this run's: see daemon/turns/orphans.py.
    extra_env = {**settings.claude_env, **child_env(settings.state_path)}
    retries = settings.cli_max_retries
    if retries is not None and "CLAUDE_CODE_MAX_RETRIES" not in os.environ:
        extra_env["CLAUDE_CODE_MAX_RETRIES"] = str(retries)
    warm_max = {} if settings.warm_max is None else {"warm_max": settings.warm_max}
    config = EngineConfig(
        claude_bin=settings.claude_bin,
        project_root=settings.project_root,
        default_cwd=settings.project_root,
        default_model=settings.default_model,
        default_timeout_s=settings.default_timeout_s,
        term_grace_s=settings.term_grace_s,
        extra_env=extra_env,
        warm_default=settings.warm_default,
        permissions=settings.permissions,
        warm_idle_s=settings.warm_idle_s,
        warm_pool_size=settings.pool_size,
        mcp_dir=settings.state_path / "mcp-servers",
        **warm_max,
    )
    return ClaudeEngine(config, RecordedCwds(state))
