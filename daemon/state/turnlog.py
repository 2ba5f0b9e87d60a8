"""Per-session JSONL turn logs in ``claude_logs/``.

``<session_id>.jsonl`` gets, per turn, one ``human`` line when the turn starts (so a
prompt is on disk even if the daemon dies mid-turn) and one ``claude`` line (the CLI's
JSON plus a timestamp) or one ``error`` line when it ends. ``latest.jsonl`` is a relative
symlink to the newest session's file.

Each line is written with a single ``write`` on an ``O_APPEND`` descriptor, so lines stay
whole even when several writers append at once; turns of one session never overlap anyway.
A line is on disk whole or not at all: if the disk fills mid-line, the part written is cut
off again (``ftruncate``) and the write fails, so the file still ends on a whole line and the
next line is not glued to a fragment.

The directory is 0700 and every log 0600 (created so; an older 0644 log is fixed when it is
next opened). A log deleted while its descriptor is cached must not pin its space or swallow
later lines: a cached descriptor whose file has no link left is reopened (one ``fstat`` per
line, ~0.3 µs), a disk-full error first closes every cached deleted log and retries once,
and a descriptor idle for ``IDLE_CLOSE_S`` is closed.

All file work happens on one writer thread (a single-worker executor: FIFO, so a session's
lines stay in order) because creating a file costs ~0.7 ms on this project's test VMs and
it is the first thing every new session does. The turn scheduler queues the ``human`` line without
waiting (it is written while the CLI starts) and awaits the ``claude``/``error`` line, so a
SPAWN reply still means the whole turn is on disk. Recently used sessions keep their
descriptor open, and ``latest.jsonl`` is re-pointed at most every ``LATEST_DELAY_S``,
always ending on the newest session.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import structlog

from daemon.fsmodes import private_dir
from daemon.protocol import utc_now_iso

log = structlog.get_logger("ksi.turnlog")

OPEN_FILES = 64  # descriptors kept open, least recently used closed first
LATEST_DELAY_S = 0.05
# A descriptor unused this long is closed. Reopening an existing log is cheap (creating one
# is what costs); the two lines of a turn are usually well within it.
IDLE_CLOSE_S = 60.0
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class TurnLog:
    """Appends turn lines; every method returns a future that is done once the line is on
    disk (await it, or leave it: failures are logged either way)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        private_dir(self.dir, lambda name: name.endswith(".jsonl") or name.startswith(".latest."))
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ksi-turnlog")
        # session -> (descriptor, last use on the monotonic clock), least recently used first
        self._fds: OrderedDict[str, tuple[int, float]] = OrderedDict()  # writer thread only
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._latest: str | None = None  # session latest.jsonl points at (writer thread only)
        self._latest_wanted: str | None = None
        self._latest_timer: asyncio.TimerHandle | None = None

    def path_for(self, session_id: str) -> Path:
        return self.dir / f"{session_id}.jsonl"

    def human(
        self,
        session_id: str,
        prompt: str,
        *,
        process_id: str,
        agent_id: str | None,
        model: str | None,
    ) -> asyncio.Future[Path]:
        return self._append(
            session_id,
            {
                "type": "human",
                "timestamp": utc_now_iso(),
                "content": prompt,
                "process_id": process_id,
                "agent_id": agent_id,
                "model": model,
            },
        )

    def claude(
        self, session_id: str, raw: dict[str, Any], *, process_id: str
    ) -> asyncio.Future[Path]:
        line = dict(raw)
        line["type"] = "claude"  # the KSI convention: the CLI's JSON with its type replaced
        line["timestamp"] = utc_now_iso()
        line["process_id"] = process_id
        return self._append(session_id, line)

    def error(
        self, session_id: str, error: dict[str, Any], *, process_id: str
    ) -> asyncio.Future[Path]:
        return self._append(
            session_id,
            {
                "type": "error",
                "timestamp": utc_now_iso(),
                "process_id": process_id,
                "error": error,
            },
        )

    def close(self) -> None:
        """Finish queued lines, point ``latest.jsonl`` at the newest session, release the
        descriptors (blocks until the writer is done)."""
        self._closed = True
        for timer in (self._latest_timer, self._sweep_timer):
            if timer is not None:
                timer.cancel()
        self._latest_timer = self._sweep_timer = None
        self._writer.submit(self._close_files, self._latest_wanted)
        self._writer.shutdown(wait=True)

    # -- loop side ------------------------------------------------------------------------

    def _append(self, session_id: str, obj: dict[str, Any]) -> asyncio.Future[Path]:
        data = orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._writer, self._write_line, session_id, data)
        fut.add_done_callback(_log_failure)
        self._want_latest(session_id)
        if self._sweep_timer is None:
            self._sweep_timer = loop.call_later(IDLE_CLOSE_S, self._sweep_due)
        return fut

    def _want_latest(self, session_id: str) -> None:
        self._latest_wanted = session_id
        if self._latest_timer is None:
            self._latest_timer = asyncio.get_running_loop().call_later(
                LATEST_DELAY_S, self._latest_due
            )

    def _latest_due(self) -> None:
        self._latest_timer = None
        fut = asyncio.get_running_loop().run_in_executor(
            self._writer, self._point_latest, self._latest_wanted
        )
        fut.add_done_callback(_log_failure)

    def _sweep_due(self) -> None:
        self._sweep_timer = None
        if self._closed:
            return
        fut = asyncio.get_running_loop().run_in_executor(
            self._writer, self._close_idle, time.monotonic() - IDLE_CLOSE_S
        )
        fut.add_done_callback(self._swept)

    def _swept(self, fut: asyncio.Future[bool]) -> None:
        _log_failure(fut)
        # Look again while descriptors stay open; an idle daemon then holds none.
        if (
            not fut.cancelled()
            and fut.exception() is None
            and fut.result()
            and not self._closed
            and self._sweep_timer is None
        ):
            self._sweep_timer = asyncio.get_running_loop().call_later(IDLE_CLOSE_S, self._sweep_due)

    # -- writer thread ----------------------------------------------------------------------

    def _write_line(self, session_id: str, data: bytes) -> Path:
        try:
            _write_whole(self._fd(session_id), data)
        except OSError as exc:
            if exc.errno not in _DISK_FULL or not self._close_deleted():
                raise
            # Deleted logs we still held were pinning their space, now freed: once more.
            _write_whole(self._fd(session_id), data)
        return self.path_for(session_id)

    def _fd(self, session_id: str) -> int:
        now = time.monotonic()
        entry = self._fds.get(session_id)
        if entry is not None:
            fd = entry[0]
            if os.fstat(fd).st_nlink:
                self._fds[session_id] = (fd, now)
                self._fds.move_to_end(session_id)
                return fd
            # Deleted under us: writing on would lose the line into an unlinked inode.
            del self._fds[session_id]
            os.close(fd)
        fd = os.open(self.path_for(session_id), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_mode & 0o077:  # made by an older release
                os.fchmod(fd, 0o600)
        except OSError:
            os.close(fd)
            raise
        self._fds[session_id] = (fd, now)
        if len(self._fds) > OPEN_FILES:
            os.close(self._fds.popitem(last=False)[1][0])
        return fd

    def _close_deleted(self) -> bool:
        """Close cached descriptors of deleted logs; True if there were any."""
        gone = [sid for sid, (fd, _) in self._fds.items() if not os.fstat(fd).st_nlink]
        for sid in gone:
            os.close(self._fds.pop(sid)[0])
        return bool(gone)

    def _close_idle(self, cutoff: float) -> bool:
        """Close descriptors last used before ``cutoff``; True if some stay open."""
        while self._fds:
            sid, (fd, used) = next(iter(self._fds.items()))
            if used > cutoff:
                break
            del self._fds[sid]
            os.close(fd)
        return bool(self._fds)

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
                os.close(self._fds.popitem()[1][0])


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and (exc := fut.exception()) is not None:
        log.error("turnlog.write_failed", error=repr(exc))


def _write_whole(fd: int, data: bytes) -> None:
    """Append ``data`` whole, or raise and leave the file as it was."""
    view = memoryview(data)
    written = 0
    try:
        while written < len(data):  # a short write is rare: the disk filled mid-line
            n = os.write(fd, view[written:])
            if n == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written += n
    except OSError:
        if written:
            # O_APPEND put our bytes at the end, and the offset is just past them.
            os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_CUR) - written)
        raise
