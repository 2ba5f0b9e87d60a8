"""Every core command over the socket of a real daemon, each result checked against the JSON
Schema that GET_COMMANDS publishes for it."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest

import daemon as daemon_pkg
from daemon.commands import build_registry
from tests.helpers import NO_CREDENTIALS, DaemonProcess, pid_alive, raw_exchange, spawn, wait_for
from tests.wire import Wire, persistent

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

CORE_COMMANDS = {
    "HEALTH_CHECK",
    "GET_COMMANDS",
    "SHUTDOWN",
    "CONNECT",
    "AGENT_CONNECTION",
    "SET_SHARED",
    "GET_SHARED",
    "DELETE_SHARED",
    "LIST_SHARED",
    "REGISTER_AGENT",
    "UNREGISTER_AGENT",
    "GET_AGENTS",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "PUBLISH",
    "GET_EVENTS",
    "GET_SESSIONS",
    "GET_SESSION",
    "GET_PROCESSES",
}
# ``type`` repeats ``event``: the name the original KSI's clients dispatch on.
EVENT_KEYS = {"event", "type", "data", "seq", "timestamp"}


class Schemas:
    def __init__(self, commands: list[dict[str, Any]]) -> None:
        self.specs = {c["command"]: c for c in commands}
        self.validators = {
            name: (
                jsonschema.Draft202012Validator(c["parameters"]),
                jsonschema.Draft202012Validator(c["result"]),
            )
            for name, c in self.specs.items()
        }
        for spec in commands:
            for alias in spec["aliases"]:
                self.validators[alias] = self.validators[spec["command"]]

    def check(self, reply: dict[str, Any]) -> dict[str, Any]:
        """Assert a success reply and validate its result against the published schema."""
        assert reply["status"] == "success", reply
        assert set(reply) <= {"status", "command", "result", "id", "request_id"}, reply
        _, result_validator = self.validators[reply["command"]]
        result_validator.validate(reply["result"])
        return reply


@pytest.fixture(scope="module")
def schemas(d: DaemonProcess) -> Schemas:
    reply = d.call("GET_COMMANDS", {"include_results": True})
    s = Schemas(reply["result"]["commands"])
    s.check(reply)
    return s


def ok(d: DaemonProcess, s: Schemas, command: str, params: dict[str, Any] | None = None) -> Any:
    return s.check(d.call(command, params))["result"]


async def aok(w: Wire, s: Schemas, command: str, params: dict[str, Any] | None = None) -> Any:
    return s.check(await w.call(command, params))["result"]


def error(reply: dict[str, Any], code: str) -> dict[str, Any]:
    assert reply["status"] == "error", reply
    assert reply["error"]["code"] == code, reply
    assert reply["error"]["message"]
    return reply["error"]


# -- system ----------------------------------------------------------------------------------


def test_health_check(d: DaemonProcess, schemas: Schemas) -> None:
    h = ok(d, schemas, "HEALTH_CHECK")
    assert h["status"] == "healthy"
    assert h["version"] == daemon_pkg.__version__
    assert h["pid"] == d.serving_pid
    assert h["socket"] == str(d.socket)
    assert ISO_Z.match(h["started_at"])
    assert h["uptime_s"] >= 0
    assert {
        "connections",
        "subscribers",
        "agents",
        "sessions",
        "shared_keys",
        "processes_running",
        "processes_queued",
        "events_published",
        "last_seq",
    } <= set(h["counts"])
    assert h["counts"]["connections"] >= 1  # this one
    assert h["litellm"]["status"] == "not_loaded"  # the fixture does not preload it
    assert h["claude"]["found"] is True
    assert h["claude"]["auth"] == {"status": "ok", "source": "ANTHROPIC_API_KEY"}
    later = ok(d, schemas, "HEALTH_CHECK")
    assert later["uptime_s"] >= h["uptime_s"]
    assert later["started_at"] == h["started_at"]


def test_health_says_degraded_without_credentials(make_daemon: Any) -> None:
    d = make_daemon(env=NO_CREDENTIALS)
    h = d.call("HEALTH_CHECK")["result"]
    assert h["status"] == "degraded"
    assert h["claude"]["auth"]["status"] == "missing"
    assert "ANTHROPIC_API_KEY" in h["claude"]["auth"]["message"]


@pytest.mark.parametrize(
    ("name", "content", "source"),
    [
        ("settings.json", '{"apiKeyHelper": "pass show claude"}', "apiKeyHelper in"),
        ("settings.json", '{"env": {"ANTHROPIC_API_KEY": "k"}}', "ANTHROPIC_API_KEY in"),
        (".credentials.json", "{}", ".credentials.json (claude /login)"),
    ],
)
def test_health_finds_a_login_in_the_config_dir(
    make_daemon: Any, tmp_path: Path, name: str, content: str, source: str
) -> None:
    (tmp_path / name).write_text(content)
    d = make_daemon(env={**NO_CREDENTIALS, "CLAUDE_CONFIG_DIR": str(tmp_path)})
    h = d.call("HEALTH_CHECK")["result"]
    assert (h["status"], h["claude"]["auth"]["status"]) == ("healthy", "ok")
    assert source in h["claude"]["auth"]["source"]


def test_refused_credentials_degrade_health_until_a_turn_succeeds(make_daemon: Any) -> None:
    d = make_daemon()
    assert spawn(d, prompt="[[error:401]] bad key")["error"]["code"] == "AUTH_FAILED"
    h = d.call("HEALTH_CHECK")["result"]
    assert h["status"] == "degraded"
    assert h["claude"]["auth"]["status"] == "failed"
    assert "401" in h["claude"]["auth"]["message"]
    assert spawn(d, prompt="key fixed")["status"] == "success"
    h = d.call("HEALTH_CHECK")["result"]
    assert (h["status"], h["claude"]["auth"]["status"]) == ("healthy", "ok")


def test_health_counts_follow_state(d: DaemonProcess, schemas: Schemas) -> None:
    before = ok(d, schemas, "HEALTH_CHECK")["counts"]
    ok(d, schemas, "SET_SHARED", {"key": "counts:k", "value": 1})
    ok(d, schemas, "REGISTER_AGENT", {"agent_id": "counts-agent", "role": "tester"})
    after = ok(d, schemas, "HEALTH_CHECK")["counts"]
    assert after["shared_keys"] == before["shared_keys"] + 1
    assert after["agents"] == before["agents"] + 1
    assert after["events_published"] == before["events_published"] + 2
    assert after["last_seq"] == before["last_seq"] + 2


def test_get_commands_lists_every_command(d: DaemonProcess, schemas: Schemas) -> None:
    result = ok(d, schemas, "GET_COMMANDS", {"include_results": True})
    names = [c["command"] for c in result["commands"]]
    assert len(names) == len(set(names)) == result["total"]
    assert set(names) == set(build_registry().commands)
    assert set(names) >= CORE_COMMANDS
    for c in result["commands"]:
        assert set(c) >= {"command", "description", "parameters", "result"}, c
        assert len(c["description"]) > 10, c["command"]
        for key in ("parameters", "result"):
            jsonschema.Draft202012Validator.check_schema(c[key])
            assert c[key]["type"] == "object", (c["command"], key)
        # Unknown parameters are refused, and the schema says so.
        assert c["parameters"].get("additionalProperties") is False, c["command"]


def test_get_commands_fits_the_line_ksi_clients_read(d: DaemonProcess, schemas: Schemas) -> None:
    """KSI's clients read a reply with asyncio's readline, whose default limit is 64 KiB:
    without include_results the listing must fit in it."""
    line = orjson.dumps(d.call("GET_COMMANDS"))
    assert len(line) < 64 * 1024
    listed = ok(d, schemas, "GET_COMMANDS")["commands"]
    assert all("parameters" in c and "result" not in c for c in listed)


def test_published_parameter_schemas_agree_with_the_daemon(
    d: DaemonProcess, schemas: Schemas
) -> None:
    """Parameters the schema accepts are accepted; ones it rejects get INVALID_PARAMETERS."""
    params_validator, _ = schemas.validators["SET_SHARED"]
    good = {"key": "schema:k", "value": {"nested": [1, None]}}
    bad = {"key": "schema:k"}
    assert params_validator.is_valid(good)
    assert not params_validator.is_valid(bad)
    ok(d, schemas, "SET_SHARED", good)
    error(d.call("SET_SHARED", bad), "INVALID_PARAMETERS")
    params_validator, _ = schemas.validators["GET_EVENTS"]
    assert not params_validator.is_valid({"limit": 0})
    error(d.call("GET_EVENTS", {"limit": 0}), "INVALID_PARAMETERS")


def test_shutdown_replies_then_exits_cleanly() -> None:
    dp = DaemonProcess().start()
    try:
        pid_file = dp.socket.with_suffix(".pid")
        assert pid_file.read_text().strip() == str(dp.pid)
        with SyncSubscriber(dp) as sub:
            reply = dp.call("SHUTDOWN")
            assert reply["status"] == "success"
            assert reply["result"]["status"] == "shutting_down"
            assert dp.proc is not None
            assert dp.proc.wait(10) == 0
            # A subscribed persistent connection is closed, not left hanging.
            assert sub.recv_until_eof(timeout=5)
        assert not dp.socket.exists()
        assert not pid_file.exists()
        assert not pid_alive(dp.pid)
        events = [e["event"] for e in dp.log_events()]
        assert "daemon.shutting_down" in events
        assert "daemon.stopped" in events
    finally:
        dp.cleanup()


class SyncSubscriber:
    """A blocking persistent connection subscribed to everything (for a sync test)."""

    def __init__(self, dp: DaemonProcess) -> None:
        import socket

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(str(dp.socket))
        self.sock.sendall(b'{"command":"SUBSCRIBE","parameters":{"event_types":["*"]}}\n')
        first = b""
        while not first.endswith(b"\n"):
            first += self.sock.recv(65536)
        assert orjson.loads(first)["status"] == "success"

    def recv_until_eof(self, timeout: float) -> bool:
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionError:
            pass
        return True

    def __enter__(self) -> SyncSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


# -- shared state ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        1,
        -7,
        2**63 - 1,
        1.5,
        0,
        "text",
        "",
        'é✓😀\n"',
        True,
        False,
        None,
        [],
        {},
        [1, "a", None, {"b": [True]}],
        {"deeply": {"nested": {"list": [1, 2, {"x": None}]}}},
    ],
    ids=lambda v: type(v).__name__ + ":" + orjson.dumps(v).decode()[:20],
)
def test_shared_any_json_value(d: DaemonProcess, schemas: Schemas, value: Any) -> None:
    key = "any:" + orjson.dumps(value).decode()
    res = ok(d, schemas, "SET_SHARED", {"key": key, "value": value})
    assert res["key"] == key
    assert res["status"] == "set"
    assert ISO_Z.match(res["updated_at"])
    got = ok(d, schemas, "GET_SHARED", {"key": key})
    assert got["found"] is True
    assert got["value"] == value
    assert type(got["value"]) is type(value)
    assert got["updated_at"] == res["updated_at"]


def test_shared_null_is_not_missing(d: DaemonProcess, schemas: Schemas) -> None:
    ok(d, schemas, "SET_SHARED", {"key": "nullish", "value": None})
    got = ok(d, schemas, "GET_SHARED", {"key": "nullish"})
    assert got == {"key": "nullish", "value": None, "found": True, "updated_at": got["updated_at"]}
    missing = ok(d, schemas, "GET_SHARED", {"key": "never-set"})
    assert missing["found"] is False
    assert missing["value"] is None
    assert missing.get("updated_at") is None


def test_shared_overwrite_and_delete(d: DaemonProcess, schemas: Schemas) -> None:
    ok(d, schemas, "SET_SHARED", {"key": "ow", "value": 1})
    ok(d, schemas, "SET_SHARED", {"key": "ow", "value": {"v": 2}})
    assert ok(d, schemas, "GET_SHARED", {"key": "ow"})["value"] == {"v": 2}
    assert ok(d, schemas, "DELETE_SHARED", {"key": "ow"}) == {"key": "ow", "deleted": True}
    assert ok(d, schemas, "DELETE_SHARED", {"key": "ow"}) == {"key": "ow", "deleted": False}
    assert ok(d, schemas, "GET_SHARED", {"key": "ow"})["found"] is False


def test_list_shared_with_prefix(d: DaemonProcess, schemas: Schemas) -> None:
    for key in ("ls/b", "ls/a", "ls/c/d", "lsx", "other/ls/"):
        ok(d, schemas, "SET_SHARED", {"key": key, "value": key})
    res = ok(d, schemas, "LIST_SHARED", {"prefix": "ls/"})
    assert res == {"keys": ["ls/a", "ls/b", "ls/c/d"], "total": 3}
    assert ok(d, schemas, "LIST_SHARED", {"prefix": "no-such-prefix"}) == {"keys": [], "total": 0}
    everything = ok(d, schemas, "LIST_SHARED")
    assert {"ls/a", "lsx", "other/ls/"} <= set(everything["keys"])
    assert everything["keys"] == sorted(everything["keys"])
    assert everything["total"] == len(everything["keys"])


def test_shared_changes_are_published(d: DaemonProcess, schemas: Schemas) -> None:
    since = ok(d, schemas, "HEALTH_CHECK")["counts"]["last_seq"]
    ok(d, schemas, "SET_SHARED", {"key": "pub:k", "value": 1})
    ok(d, schemas, "DELETE_SHARED", {"key": "pub:k"})
    ok(d, schemas, "DELETE_SHARED", {"key": "pub:k"})  # nothing deleted: no event
    events = ok(d, schemas, "GET_EVENTS", {"since_seq": since})["events"]
    assert [(e["event"], e["data"]) for e in events] == [
        ("SHARED_STATE_CHANGED", {"key": "pub:k", "action": "set"}),
        ("SHARED_STATE_CHANGED", {"key": "pub:k", "action": "delete"}),
    ]


def test_shared_key_validation(d: DaemonProcess) -> None:
    err = error(d.call("SET_SHARED", {"key": "", "value": 1}), "INVALID_PARAMETERS")
    assert err["details"]["errors"][0]["field"] == "key"
    err = error(d.call("GET_SHARED", {}), "INVALID_PARAMETERS")
    assert "key" in err["message"]


# -- agents ------------------------------------------------------------------------------------


def test_register_get_unregister_agent(d: DaemonProcess, schemas: Schemas) -> None:
    res = ok(
        d,
        schemas,
        "REGISTER_AGENT",
        {
            "agent_id": "ag-1",
            "role": "researcher",
            "capabilities": ["search", "read"],
            "metadata": {"team": "blue"},
        },
    )
    agent = res["agent"]
    assert res["status"] == "registered"
    assert agent["agent_id"] == "ag-1"
    assert agent["role"] == "researcher"
    assert agent["capabilities"] == ["search", "read"]
    assert agent["status"] == "active"
    assert agent["metadata"] == {"team": "blue"}
    assert ISO_Z.match(agent["registered_at"])
    assert ISO_Z.match(agent["updated_at"])
    listed = ok(d, schemas, "GET_AGENTS")
    assert listed["total"] == len(listed["agents"])
    assert listed["agents"]["ag-1"] == agent  # keyed by id, as KSI's clients read it

    # Re-registering updates role and capabilities but keeps registered_at.
    again = ok(d, schemas, "REGISTER_AGENT", {"agent_id": "ag-1", "role": "writer"})["agent"]
    assert again["registered_at"] == agent["registered_at"]
    assert again["updated_at"] >= agent["updated_at"]
    assert again["role"] == "writer"
    assert again["capabilities"] == []
    assert ok(d, schemas, "GET_AGENTS")["agents"]["ag-1"] == again  # one entry, updated

    assert ok(d, schemas, "UNREGISTER_AGENT", {"agent_id": "ag-1"}) == {
        "status": "unregistered",
        "agent_id": "ag-1",
    }
    assert "ag-1" not in ok(d, schemas, "GET_AGENTS")["agents"]


def test_capabilities_as_comma_string(d: DaemonProcess, schemas: Schemas) -> None:
    res = ok(
        d,
        schemas,
        "REGISTER_AGENT",
        {"agent_id": "ag-csv", "role": "reviewer", "capabilities": "code, review,,  test "},
    )
    assert res["agent"]["capabilities"] == ["code", "review", "test"]


def test_unregister_unknown_agent(d: DaemonProcess, schemas: Schemas) -> None:
    ok(d, schemas, "REGISTER_AGENT", {"agent_id": "ag-known", "role": "tester"})
    err = error(d.call("UNREGISTER_AGENT", {"agent_id": "ag-nobody"}), "AGENT_NOT_FOUND")
    assert "ag-nobody" in err["message"]
    assert "ag-known" in err["details"]["known_agents"]


def test_agent_events_are_published(d: DaemonProcess, schemas: Schemas) -> None:
    since = ok(d, schemas, "HEALTH_CHECK")["counts"]["last_seq"]
    ok(d, schemas, "REGISTER_AGENT", {"agent_id": "ag-ev", "role": "r"})
    ok(d, schemas, "UNREGISTER_AGENT", {"agent_id": "ag-ev"})
    events = ok(d, schemas, "GET_EVENTS", {"since_seq": since})["events"]
    assert [(e["event"], e["data"]) for e in events] == [
        ("AGENT_REGISTERED", {"agent_id": "ag-ev", "role": "r", "respond_to_messages": False}),
        ("AGENT_UNREGISTERED", {"agent_id": "ag-ev"}),
    ]


def test_agent_parameter_validation(d: DaemonProcess) -> None:
    err = error(d.call("REGISTER_AGENT", {"role": "x"}), "INVALID_PARAMETERS")
    assert err["details"]["errors"][0]["field"] == "agent_id"
    err = error(
        d.call("REGISTER_AGENT", {"agent_id": "x", "role": "tester", "capabilities": 5}),
        "INVALID_PARAMETERS",
    )
    assert "capabilities" in err["message"]


# -- connections -------------------------------------------------------------------------------


def test_one_shot_connection_answers_once_and_closes(d: DaemonProcess) -> None:
    out = raw_exchange(
        d.socket, b'{"command":"HEALTH_CHECK","id":1}\n{"command":"GET_AGENTS","id":2}\n', timeout=5
    )
    lines = out.splitlines()
    assert len(lines) == 1
    assert orjson.loads(lines[0])["id"] == 1


def test_id_and_request_id_are_echoed(d: DaemonProcess) -> None:
    reply = d.request(
        "HEALTH_CHECK", id={"any": ["json"]}, metadata={"request_id": "r-7", "client_id": "t"}
    )
    assert reply["id"] == {"any": ["json"]}
    assert reply["request_id"] == "r-7"
    assert "id" not in d.request("HEALTH_CHECK")
    err = d.request("NO_SUCH_COMMAND", id=0, metadata={"request_id": 0})
    assert err["status"] == "error"
    assert err["id"] == 0
    assert err["request_id"] == 0


async def test_connect_pipelines_many_commands(d: DaemonProcess, schemas: Schemas) -> None:
    async with Wire(*await _open(d)) as w:
        res = await aok(w, schemas, "CONNECT", {"agent_id": "pipe-agent"})
        assert res["status"] == "connected"
        assert res["agent_id"] == "pipe-agent"
        assert isinstance(res["connection_id"], int)
        lines = []
        for i in range(100):
            cmd: dict[str, Any]
            if i % 3 == 0:
                cmd = {"command": "SET_SHARED", "parameters": {"key": f"pipe:{i}", "value": i}}
            elif i % 3 == 1:
                cmd = {"command": "GET_SHARED", "parameters": {"key": f"pipe:{i - 1}"}}
            else:
                cmd = {"command": "HEALTH_CHECK"}
            lines.append(orjson.dumps({**cmd, "id": f"r{i}"}) + b"\n")
        await w.send_raw(b"".join(lines))  # one write: fully pipelined
        replies = [await w.recv() for _ in range(100)]
        assert [r["id"] for r in replies] == [f"r{i}" for i in range(100)]
        for i, r in enumerate(replies):
            schemas.check(r)
            if i % 3 == 1:  # in-order execution: the SET just before is visible
                assert r["result"]["value"] == i - 1
        assert (await aok(w, schemas, "HEALTH_CHECK"))["status"] == "healthy"


async def test_agent_connection_connect_and_disconnect(d: DaemonProcess, schemas: Schemas) -> None:
    async with Wire(*await _open(d)) as w, await persistent(d.socket) as pub:
        res = await aok(
            w, schemas, "AGENT_CONNECTION", {"action": "connect", "agent_id": "ac-agent"}
        )
        assert res["status"] == "connected"
        assert res["agent_id"] == "ac-agent"
        # Persistent now: several commands on the same connection.
        sub = await aok(w, schemas, "SUBSCRIBE", {"event_types": ["AC_*"]})
        assert sub["agent_id"] == "ac-agent"  # the connection's agent applies
        await aok(
            pub,
            schemas,
            "PUBLISH",
            {"event_type": "AC_DIRECT", "payload": {"n": 1}, "to_agent": "ac-agent"},
        )
        ev = await w.recv()
        assert ev["event"] == "AC_DIRECT"
        assert ev["data"] == {"n": 1}

        res = await aok(
            w, schemas, "AGENT_CONNECTION", {"action": "disconnect", "agent_id": "ac-agent"}
        )
        assert res["status"] == "disconnected"
        after = await aok(pub, schemas, "PUBLISH", {"event_type": "AC_AFTER"})
        assert after["delivered_to"] == 0
        # Subscriptions are gone, the connection still answers: the next line on it is
        # the reply, not a pushed AC_AFTER.
        await w.send("UNSUBSCRIBE", {}, id="u")
        reply = await w.recv()
        assert reply["id"] == "u"
        assert schemas.check(reply)["result"]["subscribed_to"] == []


async def test_agent_connection_validates_action(d: DaemonProcess) -> None:
    reply = d.call("AGENT_CONNECTION", {"action": "hug", "agent_id": "x"})
    err = error(reply, "INVALID_PARAMETERS")
    assert err["details"]["errors"][0]["field"] == "action"


# -- events ------------------------------------------------------------------------------------


async def test_subscribe_pattern_and_pushed_event_shape(d: DaemonProcess, schemas: Schemas) -> None:
    async with await Wire.open(d.socket) as sub, await persistent(d.socket) as pub:
        # SUBSCRIBE as the first command makes the connection persistent by itself.
        res = await aok(sub, schemas, "SUBSCRIBE", {"event_types": ["PROCESS_*", "SHAPE_*"]})
        assert res["status"] == "active"
        assert res["subscribed_to"] == ["PROCESS_*", "SHAPE_*"]
        assert isinstance(res["last_seq"], int)
        published = await aok(
            pub,
            schemas,
            "PUBLISH",
            {"event_type": "SHAPE_TEST", "payload": {"x": [1, "é"]}, "from_agent": "p"},
        )
        assert published["status"] == "published"
        assert published["delivered_to"] == 1
        assert published["seq"] > res["last_seq"]
        await aok(pub, schemas, "PUBLISH", {"event_type": "NOT_SHAPE"})
        await aok(pub, schemas, "PUBLISH", {"event_type": "SHAPE_TWO"})
        ev = await sub.recv()
        # The sender is part of the live event, as of its GET_EVENTS row.
        assert set(ev) == EVENT_KEYS | {"from_agent"}
        assert ev["from_agent"] == "p"
        assert ev["event"] == "SHAPE_TEST"
        assert ev["data"] == {"x": [1, "é"]}
        assert ev["seq"] == published["seq"]
        assert ISO_Z.match(ev["timestamp"])
        # The non-matching event was skipped; the next one is SHAPE_TWO.
        ev2 = await sub.recv()
        assert (ev2["event"], ev2["seq"]) == ("SHAPE_TWO", published["seq"] + 2)


async def test_star_subscription_sees_daemon_events(d: DaemonProcess, schemas: Schemas) -> None:
    async with await Wire.open(d.socket) as sub:
        await aok(sub, schemas, "SUBSCRIBE", {"event_types": ["*"]})
        ok(d, schemas, "SET_SHARED", {"key": "star:k", "value": 1})
        ok(d, schemas, "REGISTER_AGENT", {"agent_id": "star-agent", "role": "tester"})
        ok(d, schemas, "PUBLISH", {"event_type": "STAR_CUSTOM"})
        got = [await sub.recv() for _ in range(3)]
        assert [e["event"] for e in got] == [
            "SHARED_STATE_CHANGED",
            "AGENT_REGISTERED",
            "STAR_CUSTOM",
        ]
        assert [e["seq"] for e in got] == sorted(e["seq"] for e in got)
        assert got[2]["seq"] - got[0]["seq"] == 2


async def test_directed_publish_reaches_only_that_agent(d: DaemonProcess, schemas: Schemas) -> None:
    # A connection of no agent may SUBSCRIBE as a registered one: it becomes that agent's.
    ok(d, schemas, "REGISTER_AGENT", {"agent_id": "dir-alice", "role": "tester"})
    async with (
        await Wire.open(d.socket) as alice,
        await persistent(d.socket, "dir-bob") as bob,
        await Wire.open(d.socket) as anon,
        await persistent(d.socket) as pub,
    ):
        await aok(alice, schemas, "SUBSCRIBE", {"event_types": ["DIR_*"], "agent_id": "dir-alice"})
        await aok(bob, schemas, "SUBSCRIBE", {"event_types": ["DIR_*"]})
        await aok(anon, schemas, "SUBSCRIBE", {"event_types": ["DIR_*"]})
        res = await aok(
            pub,
            schemas,
            "PUBLISH",
            {
                "event_type": "DIR_PRIVATE",
                "payload": {"secret": 1},
                "to_agent": "dir-alice",
                "from_agent": "dir-bob",
            },
        )
        assert res["delivered_to"] == 1
        to_bob = await aok(
            pub, schemas, "PUBLISH", {"event_type": "DIR_PRIVATE", "to_agent": "dir-bob"}
        )
        assert to_bob["delivered_to"] == 1
        marker = await aok(pub, schemas, "PUBLISH", {"event_type": "DIR_ALL"})
        assert marker["delivered_to"] == 3
        a1, a2 = await alice.recv(), await alice.recv()
        assert (a1["event"], a1["data"], a1["seq"]) == ("DIR_PRIVATE", {"secret": 1}, res["seq"])
        assert set(a1) == EVENT_KEYS | {"from_agent", "to_agent"}
        assert (a1["from_agent"], a1["to_agent"]) == ("dir-bob", "dir-alice")
        assert set(a2) == EVENT_KEYS
        assert a2["seq"] == marker["seq"]
        b1, b2 = await bob.recv(), await bob.recv()
        assert (b1["seq"], b2["seq"]) == (to_bob["seq"], marker["seq"])
        assert (await anon.recv())["seq"] == marker["seq"]
        # The history keeps who sent it to whom.
        hist = ok(d, schemas, "GET_EVENTS", {"since_seq": res["seq"] - 1, "limit": 1})
        assert hist["events"][0]["to_agent"] == "dir-alice"
        assert hist["events"][0]["from_agent"] == "dir-bob"


async def test_subscribe_names_only_this_connections_agent(
    d: DaemonProcess, schemas: Schemas
) -> None:
    """daemon/client.py's AsyncClient: CONNECT with agent_id, then SUBSCRIBE with it."""
    async with (
        await persistent(d.socket, "own-a") as a,
        await Wire.open(d.socket) as anon,
        await Wire.open(d.socket) as late,
    ):
        res = await aok(a, schemas, "SUBSCRIBE", {"event_types": ["X"], "agent_id": "own-a"})
        assert res["agent_id"] == "own-a"
        other = error(
            await a.call("SUBSCRIBE", {"event_types": ["X"], "agent_id": "own-b"}),
            "AGENT_NOT_CONNECTED",
        )
        assert (other["details"]["agent_id"], other["details"]["connection_agent_id"]) == (
            "own-b",
            "own-a",
        )
        # The refusal changed nothing: the connection is still own-a's, with its pattern.
        again = await aok(a, schemas, "SUBSCRIBE", {"event_types": ["Y"], "agent_id": "own-a"})
        assert again["subscribed_to"] == ["X", "Y"]
        ghost = error(
            d.call("SUBSCRIBE", {"event_types": ["X"], "agent_id": "own-ghost"}),
            "AGENT_NOT_CONNECTED",
        )
        assert "own-a" in ghost["details"]["connected_agents"]
        assert "CONNECT" in ghost["message"]
        # Without an agent_id it subscribes as no agent, as before.
        assert (await aok(anon, schemas, "SUBSCRIBE", {"event_types": ["X"]}))["agent_id"] is None
        # own-a is connected on a, so another connection may subscribe as it.
        res = await aok(late, schemas, "SUBSCRIBE", {"event_types": ["X"], "agent_id": "own-a"})
        assert res["agent_id"] == "own-a"


async def test_publish_from_agent_defaults_to_the_connection(
    d: DaemonProcess, schemas: Schemas
) -> None:
    async with await persistent(d.socket, "from-conn") as w:
        res = await aok(w, schemas, "PUBLISH", {"event_type": "FROM_DEFAULT"})
    hist = ok(d, schemas, "GET_EVENTS", {"since_seq": res["seq"] - 1, "limit": 1})
    assert hist["events"][0]["from_agent"] == "from-conn"


@pytest.mark.parametrize(
    "event_type",
    [
        "PROCESS_COMPLETE",
        "PROCESS_X",
        "SUBSCRIBER_DROPPED",
        "SHARED_STATE_CHANGED",
        "AGENT_REGISTERED",
        "AGENT_UNREGISTERED",
        "OBSERVER_ERROR",
    ],
)
def test_reserved_event_types_are_refused(d: DaemonProcess, event_type: str) -> None:
    before = d.call("HEALTH_CHECK")["result"]["counts"]["last_seq"]
    err = error(d.call("PUBLISH", {"event_type": event_type}), "INVALID_PARAMETERS")
    assert "reserved" in err["message"]
    assert "PROCESS_" in err["details"]["reserved_prefixes"]
    assert d.call("HEALTH_CHECK")["result"]["counts"]["last_seq"] == before


@pytest.mark.parametrize("event_type", ["has space", "star*", "", "x" * 129, "a/b"])
def test_invalid_event_types_are_refused(d: DaemonProcess, event_type: str) -> None:
    err = error(d.call("PUBLISH", {"event_type": event_type}), "INVALID_PARAMETERS")
    assert err["details"]["errors"][0]["field"] == "event_type"


@pytest.mark.parametrize("patterns", [[], ["bad pattern"], ["ok", ""], "NOT_A_LIST"])
def test_invalid_subscribe_patterns(d: DaemonProcess, patterns: Any) -> None:
    err = error(d.call("SUBSCRIBE", {"event_types": patterns}), "INVALID_PARAMETERS")
    assert "event_types" in err["message"]


async def test_unsubscribe(d: DaemonProcess, schemas: Schemas) -> None:
    async with await Wire.open(d.socket) as sub, await persistent(d.socket) as pub:
        await aok(sub, schemas, "SUBSCRIBE", {"event_types": ["UNS_A", "UNS_B*"]})
        res = await aok(sub, schemas, "SUBSCRIBE", {"event_types": ["UNS_C"]})
        assert res["subscribed_to"] == ["UNS_A", "UNS_B*", "UNS_C"]
        res = await aok(sub, schemas, "UNSUBSCRIBE", {"event_types": ["UNS_B*", "UNS_ZZZ"]})
        assert res["subscribed_to"] == ["UNS_A", "UNS_C"]
        await aok(pub, schemas, "PUBLISH", {"event_type": "UNS_B1"})
        marker = await aok(pub, schemas, "PUBLISH", {"event_type": "UNS_C"})
        assert (await sub.recv())["seq"] == marker["seq"]  # UNS_B1 never arrived
        assert (await aok(sub, schemas, "UNSUBSCRIBE", {}))["subscribed_to"] == []
        res = await aok(pub, schemas, "PUBLISH", {"event_type": "UNS_A"})
        assert res["delivered_to"] == 0
        # Still usable, and re-subscribing works on the same connection.
        await aok(sub, schemas, "SUBSCRIBE", {"event_types": ["UNS_A"]})
        again = await aok(pub, schemas, "PUBLISH", {"event_type": "UNS_A"})
        assert again["delivered_to"] == 1
        assert (await sub.recv())["seq"] == again["seq"]


async def test_subscription_ends_with_its_connection(d: DaemonProcess, schemas: Schemas) -> None:
    base = ok(d, schemas, "HEALTH_CHECK")["counts"]["subscribers"]
    subs = [await Wire.open(d.socket) for _ in range(5)]
    for w in subs:
        await aok(w, schemas, "SUBSCRIBE", {"event_types": ["*"]})
    assert ok(d, schemas, "HEALTH_CHECK")["counts"]["subscribers"] == base + 5
    for w in subs:
        await w.close()

    def gone() -> bool:
        return bool(d.call("HEALTH_CHECK")["result"]["counts"]["subscribers"] == base)

    await asyncio.to_thread(wait_for, gone, 5)
    assert ok(d, schemas, "PUBLISH", {"event_type": "AFTER_CLOSE"})["delivered_to"] == 0


def test_get_events_filters(d: DaemonProcess, schemas: Schemas) -> None:
    start = ok(d, schemas, "HEALTH_CHECK")["counts"]["last_seq"]
    seqs = []
    for i in range(10):
        etype = "GEV_EVEN" if i % 2 == 0 else "GEV_ODD"
        seqs.append(ok(d, schemas, "PUBLISH", {"event_type": etype, "payload": {"i": i}})["seq"])
    assert seqs == list(range(start + 1, start + 11))

    res = ok(d, schemas, "GET_EVENTS", {"since_seq": start})
    assert [e["seq"] for e in res["events"]] == seqs
    assert res["last_seq"] == seqs[-1]
    for e in res["events"]:
        assert set(e) >= EVENT_KEYS
        assert ISO_Z.match(e["timestamp"])
    assert res["events"][3]["data"] == {"i": 3}

    page = ok(d, schemas, "GET_EVENTS", {"since_seq": start, "limit": 4})
    assert [e["seq"] for e in page["events"]] == seqs[:4]
    nxt = ok(d, schemas, "GET_EVENTS", {"since_seq": page["last_seq"], "limit": 4})
    assert [e["seq"] for e in nxt["events"]] == seqs[4:8]

    odd = ok(d, schemas, "GET_EVENTS", {"event_types": ["GEV_ODD"], "since_seq": start})
    assert [e["data"]["i"] for e in odd["events"]] == [1, 3, 5, 7, 9]
    glob = ok(d, schemas, "GET_EVENTS", {"event_types": ["GEV_*"], "limit": 3})
    assert [e["seq"] for e in glob["events"]] == seqs[-3:]  # newest 3 without since_seq

    newest = ok(d, schemas, "GET_EVENTS", {"limit": 2})
    assert [e["seq"] for e in newest["events"]] == seqs[-2:]
    empty = ok(d, schemas, "GET_EVENTS", {"since_seq": seqs[-1]})
    assert empty == {"events": [], "last_seq": seqs[-1]}
    error(d.call("GET_EVENTS", {"since_seq": -1}), "INVALID_PARAMETERS")
    error(d.call("GET_EVENTS", {"limit": 10_001}), "INVALID_PARAMETERS")


# -- sessions and processes (SPAWN comes later; the tables and models exist) --------------------


def test_sessions_and_processes_are_empty(d: DaemonProcess, schemas: Schemas) -> None:
    assert ok(d, schemas, "GET_SESSIONS") == {"sessions": [], "total": 0}
    assert ok(d, schemas, "GET_SESSIONS", {"agent_id": "x", "limit": 5}) == {
        "sessions": [],
        "total": 0,
    }
    procs = ok(d, schemas, "GET_PROCESSES")
    assert procs["processes"] == []
    assert procs["total"] == 0
    assert procs["running"] == 0
    assert procs["queued"] == 0
    assert procs["max_concurrency"] >= 1
    err = error(
        d.call("GET_SESSION", {"session_id": "4f1e7c1e-0000-4000-8000-000000000000"}),
        "SESSION_NOT_FOUND",
    )
    assert "4f1e7c1e" in err["message"]
    error(d.call("GET_SESSION", {}), "INVALID_PARAMETERS")


async def _open(d: DaemonProcess) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(str(d.socket))
