"""Budgets (a SPAWN's, a session's, an agent's) and a session's turn cap, with the fake CLI
(daemon/turns/limits.py). The fake honours --max-budget-usd as the real CLI does: a tool
turn whose first model call reaches it ends with error_max_budget_usd."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jsonschema
import orjson
import pytest

from daemon.client import AsyncClient
from tests.helpers import DaemonProcess, spawn


def budget_flags(d: DaemonProcess) -> list[str | None]:
    """The --max-budget-usd of each turn the fake CLI ran, in order (None: no flag)."""
    rows = [orjson.loads(x) for x in d.fake_log.read_bytes().splitlines() if x.strip()]
    flags: list[str | None] = []
    for row in rows:
        argv = row.get("argv")
        if argv and "-p" in argv:
            i = argv.index("--max-budget-usd") if "--max-budget-usd" in argv else -1
            flags.append(argv[i + 1] if i >= 0 else None)
    return flags


def events(d: DaemonProcess, event_type: str) -> list[dict[str, Any]]:
    found = d.result("GET_EVENTS", {"event_types": [event_type], "limit": 100})["events"]
    return [e["data"] for e in found]


def test_a_spawn_budget_stops_the_turn_at_the_next_model_call_and_its_spend_is_kept(
    make_daemon: Callable[..., DaemonProcess],
) -> None:
    d = make_daemon()
    # Asked warm, but a budget is per process in the CLI: the turn runs cold with the flag.
    reply = spawn(d, prompt="[[tool:Bash:echo costly]]", max_cost_usd=1e-6, warm=True)
    assert reply["status"] == "error"
    error = reply["error"]
    assert error["code"] == "BUDGET_EXCEEDED"
    assert "maximum budget" in error["message"]
    assert budget_flags(d) == ["1e-06"]
    (crossed,) = events(d, "BUDGET_EXCEEDED")
    assert crossed["when"] == "mid_turn"
    assert crossed["scope"] == "turn"
    assert crossed["process_id"] == error["details"]["process_id"]
    session = d.result("GET_SESSION", {"session_id": error["details"]["session_id"]})
    # What the stopped turn cost is spent: the CLI reported it, the session keeps it.
    assert session["session"]["total_cost_usd"] == pytest.approx(crossed["spent_usd"])
    assert crossed["spent_usd"] > 0
    (proc,) = session["processes"]
    assert proc["warm"] is False
    assert proc["cost_usd"] == pytest.approx(crossed["spent_usd"])
    assert proc["error"]["code"] == "BUDGET_EXCEEDED"


def test_a_session_budget_limits_each_turn_then_refuses_without_running(
    make_daemon: Callable[..., DaemonProcess],
) -> None:
    d = make_daemon()
    first = d.result("SPAWN", {"prompt": "hello", "cwd": str(d.work)})
    cost, session_id = first["cost_usd"], first["session_id"]
    budget = d.result("SET_BUDGET", {"session_id": session_id, "max_cost_usd": cost * 1.5})
    assert budget["budget"]["spent_usd"] == pytest.approx(cost)
    assert budget["budget"]["remaining_usd"] == pytest.approx(cost * 0.5)
    # The next turn may spend what is left, no more: that is its CLI's --max-budget-usd.
    second = d.result("SPAWN", {"prompt": "again", "session_id": session_id})
    assert float(budget_flags(d)[-1] or 0) == pytest.approx(cost * 0.5)
    # A plain answer is one model call; the CLI ends it normally, over the budget.
    assert second["cost_usd"] > cost * 0.5
    runs = len(budget_flags(d))
    third = d.call("SPAWN", {"prompt": "more", "session_id": session_id})
    assert third["error"]["code"] == "BUDGET_EXCEEDED"
    assert third["error"]["details"]["scope"] == "session"
    assert len(budget_flags(d)) == runs  # refused before any CLI started
    refused = events(d, "BUDGET_EXCEEDED")[-1]
    assert (refused["when"], refused["session_id"]) == ("before_start", session_id)
    (listed,) = d.result("GET_BUDGETS", {"session_id": session_id})["budgets"]
    assert listed["remaining_usd"] == 0
    assert listed["spent_usd"] == pytest.approx(cost + second["cost_usd"])
    # Removing the budget lets the session go on.
    d.result("SET_BUDGET", {"session_id": session_id, "max_cost_usd": None})
    assert d.result("SPAWN", {"prompt": "go on", "session_id": session_id})["text"]
    assert d.result("GET_BUDGETS")["budgets"] == []


def test_an_agent_budget_counts_all_its_sessions_and_survives_a_restart(
    make_daemon: Callable[..., DaemonProcess],
) -> None:
    d = make_daemon(process=True)
    first = d.result("SPAWN", {"prompt": "hi", "cwd": str(d.work), "agent_id": "saver"})
    d.result("SET_BUDGET", {"agent_id": "saver", "max_cost_usd": first["cost_usd"] * 1.01})
    # A new session of the same agent: the agent's remaining spend is its limit.
    d.result("SPAWN", {"prompt": "new topic", "cwd": str(d.work), "agent_id": "saver"})
    assert float(budget_flags(d)[-1] or 0) == pytest.approx(first["cost_usd"] * 0.01)
    d.stop()
    again = make_daemon(process=True, base=d.base)
    (budget,) = again.result("GET_BUDGETS", {"agent_id": "saver"})["budgets"]
    assert budget["max_cost_usd"] == pytest.approx(first["cost_usd"] * 1.01)
    assert budget["remaining_usd"] == 0
    refused = again.call("SPAWN", {"prompt": "x", "cwd": str(d.work), "agent_id": "saver"})
    assert refused["error"]["code"] == "BUDGET_EXCEEDED"
    assert refused["error"]["details"]["scope"] == "agent"
    # Other agents are not limited by it.
    assert again.result("SPAWN", {"prompt": "x", "cwd": str(d.work), "agent_id": "other"})


async def test_max_iterations_refuses_further_turns_also_ones_already_queued(
    make_daemon: Callable[..., DaemonProcess],
) -> None:
    d = make_daemon()
    async with AsyncClient.connect(d.socket) as c:
        await c.subscribe(["PROCESS_COMPLETE", "SESSION_LIMIT_REACHED"])
        first = await c.call("SPAWN", {"prompt": "one", "cwd": str(d.work), "max_iterations": 2})
        sid = first["session_id"]
        # Both pass the check at SPAWN (one turn run so far); the second of them is refused
        # when it leaves the queue, after the first made it two.
        p2 = await c.call("SPAWN", {"prompt": "two", "session_id": sid, "mode": "async"})
        p3 = await c.call("SPAWN", {"prompt": "three", "session_id": sid, "mode": "async"})
        done: dict[str, dict[str, Any]] = {}
        limit: dict[str, Any] | None = None
        wanted = {p2["process_id"], p3["process_id"]}
        while not wanted <= set(done) or limit is None:
            ev = await c.next_event(timeout=20)
            if ev["event"] == "PROCESS_COMPLETE":
                done[ev["data"]["process_id"]] = ev["data"]
            elif ev["event"] == "SESSION_LIMIT_REACHED":
                limit = ev["data"]
        assert done[p2["process_id"]]["status"] == "completed"
        assert done[p3["process_id"]]["status"] == "failed"
        assert done[p3["process_id"]]["error"]["code"] == "SESSION_LIMIT_REACHED"
        assert (limit["process_id"], limit["max_iterations"], limit["turns"]) == (
            p3["process_id"],
            2,
            2,
        )
        now = await c.request("SPAWN", {"prompt": "four", "session_id": sid})
        assert now["error"]["code"] == "SESSION_LIMIT_REACHED"
        # The cap is the session's: GET_BUDGETS shows it, SET_BUDGET can lift it.
        (info,) = (await c.call("GET_BUDGETS", {"session_id": sid}))["budgets"]
        assert (info["max_iterations"], info["turns"]) == (2, 2)
        await c.call("SET_BUDGET", {"session_id": sid, "max_iterations": 3})
        assert (await c.call("SPAWN", {"prompt": "four", "session_id": sid}))["text"]
    assert [p for p in prompts(d) if p in ("three", "four")] == ["four"]


def prompts(d: DaemonProcess) -> list[str]:
    rows = [orjson.loads(x) for x in d.fake_log.read_bytes().splitlines() if x.strip()]
    return [r["turn_prompt"] for r in rows if "turn_prompt" in r]


@pytest.mark.parametrize(
    ("command", "params"),
    [
        ("SET_BUDGET", {"max_cost_usd": 1.0}),
        ("SET_BUDGET", {"session_id": "s", "agent_id": "a", "max_cost_usd": 1.0}),
        ("SET_BUDGET", {"agent_id": "a", "max_cost_usd": -1}),
        ("SET_BUDGET", {"agent_id": "a", "max_iterations": 5}),
        ("SET_BUDGET", {"agent_id": "a"}),
        ("SPAWN", {"prompt": "hi", "max_cost_usd": 0}),
        ("SPAWN", {"prompt": "hi", "max_cost_usd": "1"}),
        ("SPAWN", {"prompt": "hi", "max_iterations": 0}),
    ],
)
def test_bad_budget_parameters_are_typed_errors(
    d: DaemonProcess, command: str, params: dict[str, Any]
) -> None:
    reply = d.call(command, params)
    assert reply["status"] == "error"
    assert reply["error"]["code"] == "INVALID_PARAMETERS"


def test_budget_results_match_the_schemas(d: DaemonProcess) -> None:
    specs = {
        x["command"]: x for x in d.result("GET_COMMANDS", {"include_results": True})["commands"]
    }
    set_reply = d.result("SET_BUDGET", {"agent_id": "schema-check", "max_cost_usd": 2.5})
    jsonschema.Draft202012Validator(specs["SET_BUDGET"]["result"]).validate(set_reply)
    listing = d.result("GET_BUDGETS")
    jsonschema.Draft202012Validator(specs["GET_BUDGETS"]["result"]).validate(listing)
    assert {"agent", "schema-check", 2.5, 0.0} <= set(listing["budgets"][0].values())
    spawn_schema = specs["SPAWN"]["parameters"]["properties"]
    assert {"max_cost_usd", "max_iterations"} <= set(spawn_schema)
