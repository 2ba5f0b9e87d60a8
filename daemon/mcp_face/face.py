"""The KSI MCP face's life in the daemon: loading, serving on loopback, tokens, identity."""

from __future__ import annotations

import asyncio
import importlib
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from daemon.commands.registry import Context, Origin
from daemon.errors import DaemonError, ErrorCode, Unavailable
from daemon.mcp_face.tokens import Tokens

if TYPE_CHECKING:
    import uvicorn

    from daemon.commands.registry import Services

log = structlog.get_logger("ksi.mcp")

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]

_REFUSED = orjson.dumps(
    {
        "error": "unauthorized",
        "message": "not a token of a running KSI turn: the face is only for the CLI of a "
        "turn the daemon runs, while it runs",
    }
)


class McpFace:
    """The ``ksi`` MCP server, served by the daemon for the turns it runs.

    ``origin_of(session_id)`` names the running turn of a session (None if none runs):
    a token is only good while it returns one.
    """

    def __init__(self, services: Services, origin_of: Callable[[str], Origin | None]) -> None:
        self._services = services
        self._origin_of = origin_of
        self.tokens = Tokens(services.settings.state_path / "mcp")
        self.url: str | None = None
        self.calls = 0
        self.refused = 0
        self._tasks: asyncio.TaskGroup | None = None
        self._loading: asyncio.Task[None] | None = None
        self._server: uvicorn.Server | None = None
        self._serving: asyncio.Task[None] | None = None
        self._error: str | None = None

    def start(self, tasks: asyncio.TaskGroup) -> None:
        """The server, once asked for, runs in ``tasks`` (the daemon's group)."""
        self._tasks = tasks

    async def config_for(self, session_id: str) -> Path:
        """The session's ``--mcp-config`` file; loads and starts the server at first use."""
        await self._ready()
        assert self.url is not None
        return self.tokens.config_for(session_id, self.url)

    def status(self) -> dict[str, Any]:
        """HEALTH_CHECK's view of the face."""
        if self._error is not None:
            return {"status": "failed", "error": self._error}
        if self._loading is None:
            return {"status": "not_loaded", "hint": "starts at the first turn with ksi_tools"}
        if self.url is None:
            return {"status": "loading"}
        return {"status": "ready", "url": self.url, "calls": self.calls, "refused": self.refused}

    async def stop(self) -> None:
        """Stop serving (after the turns ended) and forget every token."""
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
            await asyncio.wait([self._loading])
        if self._server is not None and self._serving is not None:
            self._server.should_exit = True
            await asyncio.wait([self._serving])
        self.tokens.revoke_all()

    # -- serving --------------------------------------------------------------------------

    async def _ready(self) -> None:
        if self._loading is None:
            if self._tasks is None:
                raise Unavailable("the daemon is not serving", code=ErrorCode.NOT_READY)
            self._loading = self._tasks.create_task(self._load(), name="ksi-mcp-load")
        await asyncio.shield(self._loading)
        if self.url is None:
            raise Unavailable(
                f"the KSI MCP face could not be started: {self._error}", code=ErrorCode.NOT_READY
            )

    async def _load(self) -> None:
        started = time.perf_counter()
        try:
            # ~0.5 s of imports (the SDK, starlette, uvicorn): a thread keeps the socket
            # answering meanwhile.
            http = await asyncio.to_thread(importlib.import_module, "daemon.mcp_face.http")
            server, sock = http.serving(self._guard(http.build_app(self._call)))
            port = sock.getsockname()[1]
            assert self._tasks is not None
            self._serving = self._tasks.create_task(self._serve(server, sock), name="ksi-mcp-serve")
            self._server = server
            while not server.started:
                if self._serving.done():
                    raise RuntimeError("the MCP server stopped while starting")
                await asyncio.sleep(0.005)
            self.url = f"http://127.0.0.1:{port}/mcp"
            log.info(
                "mcp.ready", url=self.url, load_ms=round((time.perf_counter() - started) * 1000)
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a task of the daemon's group must not fail
            self._error = f"{type(exc).__name__}: {exc}"
            log.exception("mcp.load_failed")

    async def _serve(self, server: uvicorn.Server, sock: socket.socket) -> None:
        try:
            await server.serve(sockets=[sock])
        except Exception as exc:
            self._error = f"{type(exc).__name__}: {exc}"
            self.url = None
            log.exception("mcp.serve_failed")
        finally:
            sock.close()

    def _guard(self, app: ASGIApp) -> ASGIApp:
        """Refuse, before the SDK parses anything, a request without a live turn's token."""

        async def guarded(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
                session_id = self.tokens.session_of(auth)
                if session_id is None or self._origin_of(session_id) is None:
                    self.refused += 1
                    await send(
                        {
                            "type": "http.response.start",
                            "status": 401,
                            "headers": [(b"content-type", b"application/json")],
                        }
                    )
                    await send({"type": "http.response.body", "body": _REFUSED})
                    return
            await app(scope, receive, send)

        return guarded

    async def _call(
        self, headers: Mapping[str, str] | None, command: str, params: dict[str, Any]
    ) -> Any:
        """A tool's command, run for the turn the request's token names."""
        from mcp.server.mcpserver.exceptions import ToolError

        session_id = self.tokens.session_of((headers or {}).get("authorization"))
        origin = self._origin_of(session_id) if session_id is not None else None
        if origin is None:  # its turn ended between the guard and here
            raise ToolError(_tool_error(ErrorCode.PERMISSION_DENIED, "the turn has ended"))
        self.calls += 1
        ctx = Context(self._services, caller=f"mcp:{origin.process_id}", origin=origin)
        try:
            return await self._services.registry.call(ctx, command, params)
        except DaemonError as exc:
            raise ToolError(_tool_error(exc.code, exc.message, exc.details)) from None


def _tool_error(code: ErrorCode, message: str, details: dict[str, Any] | None = None) -> str:
    # What the model reads: the daemon's typed error, as a socket client would get it.
    body: dict[str, Any] = {"code": str(code), "message": message}
    if details:
        body["details"] = details
    return orjson.dumps(body).decode()
