"""Per-session bearer tokens of the KSI MCP face, and the ``--mcp-config`` files holding them."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from pathlib import Path

import orjson

from daemon.fsmodes import private_dir

SERVER_NAME = "ksi"  # the model sees the tools as mcp__ksi__<tool>
ALLOW_RULE = f"mcp__{SERVER_NAME}"  # --allowedTools: all of the server's tools, unasked


def _digest(token: str) -> bytes:
    # Looked up by digest: a dict lookup compares bytes of what it finds, and those must
    # not be the token's own (a timing side channel on a loopback port).
    return hashlib.sha256(token.encode()).digest()


class Tokens:
    """One token per session that used the face in this run of the daemon."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._by_digest: dict[bytes, str] = {}  # sha256(token) -> session id
        self._paths: dict[str, Path] = {}  # session id -> its config file

    def config_for(self, session_id: str, url: str) -> Path:
        """The session's ``--mcp-config`` file (written, mode 0600, on first use): the
        server's URL and the session's token. The path is the same for all of a session's
        turns, so a warm CLI's flags do not change from one turn to the next."""
        path = self._paths.get(session_id)
        if path is not None:
            return path
        if not self._paths:
            self._reset_directory()
        token = secrets.token_urlsafe(32)
        config = {
            "mcpServers": {
                SERVER_NAME: {
                    "type": "http",
                    "url": url,
                    "headers": {"Authorization": f"Bearer {token}"},
                }
            }
        }
        path = self.directory / f"{session_id}.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps(config))
        self._by_digest[_digest(token)] = session_id
        self._paths[session_id] = path
        return path

    def session_of(self, authorization: str | None) -> str | None:
        """The session whose token an ``Authorization: Bearer ...`` header carries."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        return self._by_digest.get(_digest(authorization.removeprefix("Bearer ").strip()))

    def revoke_all(self) -> None:
        """Forget every token and remove their files (the daemon stops serving the face)."""
        self._by_digest.clear()
        self._paths.clear()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _reset_directory(self) -> None:
        # Files of an earlier run hold tokens nobody accepts any more: start empty.
        shutil.rmtree(self.directory, ignore_errors=True)
        private_dir(self.directory, lambda name: name.endswith(".json"))
