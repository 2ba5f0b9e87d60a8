"""A small command line for humans.

    python -m daemon.cli send HEALTH_CHECK
    python -m daemon.cli send SET_SHARED key=x value=1
    python -m daemon.cli send SPAWN prompt="hello" mode=async
    python -m daemon.cli subscribe 'PROCESS_*'

``key=value`` arguments become parameters; a value that parses as JSON is used as JSON
(``value=1`` is the number 1, ``tags='["a"]'`` a list), anything else is a string. An
argument that is a JSON object (``'{"key": "x", "value": 1}'``) gives parameters at once.

Replies print as a short summary for people (a SPAWN's answer and what it cost; a command's
result as indented JSON without the envelope); ``--json`` prints the daemon's reply as it came.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import orjson

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


def summary(reply: dict[str, Any]) -> str:
    """A reply as a person wants to read it."""
    if reply.get("status") != "success":
        error = reply.get("error") or {}
        return f"error {error.get('code')}: {error.get('message')}"
    result = reply.get("result") or {}
    command = reply.get("command")
    if command == "SPAWN" and "text" in result and result.get("mode") != "async":
        cost = result.get("cost_usd") or 0.0
        seconds = (result.get("duration_ms") or 0) / 1000
        return (
            f"{result.get('text') or ''}\n"
            f"-- session {result.get('session_id')} · process {result.get('process_id')} · "
            f"${cost:.4f} · {result.get('num_turns')} turn(s) · {seconds:.1f} s"
        )
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
    watch = sub.add_parser("subscribe", help="print matching events until interrupted")
    watch.add_argument("patterns", nargs="+", metavar="EVENT_TYPE_OR_GLOB")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "send":
            reply = SyncClient(args.socket).request(args.command.upper(), parse_params(args.params))
            if args.json:
                _print(reply)
            else:
                print(summary(reply), flush=True)
            return 0 if reply.get("status") == "success" else 1
        return asyncio.run(_subscribe(args.socket, args.patterns))
    except (CommandError, ConnectionClosed, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
