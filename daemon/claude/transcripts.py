"""The CLI's own transcript of a session, and rewinding it after a failed attempt."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9]")


class Transcripts:
    """Where the CLI keeps sessions (``$CLAUDE_CONFIG_DIR/projects``, else ``~/.claude``)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        # Computed once: every turn attempt asks for it.
        config = env.get("CLAUDE_CONFIG_DIR") or os.path.join(
            env.get("HOME") or os.path.expanduser("~"), ".claude"
        )
        self._projects_dir = Path(config) / "projects"

    def path(self, session_id: str, cwd: str) -> Path:
        """Where the CLI keeps a session's transcript: ``projects/<cwd slug>/<id>.jsonl``.
        The slug is the cwd with every character but ASCII letters and digits made "-"
        (measured with 2.1.197: "/tmp/a_b c@d.e" -> "-tmp-a-b-c-d-e")."""
        return self._projects_dir / _SLUG_UNSAFE.sub("-", cwd) / f"{session_id}.jsonl"

    def mark(self, session_id: str, cwd: str) -> int | None:
        """The transcript's length now (None: it does not exist yet), for :meth:`rewind`."""
        try:
            return self.path(session_id, cwd).stat().st_size
        except OSError:
            return None

    def rewind(self, session_id: str, cwd: str, mark: int | None, *, new_session: bool) -> bool:
        """Undo what a failed attempt added to a session, so that a retry of the same prompt
        reaches the model once: the CLI stores a prompt before calling the API and replays
        it on the next resume (measured), which would send it twice.

        Returns False if the transcript could not be found where it was expected, so a retry
        would not be safe.
        """
        path = self.path(session_id, cwd)
        if mark is not None:
            try:
                os.truncate(path, mark)
            except FileNotFoundError:
                return False  # it existed before the attempt: something else removed it
            return True
        if path.exists():  # made by the failed attempt
            path.unlink()
            return True
        if not new_session:
            return False  # the CLI keeps it elsewhere: how long it was before is unknown
        # A new session's file did not exist before the attempt, wherever the CLI put it.
        for found in self._projects_dir.glob(f"*/{session_id}.jsonl"):
            found.unlink()
        return True
