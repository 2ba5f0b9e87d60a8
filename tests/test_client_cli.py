"""daemon.client (AsyncClient, SyncClient) and the `python -m daemon.cli` command line."""

from __future__ import annotations

import asyncio
import io
import os
import selectors
import signal
import subprocess
import sys
from typing import Any

import orjson
import pytest

from daemon.cli import Follower, progress_note
from daemon.client import AsyncClient, CommandError, ConnectionClosed, SyncClient
from tests.helpers import ROOT, DaemonProcess, short_tmpdir, wait_for
from tests.inproc import InProcessDaemon


def cli(
    d: DaemonProcess | None, *args: str, env: dict[str, str] | None = None, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    sock = ["--socket", str(d.socket)] if d is not None else []
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KSI_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *sock, *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


class LineReader:
    """Lines of a child's stdout with a timeout (raw reads: no hidden buffer to stall on)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.buf = b""

    def line(self, timeout: float) -> bytes:
        with selectors.DefaultSelector() as sel:
            sel.register(self.fd, selectors.EVENT_READ)
            while b"\n" not in self.buf:
                if not sel.select(timeout):
                    raise TimeoutError(f"no line from the CLI; have {self.buf!r}")
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    raise EOFError(f"CLI closed stdout; have {self.buf!r}")
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line


# -- AsyncClient -------------------------------------------------------------------------------


async def test_async_client_pipelines_200_concurrent_calls(d: DaemonProcess) -> None:
    before = d.result("HEALTH_CHECK")["counts"]["connections"]
    async with AsyncClient.connect(d.socket) as c:
        sets = await asyncio.wait_for(
            asyncio.gather(
                *(c.call("SET_SHARED", {"key": f"pipe:{i}", "value": {"i": i}}) for i in range(200))
            ),
            20,
        )
        assert [r["key"] for r in sets] == [f"pipe:{i}" for i in range(200)]
        gets = await asyncio.wait_for(
            asyncio.gather(
                *(c.call("GET_SHARED", {"key": f"pipe:{i}"}) for i in reversed(range(200)))
            ),
            20,
        )
        assert [g["value"] for g in gets] == [{"i": i} for i in reversed(range(200))]
        mixed = await asyncio.gather(
            *(
                c.call("HEALTH_CHECK") if i % 2 else c.call("LIST_SHARED", {"prefix": "pipe:1"})
                for i in range(50)
            )
        )
        assert all(m["status"] == "healthy" for m in mixed[1::2])
        assert all(m["total"] == 111 for m in mixed[0::2])  # pipe:1, pipe:10-19, 100-199
        # All of it went over one connection (plus the one-shot HEALTH_CHECK below).
        assert d.result("HEALTH_CHECK")["counts"]["connections"] == before + 1


async def test_async_client_errors_and_envelope(d: DaemonProcess) -> None:
    async with AsyncClient.connect(d.socket, agent_id="cli-agent") as c:
        with pytest.raises(CommandError) as info:
            await c.call("UNREGISTER_AGENT", {"agent_id": "nobody-here"})
        assert info.value.code == "AGENT_NOT_FOUND"
        assert "known_agents" in info.value.details
        assert info.value.reply["status"] == "error"
        with pytest.raises(CommandError) as info:
            await c.call("SET_SHARED", {"key": "k"})
        assert info.value.code == "INVALID_PARAMETERS"
        assert info.value.details["errors"][0]["field"] == "value"
        with pytest.raises(CommandError) as info:
            await c.call("NOT_A_COMMAND")
        assert info.value.code == "UNKNOWN_COMMAND"
        # The connection survives errors, and request() returns the whole envelope.
        reply = await c.request("HEALTH_CHECK")
        assert reply["status"] == "success"
        assert isinstance(reply["id"], int)
        res = await c.call("PUBLISH", {"event_type": "CLIENT_FROM"})
    events = d.result("GET_EVENTS", {"since_seq": res["seq"] - 1, "limit": 1})["events"]
    assert events[0]["from_agent"] == "cli-agent"  # the client's agent_id bound the connection


async def test_async_client_events(d: DaemonProcess) -> None:
    async with AsyncClient.connect(d.socket) as sub, AsyncClient.connect(d.socket) as pub:
        res = await sub.subscribe(["CLIENT_EV_*"])
        assert res["subscribed_to"] == ["CLIENT_EV_*"]
        seqs = [
            (await pub.call("PUBLISH", {"event_type": f"CLIENT_EV_{i}", "payload": {"i": i}}))[
                "seq"
            ]
            for i in range(5)
        ]
        # Replies and events interleave on the subscriber's connection; calls still match.
        assert (await sub.call("GET_SHARED", {"key": "none"}))["found"] is False
        got = [await sub.next_event(timeout=5) for _ in range(5)]
        assert [e["seq"] for e in got] == seqs
        assert [e["data"]["i"] for e in got] == list(range(5))
        with pytest.raises(TimeoutError):
            await sub.next_event(timeout=0.1)


async def test_async_client_sees_the_daemon_go() -> None:
    dp = InProcessDaemon().start()
    try:
        c = await AsyncClient.open(dp.socket)
        await c.subscribe(["*"])
        await c.call("SHUTDOWN")
        received = [e async for e in c.events()]  # ends when the daemon closes
        assert all("event" in e for e in received)
        with pytest.raises(ConnectionClosed):
            await c.next_event(timeout=5)
        with pytest.raises(ConnectionClosed):
            await c.call("HEALTH_CHECK", timeout=5)
        await c.close()
        assert dp.wait(10) == 0
    finally:
        dp.cleanup()


# -- SyncClient --------------------------------------------------------------------------------


def test_sync_client(d: DaemonProcess) -> None:
    c = SyncClient(d.socket, timeout=10)
    assert c.call("HEALTH_CHECK")["status"] == "healthy"
    assert c.call("SET_SHARED", {"key": "sync:k", "value": [1, 2]})["status"] == "set"
    assert c.call("GET_SHARED", {"key": "sync:k"})["value"] == [1, 2]
    reply = c.request("GET_SHARED", {"key": ""})
    assert reply["status"] == "error"
    with pytest.raises(CommandError) as info:
        c.call("GET_SESSION", {"session_id": "nope"})
    assert info.value.code == "SESSION_NOT_FOUND"
    # A big reply arrives whole (it spans many recv calls).
    commands = c.call("GET_COMMANDS")
    assert commands["total"] == len(commands["commands"]) > 10


def test_sync_client_without_a_daemon() -> None:
    base = short_tmpdir()
    try:
        with pytest.raises(FileNotFoundError):
            SyncClient(base / "missing.sock", timeout=2).call("HEALTH_CHECK")
    finally:
        base.rmdir()


# -- CLI -----------------------------------------------------------------------------------------


def test_cli_send_health_check(d: DaemonProcess) -> None:
    proc = cli(d, "send", "HEALTH_CHECK", "--json")
    assert proc.returncode == 0, proc.stderr
    reply = orjson.loads(proc.stdout)
    assert reply["status"] == "success"
    assert reply["result"]["pid"] == d.serving_pid
    lower = cli(d, "send", "health_check", "--json")  # command names are case-insensitive here
    assert lower.returncode == 0
    assert orjson.loads(lower.stdout)["command"] == "HEALTH_CHECK"


def test_cli_send_parameters_as_json(d: DaemonProcess) -> None:
    assert cli(d, "send", "SET_SHARED", "key=x", "value=1").returncode == 0
    got = d.result("GET_SHARED", {"key": "x"})
    assert got["value"] == 1
    assert isinstance(got["value"], int)
    assert cli(d, "send", "SET_SHARED", "key=s", "value=hello world").returncode == 0
    assert d.result("GET_SHARED", {"key": "s"})["value"] == "hello world"
    assert cli(d, "send", "SET_SHARED", "key=l", 'value=["a", null, {"b": true}]').returncode == 0
    assert d.result("GET_SHARED", {"key": "l"})["value"] == ["a", None, {"b": True}]
    assert cli(d, "send", "SET_SHARED", '{"key": "j", "value": null}').returncode == 0
    assert d.result("GET_SHARED", {"key": "j"}) == {
        "key": "j",
        "value": None,
        "found": True,
        "updated_at": d.result("GET_SHARED", {"key": "j"})["updated_at"],
    }
    proc = cli(d, "send", "GET_SHARED", "key=x", "--json")
    assert orjson.loads(proc.stdout)["result"]["value"] == 1


def test_cli_send_errors(d: DaemonProcess) -> None:
    proc = cli(d, "send", "UNREGISTER_AGENT", "agent_id=ghost", "--json")
    assert proc.returncode == 1
    assert orjson.loads(proc.stdout)["error"]["code"] == "AGENT_NOT_FOUND"
    human = cli(d, "send", "UNREGISTER_AGENT", "agent_id=ghost")
    assert human.stdout.startswith("error AGENT_NOT_FOUND: ")
    proc = cli(d, "send", "SET_SHARED", "novalue")
    assert proc.returncode != 0
    assert "key=value" in proc.stderr
    proc = cli(None, "--socket", "/tmp/ksi-no-such-dir/x.sock", "send", "HEALTH_CHECK")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:")


def test_cli_prints_a_summary_for_people(d: DaemonProcess) -> None:
    health = cli(d, "send", "HEALTH_CHECK")
    assert health.returncode == 0, health.stderr
    first = health.stdout.splitlines()[0]
    assert first.startswith("healthy · ksi ")
    assert f"pid {d.serving_pid}" in first
    assert "credentials ok" in health.stdout
    turn = cli(d, "send", "SPAWN", "prompt=Say hi", f"cwd={d.work}")
    assert turn.returncode == 0, turn.stderr
    lines = turn.stdout.splitlines()
    assert lines[0] == "echo: Say hi (turn 1)"
    assert lines[1].startswith("-- session ")
    assert "$0." in lines[1]
    assert len(lines) == 2  # not the CLI's raw JSON
    shared = cli(d, "send", "GET_SHARED", "key=nothing")
    assert orjson.loads(shared.stdout)["found"] is False  # the result, without the envelope


def test_cli_uses_ksi_socket(d: DaemonProcess) -> None:
    proc = cli(None, "send", "HEALTH_CHECK", "--json", env={"KSI_SOCKET": str(d.socket)})
    assert proc.returncode == 0, proc.stderr
    assert orjson.loads(proc.stdout)["result"]["socket"] == str(d.socket)


def test_cli_subscribe_streams_events(d: DaemonProcess) -> None:
    base = d.result("HEALTH_CHECK")["counts"]["subscribers"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KSI_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daemon.cli",
            "--socket",
            str(d.socket),
            "subscribe",
            "CUSTOM_*",
            "OTHER_EXACT",
        ],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: d.result("HEALTH_CHECK")["counts"]["subscribers"] == base + 1, 15)
        published: list[dict[str, Any]] = []
        for etype, payload in [
            ("CUSTOM_HELLO", {"msg": "hi"}),
            ("IGNORED", {}),
            ("OTHER_EXACT", {"n": 2}),
        ]:
            published.append(d.result("PUBLISH", {"event_type": etype, "payload": payload}))
        out = LineReader(proc)
        first = orjson.loads(out.line(10))
        second = orjson.loads(out.line(10))
        assert (first["event"], first["data"], first["seq"]) == (
            "CUSTOM_HELLO",
            {"msg": "hi"},
            published[0]["seq"],
        )
        assert (second["event"], second["seq"]) == ("OTHER_EXACT", published[2]["seq"])
        assert set(first) == {"event", "type", "data", "seq", "timestamp"}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 130
        assert proc.stderr is not None
        confirm = proc.stderr.read().decode()
        assert confirm.startswith("subscribed to CUSTOM_* OTHER_EXACT; waiting for events")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
    # Its subscription ended with it.
    wait_for(lambda: d.result("HEALTH_CHECK")["counts"]["subscribers"] == base, 5)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_follow_shows_a_spinner_on_a_terminal_until_the_first_event() -> None:
    out, err = io.StringIO(), _Terminal()
    printer = Follower(out, err)
    printer.idle()
    printer.idle()
    assert err.getvalue().count("waiting for the turn to start") == 2
    assert err.getvalue().startswith("\r⠋ ")
    printer.event({"kind": "started", "model": "claude-sonnet-5"})
    assert err.getvalue().endswith("\r\x1b[K")  # cleared by the first event
    printer.idle()  # the spinner is gone for good
    printer.event({"kind": "text", "text": "Hel", "delta": True})
    printer.event({"kind": "text", "text": "lo", "delta": True})
    printer.event({"kind": "tool_use", "name": "Read", "input": {"file_path": "/x"}})
    printer.event({"kind": "tool_result", "is_error": True, "content": "\n  no such file\n"})
    printer.end()
    assert err.getvalue().count("waiting") == 2
    assert out.getvalue() == (
        'Hello\n· Read {"file_path":"/x"}\n  ↳ error no such file\n'  # a note on its own line
    )
    assert printer.text_shown


def test_progress_notes_stay_on_one_line() -> None:
    long = {"kind": "tool_use", "name": "Bash", "input": {"command": "echo " + "x" * 500}}
    note = progress_note(long)
    assert note is not None
    assert len(note) <= 120
    assert note.endswith("…")
    retry = {"kind": "api_retry", "attempt": 1, "max_retries": 3, "delay_s": 1.2, "status": 529}
    assert progress_note(retry) == "· API retry 1/3 in 1.2 s (status 529)"
    assert progress_note({"kind": "status", "status": "requesting"}) is None
    assert progress_note({"kind": "started"}) is None


def test_budget_and_pause_commands_from_the_command_line(daemon: DaemonProcess) -> None:
    """The people-in-the-loop commands have their CLI form in ``send``."""
    done = cli(daemon, "send", "SET_BUDGET", "agent_id=cli-agent", "max_cost_usd=1.5")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["budget"]["remaining_usd"] == 1.5
    done = cli(daemon, "send", "PAUSE_AGENT", "agent_id=cli-agent")
    assert orjson.loads(done.stdout)["paused"] is True
    listed = daemon.result("GET_PROCESSES")["paused"]
    assert [(p["scope"], p["id"]) for p in listed] == [("agent", "cli-agent")]
    done = cli(daemon, "send", "RESUME_AGENT", "agent_id=cli-agent")
    assert orjson.loads(done.stdout)["changed"] is True
    bad = cli(daemon, "send", "SET_BUDGET", "agent_id=cli-agent", 'max_cost_usd="lots"')
    assert bad.returncode != 0
    assert "INVALID_PARAMETERS" in bad.stdout + bad.stderr
