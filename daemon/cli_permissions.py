"""``python -m daemon.cli permissions``: list relayed permission requests, and answer them.

    python -m daemon.cli permissions                 # pending requests, one per line
    python -m daemon.cli permissions --all           # and the recently decided ones
    python -m daemon.cli permissions -i              # ask about each pending one
    python -m daemon.cli permissions -i --watch      # ... and about new ones as they come
    python -m daemon.cli permissions allow ID [--remember]
    python -m daemon.cli permissions deny ID [--message "why"]

Interactive answers: ``y`` allow, ``a`` allow for the rest of the session (the CLI's
suggested rule), ``n`` deny (then an optional reason for the model), Enter to skip. On a
terminal ``-i`` is the default.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from typing import Any

import orjson

from daemon.client import AsyncClient, CommandError, SyncClient

Read = Callable[[str], str]


def describe(record: dict[str, Any]) -> str:
    """One line for a person: which tool, with what, for which turn, until when."""
    tool_input = record.get("input") or {}
    shown = tool_input.get("command") if isinstance(tool_input.get("command"), str) else None
    if shown is None:
        shown = orjson.dumps(tool_input).decode()
    if len(shown) > 120:
        shown = shown[:119] + "…"
    who = f" agent {record['agent_id']}" if record.get("agent_id") else ""
    state = record.get("status", "pending")
    tail = f"until {record['expires_at']}" if state == "pending" else state
    return (
        f"{record['request_id']}  {record['tool_name']}: {shown}  "
        f"(process {record['process_id']}{who}; {tail})"
    )


def ask(record: dict[str, Any], read: Read = input) -> dict[str, Any] | None:
    """The RESPOND_PERMISSION parameters a person chose for ``record``, or None (skip)."""
    print(describe(record), flush=True)
    while True:
        try:
            choice = read("allow? [y]es / [a]lways this session / [n]o / Enter skips: ").strip()
        except EOFError:  # input ended: leave the rest to others
            return None
        if choice in ("", "s"):
            return None
        params: dict[str, Any] = {"request_id": record["request_id"]}
        if choice in ("y", "yes"):
            return {**params, "decision": "allow"}
        if choice in ("a", "always"):
            return {**params, "decision": "allow", "remember": "session"}
        if choice in ("n", "no"):
            try:
                reason = read("reason for the model (optional): ").strip()
            except EOFError:
                reason = ""
            return {**params, "decision": "deny", **({"message": reason} if reason else {})}
        print("answer y, a, n or Enter", flush=True)


def answer(client: SyncClient, params: dict[str, Any]) -> bool:
    try:
        record = client.call("RESPOND_PERMISSION", params)["request"]
    except CommandError as exc:
        print(f"not answered: {exc}", file=sys.stderr, flush=True)
        return False
    print(f"{record['status']}: {record['request_id']}", flush=True)
    return True


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "permissions",
        help="list and answer relayed permission requests",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", nargs="?", choices=("list", "allow", "deny"), default="list")
    p.add_argument("request_id", nargs="?")
    p.add_argument("--all", action="store_true", help="also recently decided requests")
    p.add_argument("-i", "--interactive", action="store_true", default=None)
    p.add_argument("--watch", action="store_true", help="with -i: keep asking about new ones")
    p.add_argument("--remember", action="store_true", help="allow: for the rest of the session")
    p.add_argument("--message", help="deny: the reason the model is told")


def run(socket: str | None, args: argparse.Namespace, read: Read = input) -> int:
    client = SyncClient(socket)
    if args.action in ("allow", "deny"):
        if not args.request_id:
            raise SystemExit(f"permissions {args.action} needs a request id")
        params: dict[str, Any] = {"request_id": args.request_id, "decision": args.action}
        if args.remember:
            params["remember"] = "session"
        if args.message:
            params["message"] = args.message
        return 0 if answer(client, params) else 1
    interactive = args.interactive if args.interactive is not None else sys.stdin.isatty()
    if interactive and args.watch:
        return asyncio.run(_watch(socket, client, read))
    listing = client.call("GET_PERMISSION_REQUESTS", {"include_decided": bool(args.all)})
    requests = listing["requests"]
    if not interactive:
        for record in requests:
            print(describe(record), flush=True)
        if not requests:
            print("no pending permission requests", file=sys.stderr, flush=True)
        return 0
    _ask_all(client, requests, read)
    return 0


def _ask_all(client: SyncClient, requests: list[dict[str, Any]], read: Read) -> None:
    for record in requests:
        if record.get("status", "pending") == "pending" and (params := ask(record, read)):
            answer(client, params)


async def _watch(socket: str | None, client: SyncClient, read: Read) -> int:
    async with AsyncClient.connect(socket) as events:
        # Subscribed before listing: a request made in between is then not missed.
        await events.subscribe(["PERMISSION_REQUEST"])
        listing = await events.call("GET_PERMISSION_REQUESTS")
        seen = {r["request_id"] for r in listing["requests"]}
        await asyncio.to_thread(_ask_all, client, listing["requests"], read)
        print("waiting for permission requests (Ctrl-C ends)", file=sys.stderr, flush=True)
        async for event in events.events():
            if event["data"]["request_id"] not in seen:
                await asyncio.to_thread(_ask_all, client, [event["data"]], read)
    return 0
