"""What a caller of the LiteLLM provider may ask for: the operator's ceiling.

In-process, whoever calls ``litellm.acompletion`` runs the CLI as themselves, so the default
policy allows everything. Behind a LiteLLM proxy the caller is an HTTP client and the CLI runs
as the proxy's user: a client's ``extra_body={"claude": {...}}`` replaces whatever the
operator put in ``litellm_params`` (the router merges request keys over deployment keys), so
the operator's limits live here instead, where no request reaches. :meth:`Policy.options`
turns a request's ``claude={...}`` into :class:`ClaudeOptions` within the limits, or raises
``PolicyViolation`` (the provider's 400) naming what was refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from daemon.claude.chat import options_from_kwarg
from daemon.claude.options import ClaudeOptions

POLICY_ENV = "KSI_PROVIDER_POLICY"
"""A policy as JSON (starting with ``{``), or the path of a JSON or YAML file holding one."""


class PolicyViolation(ValueError):
    """A request asked for more than the operator's policy allows."""


class Policy(BaseModel):
    """The operator's limits on the provider's ``claude={...}`` options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    client_options: frozenset[str] | None = Field(
        default=None,
        description="option keys a request may set; null: all of them",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="the operator's own option values; fixed, a request cannot change them",
    )
    cwd_root: str | None = Field(
        default=None, description="a request's cwd must be this directory or below it"
    )
    tools: list[str] | None = Field(
        default=None,
        description="the built-in tools a turn may have at most (--tools); [] means none",
    )
    expose_internals: bool = Field(
        default=True,
        description="responses carry claude_result (the CLI's JSON, pid, stderr tail)",
    )

    @field_validator("client_options")
    @classmethod
    def _known_keys(cls, value: frozenset[str] | None) -> frozenset[str] | None:
        unknown = sorted((value or frozenset()) - set(ClaudeOptions.model_fields))
        if unknown:
            raise ValueError(f"unknown option keys: {unknown}")
        return value

    @field_validator("cwd_root")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not os.path.isabs(value):
            raise ValueError(f"cwd_root must be an absolute path: {value!r}")
        return None if value is None else os.path.realpath(value)

    @classmethod
    def load(cls, source: str) -> Policy:
        """From ``KSI_PROVIDER_POLICY``'s value: inline JSON, or a JSON/YAML file's path."""
        text = source if source.lstrip().startswith("{") else Path(source).read_text("utf-8")
        try:
            data = json.loads(text)
        except ValueError:
            import yaml  # only for YAML files; LiteLLM's proxy ships PyYAML

            data = yaml.safe_load(text)
        return cls.model_validate(data)

    @classmethod
    def from_env(cls, default: Policy) -> Policy:
        source = os.environ.get(POLICY_ENV)
        return cls.load(source) if source else default

    @property
    def limits_nothing(self) -> bool:
        return (
            self.client_options is None
            and not self.options
            and self.cwd_root is None
            and self.tools is None
        )

    def options_for(self, requested: Any, system: str | None) -> ClaudeOptions:
        """A request's ``claude={...}`` (None when it gave none) as options within this
        policy; a :class:`ClaudeOptions` object (in-process callers) counts the fields it
        sets. Invalid input raises ``ValueError``, as :func:`options_from_kwarg` does."""
        if self.limits_nothing:
            return options_from_kwarg(requested, system)  # validated once, as given
        if requested is None:
            requested = {}
        if isinstance(requested, ClaudeOptions):
            requested = {name: getattr(requested, name) for name in requested.model_fields_set}
        elif not isinstance(requested, Mapping):
            raise ValueError(f"claude= must be a dict, got {type(requested).__name__}")
        if self.client_options is not None:
            refused = sorted(set(requested) - self.client_options)
            if refused:
                raise PolicyViolation(
                    f"claude options {refused} are not allowed here "
                    f"(allowed: {sorted(self.client_options)})"
                )
        fixed = sorted(set(requested) & set(self.options))
        if fixed:
            raise PolicyViolation(f"claude options {fixed} are set by the operator")
        opts = options_from_kwarg({**requested, **self.options}, system)
        self._check_cwd(opts.cwd)
        return self._cap_tools(opts)

    def _check_cwd(self, cwd: str | None) -> None:
        if self.cwd_root is None:
            return
        if cwd is None:
            raise PolicyViolation("this policy needs an explicit cwd (under cwd_root)")
        real = os.path.realpath(cwd)  # no escape through a symlink or ".."
        if os.path.commonpath([real, self.cwd_root]) != self.cwd_root:
            raise PolicyViolation(f"cwd {cwd!r} is outside {self.cwd_root!r}")

    def _cap_tools(self, opts: ClaudeOptions) -> ClaudeOptions:
        if self.tools is None:
            return opts
        wanted = self.tools if opts.tools is None else opts.tools
        extra = sorted(set(wanted) - set(self.tools))
        if extra:
            raise PolicyViolation(f"tools {extra} are beyond this policy's {self.tools}")
        if not opts.enable_tools:
            wanted = []
        return opts.model_copy(update={"tools": list(wanted), "enable_tools": bool(wanted)})


OPEN = Policy()
"""In-process use: the caller is the operator."""

PROXY_DEFAULT = Policy(
    client_options=frozenset(
        {"session_id", "max_turns", "timeout_s", "include_partial_messages", "warm"}
    ),
    tools=[],
    expose_internals=False,
)
"""Behind a proxy, unless the operator says otherwise: conversations (session, turn and time
limits) but no tools, the proxy's own cwd, and no CLI internals in responses."""
