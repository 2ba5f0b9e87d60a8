"""Prompt compositions (daemon/compositions.py, daemon/commands/compositions.py): KSI's
GET_COMPOSITIONS, GET_COMPOSITION, VALIDATE_COMPOSITION, LIST_COMPONENTS and COMPOSE_PROMPT
over the socket, from a prompts directory of YAML and markdown files and from the state
database (SAVE_COMPOSITION, REMOVE_COMPOSITION), every result checked against the schema
GET_COMMANDS publishes."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.helpers import DaemonProcess, PublishedSchemas, error_of
from tests.inproc import InProcessDaemon

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = (
    "GET_COMPOSITIONS",
    "GET_COMPOSITION",
    "VALIDATE_COMPOSITION",
    "LIST_COMPONENTS",
    "COMPOSE_PROMPT",
    "SAVE_COMPOSITION",
    "REMOVE_COMPOSITION",
)

GREETER = """\
name: greeter
version: 1.2
description: Greets someone
author: tests
components:
  - name: hello
    source: components/hello.md
    vars:
      greeting: "Hello, {{person}}"
  - name: formal
    source: components/style/formal.md
    condition: "{{style}} == 'formal'"
  - name: history
    source: components/history.md
    condition: "{{history}}"
required_context:
  person: "string - who is greeted"
metadata:
  category: social
  capabilities: [greeting]
"""

FILES = {
    "compositions/greeter.yaml": GREETER,
    "components/hello.md": (
        "# Hi\n\n{{ greeting }}!{% if mood is defined %} ({{ mood }}){% endif %}\n"
    ),
    "components/style/formal.md": "Please address {{ person }} as {{ title }}.\n",
    "components/history.md": "Earlier: {{ history }}\n",
    # Not a composition of its own: compositions/ holds only these YAML files.
    "components/notes.txt": "not markdown",
    "compositions/broken.yaml": "name: broken\ncomponents: [\n",
    "compositions/escape.yaml": (
        "name: escape\ncomponents:\n  - name: x\n    source: ../outside.md\n"
    ),
    "compositions/linked.yaml": (
        "name: linked\ncomponents:\n  - name: x\n    source: components/link.md\n"
    ),
}


def make_prompts(base: Path) -> tuple[Path, Path]:
    """A prompts directory and, beside it, a secret file and directory it must not reach."""
    prompts = base / "prompts"
    for rel, text in FILES.items():
        path = prompts / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret.md").write_text("SECRET {{ person }}\n")
    (base / "outside.md").write_text("SECRET\n")
    (prompts / "components" / "link.md").symlink_to(outside / "secret.md")
    (prompts / "components" / "away").symlink_to(outside, target_is_directory=True)
    return prompts, outside


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    where = Path(tempfile.mkdtemp(prefix="ksi-prompts-"))
    try:
        yield where
    finally:
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture(scope="module")
def d(base: Path) -> Iterator[DaemonProcess]:
    prompts, _ = make_prompts(base)
    dp = InProcessDaemon(env={"KSI_PROMPTS_DIR": str(prompts)}).start()
    try:
        yield dp
    finally:
        dp.cleanup()


@pytest.fixture(scope="module")
def s(d: DaemonProcess) -> PublishedSchemas:
    return PublishedSchemas(d)


# -- discovery -------------------------------------------------------------------------------


def test_the_commands_are_published_with_descriptions_and_schemas(s: PublishedSchemas) -> None:
    for name in COMMANDS:
        spec = s.specs[name]
        assert len(spec["description"]) > 40, name
        jsonschema.Draft202012Validator.check_schema(spec["parameters"])
        jsonschema.Draft202012Validator.check_schema(spec["result"])
        assert spec["parameters"]["additionalProperties"] is False, name
    assert s.params["COMPOSE_PROMPT"].is_valid({"composition": "greeter", "context": {}})
    assert not s.params["COMPOSE_PROMPT"].is_valid({"composition": "../greeter"})
    assert not s.params["GET_COMPOSITIONS"].is_valid({"include_metadata": "yes"})


# -- from files ------------------------------------------------------------------------------


def test_list_compositions_from_files(d: DaemonProcess, s: PublishedSchemas) -> None:
    listed = s.ok(d, "GET_COMPOSITIONS")
    by_name = {i["name"]: i for i in listed["items"]}
    # linked reads as a recipe (its component is what is wrong: GET_COMPOSITION says so).
    assert list(by_name) == ["greeter", "linked"], listed
    greeter = by_name["greeter"]
    assert greeter["origin"] == "file"
    assert greeter["version"] == "1.2"  # YAML's float, as text
    assert greeter["component_count"] == 3
    assert greeter["required_context"] == {"person": "string - who is greeted"}
    assert greeter["metadata"]["category"] == "social"
    # The broken files are reported, not listed; nothing else in the directory counts.
    failed = {f["name"]: f["error"] for f in listed["failed"]}
    assert set(failed) == {"broken", "escape"}
    assert "YAML" in failed["broken"]
    assert ".." in failed["escape"]
    assert listed["metadata"]["failed_to_load"] == 2

    bare = s.ok(d, "GET_COMPOSITIONS", {"include_metadata": False})["items"][0]  # greeter
    assert bare["name"] == "greeter"
    assert bare["required_context"] is None
    assert bare["metadata"] is None
    assert s.ok(d, "GET_COMPOSITIONS", {"category": "social"})["items"][0]["name"] == "greeter"
    assert s.ok(d, "GET_COMPOSITIONS", {"category": "agent"})["items"] == []


def test_get_composition(d: DaemonProcess, s: PublishedSchemas) -> None:
    got = s.ok(d, "GET_COMPOSITION", {"name": "greeter"})
    assert got["name"] == "greeter"
    assert got["origin"] == "file"
    assert [c["name"] for c in got["components"]] == ["hello", "formal", "history"]
    assert [c["has_condition"] for c in got["components"]] == [False, True, True]
    assert got["components"][0]["vars"] == {"greeting": "Hello, {{person}}"}
    assert got["summary"]["conditional_components"] == 2
    assert got["summary"]["category"] == "social"
    assert got["summary"]["capabilities"] == ["greeting"]
    assert got["validation"]["has_issues"] is False


def test_compose_with_conditions(d: DaemonProcess, s: PublishedSchemas) -> None:
    plain = s.ok(d, "COMPOSE_PROMPT", {"composition": "greeter", "context": {"person": "Ada"}})
    assert plain["prompt"] == "# Hi\n\nHello, Ada!"
    assert plain["composed_successfully"] is True
    assert plain["components_included"] == ["hello"]
    assert plain["components_skipped"] == ["formal", "history"]
    assert plain["composition_used"] == "greeter"
    assert plain["context_provided"] == {"person": "Ada"}
    assert plain["prompt_analysis"]["length_chars"] == len(plain["prompt"])
    assert plain["prompt_analysis"]["length_words"] == 4
    assert plain["prompt_analysis"]["estimated_tokens"] == pytest.approx(5.2)

    context = {
        "person": "Ada",
        "style": "formal",
        "title": "Countess",
        "history": "we met",
        "mood": "glad",
    }
    full = s.ok(d, "COMPOSE_PROMPT", {"composition": "greeter", "context": context})
    assert full["prompt"] == (
        "# Hi\n\nHello, Ada! (glad)\n\nPlease address Ada as Countess.\n\nEarlier: we met"
    )
    assert full["components_skipped"] == []
    # A condition compares values: another style leaves the formal part out.
    casual = s.ok(
        d, "COMPOSE_PROMPT", {"composition": "greeter", "context": {**context, "style": "x"}}
    )
    assert "Countess" not in casual["prompt"]


def test_missing_variables_are_named(d: DaemonProcess, s: PublishedSchemas) -> None:
    err = error_of(d.call("COMPOSE_PROMPT", {"composition": "greeter"}), "CONTEXT_VALIDATION_ERROR")
    assert "person" in err["message"]
    assert err["details"]["missing"] == ["person"]
    # A variable only a component needs (title, once style is formal) is named too, with
    # the component that needs it; one under "is defined" (mood) is not.
    err = error_of(
        d.call(
            "COMPOSE_PROMPT",
            {"composition": "greeter", "context": {"person": "Ada", "style": "formal"}},
        ),
        "CONTEXT_VALIDATION_ERROR",
    )
    assert err["details"]["missing"] == ["title"]
    assert err["details"]["needed_by"] == {"title": ["formal"]}

    v = s.ok(d, "VALIDATE_COMPOSITION", {"name": "greeter", "context": {}})
    assert v["valid"] is False
    assert v["context_validation"]["missing_context"] == ["person"]
    assert v["context_validation"]["context_complete"] is False
    assert any("person" in i for i in v["issues"])
    assert any("person" in s for s in v["suggestions"])

    v = s.ok(d, "VALIDATE_COMPOSITION", {"name": "greeter", "context": {"style": "formal"}})
    assert set(v["context_validation"]["missing_variables"]) == {"person", "title"}

    v = s.ok(d, "VALIDATE_COMPOSITION", {"name": "greeter", "context": {"person": "A", "x": 1}})
    assert v["valid"] is True, v
    assert v["issues"] == []
    assert v["context_validation"]["extra_context"] == ["x"]
    assert v["warnings"]
    assert v["test_composition"]["composition_successful"] is True
    assert v["test_composition"]["prompt_length"] == len("# Hi\n\nHello, A!")
    assert v["summary"]["overall_valid"] is True


def test_not_found(d: DaemonProcess) -> None:
    for command, params in (
        ("GET_COMPOSITION", {"name": "nope_greeter"}),
        ("VALIDATE_COMPOSITION", {"name": "nope_greeter", "context": {"a": 1}}),
        ("COMPOSE_PROMPT", {"composition": "nope_greeter", "context": {}}),
        ("REMOVE_COMPOSITION", {"name": "nope_greeter"}),
    ):
        err = error_of(d.call(command, params), "COMPOSITION_NOT_FOUND")
        assert "greeter" in err["message"], err  # a similar name is suggested
    error_of(d.call("REMOVE_COMPOSITION", {"name": "greeter"}), "COMPOSITION_READ_ONLY")


def test_broken_files_are_typed(d: DaemonProcess, s: PublishedSchemas) -> None:
    error_of(d.call("GET_COMPOSITION", {"name": "broken"}), "COMPOSITION_INVALID")
    error_of(d.call("COMPOSE_PROMPT", {"composition": "escape"}), "COMPOSITION_INVALID")
    # A source that is a symlink out of the prompts directory is never read.
    got = s.ok(d, "GET_COMPOSITION", {"name": "linked"})
    assert got["validation"]["has_issues"] is True
    assert "missing_components" in got["validation"]["structural_issues"]
    err = error_of(d.call("COMPOSE_PROMPT", {"composition": "linked"}), "COMPOSITION_INVALID")
    assert "SECRET" not in str(err)
    v = s.ok(d, "VALIDATE_COMPOSITION", {"name": "linked"})
    assert v["valid"] is False
    assert v["composition_validation"]["structure_valid"] is False


# -- components ------------------------------------------------------------------------------


def test_list_components(d: DaemonProcess, s: PublishedSchemas) -> None:
    listed = s.ok(d, "LIST_COMPONENTS")
    # link.md and away/ lead out of the prompts directory: skipped; notes.txt is no component.
    assert [i["path"] for i in listed["items"]] == ["hello.md", "history.md", "style/formal.md"]
    formal = listed["items"][2]
    assert formal["name"] == "formal"
    assert formal["directory"] == "style"
    assert formal["filename"] == "formal.md"
    assert formal["exists"] is True
    assert formal["size_bytes"] == len(FILES["components/style/formal.md"])
    assert formal["preview"] == "Please address {{ person }} as {{ title }}."
    assert list(listed["by_directory"]) == ["style"]
    assert [i["name"] for i in listed["root_components"]] == ["hello", "history"]
    assert listed["metadata"]["total_directories"] == 2

    only = s.ok(d, "LIST_COMPONENTS", {"directory": "style"})
    assert [i["path"] for i in only["items"]] == ["style/formal.md"]
    assert s.ok(d, "LIST_COMPONENTS", {"directory": "style/"})["total"] == 1

    err = error_of(d.call("LIST_COMPONENTS", {"directory": "nothing_here"}), "DIRECTORY_NOT_FOUND")
    assert "style" in err["message"]


def test_paths_never_escape_the_prompts_directory(d: DaemonProcess) -> None:
    for bad in ("..", "../outside", "style/../..", "/etc", "~", "a\\b", ""):
        error_of(d.call("LIST_COMPONENTS", {"directory": bad}), "INVALID_PARAMETERS")
    error_of(d.call("LIST_COMPONENTS", {"directory": "away"}), "PERMISSION_DENIED")
    for name in ("../greeter", "a/b", "/abs", ".hidden", ""):
        error_of(d.call("GET_COMPOSITION", {"name": name}), "INVALID_PARAMETERS")
    for source in ("../outside.md", "/etc/passwd.md", "components/../../outside.md"):
        recipe = {"name": "esc", "components": [{"name": "x", "source": source}]}
        err = error_of(d.call("SAVE_COMPOSITION", {"composition": recipe}), "INVALID_PARAMETERS")
        assert "source" in err["message"]
    recipe = {"name": "esc", "components": [{"name": "x", "source": "components/link.md"}]}
    error_of(d.call("SAVE_COMPOSITION", {"composition": recipe}), "COMPOSITION_INVALID")


# -- saved compositions ----------------------------------------------------------------------


def inline(name: str, text: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "components": [{"name": "body", "content": text}], **extra}


def test_save_compose_and_remove(d: DaemonProcess, s: PublishedSchemas) -> None:
    recipe = {
        "name": "stored_one",
        "version": "2.0",
        "description": "kept in the store",
        "components": [
            {"name": "head", "content": "Task: {{ task }}"},
            {"name": "file", "source": "components/hello.md", "vars": {"greeting": "Hey"}},
            {"name": "extra", "content": "Urgent!", "condition": "priority > 3"},
        ],
        "required_context": ["task"],
        "metadata": {"category": "stored"},
    }
    saved = s.ok(d, "SAVE_COMPOSITION", {"composition": recipe})
    assert saved["created"] is True
    assert saved["shadows_file"] is False
    assert saved["composition"]["required_context"] == {"task": ""}
    error_of(d.call("SAVE_COMPOSITION", {"composition": recipe}), "COMPOSITION_EXISTS")

    items = {i["name"]: i for i in s.ok(d, "GET_COMPOSITIONS")["items"]}
    assert items["stored_one"]["origin"] == "store"
    got = s.ok(d, "GET_COMPOSITION", {"name": "stored_one"})
    assert got["components"][0]["content"] == "Task: {{ task }}"
    assert got["validation"]["has_issues"] is False

    out = s.ok(
        d, "COMPOSE_PROMPT", {"composition": "stored_one", "context": {"task": "t", "priority": 5}}
    )
    assert out["prompt"] == "Task: t\n\n# Hi\n\nHey!\n\nUrgent!"
    assert out["composition_metadata"]["origin"] == "store"
    low = s.ok(
        d, "COMPOSE_PROMPT", {"composition": "stored_one", "context": {"task": "t", "priority": 1}}
    )
    assert "Urgent" not in low["prompt"]

    again = s.ok(
        d, "SAVE_COMPOSITION", {"composition": {**recipe, "version": "3"}, "overwrite": True}
    )
    assert again["created"] is False
    assert s.ok(d, "GET_COMPOSITION", {"name": "stored_one"})["version"] == "3"

    removed = s.ok(d, "REMOVE_COMPOSITION", {"name": "stored_one"})
    assert removed["deleted"] is True
    assert removed["composition"]["version"] == "3"
    assert removed["file_remains"] is False
    error_of(d.call("GET_COMPOSITION", {"name": "stored_one"}), "COMPOSITION_NOT_FOUND")
    events = d.result("GET_EVENTS", {"event_types": ["COMPOSITION_*"], "limit": 100})["events"]
    assert [e["event"] for e in events if e["data"]["name"] == "stored_one"] == [
        "COMPOSITION_SAVED",
        "COMPOSITION_SAVED",
        "COMPOSITION_REMOVED",
    ]


def test_a_saved_composition_shadows_a_file(d: DaemonProcess, s: PublishedSchemas) -> None:
    saved = s.ok(d, "SAVE_COMPOSITION", {"composition": inline("greeter", "Yo {{ person }}")})
    assert saved["shadows_file"] is True
    out = s.ok(d, "COMPOSE_PROMPT", {"composition": "greeter", "context": {"person": "B"}})
    assert out["prompt"] == "Yo B"
    assert s.ok(d, "GET_COMPOSITION", {"name": "greeter"})["shadows_file"] is True
    assert s.ok(d, "REMOVE_COMPOSITION", {"name": "greeter"})["file_remains"] is True
    out = s.ok(d, "COMPOSE_PROMPT", {"composition": "greeter", "context": {"person": "B"}})
    assert out["prompt"] == "# Hi\n\nHello, B!"


def test_templates_are_sandboxed_and_strict(d: DaemonProcess, s: PublishedSchemas) -> None:
    s.ok(d, "SAVE_COMPOSITION", {"composition": inline("sneaky", "{{ ''.__class__.__mro__ }}")})
    error_of(d.call("COMPOSE_PROMPT", {"composition": "sneaky"}), "COMPOSITION_INVALID")
    s.ok(d, "REMOVE_COMPOSITION", {"name": "sneaky"})
    # A condition is an expression, not Python: no builtins, no dunder attributes.
    recipe = inline("cond", "shown")
    recipe["components"][0]["condition"] = "__import__('os')"
    s.ok(d, "SAVE_COMPOSITION", {"composition": recipe})
    err = error_of(d.call("COMPOSE_PROMPT", {"composition": "cond"}), "COMPOSITION_INVALID")
    assert "__import__" in err["message"]
    recipe["components"][0]["condition"] = "().__class__"  # unsafe: undefined, so false
    s.ok(d, "SAVE_COMPOSITION", {"composition": recipe, "overwrite": True})
    assert s.ok(d, "COMPOSE_PROMPT", {"composition": "cond"})["prompt"] == ""
    s.ok(d, "REMOVE_COMPOSITION", {"name": "cond"})
    # \{{ is a literal {{.
    s.ok(d, "SAVE_COMPOSITION", {"composition": inline("lit", "use \\{{name}} for {{ x }}")})
    out = s.ok(d, "COMPOSE_PROMPT", {"composition": "lit", "context": {"x": "vars"}})
    assert out["prompt"] == "use {{name}} for vars"
    assert out["prompt_analysis"]["has_variables"] is True
    assert out["warnings"]
    s.ok(d, "REMOVE_COMPOSITION", {"name": "lit"})


def test_bad_input_is_typed(d: DaemonProcess) -> None:
    for command, params in (
        ("COMPOSE_PROMPT", {"composition": "greeter", "context": "person=Ada"}),
        ("VALIDATE_COMPOSITION", {"name": "greeter", "context": [1]}),
        ("GET_COMPOSITIONS", {"include_metadata": "yes"}),
        ("GET_COMPOSITION", {}),
        ("LIST_COMPONENTS", {"directory": 3}),
        ("SAVE_COMPOSITION", {"composition": {"name": "x", "components": []}}),
        ("SAVE_COMPOSITION", {"composition": {"name": "x", "components": [{"name": "a"}]}}),
        ("SAVE_COMPOSITION", {"composition": inline("x", "{% if %}")}),
        ("SAVE_COMPOSITION", {"composition": inline("x", "t", surprise=1)}),
        ("SAVE_COMPOSITION", {"composition": inline("x", "t"), "overwrite": "true"}),
        (
            "SAVE_COMPOSITION",
            {
                "composition": {
                    "name": "x",
                    "components": [{"name": "a", "content": "t", "condition": "a ==="}],
                }
            },
        ),
        (
            "SAVE_COMPOSITION",
            {
                "composition": {
                    "name": "x",
                    "components": [{"name": "a", "content": "t"}, {"name": "a", "content": "u"}],
                }
            },
        ),
    ):
        err = error_of(d.call(command, params), "INVALID_PARAMETERS")
        assert err["message"], (command, params)
    error_of(d.call("GET_COMPOSITION", {"name": "x"}), "COMPOSITION_NOT_FOUND")


# -- persistence and the shipped example -----------------------------------------------------


def test_saved_compositions_survive_a_restart(
    make_daemon: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    env = {"KSI_PROMPTS_DIR": str(tmp_path / "empty")}
    first = make_daemon(process=True, env=env)
    s = PublishedSchemas(first)
    s.ok(first, "SAVE_COMPOSITION", {"composition": inline("kept", "Kept {{ who }}")})
    s.ok(first, "SAVE_COMPOSITION", {"composition": inline("gone", "Gone")})
    s.ok(first, "REMOVE_COMPOSITION", {"name": "gone"})
    first.stop()

    again = make_daemon(process=True, base=first.base, env=env)
    s = PublishedSchemas(again)
    assert [i["name"] for i in s.ok(again, "GET_COMPOSITIONS")["items"]] == ["kept"]
    out = s.ok(again, "COMPOSE_PROMPT", {"composition": "kept", "context": {"who": "me"}})
    assert out["prompt"] == "Kept me"
    error_of(again.call("GET_COMPOSITION", {"name": "gone"}), "COMPOSITION_NOT_FOUND")
    # No prompts directory at all is no error: no files, no components.
    assert s.ok(again, "LIST_COMPONENTS")["total"] == 0


def test_the_shipped_example(make_daemon: Callable[..., DaemonProcess]) -> None:
    d = make_daemon()  # prompts_dir: the default, prompts/ of the checkout
    s = PublishedSchemas(d)
    names = [i["name"] for i in s.ok(d, "GET_COMPOSITIONS")["items"]]
    assert "daemon_agent" in names
    assert s.ok(d, "GET_COMPOSITION", {"name": "daemon_agent"})["validation"]["has_issues"] is False
    assert s.ok(d, "LIST_COMPONENTS", {"directory": "conversation_patterns"})["total"] >= 1
    out = s.ok(
        d,
        "COMPOSE_PROMPT",
        {
            "composition": "daemon_agent",
            "context": {"agent_id": "a7", "task": "Tidy the logs", "enable_tools": True},
        },
    )
    assert "a7" in out["prompt"]
    assert "Tidy the logs" in out["prompt"]
    assert out["components_skipped"] == ["conversation"]
    assert (ROOT / "prompts" / "compositions" / "daemon_agent.yaml").is_file()
    assert os.path.isdir(ROOT / "prompts" / "components")
