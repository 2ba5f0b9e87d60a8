#!/usr/bin/env python3
"""A fake ``claude`` executable that stands in for Claude Code CLI 2.1.197 in tests and benchmarks.

The real CLI is a 245 MB binary that needs a model API and takes about 0.4 s to start. This
script copies its outward behaviour (command line, exit codes, stdout/stderr wording, the JSON
and stream-json shapes, the cwd-scoped session files and the warm stream-json input mode) as
measured in ``/work/shared/reference/claude-cli.md``. It answers deterministically with
``echo: <prompt> (turn N)``, so session continuity can be checked from the outside, and special
markers in the prompt (``[[sleep:S]]``, ``[[error:N]]``, ``[[crash:N]]``, ...) make it misbehave
on purpose. The full marker and environment contract is in ``_HELP`` below.

It must start fast because benchmarks spawn it per turn: stdlib only, and nothing heavy
(``typing``, ``uuid``, ``subprocess``, ``dataclasses``) is imported on the hot path.

Warm mode (``--input-format stream-json``) behaves as measured with the real 2.1.197: nothing
is printed before the first user line, every turn starts with its own ``system/init`` line, an
input line that is not JSON ends the process with exit 1, and ``total_cost_usd`` /
``modelUsage`` accumulate over the life of the process (``usage`` stays per turn).

Deliberate difference from the real 2.1.197: a tool left out by ``--disallowedTools`` /
``--tools`` / ``--allowedTools`` is still "called" and reported in ``permission_denials`` (the
real CLI would not offer it to the model at all).
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import sys
import time

# Importing ``typing`` costs ~9 ms, a quarter of our start budget; mypy still sees these names.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

    JsonObj = dict[str, Any]

VERSION = "2.1.197"

_HELP = """\
Usage: claude -p [options] [prompt]   (fake Claude Code CLI for tests)

Prompt markers (anywhere in the prompt, several may combine):
  [[sleep:S]]        sleep S seconds before answering (interruptible in warm mode)
  [[pause:S]]        say "working on it" (an assistant text message), then sleep S seconds
  [[hang:S]]         sleep S seconds without reading stdin (warm mode: interrupts go unanswered)
  [[error:N]]        API error N (400/401/429/5xx), [[error:connect]] or [[error:login]]
                     (no credentials: "Not logged in", as the real CLI without a key); exit 1
  [[flaky:N:PATH:K]] API error N for the first K runs with this marker (counted in PATH)
  [[max-turns]]      error_max_turns result; exit 1
  [[crash:N]]        traceback on stderr, nothing on stdout, exit N
  [[bad-json]]       print "this is not json" on stdout, exit 0
  [[huge:BYTES]]     the reply is BYTES bytes long
  [[stderr:BYTES]]   write BYTES bytes to stderr before answering
  [[ignore-sigterm]] ignore SIGTERM from now on
  [[grandchild:PATH]] start `sleep 300` in our process group, write its pid to PATH
  [[pidfile:PATH]]   write our pid to PATH
  [[tool:NAME:ARG]]  simulate a tool round trip (num_turns 2); with
                     --permission-prompt-tool stdio, Bash/Write/Edit first ask the parent
                     (a can_use_tool control request) and wait for its answer
  [[end]]            the reply ends with a line "[END]" (an agent closing its conversation)
  [[say:TEXT]]       with [[tool:...]]: the model says TEXT before its tool call
                     (--max-budget-usd: a tool turn whose first call reaches it ends
                     with an error_max_budget_usd result before its second call)
Environment:
  FAKE_CLAUDE_START_DELAY=S    sleep S seconds at start (the real CLI takes ~0.3 s)
  FAKE_CLAUDE_LOG=PATH         append JSON lines describing each invocation and turn
"""

_UUID_RE = re.compile(r"[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")
_TRIGGER_RE = re.compile(
    r"\[\[(sleep|pause|hang|error|max-turns|crash|bad-json|huge|stderr|ignore-sigterm|grandchild"
    r"|pidfile|tool|flaky|say|end)(?::(.*?))?\]\]"
)
# Tool lists are "comma or space separated", but a rule like "Bash(git *)" contains a space.
_TOOL_ENTRY_RE = re.compile(r"[^,\s(]+(?:\([^)]*\))?")

_MODEL_ALIASES = {
    "sonnet": "claude-sonnet-5",
    "opus": "claude-opus-4-8",
    "haiku": "claude-haiku-4-5-20251001",
}
_DEFAULT_MODEL = "claude-opus-4-8"

# The tool names, slash commands, agents and skills the real init line lists with default flags.
# fmt: off
_DEFAULT_TOOLS = [
    "Task", "Bash", "CronCreate", "CronDelete", "CronList", "Edit", "EnterWorktree",
    "ExitWorktree", "NotebookEdit", "Read", "ReportFindings", "ScheduleWakeup", "SendMessage",
    "Skill", "TaskCreate", "TaskGet", "TaskList", "TaskOutput", "TaskStop", "TaskUpdate",
    "WebFetch", "WebSearch", "Workflow", "Write",
]
# fmt: on
# Tools the real CLI in -p mode does not run unasked: with --permission-prompt-tool stdio it
# asks its parent first (../shared/reference/claude-cli.md §13).
_ASKING_TOOLS = frozenset({"Bash", "Edit", "MultiEdit", "NotebookEdit", "Write"})
# fmt: off
_SKILLS = [
    "deep-research", "update-config", "verify", "debug", "code-review", "simplify", "batch",
    "fewer-permission-prompts", "loop", "claude-api", "run", "run-skill-generator",
]
_SLASH_COMMANDS = [
    *_SKILLS, "clear", "compact", "config", "context", "heapdump", "init", "reload-skills",
    "review", "security-review", "usage", "insights", "goal", "team-onboarding",
]
# fmt: on
_AGENTS = ["claude", "Explore", "general-purpose", "Plan", "statusline-setup"]

_PERMISSION_MODES = ("acceptEdits", "auto", "bypassPermissions", "default", "dontAsk", "plan")
_CHOICES = {
    "output_format": ("text", "json", "stream-json"),
    "input_format": ("text", "stream-json"),
    "permission_mode": _PERMISSION_MODES,
}

# flag -> (Options attribute, kind, metavar as commander prints it in error messages).
# Kinds: "bool" takes no value, "value" takes one, "optional" may take one, "list" is variadic.
_FLAGS: dict[str, tuple[str, str, str]] = {
    "-p": ("print_mode", "bool", ""),
    "--print": ("print_mode", "bool", ""),
    "--output-format": ("output_format", "value", "<format>"),
    "--input-format": ("input_format", "value", "<format>"),
    "--verbose": ("verbose", "bool", ""),
    "--model": ("model", "value", "<model>"),
    "-r": ("resume", "optional", "[value]"),
    "--resume": ("resume", "optional", "[value]"),
    "-c": ("continue_", "bool", ""),
    "--continue": ("continue_", "bool", ""),
    "--session-id": ("session_id", "value", "<uuid>"),
    "--fork-session": ("fork_session", "bool", ""),
    "--no-session-persistence": ("no_persist", "bool", ""),
    "--max-turns": ("max_turns", "value", "<turns>"),
    "--max-budget-usd": ("max_budget_usd", "value", "<amount>"),
    "--allowedTools": ("allowed_tools", "list", "<tools...>"),
    "--allowed-tools": ("allowed_tools", "list", "<tools...>"),
    "--disallowedTools": ("disallowed_tools", "list", "<tools...>"),
    "--disallowed-tools": ("disallowed_tools", "list", "<tools...>"),
    "--tools": ("tools", "list", "<tools...>"),
    "--append-system-prompt": ("append_system_prompt", "value", "<prompt>"),
    "--system-prompt": ("system_prompt", "value", "<prompt>"),
    "--permission-mode": ("permission_mode", "value", "<mode>"),
    "--permission-prompt-tool": ("permission_prompt_tool", "value", "<tool>"),
    "--include-partial-messages": ("include_partial", "bool", ""),
    "-v": ("version", "bool", ""),
    "--version": ("version", "bool", ""),
    "-h": ("help", "bool", ""),
    "--help": ("help", "bool", ""),
    # Accepted and ignored: real flags a daemon might pass that change nothing observable here.
    "--dangerously-skip-permissions": ("ignored", "bool", ""),
    "--strict-mcp-config": ("ignored", "bool", ""),
    "--bare": ("ignored", "bool", ""),
    "--mcp-config": ("ignored", "list", "<configs...>"),
    "--add-dir": ("ignored", "list", "<directories...>"),
    "--settings": ("ignored", "value", "<file-or-json>"),
    "--setting-sources": ("ignored", "value", "<sources>"),
    "--fallback-model": ("ignored", "value", "<model>"),
    "--effort": ("ignored", "value", "<level>"),
}


class CliError(Exception):
    """A failure the real CLI reports as one stderr line followed by ``exit(code)``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class Options:
    """Parsed command line; attribute names match the ``_FLAGS`` table."""

    def __init__(self) -> None:
        self.print_mode = False
        self.output_format = "text"
        self.input_format = "text"
        self.verbose = False
        self.model: str | None = None
        self.resume: str | bool | None = None  # True when -r is given without a value
        self.continue_ = False
        self.session_id: str | None = None
        self.fork_session = False
        self.no_persist = False
        self.max_turns: str | None = None
        self.max_budget_usd: str | None = None
        self.allowed_tools: list[str] | None = None
        self.disallowed_tools: list[str] | None = None
        self.tools: list[str] | None = None
        self.append_system_prompt: str | None = None
        self.system_prompt: str | None = None
        self.permission_mode = "default"
        self.permission_prompt_tool: str | None = None
        self.include_partial = False
        self.version = False
        self.help = False
        self.ignored: object = None
        self.prompt_arg: str | None = None


def parse_args(argv: list[str]) -> Options:
    """Parse argv the way commander (the real CLI's parser) does, with its error wording."""
    opts = Options()
    positionals: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            positionals.extend(argv[i:])
            break
        if not arg.startswith("-") or arg == "-":
            positionals.append(arg)
            continue
        name, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        spec = _FLAGS.get(name)
        if spec is None:
            raise CliError(f"error: unknown option '{arg}'")
        attr, kind, metavar = spec
        if kind == "bool":
            if attr != "ignored":
                setattr(opts, attr, True)
            continue
        if eq:
            values = [inline]
        elif kind == "list":
            # Variadic like commander: everything up to the next option belongs to this flag.
            values = []
            while i < len(argv) and not argv[i].startswith("-"):
                values.append(argv[i])
                i += 1
        elif i < len(argv) and not (argv[i].startswith("-") and len(argv[i]) > 1):
            values = [argv[i]]
            i += 1
        else:
            values = []
        if not values and kind != "optional":
            raise CliError(f"error: option '{name} {metavar}' argument missing")
        if attr == "ignored":
            continue  # accepted for compatibility, no effect on the fake
        if not values:
            setattr(opts, attr, True)  # -r without a value (the real CLI's session picker)
            continue
        if kind == "list":
            entries = [e for v in values for e in _TOOL_ENTRY_RE.findall(v)]
            setattr(opts, attr, [*(getattr(opts, attr) or []), *entries])
            continue
        value = values[0]
        choices = _CHOICES.get(attr)
        if choices is not None and value not in choices:
            raise CliError(
                f"error: option '{name} {metavar}' argument '{value}' is invalid. "
                f"Allowed choices are {', '.join(choices)}."
            )
        setattr(opts, attr, value)
    if len(positionals) > 1:
        raise CliError(
            f"error: too many arguments. Expected 1 argument but got {len(positionals)}."
        )
    opts.prompt_arg = positionals[0] if positionals else None
    return opts


# --------------------------------------------------------------------------- small helpers


def new_uuid() -> str:
    """A random (version 4) UUID string, without importing the comparatively slow uuid module."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def dumps(obj: object) -> str:
    # The real CLI prints raw UTF-8 ("·", "—" appear unescaped) and no spaces.
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def write_fd(fd: int, data: bytes) -> None:
    """Write all of ``data``; os.write on a pipe may write only part of a multi-MB line."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BrokenPipeError:
            # The reader went away; nobody is left to tell, so leave quietly.
            os._exit(1)
        view = view[n:]


def err(text: str) -> None:
    write_fd(2, (text + "\n").encode())


def append_line(path: str, obj: object) -> None:
    """Append one JSON line with a single O_APPEND write, so concurrent fakes never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, (dumps(obj) + "\n").encode())
    finally:
        os.close(fd)


def write_pid_file(path: str, pid: int) -> None:
    # Write-then-rename so a polling test never reads a half-written number.
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{pid}\n")
    os.replace(tmp, path)


def log_event(obj: JsonObj) -> None:
    path = os.environ.get("FAKE_CLAUDE_LOG")
    if path:
        append_line(path, obj)


def flaky_fails(arg: str) -> bool:
    """``N:PATH:K``: count this run in PATH; the first K runs fail."""
    _code, _, rest = arg.partition(":")
    path, _, times = rest.rpartition(":")
    try:
        with open(path) as f:
            count = int(f.read() or 0) + 1
    except (OSError, ValueError):
        count = 1
    with open(path, "w") as f:
        f.write(str(count))
    return count <= number(times)


def number(text: str, default: float = 0) -> float:
    """A marker's numeric argument; a typo must not turn into a Python traceback."""
    try:
        return float(text)
    except ValueError:
        return default


def tool_name(entry: str) -> str:
    return entry.split("(", 1)[0]


# --------------------------------------------------------------------------- sessions


class Session:
    """One conversation, stored like the real CLI: a cwd-scoped JSONL transcript."""

    def __init__(self, session_id: str, path: str, history: list[JsonObj], persist: bool) -> None:
        self.session_id = session_id
        self.path = path
        self.history = history
        self.persist = persist
        self.last_uuid: str | None = history[-1].get("uuid") if history else None

    def user_turns(self) -> int:
        return sum(1 for e in self.history if e.get("type") == "user")

    def history_chars(self) -> int:
        total = 0
        for entry in self.history:
            content = entry.get("message", {}).get("content", "")
            if isinstance(content, str):
                total += len(content)
            else:
                total += sum(len(b.get("text", "")) for b in content if isinstance(b, dict))
        return total

    def append(self, entry_type: str, message: JsonObj) -> None:
        entry_uuid = new_uuid()
        entry = {
            "type": entry_type,
            "parentUuid": self.last_uuid,
            "sessionId": self.session_id,
            "cwd": os.getcwd(),
            "version": VERSION,
            "timestamp": now_iso(),
            "uuid": entry_uuid,
            "message": message,
        }
        self.last_uuid = entry_uuid
        self.history.append(entry)
        if self.persist:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            append_line(self.path, entry)


def config_dir() -> str:
    return os.environ.get("CLAUDE_CONFIG_DIR") or os.path.join(os.path.expanduser("~"), ".claude")


def project_dir(cwd: str) -> str:
    # As the real 2.1.197 does: every character but ASCII letters and digits becomes "-".
    return os.path.join(config_dir(), "projects", re.sub(r"[^A-Za-z0-9]", "-", cwd))


def load_transcript(path: str) -> list[JsonObj]:
    history: list[JsonObj] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a torn last line after a kill must not make the session unusable
            if isinstance(entry, dict) and entry.get("type") in ("user", "assistant"):
                history.append(entry)
    return history


def open_session(opts: Options, cwd: str) -> tuple[Session, bool]:
    """Pick or create the session as the real CLI does; returns it and whether it was resumed."""
    pdir = project_dir(cwd)
    persist = not opts.no_persist
    if opts.session_id is not None and not _UUID_RE.fullmatch(opts.session_id):
        raise CliError("Error: Invalid session ID. Must be a valid UUID.")
    if (opts.resume is not None or opts.continue_) and opts.session_id and not opts.fork_session:
        raise CliError(
            "Error: --session-id can only be used with --continue or --resume "
            "if --fork-session is also specified."
        )
    source: str | None = None
    if opts.resume is not None:
        value = opts.resume if isinstance(opts.resume, str) else ""
        if not _UUID_RE.fullmatch(value):
            raise CliError(
                "Error: --resume requires a valid session ID or session title when used with "
                "--print. Usage: claude -p --resume <session-id|title>. Provided value "
                f'"{value}" is not a UUID and does not match any session title.'
            )
        source = value
        if not os.path.exists(os.path.join(pdir, value + ".jsonl")):
            raise CliError(f"No conversation found with session ID: {value}")
    elif opts.continue_:
        try:
            names = [n for n in os.listdir(pdir) if n.endswith(".jsonl")]
        except FileNotFoundError:
            names = []
        if not names:
            raise CliError("No conversation found to continue")
        names.sort(key=lambda n: os.path.getmtime(os.path.join(pdir, n)))
        source = names[-1][: -len(".jsonl")]
    if source is None:
        sid = opts.session_id or new_uuid()
        path = os.path.join(pdir, sid + ".jsonl")
        if opts.session_id and os.path.exists(path):
            raise CliError(f"Error: Session ID {sid} is already in use.")
        return Session(sid, path, [], persist), False
    history = load_transcript(os.path.join(pdir, source + ".jsonl"))
    if not opts.fork_session:
        return Session(source, os.path.join(pdir, source + ".jsonl"), history, persist), True
    sid = opts.session_id or new_uuid()
    forked = Session(sid, os.path.join(pdir, sid + ".jsonl"), [], persist)
    for entry in history:
        forked.append(entry["type"], entry.get("message", {}))
    return forked, True


# --------------------------------------------------------------------------- stdin


def read_prompt_stdin() -> str:
    """Read all of stdin like the real CLI: give up with a warning if nothing comes within 3 s."""
    try:
        if os.isatty(0):
            return ""
        ready, _, _ = select.select([0], [], [], 3.0)
    except (OSError, ValueError):
        return ""  # stdin closed
    if not ready:
        err(
            "Warning: no stdin data received in 3s, proceeding without it. If piping from a "
            "slow command, redirect stdin explicitly: < /dev/null to skip, or wait longer."
        )
        return ""
    chunks = []
    while True:
        chunk = os.read(0, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


class LineReader:
    """Reads stdin lines with select() so waiting for input never blocks past a deadline.

    Warm mode needs this: a turn sleeping on ``[[sleep:S]]`` must still notice an interrupt
    request arriving on stdin.
    """

    def __init__(self) -> None:
        self.buf = b""
        self.lines: list[bytes] = []
        self.eof = False

    def poll(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` (None: forever) for more input and split it into lines."""
        if self.eof:
            if timeout:
                time.sleep(timeout)
            return
        ready, _, _ = select.select([0], [], [], timeout)
        if not ready:
            return
        chunk = os.read(0, 1 << 20)
        if not chunk:
            self.eof = True
            if self.buf.strip():
                self.lines.append(self.buf)
            self.buf = b""
            return
        self.buf += chunk
        *complete, self.buf = self.buf.split(b"\n")
        self.lines.extend(line for line in complete if line.strip())

    def next_line(self) -> bytes | None:
        """The next complete line, blocking; None once stdin is closed and drained."""
        while not self.lines:
            if self.eof:
                return None
            self.poll(None)
        return self.lines.pop(0)


# --------------------------------------------------------------------------- the fake "model"


def model_info(opts: Options, resumed: bool) -> tuple[str, str, int]:
    """(id sent to the API, id shown in init/modelUsage, context window), as measured.

    Without --model the real CLI shows the default as "claude-opus-4-8[1m]" (1M context), but
    as plain "claude-opus-4-8" on a resumed run.
    """
    if opts.model is None:
        if resumed:
            return _DEFAULT_MODEL, _DEFAULT_MODEL, 200_000
        return _DEFAULT_MODEL, _DEFAULT_MODEL + "[1m]", 1_000_000
    model = _MODEL_ALIASES.get(opts.model, opts.model)
    return model, model, 200_000


def prices(model: str) -> tuple[float, float]:
    """USD per million (input, output) tokens."""
    if "sonnet" in model:
        return 3.0, 15.0
    if "haiku" in model:
        return 1.0, 5.0
    return 5.0, 25.0


def result_usage(input_tokens: int, output_tokens: int) -> JsonObj:
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
        "server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 0},
        "service_tier": "standard",
        "cache_creation": {"ephemeral_1h_input_tokens": 0, "ephemeral_5m_input_tokens": 0},
        "inference_geo": "",
        "iterations": [],
        "speed": "standard",
    }


def api_error_text(code: str) -> tuple[int | None, str, str]:
    """(api_error_status, result text, stream "error" tag) for an ``[[error:code]]`` marker."""
    if code == "connect":
        return None, "API Error: Unable to connect to API (ConnectionRefused)", "server_error"
    if code == "login":
        # Measured with 2.1.197 and no ANTHROPIC_API_KEY: no API call, status null.
        return None, "Not logged in · Please run /login", "authentication_failed"
    status = int(code) if code.isdigit() else 500
    if status == 401:
        return status, "Failed to authenticate. API Error: 401 fake error", "authentication_failed"
    if status == 429:
        return status, "API Error: Request rejected (429) · fake error", "rate_limit"
    if status >= 500:
        return (
            status,
            f"API Error: {status} fake error. This is a server-side issue, usually temporary — "
            "try again in a moment. If it persists, check your inference gateway (127.0.0.1:1).",
            "server_error",
        )
    return status, f"API Error: {status} fake error", "unknown"


class Interrupted(Exception):
    """A control_request interrupt arrived while the turn was waiting."""


class Fake:
    """Process-wide state: options, the session, output plumbing and the turn engine."""

    def __init__(self, opts: Options, session: Session, resumed: bool, cwd: str) -> None:
        self.opts = opts
        self.session = session
        self.cwd = cwd
        self.api_model, self.shown_model, self.context_window = model_info(opts, resumed)
        self.stream = opts.output_format == "stream-json"
        self.warm = opts.input_format == "stream-json"
        # `--output-format json --verbose` prints every message as one JSON array at the end.
        self.collect: list[JsonObj] | None = (
            [] if opts.output_format == "json" and opts.verbose else None
        )
        self.reader: LineReader | None = LineReader() if self.warm else None
        self.deferred: list[JsonObj] = []  # user messages that arrived during a turn
        # duration_api_ms, total_cost_usd and modelUsage are cumulative over a warm process.
        self.api_ms_total = 0
        self.cost_total = 0.0
        self.model_usage: JsonObj = {}

    # ---- output

    def emit(self, obj: JsonObj) -> None:
        """One stream-json line (flushed at once), or one element of the verbose json array."""
        if self.collect is not None:
            self.collect.append(obj)
        elif self.stream:
            write_fd(1, (dumps(obj) + "\n").encode())

    def finish(self, result: JsonObj, text_out: str) -> None:
        """Print the end of a turn in the chosen output format."""
        if self.stream:
            self.emit(result)
        elif self.collect is not None:
            self.collect.append(result)
            write_fd(1, (dumps(self.collect) + "\n").encode())
            self.collect = []
        elif self.opts.output_format == "json":
            write_fd(1, (dumps(result) + "\n").encode())
        else:
            write_fd(1, text_out.encode())

    def init_line(self) -> JsonObj:
        analytics_off = bool(
            os.environ.get("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC")
            or os.environ.get("DISABLE_TELEMETRY")
        )
        return {
            "type": "system",
            "subtype": "init",
            "cwd": self.cwd,
            "session_id": self.session.session_id,
            "tools": self.tool_list(),
            "mcp_servers": [],
            "model": self.shown_model,
            "permissionMode": self.opts.permission_mode,
            "slash_commands": _SLASH_COMMANDS,
            "apiKeySource": "ANTHROPIC_API_KEY" if os.environ.get("ANTHROPIC_API_KEY") else "none",
            "claude_code_version": VERSION,
            "output_style": "default",
            "agents": _AGENTS,
            "skills": _SKILLS,
            "plugins": [],
            "analytics_disabled": analytics_off,
            "product_feedback_disabled": analytics_off,
            "uuid": new_uuid(),
            "memory_paths": {"auto": os.path.join(project_dir(self.cwd), "memory") + "/"},
            "fast_mode_state": "off",
        }

    # ---- tools

    def tool_list(self) -> list[str]:
        opts = self.opts
        if opts.tools is None or "default" in opts.tools:
            tools = list(_DEFAULT_TOOLS)
        else:
            tools = [tool_name(t) for t in opts.tools]
        denied = {tool_name(t) for t in opts.disallowed_tools or []}
        if "Bash" in denied and tools == list(_DEFAULT_TOOLS):
            # Measured: without Bash the real CLI offers Glob and Grep instead.
            tools += ["Glob", "Grep"]
        kept = sorted(t for t in tools if t not in denied and t != "Task")
        return (["Task"] if "Task" in tools and "Task" not in denied else []) + kept

    def tool_allowed(self, name: str) -> bool:
        """Denied when --disallowedTools names it, or --tools / --allowedTools leave it out."""
        opts = self.opts
        if name in {tool_name(t) for t in opts.disallowed_tools or []}:
            return False
        offered = opts.tools is None or "default" in opts.tools
        if not offered and name not in {tool_name(t) for t in opts.tools or []}:
            return False
        if opts.allowed_tools and opts.permission_mode != "bypassPermissions":
            return name in {tool_name(t) for t in opts.allowed_tools}
        return True

    def asks_first(self, name: str) -> bool:
        """With ``--permission-prompt-tool stdio`` the parent is asked before a tool that
        changes things (or one --allowedTools leaves out) runs, as the real CLI does."""
        opts = self.opts
        if opts.permission_prompt_tool != "stdio" or opts.permission_mode == "bypassPermissions":
            return False
        if name in {tool_name(t) for t in opts.allowed_tools or []}:
            return False
        return name in _ASKING_TOOLS or bool(opts.allowed_tools)

    def ask_permission(self, name: str, arg: str, tool_id: str, tool_input: JsonObj) -> JsonObj:
        """The can_use_tool control request, and the parent's answer (its ``response``)."""
        request_id = new_uuid()
        asked_at = time.time()  # before the write: bench R1 times the relay from here
        write_fd(
            1,
            (
                dumps(
                    {
                        "type": "control_request",
                        "request_id": request_id,
                        "request": {
                            "subtype": "can_use_tool",
                            "tool_name": name,
                            "display_name": name,
                            "input": tool_input,
                            "description": f"fake {name} call",
                            "tool_use_id": tool_id,
                            "permission_suggestions": [
                                {
                                    "type": "addRules",
                                    "rules": [{"toolName": name, "ruleContent": arg}],
                                    "behavior": "allow",
                                    "destination": "session",
                                }
                            ],
                        },
                    }
                )
                + "\n"
            ).encode(),
        )
        log_event({"pid": os.getpid(), "permission_asked": request_id, "time": asked_at})
        if self.reader is None:
            return {"behavior": "deny", "message": "no stdin to ask on"}
        while True:
            while self.reader.lines:
                msg = self.parse_line(self.reader.lines.pop(0))
                if msg is None:
                    continue
                kind = msg.get("type")
                if kind == "control_response":
                    response = msg.get("response") or {}
                    if response.get("request_id") == request_id:
                        log_event({"permission_answered": request_id, "time": time.time()})
                        if response.get("subtype") != "success":
                            return {"behavior": "deny", "message": str(response.get("error"))}
                        answer = response.get("response")
                        return answer if isinstance(answer, dict) else {"behavior": "deny"}
                elif kind == "control_request":
                    if self.control(msg):
                        raise Interrupted
                else:
                    self.deferred.append(msg)
            if self.reader.eof:
                return {"behavior": "deny", "message": "stdin closed"}
            self.reader.poll(None)

    # ---- waiting and warm-mode input

    def wait(self, seconds: float) -> None:
        """Sleep like a slow API call; in warm mode keep serving stdin and honour interrupts."""
        if self.reader is None:
            time.sleep(seconds)
            return
        deadline = time.monotonic() + seconds
        while True:
            while self.reader.lines:
                msg = self.parse_line(self.reader.lines.pop(0))
                if msg is None:
                    continue
                if msg.get("type") == "control_request":
                    if self.control(msg):
                        raise Interrupted
                else:
                    self.deferred.append(msg)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self.reader.poll(remaining)

    def parse_line(self, line: bytes) -> JsonObj | None:
        text = line.decode("utf-8", errors="replace")
        try:
            msg = json.loads(text)
        except ValueError as exc:
            # Measured: the real CLI gives up on the whole stream, exit 1.
            err(f"Error parsing streaming input line: {text}: {exc}")
            os._exit(1)
        if not isinstance(msg, dict):
            err(f"Error parsing streaming input line: {text}: not a JSON object")
            return None
        return msg

    def control(self, msg: JsonObj) -> bool:
        """Answer a control_request; True when it is an interrupt."""
        request = msg.get("request") or {}
        subtype = request.get("subtype")
        response: JsonObj = {"subtype": "success", "request_id": msg.get("request_id")}
        if subtype != "interrupt":
            response = {
                "subtype": "error",
                "request_id": msg.get("request_id"),
                "error": f"fake claude does not support control request {subtype!r}",
            }
        write_fd(1, (dumps({"type": "control_response", "response": response}) + "\n").encode())
        return subtype == "interrupt"

    def serve_warm(self) -> int:
        """Warm mode: one user message per stdin line until stdin closes. The exit code is
        then the last turn's, as a one-shot run of it would end (measured with 2.1.197:
        an API error result, then stdin closed -> exit 1; a later good turn -> exit 0)."""
        assert self.reader is not None
        code = 0
        while True:
            if self.deferred:
                msg: JsonObj | None = self.deferred.pop(0)
            else:
                line = self.reader.next_line()
                if line is None:
                    return code
                msg = self.parse_line(line)
            if msg is None:
                continue
            kind = msg.get("type")
            if kind == "control_request":
                self.control(msg)  # an interrupt while idle only gets its success response
            elif kind == "user":
                code = self.run_turn(message_text(msg))
            # other line types (keep_alive, ...) are ignored, as the real CLI does

    # ---- one turn

    def run_turn(self, prompt: str) -> int:
        """Answer one prompt; returns the exit code a one-shot run would end with."""
        t0 = time.monotonic()
        log_event({"pid": os.getpid(), "turn_prompt": prompt, "time": time.time()})
        triggers: dict[str, str] = {}
        for m in _TRIGGER_RE.finditer(prompt):
            triggers.setdefault(m.group(1), m.group(2) or "")
        self.side_effects(triggers)
        # The real CLI stores the prompt before calling the API: a run killed mid-turn keeps it.
        self.session.append("user", {"role": "user", "content": prompt})
        turn_no = self.session.user_turns()
        self.emit(self.init_line())  # every turn, warm or not, as the real CLI does
        if self.opts.include_partial and self.stream:
            self.emit(
                {
                    "type": "system",
                    "subtype": "status",
                    "status": "requesting",
                    "uuid": new_uuid(),
                    "session_id": self.session.session_id,
                }
            )
        if "hang" in triggers:
            time.sleep(number(triggers["hang"]))  # a stuck CLI: stdin is not read meanwhile
        try:
            if "pause" in triggers:
                self.model_message([{"type": "text", "text": "working on it"}], 3000, 4)
                self.wait(number(triggers["pause"]))
            if "sleep" in triggers:
                self.wait(number(triggers["sleep"]))
        except Interrupted:
            self.interrupted(t0)
            return 1
        if "error" in triggers:
            return self.api_error(t0, triggers["error"])
        if "flaky" in triggers and flaky_fails(triggers["flaky"]):
            return self.api_error(t0, triggers["flaky"].split(":", 1)[0])
        if "max-turns" in triggers:
            return self.max_turns(t0)
        if "tool" in triggers:
            try:
                return self.tool_turn(t0, triggers["tool"], triggers.get("say"))
            except Interrupted:  # while it waited for a permission answer
                self.interrupted(t0)
                return 1
        if "huge" in triggers:
            reply = "x" * int(number(triggers["huge"]))
        else:
            reply = f"echo: {prompt.strip()} (turn {turn_no})"
        if "end" in triggers:
            reply += "\n[END]"
        in_tok = self.session.history_chars() // 4 + 3000
        out_tok = max(1, len(reply) // 4)
        message = self.model_message([{"type": "text", "text": reply}], in_tok, out_tok)
        self.session.append("assistant", {**message, "stop_reason": "end_turn"})
        self.success(t0, reply, 1, in_tok, out_tok, [])
        return 0

    def side_effects(self, triggers: dict[str, str]) -> None:
        """Markers that act on the process rather than on the answer."""
        if "pidfile" in triggers:
            write_pid_file(triggers["pidfile"], os.getpid())
        if "ignore-sigterm" in triggers:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if "grandchild" in triggers:
            import subprocess  # only here: it adds ~10 ms to every start otherwise

            # Same process group, inherited stdout/stderr: the supervisor must kill the group,
            # and a reader waiting for EOF only gets it once the grandchild is gone too.
            child = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL)
            write_pid_file(triggers["grandchild"], child.pid)
        if "stderr" in triggers:
            remaining = int(number(triggers["stderr"]))
            line = b"stderr noise " + b"e" * 86 + b"\n"  # 100 bytes
            while remaining > 0:
                piece = line[-remaining:] if remaining < len(line) else line
                write_fd(2, piece)
                remaining -= len(piece)
        if "crash" in triggers:
            err(
                "Traceback (most recent call last):\n"
                '  File "fake_claude.py", line 1, in <module>\n'
                "    simulate_crash()\n"
                "fatal: simulated crash"
            )
            os._exit(int(number(triggers["crash"], 1)))
        if "bad-json" in triggers:
            write_fd(1, b"this is not json\n")
            os._exit(0)

    def model_message(self, content: list[JsonObj], in_tok: int, out_tok: int) -> JsonObj:
        """Emit one API message (with partial events if asked); returns the message."""
        msg_id = "msg_" + os.urandom(12).hex()
        usage = {
            "input_tokens": in_tok,
            "output_tokens": out_tok,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }
        message: JsonObj = {
            "id": msg_id,
            "type": "message",
            "role": "assistant",
            "model": self.api_model,
            "content": content,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
            "context_management": None,
        }
        partial = self.opts.include_partial and self.stream
        if partial:
            start_msg = {**message, "content": [], "usage": {**usage, "output_tokens": 1}}
            del start_msg["context_management"]
            self.stream_event({"type": "message_start", "message": start_msg}, ttft=True)
            for index, block in enumerate(content):
                self.partial_block(index, block)
        self.emit(
            {
                "type": "assistant",
                "message": message,
                "parent_tool_use_id": None,
                "session_id": self.session.session_id,
                "uuid": new_uuid(),
            }
        )
        if partial:
            for index in range(len(content)):
                self.stream_event({"type": "content_block_stop", "index": index})
            stop = "tool_use" if content and content[-1]["type"] == "tool_use" else "end_turn"
            self.stream_event(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop, "stop_sequence": None},
                    "usage": {"output_tokens": out_tok},
                }
            )
            self.stream_event({"type": "message_stop"})
        return message

    def partial_block(self, index: int, block: JsonObj) -> None:
        if block["type"] == "text":
            self.stream_event(
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {"type": "text", "text": ""},
                }
            )
            text = block["text"]
            for i in range(0, len(text), 16):  # the stub API streams 16-character pieces
                self.stream_event(
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "text_delta", "text": text[i : i + 16]},
                    }
                )
        else:
            start = {**block, "input": {}}
            self.stream_event(
                {"type": "content_block_start", "index": index, "content_block": start}
            )
            self.stream_event(
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": dumps(block["input"])},
                }
            )

    def stream_event(self, event: JsonObj, ttft: bool = False) -> None:
        line: JsonObj = {
            "type": "stream_event",
            "event": event,
            "session_id": self.session.session_id,
            "parent_tool_use_id": None,
            "uuid": new_uuid(),
        }
        if ttft:
            line["ttft_ms"] = 1
        self.emit(line)

    def timing(self, t0: float, api_call: bool = True) -> tuple[int, int]:
        """(duration_ms, duration_api_ms) for a turn that started at ``t0``.

        Only turns that got a model answer count as API time, which the real CLI sums over
        the whole life of a warm process.
        """
        elapsed = int((time.monotonic() - t0) * 1000)
        if api_call:
            self.api_ms_total += elapsed
        return elapsed + 1, self.api_ms_total

    def costed(self, in_tok: int, out_tok: int) -> tuple[float, JsonObj]:
        """Add one API call to the process totals; returns (total_cost_usd, modelUsage)."""
        p_in, p_out = prices(self.api_model)
        cost = in_tok * p_in / 1e6 + out_tok * p_out / 1e6
        self.cost_total += cost
        stats = self.model_usage.setdefault(
            self.shown_model,
            {
                "inputTokens": 0,
                "outputTokens": 0,
                "cacheReadInputTokens": 0,
                "cacheCreationInputTokens": 0,
                "webSearchRequests": 0,
                "costUSD": 0.0,
                "contextWindow": self.context_window,
                "maxOutputTokens": 64000,
            },
        )
        stats["inputTokens"] += in_tok
        stats["outputTokens"] += out_tok
        stats["costUSD"] += cost
        return self.cost_total, self.totals()[1]

    def totals(self) -> tuple[float, JsonObj]:
        """(total_cost_usd, modelUsage) so far: what results without an API call report."""
        return self.cost_total, json.loads(json.dumps(self.model_usage))

    def success(
        self,
        t0: float,
        reply: str,
        num_turns: int,
        in_tok: int,
        out_tok: int,
        denials: list[JsonObj],
    ) -> None:
        duration, api_ms = self.timing(t0)
        cost, model_usage = self.costed(in_tok, out_tok)
        self.finish(
            {
                "type": "result",
                "subtype": "success",
                "is_error": False,
                "api_error_status": None,
                "duration_ms": duration,
                "duration_api_ms": api_ms,
                "ttft_ms": duration,
                "ttft_stream_ms": duration,
                "time_to_request_ms": 0,
                "num_turns": num_turns,
                "result": reply,
                "stop_reason": "end_turn",
                "session_id": self.session.session_id,
                "total_cost_usd": cost,
                "usage": result_usage(in_tok, out_tok),
                "modelUsage": model_usage,
                "permission_denials": denials,
                "terminal_reason": "completed",
                "fast_mode_state": "off",
                "uuid": new_uuid(),
            },
            reply + "\n",
        )

    def api_error(self, t0: float, code: str) -> int:
        status, text, tag = api_error_text(code)
        zero = result_usage(0, 0)
        # In stream-json the real CLI first shows the error as a "<synthetic>" assistant line.
        self.emit(
            {
                "type": "assistant",
                "message": {
                    "id": new_uuid(),
                    "container": None,
                    "model": "<synthetic>",
                    "role": "assistant",
                    "stop_details": None,
                    "stop_reason": "stop_sequence",
                    "stop_sequence": "",
                    "type": "message",
                    "usage": {
                        "input_tokens": 0,
                        "output_tokens": 0,
                        **zero,
                        "service_tier": None,
                        "inference_geo": None,
                        "iterations": None,
                        "speed": None,
                    },
                    "content": [{"type": "text", "text": text}],
                    "context_management": None,
                },
                "parent_tool_use_id": None,
                "session_id": self.session.session_id,
                "uuid": new_uuid(),
                "error": tag,
            }
        )
        duration, _ = self.timing(t0, api_call=False)
        total, model_usage = self.totals()
        self.finish(
            {
                "type": "result",
                "subtype": "success",  # sic: API errors keep subtype "success"
                "is_error": True,
                "api_error_status": status,
                "duration_ms": duration,
                "duration_api_ms": self.api_ms_total,
                "num_turns": 1,
                "result": text,
                "stop_reason": "stop_sequence",
                "session_id": self.session.session_id,
                "total_cost_usd": total,
                "usage": zero,
                "modelUsage": model_usage,
                "permission_denials": [],
                "terminal_reason": "completed",
                "fast_mode_state": "off",
                "uuid": new_uuid(),
            },
            text + "\n",
        )
        return 1

    def tool_call(
        self, name: str, arg: str, in_tok: int, say: str | None = None
    ) -> tuple[JsonObj, str, JsonObj | None]:
        """Emit the tool_use (after a text block ``say``, if given) and tool_result lines;
        returns (input, result text, denial)."""
        tool_id = "toolu_" + os.urandom(12).hex()
        tool_input: JsonObj = (
            {"command": arg, "description": "fake tool call"} if name == "Bash" else {"input": arg}
        )
        blocks: list[JsonObj] = [{"type": "text", "text": say}] if say else []
        blocks.append({"type": "tool_use", "id": tool_id, "name": name, "input": tool_input})
        log_event({"tool_use": tool_id, "time": time.time()})
        self.model_message(blocks, in_tok, max(1, len(dumps(tool_input)) // 4))
        denial: JsonObj | None = None
        refusal = f"Claude requested permissions to use {name}, but you haven't granted it yet."
        allowed = self.tool_allowed(name)
        if self.asks_first(name) and name in set(self.tool_list()):
            answer = self.ask_permission(name, arg, tool_id, tool_input)
            allowed = answer.get("behavior") == "allow"
            if allowed and isinstance(answer.get("updatedInput"), dict):
                tool_input = answer["updatedInput"]
                arg = str(tool_input.get("command" if name == "Bash" else "input", arg))
            elif not allowed:
                refusal = str(answer.get("message") or "denied")
        if allowed:
            content = arg
            block: JsonObj = {
                "tool_use_id": tool_id,
                "type": "tool_result",
                "content": content,
                "is_error": False,
            }
            extra: object = {
                "stdout": arg,
                "stderr": "",
                "interrupted": False,
                "isImage": False,
                "noOutputExpected": False,
            }
        else:
            content = refusal
            # Same keys as above, in the order the real CLI prints for a refused call.
            block = {
                "type": "tool_result",
                "content": content,
                "is_error": True,
                "tool_use_id": tool_id,
            }
            extra = "Error: " + content
            denial = {"tool_name": name, "tool_use_id": tool_id, "tool_input": tool_input}
        self.emit(
            {
                "type": "user",
                "message": {"role": "user", "content": [block]},
                "parent_tool_use_id": None,
                "session_id": self.session.session_id,
                "uuid": new_uuid(),
                "timestamp": now_iso(),
                "tool_use_result": extra,
            }
        )
        return tool_input, content, denial

    def tool_turn(self, t0: float, spec: str, say: str | None = None) -> int:
        name, _, arg = spec.partition(":")
        in_tok = self.session.history_chars() // 4 + 3000
        tool_input, content, denial = self.tool_call(name or "Bash", arg, in_tok, say)
        out1 = max(1, len(dumps(tool_input)) // 4)
        budget = self.budget_value()
        if budget is not None:
            # Measured (2.1.197): the budget is checked after each model call, against what
            # the process has spent; a tool turn over it ends before its second call. (The
            # real CLI does not run the tool it asked for then; the fake already has.)
            p_in, p_out = prices(self.api_model)
            if self.cost_total + (in_tok * p_in + out1 * p_out) / 1e6 >= budget:
                return self.over_budget(t0, budget, in_tok, out1)
        max_turns = self.max_turns_value()
        if max_turns is not None and max_turns < 2:
            # A tool round trip needs a second model call, which --max-turns 1 forbids.
            return self.max_turns(t0, emitted=True, in_tok=in_tok, out_tok=out1)
        reply = "tool result: " + content
        in2 = in_tok + (len(content) + len(dumps(tool_input))) // 4
        out2 = max(1, len(reply) // 4)
        message = self.model_message([{"type": "text", "text": reply}], in2, out2)
        self.session.append("assistant", {**message, "stop_reason": "end_turn"})
        self.success(t0, reply, 2, in_tok + in2, out1 + out2, [denial] if denial else [])
        return 0

    def budget_value(self) -> float | None:
        try:
            return float(self.opts.max_budget_usd) if self.opts.max_budget_usd else None
        except ValueError:
            return None

    def over_budget(self, t0: float, budget: float, in_tok: int, out_tok: int) -> int:
        message = f"Reached maximum budget (${budget})"
        self.stopped(t0, "error_max_budget_usd", 1, in_tok, out_tok, message, "Error: " + message)
        return 1

    def max_turns_value(self) -> int | None:
        try:
            return int(self.opts.max_turns) if self.opts.max_turns is not None else None
        except ValueError:
            return None  # measured: the real CLI ignores a non-numeric --max-turns

    def max_turns(self, t0: float, emitted: bool = False, in_tok: int = 0, out_tok: int = 0) -> int:
        if not emitted:
            in_tok = self.session.history_chars() // 4 + 3000
            tool_input, _, _ = self.tool_call("Bash", "echo max-turns", in_tok)
            out_tok = max(1, len(dumps(tool_input)) // 4)
        limit = self.max_turns_value() or 1
        self.stopped(
            t0,
            "error_max_turns",
            2,
            in_tok,
            out_tok,
            f"Reached maximum number of turns ({limit})",
            f"Error: Reached max turns ({limit})",  # measured: no trailing newline
            terminal_reason="max_turns",
        )
        return 1

    def stopped(
        self,
        t0: float,
        subtype: str,
        num_turns: int,
        in_tok: int,
        out_tok: int,
        error: str,
        text_out: str,
        terminal_reason: str | None = None,
    ) -> None:
        """The error result of a turn the CLI stopped at a limit (turns, budget)."""
        duration, api_ms = self.timing(t0)
        cost, model_usage = self.costed(in_tok, out_tok)
        result: JsonObj = {
            "type": "result",
            "subtype": subtype,
            "duration_ms": duration,
            "duration_api_ms": api_ms,
            "is_error": True,
            "num_turns": num_turns,
            "stop_reason": "tool_use",
            "session_id": self.session.session_id,
            "total_cost_usd": cost,
            "usage": result_usage(in_tok, out_tok),
            "modelUsage": model_usage,
            "permission_denials": [],
        }
        if terminal_reason is not None:
            result["terminal_reason"] = terminal_reason
        result.update({"fast_mode_state": "off", "uuid": new_uuid(), "errors": [error]})
        self.finish(result, text_out)

    def interrupted(self, t0: float) -> None:
        """The lines the real CLI prints after an interrupt (its control_response went first)."""
        self.emit(
            {
                "type": "user",
                "message": {
                    "role": "user",
                    "content": [{"type": "text", "text": "[Request interrupted by user]"}],
                },
                "parent_tool_use_id": None,
                "session_id": self.session.session_id,
                "uuid": new_uuid(),
                "timestamp": now_iso(),
            }
        )
        duration, _ = self.timing(t0, api_call=False)
        total, model_usage = self.totals()  # measured: the totals so far, not 0
        self.finish(
            {
                "type": "result",
                "subtype": "error_during_execution",
                "duration_ms": duration,
                "duration_api_ms": self.api_ms_total,
                "is_error": True,
                "num_turns": 2,  # sic, measured
                "stop_reason": None,
                "session_id": self.session.session_id,
                "total_cost_usd": total,
                "usage": result_usage(0, 0),
                "modelUsage": model_usage,
                "permission_denials": [],
                "terminal_reason": "aborted_streaming",
                "fast_mode_state": "off",
                "uuid": new_uuid(),
                "errors": [
                    "[ede_diagnostic] result_type=user last_content_type=n/a stop_reason=null"
                ],
            },
            "",
        )


def message_text(msg: JsonObj) -> str:
    """The prompt text of a stream-json user message (content is a string or text blocks)."""
    content = (msg.get("message") or {}).get("content", "")
    if isinstance(content, str):
        return content
    return "\n".join(
        b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text"
    )


# --------------------------------------------------------------------------- entry point


def validate(opts: Options) -> None:
    """Flag combinations the real CLI rejects before doing anything."""
    if opts.output_format == "stream-json" and not opts.verbose:
        raise CliError("Error: When using --print, --output-format=stream-json requires --verbose")
    if opts.input_format == "stream-json" and opts.output_format != "stream-json":
        raise CliError("Error: --input-format=stream-json requires output-format=stream-json.")


def main(argv: list[str]) -> int:
    log_event(
        {
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "argv": argv,
            "cwd": os.getcwd(),
            "env_CLAUDECODE": os.environ.get("CLAUDECODE"),
            "stdin_is_tty": os.isatty(0),
            "time": time.time(),
        }
    )
    # Like the real CLI: SIGTERM ends the process at once with 143 and prints nothing.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    opts = parse_args(argv[1:])
    if opts.version:
        write_fd(1, f"{VERSION} (Claude Code)\n".encode())
        return 0
    if opts.help:
        write_fd(1, _HELP.encode())
        return 0
    # Not being interactive, the fake always runs in print mode, as the real CLI does when
    # stdout is not a terminal.
    delay = float(os.environ.get("FAKE_CLAUDE_START_DELAY") or 0)
    if delay > 0:
        time.sleep(delay)
    validate(opts)
    cwd = os.getcwd()
    session, resumed = open_session(opts, cwd)
    fake = Fake(opts, session, resumed, cwd)
    if fake.warm:
        return fake.serve_warm()
    prompt = read_prompt_stdin()
    if opts.prompt_arg is not None:
        prompt = opts.prompt_arg + ("\n" + prompt if prompt else "")
    if not prompt:
        raise CliError(
            "Error: Input must be provided either through stdin or as a prompt argument "
            "when using --print"
        )
    if not prompt.strip():
        raise CliError("Error: No messages returned from query")
    return fake.run_turn(prompt)


def run() -> NoReturn:
    try:
        code = main(sys.argv)
    except CliError as exc:
        err(exc.message)
        code = exc.code
    # os._exit skips interpreter teardown (~5 ms); all output went out through os.write.
    os._exit(code)


if __name__ == "__main__":
    run()
