"""Defaults of the engine's settings, written once: :class:`~daemon.claude.engine.EngineConfig`
(the provider's own engine) and :class:`~daemon.settings.Settings` (the daemon's) use these."""

from __future__ import annotations

TIMEOUT_S = 600.0  # a turn's wall-clock limit
TERM_GRACE_S = 3.0  # SIGTERM to SIGKILL of a CLI's process group
WARM_DEFAULT = False  # turns run on a long-lived CLI unless they say otherwise
WARM_IDLE_S = 600.0  # a warm CLI idle this long is stopped
WARM_MAX = 8  # warm session CLIs at most (LRU eviction); 0 turns warm mode off
WARM_POOL_SIZE = 0  # pre-warmed CLIs waiting for new sessions
WARM_INTERRUPT_WAIT_S = 2.0  # an interrupted warm turn's result, before its CLI is killed
WARM_CLOSE_GRACE_S = 2.0  # a warm CLI's exit after its stdin closes, before SIGTERM
