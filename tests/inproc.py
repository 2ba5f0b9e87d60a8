"""The daemon inside the test process, its event loop in a thread, with DaemonProcess's face.

Most daemon tests need a daemon to talk to over its socket, not a daemon process. Starting
``python daemon.py`` costs a fresh interpreter and its imports every time (~2 s of CPU with
LiteLLM preloaded); in the test process those imports are paid once. The daemon is the
same code on the same socket protocol: :class:`daemon.app.Daemon` run by ``asyncio.run``
in a thread (it installs no signal handlers there) and stopped through
``request_shutdown``, the path SIGTERM takes.

Subprocess daemons (:class:`tests.helpers.DaemonProcess`) stay where the process is the
point: signals, the pid file, exit codes, crashes and restarts, stdout, memory. An
in-process daemon refuses what it cannot honestly do (``pid``, a signal other than SIGTERM)
instead of pretending.

Logs: each daemon's structlog lines go to its own file (``daemon.log`` in its base
directory), so ``stderr()`` and ``log_events()`` read what the subprocess's stderr would
hold. The route is a context variable set in the daemon's thread; asyncio copies it into
every task and ``to_thread`` call of that daemon. Log level and format are the process's
(INFO, JSON lines): tests of ``--log-level``/``--log-format`` use DaemonProcess.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import signal
import sys
import threading
from typing import IO, Any

import orjson
import structlog

from daemon.app import Daemon, flag_overrides
from daemon.settings import Settings
from tests.helpers import DaemonProcess, wait_for

_SINK: contextvars.ContextVar[IO[bytes] | None] = contextvars.ContextVar(
    "ksi_test_log_sink", default=None
)
_configured = False
_JSON_SETTINGS = ("claude_env",)  # KSI_* variables whose value is JSON


class _RoutedLogger:
    """structlog's BytesLogger, writing to the log of the daemon whose thread or task logs
    (the test's stderr for code outside any in-process daemon)."""

    def msg(self, message: bytes) -> None:
        sink = _SINK.get()
        out = sink if sink is not None else sys.stderr.buffer
        out.write(message + b"\n")
        out.flush()

    log = debug = info = warn = warning = error = critical = exception = fatal = failure = msg


def _configure_logging() -> None:
    """The daemon's JSON log format (daemon/logs.py), routed per daemon; once per process."""
    global _configured
    if _configured:
        return
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=lambda *_: _RoutedLogger(),
        cache_logger_on_first_use=False,
    )
    _configured = True


class InProcessDaemon(DaemonProcess):
    """A daemon run in this process; same paths, requests and log access as DaemonProcess."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # DaemonProcess's parameters
        super().__init__(*args, **kwargs)
        self.log_file = self.base / "daemon.log"
        self.daemon: Daemon | None = None
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._context: contextvars.Context | None = None  # the daemon thread's
        self._sink: IO[bytes] | None = None

    def settings(self) -> Settings:
        """What ``daemon.py`` would build from this environment and these flags: KSI_*
        variables become settings, every other override goes to the CLI's environment."""
        values: dict[str, Any] = {}
        cli_env: dict[str, str] = {}
        for key, value in self.env_overrides.items():
            if key.startswith("KSI_"):
                name = key[4:].lower()
                values[name] = orjson.loads(value) if name in _JSON_SETTINGS else value
            else:
                cli_env[key] = value
        values["claude_env"] = {**cli_env, **values.get("claude_env", {})}
        return Settings(**{**values, **flag_overrides(self.flags())})

    def start(self, timeout: float = 15.0) -> InProcessDaemon:
        _configure_logging()
        self.daemon = Daemon(self.settings())
        if self._sink is None:  # a restart keeps appending to the same log
            self._sink = open(self.log_file, "ab")  # noqa: SIM115 - closed in cleanup()
        self._thread = threading.Thread(target=self._run, name=f"daemon-{self.base.name}")
        self._thread.start()
        wait_for(self._healthy, timeout)
        return self

    def _run(self) -> None:
        _SINK.set(self._sink)
        try:
            self.exit_code = asyncio.run(self._main())
        except BaseException as exc:  # reported by _healthy() and stop()
            self.error = exc

    async def _main(self) -> int:
        assert self.daemon is not None
        self._loop = asyncio.get_running_loop()
        self._context = contextvars.copy_context()
        return await self.daemon.run()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def ended(self) -> str | None:
        if self._thread is not None and not self._thread.is_alive():
            return f"daemon ended ({self.exit_code}, {self.error!r})"
        return None

    @property
    def pid(self) -> int:
        # Not os.getpid(): a test that signals or kills "the daemon" would hit pytest.
        raise AttributeError("an in-process daemon has no pid of its own: use DaemonProcess")

    @property
    def serving_pid(self) -> int:
        return os.getpid()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Graceful stop (SIGTERM's path); returns the exit code."""
        if sig != signal.SIGTERM:
            raise ValueError("an in-process daemon can only be stopped gracefully")
        if self._thread is None:
            return 0
        if self._thread.is_alive():
            assert self._loop is not None
            assert self.daemon is not None
            # In the daemon's context, so that what it logs goes to its log.
            self._loop.call_soon_threadsafe(
                self.daemon.request_shutdown, "SIGTERM", context=self._context
            )
        return self.wait(timeout)

    def wait(self, timeout: float) -> int:
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"in-process daemon still running after {timeout}s")
        if self.error is not None:
            raise self.error
        assert self.exit_code is not None
        return self.exit_code

    def stderr(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def cleanup(self) -> None:
        try:
            if self.running:
                self.stop()
        finally:
            if self._sink is not None:
                self._sink.close()
                self._sink = None
            super().cleanup()
