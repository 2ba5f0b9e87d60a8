"""Turn backends: how one resolved turn is executed.

A backend receives a fully resolved :class:`TurnRequest` (binary, session id,
cwd, env, timeout) from :class:`~daemon.claude.engine.ClaudeEngine`, which
keeps the locking and session bookkeeping. :class:`ColdBackend` starts one
``claude -p`` process per turn; a warm backend (one long-lived CLI per session,
daemon/claude/warm.py) implements the same :class:`TurnBackend` protocol.

Both speak stream-json both ways (``--input-format stream-json --output-format
stream-json --verbose``): the prompt is one user line on stdin, and stdin stays open until
the turn's ``result`` line (a cold CLI then exits). So every turn is read by the same
:class:`TurnLines` and reports the same progress (daemon/claude/progress.py), and the CLI
can ask its parent questions mid-turn (control requests) whichever backend runs it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Protocol

import orjson

from daemon.claude.argv import build_argv
from daemon.claude.errors import ClaudeCLIError, ErrorCode
from daemon.claude.options import ClaudeOptions
from daemon.claude.permissions import PermissionRelay, Write
from daemon.claude.progress import ProgressMapper, notify
from daemon.claude.results import StdoutLines, TurnResult, classify_result
from daemon.claude.runner import OutputLimitError, RunResult, run_process
from daemon.claude.warm_process import user_message


@dataclass(frozen=True, slots=True)
class TurnRequest:
    """Everything a backend needs to execute one resolved turn."""

    prompt: str
    model: str | None
    opts: ClaudeOptions
    session_id: str
    resume: bool
    cwd: str
    env: dict[str, str]
    timeout_s: float
    claude_bin: str
    term_grace_s: float
    on_start: Callable[[int, list[str]], None]


class StreamState:
    """Where a streaming backend leaves the final TurnResult."""

    def __init__(self) -> None:
        self.result: TurnResult | None = None


def user_line(prompt: str) -> bytes:
    """The prompt as the one stdin line of a stream-json turn."""
    return orjson.dumps(user_message(prompt), option=orjson.OPT_APPEND_NEWLINE)


class TurnLines:
    """One turn's stdout, line by line, as both backends read it: JSON objects are parsed
    (anything else is kept, bounded, for the error of a turn that ends without a result),
    the CLI's control requests go to the turn's :class:`PermissionRelay` (which answers
    through ``write``), answers to our own control requests are skipped, and every other
    line is passed to the turn's ``on_progress`` listener as progress items before the
    caller sees it. :meth:`aclose` when the turn is over."""

    def __init__(self, opts: ClaudeOptions, write: Write) -> None:
        self.stdout = StdoutLines()
        self.result: dict[str, Any] | None = None
        self._mapper = ProgressMapper(partial=opts.include_partial_messages)
        self._on_progress = opts.on_progress
        self.relay = PermissionRelay(
            write,
            opts.on_permission,
            timeout_s=opts.permission_timeout_s,
            default=opts.permission_default,
        )

    def take(self, line: bytes) -> dict[str, Any] | None:
        """The line's object if the turn's caller should see it, else None."""
        obj = self.stdout.parse(line)
        if obj is None:
            return None
        kind = obj.get("type")
        if kind == "control_response":
            return None  # answers to our own control requests, not turn output
        if kind == "control_request":
            self.relay.take(obj)
            return None
        if kind == "result":
            self.result = obj
        else:
            notify(self._on_progress, self._mapper, obj)
        return obj

    async def aclose(self) -> None:
        await self.relay.aclose()


async def result_of(lines: AsyncGenerator[dict[str, Any], None], state: StreamState) -> TurnResult:
    """Read a backend's stream of one turn to its end: the turn's result, or its error."""
    async with aclosing(lines) as items:
        async for _ in items:
            pass
    assert state.result is not None
    return state.result


class TurnBackend(Protocol):
    """Executes resolved turns; locking and session bookkeeping stay in the engine."""

    mode: Literal["cold", "warm"]

    async def run_json(self, req: TurnRequest) -> TurnResult: ...

    def stream(
        self, req: TurnRequest, state: StreamState
    ) -> AsyncGenerator[dict[str, Any], None]: ...

    async def aclose(self) -> None: ...


@contextmanager
def spawn_errors(req: TurnRequest) -> Iterator[None]:
    """Translate spawn and output-limit failures into ClaudeCLIError."""
    try:
        yield
    except OutputLimitError as exc:
        raise ClaudeCLIError(
            ErrorCode.INVALID_OUTPUT,
            str(exc),
            exit_code=exc.result.returncode,
            stderr_tail=exc.result.stderr_tail.decode("utf-8", "replace"),
            session_id=req.session_id,
            pid=exc.result.pid,
        ) from exc
    except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
        # A missing cwd raises the same FileNotFoundError as a missing binary.
        if not os.path.isdir(req.cwd):
            raise ClaudeCLIError(
                ErrorCode.CLI_CRASHED,
                f"cannot start the CLI: cwd {req.cwd} does not exist",
                session_id=req.session_id,
            ) from exc
        raise ClaudeCLIError(
            ErrorCode.CLAUDE_NOT_FOUND,
            f"cannot execute {req.claude_bin}: {exc.strerror}",
            session_id=req.session_id,
        ) from exc


def _timeout_error(req: TurnRequest, run: RunResult) -> ClaudeCLIError:
    return ClaudeCLIError(
        ErrorCode.TIMEOUT,
        f"turn exceeded {req.timeout_s:g}s; the CLI process group was killed",
        exit_code=run.returncode,
        stderr_tail=run.stderr_tail.decode("utf-8", "replace"),
        session_id=req.session_id,
        pid=run.pid,
    )


class ColdBackend:
    """One fresh ``claude -p`` process per turn, in stream-json mode (see the module
    docstring): the result line closes its stdin, and it exits."""

    mode: Literal["cold", "warm"] = "cold"

    async def run_json(self, req: TurnRequest) -> TurnResult:
        state = StreamState()
        return await result_of(self.stream(req, state), state)

    async def stream(
        self, req: TurnRequest, state: StreamState
    ) -> AsyncGenerator[dict[str, Any], None]:
        argv = build_argv(
            req.claude_bin,
            model=req.model,
            opts=req.opts,
            session_id=req.session_id,
            resume=req.resume,
        )
        lines: asyncio.Queue[bytes | None] = asyncio.Queue()
        # After the prompt: our answers to the CLI's control requests, then None (the result
        # line is in) closes stdin and the CLI exits.
        stdin: asyncio.Queue[bytes | None] = asyncio.Queue()
        task = asyncio.create_task(
            run_process(
                argv,
                stdin_data=user_line(req.prompt),
                stdin_more=stdin,
                cwd=req.cwd,
                env=req.env,
                timeout_s=req.timeout_s,
                term_grace_s=req.term_grace_s,
                on_start=lambda pid: req.on_start(pid, argv),
                on_stdout_line=lines.put_nowait,
                collect_stdout=False,
            )
        )
        task.add_done_callback(lambda _: lines.put_nowait(None))

        async def write(obj: dict[str, Any]) -> bool:
            if task.done():
                return False
            stdin.put_nowait(orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE))
            return True

        turn = TurnLines(req.opts, write)
        try:
            while (line := await lines.get()) is not None:
                if (obj := turn.take(line)) is None:
                    continue
                if turn.result is not None:
                    stdin.put_nowait(None)
                yield obj
            with spawn_errors(req):
                run = await task
        finally:
            await turn.aclose()
            if not task.done():
                # aclose()/cancel of the consumer: the runner's cancel path
                # terminates the group before we return.
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if run.timed_out:
            raise _timeout_error(req, run)
        state.result = classify_result(
            turn.result,
            exit_code=run.returncode,
            stderr_tail=run.stderr_tail.decode("utf-8", "replace"),
            requested_model=req.model,
            session_id=req.session_id,
            pid=run.pid,
            stdout_sample=turn.stdout.excerpt() if turn.result is None else "",
        )

    async def aclose(self) -> None:
        """Cold runs belong to their callers; the engine kills their groups."""


class TurnStream(AsyncIterator[dict[str, Any]]):
    """Async iterator over one turn's stream-json lines (the last is ``result``).

    Raises ClaudeCLIError after the last line if the turn failed. ``aclose()``
    (or leaving ``async with``) kills the CLI's process group; ``break`` alone
    does not, so always close it. ``result`` holds the TurnResult on success.
    """

    def __init__(
        self, gen: AsyncGenerator[dict[str, Any], None], state: StreamState, session_id: str
    ) -> None:
        self._gen = gen
        self._state = state
        self.session_id = session_id

    @property
    def result(self) -> TurnResult | None:
        return self._state.result

    def __aiter__(self) -> TurnStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        await self._gen.aclose()

    async def __aenter__(self) -> TurnStream:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
