"""Housekeeping the original KSI daemon offered: CLEANUP, MESSAGE_BUS_STATS, and reloading an
observer plugin without a restart (RELOAD_MODULE, and RELOAD as KSI's clients spelled it)."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from daemon.commands.registry import Context, NoParams, Params, Registry, Result

CleanupType = Literal["logs", "sessions", "sockets", "all"]


class CleanupParams(Params):
    cleanup_type: CleanupType = Field(
        description="logs: idle sessions' JSONL logs; sessions: the daemon's records of idle "
        "sessions; sockets: stale files beside the socket; all: the three"
    )
    older_than_s: float = Field(
        default=0.0,
        ge=0,
        allow_inf_nan=False,
        description="only what has not been used (logs: written) for this long",
    )


class CleanupResult(Result):
    status: Literal["cleaned"]
    cleanup_type: CleanupType
    details: str = Field(description="what was removed, in words (KSI's field)")
    removed: dict[str, int] = Field(description="how many of each kind were removed")
    kept_busy: int = Field(
        description="logs and records left because their session has a queued or running "
        "turn or a warm CLI"
    )


class BusStatsResult(Result):
    connected_agents: list[str]
    subscriptions: dict[str, list[str]] = Field(
        description="each subscribed pattern and the agents (or connections) subscribed to it"
    )
    offline_queues: dict[str, int] = Field(description="messages kept for agents that are away")
    history_size: int
    last_seq: int
    subscribers: int


class ReloadParams(Params):
    module_name: str = Field(
        default="handler",
        min_length=1,
        max_length=256,
        description="an observer's spec (module:factory), its module, or the module's last name",
    )


class ReloadResult(Result):
    status: Literal["reloaded"]
    module: str
    observers: list[str] = Field(description="the observer specs restarted on the new code")
    message: str


def busy_sessions(ctx: Context) -> set[str]:
    """Sessions a cleanup must not touch: a turn is queued or running, or a warm CLI lives."""
    turns = ctx.services.turns
    busy = {t.session_id for t in turns.turns.values()}
    busy.update(str(p["session_id"]) for p in turns.engine.warm_processes() if p.get("session_id"))
    return busy


def _clean_logs(log_dir: Path, busy: set[str], cutoff: float) -> tuple[int, int]:
    removed = kept = 0
    for path in log_dir.glob("*.jsonl"):
        if path.is_symlink():  # latest.jsonl: re-pointed by the turn log; broken ones go
            if not path.exists():
                path.unlink(missing_ok=True)
            continue
        if path.stem in busy:
            kept += 1
            continue
        try:
            if path.stat().st_mtime > cutoff:
                continue
            path.unlink()
        except FileNotFoundError:
            continue
        removed += 1
    return removed, kept


def _clean_sockets(sock_path: Path, keep: set[Path]) -> int:
    """Files beside the socket that nothing owns: sockets no daemon listens on, and leftovers
    (``*.new``, ``*.tmp``). The live socket and the pid file stay."""
    removed = 0
    for path in sock_path.parent.iterdir():
        if path in keep or path.is_dir():
            continue
        if path.suffix in (".new", ".tmp", ".old") or (path.is_socket() and not _listening(path)):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _listening(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.2)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def register(r: Registry) -> None:
    @r.command("CLEANUP", params=CleanupParams, result=CleanupResult)
    async def cleanup(ctx: Context, p: CleanupParams) -> CleanupResult:
        """Remove what idle sessions left behind: ``logs`` (their JSONL turn logs),
        ``sessions`` (the daemon's records of them: GET_SESSIONS forgets them, the CLI's own
        transcripts stay, so a session_id still resumes), ``sockets`` (stale files in the
        socket's directory, never the live socket or the pid file) or ``all``. A session
        with a queued or running turn or a warm CLI is never touched."""
        settings = ctx.services.settings
        busy = busy_sessions(ctx)
        cutoff = time.time() - p.older_than_s
        kinds = ("logs", "sessions", "sockets") if p.cleanup_type == "all" else (p.cleanup_type,)
        removed: dict[str, int] = {}
        kept = 0
        if "logs" in kinds:
            removed["logs"], kept_logs = _clean_logs(settings.log_path, busy, cutoff)
            kept += kept_logs
        if "sessions" in kinds:
            removed["sessions"], kept_records = await ctx.services.state.forget_sessions(
                busy, cutoff
            )
            kept += kept_records
        if "sockets" in kinds:
            keep = {settings.socket_path, settings.pid_path}
            removed["sockets"] = _clean_sockets(settings.socket_path, keep)
        where = {
            "logs": f"log file(s) from {settings.log_path}",
            "sessions": "idle session record(s)",
            "sockets": f"stale file(s) from {settings.socket_path.parent}",
        }
        details = "Removed " + ", ".join(f"{n} {where[k]}" for k, n in removed.items())
        ctx.services.bus.publish("CLEANUP_DONE", {"cleanup_type": p.cleanup_type, **removed})
        return CleanupResult(
            status="cleaned",
            cleanup_type=p.cleanup_type,
            details=details,
            removed=removed,
            kept_busy=kept,
        )

    @r.command("MESSAGE_BUS_STATS", params=NoParams, result=BusStatsResult)
    def message_bus_stats(ctx: Context, p: NoParams) -> BusStatsResult:
        """Who is on the bus: agents with a subscribing connection, every subscribed
        pattern with its subscribers, messages kept for agents that are away, history size."""
        bus = ctx.services.bus
        subscriptions: dict[str, list[str]] = {}
        connected: set[str] = set()
        for sub in bus.subscribers:
            if sub.dropped or sub.sees_directed:  # observers are not bus members here
                continue
            who = sub.agent_id or sub.name
            if sub.agent_id is not None:
                connected.add(sub.agent_id)
            for pattern in sub.patterns.items:
                subscriptions.setdefault(pattern, []).append(who)
        offline = {agent: len(kept) for agent, kept in ctx.services.agents.offline.items() if kept}
        return BusStatsResult(
            connected_agents=sorted(connected),
            subscriptions={k: sorted(v) for k, v in sorted(subscriptions.items())},
            offline_queues=offline,
            history_size=len(bus.history),
            last_seq=bus.seq,
            subscribers=len(bus.subscribers),
        )

    @r.command("RELOAD_MODULE", params=ReloadParams, result=ReloadResult, aliases=("RELOAD",))
    async def reload_module(ctx: Context, p: ReloadParams) -> ReloadResult:
        """Reload an observer plugin's module and restart the observers built from it, on
        the new code, without restarting the daemon. If the new code fails to import or to
        start, the old observer keeps running (RELOAD_FAILED). OBSERVER_NOT_FOUND if no
        configured observer comes from that module."""
        module, specs = await ctx.services.reload_observer(p.module_name)
        return ReloadResult(
            status="reloaded",
            module=module,
            observers=specs,
            message=f"reloaded {module}; restarted {len(specs)} observer(s)",
        )
