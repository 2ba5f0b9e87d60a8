"""A1: what the ACP face adds to a prompt's first words (issue 17), fake CLI, warm sessions.

* A1: ``session/prompt`` sent by an editor (the ACP SDK's client side, over the stdio of
  ``python -m daemon.acp``) -> its first ``agent_message_chunk`` arrives at the editor.
  Floor: a sync SPAWN with ``stream: true`` sent on the daemon's socket -> its first
  ``PROCESS_PROGRESS`` text event arrives (the path the face itself takes, one hop shorter).

Both run in one event loop, alternating, each in its own warm session, so the machine's
noise hits both alike. Goal: <= +5 ms at p50.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any, cast

import acp
from acp.schema import AgentMessageChunk

from bench.core import ROOT, Row, Run, Stats, benchmark, fmt
from bench.procs import start_daemon
from daemon.client import AsyncClient

A1 = "ACP face: session/prompt -> first agent_message_chunk, vs SPAWN stream on the socket"
GOAL = "<= +5 ms at p50"
FAKE = ROOT / "devtools" / "fake_claude.py"


class _Editor:
    """Notes when the first message chunk of the running prompt arrives."""

    def __init__(self) -> None:
        self.first: asyncio.Future[float] | None = None

    async def session_update(self, session_id: str, update: Any, **kwargs: Any) -> None:
        if isinstance(update, AgentMessageChunk) and self.first and not self.first.done():
            self.first.set_result(time.perf_counter())

    def on_connect(self, conn: Any) -> None:
        pass


async def _measure(socket: str, work: str, reps: int) -> tuple[list[float], list[float]]:
    editor = _Editor()
    ours: list[float] = []
    floor: list[float] = []
    async with (
        acp.spawn_agent_process(
            cast(acp.Client, editor),
            sys.executable,
            "-m",
            "daemon.acp",
            "--socket",
            socket,
            cwd=ROOT,
            env={"PYTHONPATH": str(ROOT)},
        ) as (conn, _),
        AsyncClient.connect(socket) as client,
    ):
        await conn.initialize(protocol_version=acp.PROTOCOL_VERSION)
        sid = (await conn.new_session(cwd=work, mcp_servers=[])).session_id
        spawn_session: dict[str, Any] = {}
        for i in range(1 + reps):  # the first of each opens its warm session, uncounted
            editor.first = asyncio.get_running_loop().create_future()
            sent = time.perf_counter()
            reply = asyncio.create_task(
                conn.prompt(session_id=sid, prompt=[acp.text_block(f"a1 acp {i}")])
            )
            arrived = await editor.first
            await reply
            sent_floor = time.perf_counter()
            turn = await client.spawn_stream(f"a1 socket {i}", cwd=work, warm=True, **spawn_session)
            arrived_floor = None
            async for event in turn:
                if arrived_floor is None and event["data"].get("kind") == "text":
                    arrived_floor = time.perf_counter()
            spawn_session = {"session_id": turn.result()["session_id"]}
            if i and arrived_floor is not None:
                ours.append(1000 * (arrived - sent))
                floor.append(1000 * (arrived_floor - sent_floor))
    return ours, floor


@benchmark("A1", A1, order=28)
def a1_first_chunk(run: Run) -> list[Row]:
    reps = run.reps(40, 3)
    d = start_daemon(run, claude_bin=FAKE, env={"KSI_WARM_DEFAULT": "true"})
    try:
        ours, floor = asyncio.run(_measure(str(d.socket), str(d.base / "work"), reps))
    finally:
        d.stop()
    o, f = Stats.of(ours, "ms"), Stats.of(floor, "ms")
    return [
        Row(
            "A1",
            "session/prompt -> first agent_message_chunk (floor: SPAWN stream -> first text)",
            "ms",
            o.median,
            f.median,
            compare="delta",
            goal=GOAL,
            met=o.median - f.median <= 5.0,
            series={"acp": o, "socket": f},
            notes=f"{len(ours)} prompt(s), warm sessions, alternating; p99 ours "
            f"{fmt(o.p99)} ms, floor {fmt(f.p99)} ms",
        )
    ]
