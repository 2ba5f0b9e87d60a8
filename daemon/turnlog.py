"""Per-session JSONL turn logs in ``claude_logs/``.

``<session_id>.jsonl`` gets, per turn, one ``human`` line when the turn starts (so a
prompt is on disk even if the daemon dies mid-turn) and one ``claude`` line (the CLI's
JSON plus a timestamp) or one ``error`` line when it ends. ``latest.jsonl`` is a relative
symlink to the newest session's file.

Each line is written with a single ``write`` on an ``O_APPEND`` descriptor, so lines stay
whole even when several writers append at once; turns of one session never overlap anyway.
Large lines are written from a worker thread so the event loop does not wait on the disk.

Cost matters here (it was the largest share of the daemon's own time per turn): recently
used sessions keep their descriptor open, and ``latest.jsonl`` is re-pointed at most every
``LATEST_DELAY_S``, always ending on the newest session.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import orjson

from daemon.protocol import utc_now_iso

_INLINE_LIMIT = 64 * 1024  # smaller lines are cheaper to write than to hand to a thread
OPEN_FILES = 64  # descriptors kept open, least recently used closed first
LATEST_DELAY_S = 0.05


class TurnLog:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._latest: str | None = None  # session latest.jsonl points at
        self._latest_wanted: str | None = None
        self._latest_timer: asyncio.TimerHandle | None = None

    def path_for(self, session_id: str) -> Path:
        return self.dir / f"{session_id}.jsonl"

    async def human(self, session_id: str, prompt: str, *, process_id: str,
                    agent_id: str | None, model: str | None) -> Path:
        return await self._append(session_id, {
            "type": "human", "timestamp": utc_now_iso(), "content": prompt,
            "process_id": process_id, "agent_id": agent_id, "model": model,
        })

    async def claude(self, session_id: str, raw: dict[str, Any], *, process_id: str) -> Path:
        line = dict(raw)
        line["type"] = "claude"  # the KSI convention: the CLI's JSON with its type replaced
        line["timestamp"] = utc_now_iso()
        line["process_id"] = process_id
        return await self._append(session_id, line)

    async def error(self, session_id: str, error: dict[str, Any], *, process_id: str) -> Path:
        return await self._append(session_id, {
            "type": "error", "timestamp": utc_now_iso(), "process_id": process_id,
            "error": error,
        })

    def close(self) -> None:
        """Close the descriptors and point ``latest.jsonl`` at the newest session now."""
        if self._latest_timer is not None:
            self._latest_timer.cancel()
        self._point_latest()
        while self._fds:
            os.close(self._fds.popitem()[1])

    async def _append(self, session_id: str, obj: dict[str, Any]) -> Path:
        data = orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)
        fd = self._fd(session_id)
        if len(data) <= _INLINE_LIMIT:
            _write_all(fd, data)
        else:
            await asyncio.to_thread(_write_all, fd, data)
        self._want_latest(session_id)
        return self.path_for(session_id)

    def _fd(self, session_id: str) -> int:
        fd = self._fds.get(session_id)
        if fd is not None:
            self._fds.move_to_end(session_id)
            return fd
        fd = os.open(self.path_for(session_id), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._fds[session_id] = fd
        if len(self._fds) > OPEN_FILES:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def _want_latest(self, session_id: str) -> None:
        self._latest_wanted = session_id
        if self._latest_wanted != self._latest and self._latest_timer is None:
            self._latest_timer = asyncio.get_running_loop().call_later(
                LATEST_DELAY_S, self._point_latest)

    def _point_latest(self) -> None:
        self._latest_timer = None
        wanted = self._latest_wanted
        if wanted is None or wanted == self._latest:
            return
        link = self.dir / "latest.jsonl"
        tmp = self.dir / f".latest.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(self.path_for(wanted).name, tmp)  # relative: the directory can move
        os.replace(tmp, link)
        self._latest = wanted


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:  # a regular-file write is whole in practice; loop for the rare short one
        view = view[os.write(fd, view):]
