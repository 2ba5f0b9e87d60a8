"""LiteLLM and our provider, loaded once in the background.

LiteLLM takes ~2 s of CPU to import, so it is loaded in a worker thread after the socket is
up; a SPAWN that arrives earlier waits for it, every other command is served at once.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from daemon.claude.engine import ClaudeEngine
from daemon.claude.policy import OPEN
from daemon.errors import ErrorCode, Unavailable
from daemon.settings import Settings

log = structlog.get_logger("ksi.turns")

Acompletion = Callable[..., Awaitable[Any]]


class ProviderLoader:
    def __init__(self, settings: Settings, engine: ClaudeEngine) -> None:
        self._settings = settings
        self._engine = engine
        self._ready = asyncio.Event()
        self._error: str | None = None
        self._acompletion: Acompletion | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self.task: asyncio.Task[None] | None = None

    def start(self, tasks: asyncio.TaskGroup) -> None:
        """Loading, once asked for, runs in ``tasks`` (the daemon's group)."""
        self._tasks = tasks

    def ensure_loading(self) -> None:
        if self.task is None:
            assert self._tasks is not None, "start() first"
            self.task = self._tasks.create_task(self._load(), name="ksi-load-litellm")

    async def acompletion(self) -> Acompletion:
        """``litellm.acompletion`` once loaded; Unavailable (NOT_READY) if it cannot be."""
        self.ensure_loading()
        await self._ready.wait()
        if self._acompletion is None:
            raise Unavailable(
                f"LiteLLM could not be loaded: {self._error}", code=ErrorCode.NOT_READY
            )
        return self._acompletion

    def status(self) -> dict[str, Any]:
        if self._error:
            return {"status": "failed", "error": self._error}
        if self.task is None:
            return {"status": "not_loaded", "hint": "loads at the first SPAWN"}
        return {"status": "ready" if self._ready.is_set() else "loading"}

    async def _load(self) -> None:
        started = time.perf_counter()
        try:
            root = str(self._settings.project_root)
            if root not in sys.path:
                sys.path.insert(0, root)
            # The import is ~2 s of CPU; a thread keeps the socket answering meanwhile.
            mod = await asyncio.to_thread(importlib.import_module, "claude_cli_provider")
            mod.quiet_litellm()
            # The daemon validates SPAWN itself; a provider policy is for LiteLLM's own users.
            provider = mod.ClaudeCLIProvider(self._engine, policy=OPEN)
            mod.register(provider)
            if self._settings.warm_up_litellm:
                # Not cancelled half-way (a shutdown during start-up): LiteLLM builds the
                # provider's coroutine in an executor thread, and a cancel that lands
                # there leaves it never awaited. The warm-up takes ~150 ms.
                warm = asyncio.ensure_future(mod.warm_up(provider))
                try:
                    await asyncio.shield(warm)
                except asyncio.CancelledError:
                    await asyncio.wait([warm])
                    raise
            import litellm

            self._acompletion = litellm.acompletion
            log.info("litellm.ready", ms=round((time.perf_counter() - started) * 1000, 1))
        except Exception as exc:
            self._error = f"{type(exc).__name__}: {exc}"
            log.exception("litellm.load_failed")
        finally:
            self._ready.set()
