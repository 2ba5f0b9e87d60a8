"""The KSI MCP face with the real CLI against the stub API: its ``[[tool:mcp__ksi__...]]``
makes the model call a face tool (and ``[[then:...]]`` a second one with the first's result)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from daemon.client import AsyncClient
from tests.helpers import DaemonProcess


@pytest.fixture
def mcp_daemon(start_real_daemon: Callable[..., DaemonProcess]) -> DaemonProcess:
    # Depth 1: a client's turn may spawn a child, the child may not spawn a grandchild.
    return start_real_daemon(KSI_SPAWN_MAX_DEPTH="1")


def _tool(name: str, args: dict[str, Any]) -> str:
    return f"[[tool:mcp__ksi__{name}:{json.dumps(args)}]]"


def _tool_answer(result: dict[str, Any]) -> dict[str, Any]:
    """The face tool's JSON answer, as the stub's final text quotes it."""
    text: str = result["text"]
    assert text.startswith("tool result: "), text
    answer: dict[str, Any] = json.loads(text.removeprefix("tool result: "))
    return answer


async def _spawn(c: AsyncClient, d: DaemonProcess, prompt: str, **params: Any) -> dict[str, Any]:
    params.setdefault("ksi_tools", True)
    result: dict[str, Any] = await c.call(
        "SPAWN", {"prompt": prompt, "cwd": str(d.work), **params}, timeout=60
    )
    return result


async def test_a_turn_publishes_sets_shared_state_and_its_token_dies_with_it(
    mcp_daemon: DaemonProcess,
) -> None:
    d = mcp_daemon
    async with AsyncClient.connect(d.socket) as c, AsyncClient.connect(d.socket) as watcher:
        await c.call("REGISTER_AGENT", {"agent_id": "writer", "role": "writer"})
        await watcher.subscribe(["TURN_NEWS", "SHARED_STATE_CHANGED"])
        # A registered agent's turn has the tools without asking (cold: warm is next).
        published = await _spawn(
            c,
            d,
            _tool("publish", {"event_type": "TURN_NEWS", "payload": {"n": 1}}),
            agent_id="writer",
            ksi_tools=None,
            warm=False,
        )
        answer = _tool_answer(published)
        assert answer["status"] == "published"
        ev = await watcher.next_event(timeout=10)
        assert (ev["event"], ev["data"], ev["seq"]) == ("TURN_NEWS", {"n": 1}, answer["seq"])
        # The event carries the turn's identity, from its token.
        assert ev["from_agent"] == "writer"
        assert ev["parent_process_id"] == published["process_id"]

        # Warm, in the same session: shared state that a socket client then reads.
        value = {"plan": ["a", "b"], "done": False}
        stored = await _spawn(
            c,
            d,
            _tool("set_shared", {"key": "turn:plan", "value": value}),
            session_id=published["session_id"],
            agent_id="writer",
            warm=True,
        )
        assert _tool_answer(stored)["status"] == "set"
        got = await c.call("GET_SHARED", {"key": "turn:plan"})
        assert (got["found"], got["value"]) == (True, value)
        changed = await watcher.next_event(timeout=10)
        assert changed["event"] == "SHARED_STATE_CHANGED"
        assert changed["parent_process_id"] == stored["process_id"]

        # The token the CLI was given is refused now that no turn of its session runs.
        config_file = d.state_dir / "mcp" / f"{published['session_id']}.json"
        # Only the daemon's user can read the token (its directory and file are private).
        assert os.stat(config_file.parent).st_mode & 0o077 == 0
        assert os.stat(config_file).st_mode & 0o077 == 0
        config = orjson.loads(config_file.read_bytes())
        server = config["mcpServers"]["ksi"]
        assert server["url"].startswith("http://127.0.0.1:")
        list_tools = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
        async with httpx.AsyncClient() as http:
            late = await http.post(
                server["url"],
                json=list_tools,
                headers={**server["headers"], "accept": "application/json, text/event-stream"},
            )
            forged = await http.post(
                server["url"],
                json=list_tools,
                headers={"authorization": "Bearer nope", "accept": "application/json"},
            )
        assert (late.status_code, forged.status_code) == (401, 401)
        health = await c.call("HEALTH_CHECK")
        assert health["mcp"]["status"] == "ready"
        assert health["mcp"]["refused"] >= 2


async def test_a_turn_spawns_a_child_and_waits_for_it_and_the_depth_limit_holds(
    mcp_daemon: DaemonProcess,
) -> None:
    d = mcp_daemon
    async with AsyncClient.connect(d.socket) as c:
        # The child's own prompt asks for a grandchild: one level too deep (limit 1).
        child_prompt = _tool("spawn", {"prompt": "grandchild"})
        prompt = _tool("spawn", {"prompt": child_prompt}) + (
            '[[then:mcp__ksi__wait:{"process_id": "{{result.process_id}}", "timeout_s": 40}]]'
        )
        parent = await _spawn(c, d, prompt, warm=False)
        waited = _tool_answer(parent)
        assert waited["done"] is True
        child = waited["result"]
        assert waited["status"] == "completed"
        # The child ran; its spawn tool was refused with the typed error, which it reported.
        assert "SPAWN_DEPTH_EXCEEDED" in child["text"]
        procs = {p["process_id"]: p for p in (await c.call("GET_PROCESSES"))["processes"]}
        record = procs[waited["process_id"]]
        assert (record["parent_process_id"], record["depth"]) == (parent["process_id"], 1)
        assert record["ksi_tools"] is True  # a spawned turn has the tools too
        assert record["session_id"] != parent["session_id"]
        assert not [p for p in procs.values() if p["depth"] == 2]  # no grandchild ran
        # AGENT_TREE shows who spawned what.
        (root,) = (await c.call("AGENT_TREE", {"process_id": parent["process_id"]}))["roots"]
        assert [n["process_id"] for n in root["children"]] == [waited["process_id"]]
        assert (root["depth"], root["children"][0]["depth"], root["children"][0]["children"]) == (
            0,
            1,
            [],
        )
        everything = await c.call("AGENT_TREE")
        assert parent["process_id"] in [n["process_id"] for n in everything["roots"]]
        assert waited["process_id"] not in [n["process_id"] for n in everything["roots"]]
