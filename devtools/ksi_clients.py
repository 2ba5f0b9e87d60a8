"""KSI's own client code against this daemon: ``python -m devtools.ksi_clients --ksi /tmp/ksi``.

A scenario runner, not a test: pytest never collects it and nothing imports it. It imports the
original KSI client code, unmodified, from ``--ksi`` (``daemon/client/``, ``daemon_client.py``,
``chat.py``, ``tests/test_migrated_commands.py``) and drives it the way a KSI user would: every
public method of ``SyncClient``, ``AsyncClient``, ``PersistentAsyncClient``, ``DaemonClient`` and
``PersistentDaemonClient``, the persistent clients' handlers for pushed events
(``DIRECT_MESSAGE``, ``BROADCAST``, ``PROCESS_COMPLETE``), ``chat.py``'s functions without a TTY,
and the suites of ``test_migrated_commands.py`` (its ``CommandTester`` holds no pytest tests and
hard-codes its socket, so its suites are called with ours and judged by what the file expects).

Each scenario checks what KSI's code takes for success and prints one line: PASS, or FAIL with
what the KSI code expects (``file:line`` in the KSI tree) against what the daemon replied. The
clients talk to the daemon through a recording relay socket, so a failure quotes the reply.

Without ``--socket`` it starts its own daemon on the fake CLI in a temp dir and stops it (SIGTERM
to its pid) at the end; the SHUTDOWN scenarios stop it, and it is started again after each.
With ``--socket`` those are skipped, and so is ``DaemonClient.reload_module``: the daemon it
starts loads an observer plugin of its own (``PLUGIN_SOURCE``, written to the temp dir) for KSI's
``reload_module`` to reload. The exit code is 0 whatever the scenarios find. A scenario marked
exempt checks what KSI's own daemon did not do either; it is reported, labelled as such.

Two things are arranged around KSI's code, not changed in it: KSI's ``daemon/__init__.py`` boots
KSI's server (psutil, pydantic, ...), so ``daemon.client`` is imported under a bare parent
package; and ``chat.start_daemon`` is replaced by a recorder, so ``chat.py`` never launches
``nohup python3 daemon.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import inspect
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FAKE_CLAUDE = ROOT / "devtools" / "fake-claude"
KSI_LOGGERS = ("daemon", "daemon_client", "ksi_test_migrated_commands")
# What a KSI agent subscribes to (daemon/agent_process.py, _subscribe_to_events).
AGENT_EVENTS = ["DIRECT_MESSAGE", "BROADCAST", "TASK_ASSIGNMENT", "CONVERSATION_INVITE"]
AGENT_EVENTS.append("PROCESS_COMPLETE")
# The observer plugin the daemon under test loads, for KSI's DaemonClient.reload_module to
# reload: each PING event makes it store its module's VERSION in shared state.
PLUGIN_MODULE = "ksi_harness_plugin"
PLUGIN_SPEC = f"{PLUGIN_MODULE}:Plugin"
PLUGIN_PING = "KSI_HARNESS_PING"
PLUGIN_KEY = "ksi_harness.plugin"
PLUGIN_SOURCE = """\
VERSION = {version}


class Plugin:
    event_types = ["{ping}"]

    def __init__(self, api):
        self.api = api

    async def on_event(self, event):
        value = {{"version": VERSION, "marker": event["data"].get("marker")}}
        await self.api.call("SET_SHARED", {{"key": "{key}", "value": value}})
"""


# ---------------------------------------------------------------------------------------------
# Small helpers


def shrink(value: Any, depth: int = 0) -> Any:
    """A reply cut down for a one-line report: long strings, lists and dicts abbreviated."""
    if isinstance(value, dict):
        if depth >= 3:
            return "{…}"
        keys = [k for k in value if k not in ("raw", "usage")]
        out = {k: shrink(value[k], depth + 1) for k in keys[:12]}
        if len(keys) > 12:
            out["…"] = f"+{len(keys) - 12} keys"
        return out
    if isinstance(value, list):
        items = [shrink(v, depth + 1) for v in value[:3]]
        return [*items, f"…+{len(value) - 3}"] if len(value) > 3 else items
    if isinstance(value, str) and len(value) > 90:
        return value[:87] + "…"
    return value


def abbrev(value: Any, limit: int = 420) -> str:
    text = json.dumps(shrink(value), ensure_ascii=False, separators=(",", ":"), default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def call(
    sock: Path, command: str, params: dict[str, Any] | None = None, timeout: float = 10.0
) -> dict[str, Any]:
    """One command on a fresh connection straight to the daemon (set-up, not a scenario)."""
    line = json.dumps({"command": command, "parameters": params or {}}) + "\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock))
        s.sendall(line.encode())
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            buf += chunk
    reply: dict[str, Any] = json.loads(buf.split(b"\n", 1)[0])
    return reply


class Failure(Exception):
    """A scenario's verdict: what KSI's code expected, what it got; ``kinds`` group causes."""

    def __init__(self, text: str, *kinds: str) -> None:
        super().__init__(text)
        self.text = text
        self.kinds = [k for k in kinds if k] or ["other"]


class LogTap(logging.Handler):
    """Keeps what KSI's modules log (their errors often name the cause)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a KSI format string that does not match its arguments
            message = str(record.msg)
        self.records.append(f"{record.levelname} {record.name}: {message}")


# ---------------------------------------------------------------------------------------------
# The recording relay between KSI's clients and the daemon


@dataclass
class Conn:
    no: int
    sent: list[str] = field(default_factory=list)
    received: list[str] = field(default_factory=list)
    received_sizes: list[int] = field(default_factory=list)


class Relay:
    """A Unix socket that forwards every connection to the daemon's, byte for byte, and keeps
    each line both ways."""

    def __init__(self, upstream: Path, path: Path) -> None:
        self.upstream = upstream
        self.path = path
        self._conns: list[Conn] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None

    def start(self) -> None:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_unix_server(self._serve, path=str(self.path))
                )
            except BaseException as e:
                errors.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="ksi-relay", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]

    def stop(self) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def count(self) -> int:
        with self._lock:
            return len(self._conns)

    def since(self, mark: int) -> list[Conn]:
        with self._lock:
            return [
                Conn(c.no, list(c.sent), list(c.received), list(c.received_sizes))
                for c in self._conns[mark:]
            ]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            conn = Conn(len(self._conns))
            self._conns.append(conn)
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(str(self.upstream))
        except OSError as e:
            note = json.dumps({"relay": f"cannot reach the daemon: {e}"}).encode()
            self._keep(conn.received, [note], conn.received_sizes)
            writer.close()
            return
        try:
            await asyncio.gather(
                self._pump(reader, up_writer, conn.sent, []),
                self._pump(up_reader, writer, conn.received, conn.received_sizes),
            )
        finally:
            up_writer.close()
            writer.close()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        lines: list[str],
        sizes: list[int],
    ) -> None:
        pending = b""
        try:
            while chunk := await reader.read(1 << 16):
                pending += chunk
                *complete, pending = pending.split(b"\n")
                # Kept before it is passed on: the client may look at the wire once it has it.
                self._keep(lines, complete, sizes)
                writer.write(chunk)
                await writer.drain()
        except OSError:
            pass
        finally:
            self._keep(lines, [pending] if pending.strip() else [], sizes)
            with contextlib.suppress(OSError, RuntimeError):
                if writer.can_write_eof():
                    writer.write_eof()

    def _keep(self, lines: list[str], raw: list[bytes], sizes: list[int]) -> None:
        with self._lock:
            for r in raw:
                if r.strip():
                    lines.append(r[:1_000_000].decode(errors="replace"))
                    sizes.append(len(r) + 1)


def parsed(line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return line


def is_event(obj: Any) -> bool:
    """A pushed event, not a command's reply: KSI's have ``type`` (and no ``command``), ours
    have ``event``."""
    return isinstance(obj, dict) and ("event" in obj or ("type" in obj and "command" not in obj))


# ---------------------------------------------------------------------------------------------
# The daemon under test


class OurDaemon:
    """``python daemon.py`` in a temp dir with the fake CLI, as tests/helpers.py starts it."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.socket = base / "s" / "d.sock"
        self.work = base / "work"
        self.stderr_path = base / "daemon.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.plugin = base / "plugins" / f"{PLUGIN_MODULE}.py"
        self.plugin.parent.mkdir(parents=True, exist_ok=True)
        self.write_plugin(1)
        self.env = {k: v for k, v in os.environ.items() if k != "CLAUDECODE"}
        path = os.environ.get("PYTHONPATH")
        plugins = str(self.plugin.parent)
        self.env["PYTHONPATH"] = plugins if not path else f"{plugins}{os.pathsep}{path}"
        self.env.update(
            {
                "KSI_CLAUDE_BIN": str(FAKE_CLAUDE),
                "KSI_WARM_DEFAULT": "false",
                "CLAUDE_CONFIG_DIR": str(base / "cfg"),
                "FAKE_CLAUDE_LOG": str(base / "fake.jsonl"),
                # The fake CLI ignores it; without credentials HEALTH_CHECK says "degraded".
                "ANTHROPIC_API_KEY": "fake-key",
            }
        )

    def write_plugin(self, version: int) -> None:
        """The plugin's source at ``version``, with a newer mtime than before: the import
        system must not take the old bytecode cache for it (same size, same second)."""
        old = self.plugin.stat().st_mtime if self.plugin.exists() else time.time()
        self.plugin.write_text(
            PLUGIN_SOURCE.format(version=version, ping=PLUGIN_PING, key=PLUGIN_KEY)
        )
        newer = max(time.time(), old + 2)
        os.utime(self.plugin, (newer, newer))

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 40.0) -> dict[str, Any]:
        """Start it and wait until it answers and its start-up work (LiteLLM, the CLI's
        version) is done, so the first scenario's turn is not timed with it."""
        self.work.mkdir(parents=True, exist_ok=True)
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "daemon.py"),
                    "--socket",
                    str(self.socket),
                    "--state-dir",
                    str(self.base / "state"),
                    "--log-dir",
                    str(self.base / "logs"),
                    "--observer",
                    PLUGIN_SPEC,
                ],
                cwd=str(self.work),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
            )
        deadline = time.monotonic() + timeout
        health: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.stderr_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the daemon exited with {self.proc.returncode}:\n{tail}")
            with contextlib.suppress(OSError, ValueError):
                health = call(self.socket, "HEALTH_CHECK", timeout=2.0).get("result") or {}
                settled = health.get("litellm", {}).get("status") != "loading"
                if settled and health.get("claude", {}).get("version_probed") is not False:
                    return health
            time.sleep(0.1)
        raise RuntimeError(f"the daemon did not become ready in {timeout} s: {abbrev(health)}")

    def wait_exit(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


# ---------------------------------------------------------------------------------------------
# KSI's modules


@dataclass
class Ksi:
    root: Path
    utils: Any
    sync: Any
    aio: Any
    dc: Any
    chat: Any
    migrated: Any
    start_daemon_calls: list[float] = field(default_factory=list)


def load_ksi(root: Path) -> Ksi:
    root = root.resolve()
    if not (root / "daemon" / "client" / "__init__.py").is_file():
        raise FileNotFoundError(f"{root} holds no daemon/client/__init__.py")
    existing = sys.modules.get("daemon")
    if existing is not None and not str(getattr(existing, "__file__", "")).startswith(str(root)):
        raise RuntimeError("a package named 'daemon' (not KSI's) is already imported")
    sys.path.insert(0, str(root))
    # KSI's daemon/__init__.py boots its server (psutil, pydantic, litellm, ...); its client
    # subpackage is meant to import without it, so it gets a bare parent package.
    parent = types.ModuleType("daemon")
    parent.__path__ = [str(root / "daemon")]
    parent.__file__ = str(root / "daemon" / "__init__.py")
    sys.modules["daemon"] = parent
    utils = importlib.import_module("daemon.client.utils")
    sync = importlib.import_module("daemon.client.sync_client")
    aio = importlib.import_module("daemon.client.async_client")
    dc = importlib.import_module("daemon_client")
    chat = importlib.import_module("chat")
    spec = importlib.util.spec_from_file_location(
        "ksi_test_migrated_commands", root / "tests" / "test_migrated_commands.py"
    )
    if spec is None or spec.loader is None:
        raise ImportError("cannot load tests/test_migrated_commands.py")
    migrated = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migrated)
    ksi = Ksi(root, utils, sync, aio, dc, chat, migrated)

    def start_daemon() -> None:
        ksi.start_daemon_calls.append(time.time())

    chat.start_daemon = start_daemon  # type: ignore[attr-defined]
    return ksi


# ---------------------------------------------------------------------------------------------
# Scenarios: the registry and what every scenario gets


@dataclass
class Ctx:
    ksi: Ksi
    sock: str  # the relay: what KSI's clients are given
    target: Path  # the daemon's own socket, for set-up
    relay: Relay
    tap: LogTap
    daemon: OurDaemon | None
    run_id: str
    conn_mark: int = 0
    log_mark: int = 0
    counter: int = 0
    memo: dict[str, Any] = field(default_factory=dict)
    _sources: dict[str, list[str]] = field(default_factory=dict)

    def begin(self) -> None:
        self.conn_mark = self.relay.count()
        self.log_mark = len(self.tap.records)

    def uniq(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}-{self.run_id}-{self.counter}"

    # What went over the wire during this scenario.

    def lines(self) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        for c in self.relay.since(self.conn_mark):
            out += [(f"#{c.no} >", parsed(s)) for s in c.sent]
            out += [(f"#{c.no} <", parsed(s)) for s in c.received]
        return out

    def replies(self, command: str | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for c in self.relay.since(self.conn_mark):
            sent = [parsed(s) for s in c.sent]
            first = sent[0].get("command") if sent and isinstance(sent[0], dict) else None
            for obj in map(parsed, c.received):
                if not isinstance(obj, dict) or is_event(obj):
                    continue
                if command is None or obj.get("command", first) == command:
                    out.append(obj)
        return out

    def reply(self, command: str) -> dict[str, Any] | None:
        found = self.replies(command)
        return found[-1] if found else None

    def pushed(self, event_type: str | None = None) -> list[dict[str, Any]]:
        out = []
        for c in self.relay.since(self.conn_mark):
            for obj in map(parsed, c.received):
                if is_event(obj) and event_type in (None, obj.get("event"), obj.get("type")):
                    out.append(obj)
        return out

    def got(self, command: str) -> str:
        r = self.reply(command)
        return abbrev(r) if r is not None else f"no reply to {command}"

    def kind(self, command: str) -> str:
        r = self.reply(command)
        if r is None:
            return f"no reply to {command}"
        if r.get("status") == "error":
            error = r.get("error")
            code = error.get("code") if isinstance(error, dict) else error
            return f"{code} for {command}"
        return f"{command}: reply shape"

    def must(
        self, ok: Any, command: str, expected: str, cite: str, *, kind: str = "", note: str = ""
    ) -> None:
        if not ok:
            text = f"expected {expected} [{cite}]; got {self.got(command)}"
            raise Failure(text + (f" ({note})" if note else ""), kind or self.kind(command))

    async def wait_reply(self, command: str, timeout: float = 5.0) -> dict[str, Any] | None:
        await self.until(lambda: self.reply(command) is not None, timeout)
        return self.reply(command)

    async def until(self, pred: Callable[[], Any], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    def at(self, where: Any, needle: str) -> str:
        """``file:line`` in the KSI tree: of ``needle`` inside a function or class, or in a file
        given by its path relative to the KSI root."""
        if isinstance(where, str):
            rel, start = where, 1
            if rel not in self._sources:
                text = (self.ksi.root / rel).read_text(errors="replace")
                self._sources[rel] = text.splitlines()
            lines = self._sources[rel]
        else:
            where = inspect.unwrap(where)
            lines, start = inspect.getsourcelines(where)
            start = max(start, 1)  # a module's source starts at 0
            rel = os.path.relpath(inspect.getsourcefile(where) or "?", self.ksi.root)
        for i, line in enumerate(lines):
            if needle in line:
                return f"{rel}:{start + i}"
        return f"{rel}:{start}"


@dataclass(frozen=True)
class Scenario:
    group: str
    name: str
    body: Callable[[Ctx], Any]
    stops_daemon: bool = False
    own_daemon: bool = False  # needs the daemon this runner starts (not --socket)
    exempt: str = ""  # why a failure does not count: KSI's own daemon failed it too


@dataclass
class Outcome:
    group: str
    name: str
    status: str
    seconds: float
    cause: str = ""
    kinds: list[str] = field(default_factory=list)
    detail: str = ""
    wire: list[str] = field(default_factory=list)
    ksi_log: list[str] = field(default_factory=list)
    exempt: str = ""  # the scenario's exemption, when it failed

    @property
    def label(self) -> str:
        return f"{self.status} [exempt: {self.exempt}]" if self.exempt else self.status


SCENARIOS: list[Scenario] = []


def scenario(
    group: str,
    name: str,
    *,
    stops_daemon: bool = False,
    own_daemon: bool = False,
    exempt: str = "",
) -> Callable[[Callable[[Ctx], Any]], Callable[[Ctx], Any]]:
    def register(body: Callable[[Ctx], Any]) -> Callable[[Ctx], Any]:
        SCENARIOS.append(
            Scenario(group, name, body, stops_daemon, own_daemon or stops_daemon, exempt)
        )
        return body

    return register


@contextlib.contextmanager
def captured_stdout() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield buf


class Feed(io.StringIO):
    """stdin for ``chat.interactive_chat``: its lines, then Ctrl-C (chat.py ends on it; at EOF
    it would print ``Error: EOF`` in a loop)."""

    def readline(self, size: int = -1, /) -> str:  # type: ignore[override]
        line = super().readline(size)
        if not line:
            raise KeyboardInterrupt
        return line


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


# ---------------------------------------------------------------------------------------------
# Persistent clients: connect, subscribe, listen, and what their handlers got


class Listener:
    """A KSI persistent client bound to an agent, subscribed and listening; ``seen`` holds
    what each of its handlers was called with."""

    def __init__(self, client: Any, task: asyncio.Task[Any] | None) -> None:
        self.client = client
        self.task = task
        self.seen: dict[str, list[dict[str, Any]]] = {}

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.client.connected:
                await self.client.disconnect()
        for task in (self.task, getattr(self.client, "_listen_task", None)):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        writer = self.client.writer
        if writer is not None and not writer.is_closing():
            writer.close()


async def listen_pac(ctx: Ctx, agent: str, handle: list[str], *, coroutine: bool) -> Listener:
    """PersistentAsyncClient as a KSI agent uses it: connect, handlers, subscribe, listen."""
    pac = ctx.ksi.aio.PersistentAsyncClient
    client = pac(agent, ctx.sock)
    listener = Listener(client, None)
    ok = await client.connect()
    if ok is not True:
        await listener.close()
    ctx.must(
        ok is True,
        "AGENT_CONNECTION",
        "connect() True (a success reply to AGENT_CONNECTION connect)",
        ctx.at(pac.connect, "check_success"),
    )
    for event_type in handle:
        listener.seen[event_type] = []
        box = listener.seen[event_type]
        if coroutine:

            async def on_async(message: dict[str, Any], box: list[Any] = box) -> None:
                box.append(message)

            client.add_event_handler(event_type, on_async)
        else:
            client.add_event_handler(event_type, box.append)
    await client.subscribe_events(AGENT_EVENTS)
    await client.start_listening()
    await ctx.wait_reply("SUBSCRIBE")
    return listener


async def listen_pdc(ctx: Ctx, agent: str, handle: list[str]) -> Listener:
    """PersistentDaemonClient: connect, async handlers, SUBSCRIBE by send_command, listen."""
    pdc = ctx.ksi.dc.PersistentDaemonClient
    client = pdc(agent, ctx.sock)
    listener = Listener(client, None)
    ok = await client.connect()
    if ok is not True:
        await listener.close()
    ctx.must(
        ok is True,
        "AGENT_CONNECTION",
        "connect() True (a success reply to AGENT_CONNECTION connect)",
        ctx.at(pdc.connect, '"success"'),
    )
    for event_type in handle:
        listener.seen[event_type] = []

        async def on_message(message: dict[str, Any], box: list[Any] = listener.seen[event_type]):
            box.append(message)

        client.add_message_handler(event_type, on_message)
    await client.send_command("SUBSCRIBE", {"agent_id": agent, "event_types": AGENT_EVENTS})
    listener.task = asyncio.create_task(client.listen_for_messages())
    await ctx.wait_reply("SUBSCRIBE")
    return listener


EVENT_SHAPE = "pushed event shape"


async def handler_fired(
    ctx: Ctx,
    listener: Listener,
    event_type: str,
    dispatch: str,
    want: tuple[str, Any] | None = None,
    cite: str = "",
    timeout: float = 8.0,
) -> dict[str, Any]:
    """The message the handler for ``event_type`` got (with ``message[key] == value`` for
    ``want``), or a Failure saying what arrived."""
    seen = listener.seen[event_type]

    def match(m: dict[str, Any]) -> bool:
        return want is None or m.get(want[0]) == want[1]

    if await ctx.until(lambda: any(match(m) for m in seen), timeout):
        return next(m for m in seen if match(m))
    expected = f"the {event_type} handler to be called (KSI dispatches on message['type']"
    expected += f" [{dispatch}])"
    if seen and want is not None:
        got = f"it was called with {abbrev(seen[-1])}"
        wanted = f"top-level {want[0]} == {want[1]!r} [{cite}]"
        raise Failure(f"expected {expected} with {wanted}; {got}", EVENT_SHAPE)
    pushed = ctx.pushed(event_type)
    if pushed:
        last = pushed[-1]
        why = "no 'type' key" if "type" not in last else f"type {last.get('type')!r}"
        got = f"the connection received {abbrev(last)} ({why})"
        raise Failure(f"expected {expected}; got {got}", "pushed event has no 'type'")
    others = [f"{tag} {abbrev(obj, 160)}" for tag, obj in ctx.lines()[-3:]]
    raise Failure(
        f"expected {expected}; no {event_type} arrived within {timeout:.0f} s (last lines:"
        f" {'; '.join(others) or 'none'})",
        f"no {event_type} pushed",
    )


def fields_match(message: dict[str, Any], want: dict[str, Any], cite: str) -> None:
    """KSI's bus flattened an event's payload into the pushed message, with ``from``."""
    wrong = {k: message.get(k) for k, v in want.items() if message.get(k) != v}
    if wrong:
        raise Failure(
            f"expected top-level {abbrev(want, 200)} in the pushed message [{cite}]; got"
            f" {abbrev(wrong, 160)} in {abbrev(message, 300)}",
            EVENT_SHAPE,
        )


# ---------------------------------------------------------------------------------------------
# daemon/client/utils.py


@scenario("utils", "utils.send_daemon_command HEALTH_CHECK")
async def utils_send(ctx: Ctx) -> str:
    u = ctx.ksi.utils
    reply = await u.send_daemon_command(ctx.sock, "HEALTH_CHECK")
    ctx.must(
        u.ResponseHandler.check_success(reply),
        "HEALTH_CHECK",
        "status 'success'",
        ctx.at(u.ResponseHandler.check_success, '"success"'),
    )
    return f"result.status={reply['result'].get('status')!r}"


@scenario("utils", "utils.ConnectionManager.send_command_once, full v2.0 envelope")
async def utils_envelope(ctx: Ctx) -> str:
    u = ctx.ksi.utils
    metadata = {"request_id": "ksi-r1", "client_id": "ksi_clients", "timestamp": "2025-06-23T12Z"}
    cmd = u.CommandBuilder.build_command("GET_SHARED", {"key": ctx.uniq("k")}, metadata)
    reply = await u.ConnectionManager.send_command_once(ctx.sock, cmd, 5.0)
    ctx.must(
        u.ResponseHandler.check_success(reply),
        "GET_SHARED",
        "success for an envelope with version '2.0' and metadata {request_id, client_id,"
        " timestamp}",
        ctx.at(u.CommandBuilder.build_command, '"version"'),
    )
    return "version and metadata accepted"


@scenario("utils", "utils.ResponseHandler on an unknown command")
async def utils_unknown(ctx: Ctx) -> str:
    u = ctx.ksi.utils
    reply = await u.send_daemon_command(ctx.sock, "KSI_NO_SUCH_COMMAND")
    message = u.ResponseHandler.get_error_message(reply)
    error = reply.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    ctx.must(
        not u.ResponseHandler.check_success(reply)
        and message not in ("", "Unknown error")
        and code == "UNKNOWN_COMMAND",
        "KSI_NO_SUCH_COMMAND",
        "status 'error', error.code UNKNOWN_COMMAND and an error.message",
        ctx.at(u.ResponseHandler.get_error_message, '"message"'),
    )
    return f"message={message[:60]!r}"


# ---------------------------------------------------------------------------------------------
# daemon/client/sync_client.py


@scenario("SyncClient", "SyncClient.health_check")
def sync_health(ctx: Ctx) -> str:
    sc = ctx.ksi.sync.SyncClient
    ctx.must(
        sc(ctx.sock).health_check() is True,
        "HEALTH_CHECK",
        "success with result.status 'healthy'",
        ctx.at(sc.health_check, '"healthy"'),
    )
    return "healthy"


@scenario("SyncClient", "SyncClient.spawn_claude sync")
def sync_spawn(ctx: Ctx) -> str:
    sc = ctx.ksi.sync.SyncClient
    prompt = ctx.uniq("sync hello")
    text = sc(ctx.sock).spawn_claude(prompt)
    ctx.must(
        isinstance(text, str) and f"echo: {prompt}" in text,
        "SPAWN",
        "the reply text in result.result (or result.content)",
        ctx.at(sc.spawn_claude, 'result_data.get("result"'),
    )
    return repr(text)


@scenario("SyncClient", "SyncClient.spawn_claude async")
def sync_spawn_async(ctx: Ctx) -> str:
    sc = ctx.ksi.sync.SyncClient
    pid = sc(ctx.sock).spawn_claude(ctx.uniq("sync async"), mode="async")
    ctx.must(
        isinstance(pid, str) and pid,
        "SPAWN",
        "result.process_id",
        ctx.at(sc.spawn_claude, '"process_id"'),
    )
    return f"process_id={pid}"


@scenario("SyncClient", "SyncClient.spawn_claude agent_id, enable_tools=False")
def sync_spawn_agent(ctx: Ctx) -> str:
    sc = ctx.ksi.sync.SyncClient
    prompt = ctx.uniq("sync agent")
    text = sc(ctx.sock).spawn_claude(prompt, agent_id=ctx.uniq("ksi-sync"), enable_tools=False)
    ctx.must(
        isinstance(text, str) and f"echo: {prompt}" in text,
        "SPAWN",
        "the reply text in result.result",
        ctx.at(sc.spawn_claude, 'result_data.get("result"'),
    )
    return repr(text)


@scenario("SyncClient", "SyncClient.send_command REGISTER_AGENT + get_agents")
def sync_agents(ctx: Ctx) -> str:
    sc = ctx.ksi.sync.SyncClient
    c = sc(ctx.sock)
    agent = ctx.uniq("ksi-sync")
    params = {"agent_id": agent, "role": "tester", "capabilities": ["testing"]}
    reply = c.send_command("REGISTER_AGENT", params)
    ctx.must(
        reply.get("status") == "success",
        "REGISTER_AGENT",
        "status 'success'",
        ctx.at(ctx.ksi.utils.ResponseHandler.check_success, '"success"'),
    )
    agents = c.get_agents()
    info = agents.get(agent) if isinstance(agents, dict) else None
    ctx.must(
        isinstance(info, dict)
        and info.get("role") == "tester"
        and "testing" in (info.get("capabilities") or []),
        "GET_AGENTS",
        "result.agents as {agent_id: {role, status, capabilities}}",
        ctx.at(sc.get_agents, '"agents"'),
    )
    return f"{len(agents)} agents"


@scenario("SyncClient", "SyncClient.set_shared_state/get_shared_state")
def sync_shared(ctx: Ctx) -> str:
    sc = ctx.ksi.sync.SyncClient
    c = sc(ctx.sock)
    key, value = ctx.uniq("ksi-sync-key"), {"test": True, "data": [1, 2, 3]}
    ok = c.set_shared_state(key, value)
    ctx.must(ok is True, "SET_SHARED", "result.status 'set'", ctx.at(sc.set_shared_state, '"set"'))
    got = c.get_shared_state(key)
    ctx.must(
        got == value, "GET_SHARED", f"result.value {value}", ctx.at(sc.get_shared_state, "value")
    )
    missing = c.get_shared_state(ctx.uniq("ksi-missing"))
    ctx.must(
        missing is None,
        "GET_SHARED",
        "result.value null for a missing key",
        ctx.at(sc.get_shared_state, "value"),
    )
    ctx.memo["persisted"] = (key, value)
    return "set, read back, missing key is None"


@scenario("SyncClient", "SyncClient.cleanup")
def sync_cleanup(ctx: Ctx) -> str:
    sc = ctx.ksi.sync.SyncClient
    out = sc(ctx.sock).cleanup("sessions")
    reply = ctx.reply("CLEANUP")
    ctx.must(
        reply is not None and reply.get("status") == "success" and out,
        "CLEANUP",
        "success with result.details (KSI: 'Cleared N sessions ...')",
        ctx.at(sc.cleanup, '"details"'),
    )
    return repr(out)


# ---------------------------------------------------------------------------------------------
# daemon/client/async_client.py: AsyncClient


@scenario("AsyncClient", "AsyncClient.health_check")
async def async_health(ctx: Ctx) -> str:
    ac = ctx.ksi.aio.AsyncClient
    ctx.must(
        await ac(ctx.sock).health_check() is True,
        "HEALTH_CHECK",
        "success with result.status 'healthy'",
        ctx.at(ac.health_check, '"healthy"'),
    )
    return "healthy"


@scenario("AsyncClient", "AsyncClient.spawn_claude sync")
async def async_spawn(ctx: Ctx) -> str:
    ac = ctx.ksi.aio.AsyncClient
    prompt = ctx.uniq("async hello")
    reply = await ac(ctx.sock).spawn_claude(prompt)
    result = reply.get("result") or {}
    ctx.must(
        f"echo: {prompt}" in str(result.get("result", "")) and result.get("session_id"),
        "SPAWN",
        "result.result (the CLI's JSON: the text) and result.session_id",
        ctx.at(ctx.ksi.dc, 'get("result", {}).get("result"'),
    )
    return repr(result.get("result"))


@scenario("AsyncClient", "AsyncClient.spawn_claude async")
async def async_spawn_async(ctx: Ctx) -> str:
    ac = ctx.ksi.aio.AsyncClient
    reply = await ac(ctx.sock).spawn_claude(ctx.uniq("async async"), mode="async")
    result = reply.get("result") or {}
    ctx.must(
        result.get("process_id") and result.get("status") == "started",
        "SPAWN",
        "result {process_id, status: 'started', mode: 'async'}",
        ctx.at(ctx.ksi.sync.SyncClient.spawn_claude, '"process_id"'),
    )
    return f"process_id={result['process_id']}"


@scenario("AsyncClient", "AsyncClient.register_agent + get_agents")
async def async_agents(ctx: Ctx) -> str:
    ac = ctx.ksi.aio.AsyncClient
    c = ac(ctx.sock)
    agent = ctx.uniq("ksi-async")
    ok = await c.register_agent(agent, "researcher", ["research", "analysis"])
    ctx.must(ok is True, "REGISTER_AGENT", "success", ctx.at(ac.register_agent, "check_success"))
    agents = await c.get_agents()
    info = agents.get(agent) if isinstance(agents, dict) else None
    ctx.must(
        isinstance(info, dict)
        and info.get("role") == "researcher"
        and sorted(info.get("capabilities") or []) == ["analysis", "research"],
        "GET_AGENTS",
        "result.agents[agent_id] with role and capabilities",
        ctx.at(ac.get_agents, '"agents"'),
    )
    return f"status={(info or {}).get('status')!r}"


@scenario("AsyncClient", "AsyncClient.set_shared_state/get_shared_state")
async def async_shared(ctx: Ctx) -> str:
    ac = ctx.ksi.aio.AsyncClient
    c = ac(ctx.sock)
    key = ctx.uniq("ksi-async-key")
    ok = await c.set_shared_state(key, "working_great")
    ctx.must(ok is True, "SET_SHARED", "result.status 'set'", ctx.at(ac.set_shared_state, '"set"'))
    got = await c.get_shared_state(key)
    ctx.must(
        got == "working_great",
        "GET_SHARED",
        "result.value 'working_great'",
        ctx.at(ac.get_shared_state, "value"),
    )
    return "round trip"


@scenario("AsyncClient", "AsyncClient.publish_event BROADCAST")
async def async_publish(ctx: Ctx) -> str:
    ac = ctx.ksi.aio.AsyncClient
    ok = await ac(ctx.sock).publish_event(
        ctx.uniq("ksi-pub"), "BROADCAST", {"message": "hello all", "priority": "low"}
    )
    ctx.must(ok is True, "PUBLISH", "success", ctx.at(ac.publish_event, "check_success"))
    return abbrev((ctx.reply("PUBLISH") or {}).get("result"), 120)


@scenario("AsyncClient", "AsyncClient.cleanup")
async def async_cleanup(ctx: Ctx) -> str:
    ac = ctx.ksi.aio.AsyncClient
    out = await ac(ctx.sock).cleanup("sessions")
    reply = ctx.reply("CLEANUP")
    ctx.must(
        reply is not None and reply.get("status") == "success" and out,
        "CLEANUP",
        "success with result.details",
        ctx.at(ac.cleanup, '"details"'),
    )
    return repr(out)


# ---------------------------------------------------------------------------------------------
# daemon/client/async_client.py: PersistentAsyncClient


@scenario("PersistentAsyncClient", "PersistentAsyncClient.connect + send_command")
async def pac_connect(ctx: Ctx) -> str:
    pac = ctx.ksi.aio.PersistentAsyncClient
    listener = await listen_pac(ctx, ctx.uniq("ksi-pac"), [], coroutine=False)
    client = listener.client
    try:
        sent = await client.send_command("GET_AGENTS")
        reply = await ctx.wait_reply("GET_AGENTS")
        ctx.must(
            sent is True and reply is not None and reply.get("status") == "success",
            "GET_AGENTS",
            "a success reply on the persistent connection",
            ctx.at(pac.send_command, "write"),
        )
        await asyncio.sleep(0.5)
        ctx.must(
            client.connected,
            "GET_AGENTS",
            "the connection to stay open after replies (the listener runs until EOF)",
            ctx.at(pac._listen_loop, "if not data"),
            kind="persistent connection closed",
        )
    finally:
        await listener.close()
    return "connected, replies on the same connection"


@scenario("PersistentAsyncClient", "PersistentAsyncClient DIRECT_MESSAGE handler")
async def pac_direct(ctx: Ctx) -> str:
    pac = ctx.ksi.aio.PersistentAsyncClient
    agent, sender, conv = ctx.uniq("ksi-pac"), ctx.uniq("ksi-sender"), ctx.uniq("conv")
    listener = await listen_pac(ctx, agent, ["DIRECT_MESSAGE"], coroutine=False)
    try:
        payload = {"to": agent, "content": "hello there", "conversation_id": conv}
        ok = await ctx.ksi.aio.AsyncClient(ctx.sock).publish_event(
            sender, "DIRECT_MESSAGE", payload
        )
        ctx.must(ok, "PUBLISH", "success", ctx.at(ctx.ksi.aio.AsyncClient.publish_event, "check"))
        message = await handler_fired(
            ctx,
            listener,
            "DIRECT_MESSAGE",
            ctx.at(pac._handle_message, 'get("type"'),
        )
        fields_match(
            message,
            {"from": sender, "content": "hello there", "conversation_id": conv},
            ctx.at("daemon/agent_process.py", "content = message.get('content')"),
        )
    finally:
        await listener.close()
    return "handler got it"


@scenario("PersistentAsyncClient", "PersistentAsyncClient PROCESS_COMPLETE handler")
async def pac_complete(ctx: Ctx) -> str:
    pac = ctx.ksi.aio.PersistentAsyncClient
    agent = ctx.uniq("ksi-pac")
    listener = await listen_pac(ctx, agent, ["PROCESS_COMPLETE"], coroutine=True)
    try:
        prompt = ctx.uniq("pac complete")
        reply = await ctx.ksi.aio.AsyncClient(ctx.sock).spawn_claude(
            prompt, mode="async", agent_id=agent
        )
        pid = (reply.get("result") or {}).get("process_id")
        ctx.must(pid, "SPAWN", "result.process_id", ctx.at(ctx.ksi.sync.SyncClient, "process_id"))
        message = await handler_fired(
            ctx,
            listener,
            "PROCESS_COMPLETE",
            ctx.at(pac._handle_message, 'get("type"'),
            ("process_id", pid),
            ctx.at("daemon/agent_process.py", "process_id = message.get('process_id')"),
        )
        fields_match(
            message,
            {"status": "success", "result": f"echo: {prompt} (turn 1)"},
            ctx.at("daemon/agent_process.py", "if status == 'success'"),
        )
    finally:
        await listener.close()
    return f"handler got {pid}"


@scenario("PersistentAsyncClient", "PersistentAsyncClient BROADCAST handler (coroutine)")
async def pac_broadcast(ctx: Ctx) -> str:
    pac = ctx.ksi.aio.PersistentAsyncClient
    agent, sender = ctx.uniq("ksi-pac"), ctx.uniq("ksi-sender")
    listener = await listen_pac(ctx, agent, ["BROADCAST"], coroutine=True)
    try:
        ok = await ctx.ksi.aio.AsyncClient(ctx.sock).publish_event(
            sender, "BROADCAST", {"content": "all hands", "message": "all hands"}
        )
        ctx.must(ok, "PUBLISH", "success", ctx.at(ctx.ksi.aio.AsyncClient.publish_event, "check"))
        message = await handler_fired(
            ctx,
            listener,
            "BROADCAST",
            ctx.at(pac._handle_message, 'get("type"'),
        )
        fields_match(
            message,
            {"from": sender, "content": "all hands"},
            ctx.at("daemon/agent_process.py", "Broadcast from"),
        )
    finally:
        await listener.close()
    return "handler got it"


@scenario("PersistentAsyncClient", "PersistentAsyncClient offline DIRECT_MESSAGE on connect")
async def pac_offline(ctx: Ctx) -> str:
    pac = ctx.ksi.aio.PersistentAsyncClient
    agent, sender = ctx.uniq("ksi-away"), ctx.uniq("ksi-sender")
    ok = await ctx.ksi.aio.AsyncClient(ctx.sock).publish_event(
        sender, "DIRECT_MESSAGE", {"to": agent, "content": "while you were out"}
    )
    ctx.must(ok, "PUBLISH", "success", ctx.at(ctx.ksi.aio.AsyncClient.publish_event, "check"))
    listener = await listen_pac(ctx, agent, ["DIRECT_MESSAGE"], coroutine=False)
    try:
        message = await handler_fired(
            ctx,
            listener,
            "DIRECT_MESSAGE",
            ctx.at(pac._handle_message, 'get("type"'),
        )
        fields_match(
            message,
            {"from": sender, "content": "while you were out"},
            ctx.at("daemon/agent_process.py", "content = message.get('content')"),
        )
    finally:
        await listener.close()
    return "queued message delivered on connect"


@scenario("PersistentAsyncClient", "PersistentAsyncClient.disconnect")
async def pac_disconnect(ctx: Ctx) -> str:
    listener = await listen_pac(ctx, ctx.uniq("ksi-pac"), [], coroutine=False)
    client = listener.client
    try:
        await client.disconnect()
        task = client._listen_task
        if client.connected or (task is not None and not task.done()):
            raise Failure("expected connected False and the listener ended after disconnect()")
    finally:
        await listener.close()
    return "disconnected"


# ---------------------------------------------------------------------------------------------
# daemon_client.py: DaemonClient and its helpers


@scenario("DaemonClient", "DaemonClient.health_check + daemon_health_check")
async def dc_health(ctx: Ctx) -> str:
    dc = ctx.ksi.dc
    ok = await dc.DaemonClient(ctx.sock).health_check()
    helper = await dc.daemon_health_check(ctx.sock)
    ctx.must(
        ok is True and helper is True,
        "HEALTH_CHECK",
        "result.status 'healthy'",
        ctx.at(dc.DaemonClient.health_check, '"healthy"'),
    )
    return "healthy"


@scenario("DaemonClient", "DaemonClient.spawn_claude sync")
async def dc_spawn(ctx: Ctx) -> str:
    dc = ctx.ksi.dc
    prompt = ctx.uniq("dc hello")
    reply = await dc.DaemonClient(ctx.sock).spawn_claude(prompt)
    result = reply.get("result") or {}
    ctx.must(
        result.get("result") == f"echo: {prompt} (turn 1)"
        and (result.get("session_id") or result.get("sessionId")),
        "SPAWN",
        "result.result (the text) and result.session_id (or sessionId)",
        ctx.at(ctx.ksi.chat.send_prompt, "sessionId"),
    )
    return repr(result["result"])


@scenario("DaemonClient", "DaemonClient.spawn_claude resume with session_id")
async def dc_resume(ctx: Ctx) -> str:
    dc = ctx.ksi.dc
    c = dc.DaemonClient(ctx.sock)
    first = (await c.spawn_claude(ctx.uniq("dc first"))).get("result") or {}
    prompt = ctx.uniq("dc second")
    second = (await c.spawn_claude(prompt, session_id=first.get("session_id"))).get("result")
    second = second or {}
    ctx.must(
        second.get("result") == f"echo: {prompt} (turn 2)" and second.get("session_id"),
        "SPAWN",
        "turn 2 of the same conversation, with the session_id to carry on",
        ctx.at(dc.DaemonClient.spawn_claude, 'params["session_id"]'),
    )
    same = second.get("session_id") == first.get("session_id")
    return f"turn 2; session_id {'kept' if same else 'new (as the CLI gives)'}"


@scenario("DaemonClient", "DaemonClient.spawn_claude async")
async def dc_spawn_async(ctx: Ctx) -> str:
    dc = ctx.ksi.dc
    reply = await dc.DaemonClient(ctx.sock).spawn_claude(ctx.uniq("dc async"), mode="async")
    result = reply.get("result") or {}
    ctx.must(
        result.get("process_id")
        and result.get("status") == "started"
        and result.get("mode") == "async",
        "SPAWN",
        "result {process_id, status: 'started', type: 'claude', mode: 'async'}",
        ctx.at(dc.DaemonClient.spawn_claude, "async"),
    )
    ctx.memo["dc_async_pid"] = result["process_id"]
    return f"process_id={result['process_id']}"


@scenario("DaemonClient", "daemon_client.spawn_claude_sync")
async def dc_spawn_sync_helper(ctx: Ctx) -> str:
    dc = ctx.ksi.dc
    prompt = ctx.uniq("dc helper")
    text = await dc.spawn_claude_sync(prompt, socket_path=ctx.sock)
    ctx.must(
        text == f"echo: {prompt} (turn 1)",
        "SPAWN",
        "the text in result.result",
        ctx.at(dc.spawn_claude_sync, '"result"'),
    )
    return repr(text)


@scenario("DaemonClient", "DaemonClient.register_agent + get_agents")
async def dc_agents(ctx: Ctx) -> str:
    dc = ctx.ksi.dc
    c = dc.DaemonClient(ctx.sock)
    agent = ctx.uniq("ksi-dc")
    reply = await c.register_agent(agent, "analyst", ["analysis"])
    ctx.must(
        (reply.get("result") or {}).get("status") == "registered",
        "REGISTER_AGENT",
        "result.status 'registered'",
        ctx.at(dc.DaemonClient.register_agent, "REGISTER_AGENT"),
    )
    agents = await c.get_agents()
    info = agents.get(agent) if isinstance(agents, dict) else None
    ctx.must(
        isinstance(info, dict) and info.get("role") == "analyst" and info.get("status"),
        "GET_AGENTS",
        "result.agents[agent_id] = {role, status, capabilities}",
        ctx.at(dc.DaemonClient.get_agents, '"agents"'),
    )
    return f"{len(agents)} agents"


@scenario("DaemonClient", "DaemonClient.spawn_agent")
async def dc_spawn_agent(ctx: Ctx) -> str:
    dc = ctx.ksi.dc
    try:
        reply = await dc.DaemonClient(ctx.sock).spawn_agent(
            "claude_agent_default", "Say hello", context="", agent_id=ctx.uniq("ksi-spawned")
        )
    except dc.CommandError:
        reply = {}
    agent = (reply.get("result") or {}).get("agent") or {}
    ctx.must(
        agent.get("id") and agent.get("process_id"),
        "SPAWN_AGENT",
        "result.agent {id, process_id, composition, role, status: 'active'}",
        ctx.at(dc.DaemonClient.spawn_agent, "SPAWN_AGENT"),
    )
    return f"agent {agent.get('id')}"


@scenario("DaemonClient", "DaemonClient.set_shared_state/get_shared_state")
async def dc_shared(ctx: Ctx) -> str:
    dc = ctx.ksi.dc
    c = dc.DaemonClient(ctx.sock)
    key, value = ctx.uniq("ksi-dc-key"), [1, "two", {"three": 3}]
    ok = await c.set_shared_state(key, value)
    ctx.must(
        ok is True,
        "SET_SHARED",
        "result.status 'set'",
        ctx.at(dc.DaemonClient.set_shared_state, '"set"'),
    )
    got = await c.get_shared_state(key)
    ctx.must(
        got == value,
        "GET_SHARED",
        f"result.value {value}",
        ctx.at(dc.DaemonClient.get_shared_state, '"value"'),
    )
    return "round trip"


@scenario(
    "DaemonClient",
    "DaemonClient.subscribe_events (agent connected)",
    exempt="KSI's own daemon never answered 'subscribed' either",
)
async def dc_subscribe(ctx: Ctx) -> str:
    dc = ctx.ksi.dc
    agent = ctx.uniq("ksi-dc-sub")
    listener = await listen_pdc(ctx, agent, [])
    try:
        ok = await dc.DaemonClient(ctx.sock).subscribe_events(agent, ["BROADCAST"])
        ctx.must(
            ok is True,
            "SUBSCRIBE",
            "result.status 'subscribed'",
            ctx.at(dc.DaemonClient.subscribe_events, '"subscribed"'),
            note="KSI's own daemon answered result.subscription.status 'active', so this"
            " method returned False there too",
        )
    finally:
        await listener.close()
    return "subscribed"


@scenario("DaemonClient", "DaemonClient.publish_event DIRECT_MESSAGE")
async def dc_publish(ctx: Ctx) -> str:
    dc = ctx.ksi.dc
    reply = await dc.DaemonClient(ctx.sock).publish_event(
        ctx.uniq("ksi-dc"), "DIRECT_MESSAGE", {"to": ctx.uniq("ksi-nobody"), "content": "hi"}
    )
    ctx.must(
        reply.get("status") == "success",
        "PUBLISH",
        "success (no CommandError)",
        ctx.at(dc.DaemonClient.send_command, '"error"'),
    )
    return abbrev(reply.get("result"), 120)


@scenario("DaemonClient", "DaemonClient.connect_agent/disconnect_agent")
async def dc_connect(ctx: Ctx) -> str:
    dc = ctx.ksi.dc
    c = dc.DaemonClient(ctx.sock)
    agent = ctx.uniq("ksi-dc-conn")
    ok = await c.connect_agent(agent)
    ctx.must(
        ok is True,
        "AGENT_CONNECTION",
        "result.status 'connected'",
        ctx.at(dc.DaemonClient.connect_agent, '"connected"'),
    )
    ok = await c.disconnect_agent(agent)
    ctx.must(
        ok is True,
        "AGENT_CONNECTION",
        "result.status 'disconnected'",
        ctx.at(dc.DaemonClient.disconnect_agent, '"disconnected"'),
    )
    return "connected, disconnected"


@scenario("DaemonClient", "DaemonClient.get_processes")
async def dc_processes(ctx: Ctx) -> str:
    dc = ctx.ksi.dc
    c = dc.DaemonClient(ctx.sock)
    reply = await c.spawn_claude(ctx.uniq("dc procs"), mode="async", agent_id=ctx.uniq("ksi-p"))
    pid = (reply.get("result") or {}).get("process_id")
    processes = await c.get_processes()
    listed = processes if isinstance(processes, list) else list(dict(processes).values())
    entry = next((p for p in listed if isinstance(p, dict) and p.get("process_id") == pid), None)
    keys = ("process_id", "agent_id", "model", "started_at", "session_id", "status")
    ctx.must(
        entry is not None and all(k in entry for k in keys),
        "GET_PROCESSES",
        f"result.processes listing {pid} with {', '.join(keys)}",
        ctx.at(dc.DaemonClient.get_processes, '"processes"'),
    )
    return f"{len(listed)} processes"


@scenario("DaemonClient", "DaemonClient.cleanup")
async def dc_cleanup(ctx: Ctx) -> str:
    dc = ctx.ksi.dc
    try:
        out = await dc.DaemonClient(ctx.sock).cleanup("sessions")
    except dc.CommandError:
        out = None
    ctx.must(
        out,
        "CLEANUP",
        "result {status: 'cleaned', cleanup_type, details}",
        ctx.at(dc.DaemonClient.cleanup, '"details"'),
    )
    return repr(out)


async def plugin_version(ctx: Ctx) -> int:
    """The VERSION the daemon's observer plugin runs with: it answers a PING by storing it."""
    marker = ctx.uniq("ping")
    published = await asyncio.to_thread(
        call, ctx.target, "PUBLISH", {"event_type": PLUGIN_PING, "payload": {"marker": marker}}
    )
    if published.get("status") != "success":
        raise Failure(f"set-up: PUBLISH {PLUGIN_PING} failed: {abbrev(published)}", "setup")
    got: dict[str, Any] = {}

    def answered() -> bool:
        nonlocal got
        got = call(ctx.target, "GET_SHARED", {"key": PLUGIN_KEY}).get("result") or {}
        value = got.get("value")
        return isinstance(value, dict) and value.get("marker") == marker

    if not await ctx.until(answered, 10):
        raise Failure(
            f"observer {PLUGIN_SPEC} did not answer {PLUGIN_PING}: {abbrev(got)}", "observer"
        )
    version: int = got["value"]["version"]
    return version


@scenario("DaemonClient", "DaemonClient.reload_module", own_daemon=True)
async def dc_reload(ctx: Ctx) -> str:
    """KSI's reload_module on the daemon's one observer plugin, whose code changes first: the
    plugin must then run the new code."""
    dc = ctx.ksi.dc
    assert ctx.daemon is not None
    before = await plugin_version(ctx)
    ctx.daemon.write_plugin(before + 1)
    try:
        ok = await dc.DaemonClient(ctx.sock).reload_module(PLUGIN_MODULE)
    except dc.CommandError:
        ok = False
    cite = ctx.at(dc.DaemonClient.reload_module, '"reloaded"')
    ctx.must(ok is True, "RELOAD", "RELOAD {module_name} answered result.status 'reloaded'", cite)
    reply = ctx.reply("RELOAD") or {}
    observers = (reply.get("result") or {}).get("observers")
    ctx.must(
        observers == [PLUGIN_SPEC],
        "RELOAD",
        f"the daemon to name the observer it restarted, [{PLUGIN_SPEC!r}] (our result.observers)",
        cite,
    )
    after = await plugin_version(ctx)
    if after != before + 1:
        raise Failure(
            f"expected observer {PLUGIN_SPEC} to run its new code (VERSION {before + 1}) after "
            f"the reload [{cite}]; it still answers with VERSION {after}",
            "RELOAD did not reload",
        )
    return f"reloaded {PLUGIN_MODULE}: VERSION {before} -> {after}"


@scenario("DaemonClient", "DaemonClient.get_commands + get_daemon_commands")
async def dc_commands(ctx: Ctx) -> str:
    dc = ctx.ksi.dc
    result = await dc.DaemonClient(ctx.sock).get_commands()
    helper = await dc.get_daemon_commands(ctx.sock)
    commands = result.get("commands") if isinstance(result, dict) else None
    ok = isinstance(commands, list) and commands and isinstance(helper.get("commands"), list)
    ok = ok and all(isinstance(c, dict) and c.get("command") for c in commands or [])
    ctx.must(
        ok,
        "GET_COMMANDS",
        "result.commands as [{command, description, parameters}]",
        ctx.at(dc.DaemonClient.get_commands, "GET_COMMANDS"),
    )
    return f"{len(commands or [])} commands"


@scenario("DaemonClient", "DaemonClient identity methods (create/get/list/update/remove)")
async def dc_identities(ctx: Ctx) -> str:
    dc = ctx.ksi.dc
    c = dc.DaemonClient(ctx.sock)
    agent = ctx.uniq("ksi-identity")
    steps: list[tuple[str, Any, str, str]] = []

    async def step(name: str, command: str, run: Any, ok: Callable[[Any], bool]) -> None:
        try:
            value = await run
        except dc.CommandError as e:
            value = e
        good = not isinstance(value, Exception) and ok(value)
        steps.append((name, good, command, abbrev(value, 80)))

    await step(
        "create_identity",
        "CREATE_IDENTITY",
        c.create_identity(agent, "Test Identity", "researcher", {"curious": True}),
        lambda r: bool((r.get("result") or {}).get("identity")),
    )
    await step("get_identity", "GET_IDENTITY", c.get_identity(agent), lambda r: bool(r))
    await step(
        "list_identities",
        "LIST_IDENTITIES",
        c.list_identities(),
        lambda r: any(i.get("agent_id") == agent for i in r),
    )
    await step(
        "update_identity",
        "UPDATE_IDENTITY",
        c.update_identity(agent, {"display_name": "Renamed"}),
        lambda r: r is True,
    )
    await step("remove_identity", "REMOVE_IDENTITY", c.remove_identity(agent), lambda r: r is True)
    bad = [s for s in steps if not s[1]]
    if bad:
        parts = [
            f"{name} ({command}): {ctx.got(command)}"
            if ctx.reply(command) is not None
            else f"{name}: returned {value}"
            for name, _, command, value in bad
        ]
        raise Failure(
            f"expected the identity record round trip [{ctx.at(dc.DaemonClient, 'identity')}]"
            f" to succeed; {len(bad)}/5 failed: " + "; ".join(parts)[:600],
            *{ctx.kind(command) for _, _, command, _ in bad},
        )
    return "all five"


CLIENT_FILES = (
    "daemon/client/utils.py",
    "daemon/client/sync_client.py",
    "daemon/client/async_client.py",
    "daemon_client.py",
    "chat.py",
    "tests/test_migrated_commands.py",
)


@scenario("DaemonClient", "GET_COMMANDS lists every command KSI's clients send")
async def commands_covered(ctx: Ctx) -> str:
    reply = await asyncio.to_thread(call, ctx.target, "GET_COMMANDS")
    known: set[str] = set()
    for entry in (reply.get("result") or {}).get("commands") or []:
        known.add(entry.get("command"))
        known.update(entry.get("aliases") or [])
    pattern = re.compile(r"""(?:send_command|build_command)\(\s*["']([A-Z][A-Z_]+)["']""")
    first_use: dict[str, str] = {}
    for rel in CLIENT_FILES:
        lines = (ctx.ksi.root / rel).read_text(errors="replace").splitlines()
        for no, line in enumerate(lines, 1):
            for name in pattern.findall(line):
                first_use.setdefault(name, f"{rel}:{no}")
    missing = {n: where for n, where in first_use.items() if n not in known}
    if missing:
        listed = ", ".join(f"{n} ({w})" for n, w in sorted(missing.items()))
        raise Failure(
            f"expected all {len(first_use)} commands KSI's client code sends; "
            f"{len(missing)} unknown to the daemon: {listed}",
            "commands missing",
        )
    return f"all {len(first_use)} known"


# ---------------------------------------------------------------------------------------------
# daemon_client.py: PersistentDaemonClient


@scenario("PersistentDaemonClient", "PersistentDaemonClient.connect + send_command")
async def pdc_connect(ctx: Ctx) -> str:
    pdc = ctx.ksi.dc.PersistentDaemonClient
    listener = await listen_pdc(ctx, ctx.uniq("ksi-pdc"), [])
    client = listener.client
    try:
        sent = await client.send_command("GET_AGENTS")
        reply = await ctx.wait_reply("GET_AGENTS")
        ctx.must(
            sent == {"status": "sent"} and reply is not None and reply.get("status") == "success",
            "GET_AGENTS",
            "a success reply on the persistent connection",
            ctx.at(pdc.send_command, "sent"),
        )
        await asyncio.sleep(0.5)
        ctx.must(
            client.connected,
            "GET_AGENTS",
            "the connection to stay open (listen_for_messages runs until EOF)",
            ctx.at(pdc.listen_for_messages, "if not data"),
            kind="persistent connection closed",
        )
    finally:
        await listener.close()
    return "connected, replies on the same connection"


@scenario("PersistentDaemonClient", "PersistentDaemonClient DIRECT_MESSAGE handler")
async def pdc_direct(ctx: Ctx) -> str:
    pdc = ctx.ksi.dc.PersistentDaemonClient
    agent, sender, conv = ctx.uniq("ksi-pdc"), ctx.uniq("ksi-sender"), ctx.uniq("conv")
    listener = await listen_pdc(ctx, agent, ["DIRECT_MESSAGE"])
    try:
        await ctx.ksi.dc.DaemonClient(ctx.sock).publish_event(
            sender, "DIRECT_MESSAGE", {"to": agent, "content": "ping", "conversation_id": conv}
        )
        message = await handler_fired(
            ctx,
            listener,
            "DIRECT_MESSAGE",
            ctx.at(pdc._handle_message, 'get("type"'),
        )
        fields_match(
            message,
            {"from": sender, "content": "ping", "conversation_id": conv},
            ctx.at("daemon/agent_process.py", "content = message.get('content')"),
        )
    finally:
        await listener.close()
    return "handler got it"


@scenario("PersistentDaemonClient", "PersistentDaemonClient PROCESS_COMPLETE handler")
async def pdc_complete(ctx: Ctx) -> str:
    pdc = ctx.ksi.dc.PersistentDaemonClient
    agent = ctx.uniq("ksi-pdc")
    listener = await listen_pdc(ctx, agent, ["PROCESS_COMPLETE"])
    try:
        prompt = ctx.uniq("pdc complete")
        reply = await ctx.ksi.dc.DaemonClient(ctx.sock).spawn_claude(
            prompt, mode="async", agent_id=agent
        )
        pid = (reply.get("result") or {}).get("process_id")
        message = await handler_fired(
            ctx,
            listener,
            "PROCESS_COMPLETE",
            ctx.at(pdc._handle_message, 'get("type"'),
            ("process_id", pid),
            ctx.at("daemon/agent_process.py", "process_id = message.get('process_id')"),
        )
        fields_match(
            message,
            {"status": "success", "result": f"echo: {prompt} (turn 1)"},
            ctx.at("daemon/agent_process.py", "response = message.get('result'"),
        )
    finally:
        await listener.close()
    return f"handler got {pid}"


@scenario("PersistentDaemonClient", "PersistentDaemonClient.disconnect")
async def pdc_disconnect(ctx: Ctx) -> str:
    listener = await listen_pdc(ctx, ctx.uniq("ksi-pdc"), [])
    try:
        await listener.client.disconnect()
        if listener.client.connected:
            raise Failure("expected connected False after disconnect()")
    finally:
        await listener.close()
    return "disconnected"


# ---------------------------------------------------------------------------------------------
# chat.py, driven without a TTY


@scenario("chat.py", "chat.send_prompt new conversation")
async def chat_send(ctx: Ctx) -> str:
    chat = ctx.ksi.chat
    prompt = ctx.uniq("chat hello")
    with captured_stdout() as out:
        response, session_id = await chat.send_prompt(prompt)
    printed = out.getvalue()
    ctx.must(
        response is not None and session_id and f"echo: {prompt} (turn 1)" in printed,
        "SPAWN",
        "the text printed from result.result and a session id returned",
        ctx.at(chat.send_prompt, "if 'result' in result_data"),
    )
    ctx.memo["chat_session"] = session_id
    return f"printed {printed.strip()!r}"


@scenario("chat.py", "chat.send_prompt resume")
async def chat_resume(ctx: Ctx) -> str:
    chat = ctx.ksi.chat
    session = ctx.memo.get("chat_session")
    if not session:
        raise Failure("needs the session of 'chat.send_prompt new conversation', which failed")
    prompt = ctx.uniq("chat again")
    with captured_stdout() as out:
        response, session_id = await chat.send_prompt(prompt, session)
    printed = out.getvalue()
    ctx.must(
        response is not None and session_id and f"echo: {prompt} (turn 2)" in printed,
        "SPAWN",
        "turn 2 of the conversation printed",
        ctx.at(chat.send_prompt, "session_id=session_id"),
    )
    return f"printed {printed.strip()!r}"


@scenario("chat.py", "chat.main --health")
async def chat_health(ctx: Ctx) -> str:
    chat = ctx.ksi.chat
    with patched(sys, "argv", ["chat.py", "--health"]), captured_stdout() as out:
        await chat.main()
    printed = out.getvalue()
    ctx.must(
        "Daemon is healthy" in printed,
        "HEALTH_CHECK",
        "'✅ Daemon is healthy' (result.status 'healthy')",
        ctx.at(chat.main, "Daemon is healthy"),
    )
    return printed.strip()


def _read_last_session() -> str:
    path = Path("sockets/last_session_id")
    return path.read_text().strip() if path.exists() else ""


@scenario("chat.py", "chat.main one-shot prompt, then resume from last_session_id")
async def chat_oneshot(ctx: Ctx) -> str:
    chat = ctx.ksi.chat
    first, second = ctx.uniq("chat one-shot"), ctx.uniq("chat follow-up")
    with patched(sys, "argv", ["chat.py", "--new", first]), captured_stdout() as out:
        await chat.main()
    saved = await asyncio.to_thread(_read_last_session)
    ctx.must(
        f"echo: {first} (turn 1)" in out.getvalue() and saved,
        "SPAWN",
        "the text printed and the session id saved to sockets/last_session_id",
        ctx.at(chat.main, "save_session_id(new_session_id)"),
    )
    with patched(sys, "argv", ["chat.py", second]), captured_stdout() as out:
        await chat.main()
    ctx.must(
        f"echo: {second} (turn 2)" in out.getvalue(),
        "SPAWN",
        "the second run to resume the saved session (turn 2)",
        ctx.at(chat.main, "get_last_session_id()"),
    )
    return f"resumed {saved}"


@scenario("chat.py", "chat.main --cleanup sessions")
async def chat_cleanup(ctx: Ctx) -> str:
    chat = ctx.ksi.chat
    crash = ""
    with patched(sys, "argv", ["chat.py", "--cleanup", "sessions"]), captured_stdout() as out:
        try:
            await chat.main()
        except AttributeError as e:
            crash = f"chat.py then crashed: {e} [{ctx.at(chat.send_cleanup, 'e.message')}]"
    reply = ctx.reply("CLEANUP")
    ctx.must(
        not crash and reply is not None and reply.get("status") == "success",
        "CLEANUP",
        "CLEANUP success; chat prints result.details",
        ctx.at(chat.send_cleanup, "client.cleanup"),
        note=crash,
    )
    return out.getvalue().strip()


@scenario("chat.py", "chat.interactive_chat on piped stdin")
async def chat_interactive(ctx: Ctx) -> str:
    chat = ctx.ksi.chat
    prompt = ctx.uniq("chat interactive")
    feed = Feed(f"{prompt}\nsession\nnew\nquit\n")
    with patched(sys, "stdin", feed), captured_stdout() as out:
        await chat.interactive_chat()
    printed = out.getvalue()
    ok = f"echo: {prompt}" in printed and "Current session: None" not in printed
    ctx.must(
        ok and "Starting new conversation" in printed,
        "SPAWN",
        "the reply printed, then 'Current session: <id>', then a new conversation",
        ctx.at(chat.interactive_chat, "Current session"),
    )
    return f"{printed.count(chr(10))} lines printed"


@scenario("chat.py", "chat.ensure_daemon_running")
async def chat_ensure(ctx: Ctx) -> str:
    chat = ctx.ksi.chat
    before = len(ctx.ksi.start_daemon_calls)
    with captured_stdout():
        ok = await chat.ensure_daemon_running()
    started = len(ctx.ksi.start_daemon_calls) > before
    ctx.must(
        ok is True and not started,
        "HEALTH_CHECK",
        "True at once, without starting a daemon (daemon_health_check: result.status 'healthy')",
        ctx.at(chat.ensure_daemon_running, "daemon_health_check"),
    )
    return "running"


# ---------------------------------------------------------------------------------------------
# tests/test_migrated_commands.py: CommandTester's suites, judged by the file's expectations

OK = ("success", None)
EITHER = ("either", None)


def err(code: str | None = None) -> tuple[str, str | None]:
    return ("error", code)


MIGRATED: dict[str, tuple[str, str | None]] = {
    "REGISTER_AGENT": OK,
    "GET_AGENTS": OK,
    "SPAWN_AGENT": OK,
    "ROUTE_TASK": OK,
    "SUBSCRIBE": EITHER,  # "will fail if agent not connected"
    "PUBLISH": OK,
    "PUBLISH_DIRECT": OK,
    "HEALTH_CHECK": OK,
    "GET_PROCESSES": OK,
    "SET_SHARED": OK,
    "GET_SHARED": OK,
    "REGISTER_AGENT_ERROR": err("INVALID_PARAMETERS"),  # "Missing required 'role' parameter"
    "SUBSCRIBE_ERROR": err("AGENT_NOT_CONNECTED"),  # "non-existent agent" (KSI's codes)
    "PUBLISH_ERROR": err(),  # "Missing required 'to' field for DIRECT_MESSAGE"
    "LIST_IDENTITIES": OK,
    "GET_IDENTITY_NOT_FOUND": err("IDENTITY_NOT_FOUND"),
    "CREATE_IDENTITY": OK,
    "CREATE_IDENTITY_DUPLICATE": err("IDENTITY_EXISTS"),
    "GET_IDENTITY": OK,
    "UPDATE_IDENTITY": OK,
    "LIST_IDENTITIES_AFTER_CREATE": OK,
    "LIST_IDENTITIES_FILTERED": OK,
    "UPDATE_IDENTITY_PROTECTED": EITHER,  # "should be ignored"; KSI's handler rejected it
    "REMOVE_IDENTITY": OK,
    "REMOVE_IDENTITY_NOT_FOUND": err("IDENTITY_NOT_FOUND"),
    "UPDATE_IDENTITY_NOT_FOUND": err("IDENTITY_NOT_FOUND"),
    "GET_COMPOSITIONS": OK,
    "GET_COMPOSITIONS_NO_METADATA": OK,
    "GET_COMPOSITIONS_FILTERED": OK,
    "GET_COMPOSITION": OK,
    "VALIDATE_COMPOSITION": OK,
    "VALIDATE_COMPOSITION_MISSING_CONTEXT": OK,  # and result.valid false
    "COMPOSE_PROMPT": OK,
    "COMPOSE_PROMPT_MISSING_CONTEXT": err(),
    "GET_COMPOSITION_NOT_FOUND": err("COMPOSITION_NOT_FOUND"),
    "LIST_COMPONENTS": OK,
    "LIST_COMPONENTS_FILTERED": OK,
    "LIST_COMPONENTS_INVALID_DIR": err("DIRECTORY_NOT_FOUND"),
    "VALIDATE_COMPOSITION_NOT_FOUND": err("COMPOSITION_NOT_FOUND"),
    "COMPOSE_PROMPT_NOT_FOUND": err("COMPOSITION_NOT_FOUND"),
}
MIGRATED_EXTRA: dict[str, tuple[Callable[[dict[str, Any]], bool], str]] = {
    "GET_SHARED": (lambda r: r.get("value") is not None, "result.value not null"),
    "GET_AGENTS": (lambda r: len(r.get("agents") or {}) > 0, "result.agents not empty"),
    "VALIDATE_COMPOSITION_MISSING_CONTEXT": (lambda r: r.get("valid") is False, "valid false"),
    "CREATE_IDENTITY": (
        lambda r: all(
            k in (r.get("identity") or {})
            for k in ("identity_uuid", "agent_id", "display_name", "role", "created_at")
        ),
        "result.identity with identity_uuid, agent_id, display_name, role, created_at, ...",
    ),
}


def judge_migrated(ctx: Ctx, results: dict[str, Any], keys: list[str]) -> str:
    problems: list[str] = []
    kinds: set[str] = set()
    rel = "tests/test_migrated_commands.py"
    for key in keys:
        if key not in results:
            continue  # the suite itself skipped it (e.g. no compositions to pick from)
        reply = results[key]
        want, code = MIGRATED[key]
        status = reply.get("status")
        error = reply.get("error")
        got_code = error.get("code") if isinstance(error, dict) else None
        result = reply.get("result") if isinstance(reply.get("result"), dict) else {}
        extra = MIGRATED_EXTRA.get(key)
        if want == "success":
            good = status == "success" and (extra is None or extra[0](result))
            expected = "success" + (f" with {extra[1]}" if extra else "")
        elif want == "error":
            good = status == "error" and (code is None or got_code == code)
            expected = f"error {code}" if code else "an error"
        else:
            good = status in ("success", "error")
            expected = "a reply"
        if not good:
            cite = ctx.at(rel, f'self.results["{key}"]')
            problems.append(f"{key}: expected {expected} [{cite}], got {abbrev(reply, 150)}")
            command = reply.get("command") or key
            if status == "error":
                kinds.add(f"{got_code} for {command}")
            elif want == "error":
                kinds.add("accepts what KSI rejected")
            else:
                kinds.add(f"{command}: reply shape")
    if problems:
        text = f"{len(problems)} of the suite's checks failed: " + "; ".join(problems)
        raise Failure(text, *sorted(kinds))
    ran = [k for k in keys if k in results]
    return f"{len(ran)} checks passed"


def migrated_scenario(method: str, keys: list[str]) -> None:
    async def body(ctx: Ctx) -> str:
        tester = ctx.ksi.migrated.CommandTester(ctx.sock)
        await getattr(tester, method)()
        return judge_migrated(ctx, tester.results, keys)

    scenario("test_migrated_commands", f"CommandTester.{method}")(body)


for _method, _keys in {
    "test_agent_management": ["REGISTER_AGENT", "GET_AGENTS", "SPAWN_AGENT", "ROUTE_TASK"],
    "test_message_bus": ["SUBSCRIBE", "PUBLISH", "PUBLISH_DIRECT"],
    "test_existing_commands": ["HEALTH_CHECK", "GET_PROCESSES", "SET_SHARED", "GET_SHARED"],
    "test_error_cases": ["REGISTER_AGENT_ERROR", "SUBSCRIBE_ERROR", "PUBLISH_ERROR"],
    "test_identity_management": [k for k in MIGRATED if "IDENTIT" in k],
    "test_composition_system": [k for k in MIGRATED if "COMPO" in k],
}.items():
    migrated_scenario(_method, _keys)


# ---------------------------------------------------------------------------------------------
# SHUTDOWN and a restart (only with a daemon of our own)


def _exited(ctx: Ctx, method: str, cite: str) -> str:
    assert ctx.daemon is not None
    code = ctx.daemon.wait_exit(15)
    if code is None:
        raise Failure(
            f"expected the daemon to exit after {method} [{cite}]; still running after 15 s",
            "SHUTDOWN did not stop",
        )
    return f"daemon exited {code}"


@scenario("lifecycle", "SyncClient.shutdown_daemon", stops_daemon=True)
def sync_shutdown(ctx: Ctx) -> str:
    sc = ctx.ksi.sync.SyncClient
    ok = sc(ctx.sock).shutdown_daemon()
    cite = ctx.at(sc.shutdown_daemon, "check_success")
    ctx.must(ok is True, "SHUTDOWN", "success", cite)
    return _exited(ctx, "SyncClient.shutdown_daemon", cite)


@scenario("lifecycle", "shared state survives a restart")
async def shared_persists(ctx: Ctx) -> str:
    if "persisted" not in ctx.memo:
        raise Failure("needs the key of 'SyncClient.set_shared_state/get_shared_state'")
    key, value = ctx.memo["persisted"]
    got = await ctx.ksi.aio.AsyncClient(ctx.sock).get_shared_state(key)
    ctx.must(
        got == value,
        "GET_SHARED",
        f"the value set before the restart, {value} (KSI kept shared_state/<key>.json)",
        ctx.at(ctx.ksi.aio.AsyncClient.get_shared_state, "value"),
    )
    return "kept"


@scenario("lifecycle", "AsyncClient.shutdown_daemon", stops_daemon=True)
async def async_shutdown(ctx: Ctx) -> str:
    ac = ctx.ksi.aio.AsyncClient
    ok = await ac(ctx.sock).shutdown_daemon()
    cite = ctx.at(ac.shutdown_daemon, "check_success")
    ctx.must(ok is True, "SHUTDOWN", "success", cite)
    return await asyncio.to_thread(_exited, ctx, "AsyncClient.shutdown_daemon", cite)


@scenario("lifecycle", "DaemonClient.shutdown", stops_daemon=True)
async def dc_shutdown(ctx: Ctx) -> str:
    dc = ctx.ksi.dc
    ok = await dc.DaemonClient(ctx.sock).shutdown()
    cite = ctx.at(dc.DaemonClient.shutdown, '"shutting_down"')
    ctx.must(ok is True, "SHUTDOWN", "result.status 'shutting_down'", cite)
    return await asyncio.to_thread(_exited, ctx, "DaemonClient.shutdown", cite)


# ---------------------------------------------------------------------------------------------
# Running them


def run_one(s: Scenario, ctx: Ctx, timeout: float) -> Outcome:
    ctx.begin()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            if inspect.iscoroutinefunction(s.body):
                box["ok"] = asyncio.run(asyncio.wait_for(s.body(ctx), timeout))
            else:
                box["ok"] = s.body(ctx)
        except Failure as f:
            box["fail"] = f
        except TimeoutError:
            box["fail"] = Failure(f"timed out after {timeout:.0f} s{_last_lines(ctx)}", "timeout")
        except BaseException as e:
            frame = traceback.extract_tb(e.__traceback__)[-1]
            where = f"{os.path.relpath(frame.filename, ctx.ksi.root)}:{frame.lineno}"
            last = ctx.replies()
            got = f"; last reply {abbrev(last[-1])}" if last else _last_lines(ctx)
            kind = type(e).__name__
            if "longer than limit" in str(e) or "Separator is not found" in str(e):
                size = max(
                    (n for c in ctx.relay.since(ctx.conn_mark) for n in c.received_sizes), default=0
                )
                kind = "reply line over asyncio's 64 KiB readline limit"
                got = (
                    f"; the reply line was {size} bytes, over the {1 << 16}-byte limit of the"
                    " StreamReader KSI reads it with (asyncio.open_unix_connection default)"
                    f"{got}"
                )
            elif last and last[-1].get("status") == "error":
                command = last[-1].get("command") or "?"
                kind = f"{(last[-1].get('error') or {}).get('code')} for {command}"
            box["fail"] = Failure(f"{type(e).__name__}: {e} [at {where}]{got}", kind)

    started = time.monotonic()
    thread = threading.Thread(target=target, name=f"scenario {s.name}", daemon=True)
    thread.start()
    thread.join(timeout + 5)
    seconds = time.monotonic() - started
    if thread.is_alive():
        box["fail"] = Failure(f"hung past {timeout:.0f} s{_last_lines(ctx)}", "timeout")
    wire = [f"{tag} {abbrev(obj, 600)}" for tag, obj in ctx.lines()]
    log = ctx.tap.records[ctx.log_mark :]
    fail: Failure | None = box.get("fail")
    if fail is not None:
        return Outcome(s.group, s.name, "FAIL", seconds, fail.text, fail.kinds, "", wire, log)
    return Outcome(s.group, s.name, "PASS", seconds, detail=str(box.get("ok") or ""), wire=wire)


def _last_lines(ctx: Ctx) -> str:
    lines = ctx.lines()[-2:]
    return (" (last lines: " + "; ".join(f"{t} {abbrev(o, 160)}" for t, o in lines) + ")") * bool(
        lines
    )


def install_log_tap() -> LogTap:
    tap = LogTap()
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    # With a handler in place, test_migrated_commands.py's logging.basicConfig is a no-op.
    root.addHandler(tap)
    root.setLevel(logging.WARNING)
    for name in KSI_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)
    return tap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m devtools.ksi_clients",
        description="Run KSI's original client code against this daemon.",
    )
    p.add_argument("--ksi", type=Path, default=Path("/tmp/ksi"), help="the KSI checkout")
    p.add_argument("--socket", type=Path, help="a running daemon's socket (else start one)")
    p.add_argument("--json", type=Path, help="write a JSON report here")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds per scenario")
    p.add_argument("-k", dest="only", action="append", help="run scenarios whose name has this")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (daemon logs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="ksi-clients-", dir="/tmp"))
    (base / "s").mkdir(mode=0o700)
    (base / "client").mkdir()
    tap = install_log_tap()
    original_cwd = os.getcwd()
    daemon: OurDaemon | None = None
    relay: Relay | None = None
    outcomes: list[Outcome] = []
    try:
        try:
            ksi = load_ksi(args.ksi)
        except Exception as e:
            print(f"cannot import KSI's client code from {args.ksi}: {type(e).__name__}: {e}")
            return 0
        if args.socket is not None:
            target = args.socket.resolve()
        else:
            daemon = OurDaemon(base)
            try:
                daemon.start()
            except RuntimeError as e:
                print(f"cannot start the daemon: {e}")
                return 0
            target = daemon.socket
        relay = Relay(target, base / "s" / "relay.sock")
        relay.start()
        # chat.py keeps sockets/last_session_id relative to the working directory.
        os.chdir(base / "client")
        ctx = Ctx(ksi, str(relay.path), target, relay, tap, daemon, os.urandom(3).hex())
        ksi.chat.SOCKET_PATH = ctx.sock
        who = f"pid {daemon.proc.pid}" if daemon and daemon.proc else "given"
        print(f"KSI client code from {ksi.root} against {target} (daemon {who}); temp {base}")
        chosen = [s for s in SCENARIOS if not args.only or any(k in s.name for k in args.only)]
        for s in chosen:
            outcome = run_scenario(s, ctx, daemon, args.timeout)
            outcomes.append(outcome)
            line = f"{outcome.label} {outcome.name}"
            if outcome.status != "PASS":
                line += f": {outcome.cause}"
            print(line, flush=True)
        summarize(outcomes)
    finally:
        os.chdir(original_cwd)
        if relay is not None:
            relay.stop()
        if daemon is not None:
            daemon.stop()
        if args.json is not None:
            write_report(args.json, args, base, outcomes)
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0


def run_scenario(s: Scenario, ctx: Ctx, daemon: OurDaemon | None, timeout: float) -> Outcome:
    if s.own_daemon and daemon is None:
        why = "stops the daemon" if s.stops_daemon else "needs the daemon this runner starts"
        return Outcome(s.group, s.name, "SKIP", 0.0, f"{why}; not with --socket")
    if daemon is not None and not daemon.running:
        try:
            daemon.start()
        except RuntimeError as e:
            return Outcome(s.group, s.name, "FAIL", 0.0, f"daemon restart failed: {e}", ["setup"])
    outcome = run_one(s, ctx, timeout)
    if outcome.status == "FAIL":
        outcome.exempt = s.exempt
    if daemon is not None and not daemon.running and not s.stops_daemon:
        code = daemon.proc.returncode if daemon.proc else None
        outcome.cause += f" [the daemon exited with {code} during this scenario]"
    return outcome


def summarize(outcomes: list[Outcome]) -> None:
    counts = {k: sum(o.status == k for o in outcomes) for k in ("PASS", "FAIL", "SKIP")}
    exempt = [o.name for o in outcomes if o.exempt]
    line = f"{len(outcomes)} scenarios: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    if exempt:
        line += f" ({len(exempt)} of the FAILs exempt: {', '.join(exempt)})"
    print(line)
    # "UNKNOWN_COMMAND for CLEANUP" and "... for RELOAD" are one cause: an error code.
    by_kind: dict[str, tuple[set[str], list[str]]] = {}
    for o in outcomes:
        if o.status != "FAIL":
            continue
        for kind in o.kinds:
            code, _, command = kind.partition(" for ")
            key = code if command and code.isupper() else kind
            commands, names = by_kind.setdefault(key, (set(), []))
            if command and code.isupper():
                commands.add(command)
            if o.name not in names:
                names.append(o.name)
    if by_kind:
        print("FAIL causes:")
        for kind, (commands, names) in sorted(by_kind.items(), key=lambda kv: -len(kv[1][1])):
            what = f"{kind} for {', '.join(sorted(commands))}" if commands else kind
            print(f"  {what} ({len(names)} scenarios): {', '.join(names)}")


def write_report(path: Path, args: argparse.Namespace, base: Path, outcomes: list[Outcome]) -> None:
    report = {
        "ksi": str(args.ksi),
        "socket": str(args.socket) if args.socket else None,
        "temp_dir": str(base),
        "summary": {k: sum(o.status == k for o in outcomes) for k in ("PASS", "FAIL", "SKIP")}
        | {"exempt": sum(bool(o.exempt) for o in outcomes)},
        "scenarios": [asdict(o) for o in outcomes],
    }
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
