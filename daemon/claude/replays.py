"""One CLI turn per request, however often LiteLLM asks: the provider's idempotency.

A LiteLLM Router (and so the proxy) retries a failed call twice by default and falls back
to other deployments; each attempt calls the provider again with the same request. For a
model API that is a cheap resend; here it re-runs a paid, non-idempotent turn and, with a
``session_id``, leaves the prompt in the session's history once per attempt. So the
provider keys each call (:func:`request_key`) and :class:`Replays` hands every later
attempt with the same key the first attempt's outcome: its result, or its error again.

``concurrent.futures.Future`` rather than asyncio's: the sync ``litellm.completion`` path
runs each call on its own event loop, and an attempt may wait on another loop's turn.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

from daemon.claude.results import TurnResult

_HEADERS = ("idempotency-key", "x-idempotency-key")


def request_key(kwargs: Mapping[str, Any]) -> str | None:
    """What identifies one request across its retries, from the provider's kwargs.

    A client's ``Idempotency-Key`` header (through the proxy) also covers the client's own
    resends; else, for a Router's call, ``litellm_trace_id``, which the Router keeps for all
    attempts of one call. A plain ``litellm.acompletion`` gets a new trace id per call, so
    it has no key and nothing is kept for it (the daemon's own calls are such). Scoped by
    the proxy's API key, so one client cannot name another's request.
    """
    params = kwargs.get("litellm_params") or {}
    request = params.get("proxy_server_request") or {}
    headers = request.get("headers") if isinstance(request, Mapping) else None
    metadata = params.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        metadata = {}
    key: str | None = None
    if isinstance(headers, Mapping):
        lowered = {str(k).lower(): v for k, v in headers.items()}
        key = next((f"h:{lowered[h]}" for h in _HEADERS if lowered.get(h)), None)
    if key is None and metadata.get("model_group") and params.get("litellm_trace_id"):
        key = f"t:{params['litellm_trace_id']}"
    if key is None:
        return None
    owner = metadata.get("user_api_key_hash")
    return f"{owner or ''}|{key}"


class Replays:
    """Outcomes of recent requests by key, kept ``ttl_s`` and at most ``size`` of them."""

    def __init__(self, ttl_s: float = 600.0, size: int = 512) -> None:
        self._ttl_s = ttl_s
        self._size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[float, Future[TurnResult]]] = OrderedDict()

    def claim(self, key: str | None) -> tuple[Future[TurnResult], bool]:
        """The future for ``key`` and whether this caller is its first (it runs the turn
        and must settle the future); a ``None`` key is always first."""
        future: Future[TurnResult] = Future()
        if key is None:
            return future, True
        now = time.monotonic()
        with self._lock:
            while self._entries:
                oldest_key, (at, _) = next(iter(self._entries.items()))
                if now - at < self._ttl_s and len(self._entries) < self._size:
                    break
                del self._entries[oldest_key]
            entry = self._entries.get(key)
            if entry is not None:
                return entry[1], False
            self._entries[key] = (now, future)
        return future, True

    def forget(self, key: str | None) -> None:
        """Drop a claim whose turn never started (the request was invalid)."""
        if key is not None:
            with self._lock:
                self._entries.pop(key, None)

    @staticmethod
    async def outcome(future: Future[TurnResult]) -> TurnResult:
        """The first attempt's result (or its error, raised)."""
        return await asyncio.shield(asyncio.wrap_future(future))
