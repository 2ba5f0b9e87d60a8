"""Per-turn CLI options: the namespaced ``claude={...}`` LiteLLM kwarg.

Callers put every Claude-CLI option into one dict so nothing collides with the
names LiteLLM interprets itself (``tools``, ``user``, ``timeout``,
``session_id``, ``num_retries`` ...). :class:`ClaudeOptions` validates it.

``on_start``, ``on_progress`` and ``on_permission`` are plain callables riding inside the
same dict. That works because LiteLLM 1.106.2 hands unknown kwargs to the provider in
``optional_params`` *by reference* (verified in ``tests/test_provider.py``:
the provider receives the identical function object, for ``acompletion`` with
and without ``stream=True``). It is excluded from serialisation.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from daemon.claude.mcp_servers import McpServers, mcp_servers_validator
from daemon.claude.permissions import OnPermission

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


# Upper bounds keep a typo (or 1e30) from becoming a turn that is never timed out.
MAX_TIMEOUT_S = 7 * 24 * 3600.0
MAX_TURNS = 10_000
MAX_COST_USD = 1_000_000.0
# An amount of money a caller limits spend to: positive and finite.
UsdAmount = Annotated[float, Field(gt=0, le=MAX_COST_USD, allow_inf_nan=False)]


class TurnOptions(BaseModel):
    """How a turn runs, as any caller may ask for it: the fields a daemon SPAWN and the
    provider's ``claude={...}`` share, declared and validated here only."""

    model_config = ConfigDict(extra="forbid")

    # Resume is cwd-scoped in the CLI, so a resumed session runs where it began (the
    # engine sees to it: ClaudeEngine.plan_turn).
    cwd: str | None = Field(
        default=None, description="absolute directory; a session keeps the one it began in"
    )
    enable_tools: bool = True
    """False -> ``--tools ""`` (no tools at all)."""
    tools: list[str] | None = Field(
        default=None,
        description='the built-in tools the turn has (--tools), e.g. ["Read", "Grep"]; '
        "null: the CLI's default set",
    )
    allowed_tools: list[str] | None = None
    disallowed_tools: list[str] | None = None
    max_turns: int | None = Field(default=None, ge=1, le=MAX_TURNS)
    append_system_prompt: str | None = None
    permission_mode: PermissionMode | None = None
    timeout_s: float | None = Field(default=None, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)
    warm: bool | None = Field(
        default=None,
        description="use a long-lived CLI process for this session (default from config)",
    )
    permissions: Literal["cli", "relay"] | None = Field(
        default=None,
        description='"relay": the CLI asks before a tool its rules do not allow, and the '
        'asking is relayed (the daemon publishes PERMISSION_REQUEST); "cli": the CLI decides '
        "alone (a write it does not allow is denied); default from config",
    )
    permission_timeout_s: float | None = Field(
        default=None,
        gt=0,
        le=MAX_TIMEOUT_S,
        allow_inf_nan=False,
        description="relay: seconds a request waits for an answer before "
        "permission_default applies (default from config, 60)",
    )
    permission_default: Literal["allow", "deny"] | None = Field(
        default=None,
        description="relay: the decision when no answer comes in time "
        '(default from config, "deny")',
    )

    max_cost_usd: UsdAmount | None = Field(
        default=None,
        description="stop the turn once it has cost this much (the CLI's --max-budget-usd: "
        "checked after each model call; the turn then fails with BUDGET_EXCEEDED). A turn "
        "with a budget runs cold: the CLI counts a budget per process, not per turn",
    )

    mcp_servers: McpServers | None = Field(
        default=None,
        description="MCP servers for the turn, by name, in the CLI's mcpServers shape: "
        '{"command", "args", "env"} (a local server the CLI starts) or {"type": "http" | '
        '"sse", "url", "headers"}; written to a private --mcp-config file (never argv). The '
        "tools are offered as mcp__<name>__<tool>; a session keeps its servers' CLI warm "
        "while they stay the same",
    )

    _mcp_names = mcp_servers_validator

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
        "cwd", "tools", "allowed_tools", "disallowed_tools", "append_system_prompt", mode="before"
    )
    @classmethod
    def _check_nul(cls, value: object) -> object:
        # Every one of these ends up in the CLI's argv (or as its cwd): exec cannot pass NUL.
        parts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        if any(isinstance(p, str) and "\0" in p for p in parts):
            raise ValueError("must not contain a NUL character")
        return value

    @field_validator("tools", "allowed_tools", "disallowed_tools")
    @classmethod
    def _check_tools(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not name.strip() for name in value):
            raise ValueError("tool names must be non-empty")
        return value

    @classmethod
    def of(cls, base: TurnOptions, **extra: Any) -> Self:
        """``base``'s TurnOptions fields (already validated, e.g. as a SPAWN's parameters)
        with ``extra`` fields of this class (they win), without validating ``base`` a
        second time."""
        fields = {name: getattr(base, name) for name in TurnOptions.model_fields}
        return cls.model_construct(**{**fields, **extra})


class ClaudeOptions(TurnOptions):
    """Validated CLI options for one turn (all optional): :class:`TurnOptions` plus the
    session to run in and what the caller wants to hear while it runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    session_id: str | None = None
    """Resume this session (``--resume``)."""
    new_session_id: str | None = None
    """Id for a first turn (``--session-id``). If unset the engine picks one: a uuid4, or
    for a warm turn with default flags the id of a pre-warmed pool process."""
    include_partial_messages: bool = False
    mcp_config: str | None = Field(
        default=None,
        description="--mcp-config: a file (or JSON) naming MCP servers for the turn; the "
        "daemon's own, the KSI MCP face, is given to turns with ksi_tools",
    )
    on_start: Callable[[StartInfo], None] | None = Field(default=None, exclude=True, repr=False)
    on_progress: Callable[[dict[str, Any]], None] | None = Field(
        default=None, exclude=True, repr=False
    )
    """Called with each progress item of the turn as it happens (daemon/claude/progress.py)."""
    on_permission: OnPermission | None = Field(default=None, exclude=True, repr=False)
    """With ``permissions: "relay"``: asked each time the CLI wants to run a tool its rules do
    not allow (daemon/claude/permissions.py); without it the asks get ``permission_default``."""

    @field_validator("mcp_config")
    @classmethod
    def _check_mcp_config(cls, value: str | None) -> str | None:
        if value is not None and "\0" in value:
            raise ValueError("must not contain a NUL character")
        return value

    @field_validator("session_id", "new_session_id")
    @classmethod
    def _check_uuid(cls, value: str | None) -> str | None:
        # The CLI rejects non-UUIDs anyway, but only after a ~0.4 s start-up;
        # canonical form also keeps our per-session lock keys unique.
        return _canonical_uuid(value)

    @model_validator(mode="after")
    def _check_exclusive(self) -> ClaudeOptions:
        if self.session_id is not None and self.new_session_id is not None:
            raise ValueError("give session_id (resume) or new_session_id (first turn), not both")
        return self
