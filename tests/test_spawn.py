"""SPAWN end to end: socket -> turn scheduler -> litellm.acompletion -> our provider -> fake CLI."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from daemon.client import AsyncClient
from tests.helpers import DaemonProcess, eventually, pid_alive, short_tmpdir, spawn, wait_for


def fake_invocations(d: DaemonProcess) -> list[dict[str, Any]]:
    if not d.fake_log.exists():
        return []
    rows = [orjson.loads(x) for x in d.fake_log.read_bytes().splitlines() if x.strip()]
    # Only turns: the daemon also runs `claude --version` once at start-up.
    return [r for r in rows if "argv" in r and "-p" in r["argv"]]


def test_sync_spawn_returns_answer_session_cost_and_usage(make_daemon: Any) -> None:
    d = make_daemon(env={"CLAUDECODE": "1"}, process=True)  # the process environment
    reply = spawn(d, prompt="--help me, I start with dashes", model="sonnet")
    assert reply["status"] == "success", reply
    r = reply["result"]
    assert r["status"] == "completed"
    assert r["text"] == "echo: --help me, I start with dashes (turn 1)"
    assert uuid.UUID(r["session_id"])
    assert r["cost_usd"] > 0
    assert r["cost_usd"] == r["raw"]["total_cost_usd"]
    assert r["usage"]["output_tokens"] >= 1
    assert r["num_turns"] == 1
    assert r["is_error"] is False
    assert r["model"] == "claude-sonnet-5"
    assert r["raw"]["type"] == "result"
    assert r["raw"]["session_id"] == r["session_id"]
    (inv,) = fake_invocations(d)
    # The prompt travels on stdin, never argv; the daemon's CLAUDECODE is not inherited.
    assert not any("dashes" in a for a in inv["argv"])
    assert inv["env_CLAUDECODE"] is None
    assert "--session-id" in inv["argv"]
    assert r["session_id"] in inv["argv"]
    assert inv["argv"][inv["argv"].index("--model") + 1] == "sonnet"


def test_one_megabyte_prompt(make_daemon: Any) -> None:
    d = make_daemon()
    prompt = "p" * (1024 * 1024)
    r = spawn(d, prompt=prompt)["result"]
    assert r["text"] == f"echo: {prompt} (turn 1)"


def test_resume_continuity_session_record_and_jsonl(make_daemon: Any) -> None:
    d = make_daemon()
    first = spawn(d, prompt="one", agent_id="a1")["result"]
    sid = first["session_id"]
    second = spawn(d, prompt="two", session_id=sid)["result"]
    assert second["text"] == "echo: two (turn 2)"
    assert second["session_id"] == sid
    inv = fake_invocations(d)
    assert inv[1]["argv"][inv[1]["argv"].index("--resume") + 1] == sid
    session = d.result("GET_SESSION", {"session_id": sid})["session"]
    assert session["turns"] == 2
    assert session["cwd"] == str(d.work.resolve())
    assert session["total_cost_usd"] == pytest.approx(first["cost_usd"] + second["cost_usd"])
    assert session["agent_id"] == "a1"
    log_path = Path(session["log_path"])
    lines = [orjson.loads(x) for x in log_path.read_bytes().splitlines()]
    assert [x["type"] for x in lines] == ["human", "claude", "human", "claude"]
    assert lines[0]["content"] == "one"
    assert lines[0]["process_id"] == first["process_id"]
    assert lines[0]["agent_id"] == "a1"
    assert lines[1]["result"] == "echo: one (turn 1)"
    assert lines[1]["session_id"] == sid
    assert all(x["timestamp"].endswith("Z") for x in lines)
    latest = d.log_dir / "latest.jsonl"
    # Re-pointed within TurnLog.LATEST_DELAY_S of the newest turn.
    wait_for(lambda: latest.is_symlink() and latest.resolve() == log_path.resolve(), timeout=5)
    assert latest.is_symlink()
    assert latest.resolve() == log_path.resolve()
    agents_cost = d.result("GET_SESSIONS", {"agent_id": "a1"})
    assert agents_cost["total"] == 1


async def test_turns_of_one_session_never_overlap(make_daemon: Any) -> None:
    d = make_daemon()
    sid = spawn(d, prompt="start")["result"]["session_id"]
    async with AsyncClient.connect(d.socket) as c:
        replies = await asyncio.gather(
            *[
                c.call("SPAWN", {"prompt": f"[[sleep:0.3]] concurrent {i}", "session_id": sid})
                for i in range(3)
            ]
        )
    turns = sorted(r["text"].rsplit("(turn ", 1)[1] for r in replies)
    # A forked history would repeat a turn number; serialised turns count 2, 3, 4.
    assert turns == ["2)", "3)", "4)"]


def test_session_keeps_its_cwd(make_daemon: Any) -> None:
    d = make_daemon()
    other = short_tmpdir("cwd")
    sid = spawn(d, prompt="here", cwd=str(other))["result"]["session_id"]
    again = d.call("SPAWN", {"prompt": "no cwd given", "session_id": sid})
    assert again["result"]["text"] == "echo: no cwd given (turn 2)"
    assert fake_invocations(d)[-1]["cwd"] == str(other.resolve())
    wrong = spawn(d, prompt="elsewhere", session_id=sid)
    assert wrong["error"]["code"] == "INVALID_PARAMETERS"
    assert "scoped" in wrong["error"]["message"]


@pytest.mark.parametrize(
    ("prompt", "code", "status"),
    [
        ("[[error:401]]", "AUTH_FAILED", 401),
        ("[[error:login]]", "AUTH_FAILED", None),
        ("[[error:429]]", "RATE_LIMITED", 429),
        ("[[error:500]]", "API_ERROR", 500),
        ("[[error:529]]", "API_ERROR", 529),
        ("[[max-turns]]", "MAX_TURNS", None),
        ("[[crash:3]]", "CLI_CRASHED", None),
    ],
)
def test_cli_failures_become_typed_errors(
    make_daemon: Any, prompt: str, code: str, status: int | None
) -> None:
    d = make_daemon()
    reply = spawn(d, prompt=prompt)
    assert reply["status"] == "error", reply
    err = reply["error"]
    assert err["code"] == code
    details = err["details"]
    assert details["exit_code"] == (3 if code == "CLI_CRASHED" else 1)
    assert "stderr_tail" in details
    assert "process_id" in details
    if status is not None:
        assert details["api_error_status"] == status
    if code == "CLI_CRASHED":
        assert "simulated crash" in details["stderr_tail"]
    proc = d.result("GET_PROCESSES")["processes"][-1]
    assert proc["status"] == "failed"
    assert proc["error"]["code"] == code
    log = (d.log_dir / f"{details['session_id']}.jsonl").read_bytes().splitlines()
    assert [orjson.loads(x)["type"] for x in log] == ["human", "error"]


def test_unknown_session_is_session_not_found(make_daemon: Any) -> None:
    d = make_daemon()
    sid = str(uuid.uuid4())
    reply = spawn(d, prompt="hi", session_id=sid)
    assert reply["error"]["code"] == "SESSION_NOT_FOUND"
    assert sid in reply["error"]["details"]["stderr_tail"]
    # A session the CLI does not know is not invented by the daemon either.
    assert d.call("GET_SESSION", {"session_id": sid})["error"]["code"] == "SESSION_NOT_FOUND"


def test_missing_cli_is_claude_not_found(make_daemon: Any) -> None:
    d = make_daemon(claude_bin=Path("/nonexistent/claude"))
    health = d.result("HEALTH_CHECK")
    assert health["claude"]["found"] is False
    assert "npm ci" in health["claude"]["install_hint"]
    reply = spawn(d, prompt="hi")
    assert reply["error"]["code"] == "CLAUDE_NOT_FOUND"


def test_timeout_kills_the_whole_process_group(make_daemon: Any) -> None:
    d = make_daemon(env={"KSI_TERM_GRACE_S": "0.5"})
    child, grandchild = d.base / "child.pid", d.base / "grandchild.pid"
    started = time.monotonic()
    reply = spawn(
        d,
        prompt=f"[[pidfile:{child}]][[grandchild:{grandchild}]][[ignore-sigterm]][[sleep:60]]",
        timeout_s=1,
    )
    assert reply["error"]["code"] == "TIMEOUT"
    assert time.monotonic() - started < 10
    for pidfile in (child, grandchild):
        assert not pid_alive(int(pidfile.read_text())), pidfile
    assert d.result("GET_PROCESSES")["processes"][-1]["status"] == "timed_out"


async def test_cancel_running_and_queued_processes(make_daemon: Any) -> None:
    d = make_daemon("--max-concurrency", "1")
    child, grandchild = d.base / "child.pid", d.base / "grandchild.pid"
    async with AsyncClient.connect(d.socket) as c:
        await c.subscribe(["PROCESS_*"])
        running = await c.call(
            "SPAWN",
            {
                "prompt": f"[[pidfile:{child}]][[grandchild:{grandchild}]][[sleep:60]]",
                "mode": "async",
                "cwd": str(d.work),
            },
        )
        queued = await c.call("SPAWN", {"prompt": "waits", "mode": "async", "cwd": str(d.work)})
        started = await c.next_event(timeout=20)
        assert started["event"] == "PROCESS_STARTED"
        assert started["data"]["process_id"] == running["process_id"]
        await eventually(lambda: grandchild.exists() and grandchild.read_text().strip())
        procs = (await c.call("GET_PROCESSES"))["processes"]
        by_id = {p["process_id"]: p for p in procs}
        assert by_id[queued["process_id"]]["status"] == "queued"
        assert by_id[queued["process_id"]]["queue_position"] == 1
        cancelled_q = await c.call("CANCEL_PROCESS", {"process_id": queued["process_id"]})
        assert cancelled_q["status"] == "cancelled"
        cancelled_r = await c.call("CANCEL_PROCESS", {"process_id": running["process_id"]})
        assert cancelled_r["status"] == "cancelled"
        done: dict[str, Any] = {}
        while len(done) < 2:
            ev = await c.next_event(timeout=20)
            if ev["event"] == "PROCESS_COMPLETE":
                done[ev["data"]["process_id"]] = ev["data"]
        assert {v["status"] for v in done.values()} == {"cancelled"}
        again = await c.request("CANCEL_PROCESS", {"process_id": running["process_id"]})
        assert again["error"]["code"] == "PROCESS_FINISHED"
    for pidfile in (child, grandchild):
        assert not pid_alive(int(pidfile.read_text()))
    unknown = d.call("CANCEL_PROCESS", {"process_id": "nope"})
    assert unknown["error"]["code"] == "PROCESS_NOT_FOUND"


async def test_concurrency_cap_queues_fifo(make_daemon: Any) -> None:
    d = make_daemon("--max-concurrency", "2")
    async with AsyncClient.connect(d.socket) as c:
        await c.subscribe(["PROCESS_*"])
        ids = [
            (
                await c.call(
                    "SPAWN",
                    {"prompt": f"[[sleep:0.4]] job {i}", "mode": "async", "cwd": str(d.work)},
                )
            )["process_id"]
            for i in range(6)
        ]
        snapshot = await c.call("GET_PROCESSES")
        assert snapshot["max_concurrency"] == 2
        assert snapshot["running"] + snapshot["queued"] == 6
        running, peak, start_order = 0, 0, []
        finished = 0
        while finished < 6:
            ev = await c.next_event(timeout=30)
            if ev["event"] == "PROCESS_STARTED":
                running += 1
                peak = max(peak, running)
                start_order.append(ev["data"]["process_id"])
            elif ev["event"] == "PROCESS_COMPLETE":
                running -= 1
                finished += 1
                assert ev["data"]["status"] == "completed"
    assert peak == 2
    assert start_order == ids


async def test_client_request_id_is_idempotent(make_daemon: Any) -> None:
    d = make_daemon()
    first = spawn(d, prompt="[[sleep:0.2]] once", client_request_id="req-1")["result"]
    second = spawn(d, prompt="[[sleep:0.2]] once", client_request_id="req-1")["result"]
    assert second["process_id"] == first["process_id"]
    assert second["replayed"] is True
    assert second["text"] == first["text"]
    # Async first, then a sync retry while it runs: the retry waits for the same turn.
    async_reply = spawn(d, prompt="[[sleep:0.5]] again", client_request_id="req-2", mode="async")[
        "result"
    ]
    sync_retry = spawn(d, prompt="[[sleep:0.5]] again", client_request_id="req-2")["result"]
    assert sync_retry["process_id"] == async_reply["process_id"]
    assert sync_retry["text"] == "echo: [[sleep:0.5]] again (turn 1)"
    assert len(fake_invocations(d)) == 2


async def test_async_spawn_announces_started_and_complete(make_daemon: Any) -> None:
    d = make_daemon()
    async with AsyncClient.connect(d.socket, agent_id="watcher") as c:
        await c.subscribe(["PROCESS_STARTED", "PROCESS_COMPLETE"])
        reply = await c.call("SPAWN", {"prompt": "later", "mode": "async", "cwd": str(d.work)})
        # KSI's shape: "started" (and type "claude"); where it is now is in state.
        assert (reply["status"], reply["type"], reply["mode"]) == ("started", "claude", "async")
        assert reply["state"] in ("queued", "running")
        assert "text" not in reply
        started = await c.next_event(timeout=20)
        complete = await c.next_event(timeout=20)
    assert started["event"] == "PROCESS_STARTED"
    assert started["data"]["pid"] > 0
    assert complete["event"] == "PROCESS_COMPLETE"
    data = complete["data"]
    assert data["process_id"] == reply["process_id"]
    assert data["session_id"] == reply["session_id"]
    assert data["status"] == "completed"
    assert data["text"] == "echo: later (turn 1)"
    assert data["cost_usd"] > 0
    assert data["raw"]["type"] == "result"
    # Published without an agent_id too (KSI only announced agent turns).
    assert data["agent_id"] == "watcher"
    assert complete["seq"] > started["seq"]


def test_observers_are_isolated_and_can_act(make_daemon: Any) -> None:
    d = make_daemon(
        "--observer",
        "tests.observer_plugins:Crasher",
        "--observer",
        "tests.observer_plugins:Hanger",
        "--observer",
        "tests.observer_plugins:BlockingSync",
        "--observer",
        "tests.observer_plugins:Recorder",
        "--observer",
        "tests.observer_plugins:FollowUp",
        "--observer",
        "daemon.plugins.cost_recorder:CostRecorder",
        env={"KSI_OBSERVER_TIMEOUT_S": "0.3"},
    )
    assert d.result("HEALTH_CHECK")["counts"]["observers"] == 6
    first = spawn(d, prompt="please [[follow-up]]")["result"]
    assert first["status"] == "completed"

    def recorded() -> list[dict[str, Any]]:
        got = d.result("GET_SHARED", {"key": "test.recorder"})
        return got["value"] if got["found"] else []

    # The FollowUp observer SPAWNs a second turn of the same session on its own.
    events = wait_for(
        lambda: (
            [e for e in recorded() if e["event"] == "PROCESS_COMPLETE"]
            if len([e for e in recorded() if e["event"] == "PROCESS_COMPLETE"]) >= 2
            else None
        ),
        timeout=30,
    )
    follow = d.result("GET_SESSION", {"session_id": first["session_id"]})
    assert follow["session"]["turns"] == 2
    assert events[0]["process_id"] == first["process_id"]
    costs = d.result("GET_SHARED", {"key": "observers.cost_recorder"})["value"]
    assert costs["turns"]["completed"] >= 1
    assert costs["sessions"][first["session_id"]]["cost_usd"] > 0

    # The hanging observer is timed out on its own clock; the turns above did not wait.
    def logged(name: str) -> bool:
        return any(e["event"] == name for e in d.log_events())

    wait_for(lambda: logged("observer.failed"), timeout=10)
    wait_for(lambda: logged("observer.timed_out"), timeout=10)


@pytest.mark.parametrize(
    "params",
    [
        {"prompt": ""},
        {"prompt": "   "},
        {"prompt": "x", "mode": "later"},
        {"prompt": "x", "session_id": "not-a-uuid"},
        {"prompt": "x", "cwd": "relative/dir"},
        {"prompt": "x", "cwd": "/nonexistent/dir"},
        {"prompt": "x", "model": "openai/gpt-4o"},
        {"prompt": "x", "max_turns": 0},
        {"prompt": "x", "permission_mode": "yolo"},
        {"prompt": "x", "timeout_s": -1},
        {"prompt": "x", "surprise": True},
        {"prompt": "x", "type": "gemini"},
    ],
)
def test_invalid_spawn_is_rejected_before_anything_runs(
    daemon: DaemonProcess, params: dict[str, Any]
) -> None:
    reply = daemon.call("SPAWN", params)
    assert reply["error"]["code"] == "INVALID_PARAMETERS", reply
    assert not fake_invocations(daemon)
    assert daemon.result("GET_PROCESSES")["total"] == 0


def test_huge_output_and_tool_flags(make_daemon: Any) -> None:
    d = make_daemon()
    r = spawn(
        d,
        prompt="[[huge:3000000]]",
        allowed_tools=["Read", "Bash"],
        disallowed_tools="Write",
        max_turns=3,
        append_system_prompt="be brief",
        permission_mode="acceptEdits",
        enable_tools=True,
    )["result"]
    assert len(r["text"]) == 3_000_000
    argv = fake_invocations(d)[-1]["argv"]
    assert argv[argv.index("--allowedTools") + 1] == "Read,Bash"
    assert argv[argv.index("--disallowedTools") + 1] == "Write"
    assert argv[argv.index("--max-turns") + 1] == "3"
    assert argv[argv.index("--append-system-prompt") + 1] == "be brief"
    assert argv[argv.index("--permission-mode") + 1] == "acceptEdits"
    spawn(d, prompt="no tools", enable_tools=False)
    argv = fake_invocations(d)[-1]["argv"]
    assert argv[argv.index("--tools") + 1] == ""


def test_sigterm_during_a_turn_kills_the_cli(make_daemon: Any) -> None:
    d = make_daemon(env={"KSI_SHUTDOWN_GRACE_S": "0.5"})
    child = d.base / "child.pid"
    reply = spawn(d, prompt=f"[[pidfile:{child}]][[sleep:60]]", mode="async")
    assert reply["status"] == "success"
    wait_for(lambda: child.exists() and child.read_text().strip())
    pid = int(child.read_text())
    assert d.stop(timeout=20) == 0
    assert not pid_alive(pid)
    assert not d.socket.exists()
    # The interrupted turn is on record as cancelled after a restart.
    d.start()
    procs = d.result("GET_PROCESSES")["processes"]
    assert procs[-1]["status"] in ("cancelled", "failed")
    assert os.path.exists(d.state_dir / "ksi.sqlite3")


def test_socket_answers_before_litellm_is_loaded_and_stdout_stays_clean() -> None:
    d = DaemonProcess(preload=True)
    try:
        d.start()
        # LiteLLM's import takes seconds; the socket answered before it finished.
        first = d.result("HEALTH_CHECK")
        assert first["litellm"]["status"] in ("loading", "ready")
        statuses = {first["litellm"]["status"]}

        def saw_ready() -> bool:
            statuses.add(d.result("HEALTH_CHECK")["litellm"]["status"])
            return "ready" in statuses

        wait_for(saw_ready, timeout=60)
        assert "loading" in statuses  # observed at least once while the import ran
        # Errors are where LiteLLM prints banners to stdout unless quietened.
        assert spawn(d, prompt="[[error:500]]")["error"]["code"] == "API_ERROR"
        assert spawn(d, prompt="fine", model="some-unmapped-model")["status"] == "success"
        assert d.stop() == 0
        assert d.proc is not None
        assert d.proc.stdout is not None
        assert d.proc.stdout.read() == b""
    finally:
        d.cleanup()


def test_costs_are_recorded_per_session_and_per_agent_across_restart(make_daemon: Any) -> None:
    d = make_daemon()
    d.result("REGISTER_AGENT", {"agent_id": "writer", "role": "author"})
    a = spawn(d, prompt="one", agent_id="writer")["result"]
    b = spawn(d, prompt="two", agent_id="writer", session_id=a["session_id"])["result"]
    failed = spawn(d, prompt="[[error:500]]", agent_id="writer", new_session=True)
    assert failed["status"] == "error"
    expected = a["cost_usd"] + b["cost_usd"]
    for _ in range(2):  # before and after a restart
        (agent,) = d.result("GET_AGENTS")["agents"].values()
        assert agent["turns"] == 2  # the failed turn cost nothing and is not counted
        assert agent["total_cost_usd"] == pytest.approx(expected)
        session = d.result("GET_SESSION", {"session_id": a["session_id"]})
        assert session["session"]["total_cost_usd"] == pytest.approx(expected)
        assert [p["status"] for p in session["processes"]] == ["completed", "completed"]
        d.stop()
        d.start()


async def test_a_sessions_turn_is_announced_complete_before_the_next_starts(
    make_daemon: Any,
) -> None:
    d = make_daemon()
    sid = spawn(d, prompt="first")["result"]["session_id"]
    async with AsyncClient.connect(d.socket) as c:
        await c.subscribe(["PROCESS_STARTED", "PROCESS_COMPLETE"])
        ids = [
            (
                await c.call(
                    "SPAWN", {"prompt": f"[[sleep:0.2]] {i}", "mode": "async", "session_id": sid}
                )
            )["process_id"]
            for i in range(3)
        ]
        order: list[tuple[str, str]] = []
        while len(order) < 6:
            ev = await c.next_event(timeout=30)
            order.append((ev["event"], ev["data"]["process_id"]))
    expected = [(kind, pid) for pid in ids for kind in ("PROCESS_STARTED", "PROCESS_COMPLETE")]
    assert order == expected


def test_a_turn_log_that_cannot_be_written_does_not_fail_the_turn(make_daemon: Any) -> None:
    """The turn is paid for by then: its result still reaches the client and the state,
    and the daemon reports the log failure in its own log."""
    d = make_daemon()
    shutil.rmtree(d.log_dir)
    d.log_dir.write_text("not a directory")  # every open fails, even for root
    r = spawn(d, prompt="still answered")
    assert r["status"] == "success", r
    assert r["result"]["text"] == "echo: still answered (turn 1)"
    session = d.result("GET_SESSION", {"session_id": r["result"]["session_id"]})["session"]
    assert session["turns"] == 1
    wait_for(lambda: "turnlog.write_failed" in d.stderr(), timeout=5)
    assert d.result("HEALTH_CHECK")["status"] == "healthy"


def test_an_agents_spawn_continues_its_latest_session(spawn_daemon: DaemonProcess) -> None:
    d = spawn_daemon
    first = d.result("SPAWN", {"prompt": "one", "agent_id": "keeper"})
    second = d.result("SPAWN", {"prompt": "two", "agent_id": "keeper"})
    assert second["session_id"] == first["session_id"]
    assert second["text"].endswith("(turn 2)")
    fresh = d.result("SPAWN", {"prompt": "three", "agent_id": "keeper", "new_session": True})
    assert fresh["session_id"] != first["session_id"]
    # Now the fresh one is the agent's latest.
    assert (
        d.result("SPAWN", {"prompt": "four", "agent_id": "keeper"})["session_id"]
        == (fresh["session_id"])
    )
    both = d.call("SPAWN", {"prompt": "x", "new_session": True, "session_id": first["session_id"]})
    assert both["error"]["code"] == "INVALID_PARAMETERS"
