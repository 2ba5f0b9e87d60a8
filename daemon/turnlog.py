"""Per-session JSONL turn logs in ``claude_logs/``.

``<session_id>.jsonl`` gets, per turn, one ``human`` line when the turn starts (so a
prompt is on disk even if the daemon dies mid-turn) and one ``claude`` line (the CLI's
JSON plus a timestamp) or one ``error`` line when it ends. ``latest.jsonl`` is a relative
symlink to the newest session's file.

Each line is written with a single ``write`` on an ``O_APPEND`` descriptor, so lines stay
whole even when several writers append at once; turns of one session never overlap anyway.

All file work happens on one writer thread (a single-worker executor: FIFO, so a session's
lines stay in order) because creating a file costs ~0.7 ms on this project's test VMs and
it is the first thing every new session does. The spawner queues the ``human`` line without
waiting (it is written while the CLI starts) and awaits the ``claude``/``error`` line, so a
SPAWN reply still means the whole turn is on disk. Recently used sessions keep their
descriptor open, and ``latest.jsonl`` is re-pointed at most every ``LATEST_DELAY_S``,
always ending on the newest session.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import structlog

from daemon.protocol import utc_now_iso

log = structlog.get_logger("ksi.turnlog")

OPEN_FILES = 64  # descriptors kept open, least recently used closed first
LATEST_DELAY_S = 0.05


class TurnLog:
    """Appends turn lines; every method returns a future that is done once the line is on
    disk (await it, or leave it: failures are logged either way)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ksi-turnlog")
        self._fds: OrderedDict[str, int] = OrderedDict()  # writer thread only
        self._latest: str | None = None  # session latest.jsonl points at (writer thread only)
        self._latest_wanted: str | None = None
        self._latest_timer: asyncio.TimerHandle | None = None

    def path_for(self, session_id: str) -> Path:
        return self.dir / f"{session_id}.jsonl"

    def human(self, session_id: str, prompt: str, *, process_id: str,
              agent_id: str | None, model: str | None) -> asyncio.Future[Path]:
        return self._append(session_id, {
            "type": "human", "timestamp": utc_now_iso(), "content": prompt,
            "process_id": process_id, "agent_id": agent_id, "model": model,
        })

    def claude(self, session_id: str, raw: dict[str, Any], *, process_id: str
               ) -> asyncio.Future[Path]:
        line = dict(raw)
        line["type"] = "claude"  # the KSI convention: the CLI's JSON with its type replaced
        line["timestamp"] = utc_now_iso()
        line["process_id"] = process_id
        return self._append(session_id, line)

    def error(self, session_id: str, error: dict[str, Any], *, process_id: str
              ) -> asyncio.Future[Path]:
        return self._append(session_id, {
            "type": "error", "timestamp": utc_now_iso(), "process_id": process_id,
            "error": error,
        })

    def close(self) -> None:
        """Finish queued lines, point ``latest.jsonl`` at the newest session, release the
        descriptors (blocks until the writer is done)."""
        if self._latest_timer is not None:
            self._latest_timer.cancel()
            self._latest_timer = None
        self._writer.submit(self._close_files, self._latest_wanted)
        self._writer.shutdown(wait=True)

    # -- loop side ------------------------------------------------------------------------

    def _append(self, session_id: str, obj: dict[str, Any]) -> asyncio.Future[Path]:
        data = orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._writer, self._write_line, session_id, data)
        fut.add_done_callback(_log_failure)
        self._want_latest(session_id)
        return fut

    def _want_latest(self, session_id: str) -> None:
        self._latest_wanted = session_id
        if self._latest_timer is None:
            self._latest_timer = asyncio.get_running_loop().call_later(
                LATEST_DELAY_S, self._latest_due)

    def _latest_due(self) -> None:
        self._latest_timer = None
        fut = asyncio.get_running_loop().run_in_executor(
            self._writer, self._point_latest, self._latest_wanted)
        fut.add_done_callback(_log_failure)

    # -- writer thread ----------------------------------------------------------------------

    def _write_line(self, session_id: str, data: bytes) -> Path:
        _write_all(self._fd(session_id), data)
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

    def _point_latest(self, wanted: str | None) -> None:
        if wanted is None or wanted == self._latest:
            return
        link = self.dir / "latest.jsonl"
        tmp = self.dir / f".latest.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(self.path_for(wanted).name, tmp)  # relative: the directory can move
        os.replace(tmp, link)
        self._latest = wanted

    def _close_files(self, wanted: str | None) -> None:
        try:
            self._point_latest(wanted)
        finally:
            while self._fds:
                os.close(self._fds.popitem()[1])


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and (exc := fut.exception()) is not None:
        log.error("turnlog.write_failed", error=repr(exc))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:  # a regular-file write is whole in practice; loop for the rare short one
        view = view[os.write(fd, view):]
