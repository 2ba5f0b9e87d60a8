"""The permission relay with the real CLI (``--permission-prompt-tool stdio``) against the stub
API, whose ``[[bash:CMD]]`` makes the model ask for a Bash call the CLI does not allow alone."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.client import AsyncClient, CommandError
from tests.helpers import DaemonProcess


@pytest.fixture
def relay_daemon(start_real_daemon: Callable[..., DaemonProcess]) -> DaemonProcess:
    # Relay for every turn by default (the SPAWNs below do not say), pool included.
    return start_real_daemon(KSI_PERMISSIONS="relay")


async def _next(c: AsyncClient, name: str, process_id: str | None = None) -> dict[str, Any]:
    while True:
        ev = await c.next_event(timeout=30)
        if ev["event"] == name and process_id in (None, ev["data"].get("process_id")):
            data: dict[str, Any] = ev["data"]
            return data


async def _spawn(c: AsyncClient, d: DaemonProcess, prompt: str, **params: Any) -> str:
    accepted = await c.call(
        "SPAWN", {"prompt": prompt, "mode": "async", "cwd": str(d.work), **params}
    )
    process_id: str = accepted["process_id"]
    return process_id


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_allow_runs_the_tool_first_answer_wins_and_remember_skips_the_question(
    relay_daemon: DaemonProcess, warm: bool
) -> None:
    d = relay_daemon
    target = Path(d.work) / "made-by-bash"
    prompt = f"[[bash:touch {target}]]"
    async with (
        AsyncClient.connect(d.socket) as watcher,
        AsyncClient.connect(d.socket) as alice,
        AsyncClient.connect(d.socket) as bob,
    ):
        await watcher.subscribe(["PERMISSION_*", "PROCESS_COMPLETE", "PROCESS_PROGRESS"])
        pid = await _spawn(alice, d, prompt, warm=warm, agent_id="builder")
        asked = await _next(watcher, "PERMISSION_REQUEST", pid)
        assert (asked["tool_name"], asked["input"]["command"]) == ("Bash", f"touch {target}")
        assert asked["agent_id"] == "builder"
        assert asked["suggestions"], "the CLI suggests a rule for allow-from-now-on"
        assert not target.exists()  # the CLI waits for us
        procs = {p["process_id"]: p for p in (await alice.call("GET_PROCESSES"))["processes"]}
        assert procs[pid]["status"] == "awaiting_permission"
        pending = await bob.call("GET_PERMISSION_REQUESTS")
        assert [r["request_id"] for r in pending["requests"]] == [asked["request_id"]]
        # Two people answer at once: exactly one answer counts, the other is told who won.
        answers = await asyncio.gather(
            *(
                c.request(
                    "RESPOND_PERMISSION",
                    {
                        "request_id": asked["request_id"],
                        "decision": "allow",
                        "remember": "session",
                        "by": name,
                    },
                )
                for c, name in ((alice, "alice"), (bob, "bob"))
            )
        )
        assert sorted(a["status"] for a in answers) == ["error", "success"]
        won = next(a for a in answers if a["status"] == "success")["result"]["request"]
        lost = next(a for a in answers if a["status"] == "error")["error"]
        assert lost["code"] == "PERMISSION_ALREADY_DECIDED"
        assert won["decided_by"] in lost["message"]
        assert (won["status"], won["remembered"]) == ("allowed", True)
        done = await _next(watcher, "PROCESS_COMPLETE", pid)
        assert done["status"] == "completed"
        assert target.exists()  # the tool ran
        session_id = done["session_id"]

        # The same request later in the session is allowed by the remembered rule, unasked.
        target.unlink()
        pid2 = await _spawn(alice, d, prompt, session_id=session_id, warm=warm)
        steps = []
        while True:
            ev = await watcher.next_event(timeout=30)
            assert ev["event"] != "PERMISSION_REQUEST", ev
            if ev["data"].get("process_id") != pid2:
                continue
            if ev["event"] == "PROCESS_COMPLETE":
                break
            steps.append(ev["data"])
        assert target.exists()
        permission = [s for s in steps if s["kind"] == "permission"]
        assert [(p["status"], p["decided_by"]) for p in permission] == [("allowed", "session rule")]


async def test_deny_tells_the_model_and_a_timeout_applies_the_default(
    relay_daemon: DaemonProcess,
) -> None:
    d = relay_daemon
    target = Path(d.work) / "never"
    async with AsyncClient.connect(d.socket) as c:
        await c.subscribe(["PERMISSION_*", "PROCESS_COMPLETE"])
        reply_task = asyncio.create_task(
            c.call(
                "SPAWN",
                {"prompt": f"[[bash:touch {target}]]", "cwd": str(d.work), "warm": False},
                timeout=60,
            )
        )
        asked = await _next(c, "PERMISSION_REQUEST")
        await c.call(
            "RESPOND_PERMISSION",
            {"request_id": asked["request_id"], "decision": "deny", "message": "not in prod"},
        )
        result = await reply_task
        assert "not in prod" in result["text"]  # the model saw the denial as the tool's result
        assert not target.exists()

        # Nobody answers: after permission_timeout_s the default (deny here) applies.
        pid = await _spawn(c, d, f"[[bash:touch {target}]]", permission_timeout_s=0.5, warm=True)
        asked = await _next(c, "PERMISSION_REQUEST", pid)
        timeout = await _next(c, "PERMISSION_TIMEOUT", pid)
        assert (timeout["request_id"], timeout["decision"]) == (asked["request_id"], "deny")
        done = await _next(c, "PROCESS_COMPLETE", pid)
        assert done["status"] == "completed"
        assert not target.exists()
        late = await c.request(
            "RESPOND_PERMISSION", {"request_id": asked["request_id"], "decision": "allow"}
        )
        assert late["error"]["code"] == "PERMISSION_ALREADY_DECIDED"
        assert late["error"]["details"]["status"] == "timed_out"
    with pytest.raises(CommandError) as err:
        async with AsyncClient.connect(d.socket) as c:
            await c.call("RESPOND_PERMISSION", {"request_id": "nope", "decision": "allow"})
    assert err.value.code == "PERMISSION_NOT_FOUND"


def test_a_spawn_budget_stops_the_real_cli_after_the_model_call_that_reaches_it(
    start_real_daemon: Callable[..., DaemonProcess],
) -> None:
    d = start_real_daemon()
    target = Path(d.work) / "not-made"
    prompt = f"[[bash:touch {target}]]"
    reply = d.call(
        "SPAWN",
        {"prompt": prompt, "cwd": str(d.work), "max_cost_usd": 1e-6, "allowed_tools": ["Bash"]},
    )
    assert reply["status"] == "error", reply
    error = reply["error"]
    assert error["code"] == "BUDGET_EXCEEDED"
    assert "budget" in error["message"]
    session = d.result("GET_SESSION", {"session_id": error["details"]["session_id"]})
    assert session["session"]["total_cost_usd"] > 0  # the call it made is paid and counted
    assert session["processes"][0]["warm"] is False
    assert not target.exists()  # stopped at the call boundary: the tool it asked for never ran
