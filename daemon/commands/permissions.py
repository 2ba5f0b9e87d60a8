"""The permission relay's commands: answer a turn's tool permission request, list them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from daemon.commands.registry import Context, Params, Registry, Result
from daemon.turns.permissions import PermissionRequest


class RespondParams(Params):
    request_id: str = Field(min_length=1, max_length=128)
    decision: Literal["allow", "deny"]
    message: str | None = Field(
        default=None,
        max_length=10_000,
        description="deny: what the model is told (it sees it as the tool's error)",
    )
    updated_input: dict[str, Any] | None = Field(
        default=None, description="allow: run the tool with this input instead"
    )
    remember: Literal["session"] | None = Field(
        default=None,
        description='allow: "session" adds an allow rule (the CLI\'s suggested rule, else the '
        "whole tool) for the rest of the session: the same request is not asked again",
    )
    by: str | None = Field(
        default=None, max_length=256, description="who decided, for the record (e.g. a name)"
    )


class RespondResult(Result):
    request: PermissionRequest


class ListParams(Params):
    include_decided: bool = Field(
        default=False, description="also the recently decided, timed-out and expired ones"
    )
    process_id: str | None = None
    session_id: str | None = None
    limit: int = Field(default=100, ge=1, le=1000)


class ListResult(Result):
    requests: list[PermissionRequest]
    pending: int


def _caller(ctx: Context, by: str | None) -> str:
    if by:
        return by
    if ctx.caller is not None:
        return ctx.caller
    if ctx.conn is not None:
        return f"agent:{ctx.conn.agent_id}" if ctx.conn.agent_id else f"connection:{ctx.conn.id}"
    return "daemon"


def register(r: Registry) -> None:
    @r.command("RESPOND_PERMISSION", params=RespondParams, result=RespondResult)
    async def respond_permission(ctx: Context, p: RespondParams) -> RespondResult:
        """Answer a pending PERMISSION_REQUEST: the first answer wins; a later one gets
        PERMISSION_ALREADY_DECIDED, one for a request of an earlier run PERMISSION_EXPIRED."""
        broker = ctx.services.turns.permissions
        if p.request_id not in broker.pending:
            await broker.find(p.request_id)  # a decided one, perhaps of an earlier run
        record = broker.respond(
            p.request_id,
            p.decision,
            by=_caller(ctx, p.by),
            message=p.message,
            updated_input=p.updated_input,
            remember=p.remember == "session",
        )
        return RespondResult(request=record)

    @r.command("GET_PERMISSION_REQUESTS", params=ListParams, result=ListResult)
    def get_permission_requests(ctx: Context, p: ListParams) -> ListResult:
        """Pending permission requests, oldest first (a client that connects late can still
        answer them); with include_decided, recent decided ones after them."""
        broker = ctx.services.turns.permissions
        requests = [
            r
            for r in broker.listing(p.include_decided, p.limit)
            if (p.process_id is None or r.process_id == p.process_id)
            and (p.session_id is None or r.session_id == p.session_id)
        ]
        return ListResult(requests=requests, pending=len(broker.pending))
