"""Shared state: a persistent key/value store of arbitrary JSON values."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from daemon.commands.registry import Context, Params, Registry, Result
from daemon.protocol import iso_from_epoch

Key = Field(min_length=1, max_length=1024)


class KeyParams(Params):
    key: str = Key


class SetParams(Params):
    key: str = Key
    value: Any = Field(description="any JSON value (null included)")


class SetResult(Result):
    key: str
    status: Literal["set"]
    updated_at: str


class GetResult(Result):
    key: str
    value: Any
    found: bool
    updated_at: str | None = None


class DeleteResult(Result):
    key: str
    deleted: bool


class ListParams(Params):
    prefix: str = ""


class ListResult(Result):
    keys: list[str]
    total: int


def register(r: Registry) -> None:
    @r.command("SET_SHARED", params=SetParams, result=SetResult)
    async def set_shared(ctx: Context, p: SetParams) -> SetResult:
        """Store a JSON value under a key; durable when the reply arrives. Publishes
        SHARED_STATE_CHANGED. If it cannot be persisted the reply is STORAGE_FULL or
        STORAGE_ERROR and nothing changed."""
        ts = await ctx.services.state.set_shared(p.key, p.value)
        ctx.publish("SHARED_STATE_CHANGED", {"key": p.key, "action": "set"})
        return SetResult(key=p.key, status="set", updated_at=iso_from_epoch(ts))

    @r.command("GET_SHARED", params=KeyParams, result=GetResult)
    def get_shared(ctx: Context, p: KeyParams) -> GetResult:
        """Read a key; a missing key is ``found: false`` with ``value: null``, not an error."""
        entry = ctx.services.state.shared.get(p.key)
        if entry is None:
            return GetResult(key=p.key, value=None, found=False)
        return GetResult(key=p.key, value=entry[0], found=True, updated_at=iso_from_epoch(entry[1]))

    @r.command("DELETE_SHARED", params=KeyParams, result=DeleteResult)
    async def delete_shared(ctx: Context, p: KeyParams) -> DeleteResult:
        """Delete a key; ``deleted: false`` if it did not exist. STORAGE_FULL or
        STORAGE_ERROR if the deletion could not be persisted (the key is still there)."""
        deleted = await ctx.services.state.delete_shared(p.key)
        if deleted:
            ctx.publish("SHARED_STATE_CHANGED", {"key": p.key, "action": "delete"})
        return DeleteResult(key=p.key, deleted=deleted)

    @r.command("LIST_SHARED", params=ListParams, result=ListResult)
    def list_shared(ctx: Context, p: ListParams) -> ListResult:
        """List keys (sorted), optionally only those starting with ``prefix``."""
        keys = sorted(k for k in ctx.services.state.shared if k.startswith(p.prefix))
        return ListResult(keys=keys, total=len(keys))
