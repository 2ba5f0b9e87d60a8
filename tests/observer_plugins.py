"""Observer plugins used by the tests (loaded by a daemon subprocess via --observer)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, ClassVar

from daemon.events.observers import ObserverAPI


class Recorder:
    """Acts back through the command API: appends every event it sees to shared state."""

    event_types: ClassVar[list[str]] = ["PROCESS_*", "CUSTOM_*"]

    def __init__(self, api: ObserverAPI) -> None:
        self.api = api
        self.seen: list[dict[str, Any]] = []

    async def on_event(self, event: dict[str, Any]) -> None:
        self.seen.append(
            {
                "event": event["event"],
                "seq": event["seq"],
                "process_id": event["data"].get("process_id"),
            }
        )
        await self.api.call("SET_SHARED", {"key": "test.recorder", "value": self.seen})


class Crasher:
    def __init__(self, api: ObserverAPI) -> None:
        self.calls = 0

    async def on_event(self, event: dict[str, Any]) -> None:
        self.calls += 1
        raise RuntimeError("observer bug")


class Hanger:
    def __init__(self, api: ObserverAPI) -> None:
        pass

    async def on_event(self, event: dict[str, Any]) -> None:
        await asyncio.sleep(3600)


class BlockingSync:
    """A plain (non-async) observer that blocks: it must run off the event loop."""

    def __init__(self, api: ObserverAPI) -> None:
        pass

    def on_event(self, event: dict[str, Any]) -> None:
        time.sleep(0.5)


class FollowUp:
    """Acts on PROCESS_COMPLETE by SPAWNing one follow-up turn in the same session."""

    event_types: ClassVar[list[str]] = ["PROCESS_COMPLETE"]

    def __init__(self, api: ObserverAPI) -> None:
        self.api = api

    async def on_event(self, event: dict[str, Any]) -> None:
        data = event["data"]
        if data.get("status") == "completed" and "[[follow-up]]" in (data.get("text") or ""):
            await self.api.call(
                "SPAWN",
                {
                    "prompt": "follow-up turn",
                    "mode": "async",
                    "session_id": data["session_id"],
                    "agent_id": "follow-up-observer",
                },
            )
