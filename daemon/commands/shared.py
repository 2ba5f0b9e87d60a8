"""Shared state: a persistent key/value store of arbitrary JSON values."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator

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


class LoadedAgent(Params):
    model_config = ConfigDict(extra="allow")  # KSI's records carried more; they are kept

    role: str | None = Field(default=None, max_length=256)
    capabilities: list[str] = Field(default_factory=list)


class StateData(Params):
    shared_state: dict[str, Any] = Field(default_factory=dict)
    agents: dict[str, LoadedAgent] = Field(default_factory=dict)
    sessions: dict[str, Any] = Field(
        default_factory=dict,
        description="KSI's last CLI output per session: accepted, not kept (the daemon's "
        "sessions come from the turns it runs)",
    )

    @field_validator("shared_state", "agents")
    @classmethod
    def _keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if not 1 <= len(key) <= 1024:
                raise ValueError("keys must be 1 to 1024 characters")
        return value


class LoadStateParams(Params):
    state_data: StateData


class LoadStateResult(Result):
    status: Literal["loaded"]
    message: str
    state_keys: list[str] = Field(description="the parts of state_data that were loaded")
    loaded: dict[str, int]


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

    @r.command("LOAD_STATE", params=LoadStateParams, result=LoadStateResult)
    async def load_state(ctx: Context, p: LoadStateParams) -> LoadStateResult:
        """KSI's state hand-over: set every ``shared_state`` key and register every agent of
        ``agents`` (role, capabilities; the rest of each record kept as its metadata), each
        durable as with SET_SHARED / REGISTER_AGENT. ``sessions`` are accepted and counted,
        not kept. Validated whole before anything is written."""
        data = p.state_data
        state = ctx.services.state
        for key, value in data.shared_state.items():
            await state.set_shared(key, value)
            ctx.publish("SHARED_STATE_CHANGED", {"key": key, "action": "set"})
        for agent_id, agent in data.agents.items():
            extra = dict(agent.model_extra or {})
            await state.register_agent(agent_id, agent.role, agent.capabilities, extra)
            ctx.publish(
                "AGENT_REGISTERED",
                {"agent_id": agent_id, "role": agent.role, "respond_to_messages": False},
            )
        loaded = {
            "shared_state": len(data.shared_state),
            "agents": len(data.agents),
            "sessions": len(data.sessions),
        }
        keys = [k for k, n in loaded.items() if n]
        return LoadStateResult(
            status="loaded",
            message=f"loaded {loaded['shared_state']} shared key(s) and "
            f"{loaded['agents']} agent(s); {loaded['sessions']} session(s) not kept",
            state_keys=keys,
            loaded=loaded,
        )
