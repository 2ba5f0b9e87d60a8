"""A small command line for humans.

    python -m daemon.cli send HEALTH_CHECK
    python -m daemon.cli send SET_SHARED key=x value=1
    python -m daemon.cli send SPAWN prompt="hello" mode=async
    python -m daemon.cli send SPAWN prompt="fix the test" --follow
    python -m daemon.cli subscribe 'PROCESS_*'
    python -m daemon.cli permissions [-i] [--watch]     (see: permissions --help)

``key=value`` arguments become parameters; a value that parses as JSON is used as JSON
(``value=1`` is the number 1, ``tags='["a"]'`` a list), anything else is a string. An
argument that is a JSON object (``'{"key": "x", "value": 1}'``) gives parameters at once.

Replies print as a short summary for people (a SPAWN's answer and what it cost; a command's
result as indented JSON without the envelope); ``--json`` prints the daemon's reply as it came.
``--follow`` (SPAWN) prints the turn as it happens: its text as it arrives, each tool call and
result as a one-line note, then the summary; on a terminal, a spinner shows while the turn
has not said anything yet.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any, TextIO

import orjson

from daemon import cli_permissions
from daemon.client import AsyncClient, CommandError, ConnectionClosed, SyncClient


def parse_params(pairs: list[str], raw_json: str | None = None) -> dict[str, Any]:
    params: dict[str, Any] = orjson.loads(raw_json) if raw_json else {}
    for pair in pairs:
        if pair.lstrip().startswith("{"):
            try:
                params.update(orjson.loads(pair))
                continue
            except orjson.JSONDecodeError:
                raise SystemExit(f"not a JSON object: {pair!r}") from None
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"expected key=value, got {pair!r}")
        try:
            params[key] = orjson.loads(value)
        except orjson.JSONDecodeError:
            params[key] = value
    return params


def _print(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")
    sys.stdout.flush()


def summary(reply: dict[str, Any], *, text_shown: bool = False) -> str:
    """A reply as a person wants to read it (``text_shown``: a followed SPAWN's answer was
    printed already, so only the line about the turn follows)."""
    if reply.get("status") != "success":
        error = reply.get("error") or {}
        return f"error {error.get('code')}: {error.get('message')}"
    result = reply.get("result") or {}
    command = reply.get("command")
    if command == "SPAWN" and "text" in result and result.get("mode") != "async":
        cost = result.get("cost_usd") or 0.0
        seconds = (result.get("duration_ms") or 0) / 1000
        footer = (
            f"-- session {result.get('session_id')} · process {result.get('process_id')} · "
            f"${cost:.4f} · {result.get('num_turns')} turn(s) · {seconds:.1f} s"
        )
        return footer if text_shown else f"{result.get('text') or ''}\n{footer}"
    if command == "HEALTH_CHECK":
        claude = result.get("claude") or {}
        auth = claude.get("auth") or {}
        lines = [
            f"{result.get('status')} · ksi {result.get('version')} · pid {result.get('pid')} · "
            f"up {result.get('uptime_s')} s · {result.get('socket')}",
            f"claude: {claude.get('bin') or 'not found'} {claude.get('version') or ''}".rstrip()
            + f" · credentials {auth.get('status')}",
        ]
        if auth.get("message"):
            lines.append(f"  {auth['message']}")
        return "\n".join(lines)
    return orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()


_NOTE_CHARS = 120
_SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


def _one_line(text: str, limit: int = _NOTE_CHARS) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def progress_note(data: dict[str, Any]) -> str | None:
    """A PROCESS_PROGRESS event other than text as a one-line note (None: not worth one)."""
    kind = data.get("kind")
    if kind == "tool_use":
        tool_input = data.get("input")
        if isinstance(tool_input, dict) and isinstance(tool_input.get("command"), str):
            shown = tool_input["command"]
        else:
            shown = tool_input if isinstance(tool_input, str) else orjson.dumps(tool_input).decode()
        return _one_line(f"· {data.get('name')} {shown}")
    if kind == "tool_result":
        mark = "error" if data.get("is_error") else "ok"
        first = next((ln for ln in str(data.get("content") or "").splitlines() if ln.strip()), "")
        return "  " + _one_line(f"↳ {mark} {first}")  # indented under its call
    if kind == "api_retry":
        return (
            f"· API retry {data.get('attempt')}/{data.get('max_retries')} in "
            f"{data.get('delay_s')} s (status {data.get('status')})"
        )
    if kind == "status" and data.get("status") == "api_error":
        return _one_line(f"· {data.get('message')}")
    return None


class Follower:
    """Prints a followed turn: text as it arrives, notes on their own lines, a spinner on a
    terminal until the turn's first event."""

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out, self.err = out, err
        self.spin = err.isatty()
        self.text_shown = False
        self._at_line_start = True
        self._waiting = 0
        self._started = time.monotonic()

    def idle(self) -> None:
        if self.spin:
            frame = _SPINNER[self._waiting % len(_SPINNER)]
            waited = time.monotonic() - self._started
            self.err.write(f"\r{frame} waiting for the turn to start · {waited:.1f} s")
            self.err.flush()
            self._waiting += 1

    def event(self, data: dict[str, Any]) -> None:
        if self.spin:
            self.err.write("\r\x1b[K")  # the first event: the spinner goes for good
            self.err.flush()
            self.spin = False
        if data.get("kind") == "text":
            text = str(data.get("text") or "")
            if not data.get("delta"):
                text += "\n"  # a whole text block
            self._write(text)
            self.text_shown = True
        elif (note := progress_note(data)) is not None:
            self._write(("" if self._at_line_start else "\n") + note + "\n")

    def end(self) -> None:
        if self.spin:
            self.err.write("\r\x1b[K")
            self.err.flush()
        if not self._at_line_start:
            self._write("\n")

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self._at_line_start = text.endswith("\n")


def follow(client: SyncClient, params: dict[str, Any], *, json_out: bool) -> dict[str, Any]:
    """Run a sync SPAWN with ``stream: true``, printing it as it happens; returns the reply."""
    printer = Follower(sys.stdout, sys.stderr)
    reply: dict[str, Any] = {}
    params = {**params, "mode": "sync", "stream": True}
    try:
        for msg in client.stream("SPAWN", params, idle=0.1 if printer.spin else None):
            if msg is None:
                printer.idle()
            elif "event" in msg:
                if json_out:
                    sys.stdout.write(orjson.dumps(msg).decode() + "\n")
                elif msg.get("event") == "PROCESS_PROGRESS":
                    printer.event(msg.get("data") or {})
            else:
                reply = msg
    finally:
        printer.end()
    if not reply:
        raise ConnectionClosed("daemon closed the connection without a reply")
    if json_out:
        _print(reply)
    else:
        print(summary(reply, text_shown=printer.text_shown), flush=True)
    return reply


async def _subscribe(socket_path: str | None, patterns: list[str]) -> int:
    client = await AsyncClient.open(socket_path)
    try:
        await client.subscribe(patterns)
        # On stderr, so stdout stays one event per line for programs.
        print(
            f"subscribed to {' '.join(patterns)}; waiting for events (Ctrl-C ends)",
            file=sys.stderr,
            flush=True,
        )
        async for event in client.events():
            sys.stdout.write(orjson.dumps(event).decode() + "\n")
            sys.stdout.flush()
    finally:
        await client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m daemon.cli",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--socket", help="daemon socket (default: sockets/claude_daemon.sock)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    send = sub.add_parser("send", help="send one command and print the reply")
    send.add_argument("command")
    send.add_argument("params", nargs="*", metavar="key=value")
    send.add_argument("--json", action="store_true", help="print the raw JSON reply")
    send.add_argument(
        "--follow",
        action="store_true",
        help="SPAWN: print the turn's text and tool calls as they happen",
    )
    watch = sub.add_parser("subscribe", help="print matching events until interrupted")
    watch.add_argument("patterns", nargs="+", metavar="EVENT_TYPE_OR_GLOB")
    cli_permissions.add_parser(sub)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "send":
            command = args.command.upper()
            params = parse_params(args.params)
            client = SyncClient(args.socket)
            if args.follow:
                if command not in ("SPAWN", "COMPLETION"):
                    raise SystemExit("--follow is for SPAWN")
                reply = follow(client, params, json_out=args.json)
                return 0 if reply.get("status") == "success" else 1
            reply = client.request(command, params)
            if args.json:
                _print(reply)
            else:
                print(summary(reply), flush=True)
            return 0 if reply.get("status") == "success" else 1
        if args.cmd == "permissions":
            return cli_permissions.run(args.socket, args)
        return asyncio.run(_subscribe(args.socket, args.patterns))
    except (CommandError, ConnectionClosed, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
