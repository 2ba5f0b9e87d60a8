"""When a failed turn attempt is tried again, and how long every turn then holds off.

Only a transient API failure (429, 5xx, 529 overloaded, a lost connection) of an attempt
that did no paid work is retried: a rerun of paid work would be paid for twice.
"""

from __future__ import annotations

import asyncio
import random
import re
import time

from daemon.errors import ErrorCode, TurnFailed
from daemon.settings import Settings

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
_RETRYABLE = frozenset({ErrorCode.RATE_LIMITED, ErrorCode.API_ERROR})
_RETRY_AFTER = re.compile(r"retry[- _]after\W{0,3}(\d+(?:\.\d+)?)", re.IGNORECASE)
_MAX_RETRY_AFTER_S = 60.0  # beyond this the CLI itself gives up; so do we


def slows_everyone(error: TurnFailed) -> bool:
    """Rate limited or overloaded: every turn, not just this one, should back off."""
    if error.code is ErrorCode.RATE_LIMITED:
        return True
    details = error.details or {}
    return details.get("api_error_status") == 529 or "overloaded" in error.message.lower()


def retry_delay(error: TurnFailed, attempt: int, settings: Settings) -> float | None:
    """Seconds to wait before retrying after ``error`` (attempt 0 = the first retry), or
    None if it must not be retried: not transient, retries used up, or the failed attempt
    did paid work (cost or output), which a rerun would pay for again."""
    if attempt >= settings.api_retries or error.code not in _RETRYABLE:
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


class Backoff:
    """While the API rate-limits or is overloaded, no turn calls it before the backoff ends:
    a queue of turns does not hammer it."""

    def __init__(self) -> None:
        self._until = 0.0  # monotonic

    def hold(self, delay_s: float) -> None:
        self._until = max(self._until, time.monotonic() + delay_s)

    async def wait(self) -> None:
        wait = self._until - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
