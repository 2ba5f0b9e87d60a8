"""The KSI MCP face with the fake CLI, called by the ``mcp`` SDK's own client with the token a
running turn was given (the real CLI's calls are in tests/e2e/test_mcp_face_real_cli.py):
which turns get the tools, identity from the token, typed tool errors, the spawn tree's
limits, WAIT_PROCESS, and a token refused once its turn ended."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx2
import orjson
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from daemon.client import AsyncClient
from tests.helpers import DaemonProcess

TOOLS = {
    "publish",
    "send_message",
    "get_shared",
    "set_shared",
    "list_agents",
    "get_events",
    "spawn",
    "wait",
}


def cli_argvs(d: DaemonProcess) -> list[list[str]]:
    if not d.fake_log.exists():
        return []
    rows = [orjson.loads(x) for x in d.fake_log.read_bytes().splitlines() if x.strip()]
    return [r["argv"] for r in rows if "argv" in r]


def config_of(d: DaemonProcess, session_id: str) -> dict[str, Any]:
    server: dict[str, Any] = orjson.loads(
        (d.state_dir / "mcp" / f"{session_id}.json").read_bytes()
    )["mcpServers"]["ksi"]
    return server


@asynccontextmanager
async def mcp_session(server: dict[str, Any]) -> AsyncIterator[ClientSession]:
    http = httpx2.AsyncClient(headers=server["headers"], timeout=30)
    async with (
        http,
        streamable_http_client(server["url"], http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


async def call(session: ClientSession, tool: str, **args: Any) -> tuple[bool, Any]:
    """(is_error, the answer as JSON or, for an error, the daemon's error object)."""
    res = await session.call_tool(tool, args)
    text = res.content[0].text  # type: ignore[union-attr]
    if res.is_error:
        return True, json.loads(text[text.index("{") :])
    return False, json.loads(text)


async def running_turn(c: AsyncClient, d: DaemonProcess, **params: Any) -> dict[str, Any]:
    """An async turn that sleeps (its token is good meanwhile), once it runs."""
    params.setdefault("prompt", "[[sleep:30]] hold")
    params.setdefault("cwd", str(d.work))
    accepted: dict[str, Any] = await c.call("SPAWN", {"mode": "async", **params})
    pid = accepted["process_id"]

    async def started() -> bool:
        procs = (await c.call("GET_PROCESSES"))["processes"]
        return any(p["process_id"] == pid and p["status"] == "running" for p in procs)

    for _ in range(200):
        if await started():
            return accepted
        await asyncio.sleep(0.05)
    raise AssertionError("turn did not start")


@pytest.fixture
def face_daemon(make_daemon: Callable[..., DaemonProcess]) -> DaemonProcess:
    return make_daemon(env={"KSI_SPAWN_MAX_CHILDREN": "2", "KSI_SPAWN_MAX_DEPTH": "1"})


async def test_registered_agents_turns_get_the_tools_others_do_not(
    face_daemon: DaemonProcess,
) -> None:
    d = face_daemon
    async with AsyncClient.connect(d.socket) as c:
        await c.call("REGISTER_AGENT", {"agent_id": "tooled", "role": "assistant"})
        plain = await c.call("SPAWN", {"prompt": "plain", "cwd": str(d.work)})
        agent = await c.call("SPAWN", {"prompt": "agent", "cwd": str(d.work), "agent_id": "tooled"})
        off = await c.call(
            "SPAWN",
            {
                "prompt": "off",
                "cwd": str(d.work),
                "agent_id": "tooled",
                "ksi_tools": False,
                "new_session": True,  # else it would continue the agent's session
            },
        )
        health = await c.call("HEALTH_CHECK")
    argvs = cli_argvs(d)
    with_config = [a for a in argvs if "--mcp-config" in a]
    assert len(with_config) == 1, argvs  # the agent's turn only
    argv = with_config[0]
    assert argv[argv.index("--mcp-config") + 1] == str(
        d.state_dir / "mcp" / f"{agent['session_id']}.json"
    )
    assert "mcp__ksi" in argv[argv.index("--allowedTools") + 1].split(",")
    # The token is in a file, never in argv (which every local user can read).
    assert not any("Bearer" in part for a in argvs for part in a)
    assert plain["session_id"] != agent["session_id"] != off["session_id"]
    assert health["mcp"]["status"] == "ready"


async def test_tools_act_as_the_turn_and_errors_are_typed(face_daemon: DaemonProcess) -> None:
    d = face_daemon
    async with (
        AsyncClient.connect(d.socket) as c,
        AsyncClient.connect(d.socket, agent_id="listener") as watcher,
    ):
        await c.call("REGISTER_AGENT", {"agent_id": "caller", "role": "assistant"})
        await watcher.subscribe(["FACE_*", "DIRECT_MESSAGE"], agent_id="listener")
        turn = await running_turn(c, d, agent_id="caller")
        server = config_of(d, turn["session_id"])
        async with mcp_session(server) as s:
            assert {t.name for t in (await s.list_tools()).tools} == TOOLS
            err, published = await call(s, "publish", event_type="FACE_NEWS", payload={"k": 1})
            assert not err
            ev = await watcher.next_event(timeout=5)
            assert (ev["event"], ev["data"], ev["seq"]) == ("FACE_NEWS", {"k": 1}, published["seq"])
            assert (ev["from_agent"], ev["parent_process_id"]) == ("caller", turn["process_id"])
            err, _ = await call(s, "send_message", to_agent="listener", content="hello")
            assert not err
            msg = await watcher.next_event(timeout=5)
            assert msg["event"] == "DIRECT_MESSAGE"
            assert msg["data"] == {"to": "listener", "content": "hello"}
            assert (msg["from_agent"], msg["to_agent"]) == ("caller", "listener")
            # The same validation as the socket: a reserved type is the daemon's typed error.
            err, refused = await call(s, "publish", event_type="PROCESS_COMPLETE")
            assert err
            assert refused["code"] == "INVALID_PARAMETERS"
            assert "reserved" in refused["message"]
            err, _ = await call(s, "set_shared", key="face:k", value=[1, {"a": None}])
            assert not err
            err, got = await call(s, "get_shared", key="face:k")
            assert (got["found"], got["value"]) == (True, [1, {"a": None}])
            err, agents = await call(s, "list_agents")
            assert agents["agents"]["caller"]["agent_id"] == "caller"
            err, events = await call(s, "get_events", patterns=["FACE_*"], since_seq=0)
            assert [e["event"] for e in events["events"]] == ["FACE_NEWS"]
            # A turn cannot spawn into its own session (it would wait for itself).
            err, own = await call(s, "spawn", prompt="x", session_id=turn["session_id"])
            assert (err, own["code"]) == (True, "INVALID_PARAMETERS")
        await c.call("CANCEL_PROCESS", {"process_id": turn["process_id"]})
        # Its turn is over: the same token is refused, by the HTTP layer already.
        async with httpx2.AsyncClient(headers=server["headers"]) as http:
            late = await http.post(
                server["url"],
                json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                headers={"accept": "application/json, text/event-stream"},
            )
        assert late.status_code == 401
        assert late.json()["error"] == "unauthorized"
        health = await c.call("HEALTH_CHECK")
        assert health["mcp"]["refused"] >= 1


async def test_spawn_tree_limits_and_wait(face_daemon: DaemonProcess) -> None:
    d = face_daemon
    async with AsyncClient.connect(d.socket) as c:
        parent = await running_turn(c, d, ksi_tools=True)
        async with mcp_session(config_of(d, parent["session_id"])) as s:
            err, quick = await call(s, "spawn", prompt="quick child")
            assert not err
            assert (quick["status"], quick["state"]) in (
                ("started", "queued"),
                ("started", "running"),
            )
            err, slow = await call(s, "spawn", prompt="[[sleep:30]] slow child")
            assert not err
            # Two live children: the limit (KSI_SPAWN_MAX_CHILDREN=2) unless quick is done.
            err, done = await call(s, "wait", process_id=quick["process_id"], timeout_s=20)
            assert not err
            assert done["done"] is True
            assert done["result"]["text"].startswith("echo: quick child")
            err, third = await call(s, "spawn", prompt="third")
            assert not err
            err, fourth = await call(s, "spawn", prompt="fourth")
            assert (err, fourth["code"]) == (True, "TOO_MANY_CHILDREN")
            assert fourth["details"]["max_children"] == 2
            err, pending = await call(s, "wait", process_id=slow["process_id"], timeout_s=0.2)
            assert (pending["done"], pending["status"]) == (False, "running")
            await c.call("CANCEL_PROCESS", {"process_id": slow["process_id"]})
            err, cancelled = await call(s, "wait", process_id=slow["process_id"], timeout_s=5)
            assert (cancelled["done"], cancelled["error"]["code"]) == (True, "CANCELLED")
            err, missing = await call(s, "wait", process_id="nope")
            assert (err, missing["code"]) == (True, "PROCESS_NOT_FOUND")
        procs = {p["process_id"]: p for p in (await c.call("GET_PROCESSES"))["processes"]}
        child = procs[quick["process_id"]]
        assert (child["parent_process_id"], child["depth"], child["ksi_tools"]) == (
            parent["process_id"],
            1,
            True,
        )
        # A child of the child (depth 2) is past KSI_SPAWN_MAX_DEPTH=1.
        grand_parent = await running_turn(c, d, ksi_tools=True)
        async with mcp_session(config_of(d, grand_parent["session_id"])) as s:
            err, child2 = await call(s, "spawn", prompt="[[sleep:30]] child that tries")
        await wait_for_status(c, child2["process_id"], "running")
        async with mcp_session(config_of(d, child2["session_id"])) as s:
            err, deep = await call(s, "spawn", prompt="too deep")
            assert (err, deep["code"]) == (True, "SPAWN_DEPTH_EXCEEDED")
            assert deep["details"] == {"depth": 2, "max_depth": 1}
        for p in (parent, grand_parent, child2, third):
            await c.request("CANCEL_PROCESS", {"process_id": p["process_id"]})


async def test_a_tree_budget_caps_the_sub_tasks(face_daemon: DaemonProcess) -> None:
    d = face_daemon
    async with AsyncClient.connect(d.socket) as c:
        parent = await running_turn(c, d, ksi_tools=True, tree_max_cost_usd=0.0001)
        async with mcp_session(config_of(d, parent["session_id"])) as s:
            err, child = await call(s, "spawn", prompt="first child")
            assert not err
            err, done = await call(s, "wait", process_id=child["process_id"], timeout_s=20)
            assert done["done"] is True
            # Its CLI was given what the tree had left, all of it (nothing had finished).
            argvs = [a for a in cli_argvs(d) if "--max-budget-usd" in a]
            assert [a[a.index("--max-budget-usd") + 1] for a in argvs] == ["0.0001"]
            spent = done["result"]["cost_usd"]
            assert spent > 0.0001  # the fake's turn costs more than the whole budget
            err, refused = await call(s, "spawn", prompt="second child")
            assert (err, refused["code"]) == (True, "TREE_BUDGET_EXCEEDED")
            assert refused["details"]["root_process_id"] == parent["process_id"]
            assert refused["details"]["spent_usd"] == pytest.approx(spent)
        bad = await c.request("SPAWN", {"prompt": "x", "tree_max_cost_usd": 0, "cwd": str(d.work)})
        assert bad["error"]["code"] == "INVALID_PARAMETERS"
        await c.request("CANCEL_PROCESS", {"process_id": parent["process_id"]})


async def wait_for_status(c: AsyncClient, process_id: str, status: str) -> None:
    for _ in range(200):
        procs = (await c.call("GET_PROCESSES"))["processes"]
        if any(p["process_id"] == process_id and p["status"] == status for p in procs):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{process_id} never {status}")


async def test_wait_process_over_the_socket(face_daemon: DaemonProcess) -> None:
    d = face_daemon
    async with AsyncClient.connect(d.socket) as c:
        accepted = await c.call("SPAWN", {"prompt": "waited", "mode": "async", "cwd": str(d.work)})
        done = await c.call("WAIT_PROCESS", {"process_id": accepted["process_id"], "timeout_s": 20})
        assert done["done"] is True
        assert done["result"]["text"].startswith("echo: waited")
        assert done["session_id"] == accepted["session_id"]
        # Finished long ago: the same answer, from the record.
        again = await c.call("WAIT_PROCESS", {"process_id": accepted["process_id"], "timeout_s": 0})
        assert again["result"]["text"] == done["result"]["text"]
        failed = await c.call(
            "SPAWN", {"prompt": "[[error:400]]", "mode": "async", "cwd": str(d.work)}
        )
        bad = await c.call("WAIT_PROCESS", {"process_id": failed["process_id"], "timeout_s": 20})
        assert (bad["done"], bad["status"], bad["error"]["code"]) == (True, "failed", "API_ERROR")
        assert "result" not in bad


async def test_the_face_socket_answers_without_nagle_delays() -> None:
    """Its connections get TCP_NODELAY (as asyncio gives them to a TCP-proto socket): each
    answer is two writes, and with Nagle on the second waited ~40 ms for an ACK."""
    from daemon.mcp_face.http import serving

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise AssertionError("not called")

    _, sock = serving(app)
    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw = writer.get_extra_info("socket")
        accepted.set_result(raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(on_client, sock=sock)
    async with server:
        _, writer = await asyncio.open_connection(*sock.getsockname())
        assert await asyncio.wait_for(accepted, 5) != 0
        writer.close()
