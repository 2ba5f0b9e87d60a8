"""``python -m daemon.acp`` (console script ``ksi-acp``): the ACP face on stdio.

stdout belongs to the protocol (JSON-RPC, one message a line), so everything else this
process says goes to stderr, and a daemon it starts (``--start``) writes its log next to
the socket, never to the editor's pipes.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

import structlog
from acp import run_agent

from daemon import logs
from daemon.acp.agent import DaemonAgent
from daemon.client import AsyncClient, default_socket

log = structlog.get_logger("ksi.acp")

START_TIMEOUT_S = 60.0  # a first start may run migrations and probe the CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m daemon.acp",
        description="An Agent Client Protocol agent on stdio whose sessions are the KSI "
        "daemon's: point your editor's agent server setting at this command.",
    )
    ap.add_argument(
        "--socket",
        type=Path,
        help="the daemon's socket (default: KSI_SOCKET, else sockets/claude_daemon.sock)",
    )
    ap.add_argument(
        "--start",
        action="store_true",
        help="start a daemon on the socket if none answers (it keeps running after the "
        "editor quits; its log is <socket>.log)",
    )
    ap.add_argument(
        "--agent-id",
        help="the daemon agent id of this editor's turns (GET_SESSIONS agent_id lists its "
        "sessions; a registered agent's profile applies)",
    )
    ap.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return ap.parse_args(argv)


async def _answers(socket: Path) -> bool:
    try:
        client = await AsyncClient.open(socket)
    except OSError:
        return False
    try:
        await client.call("HEALTH_CHECK", timeout=10)
        return True
    finally:
        await client.close()


def _launch(socket: Path) -> subprocess.Popen[bytes]:
    socket.parent.mkdir(parents=True, exist_ok=True)
    with open(socket.with_suffix(".log"), "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "daemon", "--socket", str(socket)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,  # not in the editor's process group: outlives it
        )


async def ensure_daemon(socket: Path) -> None:
    """Start ``python -m daemon --socket SOCKET`` (detached) unless a daemon answers."""
    if await _answers(socket):
        return
    proc = _launch(socket)
    log.info("acp.daemon_started", pid=proc.pid, socket=str(socket))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if await _answers(socket):
            return
        if proc.poll() is not None and not await _answers(socket):
            # Another daemon may have won the socket meanwhile (it answers next round).
            await asyncio.sleep(0.2)
            if not await _answers(socket):
                raise SystemExit(f"the daemon exited ({proc.returncode}); see {socket}.log")
        await asyncio.sleep(0.1)
    raise SystemExit(f"no daemon answered on {socket} within {START_TIMEOUT_S:g}s")


async def serve(args: argparse.Namespace) -> None:
    socket: Path = args.socket or default_socket()
    if args.start:
        await ensure_daemon(socket)
    agent = DaemonAgent(socket, agent_id=args.agent_id)
    try:
        await run_agent(agent)
    finally:
        await agent.aclose()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.configure(args.log_level, "json")
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 130
    return 0
