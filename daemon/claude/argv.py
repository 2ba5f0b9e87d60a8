"""Build the argv of one ``claude -p`` run.

The prompt is never part of argv: it goes to stdin. That keeps megabyte
prompts under ARG_MAX and stops a prompt starting with ``--`` from being read
as a flag. Values we do not control (model names, system prompt text, tool
patterns) use the ``--flag=value`` form when they start with ``-`` so the
CLI's option parser cannot mistake them for flags either.
"""

from __future__ import annotations

from typing import Literal

from daemon.claude.options import ClaudeOptions

OutputFormat = Literal["json", "stream-json"]


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
    output_format: OutputFormat,
    stream_input: bool = False,
) -> list[str]:
    """Return the full argv (binary first) for one print-mode turn.

    ``resume`` selects ``--resume <id>`` (later turns) over ``--session-id
    <id>`` (first turn; the id is then known even if the run dies).
    ``stream_input`` adds ``--input-format stream-json``: the long-lived warm
    mode, where each turn arrives as one JSON line on stdin (needs
    ``output_format="stream-json"``).
    """
    argv = [claude_bin, "-p"]
    if stream_input:
        argv += ["--input-format", "stream-json"]
    argv += ["--output-format", output_format]
    if output_format == "stream-json":
        # The CLI refuses stream-json in print mode without --verbose.
        argv.append("--verbose")
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
    return argv
