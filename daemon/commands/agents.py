"""The agent registry: who is working with the daemon, in which role, at what cost."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from daemon.commands.registry import Context, NoParams, Params, Registry, Result, comma_list
from daemon.errors import ErrorCode, NotFound
from daemon.state.records import AgentInfo, AgentProfile, TurnRecord

AgentId = Field(min_length=1, max_length=256)


class RegisterParams(Params):
    agent_id: str = AgentId
    role: str = Field(
        min_length=1, max_length=256, description="its role, e.g. researcher (required, as in KSI)"
    )
    capabilities: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    profile: AgentProfile | None = Field(
        default=None,
        description="how its turns run (model, append_system_prompt, allowed_tools, cwd, "
        "warm, ...: SPAWN's options): the defaults of every SPAWN with its agent_id",
    )
    respond_to_messages: bool = Field(
        default=False,
        strict=True,
        description="answer each DIRECT_MESSAGE to it with a turn in its own session; the "
        "answer goes back to the sender as a DIRECT_MESSAGE",
    )

    _caps = field_validator("capabilities", mode="before")(comma_list)


class RegisterResult(Result):
    status: Literal["registered"]
    agent: AgentInfo
    # KSI's reply named these at the top level.
    agent_id: str
    role: str
    capabilities: list[str] = Field(default_factory=list)


class AgentIdParams(Params):
    agent_id: str = AgentId


class UnregisterResult(Result):
    status: Literal["unregistered"]
    agent_id: str


class AgentsResult(Result):
    agents: dict[str, AgentInfo] = Field(description="by agent id (KSI's shape)")
    total: int


class TreeParams(Params):
    process_id: str | None = Field(default=None, description="this turn and what it spawned")
    agent_id: str | None = Field(default=None, description="the trees of this agent's turns")


class TreeNode(Result):
    process_id: str
    status: str
    agent_id: str | None = None
    session_id: str | None = None
    depth: int = 0
    cost_usd: float | None = None
    created_at: str
    children: list[TreeNode] = Field(default_factory=list)


class TreeResult(Result):
    roots: list[TreeNode] = Field(
        description="turns (newest first) with the sub-tasks they spawned, recursively"
    )
    total: int = Field(description="turns in the trees")


def register(r: Registry) -> None:
    @r.command("REGISTER_AGENT", params=RegisterParams, result=RegisterResult)
    async def register_agent(ctx: Context, p: RegisterParams) -> RegisterResult:
        """Register (or update) an agent with a role (required), capabilities and free-form
        metadata. Publishes AGENT_REGISTERED. STORAGE_FULL or STORAGE_ERROR if it could not be
        persisted (the registry is unchanged)."""
        info = await ctx.services.state.register_agent(
            p.agent_id,
            p.role,
            p.capabilities,
            p.metadata,
            profile=p.profile,
            respond_to_messages=p.respond_to_messages,
        )
        ctx.services.bus.publish(
            "AGENT_REGISTERED",
            {
                "agent_id": p.agent_id,
                "role": p.role,
                "respond_to_messages": p.respond_to_messages,
            },
        )
        ctx.services.agents.on_registered(p.agent_id)
        return RegisterResult(
            status="registered",
            agent=info,
            agent_id=info.agent_id,
            role=p.role,
            capabilities=info.capabilities,
        )

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
    async def get_agents(ctx: Context, p: NoParams) -> AgentsResult:
        """Every registered agent with its role, capabilities, profile, status, timestamps,
        completed turns, total cost, most recent session, messages waiting for it, whether
        a connection subscribes as it, and its turns' live sub-tasks."""
        services = ctx.services
        connected = {s.agent_id for s in services.bus.subscribers if not s.dropped}
        live = services.turns.turns.values()
        owner = {t.info.process_id: t.request.agent_id for t in live}
        children: dict[str, int] = {}
        for t in live:
            parent = owner.get(t.request.parent_process_id or "")
            if parent is not None:
                children[parent] = children.get(parent, 0) + 1
        latest = await services.state.latest_sessions()
        agents: dict[str, AgentInfo] = {}
        for info in services.state.agent_list():
            agents[info.agent_id] = info.model_copy(
                update={
                    "session_id": latest.get(info.agent_id),
                    "queued_messages": services.agents.queued(info.agent_id),
                    "connected": info.agent_id in connected,
                    "live_children": children.get(info.agent_id, 0),
                }
            )
        return AgentsResult(agents=agents, total=len(agents))

    @r.command("AGENT_TREE", params=TreeParams, result=TreeResult, exclude_none=True)
    def agent_tree(ctx: Context, p: TreeParams) -> TreeResult:
        """Who spawned what: the recent turns as trees of their sub-tasks (a turn's KSI MCP
        ``spawn``), with status, agent, session, depth and cost. ``process_id``: one turn's
        tree; ``agent_id``: the trees of that agent's turns (its turns' own sub-tasks
        included, whoever runs them)."""
        records = list(ctx.services.state.processes.values())
        kids: dict[str, list[TurnRecord]] = {}
        for rec in records:
            if rec.parent_process_id is not None:
                kids.setdefault(rec.parent_process_id, []).append(rec)
        if p.process_id is not None:
            roots = [r for r in records if r.process_id == p.process_id]
            if not roots:
                raise NotFound(f"no process {p.process_id!r}", code=ErrorCode.PROCESS_NOT_FOUND)
        else:
            by_id = {r.process_id: r for r in records}

            def is_root(rec: TurnRecord) -> bool:
                parent = by_id.get(rec.parent_process_id or "")
                if p.agent_id is None:
                    return parent is None
                # An agent's tree starts at its turns that no turn of its own spawned.
                return rec.agent_id == p.agent_id and (
                    parent is None or parent.agent_id != p.agent_id
                )

            roots = [r for r in records if is_root(r)]

        def node(rec: TurnRecord) -> TreeNode:
            return TreeNode(
                process_id=rec.process_id,
                status=rec.status,
                agent_id=rec.agent_id,
                session_id=rec.session_id,
                depth=rec.depth,
                cost_usd=rec.cost_usd,
                created_at=rec.created_at,
                children=[node(c) for c in kids.get(rec.process_id, [])],
            )

        trees = [node(r) for r in reversed(roots)]
        return TreeResult(roots=trees, total=_count(trees))


def _count(nodes: list[TreeNode]) -> int:
    return sum(1 + _count(n.children) for n in nodes)
