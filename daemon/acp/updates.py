"""A turn's progress (PROCESS_PROGRESS items, ``daemon/claude/progress.py``) as ACP
``session/update`` notifications, and how a Claude Code tool call looks in an editor.

An editor shows a tool call by its ``title`` and ``kind`` (an icon, and whether it reads,
edits or runs something) and links its ``locations`` (files). Claude Code's built-in tools
have well-known inputs, so each gets a title a person can read at a glance ("Read
src/app.py", "`pytest -q`"); any other tool (an MCP server's ``mcp__<server>__<tool>``)
shows its name.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

from acp import start_tool_call, update_agent_message_text, update_tool_call
from acp.schema import (
    AgentMessageChunk,
    ContentToolCallContent,
    Cost,
    TextContentBlock,
    ToolCallLocation,
    ToolCallProgress,
    ToolCallStart,
    ToolKind,
    Usage,
    UsageUpdate,
)

Update = AgentMessageChunk | ToolCallStart | ToolCallProgress

KINDS: Final[dict[str, ToolKind]] = {
    "Read": "read",
    "NotebookRead": "read",
    "Edit": "edit",
    "MultiEdit": "edit",
    "Write": "edit",
    "NotebookEdit": "edit",
    "Bash": "execute",
    "BashOutput": "execute",
    "KillShell": "execute",
    "Grep": "search",
    "Glob": "search",
    "LS": "search",
    "WebFetch": "fetch",
    "WebSearch": "fetch",
    "Task": "think",
    "Agent": "think",
    "TodoWrite": "think",
    "ExitPlanMode": "switch_mode",
}
TITLE_CHARS: Final = 200  # a title is one line in the editor's UI
CONTEXT_WINDOW: Final = 200_000  # when the CLI's result does not say


def tool_kind(name: str) -> ToolKind:
    return KINDS.get(name, "other")


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1] + "…"


def tool_title(name: str, tool_input: Any) -> str:
    """What the call does, in a line: the file, command, pattern or URL it is about."""
    args = tool_input if isinstance(tool_input, dict) else {}

    def arg(*keys: str) -> str | None:
        for key in keys:
            value = args.get(key)
            if isinstance(value, str) and value:
                return value
        return None

    if name == "Bash" and (command := arg("command")):
        return _one_line(f"`{command}`")
    if name in ("Read", "NotebookRead") and (path := arg("file_path", "notebook_path")):
        return _one_line(f"Read {path}")
    if name in ("Edit", "MultiEdit", "NotebookEdit") and (
        path := arg("file_path", "notebook_path")
    ):
        return _one_line(f"Edit {path}")
    if name == "Write" and (path := arg("file_path")):
        return _one_line(f"Write {path}")
    if name == "Grep" and (pattern := arg("pattern")):
        where = arg("path")
        return _one_line(f"grep {pattern!r}" + (f" in {where}" if where else ""))
    if name == "Glob" and (pattern := arg("pattern")):
        return _one_line(f"Find {pattern}")
    if name == "WebFetch" and (url := arg("url")):
        return _one_line(f"Fetch {url}")
    if name == "WebSearch" and (query := arg("query")):
        return _one_line(f"Search {query!r}")
    if name in ("Task", "Agent") and (what := arg("description")):
        return _one_line(f"Task: {what}")
    return name


def tool_locations(tool_input: Any) -> list[ToolCallLocation] | None:
    if not isinstance(tool_input, dict):
        return None
    path = tool_input.get("file_path") or tool_input.get("notebook_path")
    return [ToolCallLocation(path=path)] if isinstance(path, str) and path else None


def _text_content(text: str) -> list[ContentToolCallContent]:
    block = TextContentBlock(type="text", text=text)
    return [ContentToolCallContent(type="content", content=block)]


def updates_for(item: dict[str, Any]) -> Iterator[Update]:
    """The ACP updates of one progress item (none for the kinds an editor has no place
    for: ``started``, ``status``, ``api_retry``; ``permission`` is asked separately, as
    ``session/request_permission``)."""
    kind = item.get("kind")
    if kind == "text":
        text = item.get("text")
        if isinstance(text, str) and text:
            yield update_agent_message_text(text)
    elif kind == "tool_use":
        name = str(item.get("name") or "tool")
        tool_input = item.get("input")
        yield start_tool_call(
            str(item.get("tool_use_id")),
            tool_title(name, tool_input),
            kind=tool_kind(name),
            status="in_progress",
            locations=tool_locations(tool_input),
            raw_input=tool_input,
        )
    elif kind == "tool_result":
        content = str(item.get("content") or "")
        failed = bool(item.get("is_error"))
        yield update_tool_call(
            str(item.get("tool_use_id")),
            status="failed" if failed else "completed",
            content=_text_content(content) if content else None,
            raw_output=content,
        )


def _tokens(usage: dict[str, Any], key: str) -> int:
    value = usage.get(key)
    return value if isinstance(value, int) and value >= 0 else 0


def prompt_usage(usage: dict[str, Any] | None) -> Usage | None:
    """A turn's token counts (the CLI's ``usage``) as PromptResponse.usage."""
    if not usage:
        return None
    inputs = _tokens(usage, "input_tokens")
    outputs = _tokens(usage, "output_tokens")
    read = _tokens(usage, "cache_read_input_tokens")
    write = _tokens(usage, "cache_creation_input_tokens")
    return Usage(
        total_tokens=inputs + outputs + read + write,
        input_tokens=inputs,
        output_tokens=outputs,
        cached_read_tokens=read,
        cached_write_tokens=write,
    )


def usage_update(result: dict[str, Any], session_cost_usd: float | None) -> UsageUpdate:
    """The context a session has used after a turn, and what the session has cost so far."""
    usage = result.get("usage") or {}
    used = sum(
        _tokens(usage, key)
        for key in (
            "input_tokens",
            "cache_read_input_tokens",
            "cache_creation_input_tokens",
            "output_tokens",
        )
    )
    models = (result.get("raw") or {}).get("modelUsage")
    windows: list[int] = []
    for model in models.values() if isinstance(models, dict) else []:
        window = model.get("contextWindow") if isinstance(model, dict) else None
        if isinstance(window, int) and window > 0:
            windows.append(window)
    size = max(windows, default=CONTEXT_WINDOW)
    cost = None
    if session_cost_usd is not None:
        cost = Cost(amount=round(session_cost_usd, 6), currency="USD")
    return UsageUpdate(session_update="usage_update", used=used, size=size, cost=cost)
