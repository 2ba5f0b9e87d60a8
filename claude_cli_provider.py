"""LiteLLM custom provider ``claude-cli``: ``litellm.acompletion(model="claude-cli/sonnet")``.

The only module that imports LiteLLM. Each call runs one turn of the Claude
Code CLI through :class:`daemon.claude.ClaudeEngine`.

Calling convention::

    resp = await litellm.acompletion(
        model="claude-cli/sonnet",            # "claude-cli/default": the CLI's own default
        messages=[{"role": "user", "content": "hi"}],
        claude={"session_id": "<uuid>", "max_turns": 3, "cwd": "/srv/project"},
    )
    resp._hidden_params["claude_session_id"], resp._hidden_params["response_cost"]

* All CLI options travel in the one namespaced kwarg ``claude={...}``
  (:class:`~daemon.claude.ClaudeOptions`); OpenAI ``tools``, ``timeout``,
  ``user`` and friends are ignored. The time limit is ``claude.timeout_s``
  (LiteLLM forwards ``timeout`` as 600.0 even when nobody set it).
* Only the **last user message** is sent. Earlier user/assistant messages are
  not replayed: continuity comes from the CLI's own session store via
  ``claude.session_id`` (``--resume``). ``system`` messages become
  ``append_system_prompt`` unless that option is given explicitly.
* Failures raise the ``Claude*Error`` classes below (LiteLLM exception
  subclasses with ``.ksi_code`` and ``.claude_error``). While streaming,
  LiteLLM wraps 429/5xx errors in ``MidStreamFallbackError``; use
  :func:`claude_error_of` to get at ours. Never set ``num_retries``: a retry
  re-runs a paid, non-idempotent CLI turn.
* Streaming yields, in order: one empty chunk as soon as the CLI starts whose
  ``claude_session_id`` attribute names the session; text chunks (whole
  assistant text blocks, or deltas with ``include_partial_messages``); an
  empty chunk carrying ``claude_session_id``, ``claude_cost_usd`` and
  ``claude_result``; the ``finish_reason="stop"`` chunk.
* Streams must be closed: ``break`` does not stop the provider generator, only
  ``await stream.aclose()`` does (then the CLI's process group is killed).
"""

from __future__ import annotations

import os

# Must precede the LiteLLM import: otherwise import blocks on a remote
# cost-map fetch (with retries) and logging goes to stdout at DEBUG.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ.setdefault("LITELLM_LOG", "ERROR")

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import litellm
from litellm.exceptions import (
    APIError,
    AuthenticationError,
    BadRequestError,
    InternalServerError,
    NotFoundError,
    RateLimitError,
    ServiceUnavailableError,
    Timeout,
)
from litellm.llms.custom_llm import CustomLLM
from litellm.types.utils import Choices, GenericStreamingChunk, Message, ModelResponse, Usage
from openai import OpenAIError

from daemon.claude import (
    CURRENT_ENGINE,
    ClaudeCLIError,
    ClaudeEngine,
    ClaudeOptions,
    EngineConfig,
    ErrorCode,
    TurnResult,
)
from daemon.claude.chat import (
    cli_model,
    event_text,
    options_from_kwarg,
    prompt_from_messages,
    provider_fields,
    usage_numbers,
)
from daemon.claude.errors import claude_error_of as claude_error_of  # public re-export

PROVIDER = "claude-cli"
_WARMUP_KWARG = "ksi_warmup"
_T = TypeVar("_T")


# -- exceptions ---------------------------------------------------------------


class _ClaudeErrorMixin:
    """Adds ``ksi_code`` (the daemon's :class:`ErrorCode`) and the original error."""

    ksi_code: ErrorCode = ErrorCode.INTERNAL_ERROR
    claude_error: ClaudeCLIError | None = None


class ClaudeBadRequestError(_ClaudeErrorMixin, BadRequestError):
    """400: the ``claude={...}`` options or the messages were invalid (no CLI ran)."""


class ClaudeMaxTurnsError(_ClaudeErrorMixin, BadRequestError):
    """400: the turn hit ``max_turns``."""


class ClaudeAuthenticationError(_ClaudeErrorMixin, AuthenticationError):
    """401: the Messages API rejected the CLI's credentials."""


class ClaudeSessionNotFoundError(_ClaudeErrorMixin, NotFoundError):
    """404: ``session_id`` is unknown in that cwd (resume is cwd-scoped)."""


class ClaudeTimeoutError(_ClaudeErrorMixin, Timeout):
    """408: ``timeout_s`` elapsed; the CLI's process group was killed."""


class ClaudeRateLimitError(_ClaudeErrorMixin, RateLimitError):
    """429: the Messages API rate-limited the CLI."""


class ClaudeAPIError(_ClaudeErrorMixin, APIError):
    """Upstream API failure; ``status_code`` is the API's status, 502 when it had none."""


class ClaudeCLICrashError(_ClaudeErrorMixin, InternalServerError):
    """500: the CLI died, or printed output we could not parse."""


class ClaudeInternalError(_ClaudeErrorMixin, InternalServerError):
    """500: a bug on our side; never a bare exception."""


class ClaudeUnavailableError(_ClaudeErrorMixin, ServiceUnavailableError):
    """503: no CLI binary installed, or the engine is shutting down."""


_BY_CODE: dict[ErrorCode, type[_ClaudeErrorMixin]] = {
    ErrorCode.CLAUDE_NOT_FOUND: ClaudeUnavailableError,
    ErrorCode.SESSION_NOT_FOUND: ClaudeSessionNotFoundError,
    ErrorCode.INVALID_PARAMETERS: ClaudeBadRequestError,
    ErrorCode.AUTH_FAILED: ClaudeAuthenticationError,
    ErrorCode.RATE_LIMITED: ClaudeRateLimitError,
    ErrorCode.API_ERROR: ClaudeAPIError,
    ErrorCode.MAX_TURNS: ClaudeMaxTurnsError,
    ErrorCode.TIMEOUT: ClaudeTimeoutError,
    ErrorCode.CANCELLED: ClaudeUnavailableError,
    ErrorCode.CLI_CRASHED: ClaudeCLICrashError,
    ErrorCode.INVALID_OUTPUT: ClaudeCLICrashError,
}


def _make_error(
    cls: type[_ClaudeErrorMixin],
    message: str,
    model: str,
    *,
    ksi_code: ErrorCode,
    claude_error: ClaudeCLIError | None = None,
    status_code: int | None = None,
) -> Exception:
    kwargs: dict[str, Any] = {"message": message, "model": model, "llm_provider": PROVIDER}
    if issubclass(cls, APIError):
        kwargs["status_code"] = status_code or 502
    exc = cls(**kwargs)
    exc.ksi_code = ksi_code
    exc.claude_error = claude_error
    assert isinstance(exc, Exception)
    return exc


def map_claude_error(err: ClaudeCLIError, model: str) -> Exception:
    """The LiteLLM exception (subclass) a ClaudeCLIError is raised as."""
    status = err.api_error_status if err.code is ErrorCode.API_ERROR else None
    cls = _BY_CODE.get(err.code, ClaudeInternalError)
    return _make_error(
        cls, err.message, model, ksi_code=err.code, claude_error=err, status_code=status
    )


def ksi_code_of(exc: BaseException) -> ErrorCode | None:
    """``ksi_code`` of a provider error, also when LiteLLM wrapped it while streaming."""
    for candidate in (exc, getattr(exc, "original_exception", None)):
        code = getattr(candidate, "ksi_code", None)
        if isinstance(code, ErrorCode):
            return code
    return None


@contextmanager
def _litellm_errors(model: str) -> Iterator[None]:
    """Only LiteLLM exception subclasses leave the provider (CancelledError aside)."""
    try:
        yield
    except ClaudeCLIError as err:
        raise map_claude_error(err, model) from err
    except OpenAIError:
        raise  # ours: every LiteLLM exception derives from openai.OpenAIError
    except Exception as exc:
        raise _make_error(
            ClaudeInternalError,
            f"{type(exc).__name__}: {exc}",
            model,
            ksi_code=ErrorCode.INTERNAL_ERROR,
        ) from exc


# -- requests and responses ---------------------------------------------------


def _parse_request(
    messages: list[Any], params: Mapping[str, Any], model: str
) -> tuple[str, ClaudeOptions]:
    try:
        prompt, system = prompt_from_messages(messages)
        return prompt, options_from_kwarg(params.get("claude"), system)
    except ValueError as exc:  # includes pydantic.ValidationError
        raise _make_error(
            ClaudeBadRequestError, f"invalid request: {exc}", model, ksi_code=ErrorCode.BAD_REQUEST
        ) from exc


def build_response(turn: TurnResult, requested_model: str) -> ModelResponse:
    """ModelResponse for a finished turn (text, usage, session id and cost attached)."""
    prompt, completion, cache_read, cache_creation = usage_numbers(turn.usage)
    response = ModelResponse(
        id=f"claude-cli-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=f"{PROVIDER}/{turn.model or requested_model}",
        choices=[
            Choices(
                index=0,
                finish_reason="stop",
                message=Message(
                    role="assistant",
                    content=turn.text,
                    provider_specific_fields=provider_fields(turn),
                ),
            )
        ],
        usage=Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            cache_read_input_tokens=cache_read,
            cache_creation_input_tokens=cache_creation,
        ),
    )
    # response_cost set here is used as-is by LiteLLM (it skips its own lookup).
    response._hidden_params.update(
        {"claude_session_id": turn.session_id, "response_cost": turn.cost_usd, "claude_turn": turn}
    )
    return response


def _chunk(text: str) -> GenericStreamingChunk:
    return GenericStreamingChunk(
        text=text, is_finished=False, finish_reason="", usage=None, index=0, tool_use=None
    )


def _final_chunk(turn: TurnResult) -> GenericStreamingChunk:
    prompt, completion, _, _ = usage_numbers(turn.usage)
    return GenericStreamingChunk(
        text="",
        is_finished=True,
        finish_reason="stop",
        usage={
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
        index=0,
        tool_use=None,
        provider_specific_fields=provider_fields(turn),
    )


def _warmup_response(model: str) -> ModelResponse:
    response = ModelResponse(model=f"{PROVIDER}/{model}")
    response.choices[0].message.content = "warm"
    response._hidden_params["response_cost"] = 0.0
    return response


# -- the provider -------------------------------------------------------------


def _run_coro_sync(make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine from sync code, in a fresh thread if this one has a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(make())
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name="claude-cli-sync", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    value: _T = box["value"]
    return value


class ClaudeCLIProvider(CustomLLM):
    """LiteLLM CustomLLM running Claude Code CLI turns via a ClaudeEngine."""

    def __init__(self, engine: ClaudeEngine | None = None) -> None:
        super().__init__()
        if engine is None:
            engine = ClaudeEngine(
                EngineConfig(
                    claude_bin=os.environ.get("KSI_CLAUDE_BIN") or os.environ.get("CLAUDE_BIN"),
                    project_root=Path(__file__).resolve().parent,
                    default_cwd=Path(os.getcwd()),
                )
            )
        self._engine = engine

    @property
    def engine(self) -> ClaudeEngine:
        """The engine of the caller's context (``use_engine``), else this provider's own.

        LiteLLM keeps one provider per process (``custom_provider_map``); a process that runs
        several engines (daemons under test, in one process) says which one a call is for.
        """
        return CURRENT_ENGINE.get() or self._engine

    # LiteLLM passes every argument by keyword (main._complete_custom_providers);
    # only ``optional_params`` matters here, where ``claude={...}`` arrives.
    async def acompletion(
        self, model: str, messages: list[Any], *args: Any, **kwargs: Any
    ) -> ModelResponse:
        params: Mapping[str, Any] = kwargs.get("optional_params") or {}
        if params.get(_WARMUP_KWARG):
            return _warmup_response(model)
        with _litellm_errors(model):
            prompt, opts = _parse_request(messages, params, model)
            turn = await self.engine.run_turn(prompt, model=cli_model(model), opts=opts)
            return build_response(turn, model)

    # The base class declares a coroutine, but LiteLLM iterates the result with
    # `async for`: it must be an async generator (a coroutine fails, litellm#28475).
    async def astreaming(  # type: ignore[override]
        self, model: str, messages: list[Any], *args: Any, **kwargs: Any
    ) -> AsyncIterator[GenericStreamingChunk]:
        params: Mapping[str, Any] = kwargs.get("optional_params") or {}
        if params.get(_WARMUP_KWARG):
            yield _chunk("warm")
            yield {**_chunk(""), "is_finished": True, "finish_reason": "stop"}
            return
        stream = None
        try:
            with _litellm_errors(model):
                prompt, opts = _parse_request(messages, params, model)
                stream = self.engine.stream_turn(prompt, model=cli_model(model), opts=opts)
                async for event in stream:
                    if event.get("type") == "system" and event.get("subtype") == "init":
                        # Tells the consumer the session id before the model answers.
                        sid = {"claude_session_id": stream.session_id}
                        yield {**_chunk(""), "provider_specific_fields": sid}
                        continue
                    text = event_text(event, opts.include_partial_messages)
                    if text:
                        yield _chunk(text)
                if stream.result is None:  # the engine raises on failure; defensive only
                    raise ClaudeCLIError(ErrorCode.INVALID_OUTPUT, "stream ended without result")
                yield _final_chunk(stream.result)
        finally:
            if stream is not None:
                # Runs on aclose() too: kills the CLI's process group if still running.
                await stream.aclose()

    def completion(self, *args: Any, **kwargs: Any) -> ModelResponse:
        """Sync wrapper for ``litellm.completion``."""
        return _run_coro_sync(lambda: self.acompletion(*args, **kwargs))

    def streaming(self, *args: Any, **kwargs: Any) -> Iterator[GenericStreamingChunk]:
        """Sync wrapper for ``litellm.completion(stream=True)``: drives astreaming on a
        private loop thread; closing this generator closes the async one (kills the CLI)."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="claude-cli-stream", daemon=True)
        thread.start()
        agen = self.astreaming(*args, **kwargs)

        async def next_chunk() -> GenericStreamingChunk:
            return await anext(agen)

        async def close() -> None:
            await agen.aclose()  # type: ignore[attr-defined]

        try:
            while True:
                try:
                    chunk = asyncio.run_coroutine_threadsafe(next_chunk(), loop).result()
                except StopAsyncIteration:
                    return
                yield chunk
        finally:
            asyncio.run_coroutine_threadsafe(close(), loop).result()
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()


# -- module-level helpers -----------------------------------------------------


def register(provider: ClaudeCLIProvider | None = None) -> ClaudeCLIProvider:
    """Install ``provider`` as "claude-cli", replacing only a previous "claude-cli" entry.

    LiteLLM uses the *last* entry of a duplicated name, so stale ones are removed.
    """
    provider = provider or ClaudeCLIProvider()
    others = [e for e in litellm.custom_provider_map if e.get("provider") != PROVIDER]
    litellm.custom_provider_map = [*others, {"provider": PROVIDER, "custom_handler": provider}]
    return provider


def quiet_litellm() -> None:
    """Daemon-safe LiteLLM settings: no stdout banners, no retries.

    ``turn_off_message_logging`` is left as it is (off by default): it redacts prompts for
    LiteLLM logging callbacks, none are registered here, and it deep-copies every response
    to do so (measured: 0.7 ms of CPU per turn, 13 % of the daemon's). Whoever adds a
    callback that should not see prompts sets it along with the callback.
    """
    litellm.suppress_debug_info = True
    litellm.drop_params = True
    litellm.num_retries = None
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):
        logger = logging.getLogger(name)
        # LiteLLM's own handler prints records below WARNING to stdout.
        logger.handlers.clear()
        logger.propagate = True


async def warm_up(provider: ClaudeCLIProvider | None = None) -> None:
    """Pay LiteLLM's lazy-import cost (~150 ms) at startup without running a CLI.

    Both calls go through ``litellm.acompletion`` into the registered provider
    (one plain, one streamed); the private ``ksi_warmup=True`` kwarg reaches
    ``optional_params`` and makes the provider answer without the engine.
    ``mock_response`` would not do: LiteLLM answers it without calling the provider.
    """
    registered = any(
        e.get("provider") == PROVIDER and (provider is None or e.get("custom_handler") is provider)
        for e in litellm.custom_provider_map
    )
    if not registered:
        register(provider)
    messages = [{"role": "user", "content": "warm-up"}]
    await litellm.acompletion(model=f"{PROVIDER}/warmup", messages=messages, ksi_warmup=True)
    stream = await litellm.acompletion(
        model=f"{PROVIDER}/warmup", messages=messages, ksi_warmup=True, stream=True
    )
    try:
        async for _ in stream:
            pass
    finally:
        await stream.aclose()
