"""Warm sessions with the REAL pinned Claude Code CLI, through the daemon, offline.

The loopback stub's request log shows what the CLI sent: the whole conversation on each warm
turn proves continuity on one long-lived process; the interrupted prompt followed by
"[Request interrupted by user]" proves CANCEL_PROCESS used the CLI's interrupt.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.client import AsyncClient
from devtools.stub_api import StubAPI
from tests.e2e.test_daemon_real_cli import model_calls, user_texts
from tests.helpers import DaemonProcess, eventually, pid_alive, wait_for


@pytest.fixture
def warm_daemon(start_real_daemon: Callable[..., DaemonProcess], claude_cwd: Path) -> DaemonProcess:
    # The pool's default cwd is the project root: make it the test's work dir.
    return start_real_daemon(
        KSI_WARM_DEFAULT="true", KSI_WARM_POOL_SIZE="1", KSI_PROJECT_ROOT=str(claude_cwd)
    )


async def started_pid(c: AsyncClient, reply: dict[str, Any]) -> int:
    assert reply["status"] == "success", reply
    process_id = reply["result"]["process_id"]
    while True:
        ev = await c.next_event(timeout=30)
        if ev["event"] == "PROCESS_STARTED" and ev["data"]["process_id"] == process_id:
            pid: int = ev["data"]["pid"]
            return pid


def stop_and_check(d: DaemonProcess, pids: list[int]) -> None:
    assert d.stop() == 0
    wait_for(lambda: not any(pid_alive(p) for p in pids), timeout=5)


async def test_pool_then_warm_conversation_on_one_process(
    warm_daemon: DaemonProcess, stub_api: StubAPI
) -> None:
    d = warm_daemon
    health = await eventually(
        lambda: (h := d.result("HEALTH_CHECK")["warm"])["pool_ready"] == 1 and h
    )
    (pool_pid,) = health["pool_pids"]
    async with AsyncClient.connect(d.socket) as c:
        await c.subscribe(["PROCESS_STARTED"])
        first = await c.request("SPAWN", {"prompt": "hello"})  # default flags: from the pool
        assert await started_pid(c, first) == pool_pid
        sid = first["result"]["session_id"]
        results = [first["result"]]
        for prompt in ("second", "third"):
            reply = await c.request("SPAWN", {"prompt": prompt, "session_id": sid})
            assert await started_pid(c, reply) == pool_pid
            results.append(reply["result"])
    assert [r["text"] for r in results] == ["echo: hello", "echo: second", "echo: third"]
    assert user_texts(model_calls(stub_api)[-1]) == [
        "user:hello",
        "assistant:echo: hello",
        "user:second",
        "assistant:echo: second",
        "user:third",
    ]
    # The CLI's total_cost_usd accumulates per process; the daemon reports per-turn costs.
    assert results[-1]["raw"]["total_cost_usd"] == pytest.approx(
        sum(r["cost_usd"] for r in results)
    )
    session = d.result("GET_SESSION", {"session_id": sid})["session"]
    assert session["warm"]["pid"] == pool_pid
    assert session["warm"]["rss_mb"] > 50  # the real CLI is ~150-210 MB resident
    assert session["total_cost_usd"] == pytest.approx(results[-1]["raw"]["total_cost_usd"])
    refill = await eventually(
        lambda: (h := d.result("HEALTH_CHECK")["warm"])["pool_ready"] == 1 and h
    )
    stop_and_check(d, [pool_pid, *refill["pool_pids"]])


async def test_cancel_mid_turn_uses_the_interrupt(
    warm_daemon: DaemonProcess, stub_api: StubAPI
) -> None:
    d = warm_daemon
    cwd = str(d.work)
    async with AsyncClient.connect(d.socket) as c:
        await c.subscribe(["PROCESS_STARTED"])
        first = await c.request("SPAWN", {"prompt": "first", "cwd": cwd})
        pid = await started_pid(c, first)
        sid = first["result"]["session_id"]
        job = await c.request(
            "SPAWN", {"prompt": "slow [[sleep:20]]", "session_id": sid, "mode": "async"}
        )
        assert await started_pid(c, job) == pid
        await eventually(lambda: any("sleep 20" in r["note"] for r in model_calls(stub_api)), 15)
        t0 = time.monotonic()
        cancelled = await c.call("CANCEL_PROCESS", {"process_id": job["result"]["process_id"]})
        assert cancelled["status"] == "cancelled"
        assert time.monotonic() - t0 < 2  # the interrupt answers in milliseconds
        assert pid_alive(pid)  # the warm CLI survived the interrupt
        after = await c.request("SPAWN", {"prompt": "after", "session_id": sid})
        assert await started_pid(c, after) == pid
    assert after["result"]["text"].endswith("after")
    assert user_texts(model_calls(stub_api)[-1]) == [
        "user:first",
        "assistant:echo: first",
        "user:slow [[sleep:20]]",
        "user:[Request interrupted by user]",
        "user:after",
    ]
    pool = d.result("HEALTH_CHECK")["warm"]["pool_pids"]
    stop_and_check(d, [pid, *pool])
