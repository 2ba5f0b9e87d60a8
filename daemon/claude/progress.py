"""What a running turn has done so far, as small progress items built from its stream-json lines.

Every turn runs with ``--output-format stream-json`` (cold and warm alike), so the CLI tells
us, line by line, what happens: the ``system/init`` line, assistant text and tool calls, tool
results, API retries, status changes. :class:`ProgressMapper` turns those lines into items
a client can show without knowing the CLI's shapes (the daemon publishes them as
``PROCESS_PROGRESS``; README.md, "Progress"):

======================  ==============================================================
``kind``                fields
======================  ==============================================================
``started``             ``model``, ``tools``, ``cwd``, ``permission_mode``,
                        ``mcp_servers``, ``claude_code_version``
``text``                ``text`` (``delta: true`` for an ``include_partial_messages``
                        piece; then whole text blocks are not repeated)
``tool_use``            ``tool_use_id``, ``name``, ``input``
``tool_result``         ``tool_use_id``, ``is_error``, ``content`` (flattened to text)
``api_retry``           ``attempt``, ``max_retries``, ``delay_s``, ``status``, ``error``
``status``              ``status`` (e.g. ``requesting``; ``api_error`` with ``message``
                        for the CLI's synthetic error message)
======================  ==============================================================

Sizes are bounded so that one event stays small on the bus and on every subscriber's
socket: text longer than :data:`TEXT_CHUNK` is split over several items (nothing of the
answer is lost), a tool's input or result longer than its bound is cut, and the item
says so (``truncated: true`` and ``original_chars``), with a marker at the cut. Items of a
sub-agent's work carry ``parent_tool_use_id``.

The daemon adds one kind of its own to the same stream, ``permission`` (a relayed permission
request asked and settled: ``status``, ``tool_name``, ``request_id``, ``decision``,
``decided_by``; ``daemon/turns/permissions.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Final

import orjson
import structlog

log = structlog.get_logger("ksi.claude")

Progress = dict[str, Any]
OnProgress = Callable[[Progress], None]

TEXT_CHUNK: Final = 16 * 1024  # characters of text per item (longer text: more items)
TOOL_INPUT_CHARS: Final = 8 * 1024  # a tool call's input as JSON text
TOOL_RESULT_CHARS: Final = 8 * 1024  # a tool result's content
MESSAGE_CHARS: Final = 2 * 1024  # error messages and other short strings


def cut(text: str, limit: int) -> tuple[str, bool]:
    """``text`` bounded to ``limit`` characters, with a visible marker where it was cut."""
    if len(text) <= limit:
        return text, False
    return f"{text[:limit]}…[truncated {len(text) - limit} of {len(text)} characters]", True


def _bounded(item: Progress, key: str, text: str, limit: int) -> Progress:
    item[key], truncated = cut(text, limit)
    if truncated:
        item["truncated"] = True
        item["original_chars"] = len(text)
    return item


def _tool_content(content: Any) -> str:
    """A tool_result's content as text: a string, or its text blocks (others named)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return "" if content is None else orjson.dumps(content).decode()
    parts = []
    for block in content:
        if isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        elif isinstance(block, dict):
            parts.append(f"[{block.get('type', 'block')}]")
    return "\n".join(parts)


class ProgressMapper:
    """Turns one turn's stream-json lines into progress items (see the module docstring).

    ``partial``: the turn runs with ``--include-partial-messages``, so text arrives as
    deltas and the whole text blocks that follow them are not repeated.
    """

    def __init__(self, partial: bool = False) -> None:
        self.partial = partial

    def items(self, obj: dict[str, Any]) -> Iterator[Progress]:
        kind = obj.get("type")
        parent = obj.get("parent_tool_use_id")
        if kind == "assistant":
            produced = self._assistant(obj)
        elif kind == "user":
            produced = self._user(obj)
        elif kind == "system":
            produced = self._system(obj)
        elif kind == "stream_event":
            produced = self._stream_event(obj)
        else:  # result, control lines, keep-alives: not progress
            return
        for item in produced:
            if parent:
                item["parent_tool_use_id"] = parent
            yield item

    # -- line kinds ------------------------------------------------------------------------

    def _assistant(self, obj: dict[str, Any]) -> Iterator[Progress]:
        message = obj.get("message")
        if not isinstance(message, dict):
            return
        content = message.get("content")
        if message.get("model") == "<synthetic>":
            # The CLI's own message about a failed API call; the result reports the error.
            text = _tool_content(content)
            yield _bounded(
                {"kind": "status", "status": "api_error"}, "message", text, MESSAGE_CHARS
            )
            return
        for block in content if isinstance(content, list) else []:
            if not isinstance(block, dict):
                continue
            btype = block.get("type")
            if btype == "text" and not self.partial:
                yield from _text(str(block.get("text", "")), delta=False)
            elif btype == "tool_use":
                yield self._tool_use(block)

    @staticmethod
    def _tool_use(block: dict[str, Any]) -> Progress:
        item: Progress = {
            "kind": "tool_use",
            "tool_use_id": block.get("id"),
            "name": block.get("name"),
        }
        tool_input = block.get("input")
        encoded = orjson.dumps(tool_input).decode()
        if len(encoded) <= TOOL_INPUT_CHARS:
            item["input"] = tool_input
            return item
        # Too big to pass on whole: its JSON text, cut (a string, so it cannot pass for
        # the real input).
        return _bounded(item, "input", encoded, TOOL_INPUT_CHARS)

    @staticmethod
    def _user(obj: dict[str, Any]) -> Iterator[Progress]:
        message = obj.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        for block in content if isinstance(content, list) else []:
            if isinstance(block, dict) and block.get("type") == "tool_result":
                item: Progress = {
                    "kind": "tool_result",
                    "tool_use_id": block.get("tool_use_id"),
                    "is_error": bool(block.get("is_error")),
                }
                text = _tool_content(block.get("content"))
                yield _bounded(item, "content", text, TOOL_RESULT_CHARS)

    @staticmethod
    def _system(obj: dict[str, Any]) -> Iterator[Progress]:
        subtype = obj.get("subtype")
        if subtype == "init":
            servers = obj.get("mcp_servers")
            yield {
                "kind": "started",
                "model": obj.get("model"),
                "tools": obj.get("tools"),
                "cwd": obj.get("cwd"),
                "permission_mode": obj.get("permissionMode"),
                "mcp_servers": servers if isinstance(servers, list) else [],
                "claude_code_version": obj.get("claude_code_version"),
            }
        elif subtype == "api_retry":
            delay_ms = obj.get("retry_delay_ms")
            item: Progress = {
                "kind": "api_retry",
                "source": "cli",
                "attempt": obj.get("attempt"),
                "max_retries": obj.get("max_retries"),
                "delay_s": round(delay_ms / 1000, 3) if isinstance(delay_ms, int | float) else None,
                "status": obj.get("error_status"),
            }
            yield _bounded(item, "error", str(obj.get("error") or ""), MESSAGE_CHARS)
        elif subtype == "status":
            yield {"kind": "status", "status": obj.get("status")}

    @staticmethod
    def _stream_event(obj: dict[str, Any]) -> Iterator[Progress]:
        event = obj.get("event")
        if not isinstance(event, dict) or event.get("type") != "content_block_delta":
            return
        delta = event.get("delta")
        if isinstance(delta, dict) and delta.get("type") == "text_delta":
            yield from _text(str(delta.get("text", "")), delta=True)


def _text(text: str, *, delta: bool) -> Iterator[Progress]:
    """One item per :data:`TEXT_CHUNK` characters (at least one, unless empty)."""
    for start in range(0, len(text), TEXT_CHUNK):
        item: Progress = {"kind": "text", "text": text[start : start + TEXT_CHUNK]}
        if delta:
            item["delta"] = True
        yield item


def notify(on_progress: OnProgress | None, mapper: ProgressMapper, obj: dict[str, Any]) -> None:
    """Hand ``obj``'s progress items to ``on_progress``; a failing listener is logged, and
    never breaks the paid turn it listens to."""
    if on_progress is None:
        return
    try:
        for item in mapper.items(obj):
            on_progress(item)
    except Exception:
        log.exception("claude.on_progress_failed", line_type=obj.get("type"))
