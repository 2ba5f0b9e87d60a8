"""A turn's permission requests: the CLI's ``can_use_tool`` control requests and our answers.

With ``permissions: "relay"`` the CLI runs with ``--permission-prompt-tool stdio``: before it
runs a tool its rules do not already allow, it writes a ``control_request`` line and waits
for the ``control_response`` line we write back on its stdin (measured in
../shared/reference/claude-cli.md §13). That works the same for cold and warm turns, since
both keep stdin open until the turn's result (daemon/claude/backends.py).

:class:`PermissionRelay` answers one turn's requests: it asks the turn's ``on_permission``
handler (the daemon's broker, daemon/turns/permissions.py, or a library caller's own
coroutine) and writes its answer. Whoever asks, the CLI always gets an answer: no handler,
a failing handler or one that never returns all end in a decision, so a paid turn is never
left waiting forever on a question nobody will answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import structlog

log = structlog.get_logger("ksi.claude.permissions")

Decision = Literal["allow", "deny"]

DEFAULT_TIMEOUT_S: Final = 60.0
DEFAULT_DECISION: Final[Decision] = "deny"
# The relay's own safety net past the handler's deadline: the handler (the daemon's broker)
# applies the timeout and its default itself and says so on the bus; this only catches a
# handler that never returns.
HANDLER_GRACE_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class PermissionAsk:
    """One question from the CLI: may it run ``tool_name`` with ``input``?"""

    cli_request_id: str
    tool_name: str
    input: dict[str, Any]
    suggestions: list[dict[str, Any]] = field(default_factory=list)
    """The CLI's ``permission_suggestions``: e.g. ``addRules`` entries, each rule a
    ``{"toolName", "ruleContent"}`` pair it would add for "allow from now on"."""
    tool_use_id: str | None = None
    description: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    """How long the handler may take before ``default`` applies."""
    default: Decision = DEFAULT_DECISION


@dataclass(frozen=True, slots=True)
class PermissionAnswer:
    decision: Decision
    message: str = ""
    """For a deny: what the model is told (it sees it as the tool's error result)."""
    updated_input: dict[str, Any] | None = None
    """For an allow: run the tool with this input instead of the one asked for."""


OnPermission = Callable[[PermissionAsk], Awaitable[PermissionAnswer]]
Write = Callable[[dict[str, Any]], Awaitable[bool]]


def ask_of(
    request_id: str, request: dict[str, Any], *, timeout_s: float, default: Decision
) -> PermissionAsk:
    """The :class:`PermissionAsk` of a ``can_use_tool`` request (its ``request`` object)."""
    tool_input = request.get("input")
    suggestions = request.get("permission_suggestions")
    tool_use_id = request.get("tool_use_id")
    description = request.get("description")
    return PermissionAsk(
        cli_request_id=request_id,
        tool_name=str(request.get("tool_name") or ""),
        input=tool_input if isinstance(tool_input, dict) else {},
        suggestions=[s for s in suggestions if isinstance(s, dict)]
        if isinstance(suggestions, list)
        else [],
        tool_use_id=tool_use_id if isinstance(tool_use_id, str) else None,
        description=description if isinstance(description, str) else None,
        timeout_s=timeout_s,
        default=default,
    )


def answer_line(request_id: str, ask: PermissionAsk, answer: PermissionAnswer) -> dict[str, Any]:
    """The ``control_response`` line that gives the CLI ``answer``."""
    if answer.decision == "allow":
        # The CLI wants the input back on an allow (it runs the tool with what it gets).
        updated = answer.updated_input if answer.updated_input is not None else ask.input
        response: dict[str, Any] = {"behavior": "allow", "updatedInput": updated}
    else:
        response = {"behavior": "deny", "message": answer.message or "permission denied"}
    return {
        "type": "control_response",
        "response": {"subtype": "success", "request_id": request_id, "response": response},
    }


def error_line(request_id: str, message: str) -> dict[str, Any]:
    return {
        "type": "control_response",
        "response": {"subtype": "error", "request_id": request_id, "error": message},
    }


class PermissionRelay:
    """Answers the control requests of one turn (see the module docstring): one task per
    request, so that the turn's stdout keeps being read while a person thinks."""

    def __init__(
        self,
        write: Write,
        on_permission: OnPermission | None,
        *,
        timeout_s: float | None,
        default: Decision | None,
    ) -> None:
        self._write = write
        self._on_permission = on_permission
        self._timeout_s = timeout_s or DEFAULT_TIMEOUT_S
        self._default: Decision = default or DEFAULT_DECISION
        self._tasks: set[asyncio.Task[None]] = set()

    def take(self, obj: dict[str, Any]) -> None:
        """A ``control_request`` line from the CLI."""
        request_id = obj.get("request_id")
        request = obj.get("request")
        if not isinstance(request_id, str) or not isinstance(request, dict):
            log.warning("claude.control_request_malformed", line=str(obj)[:200])
            return
        subtype = request.get("subtype")
        if subtype == "can_use_tool":
            ask = ask_of(request_id, request, timeout_s=self._timeout_s, default=self._default)
            work = self._answer(ask)
        else:
            # Hooks and SDK MCP servers are not ours to serve: say so rather than leave the
            # CLI waiting for an answer that never comes.
            work = self._send(error_line(request_id, f"unsupported control request {subtype!r}"))
        task = asyncio.create_task(work, name=f"ksi-permission-{request_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, ask: PermissionAsk) -> None:
        await self._send(answer_line(ask.cli_request_id, ask, await self._decide(ask)))

    async def _decide(self, ask: PermissionAsk) -> PermissionAnswer:
        if self._on_permission is None:
            return PermissionAnswer(
                ask.default, message="nobody was asked: the turn has no permission handler"
            )
        try:
            async with asyncio.timeout(ask.timeout_s + HANDLER_GRACE_S):
                return await self._on_permission(ask)
        except TimeoutError:
            log.warning("claude.permission_handler_hung", tool=ask.tool_name)
            return PermissionAnswer(ask.default, message="no answer in time")
        except Exception:
            log.exception("claude.permission_handler_failed", tool=ask.tool_name)
            return PermissionAnswer("deny", message="the permission handler failed")

    async def _send(self, line: dict[str, Any]) -> None:
        if not await self._write(line):
            log.info("claude.permission_answer_undelivered", reason="the CLI is gone")

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def aclose(self) -> None:
        """The turn is over: questions still open have nobody left to answer them."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
