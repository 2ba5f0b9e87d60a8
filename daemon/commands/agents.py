"""The agent registry: who is working with the daemon, in which role, at what cost."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from daemon.commands.registry import Context, NoParams, Params, Registry, Result
from daemon.errors import ErrorCode, NotFound
from daemon.state.records import AgentInfo

AgentId = Field(min_length=1, max_length=256)


class RegisterParams(Params):
    agent_id: str = AgentId
    role: str | None = Field(default=None, max_length=256)
    capabilities: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("capabilities", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        # KSI clients send either a list or a comma-separated string.
        if isinstance(value, str):
            return [c.strip() for c in value.split(",") if c.strip()]
        return value


class RegisterResult(Result):
    status: Literal["registered"]
    agent: AgentInfo


class AgentIdParams(Params):
    agent_id: str = AgentId


class UnregisterResult(Result):
    status: Literal["unregistered"]
    agent_id: str


class AgentsResult(Result):
    agents: list[AgentInfo]
    total: int


def register(r: Registry) -> None:
    @r.command("REGISTER_AGENT", params=RegisterParams, result=RegisterResult)
    async def register_agent(ctx: Context, p: RegisterParams) -> RegisterResult:
        """Register (or update) an agent with a role, capabilities and free-form metadata.
        Publishes AGENT_REGISTERED. STORAGE_FULL or STORAGE_ERROR if it could not be
        persisted (the registry is unchanged)."""
        info = await ctx.services.state.register_agent(
            p.agent_id, p.role, p.capabilities, p.metadata
        )
        ctx.services.bus.publish("AGENT_REGISTERED", {"agent_id": p.agent_id, "role": p.role})
        return RegisterResult(status="registered", agent=info)

    @r.command("UNREGISTER_AGENT", params=AgentIdParams, result=UnregisterResult)
    async def unregister_agent(ctx: Context, p: AgentIdParams) -> UnregisterResult:
        """Remove an agent from the registry. Publishes AGENT_UNREGISTERED. STORAGE_FULL or
        STORAGE_ERROR if that could not be persisted (the agent stays registered)."""
        if not await ctx.services.state.unregister_agent(p.agent_id):
            known = sorted(ctx.services.state.agents)[:5]
            raise NotFound(
                f"no agent {p.agent_id!r} is registered",
                code=ErrorCode.AGENT_NOT_FOUND,
                details={"known_agents": known},
            )
        ctx.services.bus.publish("AGENT_UNREGISTERED", {"agent_id": p.agent_id})
        return UnregisterResult(status="unregistered", agent_id=p.agent_id)

    @r.command("GET_AGENTS", params=NoParams, result=AgentsResult)
    def get_agents(ctx: Context, p: NoParams) -> AgentsResult:
        """Every registered agent with its role, capabilities, status, timestamps, number of
        completed turns and total cost."""
        agents = ctx.services.state.agent_list()
        return AgentsResult(agents=agents, total=len(agents))
