"""A small command line for humans.

    python -m daemon.cli send HEALTH_CHECK
    python -m daemon.cli send SET_SHARED key=x value=1
    python -m daemon.cli send SPAWN prompt="hello" mode=async
    python -m daemon.cli subscribe 'PROCESS_*'

``key=value`` arguments become parameters; a value that parses as JSON is used as JSON
(``value=1`` is the number 1, ``tags='["a"]'`` a list), anything else is a string.
``--json '{...}'`` gives all parameters at once.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import orjson

from daemon.client import AsyncClient, CommandError, ConnectionClosed, SyncClient


def parse_params(pairs: list[str], raw_json: str | None) -> dict[str, Any]:
    params: dict[str, Any] = orjson.loads(raw_json) if raw_json else {}
    for pair in pairs:
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


async def _subscribe(socket_path: str | None, patterns: list[str]) -> int:
    client = await AsyncClient.open(socket_path)
    try:
        await client.subscribe(patterns)
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
    send.add_argument("--json", help="parameters as one JSON object")
    watch = sub.add_parser("subscribe", help="print matching events until interrupted")
    watch.add_argument("patterns", nargs="+", metavar="EVENT_TYPE_OR_GLOB")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "send":
            reply = SyncClient(args.socket).request(
                args.command.upper(), parse_params(args.params, args.json)
            )
            _print(reply)
            return 0 if reply.get("status") == "success" else 1
        return asyncio.run(_subscribe(args.socket, args.patterns))
    except (CommandError, ConnectionClosed, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
