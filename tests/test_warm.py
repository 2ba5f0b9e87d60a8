"""Warm sessions at engine level: ClaudeEngine + WarmBackend driving the fake CLI.

The fake behaves like the real 2.1.197 in warm mode (init line per turn, nothing at start,
accumulating total_cost_usd, interrupt control requests). Continuity is visible in the
fake's "(turn N)" answers; process identity and death are checked by pid. Daemon-level
tests of the same features are in tests/test_warm_daemon.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from daemon.claude import ClaudeCLIError, ClaudeEngine, ClaudeOptions, ErrorCode, StartInfo
from tests.test_engine import Env
from tests.test_runner import assert_gone, is_gone, wait_for_file


async def until(pred: Any, within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "condition not met"
        await asyncio.sleep(0.01)


def warm_opts(session_id: str | None = None, **kw: Any) -> ClaudeOptions:
    return ClaudeOptions(session_id=session_id, warm=True, **kw)


class Recorder:
    """on_start hook collecting StartInfo per turn."""

    def __init__(self) -> None:
        self.starts: list[StartInfo] = []

    def opts(self, session_id: str | None = None, **kw: Any) -> ClaudeOptions:
        return warm_opts(session_id, on_start=self.starts.append, **kw)

    @property
    def pids(self) -> list[int]:
        return [s.pid for s in self.starts]


@pytest.fixture(name="env")
def _env(tmp_path: Path) -> Env:
    return Env(tmp_path)


@pytest.fixture(name="engine")
async def _engine(env: Env) -> AsyncIterator[ClaudeEngine]:
    engine = env.engine(warm_interrupt_wait_s=0.5)
    yield engine
    await engine.aclose()


def invocations(env: Env) -> list[list[str]]:
    return [e["argv"] for e in env.invocations() if "-p" in e["argv"]]


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


async def test_conversation_on_one_process_with_per_turn_cost(
    engine: ClaudeEngine, env: Env
) -> None:
    rec = Recorder()
    first = await engine.run_turn("one", opts=rec.opts())
    sid = first.session_id
    turns = [first] + [await engine.run_turn(p, opts=rec.opts(sid)) for p in ("two", "three")]
    assert [t.text for t in turns] == [
        f"echo: {p} (turn {n})" for n, p in enumerate(("one", "two", "three"), 1)
    ]
    assert {s.mode for s in rec.starts} == {"warm"}
    assert len(set(rec.pids)) == 1
    assert {t.pid for t in turns} == set(rec.pids)
    (argv,) = invocations(env)  # one CLI for three turns
    assert "--input-format" in argv
    assert flag(argv, "--session-id") == sid
    # total_cost_usd accumulates over the process; TurnResult.cost_usd is per turn.
    totals = [t.raw["total_cost_usd"] for t in turns]
    assert totals == sorted(totals)
    assert totals[0] > 0
    assert [t.cost_usd for t in turns] == pytest.approx(
        [totals[0], totals[1] - totals[0], totals[2] - totals[1]]
    )
    assert sum(t.cost_usd for t in turns) == pytest.approx(totals[-1])
    info = engine.warm_session(sid)
    assert info is not None
    assert info["pid"] == rec.pids[0]
    assert info["turns"] == 3
    assert info["rss_mb"] > 0
    assert info["idle_s"] >= 0
    assert info["started_at"].endswith("Z")
    status = engine.warm_status()
    assert (status["warm_sessions"], status["pool_ready"]) == (1, 0)
    # Not configured: what the machine's memory holds, within bounds.
    assert status["max_warm"] == engine.config.warm_max
    assert 1 <= status["max_warm"] <= 16
    assert status["idle_timeout_s"] == 600.0


async def test_changed_flags_restart_with_resume(engine: ClaudeEngine, env: Env) -> None:
    rec = Recorder()
    sid = (await engine.run_turn("one", opts=rec.opts())).session_id
    second = await engine.run_turn("two", model="sonnet", opts=rec.opts(sid, max_turns=3))
    third = await engine.run_turn("three", model="sonnet", opts=rec.opts(sid, max_turns=3))
    assert (second.text, third.text) == ("echo: two (turn 2)", "echo: three (turn 3)")
    assert second.model == "claude-sonnet-5"
    assert rec.pids[0] != rec.pids[1] == rec.pids[2]
    await assert_gone(rec.pids[0])
    old, new = invocations(env)
    assert flag(old, "--session-id") == sid
    assert "--model" not in old
    assert flag(new, "--resume") == sid
    assert flag(new, "--model") == "sonnet"


async def test_idle_expiry_then_transparent_resume(env: Env) -> None:
    engine = env.engine(warm_idle_s=0.3)
    try:
        rec = Recorder()
        sid = (await engine.run_turn("one", opts=rec.opts())).session_id
        await assert_gone(rec.pids[0], within=3)
        assert engine.warm_session(sid) is None
        again = await engine.run_turn("two", opts=rec.opts(sid))
        assert again.text == "echo: two (turn 2)"
        assert again.pid != rec.pids[0]
        assert flag(invocations(env)[-1], "--resume") == sid
    finally:
        await engine.aclose()


async def test_process_killed_while_idle_is_not_restarted(engine: ClaudeEngine, env: Env) -> None:
    rec = Recorder()
    sid = (await engine.run_turn("one", opts=rec.opts())).session_id
    os.kill(rec.pids[0], signal.SIGKILL)  # non-zero exit: a supervisor would restart it
    await assert_gone(rec.pids[0])
    await asyncio.sleep(0.3)
    assert len(invocations(env)) == 1  # nothing re-ran the old argv (--session-id reuse)
    assert engine.warm_session(sid) is None
    again = await engine.run_turn("two", opts=rec.opts(sid))  # the turn is not lost
    assert again.text == "echo: two (turn 2)"
    assert flag(invocations(env)[-1], "--resume") == sid


async def test_death_mid_turn_fails_that_turn_only(engine: ClaudeEngine, env: Env) -> None:
    rec = Recorder()
    sid = (await engine.run_turn("one", opts=rec.opts())).session_id
    with pytest.raises(ClaudeCLIError) as info:
        await engine.run_turn("[[crash:3]] two", opts=rec.opts(sid))
    assert info.value.code is ErrorCode.CLI_CRASHED
    assert info.value.exit_code == 3
    assert "simulated crash" in info.value.stderr_tail
    log = [json.loads(line) for line in env.log.read_text().splitlines()]
    prompts = [e["turn_prompt"] for e in log if "turn_prompt" in e]
    assert prompts.count("[[crash:3]] two") == 1  # never re-sent
    after = await engine.run_turn("three", opts=rec.opts(sid))
    assert after.text == "echo: three (turn 2)"  # the crash hit before the prompt was stored
    assert len(set(rec.pids)) == 2


async def test_unparseable_output_of_a_dying_warm_cli_is_in_its_error(
    engine: ClaudeEngine,
) -> None:
    rec = Recorder()
    sid = (await engine.run_turn("one", opts=rec.opts())).session_id
    with pytest.raises(ClaudeCLIError) as info:
        await engine.run_turn("[[bad-json]] two", opts=rec.opts(sid))
    assert info.value.code is ErrorCode.INVALID_OUTPUT
    assert info.value.raw is not None
    assert "this is not json" in info.value.raw["stdout_excerpt"]


async def test_cancel_interrupts_and_keeps_the_process(engine: ClaudeEngine) -> None:
    rec = Recorder()
    sid = (await engine.run_turn("one", opts=rec.opts())).session_id
    task = asyncio.create_task(engine.run_turn("slow [[sleep:30]]", opts=rec.opts(sid)))
    await until(lambda: len(rec.starts) >= 2)
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    after = await engine.run_turn("after", opts=rec.opts(sid))
    assert after.text == "echo: after (turn 3)"  # the interrupted prompt stays in the history
    assert len(set(rec.pids)) == 1
    assert engine.describe()["running"] == 0


async def test_cancel_of_a_stuck_turn_kills_and_resumes(engine: ClaudeEngine, env: Env) -> None:
    rec = Recorder()
    sid = (await engine.run_turn("one", opts=rec.opts())).session_id
    grandchild = env.tmp / "gc.pid"
    task = asyncio.create_task(
        engine.run_turn(f"[[grandchild:{grandchild}]][[hang:30]]", opts=rec.opts(sid))
    )
    gc_pid = int(await wait_for_file(grandchild))
    task.cancel()  # the fake does not read stdin: the interrupt goes unanswered
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    await assert_gone(rec.pids[0], gc_pid)
    after = await engine.run_turn("after", opts=rec.opts(sid))
    assert after.pid != rec.pids[0]
    assert after.text.startswith("echo: after")
    assert flag(invocations(env)[-1], "--resume") == sid


async def test_timeout_interrupts_then_kills_if_needed(engine: ClaudeEngine) -> None:
    rec = Recorder()
    sid = (await engine.run_turn("one", opts=rec.opts())).session_id
    with pytest.raises(ClaudeCLIError) as soft:
        await engine.run_turn("[[sleep:30]]", opts=rec.opts(sid, timeout_s=0.3))
    assert soft.value.code is ErrorCode.TIMEOUT
    assert "interrupted" in soft.value.message
    assert engine.warm_session(sid)["pid"] == rec.pids[0]  # type: ignore[index]
    with pytest.raises(ClaudeCLIError) as hard:
        await engine.run_turn("[[hang:30]]", opts=rec.opts(sid, timeout_s=0.3))
    assert hard.value.code is ErrorCode.TIMEOUT
    assert "killed" in hard.value.message
    await assert_gone(rec.pids[0])
    assert (await engine.run_turn("ok", opts=rec.opts(sid))).text.startswith("echo: ok")


async def test_api_error_keeps_process_and_cost_baseline(engine: ClaudeEngine) -> None:
    rec = Recorder()
    first = await engine.run_turn("one", opts=rec.opts())
    with pytest.raises(ClaudeCLIError) as info:
        await engine.run_turn("[[error:429]]", opts=rec.opts(first.session_id))
    assert info.value.code is ErrorCode.RATE_LIMITED
    assert info.value.exit_code is None
    third = await engine.run_turn("three", opts=rec.opts(first.session_id))
    assert third.cost_usd == pytest.approx(third.raw["total_cost_usd"] - first.cost_usd)
    assert len(set(rec.pids)) == 1


async def test_lru_cap_ends_the_least_recently_used(env: Env) -> None:
    engine = env.engine(warm_max=2)
    try:
        recs = [Recorder() for _ in range(3)]
        sids = [
            (await engine.run_turn(f"s{i}", opts=r.opts())).session_id
            for i, r in enumerate(recs[:2])
        ]
        await engine.run_turn("touch", opts=recs[0].opts(sids[0]))  # session 1 is now the LRU
        sids.append((await engine.run_turn("s2", opts=recs[2].opts())).session_id)
        await assert_gone(recs[1].pids[0])
        assert not is_gone(recs[0].pids[0])
        assert not is_gone(recs[2].pids[0])
        assert engine.warm_status()["warm_sessions"] == 2
        back = await engine.run_turn("back", opts=recs[1].opts(sids[1]))
        assert back.text == "echo: back (turn 2)"
        await assert_gone(recs[0].pids[0])  # now session 0 was the least recently used
    finally:
        await engine.aclose()


async def test_pool_hands_out_a_started_process_and_refills(env: Env) -> None:
    engine = env.engine(warm_pool_size=1)
    try:
        engine.start_pool()
        await until(lambda: engine.warm_status()["pool_pids"])
        (pooled,) = engine.warm_processes()
        assert pooled["pooled"] is True
        assert pooled["turns"] == 0
        pool_pid, pool_sid = pooled["pid"], pooled["session_id"]
        rec = Recorder()
        first = await engine.run_turn("one", opts=rec.opts())
        assert rec.pids == [pool_pid]
        assert first.session_id == pool_sid
        assert rec.starts[0].session_id == pool_sid
        assert first.text == "echo: one (turn 1)"
        await until(lambda: engine.warm_status()["pool_ready"] >= 1)
        (refill_pid,) = engine.warm_status()["pool_pids"]
        assert refill_pid != pool_pid
        # Other flags (or an explicit session id) never take a pool process.
        other = await engine.run_turn("two", model="opus", opts=rec.opts())
        explicit = str(uuid.uuid4())
        mine = await engine.run_turn("three", opts=warm_opts(new_session_id=explicit))
        assert other.pid != refill_pid
        assert mine.session_id == explicit
        assert engine.warm_status()["pool_pids"] == [refill_pid]
        # A stream's session id is the pool process's too.
        stream = engine.stream_turn("four", opts=warm_opts())
        async with stream:
            kinds = [event["type"] async for event in stream]
        assert kinds == ["system", "assistant", "result"]
        assert stream.session_id == stream.result.session_id  # type: ignore[union-attr]
        assert stream.result.pid == refill_pid  # type: ignore[union-attr]
    finally:
        await engine.aclose()


async def test_stream_aclose_mid_turn_interrupts(engine: ClaudeEngine) -> None:
    rec = Recorder()
    sid = (await engine.run_turn("one", opts=rec.opts())).session_id
    stream = engine.stream_turn("slow [[sleep:30]]", opts=rec.opts(sid))
    first = await stream.__anext__()
    assert first["type"] == "system"
    assert first["subtype"] == "init"
    await asyncio.wait_for(stream.aclose(), 5)
    after = await engine.run_turn("after", opts=rec.opts(sid))
    assert after.text == "echo: after (turn 3)"
    assert len(set(rec.pids)) == 1


async def test_large_line_and_unknown_session(engine: ClaudeEngine) -> None:
    big = await engine.run_turn("[[huge:3000000]]", opts=warm_opts())
    assert len(big.text) == 3_000_000
    with pytest.raises(ClaudeCLIError) as info:
        await engine.run_turn("x", opts=warm_opts(str(uuid.uuid4())))
    assert info.value.code is ErrorCode.SESSION_NOT_FOUND


async def test_shutdown_ends_every_process_and_group(env: Env) -> None:
    handlers = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    engine = env.engine(warm_pool_size=2)
    engine.start_pool()
    rec = Recorder()
    gc_file = env.tmp / "gc.pid"
    sid = (await engine.run_turn(f"[[grandchild:{gc_file}]] one", opts=rec.opts())).session_id
    busy = asyncio.create_task(engine.run_turn("[[sleep:30]]", opts=rec.opts(sid)))
    await until(lambda: engine.warm_status()["pool_ready"] >= 2 and len(rec.starts) >= 2)
    status = engine.warm_status()
    pids = [*status["session_pids"], *status["pool_pids"], int(gc_file.read_text())]
    # Starting warm CLIs took over no signal handler: the daemon owns SIGINT/SIGTERM.
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    await asyncio.wait_for(engine.aclose(), 10)
    with pytest.raises(ClaudeCLIError) as info:
        await busy
    assert info.value.code is ErrorCode.CANCELLED
    await assert_gone(*pids)
    with pytest.raises(ClaudeCLIError):
        await engine.run_turn("late", opts=warm_opts(sid))
