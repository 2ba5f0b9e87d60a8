"""SPAWN_AGENT and ROUTE_TASK (daemon/commands/tasks.py) with the fake CLI: a spawned agent is
an answering agent whose first turn is its task; a routed task goes to the best-matching
agent, which answers the requester, or waits for an agent that is away."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from daemon.client import AsyncClient
from daemon.commands.tasks import best_agent
from daemon.state.records import AgentInfo
from tests.helpers import DaemonProcess


async def _until(c: AsyncClient, event: str, timeout: float = 30) -> dict[str, Any]:
    while True:
        ev = await c.next_event(timeout=timeout)
        if ev["event"] == event:
            return ev


def _agent(agent_id: str, caps: list[str], responds: bool = False) -> AgentInfo:
    return AgentInfo(
        agent_id=agent_id,
        capabilities=caps,
        registered_at="2026-01-01T00:00:00Z",
        updated_at="2026-01-01T00:00:00Z",
        respond_to_messages=responds,
    )


def test_the_best_agent_has_the_largest_share_of_the_capabilities() -> None:
    agents = [_agent("a", ["Search"]), _agent("b", ["search", "write"]), _agent("c", ["draw"])]
    assert best_agent(agents, ["search", "write"], None) == (agents[1], 1.0)
    assert best_agent(agents, ["search", "review"], None) == (agents[0], 0.5)  # first wins a tie
    assert best_agent(agents, ["search", "review"], "b") == (agents[1], 0.5)  # preferred
    answering = [*agents, _agent("d", ["search"], responds=True)]
    assert best_agent(answering, ["search", "review"], None) == (answering[3], 0.5)
    assert best_agent(agents, ["fly"], None) is None


async def test_spawn_agent_runs_its_task_and_then_answers_messages(
    make_daemon: Callable[..., DaemonProcess],
) -> None:
    d = make_daemon()
    async with AsyncClient.connect(d.socket, agent_id="boss") as boss:
        await boss.subscribe(["PROCESS_COMPLETE", "DIRECT_MESSAGE"], agent_id="boss")
        spawned = await boss.call(
            "SPAWN_AGENT",
            {
                "task": "write the plan",
                "context": "for the launch",
                "role": "planner",
                "capabilities": "planning, writing",
            },
        )
        agent = spawned["agent"]
        assert (agent["status"], agent["role"], agent["capabilities"]) == (
            "active",
            "planner",
            ["planning", "writing"],
        )
        assert agent["id"].startswith("planner_")
        assert spawned["selection"]["fallback_used"] is True
        first = (await _until(boss, "PROCESS_COMPLETE"))["data"]
        assert first["process_id"] == agent["process_id"]
        assert "write the plan" in first["text"]
        assert "for the launch" in first["text"]
        # It is an answering agent: a message continues its session.
        await boss.call(
            "PUBLISH",
            {"event_type": "DIRECT_MESSAGE", "payload": {"to": agent["id"], "content": "status?"}},
        )
        answer = await _until(boss, "DIRECT_MESSAGE")
    assert answer["from_agent"] == agent["id"]
    assert answer["data"]["session_id"] == first["session_id"]
    assert answer["data"]["content"].endswith("(turn 2)")
    registered = d.result("GET_AGENTS")["agents"][agent["id"]]
    assert registered["respond_to_messages"] is True
    assert registered["profile"]["model"] == "sonnet"


async def test_a_routed_task_is_answered_by_the_best_agent(
    make_daemon: Callable[..., DaemonProcess],
) -> None:
    d = make_daemon()
    d.result(
        "REGISTER_AGENT", {"agent_id": "drawer", "role": "illustrator", "capabilities": ["drawing"]}
    )
    d.result(
        "REGISTER_AGENT",
        {
            "agent_id": "tester",
            "role": "tester",
            "capabilities": ["testing", "validation"],
            "respond_to_messages": True,
        },
    )
    async with AsyncClient.connect(d.socket, agent_id="lead") as lead:
        await lead.subscribe(["DIRECT_MESSAGE"], agent_id="lead")
        routed = await lead.call(
            "ROUTE_TASK",
            {"task": "validate the build", "required_capabilities": ["testing", "validation"]},
        )
        answer = await _until(lead, "DIRECT_MESSAGE")
    assigned = routed["routing"]["assigned_agent"]
    assert (routed["status"], assigned["id"], assigned["match_score"]) == ("routed", "tester", 1.0)
    assert routed["delivery"]["status"] == "answering"
    assert answer["from_agent"] == "tester"
    assert answer["data"]["in_reply_to"] == routed["delivery"]["seq"]
    assert "validate the build" in answer["data"]["content"]
    assert "task assignment" in answer["data"]["content"]


async def test_a_task_for_an_agent_that_is_away_waits_for_it(
    make_daemon: Callable[..., DaemonProcess],
) -> None:
    d = make_daemon()
    d.result("REGISTER_AGENT", {"agent_id": "night", "role": "operator", "capabilities": ["ops"]})
    routed = d.result("ROUTE_TASK", {"task": "rotate logs", "required_capabilities": ["ops"]})
    assert routed["delivery"]["status"] == "queued"
    async with AsyncClient.connect(d.socket, agent_id="night") as night:
        await night.subscribe(["TASK_ASSIGNMENT"], agent_id="night")
        got = await night.next_event(timeout=10)
    assert (got["event"], got["data"]["task"]) == ("TASK_ASSIGNMENT", "rotate logs")
    nobody = d.result("ROUTE_TASK", {"task": "fly", "required_capabilities": ["flying"]})
    assert (nobody["status"], nobody["candidates"]) == ("no_suitable_agent", 1)


@pytest.mark.parametrize(
    ("command", "params"),
    [
        ("SPAWN_AGENT", {}),
        ("SPAWN_AGENT", {"task": ""}),
        ("ROUTE_TASK", {"task": "x"}),
        ("ROUTE_TASK", {"task": "x", "required_capabilities": []}),
    ],
)
def test_bad_task_parameters_are_typed_errors(
    spawn_daemon: DaemonProcess, command: str, params: dict[str, Any]
) -> None:
    assert spawn_daemon.call(command, params)["error"]["code"] == "INVALID_PARAMETERS"
