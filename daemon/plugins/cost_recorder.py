"""Example cognitive observer: keeps a running cost and turn summary per session and agent.

Enable with ``--observer daemon.plugins.cost_recorder:CostRecorder``. On every
PROCESS_COMPLETE it updates its totals and acts back through the command API: the summary
is stored with ``SET_SHARED`` under ``observers.cost_recorder`` (readable by any client
with ``GET_SHARED``), and a COST_UPDATE event is published when a session's cost changes.
"""

from __future__ import annotations

from typing import Any, ClassVar

from daemon.events.observers import ObserverAPI

SHARED_KEY = "observers.cost_recorder"


class CostRecorder:
    event_types: ClassVar[list[str]] = ["PROCESS_COMPLETE"]

    def __init__(self, api: ObserverAPI) -> None:
        self.api = api
        self.sessions: dict[str, dict[str, Any]] = {}
        self.agents: dict[str, dict[str, Any]] = {}
        self.total_cost_usd = 0.0
        self.turns = {"completed": 0, "failed": 0}

    async def start(self) -> None:
        # Carry totals across daemon restarts: the last summary is in shared state.
        stored = await self.api.call("GET_SHARED", {"key": SHARED_KEY})
        if stored["found"] and isinstance(stored["value"], dict):
            value = stored["value"]
            self.sessions = value.get("sessions", {})
            self.agents = value.get("agents", {})
            self.total_cost_usd = value.get("total_cost_usd", 0.0)
            self.turns = value.get("turns", self.turns)

    async def on_event(self, event: dict[str, Any]) -> None:
        data = event["data"]
        ok = data.get("status") == "completed"
        self.turns["completed" if ok else "failed"] += 1
        cost = float(data.get("cost_usd") or 0.0)
        self.total_cost_usd = round(self.total_cost_usd + cost, 10)
        for table, key in (
            (self.sessions, data.get("session_id")),
            (self.agents, data.get("agent_id")),
        ):
            if not key:
                continue
            row = table.setdefault(key, {"turns": 0, "failed": 0, "cost_usd": 0.0})
            row["turns" if ok else "failed"] += 1
            row["cost_usd"] = round(row["cost_usd"] + cost, 10)
        await self.api.call("SET_SHARED", {"key": SHARED_KEY, "value": self.summary()})
        if cost and data.get("session_id"):
            await self.api.call(
                "PUBLISH",
                {
                    "event_type": "COST_UPDATE",
                    "payload": {
                        "session_id": data["session_id"],
                        "agent_id": data.get("agent_id"),
                        "turn_cost_usd": cost,
                        "session_cost_usd": self.sessions[data["session_id"]]["cost_usd"],
                        "total_cost_usd": self.total_cost_usd,
                    },
                    "from_agent": "cost_recorder",
                },
            )

    def summary(self) -> dict[str, Any]:
        return {
            "total_cost_usd": self.total_cost_usd,
            "turns": self.turns,
            "sessions": self.sessions,
            "agents": self.agents,
        }
