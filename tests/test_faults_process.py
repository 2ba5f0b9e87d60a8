"""Faults around the daemon's own process: SIGKILL and SIGHUP of the daemon, orphaned CLIs,
turns that must survive a restart, replays that must not pay twice, an unsafe pid file,
and SPAWN parameters that used to be coerced into something nobody asked for."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.helpers import DaemonProcess, fill, pid_alive, short_tmpdir, spawn, wait_for
from tests.inproc import InProcessDaemon


def turns_run(d: DaemonProcess) -> list[dict[str, Any]]:
    """Every turn the fake CLI was started for (not `claude --version`)."""
    if not d.fake_log.exists():
        return []
    rows = [orjson.loads(x) for x in d.fake_log.read_bytes().splitlines() if x.strip()]
    return [r for r in rows if "argv" in r and "-p" in r["argv"]]


def prompts_run(d: DaemonProcess) -> list[str]:
    """The prompts the fake CLI answered (or began to), in order."""
    if not d.fake_log.exists():
        return []
    rows = [orjson.loads(x) for x in d.fake_log.read_bytes().splitlines() if x.strip()]
    return [r["turn_prompt"] for r in rows if "turn_prompt" in r]


def read_pid(path: Path) -> int:
    wait_for(lambda: path.exists() and path.read_text().strip(), timeout=20)
    return int(path.read_text())


@pytest.fixture
def pids() -> Iterator[list[int]]:
    """CLI pids a test made the daemon start; any still alive at the end are ended, so a
    failing test leaves no orphan behind."""
    started: list[int] = []
    yield started
    for pid in started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def processes(d: DaemonProcess) -> dict[str, dict[str, Any]]:
    return {p["process_id"]: p for p in d.result("GET_PROCESSES")["processes"]}


# -- SIGKILL of the daemon ---------------------------------------------------------------


def test_kill9_leaves_no_cli_running_after_the_restart(make_daemon: Any, pids: list[int]) -> None:
    d = make_daemon(process=True)
    runs = []
    for i in range(3):
        pidfile = d.base / f"cli{i}.pid"
        extra = f"[[grandchild:{d.base / 'grandchild.pid'}]]" if i == 0 else ""
        reply = spawn(d, prompt=f"[[pidfile:{pidfile}]]{extra}[[sleep:120]] turn {i}", mode="async")
        assert reply["status"] == "success", reply
        runs.append((reply["result"]["process_id"], reply["result"]["session_id"], pidfile))
    cli_pids = [read_pid(p) for _, _, p in runs]
    pids.extend(cli_pids)
    grandchild = read_pid(d.base / "grandchild.pid")
    pids.append(grandchild)

    # Their records carry what a restarted daemon needs to find them safely.
    def recorded() -> bool:
        recs = processes(d)
        return all(
            recs[process_id]["pid"] == pid and recs[process_id]["pid_ticks"]
            for pid, (process_id, _, _) in zip(cli_pids, runs, strict=True)
        )

    wait_for(recorded)

    d.stop(signal.SIGKILL)
    # Without the daemon they are still running (re-parented): the fault being fixed.
    assert all(pid_alive(p) for p in cli_pids)

    d.start()
    # By the time the socket answers, start-up has ended them all, grandchild included.
    assert not any(pid_alive(p) for p in [*cli_pids, grandchild])
    recs = processes(d)
    for process_id, session_id, _ in runs:
        rec = recs[process_id]
        assert rec["status"] == "interrupted"
        assert rec["error"]["code"] == "INTERRUPTED"
        # The session is intact: the daemon knows it, and it can be resumed.
        assert d.result("GET_SESSION", {"session_id": session_id})["session"]["cwd"] == str(d.work)
    assert any(e.get("event") == "daemon.orphans_ended" for e in d.log_events())
    _, session_id, _ = runs[1]
    again = spawn(d, prompt="after the crash", session_id=session_id)
    assert again["status"] == "success", again
    assert again["result"]["text"].startswith("echo: after the crash")


def test_a_second_daemon_on_the_same_state_is_refused(make_daemon: Any, pids: list[int]) -> None:
    """Two daemons sharing one state directory (different sockets) would each take the
    other's running turns for an earlier run's: the second one refuses to start, and the
    first one's CLI runs on."""
    first = make_daemon()
    pidfile = first.base / "cli.pid"
    spawn(first, prompt=f"[[pidfile:{pidfile}]][[sleep:120]]", mode="async")
    pid = read_pid(pidfile)
    pids.append(pid)
    second = DaemonProcess(args=["--state-dir", str(first.state_dir)])
    try:
        with pytest.raises(RuntimeError, match="another daemon uses the state directory"):
            second.start(timeout=10)
    finally:
        second.cleanup()
    assert pid_alive(pid)
    assert first.result("HEALTH_CHECK")["status"] == "healthy"


# -- SIGHUP -------------------------------------------------------------------------------


def test_sighup_stops_gracefully(make_daemon: Any, pids: list[int]) -> None:
    d = make_daemon(process=True)
    pidfile = d.base / "cli.pid"
    replies: list[dict[str, Any]] = []
    caller = threading.Thread(
        target=lambda: replies.append(spawn(d, prompt=f"[[pidfile:{pidfile}]][[sleep:1]] hi"))
    )
    caller.start()
    pid = read_pid(pidfile)
    pids.append(pid)
    os.kill(d.pid, signal.SIGHUP)
    assert d.proc is not None
    assert d.proc.wait(30) == 0  # a clean exit, not death by -SIGHUP
    caller.join(30)
    # The sync client got its answer: the running turn finished within the shutdown grace.
    assert len(replies) == 1
    assert replies[0]["status"] == "success", replies
    assert replies[0]["result"]["text"].startswith("echo: ")
    assert not pid_alive(pid)
    assert not d.socket.exists()
    assert not d.socket.with_suffix(".pid").exists()
    assert any(
        e.get("event") == "daemon.shutting_down" and e.get("reason") == "SIGHUP"
        for e in d.log_events()
    )


# -- queued turns across a restart ----------------------------------------------------------


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_queued_async_turns_run_after_a_restart(
    make_daemon: Any, pids: list[int], how: str
) -> None:
    d = make_daemon("--max-concurrency", "1", env={"KSI_SHUTDOWN_GRACE_S": "0"}, process=True)
    pidfile = d.base / "blocker.pid"
    blocker = spawn(d, prompt=f"[[pidfile:{pidfile}]][[sleep:120]] blocker", mode="async")
    pids.append(read_pid(pidfile))
    queued = [spawn(d, prompt=f"queued {i}", mode="async")["result"] for i in range(3)]
    assert all((q["status"], q["state"]) == ("started", "queued") for q in queued)
    cancelled = queued.pop()
    assert (
        d.result("CANCEL_PROCESS", {"process_id": cancelled["process_id"]})["status"] == "cancelled"
    )

    d.stop(signal.SIGKILL if how == "sigkill" else signal.SIGTERM)
    d.start()
    wait_for(
        lambda: all(processes(d)[q["process_id"]]["status"] == "completed" for q in queued),
        timeout=30,
    )
    recs = processes(d)
    blocked = recs[blocker["result"]["process_id"]]
    assert blocked["status"] == ("interrupted" if how == "sigkill" else "cancelled")
    for q in queued:
        assert recs[q["process_id"]]["status"] == "completed"
    assert recs[cancelled["process_id"]]["status"] == "cancelled"
    # Run once each, in the order they were accepted; the cancelled one never ran.
    prompts = prompts_run(d)
    ran = [p for p in prompts if p.startswith("queued")]
    assert ran == ["queued 0", "queued 1"], prompts


# -- replays across a restart -----------------------------------------------------------


def test_replay_after_a_restart_does_not_pay_twice(make_daemon: Any, pids: list[int]) -> None:
    d = make_daemon(process=True)
    first = spawn(d, prompt="paid once", client_request_id="job-1")
    assert first["status"] == "success", first
    pidfile = d.base / "cli.pid"
    spawn(
        d,
        prompt=f"[[pidfile:{pidfile}]][[sleep:2]] cut short",
        mode="async",
        client_request_id="job-2",
    )
    pids.append(read_pid(pidfile))
    d.stop(signal.SIGKILL)
    d.start()
    runs_before = len(turns_run(d))

    # A completed turn is replayed with its answer, not run again.
    replay = spawn(d, prompt="paid once", client_request_id="job-1")
    assert replay["status"] == "success", replay
    assert replay["result"]["replayed"] is True
    assert replay["result"]["text"] == first["result"]["text"]
    assert replay["result"]["process_id"] == first["result"]["process_id"]
    assert len(turns_run(d)) == runs_before

    # An interrupted one runs again when resubmitted, once; a further resubmission replays.
    rerun = spawn(d, prompt="[[sleep:0]] cut short", client_request_id="job-2")
    assert rerun["status"] == "success", rerun
    assert rerun["result"]["replayed"] is False
    again = spawn(d, prompt="[[sleep:0]] cut short", client_request_id="job-2")
    assert again["result"]["replayed"] is True
    assert again["result"]["process_id"] == rerun["result"]["process_id"]
    assert len(turns_run(d)) == runs_before + 1


# -- the pid file and shared directories -------------------------------------------------


def test_planted_pid_file_symlink_is_refused() -> None:
    base = short_tmpdir()
    victim = base / "victim.txt"
    victim.write_text("precious\n")
    d = DaemonProcess(base)
    d.socket.parent.mkdir(parents=True, exist_ok=True)
    d.socket.with_suffix(".pid").symlink_to(victim)
    try:
        with pytest.raises(RuntimeError, match="exited with 1"):
            d.start(timeout=10)
        assert victim.read_text() == "precious\n"
        assert "is a symbolic link; refusing to use it" in d.stderr()
    finally:
        d.cleanup()


def test_a_shared_sticky_directory_keeps_its_mode() -> None:
    base = short_tmpdir()
    shared = base / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    d = DaemonProcess(base)
    d.socket = shared / "ksi.sock"
    d.start()
    try:
        assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
        assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(shared / "ksi.pid").st_mode) == 0o600
    finally:
        d.cleanup()


# -- parameters that used to be coerced --------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("timeout_s", True),
        ("timeout_s", "inf"),
        ("timeout_s", 1e30),
        ("timeout_s", "5"),
        ("max_turns", True),
        ("max_turns", 1e30),
        ("max_turns", 2.0),
        ("warm", "yes"),
        ("warm", 1),
        ("enable_tools", "false"),
        ("cwd", "/tmp/with\x00nul"),
        ("append_system_prompt", "a\x00b"),
        ("allowed_tools", ["Read", "Ba\x00sh"]),
    ],
)
def test_spawn_parameters_are_not_coerced(d: DaemonProcess, field: str, value: Any) -> None:
    reply = d.call("SPAWN", {"prompt": "hi", field: value})
    assert reply["status"] == "error", reply
    assert reply["error"]["code"] == "INVALID_PARAMETERS"
    assert field in reply["error"]["message"] or field in orjson.dumps(reply["error"]).decode()
    assert not turns_run(d)


# -- transient API failures ----------------------------------------------------------------


def progress(d: DaemonProcess, process_id: str) -> list[dict[str, Any]]:
    events = d.result("GET_EVENTS", {"event_types": ["PROCESS_PROGRESS"]})["events"]
    return [e["data"] for e in events if e["data"]["process_id"] == process_id]


def test_transient_api_errors_are_retried_and_the_model_sees_the_prompt_once(
    make_daemon: Any,
) -> None:
    d = make_daemon()
    counter = d.base / "flaky-1"
    prompt = f"[[flaky:529:{counter}:2]] hello"
    reply = spawn(d, prompt=prompt)
    assert reply["status"] == "success", reply
    r = reply["result"]
    # The fake numbers turns by the user messages in the session: a retry that left the
    # failed attempts' copies of the prompt in the transcript would answer "(turn 3)".
    assert r["text"] == f"echo: {prompt} (turn 1)"
    assert prompts_run(d).count(prompt) == 3
    events = progress(d, r["process_id"])
    # Each attempt is visible as it runs; the daemon's retries between them too.
    attempt = ["started", "status"]  # the CLI's init line, then its API error message
    assert [e["kind"] for e in events] == [*attempt, "api_retry"] * 2 + ["started", "text"]
    assert [e["index"] for e in events] == list(range(len(events)))
    retries = [e for e in events if e["kind"] == "api_retry"]
    assert [e["source"] for e in retries] == ["daemon", "daemon"]
    assert [e["attempt"] for e in retries] == [1, 2]
    assert {e["status"] for e in retries} == {529}
    assert all(e["delay_s"] > 0 for e in retries)
    # The session goes on from one clean turn.
    follow = spawn(d, prompt="next", session_id=r["session_id"])["result"]
    assert follow["text"] == "echo: next (turn 2)"

    # A resumed turn that fails once is rewound to the end of the turn before it.
    counter2 = d.base / "flaky-2"
    third = spawn(d, prompt=f"[[flaky:429:{counter2}:1]] third", session_id=r["session_id"])
    assert third["status"] == "success", third
    assert third["result"]["text"].endswith("(turn 3)")


def test_retries_are_bounded_and_the_last_error_is_reported(make_daemon: Any) -> None:
    d = make_daemon(env={"KSI_API_RETRIES": "2"})
    reply = spawn(d, prompt="[[error:500]] never")
    assert reply["status"] == "error"
    assert reply["error"]["code"] == "API_ERROR"
    assert prompts_run(d).count("[[error:500]] never") == 3  # the first attempt + 2 retries
    # Not transient: one attempt only.
    assert spawn(d, prompt="[[error:401]] no key")["error"]["code"] == "AUTH_FAILED"
    assert prompts_run(d).count("[[error:401]] no key") == 1


def test_a_rate_limit_holds_the_other_turns(make_daemon: Any) -> None:
    d = make_daemon(env={"KSI_API_RETRY_BASE_S": "0.8"})
    counter = d.base / "flaky"
    first: list[dict[str, Any]] = []
    caller = threading.Thread(
        target=lambda: first.append(spawn(d, prompt=f"[[flaky:429:{counter}:1]] first"))
    )
    caller.start()

    def rate_limited() -> bool:
        events = d.result("GET_EVENTS", {"event_types": ["PROCESS_PROGRESS"]})["events"]
        return any(e["data"].get("kind") == "api_retry" for e in events)

    # The daemon has seen the 429 (not merely the CLI having started): only from then on
    # can it hold the other turns back.
    wait_for(rate_limited)
    second = spawn(d, prompt="second")
    caller.join(30)
    assert first[0]["status"] == "success"
    assert second["status"] == "success"
    rows = [orjson.loads(x) for x in d.fake_log.read_bytes().splitlines() if x.strip()]
    started = {r["turn_prompt"]: r["time"] for r in rows if "turn_prompt" in r}
    failed_at = min(r["time"] for r in rows if r.get("turn_prompt", "").endswith("first"))
    # "second" was sent while the API rate-limited: it waited out the same backoff.
    assert started["second"] - failed_at >= 0.75


def test_retry_delay_rules() -> None:
    from daemon.errors import ErrorCode, TurnFailed
    from daemon.settings import Settings
    from daemon.turns.retry import retry_delay

    s = Settings(api_retries=3, api_retry_base_s=1.0, api_retry_max_s=30.0)

    def err(
        code: ErrorCode, status: int | None, message: str = "API Error", **raw: Any
    ) -> TurnFailed:
        return TurnFailed(
            message, code=code, details={"api_error_status": status, "raw": raw or None}
        )

    first = retry_delay(err(ErrorCode.RATE_LIMITED, 429), 0, s)
    assert first is not None
    assert 1.0 <= first <= 1.25
    third = retry_delay(err(ErrorCode.API_ERROR, 529), 2, s)
    assert third is not None
    assert 4.0 <= third <= 5.0
    assert retry_delay(err(ErrorCode.API_ERROR, 529), 3, s) is None  # used up
    assert retry_delay(err(ErrorCode.API_ERROR, 400), 0, s) is None
    assert retry_delay(err(ErrorCode.AUTH_FAILED, 401), 0, s) is None
    assert retry_delay(err(ErrorCode.API_ERROR, None, "Request timed out"), 0, s) is None
    connect = retry_delay(err(ErrorCode.API_ERROR, None, "Unable to connect to API"), 0, s)
    assert connect is not None
    # The failed attempt did paid work (a tool round, say): a rerun would pay again.
    assert retry_delay(err(ErrorCode.API_ERROR, 529, total_cost_usd=0.02), 0, s) is None
    assert retry_delay(err(ErrorCode.API_ERROR, 500, usage={"output_tokens": 7}), 0, s) is None
    hinted = retry_delay(err(ErrorCode.RATE_LIMITED, 429, "rate limited; retry-after: 7"), 0, s)
    assert hinted is not None
    assert hinted >= 7.0
    assert retry_delay(err(ErrorCode.RATE_LIMITED, 429, "retry after 120"), 0, s) is None


# -- a state disk that refuses writes -------------------------------------------------------


def test_spawn_and_publish_refuse_while_the_state_disk_is_full(tmpfs: Any) -> None:
    """SPAWN and PUBLISH record their effect without waiting for the commit; while the store
    is failing they say so instead of answering success for records that would be lost."""
    disk = tmpfs("4m")
    d = InProcessDaemon(preload=True)
    d.state_dir = disk / "state"
    try:
        d.start()
        assert d.result("HEALTH_CHECK")["status"] == "healthy"
        filler = fill(disk)
        refused = d.call("SET_SHARED", {"key": "k", "value": "v" * 1_000_000})
        assert refused["error"]["code"] == "STORAGE_FULL"
        health = d.result("HEALTH_CHECK")
        assert health["status"] == "degraded"
        assert health["storage"]["writable"] is False
        spawned = d.call("SPAWN", {"prompt": "hi", "cwd": str(d.work)})
        assert spawned["status"] == "error"
        assert spawned["error"]["code"] == "STORAGE_FULL"
        published = d.call("PUBLISH", {"event_type": "NOTE", "payload": {"x": 1}})
        assert published["error"]["code"] == "STORAGE_FULL"
        assert not turns_run(d)  # nothing was paid for
        filler.unlink()

        def recovered() -> bool:
            return (
                d.call("PUBLISH", {"event_type": "NOTE", "payload": {"x": 2}})["status"]
                == "success"
            )

        wait_for(recovered, timeout=10)
        assert d.result("HEALTH_CHECK")["status"] == "healthy"
        assert spawn(d, prompt="after")["status"] == "success"
    finally:
        d.cleanup()


# -- SIGKILL of the CLI -------------------------------------------------------------------


def test_kill9_of_the_cli_mid_turn_is_cli_crashed_and_the_session_goes_on(
    make_daemon: Any, pids: list[int]
) -> None:
    d = make_daemon()
    first = spawn(d, prompt="one")["result"]
    pidfile = d.base / "cli.pid"
    replies: list[dict[str, Any]] = []
    caller = threading.Thread(
        target=lambda: replies.append(
            spawn(
                d, prompt=f"[[pidfile:{pidfile}]][[sleep:60]] two", session_id=first["session_id"]
            )
        )
    )
    caller.start()
    pid = read_pid(pidfile)
    pids.append(pid)
    os.kill(pid, signal.SIGKILL)
    caller.join(30)
    assert replies[0]["status"] == "error"
    assert replies[0]["error"]["code"] == "CLI_CRASHED"  # not retried: not an API failure
    assert prompts_run(d).count(f"[[pidfile:{pidfile}]][[sleep:60]] two") == 1
    # Reaped by the daemon (its parent): not even a zombie is left in /proc.
    wait_for(lambda: not Path(f"/proc/{pid}").exists())
    assert d.result("HEALTH_CHECK")["status"] == "healthy"
    after = spawn(d, prompt="three", session_id=first["session_id"])
    assert after["status"] == "success", after
