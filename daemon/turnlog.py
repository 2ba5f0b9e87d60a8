"""Per-session JSONL turn logs in ``claude_logs/``.

``<session_id>.jsonl`` gets, per turn, one ``human`` line when the turn starts (so a
prompt is on disk even if the daemon dies mid-turn) and one ``claude`` line (the CLI's
JSON plus a timestamp) or one ``error`` line when it ends. ``latest.jsonl`` is a relative
symlink to the newest session's file.

Each line is written with a single ``write`` on an ``O_APPEND`` descriptor, so lines stay
whole even when several writers append at once; turns of one session never overlap anyway.
Large lines are written from a worker thread so the event loop does not wait on the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

import orjson

from daemon.protocol import utc_now_iso

_INLINE_LIMIT = 64 * 1024  # smaller lines are cheaper to write than to hand to a thread


class TurnLog:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._latest: str | None = None

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

    async def _append(self, session_id: str, obj: dict[str, Any]) -> Path:
        path = self.path_for(session_id)
        data = orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)
        if len(data) <= _INLINE_LIMIT:
            _append_line(path, data)
        else:
            await asyncio.to_thread(_append_line, path, data)
        if self._latest != session_id:
            self._point_latest(path)
            self._latest = session_id
        return path

    def _point_latest(self, target: Path) -> None:
        link = self.dir / "latest.jsonl"
        tmp = self.dir / f".latest.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(target.name, tmp)  # relative: the directory can move
        os.replace(tmp, link)


def _append_line(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        view = memoryview(data)
        while view:  # a regular-file write is whole in practice; loop for the rare short one
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
