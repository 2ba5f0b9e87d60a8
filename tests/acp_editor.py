"""The editor's side of ACP for tests: the SDK's client connection to ``python -m daemon.acp``
(``acp.spawn_agent_process``, as editors start agent servers) and an :class:`Editor` that
keeps every update and answers permission requests as a test tells it."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import acp
from acp.schema import (
    AgentMessageChunk,
    AllowedOutcome,
    DeniedOutcome,
    PermissionOption,
    RequestPermissionResponse,
    TextContentBlock,
    ToolCallUpdate,
)

from tests.helpers import DaemonProcess

ROOT = Path(__file__).resolve().parents[1]


class Editor:
    """The editor's side: keeps every update, answers permission requests as told."""

    def __init__(self, choice: str | None = "allow") -> None:
        self.updates: list[tuple[str, Any]] = []
        self.asked: list[tuple[ToolCallUpdate, list[PermissionOption]]] = []
        self.choice = choice  # an option id, or None: the editor withdraws (cancelled)
        self.got_update = asyncio.Event()

    async def session_update(self, session_id: str, update: Any, **kwargs: Any) -> None:
        self.updates.append((session_id, update))
        self.got_update.set()

    async def request_permission(
        self, session_id: str, tool_call: ToolCallUpdate, options: list[PermissionOption], **kw: Any
    ) -> RequestPermissionResponse:
        self.asked.append((tool_call, options))
        if self.choice is None:
            return RequestPermissionResponse(outcome=DeniedOutcome(outcome="cancelled"))
        return RequestPermissionResponse(
            outcome=AllowedOutcome(outcome="selected", option_id=self.choice)
        )

    def on_connect(self, conn: Any) -> None:
        pass

    def of(self, kind: type[Any], session_id: str | None = None) -> list[Any]:
        return [u for s, u in self.updates if isinstance(u, kind) and session_id in (None, s)]

    def text(self, session_id: str) -> str:
        chunks = self.of(AgentMessageChunk, session_id)
        return "".join(c.content.text for c in chunks if isinstance(c.content, TextContentBlock))


@contextlib.asynccontextmanager
async def face(
    d: DaemonProcess | Path,
    editor: Editor,
    log: Path,
    *args: str,
    env: dict[str, str] | None = None,
) -> AsyncIterator[tuple[acp.ClientSideConnection, asyncio.subprocess.Process]]:
    """``python -m daemon.acp --socket <d's socket> ARGS`` for ``editor``, initialized; its
    stderr goes to ``log``."""
    socket = d if isinstance(d, Path) else d.socket
    async with connect(socket, editor, log, *args, env=env) as (conn, proc):
        init = await asyncio.wait_for(conn.initialize(protocol_version=acp.PROTOCOL_VERSION), 60)
        caps = init.agent_capabilities
        assert caps is not None
        assert caps.load_session
        yield conn, proc


@contextlib.asynccontextmanager
async def connect(
    socket: Path, editor: Editor, log: Path, *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[acp.ClientSideConnection, asyncio.subprocess.Process]]:
    """The face's process and the SDK's connection to it, not yet initialized."""
    with log.open("ab") as err:
        async with acp.spawn_agent_process(
            # An editor without file-system or terminal capabilities (it advertises none),
            # so the face calls only these two of the Client protocol's methods.
            cast(acp.Client, editor),
            sys.executable,
            "-m",
            "daemon.acp",
            "--socket",
            str(socket),
            *args,
            cwd=ROOT,
            env={"PYTHONPATH": str(ROOT), **(env or {})},
            transport_kwargs={"stderr": err.fileno()},
        ) as (conn, proc):
            yield conn, proc


def prompt(text: str) -> list[TextContentBlock]:
    return [acp.text_block(text)]
