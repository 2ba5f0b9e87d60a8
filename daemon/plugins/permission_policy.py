"""Example policy observer: answers relayed permission requests it has a rule for.

Enable with ``--observer daemon.plugins.permission_policy:PermissionPolicy``. On every
PERMISSION_REQUEST (a turn with ``permissions: "relay"`` wants a tool its CLI does not allow
alone) it decides through the command API, as any client would, with RESPOND_PERMISSION:

* read-only tools (Read, Glob, Grep, LS, NotebookRead) are allowed anywhere;
* a Bash command that names an absolute path outside the turn's working directory (other
  than a few harmless system paths) is denied, and the model is told why;
* anything else is left to people: the request stays pending for them (or its timeout).

If a person (or another policy) answered first, RESPOND_PERMISSION says
PERMISSION_ALREADY_DECIDED, and that is fine: the first answer wins.
"""

from __future__ import annotations

import os
import re
import shlex
from typing import Any, ClassVar, Literal

from daemon.events.observers import ObserverAPI

READ_ONLY_TOOLS = frozenset({"Read", "Glob", "Grep", "LS", "NotebookRead"})
# Paths a command may name without leaving its directory in any way that matters.
HARMLESS_PATHS = ("/dev/null", "/dev/stdin", "/dev/stdout", "/dev/stderr")
_ABSOLUTE = re.compile(r"(?:^|[=:])(/[^\s'\";|&<>]*)")


def paths_outside(command: str, cwd: str) -> list[str]:
    """Absolute paths ``command`` names that are outside ``cwd`` (``..`` resolved)."""
    try:
        words = shlex.split(command)
    except ValueError:  # unbalanced quotes: look at the raw text
        words = command.split()
    root = os.path.normpath(cwd)
    outside = []
    for word in words:
        for match in _ABSOLUTE.finditer(word):
            path = os.path.normpath(match.group(1))
            if path == root or path.startswith(root + os.sep):
                continue
            if any(path == h.rstrip("/") or path.startswith(h) for h in HARMLESS_PATHS):
                continue
            outside.append(path)
    return outside


Verdict = tuple[Literal["allow", "deny"], str] | None


def decide(tool_name: str, tool_input: dict[str, Any], cwd: str | None) -> Verdict:
    """The policy: (decision, reason), or None to leave the request to people."""
    if tool_name in READ_ONLY_TOOLS:
        return "allow", f"{tool_name} is read-only"
    if tool_name == "Bash" and cwd:
        command = str(tool_input.get("command") or "")
        outside = paths_outside(command, cwd)
        if outside:
            return "deny", (
                f"policy: Bash may not touch paths outside {cwd} ({', '.join(outside[:3])})"
            )
    return None


class PermissionPolicy:
    event_types: ClassVar[list[str]] = ["PERMISSION_REQUEST"]

    def __init__(self, api: ObserverAPI) -> None:
        self.api = api
        self.decided = {"allow": 0, "deny": 0, "left": 0}

    async def on_event(self, event: dict[str, Any]) -> None:
        data = event["data"]
        verdict = decide(data.get("tool_name", ""), data.get("input") or {}, data.get("cwd"))
        if verdict is None:
            self.decided["left"] += 1
            return
        decision, reason = verdict
        try:
            await self.api.call(
                "RESPOND_PERMISSION",
                {
                    "request_id": data["request_id"],
                    "decision": decision,
                    "message": reason,
                    "by": "permission_policy",
                },
            )
        except Exception as exc:  # already decided by someone faster: their answer stands
            self.api.log.info("permission_policy.not_applied", error=str(exc))
            return
        self.decided[decision] += 1
