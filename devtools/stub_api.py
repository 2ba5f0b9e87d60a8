"""Loopback-only stub of the Anthropic Messages API, for driving the real Claude Code CLI offline.

The real CLI (``ANTHROPIC_BASE_URL=http://127.0.0.1:<port>``) talks to this server instead of
Anthropic. Answers are deterministic so tests can assert on them:

* ``POST /v1/messages`` (any query string, e.g. ``?beta=true``) replies ``echo: <last user text>``,
  streamed as chunked SSE when ``stream`` is true, else as one JSON message. ``<system-reminder>``
  text blocks are skipped, and ``role: "system"`` entries inside ``messages`` are accepted (the
  CLI sends them; see claude-cli.md §3). After a ``tool_result`` the reply is
  ``tool result: <first 4000 characters of the result>``.
* Prompt triggers in the last user text: ``[[error:N]]`` (HTTP N with an Anthropic error body),
  ``[[sleep:S]]`` (delay before answering), ``[[bash:CMD]]`` (a Bash tool_use, only when the
  request offers a tool named Bash), ``[[tool:NAME:JSON]]`` (a tool_use of NAME with that input);
  with either, ``[[say:TEXT]]`` puts a text block TEXT before the tool_use, as models do.
  ``[[then:NAME:JSON]]`` next to a ``[[tool:...]]``: after the first tool's result, a second
  tool_use, NAME with that input, in which ``{{result.KEY}}`` is replaced by KEY of the first
  result read as JSON (a model that starts a sub-task and then waits for it).
* Scripted failures for the whole server: the next K message requests fail with status N,
  optionally with a ``retry-after`` header.
* ``HEAD /`` (the CLI's preconnect probe) answers 200; ``GET /v1/models`` and
  ``POST /v1/messages/count_tokens`` give minimal answers; every other path is a 404
  ``not_found_error``.

Every request is kept in memory and, when a log path is given, appended as one JSON line.
The server binds 127.0.0.1 only; there is deliberately no option to change that.

Command line::

    python -m devtools.stub_api --port 0 --port-file F --log L.jsonl \
        [--fail-status N --fail-count K --retry-after S]

In tests::

    with StubAPI() as api:
        env["ANTHROPIC_BASE_URL"] = api.url
        ...
        assert api.requests()[-1]["path"] == "/v1/messages"
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, TextIO
from urllib.parse import urlsplit

__all__ = ["ERROR_TYPES", "HOST", "StubAPI", "main"]

# The only address this server ever binds. Not configurable on purpose: the stub must never be
# reachable from outside the machine.
HOST = "127.0.0.1"

# Environment that keeps the real CLI offline, quiet and single-attempt when it talks to this
# stub (claude-cli.md §2, §6): no telemetry, update checks or error reports (zero DNS lookups
# with CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC), and one API attempt instead of ~3 minutes of
# retries against a failing stub. Tests, the demo and the benchmarks all use it.
OFFLINE_CLI_ENV = {
    "ANTHROPIC_API_KEY": "dummy",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "CLAUDE_CODE_MAX_RETRIES": "0",
}

# Anthropic error `type` per HTTP status. Statuses not listed map by class (see _error_type).
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}

DEFAULT_MODEL = "claude-opus-4-8"
TEXT_PIECE = 16  # characters per text_delta, as the real API streams small pieces
JSON_PIECE = 16  # characters per input_json_delta
TOOL_RESULT_PREVIEW = 4000
SYSTEM_REMINDER = "<system-reminder>"
# Headers whose values are secrets; they are replaced in the log.
REDACTED_HEADERS = frozenset({"x-api-key", "authorization"})

_ERROR_RE = re.compile(r"\[\[error:(\d{3})\]\]")
_SLEEP_RE = re.compile(r"\[\[sleep:(\d+(?:\.\d+)?)\]\]")
_BASH_RE = re.compile(r"\[\[bash:(.*?)\]\]", re.DOTALL)
_SAY_RE = re.compile(r"\[\[say:(.*?)\]\]", re.DOTALL)
_TOOL_START_RE = re.compile(r"\[\[tool:([A-Za-z0-9_.\-]+):")
_THEN_START_RE = re.compile(r"\[\[then:([A-Za-z0-9_.\-]+):")
_RESULT_REF_RE = re.compile(r"\{\{result\.([A-Za-z0-9_]+)\}\}")


def _error_type(status: int) -> str:
    """Return the Anthropic error type for an HTTP status."""
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, message: str) -> dict[str, Any]:
    """Build the JSON body the real API sends with an error status."""
    return {"type": "error", "error": {"type": _error_type(status), "message": message}}


def _estimate_tokens(text: str) -> int:
    # About four characters per token is close enough for cost fields and is deterministic.
    return max(1, (len(text) + 3) // 4)


def _digest(data: bytes, size: int = 24) -> str:
    return hashlib.sha256(data).hexdigest()[:size]


# --------------------------------------------------------------------------- request analysis


def _blocks(content: Any) -> list[dict[str, Any]]:
    """Normalise message content (a string or a list of blocks) to a list of blocks."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return [b for b in content if isinstance(b, dict)]
    return []


def _tool_result_text(content: Any) -> str:
    """Flatten a tool_result's content (a string or a list of text blocks) to text."""
    if isinstance(content, str):
        return content
    parts = [b.get("text", "") for b in _blocks(content) if b.get("type") == "text"]
    return "\n".join(p for p in parts if isinstance(p, str))


def _last_user_message(body: dict[str, Any]) -> dict[str, Any] | None:
    # The CLI puts `role: "system"` entries after the user turn (mid-conversation-system beta),
    # so the last message is not necessarily the one to answer.
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return message
    return None


def _offered_tools(body: dict[str, Any]) -> set[str]:
    tools = body.get("tools")
    if not isinstance(tools, list):
        return set()
    return {t["name"] for t in tools if isinstance(t, dict) and isinstance(t.get("name"), str)}


def _find_tool_trigger(
    text: str, start_re: re.Pattern[str] = _TOOL_START_RE, result: str | None = None
) -> tuple[str, dict[str, Any]] | None:
    """Find ``[[tool:NAME:JSON]]`` (or with ``start_re``, ``[[then:NAME:JSON]]``); the JSON
    itself may contain ``]]``, so try each end. ``{{result.KEY}}`` refers to ``result``."""
    match = start_re.search(text)
    if match is None:
        return None
    start = match.end()
    end = text.find("]]", start)
    while end != -1:
        try:
            value = json.loads(_fill_refs(text[start:end], result))
        except ValueError:
            end = text.find("]]", end + 1)
            continue
        if isinstance(value, dict):
            return match.group(1), value
        return None
    return None


def _fill_refs(raw: str, result: str | None) -> str:
    if result is None or "{{result." not in raw:
        return raw
    try:
        fields = json.loads(result)
    except ValueError:
        fields = {}
    if not isinstance(fields, dict):
        fields = {}
    return _RESULT_REF_RE.sub(lambda m: str(fields.get(m.group(1), "")), raw)


def _chained_tool(body: dict[str, Any], result: str) -> tuple[str, dict[str, Any]] | None:
    """After the first tool round of a prompt with ``[[then:...]]``: its second tool_use."""
    messages = body.get("messages")
    rounds = 0
    for message in reversed(messages if isinstance(messages, list) else []):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        blocks = _blocks(message.get("content"))
        texts = [
            b["text"]
            for b in blocks
            if b.get("type") == "text"
            and isinstance(b.get("text"), str)
            and not b["text"].lstrip().startswith(SYSTEM_REMINDER)
        ]
        if texts:  # the prompt
            return _find_tool_trigger(texts[-1], _THEN_START_RE, result) if rounds == 1 else None
        if any(b.get("type") == "tool_result" for b in blocks):
            rounds += 1
    return None


class Plan:
    """What the stub will answer to one ``/v1/messages`` request."""

    def __init__(self) -> None:
        self.status = 200
        self.error_message = ""
        self.retry_after: float | None = None
        self.sleep_s = 0.0
        self.text = ""
        self.tool: tuple[str, dict[str, Any]] | None = None
        self.say = ""  # text before the tool_use
        self.notes: list[str] = []


def plan_reply(body: dict[str, Any]) -> Plan:
    """Decide the reply to a messages request from its last user message."""
    plan = Plan()
    message = _last_user_message(body)
    blocks = _blocks(message.get("content")) if message else []
    last_result = max(
        (i for i, b in enumerate(blocks) if b.get("type") == "tool_result"), default=-1
    )
    texts = [
        b["text"]
        for b in blocks[last_result + 1 :]
        if b.get("type") == "text"
        and isinstance(b.get("text"), str)
        and not b["text"].lstrip().startswith(SYSTEM_REMINDER)
    ]
    if last_result >= 0 and not texts:
        # A tool round trip: answer the result and never re-read triggers, so a
        # `[[bash:…]]` prompt cannot loop forever. (Text after the tool_result means a new
        # prompt instead: after an interrupted tool the CLI sends the rejected tool_result,
        # "[Request interrupted by user for tool use]" and the next prompt in one message.)
        first = next(b for b in blocks if b.get("type") == "tool_result")
        result = _tool_result_text(first.get("content"))
        if then := _chained_tool(body, result):
            plan.tool = then
            plan.notes.append(f"then tool_use {then[0]}")
            return plan
        plan.text = f"tool result: {result[:TOOL_RESULT_PREVIEW]}"
        plan.notes.append("after tool_result")
        return plan

    plan.text = "echo: " + "\n".join(texts)
    # Triggers are read from the newest text block only. After an interrupt the CLI merges the
    # interrupted prompt, "[Request interrupted by user]" and the next prompt into one user
    # message; the old prompt's triggers must not fire again.
    user_text = texts[-1] if texts else ""

    if sleep := _SLEEP_RE.search(user_text):
        plan.sleep_s = float(sleep.group(1))
        plan.notes.append(f"sleep {plan.sleep_s:g}")
    if error := _ERROR_RE.search(user_text):
        plan.status = int(error.group(1))
        plan.error_message = f"fake triggered {plan.status}"
        plan.notes.append(f"trigger error {plan.status}")
        return plan
    if say := _SAY_RE.search(user_text):
        plan.say = say.group(1)
    if bash := _BASH_RE.search(user_text):
        if "Bash" in _offered_tools(body):
            plan.tool = ("Bash", {"command": bash.group(1)})
            plan.notes.append("tool_use Bash")
        else:
            plan.notes.append("bash trigger ignored: Bash not offered")
        return plan
    if tool := _find_tool_trigger(user_text):
        plan.tool = tool
        plan.notes.append(f"tool_use {tool[0]}")
    return plan


# --------------------------------------------------------------------------- response building


def build_message(body: dict[str, Any], raw: bytes, plan: Plan) -> dict[str, Any]:
    """Build the full (non-streamed) assistant message for a successful plan."""
    request_hash = _digest(raw)
    content: list[dict[str, Any]]
    if plan.tool is not None:
        name, tool_input = plan.tool
        content = [{"type": "text", "text": plan.say}] if plan.say else []
        content.append(
            {"type": "tool_use", "id": f"toolu_{request_hash}", "name": name, "input": tool_input}
        )
        output_text = plan.say + json.dumps(tool_input)
        stop_reason = "tool_use"
    else:
        content = [{"type": "text", "text": plan.text}]
        output_text = plan.text
        stop_reason = "end_turn"
    model = body.get("model")
    return {
        "id": f"msg_{request_hash}",
        "type": "message",
        "role": "assistant",
        "model": model if isinstance(model, str) else DEFAULT_MODEL,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {
            "input_tokens": _estimate_tokens(raw.decode("utf-8", "replace")),
            "output_tokens": _estimate_tokens(output_text),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }


def _pieces(text: str, size: int) -> Iterator[str]:
    for i in range(0, len(text), size):
        yield text[i : i + size]


def _event(kind: str, **fields: Any) -> tuple[str, dict[str, Any]]:
    return kind, {"type": kind, **fields}


def sse_events(message: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(event name, data)`` pairs that stream ``message`` the way the real API does."""
    usage = message["usage"]
    start = dict(message, content=[], stop_reason=None, stop_sequence=None)
    start["usage"] = dict(usage, output_tokens=1)
    yield _event("message_start", message=start)
    for index, block in enumerate(message["content"]):
        if block["type"] == "tool_use":
            # The input arrives only through input_json_delta pieces, as from the real API.
            yield _event("content_block_start", index=index, content_block=dict(block, input={}))
            deltas = [
                {"type": "input_json_delta", "partial_json": piece}
                for piece in _pieces(json.dumps(block["input"]), JSON_PIECE)
            ]
        else:
            yield _event("content_block_start", index=index, content_block=dict(block, text=""))
            deltas = [
                {"type": "text_delta", "text": piece}
                for piece in _pieces(block["text"], TEXT_PIECE)
            ]
        if index == 0:
            yield _event("ping")
        for delta in deltas:
            yield _event("content_block_delta", index=index, delta=delta)
        yield _event("content_block_stop", index=index)
    yield _event(
        "message_delta",
        delta={"stop_reason": message["stop_reason"], "stop_sequence": None},
        usage={"output_tokens": usage["output_tokens"]},
    )
    yield _event("message_stop")


MODELS = [
    ("claude-opus-4-8", "Claude Opus 4.8"),
    ("claude-sonnet-5", "Claude Sonnet 5"),
    ("claude-haiku-4-5-20251001", "Claude Haiku 4.5"),
]


def models_page() -> dict[str, Any]:
    """A minimal ``GET /v1/models`` answer."""
    data = [
        {"type": "model", "id": mid, "display_name": name, "created_at": "2025-01-01T00:00:00Z"}
        for mid, name in MODELS
    ]
    return {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}


# --------------------------------------------------------------------------- server


class _FailureScript:
    """Server-wide scripted failures: the next ``remaining`` message requests fail."""

    def __init__(self) -> None:
        self.status = 0
        self.remaining: int | None = 0  # None: fail forever
        self.retry_after: float | None = None

    def take(self) -> tuple[int, float | None] | None:
        """Consume one failure if one is scripted; caller holds the server lock."""
        if not self.status or self.remaining == 0:
            return None
        if self.remaining is not None:
            self.remaining -= 1
        return self.status, self.retry_after


class _Server(ThreadingHTTPServer):
    """The HTTP server plus the state shared by its handler threads."""

    daemon_threads = True
    # Each CLI opens two connections at once (HEAD probe + request); a larger backlog than the
    # default 5 avoids refused connections when parallel tests share one stub.
    request_queue_size = 64

    def __init__(self, port: int, log_path: Path | None, echo_to: TextIO | None) -> None:
        super().__init__((HOST, port), _Handler)
        self.log_path = log_path
        self.echo_to = echo_to
        self.lock = threading.Lock()
        self.entries: list[dict[str, Any]] = []
        self.failures = _FailureScript()
        self.stopping = threading.Event()
        self.connections: set[socket.socket] = set()

    def record(self, entry: dict[str, Any]) -> None:
        """Append one request to the in-memory list, the JSONL log and the stderr summary."""
        line = json.dumps(entry, ensure_ascii=False)
        with self.lock:
            self.entries.append(entry)
            if self.log_path is not None:
                with self.log_path.open("a", encoding="utf-8") as f:
                    f.write(line + "\n")
        if self.echo_to is not None:
            query = f"?{entry['query']}" if entry["query"] else ""
            note = f" {entry['note']}" if entry["note"] else ""
            print(
                f"stub_api: {entry['method']} {entry['path']}{query} -> {entry['status']}{note}",
                file=self.echo_to,
                flush=True,
            )


class _Handler(BaseHTTPRequestHandler):
    """One connection; HTTP/1.1 so the CLI can keep it alive across requests."""

    protocol_version = "HTTP/1.1"
    server: _Server
    server_version = "ksi-stub-api/1"

    # ------------------------------------------------------------------ plumbing

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.lock:
            self.server.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        # The structured log replaces http.server's per-request stderr lines.
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    # Trailer section ends with an empty line.
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _log(self, status: int, body: Any, note: str = "") -> None:
        split = urlsplit(self.path)
        headers = {
            k.lower(): ("<redacted>" if k.lower() in REDACTED_HEADERS else v)
            for k, v in self.headers.items()
        }
        self.server.record(
            {
                "ts": round(time.time(), 3),
                "method": self.command,
                "path": split.path,
                "query": split.query,
                "status": status,
                "note": note,
                "session": self.headers.get("x-claude-code-session-id"),
                "headers": headers,
                "body": body,
            }
        )

    def _send_json(self, status: int, payload: Any, extra: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        # http.server has no reason phrase for Anthropic's 529.
        self.send_response(status, "Overloaded" if status == 529 else None)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("request-id", f"req_{_digest(data)}")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_error(self, status: int, message: str, retry_after: float | None = None) -> None:
        extra = {"retry-after": f"{retry_after:g}"} if retry_after is not None else None
        self._send_json(status, error_body(status, message), extra)

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    # ------------------------------------------------------------------ methods

    def do_HEAD(self) -> None:
        path = urlsplit(self.path).path
        status = 200 if path == "/" else 404
        self._log(status, None, "" if status == 200 else "UNKNOWN PATH")
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/v1/models":
            self._log(200, None)
            self._send_json(200, models_page())
        else:
            self._unknown(None)

    def do_POST(self) -> None:
        raw = self._read_body()
        try:
            parsed: Any = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        path = urlsplit(self.path).path
        logged_body = parsed if parsed is not None else raw.decode("utf-8", "replace")
        if path == "/v1/messages/count_tokens":
            tokens = _estimate_tokens(raw.decode("utf-8", "replace"))
            self._log(200, logged_body)
            self._send_json(200, {"input_tokens": tokens})
        elif path == "/v1/messages":
            if not isinstance(parsed, dict):
                self._log(400, logged_body, "body is not a JSON object")
                self._send_error(400, "request body must be a JSON object")
                return
            self._messages(parsed, raw)
        else:
            self._unknown(logged_body)

    def do_PUT(self) -> None:
        self._unknown(self._read_body().decode("utf-8", "replace") or None)

    do_DELETE = do_PUT
    do_PATCH = do_PUT

    def _unknown(self, body: Any) -> None:
        self._log(404, body, "UNKNOWN PATH")
        self._send_error(404, f"fake: no route for {self.command} {urlsplit(self.path).path}")

    def _messages(self, body: dict[str, Any], raw: bytes) -> None:
        stream = bool(body.get("stream"))
        notes = ["stream" if stream else "json", f"model={body.get('model')}"]
        with self.server.lock:
            scripted = self.server.failures.take()
        if scripted is not None:
            status, retry_after = scripted
            self._log(status, body, " ".join([*notes, f"scripted failure {status}"]))
            self._send_error(status, f"fake triggered {status}", retry_after)
            return

        plan = plan_reply(body)
        notes += plan.notes
        # Logged before any delay or reply: a request the CLI aborts (interrupt, SIGTERM) still
        # shows up, and once the client has the answer the log has it too.
        self._log(plan.status, body, " ".join(notes))
        if plan.sleep_s:
            # Wake early when the server stops so tests never wait on a stale sleep.
            self.server.stopping.wait(plan.sleep_s)
        try:
            if plan.status != 200:
                self._send_error(plan.status, plan.error_message)
            elif stream:
                self._stream(build_message(body, raw, plan))
            else:
                self._send_json(200, build_message(body, raw, plan))
        except (BrokenPipeError, ConnectionResetError):
            # The CLI aborted the request (interrupt, SIGTERM); nothing left to answer.
            self.close_connection = True

    def _stream(self, message: dict[str, Any]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("request-id", f"req_{message['id'][4:]}")
        self.end_headers()
        for event, data in sse_events(message):
            self._write_chunk(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class StubAPI:
    """The stub server run on a background thread, for tests.

    ``requests()`` returns the parsed request log; each entry has ``method``, ``path`` (without
    the query string), ``query``, ``status``, ``headers`` (API key redacted), ``body``, ``note``,
    ``session`` (the ``x-claude-code-session-id`` header) and ``ts``.
    """

    def __init__(
        self, log_path: Path | None = None, *, port: int = 0, echo_to: TextIO | None = None
    ) -> None:
        self._log_path = log_path
        self._want_port = port
        self._echo_to = echo_to
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Bind 127.0.0.1 (a free port unless one was given) and serve on a daemon thread."""
        if self._server is not None:
            raise RuntimeError("StubAPI already started")
        self._server = _Server(self._want_port, self._log_path, self._echo_to)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"stub-api-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, wake sleeping handlers and drop open keep-alive connections."""
        server, self._server = self._server, None
        if server is None:
            return
        server.stopping.set()
        server.shutdown()
        with server.lock:
            connections = list(server.connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> StubAPI:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ accessors

    @property
    def _running(self) -> _Server:
        if self._server is None:
            raise RuntimeError("StubAPI is not running")
        return self._server

    @property
    def port(self) -> int:
        """The bound TCP port."""
        return int(self._running.server_address[1])

    @property
    def url(self) -> str:
        """Base URL for ``ANTHROPIC_BASE_URL``."""
        return f"http://{HOST}:{self.port}"

    def requests(self) -> list[dict[str, Any]]:
        """A copy of every request seen since start (or the last ``clear``), oldest first."""
        server = self._running
        with server.lock:
            return list(server.entries)

    def clear(self) -> None:
        """Forget the in-memory request log (the JSONL file is left alone)."""
        server = self._running
        with server.lock:
            server.entries.clear()

    def script_failure(
        self, status: int, count: int | None, retry_after: float | None = None
    ) -> None:
        """Make the next ``count`` message requests fail with ``status`` (``None``: all of them).

        ``count=0`` cancels a script. ``retry_after`` adds a ``retry-after`` header (seconds).
        """
        server = self._running
        with server.lock:
            server.failures.status = status
            server.failures.remaining = count
            server.failures.retry_after = retry_after


# --------------------------------------------------------------------------- command line


def _write_port_file(path: Path, port: int) -> None:
    # Atomic so a poller never reads a half-written number.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{port}\n", encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Run the stub until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m devtools.stub_api",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free)")
    parser.add_argument("--port-file", type=Path, help="write the bound port here (atomically)")
    parser.add_argument("--log", type=Path, help="append one JSON line per request here")
    parser.add_argument("--fail-status", type=int, help="fail message requests with this status")
    parser.add_argument("--fail-count", type=int, help="only the first K requests fail")
    parser.add_argument("--retry-after", type=float, help="retry-after header on scripted failures")
    parser.add_argument("--quiet", action="store_true", help="no per-request summary on stderr")
    args = parser.parse_args(argv)

    api = StubAPI(args.log, port=args.port, echo_to=None if args.quiet else sys.stderr)
    api.start()
    if args.fail_status:
        api.script_failure(args.fail_status, args.fail_count, args.retry_after)

    done = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    if args.port_file is not None:
        _write_port_file(args.port_file, api.port)
    print(f"PORT={api.port}", flush=True)
    try:
        while not done.wait(0.5):
            pass
    finally:
        api.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
