"""Tests for devtools/fake_claude.py, the stand-in for the Claude Code CLI.

Every test runs the fake as a real subprocess, because what matters is what a supervisor sees:
argv handling, exit codes, stdout/stderr bytes, signals and files on disk. Each test gets its
own config dir and cwd under tmp_path, so sessions never leak between tests.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "devtools" / "fake_claude.py"
SHIM = ROOT / "devtools" / "fake-claude"
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
SID = "0b7f6c3e-2d1a-4c5b-9e8f-7a6b5c4d3e2f"

RESULT_KEYS = [
    "type", "subtype", "is_error", "api_error_status", "duration_ms", "duration_api_ms",
    "ttft_ms", "ttft_stream_ms", "time_to_request_ms", "num_turns", "result", "stop_reason",
    "session_id", "total_cost_usd", "usage", "modelUsage", "permission_denials",
    "terminal_reason", "fast_mode_state", "uuid",
]  # fmt: skip
USAGE_KEYS = [
    "input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens",
    "server_tool_use", "service_tier", "cache_creation", "inference_geo", "iterations", "speed",
]  # fmt: skip
INIT_KEYS = [
    "type", "subtype", "cwd", "session_id", "tools", "mcp_servers", "model", "permissionMode",
    "slash_commands", "apiKeySource", "claude_code_version", "output_style", "agents", "skills",
    "plugins", "analytics_disabled", "product_feedback_disabled", "uuid", "memory_paths",
    "fast_mode_state",
]  # fmt: skip


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """The cwd of the fake; sessions are scoped to it."""
    path = tmp_path / "work.dir"  # the "." checks that the project slug replaces dots too
    path.mkdir()
    return path


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_CLAUDE_")}
    clean.pop("CLAUDECODE", None)
    clean["CLAUDE_CONFIG_DIR"] = str(tmp_path / "config")
    return clean


def run_fake(
    args: list[str],
    prompt: str | bytes = "hello",
    *,
    cwd: Path,
    env: dict[str, str],
    timeout: float = 10,
) -> subprocess.CompletedProcess[bytes]:
    data = prompt.encode() if isinstance(prompt, str) else prompt
    return subprocess.run(
        [sys.executable, str(FAKE), *args],
        input=data,
        capture_output=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
        check=False,
    )


def run_json(args: list[str], prompt: str, cwd: Path, env: dict[str, str]) -> dict[str, Any]:
    proc = run_fake(["-p", "--output-format", "json", *args], prompt, cwd=cwd, env=env)
    assert proc.stdout.count(b"\n") == 1, proc.stdout[:300]
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def stream_lines(stdout: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


def proc_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (orphans may never be reaped here)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_for_file(path: Path, timeout: float = 5) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text()
        time.sleep(0.01)
    raise AssertionError(f"{path} never appeared")


# --------------------------------------------------------------------------- command line


def test_version_via_interpreter_shebang_and_shim(work: Path, env: dict[str, str]) -> None:
    assert FAKE.read_text().startswith("#!/usr/bin/env python3\n")
    assert os.access(FAKE, os.X_OK)
    link = work / "claude"
    link.symlink_to(SHIM)
    for argv in ([sys.executable, str(FAKE), "--version"], [str(FAKE), "-v"], [str(link), "-v"]):
        proc = subprocess.run(argv, capture_output=True, env=env, cwd=work, check=False)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"2.1.197 (Claude Code)\n", b"")


@pytest.mark.parametrize(
    ("args", "stderr"),
    [
        (["-p", "--bogus"], "error: unknown option '--bogus'"),
        (["-p", "--model"], "error: option '--model <model>' argument missing"),
        (
            ["-p", "--output-format", "xml"],
            "error: option '--output-format <format>' argument 'xml' is invalid. "
            "Allowed choices are text, json, stream-json.",
        ),
        (
            ["-p", "--output-format", "stream-json"],
            "Error: When using --print, --output-format=stream-json requires --verbose",
        ),
        (
            ["-p", "--input-format", "stream-json", "--output-format", "json"],
            "Error: --input-format=stream-json requires output-format=stream-json.",
        ),
        (["-p", "--session-id", "123"], "Error: Invalid session ID. Must be a valid UUID."),
        (
            ["-p", "--session-id", SID, "--resume", SID],
            "Error: --session-id can only be used with --continue or --resume if "
            "--fork-session is also specified.",
        ),
        (
            ["-p", "--resume", "not-a-uuid"],
            "Error: --resume requires a valid session ID or session title when used with "
            "--print. Usage: claude -p --resume <session-id|title>. Provided value "
            '"not-a-uuid" is not a UUID and does not match any session title.',
        ),
        (["-p", "--resume", SID], f"No conversation found with session ID: {SID}"),
    ],
)
def test_argument_errors(args: list[str], stderr: str, work: Path, env: dict[str, str]) -> None:
    proc = run_fake(args, cwd=work, env=env)
    assert (proc.returncode, proc.stdout, proc.stderr.decode()) == (1, b"", stderr + "\n")


def test_empty_prompt_and_prompt_argument(work: Path, env: dict[str, str]) -> None:
    proc = run_fake(["-p"], "", cwd=work, env=env)
    assert proc.returncode == 1
    assert proc.stderr == (
        b"Error: Input must be provided either through stdin or as a prompt argument "
        b"when using --print\n"
    )
    # A positional prompt and stdin combine as "arg\nstdin", like the real CLI.
    proc = run_fake(["-p", "first"], "second", cwd=work, env=env)
    assert proc.stdout == b"echo: first\nsecond (turn 1)\n"


def test_list_flags_and_accepted_extras(work: Path, env: dict[str, str]) -> None:
    args = [
        "-p", "--output-format=stream-json", "--verbose", "--allowedTools", "Bash(git *),Read",
        "--disallowed-tools", "Bash", "--permission-mode", "plan", "--append-system-prompt",
        "be brief", "--max-turns", "3", "--mcp-config", "{}", "--strict-mcp-config",
    ]  # fmt: skip
    init = stream_lines(run_fake(args, cwd=work, env=env).stdout)[0]
    assert init["permissionMode"] == "plan"
    assert "Bash" not in init["tools"]
    assert {"Glob", "Grep", "Read"} <= set(init["tools"])


# --------------------------------------------------------------------------- output shapes


def test_json_result_shape(work: Path, env: dict[str, str]) -> None:
    proc = run_fake(["-p", "--output-format", "json"], cwd=work, env=env)
    assert (proc.returncode, proc.stderr) == (0, b"")
    result = json.loads(proc.stdout)
    assert list(result) == RESULT_KEYS
    assert list(result["usage"]) == USAGE_KEYS
    assert result["type"] == "result"
    assert result["subtype"] == "success"
    assert result["is_error"] is False
    assert result["api_error_status"] is None
    assert result["result"] == "echo: hello (turn 1)"
    assert (result["num_turns"], result["stop_reason"]) == (1, "end_turn")
    assert UUID_RE.match(result["session_id"])
    assert result["permission_denials"] == []
    assert result["terminal_reason"] == "completed"
    usage = result["usage"]
    assert usage["input_tokens"] == len("hello") // 4 + 3000
    assert usage["output_tokens"] == len("echo: hello (turn 1)") // 4
    # No --model: the real CLI reports the default with its 1M-context suffix.
    (model_usage,) = result["modelUsage"].items()
    assert model_usage[0] == "claude-opus-4-8[1m]"
    expected_cost = usage["input_tokens"] * 5 / 1e6 + usage["output_tokens"] * 25 / 1e6
    assert result["total_cost_usd"] == pytest.approx(expected_cost)
    assert model_usage[1]["costUSD"] == pytest.approx(expected_cost)
    assert model_usage[1]["contextWindow"] == 1_000_000


@pytest.mark.parametrize(
    ("alias", "model_id", "prices"),
    [
        ("sonnet", "claude-sonnet-5", (3, 15)),
        ("opus", "claude-opus-4-8", (5, 25)),
        ("haiku", "claude-haiku-4-5-20251001", (1, 5)),
        ("claude-sonnet-4-5-custom", "claude-sonnet-4-5-custom", (3, 15)),
    ],
)
def test_model_ids_and_prices(
    alias: str, model_id: str, prices: tuple[int, int], work: Path, env: dict[str, str]
) -> None:
    result = run_json(["--model", alias], "hi", work, env)
    usage = result["usage"]
    assert list(result["modelUsage"]) == [model_id]
    expected = usage["input_tokens"] * prices[0] / 1e6 + usage["output_tokens"] * prices[1] / 1e6
    assert result["total_cost_usd"] == pytest.approx(expected)


def test_text_output(work: Path, env: dict[str, str]) -> None:
    proc = run_fake(["-p"], "hello\n", cwd=work, env=env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"echo: hello (turn 1)\n", b"")


def test_json_verbose_prints_an_array(work: Path, env: dict[str, str]) -> None:
    proc = run_fake(["-p", "--output-format", "json", "--verbose"], cwd=work, env=env)
    messages = json.loads(proc.stdout)
    assert [m["type"] for m in messages] == ["system", "assistant", "result"]


def test_stream_json_lines(work: Path, env: dict[str, str]) -> None:
    env["ANTHROPIC_API_KEY"] = "dummy"
    proc = run_fake(
        ["-p", "--output-format", "stream-json", "--verbose", "--model", "sonnet"],
        cwd=work,
        env=env,
    )
    assert proc.returncode == 0
    init, assistant, result = stream_lines(proc.stdout)
    assert list(init) == INIT_KEYS
    assert (init["type"], init["subtype"]) == ("system", "init")
    assert init["cwd"] == str(work)
    assert init["model"] == "claude-sonnet-5"
    assert init["apiKeySource"] == "ANTHROPIC_API_KEY"
    assert init["claude_code_version"] == "2.1.197"
    assert "Bash" in init["tools"]
    assert assistant["type"] == "assistant"
    assert assistant["parent_tool_use_id"] is None
    message = assistant["message"]
    assert (message["role"], message["model"], message["stop_reason"]) == (
        "assistant",
        "claude-sonnet-5",
        None,
    )
    assert message["content"] == [{"type": "text", "text": "echo: hello (turn 1)"}]
    assert list(result) == RESULT_KEYS
    assert init["session_id"] == assistant["session_id"] == result["session_id"]


def test_partial_messages(work: Path, env: dict[str, str]) -> None:
    prompt = "a prompt long enough to need several deltas"
    args = ["-p", "--output-format", "stream-json", "--verbose", "--include-partial-messages"]
    lines = stream_lines(run_fake(args, prompt, cwd=work, env=env).stdout)
    # The real CLI's order: status, raw SSE events, the assistant line after the last delta.
    kinds = [
        line["event"]["type"] if line["type"] == "stream_event" else line["type"] for line in lines
    ]
    n = len(kinds) - 9
    assert kinds == [
        "system", "system", "message_start", "content_block_start", *["content_block_delta"] * n,
        "assistant", "content_block_stop", "message_delta", "message_stop", "result",
    ]  # fmt: skip
    assert n > 2
    deltas = [line["event"]["delta"]["text"] for line in lines[4 : 4 + n]]
    assert "".join(deltas) == f"echo: {prompt} (turn 1)"
    assert all(len(d) <= 16 for d in deltas)


# --------------------------------------------------------------------------- sessions


def test_resume_continuity_and_transcript(work: Path, env: dict[str, str], tmp_path: Path) -> None:
    first = run_json(["--session-id", SID], "one", work, env)
    assert (first["session_id"], first["result"]) == (SID, "echo: one (turn 1)")
    second = run_json(["--resume", SID], "two", work, env)
    assert (second["session_id"], second["result"]) == (SID, "echo: two (turn 2)")
    # The history grows, so the fake's input token count does too.
    assert second["usage"]["input_tokens"] > first["usage"]["input_tokens"]
    # A resumed run reports the default model without the [1m] suffix (measured).
    assert list(second["modelUsage"]) == ["claude-opus-4-8"]
    third = run_fake(["-p", "-r", SID], "three", cwd=work, env=env)
    assert third.stdout == b"echo: three (turn 3)\n"

    slug = re.sub(r"[^A-Za-z0-9]", "-", str(work))
    transcript = tmp_path / "config" / "projects" / slug / f"{SID}.jsonl"
    assert transcript.stat().st_mode & 0o777 == 0o600
    entries = [json.loads(line) for line in transcript.read_text().splitlines()]
    assert [e["type"] for e in entries] == ["user", "assistant"] * 3
    assert all(e["sessionId"] == SID and e["cwd"] == str(work) for e in entries)
    assert entries[2]["message"]["content"] == "two"


def test_resume_is_scoped_to_cwd(work: Path, env: dict[str, str], tmp_path: Path) -> None:
    run_json(["--session-id", SID], "one", work, env)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_fake(["-p", "--resume", SID], cwd=elsewhere, env=env)
    assert (proc.returncode, proc.stdout) == (1, b"")
    assert proc.stderr == f"No conversation found with session ID: {SID}\n".encode()
    # ...and the same id is free for a new session there.
    assert run_json(["--session-id", SID], "x", elsewhere, env)["result"] == "echo: x (turn 1)"


def test_session_id_already_in_use(work: Path, env: dict[str, str]) -> None:
    run_json(["--session-id", SID], "one", work, env)
    proc = run_fake(["-p", "--session-id", SID], cwd=work, env=env)
    assert (proc.returncode, proc.stdout) == (1, b"")
    assert proc.stderr == f"Error: Session ID {SID} is already in use.\n".encode()


def test_fork_session(work: Path, env: dict[str, str]) -> None:
    run_json(["--session-id", SID], "one", work, env)
    forked = run_json(["--resume", SID, "--fork-session"], "two", work, env)
    assert forked["session_id"] != SID
    assert forked["result"] == "echo: two (turn 2)"
    # The original did not move on.
    assert run_json(["--resume", SID], "again", work, env)["result"] == "echo: again (turn 2)"
    again = run_json(["--resume", forked["session_id"]], "three", work, env)
    assert again["result"] == "echo: three (turn 3)"


def test_continue_and_no_session_persistence(work: Path, env: dict[str, str]) -> None:
    run_json(["--session-id", SID], "one", work, env)
    assert run_json(["--continue"], "two", work, env)["session_id"] == SID
    gone = run_json(["--no-session-persistence"], "x", work, env)
    proc = run_fake(["-p", "--resume", gone["session_id"]], cwd=work, env=env)
    assert proc.returncode == 1


# --------------------------------------------------------------------------- triggers


API_ERRORS = [
    ("400", 400, "API Error: 400 fake error"),
    ("401", 401, "Failed to authenticate. API Error: 401 fake error"),
    ("429", 429, "API Error: Request rejected (429) · fake error"),
    *[
        (
            str(code),
            code,
            f"API Error: {code} fake error. This is a server-side issue, usually temporary — "
            "try again in a moment. If it persists, check your inference gateway (127.0.0.1:1).",
        )
        for code in (500, 529)
    ],
    ("connect", None, "API Error: Unable to connect to API (ConnectionRefused)"),
    ("login", None, "Not logged in · Please run /login"),
]


@pytest.mark.parametrize(("code", "status", "text"), API_ERRORS)
def test_api_errors(
    code: str, status: int | None, text: str, work: Path, env: dict[str, str]
) -> None:
    proc = run_fake(["-p", "--output-format", "json"], f"hi [[error:{code}]]", cwd=work, env=env)
    assert (proc.returncode, proc.stderr) == (1, b"")
    result = json.loads(proc.stdout)
    assert result["subtype"] == "success"  # sic: the real CLI keeps "success" on API errors
    assert result["is_error"] is True
    assert result["api_error_status"] == status
    assert result["result"] == text
    assert result["total_cost_usd"] == 0
    assert result["modelUsage"] == {}
    assert result["usage"]["input_tokens"] == result["usage"]["output_tokens"] == 0
    assert "ttft_ms" not in result
    assert "time_to_request_ms" not in result
    # In text mode the error text goes to stdout.
    proc = run_fake(["-p"], f"hi [[error:{code}]]", cwd=work, env=env)
    assert (proc.returncode, proc.stdout.decode()) == (1, text + "\n")


def test_api_error_in_stream_json(work: Path, env: dict[str, str]) -> None:
    args = ["-p", "--output-format", "stream-json", "--verbose"]
    proc = run_fake(args, "[[error:500]]", cwd=work, env=env)
    _, synthetic, result = stream_lines(proc.stdout)
    assert synthetic["message"]["model"] == "<synthetic>"
    assert synthetic["error"] == "server_error"
    assert synthetic["message"]["content"][0]["text"] == result["result"]


def test_max_turns(work: Path, env: dict[str, str]) -> None:
    proc = run_fake(["-p", "--output-format", "json"], "go [[max-turns]]", cwd=work, env=env)
    assert proc.returncode == 1
    result = json.loads(proc.stdout)
    assert result["subtype"] == "error_max_turns"
    assert result["is_error"] is True
    assert "result" not in result
    assert result["errors"] == ["Reached maximum number of turns (1)"]
    assert (result["stop_reason"], result["terminal_reason"]) == ("tool_use", "max_turns")
    text = run_fake(["-p"], "go [[max-turns]]", cwd=work, env=env)
    assert (text.returncode, text.stdout) == (1, b"Error: Reached max turns (1)")


def test_crash(work: Path, env: dict[str, str]) -> None:
    args = ["-p", "--output-format", "stream-json", "--verbose"]
    proc = run_fake(args, "boom [[crash:7]]", cwd=work, env=env)
    assert (proc.returncode, proc.stdout) == (7, b"")
    assert b"fatal: simulated crash" in proc.stderr
    assert proc.stderr.count(b"\n") >= 3


def test_bad_json(work: Path, env: dict[str, str]) -> None:
    proc = run_fake(["-p", "--output-format", "json"], "[[bad-json]]", cwd=work, env=env)
    assert (proc.returncode, proc.stdout) == (0, b"this is not json\n")


def test_huge_output_is_one_line(work: Path, env: dict[str, str]) -> None:
    size = 3_000_000
    args = ["-p", "--output-format", "stream-json", "--verbose"]
    proc = run_fake(args, f"[[huge:{size}]]", cwd=work, env=env)
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert len(lines) == 3
    assert len(lines[-1]) > size
    assert json.loads(lines[-1])["result"] == "x" * size


def test_stderr_flood_does_not_deadlock(work: Path, env: dict[str, str]) -> None:
    # 1 MB is far beyond a pipe buffer: the fake blocks until the reader drains stderr.
    proc = run_fake(["-p"], "noisy [[stderr:1000000]]", cwd=work, env=env)
    assert proc.returncode == 0
    assert len(proc.stderr) == 1_000_000
    assert proc.stdout.startswith(b"echo: noisy")


def test_tool_round_trip(work: Path, env: dict[str, str]) -> None:
    args = ["-p", "--output-format", "stream-json", "--verbose"]
    proc = run_fake(args, "[[tool:Bash:ls -la]]", cwd=work, env=env)
    _, tool_use, tool_result, answer, result = stream_lines(proc.stdout)
    block = tool_use["message"]["content"][0]
    assert (block["type"], block["name"], block["input"]["command"]) == (
        "tool_use",
        "Bash",
        "ls -la",
    )
    (res_block,) = tool_result["message"]["content"]
    assert res_block["tool_use_id"] == block["id"]
    assert res_block["is_error"] is False
    assert answer["message"]["content"][0]["text"] == "tool result: ls -la"
    assert (result["num_turns"], result["result"]) == (2, "tool result: ls -la")
    assert result["permission_denials"] == []


@pytest.mark.parametrize(
    "flags",
    [["--disallowedTools", "Bash"], ["--tools", ""], ["--allowedTools", "Read,Edit"]],
)
def test_tool_denied(flags: list[str], work: Path, env: dict[str, str]) -> None:
    result = run_json(flags, "[[tool:Bash:touch x]]", work, env)
    assert result["is_error"] is False
    assert result["num_turns"] == 2
    (denial,) = result["permission_denials"]
    assert denial["tool_name"] == "Bash"
    assert denial["tool_use_id"].startswith("toolu_")
    assert denial["tool_input"]["command"] == "touch x"


def test_tool_with_max_turns_one(work: Path, env: dict[str, str]) -> None:
    proc = run_fake(
        ["-p", "--output-format", "json", "--max-turns", "1"], "[[tool:Bash:ls]]", cwd=work, env=env
    )
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["subtype"] == "error_max_turns"


def test_sigterm_exits_143_silently(work: Path, env: dict[str, str], tmp_path: Path) -> None:
    pidfile = tmp_path / "fake.pid"
    with subprocess.Popen(
        [sys.executable, str(FAKE), "-p", "--output-format", "json"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=work,
        env=env,
    ) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdin.write(f"wait [[pidfile:{pidfile}]] [[sleep:30]]".encode())
        proc.stdin.close()
        assert int(wait_for_file(pidfile)) == proc.pid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 143
        assert (proc.stdout.read(), proc.stderr.read()) == (b"", b"")


def test_ignore_sigterm_needs_sigkill(work: Path, env: dict[str, str], tmp_path: Path) -> None:
    pidfile = tmp_path / "fake.pid"
    proc = subprocess.Popen(
        [sys.executable, str(FAKE), "-p"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        cwd=work,
        env=env,
    )
    assert proc.stdin is not None
    proc.stdin.write(f"[[ignore-sigterm]] [[pidfile:{pidfile}]] [[sleep:30]]".encode())
    proc.stdin.close()
    wait_for_file(pidfile)
    proc.send_signal(signal.SIGTERM)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.3)
    proc.kill()
    assert proc.wait(timeout=5) == -signal.SIGKILL


def test_grandchild_shares_the_process_group(
    work: Path, env: dict[str, str], tmp_path: Path
) -> None:
    pidfile = tmp_path / "grandchild.pid"
    out = tmp_path / "out.txt"
    with out.open("wb") as stdout:
        proc = subprocess.Popen(
            [sys.executable, str(FAKE), "-p"],
            stdin=subprocess.PIPE,
            stdout=stdout,  # not a pipe: the grandchild keeps it open for 300 s
            cwd=work,
            env=env,
            start_new_session=True,
        )
        proc.communicate(f"spawn [[grandchild:{pidfile}]]".encode(), timeout=10)
    grandchild = int(wait_for_file(pidfile))
    try:
        assert proc.returncode == 0
        assert out.read_text() == f"spawn [[grandchild:{pidfile}]]".join(["echo: ", " (turn 1)\n"])
        assert proc_alive(grandchild)
        assert os.getpgid(grandchild) == proc.pid  # same group as the fake, which led it
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while proc_alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not proc_alive(grandchild)


# --------------------------------------------------------------------------- warm mode


class WarmFake:
    """A warm fake process with a line reader that never blocks a test forever."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(FAKE), "-p", "--input-format", "stream-json",
             "--output-format", "stream-json", "--verbose", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
        )  # fmt: skip
        self.lines: queue.Queue[bytes] = queue.Queue()
        self._pumping = threading.Thread(target=self._pump, daemon=True)
        self._pumping.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def send(self, obj: dict[str, Any] | str) -> None:
        assert self.proc.stdin is not None
        text = obj if isinstance(obj, str) else json.dumps(obj)
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def say(self, text: str, *, plain: bool = False) -> None:
        content: Any = text if plain else [{"type": "text", "text": text}]
        self.send({"type": "user", "message": {"role": "user", "content": content}})

    def interrupt(self, request_id: str) -> None:
        self.send(
            {"type": "control_request", "request_id": request_id,
             "request": {"subtype": "interrupt"}}
        )  # fmt: skip

    def read(self, timeout: float = 5) -> dict[str, Any]:
        line: dict[str, Any] = json.loads(self.lines.get(timeout=timeout))
        return line

    def close(self) -> tuple[int, bytes]:
        assert self.proc.stdin is not None
        assert self.proc.stderr is not None
        self.proc.stdin.close()
        code = self.proc.wait(timeout=5)
        stderr = self.proc.stderr.read()
        self.proc.stderr.close()
        self._pumping.join(5)  # it reads stdout to its EOF
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code, stderr


def test_warm_mode_turns_interrupt_and_eof(work: Path, env: dict[str, str]) -> None:
    fake = WarmFake(["--session-id", SID], work, env)
    try:
        fake.say("first")
        init, assistant, result = fake.read(), fake.read(), fake.read()
        assert (init["type"], init["subtype"], init["session_id"]) == ("system", "init", SID)
        assert assistant["message"]["content"][0]["text"] == "echo: first (turn 1)"
        assert (result["result"], result["num_turns"], result["session_id"]) == (
            "echo: first (turn 1)",
            1,
            SID,
        )

        fake.say("second", plain=True)  # content may be a plain string
        assert [fake.read()["type"] for _ in range(2)] == ["system", "assistant"]
        assert fake.read()["result"] == "echo: second (turn 2)"

        fake.interrupt("idle")  # nothing running: just the success response
        assert fake.read() == {
            "type": "control_response",
            "response": {"subtype": "success", "request_id": "idle"},
        }

        started = time.monotonic()
        fake.say("slow [[sleep:30]]")
        assert fake.read()["subtype"] == "init"
        time.sleep(0.2)
        fake.interrupt("r1")
        assert fake.read()["response"] == {"subtype": "success", "request_id": "r1"}
        interrupted = fake.read()
        assert interrupted["type"] == "user"
        assert interrupted["message"]["content"][0]["text"] == "[Request interrupted by user]"
        aborted = fake.read()
        assert time.monotonic() - started < 5
        assert aborted["type"] == "result"
        assert (aborted["subtype"], aborted["is_error"]) == ("error_during_execution", True)
        assert "result" not in aborted

        fake.say("after [[error:429]]")  # errors do not end a warm process
        assert fake.read()["subtype"] == "init"
        assert fake.read()["message"]["model"] == "<synthetic>"
        assert fake.read()["api_error_status"] == 429
        fake.say("last")
        assert [fake.read()["type"] for _ in range(2)] == ["system", "assistant"]
        assert fake.read()["result"] == "echo: last (turn 5)"
    finally:
        code, stderr = fake.close()
    assert code == 0
    assert stderr == b""
    # The warm process kept the session on disk: a one-shot resume continues it.
    assert run_json(["--resume", SID], "cold", work, env)["result"] == "echo: cold (turn 6)"


def test_warm_mode_prints_nothing_before_the_first_message(work: Path, env: dict[str, str]) -> None:
    fake = WarmFake([], work, env)
    try:
        time.sleep(0.3)
        assert fake.lines.empty()  # measured: the real CLI is silent until the first user line
        for n in (1, 2):
            fake.say(f"t{n}")
            assert [fake.read()["type"] for _ in range(3)] == ["system", "assistant", "result"]
    finally:
        assert fake.close()[0] == 0


def test_warm_mode_invalid_input_line_ends_the_process(work: Path, env: dict[str, str]) -> None:
    fake = WarmFake([], work, env)
    fake.say("ok")
    assert fake.read(timeout=5)["type"] == "system"
    fake.send("this is {not json")
    code, stderr = fake.close()
    assert code == 1  # measured with the real CLI: it gives up on the stream
    assert b"Error parsing streaming input line: this is {not json" in stderr


def test_warm_mode_costs_accumulate_like_the_real_cli(work: Path, env: dict[str, str]) -> None:
    """total_cost_usd and modelUsage grow over the process; usage is per turn (measured)."""
    fake = WarmFake(["--model", "sonnet"], work, env)
    results = []
    try:
        for prompt in ("one", "two [[error:500]]", "three [[sleep:30]]", "four"):
            fake.say(prompt)
            if "sleep" in prompt:
                assert fake.read()["subtype"] == "init"
                fake.interrupt("r1")
            while (line := fake.read())["type"] != "result":
                pass
            results.append(line)
    finally:
        assert fake.close()[0] == 0
    one, error, interrupted, four = results
    assert one["total_cost_usd"] > 0
    # An API error and an interrupt add nothing but still report the totals so far.
    assert error["total_cost_usd"] == interrupted["total_cost_usd"] == one["total_cost_usd"]
    assert error["modelUsage"] == interrupted["modelUsage"] == one["modelUsage"]
    assert four["total_cost_usd"] > one["total_cost_usd"]
    per_turn = four["usage"]["input_tokens"] * 3 / 1e6 + four["usage"]["output_tokens"] * 15 / 1e6
    assert four["total_cost_usd"] == pytest.approx(one["total_cost_usd"] + per_turn)
    (stats,) = four["modelUsage"].values()
    assert stats["inputTokens"] == one["usage"]["input_tokens"] + four["usage"]["input_tokens"]
    assert stats["costUSD"] == pytest.approx(four["total_cost_usd"])


def test_warm_mode_queues_messages_sent_during_a_turn(work: Path, env: dict[str, str]) -> None:
    fake = WarmFake([], work, env)
    try:
        fake.say("a [[sleep:0.3]]")
        fake.say("b")
        results = [line for line in (fake.read() for _ in range(6)) if line["type"] == "result"]
        assert [r["result"] for r in results] == [
            "echo: a [[sleep:0.3]] (turn 1)",
            "echo: b (turn 2)",
        ]
    finally:
        assert fake.close()[0] == 0


def test_warm_mode_sigterm_while_idle(work: Path, env: dict[str, str]) -> None:
    fake = WarmFake([], work, env)
    fake.say("one")
    while fake.read()["type"] != "result":  # the process is up and idle again
        pass
    fake.proc.send_signal(signal.SIGTERM)
    assert fake.close() == (143, b"")
    assert fake.lines.empty()  # nothing printed after the signal


# --------------------------------------------------------------------------- env knobs


def test_log_records_argv_env_and_prompts(work: Path, env: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "fake.log"
    env["FAKE_CLAUDE_LOG"] = str(log)
    env["CLAUDECODE"] = "1"
    procs = [
        subprocess.Popen(
            [sys.executable, str(FAKE), "-p", "--output-format", "json"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            cwd=work,
            env=env,
        )
        for _ in range(4)
    ]
    for i, proc in enumerate(procs):
        proc.communicate(f"secret prompt {i}".encode(), timeout=10)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    invocations = [e for e in entries if "argv" in e]
    turns = [e for e in entries if "turn_prompt" in e]
    assert len(invocations) == len(turns) == 4
    assert {e["pid"] for e in invocations} == {p.pid for p in procs}
    for entry in invocations:
        assert entry["env_CLAUDECODE"] == "1"
        assert entry["cwd"] == str(work)
        assert entry["ppid"] == os.getpid()
        assert entry["stdin_is_tty"] is False
        assert not any("secret" in arg for arg in entry["argv"])
    assert sorted(t["turn_prompt"] for t in turns) == [f"secret prompt {i}" for i in range(4)]


def test_start_delay(work: Path, env: dict[str, str]) -> None:
    env["FAKE_CLAUDE_START_DELAY"] = "0.3"
    started = time.monotonic()
    proc = run_fake(["-p"], cwd=work, env=env)
    assert proc.returncode == 0
    assert time.monotonic() - started >= 0.3


def test_start_time(work: Path, env: dict[str, str]) -> None:
    """Report how fast the fake starts (benchmarks spawn one per turn); assert only loosely."""
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        proc = run_fake(["-p", "--output-format", "json"], cwd=work, env=env)
        timings.append((time.perf_counter() - started) * 1000)
        assert proc.returncode == 0
    print(f"fake claude one-shot json turn: min {min(timings):.1f} ms over {len(timings)} runs")
    assert min(timings) < 1000
