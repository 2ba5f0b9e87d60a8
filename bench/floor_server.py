"""Minimal asyncio servers on a Unix socket: the floors the daemon is measured against.

Same interpreter, same event loop and the same stream API (``start_unix_server``,
``readuntil``, ``write``/``drain``) as the daemon, and nothing else::

    python -m bench.floor_server --socket S --mode echo    [--replies FILE]
    python -m bench.floor_server --socket S --mode oneshot [--replies FILE]
    python -m bench.floor_server --socket S --mode exec    --fake PATH
    python -m bench.floor_server --socket S --mode litellm --fake PATH

* ``echo``: every line gets a fixed reply line (by default ``{"status":"success"}``;
  ``--replies`` maps exact request lines to the daemon's own reply bytes, so reply sizes
  match). ``oneshot``: the same, then the connection is closed (one command per connection).
* ``exec``: every line runs the fake CLI once with bare ``asyncio.create_subprocess_exec``
  (the prompt on stdin, ``communicate()``) and replies with its stdout plus the exec time
  measured in-process. The line ``C <n>`` sets the connection's parallelism (an
  ``asyncio.Semaphore``, default 1); requests run as tasks so that pipelined lines overlap
  up to that limit, like async SPAWNs under the daemon's concurrency cap.
* ``litellm``: ``exec`` behind ``litellm.acompletion``: a minimal ``CustomLLM`` whose
  ``acompletion`` is that bare exec, returning a ``ModelResponse`` with its cost set (as
  ours does, so LiteLLM skips its cost lookup), and LiteLLM configured as the provider
  module configures it. The daemon must call LiteLLM, so this is the floor of "LiteLLM plus
  a process per turn, nothing else": what is left above it is the daemon's own work.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

DEFAULT_REPLY = b'{"status":"success"}\n'


async def serve_echo(path: str, replies: dict[bytes, bytes], oneshot: bool) -> None:
    default = replies.get(b"*", DEFAULT_REPLY)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readuntil(b"\n")
                writer.write(replies.get(line, default))
                await writer.drain()
                if oneshot:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    server = await asyncio.start_unix_server(handle, path=path, limit=8 * 1024 * 1024)
    await _run_until_signal(server)


async def bare_exec(fake: str, prompt: bytes) -> tuple[int, bytes, int]:
    """Run the fake once: (returncode, stdout, exec time in ns)."""
    started = time.perf_counter_ns()
    argv = [
        fake,
        "-p",
        "--output-format",
        "json",
        "--model",
        "sonnet",
        "--session-id",
        str(uuid.uuid4()),
    ]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate(prompt)
    assert proc.returncode is not None
    return proc.returncode, out, time.perf_counter_ns() - started


def litellm_runner(fake: str) -> Callable[[bytes], Awaitable[tuple[int, bytes, int]]]:
    """bare_exec behind litellm.acompletion (see the module docstring)."""
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # as the provider: no remote fetch
    os.environ.setdefault("LITELLM_LOG", "ERROR")
    import litellm
    from litellm.llms.custom_llm import CustomLLM
    from litellm.types.utils import ModelResponse

    class FloorLLM(CustomLLM):
        async def acompletion(self, *args: Any, **kwargs: Any) -> ModelResponse:
            rc, out, exec_ns = await bare_exec(fake, kwargs["messages"][0]["content"].encode())
            response = ModelResponse(model="floor/sonnet")
            response.choices[0].message.content = out.decode(errors="replace")
            response._hidden_params.update({"response_cost": 0.0, "rc": rc, "exec_ns": exec_ns})
            return response

    litellm.suppress_debug_info = True
    litellm.custom_provider_map = [{"provider": "floor", "custom_handler": FloorLLM()}]

    async def run(prompt: bytes) -> tuple[int, bytes, int]:
        response = await litellm.acompletion(
            model="floor/sonnet", messages=[{"role": "user", "content": prompt.decode()}]
        )
        hidden = response._hidden_params
        return hidden["rc"], response.choices[0].message.content.encode(), hidden["exec_ns"]

    return run


async def serve_exec(path: str, fake: str, via_litellm: bool = False) -> None:
    runner = litellm_runner(fake) if via_litellm else functools.partial(bare_exec, fake)
    if via_litellm:
        await runner(b"warm-up")  # LiteLLM's lazy imports happen on the first call

    async def run_one(line: bytes, sem: asyncio.Semaphore, writer: asyncio.StreamWriter) -> None:
        async with sem:
            rc, out, exec_ns = await runner(line)
        writer.write(
            orjson.dumps(
                {"exec_ns": exec_ns, "rc": rc, "out": out.decode(errors="replace")},
                option=orjson.OPT_APPEND_NEWLINE,
            )
        )
        await writer.drain()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sem = asyncio.Semaphore(1)
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                line = await reader.readuntil(b"\n")
                if line.startswith(b"C "):
                    sem = asyncio.Semaphore(int(line[2:]))
                    writer.write(b'{"ok":true}\n')
                    await writer.drain()
                    continue
                task = asyncio.create_task(run_one(line, sem, writer))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    server = await asyncio.start_unix_server(handle, path=path, limit=8 * 1024 * 1024)
    await _run_until_signal(server)


async def _run_until_signal(server: asyncio.Server) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def load_replies(path: str | None) -> dict[bytes, bytes]:
    if not path:
        return {}
    pairs = orjson.loads(Path(path).read_bytes())
    return {req.encode(): rep.encode() for req, rep in pairs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", required=True)
    ap.add_argument("--mode", choices=["echo", "oneshot", "exec", "litellm"], required=True)
    ap.add_argument("--replies", help="JSON list of [request_line, reply_line] ('*' = default)")
    ap.add_argument("--fake", help="fake CLI for --mode exec")
    args = ap.parse_args()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.socket)
    if args.mode in ("exec", "litellm"):
        if not args.fake:
            ap.error(f"--mode {args.mode} needs --fake")
        asyncio.run(serve_exec(args.socket, args.fake, via_litellm=args.mode == "litellm"))
    else:
        asyncio.run(serve_echo(args.socket, load_replies(args.replies), args.mode == "oneshot"))


if __name__ == "__main__":
    main()
