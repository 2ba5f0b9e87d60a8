"""A credential-free tour of the daemon: ``./scripts/demo``.

Starts the loopback stub of the Anthropic API, starts a daemon wired to it (the real pinned
Claude Code CLI does the work; no request leaves 127.0.0.1), then runs a short session:
HEALTH_CHECK, a SPAWN, a resumed turn, an async SPAWN whose PROCESS_COMPLETE arrives on a
subscription, and a look at the session and its JSONL log. Everything is cleaned up at the end.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from daemon.client import AsyncClient
from devtools.stub_api import OFFLINE_CLI_ENV, StubAPI

ROOT = Path(__file__).resolve().parent.parent


def say(title: str, detail: str = "") -> None:
    print(f"\n== {title}")
    if detail:
        print(detail)


async def tour(sock: Path, work: Path) -> None:
    async with AsyncClient.connect(sock, agent_id="demo") as c:
        health = await c.call("HEALTH_CHECK")
        # Wait for the background start-up work (LiteLLM import, CLI version probe) so the
        # timings below are those of a turn, not of start-up.
        while (
            health["claude"].get("version_probed") is False
            or health["litellm"]["status"] == "loading"
        ):
            await asyncio.sleep(0.1)
            health = await c.call("HEALTH_CHECK")
        say(
            "HEALTH_CHECK",
            f"status={health['status']} claude={health['claude']['bin']} "
            f"version={health['claude']['version']} litellm={health['litellm']['status']}",
        )

        t = time.perf_counter()
        first = await c.call("SPAWN", {"prompt": "Hello from the KSI demo", "cwd": str(work)})
        say(
            "SPAWN (sync)",
            f"text={first['text']!r}\nsession_id={first['session_id']} "
            f"cost_usd={first['cost_usd']} tokens_in={first['usage']['input_tokens']} "
            f"({(time.perf_counter() - t) * 1000:.0f} ms)",
        )

        second = await c.call(
            "SPAWN", {"prompt": "And this is turn two", "session_id": first["session_id"]}
        )
        say(
            "SPAWN (resume)",
            f"text={second['text']!r} same session: {second['session_id'] == first['session_id']}",
        )

        await c.subscribe(["PROCESS_*"])
        job = await c.call(
            "SPAWN",
            {
                "prompt": "A turn in the background",
                "mode": "async",
                "session_id": first["session_id"],
            },
        )
        say("SPAWN (async)", f"process_id={job['process_id']} status={job['status']}")
        while True:
            event = await c.next_event(timeout=120)
            data: dict[str, Any] = event["data"]
            print(
                f"   event seq={event['seq']} {event['event']} process={data['process_id']}"
                + (
                    f" text={data.get('text')!r}"
                    if event["event"] == "PROCESS_COMPLETE"
                    else f" pid={data.get('pid')}"
                )
            )
            if event["event"] == "PROCESS_COMPLETE":
                break

        session = (await c.call("GET_SESSION", {"session_id": first["session_id"]}))["session"]
        say(
            "GET_SESSION",
            f"turns={session['turns']} total_cost_usd={session['total_cost_usd']}"
            f"\nlog={session['log_path']}",
        )
        log_text = await asyncio.to_thread(Path(session["log_path"]).read_text)
        for line in log_text.splitlines()[:4]:
            print("   " + (line[:110] + "…" if len(line) > 110 else line))


def main() -> int:
    claude = ROOT / "node_modules" / ".bin" / "claude"
    if not claude.exists():
        print("the pinned Claude Code CLI is not installed: run ./scripts/setup", file=sys.stderr)
        return 1
    base = Path(tempfile.mkdtemp(prefix="ksi-demo-", dir="/tmp"))
    sock = base / "demo.sock"
    work = base / "work"
    work.mkdir()
    with StubAPI() as stub:
        env = {k: v for k, v in os.environ.items() if k != "CLAUDECODE"}
        env.update(OFFLINE_CLI_ENV)
        env.update(
            {
                "ANTHROPIC_BASE_URL": stub.url,
                "KSI_CLAUDE_BIN": str(claude),
                "CLAUDE_CONFIG_DIR": str(base / "claude-config"),
            }
        )
        say("starting", f"stub Anthropic API on {stub.url}; daemon socket {sock}")
        daemon = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "daemon.py"),
                "--socket",
                str(sock),
                "--state-dir",
                str(base / "state"),
                "--log-dir",
                str(base / "logs"),
                "--log-level",
                "WARNING",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 15
            while not sock.exists():
                if daemon.poll() is not None or time.monotonic() > deadline:
                    print("the daemon did not start", file=sys.stderr)
                    return 1
                time.sleep(0.05)
            asyncio.run(tour(sock, work))
            say(
                "model calls the stub answered",
                str(sum(1 for r in stub.requests() if r["path"] == "/v1/messages")),
            )
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(20)
            shutil.rmtree(base, ignore_errors=True)
    say("done", "daemon stopped, stub stopped, temporary files removed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
