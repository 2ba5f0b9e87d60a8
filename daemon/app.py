"""The daemon: start-up order, the signal/SHUTDOWN path, and teardown in reverse.

Start-up: pid-file lock -> state (SQLite) -> bus -> observers -> socket (accepting, so
HEALTH_CHECK answers at once) -> LiteLLM import and warm-up in the background (SPAWN
waits for it; nothing else does).

Shutdown (SIGTERM, SIGINT or SHUTDOWN take the same path): stop accepting -> let running
turns finish within ``shutdown_grace_s``, then cancel them (which kills their process
groups) -> stop warm CLI processes -> stop observers -> close connections -> close the
store -> remove the socket and pid file. A second signal skips the grace period.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fcntl
import os
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import structlog

from daemon import __version__, logs
from daemon.agents.mailbox import Mailboxes
from daemon.commands import build_registry
from daemon.commands.registry import Services
from daemon.errors import ErrorCode, Unavailable
from daemon.events.bus import EventBus
from daemon.events.observers import ObserverHost
from daemon.fsmodes import private_dir, socket_files
from daemon.handover import Takeover, start_successor, wait_for_lock
from daemon.mcp_face import McpFace
from daemon.protocol import iso_from_epoch
from daemon.server import Server
from daemon.settings import Settings
from daemon.state.db import STATE_LOCK, Store
from daemon.state.records import StateManager
from daemon.turns.orphans import end_orphans, find_orphans, owner_token
from daemon.turns.scheduler import TurnScheduler

log = structlog.get_logger("ksi.daemon")


class AlreadyRunning(RuntimeError):
    pass


class UnsafePidFile(RuntimeError):
    pass


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started_at = time.time()
        self.store = Store(
            settings.state_path / "ksi.sqlite3", queue_bytes=settings.store_queue_bytes
        )
        self.state = StateManager(self.store)
        self.bus = EventBus(self.store, history_size=settings.event_history)
        self.registry = build_registry()
        self.turns = TurnScheduler(settings, self.store, self.state, self.bus)
        self.mailboxes = Mailboxes(settings, self.store, self.state, self.bus)
        self.services = Services(
            settings=settings,
            store=self.store,
            state=self.state,
            bus=self.bus,
            turns=self.turns,
            registry=self.registry,
            health=self.health,
            request_shutdown=self.request_shutdown,
            agents=self.mailboxes,
            reload_observer=lambda name: self.observers.reload(name),
            reload_daemon=lambda: self.reload_daemon(),
        )
        self.mcp: McpFace | None = None
        if settings.mcp:
            self.mcp = McpFace(self.services, self.turns.origin_of)
            self.turns.mcp_config = self.mcp.config_for
        self.server = Server(self.services)
        self.observers = ObserverHost(self.services)
        self.stopping = False
        self._shutdown: asyncio.Event | None = None
        self._force = False
        self._pid_fd: int | None = None
        self._state_fd: int | None = None
        self.orphans_ended = 0
        # Set in a successor RELOAD_DAEMON started; set in the old daemon once it hands over.
        self.takeover = Takeover.from_env()
        self.handing_over = False

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self) -> int:
        self._shutdown = asyncio.Event()
        if self.takeover is not None:
            # Built: tell the old daemon to stop, then wait for it to let go of its locks.
            self.takeover.prepared()
            # Under systemd (NotifyAccess=all) this process is the service from now on.
            _notify_systemd(f"MAINPID={os.getpid()}")
            deadline = time.monotonic() + self.settings.shutdown_grace_s + 60
            await asyncio.to_thread(wait_for_lock, self._acquire_pidfile, deadline)
        else:
            self._acquire_pidfile()
        try:
            if self.takeover is not None:
                deadline = time.monotonic() + 30
                await asyncio.to_thread(wait_for_lock, self._lock_state, deadline)
            else:
                self._lock_state()
            await self.store.open()
            await self.state.load(idempotency_window_s=self.settings.idempotency_window_s)
            # Before any turn can run: CLIs of an earlier run that died under them would
            # otherwise run alongside new turns of the same sessions (daemon/turns/orphans.py).
            found = find_orphans(owner_token(self.settings.state_path), self.state.orphans)
            self.orphans_ended = await end_orphans(found, self.settings.term_grace_s)
            await self.bus.load()
            await self.turns.permissions.load()  # requests left pending: reported expired
            await self.turns.limits.load()
            await self.turns.idle.load(self.store)
            await self.turns.pauses.load()
            await self.mailboxes.load()
            # The daemon's long-lived tasks (observer loops, LiteLLM's loading, the CLI's
            # version probe) live in this group: none outlives the daemon's run, and each is
            # cancelled and awaited by its owner's stop during the teardown.
            async with _task_group() as tasks:
                await self.observers.start(tasks)
                self._install_signals()
                await self.server.start(
                    self.takeover.listening_socket() if self.takeover is not None else None
                )
                log.info(
                    "daemon.ready",
                    socket=str(self.server.path),
                    pid=os.getpid(),
                    version=__version__,
                    startup_ms=round((time.time() - self.started_at) * 1000, 1),
                )
                if self.mcp is not None:
                    self.mcp.start(tasks)
                self.turns.start(tasks)
                self.mailboxes.start(self.services, tasks)
                _notify_systemd(f"READY=1\nSTATUS=serving on {self.server.path}")
                await self._shutdown.wait()
                if not self.handing_over:  # else the service goes on, in the successor
                    _notify_systemd("STOPPING=1")
                await self._teardown()
        finally:
            self._release_pidfile()
        log.info("daemon.stopped")
        return 0

    def request_shutdown(self, reason: str) -> None:
        if self._shutdown is None:
            return
        if self._shutdown.is_set():
            self._force = True
            self.turns.force_stop()
            return
        log.info("daemon.shutting_down", reason=reason)
        self.stopping = True
        self.turns.accepting = False
        self._shutdown.set()

    async def _teardown(self) -> None:
        await self.server.stop_accepting()
        await self.mailboxes.stop()  # no new answering turns; running ones end below
        grace = 0.0 if self._force else self.settings.shutdown_grace_s
        await self.turns.shutdown(grace)
        if self.mcp is not None:  # after the turns: their last tool calls are answered
            await self.mcp.stop()
        await self.observers.stop()
        await self.server.close_all()
        await self.bus.close()
        await self.store.close()
        if not self.handing_over:  # else the successor listens on it
            with contextlib.suppress(FileNotFoundError):
                self.server.path.unlink()

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # a daemon run in a thread (tests): its owner stops it (request_shutdown)
        loop = asyncio.get_running_loop()
        # SIGHUP (the terminal that started the daemon went away, or an operator's hangup)
        # takes the same graceful path: Python's default would end the process on the spot,
        # leaving CLIs orphaned, sync clients without a reply and the socket behind.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.request_shutdown, signal.Signals(sig).name)

    # -- pid file ---------------------------------------------------------------------------

    def _acquire_pidfile(self) -> None:
        """Hold an exclusive lock on the pid file for the daemon's whole life.

        The lock, not the file's existence, says whether a daemon runs: a crashed daemon's
        lock is released by the kernel, so its leftovers are stale and safe to remove.
        """
        pid_path = self.settings.pid_path
        private_dir(pid_path.parent, socket_files(self.settings.socket_path))
        fd = _open_private(pid_path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if self.takeover is not None:
                os.close(fd)
                raise  # the old daemon still runs: wait_for_lock tries again
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            healthy = probe_health(self.settings.socket_path)
            state = "is running and healthy" if healthy else "holds the lock but does not answer"
            raise AlreadyRunning(
                f"another daemon (pid {other}) {state} on {self.settings.socket_path}"
            ) from None
        sock = self.settings.socket_path
        if self.takeover is None and (sock.exists() or sock.is_symlink()):
            log.warning("daemon.stale_socket_removed", socket=str(sock))
            sock.unlink()
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._pid_fd = fd

    def _lock_state(self) -> None:
        """One daemon per state directory, whatever its socket: two would each take the
        other's running turns for an earlier run's and settle (and end) them."""
        private_dir(self.settings.state_path, _state_files)
        fd = _open_private(self.settings.state_path / STATE_LOCK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if self.takeover is not None:
                raise  # the old daemon still runs: wait_for_lock tries again
            raise AlreadyRunning(
                f"another daemon uses the state directory {self.settings.state_path}"
            ) from None
        self._state_fd = fd

    def _release_pidfile(self) -> None:
        if self._state_fd is not None:
            os.close(self._state_fd)
            self._state_fd = None
        if self._pid_fd is None:
            return
        if not self.handing_over:  # else the successor waits to lock this very file
            with contextlib.suppress(FileNotFoundError):
                self.settings.pid_path.unlink()
        os.close(self._pid_fd)
        self._pid_fd = None

    # -- RELOAD_DAEMON ----------------------------------------------------------------------

    async def reload_daemon(self) -> int:
        """Start a successor and, once it is prepared, hand over to it (daemon/handover.py);
        the successor's pid. RELOAD_FAILED, with this daemon still serving, if it fails."""
        if threading.current_thread() is not threading.main_thread():
            raise Unavailable(
                "RELOAD_DAEMON needs the daemon to run as its own process",
                code=ErrorCode.RELOAD_FAILED,
            )
        if self.stopping or self.handing_over:
            raise Unavailable("the daemon is shutting down", code=ErrorCode.SHUTTING_DOWN)
        pid = await start_successor(self.server.listening_socket(), timeout_s=60)
        self.handing_over = True
        # Scheduled, not awaited: the reply is written before the shutdown starts closing.
        asyncio.get_running_loop().call_soon(self.request_shutdown, "RELOAD_DAEMON")
        return pid

    # -- health ---------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        storage = self.store.health()
        turns = self.turns.stats()
        bus_counts = self.bus.stats()
        return {
            "status": "shutting_down"
            if self.stopping
            else "healthy"
            if storage["writable"] and turns["claude"]["auth"]["status"] == "ok"
            else "degraded",
            "version": __version__,
            "pid": os.getpid(),
            "started_at": iso_from_epoch(self.started_at),
            "uptime_s": round(time.time() - self.started_at, 3),
            "socket": self.server.path_str,
            # Each part counts its own (the order is the one clients have always seen).
            "counts": {
                **self.server.stats(),
                "subscribers": bus_counts["subscribers"],
                **self.observers.stats(),
                **self.state.stats(),
                "processes_running": turns["running"],
                "processes_queued": turns["queued"],
                "events_published": bus_counts["events_published"],
                "last_seq": bus_counts["last_seq"],
            },
            "litellm": turns["litellm"],
            "claude": turns["claude"],
            "warm": turns["warm"],
            "permissions": self.turns.permissions.stats(),
            "mcp": self.mcp.status() if self.mcp is not None else {"status": "disabled"},
            "agents": self.mailboxes.stats(),
            "storage": storage,
            "orphans_ended": self.orphans_ended,
        }


def _notify_systemd(state: str) -> None:
    """Tell systemd (a ``Type=notify`` unit, deploy/systemd/) how the daemon is doing; it
    then starts dependants only once the socket answers. Nothing without ``NOTIFY_SOCKET``."""
    if os.environ.get("NOTIFY_SOCKET"):
        import sdnotify  # only under systemd

        sdnotify.SystemdNotifier().notify(state)


@contextlib.asynccontextmanager
async def _task_group() -> AsyncIterator[asyncio.TaskGroup]:
    """An asyncio.TaskGroup that lets a single error out as itself: the group's tasks catch
    their own, so what fails here is start-up or teardown, and callers (main, tests) look
    for that error, not for an ExceptionGroup around it."""
    try:
        async with asyncio.TaskGroup() as group:
            yield group
    except BaseExceptionGroup as errors:
        if len(errors.exceptions) == 1:
            raise errors.exceptions[0] from None
        raise


def _state_files(name: str) -> bool:
    return name.startswith("ksi.sqlite3") or name == STATE_LOCK


def _open_private(path: Path) -> int:
    """Open (or create) a lock or pid file without following a link planted in its place.

    In a shared directory another user could leave a symlink or hard link named like our
    pid file; a daemon (root, say) that followed it would truncate and overwrite the
    target. So: no symlinks (O_NOFOLLOW), a regular file, ours, with no other name.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePidFile(f"{path} is a symbolic link; refusing to use it") from None
        raise
    st = os.fstat(fd)
    problem = (
        "is not a regular file"
        if not stat.S_ISREG(st.st_mode)
        else f"belongs to uid {st.st_uid}"
        if st.st_uid != os.getuid()
        else "has other hard links"
        if st.st_nlink != 1
        else None
    )
    if problem is not None:
        os.close(fd)
        raise UnsafePidFile(f"{path} {problem}; refusing to use it")
    return fd


def probe_health(path: Path, timeout: float = 1.0) -> bool:
    """True if a daemon answers HEALTH_CHECK on ``path`` (blocking; used before start-up)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(b'{"command":"HEALTH_CHECK"}\n')
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        return bool(orjson.loads(data).get("status") == "success")
    except (OSError, ValueError):
        return False


def parse_args(argv: list[str] | None) -> Settings:
    return Settings(**flag_overrides(argv))


def flag_overrides(argv: list[str] | None) -> dict[str, Any]:
    """The settings given as command-line flags (they take precedence over KSI_* variables)."""
    ap = argparse.ArgumentParser(
        prog="daemon.py",
        description="KSI daemon: runs the Claude Code CLI for local programs over a Unix socket.",
    )
    ap.add_argument("--socket", help="socket path (env KSI_SOCKET)")
    ap.add_argument("--state-dir", help="SQLite state directory (env KSI_STATE_DIR)")
    ap.add_argument("--log-dir", help="JSONL turn logs (env KSI_LOG_DIR)")
    ap.add_argument(
        "--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="env KSI_LOG_LEVEL"
    )
    ap.add_argument("--log-format", choices=["auto", "json", "console"])
    ap.add_argument("--claude-bin", help="Claude CLI executable (env KSI_CLAUDE_BIN)")
    ap.add_argument("--default-model", help="model for SPAWN without one (env KSI_DEFAULT_MODEL)")
    ap.add_argument("--max-concurrency", type=int, help="concurrent CLI runs (default 4)")
    ap.add_argument(
        "--observer",
        action="append",
        dest="observers",
        help="observer plugin 'module:factory' (repeatable; env KSI_OBSERVERS)",
    )
    ap.add_argument(
        "--warm-default",
        action=argparse.BooleanOptionalAction,
        help="SPAWN uses a warm CLI process unless told otherwise",
    )
    ap.add_argument(
        "--warm-max",
        type=int,
        help="warm session CLIs at most, ~150 MiB each (default: what half the available "
        "memory holds, 1-16; 0 turns warm mode off)",
    )
    ap.add_argument(
        "--warm-pool-size",
        type=int,
        help="pre-warmed CLI processes to keep (default 1 when turns are warm by default)",
    )
    args = ap.parse_args(argv)
    return {k: v for k, v in vars(args).items() if v is not None}


def use_pidfd_child_watcher() -> bool:
    """Wait for CLI processes with a pidfd on the event loop instead of a thread per child.

    Python 3.11's default ThreadedChildWatcher starts a thread for every subprocess, whose
    waitpid wake-up then competes for the GIL; a pidfd is one more fd in the selector.
    Python 3.12+ makes this choice itself (and deprecates the watcher API), so only 3.11
    on a kernel with pidfd_open (Linux 5.3+) changes anything.
    """
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:  # an old kernel, or a sandbox that forbids the call
        return False
    asyncio.set_child_watcher(asyncio.PidfdChildWatcher())
    return True


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    logs.configure(settings.log_level, settings.log_format)
    use_pidfd_child_watcher()
    try:
        return asyncio.run(Daemon(settings).run())
    except (AlreadyRunning, UnsafePidFile) as exc:
        log.error(
            "daemon.already_running"
            if isinstance(exc, AlreadyRunning)
            else "daemon.unsafe_pid_file",
            error=str(exc),
        )
        print(f"error: {exc}", file=sys.stderr)
        return 1
