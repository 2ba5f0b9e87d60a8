"""Agents that answer their messages and the offline queue (daemon/agents), with the fake CLI:
an answer goes back to its sender, a burst is answered in order in one session, messages for
an agent that is away survive a restart and arrive when it connects, and conversations end
at [END], at their turn limit or at their budget."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from daemon.client import AsyncClient
from tests.helpers import DaemonProcess, wait_for


def fake_runs(d: DaemonProcess) -> list[dict[str, Any]]:
    if not d.fake_log.exists():
        return []
    return [orjson.loads(x) for x in d.fake_log.read_bytes().splitlines() if x.strip()]


def message(to: str, content: str, sender: str | None = "alice", **payload: Any) -> dict[str, Any]:
    return {
        "event_type": "DIRECT_MESSAGE",
        "payload": {"to": to, "content": content, **payload},
        "from_agent": sender,
    }


async def _until(c: AsyncClient, event: str, timeout: float = 30) -> dict[str, Any]:
    while True:
        ev = await c.next_event(timeout=timeout)
        if ev["event"] == event:
            return ev


async def test_an_answering_agent_answers_its_sender_in_its_own_session(
    make_daemon: Callable[..., DaemonProcess],
) -> None:
    d = make_daemon()
    profile = {"model": "haiku", "append_system_prompt": "You are Bob.", "cwd": str(d.work)}
    registered = d.result(
        "REGISTER_AGENT",
        {"agent_id": "bob", "role": "assistant", "respond_to_messages": True, "profile": profile},
    )
    assert registered["agent"]["profile"]["append_system_prompt"] == "You are Bob."
    async with AsyncClient.connect(d.socket, agent_id="alice") as alice:
        await alice.subscribe(["DIRECT_MESSAGE"], agent_id="alice")
        sent = await alice.call("PUBLISH", message("bob", "what is 2+2?"))
        answer = await _until(alice, "DIRECT_MESSAGE")
        data = answer["data"]
        assert (answer["from_agent"], answer["to_agent"]) == ("bob", "alice")
        assert data["in_reply_to"] == sent["seq"]
        assert data["turn"] == 1
        # The prompt framed the message: who sent it, and in which conversation.
        assert "what is 2+2?" in data["content"]
        assert "from alice" in data["content"]
        assert data["conversation_id"] in data["content"]
        # The next message in the conversation continues bob's session.
        follow = message("bob", "and 3+3?", conversation_id=data["conversation_id"])
        await alice.call("PUBLISH", follow)
        second = (await _until(alice, "DIRECT_MESSAGE"))["data"]
        assert second["session_id"] == data["session_id"]
        assert second["turn"] == 2
        assert second["content"].endswith("(turn 2)")
    runs = [r for r in fake_runs(d) if "argv" in r]
    argv = runs[0]["argv"]
    assert argv[argv.index("--append-system-prompt") + 1] == "You are Bob."
    assert argv[argv.index("--model") + 1].endswith("haiku") or "haiku" in " ".join(argv)
    bob = d.result("GET_AGENTS")["agents"]["bob"]
    assert (bob["session_id"], bob["turns"], bob["queued_messages"]) == (
        data["session_id"],
        2,
        0,
    )


async def test_a_burst_of_messages_is_answered_in_order(
    make_daemon: Callable[..., DaemonProcess],
) -> None:
    d = make_daemon()
    d.result(
        "REGISTER_AGENT", {"agent_id": "bob", "role": "assistant", "respond_to_messages": True}
    )
    async with AsyncClient.connect(d.socket, agent_id="alice") as alice:
        await alice.subscribe(["DIRECT_MESSAGE"], agent_id="alice")
        seqs = [(await alice.call("PUBLISH", message("bob", f"m{i}")))["seq"] for i in range(5)]
        answers = [(await _until(alice, "DIRECT_MESSAGE"))["data"] for _ in seqs]
    assert [a["in_reply_to"] for a in answers] == seqs
    for i, a in enumerate(answers):
        assert f"m{i}" in a["content"]
    # One session, one turn after another (the fake CLI counts the session's turns).
    assert len({a["session_id"] for a in answers}) == 1
    assert [a["content"].rsplit("(turn ", 1)[1] for a in answers] == [f"{n})" for n in range(1, 6)]


def test_messages_for_an_absent_agent_are_kept_across_a_restart(
    make_daemon: Callable[..., DaemonProcess],
) -> None:
    d = make_daemon(process=True)
    seqs = [d.result("PUBLISH", message("carol", f"note {i}"))["seq"] for i in range(2)]
    assert d.result("HEALTH_CHECK")["agents"]["offline"] == 2
    d.stop(signal.SIGTERM)
    again = make_daemon(process=True, base=d.base)
    assert again.result("HEALTH_CHECK")["agents"]["offline"] == 2

    async def connect() -> list[dict[str, Any]]:
        async with AsyncClient.connect(again.socket, agent_id="carol") as carol:
            await carol.subscribe(["DIRECT_MESSAGE"], agent_id="carol")
            got = [await carol.next_event(timeout=10) for _ in seqs]
            live = await carol.call("PUBLISH", message("carol", "live one", sender="dave"))
            got.append(await carol.next_event(timeout=10))
            assert got[-1]["seq"] == live["seq"]
            return got

    got = asyncio.run(connect())
    assert [e["seq"] for e in got[:2]] == seqs
    assert [e["data"]["content"] for e in got] == ["note 0", "note 1", "live one"]
    assert got[0]["from_agent"] == "alice"
    health = again.result("HEALTH_CHECK")["agents"]
    assert (health["offline"], health["delivered_offline"]) == (0, 2)


async def test_a_message_to_a_connected_agent_is_not_kept(
    make_daemon: Callable[..., DaemonProcess],
) -> None:
    d = make_daemon()
    async with AsyncClient.connect(d.socket, agent_id="carol") as carol:
        await carol.subscribe(["DIRECT_MESSAGE"], agent_id="carol")
        await carol.call("PUBLISH", message("carol", "hi", sender="dave"))
        assert (await carol.next_event(timeout=10))["data"]["content"] == "hi"
        assert (await carol.call("HEALTH_CHECK"))["agents"]["offline"] == 0


@pytest.mark.parametrize(
    ("payload", "reason", "turns"),
    [
        ({"max_turns": 4}, "turn_limit", 4),
        ({"content": "[[end]] let us stop"}, "end_marker", 1),
        ({"max_cost_usd": 0.000001}, "budget", 1),
    ],
)
async def test_a_conversation_between_two_answering_agents_stops(
    make_daemon: Callable[..., DaemonProcess], payload: dict[str, Any], reason: str, turns: int
) -> None:
    d = make_daemon()
    for agent in ("alice", "bob"):
        d.result(
            "REGISTER_AGENT", {"agent_id": agent, "role": "assistant", "respond_to_messages": True}
        )
    async with AsyncClient.connect(d.socket) as watcher:
        await watcher.subscribe(["CONVERSATION_ENDED", "DIRECT_MESSAGE"])
        limits = {k: v for k, v in payload.items() if k != "content"}
        first = message("bob", payload.get("content", "let us talk"), **limits)
        await watcher.call("PUBLISH", first)
        ended = (await _until(watcher, "CONVERSATION_ENDED"))["data"]
    assert (ended["reason"], ended["turns"]) == (reason, turns)
    # Nothing runs after the end: the last answer is delivered, not answered.
    wait_for(lambda: d.result("HEALTH_CHECK")["agents"]["answering"] == 0)
    turns_run = [r for r in fake_runs(d) if "turn_prompt" in r]
    assert len(turns_run) == turns
    events = d.result("GET_EVENTS", {"event_types": ["DIRECT_MESSAGE"]})["events"]
    answers = [e for e in events if e["data"].get("in_reply_to")]
    assert len(answers) == turns
    assert answers[-1]["data"]["end"] is True
    assert {e["data"]["conversation_id"] for e in answers} == {ended["conversation_id"]}


@pytest.mark.parametrize(
    ("command", "params"),
    [
        ("PUBLISH", message("bob", "x", max_turns="many")),
        ("PUBLISH", message("bob", "x", max_turns=0)),
        ("PUBLISH", message("bob", "x", max_cost_usd=-1)),
        ("REGISTER_AGENT", {"agent_id": "bob", "role": "assistant", "respond_to_messages": "yes"}),
        ("REGISTER_AGENT", {"agent_id": "bob", "role": "assistant", "profile": {"colour": "blue"}}),
        (
            "REGISTER_AGENT",
            {"agent_id": "bob", "role": "assistant", "profile": {"cwd": "relative/dir"}},
        ),
        ("PUBLISH", {"event_type": "CONVERSATION_ENDED", "payload": {}}),
    ],
)
def test_bad_agent_input_is_a_typed_error(
    spawn_daemon: DaemonProcess, command: str, params: dict[str, Any]
) -> None:
    reply = spawn_daemon.call(command, params)
    assert reply["status"] == "error"
    assert reply["error"]["code"] == "INVALID_PARAMETERS"


def test_a_profile_sets_the_defaults_of_the_agents_spawns(spawn_daemon: DaemonProcess) -> None:
    d = spawn_daemon
    profile = {"model": "opus", "append_system_prompt": "Be brief.", "max_turns": 3}
    d.result("REGISTER_AGENT", {"agent_id": "writer", "role": "writer", "profile": profile})
    own = d.result("SPAWN", {"prompt": "a", "agent_id": "writer", "model": "haiku"})
    assert own["model"] != "opus"  # the SPAWN's own field wins
    default = d.result("SPAWN", {"prompt": "b", "agent_id": "writer"})
    assert "opus" in default["model"]
    argv = [r["argv"] for r in fake_runs(d) if "argv" in r][-1]
    assert argv[argv.index("--append-system-prompt") + 1] == "Be brief."
    assert argv[argv.index("--max-turns") + 1] == "3"


def test_an_answer_whose_turn_was_cut_by_a_crash_is_not_run_again(
    make_daemon: Callable[..., DaemonProcess],
) -> None:
    d = make_daemon(process=True)
    d.result(
        "REGISTER_AGENT", {"agent_id": "bob", "role": "assistant", "respond_to_messages": True}
    )
    d.result("PUBLISH", message("bob", "[[sleep:30]] slow question"))
    wait_for(lambda: [r for r in fake_runs(d) if "turn_prompt" in r], timeout=20)
    d.stop(signal.SIGKILL)
    again = make_daemon(process=True, base=d.base)

    def failure() -> Any:
        events = again.result("GET_EVENTS", {"event_types": ["AGENT_REPLY_FAILED"]})["events"]
        return events[0]["data"] if events else None

    failed = wait_for(failure, timeout=20)
    assert failed["agent_id"] == "bob"
    assert failed["to"] == "alice"
    assert failed["error"]["code"]
    assert again.result("HEALTH_CHECK")["agents"]["answering"] == 0
    # The paid turn ran once: the restart reported it, it did not start it again.
    assert len([r for r in fake_runs(again) if "turn_prompt" in r]) == 1


async def test_kept_messages_are_answered_once_their_agent_answers(
    make_daemon: Callable[..., DaemonProcess],
) -> None:
    d = make_daemon()
    async with AsyncClient.connect(d.socket, agent_id="alice") as alice:
        await alice.subscribe(["DIRECT_MESSAGE"], agent_id="alice")
        sent = await alice.call("PUBLISH", message("erin", "are you there?"))
        assert (await alice.call("HEALTH_CHECK"))["agents"]["offline"] == 1
        await alice.call(
            "REGISTER_AGENT", {"agent_id": "erin", "role": "assistant", "respond_to_messages": True}
        )
        answer = await _until(alice, "DIRECT_MESSAGE")
    assert answer["from_agent"] == "erin"
    assert answer["data"]["in_reply_to"] == sent["seq"]


async def test_an_answer_to_a_program_without_an_agent_id_is_an_agent_reply(
    make_daemon: Callable[..., DaemonProcess],
) -> None:
    d = make_daemon()
    d.result(
        "REGISTER_AGENT", {"agent_id": "bob", "role": "assistant", "respond_to_messages": True}
    )
    async with AsyncClient.connect(d.socket) as program:
        await program.subscribe(["AGENT_REPLY"])
        sent = await program.call("PUBLISH", message("bob", "anonymous question", sender=None))
        reply = await _until(program, "AGENT_REPLY")
    assert (reply["from_agent"], reply["data"]["in_reply_to"]) == ("bob", sent["seq"])
    assert "a program without an agent id" in reply["data"]["content"]
