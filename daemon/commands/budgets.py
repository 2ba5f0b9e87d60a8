"""Budgets and turn caps of sessions and agents (daemon/turns/limits.py)."""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field, model_validator

from daemon.claude.options import UsdAmount
from daemon.commands.registry import Context, Params, Registry, Result
from daemon.turns.limits import BudgetInfo, Scope


class _Target(Params):
    # Strict, as SPAWN: "5" is not a budget.
    model_config = ConfigDict(extra="forbid", strict=True)

    session_id: str | None = Field(default=None, min_length=1, max_length=128)
    agent_id: str | None = Field(default=None, min_length=1, max_length=256)

    def target(self) -> tuple[Scope, str] | None:
        if self.session_id is not None:
            return "session", self.session_id
        if self.agent_id is not None:
            return "agent", self.agent_id
        return None


class SetBudgetParams(_Target):
    max_cost_usd: UsdAmount | None = Field(
        default=None,
        description="what all the session's (or agent's) turns may cost together; null "
        "removes the budget. Turns that would start over it get BUDGET_EXCEEDED",
    )
    max_iterations: int | None = Field(
        default=None,
        ge=1,
        description="sessions only: how many turns the session may run; null removes the cap",
    )

    @model_validator(mode="after")
    def _one_target(self) -> SetBudgetParams:
        if (self.session_id is None) == (self.agent_id is None):
            raise ValueError("give exactly one of session_id and agent_id")
        if self.agent_id is not None and "max_iterations" in self.model_fields_set:
            raise ValueError("max_iterations is a session's cap; an agent has none")
        if not self.model_fields_set & {"max_cost_usd", "max_iterations"}:
            raise ValueError("give max_cost_usd or max_iterations (null removes it)")
        return self


class BudgetResult(Result):
    budget: BudgetInfo


class GetBudgetsParams(_Target):
    pass


class BudgetsResult(Result):
    budgets: list[BudgetInfo]


def register(r: Registry) -> None:
    @r.command("SET_BUDGET", params=SetBudgetParams, result=BudgetResult)
    async def set_budget(ctx: Context, p: SetBudgetParams) -> BudgetResult:
        """Set (or with null remove) a session's or an agent's budget in USD, and a
        session's turn cap (max_iterations); kept across restarts. Spend is the CLI's
        reported cost of the turns so far."""
        target = p.target()
        assert target is not None
        limits = ctx.services.turns.limits
        changes: dict[str, Any] = {k: getattr(p, k) for k in p.model_fields_set}
        changes.pop("session_id", None)
        changes.pop("agent_id", None)
        await limits.set(*target, changes)
        return BudgetResult(budget=await limits.info(*target))

    @r.command("GET_BUDGETS", params=GetBudgetsParams, result=BudgetsResult)
    async def get_budgets(ctx: Context, p: GetBudgetsParams) -> BudgetsResult:
        """Budgets with what has been spent of them: one session's or agent's (also when it
        has none), else every one that is set."""
        limits = ctx.services.turns.limits
        target = p.target()
        keys = [target] if target is not None else limits.known()
        return BudgetsResult(budgets=[await limits.info(*k) for k in keys])
