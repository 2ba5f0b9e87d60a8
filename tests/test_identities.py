"""Agent identities (daemon/commands/identities.py): KSI's CREATE/UPDATE/GET/LIST/REMOVE_IDENTITY
over the socket, in the shapes KSI's own clients read, persisted across restarts, every result
checked against the schema GET_COMMANDS publishes."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import pytest

from daemon.protocol import iso_from_epoch
from tests.helpers import DaemonProcess, PublishedSchemas, error_of
from tests.inproc import InProcessDaemon

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
COMMANDS = (
    "CREATE_IDENTITY",
    "UPDATE_IDENTITY",
    "GET_IDENTITY",
    "LIST_IDENTITIES",
    "REMOVE_IDENTITY",
)
# What KSI's test_migrated_commands.py requires of a created identity.
KSI_FIELDS = {
    "identity_uuid",
    "agent_id",
    "display_name",
    "role",
    "personality_traits",
    "appearance",
    "created_at",
    "last_active",
    "conversation_count",
    "sessions",
    "preferences",
    "stats",
}


@pytest.fixture(scope="module")
def d() -> Iterator[DaemonProcess]:
    dp = InProcessDaemon().start()
    try:
        yield dp
    finally:
        dp.cleanup()


@pytest.fixture(scope="module")
def s(d: DaemonProcess) -> PublishedSchemas:
    return PublishedSchemas(d)


def identity_events(d: DaemonProcess, agent_id: str) -> list[tuple[str, dict[str, Any]]]:
    events = d.result("GET_EVENTS", {"event_types": ["IDENTITY_*"], "limit": 10_000})["events"]
    return [(e["event"], e["data"]) for e in events if e["data"].get("agent_id") == agent_id]


# -- discovery -------------------------------------------------------------------------------


def test_the_commands_are_published_with_descriptions_and_schemas(s: PublishedSchemas) -> None:
    for name in COMMANDS:
        spec = s.specs[name]
        assert len(spec["description"]) > 40, name
        jsonschema.Draft202012Validator.check_schema(spec["parameters"])
        jsonschema.Draft202012Validator.check_schema(spec["result"])
        assert spec["parameters"]["additionalProperties"] is False, name
    update = s.params["UPDATE_IDENTITY"]
    assert update.is_valid({"agent_id": "a", "updates": {"display_name": "x"}})
    assert not update.is_valid({"agent_id": "a", "updates": {"identity_uuid": "x"}})
    assert not update.is_valid({"agent_id": "a"})
    assert not s.params["LIST_IDENTITIES"].is_valid({"sort_by": "agent_id"})


# -- the round trip --------------------------------------------------------------------------


def test_create_get_list_update_remove_round_trip(d: DaemonProcess, s: PublishedSchemas) -> None:
    agent = "rt-agent-0042"
    error_of(d.call("GET_IDENTITY", {"agent_id": agent}), "IDENTITY_NOT_FOUND")

    created = s.ok(
        d,
        "CREATE_IDENTITY",
        {
            "agent_id": agent,
            "display_name": "Round Trip",
            "role": "researcher",
            "personality_traits": ["analytical", "thorough"],
            "appearance": {"color_theme": "purple", "badge": "rt"},
        },
    )
    assert created["status"] == "identity_created"
    assert created["created"] is True
    ident = created["identity"]
    assert set(ident) >= KSI_FIELDS | {"updated_at"}
    assert ident["agent_id"] == agent
    assert UUID4.match(ident["identity_uuid"])
    assert ident["display_name"] == "Round Trip"
    assert ident["role"] == "researcher"
    assert ident["personality_traits"] == ["analytical", "thorough"]
    # Given appearance is merged over the role's defaults.
    assert ident["appearance"]["color_theme"] == "purple"
    assert ident["appearance"]["badge"] == "rt"
    assert {"avatar_style", "icon"} <= set(ident["appearance"])
    for field in ("created_at", "updated_at", "last_active"):
        assert ISO_Z.match(ident[field]), field
    assert ident["created_at"] == ident["updated_at"]
    assert ident["conversation_count"] == 0
    assert ident["sessions"] == []
    assert set(ident["preferences"]) >= {"communication_style", "verbosity", "formality"}
    assert set(ident["stats"]) >= {
        "messages_sent",
        "conversations_participated",
        "tasks_completed",
        "tools_used",
    }

    got = s.ok(d, "GET_IDENTITY", {"agent_id": agent})
    assert got["status"] == "identity_found"
    assert got["identity"] == ident
    # KSI's command classes answered with the identity itself: its fields are there too.
    assert {k: got[k] for k in ident} == ident

    listed = s.ok(d, "LIST_IDENTITIES")
    assert listed["status"] == "identities_listed"
    assert ident in listed["items"]
    assert listed["identities"] == listed["items"]
    assert listed["total"] == listed["count"] == len(listed["items"])

    time.sleep(0.002)  # updated_at has millisecond resolution
    updated = s.ok(
        d,
        "UPDATE_IDENTITY",
        {
            "agent_id": agent,
            "updates": {
                "display_name": "Updated Trip",
                "role": "analyst",
                "personality_traits": ["analytical", "thorough"],  # unchanged
                "conversation_count": 3,
                "sessions": [{"session_id": "s-1", "started_at": "2025-06-23T15:00:01.100Z"}],
                "stats": {"messages_sent": 7},
            },
        },
    )
    assert updated["status"] == "identity_updated"
    assert updated["updated"] is True
    assert updated["changes"] == [
        "display_name",
        "role",
        "conversation_count",
        "sessions",
        "stats",
    ]
    new = updated["identity"]
    assert new["display_name"] == "Updated Trip"
    assert new["role"] == "analyst"
    assert new["conversation_count"] == 3
    assert new["stats"] == {"messages_sent": 7}  # a field is replaced, not merged
    assert new["sessions"][0]["session_id"] == "s-1"
    for fixed in ("identity_uuid", "agent_id", "created_at", "appearance", "preferences"):
        assert new[fixed] == ident[fixed], fixed
    assert new["updated_at"] > ident["updated_at"]
    assert s.ok(d, "GET_IDENTITY", {"agent_id": agent})["identity"] == new

    removed = s.ok(d, "REMOVE_IDENTITY", {"agent_id": agent})
    assert removed["status"] == "identity_removed"
    assert removed["deleted"] is True
    assert removed["agent_id"] == agent
    assert removed["identity"] == new
    error_of(d.call("GET_IDENTITY", {"agent_id": agent}), "IDENTITY_NOT_FOUND")
    error_of(d.call("REMOVE_IDENTITY", {"agent_id": agent}), "IDENTITY_NOT_FOUND")
    error_of(
        d.call("UPDATE_IDENTITY", {"agent_id": agent, "updates": {"display_name": "x"}}),
        "IDENTITY_NOT_FOUND",
    )
    assert all(i["agent_id"] != agent for i in s.ok(d, "LIST_IDENTITIES")["items"])

    assert identity_events(d, agent) == [
        (
            "IDENTITY_CREATED",
            {
                "agent_id": agent,
                "identity_uuid": ident["identity_uuid"],
                "display_name": "Round Trip",
                "role": "researcher",
            },
        ),
        (
            "IDENTITY_UPDATED",
            {
                "agent_id": agent,
                "identity_uuid": ident["identity_uuid"],
                "changes": updated["changes"],
            },
        ),
        ("IDENTITY_REMOVED", {"agent_id": agent, "identity_uuid": ident["identity_uuid"]}),
    ]


def test_defaults_come_from_the_role(d: DaemonProcess, s: PublishedSchemas) -> None:
    plain = s.ok(d, "CREATE_IDENTITY", {"agent_id": "defaults-abcd"})["identity"]
    assert plain["role"] == "general"
    assert plain["display_name"] == "General-abcd"
    assert plain["personality_traits"]
    assert {"avatar_style", "color_theme", "icon"} <= set(plain["appearance"])
    res = s.ok(d, "CREATE_IDENTITY", {"agent_id": "defaults-wxyz", "role": "researcher"})
    researcher = res["identity"]
    assert researcher["display_name"] == "Researcher-wxyz"
    assert researcher["personality_traits"] != plain["personality_traits"]
    assert researcher["appearance"] != plain["appearance"]
    # An unknown role gets the general defaults, under its own name.
    odd = s.ok(d, "CREATE_IDENTITY", {"agent_id": "x1", "role": "juggler"})["identity"]
    assert odd["role"] == "juggler"
    assert odd["display_name"] == "Juggler-x1"
    assert odd["personality_traits"] == plain["personality_traits"]
    # Traits as KSI's REGISTER_AGENT capabilities: a comma-separated string is a list; an
    # explicit empty list stays empty.
    split = s.ok(d, "CREATE_IDENTITY", {"agent_id": "traits-1", "personality_traits": "a, b,"})
    assert split["identity"]["personality_traits"] == ["a", "b"]
    none = s.ok(d, "CREATE_IDENTITY", {"agent_id": "traits-2", "personality_traits": []})
    assert none["identity"]["personality_traits"] == []
    uuids = {
        s.ok(d, "GET_IDENTITY", {"agent_id": a})["identity_uuid"]
        for a in ("defaults-abcd", "defaults-wxyz", "x1", "traits-1", "traits-2")
    }
    assert len(uuids) == 5


# -- what KSI's clients read -----------------------------------------------------------------


def test_the_shapes_ksi_daemon_client_and_agent_process_read(d: DaemonProcess) -> None:
    """daemon_client.py's identity methods and agent_process.py's _ensure_identity."""
    agent = "ksi-client-7f3e"
    # agent_process: GET_IDENTITY first; not found is an error reply.
    assert d.call("GET_IDENTITY", {"agent_id": agent})["status"] == "error"
    created = d.call(
        "CREATE_IDENTITY",
        {
            "agent_id": agent,
            "display_name": "Researcher-7f3e",
            "role": "researcher",
            "personality_traits": ["curious"],
        },
    )
    assert created["status"] == "success"
    assert created["result"]["status"] == "identity_created"
    got = d.call("GET_IDENTITY", {"agent_id": agent})
    assert got["result"]["status"] == "identity_found"
    assert got["result"]["identity"]["display_name"] == "Researcher-7f3e"
    # daemon_client.list_identities: result.identities, a list.
    listed = d.call("LIST_IDENTITIES")["result"].get("identities", [])
    assert any(i["agent_id"] == agent for i in listed)
    # daemon_client.update_identity / remove_identity: result.status.
    upd = d.call("UPDATE_IDENTITY", {"agent_id": agent, "updates": {"role": "analyst"}})
    assert upd["result"]["status"] == "identity_updated"
    rem = d.call("REMOVE_IDENTITY", {"agent_id": agent})
    assert rem["result"]["status"] == "identity_removed"


def test_the_shapes_ksi_migrated_commands_test_reads(d: DaemonProcess) -> None:
    """tests/test_migrated_commands.py's identity section, step by step."""
    agent = "test_identity_001"
    initial = d.result("LIST_IDENTITIES")["total"]
    error_of(d.call("GET_IDENTITY", {"agent_id": agent}), "IDENTITY_NOT_FOUND")
    created = d.result(
        "CREATE_IDENTITY",
        {
            "agent_id": agent,
            "display_name": "Test Identity",
            "role": "researcher",
            "personality_traits": ["analytical", "thorough", "test-oriented"],
        },
    )
    assert set(created["identity"]) >= KSI_FIELDS
    error_of(
        d.call("CREATE_IDENTITY", {"agent_id": agent, "display_name": "Duplicate Test"}),
        "IDENTITY_EXISTS",
    )
    changes = d.result(
        "UPDATE_IDENTITY",
        {
            "agent_id": agent,
            "updates": {
                "display_name": "Updated Test Identity",
                "role": "analyst",
                "personality_traits": ["analytical", "thorough", "updated"],
            },
        },
    )["changes"]
    assert changes == ["display_name", "role", "personality_traits"]
    after = d.result("LIST_IDENTITIES")
    assert after["total"] == initial + 1
    assert any(i["agent_id"] == agent for i in after["items"])
    filtered = d.result(
        "LIST_IDENTITIES", {"filter_role": "analyst", "sort_by": "display_name", "order": "asc"}
    )
    assert [i["agent_id"] for i in filtered["items"]] == [agent]
    removed = d.result("REMOVE_IDENTITY", {"agent_id": agent})
    assert removed["identity"]["display_name"] == "Updated Test Identity"
    error_of(d.call("REMOVE_IDENTITY", {"agent_id": agent}), "IDENTITY_NOT_FOUND")
    error_of(
        d.call("UPDATE_IDENTITY", {"agent_id": agent, "updates": {"display_name": "Should fail"}}),
        "IDENTITY_NOT_FOUND",
    )


# -- errors ----------------------------------------------------------------------------------


def test_a_second_create_is_identity_exists_and_changes_nothing(d: DaemonProcess) -> None:
    first = d.result("CREATE_IDENTITY", {"agent_id": "dup-1", "display_name": "First"})
    err = error_of(
        d.call("CREATE_IDENTITY", {"agent_id": "dup-1", "display_name": "Second"}),
        "IDENTITY_EXISTS",
    )
    assert "UPDATE_IDENTITY" in err["message"]
    assert err["details"] == {
        "agent_id": "dup-1",
        "identity_uuid": first["identity"]["identity_uuid"],
    }
    assert d.result("GET_IDENTITY", {"agent_id": "dup-1"})["identity"] == first["identity"]
    assert [t for t, _ in identity_events(d, "dup-1")] == ["IDENTITY_CREATED"]


def test_not_found_names_identities_that_exist(daemon: DaemonProcess) -> None:
    err = error_of(daemon.call("GET_IDENTITY", {"agent_id": "ghost"}), "IDENTITY_NOT_FOUND")
    assert "no identities exist yet" in err["message"]
    assert err["details"] == {"agent_id": "ghost", "known_identities": []}
    for n in range(7):
        daemon.result("CREATE_IDENTITY", {"agent_id": f"known-{n}"})
    err = error_of(daemon.call("GET_IDENTITY", {"agent_id": "ghost"}), "IDENTITY_NOT_FOUND")
    assert err["details"]["known_identities"] == [f"known-{n}" for n in range(5)]
    assert "(and 2 more)" in err["message"]
    assert "LIST_IDENTITIES" in err["message"]
    assert "CREATE_IDENTITY" in err["message"]


@pytest.mark.parametrize(
    "updates",
    [
        {"identity_uuid": "should_not_change", "display_name": "x"},
        {"agent_id": "should_not_change"},
        {"created_at": "should_not_change"},
        {"updated_at": "2025-01-01T00:00:00.000Z"},
        # KSI's own test sends all three at once.
        {
            "agent_id": "should_not_change",
            "identity_uuid": "should_not_change",
            "created_at": "should_not_change",
            "display_name": "Protected Field Test",
        },
    ],
)
def test_protected_fields_are_refused_and_nothing_changes(
    d: DaemonProcess, updates: dict[str, Any]
) -> None:
    agent = "protected-1"
    if d.call("GET_IDENTITY", {"agent_id": agent})["status"] == "error":
        d.result("CREATE_IDENTITY", {"agent_id": agent})
    before = d.result("GET_IDENTITY", {"agent_id": agent})["identity"]
    err = error_of(
        d.call("UPDATE_IDENTITY", {"agent_id": agent, "updates": updates}), "INVALID_PARAMETERS"
    )
    assert "cannot be updated" in err["message"]
    for field in ("identity_uuid", "agent_id", "created_at", "updated_at"):
        if field in updates:
            assert field in err["message"]
    assert err["details"]["errors"][0]["field"] == "updates"
    assert d.result("GET_IDENTITY", {"agent_id": agent})["identity"] == before


@pytest.mark.parametrize(
    ("command", "params", "field"),
    [
        ("CREATE_IDENTITY", {}, "agent_id"),
        ("CREATE_IDENTITY", {"agent_id": ""}, "agent_id"),
        ("CREATE_IDENTITY", {"agent_id": "a" * 257}, "agent_id"),
        ("CREATE_IDENTITY", {"agent_id": 7}, "agent_id"),
        ("CREATE_IDENTITY", {"agent_id": "bad", "display_name": ""}, "display_name"),
        ("CREATE_IDENTITY", {"agent_id": "bad", "personality_traits": [1]}, "personality_traits.0"),
        (
            "CREATE_IDENTITY",
            {"agent_id": "bad", "personality_traits": 5},
            "personality_traits",
        ),
        ("CREATE_IDENTITY", {"agent_id": "bad", "appearance": "blue"}, "appearance"),
        ("CREATE_IDENTITY", {"agent_id": "bad", "colour": "blue"}, "colour"),
        ("GET_IDENTITY", {}, "agent_id"),
        ("GET_IDENTITY", {"agent_id": None}, "agent_id"),
        ("REMOVE_IDENTITY", {"agent_id": ["x"]}, "agent_id"),
        ("UPDATE_IDENTITY", {"agent_id": "bad"}, "updates"),
        ("UPDATE_IDENTITY", {"agent_id": "bad", "updates": []}, "updates"),
        ("UPDATE_IDENTITY", {"agent_id": "bad", "updates": {"mood": "x"}}, "updates.mood"),
        ("UPDATE_IDENTITY", {"agent_id": "bad", "updates": {"role": None}}, "updates"),
        (
            "UPDATE_IDENTITY",
            {"agent_id": "bad", "updates": {"conversation_count": "3"}},
            "updates.conversation_count",
        ),
        (
            "UPDATE_IDENTITY",
            {"agent_id": "bad", "updates": {"conversation_count": -1}},
            "updates.conversation_count",
        ),
        (
            "UPDATE_IDENTITY",
            {"agent_id": "bad", "updates": {"last_active": "yesterday"}},
            "updates.last_active",
        ),
        ("UPDATE_IDENTITY", {"agent_id": "bad", "updates": {"sessions": "s1"}}, "updates.sessions"),
        ("LIST_IDENTITIES", {"sort_by": "agent_id"}, "sort_by"),
        ("LIST_IDENTITIES", {"order": "up"}, "order"),
        ("LIST_IDENTITIES", {"filter_active": "yes"}, "filter_active"),
        ("LIST_IDENTITIES", {"limit": 5}, "limit"),
    ],
)
def test_bad_parameters_are_invalid_parameters_naming_the_field(
    d: DaemonProcess, s: PublishedSchemas, command: str, params: dict[str, Any], field: str
) -> None:
    err = error_of(d.call(command, params), "INVALID_PARAMETERS")
    assert field in [e["field"] for e in err["details"]["errors"]], err
    # The published schema refuses them too, but for what only the daemon's validators
    # check (a null update, a timestamp's form).
    if params.get("updates") not in ({"role": None}, {"last_active": "yesterday"}):
        assert not s.params[command].is_valid(params)
    assert d.call("GET_IDENTITY", {"agent_id": "bad"})["error"]["code"] == "IDENTITY_NOT_FOUND"


def test_an_update_that_changes_nothing_writes_nothing(
    d: DaemonProcess, s: PublishedSchemas
) -> None:
    ident = s.ok(d, "CREATE_IDENTITY", {"agent_id": "noop-1", "role": "writer"})["identity"]
    same = s.ok(d, "UPDATE_IDENTITY", {"agent_id": "noop-1", "updates": {"role": "writer"}})
    assert same["updated"] is False
    assert same["changes"] == []
    assert same["identity"] == ident
    empty = s.ok(d, "UPDATE_IDENTITY", {"agent_id": "noop-1", "updates": {}})
    assert empty["changes"] == []
    assert [t for t, _ in identity_events(d, "noop-1")] == ["IDENTITY_CREATED"]


def test_concurrent_updates_and_creates_lose_nothing(d: DaemonProcess) -> None:
    d.result("CREATE_IDENTITY", {"agent_id": "busy-1"})
    fields = {
        "display_name": "Busy",
        "role": "coordinator",
        "personality_traits": ["calm"],
        "appearance": {"icon": "*"},
        "conversation_count": 9,
        "preferences": {"verbosity": "low"},
        "stats": {"tasks_completed": 2},
        "sessions": [{"session_id": "b"}],
    }
    with ThreadPoolExecutor(len(fields)) as pool:
        replies = list(
            pool.map(
                lambda kv: d.call("UPDATE_IDENTITY", {"agent_id": "busy-1", "updates": dict([kv])}),
                fields.items(),
            )
        )
    assert all(r["status"] == "success" for r in replies), replies
    final = d.result("GET_IDENTITY", {"agent_id": "busy-1"})["identity"]
    assert {k: final[k] for k in fields} == fields
    with ThreadPoolExecutor(8) as pool:
        creates = list(
            pool.map(
                lambda n: d.call(
                    "CREATE_IDENTITY", {"agent_id": "race-1", "display_name": f"n{n}"}
                ),
                range(8),
            )
        )
    assert sorted(r["status"] for r in creates) == ["error"] * 7 + ["success"]
    assert {r["error"]["code"] for r in creates if r["status"] == "error"} == {"IDENTITY_EXISTS"}


# -- listing ---------------------------------------------------------------------------------


def test_list_sorts_and_filters(daemon: DaemonProcess) -> None:
    s = PublishedSchemas(daemon)
    empty = s.ok(daemon, "LIST_IDENTITIES")
    assert empty["items"] == empty["identities"] == []
    assert empty["total"] == 0
    assert empty["metadata"] == {
        "filtered": False,
        "sort": "created_at",
        "order": "desc",
        "filters_applied": {},
    }
    for agent, name, role in [
        ("a-1", "charlie", "analyst"),
        ("a-2", "Alpha", "writer"),
        ("a-3", "bravo", "analyst"),
    ]:
        s.ok(daemon, "CREATE_IDENTITY", {"agent_id": agent, "display_name": name, "role": role})
        time.sleep(0.002)  # distinct created_at (millisecond resolution)
    stale = iso_from_epoch(time.time() - 2 * 86400)
    s.ok(daemon, "UPDATE_IDENTITY", {"agent_id": "a-3", "updates": {"last_active": stale}})

    def ids(params: dict[str, Any]) -> list[str]:
        return [i["agent_id"] for i in s.ok(daemon, "LIST_IDENTITIES", params)["items"]]

    assert ids({}) == ["a-3", "a-2", "a-1"]  # newest first
    assert ids({"order": "asc"}) == ["a-1", "a-2", "a-3"]
    assert ids({"sort_by": "display_name", "order": "asc"}) == ["a-2", "a-3", "a-1"]
    assert ids({"sort_by": "display_name"}) == ["a-1", "a-3", "a-2"]
    assert ids({"sort_by": "last_active", "order": "asc"}) == ["a-3", "a-1", "a-2"]
    assert ids({"filter_role": "analyst", "order": "asc"}) == ["a-1", "a-3"]
    assert ids({"filter_role": "nobody"}) == []
    assert ids({"filter_active": True, "order": "asc"}) == ["a-1", "a-2"]
    assert ids({"filter_active": False}) == ["a-3"]
    both = s.ok(daemon, "LIST_IDENTITIES", {"filter_role": "analyst", "filter_active": True})
    assert [i["agent_id"] for i in both["items"]] == ["a-1"]
    assert both["total"] == both["count"] == 1
    assert both["metadata"] == {
        "filtered": True,
        "sort": "created_at",
        "order": "desc",
        "filters_applied": {"role": "analyst", "active": True},
    }
    # last_active is kept in the daemon's own form whatever offset it was given in.
    s.ok(
        daemon,
        "UPDATE_IDENTITY",
        {"agent_id": "a-1", "updates": {"last_active": "2025-06-23T17:00:01.5+02:00"}},
    )
    assert s.ok(daemon, "GET_IDENTITY", {"agent_id": "a-1"})["last_active"] == (
        "2025-06-23T15:00:01.500Z"
    )


# -- persistence -----------------------------------------------------------------------------


def test_identities_survive_a_restart(make_daemon: Callable[..., DaemonProcess]) -> None:
    d = make_daemon(process=True)
    s = PublishedSchemas(d)
    s.ok(d, "CREATE_IDENTITY", {"agent_id": "keeper", "role": "teacher"})
    kept = s.ok(
        d,
        "UPDATE_IDENTITY",
        {"agent_id": "keeper", "updates": {"display_name": "Kept", "conversation_count": 2}},
    )["identity"]
    s.ok(d, "CREATE_IDENTITY", {"agent_id": "goner"})
    s.ok(d, "REMOVE_IDENTITY", {"agent_id": "goner"})
    d.stop()

    again = make_daemon(process=True, base=d.base)
    s = PublishedSchemas(again)
    assert s.ok(again, "GET_IDENTITY", {"agent_id": "keeper"})["identity"] == kept
    assert s.ok(again, "LIST_IDENTITIES")["items"] == [kept]
    error_of(again.call("GET_IDENTITY", {"agent_id": "goner"}), "IDENTITY_NOT_FOUND")
    error_of(again.call("CREATE_IDENTITY", {"agent_id": "keeper"}), "IDENTITY_EXISTS")
    # Still writable after the restart.
    s.ok(again, "UPDATE_IDENTITY", {"agent_id": "keeper", "updates": {"role": "writer"}})
    assert s.ok(again, "REMOVE_IDENTITY", {"agent_id": "keeper"})["identity"]["role"] == "writer"
    assert s.ok(again, "LIST_IDENTITIES")["total"] == 0


def test_traits_as_ksis_daemon_client_sent_them(d: DaemonProcess, s: PublishedSchemas) -> None:
    # DaemonClient.create_identity passed an object of traits; their names are kept.
    params = {"agent_id": "traits-obj", "personality_traits": {"curious": 0.9, "shy": 0}}
    ident = s.ok(d, "CREATE_IDENTITY", params)["identity"]
    assert ident["personality_traits"] == ["curious"]
