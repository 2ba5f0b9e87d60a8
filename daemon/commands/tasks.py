"""SPAWN_AGENT and ROUTE_TASK, the original KSI's agent commands, on the one agent model of
daemon/agents: an agent is a registry row with a profile and, here, ``respond_to_messages``;
its work arrives as turns in its own session.

* SPAWN_AGENT registers an agent that answers its messages and starts its first turn (the
  task) in a new session of its own; later messages and task assignments continue it.
* ROUTE_TASK ranks the registered agents by how many of the required capabilities they have
  and sends the best one a TASK_ASSIGNMENT (a directed event: an answering agent runs a turn
  for it and answers the requester; one that is away finds it in its offline queue).
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import Field, field_validator

from daemon.commands.registry import Context, Params, Registry, Result, comma_list
from daemon.state.records import AgentInfo, AgentProfile


class SpawnAgentParams(Params):
    task: str = Field(min_length=1, max_length=1_000_000, description="the agent's first turn")
    agent_id: str | None = Field(default=None, min_length=1, max_length=256)
    profile_name: str | None = Field(
        default=None,
        max_length=256,
        description="a registered agent whose profile the new one starts from",
    )
    context: str = Field(default="", max_length=1_000_000, description="added to the task")
    role: str | None = Field(
        default=None, max_length=256, description="default: the profile's, or assistant"
    )
    capabilities: list[str] = Field(default_factory=list)
    model: str | None = Field(default=None, description="default: the profile's, or sonnet")

    _caps = field_validator("capabilities", mode="before")(comma_list)


class SpawnedAgent(Result):
    id: str
    process_id: str
    session_id: str | None = None
    composition: str | None = Field(description="the profile it started from, if any")
    role: str
    capabilities: list[str]
    status: Literal["active"]
    task: str
    model: str | None = None


class Selection(Result):
    composition_used: str | None
    fallback_used: bool = Field(description="true when no profile_name was found")
    score: float | None = None


class SpawnAgentResult(Result):
    agent: SpawnedAgent
    selection: Selection


class RouteParams(Params):
    task: str = Field(min_length=1, max_length=1_000_000)
    required_capabilities: list[str] = Field(min_length=1)
    context: str = Field(default="", max_length=1_000_000)
    prefer_agent_id: str | None = Field(
        default=None, description="wins a tie with the best match (KSI accepted, unused)"
    )
    from_agent: str | None = Field(
        default=None, description="who asks (the answer goes there); default: the caller"
    )

    _caps = field_validator("required_capabilities", mode="before")(comma_list)


class AssignedAgent(Result):
    id: str
    role: str | None = None
    capabilities: list[str]
    match_score: float = Field(description="the share of the required capabilities it has")
    status: str


class Routing(Result):
    status: Literal["routed"]
    assigned_agent: AssignedAgent


class Delivery(Result):
    status: Literal["answering", "delivered", "queued"]
    message: str
    seq: int


class RouteResult(Result):
    status: Literal["routed", "no_suitable_agent"]
    routing: Routing | None = None
    task: dict[str, Any]
    delivery: Delivery | None = None
    candidates: int = Field(description="registered agents considered")


def best_agent(
    agents: list[AgentInfo], required: list[str], prefer: str | None
) -> tuple[AgentInfo, float] | None:
    """The agent with the largest share of ``required`` (case-insensitive); ties go to
    ``prefer``, then to agents that answer their messages, then to the earliest registered."""
    wanted = {c.lower() for c in required}
    ranked: list[tuple[float, bool, bool, int, AgentInfo]] = []
    for i, agent in enumerate(agents):
        if agent.status != "active":
            continue
        score = len(wanted & {c.lower() for c in agent.capabilities}) / len(wanted)
        if score > 0:
            ranked.append((score, agent.agent_id == prefer, agent.respond_to_messages, -i, agent))
    if not ranked:
        return None
    score, _, _, _, agent = max(ranked, key=lambda r: r[:4])
    return agent, round(score, 4)


def register(r: Registry) -> None:
    @r.command("SPAWN_AGENT", params=SpawnAgentParams, result=SpawnAgentResult)
    async def spawn_agent(ctx: Context, p: SpawnAgentParams) -> SpawnAgentResult:
        """Start an agent (KSI's SPAWN_AGENT): register it, answering its messages, with the
        profile of ``profile_name`` (a registered agent) and ``model``, and run its first
        turn (``task``, then ``context``) async in a new session of its own. PROCESS_COMPLETE
        reports that turn; later DIRECT_MESSAGEs and TASK_ASSIGNMENTs continue the session."""
        services = ctx.services
        template = services.state.agents.get(p.profile_name) if p.profile_name else None
        base = template.profile if template is not None and template.profile else None
        profile = (base or AgentProfile()).model_copy(
            update={"model": p.model or (base.model if base else None) or "sonnet"}
        )
        agent_id = p.agent_id or f"{(p.role or 'agent').replace(' ', '_')}_{uuid.uuid4().hex[:8]}"
        # REGISTER_AGENT needs a role: KSI's SPAWN_AGENT defaulted it to "assistant" too.
        role = p.role or (template.role if template else None) or "assistant"
        capabilities = p.capabilities or (list(template.capabilities) if template else [])
        await services.registry.call(
            ctx,
            "REGISTER_AGENT",
            {
                "agent_id": agent_id,
                "role": role,
                "capabilities": capabilities,
                "metadata": {"spawned_by": ctx.caller or "client", "task": p.task[:500]},
                "profile": profile.model_dump(exclude_none=True),
                "respond_to_messages": True,
            },
        )
        prompt = p.task if not p.context.strip() else f"{p.task}\n\n{p.context}"
        accepted = await services.registry.call(
            ctx,
            "SPAWN",
            {"prompt": prompt, "agent_id": agent_id, "mode": "async", "new_session": True},
        )
        composition = p.profile_name if template is not None else None
        return SpawnAgentResult(
            agent=SpawnedAgent(
                id=agent_id,
                process_id=accepted["process_id"],
                session_id=accepted.get("session_id"),
                composition=composition,
                role=role,
                capabilities=capabilities,
                status="active",
                task=p.task,
                model=profile.model,
            ),
            selection=Selection(composition_used=composition, fallback_used=composition is None),
        )

    @r.command("ROUTE_TASK", params=RouteParams, result=RouteResult)
    def route_task(ctx: Context, p: RouteParams) -> RouteResult:
        """Send a task to the registered agent with the most of ``required_capabilities``
        (KSI's ROUTE_TASK) as a TASK_ASSIGNMENT: an agent that answers its messages runs a
        turn for it and answers the requester (``from_agent``, default the caller) with a
        DIRECT_MESSAGE; one that is away gets it when it connects. ``status:
        no_suitable_agent`` (a success, as in KSI) when none has any of them."""
        services = ctx.services
        agents = services.state.agent_list()
        task = {
            "task_id": uuid.uuid4().hex,
            "task": p.task,
            "context": p.context,
            "required_capabilities": p.required_capabilities,
        }
        found = best_agent(agents, p.required_capabilities, p.prefer_agent_id)
        if found is None:
            return RouteResult(status="no_suitable_agent", task=task, candidates=len(agents))
        agent, score = found
        ev = ctx.publish(
            "TASK_ASSIGNMENT",
            {"to": agent.agent_id, **task, "content": _task_prompt(p)},
            from_agent=p.from_agent or ctx.agent_id,
            to_agent=agent.agent_id,
        )
        if agent.respond_to_messages:
            delivery = Delivery(status="answering", message="the agent runs a turn", seq=ev.seq)
        elif services.agents.queued_offline(agent.agent_id, ev.seq):
            delivery = Delivery(status="queued", message="kept until it connects", seq=ev.seq)
        else:
            delivery = Delivery(status="delivered", message="sent to its connection", seq=ev.seq)
        return RouteResult(
            status="routed",
            routing=Routing(
                status="routed",
                assigned_agent=AssignedAgent(
                    id=agent.agent_id,
                    role=agent.role,
                    capabilities=agent.capabilities,
                    match_score=score,
                    status=agent.status,
                ),
            ),
            task=task,
            delivery=delivery,
            candidates=len(agents),
        )


def _task_prompt(p: RouteParams) -> str:
    needs = ", ".join(p.required_capabilities)
    text = f"Task (needs: {needs}):\n{p.task}"
    return f"{text}\n\nContext:\n{p.context}" if p.context.strip() else text
