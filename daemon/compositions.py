"""Prompt compositions: YAML recipes that assemble markdown components into one prompt.

A recipe (KSI's format, its ``prompts/spec.md``) names its components in order, each a
markdown file under the prompts directory (``source``, e.g. ``components/task.md``) or, for
a recipe saved over the socket, inline ``content``; each may carry ``vars`` and a
``condition``. ``required_context`` names the variables a caller must give.

Rendering is jinja2 in a :class:`~jinja2.sandbox.SandboxedEnvironment`: KSI's ``{{var}}``
placeholders are jinja2's own, and a component may use jinja2's statements too
(``{% if tone is defined %}``). Undefined variables are errors (``StrictUndefined``), so a
prompt is never sent with a hole in it; ``\\{{`` is a literal ``{{``. A component's ``vars``
are rendered against the context first and then override it (the spec's order). A
``condition`` is a jinja2 expression, never Python's ``eval``; KSI's placeholder form
(``"{{role}} == 'initiator'"``, ``"{{enable_tools}}"``) is accepted, and a variable the
context lacks is simply false there, so ``condition: "{{history}}"`` includes a component
only when a history was given.

Paths never leave the prompts directory: a ``source`` or a ``LIST_COMPONENTS`` directory
that is absolute or has a ``..`` part is refused, and one that resolves (through a symlink)
outside it is refused as well; the directory scans skip such entries.

Compositions and components come from the daemon's own user (its socket admits no one
else), so the sandbox guards against template code reaching Python objects, not against a
recipe that is slow on purpose.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

import yaml
from jinja2 import ChainableUndefined, StrictUndefined, TemplateError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from daemon.errors import (
    CompositionInvalid,
    ErrorCode,
    InvalidParameters,
    NotFound,
    PermissionDenied,
)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
_NAME = re.compile(NAME_PATTERN)
MAX_FILE_BYTES = 1024 * 1024  # a recipe or a component file
MAX_INLINE_BYTES = 256 * 1024  # one inline component
MAX_COMPONENTS = 200
COMPOSITIONS = "compositions"
COMPONENTS = "components"
PREVIEW_CHARS = 100


def _to_str(value: Any) -> Any:
    # YAML reads version: 1.0 as a float and a description may come as a number.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


def _descriptions(value: Any) -> Any:
    # required_context maps a name to a description ("string - who the agent is"); a YAML
    # list of names, or a description that is not text, is accepted too.
    if isinstance(value, list):
        return {str(v): "" for v in value}
    if isinstance(value, dict):
        return {
            k: v if isinstance(v, str) else ("" if v is None else str(v)) for k, v in value.items()
        }
    return value


Text = Annotated[str, BeforeValidator(_to_str), Field(max_length=4096)]
VarName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128)]


def check_relative(path: str, what: str) -> str:
    """A client's path inside the prompts directory: relative, POSIX, no ``..`` part."""
    if not path or "\x00" in path or "\\" in path:
        raise ValueError(f"{what} must be a non-empty relative path with / separators")
    pure = PurePosixPath(path)
    if pure.is_absolute() or path.startswith("~"):
        raise ValueError(f"{what} {path!r} must be relative to the prompts directory")
    if ".." in pure.parts:
        raise ValueError(f"{what} {path!r} may not contain '..'")
    return path


class Component(BaseModel):
    """One part of a composition: a markdown file (``source``) or inline ``content``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, description="unique within the composition")
    source: str | None = Field(
        default=None,
        max_length=1024,
        description="a .md file relative to the prompts directory, e.g. components/task.md",
    )
    content: str | None = Field(
        default=None, max_length=MAX_INLINE_BYTES, description="inline markdown instead of a source"
    )
    vars: dict[VarName, Any] = Field(
        default_factory=dict,
        description="variables for this component (string values are templates over the "
        "context); they override the context's",
    )
    condition: str | None = Field(
        default=None,
        max_length=4096,
        description="a jinja2 expression (KSI's {{var}} form accepted); the component is "
        "included only when it is true; a variable the context lacks is false",
    )

    @model_validator(mode="after")
    def _one_body(self) -> Component:
        if (self.source is None) == (self.content is None):
            raise ValueError(f"component {self.name!r} needs exactly one of source and content")
        if self.source is not None:
            check_relative(self.source, "source")
            if not self.source.endswith(".md"):
                raise ValueError(f"source {self.source!r} must be a markdown (.md) file")
        if self.condition is not None and not self.condition.strip():
            self.condition = None
        return self


class Recipe(BaseModel):
    """A composition as its YAML file (or SAVE_COMPOSITION) spells it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="letters, digits, _ . - (at most 128)")
    version: Text = "1.0"
    description: Text = ""
    author: Text = ""
    components: list[Component] = Field(min_length=1, max_length=MAX_COMPONENTS)
    required_context: Annotated[
        dict[VarName, str], BeforeValidator(_descriptions), Field(max_length=256)
    ] = Field(default_factory=dict, description="variable name -> description")
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="tags, use_cases, category, capabilities, ..."
    )
    sharing: dict[str, Any] | None = Field(default=None, description="license, repository, ...")

    @model_validator(mode="after")
    def _unique_components(self) -> Recipe:
        names = [c.name for c in self.components]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"component names must be unique: {', '.join(dupes)} repeated")
        for c in self.components:
            if c.condition is not None:
                try:
                    compile_condition(c.condition)
                except TemplateError as exc:
                    raise ValueError(
                        f"component {c.name!r}: condition {c.condition!r} is not an "
                        f"expression: {exc}"
                    ) from None
            if c.content is not None:
                try:
                    _ENV.parse(_literal_braces(c.content))
                except TemplateError as exc:
                    raise ValueError(f"component {c.name!r}: template error: {exc}") from None
        return self


# -- the prompts directory -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PromptsDir:
    """The directory of ``compositions/*.yaml`` and ``components/**/*.md``."""

    root: Path

    @property
    def real(self) -> Path:
        return self.root.resolve()

    def inside(self, rel: str, what: str) -> Path:
        """``rel`` under the root, resolved; PERMISSION_DENIED if it resolves outside."""
        try:
            check_relative(rel, what)
        except ValueError as exc:
            raise InvalidParameters(str(exc), details={what: rel}) from None
        real = self.real
        target = (real / rel).resolve()
        if not target.is_relative_to(real):
            raise PermissionDenied(
                f"{what} {rel!r} leads outside the prompts directory (a symlink?)",
                details={what: rel, "prompts_dir": str(self.root)},
            )
        return target

    def composition_names(self) -> list[str]:
        """Names of the recipe files (``<name>.yaml`` / ``.yml``), sorted."""
        return sorted(self._composition_files())

    def _composition_files(self) -> dict[str, Path]:
        real = self.real
        found: dict[str, Path] = {}
        try:
            entries = sorted(os.scandir(real / COMPOSITIONS), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return found
        for entry in entries:
            stem, dot, ext = entry.name.rpartition(".")
            if not dot or ext not in ("yaml", "yml") or not _NAME.match(stem) or stem in found:
                continue
            path = Path(entry.path).resolve()
            if path.is_relative_to(real) and path.is_file():
                found[stem] = path
        return found

    def load(self, name: str) -> Recipe | None:
        """The recipe file ``name``; None if there is none; COMPOSITION_INVALID if broken."""
        if not _NAME.match(name):
            return None
        path = self._composition_files().get(name)
        if path is None:
            return None
        where = f"{COMPOSITIONS}/{path.name}"
        try:
            data = yaml.safe_load(_read(path))
        except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError) as exc:
            raise _invalid(name, f"{where} cannot be read as YAML: {exc}") from None
        if not isinstance(data, dict):
            raise _invalid(name, f"{where} is not a YAML mapping")
        data.setdefault("name", name)
        try:
            recipe = Recipe.model_validate(data)
        except ValidationError as exc:
            raise _invalid(name, f"{where}: {_errors(exc)}") from None
        if recipe.name != name:
            raise _invalid(name, f"{where} names itself {recipe.name!r}; the file name is the name")
        return recipe

    def component_text(self, source: str) -> str:
        path = self.inside(source, "source")
        if not path.is_file():
            raise FileNotFoundError(source)
        return _read(path)

    def components(self) -> list[tuple[str, Path]]:
        """Every ``components/**/*.md`` inside the directory: (path relative to components/,
        resolved path), sorted; symlinks leading out are skipped, symlinked directories are
        not followed."""
        real = self.real
        base = real / COMPONENTS
        found: list[tuple[str, Path]] = []
        if not base.is_dir() or not base.resolve().is_relative_to(real):
            return found
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fname in filenames:
                if not fname.endswith(".md") or fname.startswith("."):
                    continue
                path = Path(dirpath) / fname
                resolved = path.resolve()
                if resolved.is_relative_to(real) and resolved.is_file():
                    found.append((path.relative_to(base).as_posix(), resolved))
        found.sort()
        return found


def _read(path: Path) -> str:
    with path.open("rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"{path.name} is larger than {MAX_FILE_BYTES} bytes")
    return data.decode("utf-8")


def _invalid(name: str, message: str) -> CompositionInvalid:
    return CompositionInvalid(
        f"composition {name!r} is invalid: {message}", details={"name": name, "reason": message}
    )


def _errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'recipe'}: {e['msg']}" for e in exc.errors()
    )


def not_found(name: str, known: list[str]) -> NotFound:
    similar = [k for k in known if name.lower() in k.lower() or k.lower() in name.lower()]
    if similar:
        hint = f"similar: {', '.join(similar[:5])}"
    elif known:
        more = f" (and {len(known) - 5} more)" if len(known) > 5 else ""
        hint = f"available: {', '.join(known[:5])}{more}"
    else:
        hint = "no compositions exist yet"
    return NotFound(
        f"no composition {name!r}: {hint}; GET_COMPOSITIONS lists them",
        code=ErrorCode.COMPOSITION_NOT_FOUND,
        details={"name": name, "similar": similar[:5], "available": known[:20]},
    )


# -- rendering -------------------------------------------------------------------------------

_ENV = SandboxedEnvironment(
    undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True, auto_reload=False
)
# Conditions: a variable the context lacks is false (and so is anything read from it).
_COND_ENV = SandboxedEnvironment(undefined=ChainableUndefined, autoescape=False)
# KSI's condition placeholders, bare or quoted: "{{role}} == 'x'", "'{{role}}' == 'x'".
_PLACEHOLDER = re.compile(r"""(['"]?)\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}\1""")


def _literal_braces(text: str) -> str:
    return text.replace("\\{{", "{{ '{{' }}")


@dataclass(slots=True)
class Rendered:
    prompt: str
    included: list[str]
    skipped: list[str]


@dataclass(slots=True)
class Problems:
    """What stops a composition from rendering, by kind (KSI's validate_composition keys)."""

    missing_components: list[str] = field(default_factory=list)
    invalid_conditions: list[str] = field(default_factory=list)
    template_errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[str]]:
        return {k: v for k, v in self.issues_by_kind().items() if v}

    def issues_by_kind(self) -> dict[str, list[str]]:
        return {
            "missing_components": self.missing_components,
            "invalid_conditions": self.invalid_conditions,
            "template_errors": self.template_errors,
        }

    def issues(self) -> list[str]:
        return [f"{kind}: {item}" for kind, items in self.as_dict().items() for item in items]


class MissingVariables(Exception):
    def __init__(self, missing: dict[str, list[str]]) -> None:
        super().__init__(", ".join(missing))
        self.missing = missing  # variable -> the components (or "required_context") needing it


def compile_condition(condition: str) -> Any:
    """A condition as a jinja2 expression (KSI's ``{{var}}`` placeholders become names)."""
    return _COND_ENV.compile_expression(_PLACEHOLDER.sub(r"\2", condition).strip())


def evaluate(condition: str, context: dict[str, Any]) -> bool:
    return bool(compile_condition(condition)(**context))


def structure(recipe: Recipe, prompts: PromptsDir) -> Problems:
    """Problems that do not depend on the context: unreadable components, template syntax,
    conditions that do not parse."""
    problems = Problems()
    for c in recipe.components:
        if c.condition is not None:
            try:
                compile_condition(c.condition)
            except TemplateError as exc:
                problems.invalid_conditions.append(f"{c.name}: {c.condition!r}: {exc}")
        try:
            text = _body(c, prompts)
        except (FileNotFoundError, NotFound, PermissionDenied, InvalidParameters) as exc:
            problems.missing_components.append(f"{c.name}: {c.source} ({_why(exc)})")
            continue
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            problems.missing_components.append(f"{c.name}: {c.source} ({exc})")
            continue
        try:
            _ENV.parse(text)
        except TemplateError as exc:
            problems.template_errors.append(f"{c.name}: {exc}")
    return problems


def _why(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    return str(exc)


def _body(c: Component, prompts: PromptsDir) -> str:
    if c.content is not None:
        return _literal_braces(c.content)
    assert c.source is not None
    return _literal_braces(prompts.component_text(c.source))


def render(recipe: Recipe, context: dict[str, Any], prompts: PromptsDir) -> Rendered:
    """The prompt; :class:`MissingVariables` naming every variable the context lacks;
    :class:`CompositionInvalid` if a component cannot be read or rendered."""
    missing: dict[str, list[str]] = {
        k: ["required_context"] for k in recipe.required_context if k not in context
    }
    parts: list[str] = []
    included: list[str] = []
    skipped: list[str] = []
    for c in recipe.components:
        if c.condition is not None:
            try:
                on = evaluate(c.condition, context)
            except TemplateError as exc:
                raise _invalid(
                    recipe.name, f"component {c.name!r}: condition {c.condition!r}: {exc}"
                ) from None
            if not on:
                skipped.append(c.name)
                continue
        try:
            text = _body(c, prompts)
        except FileNotFoundError:
            raise _invalid(
                recipe.name, f"component {c.name!r}: {c.source} does not exist"
            ) from None
        except (InvalidParameters, PermissionDenied) as exc:
            raise _invalid(recipe.name, f"component {c.name!r}: {exc.message}") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise _invalid(recipe.name, f"component {c.name!r}: {c.source}: {exc}") from None
        lacking: set[str] = set()
        scope = dict(context)
        for key, value in c.vars.items():
            if isinstance(value, str):
                value, absent = _fill(_literal_braces(value), context, recipe.name, c.name)
                lacking |= absent
            scope[key] = value
        part, absent = _fill(text, scope, recipe.name, c.name)
        lacking |= absent
        for name in sorted(lacking):
            missing.setdefault(name, []).append(c.name)
        parts.append(part.strip())
        included.append(c.name)
    if missing:
        raise MissingVariables(missing)
    return Rendered("\n\n".join(p for p in parts if p), included, skipped)


_UNDEFINED = re.compile(r"^'([A-Za-z_][A-Za-z0-9_]*)' is undefined$")
_MAX_MISSING = 256


def _fill(source: str, scope: dict[str, Any], recipe: str, component: str) -> tuple[str, set[str]]:
    """``source`` rendered over ``scope``, and the names it lacks (each found by rendering
    again with a stand-in for the last, so a variable under ``is defined`` is not one)."""
    try:
        template = _ENV.from_string(source)
        absent: set[str] = set()
        while True:
            try:
                return template.render({**scope, **dict.fromkeys(absent, "")}), absent
            except UndefinedError as exc:
                m = _UNDEFINED.match(str(exc))
                if m is None or m.group(1) in absent or len(absent) >= _MAX_MISSING:
                    raise
                absent.add(m.group(1))
    except TemplateError as exc:
        raise _invalid(recipe, f"component {component!r}: {exc}") from None


def analyse(prompt: str) -> dict[str, Any]:
    words = len(prompt.split())
    lines = prompt.splitlines()
    return {
        "length_chars": len(prompt),
        "length_words": words,
        "length_lines": len(lines),
        "non_empty_lines": sum(1 for line in lines if line.strip()),
        "estimated_tokens": round(words * 1.3, 1),
        "has_variables": "{{" in prompt and "}}" in prompt,
    }
