"""daemon.claude.child.Child against real child processes: what warm CLIs rely on.

run_process (tests/test_runner.py) covers the one-shot path; these cover a child whose
stdin stays open, whose exit is reported while descendants still hold its pipes, and
whose lines are capped without a cap on its whole output.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from daemon.claude.child import Child
from tests.test_runner import GRANDCHILD, assert_gone, script

# Echoes each stdin line back upper-cased until EOF, then exits 0.
ECHO = """
    import sys
    for line in sys.stdin:
        sys.stdout.write(line.upper())
        sys.stdout.flush()
"""


async def test_stdin_stays_open_for_many_lines_and_eof_ends_the_child() -> None:
    lines: list[bytes] = []
    eof = asyncio.Event()
    child = await Child.start(
        script(ECHO), cwd=None, env=None, on_line=lines.append, on_eof=eof.set
    )
    try:
        for word in (b"one", b"two", b"three"):
            assert await child.write(word + b"\n")
        await asyncio.wait_for(child.terminate(close_grace_s=5, term_grace_s=1), 10)
        await asyncio.wait_for(eof.wait(), 5)
    finally:
        await child.aclose(orphan_grace_s=0.5)
    assert lines == [b"ONE", b"TWO", b"THREE"]
    assert child.returncode == 0  # ended by closing stdin, not by a signal
    assert not child.killed


async def test_write_after_the_child_exited_says_false() -> None:
    child = await Child.start(script("pass"), cwd=None, env=None)
    try:
        assert await asyncio.wait_for(child.wait(None), 10)
        await child.output_closed(5)
        # The read end is gone: EPIPE (SIGPIPE is ignored by Python), reported, not raised.
        assert await child.write(b"x" * 70_000) is False
        assert await child.write(b"again\n") is False
    finally:
        await child.aclose(orphan_grace_s=0.5)


async def test_exit_is_reported_while_a_grandchild_holds_stdout(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    body = GRANDCHILD.format(stdout="None", pidfile=str(pidfile), after="print('done')")
    exits: list[int] = []
    child = await Child.start(script(body), cwd=None, env=None, on_exit=exits.append)
    try:
        # With stdout=PIPE, Process.wait() would wait for `sleep 300` to close the pipe.
        assert await asyncio.wait_for(child.wait(None), 10)
        await asyncio.sleep(0)  # done callbacks run on the next loop iteration
        assert exits == [0]
        assert not await child.output_closed(0.2)  # the grandchild still holds it
    finally:
        await child.aclose(orphan_grace_s=0.5)
    assert child.orphans_killed
    _, grandchild = map(int, pidfile.read_text().split())
    await assert_gone(grandchild)


async def test_a_line_past_its_cap_kills_the_group_without_a_total_cap() -> None:
    body = """
        import sys
        for _ in range(50):
            sys.stdout.write("x" * 10_000 + "\\n")
        sys.stdout.write("y" * 300_000)
        sys.stdout.flush()
        import time; time.sleep(60)
    """
    lines: list[bytes] = []
    child = await Child.start(
        script(body),
        cwd=None,
        env=None,
        on_line=lines.append,
        max_stdout_bytes=None,
        max_line_bytes=100_000,
    )
    try:
        assert await asyncio.wait_for(child.wait(None), 10)
    finally:
        await child.aclose(orphan_grace_s=0.5)
    assert child.overflowed
    assert child.killed
    assert child.returncode == -signal.SIGKILL
    assert len(lines) == 50  # complete lines before the long one were delivered
    assert child.stdout_bytes > 500_000


async def test_stderr_keeps_a_bounded_tail() -> None:
    body = """
        import sys
        sys.stderr.write("a" * 100_000 + "END")
    """
    child = await Child.start(script(body), cwd=None, env=None, stderr_tail_bytes=1000)
    try:
        assert await asyncio.wait_for(child.wait(None), 10)
        assert await child.output_closed(5)
    finally:
        await child.aclose(orphan_grace_s=0.5)
    tail = child.stderr_tail()
    assert len(tail) == 1000
    assert tail.endswith(b"END")
    assert child.stderr_total == 100_003
