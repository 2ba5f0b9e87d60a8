"""The permission relay with the fake CLI: the relay's answers (daemon/claude/permissions.py),
the broker's edges (cancel, restart, edited input, bad input) and the example policy plugin.
The real CLI's side is in tests/e2e/test_permissions_real_cli.py."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import jsonschema
import pytest

from daemon.claude.permissions import PermissionAnswer, PermissionAsk, PermissionRelay
from daemon.client import AsyncClient
from daemon.plugins.permission_policy import decide, paths_outside
from daemon.turns.permissions import PermissionBroker
from tests.helpers import DaemonProcess, eventually, wait_for

ROOT = Path(__file__).resolve().parents[1]

CAN_USE_TOOL = {
    "type": "control_request",
    "request_id": "req-1",
    "request": {
        "subtype": "can_use_tool",
        "tool_name": "Bash",
        "input": {"command": "touch x"},
        "permission_suggestions": [
            {"type": "addRules", "rules": [{"toolName": "Bash", "ruleContent": "touch x"}]}
        ],
    },
}


class Lines:
    """What a relay wrote to the CLI's stdin."""

    def __init__(self) -> None:
        self.written: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()

    async def write(self, obj: dict[str, Any]) -> bool:
        self.written.append(obj)
        self.arrived.set()
        return True

    async def one(self) -> dict[str, Any]:
        await asyncio.wait_for(self.arrived.wait(), 5)
        (line,) = self.written
        response: dict[str, Any] = line["response"]
        return response


# -- the relay ---------------------------------------------------------------------------------


async def test_without_a_handler_the_default_decision_is_given_at_once() -> None:
    lines = Lines()
    relay = PermissionRelay(lines.write, None, timeout_s=None, default="allow")
    relay.take(CAN_USE_TOOL)
    response = await lines.one()
    assert response["request_id"] == "req-1"
    # An allow gives the CLI its input back (it runs the tool with what it gets).
    assert response["response"] == {"behavior": "allow", "updatedInput": {"command": "touch x"}}


async def test_a_failing_handler_denies_and_an_edit_is_passed_on() -> None:
    async def broken(ask: PermissionAsk) -> PermissionAnswer:
        raise RuntimeError("bug")

    lines = Lines()
    PermissionRelay(lines.write, broken, timeout_s=5, default="allow").take(CAN_USE_TOOL)
    assert (await lines.one())["response"]["behavior"] == "deny"

    seen: list[PermissionAsk] = []

    async def editor(ask: PermissionAsk) -> PermissionAnswer:
        seen.append(ask)
        return PermissionAnswer("allow", updated_input={"command": "touch y"})

    lines = Lines()
    PermissionRelay(lines.write, editor, timeout_s=7, default="deny").take(CAN_USE_TOOL)
    assert (await lines.one())["response"]["updatedInput"] == {"command": "touch y"}
    (ask,) = seen
    assert (ask.cli_request_id, ask.tool_name, ask.timeout_s, ask.default) == (
        "req-1",
        "Bash",
        7,
        "deny",
    )
    assert ask.suggestions[0]["rules"] == [{"toolName": "Bash", "ruleContent": "touch x"}]


async def test_other_control_requests_get_an_error_and_aclose_cancels_open_questions() -> None:
    lines = Lines()
    relay = PermissionRelay(lines.write, None, timeout_s=None, default=None)
    relay.take({"type": "control_request", "request_id": "h1", "request": {"subtype": "hook"}})
    response = await lines.one()
    assert (response["subtype"], response["request_id"]) == ("error", "h1")

    cancelled = asyncio.Event()

    async def slow(ask: PermissionAsk) -> PermissionAnswer:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("not reached")

    lines = Lines()
    relay = PermissionRelay(lines.write, slow, timeout_s=60, default=None)
    relay.take(CAN_USE_TOOL)
    await asyncio.sleep(0.01)
    assert relay.pending == 1
    await relay.aclose()
    assert cancelled.is_set()
    assert relay.pending == 0
    assert lines.written == []  # nobody is left to read an answer


# -- the broker ---------------------------------------------------------------------------------


def _broker_with(
    write: Callable[..., Any], queued: list[tuple[str, Any]]
) -> tuple[PermissionBroker, Any]:
    """A broker over stand-ins for the store (``write`` given, ``write_nowait`` into
    ``queued``), the state manager and the bus, and a running turn for it to ask for."""

    def write_nowait(*args: Any) -> bool:
        queued.append(args)
        return True

    store = SimpleNamespace(write=write, write_nowait=write_nowait)
    state = SimpleNamespace(note_process=lambda info: None)
    bus = SimpleNamespace(publish=lambda *a, **k: None)
    broker = PermissionBroker(cast(Any, store), cast(Any, state), cast(Any, bus))
    turn = SimpleNamespace(
        session_id="s1",
        info=SimpleNamespace(process_id="p1", status="running"),
        request=SimpleNamespace(agent_id=None),
        cwd="/tmp",
        awaiting=0,
    )
    return broker, turn


async def test_a_request_is_listed_only_once_its_row_is_committed() -> None:
    """A client that saw a request (GET_PERMISSION_REQUESTS) must find it again after a crash,
    so the listing may not show it before its SQLite row is committed."""
    committed = asyncio.Event()
    writes: list[str] = []

    async def write(sql: str, params: Any = ()) -> None:
        await committed.wait()
        writes.append(sql)

    broker, turn = _broker_with(write, queued=[])
    ask = PermissionAsk("req-1", "Bash", {"command": "touch x"}, timeout_s=5)
    asking = asyncio.create_task(broker.ask(turn, ask))
    await asyncio.sleep(0.05)
    assert broker.listing(include_decided=True, limit=10) == []
    assert broker.stats()["pending"] == 0
    committed.set()
    (record,) = await eventually(lambda: broker.listing(include_decided=False, limit=10))
    assert writes
    assert record.tool_name == "Bash"
    broker.respond(record.request_id, "allow", by="test")
    assert (await asyncio.wait_for(asking, 5)).decision == "allow"


async def test_a_turn_cancelled_while_its_request_is_written_leaves_it_cancelled() -> None:
    never = asyncio.Event()

    async def write(sql: str, params: Any = ()) -> None:
        await never.wait()

    queued: list[tuple[str, Any]] = []
    broker, turn = _broker_with(write, queued)
    asking = asyncio.create_task(broker.ask(turn, PermissionAsk("req-1", "Bash", {}, timeout_s=5)))
    await asyncio.sleep(0.05)
    asking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asking
    ((sql, params),) = queued
    assert "permission_requests" in sql
    assert params[3] == "cancelled"
    assert broker.stats()["pending"] == 0


# -- through the daemon, with the fake CLI ---------------------------------------------------------


async def _next(c: AsyncClient, name: str, process_id: str | None = None) -> dict[str, Any]:
    while True:
        ev = await c.next_event(timeout=20)
        if ev["event"] == name and process_id in (None, ev["data"].get("process_id")):
            data: dict[str, Any] = ev["data"]
            return data


def _spawn_params(d: DaemonProcess, prompt: str, **extra: Any) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "mode": "async",
        "cwd": str(d.work),
        "permissions": "relay",
        **extra,
    }


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_an_allow_can_edit_the_tool_input(make_daemon: Any, warm: bool) -> None:
    d = make_daemon()
    async with AsyncClient.connect(d.socket) as c:
        await c.subscribe(["PERMISSION_*", "PROCESS_COMPLETE"])
        pid = (await c.call("SPAWN", _spawn_params(d, "[[tool:Bash:rm -rf x]]", warm=warm)))[
            "process_id"
        ]
        asked = await _next(c, "PERMISSION_REQUEST", pid)
        assert asked["cwd"] == str(d.work)
        edited = {"command": "echo safer", "description": "edited"}
        await c.call(
            "RESPOND_PERMISSION",
            {"request_id": asked["request_id"], "decision": "allow", "updated_input": edited},
        )
        decided = await _next(c, "PERMISSION_DECIDED", pid)
        assert (decided["status"], decided["decision"]) == ("allowed", "allow")
        done = await _next(c, "PROCESS_COMPLETE", pid)
    assert done["status"] == "completed"
    assert done["text"] == "tool result: echo safer"


async def test_cancel_while_awaiting_permission(make_daemon: Any) -> None:
    d = make_daemon()
    async with AsyncClient.connect(d.socket) as c:
        await c.subscribe(["PERMISSION_*"])
        pid = (await c.call("SPAWN", _spawn_params(d, "[[tool:Bash:touch x]]")))["process_id"]
        asked = await _next(c, "PERMISSION_REQUEST", pid)
        cancelled = await c.call("CANCEL_PROCESS", {"process_id": pid})
        assert cancelled["status"] == "cancelled"
        decided = await _next(c, "PERMISSION_DECIDED", pid)
        assert decided["status"] == "cancelled"
        listing = await c.call("GET_PERMISSION_REQUESTS", {"include_decided": True})
        assert listing["pending"] == 0
        (record,) = [r for r in listing["requests"] if r["request_id"] == asked["request_id"]]
        assert record["status"] == "cancelled"
        late = await c.request(
            "RESPOND_PERMISSION", {"request_id": asked["request_id"], "decision": "allow"}
        )
        assert late["error"]["code"] == "PERMISSION_ALREADY_DECIDED"
    assert not (Path(d.work) / "x").exists()


def test_a_request_pending_when_the_daemon_dies_is_expired_after_the_restart(
    make_daemon: Callable[..., DaemonProcess],
) -> None:
    d = make_daemon(process=True)
    pid = d.result("SPAWN", _spawn_params(d, "[[tool:Bash:touch x]]"))["process_id"]
    pending = wait_for(lambda: d.result("GET_PERMISSION_REQUESTS")["requests"] or None, timeout=15)
    request_id = pending[0]["request_id"]
    assert pending[0]["process_id"] == pid
    d.stop(signal.SIGKILL)
    again = make_daemon(process=True, base=d.base)
    listing = again.result("GET_PERMISSION_REQUESTS", {"include_decided": True})
    assert listing["pending"] == 0
    (record,) = [r for r in listing["requests"] if r["request_id"] == request_id]
    assert (record["status"], record["decided_by"]) == ("expired", "restart")
    late = again.call("RESPOND_PERMISSION", {"request_id": request_id, "decision": "allow"})
    assert late["error"]["code"] == "PERMISSION_EXPIRED"
    procs = {p["process_id"]: p for p in again.result("GET_PROCESSES")["processes"]}
    assert procs[pid]["status"] == "interrupted"


@pytest.mark.parametrize(
    ("command", "params"),
    [
        ("RESPOND_PERMISSION", {"request_id": "r", "decision": "maybe"}),
        ("RESPOND_PERMISSION", {"request_id": "", "decision": "allow"}),
        ("RESPOND_PERMISSION", {"request_id": "r", "decision": "allow", "remember": "forever"}),
        ("SPAWN", {"prompt": "hi", "permissions": "ask"}),
        ("SPAWN", {"prompt": "hi", "permissions": "relay", "permission_timeout_s": 0}),
        ("SPAWN", {"prompt": "hi", "permissions": "relay", "permission_default": "ask"}),
        ("GET_PERMISSION_REQUESTS", {"limit": 0}),
    ],
)
def test_bad_permission_parameters_are_typed_errors(
    d: DaemonProcess, command: str, params: dict[str, Any]
) -> None:
    reply = d.call(command, params)
    assert reply["status"] == "error"
    assert reply["error"]["code"] == "INVALID_PARAMETERS"


async def test_results_match_the_schemas_get_commands_publishes(make_daemon: Any) -> None:
    d = make_daemon()
    async with AsyncClient.connect(d.socket) as c:
        specs = {
            x["command"]: x
            for x in (await c.call("GET_COMMANDS", {"include_results": True}))["commands"]
        }

        def check(name: str, result: Any) -> None:
            jsonschema.Draft202012Validator(specs[name]["result"]).validate(result)

        await c.subscribe(["PERMISSION_REQUEST"])
        await c.call("SPAWN", _spawn_params(d, "[[tool:Write:notes]]"))
        asked = await _next(c, "PERMISSION_REQUEST")
        check("GET_PERMISSION_REQUESTS", await c.call("GET_PERMISSION_REQUESTS"))
        answer = {"request_id": asked["request_id"], "decision": "deny", "message": "no"}
        jsonschema.Draft202012Validator(specs["RESPOND_PERMISSION"]["parameters"]).validate(answer)
        check("RESPOND_PERMISSION", await c.call("RESPOND_PERMISSION", answer))
        listing = await c.call("GET_PERMISSION_REQUESTS", {"include_decided": True})
        check("GET_PERMISSION_REQUESTS", listing)
        assert [r["status"] for r in listing["requests"]] == ["denied"]


# -- the example policy plugin ------------------------------------------------------------------


def test_the_policy_rules() -> None:
    cwd = "/srv/project"
    assert decide("Read", {"file_path": "/etc/hosts"}, cwd) == ("allow", "Read is read-only")
    assert decide("Bash", {"command": "ls -la src > /dev/null"}, cwd) is None
    verdict = decide("Bash", {"command": "cat /etc/passwd"}, cwd)
    assert verdict is not None
    assert verdict[0] == "deny"
    assert "/etc/passwd" in verdict[1]
    assert paths_outside("cp a /srv/project/b", cwd) == []
    assert paths_outside("cp a /srv/project/../other/b", cwd) == ["/srv/other/b"]
    assert paths_outside("--out=/var/x", cwd) == ["/var/x"]
    assert decide("Write", {"file_path": "/srv/project/a"}, cwd) is None  # left to people


async def test_the_policy_plugin_answers_what_it_has_a_rule_for(make_daemon: Any) -> None:
    d = make_daemon("--observer", "daemon.plugins.permission_policy:PermissionPolicy")
    async with AsyncClient.connect(d.socket) as c:
        await c.subscribe(["PERMISSION_*", "PROCESS_COMPLETE"])
        # allowed_tools leaves Read out, so the CLI asks: the policy allows it.
        read = await c.call(
            "SPAWN",
            _spawn_params(d, "[[tool:Read:/etc/hostname]]", allowed_tools=["Grep"]),
        )
        decided = await _next(c, "PERMISSION_DECIDED", read["process_id"])
        assert (decided["decision"], decided["decided_by"]) == ("allow", "permission_policy")
        assert (await _next(c, "PROCESS_COMPLETE", read["process_id"]))["status"] == "completed"

        outside = await c.call("SPAWN", _spawn_params(d, "[[tool:Bash:cat /etc/passwd]]"))
        decided = await _next(c, "PERMISSION_DECIDED", outside["process_id"])
        assert (decided["decision"], decided["decided_by"]) == ("deny", "permission_policy")
        done = await _next(c, "PROCESS_COMPLETE", outside["process_id"])
        assert "may not touch paths outside" in done["text"]

        # No rule for this one: it waits for a person.
        inside = await c.call("SPAWN", _spawn_params(d, "[[tool:Bash:ls]]"))
        asked = await _next(c, "PERMISSION_REQUEST", inside["process_id"])
        await asyncio.sleep(0.2)
        pending = await c.call("GET_PERMISSION_REQUESTS")
        assert [r["request_id"] for r in pending["requests"]] == [asked["request_id"]]
        await c.call("RESPOND_PERMISSION", {"request_id": asked["request_id"], "decision": "allow"})
        assert (await _next(c, "PROCESS_COMPLETE", inside["process_id"]))["status"] == "completed"


# -- python -m daemon.cli permissions --------------------------------------------------------------


def _cli(d: DaemonProcess, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KSI_")}
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", "--socket", str(d.socket), "permissions", *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_the_cli_lists_and_answers(make_daemon: Any) -> None:
    d = make_daemon()
    async with AsyncClient.connect(d.socket) as c:
        await c.subscribe(["PERMISSION_REQUEST", "PROCESS_COMPLETE"])
        first = (await c.call("SPAWN", _spawn_params(d, "[[tool:Bash:touch one]]")))["process_id"]
        asked = await _next(c, "PERMISSION_REQUEST", first)
        listed = await asyncio.to_thread(_cli, d)
        assert listed.returncode == 0, listed.stderr
        assert asked["request_id"] in listed.stdout
        assert "Bash: touch one" in listed.stdout
        # Interactively: "n", then the reason the model is told.
        out = await asyncio.to_thread(_cli, d, "-i", stdin="n\nnot today\n")
        assert out.returncode == 0, out.stderr
        assert f"denied: {asked['request_id']}" in out.stdout
        done = await _next(c, "PROCESS_COMPLETE", first)
        assert "not today" in done["text"]

        second = (await c.call("SPAWN", _spawn_params(d, "[[tool:Bash:touch two]]")))["process_id"]
        asked = await _next(c, "PERMISSION_REQUEST", second)
        out = await asyncio.to_thread(_cli, d, "allow", asked["request_id"], "--remember")
        assert out.returncode == 0, out.stderr
        assert (await _next(c, "PROCESS_COMPLETE", second))["status"] == "completed"
        again = await asyncio.to_thread(_cli, d, "allow", asked["request_id"])
        assert again.returncode == 1
        assert "PERMISSION_ALREADY_DECIDED" in again.stderr
    history = await asyncio.to_thread(_cli, d, "--all")
    assert "denied" in history.stdout
    assert "allowed" in history.stdout
