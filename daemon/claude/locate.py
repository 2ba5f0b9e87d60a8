"""Find the Claude Code CLI and ask it for its version.

Precedence: an explicitly configured value (``--claude-bin`` / env; a path or a
name looked up on PATH), then ``claude`` on PATH, then the copy pinned by this
project's ``package.json`` (``npm ci`` puts it at ``node_modules/.bin/claude``).
An explicit value that does not resolve yields ``None`` rather than silently
falling back to a different binary.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from daemon.claude.runner import OutputLimitError, run_process

_VERSION = re.compile(r"\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.-]+)?")


def _executable(path: Path) -> Path | None:
    if path.is_file() and os.access(path, os.X_OK):
        return Path(os.path.abspath(path))
    return None


def locate_claude(configured: str | None, project_root: Path) -> Path | None:
    """Return an absolute path to an executable ``claude``, or None."""
    if configured:
        value = os.path.expanduser(configured)
        if os.sep in value:
            return _executable(Path(value))
        found = shutil.which(value)
        return Path(os.path.abspath(found)) if found else None
    found = shutil.which("claude")
    if found:
        return Path(os.path.abspath(found))
    return _executable(project_root / "node_modules" / ".bin" / "claude")


async def claude_version(path: Path | str, *, timeout_s: float = 10.0) -> str | None:
    """Run ``<path> --version`` and return e.g. ``"2.1.197"``; None if that fails."""
    try:
        result = await run_process(
            [str(path), "--version"],
            stdin_data=b"",
            cwd=None,
            env=None,
            timeout_s=timeout_s,
            term_grace_s=1.0,
            max_stdout_bytes=1024 * 1024,
        )
    except (OSError, OutputLimitError):
        return None
    if result.returncode != 0 or result.timed_out:
        return None
    match = _VERSION.search(result.stdout.decode("utf-8", "replace"))
    return match.group(0) if match else None
