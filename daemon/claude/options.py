"""Per-turn CLI options: the namespaced ``claude={...}`` LiteLLM kwarg.

Callers put every Claude-CLI option into one dict so nothing collides with the
names LiteLLM interprets itself (``tools``, ``user``, ``timeout``,
``session_id``, ``num_retries`` ...). :class:`ClaudeOptions` validates it.

``on_start`` is a plain callable riding inside the same dict. That works
because LiteLLM 1.106.2 hands unknown kwargs to the provider in
``optional_params`` *by reference* (verified in ``tests/test_provider.py``:
the provider receives the identical function object, for ``acompletion`` with
and without ``stream=True``). It is excluded from serialisation.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PermissionMode = Literal["acceptEdits", "auto", "bypassPermissions", "default", "dontAsk", "plan"]


@dataclass(frozen=True, slots=True)
class StartInfo:
    """Handed to ``on_start`` as soon as the CLI process exists.

    ``session_id`` is final at this point (first turns pass ``--session-id``),
    so a caller can persist it before the model has answered.
    """

    pid: int
    session_id: str
    mode: Literal["cold", "warm"]
    argv: tuple[str, ...]
    cwd: str


def _canonical_uuid(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError(f"not a valid UUID: {value!r}") from None


class ClaudeOptions(BaseModel):
    """Validated CLI options for one turn (all optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    session_id: str | None = None
    """Resume this session (``--resume``)."""
    new_session_id: str | None = None
    """Id for a first turn (``--session-id``). If unset the engine picks one: a uuid4, or
    for a warm turn with default flags the id of a pre-warmed pool process."""
    cwd: str | None = None
    """Working directory; must exist. Resume is cwd-scoped in the CLI."""
    enable_tools: bool = True
    """False -> ``--tools ""`` (no tools at all)."""
    allowed_tools: list[str] | None = None
    disallowed_tools: list[str] | None = None
    max_turns: int | None = Field(default=None, ge=1)
    append_system_prompt: str | None = None
    permission_mode: PermissionMode | None = None
    timeout_s: float | None = Field(default=None, gt=0)
    warm: bool | None = None
    """Run on the session's long-lived CLI (daemon.claude.warm); None: the engine default."""
    include_partial_messages: bool = False
    on_start: Callable[[StartInfo], None] | None = Field(default=None, exclude=True, repr=False)

    @field_validator("session_id", "new_session_id")
    @classmethod
    def _check_uuid(cls, value: str | None) -> str | None:
        # The CLI rejects non-UUIDs anyway, but only after a ~0.4 s start-up;
        # canonical form also keeps our per-session lock keys unique.
        return _canonical_uuid(value)

    @field_validator("cwd")
    @classmethod
    def _check_cwd(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not os.path.isabs(value):
            raise ValueError(f"cwd must be an absolute path: {value!r}")
        if not os.path.isdir(value):
            raise ValueError(f"cwd is not an existing directory: {value!r}")
        return os.path.normpath(value)

    @field_validator(
        "cwd", "allowed_tools", "disallowed_tools", "append_system_prompt", mode="before"
    )
    @classmethod
    def _check_nul(cls, value: object) -> object:
        # Every one of these ends up in the CLI's argv (or as its cwd): exec cannot pass NUL.
        parts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        if any(isinstance(p, str) and "\0" in p for p in parts):
            raise ValueError("must not contain a NUL character")
        return value

    @field_validator("allowed_tools", "disallowed_tools")
    @classmethod
    def _check_tools(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not name.strip() for name in value):
            raise ValueError("tool names must be non-empty")
        return value

    @model_validator(mode="after")
    def _check_exclusive(self) -> ClaudeOptions:
        if self.session_id is not None and self.new_session_id is not None:
            raise ValueError("give session_id (resume) or new_session_id (first turn), not both")
        return self
