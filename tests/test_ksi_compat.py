"""The original KSI daemon's wire shapes (../shared/reference/ksi-original.md, the command
inventory of durapensa/ksi at aa87807), spoken the way its clients spoke them: raw JSON lines
with ``"version": "2.0"``, read with asyncio's default 64 KiB ``readline``. Written from the
inventory, not from KSI's code; devtools/ksi_clients.py runs KSI's own unmodified clients."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from tests.helpers import DaemonProcess


def command(name: str, parameters: dict[str, Any] | None = None) -> bytes:
    line = {"command": name, "version": "2.0", "parameters": parameters or {}}
    return (json.dumps(line) + "\n").encode()


async def reply_of(d: DaemonProcess, name: str, parameters: dict[str, Any] | None = None) -> Any:
    """KSI's one-shot call: connect, send, read one line (default reader limit), close."""
    reader, writer = await asyncio.open_unix_connection(str(d.socket))
    try:
        writer.write(command(name, parameters))
        await writer.drain()
        return json.loads(await asyncio.wait_for(reader.readline(), 30))
    finally:
        writer.close()


async def once(d: DaemonProcess, name: str, parameters: dict[str, Any] | None = None) -> Any:
    """A one-shot call that must succeed: its result."""
    reply = await reply_of(d, name, parameters)
    assert reply["status"] == "success", reply
    return reply["result"]


class Persistent:
    """KSI's persistent agent connection: AGENT_CONNECTION connect, then one line reader
    that hands pushed messages to handlers by their ``type``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        self.writer.write(command(name, parameters))
        await self.writer.drain()

    async def next_of(self, message_type: str, timeout: float = 30) -> dict[str, Any]:
        while True:
            message = json.loads(await asyncio.wait_for(self.reader.readline(), timeout))
            if message.get("type") == message_type:
                return message


@asynccontextmanager
async def agent(d: DaemonProcess, agent_id: str, events: list[str]) -> AsyncIterator[Persistent]:
    reader, writer = await asyncio.open_unix_connection(str(d.socket))
    conn = Persistent(reader, writer)
    try:
        await conn.send("AGENT_CONNECTION", {"action": "connect", "agent_id": agent_id})
        connected = json.loads(await reader.readline())
        assert connected["status"] == "success"
        assert connected["result"]["status"] == "connected"
        await conn.send("SUBSCRIBE", {"agent_id": agent_id, "event_types": events})
        subscribed = json.loads(await reader.readline())
        assert subscribed["result"]["status"] == "active"
        yield conn
    finally:
        writer.close()


@pytest.fixture
def d(make_daemon: Callable[..., DaemonProcess]) -> DaemonProcess:
    return make_daemon()


async def test_health_check_says_healthy(d: DaemonProcess) -> None:
    assert (await once(d, "HEALTH_CHECK"))["status"] == "healthy"


async def test_sync_spawn_answers_with_the_clis_json_fields(d: DaemonProcess) -> None:
    params = {"mode": "sync", "type": "claude", "prompt": "hi", "model": "sonnet"}
    first = await once(d, "SPAWN", {**params, "enable_tools": True, "cwd": str(d.work)})
    assert first["result"].startswith("echo: hi")  # what SyncClient.spawn_claude returns
    assert (first["type"], first["subtype"], first["is_error"]) == ("result", "success", False)
    for key in ("session_id", "total_cost_usd", "usage", "num_turns", "duration_ms"):
        assert first[key] is not None, key
    again = await once(d, "SPAWN", {**params, "prompt": "more", "session_id": first["session_id"]})
    assert again["result"].endswith("(turn 2)")


async def test_async_spawn_is_started_and_completes_on_the_bus(d: DaemonProcess) -> None:
    async with agent(d, "waiter", ["PROCESS_COMPLETE"]) as waiter:
        accepted = await once(
            d, "SPAWN", {"mode": "async", "prompt": "later", "agent_id": "waiter", "type": "claude"}
        )
        assert (accepted["status"], accepted["type"], accepted["mode"]) == (
            "started",
            "claude",
            "async",
        )
        done = await waiter.next_of("PROCESS_COMPLETE")
    # Flat, as KSI's bus pushed it (its agents read these keys off the message itself).
    assert done["process_id"] == accepted["process_id"]
    assert (done["status"], done["from"]) == ("success", "daemon")
    assert done["result"].startswith("echo: later")
    assert done["session_id"]
    assert done["data"]["status"] == "completed"  # and our own shape, whole


async def test_a_failed_async_turn_completes_with_status_error(d: DaemonProcess) -> None:
    async with agent(d, "waiter", ["PROCESS_COMPLETE"]) as waiter:
        await once(d, "SPAWN", {"mode": "async", "prompt": "[[error:400]]", "agent_id": "waiter"})
        done = await waiter.next_of("PROCESS_COMPLETE")
    assert done["status"] == "error"
    assert isinstance(done["error"], str)
    assert done["error"]


async def test_direct_messages_arrive_flat_with_from_and_wait_offline(d: DaemonProcess) -> None:
    message = {"to": "bob", "content": "are you there?", "conversation_id": "c1"}
    published = await once(
        d, "PUBLISH", {"from_agent": "alice", "event_type": "DIRECT_MESSAGE", "payload": message}
    )
    assert published["status"] == "published"
    # bob was not connected: the message waited, and arrives when he connects.
    async with agent(d, "bob", ["DIRECT_MESSAGE"]) as bob:
        kept = await bob.next_of("DIRECT_MESSAGE")
        await once(
            d,
            "PUBLISH",
            {"from_agent": "alice", "event_type": "DIRECT_MESSAGE", "payload": {**message}},
        )
        live = await bob.next_of("DIRECT_MESSAGE")
    for got in (kept, live):
        assert (got["from"], got["to"], got["content"], got["conversation_id"]) == (
            "alice",
            "bob",
            "are you there?",
            "c1",
        )
        assert got["to_agent"] == "bob"


async def test_agents_shared_state_and_commands_in_ksis_shapes(d: DaemonProcess) -> None:
    registered = await once(
        d,
        "REGISTER_AGENT",
        {"agent_id": "r1", "role": "researcher", "capabilities": "search, summarise"},
    )
    assert (registered["status"], registered["agent_id"], registered["role"]) == (
        "registered",
        "r1",
        "researcher",
    )
    assert registered["capabilities"] == ["search", "summarise"]
    agents = (await once(d, "GET_AGENTS"))["agents"]
    assert agents["r1"]["role"] == "researcher"  # keyed by id
    assert agents["r1"]["status"] == "active"
    assert (await once(d, "SET_SHARED", {"key": "k", "value": {"a": 1}}))["status"] == "set"
    got = await once(d, "GET_SHARED", {"key": "k"})
    assert (got["key"], got["value"], got["found"]) == ("k", {"a": 1}, True)
    missing = await once(d, "GET_SHARED", {"key": "nope"})
    assert (missing["value"], missing["found"]) == (None, False)
    # The command listing fits the reader KSI's clients use (64 KiB lines).
    listing = await once(d, "GET_COMMANDS")
    assert listing["total"] == len(listing["commands"])


async def test_an_agents_spawns_continue_its_session(d: DaemonProcess) -> None:
    one = await once(d, "SPAWN", {"mode": "sync", "prompt": "one", "agent_id": "keeper"})
    two = await once(d, "SPAWN", {"mode": "sync", "prompt": "two", "agent_id": "keeper"})
    assert two["session_id"] == one["session_id"]
    assert two["result"].endswith("(turn 2)")


async def test_load_state_takes_ksis_hand_over(d: DaemonProcess) -> None:
    state = {
        "shared_state": {"plan": {"step": 2}, "notes": "x"},
        "agents": {"old-1": {"role": "writer", "capabilities": ["prose"], "status": "active"}},
        "sessions": {"s-1": {"result": "earlier output"}},
    }
    loaded = await once(d, "LOAD_STATE", {"state_data": state})
    assert (loaded["status"], sorted(loaded["state_keys"])) == (
        "loaded",
        ["agents", "sessions", "shared_state"],
    )
    assert loaded["loaded"] == {"shared_state": 2, "agents": 1, "sessions": 1}
    assert (await once(d, "GET_SHARED", {"key": "plan"}))["value"] == {"step": 2}
    agents = (await once(d, "GET_AGENTS"))["agents"]
    assert (agents["old-1"]["role"], agents["old-1"]["capabilities"]) == ("writer", ["prose"])
    bad = d.call("LOAD_STATE", {"state_data": {"agents": {"a": {"capabilities": "x"}}}})
    assert bad["error"]["code"] == "INVALID_PARAMETERS"
    assert (await once(d, "GET_SHARED", {"key": "a"}))["found"] is False


@pytest.mark.parametrize("event_type", ["DIRECT_MESSAGE", "TASK_ASSIGNMENT"])
def test_a_directed_event_without_a_recipient_is_refused(d: DaemonProcess, event_type: str) -> None:
    reply = d.call("PUBLISH", {"event_type": event_type, "payload": {"content": "to whom?"}})
    assert reply["error"]["code"] == "INVALID_PARAMETERS"
    assert "recipient" in reply["error"]["message"]


async def test_register_agent_without_a_role_is_refused(d: DaemonProcess) -> None:
    # KSI's tests/test_migrated_commands.py test_error_cases: "Missing required 'role'".
    reply = await reply_of(d, "REGISTER_AGENT", {"agent_id": "error_test"})
    assert reply["status"] == "error"
    assert reply["error"]["code"] == "INVALID_PARAMETERS"
    assert [e["field"] for e in reply["error"]["details"]["errors"]] == ["role"]
    assert "error_test" not in (await once(d, "GET_AGENTS"))["agents"]


async def test_subscribe_as_an_agent_that_is_not_connected_is_refused(d: DaemonProcess) -> None:
    # KSI's test_error_cases: a one-shot connection subscribing for an agent nobody connected.
    reply = await reply_of(
        d, "SUBSCRIBE", {"agent_id": "non_existent_agent", "event_types": ["BROADCAST"]}
    )
    assert reply["status"] == "error"
    assert reply["error"]["code"] == "AGENT_NOT_CONNECTED"
    assert "CONNECT" in reply["error"]["message"]
    async with agent(d, "alice", ["BROADCAST"]) as alice:
        # alice's connection is hers: it cannot subscribe as bob.
        await alice.send("SUBSCRIBE", {"agent_id": "bob", "event_types": ["BROADCAST"]})
        refused = json.loads(await asyncio.wait_for(alice.reader.readline(), 30))
        assert refused["error"]["code"] == "AGENT_NOT_CONNECTED"
        assert refused["error"]["details"]["connection_agent_id"] == "alice"
        # While alice is connected, a connection of no agent may subscribe as her (KSI's
        # DaemonClient.subscribe_events does, on a one-shot connection).
        subscribed = await once(d, "SUBSCRIBE", {"agent_id": "alice", "event_types": ["X"]})
        assert (subscribed["status"], subscribed["agent_id"]) == ("active", "alice")
    # So may it as a registered agent.
    await once(d, "REGISTER_AGENT", {"agent_id": "carol", "role": "reviewer"})
    subscribed = await once(d, "SUBSCRIBE", {"agent_id": "carol", "event_types": ["X"]})
    assert subscribed["agent_id"] == "carol"
