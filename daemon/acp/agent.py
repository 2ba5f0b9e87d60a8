"""The ACP agent: an editor's ACP requests as commands on the daemon's socket.

One :class:`DaemonAgent` serves one editor (one ``python -m daemon.acp`` process) over one
daemon connection. That connection carries every prompt as a sync ``SPAWN`` with ``stream:
true`` (its PROCESS_PROGRESS events become ``session/update`` notifications as they arrive)
and a subscription to the permission events, so each relayed request of one of this
editor's sessions becomes a ``session/request_permission`` to the editor.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import structlog
from acp import (
    PROTOCOL_VERSION,
    Client,
    InitializeResponse,
    LoadSessionResponse,
    NewSessionResponse,
    PromptResponse,
    RequestError,
    update_agent_message_text,
    update_user_message_text,
)
from acp.schema import (
    AcpMcpServer,
    AgentCapabilities,
    AllowedOutcome,
    AudioContentBlock,
    ClientCapabilities,
    EmbeddedResourceContentBlock,
    ForkSessionResponse,
    HttpMcpServer,
    ImageContentBlock,
    Implementation,
    ListSessionsResponse,
    McpCapabilities,
    McpServerStdio,
    PermissionOption,
    PromptCapabilities,
    ResourceContentBlock,
    ResumeSessionResponse,
    SessionCapabilities,
    SessionInfo,
    SessionListCapabilities,
    SessionResumeCapabilities,
    SseMcpServer,
    StopReason,
    TextContentBlock,
    TextResourceContents,
    ToolCallUpdate,
)

from daemon.acp.updates import (
    prompt_usage,
    tool_kind,
    tool_locations,
    tool_title,
    updates_for,
    usage_update,
)
from daemon.client import AsyncClient, CommandError

log = structlog.get_logger("ksi.acp")

ContentBlock = (
    TextContentBlock
    | ImageContentBlock
    | AudioContentBlock
    | ResourceContentBlock
    | EmbeddedResourceContentBlock
)
McpServer = HttpMcpServer | SseMcpServer | AcpMcpServer | McpServerStdio

PERMISSION_EVENTS: Final = ["PERMISSION_REQUEST", "PERMISSION_DECIDED", "PERMISSION_TIMEOUT"]
# The editor's choices for a relayed request, and what each tells the daemon.
PERMISSION_OPTIONS: Final = [
    PermissionOption(option_id="allow", name="Allow once", kind="allow_once"),
    PermissionOption(option_id="allow_always", name="Allow for this session", kind="allow_always"),
    PermissionOption(option_id="reject", name="Reject", kind="reject_once"),
]
# A turn's error code that is a stop reason in ACP, not a failure of the request.
STOP_REASONS: Final[dict[str, StopReason]] = {
    "CANCELLED": "cancelled",
    "MAX_TURNS": "max_turn_requests",
}


@dataclass
class _Prompt:
    """The prompt running in a session: its turn's process id once the daemon said it."""

    process_id: str | None = None
    cancelled: bool = False
    cancel_sent: bool = False


@dataclass
class _Session:
    cwd: str
    mcp_servers: dict[str, Any] = field(default_factory=dict)
    fresh: bool = True  # no turn has run yet: the first SPAWN names it (new_session_id)
    cost_usd: float = 0.0
    running: _Prompt | None = None
    asks: dict[str, asyncio.Task[None]] = field(default_factory=dict)  # request_id -> ask


def daemon_mcp_servers(servers: list[McpServer] | None) -> dict[str, Any]:
    """An editor's MCP servers (ACP's list) as SPAWN's ``mcp_servers`` (the CLI's shape)."""
    out: dict[str, Any] = {}
    for server in servers or []:
        if isinstance(server, McpServerStdio):
            out[server.name] = {
                "command": server.command,
                "args": list(server.args),
                "env": {v.name: v.value for v in server.env},
            }
        elif isinstance(server, HttpMcpServer | SseMcpServer):
            out[server.name] = {
                "type": server.type,
                "url": server.url,
                "headers": {h.name: h.value for h in server.headers},
            }
        else:  # an "acp" server runs inside the editor: the CLI cannot reach it
            raise RequestError.invalid_params(
                {"mcpServers": f"{server.name}: only stdio, http and sse servers are supported"}
            )
    return out


def prompt_text(blocks: list[ContentBlock]) -> str:
    """The prompt the CLI gets: its text, with files the editor attached inline."""
    parts = []
    for block in blocks:
        if isinstance(block, TextContentBlock):
            parts.append(block.text)
        elif isinstance(block, ResourceContentBlock):
            parts.append(f"[{block.name}]({block.uri})")
        elif isinstance(block, EmbeddedResourceContentBlock):
            res = block.resource
            if isinstance(res, TextResourceContents):
                parts.append(f'<file uri="{res.uri}">\n{res.text}\n</file>')
            else:
                parts.append(f"[attachment]({res.uri})")
        # images and audio: not advertised in the prompt capabilities, so none come
    return "\n\n".join(p for p in parts if p)


def _seconds_until(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() - time.time()


def _usable_dir(path: str) -> bool:
    # A stat of a local path (~µs): not worth a thread.
    return os.path.isabs(path) and os.path.isdir(path)


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


class DaemonAgent:
    """An ACP agent whose sessions are daemon sessions (see the package docstring)."""

    def __init__(self, socket: Path, *, agent_id: str | None = None) -> None:
        self.socket = socket
        self.agent_id = agent_id
        self._editor: Client | None = None
        self._daemon: AsyncClient | None = None
        self._connecting: asyncio.Lock = asyncio.Lock()
        self._events: asyncio.Task[None] | None = None
        self._sessions: dict[str, _Session] = {}
        self._ksi_tools = False
        self._by = "acp"  # who decided a permission request, for the daemon's record

    # -- the daemon connection ------------------------------------------------------------

    async def daemon(self) -> AsyncClient:
        async with self._connecting:
            if self._daemon is None or self._daemon.closed:
                try:
                    client = await AsyncClient.open(self.socket, agent_id=self.agent_id)
                except (OSError, CommandError) as exc:
                    raise RequestError.internal_error(
                        {"daemon": f"no daemon answers on {self.socket}: {exc}"}
                    ) from None
                health = await client.call("HEALTH_CHECK")
                mcp = health.get("mcp") if isinstance(health, dict) else None
                self._ksi_tools = isinstance(mcp, dict) and mcp.get("status") not in (
                    None,
                    "disabled",
                )
                await client.subscribe(PERMISSION_EVENTS)
                self._daemon = client
                self._events = asyncio.create_task(self._pump(client))
        return self._daemon

    async def _call(self, command: str, params: dict[str, Any] | None = None) -> Any:
        try:
            return await (await self.daemon()).call(command, params)
        except CommandError as exc:
            raise _request_error(exc) from None

    async def _pump(self, client: AsyncClient) -> None:
        async for event in client.events():
            data = event.get("data") or {}
            session = self._sessions.get(str(data.get("session_id")))
            if session is None:
                continue  # another client's session
            request_id = str(data.get("request_id"))
            if event.get("event") == "PERMISSION_REQUEST":
                task = asyncio.create_task(self._ask(str(data["session_id"]), session, data))
                session.asks[request_id] = task
                task.add_done_callback(functools.partial(_forget, session.asks, request_id))
            else:  # decided: by this editor, another client, an observer, or the timeout
                ask = session.asks.get(request_id)
                if ask is not None:
                    ask.cancel()

    async def aclose(self) -> None:
        if self._events is not None:
            self._events.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._events
        if self._daemon is not None:
            await self._daemon.close()

    # -- ACP: connection ------------------------------------------------------------------

    def on_connect(self, conn: Client) -> None:
        self._editor = conn

    @property
    def editor(self) -> Client:
        assert self._editor is not None, "on_connect comes first"
        return self._editor

    async def initialize(
        self,
        protocol_version: int,
        client_capabilities: ClientCapabilities | None = None,
        client_info: Implementation | None = None,
        **kwargs: Any,
    ) -> InitializeResponse:
        if client_info is not None:
            self._by = f"acp:{client_info.name}"
        await self.daemon()  # an editor hears at once if no daemon answers
        return InitializeResponse(
            protocol_version=min(protocol_version, PROTOCOL_VERSION),
            agent_capabilities=AgentCapabilities(
                load_session=True,
                prompt_capabilities=PromptCapabilities(embedded_context=True),
                mcp_capabilities=McpCapabilities(http=True, sse=True),
                session_capabilities=SessionCapabilities(
                    list=SessionListCapabilities(), resume=SessionResumeCapabilities()
                ),
            ),
            agent_info=Implementation(name="ksi-daemon", title="KSI daemon", version="1"),
        )

    async def authenticate(self, method_id: str, **kwargs: Any) -> None:
        return None  # the daemon's CLI has its own credentials; the socket is same-uid

    # -- ACP: sessions --------------------------------------------------------------------

    async def new_session(
        self,
        cwd: str,
        additional_directories: list[str] | None = None,
        mcp_servers: list[McpServer] | None = None,
        **kwargs: Any,
    ) -> NewSessionResponse:
        if not _usable_dir(cwd):
            raise RequestError.invalid_params({"cwd": f"not an existing absolute directory: {cwd}"})
        await self.daemon()
        session_id = str(uuid.uuid4())  # the daemon session's id, from its first turn on
        self._sessions[session_id] = _Session(cwd=cwd, mcp_servers=daemon_mcp_servers(mcp_servers))
        return NewSessionResponse(session_id=session_id)

    async def _known(self, session_id: str, cwd: str, mcp_servers: list[McpServer] | None) -> Any:
        """The daemon's record of a session an editor asks back for (load, resume)."""
        try:
            record = (await self._call("GET_SESSION", {"session_id": session_id}))["session"]
        except RequestError as exc:
            if session_id in self._sessions and self._sessions[session_id].fresh:
                return None  # made here, no turn yet
            raise exc
        if not _same_dir(record["cwd"], cwd):
            raise RequestError.invalid_params(
                {
                    "cwd": f"session {session_id} lives in {record['cwd']}",
                    "session_cwd": record["cwd"],
                }
            )
        self._sessions[session_id] = _Session(
            cwd=record["cwd"],
            mcp_servers=daemon_mcp_servers(mcp_servers),
            fresh=False,
            cost_usd=float(record.get("total_cost_usd") or 0.0),
        )
        return record

    async def load_session(
        self,
        cwd: str,
        session_id: str,
        mcp_servers: list[McpServer] | None = None,
        additional_directories: list[str] | None = None,
        **kwargs: Any,
    ) -> LoadSessionResponse:
        """Resume a daemon session (any client's), replaying its conversation first."""
        if await self._known(session_id, cwd, mcp_servers) is not None:
            history = await self._call("GET_SESSION_HISTORY", {"session_id": session_id})
            for entry in history["entries"]:
                if not entry["text"]:
                    continue
                if entry["role"] == "user":
                    update: Any = update_user_message_text(entry["text"])
                else:
                    update = update_agent_message_text(entry["text"])
                await self.editor.session_update(session_id, update)
        return LoadSessionResponse()

    async def resume_session(
        self,
        session_id: str,
        cwd: str,
        additional_directories: list[str] | None = None,
        mcp_servers: list[McpServer] | None = None,
        **kwargs: Any,
    ) -> ResumeSessionResponse:
        """Like load, without the replay (the editor still shows the conversation)."""
        await self._known(session_id, cwd, mcp_servers)
        return ResumeSessionResponse()

    async def list_sessions(
        self, cwd: str | None = None, cursor: str | None = None, **kwargs: Any
    ) -> ListSessionsResponse:
        """The daemon's sessions, most recently used first (every client's, not only ACP's:
        an editor can pick up a session a script or an agent began)."""
        listing = await self._call("GET_SESSIONS", {"limit": 200})
        return ListSessionsResponse(
            sessions=[
                SessionInfo(session_id=s["session_id"], cwd=s["cwd"], updated_at=s["last_used_at"])
                for s in listing["sessions"]
                if cwd is None or _same_dir(s["cwd"], cwd)
            ]
        )

    async def close_session(self, session_id: str, **kwargs: Any) -> None:
        session = self._sessions.pop(session_id, None)
        if session is not None and session.running is not None:
            await self._cancel(session_id, session.running)
        return None

    # -- ACP: prompts ---------------------------------------------------------------------

    def _session(self, session_id: str) -> _Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise RequestError.invalid_params(
                {"sessionId": f"unknown session {session_id}: session/new or session/load first"}
            )
        return session

    async def prompt(
        self, session_id: str, prompt: list[ContentBlock], **kwargs: Any
    ) -> PromptResponse:
        session = self._session(session_id)
        if session.running is not None:
            raise RequestError.invalid_request({"sessionId": "a prompt is running already"})
        text = prompt_text(prompt)
        if not text.strip():
            raise RequestError.invalid_params({"prompt": "no text in the prompt"})
        params: dict[str, Any] = {"cwd": session.cwd, "permissions": "relay"}
        params["new_session_id" if session.fresh else "session_id"] = session_id
        if session.mcp_servers:
            params["mcp_servers"] = session.mcp_servers
        if self._ksi_tools:
            params["ksi_tools"] = True
        if self.agent_id:
            params["agent_id"] = self.agent_id
        running = session.running = _Prompt()
        try:
            return await self._run(session_id, session, running, text, params)
        finally:
            session.running = None

    async def _run(
        self,
        session_id: str,
        session: _Session,
        running: _Prompt,
        text: str,
        params: dict[str, Any],
    ) -> PromptResponse:
        turn = await (await self.daemon()).spawn_stream(text, **params)
        async for event in turn:
            data = event.get("data") or {}
            if running.process_id is None and data.get("process_id"):
                running.process_id = str(data["process_id"])
                if running.cancelled:
                    await self._cancel(session_id, running)
            for update in updates_for(data):
                await self.editor.session_update(session_id, update)
        assert turn.reply is not None
        try:
            result: dict[str, Any] = turn.result()
        except CommandError as exc:
            if session.fresh:
                session.fresh = not await self._exists(session_id)
            stop = STOP_REASONS.get(exc.code)
            if running.cancelled or stop == "cancelled":
                return PromptResponse(stop_reason="cancelled")
            if stop is not None:
                return PromptResponse(stop_reason=stop)
            raise _request_error(exc) from None
        session.fresh = False
        session.cost_usd += float(result.get("cost_usd") or 0.0)
        await self.editor.session_update(session_id, usage_update(result, session.cost_usd))
        return PromptResponse(stop_reason="end_turn", usage=prompt_usage(result.get("usage")))

    async def _exists(self, session_id: str) -> bool:
        try:
            await self._call("GET_SESSION", {"session_id": session_id})
        except RequestError:
            return False
        return True

    async def cancel(self, session_id: str, **kwargs: Any) -> None:
        """Stop the session's running prompt: its turn is cancelled (the CLI's process
        group ends) and the prompt answers ``cancelled``; pending permission asks end."""
        session = self._sessions.get(session_id)
        if session is None or session.running is None:
            return
        for ask in list(session.asks.values()):
            ask.cancel()
        await self._cancel(session_id, session.running)

    async def _cancel(self, session_id: str, running: _Prompt) -> None:
        running.cancelled = True
        if running.process_id is None:
            # Before its first event: the daemon knows the turn by its session already.
            listing = await self._call("GET_PROCESSES")
            live = [
                p
                for p in listing["processes"]
                if p.get("session_id") == session_id
                and p.get("status") in ("queued", "running", "awaiting_permission")
            ]
            if not live:
                return  # not registered yet: the first event cancels it (_run)
            running.process_id = str(live[0]["process_id"])
        if running.cancel_sent:
            return
        running.cancel_sent = True
        with contextlib.suppress(RequestError):  # finished meanwhile: nothing to stop
            await self._call("CANCEL_PROCESS", {"process_id": running.process_id})

    # -- ACP: what the daemon does not offer -----------------------------------------------

    async def set_session_mode(self, session_id: str, mode_id: str, **kwargs: Any) -> None:
        raise RequestError.method_not_found("session/set_mode")

    async def set_config_option(
        self, config_id: str, session_id: str, value: str | bool, **kwargs: Any
    ) -> None:
        raise RequestError.method_not_found("session/set_config_option")

    async def fork_session(
        self,
        session_id: str,
        cwd: str,
        additional_directories: list[str] | None = None,
        mcp_servers: list[McpServer] | None = None,
        **kwargs: Any,
    ) -> ForkSessionResponse:
        raise RequestError.method_not_found("session/fork")

    async def ext_method(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        raise RequestError.method_not_found(method)

    async def ext_notification(self, method: str, params: dict[str, Any]) -> None:
        return None

    # -- permission requests --------------------------------------------------------------

    async def _ask(self, session_id: str, session: _Session, request: dict[str, Any]) -> None:
        """Ask the editor about one relayed request; its answer goes to the daemon. The
        daemon's timeout and default stand: an editor that has not answered by then is no
        longer asked (the default was applied)."""
        name = str(request.get("tool_name") or "tool")
        tool_input = request.get("input")
        tool_call = ToolCallUpdate(
            tool_call_id=str(request.get("tool_use_id") or request["request_id"]),
            title=tool_title(name, tool_input),
            kind=tool_kind(name),
            status="pending",
            locations=tool_locations(tool_input),
            raw_input=tool_input,
        )
        wait = _seconds_until(str(request["expires_at"])) if request.get("expires_at") else None
        try:
            async with asyncio.timeout(wait):
                answer = await self.editor.request_permission(
                    session_id=session_id, tool_call=tool_call, options=PERMISSION_OPTIONS
                )
        except TimeoutError:
            return
        outcome = answer.outcome
        params: dict[str, Any] = {"request_id": request["request_id"], "by": self._by}
        chosen = outcome.option_id if isinstance(outcome, AllowedOutcome) else None
        if chosen in ("allow", "allow_always"):
            params["decision"] = "allow"
            if chosen == "allow_always":
                params["remember"] = "session"
        else:
            params["decision"] = "deny"
            params["message"] = (
                "the user rejected this tool call" if chosen else "the editor withdrew the request"
            )
        try:
            await self._call("RESPOND_PERMISSION", params)
        except RequestError as exc:
            # Decided meanwhile (another client, the timeout) or the turn ended: nothing lost.
            log.info("acp.permission_late", request_id=request["request_id"], error=str(exc))


def _forget(asks: dict[str, asyncio.Task[None]], request_id: str, _: object) -> None:
    asks.pop(request_id, None)


def _request_error(exc: CommandError) -> RequestError:
    """A daemon error as a JSON-RPC error: the daemon's code and details in ``data``."""
    data: dict[str, Any] = {"code": exc.code, "message": str(exc)}
    if exc.details:
        data["details"] = exc.details
    if exc.code in ("INVALID_PARAMETERS", "SESSION_EXISTS"):
        return RequestError.invalid_params(data)
    if exc.code.endswith("NOT_FOUND"):
        return RequestError.resource_not_found(str(exc))
    return RequestError.internal_error(data)
