"""MCP servers a caller gives a turn (``mcp_servers``: SPAWN's parameter, the provider's
``claude={...}``; the ACP face passes an editor's), handed to the CLI in a ``--mcp-config`` file.

The shapes are the CLI's own ``mcpServers`` entries (``docs``: Claude Code MCP): a local
server the CLI starts (``command``, ``args``, ``env``) or one it reaches over HTTP or SSE
(``url``, ``headers``). They go into a file, not argv: an editor's server ``env`` and
``headers`` often hold API keys, and every local user can read another process's argv. The
file is 0600 in a 0700 directory and named by the digest of its content, so a session
whose servers do not change keeps one path, and its warm CLI keeps its flags from one turn
to the next (a change of servers restarts it, as any change of flags does).

A turn that also has the KSI MCP tools (``mcp_config`` already names the face's file) gets
one file with both: the face's ``ksi`` entry and the caller's, so ``ksi`` is a reserved name.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from daemon.fsmodes import private_dir

RESERVED = "ksi"  # the daemon's own server (daemon/mcp_face): mcp__ksi__<tool>
MAX_SERVERS = 32
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class StdioServer(BaseModel):
    """A server the CLI starts as a child process and speaks to over its stdio."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["stdio"] = "stdio"
    command: str = Field(min_length=1)
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)


class RemoteServer(BaseModel):
    """A running server the CLI reaches over streamable HTTP (``http``) or SSE (``sse``)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["http", "sse"]
    url: str = Field(pattern=r"^https?://")
    headers: dict[str, str] = Field(default_factory=dict)


McpServer = StdioServer | RemoteServer
McpServers = Annotated[dict[str, McpServer], Field(max_length=MAX_SERVERS)]


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\0" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def check_names(servers: dict[str, McpServer] | None) -> dict[str, McpServer] | None:
    """The validator of ``mcp_servers``' names (and of NUL, which exec cannot pass)."""
    for name, server in (servers or {}).items():
        if not _NAME.match(name):
            raise ValueError(f"server name {name!r}: letters, digits, '_' and '-' (1-64)")
        if name == RESERVED:
            raise ValueError(f"server name {RESERVED!r} is the daemon's own (the KSI MCP tools)")
        if _has_nul(server.model_dump()):
            raise ValueError(f"server {name!r}: must not contain a NUL character")
    return servers


mcp_servers_validator = field_validator("mcp_servers")(check_names)


def _servers_of(config: str) -> dict[str, Any]:
    """The ``mcpServers`` of a ``--mcp-config`` value: inline JSON, or a file's."""
    raw = config.encode() if config.lstrip().startswith("{") else Path(config).read_bytes()
    servers = orjson.loads(raw).get("mcpServers")
    return servers if isinstance(servers, dict) else {}


class McpConfigFiles:
    """Writes the ``--mcp-config`` files of turns with ``mcp_servers`` (see the module
    docstring). ``directory``: where (the daemon's is in its state directory, emptied at
    first use, since files of an earlier run may hold secrets); default: a new private
    temporary directory of this process."""

    def __init__(self, directory: Path | None = None) -> None:
        self._given = directory
        self._directory: Path | None = None

    @property
    def directory(self) -> Path:
        if self._directory is None:
            if self._given is None:
                self._directory = Path(tempfile.mkdtemp(prefix="ksi-mcp-"))
            else:
                shutil.rmtree(self._given, ignore_errors=True)
                private_dir(self._given, lambda name: name.endswith(".json"))
                self._directory = self._given
        return self._directory

    def config_for(self, servers: dict[str, McpServer], base: str | None) -> str:
        """The path of a file naming ``servers`` plus those of ``base`` (a ``--mcp-config``
        value, e.g. the KSI face's file); ``base`` itself if it is already such a file."""
        if base is not None and Path(base).parent == self.directory:
            return base  # resolved before (a turn planned first, then run)
        # Empty args/env/headers left out; type always written (explicit beats a default).
        merged: dict[str, Any] = {
            name: {**server.model_dump(exclude_defaults=True), "type": server.type}
            for name, server in servers.items()
        }
        if base is not None:
            merged.update(_servers_of(base))
        data = orjson.dumps({"mcpServers": merged}, option=orjson.OPT_SORT_KEYS)
        path = self.directory / f"{hashlib.sha256(data).hexdigest()[:32]}.json"
        if not path.exists():
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # a CLI starting now never reads half a file
        return str(path)
