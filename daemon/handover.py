"""RELOAD_DAEMON: a new daemon process takes over from the running one without a moment in
which the socket refuses a client.

1. The running daemon starts its successor (the same interpreter and command line) and
   hands it, as inherited descriptors, a duplicate of its listening socket and the write
   end of a pipe.
2. The successor builds everything it can without the state (settings, commands, LiteLLM's
   module): if that fails it exits and the old daemon, which has not stopped anything,
   answers RELOAD_FAILED and keeps serving. Once built it writes ``prepared`` on the pipe.
3. The old daemon answers the RELOAD_DAEMON and shuts down gracefully: it stops accepting
   (clients that connect now wait in the socket's backlog, which the successor holds too),
   lets running turns finish within ``shutdown_grace_s``, keeps queued async turns for the
   next run, and releases its locks, leaving the socket path and the pid file in place.
4. The successor waits for those locks, opens the state, and accepts on the inherited
   socket: the backlog's clients are served by the new code.

What is handed over is what a restart keeps (SQLite: sessions, agents, shared state,
queued turns, kept messages); live connections are closed by the old daemon, so persistent
clients reconnect (``SUBSCRIBE`` with ``since_seq`` loses no event).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from daemon.errors import DaemonError, ErrorCode, Unavailable

log = structlog.get_logger("ksi.handover")

_FD = "KSI_TAKEOVER_FD"
_PIPE = "KSI_TAKEOVER_PIPE"
PREPARED = b"prepared\n"


@dataclass(frozen=True, slots=True)
class Takeover:
    """What a successor was handed: the listening socket and the pipe to say it is ready."""

    listen_fd: int
    pipe_fd: int

    @classmethod
    def from_env(cls) -> Takeover | None:
        fd, pipe = os.environ.pop(_FD, None), os.environ.pop(_PIPE, None)
        if fd is None or pipe is None:
            return None
        return cls(int(fd), int(pipe))

    def listening_socket(self) -> socket.socket:
        return socket.socket(fileno=self.listen_fd)

    def prepared(self) -> None:
        """Tell the old daemon to stop: everything that could fail without the state did
        not."""
        try:
            os.write(self.pipe_fd, PREPARED)
        finally:
            os.close(self.pipe_fd)


async def start_successor(listener: socket.socket, timeout_s: float) -> int:
    """Start the new daemon and wait until it is prepared; its pid. On failure it is
    ended (by pid) and RELOAD_FAILED raised: nothing of this daemon has changed."""
    if not sys.orig_argv:
        raise Unavailable("the daemon's command line is unknown", code=ErrorCode.RELOAD_FAILED)
    listen_fd = os.dup(listener.fileno())
    read_fd, write_fd = os.pipe()
    env = {**os.environ, _FD: str(listen_fd), _PIPE: str(write_fd)}
    try:
        # Not asyncio's subprocess: its transport kills the child when this daemon's loop
        # closes, and the successor must outlive it. The fork and exec take a moment.
        proc = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, *sys.orig_argv[1:]],
            env=env,
            pass_fds=(listen_fd, write_fd),
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # not in this daemon's group either
        )
    finally:
        os.close(listen_fd)
        os.close(write_fd)
    try:
        said = await asyncio.wait_for(asyncio.to_thread(_read_line, read_fd), timeout_s)
    except TimeoutError:
        said = b""
    finally:
        os.close(read_fd)
    if said == PREPARED:
        log.info("handover.successor_prepared", pid=proc.pid)
        return proc.pid
    exited = True
    try:  # a successor that closed the pipe is exiting: its status is a moment away
        await asyncio.to_thread(proc.wait, 2)
    except subprocess.TimeoutExpired:
        exited = False
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        await asyncio.to_thread(proc.wait)
    code = proc.returncode
    raise DaemonError(
        "the new daemon did not start"
        + (f" (it exited with {code}; see its log)" if exited else " in time")
        + "; this one keeps serving",
        code=ErrorCode.RELOAD_FAILED,
        details={"exit_code": code},
    )


def _read_line(fd: int) -> bytes:
    out = b""
    while not out.endswith(b"\n"):
        chunk = os.read(fd, 64)
        if not chunk:  # the successor closed the pipe (exited) without a word
            break
        out += chunk
    return out


def wait_for_lock(take: Callable[[], None], deadline: float) -> None:
    """Retry ``take`` (opens and locks a file, raising BlockingIOError while the old daemon
    holds the lock) until it succeeds or ``deadline`` (monotonic) passes. Blocking: run it
    in a thread."""
    while True:
        try:
            take()
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
