"""Build the argv of one ``claude -p`` run.

The prompt is never part of argv: it goes to stdin. That keeps megabyte
prompts under ARG_MAX and stops a prompt starting with ``--`` from being read
as a flag. Values we do not control (model names, system prompt text, tool
patterns) use the ``--flag=value`` form when they start with ``-`` so the
CLI's option parser cannot mistake them for flags either.
"""

from __future__ import annotations

from daemon.claude.options import ClaudeOptions

# Every turn, cold or warm, speaks stream-json both ways (daemon/claude/backends.py); the
# CLI refuses stream-json output in print mode without --verbose.
_STREAM_JSON = [
    "-p",
    "--input-format",
    "stream-json",
    "--output-format",
    "stream-json",
    "--verbose",
]


def _opt(flag: str, value: str) -> list[str]:
    if value.startswith("-"):
        return [f"{flag}={value}"]
    return [flag, value]


def build_argv(
    claude_bin: str,
    *,
    model: str | None,
    opts: ClaudeOptions,
    session_id: str,
    resume: bool,
) -> list[str]:
    """Return the full argv (binary first) for a print-mode CLI that reads its turns as
    JSON lines on stdin and answers in stream-json.

    ``resume`` selects ``--resume <id>`` (later turns) over ``--session-id
    <id>`` (first turn; the id is then known even if the run dies).
    """
    argv = [claude_bin, *_STREAM_JSON]
    if opts.include_partial_messages:
        argv.append("--include-partial-messages")
    if model:
        argv += _opt("--model", model)
    argv += ["--resume" if resume else "--session-id", session_id]
    if not opts.enable_tools:
        argv += ["--tools", ""]
    elif opts.tools is not None:
        argv += ["--tools", ",".join(opts.tools)]
    if opts.allowed_tools:
        argv += _opt("--allowedTools", ",".join(opts.allowed_tools))
    if opts.disallowed_tools:
        argv += _opt("--disallowedTools", ",".join(opts.disallowed_tools))
    if opts.max_turns is not None:
        argv += ["--max-turns", str(opts.max_turns)]
    if opts.append_system_prompt:
        argv += _opt("--append-system-prompt", opts.append_system_prompt)
    if opts.permission_mode is not None:
        argv += ["--permission-mode", opts.permission_mode]
    if opts.max_cost_usd is not None:
        argv += ["--max-budget-usd", str(opts.max_cost_usd)]
    if opts.mcp_config:
        argv += _opt("--mcp-config", opts.mcp_config)
    if opts.permissions == "relay":
        # The CLI asks us (a control request on stdout) instead of deciding alone.
        argv += ["--permission-prompt-tool", "stdio"]
    return argv
