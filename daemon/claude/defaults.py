"""Defaults of the engine's settings, written once: :class:`~daemon.claude.engine.EngineConfig`
(the provider's own engine) and :class:`~daemon.settings.Settings` (the daemon's) use these."""

from __future__ import annotations

TIMEOUT_S = 600.0  # a turn's wall-clock limit
TERM_GRACE_S = 3.0  # SIGTERM to SIGKILL of a CLI's process group
WARM_DEFAULT = True  # turns run on a long-lived CLI unless they say otherwise
WARM_IDLE_S = 600.0  # a warm CLI idle this long is stopped
# Warm session CLIs at most (LRU eviction; 0 turns warm mode off), unless configured: as many
# as half the memory available at start holds, WARM_PROCESS_MIB each, within these bounds.
WARM_PROCESS_MIB = 150  # measured: one warm CLI's PSS after a few turns (bench W3)
WARM_MAX_AUTO_RANGE = (1, 16)
WARM_POOL_SIZE = 0  # pre-warmed CLIs waiting for new sessions (the daemon keeps 1: settings)
WARM_INTERRUPT_WAIT_S = 2.0  # an interrupted warm turn's result, before its CLI is killed
WARM_CLOSE_GRACE_S = 2.0  # a warm CLI's exit after its stdin closes, before SIGTERM


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def warm_max_for_memory(available: int | None = None) -> int:
    """How many warm session CLIs this machine can hold: half its available memory at
    ``WARM_PROCESS_MIB`` each, within ``WARM_MAX_AUTO_RANGE`` (the low end when unknown)."""
    low, high = WARM_MAX_AUTO_RANGE
    if available is None:
        available = available_memory_bytes()
    if available is None:
        return low
    return max(low, min(high, available // 2 // (WARM_PROCESS_MIB * 1024 * 1024)))
