"""Command registry and the single dispatch function.

Each command is registered once with a description, a pydantic parameter model and a
pydantic result model; ``GET_COMMANDS`` publishes both as JSON Schema. :meth:`Registry.dispatch`
(and :meth:`Registry.dispatch_now`) is the only place where exceptions become error replies:
a :class:`DaemonError` keeps its code, anything else is logged with its traceback and sent
as ``INTERNAL_ERROR``.

A handler is a plain ``def`` when it never waits (it reads the daemon's memory: HEALTH_CHECK,
GET_SHARED) and an ``async def`` when it does. The socket answers the first kind inside the
read callback, one event-loop turn sooner than the second (``daemon/server/connection.py``);
nothing else about a handler changes, and an ``async def`` runs in an ordinary task.

A handler returns its result model, or (for a result the daemon builds from its own
counters, HEALTH_CHECK) the JSON-ready dict that model describes: constructing a model only
to dump it again was two thirds of HEALTH_CHECK's cost. Tests check such results against
the published schema.
"""

from __future__ import annotations

import difflib
import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import structlog
from pydantic import BaseModel, ConfigDict, ValidationError

from daemon.errors import DaemonError, InvalidParameters, UnknownCommand
from daemon.protocol import Request, encode_error, encode_success

if TYPE_CHECKING:
    from daemon.agents.mailbox import Mailboxes
    from daemon.events.bus import EventBus
    from daemon.events.subscriber import Event
    from daemon.server import Connection
    from daemon.settings import Settings
    from daemon.state.db import Store
    from daemon.state.records import StateManager
    from daemon.turns.scheduler import TurnScheduler

log = structlog.get_logger("ksi.registry")

_SUGGEST_MAX_CHARS = 64  # twice the longest command name

P = TypeVar("P", bound=BaseModel)
R = TypeVar("R", bound=BaseModel)
# A handler: (Context, params) -> result, as a plain function or a coroutine function.
H = TypeVar("H", bound=Callable[..., Any])


class Params(BaseModel):
    """Base for parameter models: unknown parameters are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class NoParams(Params):
    pass


def comma_list(value: Any) -> Any:
    """A list parameter as KSI's clients also sent it, a comma-separated string, as a list
    (a ``mode="before"`` validator; anything else is left for the field's own type)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


_NO_PARAMS = NoParams()


class Result(BaseModel):
    """Base for result models (documentation and the wire shape of a command's result)."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True, slots=True)
class Services:
    """The parts of the daemon that commands (and observers, through them) may use."""

    settings: Settings
    store: Store
    state: StateManager
    bus: EventBus
    turns: TurnScheduler
    registry: Registry
    health: Callable[[], dict[str, Any]]
    request_shutdown: Callable[[str], None]
    agents: Mailboxes
    # RELOAD_MODULE: (module, observer specs restarted) once the named plugin runs anew.
    reload_observer: Callable[[str], Awaitable[tuple[str, list[str]]]]
    # RELOAD_DAEMON: the successor's pid, once it is prepared to take over.
    reload_daemon: Callable[[], Awaitable[int]]


@dataclass(frozen=True, slots=True)
class Origin:
    """The turn on whose behalf a command runs: a Claude turn calling a tool of the KSI MCP
    face (daemon/mcp_face). Known from the turn's token, never from the call's arguments."""

    process_id: str
    session_id: str
    agent_id: str | None
    depth: int  # 0 for a turn a client started; its children's are 1, and so on


@dataclass(slots=True)
class Context:
    """What a handler may touch: the daemon's services and, over the socket, its connection."""

    services: Services
    conn: Connection | None = None
    request: Request | None = None
    caller: str | None = None
    """Who calls without a connection (an observer plugin: ``observer:<name>``; a turn's
    MCP call: ``mcp:<process_id>``)."""
    origin: Origin | None = None

    @property
    def agent_id(self) -> str | None:
        """The calling agent: the turn's (MCP), else the one the connection registered as."""
        if self.origin is not None:
            return self.origin.agent_id
        return self.conn.agent_id if self.conn is not None else None

    def publish(
        self,
        event_type: str,
        data: dict[str, Any],
        *,
        from_agent: str | None = None,
        to_agent: str | None = None,
        max_bytes: int | None = None,
    ) -> Event:
        """Publish an event this command causes, carrying who caused it: the sender (given,
        else :attr:`agent_id`) and, for a turn's MCP call, the turn (``parent_process_id``)."""
        return self.services.bus.publish(
            event_type,
            data,
            from_agent=from_agent or self.agent_id,
            to_agent=to_agent,
            parent_process_id=self.origin.process_id if self.origin is not None else None,
            max_bytes=max_bytes,
        )


@dataclass(frozen=True, slots=True)
class CommandSpec(Generic[P, R]):
    name: str
    description: str
    params: type[P]
    result: type[R]
    handler: Callable[[Context, P], Any]  # returns R, or an Awaitable[R] (not immediate)
    # A plain-function handler: it never waits, so it may be run and answered at once.
    immediate: bool
    # Long-running commands (a sync SPAWN) run in their own task on a persistent
    # connection, so that later pipelined commands are not stuck behind them.
    long_running: bool = False
    aliases: tuple[str, ...] = ()
    # Results whose optional fields depend on the mode (SPAWN sync vs async) leave out
    # the ones that do not apply instead of sending a row of nulls.
    exclude_none: bool = False


@dataclass
class Registry:
    commands: dict[str, CommandSpec[Any, Any]] = field(default_factory=dict)
    _by_name: dict[str, CommandSpec[Any, Any]] = field(default_factory=dict)

    def command(
        self,
        name: str,
        *,
        params: type[P],
        result: type[R],
        long_running: bool = False,
        aliases: tuple[str, ...] = (),
        exclude_none: bool = False,
    ) -> Callable[[H], H]:
        """Register a handler (``def`` or ``async def``, see the module docstring); its
        docstring's first paragraph is the command's description."""

        def decorate(fn: H) -> H:
            doc = (fn.__doc__ or "").strip().split("\n\n")[0]
            immediate = not inspect.iscoroutinefunction(fn)
            spec = CommandSpec(
                name,
                " ".join(doc.split()),
                params,
                result,
                fn,
                immediate,
                long_running,
                aliases,
                exclude_none,
            )
            if name in self._by_name or any(a in self._by_name for a in aliases):
                raise ValueError(f"command {name} registered twice")
            self.commands[name] = spec
            for n in (name, *aliases):
                self._by_name[n] = spec
            return fn

        return decorate

    def get(self, name: str) -> CommandSpec[Any, Any] | None:
        return self._by_name.get(name)

    def lookup(self, name: str) -> CommandSpec[Any, Any]:
        spec = self._by_name.get(name)
        if spec is None:
            # Suggestions only for a name that could be a typo of one: difflib is quadratic
            # in the name's length, and a 7 MB name stalled the loop for a second.
            close = (
                difflib.get_close_matches(name.upper(), self._by_name, n=3)
                if len(name) <= _SUGGEST_MAX_CHARS
                else []
            )
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            shown = name if len(name) <= _SUGGEST_MAX_CHARS else name[:_SUGGEST_MAX_CHARS] + "..."
            raise UnknownCommand(
                f"unknown command {shown!r}{hint} (GET_COMMANDS lists them all)",
                details={"suggestions": close} if close else None,
            )
        return spec

    @staticmethod
    def validate(spec: CommandSpec[P, Any], parameters: dict[str, Any]) -> P:
        if not parameters and spec.params is NoParams:
            return cast(P, _NO_PARAMS)  # fieldless, so one shared instance will do
        try:
            return spec.params.model_validate(parameters)
        except ValidationError as exc:
            raise invalid_parameters(exc) from None

    async def call(self, ctx: Context, name: str, parameters: dict[str, Any]) -> Any:
        """Run a command in-process (observers, and :meth:`dispatch`); returns the JSON-ready
        result or raises the command's error."""
        spec = self.lookup(name)
        result = spec.handler(ctx, self.validate(spec, parameters))
        if not spec.immediate:
            result = await result
        return _json_ready(spec, result)

    async def dispatch(self, ctx: Context, req: Request) -> bytes:
        """Run one request and return the encoded reply line; never raises (but on cancel)."""
        started = time.perf_counter()
        try:
            return encode_success(req, await self.call(ctx, req.command, req.parameters))
        except Exception as exc:
            return self._failed(ctx, req, exc, started)

    def dispatch_now(self, ctx: Context, req: Request) -> bytes | None:
        """:meth:`dispatch` for a request that needs no waiting (an unknown command, bad
        parameters, a plain-function handler): its reply, here and now. None when the
        handler is a coroutine function: then use :meth:`dispatch`."""
        started = time.perf_counter()
        try:
            spec = self.lookup(req.command)
            if not spec.immediate:
                return None
            result = spec.handler(ctx, self.validate(spec, req.parameters))
            return encode_success(req, _json_ready(spec, result))
        except Exception as exc:
            return self._failed(ctx, req, exc, started)

    @staticmethod
    def _failed(ctx: Context, req: Request, exc: Exception, started: float) -> bytes:
        if isinstance(exc, DaemonError):
            # Logged here, where the error is still typed: not re-read from the reply bytes.
            log.info(
                "command.failed",
                conn=ctx.conn.id if ctx.conn is not None else None,
                command=req.command,
                code=exc.code,
                ms=round((time.perf_counter() - started) * 1000, 3),
            )
            return encode_error(req, exc)
        log.error("command.crashed", command=req.command, exc_info=exc)
        return encode_error(
            req, DaemonError("internal error while running the command; see the daemon log")
        )

    def describe(self, *, results: bool = True) -> list[dict[str, Any]]:
        """Every command with its description and parameter schema (and, with ``results``,
        its result schema)."""
        out = []
        for spec in self.commands.values():
            entry: dict[str, Any] = {
                "command": spec.name,
                "description": spec.description,
                "aliases": list(spec.aliases),
                "long_running": spec.long_running,
                "parameters": spec.params.model_json_schema(),
            }
            if results:
                entry["result"] = spec.result.model_json_schema()
            out.append(entry)
        return out


def invalid_parameters(exc: ValidationError) -> InvalidParameters:
    """A readable message that names every failing field, plus the structured list."""
    parts = []
    errors = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"]) or "parameters"
        parts.append(f"{loc}: {err['msg']}")
        errors.append({"field": loc, "message": err["msg"], "type": err["type"]})
    return InvalidParameters("invalid parameters: " + "; ".join(parts), details={"errors": errors})


__all__ = ["CommandSpec", "Context", "NoParams", "Params", "Registry", "Result", "encode_error"]


def _json_ready(spec: CommandSpec[Any, Any], result: Any) -> Any:
    if isinstance(result, dict):  # already the wire shape (see the module docstring)
        return result
    return result.model_dump(mode="json", exclude_none=spec.exclude_none)
