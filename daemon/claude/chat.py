"""Translate between OpenAI-style chat calls and Claude CLI turns (no LiteLLM here).

Used by ``claude_cli_provider.py``; kept apart so the daemon can reuse it and
test it without importing LiteLLM. Invalid input raises ``ValueError``
(``pydantic.ValidationError`` is one), which the provider reports as 400.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from daemon.claude.options import ClaudeOptions
from daemon.claude.results import TurnResult


def _field(item: Any, name: str) -> Any:
    if isinstance(item, Mapping):
        return item.get(name)
    return getattr(item, name, None)


def message_text(content: Any) -> str:
    """Text of a message's content: a string, or a list of ``{"type": "text"}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            kind = _field(part, "type")
            if kind != "text":
                raise ValueError(f"only text content is supported, got a {kind!r} part")
            parts.append(str(_field(part, "text") or ""))
        return "\n".join(parts)
    raise ValueError(f"unsupported message content of type {type(content).__name__}")


def prompt_from_messages(messages: Sequence[Any]) -> tuple[str, str | None]:
    """Return (the last user message's text, all system/developer text joined or None).

    Earlier turns are deliberately not replayed: the CLI keeps the conversation
    itself and continues it with ``--resume``.
    """
    prompt = ""
    for message in reversed(messages):
        if _field(message, "role") == "user":
            prompt = message_text(_field(message, "content"))
            break
    if not prompt.strip():
        raise ValueError("the messages contain no non-empty user message")
    system = [
        message_text(_field(m, "content"))
        for m in messages
        if _field(m, "role") in ("system", "developer")
    ]
    joined = "\n\n".join(text for text in system if text.strip())
    return prompt, joined or None


def options_from_kwarg(raw: Any, system: str | None) -> ClaudeOptions:
    """Validate the ``claude={...}`` kwarg; system text fills ``append_system_prompt`` if unset."""
    if raw is None:
        raw = {}
    if isinstance(raw, ClaudeOptions):
        if system and raw.append_system_prompt is None:
            return raw.model_copy(update={"append_system_prompt": system})
        return raw
    if not isinstance(raw, Mapping):
        raise ValueError(f"claude= must be a dict, got {type(raw).__name__}")
    data = dict(raw)
    if system and data.get("append_system_prompt") is None:
        data["append_system_prompt"] = system
    return ClaudeOptions.model_validate(data)


def cli_model(model: str) -> str | None:
    """``claude-cli/default`` (or no name) means: let the CLI pick its default model."""
    return None if model in ("", "default") else model


def usage_numbers(usage: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """(prompt, completion, cache_read, cache_creation) tokens.

    OpenAI's prompt_tokens counts every input token, so it includes both cache
    kinds, which Anthropic reports separately from ``input_tokens``.
    """
    cache_read = int(usage.get("cache_read_input_tokens") or 0)
    cache_creation = int(usage.get("cache_creation_input_tokens") or 0)
    prompt = int(usage.get("input_tokens") or 0) + cache_read + cache_creation
    return prompt, int(usage.get("output_tokens") or 0), cache_read, cache_creation


def provider_fields(turn: TurnResult, internals: bool = True) -> dict[str, Any]:
    """What a response carries about the turn beyond its text; ``internals`` adds
    ``claude_result`` (the CLI's JSON, pid, stderr tail: for the operator, not for the
    clients of a proxy)."""
    fields: dict[str, Any] = {
        "claude_session_id": turn.session_id,
        "claude_cost_usd": turn.cost_usd,
    }
    if internals:
        fields["claude_result"] = turn.to_dict()
    return fields


def event_text(event: Mapping[str, Any], partial: bool) -> str:
    """User-visible text in one stream-json line of the top-level agent.

    ``partial``: text comes from ``stream_event`` deltas and the complete
    ``assistant`` lines are skipped (they repeat the deltas).
    """
    if event.get("parent_tool_use_id"):
        return ""  # a sub-agent's messages, not the answer
    if partial:
        inner = event.get("event") if event.get("type") == "stream_event" else None
        if isinstance(inner, Mapping) and inner.get("type") == "content_block_delta":
            delta = inner.get("delta")
            if isinstance(delta, Mapping) and delta.get("type") == "text_delta":
                return str(delta.get("text") or "")
        return ""
    message = event.get("message") if event.get("type") == "assistant" else None
    if not isinstance(message, Mapping) or message.get("model") == "<synthetic>":
        return ""  # "<synthetic>" lines carry API error text; that becomes an exception
    content = message.get("content")
    if not isinstance(content, list):
        return ""
    return "".join(
        str(block.get("text") or "")
        for block in content
        if isinstance(block, Mapping) and block.get("type") == "text"
    )
