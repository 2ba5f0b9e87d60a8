"""Warm sessions through the daemon: SPAWN -> LiteLLM -> provider -> WarmBackend -> fake CLI.

Each test runs a real daemon subprocess (tests/helpers.DaemonProcess). Process identity is
read from PROCESS_STARTED events, HEALTH_CHECK and GET_PROCESSES; "nothing left running" is
checked by pid after the daemon exited.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from daemon.claude.defaults import warm_max_for_memory
from daemon.client import AsyncClient
from tests.helpers import DaemonProcess, eventually, pid_alive
from tests.inproc import InProcessDaemon


@pytest.fixture
def make_daemon() -> Iterator[Any]:
    started: list[DaemonProcess] = []

    def make(**env: str) -> DaemonProcess:
        d = InProcessDaemon(env=env, preload=True).start()
        started.append(d)
        return d

    yield make
    for d in started:
        d.cleanup()


class Session:
    """One client connection subscribed to PROCESS_* events."""

    def __init__(self, d: DaemonProcess, c: AsyncClient) -> None:
        self.d, self.c = d, c
        self.events: list[dict[str, Any]] = []

    async def spawn(self, **params: Any) -> dict[str, Any]:
        params.setdefault("cwd", str(self.d.work))
        return await self.c.request("SPAWN", params)

    async def turn(self, **params: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """A sync SPAWN that must succeed; returns (result, its PROCESS_STARTED data)."""
        reply = await self.spawn(**params)
        assert reply["status"] == "success", reply
        result = reply["result"]
        return result, await self.event("PROCESS_STARTED", result["process_id"])

    async def event(self, name: str, process_id: str) -> dict[str, Any]:
        while True:
            for ev in self.events:
                if ev["event"] == name and ev["data"]["process_id"] == process_id:
                    return dict(ev["data"])
            self.events.append(await self.c.next_event(timeout=20))


async def connect(d: DaemonProcess) -> tuple[Session, AsyncClient]:
    c = await AsyncClient.open(d.socket)
    await c.subscribe(["PROCESS_*"])
    return Session(d, c), c


def shutdown_and_check(d: DaemonProcess, pids: list[int]) -> None:
    assert d.stop() == 0
    assert "daemon.stopped" in [e.get("event") for e in d.log_events()]
    deadline = time.monotonic() + 5
    while any(pid_alive(p) for p in pids):
        assert time.monotonic() < deadline, [p for p in pids if pid_alive(p)]
        time.sleep(0.02)


async def test_warm_conversation_flags_kill_cancel_and_shutdown(make_daemon: Any) -> None:
    d = make_daemon(KSI_WARM_DEFAULT="true", KSI_WARM_POOL_SIZE="0")
    s, c = await connect(d)
    try:
        r1, st1 = await s.turn(prompt="one")
        sid = r1["session_id"]
        r2, st2 = await s.turn(prompt="two", session_id=sid)
        r3, st3 = await s.turn(prompt="three", session_id=sid)
        assert [r["text"] for r in (r1, r2, r3)] == [
            "echo: one (turn 1)",
            "echo: two (turn 2)",
            "echo: three (turn 3)",
        ]
        assert st1["pid"] == st2["pid"] == st3["pid"]
        assert st1["warm"] is True
        assert all(r["warm"] is True for r in (r1, r2, r3))
        pid = st1["pid"]
        costs = [r["cost_usd"] for r in (r1, r2, r3)]
        assert r3["raw"]["total_cost_usd"] == pytest.approx(sum(costs))  # per-turn costs
        session = d.result("GET_SESSION", {"session_id": sid})["session"]
        assert session["total_cost_usd"] == pytest.approx(sum(costs))
        assert session["turns"] == 3
        warm = session["warm"]
        assert warm["pid"] == pid
        assert warm["turns"] == 3
        assert warm["rss_mb"] > 0
        assert warm["idle_s"] >= 0
        assert warm["started_at"].endswith("Z")
        listed = d.result("GET_SESSIONS")["sessions"][0]
        assert listed["warm"]["pid"] == pid
        health = d.result("HEALTH_CHECK")["warm"]
        assert (health["warm_sessions"], health["pool_ready"], health["pool_size"]) == (1, 0, 0)
        assert 1 <= health["max_warm"] <= 16  # from the memory available at start
        assert health["idle_timeout_s"] == 600.0
        procs = d.result("GET_PROCESSES")
        assert [w["pid"] for w in procs["warm"]] == [pid]
        assert procs["processes"][-1]["warm"] is True
        assert procs["processes"][-1]["pid"] == pid

        # Other flags: a new process resumes the session.
        r4, st4 = await s.turn(prompt="four", session_id=sid, model="opus")
        assert r4["text"] == "echo: four (turn 4)"
        assert st4["pid"] != pid
        await eventually(lambda: not pid_alive(pid))

        # Killed while idle: the next turn resumes in a new process, nothing is lost.
        os.kill(st4["pid"], signal.SIGKILL)
        await eventually(lambda: not pid_alive(st4["pid"]))
        r5, st5 = await s.turn(prompt="five", session_id=sid, model="opus")
        assert r5["text"] == "echo: five (turn 5)"
        assert st5["pid"] != st4["pid"]

        # CANCEL_PROCESS mid-turn interrupts the turn; the warm process survives.
        slow = await s.spawn(prompt="[[sleep:30]]", session_id=sid, model="opus", mode="async")
        started = await s.event("PROCESS_STARTED", slow["result"]["process_id"])
        assert started["pid"] == st5["pid"]
        t0 = time.monotonic()
        cancelled = d.result("CANCEL_PROCESS", {"process_id": slow["result"]["process_id"]})
        assert cancelled["status"] == "cancelled"
        assert time.monotonic() - t0 < 5
        done = await s.event("PROCESS_COMPLETE", slow["result"]["process_id"])
        assert done["status"] == "cancelled"
        r7, st7 = await s.turn(prompt="seven", session_id=sid, model="opus")
        assert r7["text"] == "echo: seven (turn 7)"
        assert st7["pid"] == st5["pid"]
        pids = [st1["pid"], st4["pid"], st5["pid"]]
    finally:
        await c.close()
    shutdown_and_check(d, pids)


def _shape(obj: Any) -> Any:
    """Keys (recursively) of a JSON value: what must match between cold and warm."""
    if isinstance(obj, dict):
        return {k: _shape(v) for k, v in obj.items()}
    return type(obj).__name__


async def test_logs_state_and_events_identical_in_both_modes(make_daemon: Any) -> None:
    d = make_daemon()
    s, c = await connect(d)
    runs: dict[bool, dict[str, Any]] = {}
    try:
        for mode in (False, True):
            r1, st1 = await s.turn(prompt="one", warm=mode, agent_id="a", new_session=True)
            sid = r1["session_id"]
            r2, st2 = await s.turn(prompt="two", warm=mode, session_id=sid, agent_id="a")
            err = await s.spawn(prompt="[[error:500]]", warm=mode, session_id=sid)
            assert err["error"]["code"] == "API_ERROR"
            complete = await s.event("PROCESS_COMPLETE", r2["process_id"])
            lines = (d.log_dir / f"{sid}.jsonl").read_bytes().splitlines()
            log = [orjson.loads(x) for x in lines]
            runs[mode] = {
                "results": (r1, r2),
                "started": (st1, st2),
                "complete": complete,
                "error": err["error"],
                "log": log,
                "session": d.result("GET_SESSION", {"session_id": sid}),
            }
    finally:
        await c.close()
    cold, warm = runs[False], runs[True]
    assert warm["started"][0]["pid"] == warm["started"][1]["pid"]
    assert cold["started"][0]["pid"] != cold["started"][1]["pid"]
    assert [r["text"] for r in warm["results"]] == [r["text"] for r in cold["results"]]
    for key in ("results", "started", "complete", "log"):
        assert _shape(warm[key]) == _shape(cold[key]), key
    assert [x["type"] for x in warm["log"]] == ["human", "claude"] * 2 + ["human", "error"]
    assert set(warm["error"]["details"]) == set(cold["error"]["details"])
    assert warm["error"]["details"]["exit_code"] is None  # the warm CLI did not exit
    ignore = {
        "session_id",
        "last_process_id",
        "log_path",
        "created_at",
        "last_used_at",
        "idle_expires_at",  # last_used_at plus the idle timeout
        "total_cost_usd",
        "warm",
    }
    ws, cs = warm["session"]["session"], cold["session"]["session"]
    assert {k: v for k, v in ws.items() if k not in ignore} == {
        k: v for k, v in cs.items() if k not in ignore
    }
    assert ws["turns"] == cs["turns"]
    assert ws["total_cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in warm["results"]))
    assert [p["status"] for p in warm["session"]["processes"]] == [
        p["status"] for p in cold["session"]["processes"]
    ]


async def test_lru_cap_then_idle_expiry_then_resume(make_daemon: Any) -> None:
    d = make_daemon(KSI_WARM_DEFAULT="true", KSI_WARM_MAX="2", KSI_WARM_IDLE_S="1.5")
    s, c = await connect(d)
    try:
        first = [await s.turn(prompt=f"s{i}") for i in range(3)]
        pids = [st["pid"] for _, st in first]
        await eventually(lambda: not pid_alive(pids[0]), timeout=3)  # the oldest of three was ended
        assert pid_alive(pids[1])
        assert pid_alive(pids[2])
        assert d.result("HEALTH_CHECK")["warm"]["warm_sessions"] == 2
        await eventually(lambda: not any(pid_alive(p) for p in pids), timeout=8)  # idle expiry
        assert d.result("HEALTH_CHECK")["warm"]["warm_sessions"] == 0
        sid = first[1][0]["session_id"]
        assert d.result("GET_SESSION", {"session_id": sid})["session"].get("warm") is None
        again, st = await s.turn(prompt="back", session_id=sid)
        assert again["text"] == "echo: back (turn 2)"
        assert st["pid"] not in pids
    finally:
        await c.close()
    shutdown_and_check(d, [*pids, st["pid"]])


async def test_pool_hands_out_its_process_and_refills(make_daemon: Any) -> None:
    d = make_daemon(KSI_WARM_DEFAULT="true", KSI_WARM_POOL_SIZE="1")
    health = await eventually(
        lambda: (h := d.result("HEALTH_CHECK")["warm"])["pool_ready"] == 1 and h
    )
    (pool_pid,) = health["pool_pids"]
    (pooled,) = d.result("GET_PROCESSES")["warm"]
    assert pooled["pid"] == pool_pid
    assert pooled["pooled"] is True
    s, c = await connect(d)
    try:
        # No cwd, model or tool options: the pool's default flags.
        reply = await c.request("SPAWN", {"prompt": "hello", "mode": "async"})
        pid_ = reply["result"]["process_id"]
        assert reply["result"]["session_id"] == pooled["session_id"]  # known at once
        started = await s.event("PROCESS_STARTED", pid_)
        assert started["pid"] == pool_pid
        assert started["session_id"] == pooled["session_id"]
        done = await s.event("PROCESS_COMPLETE", pid_)
        assert done["status"] == "completed"
        assert done["session_id"] == pooled["session_id"]
        assert done["text"] == "echo: hello (turn 1)"
        assert (d.log_dir / f"{pooled['session_id']}.jsonl").exists()
        refill = await eventually(
            lambda: (h := d.result("HEALTH_CHECK")["warm"])["pool_ready"] == 1 and h
        )
        assert refill["pool_pids"] != [pool_pid]
        assert refill["session_pids"] == [pool_pid]
        # A cwd other than the default does not match the pool.
        other, st = await s.turn(prompt="elsewhere")
        assert st["pid"] not in (pool_pid, *refill["pool_pids"])
        assert other["session_id"] != pooled["session_id"]
    finally:
        await c.close()
    shutdown_and_check(d, [pool_pid, *refill["pool_pids"], st["pid"]])


# -- the defaults ------------------------------------------------------------------------


def test_warm_cap_follows_the_memory_available() -> None:
    mib = 1024 * 1024
    assert warm_max_for_memory(0) == 1  # at least one, or warm mode would be off
    assert warm_max_for_memory(1024 * mib) == 3  # half of 1 GiB at 150 MiB each
    assert warm_max_for_memory(3000 * mib) == 10
    assert warm_max_for_memory(1024 * 1024 * mib) == 16  # a sane ceiling
    assert 1 <= warm_max_for_memory() <= 16  # this machine


async def test_a_fresh_daemon_runs_turn_two_on_a_warm_process() -> None:
    d = InProcessDaemon(preload=True, defaults=True)  # no warm flags or KSI_WARM_*
    # Turns without a cwd run in the project root: the test's own directory here.
    d.env_overrides["KSI_PROJECT_ROOT"] = str(d.work)
    d.start()
    try:
        health = d.result("HEALTH_CHECK")["warm"]
        assert health["pool_size"] == 1
        assert 1 <= health["max_warm"] <= 16
        await eventually(lambda: d.result("HEALTH_CHECK")["warm"]["pool_ready"] == 1)
        pooled = next(w for w in d.result("GET_PROCESSES")["warm"] if w["pooled"])
        s, c = await connect(d)
        try:
            r1, st1 = await s.turn(prompt="one")
            r2, st2 = await s.turn(prompt="two", session_id=r1["session_id"])
            r3, st3 = await s.turn(prompt="cold, on request", warm=False)
        finally:
            await c.close()
        # Turn 1 took the pre-warmed CLI (its id is the session's), turn 2 ran on it.
        assert r1["session_id"] == pooled["session_id"]
        assert st1["pid"] == st2["pid"] == pooled["pid"]
        assert (r1["warm"], r2["warm"], st2["warm"]) == (True, True, True)
        assert r2["text"] == "echo: two (turn 2)"
        session = d.result("GET_SESSION", {"session_id": r1["session_id"]})["session"]
        assert session["warm"]["pid"] == st2["pid"]
        assert session["warm"]["turns"] == 2
        # warm: false is the opt-out: a CLI of its own, gone after the turn.
        assert (r3["warm"], st3["warm"]) == (False, False)
        await eventually(lambda: not pid_alive(st3["pid"]))
    finally:
        d.cleanup()


def test_warm_off_means_no_pool_and_the_cap_is_configurable(make_daemon: Any) -> None:
    off = make_daemon(KSI_WARM_DEFAULT="false")
    assert off.result("HEALTH_CHECK")["warm"]["pool_size"] == 0
    capped = make_daemon(KSI_WARM_MAX="3")
    assert capped.result("HEALTH_CHECK")["warm"]["max_warm"] == 3
