"""M1, M2: what the KSI MCP face costs a turn, and one tool call's round trip (issue 15).

* M1.cold: a cold real-CLI turn with ``ksi_tools: true`` vs the same turn without, in one
  daemon, alternating. The difference is the CLI connecting to the face at its start
  (``initialize``, ``tools/list``) and the daemon writing the session's config once.
  Goal: <= +50 ms at p50.
* M1.floor: the same cold turn as a bare ``claude -p`` with ``--mcp-config`` naming the
  smallest HTTP MCP server the SDK makes (bench/mcp_bare_server.py, its own process) vs
  without: what the CLI's MCP client costs at start, whoever serves the tools. Measured in
  the same loop as M1.cold, so the two deltas compare.
* M1.warm: a warm turn in a session that has the tools vs one in a session without (each
  session's CLI started before the timed turns). Goal: <= +5 ms at p50.
* M2: one ``publish`` tool call as the CLI sends it (a JSON-RPC ``tools/call`` POST with the
  session's bearer token on a kept-alive HTTP connection) -> its answer, while a turn of the
  session runs. Floor: the same PUBLISH as a socket command on a persistent connection.
  Report only (the issue asks for the figure).

Real CLI against the loopback stub API; skipped, with the reason, when it is not installed.
"""

from __future__ import annotations

import http.client
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from bench.core import REAL_CLAUDE, Row, Run, Stats, benchmark, fmt
from bench.procs import cold_real_cli_daemon, real_cli_missing, start_loopback_server
from bench.spawn import spawn_line
from bench.wire import LineConn, request_line

M1 = "turn with ksi_tools vs without (real CLI)"
M2 = "MCP publish round trip vs socket PUBLISH"


def _turn(conn: LineConn, line: bytes) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    reply = orjson.loads(conn.request(line))
    dt = time.perf_counter() - t0
    if reply.get("status") != "success":
        raise RuntimeError(f"turn failed: {reply}")
    result: dict[str, Any] = reply["result"]
    return dt, result


@benchmark("M1", M1, order=28)
def m1_ksi_tools(run: Run) -> list[Row]:
    why = real_cli_missing()
    if why:
        print(f"M1 skipped: {why}", flush=True)
        return [Row("M1", M1, "ms", None, goal="<= +50 ms cold, <= +5 ms warm", skipped=why)]
    reps = run.reps(10, 2)
    d = cold_real_cli_daemon(run)
    conn = LineConn(d.socket, timeout=120)
    conn.request(request_line("CONNECT"))
    port, _ = start_loopback_server(run, "bare MCP server", ["-m", "bench.mcp_bare_server"])
    bare_config = orjson.dumps(
        {"mcpServers": {"ksi": {"type": "http", "url": f"http://127.0.0.1:{port}/mcp"}}}
    ).decode()
    cold_on: list[float] = []
    cold_off: list[float] = []
    bare_on: list[float] = []
    bare_off: list[float] = []
    warm_on: list[float] = []
    warm_off: list[float] = []
    sessions: dict[bool, str] = {}
    try:
        for i in range(1 + reps):  # the first pair loads the face and warms the caches
            for tools in (True, False) if i % 2 else (False, True):
                line = spawn_line(d.work, f"m1 cold {i}", warm=False, ksi_tools=tools)
                dt, _ = _turn(conn, line)
                db = _bare_turn(d.work, dict(d.env), f"m1 bare {i}", bare_config if tools else None)
                if i:
                    (cold_on if tools else cold_off).append(1000 * dt)
                    (bare_on if tools else bare_off).append(1000 * db)
        for tools in (True, False):  # each session's warm CLI, started untimed
            _, result = _turn(conn, spawn_line(d.work, "m1 warm", warm=True, ksi_tools=tools))
            sessions[tools] = result["session_id"]
        for i in range(reps):
            for tools in (True, False) if i % 2 else (False, True):
                line = spawn_line(
                    d.work, f"m1 warm {i}", warm=True, ksi_tools=tools, session_id=sessions[tools]
                )
                dt, _ = _turn(conn, line)
                (warm_on if tools else warm_off).append(1000 * dt)
    finally:
        conn.close()
        d.stop()
    return [
        _delta("M1.cold", "cold turn, ksi_tools on vs off", cold_on, cold_off, 50.0),
        _delta("M1.floor", "bare CLI, an HTTP MCP server vs none", bare_on, bare_off, None),
        _delta("M1.warm", "warm turn, ksi_tools on vs off", warm_on, warm_off, 5.0),
    ]


def _bare_turn(cwd: Path, env: dict[str, str], prompt: str, mcp_config: str | None) -> float:
    """A bare cold ``claude -p`` (the daemon's children's environment), with or without
    ``--mcp-config``; its wall time in seconds."""
    argv = [str(REAL_CLAUDE), "-p", "--output-format", "json", "--model", "sonnet"]
    argv += ["--session-id", str(uuid.uuid4())]
    if mcp_config is not None:
        argv += ["--mcp-config", mcp_config, "--allowedTools", "mcp__ksi"]
    t0 = time.perf_counter()
    out = subprocess.run(
        argv, input=prompt.encode(), capture_output=True, cwd=cwd, env=env, timeout=120
    )
    dt = time.perf_counter() - t0
    if out.returncode != 0 or b'"type":"result"' not in out.stdout:
        raise RuntimeError(f"bare claude -p failed ({out.returncode}): {out.stdout[:400]!r}")
    return dt


def _delta(
    bench_id: str, what: str, on: list[float], off: list[float], goal_ms: float | None
) -> Row:
    o, f = Stats.of(on, "ms"), Stats.of(off, "ms")
    added = o.median - f.median
    return Row(
        bench_id,
        what,
        "ms",
        o.median,
        f.median,
        compare="delta",
        goal="report" if goal_ms is None else f"<= +{goal_ms:g} ms at p50",
        met=None if goal_ms is None else added <= goal_ms,
        series={"with tools": o, "without": f},
        notes=f"{len(on)} pair(s), alternating; p99 on {fmt(o.p99)} ms, off {fmt(f.p99)} ms",
    )


@benchmark("M2", M2, order=29)
def m2_publish(run: Run) -> list[Row]:
    why = real_cli_missing()
    if why:
        print(f"M2 skipped: {why}", flush=True)
        return [Row("M2", M2, "ms", None, skipped=why)]
    reps = run.reps(300, 20)
    d = cold_real_cli_daemon(run)
    conn = LineConn(d.socket, timeout=120)
    conn.request(request_line("CONNECT"))
    mcp_ms: list[float] = []
    socket_ms: list[float] = []
    try:
        # A turn that runs for a while (the stub API answers after 60 s): its token is good.
        line = spawn_line(d.work, "[[sleep:60]] m2", mode="async", warm=False, ksi_tools=True)
        accepted = orjson.loads(conn.request(line))["result"]
        _until_running(conn, accepted["process_id"])
        config = orjson.loads(
            (d.base / "state" / "mcp" / f"{accepted['session_id']}.json").read_bytes()
        )
        server = config["mcpServers"]["ksi"]
        url = urlsplit(server["url"])
        http_conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=30)
        headers = {
            **server["headers"],
            "content-type": "application/json",
            "accept": "application/json, text/event-stream",
        }
        for i in range(20 + reps):  # 20 untimed: connection, imports, caches
            body = orjson.dumps(
                {
                    "jsonrpc": "2.0",
                    "id": i,
                    "method": "tools/call",
                    "params": {
                        "name": "publish",
                        "arguments": {"event_type": "M2_PING", "payload": {"i": i}},
                    },
                }
            )
            t0 = time.perf_counter()
            http_conn.request("POST", url.path, body=body, headers=headers)
            answer = http_conn.getresponse().read()
            dt = time.perf_counter() - t0
            if b'"published"' not in answer:
                raise RuntimeError(f"publish tool failed: {answer[:400]!r}")
            t1 = time.perf_counter()
            reply = conn.request(
                request_line("PUBLISH", {"event_type": "M2_PING", "payload": {"i": i}})
            )
            ds = time.perf_counter() - t1
            if b'"published"' not in reply:
                raise RuntimeError(f"PUBLISH failed: {reply[:400]!r}")
            if i >= 20:
                mcp_ms.append(1000 * dt)
                socket_ms.append(1000 * ds)
        http_conn.close()
        conn.request(request_line("CANCEL_PROCESS", {"process_id": accepted["process_id"]}))
    finally:
        conn.close()
        d.stop()
    o, f = Stats.of(mcp_ms, "ms"), Stats.of(socket_ms, "ms")
    return [
        Row(
            "M2",
            M2,
            "ms",
            o.median,
            f.median,
            compare="delta",
            series={"MCP tools/call publish": o, "socket PUBLISH": f},
            notes=f"{len(mcp_ms)} call(s); p99 MCP {fmt(o.p99)} ms, socket {fmt(f.p99)} ms",
        )
    ]


def _until_running(conn: LineConn, process_id: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        procs = conn.call("GET_PROCESSES")["result"]["processes"]
        if any(p["process_id"] == process_id and p["status"] == "running" for p in procs):
            return
        time.sleep(0.05)
    raise RuntimeError(f"turn {process_id} never started")
