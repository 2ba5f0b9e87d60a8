"""daemon.claude.runner against real child processes.

Death is proven by pid: ``os.kill(pid, 0)`` must raise ProcessLookupError. A
zombie also counts as dead: orphans are re-parented to this machine's init,
which reaps them only after a delay.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import orjson
import pytest

from daemon.claude.runner import OutputLimitError, run_process

PY = sys.executable


def script(body: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(body)]


def is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def assert_gone(*pids: int, within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not all(is_gone(p) for p in pids):
        assert time.monotonic() < deadline, f"still alive: {[p for p in pids if not is_gone(p)]}"
        await asyncio.sleep(0.02)


def read_complete(path: Path) -> str | None:
    """The file's text once its writer finished the line, else None."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return text if text.endswith("\n") else None


async def wait_for_file(path: Path, within: float = 10.0) -> str:
    deadline = time.monotonic() + within
    while (text := read_complete(path)) is None:
        assert time.monotonic() < deadline, f"{path} never written"
        await asyncio.sleep(0.02)
    return text


async def test_json_line_roundtrip() -> None:
    started: list[int] = []
    res = await run_process(
        script("""
            import sys, json
            prompt = sys.stdin.read()
            print(json.dumps({"type": "result", "result": "echo: " + prompt}))
        """),
        stdin_data=b"--not-a-flag hello",
        cwd=None,
        env=None,
        timeout_s=20,
        on_start=started.append,
    )
    assert res.returncode == 0
    assert orjson.loads(res.stdout) == {"type": "result", "result": "echo: --not-a-flag hello"}
    assert res.stderr_tail == b""
    assert not res.timed_out
    assert not res.killed
    assert started == [res.pid]
    await assert_gone(res.pid)


async def test_big_io_on_all_three_pipes_at_once() -> None:
    chunk = 64 * 1024
    n = 80  # 5 MiB per stream
    stdin_data = os.urandom(chunk * n)
    lines: list[bytes] = []
    res = await run_process(
        script(f"""
            import sys
            out, err, inp = sys.stdout.buffer, sys.stderr.buffer, sys.stdin.buffer
            got = 0
            for i in range({n}):
                out.write(b"o" * {chunk}); out.flush()
                err.write(b"e" * ({chunk} - 1) + b"E"); err.flush()
                got += len(inp.read({chunk}))
            got += len(inp.read())
            out.write(b"\\nstdin=%d\\n" % got); out.flush()
        """),
        stdin_data=stdin_data,
        cwd=None,
        env=None,
        timeout_s=30,
        on_stdout_line=lines.append,
    )
    assert res.returncode == 0
    assert res.stdout.count(b"o") == chunk * n
    assert res.stdout.endswith(b"\nstdin=%d\n" % len(stdin_data))
    assert lines[-1] == b"stdin=%d" % len(stdin_data)
    assert len(res.stderr_tail) == 64 * 1024  # capped tail, newest bytes kept
    assert res.stderr_tail.endswith(b"eE")


async def test_three_megabyte_single_line() -> None:
    lines: list[bytes] = []
    res = await run_process(
        script("""
            import json, sys
            sys.stdout.write(json.dumps({"type": "result", "result": "x" * 3_000_000}) + "\\n")
        """),
        stdin_data=b"",
        cwd=None,
        env=None,
        timeout_s=20,
        on_stdout_line=lines.append,
    )
    assert res.returncode == 0
    assert len(lines) == 1
    assert len(orjson.loads(lines[0])["result"]) == 3_000_000
    assert res.stdout == lines[0] + b"\n"


async def test_nonzero_exit_runs_exactly_once(tmp_path: Path) -> None:
    counter = tmp_path / "runs"
    res = await run_process(
        script(f"""
            import sys
            open({str(counter)!r}, "a").write("run\\n")
            sys.stderr.write("boom\\n")
            sys.exit(3)
        """),
        stdin_data=b"",
        cwd=None,
        env=None,
        timeout_s=20,
    )
    assert res.returncode == 3
    assert res.stderr_tail == b"boom\n"
    await asyncio.sleep(0.3)
    assert counter.read_text() == "run\n"


async def test_sigterm_ignoring_child_escalates_to_sigkill(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    t0 = time.monotonic()
    res = await run_process(
        script(f"""
            import signal, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            open({str(ready)!r}, "w").write("ok\\n")
            time.sleep(60)
        """),
        stdin_data=b"",
        cwd=None,
        env=None,
        timeout_s=1.0,
        term_grace_s=1.0,
    )
    elapsed = time.monotonic() - t0
    assert ready.exists()
    assert res.timed_out
    assert res.killed
    assert res.returncode == -signal.SIGKILL
    assert elapsed < 1.0 + 1.0 + 1.0
    await assert_gone(res.pid)


async def test_cooperative_child_ends_on_sigterm() -> None:
    res = await run_process(
        script("import time; time.sleep(60)"),
        stdin_data=b"",
        cwd=None,
        env=None,
        timeout_s=0.5,
        term_grace_s=3.0,
    )
    assert res.timed_out
    assert not res.killed
    assert res.returncode == -signal.SIGTERM
    assert res.duration_s < 2.5


GRANDCHILD = """
    import subprocess, sys, time, os
    g = subprocess.Popen(["sleep", "300"], stdout={stdout})
    open({pidfile!r}, "w").write("%d %d\\n" % (os.getpid(), g.pid))
    {after}
"""


async def test_cancel_kills_child_and_grandchild(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    body = GRANDCHILD.format(
        stdout="subprocess.DEVNULL", pidfile=str(pidfile), after="time.sleep(60)"
    )
    task = asyncio.create_task(
        run_process(script(body), stdin_data=b"", cwd=None, env=None, timeout_s=60)
    )
    child, grandchild = map(int, (await wait_for_file(pidfile)).split())
    t0 = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - t0 < 3.0
    await assert_gone(child, grandchild)


async def test_grandchild_holding_stdout_does_not_hang(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    # The child exits at once; `sleep 300` inherits stdout and keeps the pipe open.
    body = GRANDCHILD.format(stdout="None", pidfile=str(pidfile), after="print('done')")
    t0 = time.monotonic()
    res = await run_process(
        script(body), stdin_data=b"", cwd=None, env=None, timeout_s=60, orphan_grace_s=0.5
    )
    assert time.monotonic() - t0 < 3.0
    assert res.returncode == 0
    assert res.stdout == b"done\n"
    assert res.orphans_killed
    _, grandchild = map(int, pidfile.read_text().split())
    await assert_gone(grandchild)


async def test_exiting_child_leaves_no_grandchild(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    body = GRANDCHILD.format(stdout="subprocess.DEVNULL", pidfile=str(pidfile), after="")
    res = await run_process(script(body), stdin_data=b"", cwd=None, env=None, timeout_s=20)
    assert res.returncode == 0
    _, grandchild = map(int, pidfile.read_text().split())
    await assert_gone(grandchild)


async def test_parent_signal_handlers_untouched() -> None:
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    await run_process(script("pass"), stdin_data=b"", cwd=None, env=None, timeout_s=10)
    await run_process(
        script("import time; time.sleep(5)"), stdin_data=b"", cwd=None, env=None, timeout_s=0.2
    )
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


async def test_thirty_concurrent_runs() -> None:
    body = "import sys; d = sys.stdin.read(); print(d[::-1])"
    results = await asyncio.gather(
        *(
            run_process(
                script(body), stdin_data=f"run-{i}".encode(), cwd=None, env=None, timeout_s=60
            )
            for i in range(30)
        )
    )
    assert [r.stdout.strip() for r in results] == [f"run-{i}".encode()[::-1] for i in range(30)]
    assert all(r.returncode == 0 for r in results)
    await assert_gone(*(r.pid for r in results))


async def test_stdin_closed_even_when_empty() -> None:
    # A child waiting for EOF on stdin must see it at once (the CLI would wait 3 s).
    res = await run_process(
        script("import sys; print(len(sys.stdin.read()))"),
        stdin_data=b"",
        cwd=None,
        env=None,
        timeout_s=2,
    )
    assert not res.timed_out
    assert res.stdout == b"0\n"


async def test_child_not_reading_stdin_is_fine() -> None:
    res = await run_process(
        script("print('early')"),
        stdin_data=b"x" * (4 * 1024 * 1024),
        cwd=None,
        env=None,
        timeout_s=10,
    )
    assert res.returncode == 0
    assert res.stdout == b"early\n"


async def test_output_limit_kills_group() -> None:
    with pytest.raises(OutputLimitError) as info:
        await run_process(
            script("import sys\nwhile True: sys.stdout.write('y' * 65536)"),
            stdin_data=b"",
            cwd=None,
            env=None,
            timeout_s=20,
            max_stdout_bytes=1024 * 1024,
        )
    assert info.value.result.killed
    await assert_gone(info.value.result.pid)


async def test_callback_error_kills_and_propagates() -> None:
    def explode(line: bytes) -> None:
        raise ValueError("bad line")

    with pytest.raises(ValueError, match="bad line"):
        await run_process(
            script("import time; print('x', flush=True); time.sleep(60)"),
            stdin_data=b"",
            cwd=None,
            env=None,
            timeout_s=20,
            on_stdout_line=explode,
        )


async def test_cwd_and_env_are_passed(tmp_path: Path) -> None:
    res = await run_process(
        script("import os; print(os.getcwd()); print(os.environ.get('KSI_T', '-'))"),
        stdin_data=b"",
        cwd=tmp_path,
        env={"KSI_T": "yes", "PATH": os.environ["PATH"]},
        timeout_s=10,
    )
    assert res.stdout.decode().split() == [str(tmp_path), "yes"]


async def test_missing_executable_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await run_process([str(tmp_path / "nope")], stdin_data=b"", cwd=None, env=None, timeout_s=5)
